"""The training tasks, classification and SimMIM pretraining, as two objects with one interface.

`engine.Trainer` runs one loop for both; everything in which they differ it asks of the task chosen once
from `train.task` (`task_for`): where the data lies and whether it has labels, the module trained around
the SwinV2 model (SimMIM wraps it with a mask token and a decoder), the training transform, a
micro-batch's loss, the validation metrics, the weights `best.safetensors` holds (the classifier, or the
encoder alone), the picture drawn after each evaluation and the description of the run in its first log line.

A task is made from the config before the model exists (the data and the model's head depend on it) and
bound to the model's architecture, the process group and the autocast dtype by `bind` once they exist.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..images import eval_pipeline
from ..model.simmim import (
    MaskGenerator,
    SimMIM,
    check_geometry,
    encoder_stride,
    encoder_weights,
    reconstruction_images,
    reconstruction_loss,
)
from ..model.transformer import SwinTransformerV2, SwinV2Config
from ..preprocess import EvalPreprocess
from . import distributed as D
from .datasets import (
    ImageFilesDataset,
    ImageFolderDataset,
    Samples,
    SeededSamples,
    build_mixup,
    pretrain_transform,
    sample_seed,
    train_transform,
)
from .evaluate import evaluate

log = logging.getLogger(__name__)

# Tags mixed into the seeds of SimMIM's masks: a training image's mask is a function of (seed, epoch,
# index), a validation image's of its index alone (every run is scored on the same masked pixels).
TRAIN_MASKS, VAL_MASKS = 2, 3

Forward = Callable[..., torch.Tensor]

if TYPE_CHECKING:
    from typing import TypeAlias

    TrainedModule: TypeAlias = SwinTransformerV2 | SimMIM  # what `Task.wrap` makes: `.config` is the architecture


class Task(ABC):
    """What the engine asks of a training task. Made from the run's config; `bind` completes it."""

    name: str  # the value of `train.task`
    labelled: bool  # the data are class folders, read with their labels
    env: D.DistEnv  # from `bind` on
    amp_dtype: torch.dtype | None

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ----------------------------------------------------------------------- before the model

    def data_roots(self, root: Path) -> tuple[Path, Path | None]:
        """(train folder, val folder or None) under `data.root` = `root`: its `train/` and `val/` folders."""
        d = self.cfg.data
        train_root = root / d.train_dir
        if not train_root.is_dir():
            raise FileNotFoundError(f"training folder not found: {train_root}")
        return train_root, Path(d.val_root) if d.val_root else root / d.val_dir

    @abstractmethod
    def datasets(self, train_root: Path, val_root: Path | None) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
        """The training set and the validation set (None where its folder is missing)."""

    @abstractmethod
    def resolve(self, cfg: Config, classes: list[str]) -> tuple[Config, int]:
        """(the run's config, the model's head outputs) for training data of `classes`."""

    def check_parallel(self, parallel: str, distributed: bool) -> None:
        """ConfigError where the task cannot train under `train.parallel` = `parallel`: none by default."""
        return None

    def check_model(self, arch: SwinV2Config) -> None:
        """ConfigError/InputError where the task cannot train a model of `arch` (none by default)."""
        return None

    @abstractmethod
    def wrap(self, model: SwinTransformerV2) -> TrainedModule:
        """The module trained around `model` (whose `.config` is `model`'s)."""

    @abstractmethod
    def train_transform(self, img_size: int) -> Callable:
        """The training augmentation of one image."""

    # ----------------------------------------------------------------------- the run

    def bind(self, arch: SwinV2Config, num_classes: int, env: D.DistEnv, amp_dtype: torch.dtype | None) -> None:
        """Complete the task for the built model of `arch` with `num_classes` outputs, on `env`, under
        autocast to `amp_dtype` (None: fp32)."""
        self.env, self.amp_dtype = env, amp_dtype

    def even_out(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of a micro-batch that the task trains on: all of them by default."""
        return x, y

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch transform of a non-empty micro-batch on the device (Mixup/CutMix; none by default)."""
        return x, y

    @abstractmethod
    def loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, empty: bool, epoch: int
    ) -> torch.Tensor:
        """A micro-batch's loss through `forward` (the wrapped model). An `empty` micro-batch (every file
        unreadable; `x` one zero image) gives a zero that still reaches every parameter, so the gradient
        all-reduce of DDP goes ahead."""

    @abstractmethod
    def validate(self, model: nn.Module, batches: Iterable, prefix: str) -> dict[str, float]:
        """The metrics of `model` (a plain module) on this rank's `batches`, reduced over ranks, as
        `{prefix}_loss`, ... and `{prefix}_n` (images)."""

    def weights_model(self, model: nn.Module) -> SwinTransformerV2:
        """The part of the trained (plain) `model` that `best.safetensors` holds: all of it by default."""
        return cast(SwinTransformerV2, model)  # `wrap` trained the model itself

    def weights_of(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights_model`'s tensors out of a state dict of the trained module."""
        return state

    def picture(
        self,
        model: nn.Module,
        val_ds: Samples,
        preprocess: EvalPreprocess,
        row: dict[str, Any],
        out_dir: Path,
    ) -> Path | None:
        """The figure drawn after an evaluation (on rank 0) under `out_dir`, or None: none by default."""
        return None

    @abstractmethod
    def describe(self, classes: list[str]) -> str:
        """What is trained, for the run's first log line."""


class Classification(Task):
    """Supervised classification: class folders, cross-entropy (Mixup/CutMix, label smoothing), top-1/5."""

    name, labelled = "classify", True

    mixup: Callable | None  # from `bind` on, as the criterion
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def datasets(self, train_root: Path, val_root: Path | None) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
        assert val_root is not None  # only a flat pretraining root has none
        train = ImageFolderDataset(train_root)
        return train, ImageFolderDataset(val_root, class_names=train.classes) if val_root.is_dir() else None

    def resolve(self, cfg: Config, classes: list[str]) -> tuple[Config, int]:
        """`model.num_classes` (default: the classes found), which must cover the training classes."""
        num_classes = cfg.model.num_classes or len(classes)
        if num_classes < len(classes):
            raise ConfigError(f"model.num_classes={num_classes} but the training folder has {len(classes)} classes")
        return cfg.replace(**{"model.num_classes": num_classes}), num_classes

    def wrap(self, model: SwinTransformerV2) -> SwinTransformerV2:
        return model

    def train_transform(self, img_size: int) -> Callable:
        d, a = self.cfg.data, self.cfg.data.aug
        return train_transform(
            img_size,
            scale=a.scale,
            ratio=a.ratio,
            hflip=a.hflip,
            color_jitter=a.color_jitter,
            auto_augment=a.auto_augment,
            interpolation=a.interpolation,
            re_prob=a.re_prob,
            re_mode=a.re_mode,
            re_count=a.re_count,
            mean=d.mean,
            std=d.std,
        )

    def bind(self, arch: SwinV2Config, num_classes: int, env: D.DistEnv, amp_dtype: torch.dtype | None) -> None:
        """Mixup/CutMix (None when off) and the loss for them."""
        super().bind(arch, num_classes, env, amp_dtype)
        a = self.cfg.data.aug
        self.mixup = build_mixup(
            num_classes,
            mixup=a.mixup,
            cutmix=a.cutmix,
            cutmix_minmax=a.cutmix_minmax,
            prob=a.mixup_prob,
            switch_prob=a.switch_prob,
            mode=a.mixup_mode,
            label_smoothing=a.label_smoothing,
        )
        self.criterion = build_criterion(self.cfg, self.mixup is not None)

    def even_out(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup pairs images: an odd micro-batch drops its last one."""
        if self.mixup is not None and len(y) % 2:
            return x[:-1], y[:-1]
        return x, y

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixup(x, y) if self.mixup is not None else (x, y)

    def loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, empty: bool, epoch: int
    ) -> torch.Tensor:
        """The criterion on the logits."""
        out = forward(x)
        return out.sum() * 0.0 if empty else self.criterion(out, y)

    def validate(self, model: nn.Module, batches: Iterable, prefix: str) -> dict[str, float]:
        """Cross-entropy, top-1 and top-5 (`evaluate.evaluate`)."""
        m = evaluate(model, batches, device=self.env.device, amp_dtype=self.amp_dtype)
        return {
            f"{prefix}_loss": m["loss"],
            f"{prefix}_top1": m["top1"],
            f"{prefix}_top5": m["top5"],
            f"{prefix}_n": m["n"],
        }

    def describe(self, classes: list[str]) -> str:
        return f"{len(classes)} classes"


def build_criterion(cfg: Config, mixup_active: bool) -> nn.Module:
    """Soft-target CE under Mixup (its targets carry the smoothing), else label smoothing, else CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.data.aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.data.aug.label_smoothing)
    return nn.CrossEntropyLoss()


class SimMIMPretraining(Task):
    """SimMIM masked-image pretraining without labels: `simmim.SimMIM` returns the masked-pixel loss; each
    image's mask comes from (seed, epoch, sample index); validation is the reconstruction loss on fixed masks;
    the weights file is the encoder alone."""

    name, labelled = "simmim", False

    masks: MaskGenerator  # from `bind` on

    def data_roots(self, root: Path) -> tuple[Path, Path | None]:
        """A flat `data.root` of images, without a `train/` folder, is the training set itself (and has no
        validation set unless `data.val_root` names one)."""
        d = self.cfg.data
        if not (root / d.train_dir).is_dir() and root.is_dir():
            log.info(
                "%s has no %s/ folder: pretraining on every image under it%s",
                root,
                d.train_dir,
                "" if d.val_root else " (no validation set; data.val_root may name one)",
            )
            return root, Path(d.val_root) if d.val_root else None
        return super().data_roots(root)

    def datasets(self, train_root: Path, val_root: Path | None) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
        """Every image under each folder, without labels."""
        val = ImageFilesDataset(val_root) if val_root is not None and val_root.is_dir() else None
        return ImageFilesDataset(train_root), val

    def resolve(self, cfg: Config, classes: list[str]) -> tuple[Config, int]:
        """No head: the config as it is."""
        return cfg, 0

    def check_parallel(self, parallel: str, distributed: bool) -> None:
        if parallel == "fsdp" and distributed:
            raise ConfigError("train.task=simmim is not supported with train.parallel=fsdp; use ddp")

    def check_model(self, arch: SwinV2Config) -> None:
        """The mask squares against the model's patches and encoder stride."""
        stride = encoder_stride(arch)
        check_geometry(arch.img_size[0], arch.patch_size, stride, self.cfg.simmim.mask_patch_size or stride)

    def wrap(self, model: SwinTransformerV2) -> SimMIM:
        """`model` (headless) inside `SimMIM`, with its mask token and decoder."""
        return SimMIM(model, norm_target_patch_size=self.cfg.simmim.norm_target_patch_size)

    def train_transform(self, img_size: int) -> Callable:
        d, a = self.cfg.data, self.cfg.data.aug
        return pretrain_transform(
            img_size, scale=a.scale, ratio=a.ratio, hflip=a.hflip, interpolation=a.interpolation, mean=d.mean, std=d.std
        )

    def bind(self, arch: SwinV2Config, num_classes: int, env: D.DistEnv, amp_dtype: torch.dtype | None) -> None:
        """The masks for the model's image size, the geometry checked."""
        super().bind(arch, num_classes, env, amp_dtype)
        s = self.cfg.simmim
        self.check_model(arch)
        self.masks = MaskGenerator(
            arch.img_size, s.mask_patch_size or encoder_stride(arch), arch.patch_size, s.mask_ratio
        )

    def train_masks(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """The masks of training images `indices` in `epoch`: a function of (seed, epoch, index)."""
        return self.masks([sample_seed(self.cfg.train.seed, epoch, int(i), TRAIN_MASKS) for i in indices])

    def val_masks(self, indices: torch.Tensor) -> torch.Tensor:
        """The masks of validation images `indices`: the same in every epoch and every run."""
        return self.masks([sample_seed(VAL_MASKS, int(i)) for i in indices])

    def loss(
        self, forward: Forward, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, empty: bool, epoch: int
    ) -> torch.Tensor:
        """The masked-pixel loss, which the SimMIM model returns."""
        masks = self.masks([0]) if empty else self.train_masks(indices, epoch)
        loss = forward(x, masks.to(x.device))
        return loss * 0.0 if empty else loss

    def validate(self, model: nn.Module, batches: Iterable, prefix: str) -> dict[str, float]:
        """The reconstruction loss on the fixed validation masks."""
        assert isinstance(model, SimMIM)
        sums = reconstruction_loss(model, batches, self.val_masks, device=self.env.device, amp_dtype=self.amp_dtype)
        D.all_reduce_sum(sums, self.env)
        loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
        return {f"{prefix}_loss": loss, f"{prefix}_n": int(sums[1])}

    def weights_model(self, model: nn.Module) -> SwinTransformerV2:
        """The encoder: a classifier's backbone, to fine-tune."""
        assert isinstance(model, SimMIM)
        return model.encoder

    def weights_of(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return encoder_weights(state)

    def picture(
        self,
        model: nn.Module,
        val_ds: Samples,
        preprocess: EvalPreprocess,
        row: dict[str, Any],
        out_dir: Path,
    ) -> Path | None:
        """reconstructions/epochNNNN.png: masked input, reconstruction and original of `simmim.reconstructions`
        fixed val images (evenly spaced through the set), masked as in validation."""
        k = self.cfg.simmim.reconstructions
        if not k:
            return None
        assert isinstance(model, SimMIM)
        from ..plots import plot_reconstructions

        samples = SeededSamples(val_ds, eval_pipeline(preprocess))
        picked = sorted({round(i) for i in torch.linspace(0, len(val_ds) - 1, k).tolist()})
        good = [s for s in (samples[i] for i in picked) if s.error is None]
        if not good:
            return None
        device = self.env.device
        images = torch.stack([cast(torch.Tensor, s.image) for s in good]).to(device)  # no error: an image
        mask = self.val_masks(torch.tensor([s.index for s in good])).to(device)
        pictures = reconstruction_images(model, images, mask, preprocess.mean, preprocess.std)
        epoch = row["epoch"]
        path = out_dir / "reconstructions" / f"epoch{epoch:04d}.png"
        path.parent.mkdir(exist_ok=True)
        loss = f", val loss {row['val_loss']:.4f}" if row.get("val_loss") is not None else ""
        return plot_reconstructions(
            pictures,
            path,
            title=f"SimMIM epoch {epoch}{loss}: {self.masks.count} of {self.masks.squares} squares masked",
        )

    def describe(self, classes: list[str]) -> str:
        return f"SimMIM pretraining without labels: {self.masks.count} of {self.masks.squares} squares masked"


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, SimMIMPretraining)}


def task_for(cfg: Config) -> Task:
    """The task `train.task` names, made from `cfg`."""
    return TASKS[cfg.train.task](cfg)
