"""Window layout: the official pad, roll and window partition as one cached gather, windows grouped
by their shift mask (torch only; used by model.py and attention.py).

The official block rolls the (padded) map by -shift, partitions it into windows in raster order and
masks each window with its own (N, N) slice of a (nW, N, N) mask; after attention it does the reverse.
Here the roll and the partition are one precomputed permutation of the tokens (`window_order`), and
the windows come ordered by mask class (`mask_class`): only four distinct masks occur at any map size,
so attention needs four (N, N) masks, not nW. Same tokens in every window as the official layout; see
docs/performance.md for why.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import permute_rows, traced

# Official mask value for token pairs from different regions of a shifted window.
MASK_VALUE = -100.0


def plain_tensors() -> Any:
    """Cached tables must be ordinary tensors even when first built under `inference_mode`, since a
    later training forward uses them with autograd; under torch.compile / export they are traced."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False)


def cached(fn: Any, *args: Any) -> Any:
    """Call an lru-cached table builder; under torch.compile trace it directly (constants in-graph)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def effective_window(H: int, W: int, window: int, shift: int) -> tuple[int, int]:
    """Official rule: a map not larger than the window is one window, unshifted."""
    if min(H, W) <= window:
        return min(H, W), 0
    return window, shift


def stage_windows(img_size: tuple[int, int], patch_size: int, window: int, num_stages: int) -> tuple[int, ...]:
    """The window each stage really uses at `img_size`: min(window, feature map) per stage. Maps are
    ceil(size / patch) after the patch embedding, then halved (rounded up: odd maps are padded) by each
    patch merging."""
    h, w = (-(-s // patch_size) for s in img_size)
    out = []
    for _ in range(num_stages):
        out.append(effective_window(h, w, window, 0)[0])
        h, w = -(-h // 2), -(-w // 2)
    return tuple(out)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B*nW, window*window, C); H and W are multiples of `window`."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def mask_class(row: int, col: int, rows: int, cols: int) -> int:
    """Class of window (row, col) of a shifted rows x cols grid of windows, by its shift mask.

    The shift mask splits only the last row and the last column of windows into regions (the rolled-in
    strips are at most one window wide), so a window's mask is one of four: 0 interior (no region
    boundary, an all-zero mask), 1 last column, 2 last row, 3 the corner. Every window of a class has
    the same mask, at any map size.
    """
    return (row == rows - 1) * 2 + (col == cols - 1)


@lru_cache(maxsize=64)
def window_order(H: int, W: int, window: int, shift: int,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """Token orders that fuse (roll by -shift, window partition) and (reverse, roll back, crop).

    `gather` (Hp*Wp,): flat position in the padded Hp x Wp map of each token in window order, so
    `x.view(B, Hp*Wp, C).index_select(1, gather)` is the windows of `roll(x, -shift)`, N = window^2
    tokens each; `inverse` (Hp*Wp,): its inverse permutation; `scatter` (H*W,): for each unpadded
    position, where it sits in window order (`inverse` itself when nothing is padded); `counts`: the
    windows are ordered by their shift-mask class (`mask_class`; one class when unshifted) and
    `counts[c]` is the number of windows in class c. One gather instead of a roll plus a permute-copy
    each way (the roll alone costs more than the gather on CPU).
    """
    with plain_tensors(), torch.no_grad():
        Hp, Wp = H + (-H % window), W + (-W % window)
        pos = torch.arange(Hp * Wp).view(1, Hp, Wp, 1)
        if shift:
            pos = torch.roll(pos, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(pos, window).view(-1, window * window)  # (nW, N), raster order
        counts: tuple[int, ...] = (windows.shape[0],)
        if shift:  # a shifted map is at least 2 x 2 windows (`effective_window`): all four classes occur
            rows, cols = Hp // window, Wp // window
            # Python's sort is stable and keeps the tables constant under tracing (no sort op).
            order = sorted(range(rows * cols), key=lambda w: mask_class(w // cols, w % cols, rows, cols))
            windows = windows[torch.tensor(order)]
            counts = ((rows - 1) * (cols - 1), rows - 1, cols - 1, 1)
        gather = windows.reshape(-1)
        inverse = torch.empty_like(gather)
        inverse[gather] = torch.arange(gather.numel())
        scatter = inverse.view(Hp, Wp)[:H, :W].reshape(-1)
        return gather.to(device), inverse.to(device), scatter.to(device), counts


@lru_cache(maxsize=128)
def batched_window_order(H: int, W: int, window: int, shift: int, batch: int,
                         device: torch.device) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """`window_order` over a batch, window-major: row (w*batch + b)*N + n of the windows is token n of
    window w of image b, so the images' windows of one mask class are consecutive rows. Indices into
    the (batch*Hp*Wp) rows of the batch (gather) and into the windows' rows (inverse, scatter), and
    `window_order`'s per-image class counts."""
    gather, inverse, scatter, counts = cached(window_order, H, W, window, shift, device)
    with plain_tensors(), torch.no_grad():
        N, L = window * window, gather.numel()
        images = torch.arange(batch, device=device)
        gather = (gather.view(-1, 1, N) + L * images.view(1, -1, 1)).reshape(-1)

        def in_windows(t: Tensor) -> Tensor:  # window-order position t of image b -> its row
            return ((t // N) * (batch * N) + t % N).view(1, -1).add(N * images.view(-1, 1)).reshape(-1)

        return gather, in_windows(inverse), in_windows(scatter), counts


@lru_cache(maxsize=64)
def shift_mask(Hp: int, Wp: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(nW, N, N) fp32 mask of 0 / -100 for a shifted (padded) Hp x Wp map, as the official code.

    Cached per size and device: never rebuilt per call. Created outside inference mode so the
    cached tensor may later take part in autograd.
    """
    with plain_tensors(), torch.no_grad():
        def region(n: int) -> Tensor:  # slices (0,-window), (-window,-shift), (-shift,None)
            idx = torch.arange(n, device=device)
            return (idx >= n - window).long() + (idx >= n - shift).long()

        img = (region(Hp)[:, None] * 3 + region(Wp)[None, :]).float()  # (Hp, Wp)
        win = window_partition(img[None, :, :, None], window).squeeze(-1)  # (nW, N)
        diff = win[:, None, :] - win[:, :, None]
        return torch.where(diff != 0, MASK_VALUE, 0.0)


@lru_cache(maxsize=64)
def class_masks(window: int, shift: int, device: torch.device) -> Tensor:
    """(4, N, N) shift mask of each `mask_class`: those of a 2 x 2-window map, whose four windows are
    one of each class in class order."""
    return cached(shift_mask, 2 * window, 2 * window, window, shift, device)


def window_bias(bias: Tensor, counts: tuple[int, ...]) -> Tensor:
    """(nW, 1, nH, N, N): the (len(counts), nH, N, N) class biases, one per window, to broadcast
    over the images of window-major logits viewed as (nW, B, nH, N, N)."""
    if len(counts) > 1:
        bias = torch.cat([bias[c:c + 1].expand(n, -1, -1, -1) for c, n in enumerate(counts)])
    return bias[:, None]


class WindowLayout(NamedTuple):
    """Where the windows of one (B, H, W, C) map came from, to put the attention output back."""

    shape: tuple[int, int, int, int]  # (B, H, W, C) before padding
    window: int
    tokens: int  # Hp*Wp, tokens per padded image
    masks: Tensor | None  # (4, N, N) class masks when shifted, else None
    counts: tuple[int, ...]  # windows per image in each mask class
    inverse: Tensor
    scatter: Tensor
    gather: Tensor
    padded: bool


def to_windows(x: Tensor, window: int, shift: int) -> tuple[Tensor, WindowLayout]:
    """(B, H, W, C) -> ((nW*B, N, C) windows, their layout): pad to a window multiple, THEN roll by
    -shift (pad-then-shift; padding after the roll would corrupt the mask), then partition. Window-major
    (row w*B + b is window w of image b), windows ordered by mask class (`window_order`)."""
    B, H, W, C = x.shape
    pad_h, pad_w = -H % window, -W % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    L, N = (H + pad_h) * (W + pad_w), window * window
    masks = cached(class_masks, window, shift, x.device) if shift else None
    if traced():  # batch-size-free indices (ONNX keeps a dynamic batch axis); inductor fuses the copies
        gather, inverse, scatter, counts = cached(window_order, H, W, window, shift, x.device)
        windows = x.reshape(B, L, C).index_select(1, gather).view(B, L // N, N, C).transpose(0, 1)
        windows = windows.reshape(-1, N, C)
    else:
        gather, inverse, scatter, counts = cached(batched_window_order, H, W, window, shift, B, x.device)
        windows = permute_rows(x.reshape(B * L, C), gather, inverse).view(-1, N, C)  # window-major
    return windows, WindowLayout((B, H, W, C), window, L, masks, counts, inverse, scatter, gather, bool(pad_h or pad_w))


def from_windows(out: Tensor, layout: WindowLayout) -> Tensor:
    """(nW*B, N, C) -> (B, H, W, C): the inverse of `to_windows` (reverse, roll back, crop)."""
    B, H, W, C = layout.shape
    L, N = layout.tokens, layout.window * layout.window
    if traced():
        out = out.view(L // N, B, N, C).transpose(0, 1).reshape(B, L, C)
        return out.index_select(1, layout.scatter).view(B, H, W, C)
    out = out.view(-1, C)  # (nW*B*N, C)
    if layout.padded:  # crop: `scatter` picks the B*H*W unpadded of the B*Hp*Wp rows
        return out.index_select(0, layout.scatter).view(B, H, W, C)
    return permute_rows(out, layout.inverse, layout.gather).view(B, H, W, C)
