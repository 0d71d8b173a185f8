"""Scenes of real handwritten digits for the detection and segmentation examples, and their metrics.

Each scene pastes 1..4 of scikit-learn's 8x8 handwritten digit scans (1797 real scans, shipped inside
scikit-learn, no download), upscaled 3x or 4x, at random non-overlapping places on a dark, slightly
noisy canvas. Because we paste them, the ground truth is exact: a digit's box is the tight box of its
ink, its mask the ink pixels. Train and val scenes draw from disjoint sets of scans, so a val digit
was never seen in training. Everything is seeded: the same arguments give the same scenes.

Class ids: 0 is background, digit d is d + 1 (torchvision detection and the segmentation loss both
reserve 0 for background).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from swinv2.outputs import write_output

NUM_CLASSES = 11  # background + 10 digits
CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
INK = 0.25  # an upscaled pixel brighter than this (of 1) is ink: it belongs to the mask and the box


@dataclass
class Scene:
    """One canvas: image (3, H, W) in [0, 1], boxes (n, 4) xyxy pixels, labels (n,) in 1..10, mask (H, W)."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    mask: Tensor


def split_scans(val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train scans and of the val scans: a seeded split by scan, so no val digit is
    ever pasted into a training scene."""
    order = np.random.default_rng(seed).permutation(len(load_digits().images))
    n_val = int(round(len(order) * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _upscaled(scan: np.ndarray, scale: int) -> Tensor:
    """An 8x8 scan (0..16) as a (8*scale, 8*scale) image in [0, 1], bilinear: smooth strokes."""
    x = torch.from_numpy(scan.astype(np.float32) / 16.0)[None, None]
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def _place(
    rng: np.random.Generator, size: int, side: int, taken: list[tuple[int, int, int]], tries: int = 50
) -> tuple[int, int] | None:
    """A top-left corner for a side x side patch that keeps a 2 px gap to every patch in `taken`."""
    for _ in range(tries):
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(
            y + side + 2 <= ty or ty + ts + 2 <= y or x + side + 2 <= tx or tx + ts + 2 <= x for ty, tx, ts in taken
        ):
            return y, x
    return None


def make_scene(
    rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, pool: np.ndarray, size: int, max_digits: int
) -> Scene:
    """One scene from the scans `pool` (indices into `images`); see the module docstring."""
    canvas = torch.from_numpy(rng.normal(0.08, 0.04, size=(size, size)).astype(np.float32)).clamp(0, 1)
    mask = torch.zeros(size, size, dtype=torch.int64)
    boxes, labels, taken = [], [], []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        scan = int(rng.choice(pool))
        digit = _upscaled(images[scan], int(rng.choice([3, 4]))) * float(rng.uniform(0.7, 1.0))
        side = digit.shape[0]
        corner = _place(rng, size, side, taken)
        if corner is None:
            continue
        y, x = corner
        taken.append((y, x, side))
        ink = digit > INK
        region = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = torch.maximum(region, digit)
        mask[y : y + side, x : x + side][ink] = int(targets[scan]) + 1
        rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
        boxes.append([x + cols[0].item(), y + rows[0].item(), x + cols[-1].item() + 1, y + rows[-1].item() + 1])
        labels.append(int(targets[scan]) + 1)
    return Scene(
        canvas.expand(3, -1, -1).contiguous(),
        torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        mask,
    )


def make_scenes(n: int, pool: np.ndarray, *, size: int = 96, max_digits: int = 4, seed: int = 0) -> list[Scene]:
    """`n` seeded scenes of `size` px built from the scans `pool` (see `split_scans`)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    return [make_scene(rng, digits.images, digits.target, pool, size, max_digits) for _ in range(n)]


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled index batches (the last, short batch dropped: steady step times)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine to zero: the schedule of both examples."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# --------------------------------------------------------------------------- the examples' run


def parse_args(argv: list[str] | None, *, doc: str, out: str, steps: int) -> argparse.Namespace:
    """The options both examples take."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-scenes", type=int, default=4000)
    p.add_argument("--val-scenes", type=int, default=300)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    # One thread: the steps are small, and a second thread loses more than it gains when the other
    # core is busy (measured: 0.5 s vs 0.9-2.8 s per detector step on a shared 2-core machine).
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def scenes_for(args: argparse.Namespace) -> tuple[list[Scene], list[Scene]]:
    """(train, val) scenes from disjoint sets of scans."""
    train_pool, val_pool = split_scans(seed=args.seed)
    return (
        make_scenes(args.train_scenes, train_pool, size=args.size, seed=args.seed + 1),
        make_scenes(args.val_scenes, val_pool, size=args.size, seed=args.seed + 2),
    )


def train(
    model: nn.Module,
    scenes: list[Scene],
    args: argparse.Namespace,
    step: Callable[[nn.Module, torch.optim.Optimizer, list[Scene]], float],
) -> list[float]:
    """`args.steps` steps of `step` with AdamW (weight decay 0.05) on warm-up + cosine; the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    rng, losses, start = np.random.default_rng(args.seed), [], time.perf_counter()
    while len(losses) < args.steps:
        for idx in batches(len(scenes), args.batch_size, rng):
            if len(losses) == args.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(len(losses), args.steps, args.lr, warmup=min(100, args.steps // 10 + 1))
            losses.append(step(model, optimizer, [scenes[i] for i in idx]))
            if len(losses) % 100 == 0 or len(losses) == args.steps:
                print(
                    f"step {len(losses)}/{args.steps}  loss {np.mean(losses[-100:]):.3f}  "
                    f"{time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    return losses


def write_metrics(out: Path, metrics: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_output(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


# --------------------------------------------------------------------------- metrics


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) IoU of xyxy boxes."""
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def average_precision(scores: list[float], hits: list[bool], n_true: int) -> float:
    """VOC all-point AP: the area under the precision-recall curve with precision made monotone."""
    if n_true == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.cumsum(np.asarray(hits, dtype=np.float64)[order]) if hits else np.zeros(0)
    recall = np.concatenate([[0.0], tp / n_true, [1.0]])
    precision = np.concatenate([[1.0], tp / np.arange(1, len(tp) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def mean_average_precision(
    predictions: list[dict[str, Tensor]], truths: list[Scene], iou: float = 0.5, num_classes: int = NUM_CLASSES
) -> tuple[float, list[float]]:
    """mAP@iou over the classes that occur in `truths`, and the AP per class (nan: class absent).

    Per class, detections of all images are ranked by score; each is a hit when it overlaps a
    still-unmatched true box of its class by >= `iou` (greedy, best overlap first), as in VOC.
    """
    per_class = []
    for c in range(1, num_classes):
        scores, hits, n_true = [], [], 0
        for pred, truth in zip(predictions, truths):
            true_boxes = truth.boxes[truth.labels == c]
            n_true += len(true_boxes)
            keep = pred["labels"] == c
            boxes, conf = pred["boxes"][keep], pred["scores"][keep]
            matched = torch.zeros(len(true_boxes), dtype=torch.bool)
            overlaps = box_iou(boxes, true_boxes) if len(true_boxes) else torch.zeros(len(boxes), 0)
            for j in torch.argsort(conf, descending=True, stable=True).tolist():
                ious = overlaps[j].masked_fill(matched, -1.0)
                best = int(ious.argmax()) if len(ious) else -1
                hit = best >= 0 and ious[best].item() >= iou
                if hit:
                    matched[best] = True
                scores.append(conf[j].item())
                hits.append(hit)
        per_class.append(average_precision(scores, hits, n_true))
    present = [ap for ap in per_class if not np.isnan(ap)]
    return float(np.mean(present)) if present else float("nan"), per_class


def confusion_matrix(pred: Tensor, truth: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """(num_classes, num_classes) pixel counts, rows = true class, columns = predicted class."""
    index = truth.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, object]:
    """mIoU (over the classes that occur in truth or prediction), pixel accuracy, IoU per class."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    return {
        "miou": iou[valid].mean().item(),
        "miou_digits": iou[1:][valid[1:]].mean().item(),
        "pixel_accuracy": (tp.sum() / cm.sum()).item(),
        "iou_per_class": iou.tolist(),
    }
