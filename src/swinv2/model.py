"""Swin Transformer V2 (Liu et al., arXiv 2111.09883), with the official parameter names and numerics.

Read bottom-up: window helpers -> continuous position bias -> attention -> block -> patch merging ->
stage -> model. Feature maps stay channels-last, (B, H, W, C), from the patch embedding to the head.

What V2 changes over V1, and where it lives here:
  * res-post-norm (paper §3.2): `SwinTransformerBlock.forward`, post-norms zero-initialised.
  * scaled cosine attention (paper §3.2): `WindowAttention`, per-head `logit_scale` clamped at log(100).
  * log-spaced continuous position bias (paper §3.3): `log_spaced_coords` + `cpb_mlp`, `16 * sigmoid`.
  * v2 patch merging: `PatchMerging`, reduction THEN norm.

Beyond the official code: any input size (pad to a window multiple, then shift; odd sizes padded
before merging), windows clamped at run time from the actual feature-map size, tables cached per
size, windows grouped by their shift mask (four masks at any size, so the bias never grows with the
image), the position bias cached while its parameters keep their values (CPU inference),
attention through `F.scaled_dot_product_attention` (written out on the CPU when the bias needs a
gradient), eager CPU inference over groups of images sized to stay off fresh pages
(`INFERENCE_CHUNK_BYTES`), activation checkpointing, sequential attention (probabilities recomputed
in the backward), multi-scale features.
This module imports torch only (and `fused.py`: torch-only fused and memory-lean autograd functions).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .fused import (cosine_qkv, gelu_linear, linear_gelu, mask_runs, permute_rows, sequential_attention,
                    softmax_flushed, traced)

# Official mask value for token pairs from different regions of a shifted window.
MASK_VALUE = -100.0
# Eager CPU inference runs each block over groups of images whose widest intermediate fits in this
# many bytes. glibc serves allocations above its mmap threshold (at most 32 MiB) from fresh pages, so
# a whole batch's 4C-wide MLP activation (50 MB at batch 8, 256 px) page-faults in again on every
# call (about 60k faults per forward at batch 8); groups of this size are reused from the heap and
# stay in cache. Measured (SwinV2-T, 256 px, 2 cores): 4-9 % faster at batch 8, 30 % at batch 32;
# smaller groups lose it again to smaller matmuls.
INFERENCE_CHUNK_BYTES = 16 << 20
# With `set_sequential_attention`, CPU training computes attention in pieces of at most this many bytes of
# probabilities and recomputes them in the backward pass instead of keeping them (see there).
SEQUENTIAL_ATTENTION_BYTES = 16 << 20
# Names of the derived tensors the official code stores as buffers; never ours, tolerated on load.
DERIVED_KEYS = ("relative_coords_table", "relative_position_index", "attn_mask")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: no classifier head, pooled features out), got {num_classes}")


@dataclass(frozen=True)
class SwinV2Config:
    """Architecture of a SwinV2 model. `img_size` is the nominal (training) size; any size runs."""

    img_size: tuple[int, int] = (256, 256)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    # Per stage, the window the weights were pre-trained with (0 = none): the CPB input is
    # normalised by it so that a larger window extrapolates in log space (paper §3.3).
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    cpb_hidden_dim: int = 512

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise types once, here
        size = self.img_size
        set_(self, "img_size", (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size))
        for name in ("depths", "num_heads", "pretrained_window_sizes"):
            set_(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.pretrained_window_sizes) != n:
            raise ValueError(
                f"depths, num_heads and pretrained_window_sizes need one entry per stage; got "
                f"{self.depths}, {self.num_heads}, {self.pretrained_window_sizes}"
            )
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i}: dim {self.embed_dim * 2**i} is not divisible by {heads} heads")
        if self.window_size < 1 or self.patch_size < 1:
            raise ValueError("window_size and patch_size must be positive")
        _check_num_classes(self.num_classes)

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SwinV2Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SwinV2Config keys: {', '.join(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- window helpers


def _plain_tensors() -> Any:
    """Cached tables must be ordinary tensors even when first built under `inference_mode`, since a
    later training forward uses them with autograd; under torch.compile / export they are traced."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False)


def _cached(fn: Any, *args: Any) -> Any:
    """Call an lru-cached table builder; under torch.compile trace it directly (constants in-graph)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B*nW, window*window, C); H and W are multiples of `window`."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def effective_window(H: int, W: int, window: int, shift: int) -> tuple[int, int]:
    """Official rule: a map not larger than the window is one window, unshifted."""
    if min(H, W) <= window:
        return min(H, W), 0
    return window, shift


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
    with _plain_tensors(), torch.no_grad():
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
    gather, inverse, scatter, counts = _cached(window_order, H, W, window, shift, device)
    with _plain_tensors(), torch.no_grad():
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
    with _plain_tensors(), torch.no_grad():
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
    return _cached(shift_mask, 2 * window, 2 * window, window, shift, device)


@lru_cache(maxsize=64)
def log_spaced_coords(window: int, pretrained_window: int, device: torch.device) -> Tensor:
    """((2w-1)^2, 2) fp32 CPB input: relative offsets, normalised, then sign*log2(1+|x|)/log2(8)."""
    with _plain_tensors(), torch.no_grad():
        r = torch.arange(-(window - 1), window, dtype=torch.float32, device=device)
        table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)  # (2w-1, 2w-1, 2)
        # A window of 1 has the single offset 0; dividing by max(.,1) keeps it 0 instead of 0/0.
        table = table / max((pretrained_window if pretrained_window > 0 else window) - 1, 1)
        table = table * 8  # to [-8, 8]
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
        return table.reshape(-1, 2)


@lru_cache(maxsize=64)
def relative_position_index(window: int, device: torch.device) -> Tensor:
    """(N, N) index of each token pair's offset into the (2w-1)^2 table, N = window^2."""
    with _plain_tensors(), torch.no_grad():
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
        return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).to(device)


# --------------------------------------------------------------------------- layers


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), scaled by 1/keep in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and (self.drop.p == 0.0 or not self.training):
            h = linear_gelu(x, self.fc1.weight, self.fc1.bias)  # eager: GELU in place on the matmul output
            return F.linear(h, self.fc2.weight, self.fc2.bias)
        h = F.linear(x, self.fc1.weight, self.fc1.bias)
        if self.drop.p == 0.0:
            return gelu_linear(h, self.fc2.weight, self.fc2.bias)  # same ops; GELU recomputed in backward
        return self.drop(self.fc2(self.drop(self.act(h))))


def _same_values(a: list[Tensor], b: list[Tensor]) -> bool:
    """Same dtypes, devices, shapes and values, element for element."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.device == y.device and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


class WindowAttention(nn.Module):
    """Scaled cosine attention within windows plus the log-spaced continuous position bias.

    attn = softmax(cos(q, k) * exp(min(logit_scale, log 100)) + 16*sigmoid(cpb_mlp(table)) [+ mask])
    """

    fused: bool = True  # F.scaled_dot_product_attention; False runs the plain official formula
    sequential: bool = False  # CPU training: probabilities recomputed in the backward (set_sequential_attention)

    def __init__(self, dim: int, num_heads: int, *, pretrained_window_size: int = 0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, cpb_hidden_dim: int = 512) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pretrained_window_size = pretrained_window_size
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, cpb_hidden_dim), nn.ReLU(inplace=True), nn.Linear(cpb_hidden_dim, num_heads, bias=False)
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # The k bias is fixed at zero (official): only q and v carry learnable biases.
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # (window, autocast dtype or None) -> (CPB parameter snapshot, position bias); see attention_bias.
        self._bias_cache: dict[tuple[int, torch.dtype | None], tuple[list[Tensor], Tensor]] = {}

    def position_bias(self, window: int) -> Tensor:
        """(nH, N, N) = 16 * sigmoid(cpb_mlp(log-spaced table))[relative_position_index]."""
        weight = self.cpb_mlp[0].weight
        table = _cached(log_spaced_coords, window, self.pretrained_window_size, weight.device).to(weight.dtype)
        bias = self.cpb_mlp(table)  # ((2w-1)^2, nH)
        index = _cached(relative_position_index, window, weight.device).view(-1)
        N = window * window
        # Gathered along the table axis of the (nH, (2w-1)^2) transpose, so the result is a contiguous
        # (nH, N, N), the layout attention reads its bias in: the (N, N, nH) gather permuted would
        # leave the heads innermost.
        bias = bias.t().index_select(1, index).view(self.num_heads, N, N)
        return 16 * torch.sigmoid(bias)

    def attention_bias(self, window: int, masks: Tensor | None) -> Tensor:
        """(n, nH, N, N): the position bias plus each of the n shift masks `masks` (n, N, N), one per
        mask class (`mask_class`); (1, nH, N, N) without masks. Its size does not grow with the image.

        In CPU inference the position bias is cached and reused while the CPB parameters hold the
        values it was computed from: the check compares values with a snapshot (a few thousand
        numbers), because version counters miss fused optimiser steps (`AdamW(fused=True)` does not
        bump them) and in-place updates through `.data`. Entries are per autocast dtype, since
        autocast computes the CPB MLP in its own dtype. Elsewhere it is recomputed: on an accelerator
        the value check would cost a host sync, more than the few small kernels it saves. The masks
        are added per call (n * nH * N * N additions, well under 0.1% of a forward), so the cache holds
        one (nH, N, N) per block.
        """
        params = [p.detach() for p in self.cpb_mlp.parameters()]
        device = params[0].device.type
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and device == "cpu"
        key = (window, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        hit = self._bias_cache.get(key) if cacheable else None
        if hit is not None and _same_values(hit[0], params):
            bias = hit[1]
        else:
            bias = self.position_bias(window)[None]  # (1, nH, N, N)
            if cacheable:
                with _plain_tensors():
                    bias, snapshot = bias.clone(), [p.clone() for p in params]
                self._bias_cache[key] = (snapshot, bias)
        return bias if masks is None else bias + masks.to(bias.dtype)[:, None]

    def forward(self, x: Tensor, window: int, masks: Tensor | None = None,
                counts: tuple[int, ...] | None = None) -> Tensor:
        """x: (nW*B, N, C), the windows of B images, window-major (row w*B + b is window w of image b).

        The windows come in consecutive runs of `counts[c]` windows (per image) that share the shift
        mask `masks[c]` (`masks`: (len(counts), N, N)); without masks no window is masked and `counts`
        is not needed. SDPA (inference, CUDA) runs once per run, with that run's (nH, N, N) bias
        broadcast over its windows and images, so its bias is the same size at any image size; the
        written-out paths (CPU training, the official formula) expand the class biases to one per
        window, a B-th of their logits. Returns (nW*B, N, C).
        """
        rows, N, C = x.shape
        nH = self.num_heads
        if masks is None:
            counts = (rows,)  # one run; `images` is then 1
        elif counts is None or len(counts) != masks.shape[0]:
            raise ValueError("masks need counts: the number of consecutive windows per image under each mask")
        images = rows // sum(counts)
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (nW*B, N, 3C)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (nH, 1, 1)
        bias = self.attention_bias(window, masks)  # (len(counts), nH, N, N)
        if not self.fused:  # the official formula, op for op
            q, k, v = qkv.view(rows, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4).unbind(0)
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (nW*B, nH, N, N)
            attn = attn.view(-1, images, nH, N, N) * logit_scale + self._window_bias(bias, counts).to(attn.dtype)
            attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
            out = attn.view(rows, nH, N, N) @ v
        else:
            # q/|q| * s and k/|k| with scale 1 is the scaled cosine attention; folding s into q also
            # spares autograd from saving the (N, N) logits for its gradient, and the normalisation
            # writes the (windows, heads, N, d) layout itself (no separate copy).
            q, k, v = (t.view(rows, nH, N, -1) for t in cosine_qkv(qkv, 1, nH, logit_scale.to(qkv.dtype)))
            bias = bias.to(q.dtype)
            if q.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad:
                # With a gradient for the bias, the three ops written out beat SDPA on the CPU: SDPA's
                # CPU kernels give none for attn_mask, so autograd would route it to the slower math
                # fallback (CUDA's memory-efficient kernel does differentiate the mask). Inference,
                # eager or compiled, stays on SDPA's fused kernel: compiled, it measured 1.36x faster
                # than the written-out ops that inductor fuses (AVX-512 machine; equal within noise
                # on an AVX2 one). In one pass over all windows, each with its class's bias (the
                # logits are `images` times larger than that bias anyway).
                # Flushed: the masked probabilities would be subnormal, and every bmm over them slow.
                if self.sequential and not (self.attn_drop and self.training) and not traced():
                    piece = max(1, SEQUENTIAL_ATTENTION_BYTES // (nH * N * N * q.element_size()))
                    out = sequential_attention(q, k, v, bias, counts, images, piece)
                else:
                    attn = (q @ k.transpose(-2, -1)).view(-1, images, nH, N, N) + self._window_bias(bias, counts)
                    attn = softmax_flushed(attn).view(rows, nH, N, N)
                    if self.attn_drop:
                        attn = F.dropout(attn, self.attn_drop, self.training)
                    out = attn @ v
            else:  # one SDPA call per mask class, its bias broadcast over the class's windows
                outs = [F.scaled_dot_product_attention(q[run], k[run], v[run], attn_mask=bias[c:c + 1], scale=1.0,
                                                       dropout_p=self.attn_drop if self.training else 0.0)
                        for c, run in mask_runs(counts, images)]
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
        out = out.transpose(1, 2).reshape(rows, N, C)  # (nW*B, nH, N, d) -> (nW*B, N, C)
        return self.proj_drop(F.linear(out, self.proj.weight, self.proj.bias))

    @staticmethod
    def _window_bias(bias: Tensor, counts: tuple[int, ...]) -> Tensor:
        """(nW, 1, nH, N, N): the (len(counts), nH, N, N) class biases, one per window, to broadcast
        over the images of window-major logits viewed as (nW, B, nH, N, N)."""
        if len(counts) > 1:
            bias = torch.cat([bias[c:c + 1].expand(n, -1, -1, -1) for c, n in enumerate(counts)])
        return bias[:, None]


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, each followed by its res-post-norm (paper §3.2)."""

    def __init__(self, dim: int, num_heads: int, *, window_size: int, shift_size: int, pretrained_window_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float,
                 cpb_hidden_dim: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.attn = WindowAttention(dim, num_heads, pretrained_window_size=pretrained_window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                                    cpb_hidden_dim=cpb_hidden_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)

    def _attend(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad to a window multiple, THEN shift, attend, undo both."""
        B, H, W, C = x.shape
        window, shift = effective_window(H, W, self.window_size, self.shift_size)
        pad_h, pad_w = -H % window, -W % window
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        N, L = window * window, Hp * Wp
        masks = _cached(class_masks, window, shift, x.device) if shift else None
        if traced():  # batch-size-free indices (ONNX keeps a dynamic batch axis); inductor fuses the copies
            gather, inverse, scatter, counts = _cached(window_order, H, W, window, shift, x.device)
            windows = x.reshape(B, L, C).index_select(1, gather).view(B, L // N, N, C).transpose(0, 1)
            out = self.attn(windows.reshape(-1, N, C), window, masks, counts)  # (nW*B, N, C)
            out = out.view(L // N, B, N, C).transpose(0, 1).reshape(B, L, C)
            return out.index_select(1, scatter).view(B, H, W, C)
        gather, inverse, scatter, counts = _cached(batched_window_order, H, W, window, shift, B, x.device)
        windows = permute_rows(x.reshape(B * L, C), gather, inverse).view(-1, N, C)  # window-major
        out = self.attn(windows, window, masks, counts).view(-1, C)  # (nW*B*N, C)
        if pad_h or pad_w:  # crop: `scatter` picks the B*H*W unpadded of the B*Hp*Wp rows
            return out.index_select(0, scatter).view(B, H, W, C)
        return permute_rows(out, inverse, gather).view(B, H, W, C)

    def _images_per_chunk(self, x: Tensor) -> int:
        """How many images of `x` go through the block at once: all of them, except in eager CPU
        inference, where as many as keep the widest intermediate (the MLP's hidden activation) within
        `INFERENCE_CHUNK_BYTES`."""
        B, H, W, _ = x.shape
        if torch.is_grad_enabled() or x.device.type != "cpu" or traced():
            return B
        per_image = H * W * self.mlp.fc1.out_features * x.element_size()
        return max(1, INFERENCE_CHUNK_BYTES // per_image)

    def _forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.norm1(self._attend(x)))
        y = self.drop_path(self.norm2(self.mlp(x)))
        return x + y if out is None else torch.add(x, y, out=out)

    def forward(self, x: Tensor) -> Tensor:
        n = self._images_per_chunk(x)
        if n >= x.shape[0]:
            return self._forward(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], n):
            self._forward(x[start:start + n], out=out[start:start + n])
        return out


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated, Linear(4C, 2C), THEN LayerNorm(2C) (the V2 order)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded first."""
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # Official order x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2], x3=[1::2,1::2]: the row
        # offset varies fastest, so the (row, col) offset axes are swapped before flattening.
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.norm(F.linear(x, self.reduction.weight))


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim, channels-last, optional norm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C); sizes not divisible by p are padded."""
        if x.ndim != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected a (B, {self.proj.in_channels}, H, W) batch of images, got shape "
                             f"{tuple(x.shape)}" + ("; one image: x.unsqueeze(0)" if x.ndim == 3 else ""))
        p = self.patch_size
        pad_h, pad_w = -x.shape[2] % p, -x.shape[3] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating regular / shifted windows, then optional merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, *, window_size: int, pretrained_window_size: int,
                 drop_path: list[float], downsample: bool, cfg: SwinV2Config) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                pretrained_window_size=pretrained_window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=drop_path[i],
                cpb_hidden_dim=cfg.cpb_hidden_dim,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)

    def _init_respostnorm(self) -> None:
        # Official init: post-norms start at zero, so every block starts as an identity map.
        for blk in self.blocks:
            for norm in (blk.norm1, blk.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)


# --------------------------------------------------------------------------- model


class SwinTransformerV2(nn.Module):
    """SwinV2 image classifier / backbone. Input (B, in_chans, H, W) of any size."""

    def __init__(self, config: SwinV2Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = config if config is not None else SwinV2Config(**kwargs)
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.num_features
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()  # linear rule
        n_stages = len(cfg.depths)
        self.layers = nn.ModuleList(
            BasicLayer(
                cfg.embed_dim * 2**i, depth, cfg.num_heads[i], window_size=cfg.window_size,
                pretrained_window_size=cfg.pretrained_window_sizes[i],
                drop_path=dpr[sum(cfg.depths[:i]): sum(cfg.depths[: i + 1])],
                downsample=i < n_stages - 1, cfg=cfg,
            )
            for i, depth in enumerate(cfg.depths)
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for layer in self.layers:
            layer._init_respostnorm()
        self.register_load_state_dict_pre_hook(_drop_derived_keys)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name substrings exempt from weight decay (official set, plus 1-D params)."""
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def set_sequential_attention(self, enable: bool = True) -> None:
        """CPU training: compute attention window group by window group (`SEQUENTIAL_ATTENTION_BYTES`
        of probabilities at a time) and recompute the probabilities in the backward pass instead of
        keeping them (the paper's sequential self-attention, §3.5). Same outputs and gradients; less
        memory where the (windows, heads, N, N) probabilities are large (big windows, big inputs),
        for about one more attention forward per step. No effect elsewhere: inference and CUDA use
        SDPA, whose kernels keep no probabilities; attention dropout in training keeps the plain path."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.sequential = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        """Attention via `F.scaled_dot_product_attention` (default) or the plain official formula."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.fused = enable

    def reset_classifier(self, num_classes: int) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w, num_features), final norm applied."""
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, h, w, C) -> (B, num_classes), or the pooled (B, C) features with `pre_logits`."""
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, *, norm: bool = False) -> list[Tensor]:
        """Each stage's output before its merging, as (B, C_i, H_i, W_i) maps (C_i = embed_dim*2^i).

        With `norm`, the last map goes through the final LayerNorm, as `forward_features` does.
        """
        x = self.pos_drop(self.patch_embed(x))
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x)
            out = self.norm(x) if (norm and i == len(self.layers) - 1) else x
            maps.append(out.permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _drop_derived_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Official checkpoints still carry derived buffers; they are recomputed here, so drop them."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.rsplit(".", 1)[-1] in DERIVED_KEYS]:
        del state_dict[key]
