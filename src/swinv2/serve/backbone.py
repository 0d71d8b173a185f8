"""SwinV2 as a backbone for dense prediction: the stage maps a detector or a segmenter reads.

`SwinV2Backbone` returns the selected stages' maps as a list of (B, C_i, H_i, W_i) tensors, each through
its own LayerNorm `norm{i}`, the layout of mmpretrain's `SwinTransformerV2` backbone (and so of every
mmdet / mmseg config built on it): the same module names (`patch_embed`, `layers.*` in the official
naming, `norm{i}`), so `backbone.norm{i}.*` keys of their checkpoints match by name, and the same
meaning of `out_indices`, `frozen_stages` and `norm_eval`. `load_backbone_weights` reads such
checkpoints (mmpretrain key names converted here), our own detectors' and segmenters', and every
classification format `convert.py` maps.

On top of it, for torchvision and for the examples: `SwinV2FPN` (backbone + torchvision's
FeaturePyramidNetwork, what `torchvision.models.detection` expects: an OrderedDict of maps and an int
`out_channels`) and `SwinV2Segmenter`, a semantic-segmentation model with a Semantic-FPN decoder
(Kirillov et al., *Panoptic Feature Pyramid Networks*, 2019) in its light form.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..model.transformer import DERIVED_KEYS, BasicLayer, SwinTransformerV2, SwinV2Config
from ..weights import convert, hub
from ..weights.convert import unfold_to_official_reduction
from ..weights.factory import LoadReport
from ..weights.files import read_state_dict
from ..weights.formats import is_mmpretrain_layout
from ..weights.registry import config_with, model_config

log = logging.getLogger(__name__)

# Norm layers `norm_eval` keeps in eval mode. LayerNorm and GroupNorm compute the same in either mode
# (no running statistics), so in effect the flag holds BatchNorm statistics, as in mmdet / mmpretrain.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_STAGE_NORM = re.compile(r"norm(\d+)\.(.+)")


# --------------------------------------------------------------------------- the backbone


class SwinV2Backbone(nn.Module):
    """The selected stage maps of a SwinV2 encoder, each through its own LayerNorm `norm{i}`.

    Built from a `SwinTransformerV2`, whose patch embedding and stages it shares (no copy; the final
    norm and the head are not used). Stages after the deepest selected one are kept, so that full
    checkpoints load by name, but never run and get no gradient. Input of any size: stage i is
    (B, embed_dim * 2^i, ceil(H / (patch * 2^i)), ceil(W / (patch * 2^i))) for input (B, 3, H, W).

    `frozen_stages` follows mmpretrain: -1 freezes nothing; k >= 0 freezes the patch embedding and
    stages 0..k, where stage i > 0 includes the patch merging that leads INTO it (mmpretrain's layout;
    ours keeps that merging at the end of `layers[i - 1]`) and its output norm. Frozen means
    `requires_grad=False` and eval mode through every `train()` (no stochastic depth, no dropout).
    `norm_eval` keeps every norm layer in eval mode in `train()`; it changes what BatchNorm computes
    only (LayerNorm has no running statistics), and is here for parity with mmdet / mmseg configs.
    """

    def __init__(
        self,
        model: SwinTransformerV2,
        out_indices: Sequence[int] | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.out_indices = _check_indices(out_indices, len(cfg.depths))
        if not -1 <= frozen_stages < len(cfg.depths):
            raise InputError(f"frozen_stages must be -1 (none) .. {len(cfg.depths) - 1}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.patch_embed = model.patch_embed
        self.pos_drop = model.pos_drop
        self.layers = model.layers
        self.out_channels = [cfg.embed_dim * 2**i for i in self.out_indices]
        self.strides = [cfg.patch_size * 2**i for i in self.out_indices]
        for i, channels in zip(self.out_indices, self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        # timm's `features_only` description: one dict per returned map.
        self.feature_info = [
            dict(num_chs=c, reduction=s, module=f"norm{i}", stage=i)
            for i, c, s in zip(self.out_indices, self.out_channels, self.strides)
        ]
        self.load_report: LoadReport | None = None  # set by create_backbone when it loads weights
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(model.training)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules `frozen_stages` freezes (see the class docstring), in forward order."""
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.patch_embed, self.pos_drop]
        layers = cast(Sequence[BasicLayer], self.layers)  # the model's stages
        for i in range(self.frozen_stages + 1):
            if i > 0:
                downsample = layers[i - 1].downsample
                assert downsample is not None  # every stage but the last merges, and i - 1 < frozen_stages < stages
                modules.append(downsample)
            modules.append(layers[i].blocks)
            if i in self.out_indices:
                modules.append(getattr(self, f"norm{i}"))
        return modules

    def train(self, mode: bool = True) -> SwinV2Backbone:
        """nn.Module.train, then frozen stages (and with `norm_eval` every norm) back to eval."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, NORM_TYPES):
                    module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        for layer in cast(Sequence[BasicLayer], self.layers):
            layer.grad_checkpointing = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, in_chans, H, W) -> [(B, C_i, H_i, W_i) for i in out_indices], each through `norm{i}`."""
        x = self.pos_drop(self.patch_embed(x))
        last = self.out_indices[-1]
        maps = []
        layers = cast(Sequence[BasicLayer], self.layers)  # the model's stages
        for i in range(last + 1):
            x = layers[i].forward_blocks(x)
            if i in self.out_indices:
                maps.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if i < last:
                downsample = layers[i].downsample
                assert downsample is not None  # every stage but the last merges, and i < last < stages
                x = downsample(x)
        return maps


def _check_indices(out_indices: Sequence[int] | None, stages: int) -> tuple[int, ...]:
    """Sorted, distinct stage indices within range; None selects every stage."""
    if out_indices is None:
        return tuple(range(stages))
    indices = tuple(sorted({int(i) for i in out_indices}))
    if not indices or indices[0] < 0 or indices[-1] >= stages:
        raise InputError(f"out_indices must select stages among 0..{stages - 1}, got {tuple(out_indices)}")
    return indices


def create_backbone(
    name_or_config: str | SwinV2Config,
    out_indices: Sequence[int] | None = None,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    pretrained: bool | str = False,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    strict: bool = True,
    **model_overrides: Any,
) -> SwinV2Backbone:
    """A `SwinV2Backbone` of a registered variant (or a `SwinV2Config`), optionally with weights.

    `out_indices` None selects every stage ((0, 1, 2, 3) for the official variants). `pretrained`
    names published weights as in `create_model` (the classifier's final norm becomes the last
    stage's `norm{i}`, as mmpretrain converts them); `weights` is a path or state dict of any format
    `load_backbone_weights` reads. What loading did is in `backbone.load_report`. `model_overrides`
    (img_size, window_size, drop_path_rate, ...) change the config; no classifier head is built.
    """
    if pretrained and weights is not None:
        raise ValueError("create_backbone: pass weights or pretrained, not both")
    if isinstance(name_or_config, SwinV2Config):
        if pretrained:
            raise ValueError("create_backbone: pretrained weights need a registry name, not a config")
        cfg = config_with(name_or_config, num_classes=0, **model_overrides)
    else:
        cfg = model_config(name_or_config, num_classes=0, **model_overrides)
        if pretrained:
            weights = hub.fetch(hub.resolve_pretrained(name_or_config, pretrained))
    backbone = SwinV2Backbone(SwinTransformerV2(cfg), out_indices, frozen_stages, norm_eval)
    if weights is not None:
        backbone.load_report = load_backbone_weights(backbone, weights, strict=strict)
    return backbone


# --------------------------------------------------------------------------- loading weights

# Top-level prefixes of the parts of a detector / segmenter that are not the backbone (mmdet, mmseg,
# mmpretrain classifiers, torchvision detection models, this module's SwinV2FPN / SwinV2Segmenter).
_PART_NAMES = {
    "neck": "neck",
    "fpn": "neck",
    "decode_head": "head",
    "auxiliary_head": "head",
    "head": "head",
    "rpn_head": "head",
    "roi_head": "head",
    "bbox_head": "head",
    "mask_head": "head",
    "rpn": "head",
    "roi_heads": "head",
    "decoder": "head",
    "data_preprocessor": "preprocessing",
}


def _backbone_keys(sd: Mapping[str, Tensor], dropped: list[str]) -> dict[str, Tensor]:
    """The backbone's tensors of a full model's state dict, prefix removed; the rest into `dropped`.

    The backbone is what sits under ``backbone.body.`` (torchvision's BackboneWithFPN, our SwinV2FPN
    in a torchvision detector), else ``backbone.`` (mmdet / mmseg / mmpretrain), else ``body.`` (our
    SwinV2FPN and SwinV2Segmenter on their own); a state dict with none of these is all backbone.
    """
    prefix = next((p for p in ("backbone.body.", "backbone.", "body.") if any(k.startswith(p) for k in sd)), "")
    if not prefix:
        return dict(sd)
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
        else:
            part = (key[len("backbone.") :] if key.startswith("backbone.") else key).split(".")[0]
            dropped.append(f"{key} (the {_PART_NAMES.get(part, 'rest of the model')}, not the backbone)")
    return out


# mmpretrain `SwinTransformerV2` -> native. Its stage i > 0 starts with the merging that ours ends stage
# i - 1 with; its FFN is mmcv's (layers.0.0 = fc1, layers.1 = fc2); attention sits under `w_msa`.
_MM_MERGE = re.compile(r"stages\.([1-9]\d*)\.downsample\.(.+)")
_MM_BLOCK = re.compile(
    r"stages\.(\d+)\.blocks\.(\d+)\."
    r"(attn\.w_msa|ffn\.layers\.0\.0|ffn\.layers\.1|norm1|norm2|norm3)\.(.+)"
)
_MM_BLOCK_PARTS = {
    "attn.w_msa": "attn",
    "ffn.layers.0.0": "mlp.fc1",
    "ffn.layers.1": "mlp.fc2",
    "norm1": "norm1",
    "norm2": "norm2",
    "norm3": "norm3",
}  # norm3: SwinV2-H/G's extra norm, the same name in both


def mmpretrain_to_native(sd: Mapping[str, Tensor], dropped: list[str]) -> dict[str, Tensor]:
    """mmpretrain SwinV2 backbone keys -> native; derived buffers into `dropped`, unknown keys kept
    as they are (they then show up as unexpected)."""
    out = {}
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in DERIVED_KEYS:
            dropped.append(f"{key} (derived buffer, recomputed)")
            continue
        if key.startswith("patch_embed.projection."):
            key = "patch_embed.proj." + key[len("patch_embed.projection.") :]
        elif m := _MM_MERGE.fullmatch(key):
            key = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
            value = unfold_to_official_reduction(value) if m[2] == "reduction.weight" else value
        elif m := _MM_BLOCK.fullmatch(key):
            key = f"layers.{m[1]}.blocks.{m[2]}.{_MM_BLOCK_PARTS[m[3]]}.{m[4]}"
        out[key] = value
    return out


def _encoder_to_native(sd: dict[str, Tensor], src: str, report: LoadReport) -> dict[str, Tensor]:
    """The encoder keys (no stage norms) of format `src` ("auto": guessed) as native keys."""
    if src == "mmpretrain" or (src == "auto" and is_mmpretrain_layout(list(sd))):
        report.src = "mmpretrain"
        return mmpretrain_to_native(sd, report.dropped)
    if src == "auto" and any(k.startswith("stages.") for k in sd):
        raise InputError(
            "these weights use mmdet / mmpretrain's `stages.*` layout without a SwinV2 CPB MLP "
            "(a Swin V1 backbone?); only mmpretrain's SwinTransformerV2 layout is converted"
        )
    conv = convert.to_native(sd, src)
    report.src = conv.src
    report.dropped += [f"{k} ({why})" for k, why in conv.dropped.items()]
    return dict(conv.state_dict)


def _place_final_norm(
    sd: dict[str, Tensor], norms: dict[str, Tensor], backbone: SwinV2Backbone, report: LoadReport
) -> None:
    """A classifier's final norm is the last stage's output norm (mmpretrain converts it so too)."""
    last = len(backbone.config.depths) - 1
    for key in [k for k in sd if k.startswith("norm.")]:
        target = f"norm{last}.{key[len('norm.') :]}"
        value = sd.pop(key)
        if last in backbone.out_indices and target not in norms:
            norms[target] = value
        else:
            report.dropped.append(f"{key} (final norm; stage {last} is not an output or has its own norm)")
    for key in [k for k in sd if k.startswith("head.")]:
        report.dropped.append(f"{key} (classifier head)")
        del sd[key]


def load_backbone_weights(
    backbone: SwinV2Backbone,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    src: str = "auto",
    strict: bool = True,
) -> LoadReport:
    """Load a backbone, detector, segmenter or classifier checkpoint into `backbone`; what happened.

    Reads mmdet / mmseg / mmpretrain checkpoints (`backbone.` prefix, mmpretrain key names, `norm{i}`),
    torchvision-style detectors (`backbone.body.`), this project's SwinV2FPN / SwinV2Segmenter, and
    plain encoder weights of any `convert.py` format; necks and heads are reported as dropped. Stage
    norms the weights lack keep their init (reported as reinitialised); with `strict`, a missing,
    unexpected or mis-shaped encoder key raises ValueError before the backbone is touched. `src` is
    "auto" (guessed from the keys), "mmpretrain" or a `convert.py` format name.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw, origin = convert.unwrap(path_or_state_dict), "state dict"
    else:
        raw, origin = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    report = LoadReport(src=src)
    own = _backbone_keys(raw, report.dropped)
    norms = {k: v for k, v in own.items() if _STAGE_NORM.fullmatch(k)}
    encoder = {k: v for k, v in own.items() if k not in norms}
    sd = _encoder_to_native(encoder, src, report) if encoder else {}
    _place_final_norm(sd, norms, backbone, report)
    sd.update(norms)
    _compare(sd, backbone.state_dict(), report)
    if strict and not report.ok:
        parts = [
            f"{n} ({len(getattr(report, n))}): {', '.join(getattr(report, n)[:6])}"
            for n in ("missing", "unexpected", "mismatched")
            if getattr(report, n)
        ]
        raise ValueError(f"{origin} ({report.src} format) does not fit the backbone: " + "; ".join(parts))
    target = backbone.state_dict()
    usable = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    backbone.load_state_dict(usable, strict=False)
    report.loaded = list(usable)
    if report.dropped:
        log.info("not loaded into the backbone: %s", ", ".join(report.dropped[:6]))
    return report


def _compare(sd: Mapping[str, Tensor], target: Mapping[str, Tensor], report: LoadReport) -> None:
    """Fill the report's missing / reinitialised / unexpected / mismatched lists."""
    for key, t in target.items():
        if key not in sd:
            (report.reinitialised if _STAGE_NORM.fullmatch(key) else report.missing).append(key)
        elif sd[key].shape != t.shape:
            report.mismatched.append(f"{key}: weights {tuple(sd[key].shape)} vs backbone {tuple(t.shape)}")
    report.unexpected = [k for k in sd if k not in target]


# --------------------------------------------------------------------------- detection: torchvision


class SwinV2FPN(nn.Module):
    """A SwinV2Backbone under torchvision's FeaturePyramidNetwork: a backbone for torchvision's
    detection models, which read an OrderedDict of maps and an int `out_channels`.

    Maps are named "0", "1", ... in `body.out_indices` order, plus "pool" (a max-pooled extra level,
    torchvision's LastLevelMaxPool) with `extra_pool`, as torchvision's own FPN backbones do.
    """

    def __init__(self, body: SwinV2Backbone, out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.out_channels, out_channels, extra_blocks=LastLevelMaxPool() if extra_pool else None
        )
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> list[str]:
        """Names of the maps from the backbone (for MultiScaleRoIAlign); "pool" is not one."""
        return [str(i) for i in range(len(self.body.out_indices))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict(zip(self.featmap_names, self.body(x))))


# --------------------------------------------------------------------------- segmentation


def _conv_gn_relu(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True)
    )


class SemanticFPNHead(nn.Module):
    """Semantic-FPN decoder, light form: lateral 1x1 convs, a top-down pathway (nearest 2x + sum),
    one 3x3 conv-GN-ReLU per level, every level resized to the finest and summed, a 1x1 classifier.

    GroupNorm, not BatchNorm: dense-prediction batches are small, and GN does not care.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 64, groups: int = 8, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_gn_relu(channels, channels, groups) for _ in in_channels)
        self.fuse = _conv_gn_relu(channels, channels, groups)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Maps finest first -> (B, num_classes, H_0, W_0) logits at the finest map's resolution."""
        laterals = [conv(m) for conv, m in zip(self.lateral, maps)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context into the finer level
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        size = laterals[0].shape[-2:]
        fused = sum(
            F.interpolate(conv(lat), size=size, mode="bilinear", align_corners=False) if j else conv(lat)
            for j, (conv, lat) in enumerate(zip(self.smooth, laterals))
        )
        return self.classifier(self.dropout(self.fuse(fused)))


class SwinV2Segmenter(nn.Module):
    """Semantic segmentation: SwinV2Backbone + SemanticFPNHead; logits at the input's resolution
    (bilinear from the finest map), (B, num_classes, H, W), for a per-pixel cross-entropy."""

    def __init__(self, body: SwinV2Backbone, num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.body = body
        self.decoder = SemanticFPNHead(body.out_channels, num_classes, channels)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decoder(self.body(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
