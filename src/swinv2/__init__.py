"""swinv2: Swin Transformer V2 with the official numerics, every variant and weight format."""
from . import hub
from .allocator import retain_freed_cpu_memory
from .checkpoint import LoadReport, create_model, load_model, load_weights, save_weights
from .convert import convert_state_dict
from .flops import count_flops
from .model import SwinTransformerV2, SwinV2Config
from .registry import get_variant, list_models

__all__ = [
    "LoadReport",
    "convert_state_dict",
    "load_model",
    "load_weights",
    "save_weights",
    "SwinTransformerV2",
    "SwinV2Config",
    "count_flops",
    "retain_freed_cpu_memory",
    "create_model",
    "get_variant",
    "list_models",
    "hub",
]
__version__ = "0.1.0"
