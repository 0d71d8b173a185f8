"""A loaded classifier shared by concurrent callers: what `swinv2 serve` puts behind HTTP.

The work of one prediction is split where it can overlap:

  * `prepare(bytes)`: decode (`decode.decode_upload`, the checks of an untrusted upload, then
    `images.load_image`) and the eval resize + centre crop (`images.eval_resize_crop`): in a pool of
    `workers` threads (PIL releases the GIL while it decodes and resizes), off the event loop;
  * `submit(crop)`: the crops of concurrent requests are batched (`batching.DynamicBatcher`), scaled and
    normalised as a batch (`images.normalize_images`) and run by the runtime (`runtime.load_runtime`:
    PyTorch, ONNX Runtime or OpenVINO) in the batcher's one thread; the softmax is taken in fp32.

These are `swinv2 predict`'s own steps and functions (`predict._batches`), so a served image gets the
top-k and probabilities the command line prints for the same file and runtime.

The service is framework-free and asyncio-free: `app.py` awaits its futures.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..images import eval_resize_crop, normalize_images
from ..model.transformer import SwinTransformerV2
from ..preprocess import EvalPreprocess
from ..weights.registry import describe_model
from .batching import DynamicBatcher
from .decode import DEFAULT_MAX_PIXELS, decode_upload
from .predict import class_names_for
from .runtime import Runtime, load_runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """How the model is run and batched (the `swinv2 serve` options of the same names)."""

    runtime: str = "auto"
    precision: str = "fp32"
    calib: str | None = None
    cache_dir: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None  # the runtime's threads (None: its default, every core)


@dataclass
class Scored:
    """One image's answer from its batch: softmax probabilities (C,), and the batch it ran in."""

    probs: torch.Tensor
    batch_size: int
    model_seconds: float


class Classifier:
    """`model` (a loaded classifier) served with `settings`; `load()` builds and warms the runtime.

    `weights` (the file the model came from) places the runtime's export cache beside it, as for
    `swinv2 predict`."""

    def __init__(
        self,
        model: SwinTransformerV2,
        prep: EvalPreprocess,
        settings: ServeSettings,
        *,
        weights: str | os.PathLike | None = None,
    ) -> None:
        self.model, self.prep, self.settings, self.weights = model, prep, settings, weights
        self.name = describe_model(model)
        self.class_names, self.class_names_from = class_names_for(model)
        self._resize_crop = eval_resize_crop(prep.img_size, prep.crop_pct, prep.interpolation)
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="swinv2-decode")
        self.runtime: Runtime | None = None
        self.batcher: DynamicBatcher | None = None
        self.on_batch: Any = None  # (size, seconds) -> None, for metrics; set before load()
        self._ready = threading.Event()

    # ----------------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        """Loaded and warmed up: predictions are answered at full speed."""
        return self._ready.is_set()

    def load(self, runtime: Runtime | None = None) -> None:
        """Build the runtime (`runtime.load_runtime`, or the one given), run it once at batch 1 and once at
        `max_batch` (first calls allocate and, for OpenVINO, compile for the shape), then start batching."""
        s = self.settings
        start = time.perf_counter()
        if s.threads:
            torch.set_num_threads(s.threads)  # process-wide: the model thread's calls use it too
        if runtime is None:
            runtime = load_runtime(
                self.model,
                s.runtime,
                s.precision,
                weights=self.weights,
                img_size=self.prep.img_size,
                calib=s.calib,
                cache_dir=s.cache_dir,
                threads=s.threads,
                batch_size=s.max_batch,
            )
        self.runtime = runtime
        loaded = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        for b in sorted({1, s.max_batch}):
            crops = torch.randint(
                0, 256, (b, 3, self.prep.img_size, self.prep.img_size), dtype=torch.uint8, generator=g
            )
            self._run_batch(list(crops))
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch=s.max_batch,
            max_wait_s=s.max_wait_ms / 1000,
            on_batch=self.on_batch,
            name="swinv2-model",
        )
        log.info(
            "serving %s on %s: loaded in %.1f s, warmed up in %.1f s",
            self.name,
            runtime.describe(),
            loaded - start,
            time.perf_counter() - loaded,
        )
        self._ready.set()

    def close(self, timeout: float | None = None) -> None:
        """Answer what is queued, stop the model thread and the decoding pool."""
        if self.batcher is not None:
            self.batcher.close(timeout)
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------- one prediction

    def prepare(self, data: bytes) -> torch.Tensor:
        """Upload bytes -> the (3, S, S) uint8 crop the model's batch is made of; `decode.UploadError`
        (415 / 422) for bytes that are not a usable image. Runs in `pool`."""
        return self._resize_crop(decode_upload(data, max_pixels=self.settings.max_pixels))

    def submit(self, crop: torch.Tensor) -> Future:
        """A Future of the crop's `Scored`, answered when its batch has run."""
        if self.batcher is None:
            raise RuntimeError("the classifier is not loaded")
        return self.batcher.submit(crop)

    def _run_batch(self, crops: Sequence[torch.Tensor]) -> list[Scored]:
        assert self.runtime is not None
        start = time.perf_counter()
        x = normalize_images(torch.stack(list(crops)), self.prep.mean, self.prep.std)
        probs = self.runtime(x).float().softmax(dim=-1)  # (B, C), in fp32 as predict takes it
        seconds = time.perf_counter() - start
        return [Scored(p, len(crops), seconds) for p in probs]

    def top(self, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        """The k most probable classes, highest first: [{"index", "label", "prob"}], as predict writes them."""
        p, idx = probs.topk(min(k, len(self.class_names)))
        return [{"index": i, "label": self.class_names[i], "prob": q} for q, i in zip(p.tolist(), idx.tolist())]

    # ----------------------------------------------------------------------- what it is

    def describe(self) -> dict[str, Any]:
        """The model card `GET /v1/model` returns."""
        p, s, rt = self.prep, self.settings, self.runtime
        return {
            "model": self.name,
            "num_classes": len(self.class_names),
            "classes": self.class_names,
            "class_names_from": self.class_names_from,
            "preprocessing": {
                "img_size": p.img_size,
                "crop_pct": p.crop_pct,
                "resize_size": p.resize_size,
                "interpolation": p.interpolation,
                "mean": list(p.mean),
                "std": list(p.std),
            },
            "runtime": rt.name if rt else None,
            "precision": rt.precision if rt else s.precision,
            "runtime_detail": rt.describe() if rt else f"loading ({s.runtime} {s.precision})",
            "batching": {
                "max_batch": s.max_batch,
                "max_wait_ms": s.max_wait_ms,
                "decode_workers": s.workers,
                "threads": s.threads,
            },
            "max_pixels": s.max_pixels,
            "ready": self.ready,
        }
