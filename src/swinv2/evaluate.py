"""`evaluate(model, loader)` -> named metrics: loss, top-1, top-5, count, throughput, confusion.

Works on any loader yielding `(images, labels, ...)` (a plain tuple, or `data.Batch`, whose extra
fields are ignored; its `bad` files are counted separately). Under `torch.distributed` each rank
evaluates its own shard and the sums are all-reduced, so every rank returns the metrics of the
whole set.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu",
             amp_dtype: torch.dtype | None = None, return_confusion: bool = False) -> dict[str, Any]:
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
            sums += torch.stack([
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ])
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
        out["confusion"] = confusion.cpu()
    return out


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n is None and hasattr(model, "module"):
        n = getattr(model.module, "num_classes", None)
    if n is None:
        raise ValueError("cannot tell the number of classes of the model for the confusion matrix")
    return int(n)
