"""`fit(cfg, out_dir)`: the official SwinV2 training recipe, resumable exactly, on 1..N processes.

One optimizer step = `optim.accum_steps` micro-batches of `data.batch_size` images on each rank:
timm augmentation and Mixup/CutMix, autocast (bf16, or fp16 with a dynamic loss scaler), backward
(DDP all-reduces gradients), global-norm clipping, a finiteness check, AdamW, the per-step LR and
the EMA update. Every epoch: evaluation of the model (and the EMA), one metrics row, a checkpoint.

Exact resume: all randomness is derived from numbers the training state holds. Data order and
each sample's augmentation come from (seed, epoch, sample index) (see `datasets.ShardedSampler`); the
per-step randomness (Mixup/CutMix, stochastic depth) from (seed, step, rank), reseeded before
every step. So no generator state needs saving, and the training state is the model, EMA,
optimizer, scheduler, scaler, progress (epoch, step in epoch, global step), sampler position,
metric history, best-k list, class map and resolved config (`STATE`, one row per part). A run killed
at any point and started again with the same command continues bit-identically (on CPU) from its
last checkpoint.

The loop is the same for every `train.task`; what a task decides (the data, the module trained, the
loss, the validation metrics, the weights file, the picture per epoch) the trainer asks of its
`tasks.Task`: classification, or SimMIM masked-image pretraining without labels.

Faults (docs/reliability.md): SIGTERM/SIGINT save a checkpoint at the next step boundary and raise
`TrainingInterrupted` (exit 143/130); a non-finite loss or gradient skips the step (weights, EMA
and optimizer untouched), `train.max_bad_steps` in a row raise `NonFiniteError`; no checkpoint
holding a non-finite tensor is ever written; unreadable images are dropped from their batch and
listed once per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
from torch import nn

from ..config import Config, check_resume_config, check_task
from ..errors import ConfigError, DataError, InputError
from ..hardware import DTYPES, warn_if_bf16_emulated
from ..images import eval_pipeline
from ..model.transformer import SwinTransformerV2
from ..preprocess import EvalPreprocess
from ..weights.factory import create_model
from ..weights.registry import get_variant
from ..weights.training_state import TRAINING_STATE_FORMAT as STATE_FORMAT  # the one tag of a training state
from . import distributed as D
from . import schedule, sources
from .datasets import (
    Batch,
    DataReport,
    Samples,
    SeededSamples,
    ShardedSampler,
    build_digits_folder,
    check_dataset,
    check_samples,
    checked,
    empty_batch,
    hygiene_warnings,
    make_loader,
    sample_seed,
    seed_everything,
)
from .faults import NonFiniteError, StopSignals, TrainingInterrupted, assert_finite, check_fits
from .rundir import RunDir, RunFolderError, RunLockedError  # noqa: F401 (raised by fit)
from .tasks import Task, task_for

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from .datasets import Sample
    from .tasks import TrainedModule

log = logging.getLogger(__name__)

STATE_VERSION = 1


class Progress(TypedDict):
    """Where the run is (`Trainer.progress`, saved as the training state's "progress")."""

    epoch: int
    step_in_epoch: int
    global_step: int
    bad_steps: int
    consecutive_bad: int
    overflow_steps: int
    epoch_loss_sum: float
    epoch_loss_steps: int
    epoch_bad_files: dict[str, str]  # path -> reason, of the epoch's unreadable training images


class BadDataError(DataError):
    """`data.strict`: unreadable images were found before training; the message lists them."""


# --------------------------------------------------------------------------- building blocks


def build_model(cfg: Config, num_classes: int) -> SwinTransformerV2:
    """The configured variant with `num_classes` outputs (0: none, as a SimMIM encoder), init weights
    loaded, patterns frozen. The trainer trains the task's module around it (`Task.wrap`)."""
    m = cfg.model
    model = create_model(
        m.name,
        num_classes=num_classes,
        img_size=m.img_size,
        window_size=m.window_size,
        pretrained_window_sizes=m.pretrained_window_sizes,
        drop_path_rate=m.drop_path_rate,
        weights=m.weights,
        pretrained=m.pretrained,
        strict=m.weights_strict,
    )
    freeze(model, m.freeze)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.sequential_attention:
        model.set_sequential_attention(True)
    return model


def freeze(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """requires_grad=False for parameters whose name matches an fnmatch pattern; returns their names.
    A pattern matching nothing is an error (a typo would otherwise silently train everything)."""
    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"model.freeze: pattern {pat!r} matches no parameter (e.g. {names[0]!r})")
        frozen += hits
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return sorted(set(frozen))


def data_roots(cfg: Config, task: Task, env: D.DistEnv | None = None) -> tuple[Path, Path | None]:
    """(train folder, val folder or None) of the config, as `task` lays them out (`Task.data_roots`); the
    digits demo folder is built first if asked."""
    d = cfg.data
    if not d.root:
        raise ConfigError("data.root is not set (the folder holding train/ and val/ class folders)")
    root = Path(d.root)
    if d.source == "digits":
        if env is None or env.is_main:
            build_digits_folder(root, img_size=cfg.model.img_size or get_variant(cfg.model.name).config.img_size[0])
        if env is not None:
            D.barrier(env)
    return task.data_roots(root)


def check_data(cfg: Config) -> DataReport:
    """`swinv2 train --check-data`: decode every image of the configured data and report (shards: each
    checked against its manifest first)."""
    task = task_for(cfg)
    workers = max(cast(int, cfg.data.workers), 1)  # "auto": resolved by DataConfig
    if cfg.data.source in ("list", "shards", "hf"):
        return check_samples(*open_datasets(cfg, task), workers=workers)
    train_root, val_root = data_roots(cfg, task)
    return check_dataset(
        train_root,
        val_root if val_root is not None and val_root.is_dir() else None,
        workers=workers,
        labels=task.labelled,
    )


def open_datasets(cfg: Config, task: Task, env: D.DistEnv | None = None) -> tuple[Samples, Samples | None]:
    """The train and val `Samples` of `data.source` (see `sources`)."""
    if not cfg.data.root:
        raise ConfigError("data.root is not set (the folder holding train/ and val/ class folders)")
    if cfg.data.source == "shards":
        return sources.shard_sets(cfg.data, task)
    if cfg.data.source == "list":
        return sources.list_files(cfg.data, task)
    if cfg.data.source == "hf":
        return sources.hf_files(cfg.data, task)
    train_root, val_root = data_roots(cfg, task, env)
    train, val = task.datasets(train_root, val_root)
    if val is None and val_root is not None:
        log.warning("no validation folder at %s: training without evaluation", val_root)
    return train, val


def prepare_data(cfg: Config, env: D.DistEnv, task: Task) -> tuple[Samples, Samples | None]:
    """The train and val datasets of `task`, hygiene reported; in strict mode every image decoded first."""
    if cfg.data.source == "digits":  # built (by rank 0) before anything reads it
        data_roots(cfg, task, env)
    if cfg.data.strict:  # rank 0 decodes every image; every rank learns the verdict
        problem = None
        if env.is_main:
            report = check_data(cfg)
            bad = [f"{p}: {r}" for items in report.bad.values() for p, r in items]
            problem = f"data.strict: {len(bad)} unreadable images: " + "; ".join(bad) if bad else None
        problem = D.broadcast_object(problem, env)
        if problem:
            raise BadDataError(problem)
    train, val = open_datasets(cfg, task, env)
    if env.is_main:
        for w in hygiene_warnings(train, val):
            log.warning("%s", w)
    return train, val


def eval_preprocess(cfg: Config, model: TrainedModule) -> EvalPreprocess:
    d = cfg.data
    crop = d.crop_pct if d.crop_pct is not None else get_variant(cfg.model.name).preprocess.crop_pct
    return EvalPreprocess(
        model.config.img_size[0],
        crop,
        d.interpolation,
        cast("tuple[float, float, float]", tuple(d.mean)),
        cast("tuple[float, float, float]", tuple(d.std)),
    )


def check_run(cfg: Config, env: D.DistEnv, task: Task) -> torch.dtype | None:
    """Refuse settings this machine or process group cannot train (ConfigError); warn of slow ones.
    Returns the autocast dtype (None: fp32)."""
    t = cfg.train
    if t.amp == "fp16" and env.device.type != "cuda":
        log.warning(
            "train.amp=fp16 on the CPU is slow (it exists for testing the loss scaler); "
            "use train.amp=none, or bf16 on a CPU with AVX-512 BF16 or AMX"
        )
    if t.amp == "bf16":
        warn_if_bf16_emulated(env.device, "train.amp=bf16")
    if t.parallel == "fsdp" and t.ema and env.distributed:
        raise ConfigError(
            "train.ema is not supported with train.parallel=fsdp (the EMA would need its own "
            "sharding); use ddp, or turn the EMA off"
        )
    task.check_parallel(t.parallel, env.distributed)
    return None if t.amp == "none" else DTYPES[t.amp]


# --------------------------------------------------------------------------- the training state


@dataclasses.dataclass(frozen=True)
class Part:
    """One entry of the training state: how the trainer writes it (`save`), what a resume checks before
    anything is loaded (`check`) and how it restores it (`load`; None: written for the file's readers).
    `check` and `load` take the whole state and the file it came from."""

    key: str
    save: Callable[[Trainer], Any]
    load: Callable[[Trainer, dict[str, Any], Path], None] | None = None
    check: Callable[[Trainer, dict[str, Any], Path], None] | None = None
    finite: bool = False  # tensors no checkpoint may hold non-finite


def _check_format(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    if state.get("format") != STATE_FORMAT:
        raise InputError(f"{source}: not a swinv2 training state (no '{STATE_FORMAT}' format tag)")


def _check_classes(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    if state["classes"] != list(tr.classes):
        raise InputError(
            f"{source}: trained on classes {state['classes'][:5]}... but the data now has "
            f"{tr.classes[:5]}...: the class map changed"
        )


def _check_data(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    """Shards name their data by the manifest's hash: a resume on other shards is refused."""
    saved, now = state.get("data"), tr.train_ds.fingerprint()
    if saved is not None and now is not None and saved != now:
        raise InputError(
            f"{source}: trained on data with manifest {saved[:12]}, {tr.train_ds.root} now has {now[:12]}: "
            f"the shards changed, an exact resume is impossible (--start-over to begin again)"
        )


def _load_model(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    check_fits(tr.model.state_dict(), state["model"], f"{source} (model)")  # another model fails here
    D.load_full_model_state(tr.model, state["model"], tr.env)


def _load_ema(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    if tr.ema is None:
        return
    if state["ema"] is None:
        log.warning("%s holds no EMA; the EMA restarts from the current weights", source)
        tr.ema.module.load_state_dict(tr.model.state_dict())
    else:
        check_fits(tr.model.state_dict(), state["ema"], f"{source} (EMA)")
        tr.ema.module.load_state_dict(state["ema"])


def _load_optimizer(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    try:
        D.load_full_optimizer_state(tr.model, tr.optimizer, state["optimizer"], tr.env)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. another set of frozen parameters
        raise InputError(
            f"{source}: the optimizer state does not fit this run (were other parameters "
            f"frozen?): {str(e).splitlines()[0]}"
        ) from None


def _load_scaler(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    if tr.scaler is None:
        return
    if state["scaler"] is None:
        log.warning("%s holds no loss-scaler state; the fp16 scaler starts fresh", source)
    else:
        tr.scaler.load_state_dict(state["scaler"])


def _load_sampler(tr: Trainer, state: dict[str, Any], source: Path) -> None:
    """The sampler's position, which must be where the (already loaded) progress says."""
    saved_world = state.get("world_size", 1)
    if saved_world != tr.env.world_size:
        log.warning(
            "%s was written by %d processes, resuming on %d: data order continues, per-rank randomness differs",
            source,
            saved_world,
            tr.env.world_size,
        )
    tr.sampler.load_state_dict(state["sampler"])
    expected = (tr.progress["epoch"], tr.progress["step_in_epoch"] * tr.sampler.batch_size)
    if (tr.sampler.epoch, tr.sampler.start) != expected:
        raise InputError(
            f"{source}: sampler position {state['sampler']} does not match the progress "
            f"{tr.progress} (a different batch size, accumulation or number of processes?)"
        )


def _rows(key: str) -> Part:
    """A list of dict rows (metric history, best-k) held as the trainer's attribute `key`, copied both ways."""
    return Part(
        key,
        lambda tr: [dict(r) for r in getattr(tr, key)],
        lambda tr, state, _: setattr(tr, key, [dict(r) for r in state[key]]),
    )


# The training state, in the order of the file's keys. Tensors and plain Python data only (it loads
# weights_only); a resume runs every check, then every load, in this order.
STATE: tuple[Part, ...] = (
    Part("format", lambda tr: STATE_FORMAT, check=_check_format),
    Part("version", lambda tr: STATE_VERSION),
    Part("model", lambda tr: D.full_model_state(tr.model, tr.env), _load_model, finite=True),
    Part("ema", lambda tr: tr.ema.module.state_dict() if tr.ema is not None else None, _load_ema, finite=True),
    Part("optimizer", lambda tr: D.full_optimizer_state(tr.model, tr.optimizer, tr.env), _load_optimizer, finite=True),
    Part(
        "scheduler",
        lambda tr: tr.scheduler.state_dict(),
        lambda tr, state, _: tr.scheduler.load_state_dict(state["scheduler"]),
    ),
    Part("scaler", lambda tr: tr.scaler.state_dict() if tr.scaler is not None else None, _load_scaler, finite=True),
    Part(
        "progress", lambda tr: dict(tr.progress), lambda tr, state, _: setattr(tr, "progress", dict(state["progress"]))
    ),
    Part(
        "sampler",
        lambda tr: tr.sampler.state_dict(consumed=tr.progress["step_in_epoch"] * tr.sampler.batch_size),
        _load_sampler,
    ),
    _rows("history"),
    _rows("best"),
    Part("classes", lambda tr: list(tr.classes), check=_check_classes),
    Part("preprocess", lambda tr: dataclasses.asdict(tr.preprocess)),
    Part("model_name", lambda tr: tr.cfg.model.name),
    Part("model_config", lambda tr: tr.model.config.to_dict()),
    Part("config", lambda tr: tr.cfg.to_dict()),
    Part("world_size", lambda tr: tr.env.world_size),  # read by the sampler's load
    Part("data", lambda tr: tr.train_ds.fingerprint(), check=_check_data),  # shards: the manifest's SHA-256
)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything a run holds, built from the config; `run()` trains to the end or to a signal."""

    # Declared here for the `STATE` parts above, which read them before mypy sees `_build`.
    env: D.DistEnv
    cfg: Config
    classes: list[str]
    train_ds: Samples
    val_ds: Samples | None
    model: TrainedModule
    preprocess: EvalPreprocess
    ema: ModelEmaV3 | None
    optimizer: torch.optim.AdamW
    scheduler: schedule.WarmupCosineLR
    scaler: torch.amp.GradScaler | None
    sampler: ShardedSampler
    progress: Progress

    def __init__(self, cfg: Config, out_dir: Path, env: D.DistEnv) -> None:
        self.env, self.out = env, out_dir
        check_task(cfg)
        self.task = task_for(cfg)
        get_variant(cfg.model.name)  # an unknown model name fails before any data is scanned
        self.amp_dtype = check_run(cfg, env, self.task)
        # The run directory is claimed and locked before minutes of set-up, and a start refused later
        # removes what it created there.
        self.rundir = RunDir(out_dir, env, cfg)
        try:
            self._build(cfg, env)
        except BaseException:
            self.rundir.close(refused=True)
            raise

    def _build(self, cfg: Config, env: D.DistEnv) -> None:
        t = cfg.train
        self.train_ds, self.val_ds = prepare_data(cfg, env, self.task)
        self.classes = self.train_ds.classes
        cfg, num_classes = self.task.resolve(cfg, self.classes)
        self.cfg = cfg

        seed_everything(t.seed)  # model init: identical on every rank and every run
        self.model = self.task.wrap(build_model(cfg, num_classes)).to(env.device)
        self.task.bind(self.model.config, num_classes, env, self.amp_dtype)
        self.preprocess = eval_preprocess(cfg, self.model)
        self.ema = None
        if t.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=t.ema_decay, use_warmup=t.ema_warmup)
        # Wrapped before the optimizer is built: FSDP replaces the parameters by sharded ones.
        self.wrapped = D.wrap_model(self.model, env, t.parallel)
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self._build_loaders(cfg, env, self.model.config.img_size[0])
        self.total_batch = cfg.data.batch_size * self.accum * env.world_size
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.optimizer, self.scheduler = schedule.build(
            self.model,
            cfg.optim,
            cfg.schedule,
            total_batch=self.total_batch,
            steps_per_epoch=self.steps_per_epoch,
            epochs=t.epochs,
        )
        self.scaler = torch.amp.GradScaler(env.device.type) if t.amp == "fp16" else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.progress = {
            "epoch": 0,
            "step_in_epoch": 0,
            "global_step": 0,
            "bad_steps": 0,
            "consecutive_bad": 0,
            "overflow_steps": 0,
            "epoch_loss_sum": 0.0,
            "epoch_loss_steps": 0,
            "epoch_bad_files": {},
        }
        self.history: list[dict[str, Any]] = []
        self.best: list[dict[str, Any]] = []

    def _build_loaders(self, cfg: Config, env: D.DistEnv, img_size: int) -> None:
        """Per-rank loaders (one sampler "batch" = the images of one optimizer step on this rank)."""
        d = cfg.data
        self.accum = cfg.optim.accum_steps
        self.sampler = ShardedSampler(
            len(self.train_ds),
            batch_size=d.batch_size * self.accum,
            num_replicas=env.world_size,
            rank=env.rank,
            seed=cfg.train.seed,
            groups=self.train_ds.groups(),
            block=d.shuffle_shards,
            drop_last=d.drop_last,
        )
        pin = d.pin_memory and env.device.type == "cuda"
        self.train_loader = make_loader(
            SeededSamples(self.train_ds, self.task.train_transform(img_size)),
            self.sampler,
            batch_size=d.batch_size,
            workers=cast(int, d.workers),
            pin_memory=pin,  # "auto": resolved
            persistent_workers=d.persistent_workers,
        )
        self.val_loader: DataLoader[Sample] | None = None
        if self.val_ds is not None:
            val_sampler = ShardedSampler(
                len(self.val_ds), num_replicas=env.world_size, rank=env.rank, shuffle=False, drop_last=False
            )
            self.val_loader = make_loader(
                SeededSamples(self.val_ds, eval_pipeline(self.preprocess)),
                val_sampler,
                batch_size=d.eval_batch_size or 2 * d.batch_size,
                workers=cast(int, d.workers),  # "auto": resolved by DataConfig
                pin_memory=pin,
                persistent_workers=d.persistent_workers,
            )

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The whole training state (`STATE`): tensors and plain Python data only (loads weights_only)."""
        return {part.key: part.save(self) for part in STATE}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Restore `state` (read from `source`): what must match is checked before anything is loaded."""
        for part in STATE:
            if part.check is not None:
                part.check(self, state, source)
        for part in STATE:
            if part.load is not None:
                part.load(self, state, source)

    def save(self, state: dict[str, Any] | None = None) -> Path:
        """Checkpoint to checkpoints/last.pt (rank 0 writes; every rank takes part in gathering)."""
        path = self.rundir.write_last(self.checked_state() if state is None else state)
        D.barrier(self.env)
        return path

    def checked_state(self) -> dict[str, Any]:
        """`state_dict()` after checking that no saved tensor is non-finite."""
        state = self.state_dict()
        if self.env.is_main:
            assert_finite({part.key: state[part.key] for part in STATE if part.finite})
        return state

    # ----------------------------------------------------------------------- one step

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """Forward/backward over the micro-batches, then clip, check and step; returns the step's
        stats. The loss is the mean over every rank's images; a step is skipped on all ranks alike."""
        t, env = self.cfg.train, self.env
        step = self.progress["global_step"]
        seed_everything(sample_seed(t.seed, step, env.rank, 1))  # Mixup/CutMix, stochastic depth
        self.wrapped.train()
        loss_mean, n = self._forward_backward(micro_batches)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_grad
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip else math.inf))
        bad = not math.isfinite(loss_mean) or (self.scaler is None and not math.isfinite(grad_norm))
        stepped = self._skip_step(step, loss_mean, grad_norm, n) if bad else self._optimizer_step(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        if stepped and self.ema is not None:
            self.ema.update(self.model, step=step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.progress["global_step"] += 1
        self.progress["step_in_epoch"] += 1
        if self.progress["consecutive_bad"] >= t.max_bad_steps:
            raise NonFiniteError(
                f"{self.progress['consecutive_bad']} consecutive steps with a non-finite loss or gradient "
                f"(last at step {step}); stopping. Lower optim.lr, set optim.clip_grad, or use train.amp=bf16; "
                f"the last checkpoint is in {self.rundir.checkpoint_dir}"
            )
        return {"loss": loss_mean, "grad_norm": grad_norm, "lr": lr, "n": n, "skipped": bad}

    def _forward_backward(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """Accumulate the gradients of the micro-batches (DDP syncs on the last one); returns the loss
        mean over every rank's images and their number (all-reduced)."""
        t, env = self.cfg.train, self.env
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        n_sum = 0
        for i, batch in enumerate(micro_batches):
            x, y = self.task.even_out(batch.images, batch.labels)
            empty = len(y) == 0  # every file of this micro-batch was unreadable
            if empty:  # a rank still takes part in the gradient all-reduce, with zero weight
                x = torch.zeros(1, 3, *self.model.config.img_size)
            x = x.to(env.device, non_blocking=True)
            y = y.to(env.device, non_blocking=True)
            if not empty:
                x, y = self.task.mix(x, y)
            sync = i == len(micro_batches) - 1 or not env.distributed or t.parallel != "ddp"
            with contextlib.nullcontext() if sync else cast("DistributedDataParallel", self.wrapped).no_sync():
                with torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.task.loss(self.forward, x, y, batch.indices, empty, self.progress["epoch"])
                scaled = loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().double() * len(y)
            n_sum += len(y)
        stats = torch.tensor([0.0, float(n_sum)], dtype=torch.float64, device=env.device)
        stats[0] = loss_sum
        D.all_reduce_sum(stats, env)
        loss_mean = (stats[0] / stats[1]).item() if stats[1] > 0 else float("nan")
        return loss_mean, float(stats[1])

    def _skip_step(self, step: int, loss_mean: float, grad_norm: float, n: float) -> bool:
        """Count and log a step with a non-finite loss or gradient (or no image on any rank); no update."""
        self.progress["bad_steps"] += 1
        self.progress["consecutive_bad"] += 1
        what = (
            "no readable image on any rank"
            if n == 0
            else "non-finite loss"
            if not math.isfinite(loss_mean)
            else "non-finite gradient"
        )
        log.warning(
            "step %d: %s (loss %s, grad norm %s): step skipped (%d in a row)",
            step,
            what,
            loss_mean,
            grad_norm,
            self.progress["consecutive_bad"],
        )
        if self.scaler is not None:
            self.scaler.update()  # back off the scale as for an overflow
        return False

    def _optimizer_step(self, grad_norm: float) -> bool:
        """Update the weights; returns whether they changed (the fp16 scaler skips overflowed steps)."""
        self.progress["consecutive_bad"] = 0
        if self.scaler is None:
            self.optimizer.step()
            return True
        stepped = math.isfinite(grad_norm)  # the scaler skips overflowed steps itself
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not stepped:
            self.progress["overflow_steps"] += 1
        return stepped

    # ----------------------------------------------------------------------- epochs

    def train_epoch(self, epoch: int, stop: StopSignals) -> dict[str, float]:
        """The remaining steps of `epoch`; returns the mean loss and throughput of the steps run."""
        start_step = self.progress["step_in_epoch"]
        self.sampler.set_epoch(epoch, start_step * self.sampler.batch_size)
        bar = self.rundir.progress_bar(self.steps_per_epoch, start_step, f"epoch {epoch + 1}/{self.cfg.train.epochs}")
        if start_step == 0:  # per-epoch tallies live in the progress: a resumed epoch reports all its steps
            self.progress.update({"epoch_loss_sum": 0.0, "epoch_loss_steps": 0, "epoch_bad_files": {}})
        images, t0 = 0.0, time.perf_counter()
        it: Iterator[Batch] = iter(self.train_loader) if start_step < self.steps_per_epoch else iter(())
        try:
            for step in range(start_step, self.steps_per_epoch):
                micro = [self._next_batch(it, step) for _ in range(self.accum)]
                for b in micro:
                    self.progress["epoch_bad_files"].update(dict(b.bad))
                out = self.train_step(micro)
                if math.isfinite(out["loss"]):
                    self.progress["epoch_loss_sum"] += out["loss"]
                    self.progress["epoch_loss_steps"] += 1
                images += out["n"]
                rate = images / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)  # after set_postfix: a line logged here (stderr not a tty) shows this step's values
                self._after_step(epoch, out, stop)
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        n_bad = self.rundir.report_bad_files(epoch, "train", self.progress["epoch_bad_files"])
        loss_sum, steps = self.progress["epoch_loss_sum"], self.progress["epoch_loss_steps"]
        return {
            "train_loss": loss_sum / steps if steps else float("nan"),
            "img_per_s": images / max(elapsed, 1e-9),
            "train_time_s": elapsed,
            "bad_images": n_bad,
        }

    def _after_step(self, epoch: int, out: dict[str, float], stop: StopSignals) -> None:
        """At a step boundary: the step log line, and a checkpoint when one is due or a signal asks to stop."""
        gs = self.progress["global_step"]
        if gs % self.cfg.train.log_every == 0:
            self.rundir.log_step(
                {
                    "step": gs,
                    "epoch": epoch + 1,
                    "loss": out["loss"],
                    "lr": out["lr"],
                    "grad_norm": out["grad_norm"],
                    "skipped": out["skipped"],
                }
            )
        if D.any_rank(stop.signum is not None, self.env):  # at this step boundary, on every rank
            path = self.save()
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, path)
        every = self.cfg.train.checkpoint_every
        if every and gs % every == 0:
            self.save()

    def plain_model(self) -> nn.Module:
        """The model as an ordinary module: itself, or under FSDP an unsharded copy gathered on every
        rank (for evaluation on each rank's shard of the val set, and for the weights file)."""
        if not D.is_fsdp(self.model):
            return self.model
        plain = SwinTransformerV2(self.model.config).to(self.env.device)
        plain.load_state_dict(D.full_model_state(self.model, self.env, everywhere=True))
        return plain

    def _next_batch(self, it: Iterator[Batch], step: int) -> Batch:
        """The next micro-batch; in the short last step of an epoch without drop_last, an empty one where
        this rank has no samples left (it still takes part in the step, with zero weight)."""
        try:
            return checked(next(it))
        except StopIteration:
            if self.sampler.drop_last or step != self.steps_per_epoch - 1:
                raise
            return empty_batch()

    def validate(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """The task's metrics (`Task.validate`) of the model (and the EMA) on the whole val set, reduced
        over ranks."""
        bad: dict[str, str] = {}
        val_loader = self.val_loader
        assert val_loader is not None  # called (by end_epoch) only where there is validation data

        def batches() -> Iterator[Batch]:
            for b in val_loader:
                bad.update(dict(checked(b).bad))
                yield b

        # A plain module (not the DDP/FSDP wrapper): each rank evaluates its own shard with no
        # collective inside the forward, so uneven shards are fine; the sums are reduced after.
        out = self.task.validate(model, batches(), "val")
        if self.ema is not None:
            ema = self.task.validate(self.ema.module, val_loader, "val_ema")
            out |= {k: v for k, v in ema.items() if k != "val_ema_n"}
        n_bad = self.rundir.report_bad_files(epoch, "val", bad)
        if n_bad:
            out["val_bad_images"] = n_bad
        return out

    def end_epoch(self, epoch: int, train_stats: dict[str, float], epoch_start: float) -> dict[str, Any]:
        """Evaluate, record the metrics row, keep the best-k, checkpoint (the epoch's commit point)."""
        t = self.cfg.train
        evaluated = self.val_loader is not None and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.progress["global_step"],
            "lr": self.optimizer.param_groups[0]["lr"],
            **train_stats,
        }
        if evaluated:
            plain = self.plain_model()
            row |= self.validate(epoch, plain)
        row |= {"epoch_time_s": time.perf_counter() - epoch_start, "skipped_steps": self.progress["bad_steps"]}
        self.history.append(row)
        if evaluated and self.env.is_main and self.val_ds is not None:
            self.task.picture(plain, self.val_ds, self.preprocess, row, self.out)
        self.progress.update({"epoch": epoch + 1, "step_in_epoch": 0})
        self.sampler.set_epoch(epoch + 1, 0)
        new_best = self._rank_best(row) if evaluated else None
        state = self.checked_state()
        self._write_weights(new_best, state, plain if evaluated else None)
        self.save(state)
        self.rundir.prune_best(self.best)
        self.rundir.epoch_done(self.history)
        return row

    def _write_weights(self, new_best: dict[str, Any] | None, state: dict[str, Any], plain: nn.Module | None) -> None:
        """A new best-k entry's checkpoint (and best.safetensors for the leader); without validation,
        best.safetensors holds the latest weights."""
        names = (self.classes, self.preprocess, self.cfg.model.name)
        if new_best is not None:
            assert plain is not None  # a new best comes of an evaluation, whose model end_epoch passes
            # Ranked on an EMA metric only where the EMA was validated (else _rank_best refused the metric).
            best_model = (
                cast("ModelEmaV3", self.ema).module if self.cfg.train.best_metric.startswith("val_ema_") else plain
            )
            self.rundir.write_best(
                new_best, state, self.task.weights_model(best_model), *names, top=new_best is self.best[0]
            )
        elif self.val_loader is None:
            self.rundir.write_weights(self.task.weights_model(self.plain_model()), *names)

    def _rank_best(self, row: dict[str, Any]) -> dict[str, Any] | None:
        metric = self.cfg.train.best_metric
        if metric not in row:
            raise ConfigError(f"train.best_metric={metric} but the run has no such metric (is train.ema on?)")
        entry = {"epoch": row["epoch"], "metric": float(row[metric]), "file": f"best_epoch{row['epoch']:04d}.pt"}
        lower = metric.endswith("_loss")  # losses rank lowest first, accuracies highest first; NaN last

        def rank(b: dict[str, Any]) -> tuple[float, int]:
            m = b["metric"]
            return (math.inf if math.isnan(m) else (m if lower else -m)), b["epoch"]

        ranked = sorted(self.best + [entry], key=rank)
        kept = ranked[: self.cfg.train.keep_best]
        if entry not in kept:
            return None
        self.best = kept
        return entry

    # ----------------------------------------------------------------------- the run

    def resume(
        self, explicit: str | Path | None, *, allow_config_change: bool = False, start_over: bool = False
    ) -> None:
        """Load `explicit` (errors are fatal) or the furthest valid checkpoint of the run directory;
        a config that differs from the checkpoint's in keys that change the run needs
        `allow_config_change`. An `explicit` checkpoint from elsewhere into a directory that holds a run
        is refused unless `start_over`, which replaces the run that was there (a fresh start too).
        Then the run starts: config.yaml, and the files the run owes."""
        from ..weights.training_state import load_training_state

        if explicit and not start_over:
            self._refuse_replacing_a_run(Path(explicit))
        path = Path(explicit) if explicit else None if start_over else self.rundir.find_resumable()
        if path is not None:
            state = load_training_state(path)
            self.load_state_dict(state, path)  # a checkpoint of another model fails here, listing its keys
            check_resume_config(state.get("config"), self.cfg, path, allowed=allow_config_change)
        if start_over:
            self.rundir.clear(keep=path)
        self.rundir.begin(self.cfg)
        if path is None:
            return
        self.rundir.resumed(self.history, self.best, self.progress["global_step"])
        self.restore_weights_file()
        p = self.progress
        log.info(
            "resumed from %s: epoch %d, step %d of %d in the epoch (global step %d)",
            path,
            p["epoch"] + 1,
            p["step_in_epoch"],
            self.steps_per_epoch,
            p["global_step"],
        )

    def _refuse_replacing_a_run(self, source: Path) -> None:
        """A checkpoint of another run resumed into this directory would cut its history and prune its
        best checkpoints: refused (one line) where the directory holds a run of its own."""
        own = self.rundir.checkpoint_dir
        if source.parent.exists() and own.exists() and source.parent.samefile(own):
            return  # a checkpoint of this very run: going back in it is the user's explicit choice
        found = D.broadcast_object(self.rundir.existing_run() if self.env.is_main else None, self.env)
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RunFolderError(
                f"--out {self.out} already holds a run ({shown}); resuming {source} there would "
                f"replace it: drop --resume to continue that run, train into another --out, or "
                f"pass --start-over to replace it"
            )

    def restore_weights_file(self) -> None:
        """Write best.safetensors again from the state it should hold (the best-k leader's checkpoint,
        or the latest weights of a run without validation): a save that failed earlier, e.g. on a
        full disk, is made good on the next start."""
        from ..weights.training_state import load_training_state

        names = (self.classes, self.preprocess, self.cfg.model.name)
        if self.best:
            source = self.rundir.checkpoint_dir / self.best[0]["file"]
            part = "ema" if self.cfg.train.best_metric.startswith("val_ema_") else "model"
            if self.env.is_main:
                try:
                    weights = load_training_state(source)[part]
                except (OSError, KeyError) as e:  # the best-k file was removed or damaged: keep what is there
                    log.warning("cannot re-write best.safetensors from %s: %s", source, e)
                    return
                model = SwinTransformerV2(self.model.config)
                model.load_state_dict(self.task.weights_of(weights))
                self.rundir.write_weights(model, *names)
        elif self.val_loader is None and self.history:
            self.rundir.write_weights(self.task.weights_model(self.plain_model()), *names)

    def run(
        self, resume: str | Path | None = None, *, allow_config_change: bool = False, start_over: bool = False
    ) -> dict[str, Any]:
        t = self.cfg.train
        self.resume(resume, allow_config_change=allow_config_change, start_over=start_over)
        if self.progress["epoch"] >= t.epochs:
            log.info("the run in %s already finished its %d epochs", self.out, t.epochs)
            return self.rundir.summary(self.history, self.best)
        self._log_start()
        with StopSignals() as self._stop:
            for epoch in range(self.progress["epoch"], t.epochs):
                t0 = time.perf_counter()
                stats = self.train_epoch(epoch, self._stop)
                row = self.end_epoch(epoch, stats, t0)
                self.rundir.log_epoch(row, t.epochs)
                if D.any_rank(self._stop.signum is not None, self.env):  # arrived during evaluation
                    last = self.rundir.checkpoint_dir / "last.pt"
                    raise TrainingInterrupted(self._stop.signum or signal.SIGTERM, last)
        return self.rundir.summary(self.history, self.best)

    def _log_start(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "training %s (%.2fM params, %s) on %s x%d: %d images, %d steps/epoch of %d images, lr %.3g",
            self.cfg.model.name,
            n_params / 1e6,
            self.task.describe(self.classes),
            self.env.device,
            self.env.world_size,
            len(self.train_ds),
            self.steps_per_epoch,
            self.total_batch,
            self.scheduler.lr,
        )


def fit(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    allow_config_change: bool = False,
    start_over: bool = False,
) -> dict[str, Any]:
    """Train as `cfg` says, writing the run directory `out_dir`; resume from `resume` or, if
    `out_dir` already holds checkpoints, from the valid one furthest along (`start_over`: replace the
    run in `out_dir` instead). Returns the run summary (paths, best and final metrics). Raises
    TrainingInterrupted on SIGTERM/SIGINT (after saving), RunLockedError if another process trains in
    `out_dir`, RunFolderError if `out_dir` holds the user's own files or a link where the run writes."""
    if resume is not None and not Path(resume).is_file():  # before anything is built or locked
        raise FileNotFoundError(
            f"--resume {resume}: "
            + ("is a folder, not a checkpoint file" if Path(resume).is_dir() else "no such checkpoint file")
        )
    threads = torch.get_num_threads()
    if cfg.train.threads:
        # On a small shared CPU, one intra-op thread per process (data in a worker process) is often
        # several times faster than two threads that wait on each other at every small op.
        torch.set_num_threads(cfg.train.threads)
    env = D.setup(cfg.train.device)
    trainer = None
    try:
        trainer = Trainer(cfg, Path(out_dir), env)
        summary = trainer.run(resume, allow_config_change=allow_config_change, start_over=start_over)
        # Every rank done before the process group goes: rank 0 still writes its files after the last
        # collective, and a peer that tore down meanwhile once made gloo abort rank 0 at exit.
        D.barrier(env)
        return summary
    finally:
        if trainer is not None:
            trainer.rundir.close(refused=not trainer.rundir.begun)
        D.teardown(env)
        torch.set_num_threads(threads)
