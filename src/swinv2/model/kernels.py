"""Fused and memory-lean ops for SwinV2's hot paths (torch only; used by windows.py, attention.py, transformer.py).

Each op computes the ops of the plain formula, so outputs are unchanged up to float rounding; what
differs is how many passes over memory they take and what autograd keeps for the backward pass (each
op's docstring says which). Traced, compiled or exported, they are the plain ops (`traced`). Which of
the switchable ones run is `fast_paths.FastPaths`; the measurements behind each choice are in
docs/performance.md ("Kernel notes").
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.multiprocessing.reductions import StorageWeakRef

from .fast_paths import fast_paths

EPS = 1e-12  # F.normalize's default


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum `t` over the dimensions that broadcasting expanded from `shape`."""
    lead = t.ndim - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


def traced() -> bool:
    """Under tracing / compiling / ONNX export the plain functional ops are used (no `out=`, no Function)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _qkv_rows(qkv: Tensor, windows: int, heads: int) -> Tensor:
    """(B*nW, N, 3C) -> its (B, nW, N, 3, nH, d) view, still contiguous (no copy)."""
    BnW, N, C3 = qkv.shape
    return qkv.view(BnW // windows, windows, N, 3, heads, C3 // (3 * heads))


def _to_heads(t: Tensor) -> Tensor:
    """(B, nW, N, 3, nH, d') -> (3, B, nW, nH, N, d'), a view."""
    return t.permute(3, 0, 1, 4, 2, 5)


def _qkv_view(qkv: Tensor, windows: int, heads: int) -> Tensor:
    """(B*nW, N, 3C) -> the (3, B, nW, nH, N, d) view of q, k and v (no copy)."""
    return _to_heads(_qkv_rows(qkv, windows, heads))


def _cosine_qkv_plain(qkv: Tensor, windows: int, heads: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The plain ops (for tracing, compiling and export): q/|q|*scale, k/|k|, v, each contiguous."""
    q, k, v = _qkv_view(qkv, windows, heads).unbind(0)
    q = q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(EPS))
    k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(EPS)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _cosine_qkv_forward(
    qkv: Tensor, windows: int, heads: int, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q/|q|*scale, k/|k|, v, |q|, |k|), the three outputs written straight into fresh contiguous
    (B, nW, nH, N, d) tensors: the op that normalises also does the layout change."""
    rows = _qkv_rows(qkv, windows, heads)
    q, k, v = _to_heads(rows).unbind(0)
    # |q| and |k| (and an unused |v|) in one reduction over the contiguous rows of qkv: on the CPU that
    # is faster than reducing the strided q and k views one by one, or a slice of just q and k.
    norm_q, norm_k, _ = _to_heads(torch.linalg.vector_norm(rows, dim=-1, keepdim=True)).unbind(0)
    out_q, out_k, out_v = (torch.empty(q.shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    torch.mul(q, scale / norm_q.clamp_min(EPS), out=out_q)
    torch.div(k, norm_k.clamp_min(EPS), out=out_k)
    out_v.copy_(v)
    return out_q, out_k, out_v, norm_q, norm_k


class _CosineQKV(torch.autograd.Function):
    """Saves the normalised q and k and the norms; the raw qkv projection is not kept. The backward
    writes the q, k and v gradients straight into one (B*nW, N, 3C) tensor laid out like qkv (autograd
    of unbind + permute would stack them, then copy that into the layout)."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, windows: int, heads: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, norm_q, norm_k = _cosine_qkv_forward(qkv, windows, heads, scale)
        ctx.save_for_backward(q, k, norm_q, norm_k, scale)
        ctx.windows, ctx.heads, ctx.qkv_shape = windows, heads, qkv.shape
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor
    ) -> tuple[Tensor | None, None, None, Tensor | None]:
        y_q, y_k, norm_q, norm_k, scale = ctx.saved_tensors
        grad_qkv = grad_scale = None
        into_q = into_k = into_v = None  # q, k, v's slots in grad_qkv, when its gradient is wanted
        if ctx.needs_input_grad[0]:
            grad_qkv = torch.empty(ctx.qkv_shape, dtype=y_q.dtype, device=y_q.device)
            into_q, into_k, into_v = _qkv_view(grad_qkv, ctx.windows, ctx.heads).unbind(0)
        # y = x * s / n with n = max(|x|, eps), u = x / n = y / s:
        #   dL/dx = (g - u (u.g)) * s / n = (g - y (y.g) / s^2) * s / n, and g * s / eps where |x| <= eps
        #   (x / eps is linear there); dL/ds = sum over the broadcast dims of g.u = (g.y) / s.
        for g, y, norm, s, into in ((grad_q, y_q, norm_q, scale, into_q), (grad_k, y_k, norm_k, None, into_k)):
            if g is None:
                if into is not None:
                    into.zero_()
                continue
            gy = g * y
            if s is not None and ctx.needs_input_grad[3]:
                grad_scale = _sum_to(gy, s.shape) / s
            if into is None:
                continue
            coef = gy.sum(-1, keepdim=True).masked_fill_(norm <= EPS, 0.0)
            gain = 1 / norm.clamp_min(EPS)
            if s is not None:
                coef = coef / (s * s)
                gain = gain * s
            torch.mul(torch.addcmul(g, y, coef, value=-1.0), gain, out=into)
        if into_v is not None:
            if grad_v is None:
                into_v.zero_()
            else:
                into_v.copy_(grad_v.view(into_v.shape))
        return grad_qkv, None, None, grad_scale


def cosine_qkv(qkv: Tensor, windows: int, heads: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split the (B*nW, N, 3C) projection into scaled cosine attention's operands.

    Returns q/max(|q|, 1e-12) * scale, k/max(|k|, 1e-12) and v, each a contiguous (B, nW, nH, N, d)
    tensor (nW = `windows`, nH = `heads`), norms over d; `scale` broadcasts to (nH, 1, 1). The forward
    is the plain formula op for op (and, traced or compiled, the plain ops themselves).
    """
    if traced():
        return _cosine_qkv_plain(qkv, windows, heads, scale)
    if torch.is_grad_enabled() and (qkv.requires_grad or scale.requires_grad):
        return _CosineQKV.apply(qkv, windows, heads, scale)
    return _cosine_qkv_forward(qkv, windows, heads, scale)[:3]


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return permute_rows(grad, inverse, None), None, None  # differentiable again


def permute_rows(x: Tensor, order: Tensor, inverse: Tensor | None) -> Tensor:
    """x.index_select(0, order) where `order` is a permutation of dim 0 and `inverse` its inverse.

    Its gradient is the inverse gather, instead of index_select's generic backward (zero-fill, then
    index_add_), which on the CPU costs about twice as much.
    """
    if inverse is None or traced() or not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(0, order)
    return _PermuteRows.apply(x, order, inverse)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # Under autocast, compute in its dtype as F.linear would, and keep that dtype for the backward
        # (which runs outside autocast).
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            h, w = h.to(dtype), weight.to(dtype)
            out = F.linear(F.gelu(h), w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(h, w)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, w = ctx.saved_tensors
        grad = grad.to(h.dtype)
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad2d.t() @ F.gelu(h).reshape(-1, h.shape[-1])).to(ctx.dtypes[0])
        if ctx.dtypes[1] is not None and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad @ w, h)
        return grad_h, grad_w, grad_b


def _softmax_then_flush(s: Tensor) -> Tensor:
    """softmax(s, dim=-1), then p if p > tiny else 0, in place on the fresh output."""
    # torch.threshold_ is F.threshold_ (the same object), the one of the two torch's stubs list.
    return torch.threshold_(torch.softmax(s, dim=-1), torch.finfo(s.dtype).tiny, 0.0)


class _SoftmaxFlushed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: Tensor) -> Tensor:
        p = _softmax_then_flush(s)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        # p * (grad - sum(grad * p)): the softmax gradient, from the flushed probabilities.
        return torch._softmax_backward_data(grad, p, -1, p.dtype)


def softmax_flushed(s: Tensor) -> Tensor:
    """softmax(s, dim=-1) with subnormal probabilities (below the dtype's smallest normal number,
    1.2e-38 in fp32 and bf16) flushed to zero.

    The shift mask's -100 puts masked logits about 100 below their row's maximum, where exp lands in
    the subnormal range, and x86 cores take a microcode assist for every subnormal operand of the next
    product. A flushed value was below 1.2e-38 of its row's sum, so outputs and gradients are unchanged
    to far below float rounding. (The FTZ/DAZ switch instead would be process-wide and reach only
    threads created after it.) Traced or compiled, the same as plain ops (inductor fuses the flush into
    the softmax kernel); in other dtypes, the plain softmax."""
    if s.dtype not in (torch.float32, torch.bfloat16):
        return s.softmax(dim=-1)
    if traced():
        return F.threshold(s.softmax(dim=-1), torch.finfo(s.dtype).tiny, 0.0)
    if torch.is_grad_enabled() and s.requires_grad:
        return _SoftmaxFlushed.apply(s)
    return _softmax_then_flush(s)


def mask_runs(counts: tuple[int, ...], images: int, max_rows: int | None = None) -> list[tuple[int, slice]]:
    """(class, rows) pieces of window-major rows: run c is counts[c] * images consecutive rows under
    bias c; with `max_rows`, each run is cut into pieces of at most that many rows. Without it, the
    bounds stay arithmetic on `images` (no `range`), which ONNX tracing keeps dynamic in the batch."""
    pieces, start = [], 0
    for c, n in enumerate(counts):
        end = start + n * images
        if max_rows is None:
            pieces.append((c, slice(start, end)))
        else:
            pieces += [(c, slice(s, min(s + max_rows, end))) for s in range(start, end, max_rows)]
        start = end
    return pieces


def _probabilities(q: Tensor, k: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T + bias) over the last dim, subnormals flushed; (n, nH, N, d) x2, (nH, N, N)."""
    s = q @ k.transpose(-2, -1)
    return _softmax_then_flush(s.add_(bias))


def _attend_pieces(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, pieces: list[tuple[int, slice]]) -> Tensor:
    """softmax(q k^T + bias[c]) v, piece by piece, into one output laid out like v."""
    out = torch.empty_like(v)
    for c, rows in pieces:
        torch.matmul(_probabilities(q[rows], k[rows], bias[c]), v[rows], out=out[rows])
    return out


class _SequentialAttention(torch.autograd.Function):
    """Window attention computed piece by piece, saving only q, k, v and the bias: the backward
    recomputes each piece's probabilities instead of keeping all of them (the paper's sequential
    self-attention, §3.5)."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, counts: tuple[int, ...], images: int, max_rows: int
    ) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):  # the backward recomputes in this dtype
            q, k, v, bias = q.to(v.dtype), k.to(v.dtype), v, bias.to(v.dtype)
            pieces = mask_runs(counts, images, max_rows)
            out = _attend_pieces(q, k, v, bias, pieces)
        ctx.save_for_backward(q, k, v, bias)
        ctx.pieces = pieces
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias = ctx.saved_tensors
        grad = grad.to(v.dtype)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        # Summed over pieces in at least fp32: a bf16 running sum would round at every piece.
        wide = torch.promote_types(bias.dtype, torch.float32)
        dbias = torch.zeros_like(bias, dtype=wide) if ctx.needs_input_grad[3] else None
        for c, rows in ctx.pieces:
            p = _probabilities(q[rows], k[rows], bias[c])
            g = grad[rows]
            torch.matmul(p.transpose(-2, -1), g, out=dv[rows])
            ds = torch._softmax_backward_data(g @ v[rows].transpose(-2, -1), p, -1, p.dtype)
            torch.matmul(ds, k[rows], out=dq[rows])
            torch.matmul(ds.transpose(-2, -1), q[rows], out=dk[rows])
            if dbias is not None:
                dbias[c] += ds.sum(0)
        return dq, dk, dv, None if dbias is None else dbias.to(bias.dtype), None, None, None


def sequential_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, counts: tuple[int, ...], images: int, max_rows: int
) -> Tensor:
    """softmax(q k^T + bias[c]) v over window-major rows, in pieces of at most `max_rows` rows.

    q, k, v: (rows, nH, N, d) (q already scaled: no further scale); rows = sum(counts) * images, run c
    (counts[c] * images consecutive rows) under the (nH, N, N) bias[c] of the (len(counts), nH, N, N)
    `bias`. Outputs as the written-out formula with the flushed softmax; with autograd, it saves
    q, k, v and the bias only and recomputes the probabilities piece by piece in the backward pass.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return _SequentialAttention.apply(q, k, v, bias, counts, images, max_rows)
    return _attend_pieces(q, k, v, bias, mask_runs(counts, images, max_rows))


def attention_fp32_logits(
    qkv: Tensor, heads: int, scale: Tensor, bias: Tensor, counts: tuple[int, ...], max_rows: int
) -> Tensor:
    """Scaled cosine window attention for bf16 / fp16 inference: q and k normalised, scaled and
    multiplied in fp32 from the half-precision (rows, N, 3C) projection; logits, bias and softmax in
    fp32 (subnormals flushed); the probabilities back in the projection's dtype for the product with
    v. -> (rows, nH, N, d) in that dtype.

    Half-precision logits would round: at the logit scale's 100 a bf16 logit has a step of 0.5. This
    path keeps them as exact as fp32 ones from the same projection, and on the CPU it runs faster than
    SDPA's flash kernel on 64-token windows (docs/performance.md). Pieces of at most `max_rows` rows
    keep the fp32 logits small; `bias`: (len(counts), nH, N, N), run c under bias[c].
    """
    rows, N, _ = qkv.shape
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = (t.squeeze(1) for t in _qkv_view(qkv, 1, heads).unbind(0))  # (rows, nH, N, d) views
        q32, k32 = (torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t) for t in (q, k))
        q32.mul_(scale.float() / torch.linalg.vector_norm(q32, dim=-1, keepdim=True).clamp_min_(EPS))
        k32.div_(torch.linalg.vector_norm(k32, dim=-1, keepdim=True).clamp_min_(EPS))
        bias = bias.float()
        out = torch.empty(q.shape, dtype=qkv.dtype, device=qkv.device)
        for c, piece in mask_runs(counts, rows // sum(counts), max_rows):
            p = _probabilities(q32[piece], k32[piece], bias[c])
            torch.matmul(p.to(qkv.dtype), v[piece], out=out[piece])
    return out


def gelu_linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(F.gelu(h), weight, bias), recomputing GELU(h) in the backward pass when training: autograd
    keeps h only, not the 4C-wide activation twice (GELU's input and fc2's), for one elementwise op."""
    if traced() or not torch.is_grad_enabled():
        return F.linear(F.gelu(h), weight, bias)
    return _GeluLinear.apply(h, weight, bias)


@functools.cache
def onednn_linear_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs in `dtype` on this CPU: a PyTorch built with oneDNN, and for bf16 a
    CPU it has bf16 kernels for (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX); on an AVX2-only CPU it
    refuses to build a bf16 linear at all."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias); in eager CPU inference in a dtype of `FastPaths.onednn_linear_dtypes`
    (by default bf16: bf16 weights, or bf16 autocast), oneDNN's linear with the bias added in the GEMM's
    epilogue. addmm first copies the broadcast bias into the whole output, a few percent of a bf16
    forward; in fp32 the two were level or addmm faster (docs/performance.md, "Kernel notes")."""
    if bias is None or x.device.type != "cpu" or torch.is_grad_enabled() or traced():
        return F.linear(x, weight, bias)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    paths = fast_paths()
    if dtype not in paths.onednn_linear_dtypes or not onednn_linear_runs(dtype):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    packed = _onednn_weight(weight, dtype, rows) if paths.packed_weights else weight.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias.to(dtype), "none", [], "")


# (storage address, offset, shape, strides, dtype) of a weight -> (weak reference to its storage, its
# version counter, the weight in oneDNN's blocked layout). The weak reference keeps the storage's address
# from being reused while the entry exists; an entry whose storage is freed goes at the next reorder. A
# weight changed in place moves its version counter; one given other data (`.data =`,
# `torch.utils.swap_tensors`) has another storage. Nothing refers to the weight tensor itself, so it
# stays swappable and picklable.
_ONEDNN_WEIGHTS: dict[tuple, tuple[StorageWeakRef, int, Tensor]] = {}


def _onednn_weight(weight: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """`weight` in `dtype`, reordered once into oneDNN's blocked layout for its linear. Given a plain
    weight, oneDNN reorders it on every call (`FastPaths.packed_weights` off; a few percent of a bf16
    forward). The GEMM and its result are the same; `rows` only hints the layout. A weight without a
    version counter (made under inference mode) is not kept."""
    if weight.is_inference() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return weight.to(dtype)
    storage = StorageWeakRef(weight.untyped_storage())
    key = (storage.cdata, weight.storage_offset(), weight.shape, weight.stride(), dtype)
    entry = _ONEDNN_WEIGHTS.get(key)
    if entry is None or entry[1] != weight._version:  # (autograd is off here: nothing is recorded)
        for old in [k for k, (ref, _, _) in _ONEDNN_WEIGHTS.items() if ref.expired()]:
            del _ONEDNN_WEIGHTS[old]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), rows)
        entry = _ONEDNN_WEIGHTS[key] = (storage, weight._version, packed)
    return entry[2]


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.gelu(F.linear(x, weight, bias)); eager without autograd, the GELU runs in place on the matmul's
    fresh output (traced or compiled, inductor fuses it on its own)."""
    h = linear(x, weight, bias)
    if traced() or torch.is_grad_enabled():
        return F.gelu(h)
    return torch.ops.aten.gelu_(h)
