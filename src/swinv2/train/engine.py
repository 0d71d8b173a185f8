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
metric history, best-k list, class map and resolved config. A run killed at any point and started
again with the same command continues bit-identically (on CPU) from its last checkpoint.

`train.task: simmim` trains `simmim.SimMIM` (masked-image pretraining without labels) in the same loop:
its model returns the loss, each image's mask comes from (seed, epoch, sample index), validation is
the reconstruction loss on fixed masks, and the weights file is the encoder alone.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, InputError
from . import distributed as D
from . import schedule
from ..weights.checkpoint import create_model
from ..config import Config, check_task
from .datasets import (Batch, DataReport, ImageFilesDataset, ImageFolderDataset, SeededSamples, ShardedSampler,
                   build_digits_folder, build_mixup, check_dataset, hygiene_warnings, make_loader,
                   pretrain_transform, sample_seed, seed_everything, train_transform)
from .evaluate import evaluate
from .faults import NonFiniteError, StopSignals, TrainingInterrupted, assert_finite, check_fits
from ..hardware import DTYPES, warn_if_bf16_emulated
from ..images import eval_pipeline
from ..model.transformer import SwinTransformerV2
from ..preprocess import EvalPreprocess
from ..weights.registry import get_variant
from .rundir import RunDir, RunFolderError, RunLockedError  # noqa: F401 (raised by fit)
from ..model.simmim import (MaskGenerator, SimMIM, check_geometry, encoder_of, encoder_stride, encoder_weights,
                     reconstruction_images, reconstruction_loss)

log = logging.getLogger(__name__)

STATE_FORMAT = "swinv2.training_state"
STATE_VERSION = 1
# Tags mixed into the seeds of SimMIM's masks: a training image's mask is a function of (seed, epoch,
# index), a validation image's of its index alone (every run is scored on the same masked pixels).
TRAIN_MASKS, VAL_MASKS = 2, 3


class BadDataError(DataError):
    """`data.strict`: unreadable images were found before training; the message lists them."""


# --------------------------------------------------------------------------- building blocks


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The configured variant with `num_classes` outputs, init weights loaded, patterns frozen; under
    `train.task: simmim` the same variant without a head (the patterns name its parameters as a
    classifier's) inside `SimMIM`, with its mask token and decoder."""
    m = cfg.model
    simmim = cfg.train.task == "simmim"
    model = create_model(m.name, num_classes=0 if simmim else num_classes, img_size=m.img_size,
                         window_size=m.window_size, pretrained_window_sizes=m.pretrained_window_sizes,
                         drop_path_rate=m.drop_path_rate, weights=m.weights, pretrained=m.pretrained,
                         strict=m.weights_strict)
    freeze(model, m.freeze)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.sequential_attention:
        model.set_sequential_attention(True)
    return SimMIM(model, norm_target_patch_size=cfg.simmim.norm_target_patch_size) if simmim else model


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


def data_roots(cfg: Config, env: D.DistEnv | None = None) -> tuple[Path, Path | None]:
    """(train folder, val folder or None) of the config; the digits demo folder is built first if asked.
    For pretraining (`train.task: simmim`) a flat `data.root` of images, without a `train/` folder, is
    the training set itself (and has no validation set unless `data.val_root` names one)."""
    d = cfg.data
    if not d.root:
        raise ConfigError("data.root is not set (the folder holding train/ and val/ class folders)")
    root = Path(d.root)
    if d.source == "digits":
        if env is None or env.is_main:
            build_digits_folder(root, img_size=cfg.model.img_size or get_variant(cfg.model.name).config.img_size[0])
        if env is not None:
            D.barrier(env)
    train_root = root / d.train_dir
    if not train_root.is_dir() and cfg.train.task == "simmim" and root.is_dir():
        log.info("%s has no %s/ folder: pretraining on every image under it%s", root, d.train_dir,
                 "" if d.val_root else " (no validation set; data.val_root may name one)")
        return root, Path(d.val_root) if d.val_root else None
    if not train_root.is_dir():
        raise FileNotFoundError(f"training folder not found: {train_root}")
    return train_root, Path(d.val_root) if d.val_root else root / d.val_dir


def check_data(cfg: Config) -> DataReport:
    """`swinv2 train --check-data`: decode every image of the configured folders and report."""
    train_root, val_root = data_roots(cfg)
    return check_dataset(train_root, val_root if val_root is not None and val_root.is_dir() else None, workers=max(cfg.data.workers, 1),
                         labels=cfg.train.task != "simmim")


def prepare_data(cfg: Config, env: D.DistEnv) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
    """The train and val folders, hygiene reported; in strict mode every image decoded first. For
    pretraining (`train.task: simmim`) every image under each folder, without labels."""
    train_root, val_root = data_roots(cfg, env)
    if cfg.data.strict:  # rank 0 decodes every image; every rank learns the verdict
        problem = None
        if env.is_main:
            report = check_data(cfg)
            bad = [f"{p}: {r}" for items in report.bad.values() for p, r in items]
            problem = f"data.strict: {len(bad)} unreadable images: " + "; ".join(bad) if bad else None
        problem = D.broadcast_object(problem, env)
        if problem:
            raise BadDataError(problem)
    if cfg.train.task == "simmim":
        train = ImageFilesDataset(train_root)
        val = ImageFilesDataset(val_root) if val_root is not None and val_root.is_dir() else None
    else:
        assert val_root is not None  # only a flat pretraining root has none
        train = ImageFolderDataset(train_root)
        val = ImageFolderDataset(val_root, class_names=train.classes) if val_root.is_dir() else None
    if val is None and val_root is not None:
        log.warning("no validation folder at %s: training without evaluation", val_root)
    if env.is_main:
        for w in hygiene_warnings(train, val):
            log.warning("%s", w)
    return train, val


def eval_preprocess(cfg: Config, model: nn.Module) -> EvalPreprocess:
    d = cfg.data
    crop = d.crop_pct if d.crop_pct is not None else get_variant(cfg.model.name).preprocess.crop_pct
    return EvalPreprocess(model.config.img_size[0], crop, d.interpolation, tuple(d.mean), tuple(d.std))


def build_criterion(cfg: Config, mixup_active: bool) -> nn.Module:
    """Soft-target CE under Mixup (its targets carry the smoothing), else label smoothing, else CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.data.aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.data.aug.label_smoothing)
    return nn.CrossEntropyLoss()


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything a run holds, built from the config; `run()` trains to the end or to a signal."""

    def __init__(self, cfg: Config, out_dir: Path, env: D.DistEnv) -> None:
        self.env, self.out = env, out_dir
        t = cfg.train
        check_task(cfg)
        get_variant(cfg.model.name)  # an unknown model name fails before any data is scanned
        self.amp_dtype = None if t.amp == "none" else DTYPES[t.amp]
        if t.amp == "fp16" and env.device.type != "cuda":
            log.warning("train.amp=fp16 on the CPU is slow (it exists for testing the loss scaler); "
                        "use train.amp=none, or bf16 on a CPU with AVX-512 BF16 or AMX")
        if t.amp == "bf16":
            warn_if_bf16_emulated(env.device, "train.amp=bf16")
        if t.parallel == "fsdp" and t.ema and env.distributed:
            raise ConfigError("train.ema is not supported with train.parallel=fsdp (the EMA would need its own "
                             "sharding); use ddp, or turn the EMA off")
        if t.parallel == "fsdp" and t.task == "simmim" and env.distributed:
            raise ConfigError("train.task=simmim is not supported with train.parallel=fsdp; use ddp")
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
        self.train_ds, self.val_ds = prepare_data(cfg, env)
        self.classes = self.train_ds.classes
        num_classes = 0
        if t.task == "classify":
            num_classes = cfg.model.num_classes or len(self.classes)
            if num_classes < len(self.classes):
                raise ConfigError(f"model.num_classes={num_classes} but the training folder has "
                                  f"{len(self.classes)} classes")
            cfg = cfg.replace(**{"model.num_classes": num_classes})
        self.cfg = cfg

        seed_everything(t.seed)  # model init: identical on every rank and every run
        self.model = build_model(cfg, num_classes).to(env.device)
        self.masks = self._mask_generator()  # None: classification
        self.preprocess = eval_preprocess(cfg, self.model)
        img_size = self.model.config.img_size[0]
        self.ema = None
        if t.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=t.ema_decay, use_warmup=t.ema_warmup)
        # Wrapped before the optimizer is built: FSDP replaces the parameters by sharded ones.
        self.wrapped = D.wrap_model(self.model, env, t.parallel)
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self._build_loaders(cfg, env, img_size, num_classes)
        self.total_batch = cfg.data.batch_size * self.accum * env.world_size
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.optimizer, self.scheduler = schedule.build(self.model, cfg.optim, cfg.schedule,
                                                        total_batch=self.total_batch,
                                                        steps_per_epoch=self.steps_per_epoch, epochs=t.epochs)
        self.scaler = torch.amp.GradScaler(env.device.type) if t.amp == "fp16" else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "bad_steps": 0, "consecutive_bad": 0,
                         "overflow_steps": 0, "epoch_loss_sum": 0.0, "epoch_loss_steps": 0, "epoch_bad_files": {}}
        self.history: list[dict[str, Any]] = []
        self.best: list[dict[str, Any]] = []

    def _mask_generator(self) -> MaskGenerator | None:
        """SimMIM's masks for the model's image size, the geometry checked (None: classification)."""
        if self.cfg.train.task != "simmim":
            return None
        arch, s = self.model.config, self.cfg.simmim
        stride = encoder_stride(arch)
        mask_patch = s.mask_patch_size or stride
        check_geometry(arch.img_size[0], arch.patch_size, stride, mask_patch)
        return MaskGenerator(arch.img_size, mask_patch, arch.patch_size, s.mask_ratio)

    def train_masks(self, indices: torch.Tensor) -> torch.Tensor:
        """The masks of training images `indices` in the current epoch: a function of (seed, epoch, index)."""
        t, epoch = self.cfg.train, self.progress["epoch"]
        return self.masks([sample_seed(t.seed, epoch, int(i), TRAIN_MASKS) for i in indices])

    def val_masks(self, indices: torch.Tensor) -> torch.Tensor:
        """The masks of validation images `indices`: the same in every epoch and every run."""
        return self.masks([sample_seed(VAL_MASKS, int(i)) for i in indices])

    def _build_loaders(self, cfg: Config, env: D.DistEnv, img_size: int, num_classes: int) -> None:
        """Per-rank loaders (one sampler "batch" = the images of one optimizer step on this rank),
        Mixup/CutMix and the loss (none for SimMIM: its model returns the loss)."""
        d, a = cfg.data, cfg.data.aug
        self.accum = cfg.optim.accum_steps
        self.sampler = ShardedSampler(len(self.train_ds), batch_size=d.batch_size * self.accum,
                                      num_replicas=env.world_size, rank=env.rank, seed=cfg.train.seed)
        if self.masks is not None:
            tf = pretrain_transform(img_size, scale=a.scale, ratio=a.ratio, hflip=a.hflip,
                                    interpolation=a.interpolation, mean=d.mean, std=d.std)
        else:
            tf = train_transform(img_size, scale=a.scale, ratio=a.ratio, hflip=a.hflip, color_jitter=a.color_jitter,
                                 auto_augment=a.auto_augment, interpolation=a.interpolation, re_prob=a.re_prob,
                                 re_mode=a.re_mode, re_count=a.re_count, mean=d.mean, std=d.std)
        pin = d.pin_memory and env.device.type == "cuda"
        self.train_loader = make_loader(SeededSamples(self.train_ds, tf), self.sampler, batch_size=d.batch_size,
                                        workers=d.workers, pin_memory=pin, persistent_workers=d.persistent_workers)
        self.val_loader = None
        if self.val_ds is not None:
            p = self.preprocess
            etf = eval_pipeline(p)
            val_sampler = ShardedSampler(len(self.val_ds), num_replicas=env.world_size, rank=env.rank,
                                         shuffle=False, drop_last=False)
            self.val_loader = make_loader(SeededSamples(self.val_ds, etf), val_sampler,
                                          batch_size=d.eval_batch_size or 2 * d.batch_size, workers=d.workers,
                                          pin_memory=pin, persistent_workers=d.persistent_workers)
        self.mixup = self.criterion = None
        if self.masks is None:
            self.mixup = build_mixup(num_classes, mixup=a.mixup, cutmix=a.cutmix, cutmix_minmax=a.cutmix_minmax,
                                     prob=a.mixup_prob, switch_prob=a.switch_prob, mode=a.mixup_mode,
                                     label_smoothing=a.label_smoothing)
            self.criterion = build_criterion(cfg, self.mixup is not None)

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The whole training state: tensors and plain Python data only (loads weights_only)."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "model": D.full_model_state(self.model, self.env),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": D.full_optimizer_state(self.model, self.optimizer, self.env),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": dict(self.progress),
            "sampler": self.sampler.state_dict(consumed=self.progress["step_in_epoch"] * self.sampler.batch_size),
            "history": [dict(h) for h in self.history],
            "best": [dict(b) for b in self.best],
            "classes": list(self.classes),
            "preprocess": dataclasses.asdict(self.preprocess),
            "model_name": self.cfg.model.name,
            "model_config": self.model.config.to_dict(),
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        if state.get("format") != STATE_FORMAT:
            raise InputError(f"{source}: not a swinv2 training state (no '{STATE_FORMAT}' format tag)")
        if state["classes"] != list(self.classes):
            raise InputError(f"{source}: trained on classes {state['classes'][:5]}... but the data now has "
                             f"{self.classes[:5]}...: the class map changed")
        expected = self.model.state_dict()
        check_fits(expected, state["model"], f"{source} (model)")
        D.load_full_model_state(self.model, state["model"], self.env)
        if self.ema is not None:
            if state["ema"] is None:
                log.warning("%s holds no EMA; the EMA restarts from the current weights", source)
                self.ema.module.load_state_dict(self.model.state_dict())
            else:
                check_fits(expected, state["ema"], f"{source} (EMA)")
                self.ema.module.load_state_dict(state["ema"])
        try:
            D.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"], self.env)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. another set of frozen parameters
            raise InputError(f"{source}: the optimizer state does not fit this run (were other parameters "
                             f"frozen?): {str(e).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            if state["scaler"] is None:
                log.warning("%s holds no loss-scaler state; the fp16 scaler starts fresh", source)
            else:
                self.scaler.load_state_dict(state["scaler"])
        self.progress = dict(state["progress"])
        saved_world = state.get("world_size", 1)
        if saved_world != self.env.world_size:
            log.warning("%s was written by %d processes, resuming on %d: data order continues, per-rank "
                        "randomness differs", source, saved_world, self.env.world_size)
        self.sampler.load_state_dict(state["sampler"])
        if (self.sampler.epoch, self.sampler.start) != (self.progress["epoch"],
                                                        self.progress["step_in_epoch"] * self.sampler.batch_size):
            raise InputError(f"{source}: sampler position {state['sampler']} does not match the progress "
                             f"{self.progress} (a different batch size, accumulation or number of processes?)")
        self.history = [dict(h) for h in state["history"]]
        self.best = [dict(b) for b in state["best"]]

    def save(self, state: dict[str, Any] | None = None) -> Path:
        """Checkpoint to checkpoints/last.pt (rank 0 writes; every rank takes part in gathering)."""
        path = self.rundir.write_last(self.checked_state() if state is None else state)
        D.barrier(self.env)
        return path

    def checked_state(self) -> dict[str, Any]:
        """`state_dict()` after checking that no saved tensor is non-finite."""
        state = self.state_dict()
        if self.env.is_main:
            assert_finite({k: state[k] for k in ("model", "ema", "optimizer", "scaler")})
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
                f"the last checkpoint is in {self.rundir.checkpoint_dir}")
        return {"loss": loss_mean, "grad_norm": grad_norm, "lr": lr, "n": n, "skipped": bad}

    def _forward_backward(self, micro_batches: list[Batch]) -> tuple[float, float]:
        """Accumulate the gradients of the micro-batches (DDP syncs on the last one); returns the loss
        mean over every rank's images and their number (all-reduced)."""
        t, env = self.cfg.train, self.env
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        n_sum = 0
        for i, batch in enumerate(micro_batches):
            x, y = batch.images, batch.labels
            if self.mixup is not None and len(y) % 2:  # Mixup pairs images: drop one to make it even
                x, y = x[:-1], y[:-1]
            empty = len(y) == 0  # every file of this micro-batch was unreadable
            if empty:  # a rank still takes part in the gradient all-reduce, with zero weight
                x = torch.zeros(1, 3, *self.model.config.img_size)
            x = x.to(env.device, non_blocking=True)
            y = y.to(env.device, non_blocking=True)
            if self.mixup is not None and not empty:
                x, y = self.mixup(x, y)
            sync = i == len(micro_batches) - 1 or not env.distributed or t.parallel != "ddp"
            with (contextlib.nullcontext() if sync else self.wrapped.no_sync()):
                with torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self._loss(x, y, batch.indices, empty)
                scaled = loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().double() * len(y)
            n_sum += len(y)
        stats = torch.tensor([0.0, float(n_sum)], dtype=torch.float64, device=env.device)
        stats[0] = loss_sum
        D.all_reduce_sum(stats, env)
        loss_mean = (stats[0] / stats[1]).item() if stats[1] > 0 else float("nan")
        return loss_mean, float(stats[1])

    def _loss(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, empty: bool) -> torch.Tensor:
        """The micro-batch's loss through the (wrapped) model: cross-entropy of the logits, or SimMIM's
        masked-pixel loss, which its model returns. An empty micro-batch gives a zero that still reaches
        every parameter, so the gradient all-reduce of DDP goes ahead."""
        if self.masks is None:
            out = self.forward(x)
            return out.sum() * 0.0 if empty else self.criterion(out, y)
        masks = self.masks([0]) if empty else self.train_masks(indices)
        loss = self.forward(x, masks.to(x.device))
        return loss * 0.0 if empty else loss

    def _skip_step(self, step: int, loss_mean: float, grad_norm: float, n: float) -> bool:
        """Count and log a step with a non-finite loss or gradient (or no image on any rank); no update."""
        self.progress["bad_steps"] += 1
        self.progress["consecutive_bad"] += 1
        what = ("no readable image on any rank" if n == 0 else
                "non-finite loss" if not math.isfinite(loss_mean) else "non-finite gradient")
        log.warning("step %d: %s (loss %s, grad norm %s): step skipped (%d in a row)", step, what, loss_mean,
                    grad_norm, self.progress["consecutive_bad"])
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
            self.progress.update(epoch_loss_sum=0.0, epoch_loss_steps=0, epoch_bad_files={})
        images, t0 = 0.0, time.perf_counter()
        it = iter(self.train_loader) if start_step < self.steps_per_epoch else iter(())
        try:
            for _ in range(start_step, self.steps_per_epoch):
                micro = [next(it) for _ in range(self.accum)]
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
                gs = self.progress["global_step"]
                if gs % self.cfg.train.log_every == 0:
                    self.rundir.log_step({"step": gs, "epoch": epoch + 1, "loss": out["loss"], "lr": out["lr"],
                                          "grad_norm": out["grad_norm"], "skipped": out["skipped"]})
                if D.any_rank(stop.signum is not None, self.env):  # at this step boundary, on every rank
                    path = self.save()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, path)
                every = self.cfg.train.checkpoint_every
                if every and gs % every == 0:
                    self.save()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        n_bad = self.rundir.report_bad_files(epoch, "train", self.progress["epoch_bad_files"])
        loss_sum, steps = self.progress["epoch_loss_sum"], self.progress["epoch_loss_steps"]
        return {"train_loss": loss_sum / steps if steps else float("nan"), "img_per_s": images / max(elapsed, 1e-9),
                "train_time_s": elapsed, "bad_images": n_bad}

    def plain_model(self) -> nn.Module:
        """The model as an ordinary module: itself, or under FSDP an unsharded copy gathered on every
        rank (for evaluation on each rank's shard of the val set, and for the weights file)."""
        if not D.is_fsdp(self.model):
            return self.model
        plain = SwinTransformerV2(self.model.config).to(self.env.device)
        plain.load_state_dict(D.full_model_state(self.model, self.env, everywhere=True))
        return plain

    def validate(self, epoch: int, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5/loss of the model (and the EMA) on the whole val set, reduced over ranks; for
        SimMIM the reconstruction loss (on the fixed validation masks) instead."""
        bad: dict[str, str] = {}

        def batches():
            for b in self.val_loader:
                bad.update(dict(b.bad))
                yield b

        # A plain module (not the DDP/FSDP wrapper): each rank evaluates its own shard with no
        # collective inside the forward, so uneven shards are fine; the sums are reduced after.
        measure = self._classification if self.masks is None else self._reconstruction
        out = measure(model, batches(), "val")
        if self.ema is not None:
            out |= {k: v for k, v in measure(self.ema.module, self.val_loader, "val_ema").items() if k != "val_ema_n"}
        n_bad = self.rundir.report_bad_files(epoch, "val", bad)
        if n_bad:
            out["val_bad_images"] = n_bad
        return out

    def _classification(self, model: nn.Module, batches: Any, prefix: str) -> dict[str, float]:
        m = evaluate(model, batches, device=self.env.device, amp_dtype=self.amp_dtype)
        return {f"{prefix}_loss": m["loss"], f"{prefix}_top1": m["top1"], f"{prefix}_top5": m["top5"],
                f"{prefix}_n": m["n"]}

    def _reconstruction(self, model: nn.Module, batches: Any, prefix: str) -> dict[str, float]:
        sums = reconstruction_loss(model, batches, self.val_masks, device=self.env.device, amp_dtype=self.amp_dtype)
        D.all_reduce_sum(sums, self.env)
        loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
        return {f"{prefix}_loss": loss, f"{prefix}_n": int(sums[1])}

    def draw_reconstructions(self, epoch: int, model: nn.Module) -> Path | None:
        """reconstructions/epochNNNN.png (rank 0): masked input, reconstruction and original of
        `simmim.reconstructions` fixed val images (evenly spaced through the set), masked as in validation."""
        k = self.cfg.simmim.reconstructions
        if not (self.env.is_main and self.masks is not None and self.val_ds is not None and k):
            return None
        from ..plots import plot_reconstructions

        p = self.preprocess
        samples = SeededSamples(self.val_ds, eval_pipeline(p))
        picked = sorted({round(i) for i in torch.linspace(0, len(self.val_ds) - 1, k).tolist()})
        good = [s for s in (samples[i] for i in picked) if s.error is None]
        if not good:
            return None
        images = torch.stack([s.image for s in good]).to(self.env.device)
        mask = self.val_masks(torch.tensor([s.index for s in good])).to(self.env.device)
        pictures = reconstruction_images(model, images, mask, p.mean, p.std)
        path = self.out / "reconstructions" / f"epoch{epoch + 1:04d}.png"
        path.parent.mkdir(exist_ok=True)
        val_loss = self.history[-1].get("val_loss") if self.history else None
        loss = f", val loss {val_loss:.4f}" if val_loss is not None else ""
        return plot_reconstructions(pictures, path, title=f"SimMIM epoch {epoch + 1}{loss}: {self.masks.count} of "
                                    f"{self.masks.squares} squares masked")

    def end_epoch(self, epoch: int, train_stats: dict[str, float], epoch_start: float) -> dict[str, Any]:
        """Evaluate, record the metrics row, keep the best-k, checkpoint (the epoch's commit point)."""
        t = self.cfg.train
        evaluated = self.val_loader is not None and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.progress["global_step"],
                               "lr": self.optimizer.param_groups[0]["lr"], **train_stats}
        if evaluated:
            plain = self.plain_model()
            row |= self.validate(epoch, plain)
        row |= {"epoch_time_s": time.perf_counter() - epoch_start, "skipped_steps": self.progress["bad_steps"]}
        self.history.append(row)
        if evaluated:
            self.draw_reconstructions(epoch, plain)
        self.progress.update(epoch=epoch + 1, step_in_epoch=0)
        self.sampler.set_epoch(epoch + 1, 0)
        new_best = self._rank_best(row) if evaluated else None
        state = self.checked_state()
        names = (self.classes, self.preprocess, self.cfg.model.name)
        if new_best is not None:
            best_model = self.ema.module if t.best_metric.startswith("val_ema_") else plain
            self.rundir.write_best(new_best, state, encoder_of(best_model), *names, top=new_best is self.best[0])
        elif self.val_loader is None:
            self.rundir.write_weights(encoder_of(self.plain_model()), *names)
        self.save(state)
        self.rundir.prune_best(self.best)
        self.rundir.epoch_done(self.history)
        return row

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

    def resume(self, explicit: str | Path | None, *, allow_config_change: bool = False,
               start_over: bool = False) -> None:
        """Load `explicit` (errors are fatal) or the furthest valid checkpoint of the run directory;
        a config that differs from the checkpoint's in keys that change the run needs
        `allow_config_change`. An `explicit` checkpoint from elsewhere into a directory that holds a run
        is refused unless `start_over`, which replaces the run that was there (a fresh start too).
        Then the run starts: config.yaml, and the files the run owes."""
        from ..weights.checkpoint import load_training_state

        if explicit and not start_over:
            self._refuse_replacing_a_run(Path(explicit))
        path = Path(explicit) if explicit else None if start_over else self.rundir.find_resumable()
        if path is not None:
            state = load_training_state(path)
            self.load_state_dict(state, path)  # a checkpoint of another model fails here, listing its keys
            check_config_change(state.get("config"), self.cfg, path, allowed=allow_config_change)
        if start_over:
            self.rundir.clear(keep=path)
        self.rundir.begin(self.cfg)
        if path is None:
            return
        self.rundir.resumed(self.history, self.best, self.progress["global_step"])
        self.restore_weights_file()
        p = self.progress
        log.info("resumed from %s: epoch %d, step %d of %d in the epoch (global step %d)", path, p["epoch"] + 1,
                 p["step_in_epoch"], self.steps_per_epoch, p["global_step"])

    def _refuse_replacing_a_run(self, source: Path) -> None:
        """A checkpoint of another run resumed into this directory would cut its history and prune its
        best checkpoints: refused (one line) where the directory holds a run of its own."""
        own = self.rundir.checkpoint_dir
        if source.parent.exists() and own.exists() and source.parent.samefile(own):
            return  # a checkpoint of this very run: going back in it is the user's explicit choice
        found = D.broadcast_object(self.rundir.existing_run() if self.env.is_main else None, self.env)
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RunFolderError(f"--out {self.out} already holds a run ({shown}); resuming {source} there would "
                                 f"replace it: drop --resume to continue that run, train into another --out, or "
                                 f"pass --start-over to replace it")

    def restore_weights_file(self) -> None:
        """Write best.safetensors again from the state it should hold (the best-k leader's checkpoint,
        or the latest weights of a run without validation): a save that failed earlier, e.g. on a
        full disk, is made good on the next start."""
        from ..weights.checkpoint import load_training_state

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
                model.load_state_dict(encoder_weights(weights) if self.masks is not None else weights)
                self.rundir.write_weights(model, *names)
        elif self.val_loader is None and self.history:
            self.rundir.write_weights(encoder_of(self.plain_model()), *names)

    def run(self, resume: str | Path | None = None, *, allow_config_change: bool = False,
            start_over: bool = False) -> dict[str, Any]:
        t = self.cfg.train
        self.resume(resume, allow_config_change=allow_config_change, start_over=start_over)
        if self.progress["epoch"] >= t.epochs:
            log.info("the run in %s already finished its %d epochs", self.out, t.epochs)
            return self.rundir.summary(self.history, self.best)
        n_params = sum(p.numel() for p in self.model.parameters())
        what = f"{len(self.classes)} classes" if self.masks is None else (
            f"SimMIM pretraining without labels: {self.masks.count} of {self.masks.squares} squares masked")
        log.info("training %s (%.2fM params, %s) on %s x%d: %d images, %d steps/epoch of %d images, "
                 "lr %.3g", self.cfg.model.name, n_params / 1e6, what, self.env.device,
                 self.env.world_size, len(self.train_ds), self.steps_per_epoch, self.total_batch,
                 self.scheduler.lr)
        with StopSignals() as self._stop:
            for epoch in range(self.progress["epoch"], t.epochs):
                t0 = time.perf_counter()
                stats = self.train_epoch(epoch, self._stop)
                row = self.end_epoch(epoch, stats, t0)
                self.rundir.log_epoch(row, t.epochs)
                if D.any_rank(self._stop.signum is not None, self.env):  # arrived during evaluation
                    raise TrainingInterrupted(self._stop.signum or signal.SIGTERM, self.rundir.checkpoint_dir / "last.pt")
        return self.rundir.summary(self.history, self.best)


# Keys a resume may change without `allow_config_change`: where the data lives and how the run is
# driven and logged, not what it computes. (train.epochs extends or shortens the run.)
RESUME_MAY_CHANGE = ("data.root", "data.val_root", "data.workers", "data.persistent_workers", "data.pin_memory",
                     "data.eval_batch_size", "train.epochs", "train.progress", "train.tensorboard", "train.log_every",
                     "train.threads", "train.checkpoint_every", "train.eval_every", "train.device")


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


def check_config_change(saved: dict[str, Any] | None, cfg: Config, source: Path, *, allowed: bool) -> None:
    """Log how `cfg` differs from the checkpoint's config; refuse changes outside RESUME_MAY_CHANGE
    unless `allowed` (ValueError listing them)."""
    if saved is None:
        return
    changes = config_changes(saved, cfg.to_dict())
    if not changes:
        return
    listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    altering = [k for k in changes if k not in RESUME_MAY_CHANGE]
    if altering and not allowed:
        raise ConfigError(f"{source}: resuming with a config that changes the run ({listed}); train with "
                         f"--allow-config-change to resume with it anyway, or into another --out")
    log.warning("resuming %s with a changed config: %s", source, listed)


def fit(cfg: Config, out_dir: str | Path, *, resume: str | Path | None = None,
        allow_config_change: bool = False, start_over: bool = False) -> dict[str, Any]:
    """Train as `cfg` says, writing the run directory `out_dir`; resume from `resume` or, if
    `out_dir` already holds checkpoints, from the valid one furthest along (`start_over`: replace the
    run in `out_dir` instead). Returns the run summary (paths, best and final metrics). Raises
    TrainingInterrupted on SIGTERM/SIGINT (after saving), RunLockedError if another process trains in
    `out_dir`, RunFolderError if `out_dir` holds the user's own files or a link where the run writes."""
    if resume is not None and not Path(resume).is_file():  # before anything is built or locked
        raise FileNotFoundError(f"--resume {resume}: " + ("is a folder, not a checkpoint file" if Path(resume).is_dir()
                                                          else "no such checkpoint file"))
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
