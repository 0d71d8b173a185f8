"""Window layout: the official pad, roll and window partition as one cached gather, windows grouped
by their shift mask (torch only; used by model.py and attention.py).

The official block rolls the (padded) map by -shift, partitions it into windows in raster order and
masks each window with its own (N, N) slice of a (nW, N, N) mask; after attention it does the reverse.
Here the roll and the partition are one precomputed permutation of the tokens (`window_order`), and
the windows come ordered by mask class (`mask_class`): only four distinct masks occur at any map size,
so attention needs four (N, N) masks, not nW. Same tokens in every window as the official layout; see
docs/performance.md for why.

Windows and shifts are (height, width) pairs throughout (`pair` turns an int w into (w, w)): a window
may be rectangular (e.g. 7 x 9 for 224 x 288 inputs) and differ per stage (`stage_window_sizes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import permute_rows, traced

# Official mask value for token pairs from different regions of a shifted window.
MASK_VALUE = -100.0

Pair = tuple[int, int]  # (height, width) of a window, a shift or a map
# A window as configs spell it: one int (a square), one (h, w) pair, or one entry (int or pair) per stage.
WindowSpec = int | Sequence[Any]


def pair(v: int | Sequence[int]) -> Pair:
    """An int w as (w, w); an (h, w) sequence as a tuple of two ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"a window is an int or an (h, w) pair, got {v!r}")
        return int(v[0]), int(v[1])
    w = cast(int, v)  # no tuple / list: an int (or anything int() takes)
    return int(w), int(w)


def stage_window_sizes(spec: WindowSpec, num_stages: int) -> tuple[Pair, ...]:
    """One (h, w) window per stage from an int, an (h, w) pair, or one int / pair per stage. As in timm
    (`resolve_stage_window_sizes`), two ints are always one (h, w) window, not two stages' windows: per-stage
    windows of a two-stage model are written as pairs, ((8, 8), (4, 4))."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and not any(isinstance(v, (tuple, list)) for v in spec):
        spec = int(spec[0]), int(spec[1])
        out = (spec,) * num_stages
    elif isinstance(spec, (tuple, list)):
        if len(spec) != num_stages:
            raise ValueError(f"window_size needs one entry per stage ({num_stages}), got {spec!r}")
        out = tuple(pair(v) for v in spec)
    else:
        out = (pair(spec),) * num_stages
    if any(v < 1 for p in out for v in p):
        raise ValueError(f"window sizes must be positive, got {spec!r}")
    return out


def compact_windows(pairs: Sequence[Pair]) -> int | tuple[Pair, ...]:
    """The canonical spelling of per-stage windows: one int when every stage has the same square window
    (what configs and checkpoint metadata always held), else the (h, w) pair of each stage."""
    if len(set(pairs)) == 1 and pairs[0][0] == pairs[0][1]:
        return pairs[0][0]
    return tuple(pairs)


def pretrained_windows(spec: Sequence[Any], num_stages: int) -> tuple[int | Pair, ...]:
    """Per-stage pre-training windows (each 0 for none, an int or an (h, w)), squares as ints."""
    out = tuple(pair(v) for v in spec)
    if len(out) != num_stages or any(min(p) < 0 or min(p) == 0 < max(p) for p in out):
        raise ValueError(
            f"pretrained_window_sizes needs one entry per stage ({num_stages}), each 0 (none), a "
            f"positive int or a positive (h, w); got {tuple(spec)!r}"
        )
    return tuple(compact(p) for p in out)


def compact(p: Pair) -> int | Pair:
    """A square (w, w) as the int w, a rectangle as its pair: how one window is shown and stored."""
    return p[0] if p[0] == p[1] else p


def plain_tensors() -> Any:
    """Cached tables must be ordinary tensors even when first built under `inference_mode`, since a
    later training forward uses them with autograd; under torch.compile / export they are traced."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False)


def cached(fn: Any, *args: Any) -> Any:
    """Call an lru-cached table builder; under torch.compile trace it directly (constants in-graph)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def effective_window(H: int, W: int, window: int | Pair, shift: int | Pair) -> tuple[Pair, Pair]:
    """The (window, shift) a block really uses on an H x W map.

    Square windows, the official rule: a map not larger than the window on its shorter side is one
    min(H, W) square window, unshifted. Rectangular windows (no official code has them): timm's rule
    (`SwinTransformerV2Block._calc_window_shift`), the same test per axis: an axis not longer than the
    window gets the map's length and no shift. Both agree on square maps; a square window on a
    non-square small map keeps the official rule, so an int window means what it always meant.
    """
    (wh, ww), (sh, sw) = pair(window), pair(shift)
    if wh == ww:
        m = min(H, W)
        if torch.jit.is_tracing():  # the fixed-size ONNX export traces sizes as 0-dim tensors: as an int,
            m = int(m)  # the window keys the position-bias cache, whose bias is then one constant (export.py)
        return ((m, m), (0, 0)) if m <= wh else ((wh, ww), (sh, sw))
    return (min(H, wh), min(W, ww)), (0 if H <= wh else sh, 0 if W <= ww else sw)


def stage_windows(
    img_size: tuple[int, int], patch_size: int, window: WindowSpec, num_stages: int
) -> tuple[int | Pair, ...]:
    """The window each stage really uses at `img_size` (`effective_window`), an int where square. Maps
    are ceil(size / patch) after the patch embedding, then halved (rounded up: odd maps are padded) by
    each patch merging. `window`: a config's `window_size` (int, (h, w) or per stage)."""
    h, w = (-(-s // patch_size) for s in img_size)
    out = []
    for stage_window in stage_window_sizes(window, num_stages):
        out.append(compact(effective_window(h, w, stage_window, 0)[0]))
        h, w = -(-h // 2), -(-w // 2)
    return tuple(out)


def window_partition(x: Tensor, window: Pair) -> Tensor:
    """(B, H, W, C) -> (B*nW, wh*ww, C); H and W are multiples of the window's height and width."""
    (wh, ww), (B, H, W, C) = window, x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)


def relative_index(wh: int | Tensor, ww: int | Tensor) -> Tensor:
    """(N, N) int64 index of each token pair's offset (dy, dx) into the (2h-1) x (2w-1) bias table, dy
    major, N = h*w, tokens in raster order. The sizes are ints, or 0-dim int64 tensors that tracing
    keeps as shapes (the size-free export forward). Built from the (row, column) grid of the tokens: the
    same integers as flat-index arithmetic, but the form torch.compile fuses with the gather as it always
    has (the compiled logits stay bit for bit what they were)."""
    # torch accepts 0-dim int tensors as arange bounds; its stubs list numbers only.
    rows, cols = torch.arange(wh), torch.arange(ww)  # type: ignore[arg-type]
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2): (dy, dx) of each pair
    return (rel[..., 0] + (wh - 1)) * (2 * ww - 1) + rel[..., 1] + (ww - 1)


@lru_cache(maxsize=64)
def relative_position_index(window: int | Pair, device: torch.device) -> Tensor:
    """`relative_index` of a window (int or (h, w)), cached per window and device as a plain tensor."""
    with plain_tensors(), torch.no_grad():
        return relative_index(*pair(window)).to(device)


def mask_class(row: int, col: int, rows: int, cols: int) -> int:
    """Class of window (row, col) of a shifted rows x cols grid of windows, by its shift mask.

    The shift mask splits only the last row and the last column of windows into regions (the rolled-in
    strips are at most one window wide), so a window's mask is one of four: 0 interior (no region
    boundary, an all-zero mask), 1 last column, 2 last row, 3 the corner. Every window of a class has
    the same mask, at any map size.
    """
    return (row == rows - 1) * 2 + (col == cols - 1)


@lru_cache(maxsize=64)
def window_order(
    H: int, W: int, window: int | Pair, shift: int | Pair, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """Token orders that fuse (roll by -shift, window partition) and (reverse, roll back, crop).

    `gather` (Hp*Wp,): flat position in the padded Hp x Wp map of each token in window order, so
    `x.view(B, Hp*Wp, C).index_select(1, gather)` is the windows of `roll(x, -shift)`, N = h*w tokens
    each; `inverse` (Hp*Wp,): its inverse permutation; `scatter` (H*W,): for each unpadded
    position, where it sits in window order (`inverse` itself when nothing is padded); `counts`: the
    windows are ordered by their shift-mask class (`mask_class`; one class when unshifted) and
    `counts[c]` is the number of windows in class c. One gather instead of a roll plus a permute-copy
    each way (the roll alone costs more than the gather on CPU). A window shifted along one axis only
    (rectangular, `effective_window`) spans that map's other axis: one row (column) of windows, and
    the classes off that row (column) are empty (count 0).
    """
    (wh, ww), (sh, sw) = pair(window), pair(shift)
    with plain_tensors(), torch.no_grad():
        Hp, Wp = H + (-H % wh), W + (-W % ww)
        pos = torch.arange(Hp * Wp).view(1, Hp, Wp, 1)
        if sh or sw:
            pos = torch.roll(pos, shifts=(-sh, -sw), dims=(1, 2))
        windows = window_partition(pos, (wh, ww)).view(-1, wh * ww)  # (nW, N), raster order
        counts: tuple[int, ...] = (windows.shape[0],)
        if sh or sw:  # shifted along an axis: at least 2 windows along it (`effective_window`)
            rows, cols = Hp // wh, Wp // ww
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
def batched_window_order(
    H: int, W: int, window: Pair, shift: Pair, batch: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """`window_order` over a batch, window-major: row (w*batch + b)*N + n of the windows is token n of
    window w of image b, so the images' windows of one mask class are consecutive rows. Indices into
    the (batch*Hp*Wp) rows of the batch (gather) and into the windows' rows (inverse, scatter), and
    `window_order`'s per-image class counts."""
    gather, inverse, scatter, counts = cached(window_order, H, W, window, shift, device)
    with plain_tensors(), torch.no_grad():
        N, L = window[0] * window[1], gather.numel()
        images = torch.arange(batch, device=device)
        gather = (gather.view(-1, 1, N) + L * images.view(1, -1, 1)).reshape(-1)

        def in_windows(t: Tensor) -> Tensor:  # window-order position t of image b -> its row
            return ((t // N) * (batch * N) + t % N).view(1, -1).add(N * images.view(-1, 1)).reshape(-1)

        return gather, in_windows(inverse), in_windows(scatter), counts


@lru_cache(maxsize=64)
def shift_mask(Hp: int, Wp: int, window: int | Pair, shift: int | Pair, device: torch.device) -> Tensor:
    """(nW, N, N) fp32 mask of 0 / -100 for a shifted (padded) Hp x Wp map, as the official code.

    Cached per size and device: never rebuilt per call. Created outside inference mode so the
    cached tensor may later take part in autograd.
    """
    (wh, ww), (sh, sw) = pair(window), pair(shift)
    with plain_tensors(), torch.no_grad():

        def region(n: int, w: int, s: int) -> Tensor:  # slices (0,-w), (-w,-s), (-s,None); s = 0: one region
            idx = torch.arange(n, device=device)
            return (idx >= n - w).long() + (idx >= n - s).long()

        img = (region(Hp, wh, sh)[:, None] * 3 + region(Wp, ww, sw)[None, :]).float()  # (Hp, Wp)
        win = window_partition(img[None, :, :, None], (wh, ww)).squeeze(-1)  # (nW, N)
        diff = win[:, None, :] - win[:, :, None]
        return torch.where(diff != 0, MASK_VALUE, 0.0)


@lru_cache(maxsize=64)
def class_masks(window: int | Pair, shift: int | Pair, device: torch.device) -> Tensor:
    """(4, N, N) shift mask of each `mask_class`: those of a 2 x 2-window map, whose four windows are
    one of each class in class order."""
    wh, ww = pair(window)
    return cached(shift_mask, 2 * wh, 2 * ww, window, shift, device)


@lru_cache(maxsize=64)
def used_class_masks(window: Pair, shift: Pair, classes: tuple[int, ...], device: torch.device) -> Tensor:
    """`class_masks` of the mask classes `classes` only, in that order."""
    return cached(class_masks, window, shift, device)[list(classes)]


def nonempty_classes(
    window: Pair, shift: Pair, counts: tuple[int, ...], device: torch.device
) -> tuple[Tensor, tuple[int, ...]]:
    """The class masks and window counts of the classes that have windows (all four, except for a
    window shifted along one axis only: `window_order`)."""
    if all(counts):
        return cached(class_masks, window, shift, device), counts
    classes = tuple(c for c, n in enumerate(counts) if n)
    return cached(used_class_masks, window, shift, classes, device), tuple(counts[c] for c in classes)


def window_bias(bias: Tensor, counts: tuple[int, ...]) -> Tensor:
    """(nW, 1, nH, N, N): the (len(counts), nH, N, N) class biases, one per window, to broadcast
    over the images of window-major logits viewed as (nW, B, nH, N, N)."""
    if len(counts) > 1:
        bias = torch.cat([bias[c : c + 1].expand(n, -1, -1, -1) for c, n in enumerate(counts)])
    return bias[:, None]


class WindowLayout(NamedTuple):
    """Where the windows of one (B, H, W, C) map came from, to put the attention output back."""

    shape: tuple[int, int, int, int]  # (B, H, W, C) before padding
    window: Pair
    tokens: int  # Hp*Wp, tokens per padded image
    masks: Tensor | None  # (4, N, N) class masks when shifted, else None
    counts: tuple[int, ...]  # windows per image in each mask class
    inverse: Tensor
    scatter: Tensor
    gather: Tensor
    padded: bool


def to_windows(x: Tensor, window: Pair, shift: Pair) -> tuple[Tensor, WindowLayout]:
    """(B, H, W, C) -> ((nW*B, N, C) windows, their layout): pad to a window multiple, THEN roll by
    -shift (pad-then-shift; padding after the roll would corrupt the mask), then partition. Window-major
    (row w*B + b is window w of image b), windows ordered by mask class (`window_order`)."""
    B, H, W, C = x.shape
    pad_h, pad_w = -H % window[0], -W % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    L, N = (H + pad_h) * (W + pad_w), window[0] * window[1]
    if traced():  # batch-size-free indices (ONNX keeps a dynamic batch axis); inductor fuses the copies
        gather, inverse, scatter, counts = cached(window_order, H, W, window, shift, x.device)
        windows = x.reshape(B, L, C).index_select(1, gather).view(B, L // N, N, C).transpose(0, 1)
        windows = windows.reshape(-1, N, C)
    else:
        gather, inverse, scatter, counts = cached(batched_window_order, H, W, window, shift, B, x.device)
        windows = permute_rows(x.reshape(B * L, C), gather, inverse).view(-1, N, C)  # window-major
    masks = None
    if any(shift):
        masks, counts = nonempty_classes(window, shift, counts, x.device)
    return windows, WindowLayout((B, H, W, C), window, L, masks, counts, inverse, scatter, gather, bool(pad_h or pad_w))


def from_windows(out: Tensor, layout: WindowLayout) -> Tensor:
    """(nW*B, N, C) -> (B, H, W, C): the inverse of `to_windows` (reverse, roll back, crop)."""
    B, H, W, C = layout.shape
    L, N = layout.tokens, layout.window[0] * layout.window[1]
    if traced():
        out = out.view(L // N, B, N, C).transpose(0, 1).reshape(B, L, C)
        return out.index_select(1, layout.scatter).view(B, H, W, C)
    out = out.view(-1, C)  # (nW*B*N, C)
    if layout.padded:  # crop: `scatter` picks the B*H*W unpadded of the B*Hp*Wp rows
        return out.index_select(0, layout.scatter).view(B, H, W, C)
    return permute_rows(out, layout.inverse, layout.gather).view(B, H, W, C)
