"""The fast window-attention kernels and their dispatch, and the continuous position bias (torch only;
used by transformer.py).

`WindowAttention` in transformer.py computes q, k, v, the logit scale and the biases the official way,
then either runs the official formula itself (`fused=False`, the reference) or calls `fused_attention`
here: the same softmax(cos(q, k) * scale + bias) v, through whichever kernel is fastest for the case
(`fast_paths.FastPaths` switches some of them off). Also here: eager CPU inference over groups of
images, and the log-spaced continuous position bias (paper §3.3), each step written once for every
caller (the model, `cpb.cpb_tables`, the size-free export forward): `log_spaced_coords` (the CPB MLP's
input), `cpb_bias` (16 * sigmoid of its output, per offset or gathered per token pair with
`windows.relative_index`), and its cache in CPU inference. Why each is built this way, with the
measurements: docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_paths import fast_paths
from .kernels import attention_fp32_logits, cosine_qkv, mask_runs, sequential_attention, softmax_flushed, traced
from .windows import Pair, compact, pair, plain_tensors, window_bias

# Eager CPU inference (`FastPaths.grouped_inference`) runs each block over groups of images whose widest
# intermediate fits in this many bytes: larger buffers come from fresh pages on every call (glibc's mmap
# threshold).
INFERENCE_CHUNK_BYTES = 16 << 20
# With `set_sequential_attention`, CPU training computes attention in pieces of at most this many bytes of
# probabilities and recomputes them in the backward pass instead of keeping them.
SEQUENTIAL_ATTENTION_BYTES = 16 << 20

# Eager CPU inference in these dtypes computes the attention logits in fp32 (`attention_fp32_logits`,
# `FastPaths.fp32_logits`), in pieces of at most this many bytes of logits: pieces that stay in a core's
# cache ran the softmax and the products about twice as fast as 16 MiB ones (SwinV2-T stage 1, batch 8).
FP32_LOGIT_DTYPES = (torch.bfloat16, torch.float16)
FP32_LOGIT_PIECE_BYTES = 2 << 20

# (window: w if square else (h, w); autocast dtype or None) -> (CPB parameter snapshot, position bias)
BiasCache = dict[tuple[int | Pair, torch.dtype | None], tuple[list[Tensor], Tensor]]
# A window's (h, w) as ints, or as 0-dim int64 tensors (the size-free export forward's traced shapes).
SizePair = tuple[int | Tensor, int | Tensor]


def log_spaced_coords(
    window: SizePair, pretrained_window: Pair, *, square: bool | None = None, device: torch.device | None = None
) -> Tensor:
    """((2h-1)(2w-1), 2) fp32 input of the CPB MLP (paper §3.3, official formula): the offsets (dy, dx)
    of the h x w window's token pairs, dy major, normalised per axis by the pre-training window (else the
    window) - 1, to [-8, 8], then sign*log2(1+|x|)/log2(8).

    The window is two ints (the model: `cpb_input`, cached per window) or two 0-dim int64 tensors (the
    size-free export forward, where they are traced shapes); then `square` says whether the window is
    square, which tensors cannot answer while traced. A square divisor divides as one number and a
    rectangular pair as a (2,) tensor, as the model has always computed them: on CUDA the two differ in
    the last bit (a number divides there as a multiplication by its reciprocal).
    """
    wh, ww = window
    span_w = 2 * ww - 1
    k = torch.arange((2 * wh - 1) * span_w, device=device)  # type: ignore[arg-type]  # a 0-dim tensor bound runs
    table = torch.stack((k // span_w - (wh - 1), k % span_w - (ww - 1)), dim=-1).float()
    # A window of 1 has the single offset 0; dividing by at least 1 keeps it 0 instead of 0/0.
    dh: int | Tensor
    dw: int | Tensor
    if pretrained_window[0] > 0:
        dh, dw = (max(v - 1, 1) for v in pretrained_window)
    else:
        dh, dw = (max(v - 1, 1) if isinstance(v, int) else torch.clamp(v - 1, min=1).float() for v in window)
    if isinstance(dh, int) and isinstance(dw, int):
        square = dh == dw
    elif square is None:
        raise ValueError("log_spaced_coords: a window of tensors needs square=")
    if not square:  # torch.full, not torch.tensor: the size-free export refuses a tensor made a trace constant
        dh = torch.stack(
            [v if isinstance(v, Tensor) else torch.full((), v, dtype=torch.float32, device=device) for v in (dh, dw)]
        )
    table = table / dh * 8  # to [-8, 8]
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


@lru_cache(maxsize=64)
def cpb_input(window: int | Pair, pretrained_window: int | Pair, device: torch.device) -> Tensor:
    """`log_spaced_coords` of a window (int or (h, w)), cached per window and device as a plain tensor."""
    with plain_tensors(), torch.no_grad():
        return log_spaced_coords(pair(window), pair(pretrained_window), device=device)


def cpb_bias(cpb_mlp: nn.Module, coords: Tensor, index: Tensor | None = None) -> Tensor:
    """16 * sigmoid(cpb_mlp(coords)): the ((2h-1)(2w-1), nH) bias of every offset of `log_spaced_coords`,
    or with the (N, N) `index` of each token pair's offset (`windows.relative_index`), the (nH, N, N)
    bias of every token pair. Gathered from the (nH, (2h-1)(2w-1)) transpose, so it comes out a
    contiguous (nH, N, N) as attention reads it, and before the sigmoid, as the official code does."""
    bias = cpb_mlp(coords)
    if index is not None:
        bias = bias.t().index_select(1, index.reshape(-1)).reshape(-1, *index.shape)
    return 16 * torch.sigmoid(bias)


def _same_values(a: list[Tensor], b: list[Tensor]) -> bool:
    """Same dtypes, devices, shapes and values, element for element."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.device == y.device and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b)
    )


def cached_position_bias(cache: BiasCache, cpb_mlp: nn.Module, window: Pair, compute: Callable[[], Tensor]) -> Tensor:
    """`compute()`, the (1, nH, N, N) position bias of `window`, reused from `cache` in CPU inference
    while the parameters of `cpb_mlp` keep the values it was computed from.

    The check compares values with a snapshot (a few thousand numbers): version counters miss fused
    optimiser steps and in-place updates through `.data`. One entry per window and autocast dtype
    (autocast runs the CPB MLP in its own dtype). On an accelerator the check would cost a host sync,
    more than the few small kernels it saves, so there it is always recomputed.
    """
    params = [p.detach() for p in cpb_mlp.parameters()]
    device = params[0].device.type
    cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and device == "cpu"
    key = (compact(window), torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
    hit = cache.get(key) if cacheable else None
    if hit is not None and _same_values(hit[0], params):
        return hit[1]
    bias = compute()
    if cacheable:
        with plain_tensors():
            bias, snapshot = bias.clone(), [p.clone() for p in params]
        cache[key] = (snapshot, bias)
    return bias


def fused_attention(
    qkv: Tensor,
    logit_scale: Tensor,
    bias: Tensor,
    counts: tuple[int, ...],
    *,
    heads: int,
    attn_drop: float,
    training: bool,
    sequential: bool,
) -> Tensor:
    """Scaled cosine window attention from the (rows, N, 3C) projection -> (rows, nH, N, d).

    Rows are window-major, in runs of `counts[c] * images` rows under the class bias `bias[c]`
    ((len(counts), nH, N, N), position bias plus mask). Same math as the official formula, with
    q/|q| * scale against k/|k| at SDPA scale 1: folding the scale into q also spares autograd the
    (N, N) logits. Eager CPU inference in bf16 / fp16 keeps the logits in fp32 instead
    (`attention_fp32_logits`): more exact than the flash kernel on half-precision q and k, and faster
    on small windows.
    """
    rows, N, _ = qkv.shape
    if (
        qkv.dtype in FP32_LOGIT_DTYPES
        and qkv.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not (attn_drop and training)
        and not traced()
        and fast_paths().fp32_logits
    ):
        piece = max(1, FP32_LOGIT_PIECE_BYTES // (heads * N * N * 4))
        return attention_fp32_logits(qkv, heads, logit_scale, bias, counts, piece)
    images = rows // sum(counts)
    q, k, v = (t.view(rows, heads, N, -1) for t in cosine_qkv(qkv, 1, heads, logit_scale.to(qkv.dtype)))
    bias = bias.to(q.dtype)
    if q.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad:
        # SDPA's CPU kernels give no gradient for attn_mask, so autograd would take its slow math
        # fallback: written out, in one pass over all windows (subnormal probabilities flushed).
        if sequential and not (attn_drop and training) and not traced():
            piece = max(1, SEQUENTIAL_ATTENTION_BYTES // (heads * N * N * q.element_size()))
            return sequential_attention(q, k, v, bias, counts, images, piece)
        attn = (q @ k.transpose(-2, -1)).view(-1, images, heads, N, N) + window_bias(bias, counts)
        attn = softmax_flushed(attn) if fast_paths().flushed_softmax else attn.softmax(dim=-1)
        attn = attn.view(rows, heads, N, N)
        if attn_drop:
            attn = F.dropout(attn, attn_drop, training)
        return attn @ v
    # One SDPA call per mask class, its (nH, N, N) bias broadcast over the class's windows.
    outs = [
        F.scaled_dot_product_attention(
            q[run], k[run], v[run], attn_mask=bias[c : c + 1], scale=1.0, dropout_p=attn_drop if training else 0.0
        )
        for c, run in mask_runs(counts, images)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def forward_in_chunks(forward: Callable[..., Tensor], x: Tensor, width: int) -> Tensor:
    """`forward(x)` for a (B, H, W, C) map; in eager CPU inference, over groups of as many images as
    keep a (H, W, width) intermediate within `INFERENCE_CHUNK_BYTES` (`FastPaths.grouped_inference`),
    each written by `forward(part, out=...)` into one output."""
    B, H, W, _ = x.shape
    n = B
    if not (torch.is_grad_enabled() or x.device.type != "cpu" or traced()) and fast_paths().grouped_inference:
        n = max(1, INFERENCE_CHUNK_BYTES // (H * W * width * x.element_size()))
    if n >= B:
        return forward(x)
    out = torch.empty_like(x)
    for start in range(0, B, n):
        forward(x[start : start + n], out=out[start : start + n])
    return out
