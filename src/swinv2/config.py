"""Typed training configuration: dataclass schema, YAML recipes, dotted overrides, validation.

Config flows one way: YAML recipe -> `key=value` overrides -> `Config` -> `engine.fit(cfg)`.
Every section is a frozen dataclass; the schema is read from the type hints, so adding a field
(or a whole section, e.g. a `stages: tuple[StageConfig, ...] = ()` list of dataclasses) needs no
parser change. Unknown keys and wrong types fail before any work, naming the dotted key and the
closest valid one. Every numeric field declares its valid range beside its default (`valid(...)`), and a
value outside it fails the same way, naming the key, the value and the range; a fault is blamed on the
command-line override that brought it, else on the YAML file.

Defaults are the official SwinV2 ImageNet-1k from-scratch recipe (microsoft/Swin-Transformer
`config.py`): AdamW lr 5e-4 per 512 images (linearly scaled), wd 0.05, betas (0.9, 0.999), eps 1e-8,
20 warmup epochs from 5e-7, cosine to 5e-6, clip 5.0, RandAugment rand-m9-mstd0.5-inc1, random
erasing 0.25 (pixel), mixup 0.8 / cutmix 1.0 / switch 0.5 per batch, label smoothing 0.1.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, cast

import yaml

from .errors import ConfigError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, written as in mathematics: '>= 1', '> 0', '[0, 1]', '[0, 1)',
    '(0, 1]'. Each value of a list field is checked; an `ordered` pair must also be (min, max)."""

    text: str
    ordered: bool = False

    def __contains__(self, v: float) -> bool:  # NaN is in no range: every comparison with it is False
        t = self.text
        if t.startswith(">"):
            op, bound = t.split()
            return v >= _number(bound) if op == ">=" else v > _number(bound)
        lo, hi = (_number(b) for b in t[1:-1].split(","))
        return (lo <= v if t[0] == "[" else lo < v) and (v <= hi if t[-1] == "]" else v < hi)

    def __str__(self) -> str:
        return self.text if self.text.startswith(">") else f"in {self.text}"

    def violation(self, value: float | tuple[float, ...]) -> str | None:
        """What is wrong with `value` (a number or a list of them), or None when it is in range. inf and
        NaN are refused by name whatever the range: inf passes '> 0' (a std of inf trains on zeros)."""
        if not isinstance(value, tuple):
            if not _finite(value):
                return f"must be a finite number {self}"
            return None if value in self else f"must be {self}"
        flat = [v for item in value for v in (item if isinstance(item, tuple) else (item,))]  # (h, w) pairs too
        if not all(_finite(v) for v in flat):
            return f"each value must be a finite number {self}"
        if not all(v in self for v in flat):
            return f"each value must be {self}"
        if self.ordered and value[0] > value[1]:
            return "must be (min, max) with min <= max"
        return None


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 60
_SHOWN.maxlevel = 3


def _shown(value: Any) -> str:
    """`value` as a message shows it: its repr, cut short where long (a value from a hostile file can be
    100 KB of text or nested deeper than repr() can go)."""
    return _SHOWN.repr(value)


def _finite(v: float) -> bool:
    return not isinstance(v, float) or math.isfinite(v)  # an int is always finite


def _number(text: str) -> int | float:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else float(text)  # an int stays exact (the seed's 2**64 - 1)


def valid(default: Any, spec: str, *, ordered: bool = False) -> Any:
    """A schema field defaulting to `default` whose values must lie in `spec` (see Range); None (where
    the type allows it) means "off" or "the default" and is always accepted."""
    return field(default=default, metadata={"range": Range(spec, ordered)})


# --------------------------------------------------------------------------- schema

# Upper bounds of the sizes that something is allocated from or looped over: a typo or a hostile file
# (`model.img_size=1000000000`) is one line naming the key, not a MemoryError or an hour-long hang.
# Each is far above every official variant and shipped recipe (registry.py, configs/), so no real run
# meets it:
#   img_size <= 4096: the variants train at 32-384 px and the paper's largest input is 1536 px.
#   window_size, pretrained_window_sizes <= 64: the variants use <= 24 and the paper's largest is 40
#     (SwinV2-G); each block's position bias is (heads, w^2, w^2), already GBs at 64.
#   num_classes <= 100000: ImageNet-22k's 21841 is the largest label set the variants were trained on.
#   batch sizes <= 65536 images per process, accum_steps <= 4096 micro-batches, lr_base_batch <= 2^20
#     images (the official values: 128 per GPU, 1, 512).
#   epochs, warmup_epochs, cooldown_epochs <= 100000 (SimMIM's 800 is the longest official run); the
#     schedule turns them into step counts, and round(inf) would be an OverflowError.
#   workers <= 256 processes, threads <= 1024, re_count <= 64 erased boxes per image (official 1),
#     simmim.reconstructions <= 64 pictured images, SimMIM patch sizes within the largest image.
# The architecture itself (embed_dim, depths, num_heads, patch size, mlp_ratio) is the variant's,
# chosen by model.name; this schema has no key for it.
MAX_IMG_SIZE = 4096
MAX_WINDOW = 64
MAX_CLASSES = 100_000
MAX_BATCH = 65_536
MAX_EPOCHS = 100_000
# Entries of any list setting (stages, freeze patterns, per-stage windows): real ones hold a few; each
# stage builds a whole config, and thousands of them would take seconds to check.
MAX_LIST = 256


@dataclass(frozen=True)
class ModelConfig:
    name: str = "swinv2_tiny_window8_256"
    num_classes: int | None = valid(None, f"[1, {MAX_CLASSES}]")  # None: the number of class folders
    img_size: int | None = valid(None, f"[1, {MAX_IMG_SIZE}]")  # None: the variant's
    # None: the variant's. An int, an [h, w] window, or one int / [h, w] per stage (two ints are one
    # [h, w] window, as in timm; a two-stage model's per-stage windows are written as pairs).
    window_size: int | tuple[int | tuple[int, int], ...] | None = valid(None, f"[1, {MAX_WINDOW}]")
    # Per stage: the window the position bias was trained with, an int or [h, w]; 0: none (model.py).
    pretrained_window_sizes: tuple[int | tuple[int, int], ...] | None = valid(None, f"[0, {MAX_WINDOW}]")
    # None: the variant's (0.2 T, 0.3 S, 0.5 B). 1 is out: the last block's DropPath would divide by keep = 0.
    drop_path_rate: float | None = valid(None, "[0, 1)")
    weights: str | None = None  # initialise from a checkpoint (any supported format)
    pretrained: bool | str | None = None  # published weights: true (default tag), a tag or NAME.TAG (hub.py)
    weights_strict: bool = True  # False: skip missing / mis-shaped keys (e.g. a new head)
    freeze: tuple[str, ...] = ()  # fnmatch patterns of parameter names, e.g. "patch_embed.*"


@dataclass(frozen=True)
class AugConfig:
    """Train-time augmentation through timm's pipeline (create_transform + Mixup)."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    scale: tuple[float, float] = valid((0.08, 1.0), "(0, 1]", ordered=True)  # RandomResizedCrop area range
    ratio: tuple[float, float] = valid((0.75, 4 / 3), "> 0", ordered=True)  # its aspect ratios (log-uniform)
    hflip: float = valid(0.5, "[0, 1]")  # probability
    color_jitter: float = valid(0.4, ">= 0")
    re_prob: float = valid(0.25, "[0, 1]")  # random erasing
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = valid(1, "[1, 64]")  # timm erases 1..re_count boxes (re_prob=0: off)
    mixup: float = valid(0.8, ">= 0")  # mixup alpha (0 = off)
    cutmix: float = valid(1.0, ">= 0")  # cutmix alpha (0 = off)
    cutmix_minmax: tuple[float, float] | None = valid(None, "[0, 1]", ordered=True)  # box side / image side
    mixup_prob: float = valid(1.0, "[0, 1]")
    switch_prob: float = valid(0.5, "[0, 1]")
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = valid(0.1, "[0, 1)")  # timm's LabelSmoothingCrossEntropy asserts < 1


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # holds train_dir/ and val_dir/ of class folders
    train_dir: str = "train"
    val_dir: str = "val"
    val_root: str | None = None  # a separate val folder of classes (overrides root/val_dir)
    # folder: class folders; digits: build root from scikit-learn's digits first; list: the official
    # `<train_dir>_map.txt` list files (images in <train_dir>.zip or <train_dir>/); shards: shard sets
    # root/<train_dir>/ and root/<val_dir>/ written by `swinv2 data pack` (root may be s3://bucket/prefix);
    # hf: Hugging Face image/label parquet or save_to_disk folders at root/<train_dir>, root/<val_dir>.
    source: Literal["folder", "digits", "list", "shards", "hf"] = "folder"
    train_list: str | None = None  # list source: the training list under root (default <train_dir>_map.txt)
    val_list: str | None = None  # list source: the val list under root (default <val_dir>_map.txt)
    # true: each epoch is whole global batches (the official code's drop_last), the few samples left over
    # differ by epoch; false: every sample exactly once per epoch, the last step short.
    drop_last: bool = True
    shuffle_shards: int = valid(8, "[1, 1048576]")  # shards: shards read together by the shuffle (locality)
    cache_dir: str | None = None  # shards: downloads and verdicts (default $SWINV2_CACHE or ~/.cache/swinv2)
    cache_limit_gb: float | None = valid(None, "> 0")  # shards from S3: bytes kept in the cache (None: all)
    retries: int = valid(5, "[0, 100]")  # shards from S3: retries of a timeout or 5xx answer, with backoff
    timeout: float = valid(60.0, "> 0")  # shards from S3: seconds to connect, and between bytes read
    batch_size: int = valid(128, f"[1, {MAX_BATCH}]")  # per process (official: 128 per GPU)
    eval_batch_size: int | None = valid(None, f"[1, {MAX_BATCH}]")  # None: 2 x batch_size
    # Data-loading processes; 0: load in the training process; auto: what this machine's CPUs keep busy
    # (auto_workers), resolved as the config is built, so the run directory records the number that ran.
    workers: int | Literal["auto"] = valid("auto", "[0, 256]")
    pin_memory: bool = True
    persistent_workers: bool = True
    crop_pct: float | None = valid(None, "(0, 1]")  # eval resize = img_size / crop_pct; None: the variant's
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = valid(IMAGENET_MEAN, "[0, 1]")  # of pixel values scaled to [0, 1]
    std: tuple[float, float, float] = valid(IMAGENET_STD, "> 0")  # a divisor
    strict: bool = False  # decode every image first and fail listing bad ones
    aug: AugConfig = field(default_factory=AugConfig)

    def __post_init__(self) -> None:
        if self.workers == "auto":
            object.__setattr__(self, "workers", auto_workers())


AUTO_WORKERS_MAX = 8  # the official recipes' data-loading processes per GPU


def auto_workers() -> int:
    """`data.workers: auto`: the CPUs this process may run on (os.sched_getaffinity: a taskset's or
    container's share, the count torch's DataLoader warns against), shared among the training processes
    torchrun starts on this machine (LOCAL_WORLD_SIZE), less one for the training process itself, at
    most AUTO_WORKERS_MAX. 1 CPU: 0 (load in the training process); 2: 1; 9 or more: 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    per_process = cpus // max(int(local), 1) if re.fullmatch(r"[0-9]{1,6}", local) else cpus
    return max(0, min(AUTO_WORKERS_MAX, per_process - 1))


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = valid(5e-4, ">= 0")  # at lr_base_batch images per step
    lr_base_batch: int = valid(512, "[1, 1048576]")
    lr_scaling: Literal["linear", "none"] = "linear"  # linear: lr, warmup_lr, min_lr x total batch / base
    betas: tuple[float, float] = valid((0.9, 0.999), "[0, 1)")  # torch's AdamW's range
    eps: float = valid(1e-8, ">= 0")
    weight_decay: float = valid(0.05, ">= 0")
    # Global L2 norm; None or 0: no clipping (the engine, like the official code, clips only when it is
    # truthy). A negative norm would flip the gradients' sign.
    clip_grad: float | None = valid(5.0, ">= 0")
    accum_steps: int = valid(1, "[1, 4096]")  # micro-batches per optimizer step
    # Layer-wise LR decay (SimMIM fine-tuning): lr x layer_decay^(L+1 - layer id), see
    # schedule.swin_layer_id; None: off (1 is the same, 0 would leave only the head training).
    layer_decay: float | None = valid(None, "(0, 1]")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine"] = "cosine"
    warmup_epochs: float = valid(20.0, f"[0, {MAX_EPOCHS}]")  # 0: no warm-up; >= train.epochs is warned about
    warmup_lr: float = valid(5e-7, ">= 0")
    min_lr: float = valid(5e-6, ">= 0")
    cooldown_epochs: float = valid(0.0, f"[0, {MAX_EPOCHS}]")  # the last epochs, at cooldown_lr
    cooldown_lr: float | None = valid(None, ">= 0")  # None: min_lr


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = valid(300, f"[1, {MAX_EPOCHS}]")
    seed: int = valid(0, "[0, 18446744073709551615]")  # torch.manual_seed's range: up to 2**64 - 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 adds a dynamic loss scaler
    ema: bool = False
    ema_decay: float = valid(0.9998, "[0, 1)")  # 1 would hold the EMA at the initial weights
    ema_warmup: bool = False  # timm's decay warmup 1 - (1 + step)^-2/3
    grad_checkpointing: bool = False
    sequential_attention: bool = False  # CPU: attention probabilities recomputed in the backward
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # used under torchrun
    eval_every: int = valid(1, ">= 1")  # epochs (the last epoch is always evaluated)
    checkpoint_every: int = valid(0, ">= 0")  # optimizer steps between mid-epoch saves; 0: epoch ends only
    # Best-k training states kept by best_metric; 0 is out: with a val set the best is the run's weights file.
    keep_best: int = valid(1, ">= 1")
    # Accuracies rank highest first, losses lowest first; task simmim has losses only (no labels).
    best_metric: Literal["val_top1", "val_ema_top1", "val_loss", "val_ema_loss"] = "val_top1"
    max_bad_steps: int = valid(10, ">= 1")  # abort after this many non-finite steps in a row
    log_every: int = valid(50, ">= 1")  # optimizer steps between log lines / TensorBoard points
    tensorboard: bool = True
    progress: bool = True  # tqdm bars (rank 0)
    threads: int | None = valid(None, "[1, 1024]")  # torch.set_num_threads; None: torch's default
    # classify: labels from class folders, cross-entropy. simmim: masked-image pretraining without labels
    # (the `simmim` section; images at any depth under the train / val folders, class folders ignored).
    task: Literal["classify", "simmim"] = "classify"


@dataclass(frozen=True)
class SimMIMConfig:
    """Masked-image pretraining (`train.task: simmim`; SimMIM, Xie et al. arXiv 2111.09886, as the
    official code has it: microsoft/SimMIM and microsoft/Swin-Transformer models/simmim.py,
    data/data_simmim_pt.py, configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml).

    Squares of mask_patch_size px are masked at mask_ratio (exactly ceil(ratio x squares) per image);
    the encoder sees a learned mask token in place of each masked patch, a 1x1 conv + PixelShuffle
    decoder predicts every pixel, and the loss is the L1 error on the masked pixels only. The data
    transform is SimMIM's: random-resized crop (data.aug.scale / ratio / interpolation), horizontal
    flip (data.aug.hflip), normalisation; the rest of data.aug (RandAugment, erasing, Mixup) is unused.
    """

    # A multiple of the model's patch size that divides the image size; None: the encoder stride
    # (patch x 2^(stages-1): 32 px for the 4-stage variants at patch 4, SimMIM's 32 at 192 px).
    mask_patch_size: int | None = valid(None, f"[1, {MAX_IMG_SIZE}]")
    mask_ratio: float = valid(0.6, "(0, 1)")
    # Odd side (px) of the window that normalises each target pixel by its local mean / std (the SwinV2
    # SimMIM configs: 47 at 192 px); None: the normalised pixels themselves (SimMIM's Swin V1 / ViT).
    norm_target_patch_size: int | None = valid(None, f"[3, {MAX_IMG_SIZE - 1}]")
    reconstructions: int = valid(8, "[0, 64]")  # val images drawn each evaluated epoch (0: no picture)


class _Inherit:
    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()  # a stage key the stage does not set (None can be a real setting)


def _stage_section(cls: type) -> type:
    """`cls` with every field defaulting to INHERIT: a stage's sparse override of that section."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(
        f"Stage{cls.__name__}",
        [
            (
                f.name,
                _stage_section(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name],
                field(default=INHERIT, metadata=f.metadata),
            )
            for f in fields(cls)
        ],
        frozen=True,
    )


if TYPE_CHECKING:  # built at run time, so opaque to mypy; each field holds its section's value or INHERIT
    from typing import TypeAlias

    StageModelConfig: TypeAlias = Any
    StageDataConfig: TypeAlias = Any
    StageOptimConfig: TypeAlias = Any
    StageScheduleConfig: TypeAlias = Any
    StageTrainConfig: TypeAlias = Any
    StageSimMIMConfig: TypeAlias = Any
else:
    StageModelConfig, StageDataConfig, StageOptimConfig, StageScheduleConfig, StageTrainConfig, StageSimMIMConfig = map(
        _stage_section, (ModelConfig, DataConfig, OptimConfig, ScheduleConfig, TrainConfig, SimMIMConfig)
    )


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
    simmim: StageSimMIMConfig = field(default_factory=StageSimMIMConfig)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)  # used by train.task: simmim
    stages: tuple[StageConfig, ...] = ()  # a multi-stage recipe: `swinv2 train` runs recipes.fit_recipe

    def __post_init__(self) -> None:
        # Here rather than in the parser, so that a Config built in code is held to the ranges too.
        _check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return _build(cls, d, "")

    def replace(self, **dotted: Any) -> Config:
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
            text = _read_recipe(p)
            loaded = parse_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_fault(e, text)}") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}", key=e.key, reason=e.reason) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        d = loaded or {}
    # The file must hold on its own, then each override in turn: a fault is blamed on the layer that
    # brought it (`override data.batch_size=0: must be >= 1`, not the file the user did not edit).
    try:
        cfg = Config.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e), key=e.key, reason=e.reason) from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {_shown(item)} is not of the form key=value (e.g. train.epochs=2)")
        # As given where it is short and printable; else quoted on one line and cut short.
        shown = (
            item
            if len(item) <= 200 and item.isprintable()
            else _shown(item) + (f" ({len(item)} characters)" if len(item) > 200 else "")
        )
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # e.g. an unbalanced bracket in a path: keep the text
        except ConfigError as e:
            raise ConfigError(f"override {shown}: {e}", key=key, reason=str(e)) from None
        _set_dotted(d, key, value)
        try:
            cfg = Config.from_dict(d)
        except ConfigError as e:
            own = e.key is not None and re.sub(r"\[(\d+)\]", r".\1", e.key) == key  # stages[1].x is stages.1.x
            raise ConfigError(f"override {shown}: {e.reason if own else e}", key=e.key, reason=e.reason) from None
    _check_start_point(cfg, path, overrides)
    if not cfg.stages:  # a recipe's stages are checked one by one once resolved (recipes.plan_recipe)
        check_task(cfg)
    _warn_long_warmup(cfg)
    return cfg


def key_origin(key: str, path: str | Path | None, overrides: Sequence[str]) -> str:
    """Where dotted `key` of `load_config(path, overrides)` got its value, for a key whose value is not
    its default: the last override that set it (or a section holding it), else the recipe file."""
    for item in reversed(overrides):
        given = item.partition("=")[0].strip()
        if key == given or key.startswith(given + "."):
            return f"override {item if len(item) <= 200 and item.isprintable() else _shown(item)}"
    return str(path) if path is not None else "the defaults"


def start_point(cfg: Config) -> dict[str, tuple[str, Any]]:
    """{"name" | "weights" | "pretrained": (dotted key, value)} of the first model trained: the top
    level's model section, or the first stage's keys where it sets them (a later stage starts from the
    one before it, recipes.plan_recipe)."""
    stage = cfg.stages[0].model if cfg.stages else None
    out = {}
    for name in ("name", "weights", "pretrained"):
        own = stage is not None and getattr(stage, name) is not INHERIT  # else inherited from the top level
        out[name] = (f"stages.0.model.{name}" if own else f"model.{name}", getattr(stage if own else cfg.model, name))
    return out


def _check_start_point(cfg: Config, path: str | Path | None, overrides: Sequence[str]) -> None:
    """model.weights and model.pretrained are two start points (create_model refuses them together,
    but only once the data is built): refused here, naming where each was set."""
    start = start_point(cfg)
    (w_key, weights), (p_key, pretrained) = start["weights"], start["pretrained"]
    if weights is None or not pretrained:
        return
    w_from, p_from = (key_origin(k, path, overrides) for k in (w_key, p_key))
    shown = json.dumps(pretrained) if isinstance(pretrained, bool) else pretrained
    prefix = "stages.0." if cfg.stages else ""
    reason = (
        f"two start points; keep one: {prefix}model.pretrained=false to start from the file, or "
        f"{prefix}model.weights=null for the published weights"
    )
    raise ConfigError(
        f"{w_key}={_shown(weights)} (set by {w_from}) and {p_key}={shown} (set by {p_from}): {reason}",
        key=w_key,
        reason=reason,
    )


# A recipe is a few KB (the longest shipped one is 4 KB): 64 KiB leaves room for any real one and
# bounds the parse of the worst file (64 KiB of one flow list: about 0.5 s with libyaml, 5 s with
# PyYAML's pure-Python parser, on a busy 2-core machine).
MAX_RECIPE_BYTES = 64 * 1024
# Sections, stages and lists nest 7 deep at most (stages[0].data.aug.scale); nesting is refused well
# before it could exhaust the Python stack of the recursive composer and constructor.
MAX_YAML_DEPTH = 32
_YAML_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where installed: ~5x faster


def _read_recipe(p: Path) -> str:
    """The text of recipe `p`: at most MAX_RECIPE_BYTES of UTF-8, or a ConfigError (which load_config
    prefixes with the file) saying which byte is not."""
    with open(p, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(
            f"larger than {MAX_RECIPE_BYTES // 1024} KiB, too large for a recipe (the shipped ones are a few KB)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text; save the file as UTF-8"
        ) from None


class _RecipeLoader(_YAML_BASE):  # type: ignore[misc, valid-type]
    """PyYAML's safe loader whose construction faults (a date such as 2024-13-45, an integer of more
    than 4300 digits: ValueError) are YAML errors at the value's line, like any other."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return yaml.constructor.SafeConstructor.construct_object(self, node, deep=deep)
        except (ValueError, OverflowError) as e:
            problem = "an integer of more than 4300 digits" if "integer string conversion" in str(e) else str(e)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_shown(node.value)}: {problem}", node.start_mark
            ) from None


def parse_yaml(text: str) -> Any:
    """The YAML document `text` (a recipe, or an override's value), held to what a recipe needs so that a
    tiny file cannot take unbounded time or memory, nor silently mean something else:

    - no anchors or aliases (&a / *a): a few hundred bytes of aliases to aliases expand to gigabytes,
      and a recipe gains nothing from them;
    - no key twice in one mapping (YAML keeps the last silently);
    - nesting at most MAX_YAML_DEPTH deep (200,000 brackets were a RecursionError).

    Raises ConfigError (what is wrong and the line) for the first two, yaml.YAMLError for deeper
    nesting and any other invalid YAML (an override then keeps its text, e.g. a path with brackets).
    """
    _check_utf8(text)
    _check_events(text)
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_utf8(text: str) -> None:
    """ConfigError for a character UTF-8 cannot hold: a byte of a non-UTF-8 command line arrives as a
    lone surrogate (Python's surrogateescape), which libyaml cannot even be handed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"character U+{c:04X}"
        raise ConfigError(f"{what} is not UTF-8 text") from None


def _check_events(text: str) -> None:
    """Anchors, aliases and depth, from the event stream: a flat loop, however deep the nesting; the
    parse stops at the first fault, before a deep document is read to its end."""
    loader = _YAML_BASE(text)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ConfigError(
                    f"line {line}: anchors and aliases (&name, *name) are not supported in a "
                    f"recipe; write the value out"
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:  # as libyaml's own limit (1000) would: a YAML error
                    raise yaml.parser.ParserError(
                        None,
                        None,
                        f"nested more than {MAX_YAML_DEPTH} deep (a recipe's sections and lists nest a few levels)",
                        event.start_mark,
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, where: str) -> None:
    """ConfigError for a key set twice in one mapping under `node`, naming its dotted key and both lines."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            dotted = f"{where}.{name}" if where and name is not None else (name or where)
            if name is not None:
                line = key.start_mark.line + 1
                if name in first:
                    raise ConfigError(
                        f"line {line}: duplicate key {_shown(dotted)} (first at line {first[name]}); "
                        f"YAML would silently keep the last, so set it once",
                        key=dotted,
                    )
                first[name] = line
            _check_duplicate_keys(value, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{where}[{i}]")


def _yaml_fault(e: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error in `text`: what is wrong and where (PyYAML's own text spans lines)."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow, by its offset
        line = text.count("\n", 0, e.position) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)  # libyaml: int; PyYAML: str
        return f"line {line}: character U+{code:04X} is not allowed in YAML ({e.reason})"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    what = " ".join(": ".join(str(p) for p in parts if p).split()) or " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def _warn_long_warmup(cfg: Config) -> None:
    """A warning per run (each stage of a recipe) whose warm-up is not shorter than the run: its LR only
    climbs towards optim.lr (schedule.WarmupCosineLR stays in warm-up) and never decays. Legal, e.g. in
    a smoke test, but in a short fine-tune that inherits a long recipe's warm-up it is a mistake."""
    if cfg.stages:
        runs = [
            (
                f"stages[{i}].",
                _inherited(s.schedule.warmup_epochs, cfg.schedule.warmup_epochs),
                _inherited(s.train.epochs, cfg.train.epochs),
            )
            for i, s in enumerate(cfg.stages)
        ]
    else:
        runs = [("", cfg.schedule.warmup_epochs, cfg.train.epochs)]
    for where, warmup, epochs in runs:
        if warmup >= epochs:
            log.warning(
                "%sschedule.warmup_epochs=%g is not shorter than %strain.epochs=%d: the whole run is "
                "warm-up, the LR never reaches optim.lr's peak nor decays",
                where,
                warmup,
                where,
                epochs,
            )


def _inherited(stage_value: Any, top_value: Any) -> Any:
    return top_value if stage_value is INHERIT else stage_value


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


def schema_table(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, valid values) of every setting, sections walked into: what
    `swinv2 train --list-keys` prints. Defaults are written as in a recipe (JSON is YAML)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += schema_table(cast(type, tp), key + ".")
            continue
        if f.name == "stages":
            rows.append(
                (
                    key,
                    "a list of stages",
                    "[]",
                    "each: name, init_from and any keys above (stages.N.KEY; see docs/training.md)",
                )
            )
            continue
        default = cast("Callable[[], Any]", f.default_factory)() if f.default is dataclasses.MISSING else f.default
        rng = f.metadata.get("range")
        rows.append((key, _type_name(tp), json.dumps(_to_plain(default)), str(rng) if rng else ""))
    return rows


def schema_text() -> str:
    """schema_table() as aligned columns under a header."""
    rows = [("KEY", "TYPE", "DEFAULT", "VALID")] + schema_table()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {v}".rstrip() + "\n" for k, t, d, v in rows)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: dict[str, Any] | list[Any] = d
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
    if len(key) > 200:  # no key is near it, and difflib takes seconds per 100 KB
        return ""
    all_keys = schema_keys()
    close = difflib.get_close_matches(key, list(valid) + all_keys, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys if k.rsplit(".", 1)[-1] == last][:1] or [
            k for k in all_keys if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.75)
        ][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- typed building


def _build(cls: type, d: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from the mapping `d`, checking every key and value type."""
    where = prefix.rstrip(".") or "the config"
    if d is None:
        d = {}
    if not isinstance(d, dict):
        reason = f"expected a mapping of keys, got {_shown(d)}"
        raise ConfigError(f"{where}: {reason}", key=prefix.rstrip(".") or None, reason=reason)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in d:
        if key not in names:
            full = f"{prefix}{key}"
            raise ConfigError(f"unknown key {_shown(full)}{_suggest(full, [prefix + n for n in names])}", key=full)
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
        return f"a mapping ({cast(type, tp).__name__})"
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
            if len(value) > MAX_LIST:
                reason = f"a list of {len(value)} entries; at most {MAX_LIST} are accepted"
                raise ConfigError(f"{key}: {reason}", key=key, reason=reason)
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, tp, value)
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return _build(cast(type, tp), value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond 1.8e308
                reason = f"{_shown(value)} is too large (a float holds up to 1.8e308)"
                raise ConfigError(f"{key}: {reason}", key=key, reason=reason) from None
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
    reason = f"expected {_type_name(tp)}, got {_shown(value)} ({type(value).__name__})"
    return ConfigError(f"{key}: {reason}", key=key, reason=reason)


def _check_ranges(obj: Any, prefix: str = "") -> None:
    """ConfigError for the first field of schema dataclass `obj` (walked into, stages too) that is
    outside its declared Range, e.g. `data.batch_size=0: must be >= 1`."""
    for f in fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_ranges(item, f"{key}[{i}].")
        elif "range" in f.metadata and value is not None and value is not INHERIT and not isinstance(value, str):
            reason = f.metadata["range"].violation(value)  # a str is a word the type allows (workers: auto)
            if reason is not None:
                shown = _shown(list(value) if isinstance(value, tuple) else value)
                raise ConfigError(f"{key}={shown}: {reason}", key=key, reason=reason)


def check_task(cfg: Config) -> None:
    """ConfigError for settings that contradict `train.task`. Checked on the finished config (the end of
    `load_config`, each stage of a recipe, the trainer), not per override: `train.task=simmim
    train.best_metric=val_loss` must not fail half-way. The geometry of the masks needs the model and
    is checked where it is built (`simmim.check_geometry`)."""
    t, s = cfg.train, cfg.simmim
    if t.task == "simmim":
        if t.best_metric not in ("val_loss", "val_ema_loss"):
            reason = "pretraining has no labels, so no accuracy: use val_loss (or val_ema_loss)"
            raise ConfigError(
                f"train.best_metric={t.best_metric} with train.task=simmim: {reason}",
                key="train.best_metric",
                reason=reason,
            )
        if cfg.optim.layer_decay is not None:
            reason = "layer-wise LR decay is SimMIM's fine-tuning rule; pretraining trains every layer at one LR"
            raise ConfigError(
                f"optim.layer_decay={cfg.optim.layer_decay} with train.task=simmim: {reason}",
                key="optim.layer_decay",
                reason=reason,
            )
    if s.norm_target_patch_size is not None and s.norm_target_patch_size % 2 == 0:
        reason = "must be odd (a window centred on each pixel)"
        raise ConfigError(
            f"simmim.norm_target_patch_size={s.norm_target_patch_size}: {reason}",
            key="simmim.norm_target_patch_size",
            reason=reason,
        )


# Keys a resume may change without `allow_config_change`: where the data lives and how the run is
# driven and logged, not what it computes. (train.epochs extends or shortens the run.)
RESUME_MAY_CHANGE = (
    "data.root",
    "data.val_root",
    "data.workers",
    "data.persistent_workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "train.epochs",
    "train.progress",
    "train.tensorboard",
    "train.log_every",
    "train.threads",
    "train.checkpoint_every",
    "train.eval_every",
    "train.device",
)


def config_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every leaf that differs. Keys only one side has
    (a checkpoint written before the schema gained or lost a field) are not changes."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) & set(now)):
        a, b = saved[key], now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            changes |= config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def check_resume_config(saved: dict[str, Any] | None, cfg: Config, source: Path, *, allowed: bool) -> None:
    """A run resumed from `source`, whose config was `saved` (None: not recorded), with `cfg`: log how they
    differ; ConfigError listing the changes if any is outside RESUME_MAY_CHANGE, unless `allowed`."""
    if saved is None:
        return
    changes = config_changes(saved, cfg.to_dict())
    if not changes:
        return
    listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    altering = [k for k in changes if k not in RESUME_MAY_CHANGE]
    if altering and not allowed:
        raise ConfigError(
            f"{source}: resuming with a config that changes the run ({listed}); train with "
            f"--allow-config-change to resume with it anyway, or into another --out"
        )
    log.warning("resuming %s with a changed config: %s", source, listed)


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
