"""The network: window layout, attention kernels and their dispatch, CPU kernels, the continuous
position bias, the SwinV2 model with the official math read top to bottom, and SimMIM's network.

Imports torch and this package only (and the ground floor's error types).
"""

from .transformer import SwinTransformerV2, SwinV2Config

__all__ = ["SwinTransformerV2", "SwinV2Config"]
