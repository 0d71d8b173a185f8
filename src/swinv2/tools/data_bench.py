"""Training-data throughput per worker: how many images per second one process turns from JPEG files
into training tensors, with each JPEG decoder available, side by side (`swinv2 bench --data DIR`).

Three stages, each timed over the same images with the same per-sample seeds (as `SeededSamples` seeds
them), so every decoder draws the same crops and augmentations:
  decode   the file to an RGB PIL image (full size; "pillow-reduced" has no row here: its reduction
           depends on the crop)
  crop     decode + the random-resized crop to the output size (timm's, bicubic)
  train    decode + the whole training transform (`train_transform`: crop, flip, RandAugment
           rand-m9-mstd0.5-inc1, to tensor, normalise, random erasing)

Decoders ("impl"):
  pillow          `images.load_image` (Pillow as installed; pillow-simd where it replaces Pillow)
  pillow-reduced  `TrainPipeline.read`: the crop box drawn from the JPEG header's size, the JPEG decoded
                  at 1/2, 1/4 or 1/8 in the DCT domain when the box stays at least the output size
                  (`images.load_image_reduced`); the default for JPEG training samples
  simplejpeg      simplejpeg.decode_jpeg (libjpeg-turbo), where installed
  turbojpeg       PyTurboJPEG (needs the system's libturbojpeg), where installed

The process runs one torch thread, as a DataLoader worker does. In each of `repeats` rounds every
decoder makes one pass over the images per stage and size, the decoders taking turns every `CHUNK`
images in a rotating order, so load from other processes meets them all alike; a row's img_per_s is
the median over rounds, its x_pillow the median of the per-round paired ratios to pillow (above 1:
faster).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..hardware import cpu_name
from ..images import load_image
from ..outputs import IMG_EXTENSIONS, write_output
from ..train.datasets import TrainPipeline, read_crop, sample_seed, seed_everything, train_transform

DECODERS = ("pillow", "pillow-reduced", "simplejpeg", "turbojpeg")
STAGES = ("decode", "crop", "train")
MAX_IMAGES = 500
CHUNK = 10  # images each decoder takes in its turn: load from other processes meets them all alike
# The images `--data samples` builds: ImageNet-like sizes (shorter side 300-500 px, JPEG quality 75-95)
# cut, flipped and scaled from scikit-learn's two sample photographs (427 x 640).
SAMPLE_COUNT = 500


def sample_jpegs(
    folder: str | os.PathLike, n: int = SAMPLE_COUNT, *, short_side: tuple[int, int] = (300, 500), seed: int = 0
) -> list[Path]:
    """`n` JPEGs in `folder` (made once; existing files of the same names are kept): random crops of
    at least half of each side of scikit-learn's sample photographs, flipped at random, scaled to a
    shorter side drawn from `short_side` (inclusive), saved at quality 75-95 with 4:2:0 chroma
    subsampling."""
    from sklearn.datasets import load_sample_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{k:04d}.jpg" for k in range(n)]
    if all(p.exists() for p in paths):
        return paths
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for k, path in enumerate(paths):
        photo = photos[k % len(photos)]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        short = int(rng.integers(short_side[0], short_side[1] + 1))
        f = short / min(cw, ch)
        img = img.resize((max(1, round(cw * f)), max(1, round(ch * f))), Image.Resampling.BICUBIC)
        img.save(path, quality=int(rng.integers(75, 96)), subsampling="4:2:0")
    return paths


def find_images(folder: str | os.PathLike, limit: int = MAX_IMAGES) -> list[Path]:
    """Up to `limit` image files under `folder` (any depth, sorted; evenly spaced when there are more)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--data: {root} is not a folder")
    found = sorted(
        Path(d) / f
        for d, _, files in os.walk(root)
        for f in files
        if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
    )
    if not found:
        raise InputError(f"--data: no image files ({', '.join(IMG_EXTENSIONS)}) under {root}")
    if len(found) > limit:
        found = [found[round(k * (len(found) - 1) / (limit - 1))] for k in range(limit)] if limit > 1 else found[:1]
    return found


# --------------------------------------------------------------------------- decoders


def _binding(name: str) -> Callable[[bytes], np.ndarray] | None:
    """The binding's bytes -> (H, W, 3) uint8 RGB decoder, or None where it is not installed/usable."""
    try:
        if name == "simplejpeg":
            import simplejpeg

            return lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")
        if name == "turbojpeg":
            from turbojpeg import TJPF_RGB, TurboJPEG

            tj = TurboJPEG()  # finds the system's libturbojpeg; raises where there is none
            return lambda data: tj.decode(data, pixel_format=TJPF_RGB)
    except (ImportError, OSError, RuntimeError):
        return None
    return None


def available_decoders() -> list[str]:
    return [d for d in DECODERS if d.startswith("pillow") or _binding(d) is not None]


def _reader(decoder: str) -> Callable[[Path], Image.Image]:
    """path -> full-size RGB image. A binding decodes JPEGs; another file, or a JPEG it refuses (CMYK,
    a bad file), goes to Pillow, as a data loader using it would."""
    if decoder.startswith("pillow"):
        return load_image
    decode = _binding(decoder)
    if decode is None:
        raise InputError(f"decoder {decoder} is not installed")

    def read(path: Path) -> Image.Image:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            try:
                return Image.fromarray(decode(path.read_bytes()))
            except (ValueError, OSError):
                pass
        return load_image(path)

    return read


def _step(decoder: str, stage: str, pipeline: TrainPipeline) -> Callable[[Path], Any]:
    """One sample of `stage` with `decoder`: path -> what that stage makes."""
    read = _reader(decoder)
    crop = pipeline.transforms[0]
    if stage == "decode":
        return read
    if decoder == "pillow-reduced":
        if stage == "crop":
            return lambda path: read_crop(path, crop)[0]
        return pipeline.read
    if stage == "crop":
        return lambda path: crop(read(path))
    return lambda path: pipeline(read(path))


# --------------------------------------------------------------------------- timing


def _pass(step: Callable[[Path], Any], paths: Sequence[Path], first: int = 0) -> float:
    """Seconds for one pass, each sample seeded as `SeededSamples` seeds it (sample k = first + its place)."""
    t0 = time.perf_counter()
    for k, path in enumerate(paths, first):
        seed_everything(sample_seed(0, 0, k))
        step(path)
    return time.perf_counter() - t0


def run(
    paths: Sequence[Path],
    *,
    img_sizes: Sequence[int] = (192, 256),
    decoders: Sequence[str] | None = None,
    stages: Sequence[str] = STAGES,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One dict per (stage, img_size, decoder): img_per_s (median over rounds), its extremes, x_pillow
    (median of per-round paired ratios to pillow; None without a pillow row), reductions (pillow-reduced
    crop rows: {reduction: number of images decoded at it}). Decode rows have img_size None and no
    pillow-reduced row."""
    decoders = list(decoders or available_decoders())
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    try:
        settings: list[tuple[str, int | None]] = [("decode", None)] if "decode" in stages else []
        settings += [(s, size) for s in stages if s != "decode" for size in img_sizes]
        results = []
        for stage, size in settings:
            pipeline = train_transform(size or 224)
            names = [d for d in decoders if not (stage == "decode" and d == "pillow-reduced")]
            steps = {d: _step(d, stage, pipeline) for d in names}
            for step in steps.values():  # warm-up: imports, caches
                _pass(step, paths[: min(8, len(paths))])
            times: dict[str, list[float]] = {d: [] for d in names}
            for rnd in range(repeats):
                spent = dict.fromkeys(names, 0.0)
                for c, first in enumerate(range(0, len(paths), CHUNK)):  # decoders take turns, chunk by chunk
                    turn = (rnd + c) % len(names)
                    for d in names[turn:] + names[:turn]:
                        spent[d] += _pass(steps[d], paths[first : first + CHUNK], first)
                for d in names:
                    times[d].append(spent[d])
            reduced = None
            if stage == "crop" and "pillow-reduced" in names:  # how often the crop let the JPEG decode reduced
                reductions = []
                for k, path in enumerate(paths):
                    seed_everything(sample_seed(0, 0, k))
                    reductions.append(read_crop(path, pipeline.transforms[0])[1])
                reduced = {str(r): reductions.count(r) for r in sorted(set(reductions))}
            for d in names:
                rates = [len(paths) / t for t in times[d]]
                ratios = [p / t for p, t in zip(times["pillow"], times[d])] if "pillow" in times else None
                results.append(
                    dict(
                        stage=stage,
                        img_size=size,
                        impl=d,
                        images=len(paths),
                        repeats=repeats,
                        img_per_s=statistics.median(rates),
                        img_per_s_min=min(rates),
                        img_per_s_max=max(rates),
                        x_pillow=None if ratios is None else statistics.median(ratios),
                        reductions=reduced if d == "pillow-reduced" else None,
                        seconds=times[d],
                    )
                )
        return results
    finally:
        torch.set_num_threads(torch_threads)


# --------------------------------------------------------------------------- reporting


def _versions() -> dict[str, Any]:
    import PIL

    env: dict[str, Any] = {"pillow": PIL.__version__}
    for lib in ("simplejpeg", "turbojpeg", "timm", "torchvision"):
        try:
            env[lib] = getattr(__import__(lib), "__version__", "installed")
        except ImportError:
            env[lib] = None
    return env


def environment() -> dict[str, Any]:
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=1,
        **_versions(),
    )


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per stage and size, a column per decoder: img/s (x pillow)."""
    impls = list(dict.fromkeys(r["impl"] for r in results))
    rows: dict[tuple[str, Any], dict[str, str]] = {}
    for r in results:
        cell = f"{r['img_per_s']:.0f}" + ("" if r["x_pillow"] is None else f" ({r['x_pillow']:.2f}x)")
        rows.setdefault((r["stage"], r["img_size"]), {})[r["impl"]] = cell
    what = {"decode": "decode", "crop": "decode + crop {s}", "train": "decode + train transform {s}"}
    lines = ["| images/s per worker | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for (stage, size), cells in rows.items():
        label = what[stage].format(s=f"{size} px")
        lines.append(f"| {label} | " + " | ".join(cells.get(d, "-") for d in impls) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, results: Sequence[dict[str, Any]], *, meta: dict[str, Any]) -> None:
    record = {"meta": {**environment(), **meta}, "results": list(results)}
    write_output(os.fspath(path), json.dumps(record, indent=1) + "\n")
