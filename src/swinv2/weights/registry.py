"""The official SwinV2 variants: architecture, eval preprocessing and the paper's reference numbers.

Each record is documentation and test oracle at once (the torchvision weights-record idea): what the
model is, how the official code evaluates it, and what the paper / official model zoo report for it.
Names follow timm; the official config names are aliases.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from ..errors import InputError, UnknownNameError
from ..model.transformer import SwinTransformerV2, SwinV2Config
from ..preprocess import EvalPreprocess


@dataclass(frozen=True)
class ModelInfo:
    """What a model's weights file says about it beyond the tensors; `load_model` and `create_model`
    put it in `model.info`, and `model_info(model)` reads it (with defaults for a model built bare)."""

    model_name: str | None = None  # registry name, if known
    class_names: list[str] | None = None  # one per output, if the weights name them
    preprocess: EvalPreprocess | None = None
    load_report: Any = None  # factory.LoadReport: how the weights were mapped


def default_preprocess(cfg: SwinV2Config) -> EvalPreprocess:
    """The official eval transform for a size: resize + centre crop 0.875 below 384 px, resize at 384+."""
    size = cfg.img_size[0]
    return EvalPreprocess(size, 1.0 if size >= 384 else 0.875)


def model_info(model: SwinTransformerV2) -> ModelInfo:
    """`model.info`, its eval preprocessing filled in from the config where the weights gave none."""
    info = model.info if isinstance(model.info, ModelInfo) else ModelInfo()
    return info if info.preprocess is not None else replace(info, preprocess=default_preprocess(model.config))


def describe_model(model: SwinTransformerV2) -> str:
    """The model that runs, as reports name it: its registry name, else (weights that describe an
    architecture without naming it) that architecture."""
    name = model_info(model).model_name
    if name:
        return name
    c = model.config
    return (
        f"unnamed SwinV2 (embed_dim {c.embed_dim}, depths {list(c.depths)}, num_heads {list(c.num_heads)}, "
        f"window {c.window_size})"
    )


@dataclass(frozen=True)
class Variant:
    name: str
    config: SwinV2Config
    preprocess: EvalPreprocess
    aliases: tuple[str, ...] = ()
    pretrain: str = "in1k"  # in1k | in22k | in22k->in1k | none (no published weights)
    top1: float | None = None  # paper / official model zoo, ImageNet-1k val
    top5: float | None = None
    paper_gmacs: float | None = None  # the paper table's FLOPs column (MACs, 1000-class head)
    fps_v100: int | None = None  # the official table's throughput (V100, batch 64)
    official: bool = True


_FAMILIES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2),
    # SwinV2-H and -G (paper Table 1 / §3.6): mmpretrain `SwinTransformerV2.arch_zoo` ('huge', 'giant'):
    # embed_dims 352 / 512, depths [2, 2, 18, 2] / [2, 2, 42, 4], heads [8, 16, 32, 64] / [16, 32, 64, 128]
    # (mmpretrain: "head count not certain for huge"), extra_norm_every_n_blocks 6. drop_path 0.1: the
    # official SimMIM SwinV2 fine-tuning config (configs/simmim/simmim_finetune__swinv2_base__img224_window14).
    "huge": dict(
        embed_dim=352, depths=(2, 2, 18, 2), num_heads=(8, 16, 32, 64), drop_path_rate=0.1, extra_norm_every_n_blocks=6
    ),
    "giant": dict(
        embed_dim=512,
        depths=(2, 2, 42, 4),
        num_heads=(16, 32, 64, 128),
        drop_path_rate=0.1,
        extra_norm_every_n_blocks=6,
    ),
}
# Reference parameter counts of the official code, 1000-class heads.
OFFICIAL_PARAMS = {"tiny": 28_347_154, "small": 49_728_418, "base": 87_918_816, "large": 196_739_932}


def _variant(
    family: str,
    window: int,
    img: int,
    *,
    pretrained: int = 0,
    classes: int = 1000,
    drop_path: float | None = None,
    alias: str | None,
    pretrain: str = "in1k",
    top1=None,
    top5=None,
    gmacs=None,
    fps=None,
    name: str | None = None,
    official: bool = True,
) -> Variant:
    arch = dict(_FAMILIES[family])
    if drop_path is not None:
        arch["drop_path_rate"] = drop_path
    pws = (pretrained, pretrained, pretrained, pretrained // 2) if pretrained else (0, 0, 0, 0)
    cfg = SwinV2Config(
        img_size=(img, img), window_size=window, pretrained_window_sizes=pws, num_classes=classes, **arch
    )
    if name is None:
        win = f"window{pretrained}to{window}" if pretrained else f"window{window}"
        res = f"_192to{img}" if pretrained else f"_{img}"
        name = f"swinv2_{family}_{win}{res}"
    # Official eval: resize to img/0.875 and centre-crop below 384 px; plain resize at 384.
    crop = 1.0 if img >= 384 else 0.875
    return Variant(
        name, cfg, EvalPreprocess(img, crop), (alias,) if alias else (), pretrain, top1, top5, gmacs, fps, official
    )


_VARIANTS = [
    _variant("tiny", 8, 256, alias="swinv2_tiny_patch4_window8_256", top1=81.8, top5=95.9, gmacs=5.9, fps=572),
    _variant("tiny", 16, 256, alias="swinv2_tiny_patch4_window16_256", top1=82.8, top5=96.2, gmacs=6.6, fps=437),
    _variant("small", 8, 256, alias="swinv2_small_patch4_window8_256", top1=83.7, top5=96.6, gmacs=11.5, fps=327),
    _variant("small", 16, 256, alias="swinv2_small_patch4_window16_256", top1=84.1, top5=96.8, gmacs=12.6, fps=257),
    _variant("base", 8, 256, alias="swinv2_base_patch4_window8_256", top1=84.2, top5=96.9, gmacs=20.3, fps=217),
    _variant("base", 16, 256, alias="swinv2_base_patch4_window16_256", top1=84.6, top5=97.0, gmacs=21.8, fps=174),
    _variant(
        "base",
        12,
        192,
        classes=21841,
        drop_path=0.2,
        alias="swinv2_base_patch4_window12_192_22k",
        pretrain="in22k",
        name="swinv2_base_window12_192",
    ),
    _variant(
        "large",
        12,
        192,
        classes=21841,
        drop_path=0.2,
        alias="swinv2_large_patch4_window12_192_22k",
        pretrain="in22k",
        name="swinv2_large_window12_192",
    ),
    _variant(
        "base",
        16,
        256,
        pretrained=12,
        drop_path=0.2,
        pretrain="in22k->in1k",
        alias="swinv2_base_patch4_window12to16_192to256_22kto1k_ft",
        top1=86.2,
        top5=97.9,
        gmacs=21.8,
        fps=174,
    ),
    _variant(
        "base",
        24,
        384,
        pretrained=12,
        drop_path=0.2,
        pretrain="in22k->in1k",
        alias="swinv2_base_patch4_window12to24_192to384_22kto1k_ft",
        top1=87.1,
        top5=98.2,
        gmacs=54.7,
        fps=57,
    ),
    _variant(
        "large",
        16,
        256,
        pretrained=12,
        drop_path=0.2,
        pretrain="in22k->in1k",
        alias="swinv2_large_patch4_window12to16_192to256_22kto1k_ft",
        top1=86.9,
        top5=98.0,
        gmacs=47.5,
        fps=95,
    ),
    _variant(
        "large",
        24,
        384,
        pretrained=12,
        drop_path=0.2,
        pretrain="in22k->in1k",
        alias="swinv2_large_patch4_window12to24_192to384_22kto1k_ft",
        top1=87.6,
        top5=98.3,
        gmacs=115.4,
        fps=33,
    ),
    # Not official, no weights: SwinV2-H / G as SimMIM pre-trains them at 192 px (window 12) and
    # fine-tunes them at 224 px (window 14; pre-trained windows 12, 12, 12, 6 as the official SimMIM
    # SwinV2 fine-tuning config). microsoft/SimMIM's README lists SwinV2-Huge 192 -> 224 at 85.7 top-1,
    # without weights; SwinV2-G's were never released.
    _variant("huge", 14, 224, pretrained=12, alias=None, pretrain="none", official=False),
    _variant("giant", 14, 224, pretrained=12, alias=None, pretrain="none", official=False),
    # Not official: a model small enough for unit tests and for demos on a CPU in minutes.
    Variant(
        "swinv2_micro_window4_32",
        SwinV2Config(
            img_size=(32, 32),
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
            pretrained_window_sizes=(0, 0),
            drop_path_rate=0.1,
        ),
        EvalPreprocess(32, 0.875),
        pretrain="none",
        official=False,
    ),
]
VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANTS}
ALIASES: dict[str, str] = {a: v.name for v in _VARIANTS for a in v.aliases}


def list_models(*, include_unofficial: bool = False) -> list[str]:
    """Names of the registered variants (the 12 official ones unless `include_unofficial`)."""
    return [v.name for v in _VARIANTS if v.official or include_unofficial]


def get_variant(name: str) -> Variant:
    """The record for `name` (or an official config-name alias); unknown names suggest the closest."""
    key = ALIASES.get(name, name)
    if key not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS) + list(ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownNameError(f"unknown model {name!r}{hint}; `swinv2 models` lists them")
    return VARIANTS[key]


def config_with(cfg: SwinV2Config, **overrides: Any) -> SwinV2Config:
    """`cfg` with `overrides` applied: None values are ignored, and an int `pretrained_window_sizes`
    applies to every stage."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("pretrained_window_sizes"), int):
        overrides["pretrained_window_sizes"] = (overrides["pretrained_window_sizes"],) * len(cfg.depths)
    return replace(cfg, **overrides)


def model_config(name: str, **overrides: Any) -> SwinV2Config:
    """The variant's config with `overrides` applied (`config_with`)."""
    try:
        return config_with(get_variant(name).config, **overrides)
    except TypeError as e:
        raise TypeError(f"create_model({name!r}): {e}") from None


def count_params(config: SwinV2Config) -> int:
    """Parameter count of `config`, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = SwinTransformerV2(config)
    return sum(p.numel() for p in model.parameters())


def require_classifier(model: nn.Module, weights: str | os.PathLike = "the model") -> None:
    """InputError where `model` has no classifier head (num_classes=0: encoder weights, e.g. a SimMIM
    pretraining's best.safetensors): it gives features, not classes, so predict and eval would print
    empty top-k lists and 0-class reports. The message says how to fine-tune it into a classifier."""
    swin = cast(SwinTransformerV2, model)  # typed as a Module for callers; a SwinV2 (or a wrapper of one) here
    if swin.config.num_classes:
        return
    name = model_info(swin).model_name or "NAME"
    weights = os.fspath(weights)
    if name == "swinv2_micro_window4_32":  # the demo's model: its own recipe, at its learning rate
        recipe = "configs/finetune_micro.yaml"
    else:
        recipe = f"configs/finetune.yaml model.name={name} model.pretrained=false"
    raise InputError(
        f"{weights}: encoder weights without a classifier head (num_classes=0, e.g. a SimMIM "
        f"pretraining's best.safetensors); fine-tune them on class folders first: swinv2 train --config "
        f"{recipe} model.weights={weights} data.root=DIR (docs/training.md, SimMIM)"
    )


def resolve_preprocess(
    model: nn.Module, *, img_size: int | None = None, crop_pct: float | None = None, interpolation: str | None = None
) -> EvalPreprocess:
    """The model's eval preprocessing (`model_info`: its weights', else its config's size with the
    official crop) with any given overrides applied."""
    prep = model_info(cast(SwinTransformerV2, model)).preprocess
    assert prep is not None  # model_info fills it in from the config where the weights gave none
    given = dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation)
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    return replace(prep, **overrides)
