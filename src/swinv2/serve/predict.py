"""Using a trained model on image files: `predict` (files, folders, globs) and its picture
`save_prediction_grid`; the eval preprocessing of a loaded model (`resolve_preprocess`), which
`evaluate.evaluate_folder` shares.

Images are read with `images.load_image` (every PIL mode, EXIF rotation) and preprocessed with the
model's eval transform (`model.info.preprocess`, from the weights' metadata or the registry record). An
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import InputError
from ..images import BadImageError, eval_resize_crop, load_image, normalize_images, walk_folder
from ..model.transformer import SwinTransformerV2
from ..outputs import IMG_EXTENSIONS
from ..preprocess import EvalPreprocess
from ..weights.registry import model_info, require_classifier, resolve_preprocess

log = logging.getLogger(__name__)
T = TypeVar("T")

_GLOB_CHARS = frozenset("*?[")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, from torchvision's weights metadata."""
    from torchvision.models import Swin_V2_T_Weights

    return list(Swin_V2_T_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_for(model: nn.Module) -> tuple[list[str], str]:
    """(names, where they came from): the weights' own, ImageNet-1k for an unnamed 1000-class head,
    else the class indices as text."""
    swin = cast(SwinTransformerV2, model)  # typed as a Module for callers; a SwinV2 (or a wrapper of one) here
    names = model_info(swin).class_names
    n = swin.config.num_classes
    if names:
        return list(names), "weights"
    if n == 1000:
        return imagenet_class_names(), "imagenet-1k (torchvision)"
    return [str(i) for i in range(n)], "indices"


# --------------------------------------------------------------------------- predict


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[dict[str, str]]]:
    """Files named, image files under folders (recursive, sorted, hidden entries skipped, each real
    folder once: `images.walk_folder`) and glob matches (each real file once), in argument order without
    duplicates; plus an error record per argument that names nothing. Linked folders not followed are
    logged in one warning line; a folder that cannot be read is a DataError naming it."""
    files: list[str] = []
    errors: list[dict[str, str]] = []
    skipped: list[str] = []
    for arg in (os.fspath(p) for p in paths):
        if os.path.isdir(arg):
            found = []
            for dirpath, filenames in walk_folder(arg, seen=set(), skipped=skipped, hidden=lambda n: n.startswith(".")):
                found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                errors.append({"path": arg, "error": f"no image files ({', '.join(IMG_EXTENSIONS)}) in this folder"})
            files += found
        elif os.path.exists(arg):
            files.append(arg)  # named explicitly: tried whatever its extension
        elif _GLOB_CHARS & set(arg):
            found = _each_file_once(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append({"path": arg, "error": "no file matches this pattern"})
            files += found
        else:
            errors.append({"path": arg, "error": "file not found"})
    if skipped:
        log.warning(
            "%d linked folders not followed, each leads to a folder already read (a symlink loop, or a "
            "second link to the same images): %s",
            len(skipped),
            ", ".join(skipped),
        )
    return list(dict.fromkeys(files)), errors


def _each_file_once(paths: Iterator[str]) -> list[str]:
    """`paths` sorted, each real file (device, inode) once under its shortest path: `**` follows a
    symlink loop such as `ln -s . loop` about 40 levels deep, matching every file under it 40 times."""
    shortest: dict[tuple[int, int], str] = {}
    for p in paths:
        st = os.stat(p)
        key = (st.st_dev, st.st_ino)
        if key not in shortest or (p.count(os.sep), p) < (shortest[key].count(os.sep), shortest[key]):
            shortest[key] = p
    return sorted(shortest.values())


@dataclass
class PredictionSet:
    """What `predict` returns; `to_json()` is the documented JSON record (see module docstring)."""

    topk: int
    class_names_from: str
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    # (H, W, 3) uint8 thumbnails of the first images, in `results` order, for `save_prediction_grid`
    thumbnails: list[np.ndarray] = field(default_factory=list, repr=False)
    class_names: list[str] = field(default_factory=list, repr=False)  # the model's, in index order

    def to_json(self) -> dict[str, Any]:
        return {
            "topk": self.topk,
            "class_names_from": self.class_names_from,
            "results": self.results,
            "errors": self.errors,
        }


class _PredictSamples(Dataset):
    """(index) -> (path, (3, H, W) tensor or None, unreadable reason or None, (h, w, 3) thumbnail or None)."""

    def __init__(self, files: Sequence[str], transform, thumbnails: bool) -> None:
        self.files, self.transform, self.thumbnails = files, transform, thumbnails

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            img = load_image(path)
        except BadImageError as e:
            return path, None, e.reason, None
        thumb = None
        if self.thumbnails:
            small = img.copy()
            small.thumbnail((256, 256))
            thumb = np.asarray(small)
        return path, self.transform(img), None, thumb


def _batches(
    files: Sequence[str],
    prep: EvalPreprocess,
    batch_size: int,
    errors: list[dict[str, str]],
    thumbs: list[np.ndarray],
    n_thumbs: int,
    workers: int = 0,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(paths, (B, 3, H, W) float tensor) batches of the readable files, preprocessed by `prep`, in
    order; unreadable ones go to `errors`. Images are decoded, resized and cropped one by one (with
    `workers` > 0 in that many loader processes, overlapping the model), and scaled and normalised
    as a batch (`images.normalize_images`: the same values, in a fraction of the time). A batch holds the
    readable files of `batch_size` consecutive ones."""
    from torch.utils.data import DataLoader

    resize_crop = eval_resize_crop(prep.img_size, prep.crop_pct, prep.interpolation)
    loader = DataLoader(
        _PredictSamples(files, resize_crop, n_thumbs > 0), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    for items in loader:
        paths, tensors = [], []
        for path, x, reason, thumb in items:
            if x is None:
                log.debug("skipped %s: %s", path, reason)
                errors.append({"path": path, "error": reason})
                continue
            if thumb is not None and len(thumbs) < n_thumbs:
                thumbs.append(thumb)
            paths.append(path)
            tensors.append(x)
        if paths:
            yield paths, normalize_images(torch.stack(tensors), prep.mean, prep.std)


def one_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, each next one made in a background thread while the caller works on the current one.
    PIL's decoding and resizing and torch's ops release the GIL, so reading the next batch overlaps
    the model on this one. Leaving early waits for the item in progress; its error is raised here."""
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="swinv2-next-batch") as pool:
        pending = pool.submit(next, items, end)
        while (item := pending.result()) is not end:
            pending = pool.submit(next, items, end)
            yield cast(T, item)  # not `end`, so one of `items`


@torch.no_grad()
def predict(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    *,
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    preprocess: EvalPreprocess | None = None,
    thumbnails: int = 0,
    amp_dtype: torch.dtype | None = None,
    runtime: Any = None,
    workers: int = 0,
) -> PredictionSet:
    """Classify the images named by `paths` (files, folders, globs; see `expand_paths`).

    Each result holds the `topk` classes with their softmax probabilities (taken in fp32, also under
    `amp_dtype` autocast). Unreadable files and arguments that name nothing are in `.errors`, never
    fatal. `thumbnails` keeps that many small RGB arrays of the first readable images for a picture of
    the predictions. With `runtime` (a `runtime.Runtime`) the images run through it instead of `model`
    (which still gives the class names and preprocessing). The next batch is read while the model runs
    on the current one: in a background thread, from `workers` loader processes if above 0.
    """
    if topk < 1 or batch_size < 1:
        raise InputError("topk and batch_size must be at least 1")
    require_classifier(model)
    names, source = class_names_for(model)
    k = min(topk, len(names))
    prep = preprocess or resolve_preprocess(model)
    files, errors = expand_paths(paths)
    out = PredictionSet(k, source, errors=errors, class_names=names)
    device = torch.device(device)
    net = runtime if runtime is not None else model.eval().to(device)
    batches = _batches(files, prep, batch_size, out.errors, out.thumbnails, thumbnails, workers)
    for batch_paths, x in one_ahead(batches):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x.to(device))
        probs = logits.float().softmax(dim=-1)  # (B, C)
        p, idx = probs.topk(k, dim=-1)
        for path, pi, ii in zip(batch_paths, p.tolist(), idx.tolist()):
            out.results.append(
                {"path": path, "top": [{"index": i, "label": names[i], "prob": q} for q, i in zip(pi, ii)]}
            )
    return out


def grid_titles(paths: Sequence[str], *, max_chars: int = 40) -> list[str]:
    """Each path relative to the common folder of the images' parent folders: the parent folder (often
    the true class) always shows, and train/x/1.png stays apart from val/x/1.png. Long ones keep their end."""
    absolute = [os.path.abspath(p) for p in paths]
    base = os.path.commonpath([os.path.dirname(os.path.dirname(p)) for p in absolute])
    rel = [os.path.relpath(p, base) for p in absolute]
    return [r if len(r) <= max_chars else "…" + r[-(max_chars - 1) :] for r in rel]


def save_prediction_grid(preds: PredictionSet, path: str | os.PathLike) -> Path:
    """A picture of `preds`: the images kept as thumbnails with their top-k, each titled with its path
    (see `grid_titles`). Where an image's folder is named like one of the model's classes, that is taken
    as its true class and the title is marked right / wrong by the top-1 label. The figure's title says
    how many images are shown of how many classified, and how many of the marked ones are right."""
    from ..plots import plot_prediction_grid

    shown = preds.results[: len(preds.thumbnails)]
    width = min(24, max(len(t["label"]) for r in shown for t in r["top"]))
    captions = ["\n".join(f"{t['label'][:width]:<{width}} {100 * t['prob']:5.1f}%" for t in r["top"]) for r in shown]
    names = set(preds.class_names)
    truth = [os.path.basename(os.path.dirname(os.path.abspath(r["path"]))) for r in shown]
    correct = [r["top"][0]["label"] == t if t in names else None for r, t in zip(shown, truth)]
    n = len(preds.results)
    title = f"{n} image{'s' * (n > 1)}" if len(shown) == n else f"the first {len(shown)} of {n} images"
    marked = [c for c in correct if c is not None]
    if marked:
        title += f"; top-1 right for {sum(marked)} of the {len(marked)} whose folder names a class"
    return plot_prediction_grid(
        preds.thumbnails, captions, path, titles=grid_titles([r["path"] for r in shown]), correct=correct, title=title
    )
