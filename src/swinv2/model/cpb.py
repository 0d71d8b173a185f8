"""The learned continuous position bias (paper §3.3) of every block, as (heads, 2h-1, 2w-1) tables.

Each attention layer's CPB MLP maps a relative offset (dy, dx), log-spaced, to one bias per head;
`16 * sigmoid` of it is what attention adds to its logits. Evaluated over every offset of a window
of any size (square w or rectangular h x w), this shows what the model learned about distance, and at
windows larger than the training window, how the log-spaced coordinates extrapolate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from . import windows
from .attention import cpb_bias, cpb_input
from .transformer import BasicLayer, SwinTransformerBlock, SwinTransformerV2
from .windows import Pair, compact, pair


@dataclass(frozen=True)
class CPBTable:
    """Position bias of one block: `bias[head, dy + h - 1, dx + w - 1]` for offsets dy in [-(h-1), h-1],
    dx in [-(w-1), w-1] of an h x w window."""

    stage: int
    block: int
    window: int | Pair  # a square window as its int w, a rectangular one as (h, w)
    pretrained_window: int | Pair  # likewise; 0: none
    bias: Tensor  # (num_heads, 2h-1, 2w-1), fp32, in [0, 16]


def stage_windows(model: SwinTransformerV2, img_size: int | tuple[int, int] | None = None) -> list[int | Pair]:
    """The window each stage really uses at `img_size` (default: the nominal size), clamps included."""
    cfg = model.config
    size = cfg.img_size if img_size is None else pair(img_size)
    return list(windows.stage_windows(size, cfg.patch_size, cfg.window_size, len(cfg.depths)))


@torch.no_grad()
def cpb_tables(model: SwinTransformerV2, window: int | Pair | None = None) -> list[CPBTable]:
    """The bias table of every block, at `window` (int or (h, w)) for all stages, or at each stage's own."""
    if window is not None and min(pair(window)) < 1:
        raise ValueError(f"window must be positive, got {window}")
    per_stage = stage_windows(model) if window is None else [window] * len(model.layers)
    tables = []
    for i, (layer, w) in enumerate(zip(cast(Iterable[BasicLayer], model.layers), per_stage)):
        wh, ww = pair(w)
        for j, block in enumerate(cast(Iterable[SwinTransformerBlock], layer.blocks)):
            attn = block.attn
            weight = cast(nn.Linear, attn.cpb_mlp[0]).weight
            coords = cpb_input((wh, ww), attn.pretrained_window_size, weight.device).to(weight.dtype)
            bias = cpb_bias(attn.cpb_mlp, coords)  # ((2h-1)(2w-1), nH)
            bias = bias.float().T.reshape(-1, 2 * wh - 1, 2 * ww - 1).cpu()
            tables.append(CPBTable(i, j, compact((wh, ww)), compact(attn.pretrained_window_size), bias))
    return tables
