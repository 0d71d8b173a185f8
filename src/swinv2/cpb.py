"""The learned continuous position bias (paper §3.3) of every block, as (heads, 2w-1, 2w-1) tables.

Each attention layer's CPB MLP maps a relative offset (dy, dx), log-spaced, to one bias per head;
`16 * sigmoid` of it is what attention adds to its logits. Evaluated over every offset of a window
of any size w, this shows what the model learned about distance, and at windows larger than the
training window, how the log-spaced coordinates extrapolate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import windows
from .model import SwinTransformerV2, log_spaced_coords


@dataclass(frozen=True)
class CPBTable:
    """Position bias of one block: `bias[h, dy + w - 1, dx + w - 1]` for offsets dy, dx in [-(w-1), w-1]."""

    stage: int
    block: int
    window: int
    pretrained_window: int
    bias: Tensor  # (num_heads, 2w-1, 2w-1), fp32, in [0, 16]


def stage_windows(model: SwinTransformerV2, img_size: int | None = None) -> list[int]:
    """The window each stage really uses at `img_size` (default: the nominal size), clamps included."""
    cfg = model.config
    size = (img_size, img_size) if img_size else cfg.img_size
    return list(windows.stage_windows(size, cfg.patch_size, cfg.window_size, len(cfg.depths)))


@torch.no_grad()
def cpb_tables(model: SwinTransformerV2, window: int | None = None) -> list[CPBTable]:
    """The bias table of every block, at `window` for all stages, or at each stage's own window."""
    if window is not None and window < 1:
        raise ValueError(f"window must be positive, got {window}")
    windows = stage_windows(model) if window is None else [window] * len(model.layers)
    tables = []
    for i, (layer, w) in enumerate(zip(model.layers, windows)):
        for j, block in enumerate(layer.blocks):
            attn = block.attn
            weight = attn.cpb_mlp[0].weight
            coords = log_spaced_coords(w, attn.pretrained_window_size, weight.device).to(weight.dtype)
            bias = 16 * torch.sigmoid(attn.cpb_mlp(coords))  # ((2w-1)^2, nH)
            bias = bias.float().T.reshape(-1, 2 * w - 1, 2 * w - 1).cpu()
            tables.append(CPBTable(i, j, w, attn.pretrained_window_size, bias))
    return tables
