"""Training data as the trainer reads it: start-up at a million images, and loader throughput.

Start-up (`--startup N`, default 1,000,000): time from nothing to the first training batch of 64 for
  * a class-folder tree of N files (1,000 folders; every file a hard link to a real JPEG, so the
    scan meets N directory entries and the first batch decodes real images);
  * an official list file of the same N entries (`train_map.txt`, paths into that tree);
  * a shard set of N samples in 1,000 shards (its manifest lists every shard with its SHA-256; the
    shards the first batch reads are on disk, the others are listed but never opened before it).
  Each in a fresh process (`python -c`), so imports and the page cache's state are the same for all:
  `swinv2.train` imported, then dataset + `ShardedSampler` + `SeededSamples` + the first batch.

Throughput (`--jpegs DIR`, a class-folder tree of real photographs, e.g. 20,000 JPEGs made from
scikit-learn's sample photos): images/s of the training pipeline (decode, RandomResizedCrop 192,
RandAugment rand-m9-mstd0.5-inc1, random erasing, to tensor) through `make_loader` at 1 and 2 workers,
batch 64, over the folder, the list file (images in a zip, as the official zip mode) and shards
packed from it, each with plain Pillow decoding and with the DCT-domain downscale (`TrainPipeline`'s
reduced JPEG decode, the default); the best of `--rounds` passes over the first `--images` samples.

    python benchmarks/data_loading.py --jpegs DIR [--images 4000] [--rounds 2] [--startup 1000000]

Writes benchmarks/results/data_loading.{md,json}; work goes to runs/data_loading/ (reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")

FIRST_BATCH = """\
import sys, time, torch
t0 = time.perf_counter()
from swinv2.train.datasets import ImageFolderDataset, SeededSamples, ShardedSampler, make_loader
from swinv2.train.listfile import ListFileDataset
from swinv2.train.shards import ShardDataset
t_import = time.perf_counter() - t0
kind, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if kind == "folder":
    ds = ImageFolderDataset(path)
elif kind == "list":
    ds = ListFileDataset(path, sys.argv[3])
else:
    ds = ShardDataset(path, cache_dir=sys.argv[3])
t_index = time.perf_counter() - t0
sampler = ShardedSampler(len(ds), batch_size=64, seed=0, groups=ds.groups(), block=8)
loader = make_loader(SeededSamples(ds, lambda img: torch.zeros(1)), sampler, batch_size=64, workers=0)
batch = next(iter(loader))
total = time.perf_counter() - t0
print(f"{len(ds)} {t_import:.3f} {t_index:.3f} {total:.3f} {len(batch.indices)}")
"""


def _jpeg(size: int = 224) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def build_startup(work: Path, n: int) -> dict[str, Path]:
    """The N-entry folder (hard links), list file and shard set (the first block of shards on disk)."""
    import hashlib
    import io

    sys.path.insert(0, SRC)
    from swinv2.train.datasets import block_order
    from swinv2.train.shards import FORMAT, VERSION, sample_key, shard_name

    folders, per = 1000, n // 1000
    work.mkdir(parents=True, exist_ok=True)
    done = work / f".built-{n}"
    paths = {"folder": work / "folder", "list": work / "train_map.txt", "shards": work / "shards"}
    if done.exists():
        return paths
    data = _jpeg()
    lines = []
    for c in range(folders):
        d = paths["folder"] / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        original = work / "originals" / f"{c}.jpg"  # one per folder: a file takes at most 65,000 links
        original.parent.mkdir(exist_ok=True)
        original.write_bytes(data)
        for i in range(per):
            name = f"n{c:08d}_{i:06d}.JPEG"
            if not (d / name).exists():
                os.link(original, d / name)
            lines.append(f"n{c:08d}/{name}\t{c}\n")
    paths["list"].write_text("".join(lines))
    # shards: 1,000 of n/1,000 samples; those of the sampler's first block (seed 0, epoch 0) written
    shards = paths["shards"]
    shards.mkdir(exist_ok=True)
    groups = [per] * folders
    first = block_order(groups, 8, _epoch_seed(0, 0))[:64]
    needed = {i // per for i in first}
    records = []
    for s in range(folders):
        path = shards / shard_name(s)
        if s in needed:
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for k in range(per):
                    key = sample_key(s * per + k)
                    for ext, payload in (("jpg", data), ("cls", str(s % folders).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            sha, size = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
        else:
            sha, size = "0" * 64, 1
        records.append({"name": shard_name(s), "samples": per, "bytes": size, "sha256": sha})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "samples": n,
        "classes": [f"n{c:08d}" for c in range(folders)],
        "class_counts": [per] * folders,
        "shards": records,
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    done.touch()
    return paths


def _epoch_seed(seed: int, epoch: int) -> int:
    from swinv2.train.datasets import sample_seed

    return sample_seed(seed, epoch)


def startup(work: Path, n: int, rounds: int) -> list[dict]:
    paths = build_startup(work, n)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    rows = []
    for kind in ("folder", "list", "shards"):
        args = [kind, str(paths[kind])]
        if kind == "list":
            args.append(str(paths["folder"]))
        if kind == "shards":
            args.append(str(work / "cache"))
        best = None
        for _ in range(rounds):
            out = subprocess.run([sys.executable, "-c", FIRST_BATCH, *args], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            count, t_import, t_index, total, batch = out.stdout.split()
            row = {"source": kind, "samples": int(count), "index_s": float(t_index), "first_batch_s": float(total)}
            best = row if best is None or row["first_batch_s"] < best["first_batch_s"] else best
        rows.append(best)
        print(f"start-up {kind}: {best}", flush=True)
    return rows


def throughput(jpegs: Path, work: Path, images: int, rounds: int) -> list[dict]:
    sys.path.insert(0, SRC)
    import torch

    from swinv2.cli import main
    from swinv2.train.datasets import (
        ImageFolderDataset,
        SeededSamples,
        ShardedSampler,
        make_loader,
        train_transform,
    )
    from swinv2.train.listfile import ListFileDataset
    from swinv2.train.shards import ShardDataset

    folder = ImageFolderDataset(jpegs)
    listing, archive = work / "jpegs_map.txt", work / "jpegs.zip"
    if not archive.exists():
        names = [Path(p).relative_to(jpegs).as_posix() for p, _ in folder.samples]
        listing.write_text("".join(f"{n}\t{label}\n" for n, (_, label) in zip(names, folder.samples)))
        with zipfile.ZipFile(work / "tmp.zip", "w", zipfile.ZIP_STORED) as z:  # the official zips store JPEGs
            for n in names:
                z.write(jpegs / n, n)
        os.replace(work / "tmp.zip", archive)
    shards = work / "jpegs_shards"
    if not (shards / "manifest.json").exists():
        assert main(["data", "pack", str(jpegs), str(shards), "--workers", str(os.cpu_count() or 1)]) == 0
    sources = {
        "folder": folder,
        "list (zip)": ListFileDataset(listing, archive),
        "shards": ShardDataset(shards, cache_dir=work / "cache"),
    }
    transform = train_transform(192, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    torch.set_num_threads(1)
    rows = []
    for workers in (1, 2):
        for kind, ds in sources.items():
            for decoder, reduce in (("Pillow", False), ("Pillow, DCT downscale", True)):
                transform.reduce = reduce
                best = 0.0
                for r in range(rounds):
                    sampler = ShardedSampler(len(ds), batch_size=64, seed=r, groups=ds.groups(), block=8)
                    loader = make_loader(SeededSamples(ds, transform), sampler, batch_size=64, workers=workers)
                    it, n = iter(loader), 0
                    next(it)  # workers started, first shards fetched
                    t0 = time.perf_counter()
                    for batch in it:
                        n += len(batch.indices)
                        if n >= images:
                            break
                    best = max(best, n / (time.perf_counter() - t0))
                    del it, loader
                row = {"source": kind, "decoder": decoder, "workers": workers, "img_per_s": round(best, 1)}
                rows.append(row)
                print(f"throughput {row}", flush=True)
    return rows


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jpegs", type=Path, help="class folders of real JPEGs (throughput); omitted: start-up only")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--startup", type=int, default=1_000_000, help="entries of the start-up index (0: skip)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "data_loading")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    previous = args.out / "data_loading.json"  # a part not run this time keeps its last numbers
    result: dict = json.loads(previous.read_text()) if previous.exists() else {}
    result.update({"cpu": _cpu(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version()})
    if args.startup:
        result["startup"] = startup(args.work / "startup", args.startup, args.rounds)
    if args.jpegs:
        result["throughput"] = throughput(args.jpegs, args.work, args.images, args.rounds)
        result["jpegs"] = sum(1 for p in args.jpegs.rglob("*") if p.is_file())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_loading.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "data_loading.md").write_text(render(result))
    print(render(result))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def render(r: dict) -> str:
    lines = [f"CPU: {r['cpu']}, {r['cores']} cores. Command: `python benchmarks/data_loading.py`.", ""]
    if "startup" in r:
        lines += [
            "| source | samples | index built (s) | to the first batch of 64 (s) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {x['source']} | {x['samples']:,} | {x['index_s']:.2f} | {x['first_batch_s']:.2f} |"
            for x in r["startup"]
        ]
        lines.append("")
    if "throughput" in r:
        lines += [
            f"Training pipeline (decode, RandomResizedCrop 192, RandAugment m9, erasing), {r['jpegs']:,} JPEGs:",
            "",
            "| source | decoder | 1 worker (img/s) | 2 workers (img/s) |",
            "|---|---|---:|---:|",
        ]
        by = {(x["source"], x["decoder"], x["workers"]): x["img_per_s"] for x in r["throughput"]}
        for source, decoder in dict.fromkeys((x["source"], x["decoder"]) for x in r["throughput"]):
            lines.append(f"| {source} | {decoder} | {by[(source, decoder, 1)]:.0f} | {by[(source, decoder, 2)]:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main_()
