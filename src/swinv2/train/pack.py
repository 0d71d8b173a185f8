"""`swinv2 data pack`: any training source (class folders, a list file, unlabelled images) into shards.

1. Every image is decoded once (in `workers` processes); those that do not decode are left out and
   listed in the manifest (`skipped`), so training never meets them.
2. The good samples are put in a seeded order (a full shuffle, or for a source stored in groups a
   block shuffle that keeps its reads local) and cut into shards of `shard_samples`, so each shard
   holds a mix of classes.
3. Each shard is written by one process to a temp file, renamed into place, and recorded beside it
   (`.shard-NNNNNN.json`: samples, bytes, SHA-256, class counts). With `max_side`, an image whose
   shorter side is longer is resized to it (bicubic, antialiased) and stored as JPEG (quality 95);
   every other image is stored as its original bytes.
4. `manifest.json` is written last: a folder without it is a pack not finished.

A pack killed anywhere and run again with the same arguments keeps the shards it finished (each
checked against its record), writes the rest and ends with the same files, byte for byte, as a pack
never interrupted: members are written in key order with fixed times, owners and modes. A rerun
against a changed source, or other options, is refused naming what changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import DataError, InputError
from ..images import BadImageError
from ..outputs import atomic_write
from .datasets import Samples, block_order, sample_seed
from .shards import FORMAT, MANIFEST, VERSION, sample_key, shard_name
from .store import file_sha256

log = logging.getLogger(__name__)

PLAN = ".pack-plan.json"
JPEG_QUALITY = 95
EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "tiff": "tiff"}


@dataclass(frozen=True)
class PackOptions:
    shard_samples: int = 1000
    max_side: int | None = None  # shorter side bound (resize-on-write); None: bytes as they are
    seed: int = 0
    workers: int = 1


def _record_name(i: int) -> str:
    return f".{shard_name(i)}.json"


# --------------------------------------------------------------------------- per process

_SOURCE: Samples | None = None  # the source, inherited by forked workers


def _probe(index: int) -> tuple[int, str | None]:
    assert _SOURCE is not None
    try:
        _SOURCE.open(index)
        return index, None
    except BadImageError as e:
        return index, e.reason


def _encoded(source: Samples, index: int, max_side: int | None) -> tuple[bytes, str]:
    """(bytes, extension) of sample `index` as stored."""
    data = source.raw(index)
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        if max_side is None or min(im.size) <= max_side:
            return data, EXTENSIONS.get(fmt, fmt or "img")
    img = source.read(index)  # upright RGB, as training reads it
    w, h = img.size
    scale = max_side / min(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC, reducing_gap=None)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "jpg"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(job: tuple[int, list[int], int, str, int | None, bool]) -> dict[str, Any]:
    """Write shard `i` (source indices `members`, keys from `first`) into `out`; returns its record."""
    i, members, first, out, max_side, labelled = job
    assert _SOURCE is not None
    folder = Path(out)
    path = folder / shard_name(i)
    counts: dict[int, int] = {}

    def write(f: Any) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for k, index in enumerate(members):
                key = sample_key(first + k)
                data, ext = _encoded(_SOURCE, index, max_side)
                _member(tar, f"{key}.{ext}", data)
                if labelled:
                    label = _SOURCE.label_of(index)
                    counts[label] = counts.get(label, 0) + 1
                    _member(tar, f"{key}.cls", str(label).encode())
                meta = {"source": relative_name(_SOURCE, index)}
                _member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())

    atomic_write(path, write)
    record = {
        "name": path.name,
        "samples": len(members),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "class_counts": {str(k): v for k, v in sorted(counts.items())},
    }
    atomic_write(folder / _record_name(i), lambda f: f.write(json.dumps(record, sort_keys=True).encode()))
    return record


def _finished(folder: Path, i: int, n: int) -> dict[str, Any] | None:
    """The record of shard `i` if it was finished (record present, file of the recorded size and hash)."""
    try:
        record = json.loads((folder / _record_name(i)).read_text())
        path = folder / shard_name(i)
        if record["samples"] == n and path.stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]:
            return dict(record)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# --------------------------------------------------------------------------- the pack


def relative_name(source: Samples, index: int) -> str:
    """Sample `index`'s place relative to its source (what the manifest and the shards record): the same
    whatever path the source was named by."""
    where = source.where(index)
    for base in (getattr(source, "images", None), source.root):
        if base is None:
            continue
        for prefix in (f"{base}@/", f"{base}/"):
            if where.startswith(prefix):
                return where[len(prefix) :]
    return where


def source_digest(source: Samples) -> str:
    """SHA-256 over every sample's place and label: a changed source gives another digest."""
    h = hashlib.sha256()
    for i in range(len(source)):
        h.update(f"{relative_name(source, i)}\0{source.label_of(i)}\n".encode())
    return h.hexdigest()


def _pool(workers: int) -> Any:
    return multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None


def _map(pool: Any, fn: Any, jobs: Iterable[Any], chunksize: int = 1) -> Iterable[Any]:
    return pool.imap(fn, jobs, chunksize=chunksize) if pool is not None else map(fn, jobs)


def pack(source: Samples, out: str | os.PathLike, options: PackOptions, *, description: str = "") -> dict[str, Any]:
    """Pack `source` into the shard set `out` (see the module doc); returns the manifest."""
    global _SOURCE
    from tqdm import tqdm

    folder = Path(out)
    if options.shard_samples < 1:
        raise InputError(f"--shard-samples {options.shard_samples}: must be at least 1")
    if options.max_side is not None and options.max_side < 1:
        raise InputError(f"--max-side {options.max_side}: must be at least 1")
    labelled = bool(source.classes)
    digest = source_digest(source)
    settings = {"shard_samples": options.shard_samples, "max_side": options.max_side, "seed": options.seed}
    plan = {"source_digest": digest, "samples": len(source), "settings": settings}
    _claim(folder, plan)

    _SOURCE = source
    pool = _pool(options.workers)
    try:
        skipped = _skipped(folder, plan, pool, len(source))
        good = [i for i in range(len(source)) if i not in skipped]
        if not good:
            raise DataError(f"{description or source.root}: no image decodes; nothing to pack")
        groups = source.groups()
        seed = sample_seed(options.seed, 0x5041434B)  # "PACK"
        if groups is None:
            order = [good[j] for j in torch.randperm(len(good), generator=torch.Generator().manual_seed(seed)).tolist()]
        else:  # keep reads local: 64 of the source's groups at a time
            keep = set(good)
            order = [i for i in block_order(groups, 64, seed) if i in keep]
        k = options.shard_samples
        jobs = []
        records: dict[int, dict[str, Any]] = {}
        for i, first in enumerate(range(0, len(order), k)):
            members = order[first : first + k]
            done = _finished(folder, i, len(members))
            if done is not None:
                records[i] = done
            else:
                jobs.append((i, members, first, str(folder), options.max_side, labelled))
        if records:
            log.info("%s: %d shards already written, %d to go", folder, len(records), len(jobs))
        bar = tqdm(
            total=len(jobs) + len(records), initial=len(records), desc="shards", unit="shard", leave=False, disable=None
        )
        for record in _map(pool, _write_shard, jobs):
            bar.update(1)
            records[int(record["name"][len("shard-") : -len(".tar")])] = record
        bar.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _SOURCE = None

    counts = [0] * len(source.classes)
    for r in records.values():
        for label, n in r["class_counts"].items():
            counts[int(label)] += n
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "samples": len(order),
        "bytes": sum(r["bytes"] for r in records.values()),
        "classes": list(source.classes),
        "class_counts": counts,
        "shards": [{key: records[i][key] for key in ("name", "samples", "bytes", "sha256")} for i in sorted(records)],
        "shard_class_counts": [records[i]["class_counts"] for i in sorted(records)],
        "source": description or str(source.root),
        "source_digest": digest,
        "settings": settings,
        "skipped": [[relative_name(source, i), reason] for i, reason in sorted(skipped.items())],
    }
    atomic_write(folder / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    for i in records:
        (folder / _record_name(i)).unlink(missing_ok=True)
    (folder / PLAN).unlink(missing_ok=True)
    return manifest


def _claim(folder: Path, plan: dict[str, Any]) -> None:
    """Refuse a folder that holds anything but this same pack (finished or not); record the plan."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            done = json.loads(manifest.read_text())
            same = done.get("source_digest") == plan["source_digest"] and done.get("settings") == plan["settings"]
        except (OSError, ValueError):
            same = False
        if same:
            raise _UpToDate(str(folder))
        raise InputError(f"{folder}: holds another shard set (other source or settings); pack into a new folder")
    plan_file = folder / PLAN
    if plan_file.is_file():
        try:
            previous = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("source_digest") != plan["source_digest"]:
            raise InputError(
                f"{folder}: an unfinished pack of another source is there (the source changed since it began); "
                f"remove the folder or pack into a new one"
            )
        if previous.get("settings") != plan["settings"]:
            raise InputError(
                f"{folder}: an unfinished pack with settings {previous.get('settings')} is there; rerun it with "
                f"those, or pack into a new folder"
            )
        return
    ours = {p.name for p in folder.iterdir()}
    if ours:
        raise InputError(f"{folder}: not empty ({', '.join(sorted(ours)[:5])}); pack into a new folder")
    atomic_write(plan_file, lambda f: f.write(json.dumps(plan, sort_keys=True).encode()))


class _UpToDate(Exception):
    pass


def _skipped(folder: Path, plan: dict[str, Any], pool: Any, n: int) -> dict[int, str]:
    """{index: reason} of the samples that do not decode, found once and kept in the plan file."""
    plan_file = folder / PLAN
    try:
        saved = json.loads(plan_file.read_text())
        if "skipped" in saved:
            return {int(i): str(r) for i, r in saved["skipped"]}
    except (OSError, ValueError):
        pass
    from tqdm import tqdm

    skipped = {}
    for index, reason in tqdm(
        _map(pool, _probe, range(n), 64), total=n, desc="decode check", leave=False, disable=None
    ):
        if reason is not None:
            skipped[index] = reason
    if skipped:
        log.warning("%d images do not decode and are left out (listed in the manifest)", len(skipped))
    plan = {**plan, "skipped": sorted([i, r] for i, r in skipped.items())}
    atomic_write(plan_file, lambda f: f.write(json.dumps(plan, sort_keys=True).encode()))
    return skipped


def pack_or_report(source: Samples, out: str | os.PathLike, options: PackOptions, description: str) -> str:
    """`pack`, and the line the CLI prints."""
    try:
        m = pack(source, out, options, description=description)
    except _UpToDate:
        return f"{out}: already packed from this source with these settings"
    size = m["bytes"] / 2**20
    skipped = f"; {len(m['skipped'])} images left out (do not decode)" if m["skipped"] else ""
    return f"wrote {out}: {m['samples']} samples in {len(m['shards'])} shards, {size:.1f} MiB{skipped}"
