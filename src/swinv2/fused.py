"""Memory-lean autograd functions for the SwinV2 training path (torch only; used by model.py).

Each computes exactly the ops of the plain formula in its forward, so outputs are unchanged; what
differs is what autograd keeps for the backward pass:

* `scaled_normalize(x, scale)`: y = x * scale / max(|x|, eps) written straight into a fresh
  contiguous tensor. Saves y and |x| instead of x, the norm, the quotient and the product, so the raw
  q/k (views of the whole qkv projection) are not kept alive, and the layout copy is fused in.
* `gelu_linear(h, weight, bias)`: fc2(GELU(h)). Saves h only and recomputes GELU(h) in the backward
  (one elementwise op) instead of keeping the 4C-wide activation twice (GELU input and fc2 input).

And the inference fast path for the linears:

* `linear(x, weight, bias)` and `linear_gelu(x, weight, bias)`: without autograd on the CPU in fp32,
  one oneDNN matmul with the bias (and the exact, erf, GELU) applied in its epilogue (torch's
  `mkldnn._linear_pointwise`, the op torch.compile's CPU backend emits for the same pattern). That spares
  addmm's copy of the bias into the whole output and, for fc1, two passes over the 4C-wide activation.
  Used only after a one-time probe shows the op exists here and equals the plain ops.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12  # F.normalize's default


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum `t` over the dimensions that broadcasting expanded from `shape`."""
    lead = t.ndim - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


def _normalize_into_contiguous(x: Tensor, scale: Tensor | None, norm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(y, |x|) with y = x [* scale] / max(|x|, eps) written into a fresh contiguous tensor."""
    if norm is None:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, whatever x's strides
    if scale is None:  # F.normalize, op for op
        torch.div(x, norm.clamp_min(EPS), out=out)
    else:
        torch.mul(x, scale / norm.clamp_min(EPS), out=out)
    return out, norm


def traced() -> bool:
    """Under tracing / compiling / ONNX export the plain functional ops are used (no `out=`, no Function)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class _ScaledNormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor | None, norm: Tensor | None) -> Tensor:
        out, norm = _normalize_into_contiguous(x, scale, norm)
        ctx.save_for_backward(out, norm, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        y, norm, scale = ctx.saved_tensors
        unit = y if scale is None else y / scale  # x / max(|x|, eps)
        # d(x/|x|) = (g - u (u.g)) / |x|; where |x| was clamped to eps, x/eps is linear: g / eps.
        proj = (unit * grad).sum(-1, keepdim=True)
        gain = 1 / norm.clamp_min(EPS) if scale is None else scale / norm.clamp_min(EPS)
        grad_x = torch.where(norm <= EPS, grad, grad - unit * proj) * gain
        grad_scale = _sum_to(grad * unit, scale.shape) if scale is not None and ctx.needs_input_grad[1] else None
        return grad_x, grad_scale, None  # `norm` is |x|: its dependence on x is in grad_x


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


def scaled_normalize(x: Tensor, scale: Tensor | None = None, norm: Tensor | None = None) -> Tensor:
    """x [* scale] / max(|x|_2 over the last dim, 1e-12), returned contiguous; `scale` broadcasts.

    `norm`, if given, is |x| over the last dim (keepdim) already computed, e.g. for q, k and v in one
    reduction; it is taken as a constant (the gradient through it is part of x's). Traced, it is
    recomputed so that the graph differentiates it.
    """
    if traced():
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(EPS)
        return (x / norm if scale is None else x * (scale / norm)).contiguous()
    if norm is not None:
        norm = norm.detach()
    if torch.is_grad_enabled():
        return _ScaledNormalize.apply(x, scale, norm)
    return _normalize_into_contiguous(x, scale, norm)[0]


def gelu_linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(F.gelu(h), weight, bias), recomputing GELU(h) in the backward pass when training."""
    if traced() or not torch.is_grad_enabled():
        return F.linear(F.gelu(h), weight, bias)
    return _GeluLinear.apply(h, weight, bias)


def _probe_onednn_linear() -> bool:
    """Whether oneDNN's linear (bias, and bias + GELU, in the epilogue) runs here and equals the plain
    ops."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode(False), torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((3, 5, 16), (24, 16), (24,)))
            plain = F.linear(x, w, b)
            return bool(torch.allclose(op(x, w, b, "none", [], ""), plain, rtol=1e-5, atol=1e-6)
                        and torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(plain), rtol=1e-5, atol=1e-6))
    except RuntimeError:  # e.g. a build or CPU without the primitive
        return False


# Probed once, at import (three tiny matmuls), so that torch.compile reads a plain global instead of
# tracing the probe.
ONEDNN_LINEAR: bool = _probe_onednn_linear()


def _onednn_linear_eager(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "none" if gelu else "")


# The same call as an opaque custom op for torch.compile: inductor's own lowering of
# `mkldnn._linear_pointwise` accepts only frozen (constant, pre-packed) weights, and unfrozen it
# lowers F.linear to addmm plus a separate bias/GELU pass. Through this op a compiled graph keeps
# the one oneDNN call per linear and fuses the elementwise work around it.
@torch.library.custom_op("swinv2::onednn_linear", mutates_args=())
def _onednn_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return _onednn_linear_eager(x, weight, bias, gelu)


@_onednn_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_path(x: Tensor, weight: Tensor) -> bool:
    """fp32 CPU inference, eager or under torch.compile (not jit tracing, ONNX or torch.export, whose
    graphs must hold standard ops only), without autocast, where the probe found the op."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and ONEDNN_LINEAR)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    if torch.compiler.is_compiling():
        return _onednn_linear_op(x, weight, bias, gelu)
    return _onednn_linear_eager(x, weight, bias, gelu)  # no custom-op dispatch overhead in eager


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias); in fp32 CPU inference a oneDNN matmul with the bias in its epilogue
    (addmm instead first copies the bias into the whole output, then accumulates onto it)."""
    if _onednn_path(x, weight):
        return _onednn_linear(x, weight, bias, False)
    return F.linear(x, weight, bias)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.gelu(F.linear(x, weight, bias)); in fp32 CPU inference one oneDNN matmul with the bias and the
    exact GELU in its epilogue."""
    if _onednn_path(x, weight):
        return _onednn_linear(x, weight, bias, True)
    return F.gelu(F.linear(x, weight, bias))
