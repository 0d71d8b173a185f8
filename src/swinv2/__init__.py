"""swinv2: Swin Transformer V2 with the official numerics, every variant and weight format.

The public names load on first use (PEP 562), so that `swinv2 --help` and other commands that never
touch a model do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "create_backbone": "serve.backbone",
    "LoadReport": "weights.factory",
    "create_model": "weights.factory",
    "load_model": "weights.factory",
    "load_weights": "weights.factory",
    "save_weights": "weights.files",
    "convert_state_dict": "weights.convert",
    "count_flops": "tools.flops",
    "SwinTransformerV2": "model.transformer",
    "SwinV2Config": "model.transformer",
    "get_variant": "weights.registry",
    "list_models": "weights.registry",
    "retain_freed_cpu_memory": "allocator",
}
__all__ = [*_EXPORTS, "hub"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .allocator import retain_freed_cpu_memory
    from .model.transformer import SwinTransformerV2, SwinV2Config
    from .tools.flops import count_flops
    from .weights import hub
    from .weights.convert import convert_state_dict
    from .weights.factory import LoadReport, create_model, load_model, load_weights
    from .weights.files import save_weights
    from .weights.registry import get_variant, list_models


def __getattr__(name: str) -> Any:
    if name == "hub":
        return importlib.import_module(".weights.hub", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'swinv2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
