"""Using a trained model on image files: `predict` (files, folders, globs) and `evaluate_folder`.

Both read images with `data.load_image` (every PIL mode, EXIF rotation) and preprocess them with the
model's eval transform (`model.preprocess`, from the weights' metadata or the registry record). An
unreadable file never stops the run: it is reported, with its reason, and skipped.

`predict` result, as `PredictionSet.to_json()` writes it (the fields `swinv2 predict --json` prints):
  {"topk": K, "class_names_from": "weights" | "imagenet-1k (torchvision)" | "indices",
   "results": [{"path": str, "top": [{"index": int, "label": str, "prob": float}, ...K]}, ...],
   "errors":  [{"path": str, "error": str}, ...]}
`prob` is the softmax probability (0..1) of the class; `top` is sorted by it, highest first.
"""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .data import IMG_EXTENSIONS, BadImageError, eval_transform, load_image, scan_class_folders
from .registry import EvalPreprocess

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, from torchvision's weights metadata."""
    from torchvision.models import Swin_V2_T_Weights

    return list(Swin_V2_T_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_for(model: nn.Module) -> tuple[list[str], str]:
    """(names, where they came from): the weights' own, ImageNet-1k for an unnamed 1000-class head,
    else the class indices as text."""
    names = getattr(model, "class_names", None)
    n = model.config.num_classes
    if names:
        return list(names), "weights"
    if n == 1000:
        return imagenet_class_names(), "imagenet-1k (torchvision)"
    return [str(i) for i in range(n)], "indices"


def resolve_preprocess(model: nn.Module, *, img_size: int | None = None, crop_pct: float | None = None,
                       interpolation: str | None = None) -> EvalPreprocess:
    """The model's eval preprocessing (its `preprocess` attribute, else its config's size with the
    official crop) with any given overrides applied."""
    prep = getattr(model, "preprocess", None)
    if prep is None:
        size = model.config.img_size[0]
        prep = EvalPreprocess(size, 1.0 if size >= 384 else 0.875)
    overrides = {k: v for k, v in dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation).items()
                 if v is not None}
    return replace(prep, **overrides)


def _transform(prep: EvalPreprocess):
    return eval_transform(prep.img_size, prep.crop_pct, prep.interpolation, mean=prep.mean, std=prep.std)


# --------------------------------------------------------------------------- predict


def expand_paths(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[dict[str, str]]]:
    """Files named, image files under folders (recursive, sorted, hidden entries skipped) and glob
    matches, in argument order without duplicates; plus an error record per argument that names
    nothing."""
    files: list[str] = []
    errors: list[dict[str, str]] = []
    for arg in map(os.fspath, paths):
        if os.path.isdir(arg):
            found = []
            for dirpath, dirnames, filenames in os.walk(arg, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                errors.append({"path": arg, "error": f"no image files ({', '.join(IMG_EXTENSIONS)}) in this folder"})
            files += found
        elif os.path.exists(arg):
            files.append(arg)  # named explicitly: tried whatever its extension
        elif _GLOB_CHARS & set(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append({"path": arg, "error": "no file matches this pattern"})
            files += found
        else:
            errors.append({"path": arg, "error": "file not found"})
    return list(dict.fromkeys(files)), errors


@dataclass
class PredictionSet:
    """What `predict` returns; `to_json()` is the documented JSON record (see module docstring)."""

    topk: int
    class_names_from: str
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    # (H, W, 3) uint8 thumbnails of the first images, in `results` order, for `plots.plot_prediction_grid`
    thumbnails: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"topk": self.topk, "class_names_from": self.class_names_from, "results": self.results,
                "errors": self.errors}


def _batches(files: Sequence[str], transform, batch_size: int, errors: list[dict[str, str]],
             thumbs: list[np.ndarray], n_thumbs: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(paths, (B, 3, H, W) tensor) batches of the readable files; unreadable ones go to `errors`."""
    paths: list[str] = []
    tensors: list[torch.Tensor] = []
    for path in files:
        try:
            img = load_image(path)
        except BadImageError as e:
            log.debug("skipped %s", e)
            errors.append({"path": path, "error": e.reason})
            continue
        if len(thumbs) < n_thumbs:
            thumb = img.copy()
            thumb.thumbnail((256, 256))
            thumbs.append(np.asarray(thumb))
        paths.append(path)
        tensors.append(transform(img))
        if len(paths) == batch_size:
            yield paths, torch.stack(tensors)
            paths, tensors = [], []
    if paths:
        yield paths, torch.stack(tensors)


@torch.no_grad()
def predict(model: nn.Module, paths: Sequence[str | os.PathLike], *, topk: int = 5, batch_size: int = 32,
            device: str | torch.device = "cpu", preprocess: EvalPreprocess | None = None,
            thumbnails: int = 0, amp_dtype: torch.dtype | None = None) -> PredictionSet:
    """Classify the images named by `paths` (files, folders, globs; see `expand_paths`).

    Each result holds the `topk` classes with their softmax probabilities (taken in fp32, also under
    `amp_dtype` autocast). Unreadable files and arguments that name nothing are in `.errors`, never
    fatal. `thumbnails` keeps that many small RGB arrays of the first readable images for a picture of
    the predictions.
    """
    if topk < 1 or batch_size < 1:
        raise ValueError("topk and batch_size must be at least 1")
    names, source = class_names_for(model)
    k = min(topk, len(names))
    transform = _transform(preprocess or resolve_preprocess(model))
    files, errors = expand_paths(paths)
    out = PredictionSet(k, source, errors=errors)
    device = torch.device(device)
    model = model.eval().to(device)
    for batch_paths, x in _batches(files, transform, batch_size, out.errors, out.thumbnails, thumbnails):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x.to(device))
        probs = logits.float().softmax(dim=-1)  # (B, C)
        p, idx = probs.topk(k, dim=-1)
        for path, pi, ii in zip(batch_paths, p.tolist(), idx.tolist()):
            out.results.append({"path": path, "top": [{"index": i, "label": names[i], "prob": q}
                                                      for q, i in zip(pi, ii)]})
    return out


# --------------------------------------------------------------------------- evaluate a class folder


def check_class_map(model_classes: Sequence[str] | None, num_classes: int, data_classes: Sequence[str], *,
                    weights: str, data: str) -> list[str]:
    """The class list that maps the data's folders to the model's outputs; raises on a mismatch.

    Weights with class names: every class folder must be one of them (a val folder may lack some).
    Weights without names (e.g. official .pth): the sorted folders ARE the class indices, so there
    must be exactly `num_classes` of them.
    """
    if model_classes is not None:
        unknown = [c for c in data_classes if c not in set(model_classes)]
        if unknown:
            shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise ValueError(f"class map mismatch: {data} has class folders {shown} that {weights} does not know "
                             f"(its {len(model_classes)} classes: {', '.join(list(model_classes)[:8])}"
                             f"{' ...' if len(model_classes) > 8 else ''})")
        return list(model_classes)
    if len(data_classes) != num_classes:
        raise ValueError(f"class map mismatch: {weights} has {num_classes} unnamed classes but {data} has "
                         f"{len(data_classes)} class folders; without class names in the weights the sorted "
                         f"folders must be exactly the model's classes")
    return list(data_classes)


class _EvalSamples(Dataset):
    """(index) -> data.Sample: the transformed image, or the unreadable file's (path, reason)."""

    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from .data import Sample

        path, label = self.dataset.samples[index]
        try:
            return Sample(self.transform(load_image(path)), label, index, None)
        except BadImageError as e:
            return Sample(None, label, index, (path, e.reason))


class _Reporting:
    """Iterates a loader of `data.Batch`es, remembering every unreadable file it reports."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.bad: list[dict[str, str]] = []

    def __iter__(self):
        for batch in self.loader:
            for path, reason in batch.bad:
                log.debug("skipped %s: %s", path, reason)
                self.bad.append({"path": path, "error": reason})
            yield batch


def evaluate_folder(model: nn.Module, data: str | os.PathLike, *, weights: str = "the weights",
                    batch_size: int = 64, workers: int = 0, device: str | torch.device = "cpu",
                    preprocess: EvalPreprocess | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Top-1 / top-5 / loss / per-class accuracy of `model` on the class folder `data`.

    Returns `evaluate`'s metrics (loss, top1, top5, n, img_per_s, skipped) plus "classes" (the
    model's class list), "confusion" (C x C list, rows = true class), "per_class" (one
    {"class", "n", "correct", "top1"} per class with images), "errors" (unreadable files) and
    "preprocess". `weights` names the weights in a class-map error.
    """
    from torch.utils.data import DataLoader

    from .data import ImageFolderDataset, collate
    from .evaluate import evaluate

    data = os.fspath(data)
    classes = check_class_map(getattr(model, "class_names", None), model.config.num_classes,
                              scan_class_folders(data), weights=weights, data=data)
    prep = preprocess or resolve_preprocess(model)
    dataset = ImageFolderDataset(data, class_names=classes)
    loader = _Reporting(DataLoader(_EvalSamples(dataset, _transform(prep)), batch_size=batch_size,
                                   num_workers=workers, collate_fn=collate))
    metrics = evaluate(model.to(device), loader, device=device, amp_dtype=amp_dtype, return_confusion=True)
    confusion = metrics.pop("confusion")
    correct = confusion.diag().tolist()
    counts = confusion.sum(dim=1).tolist()
    per_class = [{"class": c, "n": n, "correct": k, "top1": 100.0 * k / n}
                 for c, n, k in zip(classes, counts, correct) if n > 0]
    return {**metrics, "classes": classes, "confusion": confusion.tolist(), "per_class": per_class,
            "errors": loader.bad, "preprocess": asdict(prep)}


def save_eval_plots(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """confusion_matrix.png and per_class_accuracy.png of an `evaluate_folder` report in `out_dir`."""
    from .plots import plot_confusion_matrix, plot_per_class_accuracy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report["per_class"]
    return [
        plot_confusion_matrix(report["confusion"], report["classes"], out / "confusion_matrix.png"),
        plot_per_class_accuracy([r["top1"] for r in rows], [r["class"] for r in rows],
                                out / "per_class_accuracy.png", counts=[r["n"] for r in rows]),
    ]
