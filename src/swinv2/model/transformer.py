"""Swin Transformer V2 (Liu et al., arXiv 2111.09883), with the official parameter names and numerics.

Read bottom-up: attention -> block -> patch merging -> stage -> model (the position bias it adds:
`attention.cpb_bias` over `attention.log_spaced_coords`, gathered by `windows.relative_index`). Feature
maps stay channels-last, (B, H, W, C), from the patch embedding to the head. What V2 changes over V1:
  * res-post-norm (paper §3.2): `SwinTransformerBlock._forward`, post-norms zero-initialised.
  * scaled cosine attention (paper §3.2): `WindowAttention`, per-head `logit_scale` clamped at log(100).
  * log-spaced continuous position bias (paper §3.3): `cpb_mlp` of `log_spaced_coords`, `16 * sigmoid` (`cpb_bias`).
  * v2 patch merging: `PatchMerging`, reduction THEN norm.
Beyond the official code: any input size (pad to a window multiple, then shift; odd sizes padded before
merging), windows clamped to the actual map size, per-stage and rectangular (h, w) windows, the SwinV2-H/G
extra main-branch norm (paper §3.6), activation checkpointing, multi-scale features.
The speed machinery sits behind one seam each (torch only, see docs/performance.md): the window layout
in `windows.py`, the attention kernels, bias cache and inference grouping in `attention.py`, fused
autograd ops in `kernels.py`. `set_fused_attention(False)` runs the official formula written out here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .attention import BiasCache, cached_position_bias, cpb_bias, cpb_input, forward_in_chunks, fused_attention
from .kernels import gelu_linear, linear, linear_gelu
from .windows import (
    Pair,
    cached,
    compact_windows,
    effective_window,
    from_windows,
    pair,
    pretrained_windows,
    relative_position_index,
    stage_window_sizes,
    to_windows,
    window_bias,
)

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
    # An int (square, every stage), one (h, w), or one int / (h, w) per stage. Stored canonically: the
    # int when every stage has the same square window, else each stage's (h, w) (`stage_window_sizes`).
    window_size: int | tuple[Pair, ...] = 8
    # Per stage, the window (int or (h, w); square ones stored as ints) the weights were pre-trained
    # with (0 = none): the CPB input is normalised by it so a larger window extrapolates (paper §3.3).
    pretrained_window_sizes: tuple[int | Pair, ...] = (0, 0, 0, 0)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    cpb_hidden_dim: int = 512
    # SwinV2-H/G (paper §3.6): a LayerNorm on the main branch after every n-th block of a stage (0: none).
    extra_norm_every_n_blocks: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise types once, here
        size = self.img_size
        set_(self, "img_size", (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size))
        for name in ("depths", "num_heads"):
            set_(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.depths)
        set_(self, "window_size", compact_windows(stage_window_sizes(self.window_size, n)))
        set_(self, "pretrained_window_sizes", pretrained_windows(self.pretrained_window_sizes, n))
        if len(self.num_heads) != n:
            raise ValueError(f"depths and num_heads need one entry per stage; got {self.depths}, {self.num_heads}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i}: dim {self.embed_dim * 2**i} is not divisible by {heads} heads")
        if self.patch_size < 1 or self.extra_norm_every_n_blocks < 0:
            raise ValueError("patch_size must be positive and extra_norm_every_n_blocks >= 0")
        _check_num_classes(self.num_classes)

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def stage_window_sizes(self) -> tuple[Pair, ...]:
        """The (h, w) window of each stage."""
        return stage_window_sizes(self.window_size, len(self.depths))

    def to_dict(self) -> dict[str, Any]:
        """JSON / YAML types. `extra_norm_every_n_blocks` only where set: every other model's metadata
        stays as it was, readable by versions without the field."""
        d = json.loads(json.dumps(asdict(self)))  # tuples, nested ones too, as the lists JSON / YAML hold
        if not self.extra_norm_every_n_blocks:
            del d["extra_norm_every_n_blocks"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwinV2Config:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown SwinV2Config keys: {', '.join(unknown)}")
        return cls(**d)


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
            return linear(h, self.fc2.weight, self.fc2.bias)
        h = F.linear(x, self.fc1.weight, self.fc1.bias)
        if self.drop.p == 0.0:
            return gelu_linear(h, self.fc2.weight, self.fc2.bias)  # same ops; GELU recomputed in backward
        return self.drop(self.fc2(self.drop(self.act(h))))


class WindowAttention(nn.Module):
    """Scaled cosine attention within windows plus the log-spaced continuous position bias.

    attn = softmax(cos(q, k) * exp(min(logit_scale, log 100)) + 16*sigmoid(cpb_mlp(table)) [+ mask])
    """

    fused: bool = True  # fast kernels (attention.py); False runs the plain official formula
    sequential: bool = False  # CPU training: probabilities recomputed in the backward (set_sequential_attention)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        pretrained_window_size: int | Pair = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cpb_hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pretrained_window_size = pair(pretrained_window_size)
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
        # (window, autocast dtype or None) -> (CPB parameter snapshot, position bias); CPU inference only.
        self._bias_cache: BiasCache = {}

    def position_bias(self, window: int | Pair) -> Tensor:
        """(nH, N, N) = 16 * sigmoid(cpb_mlp(log-spaced table))[relative_position_index], N = h*w."""
        window, weight = pair(window), self.cpb_mlp[0].weight
        table = cached(cpb_input, window, self.pretrained_window_size, weight.device).to(weight.dtype)
        return cpb_bias(self.cpb_mlp, table, cached(relative_position_index, window, weight.device))

    def attention_bias(self, window: Pair, masks: Tensor | None) -> Tensor:
        """(n, nH, N, N): the position bias plus each of the n class masks `masks` (n, N, N); (1, nH, N, N)
        without masks: never larger with the image. CPU inference reuses the position bias (attention.py)."""
        bias = cached_position_bias(self._bias_cache, self.cpb_mlp, window, lambda: self.position_bias(window)[None])
        return bias if masks is None else bias + masks.to(bias.dtype)[:, None]

    def forward(
        self, x: Tensor, window: Pair, masks: Tensor | None = None, counts: tuple[int, ...] | None = None
    ) -> Tensor:
        """x: (nW*B, N, C), the windows of B images, window-major (row w*B + b is window w of image b).

        Runs of `counts[c]` windows (per image) share the shift mask `masks[c]` (`masks`: (len(counts),
        N, N)); without masks no window is masked and `counts` is not needed. Returns (nW*B, N, C).
        """
        rows, N, C = x.shape
        nH = self.num_heads
        if masks is None:
            counts = (rows,)  # one run; `images` is then 1
        elif counts is None or len(counts) != masks.shape[0]:
            raise ValueError("masks need counts: the number of consecutive windows per image under each mask")
        images = rows // sum(counts)
        v_bias = cast(Tensor, self.v_bias)  # set exactly when q_bias is
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, torch.zeros_like(v_bias), v_bias))
        qkv = linear(x, self.qkv.weight, qkv_bias)  # (nW*B, N, 3C)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (nH, 1, 1)
        bias = self.attention_bias(window, masks)  # (len(counts), nH, N, N)
        if not self.fused:  # the official formula, op for op; each window gets its mask class's bias
            q, k, v = qkv.view(rows, N, 3, nH, C // nH).permute(2, 0, 3, 1, 4).unbind(0)
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (nW*B, nH, N, N)
            attn = attn.view(-1, images, nH, N, N) * logit_scale + window_bias(bias, counts).to(attn.dtype)
            attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
            out = attn.view(rows, nH, N, N) @ v
        else:
            out = fused_attention(
                qkv,
                logit_scale,
                bias,
                counts,
                heads=nH,
                attn_drop=self.attn_drop,
                training=self.training,
                sequential=self.sequential,
            )
        out = out.transpose(1, 2).reshape(rows, N, C)  # (nW*B, nH, N, d) -> (nW*B, N, C)
        return self.proj_drop(linear(out, self.proj.weight, self.proj.bias))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, each followed by its res-post-norm (paper §3.2); with
    `extra_norm`, a LayerNorm of the block's output (`norm3`, SwinV2-H/G, paper §3.6)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: Pair,
        shift_size: Pair,
        pretrained_window_size: Pair,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        cpb_hidden_dim: int,
        extra_norm: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = pair(window_size)
        self.shift_size = pair(shift_size)
        self.attn = WindowAttention(
            dim,
            num_heads,
            pretrained_window_size=pretrained_window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            cpb_hidden_dim=cpb_hidden_dim,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim) if extra_norm else None

    def _attend(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad to a window multiple, THEN shift (roll by -shift) and
        partition into windows, attend, then undo all three (`windows.to_windows` / `from_windows`)."""
        window, shift = effective_window(x.shape[1], x.shape[2], self.window_size, self.shift_size)
        windows, layout = to_windows(x, window, shift)  # (nW*B, N, C)
        return from_windows(self.attn(windows, window, layout.masks, layout.counts), layout)

    def _forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.norm1(self._attend(x)))
        y = self.drop_path(self.norm2(self.mlp(x)))
        if self.norm3 is not None:  # mmpretrain's SwinBlockV2: x = norm3(x) after both residuals
            y = self.norm3(x + y)
            return y if out is None else out.copy_(y)
        return x + y if out is None else torch.add(x, y, out=out)

    def forward(self, x: Tensor) -> Tensor:
        # Eager CPU inference goes through in groups of images sized by the MLP's hidden width.
        return forward_in_chunks(self._forward, x, self.mlp.fc1.out_features)


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
            raise ValueError(
                f"expected a (B, {self.proj.in_channels}, H, W) batch of images, got shape "
                f"{tuple(x.shape)}" + ("; one image: x.unsqueeze(0)" if x.ndim == 3 else "")
            )
        p = self.patch_size
        pad_h, pad_w = -x.shape[2] % p, -x.shape[3] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        # A channels-last input makes the convolution write (B, H, W, C) directly, so the norm reads it
        # in place instead of first copying the permuted map (same values; half the stage's time).
        return self.norm(self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating regular / shifted windows, then optional merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: Pair,
        pretrained_window_size: Pair,
        drop_path: list[float],
        downsample: bool,
        cfg: SwinV2Config,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        shift = (window_size[0] // 2, window_size[1] // 2)
        # Extra norms after blocks n, 2n, ... of every stage, counted from 1 within the stage, the last
        # stage too (mmpretrain `SwinBlockV2Sequence`); the model's final norm follows as always.
        every = cfg.extra_norm_every_n_blocks
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=(0, 0) if i % 2 == 0 else shift,
                pretrained_window_size=pretrained_window_size,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate,
                drop_path=drop_path[i],
                cpb_hidden_dim=cfg.cpb_hidden_dim,
                extra_norm=every > 0 and (i + 1) % every == 0,
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
        for blk in cast(Iterable[SwinTransformerBlock], self.blocks):
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
        self.info: Any = None  # what its weights file says (registry.ModelInfo); set by load_model
        self.num_classes = cfg.num_classes
        self.num_features = cfg.num_features
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()  # linear rule
        self.layers = nn.ModuleList(
            BasicLayer(
                cfg.embed_dim * 2**i,
                depth,
                cfg.num_heads[i],
                window_size=cfg.stage_window_sizes[i],
                pretrained_window_size=pair(cfg.pretrained_window_sizes[i]),
                drop_path=dpr[sum(cfg.depths[:i]) : sum(cfg.depths[: i + 1])],
                downsample=i < len(cfg.depths) - 1,
                cfg=cfg,
            )
            for i, depth in enumerate(cfg.depths)
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for layer in cast(Iterable[BasicLayer], self.layers):
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
        for layer in cast(Iterable[BasicLayer], self.layers):
            layer.grad_checkpointing = enable

    def set_sequential_attention(self, enable: bool = True) -> None:
        """CPU training: attention in pieces, the probabilities recomputed in the backward pass instead of
        kept (the paper's sequential self-attention, §3.5). Same outputs and gradients, less memory at
        large windows or inputs; no effect on inference or CUDA (SDPA keeps no probabilities there)."""
        self._set_attention("sequential", enable)

    def set_fused_attention(self, enable: bool = True) -> None:
        """Attention through the fast kernels (default) or the plain official formula."""
        self._set_attention("fused", enable)

    def _set_attention(self, flag: str, enable: bool) -> None:
        for m in self.modules():
            if isinstance(m, WindowAttention):
                setattr(m, flag, enable)

    def reset_classifier(self, num_classes: int) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

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
        """Each stage's output before its merging, as (B, C_i, H_i, W_i) maps (C_i = embed_dim*2^i); with
        `norm`, the last map goes through the final LayerNorm, as `forward_features` does."""
        x = self.pos_drop(self.patch_embed(x))
        maps = []
        for i, layer in enumerate(cast(Iterable[BasicLayer], self.layers)):
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
