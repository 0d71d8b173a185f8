"""Analytic MAC count in the paper's convention (the official `flops()` methods), at any input size.

Counted as the official code counts: patch embedding, qkv / q@k / attn@v / proj, MLP, patch merging
and head, plus one MAC per element for each LayerNorm (including the official final-norm term of
C * H0 * W0 / 2**num_stages, and SwinV2-H/G's extra norms). Not counted: the CPB MLP, which is independent
of the input. Windows (per stage, square or (h, w)), padding and the window clamp follow the model, so
any input size is counted as it runs.
"""

from __future__ import annotations

import math

from ..model.transformer import SwinTransformerV2, SwinV2Config
from ..model.windows import effective_window
from ..weights.registry import get_variant


def _attention_macs(N: int, dim: int, heads: int) -> int:
    """One window of N tokens: qkv, q @ k^T, attn @ v, proj."""
    return N * dim * 3 * dim + 2 * heads * N * N * (dim // heads) + N * dim * dim


def count_flops(
    model_or_name: SwinTransformerV2 | SwinV2Config | str, img_size: int | tuple[int, int] | None = None
) -> int:
    """MACs of one forward pass of a model, config or registered name at `img_size` (default: nominal)."""
    if isinstance(model_or_name, str):
        cfg = get_variant(model_or_name).config
    elif isinstance(model_or_name, SwinTransformerV2):
        cfg = model_or_name.config
    else:
        cfg = model_or_name
    size = img_size if img_size is not None else cfg.img_size
    H, W = (size, size) if isinstance(size, int) else size
    p = cfg.patch_size
    H, W = math.ceil(H / p), math.ceil(W / p)
    H0, W0 = H, W
    macs = H * W * cfg.embed_dim * cfg.in_chans * p * p + (H * W * cfg.embed_dim if cfg.patch_norm else 0)
    dim, every = cfg.embed_dim, cfg.extra_norm_every_n_blocks
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
        wh, ww = cfg.stage_window_sizes[i]
        for j in range(depth):
            (h, w), _ = effective_window(H, W, (wh, ww), (wh // 2, ww // 2) if j % 2 else (0, 0))
            n_windows = math.ceil(H / h) * math.ceil(W / w)  # padded to window multiples
            macs += n_windows * _attention_macs(h * w, dim, heads)
            macs += 2 * H * W * dim * int(dim * cfg.mlp_ratio) + 2 * H * W * dim  # MLP, norm1 + norm2
            if every and (j + 1) % every == 0:
                macs += H * W * dim  # the extra main-branch norm (`model.SwinTransformerBlock.norm3`)
        if i < len(cfg.depths) - 1:
            H, W = math.ceil(H / 2), math.ceil(W / 2)
            macs += H * W * 4 * dim * 2 * dim + H * W * 2 * dim  # reduction, norm
            dim *= 2
    return macs + dim * H0 * W0 // 2 ** len(cfg.depths) + dim * cfg.num_classes
