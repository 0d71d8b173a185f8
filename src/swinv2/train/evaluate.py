"""Evaluation: `evaluate(model, loader)` -> named metrics (loss, top-1, top-5, count, throughput,
confusion), and `evaluate_folder` -> the report of `swinv2 eval` on a class folder.

Works on any loader yielding `(images, labels, ...)` (a plain tuple, or `datasets.Batch`, whose extra
fields are ignored; its `bad` files are counted separately). Under `torch.distributed` each rank
evaluates its own shard and the sums are all-reduced, so every rank returns the metrics of the
whole set.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import InputError
from ..images import BadImageError, eval_pipeline, load_image
from ..preprocess import EvalPreprocess
from ..weights.registry import model_info, require_classifier, resolve_preprocess
from .datasets import ImageFolderDataset, Sample, collate, folder_warnings, scan_class_folders

if TYPE_CHECKING:
    from ..model.transformer import SwinTransformerV2

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    return_confusion: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` (put in eval mode, restored afterwards) on every batch of `loader`.

    Returns {"loss": mean cross-entropy, "top1", "top5": percent, "n": images, "img_per_s",
    "skipped": unreadable files reported by the loader} and, with `return_confusion`,
    "confusion": a (C, C) int64 tensor, rows = true class, columns = predicted class. With fewer
    than 5 classes "top5" is top-C (100%). Images of a batch are (B, 3, H, W); labels (B,) int64.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # Sums in float64 on the device: exact counts, and one all-reduce at the end.
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits, n
    confusion = None
    skipped = 0
    start = time.perf_counter()
    try:
        for batch in loader:
            images, labels = batch[0], batch[1]
            skipped += len(getattr(batch, "bad", ()))
            if labels.numel() == 0:
                continue
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()  # (B, C)
            num_classes = logits.shape[1]
            k = min(5, num_classes)
            topk = logits.topk(k, dim=1).indices  # (B, k)
            hits = topk == labels[:, None]
            sums += torch.stack(
                [
                    F.cross_entropy(logits, labels, reduction="sum").double(),
                    hits[:, 0].sum().double(),
                    hits.any(dim=1).sum().double(),
                    torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
                ]
            )
            if return_confusion:
                if confusion is None:
                    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
                flat = labels * num_classes + topk[:, 0]
                confusion += torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)
    finally:
        model.train(was_training)
    if return_confusion and confusion is None:  # no batch here (an empty shard); other ranks may have some
        n_cls = _num_classes(model)
        confusion = torch.zeros(n_cls, n_cls, dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        if return_confusion:
            assert confusion is not None  # made above, batches or not
            dist.all_reduce(confusion)
        t = torch.tensor([float(skipped)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        skipped = int(t.item())
    elapsed = time.perf_counter() - start
    loss_sum, top1, top5, n = sums.tolist()
    out: dict[str, Any] = {
        "loss": loss_sum / n if n else float("nan"),
        "top1": 100.0 * top1 / n if n else float("nan"),
        "top5": 100.0 * top5 / n if n else float("nan"),
        "n": int(n),
        "img_per_s": n / elapsed if elapsed > 0 else 0.0,
        "skipped": skipped,
    }
    if return_confusion:
        assert confusion is not None  # made above, batches or not
        out["confusion"] = confusion.cpu()
    return out


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n is None and hasattr(model, "module"):
        n = getattr(model.module, "num_classes", None)
    if n is None:
        raise ValueError("cannot tell the number of classes of the model for the confusion matrix")
    return int(n)


# --------------------------------------------------------------------------- evaluate a class folder


def check_class_map(
    model_classes: Sequence[str] | None, num_classes: int, data_classes: Sequence[str], *, weights: str, data: str
) -> list[str]:
    """The class list that maps the data's folders to the model's outputs; raises on a mismatch.

    Weights with class names: every class folder must be one of them (a val folder may lack some).
    Weights without names (e.g. official .pth): the sorted folders ARE the class indices, so there
    must be exactly `num_classes` of them.
    """
    if model_classes is not None:
        unknown = [c for c in data_classes if c not in set(model_classes)]
        if unknown:
            shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise InputError(
                f"class map mismatch: {data} has class folders {shown} that {weights} does not know "
                f"(its {len(model_classes)} classes: {', '.join(list(model_classes)[:8])}"
                f"{' ...' if len(model_classes) > 8 else ''})"
            )
        return list(model_classes)
    if len(data_classes) != num_classes:
        raise InputError(
            f"class map mismatch: {weights} has {num_classes} unnamed classes but {data} has "
            f"{len(data_classes)} class folders; without class names in the weights the sorted "
            f"folders must be exactly the model's classes"
        )
    return list(data_classes)


class _EvalSamples(Dataset):
    """(index) -> data.Sample: the transformed image, or the unreadable file's (path, reason)."""

    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        path, label = self.dataset.samples[index]
        try:
            return Sample(self.transform(load_image(path)), label, index, None)
        except BadImageError as e:
            return Sample(None, label, index, (path, e.reason))


class _Reporting:
    """Iterates a loader of `datasets.Batch`es, remembering every unreadable file it reports."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.bad: list[dict[str, str]] = []

    def __iter__(self):
        for batch in self.loader:
            for path, reason in batch.bad:
                log.debug("skipped %s: %s", path, reason)
                self.bad.append({"path": path, "error": reason})
            yield batch


class _Recording(nn.Module):
    """`net` that keeps a CPU copy of every batch's logits (for comparing two runs of one loader)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.logits.append(out.detach().float().cpu())
        return out


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How closely (N, C) `logits` follow (N, C) `reference`: top-1 agreement in percent (share of
    images whose top-1 class is the same) and max / mean |difference|."""
    diff = (logits - reference).abs()
    same = (logits.argmax(dim=1) == reference.argmax(dim=1)).double().mean().item() if len(logits) else float("nan")
    return {
        "top1_agreement": 100.0 * same,
        "max_abs_logit_diff": float(diff.max()) if diff.numel() else 0.0,
        "mean_abs_logit_diff": float(diff.mean()) if diff.numel() else 0.0,
    }


def evaluate_folder(
    model: nn.Module,
    data: str | os.PathLike,
    *,
    weights: str = "the weights",
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    preprocess: EvalPreprocess | None = None,
    amp_dtype: torch.dtype | None = None,
    runtime: Any = None,
    compare_fp32: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 / loss / per-class accuracy of `model` on the class folder `data`.

    Returns `evaluate`'s metrics (loss, top1, top5, n, img_per_s, skipped; "top5" is None for a model
    of 5 classes or fewer, where it would be 100% whatever the model does) plus "classes" (the
    model's class list), "confusion" (C x C list, rows = true class), "per_class" (one
    {"class", "n", "correct", "top1"} per class with images), "empty_classes" (class folders without
    images), "warnings" (the class-folder lines, also logged), "errors" (unreadable files) and
    "preprocess". Class folders are read as in training (`datasets.ImageFolderDataset`: hidden folders are
    never classes, an empty folder keeps its class slot) and reported with the same lines
    (`datasets.folder_warnings`). `weights` names the weights in a class-map error.

    With `runtime` (a `runtime.Runtime`) the images run through it instead of `model`. With
    `compare_fp32` the PyTorch fp32 `model` evaluates the same images too, and "fp32" holds its
    top1 and img_per_s, "top1_delta" (this run's top-1 minus fp32's, points) and `agreement`'s
    fields (top-1 agreement, max / mean |logit difference|).
    """
    from torch.utils.data import DataLoader

    data = os.fspath(data)
    require_classifier(model, weights)
    swin = cast("SwinTransformerV2", model)  # typed as a Module for callers, as in weights.registry
    classes = check_class_map(
        model_info(swin).class_names, swin.config.num_classes, scan_class_folders(data), weights=weights, data=data
    )
    prep = preprocess or resolve_preprocess(model)
    dataset = ImageFolderDataset(data, class_names=classes)
    warnings = folder_warnings(dataset, training=False)
    for w in warnings:
        log.warning("%s", w)
    loader = _Reporting(
        DataLoader(
            _EvalSamples(dataset, eval_pipeline(prep)), batch_size=batch_size, num_workers=workers, collate_fn=collate
        )
    )
    net = runtime.as_module() if runtime is not None else model.to(device)
    if compare_fp32:
        net = _Recording(net)
    metrics = evaluate(net, loader, device=device, amp_dtype=amp_dtype, return_confusion=True)
    if compare_fp32:
        ref = _Recording(model.float().to(device))
        fp32 = evaluate(ref, loader.loader, device=device)  # the same images; unreadable ones reported once
        metrics["fp32"] = {
            "top1": fp32["top1"],
            "img_per_s": fp32["img_per_s"],
            "top1_delta": metrics["top1"] - fp32["top1"],
            **agreement(
                torch.cat(cast(_Recording, net).logits or [torch.zeros(0, 0)]),
                torch.cat(ref.logits or [torch.zeros(0, 0)]),
            ),
        }
    if swin.config.num_classes <= 5:
        metrics["top5"] = None
    confusion = metrics.pop("confusion")
    correct = confusion.diag().tolist()
    counts = confusion.sum(dim=1).tolist()
    per_class = [
        {"class": c, "n": n, "correct": k, "top1": 100.0 * k / n} for c, n, k in zip(classes, counts, correct) if n > 0
    ]
    return {
        **metrics,
        "classes": classes,
        "confusion": confusion.tolist(),
        "per_class": per_class,
        "empty_classes": dataset.empty_classes,
        "warnings": warnings,
        "errors": loader.bad,
        "preprocess": asdict(prep),
    }


def save_eval_plots(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """confusion_matrix.png and per_class_accuracy.png of an `evaluate_folder` report in `out_dir`."""
    from ..plots import plot_confusion_matrix, plot_per_class_accuracy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report["per_class"]
    return [
        plot_confusion_matrix(report["confusion"], report["classes"], out / "confusion_matrix.png"),
        plot_per_class_accuracy(
            [r["top1"] for r in rows],
            [r["class"] for r in rows],
            out / "per_class_accuracy.png",
            counts=[r["n"] for r in rows],
        ),
    ]
