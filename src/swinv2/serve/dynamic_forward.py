"""An export-only forward of `SwinTransformerV2` whose window layout is computed from the input's shape.

Tracing the model itself (export.py's default) bakes everything that depends on the image size into
constants: the padding, the roll and window partition (a constant gather), the shift masks, the
effective window of each stage and the position bias for it. `DynamicSizeForward` shares the model's
parameters and runs the official math (scaled cosine attention, res-post-norm, v2 patch merging) with
every size-dependent quantity computed from `torch._shape_as_tensor` in tensor ops. Under the
TorchScript tracer those ops are recorded (Shape, Div, Mod, Where, Range, Gather in ONNX), so one
graph runs at any height and width:

* padding: the patch embedding and the patch merging pad by a constant (p - 1, resp. 1) and crop to
  the size they need (slices with tensor bounds); the window padding, roll and partition are one
  gather from the map with a zero row appended, its indices computed from (H, W, window, shift).
* effective window (`windows.effective_window`): for a square window the official rule, window =
  min(H, W) and shift 0 when min(H, W) <= the configured window; for a rectangular (h, w) one the same
  test per axis (timm's rule); computed with `torch.where`, so N = h * w is dynamic. Windows may differ
  per stage (each block carries its own).
* position bias: the model's own formula (`attention.log_spaced_coords`, `windows.relative_index`,
  `attention.cpb_bias`) given the dynamic (h, w) window as tensors: its aranges, the CPB MLP and the
  gather are in the graph.
* shift masks: per window-ordered token its region label (the official three slices per axis, in
  the rolled frame), compared pairwise within each window; with shift 0 every label in a window is
  equal and the mask is zero, so one formula serves both branches.

Every size from 1 px up runs: the stages use ceil division throughout, so no stage map is empty.
The eager forward gives the same logits as the model (it is how the tests check the formulas
before any exporter is involved); it is slower than the model's own eager path and meant for export.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.attention import cpb_bias, log_spaced_coords
from ..model.transformer import BasicLayer, PatchMerging, SwinTransformerBlock, SwinTransformerV2, WindowAttention
from ..model.windows import MASK_VALUE, Pair, relative_index


class Layout(NamedTuple):
    """Where the windows of one (B, H, W, C) stage map come from and go back to (see `window_layout`)."""

    window: tuple[Tensor, Tensor]  # () int64 each, the effective window (h, w)
    tokens: Tensor  # () int64, N = h * w
    windows: Tensor  # () int64, nW: windows per image
    gather: Tensor  # (Hp*Wp,) int64: flat position in the unpadded map (H*W: the zero row) of each token
    scatter: Tensor  # (H*W,) int64: window-order position of each unpadded token
    mask: Tensor | None  # (nW, N, N) shift mask, 0 / MASK_VALUE; None for unshifted blocks


TensorPair = tuple[Tensor, Tensor]


def _clamp(size: Tensor, window: int, shift: int) -> TensorPair:
    """(size, 0) where size <= window, else (window, shift): the official clamp along one axis."""
    clamped = size <= window
    return (
        torch.where(clamped, size, torch.full_like(size, window)),
        torch.where(clamped, torch.zeros_like(size), torch.full_like(size, shift)),
    )


def effective_window(H: Tensor, W: Tensor, window: Pair, shift: Pair) -> tuple[TensorPair, TensorPair]:
    """`windows.effective_window` in tensors: ((h, w), (shift_h, shift_w)). A square window clamps both
    axes to min(H, W) (official rule), a rectangular one each axis on its own (timm's)."""
    if window[0] == window[1]:
        w, s = _clamp(torch.minimum(H, W), window[0], shift[0])
        return (w, w), (s, s)
    (wh, sh), (ww, sw) = _clamp(H, window[0], shift[0]), _clamp(W, window[1], shift[1])
    return (wh, ww), (sh, sw)


def _region(idx: Tensor, n: Tensor, window: Tensor, shift: Tensor) -> Tensor:
    """Official mask regions along one axis of the padded map: slices (0, -w), (-w, -shift), (-shift, None)."""
    return (idx >= n - window).long() + (idx >= n - shift).long()


def window_layout(H: Tensor, W: Tensor, window: TensorPair, shift: TensorPair, masked: bool) -> Layout:
    """Pad to a window multiple, THEN roll by -shift and partition, as one gather (and its inverse).

    Token t of the window-ordered padded map (window k = t // N in raster order, position n = t % N in
    it) sits at (i, j) in the rolled frame; before the roll it was at ((i + shift_h) % Hp, (j + shift_w)
    % Wp), a padded position when that is outside H x W (gathered from an appended zero row). The
    windows are in raster order per image, as the official code; `masked` builds the shift mask.
    """
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = (H + wh - 1) // wh * wh, (W + ww - 1) // ww * ww
    N, cols = wh * ww, Wp // ww
    t = torch.arange(Hp * Wp)  # type: ignore[call-overload]  # 0-dim int64 sizes (traced shapes): torch accepts them
    k, n = t // N, t % N
    i, j = (k // cols) * wh + n // ww, (k % cols) * ww + n % ww  # rolled frame
    src_i, src_j = (i + sh) % Hp, (j + sw) % Wp
    gather = torch.where((src_i < H) & (src_j < W), src_i * W + src_j, H * W)
    u = torch.arange(H * W)  # type: ignore[call-overload]  # 0-dim int64 sizes (traced shapes): torch accepts them
    # Where each unpadded (u // W, u % W) lands in the rolled frame (+ Hp keeps the operands of % >= 0).
    ri, rj = (u // W - sh + Hp) % Hp, (u % W - sw + Wp) % Wp
    scatter = ((ri // wh) * cols + rj // ww) * N + (ri % wh) * ww + rj % ww
    mask = None
    if masked:
        label = (_region(i, Hp, wh, sh) * 3 + _region(j, Wp, ww, sw)).view(-1, N)  # type: ignore[call-overload]
        mask = (label[:, :, None] != label[:, None, :]).float() * MASK_VALUE  # (nW, N, N)
    return Layout(window, N, Hp * Wp // N, gather, scatter, mask)


def position_bias(attn: WindowAttention, window: TensorPair, square: bool) -> Tensor:
    """(nH, N, N) = 16 * sigmoid(cpb_mlp(log-spaced table))[relative index] for a dynamic (h, w) window:
    the model's formula, sizes as tensors. `square`: whether the block's window is square."""
    table = log_spaced_coords(window, attn.pretrained_window_size, square=square)
    return cpb_bias(attn.cpb_mlp, table, relative_index(*window))


def window_attention(attn: WindowAttention, x: Tensor, layout: Layout, square: bool) -> Tensor:
    """The official scaled cosine attention of (B*nW, N, C) windows, images major; mask broadcast per window."""
    N, nH, C = layout.tokens, attn.num_heads, attn.proj.in_features  # C static: no Shape op in the graph
    v_bias = cast(Tensor, attn.v_bias)  # set exactly when q_bias is
    qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, torch.zeros_like(v_bias), v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(-1, N, 3, nH, C // nH)  # type: ignore[call-overload]
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # one Split (indexing would be three Gathers, each a copy)
    scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (nH, 1, 1)
    # cos(q, k) * scale with the scale folded into q/|q| (N x d, not N x N, products), as the fused
    # path does; |.| clamped at 1e-12 as F.normalize, whose export would also Expand each norm.
    q = q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
    k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
    logits = q @ k.transpose(-2, -1)  # (B*nW, nH, N, N)
    bias = position_bias(attn, layout.window, square)  # (nH, N, N)
    if layout.mask is None:
        logits = logits + bias[None]
    else:  # position bias plus each window's mask, then one pass over the (B, nW, nH, N, N) logits
        logits = logits.reshape(-1, layout.windows, nH, N, N) + (bias[None] + layout.mask[:, None])[None]
    out = (logits.reshape(-1, nH, N, N).softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, N, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def block_forward(blk: SwinTransformerBlock, x: Tensor, H: Tensor, W: Tensor, layout: Layout) -> Tensor:
    """Res-post-norm block (eval) on a (B, H, W, C) map: x + norm1(window attention), then x + norm2(mlp)."""
    C = blk.norm1.normalized_shape[0]
    # Sizes H, W, N below are 0-dim int64 tensors (traced shapes), which torch's stubs do not list.
    flat = F.pad(x.reshape(-1, H * W, C), (0, 0, 0, 1))  # type: ignore[call-overload]  # row H*W: zeros, padding
    windows = flat.index_select(1, layout.gather).reshape(-1, layout.tokens, C)  # type: ignore[call-overload]
    out = window_attention(blk.attn, windows, layout, blk.window_size[0] == blk.window_size[1])
    out = out.reshape(x.shape[0], -1, C).index_select(1, layout.scatter)
    out = out.reshape(-1, H, W, C)  # type: ignore[call-overload]
    x = x + blk.norm1(out)
    mlp = blk.mlp
    x = x + blk.norm2(mlp.fc2(F.gelu(mlp.fc1(x))))
    return x if blk.norm3 is None else blk.norm3(x)  # SwinV2-H/G's extra norm


def patch_merging(merge: PatchMerging, x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): pad by one (a constant), crop to even, merge."""
    shape = torch._shape_as_tensor(x)
    Hh, Wh, C = (shape[1] + 1) // 2, (shape[2] + 1) // 2, merge.norm.normalized_shape[0] // 2
    x = F.pad(x, (0, 0, 0, 1, 0, 1))[:, : 2 * Hh, : 2 * Wh]
    # Official order x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2], x3=[1::2,1::2] (as PatchMerging).
    x = x.reshape(-1, Hh, 2, Wh, 2, C).permute(0, 1, 3, 4, 2, 5)  # type: ignore[call-overload]  # Hh, Wh: tensors
    x = x.reshape(-1, Hh, Wh, 4 * C)  # type: ignore[call-overload]
    return merge.norm(F.linear(x, merge.reduction.weight))


def stage_forward(layer: BasicLayer, x: Tensor) -> Tensor:
    """One stage: each layout (unshifted, shifted) is computed once and shared by the blocks using it."""
    shape = torch._shape_as_tensor(x)  # (4,) int64; traced, it is the ONNX Shape of the live map
    H, W = shape[1], shape[2]
    layouts: dict[tuple[Pair, Pair], Layout] = {}
    for blk in cast(Iterable[SwinTransformerBlock], layer.blocks):
        key = (blk.window_size, blk.shift_size)
        if key not in layouts:
            w, s = effective_window(H, W, *key)
            layouts[key] = window_layout(H, W, w, s, masked=any(blk.shift_size))
        x = block_forward(blk, x, H, W, layouts[key])
    return x if layer.downsample is None else patch_merging(layer.downsample, x)


class DynamicSizeForward(nn.Module):
    """`model`'s eval forward, (B, 3, H, W) -> (B, num_classes), with every size-dependent quantity in
    tensor ops (see the module docstring); shares the model's parameters. For export only."""

    def __init__(self, model: SwinTransformerV2) -> None:
        super().__init__()
        self.model = model
        # A new module starts in training mode; the exporter puts the wrapper back in its own mode
        # after tracing, recursively, which would leave the shared model training (dropout on).
        self.train(model.training)

    def forward(self, images: Tensor) -> Tensor:
        m = self.model
        p = m.patch_embed.patch_size
        # The conv over a map padded by p - 1 yields ceil(H/p) patches, the ones PatchEmbed's exact
        # padding gives: the tail beyond the last full patch is dropped, so no size-dependent pad.
        x = m.patch_embed.proj(F.pad(images, (0, p - 1, 0, p - 1))).permute(0, 2, 3, 1)
        x = m.patch_embed.norm(x)
        for layer in cast(Iterable[BasicLayer], m.layers):
            x = stage_forward(layer, x)
        return m.forward_head(m.norm(x))
