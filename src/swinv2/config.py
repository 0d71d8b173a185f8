"""Typed training configuration: dataclass schema, YAML recipes, dotted overrides, validation.

Config flows one way: YAML recipe -> `key=value` overrides -> `Config` -> `engine.fit(cfg)`.
Every section is a frozen dataclass; the schema is read from the type hints, so adding a field
(or a whole section, e.g. a `stages: tuple[StageConfig, ...] = ()` list of dataclasses) needs no
parser change. Unknown keys and wrong types fail before any work, naming the dotted key and the
closest valid one.

Defaults are the official SwinV2 ImageNet-1k from-scratch recipe (microsoft/Swin-Transformer
`config.py`): AdamW lr 5e-4 per 512 images (linearly scaled), wd 0.05, betas (0.9, 0.999), eps 1e-8,
20 warmup epochs from 5e-7, cosine to 5e-6, clip 5.0, RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25 (pixel), mixup 0.8 / cutmix 1.0 / switch 0.5 per batch, label smoothing 0.1.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the dotted key."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ModelConfig:
    name: str = "swinv2_tiny_window8_256"
    num_classes: int | None = None              # None: the number of class folders
    img_size: int | None = None                 # None: the variant's
    window_size: int | None = None              # None: the variant's
    pretrained_window_sizes: tuple[int, ...] | None = None
    drop_path_rate: float | None = None         # None: the variant's (0.2 T, 0.3 S, 0.5 B)
    weights: str | None = None                  # initialise from a checkpoint (any supported format)
    weights_strict: bool = True                 # False: skip missing / mis-shaped keys (e.g. a new head)
    freeze: tuple[str, ...] = ()                # fnmatch patterns of parameter names, e.g. "patch_embed.*"


@dataclass(frozen=True)
class AugConfig:
    """Train-time augmentation through timm's pipeline (create_transform + Mixup)."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)    # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    re_prob: float = 0.25                       # random erasing
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = 1
    mixup: float = 0.8                          # mixup alpha (0 = off)
    cutmix: float = 1.0                         # cutmix alpha (0 = off)
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    root: str = ""                              # holds train_dir/ and val_dir/ of class folders
    train_dir: str = "train"
    val_dir: str = "val"
    val_root: str | None = None                 # a separate val folder of classes (overrides root/val_dir)
    source: Literal["folder", "digits"] = "folder"  # "digits": build root from scikit-learn's digits first
    batch_size: int = 128                       # per process (official: 128 per GPU)
    eval_batch_size: int | None = None          # None: 2 x batch_size
    workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    crop_pct: float | None = None               # eval resize = img_size / crop_pct; None: the variant's
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    strict: bool = False                        # decode every image first and fail listing bad ones
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 5e-4                            # at lr_base_batch images per step
    lr_base_batch: int = 512
    lr_scaling: Literal["linear", "none"] = "linear"  # linear: lr, warmup_lr, min_lr x total batch / base
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0               # global L2 norm; None: no clipping
    accum_steps: int = 1
    # Layer-wise LR decay (SimMIM fine-tuning): lr x layer_decay^(L+1 - layer id), see
    # schedule.swin_layer_id; None: off.
    layer_decay: float | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine"] = "cosine"
    warmup_epochs: float = 20.0
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    cooldown_epochs: float = 0.0                # the last epochs, at cooldown_lr
    cooldown_lr: float | None = None            # None: min_lr


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"   # fp16 adds a dynamic loss scaler
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False                    # timm's decay warmup 1 - (1 + step)^-2/3
    grad_checkpointing: bool = False
    sequential_attention: bool = False          # CPU: attention probabilities recomputed in the backward
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"    # used under torchrun
    eval_every: int = 1                         # epochs
    checkpoint_every: int = 0                   # optimizer steps between mid-epoch saves; 0: epoch ends only
    keep_best: int = 1                          # best-k training states kept by best_metric
    best_metric: Literal["val_top1", "val_ema_top1"] = "val_top1"
    max_bad_steps: int = 10                     # abort after this many non-finite steps in a row
    log_every: int = 50                         # optimizer steps between log lines / TensorBoard points
    tensorboard: bool = True
    progress: bool = True                       # tqdm bars (rank 0)
    threads: int | None = None                  # torch.set_num_threads; None: torch's default


class _Inherit:
    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()  # a stage key the stage does not set (None can be a real setting)


def _stage_section(cls: type) -> type:
    """`cls` with every field defaulting to INHERIT: a stage's sparse override of that section."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(f"Stage{cls.__name__}", [
        (f.name, _stage_section(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name],
         field(default=INHERIT)) for f in fields(cls)], frozen=True)


StageModelConfig, StageDataConfig, StageOptimConfig, StageScheduleConfig, StageTrainConfig = map(
    _stage_section, (ModelConfig, DataConfig, OptimConfig, ScheduleConfig, TrainConfig))


@dataclass(frozen=True)
class StageConfig:
    """One stage of a multi-stage recipe (see recipes.py): the top-level config with the keys
    given here replaced. Stage k > 1 starts from stage k-1's `init_from` weights."""

    name: str = ""
    init_from: Literal["best", "last"] = "best"
    model: StageModelConfig = field(default_factory=StageModelConfig)
    data: StageDataConfig = field(default_factory=StageDataConfig)
    optim: StageOptimConfig = field(default_factory=StageOptimConfig)
    schedule: StageScheduleConfig = field(default_factory=StageScheduleConfig)
    train: StageTrainConfig = field(default_factory=StageTrainConfig)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: tuple[StageConfig, ...] = ()         # a multi-stage recipe: `swinv2 train` runs recipes.fit_recipe

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return _build(cls, d, "")

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys replaced, validated: `cfg.replace(**{"train.epochs": 2})`."""
        d = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(d, key, _to_plain(value))
        return Config.from_dict(d)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The recipe at `path` (YAML; None: the defaults) with `key=value` overrides applied.

    Override values are parsed as YAML (`train.epochs=2`, `model.freeze=[patch_embed.*]`,
    `data.val_root=null`). Raises FileNotFoundError / ConfigError naming the file or key.
    """
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        d = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # e.g. an unbalanced bracket in a path: keep the text
        _set_dotted(d, key.strip(), value)
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ['model.name', ..., 'data.aug.mixup', ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        k = prefix + f.name
        keys.append(k)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], k + ".")
    return keys


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # a list index, e.g. stages.1.train.epochs
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:i])!r} has entries 0..{len(node) - 1}")
            child = node[int(part)]
        else:
            child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"cannot set {key!r}: name a key inside the entry, e.g. {key}.train.epochs")
    node[parts[-1]] = value


def _suggest(key: str, valid: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest dotted key, matching on the full key or its last part."""
    all_keys = schema_keys()
    close = difflib.get_close_matches(key, list(valid) + all_keys, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys if k.rsplit(".", 1)[-1] == last][:1] or \
            [k for k in all_keys if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- typed building


def _build(cls: type, d: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from the mapping `d`, checking every key and value type."""
    where = prefix.rstrip(".") or "the config"
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in d:
        if key not in names:
            full = f"{prefix}{key}"
            raise ConfigError(f"unknown key {full!r}{_suggest(full, [prefix + n for n in names])}")
    kwargs = {name: _coerce(hints[name], d[name], prefix + name) for name in names if name in d}
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` checked against (and normalised to) type `tp`; ConfigError naming `key` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(key, tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, tp, value)
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a folder named 2024
    else:
        raise TypeError(f"config schema: unsupported type {tp!r} for {key}")
    raise _type_error(key, tp, value)


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what YAML and JSON can hold."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, _to_plain(getattr(obj, f.name))) for f in fields(obj) if getattr(obj, f.name) is not INHERIT]
        return {k: v for k, v in items if v != {}}  # only a stage's untouched sections are empty
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj
