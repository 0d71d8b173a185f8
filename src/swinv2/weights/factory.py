"""The factory users start from: `create_model`, `load_model`, `load_weights`, `convert_file`.

`create_model` builds a registry variant and loads weights by path, state dict or hub name;
`load_model` builds the model a weights file describes (`described.read_weights`), or the registry
model `name` for formats that do not describe it; `load_weights` loads any format `convert` maps into
a model, fitting the head (21841 -> 1000 rows through the official map, a fresh head for another
class count) and reporting key by key (`LoadReport`); `convert_file` converts a file to any writable
format. The file is read once and its format converted once per load, so the detected format is
logged once, after the load succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..model.transformer import SwinTransformerV2
from . import hub
from .convert import Conversion, convert, detect_format, map_head_rows, to_native, unwrap
from .described import Weights, check_ranges, check_same_model, check_tensors, read_weights
from .files import read_state_dict, write_state_dict, write_weights
from .formats import guess_write_format, writable_format
from .messages import abbreviate
from .registry import ModelInfo, config_with, default_preprocess, get_variant, model_config
from .safe_load import PathLike

log = logging.getLogger(__name__)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    window_size: int | tuple | None = None,
    pretrained_window_sizes: tuple | None = None,
    drop_path_rate: float | None = None,
    weights: Any = None,
    pretrained: bool | str | None = None,
    strict: bool = True,
    **kw: Any,
) -> SwinTransformerV2:
    """Build a registered variant, optionally overriding its config and loading `weights` or `pretrained`.

    `weights` is a path or a state dict in any supported format (see `swinv2.load_weights`).
    `pretrained` names published weights (see `swinv2.weights.hub`): True for the variant's default tag, a
    tag (``"ms_in22k"``) or ``"NAME.TAG"`` of another variant; they are downloaded once into the
    Hugging Face cache. Either way window and resolution changes transfer by construction, 21841 ->
    1000 heads go through the official map, and another class count keeps a fresh head (a warning).
    """
    if pretrained and weights is not None:
        raise InputError(f"create_model({name!r}): pass weights or pretrained, not both")
    cfg = model_config(
        name,
        num_classes=num_classes,
        img_size=img_size,
        window_size=window_size,
        pretrained_window_sizes=pretrained_window_sizes,
        drop_path_rate=drop_path_rate,
        **kw,
    )
    if pretrained:
        weights = hub.fetch(hub.resolve_pretrained(name, pretrained))
    model = SwinTransformerV2(cfg)
    if weights is not None:
        load_weights(model, weights, strict=strict)
    return model


def load_model(path: PathLike, *, name: str | None = None, src: str = "auto", **overrides: Any) -> SwinTransformerV2:
    """Build a model from weights, in eval mode; what the weights say about it is in `model.info`.

    The architecture comes from our `.safetensors` metadata, a Hugging Face folder's config.json, a
    training checkpoint of `swinv2 train` (`checkpoints/last.pt`, `best_epochNNNN.pt`: its weights
    are those the run's best metric measures, the EMA's for ``val_ema_top1``, as in best.safetensors),
    or, for formats that do not describe it (official `.pth`, timm, torchvision), the registry
    `name`, whose class count then follows the weights' head (a 21841-class head for a 1000-class
    variant is mapped, see `load_weights`; weights without a head give an encoder, ``num_classes=0``).
    Weights that describe themselves take `name` only where it agrees with them (InputError
    otherwise: it would be ignored). `overrides` change the config (e.g. ``num_classes=10``,
    ``img_size=384``). The load is strict: the head is the weights' own, and a new one (fresh) only
    with a ``num_classes`` override that asks for another class count. The architecture is checked
    against the weights' tensor shapes before the model is built, and every tensor must be finite.
    `model.info` (a `registry.ModelInfo`) holds the `load_report`, the `class_names` (from the
    metadata; dropped with a num_classes override), the
    eval `preprocess` (the metadata's, else the registry record of `name`, else the official rule for
    the config's img_size, which any img_size override also selects) and the `model_name` (the
    metadata's or `name`). `path` may also name published weights, ``NAME[.TAG]``
    (see `resolve_weights`).
    """
    path, name = resolve_weights(path, name)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    return _build(read_weights(path), path, name, src, overrides)


def _build(weights: Weights, path: Path, name: str | None, src: str, overrides: dict[str, Any]) -> SwinTransformerV2:
    """`load_model` once the file is read: the architecture it describes (which `name`, if given, must
    agree with) or the registry's, checked against the tensors before the model is built; the head
    stays the weights' own unless an override changes the class count (a new head on purpose)."""
    conv = _to_native(weights.state_dict, src, path)  # once per load: the format is detected (and logged) once
    cfg, class_names, preprocess = weights.config, weights.class_names, weights.preprocess
    if cfg is not None:
        if name is not None:
            check_same_model(weights, name, path)
        check_tensors(cfg, conv.state_dict, weights.source, weights.keys, complete=True)
    elif name is not None:
        variant = get_variant(name)
        head = conv.state_dict.get("head.weight")
        rows = head.shape[0] if head is not None and head.ndim == 2 else 0
        cfg = variant.config
        if rows != cfg.num_classes and not (rows == 21841 and cfg.num_classes == 1000):
            cfg = replace(cfg, num_classes=rows)  # a fine-tuned checkpoint keeps its own classes; none: an encoder
        check_tensors(cfg, conv.state_dict, f"{path}: --model {name}", complete=False)
        preprocess = variant.preprocess
    else:
        raise InputError(
            f"{path} does not describe its architecture; pass the registry model name "
            f"(--model NAME, see `swinv2 models`)"
        )
    new_cfg = config_with(cfg, **overrides)
    if new_cfg != cfg:
        check_ranges(new_cfg, f"load_model({path}) overrides")
    if new_cfg.num_classes != cfg.num_classes:
        class_names = None
    if new_cfg.img_size != cfg.img_size:
        preprocess = None
    model = SwinTransformerV2(new_cfg)
    report, usable = _match(
        conv, model.state_dict(), str(path), strict=True, new_head=new_cfg.num_classes != cfg.num_classes
    )
    _apply(model, usable, report)
    _detected(conv, src)
    model.info = ModelInfo(weights.model_name or name, class_names, preprocess or default_preprocess(new_cfg), report)
    return model.eval()


def _to_native(sd: Mapping[str, Any], src: str, origin: PathLike | str) -> Conversion:
    """`convert.to_native`, its errors (a format it cannot tell, q/k/v that do not fit) naming `origin`.
    The format it detects is not logged here: `_detected` says it once the load succeeded, so a file
    refused is one line."""
    try:
        return to_native(sd, detect_format(unwrap(sd)) if src == "auto" else src)
    except InputError as e:
        raise InputError(f"{origin}: {e}") from None


def _detected(conv: Conversion, src: str) -> None:
    if src == "auto":
        log.info("weights format detected: %s", conv.src)


def resolve_weights(path: PathLike, name: str | None = None) -> tuple[Path, str | None]:
    """(local file, registry name) for a weights argument: an existing path as given; otherwise
    ``NAME[.TAG]`` of published weights (`swinv2.weights.hub`), fetched into the Hugging Face cache, with
    `name` defaulting to NAME (``..._192to256.ms_in22k``: the 22k weights in the 256 px model)."""
    if Path(path).exists() or not hub.looks_like_name(str(path)):
        return Path(path), name
    record = hub.lookup(str(path))
    return hub.fetch(record), name or record.variant


# --------------------------------------------------------------------------- loading into a model


@dataclass
class LoadReport:
    """What `load_weights` did, key by key (native names)."""

    src: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the weights
    unexpected: list[str] = field(default_factory=list)  # in the weights, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: weights (a, b) vs model (c, d)"
    reshaped: list[str] = field(default_factory=list)  # transformed to fit, e.g. 22k -> 1k head rows
    reinitialised: list[str] = field(default_factory=list)  # deliberately left at the model's init
    dropped: list[str] = field(default_factory=list)  # "key (why)": in the weights, deliberately unused

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"format: {self.src}; loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched", "reshaped", "reinitialised", "dropped"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): {abbreviate(keys, 12)}")
        return "\n".join(lines)


@lru_cache(maxsize=1)
def imagenet_22k_to_1k() -> list[int]:
    """Row of each ImageNet-1k class in the official 21841-class head (official map22kto1k.txt)."""
    text = resources.files("swinv2.weights").joinpath("map22kto1k.txt").read_text()
    return [int(line) for line in text.split()]


def _fit_head(
    sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport, *, new_head: bool = True
) -> None:
    """Make the checkpoint's classifier fit the model's, in place: map 22k -> 1k, drop or (`new_head`: a
    fine-tune, a new head on purpose) reinitialise. Without `new_head` a head that does not fit stays as
    it is, for the key check to report as missing or mis-shaped."""
    head = [k for k in ("head.weight", "head.bias") if k in target]
    src_w = sd.get("head.weight")
    if not head:  # num_classes=0: a feature extractor
        for k in [k for k in ("head.weight", "head.bias") if k in sd]:
            report.dropped.append(f"{k} (the model has no head)")
            del sd[k]
        return
    n_model = target["head.weight"].shape[0]
    if src_w is not None and src_w.shape == target["head.weight"].shape:
        return
    if (
        src_w is not None
        and src_w.shape[1:] == target["head.weight"].shape[1:]
        and src_w.shape[0] == 21841
        and n_model == 1000
    ):
        sd["head.weight"], bias = map_head_rows(src_w, sd.get("head.bias"), imagenet_22k_to_1k())
        if bias is not None:
            sd["head.bias"] = bias
        report.reshaped += [
            f"{k} (21841 -> 1000 rows, official 22k->1k map)" for k in ("head.weight", "head.bias") if k in sd
        ]
        log.info("classifier head mapped from 21841 to 1000 ImageNet-1k classes (official map)")
        return
    if not new_head:
        return
    what = "no classifier head" if src_w is None else f"a {src_w.shape[0]}-class head"
    log.warning("the weights have %s; the model's %d-class head keeps its fresh initialisation", what, n_model)
    for k in ("head.weight", "head.bias"):
        sd.pop(k, None)
    report.reinitialised += head


def load_weights(
    model: nn.Module, path_or_state_dict: PathLike | Mapping[str, Any], *, src: str = "auto", strict: bool = True
) -> LoadReport:
    """Load weights of any supported format into a `SwinTransformerV2`; returns what happened.

    Window and resolution changes need nothing (no derived table is stored); a 21841-class head
    becomes 1000 classes through the official map; any other class-count change keeps the model's
    fresh head with a warning; a `num_classes=0` model drops the head. SwinV1 weights leave the
    V2-only parameters at their init (listed as reinitialised). With `strict`, any missing,
    unexpected or mis-shaped key raises ValueError listing them, before the model is touched.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw, origin = path_or_state_dict, "state dict"
    else:
        raw, origin = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    conv = _to_native(raw, src, origin)
    report, usable = _match(conv, model.state_dict(), origin, strict=strict)
    _apply(model, usable, report)
    _detected(conv, src)
    return report


def _match(
    conv: Conversion, target: Mapping[str, torch.Tensor], origin: str, *, strict: bool, new_head: bool = True
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """How converted weights fit a model whose state dict is `target`: the report, and the tensors to
    load. With `strict`, a missing, unexpected or mis-shaped key (or integers for a floating-point
    parameter) raises InputError listing them, before the model is touched. `new_head`: see `_fit_head`."""
    sd = dict(conv.state_dict)
    report = LoadReport(src=conv.src, dropped=[f"{k} ({why})" for k, why in conv.dropped.items()])
    _fit_head(sd, target, report, new_head=new_head)
    for key, t in target.items():
        if key not in sd:
            if conv.reinitialised is not None and conv.reinitialised.search(key):
                report.reinitialised.append(key)
            elif key not in report.reinitialised:
                report.missing.append(key)
        elif sd[key].shape != t.shape:
            report.mismatched.append(f"{key}: weights {tuple(sd[key].shape)} vs model {tuple(t.shape)}")
        elif sd[key].is_floating_point() != t.is_floating_point():  # integers for weights: not a model's file
            report.mismatched.append(f"{key}: weights {sd[key].dtype} vs model {t.dtype}")
    report.unexpected = [k for k in sd if k not in target]
    if strict and not report.ok:
        parts = [
            f"{n} ({len(getattr(report, n))}): {abbreviate(getattr(report, n))}"
            for n in ("missing", "unexpected", "mismatched")
            if getattr(report, n)
        ]
        raise InputError(f"{origin} ({conv.src} format) does not fit the model: " + "; ".join(parts))
    usable = {
        k: v
        for k, v in sd.items()
        if k in target and v.shape == target[k].shape and v.is_floating_point() == target[k].is_floating_point()
    }
    report.loaded = list(usable)
    return report, usable


def _apply(model: nn.Module, usable: Mapping[str, torch.Tensor], report: LoadReport) -> LoadReport:
    """Load the tensors `_match` found usable into `model`, and say what was left out."""
    model.load_state_dict(usable, strict=False)
    if report.reinitialised:
        log.info("left at their initialisation: %s", abbreviate(report.reinitialised))
    if not report.ok:
        log.warning("weights loaded non-strictly: %s", str(report).replace("\n", "; "))
    return report


# --------------------------------------------------------------------------- converting a file


def convert_file(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str = "auto",
    dst_format: str | None = None,
    model_name: str | None = None,
) -> str:
    """Convert a weights file or folder to another format; returns a summary for the user.

    With an architecture (our `.safetensors`, a Hugging Face folder, a training checkpoint, or `model_name`)
    the weights go through a model (strict load, so the result is known to fit) and keep their class
    names, eval preprocessing and model name where the target can hold them. Without one, a target
    that is a key mapping alone (official, timm) is written as such; the others (`needs_model`: native,
    hf, torchvision) need `model_name`. The source is read once.
    """
    target = writable_format(dst_format or guess_write_format(dst))
    fmt = target.name
    src, model_name = resolve_weights(src, model_name)
    weights = read_weights(src)
    if weights.config is not None or model_name is not None:
        model = _build(weights, src, model_name, src_format, {})
        out = write_weights(model, dst, fmt)
        return f"{model.info.load_report}\nwrote {out} ({fmt})"
    if target.needs_model:
        raise InputError(f"{src} does not describe its architecture; writing {fmt} needs --model NAME")
    conv = convert(weights.state_dict, src_format, fmt)
    write_state_dict(conv.state_dict, Path(dst), fmt)
    lines = [f"format: {conv.src} -> {fmt}; {len(conv.state_dict)} tensors (pure key mapping, no --model)"]
    if conv.dropped:
        lines.append(f"dropped ({len(conv.dropped)}): {abbreviate(list(conv.dropped), 12)}")
    if conv.unmapped:
        lines.append(f"kept unmapped ({len(conv.unmapped)}): {abbreviate(conv.unmapped, 12)}")
    return "\n".join(lines + [f"wrote {dst} ({fmt})"])


__all__ = [
    "LoadReport",
    "convert_file",
    "create_model",
    "imagenet_22k_to_1k",
    "load_model",
    "load_weights",
    "resolve_weights",
]
