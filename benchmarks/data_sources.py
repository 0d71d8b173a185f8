"""Sharded streaming data sources compared on resume, sample-once, shuffle, throughput and S3.

Candidates: MosaicML ``streaming`` (MDS), Hugging Face ``datasets`` (parquet, streaming IterableDataset with
``split_dataset_by_node`` and torchdata's ``StatefulDataLoader``), ``webdataset`` (tar pipeline) and ``wids``
(its random-access dataset), ``litdata``, and a baseline: a map-style index over the same tar shards (byte
offsets found by scanning the tar headers) read with ``os.pread``, in an order that is a pure function of
(seed, epoch) computed by the caller (shards permuted, samples shuffled within blocks of shards, rank r takes
positions r::R) and resumed from a position.

Criteria (one subprocess per library run, each time-boxed):
1. exact mid-epoch resume (save state after k samples, restore in a fresh process, compare to a full epoch),
2. every sample exactly once per epoch at world sizes 1-3 with 1-2 workers (ranks run side by side as
   separate processes, given rank/world size the way each library documents),
3. shuffle quality of the first 1,000 samples (distinct shards, lag-1 correlation of shard ids),
4. loader throughput (JPEG decode + RandomResizedCrop(192) + ToTensor, batch 64, 1 and 2 workers),
5. reading from s3:// on a local moto server (127.0.0.1).

Set up its venv (torch comes from local wheels; the libraries from PyPI; it must not be the project's venv):

    python3 -m venv /work/scratch/dataenv
    /work/scratch/dataenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/scratch/dataenv/bin/pip install mosaicml-streaming datasets webdataset wids litdata torchdata \
        'moto[server]' boto3 s3fs scikit-learn
    # mosaicml-streaming 0.13 imports transformers<5, which refuses the huggingface-hub 2.x that datasets 5.x
    # pulls in; upgrading transformers (pip then warns about streaming's pin) makes both importable:
    /work/scratch/dataenv/bin/pip install -U transformers

Run (``--make-jpegs N`` first writes N JPEGs made from scikit-learn's sample photographs if DIR is empty):

    /work/scratch/dataenv/bin/python benchmarks/data_sources.py --jpegs /work/scratch/jpegs \
        --out benchmarks/results --make-jpegs 20011
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SEED = 1234
SHARD = 250  # samples per shard in every format
ID_BATCH = 16  # batch size of the resume / sample-once runs
TP_BATCH = 64  # batch size of the throughput runs
S3_SAMPLES = 2000  # samples read through s3:// (moto is slow; this checks that reading works)
LIBS = ["streaming", "hf_datasets", "webdataset", "wids", "litdata", "baseline"]
HERE = Path(__file__).resolve()
NOTES = [
    "Install: mosaicml-streaming 0.13.0 needs transformers<5; next to datasets 5.2.0 (huggingface-hub 2.4.0) "
    "transformers 4.57.6 refuses to import ('huggingface-hub>=0.34.0,<1.0 is required ... found "
    "huggingface-hub==2.4.0'), which breaks `import streaming`. Upgrading transformers to 5.x makes it import "
    "(pip warns about streaming's pin); streaming passed every test here with it.",
    "Install: webdataset 1.0.2 no longer contains `wids`; it is the separate PyPI package `wids` (0.1.11).",
    "Install: s3fs pulled botocore 1.43.x below boto3 1.44's pin (pip warning); boto3 still worked here.",
    "Ranks ran as concurrent processes with torchrun-style env vars (RANK, WORLD_SIZE, LOCAL_RANK, "
    "LOCAL_WORLD_SIZE, GLOBAL_RANK, NNODES=1); hf_datasets got rank/world through split_dataset_by_node, wids "
    "through an initialised gloo group (its DistributedChunkedSampler falls back to 1 replica without one), the "
    "baseline through its sampler's arguments. World-1 rows of criterion 2 are the resume reference epochs.",
    "Shards hold samples in class-folder order (about 2.5 classes per shard), as a class-sorted ImageNet tree "
    "would be written: the worst case for shard-local shuffling.",
    "Settings: streaming defaults (py1e shuffle, shuffle_seed, batch_size given); hf_datasets shuffle(seed, "
    "buffer_size=1000); webdataset shardshuffle=1000 + shuffle(1000, seed); wids DistributedChunkedSampler "
    "(chunksize=1000, as in its README example); litdata shuffle=True, seed; baseline blocks of 4 shards.",
    "litdata over s3:// failed: its obstore path answered 'Generic S3 error: Error performing GET "
    "http://127.0.0.1:5077/... HTTP error: builder error' even with AWS_ALLOW_HTTP=true; no https endpoint tried.",
    "s3 reads: the baseline issues one ranged GET per sample; webdataset and wids fetch whole shards through a "
    "`pipe:` command (this script's --s3cat, boto3): webdataset 1.0.2 has no s3 scheme and wids' s3 handler calls "
    "the aws CLI, which is not installed. streaming used S3_ENDPOINT_URL, hf_datasets s3fs storage_options.",
    "Throughput ran from the page cache (all formats fit in RAM), on 2 cores shared with other work: "
    "treat differences under about 15% as noise.",
]


# ----------------------------------------------------------------------------------------------- data making
def _make_one(args: tuple[int, int, int, str]) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    i, cls, seed, path = args
    global _SOURCES
    if "_SOURCES" not in globals():
        _SOURCES = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed * 1_000_003 + i)
    src = _SOURCES[rng.randrange(len(_SOURCES))]
    w, h = src.size
    frac = rng.uniform(0.35, 1.0)
    cw, ch = max(32, int(w * frac * rng.uniform(0.8, 1.0))), max(32, int(h * frac * rng.uniform(0.8, 1.0)))
    x0, y0 = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
    img = src.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    short = rng.randint(160, 400)
    scale = short / min(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
    img.save(path, quality=rng.randint(85, 95))


def make_jpegs(root: Path, n: int, seed: int = SEED, classes: int = 100) -> None:
    from multiprocessing import Pool

    jobs = []
    for i in range(n):
        cls = i % classes
        d = root / f"c{cls:03d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((i, cls, seed, str(d / f"img{i:06d}.jpg")))
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_make_one, jobs, chunksize=256)


def listing(root: Path) -> list[tuple[str, int]]:
    """(path, class) in class-folder order: the sample id is the position in this list."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(str(f), c) for c, name in enumerate(classes) for f in sorted((root / name).glob("*.jpg"))]


# ------------------------------------------------------------------------------------------------- building
def build(jpegs: Path, work: Path) -> dict:
    items = listing(jpegs)
    n = len(items)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shard_of: dict[str, list[int]] = {}
    blobs = [(Path(p).read_bytes(), c) for p, c in items]
    nshards = (n + SHARD - 1) // SHARD
    # tar shards, WebDataset layout: <key>.jpg, <key>.cls
    (work / "tar").mkdir(exist_ok=True)
    for s in range(nshards):
        with tarfile.open(work / "tar" / f"shard-{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s * SHARD, min(n, (s + 1) * SHARD)):
                for ext, data in (("jpg", blobs[i][0]), ("cls", str(blobs[i][1]).encode())):
                    ti = tarfile.TarInfo(f"{i:08d}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
                    tf.addfile(ti, io.BytesIO(data))
    shard_of["tar"] = [i // SHARD for i in range(n)]
    # baseline index: scan the 512-byte tar headers for each member's data offset
    shard_col, off_col, size_col, cls_col = [], [], [], []
    for s in range(nshards):
        with open(work / "tar" / f"shard-{s:05d}.tar", "rb") as f:
            pos = 0
            while True:
                f.seek(pos)
                hdr = f.read(512)
                if len(hdr) < 512 or hdr == b"\0" * 512:
                    break
                name = hdr[:100].rstrip(b"\0").decode()
                size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
                if name.endswith(".jpg"):
                    shard_col.append(s)
                    off_col.append(pos + 512)
                    size_col.append(size)
                elif name.endswith(".cls"):
                    f.seek(pos + 512)
                    cls_col.append(int(f.read(size)))
                pos += 512 + (size + 511) // 512 * 512
    np.savez(work / "tar_index.npz", shard=shard_col, offset=off_col, size=size_col, cls=cls_col)
    # parquet, one file (one row group) per shard
    import pyarrow as pa
    import pyarrow.parquet as pq

    (work / "parquet").mkdir(exist_ok=True)
    for s in range(nshards):
        ids = list(range(s * SHARD, min(n, (s + 1) * SHARD)))
        table = pa.table(
            {"id": ids, "cls": [blobs[i][1] for i in ids], "jpg": pa.array([blobs[i][0] for i in ids], pa.binary())}
        )
        pq.write_table(table, work / "parquet" / f"part-{s:05d}.parquet", row_group_size=SHARD)
    shard_of["parquet"] = shard_of["tar"]
    # MDS: shards are cut by bytes; aim at SHARD samples per shard
    from streaming import MDSWriter

    avg = sum(len(b) for b, _ in blobs) / n
    with MDSWriter(
        out=str(work / "mds"), columns={"id": "int", "cls": "int", "jpg": "bytes"}, size_limit=int(avg * SHARD)
    ) as w:
        for i, (b, c) in enumerate(blobs):
            w.write({"id": i, "cls": c, "jpg": b})
    idx = json.loads((work / "mds" / "index.json").read_text())
    shard_of["mds"] = [s for s, sh in enumerate(idx["shards"]) for _ in range(sh["samples"])]
    # litdata: optimize() with chunk_size=SHARD samples
    import litdata

    litdata.optimize(
        fn=_lit_item,
        inputs=[(i, p, c) for i, (p, c) in enumerate(items)],
        output_dir=str(work / "litdata"),
        chunk_size=SHARD,
        num_workers=1,
    )
    lidx = json.loads((work / "litdata" / "index.json").read_text())
    lit_order = [s for s, ch in enumerate(lidx["chunks"]) for _ in range(ch["chunk_size"])]
    # check that litdata kept the input order (unshuffled pass), so chunk k holds ids of its cumulative range
    ds = litdata.StreamingDataset(input_dir=str(work / "litdata"), shuffle=False)
    seen = [int(ds[i]["id"]) for i in range(len(ds))]
    assert seen == list(range(n)), "litdata reordered the samples"
    shard_of["litdata"] = lit_order
    (work / "shard_of.json").write_text(json.dumps(shard_of))
    (work / "meta.json").write_text(json.dumps({"n": n, "cls": [c for _, c in items], "nshards": nshards}))
    return {
        "n": n,
        "build_s": time.perf_counter() - t0,
        "shards": {k: max(v) + 1 for k, v in shard_of.items()},
        "bytes_total": sum(len(b) for b, _ in blobs),
    }


def _lit_item(item: tuple[int, str, int]) -> dict:
    i, path, cls = item
    return {"id": i, "cls": cls, "jpg": Path(path).read_bytes()}


# ------------------------------------------------------------------------------------------- common helpers
def _sid(s) -> int:
    if "id" in s:
        return int(s["id"])
    return int(s["__key__"])


def _jpg(s) -> bytes:
    for k in ("jpg", ".jpg"):
        if k in s:
            v = s[k]
            return v.getvalue() if hasattr(v, "getvalue") else v  # wids hands out BytesIO
    raise KeyError(list(s))


def ids_collate(batch: list):
    import torch

    return torch.tensor([_sid(s) for s in batch])  # a tensor: StreamingDataLoader counts samples with len()


class DecodeCollate:
    """Decode JPEG + RandomResizedCrop(192) + ToTensor; runs in the DataLoader worker."""

    def __init__(self) -> None:
        import torchvision.transforms as T

        self.t = T.Compose([T.RandomResizedCrop(192), T.ToTensor()])

    def __call__(self, batch: list):
        import torch
        from PIL import Image

        xs = [self.t(Image.open(io.BytesIO(_jpg(s))).convert("RGB")) for s in batch]
        return torch.stack(xs), torch.tensor([_sid(s) for s in batch])


def _env_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class TarIndexDataset:
    """Baseline: map-style reads by byte offset into the tar shards (fds opened lazily per worker)."""

    def __init__(self, work: Path, base: str | None = None) -> None:
        z = np.load(work / "tar_index.npz")
        self.shard, self.offset, self.size, self.cls = z["shard"], z["offset"], z["size"], z["cls"]
        self.paths = sorted(str(p) for p in (work / "tar").glob("shard-*.tar"))
        self.base = base  # "s3://bucket/prefix": ranged GETs instead of pread
        self._fds: dict[int, int] = {}
        self._s3 = None

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> dict:
        s, off, size = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        if self.base:
            if self._s3 is None:
                import boto3

                self._s3 = boto3.client("s3")
            bucket, _, prefix = self.base[5:].partition("/")
            key = f"{prefix}/{Path(self.paths[s]).name}"
            data = self._s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + size - 1}")["Body"].read()
        else:
            fd = self._fds.get(s)
            if fd is None:
                fd = self._fds[s] = os.open(self.paths[s], os.O_RDONLY)
            data = os.pread(fd, size, off)
        return {"id": i, "cls": int(self.cls[i]), "jpg": data}


def block_order(shard_of: np.ndarray, seed: int, epoch: int, block: int = 4) -> np.ndarray:
    """Global order of an epoch: shards permuted, samples shuffled within blocks of `block` shards."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    nshards = int(shard_of.max()) + 1
    members = [np.flatnonzero(shard_of == s) for s in range(nshards)]
    perm = torch.randperm(nshards, generator=g).tolist()
    out = []
    for b in range(0, nshards, block):
        ids = np.concatenate([members[s] for s in perm[b : b + block]])
        out.append(ids[torch.randperm(len(ids), generator=g).numpy()])
    return np.concatenate(out)


class BlockSampler:
    """Rank r takes positions r::R of the seeded global order, starting at this rank's position `start`."""

    def __init__(self, shard_of: np.ndarray, seed: int, epoch: int, rank: int, world: int, start: int = 0) -> None:
        self.local = block_order(shard_of, seed, epoch)[rank::world][start:]

    def __iter__(self):
        return iter(self.local.tolist())

    def __len__(self) -> int:
        return len(self.local)


# --------------------------------------------------------------------------------------- library adapters
def make_loader(lib: str, work: Path, nw: int, batch: int, collate, state=None, s3: str | None = None, plain=False):
    """Return (loader, get_state). `state` restores a saved state; `plain` asks for torch's DataLoader."""
    import torch
    from torch.utils.data import DataLoader

    rank, world = _env_world()
    if lib == "streaming":
        from streaming import StreamingDataLoader, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        if world == 1:
            clean_stale_shared_memory()
        kw = {"remote": f"{s3}/mds", "local": str(work / "s3cache" / "mds")} if s3 else {"local": str(work / "mds")}
        ds = StreamingDataset(**kw, shuffle=True, shuffle_seed=SEED, batch_size=batch)
        loader = StreamingDataLoader(ds, batch_size=batch, num_workers=nw, collate_fn=collate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, loader.state_dict
    if lib == "hf_datasets":
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node
        from torchdata.stateful_dataloader import StatefulDataLoader

        if s3:
            files = f"{s3}/parquet/*.parquet"
            opts = {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
            ds = load_dataset("parquet", data_files=files, split="train", streaming=True, storage_options=opts)
        else:
            files = sorted(str(p) for p in (work / "parquet").glob("*.parquet"))
            ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
        ds = ds.shuffle(seed=SEED, buffer_size=1000)
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        cls = DataLoader if plain else StatefulDataLoader
        loader = cls(ds, batch_size=batch, num_workers=nw, collate_fn=collate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, getattr(loader, "state_dict", None)
    if lib == "webdataset":
        import webdataset as wds
        from torchdata.stateful_dataloader import StatefulDataLoader

        if s3:
            urls = [f"pipe:{sys.executable} {HERE} --s3cat {s3}/tar/shard-{s:05d}.tar" for s in range(_nshards(work))]
        else:
            urls = sorted(str(p) for p in (work / "tar").glob("shard-*.tar"))
        ds = wds.WebDataset(
            urls,
            shardshuffle=1000,
            seed=SEED,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        ).shuffle(1000, seed=SEED)
        cls = DataLoader if plain else StatefulDataLoader  # webdataset has no state of its own
        loader = cls(ds, batch_size=batch, num_workers=nw, collate_fn=collate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, getattr(loader, "state_dict", None)
    if lib == "wids":
        import wids
        from torchdata.stateful_dataloader import StatefulDataLoader

        if world > 1 and not torch.distributed.is_initialized():  # its sampler reads rank from torch.distributed
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        meta = json.loads((work / "meta.json").read_text())
        sizes = [min(SHARD, meta["n"] - s * SHARD) for s in range(meta["nshards"])]
        if s3:
            shards = [
                {"url": f"pipe:{sys.executable} {HERE} --s3cat {s3}/tar/shard-{s:05d}.tar > {{local}}", "nsamples": k}
                for s, k in enumerate(sizes)
            ]
            local = _ShardCacheName(str(work / "s3cache" / "wids"))
            ds = wids.ShardListDataset(shards, localname=local, keep=True, transformations=[])
        else:
            shards = [{"url": str(work / "tar" / f"shard-{s:05d}.tar"), "nsamples": k} for s, k in enumerate(sizes)]
            ds = wids.ShardListDataset(shards, localname=_same_path, keep=True, transformations=[])
        sampler = wids.DistributedChunkedSampler(ds, chunksize=1000, shuffle=True, seed=SEED)
        cls = DataLoader if plain else StatefulDataLoader  # wids has no state of its own
        loader = cls(ds, batch_size=batch, sampler=sampler, num_workers=nw, collate_fn=collate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, getattr(loader, "state_dict", None)
    if lib == "litdata":
        import litdata

        if s3:
            ds = litdata.StreamingDataset(
                input_dir=f"{s3}/litdata",
                shuffle=True,
                seed=SEED,
                storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
                cache_dir=str(work / "s3cache" / "litdata"),
            )
        else:
            ds = litdata.StreamingDataset(input_dir=str(work / "litdata"), shuffle=True, seed=SEED)
        loader = litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=nw, collate_fn=collate)
        if state is not None:
            loader.load_state_dict(state)
        return loader, loader.state_dict
    if lib == "baseline":
        shard_of = np.asarray(json.loads((work / "shard_of.json").read_text())["tar"])
        start = 0 if state is None else int(state["position"])
        ds = TarIndexDataset(work, base=f"{s3}/tar" if s3 else None)
        sampler = BlockSampler(shard_of, SEED, 0, rank, world, start)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=nw, collate_fn=collate)
        return loader, None
    raise ValueError(lib)


def _same_path(url: str) -> str:
    return url


class _ShardCacheName:
    """wids localname for `pipe:` URLs: <cache>/<shard-NNNNN.tar>."""

    def __init__(self, cache: str) -> None:
        self.cache = cache
        os.makedirs(cache, exist_ok=True)

    def __call__(self, url: str) -> str:
        import re

        return os.path.join(self.cache, re.findall(r"shard-\d+\.tar", url)[0])


def _nshards(work: Path) -> int:
    return json.loads((work / "meta.json").read_text())["nshards"]


# ------------------------------------------------------------------------------------------------ tasks
def task_ids(lib: str, work: Path, nw: int, stop: int | None, state_in: str | None, state_out: str | None, s3=None):
    """Iterate ids (no decode); stop after `stop` samples and save the state, or run to the end."""
    state = None
    if state_in:
        state = json.loads(Path(state_in).read_text()) if lib == "baseline" else _torch_load(state_in)
    loader, get_state = make_loader(lib, work, nw, ID_BATCH, ids_collate, state=state, s3=s3)
    ids: list[int] = []
    t0 = time.perf_counter()
    for b in loader:
        ids.extend(b.tolist())
        if stop is not None and len(ids) >= stop:
            break
    out = {"ids": ids, "seconds": time.perf_counter() - t0}
    if state_out:
        if lib == "baseline":
            Path(state_out).write_text(json.dumps({"epoch": 0, "position": len(ids)}))
        elif get_state is None:
            out["state_error"] = "no state_dict"
        else:
            import torch

            torch.save(get_state(), state_out)
    return out


def task_series(lib: str, work: Path, nw: int, ks: list[int], states: list[str], resume: bool) -> dict:
    """Reference epoch + one partial run per k (fresh loader each), or, with `resume`, one restore per k."""

    def safe(*args) -> dict:
        try:
            return task_ids(lib, work, nw, *args)
        except Exception as e:  # a failed restore is a finding; keep the other runs
            return {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    if resume:
        return {"runs": [safe(None, st, None) for st in states]}
    return {"ref": safe(None, None, None), "runs": [safe(k, None, st) for k, st in zip(ks, states)]}


def _torch_load(path: str):
    import torch

    return torch.load(path, weights_only=False)


def task_throughput(lib: str, work: Path, nw: int, warm: int, timed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    loader, _ = make_loader(lib, work, nw, TP_BATCH, DecodeCollate(), plain=True)
    t0 = time.perf_counter()
    it = iter(loader)
    n = 0
    first = None
    for i in range(warm + timed):
        if i == warm:
            t1 = time.perf_counter()
        x, _ = next(it)
        if first is None:
            first = time.perf_counter() - t0
        if i >= warm:
            n += x.shape[0]
    dt = time.perf_counter() - t1
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "first_batch_s": first, "shape": list(x.shape)}


def s3cat(url: str) -> None:
    """Write an s3:// object to stdout (a `pipe:` command for webdataset / wids)."""
    import boto3

    bucket, _, key = url[5:].partition("/")
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"]
    out = sys.stdout.buffer
    for chunk in iter(lambda: body.read(1 << 20), b""):
        out.write(chunk)
    out.flush()


# ----------------------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, work: Path, log: Path) -> None:
        self.work, self.log = work, log

    def spawn(self, spec: dict, env: dict | None = None) -> subprocess.Popen:
        e = dict(os.environ, **(env or {}))
        cmd = [sys.executable, str(HERE), "--task", json.dumps(spec), "--work", str(self.work)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, text=True)

    def collect(self, p: subprocess.Popen, spec: dict, timeout: float) -> dict:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            self._log(spec, err, "TIMEOUT")
            return {"error": f"timeout after {timeout:.0f}s"}
        self._log(spec, err, p.returncode)
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            errs = [x.strip() for x in err.splitlines() if "Error" in x or "Exception" in x]
            tail = errs[-1:] or [x for x in err.strip().splitlines() if x.strip()][-1:] or ["(no stderr)"]
            return {"error": f"rc={p.returncode}: {tail[0][:300]}"}
        return json.loads(lines[-1][7:])

    def run(self, spec: dict, timeout: float = 300, env: dict | None = None) -> dict:
        return self.collect(self.spawn(spec, env), spec, timeout)

    def _log(self, spec: dict, err: str, rc) -> None:
        with open(self.log, "a") as f:
            f.write(f"=== {json.dumps(spec)} rc={rc}\n{err[-4000:]}\n")


def _world_env(rank: int, world: int, port: int) -> dict:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "GLOBAL_RANK": str(rank),
        "NNODES": "1",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _clean_streaming(r: Runner) -> None:
    r.run({"kind": "clean_streaming"}, timeout=60)


def shuffle_stats(ids: list[int], shard_of: list[int], cls: list[int], first: int = 1000) -> dict:
    head = ids[:first]
    sh = np.asarray([shard_of[i] for i in head], dtype=float)
    corr = float(np.corrcoef(sh[:-1], sh[1:])[0, 1]) if len(sh) > 2 and sh.std() > 0 else 1.0
    return {
        "n": len(head),
        "distinct_shards": len(set(sh.tolist())),
        "lag1_corr": round(corr, 4),
        "distinct_classes": len({cls[i] for i in head}),
    }


def bench_resume(r: Runner, libs: list[str], ks: list[int], meta: dict, shard_of: dict) -> dict:
    res: dict = {}
    fmt = {"streaming": "mds", "hf_datasets": "parquet", "litdata": "litdata"}
    sdir = r.work / "states"
    sdir.mkdir(exist_ok=True)
    for lib in libs:
        res[lib] = {}
        for nw in (0, 1, 2):
            if lib == "streaming":
                _clean_streaming(r)
            sts = [str(sdir / f"{lib}-{nw}-{k}.state") for k in ks]
            for st in sts:
                if os.path.exists(st):
                    os.remove(st)
            partials = resumes = None
            if lib != "streaming":  # streaming allows one live dataset per local dir: a process per run
                base = {"kind": "series", "lib": lib, "nw": nw, "ks": ks, "states": sts}
                a_all = r.run({**base, "resume": False}, timeout=600)
                ref = a_all.get("ref", a_all)
                partials = a_all.get("runs")
                b_all = r.run({**base, "resume": True}, timeout=600)
                resumes = b_all.get("runs", [b_all] * len(ks))
            else:
                ref = r.run({"kind": "ids", "lib": lib, "nw": nw}, timeout=300)
            row: dict = {"reference": {k: v for k, v in ref.items() if k != "ids"}}
            if "ids" in ref:
                ids = ref["ids"]
                row["reference"].update(n=len(ids), distinct=len(set(ids)))
                row["shuffle"] = shuffle_stats(ids, shard_of[fmt.get(lib, "tar")], meta["cls"])
            for j, (k, st) in enumerate(zip(ks, sts)):
                if partials is None and lib == "streaming":
                    a = r.run({"kind": "ids", "lib": lib, "nw": nw, "stop": k, "state_out": st}, timeout=300)
                else:
                    a = partials[j] if partials else ref
                if "ids" not in a or not os.path.exists(st):
                    row[str(k)] = {"error": a.get("error") or a.get("state_error") or "no state saved"}
                    continue
                if lib == "streaming":
                    _clean_streaming(r)
                    b = r.run({"kind": "ids", "lib": lib, "nw": nw, "state_in": st}, timeout=300)
                else:
                    b = resumes[j] if "error" not in resumes[j] else resumes[j]
                if "ids" not in b:
                    row[str(k)] = {"error": b.get("error"), "first_part": len(a["ids"])}
                    continue
                joined = a["ids"] + b["ids"]
                cell = {
                    "first_part": len(a["ids"]),
                    "second_part": len(b["ids"]),
                    "total": len(joined),
                    "distinct": len(set(joined)),
                    "missing": meta["n"] - len(set(joined)),
                    "duplicates": len(joined) - len(set(joined)),
                }
                if "ids" in ref:
                    cell["identical"] = joined == ref["ids"]
                    cell["first_mismatch"] = next(
                        (i for i, (x, y) in enumerate(zip(joined, ref["ids"])) if x != y),
                        None if len(joined) == len(ref["ids"]) else min(len(joined), len(ref["ids"])),
                    )
                row[str(k)] = cell
            res[lib][str(nw)] = row
            print(f"resume {lib} nw={nw}: {json.dumps(row)}", flush=True)
    return res


def bench_coverage(r: Runner, libs: list[str], meta: dict) -> dict:
    res: dict = {}
    port = 29600
    for lib in libs:
        res[lib] = {}
        for world in (2, 3):  # world 1: the resume references (full epochs at 1 and 2 workers)
            for nw in (1, 2):
                if lib == "streaming":
                    _clean_streaming(r)
                port += 1
                spec = {"kind": "ids", "lib": lib, "nw": nw}
                procs = [r.spawn(spec, _world_env(rk, world, port)) for rk in range(world)]
                outs = [r.collect(p, spec, 300) for p in procs]
                errs = [o["error"] for o in outs if "error" in o]
                if errs:
                    res[lib][f"{world}x{nw}"] = {"error": errs[0]}
                    continue
                allids = [i for o in outs for i in o["ids"]]
                counts = np.bincount(np.asarray(allids, dtype=np.int64), minlength=meta["n"])
                res[lib][f"{world}x{nw}"] = {
                    "per_rank": [len(o["ids"]) for o in outs],
                    "total": len(allids),
                    "distinct": int((counts > 0).sum()),
                    "missing": int((counts == 0).sum()),
                    "duplicates": int((counts[counts > 1] - 1).sum()),
                    "rank0_first1000_classes": len({meta["cls"][i] for i in outs[0]["ids"][:1000]}),
                }
                print(f"coverage {lib} {world}x{nw}: {res[lib][f'{world}x{nw}']}", flush=True)
    return res


def bench_throughput(r: Runner, libs: list[str], repeats: int, warm: int, timed: int) -> dict:
    runs: dict = {lib: {"1": [], "2": []} for lib in libs}
    for rep in range(repeats):  # interleaved: each round runs every library once per worker count
        for nw in (1, 2):
            for lib in libs:
                if lib == "streaming":
                    _clean_streaming(r)
                o = r.run({"kind": "throughput", "lib": lib, "nw": nw, "warm": warm, "timed": timed}, timeout=300)
                runs[lib][str(nw)].append(o)
                print(f"throughput rep={rep} {lib} nw={nw}: {o}", flush=True)
    best = {
        lib: {nw: max((o["images_per_s"] for o in v if "images_per_s" in o), default=None) for nw, v in d.items()}
        for lib, d in runs.items()
    }
    return {"runs": runs, "best_images_per_s": best}


def bench_s3(r: Runner, libs: list[str], meta: dict) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    port = 5077
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "S3_ENDPOINT_URL": endpoint,  # streaming's option
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",  # obstore (litdata's S3 path) refuses plain http otherwise
    }
    os.environ.update(env)
    res: dict = {"endpoint": endpoint}
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        for sub in ("tar", "mds", "parquet", "litdata"):
            for p in sorted((r.work / sub).rglob("*")):
                if p.is_file():
                    s3.upload_file(str(p), "bench", f"data/{sub}/{p.relative_to(r.work / sub)}")
        res["upload_s"] = time.perf_counter() - t0
        import shutil

        shutil.rmtree(r.work / "s3cache", ignore_errors=True)
        for lib in libs:
            if lib == "streaming":
                _clean_streaming(r)
            spec = {"kind": "ids", "lib": lib, "nw": 1, "stop": S3_SAMPLES, "s3": "s3://bench/data"}
            o = r.run(spec, timeout=300, env=env)
            cell = {k: v for k, v in o.items() if k != "ids"}
            if "ids" in o:
                ok = len(set(o["ids"])) == len(o["ids"]) >= S3_SAMPLES and all(0 <= i < meta["n"] for i in o["ids"])
                cell.update(n=len(o["ids"]), distinct=len(set(o["ids"])), ok=ok)
            res[lib] = cell
            print(f"s3 {lib}: {json.dumps(cell)}", flush=True)
    finally:
        server.stop()
    return res


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in [
        "torch",
        "torchvision",
        "mosaicml-streaming",
        "datasets",
        "huggingface-hub",
        "transformers",
        "webdataset",
        "wids",
        "litdata",
        "torchdata",
        "pyarrow",
        "pillow",
        "moto",
        "boto3",
        "botocore",
        "s3fs",
    ]:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# -------------------------------------------------------------------------------------------------- report
RESUME_HOW = {
    "streaming": "native: StreamingDataLoader.state_dict() / load_state_dict()",
    "hf_datasets": "native: IterableDataset state via torchdata StatefulDataLoader (as its docs advise)",
    "webdataset": "none of its own: torchdata StatefulDataLoader replays (reads and drops) the first k samples",
    "wids": "none of its own: torchdata StatefulDataLoader replays the sampler's first k indices",
    "litdata": "native: StreamingDataLoader.state_dict() / load_state_dict()",
    "baseline": "the caller's (epoch, position); the sampler starts at the position",
}


def _fmt_resume(res: dict, ks: list[int]) -> list[str]:
    lines = [
        "| library | how the state is kept | workers | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---" * (3 + len(ks)) + "|",
    ]
    for lib, d in res.items():
        for nw, row in d.items():
            cells = []
            for k in ks:
                c = row.get(str(k), {})
                if "error" in c:
                    cells.append(f"error: {c['error'][:80]}")
                elif c.get("identical"):
                    cells.append("identical")
                else:
                    cells.append(
                        f"differs at {c.get('first_mismatch')}; dup {c.get('duplicates')}, missing {c.get('missing')}"
                    )
            lines.append(f"| {lib} | {RESUME_HOW.get(lib, '')} | {nw} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict, out: Path, cmd: str) -> None:
    ks = results["config"]["ks"]
    L = [
        "# Sharded data sources: measured",
        "",
        *[f"Command ({', '.join(c['stages'])}): `{c['argv']}`  " for c in results.get("commands", [])],
        f"Report: `{cmd}`  ",
        f"CPU: {results['cpu']} ({os.cpu_count()} cores); python {platform.python_version()}  ",
        f"Data: {results['build']['n']} JPEGs ({results['build']['bytes_total'] / 1e6:.0f} MB), "
        f"{SHARD} samples per shard; shards per format: {results['build']['shards']}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
        f"## 1. Mid-epoch resume (world 1, batch {ID_BATCH}; state saved after k samples, restored in a fresh "
        "process; 'identical' = concatenated ids equal an uninterrupted epoch)",
        "",
        *_fmt_resume(results.get("resume", {}), ks),
        "",
        "## 2. Every sample once per epoch (ranks as concurrent processes; world x workers)",
        "",
        "| library | world x workers | per-rank samples | total | missing | duplicates | rank-0 classes, first 1000 |",
        "|---|---|---|---|---|---|---|",
    ]
    for lib, d in results.get("coverage", {}).items():
        for key, c in d.items():
            if "error" in c:
                L.append(f"| {lib} | {key} | error: {c['error'][:100]} | | | | |")
            else:
                L.append(
                    f"| {lib} | {key} | {c['per_rank']} | {c['total']} | {c['missing']} | {c['duplicates']} "
                    f"| {c['rank0_first1000_classes']} |"
                )
    L += [
        "",
        "## 3. Shuffle quality: first 1000 samples of epoch 0 (world 1)",
        "",
        "| library | workers | distinct shards | lag-1 corr of shard id | distinct classes (of 100) |",
        "|---|---|---|---|---|",
    ]
    for lib, d in results.get("resume", {}).items():
        for nw, row in d.items():
            s = row.get("shuffle")
            if s:
                L.append(f"| {lib} | {nw} | {s['distinct_shards']} | {s['lag1_corr']} | {s['distinct_classes']} |")
    tp = results.get("throughput", {"best_images_per_s": {}})
    L += [
        "",
        f"## 4. Throughput, images/s (decode + RandomResizedCrop(192) + ToTensor, batch {TP_BATCH}; "
        f"best of {results['config']['repeats']} interleaved runs, {results['config']['timed']} batches timed "
        f"after {results['config']['warm']} warm-up batches; ratio to the baseline)",
        "",
        "| library | 1 worker | ratio | 2 workers | ratio |",
        "|---|---|---|---|---|",
    ]
    base = tp["best_images_per_s"].get("baseline", {})
    for lib, d in tp["best_images_per_s"].items():
        cells = []
        for nw in ("1", "2"):
            v, b = d.get(nw), base.get(nw)
            ok = sum("images_per_s" in o for o in tp["runs"][lib][nw])
            note = "" if ok == results["config"]["repeats"] else f" ({ok} runs)"
            cells += [f"{v:.0f}{note}" if v else "error", f"{v / b:.2f}" if v and b else "-"]
        L.append(f"| {lib} | " + " | ".join(cells) + " |")
    s3 = results.get("s3", {})
    if s3:
        L += [
            "",
            f"## 5. s3:// on a local moto server ({s3.get('endpoint')}; "
            f"first {S3_SAMPLES} samples of an epoch, 1 worker)",
            "",
            "| library | result | samples | distinct | seconds |",
            "|---|---|---|---|---|",
        ]
        for lib in LIBS:
            c = s3.get(lib)
            if c is None:
                continue
            if "error" in c:
                L.append(f"| {lib} | error: {c['error'][:150]} | | | |")
            else:
                L.append(
                    f"| {lib} | {'ok' if c['ok'] else 'incomplete'} | {c['n']} | {c['distinct']} | {c['seconds']:.1f} |"
                )
    notes = results.get("notes", [])
    if notes:
        L += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    (out / "data_sources.md").write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------------- main
def run_task(spec: dict, work: Path) -> dict:
    kind = spec["kind"]
    if kind == "clean_streaming":
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        return {}
    if kind == "build":
        return build(Path(spec["jpegs"]), work)
    if kind == "ids":
        return task_ids(
            spec["lib"], work, spec["nw"], spec.get("stop"), spec.get("state_in"), spec.get("state_out"), spec.get("s3")
        )
    if kind == "series":
        return task_series(spec["lib"], work, spec["nw"], spec["ks"], spec["states"], spec["resume"])
    if kind == "throughput":
        return task_throughput(spec["lib"], work, spec["nw"], spec["warm"], spec["timed"])
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jpegs", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/dsbench"), help="where the shards go")
    ap.add_argument("--make-jpegs", type=int, default=0, help="write this many JPEGs into --jpegs if it is empty")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--ks", default="160,10016,19840", help="resume points (samples; multiples of the batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--timed", type=int, default=40)
    ap.add_argument("--skip", default="", help="comma list of: build,resume,coverage,throughput,s3")
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--s3cat", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.s3cat:
        s3cat(a.s3cat)
        return
    if a.task:
        spec = json.loads(a.task)
        print("RESULT " + json.dumps(run_task(spec, a.work)), flush=True)
        os._exit(0)  # skip library atexit hooks that can hang after the result is out
    libs, skip = a.libs.split(","), set(filter(None, a.skip.split(",")))
    ks = [int(k) for k in a.ks.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.make_jpegs and not (a.jpegs.exists() and any(a.jpegs.iterdir())):
        t0 = time.perf_counter()
        make_jpegs(a.jpegs, a.make_jpegs)
        print(f"made {a.make_jpegs} JPEGs in {time.perf_counter() - t0:.0f}s", flush=True)
    r = Runner(a.work, a.work / "data_sources.log")  # the subprocesses' stderr
    rfile = a.out / "data_sources.json"
    results = json.loads(rfile.read_text()) if rfile.exists() else {}
    ran = [x for x in ("build", "resume", "coverage", "throughput", "s3") if x not in skip]
    if ran:
        results.setdefault("commands", []).append({"argv": "python " + " ".join(sys.argv), "stages": ran})
    results.update(
        cpu=cpu_model(),
        versions=versions(),
        config={"seed": SEED, "shard": SHARD, "ks": ks, "repeats": a.repeats, "warm": a.warm, "timed": a.timed},
        notes=NOTES,
    )
    if "build" not in skip:
        results["build"] = r.run({"kind": "build", "jpegs": str(a.jpegs)}, timeout=1800)
        print("build", results["build"], flush=True)
    meta = json.loads((a.work / "meta.json").read_text())
    shard_of = json.loads((a.work / "shard_of.json").read_text())
    results.setdefault(
        "build",
        {
            "n": meta["n"],
            "shards": {k: max(v) + 1 for k, v in shard_of.items()},
            "bytes_total": sum(p.stat().st_size for p in a.jpegs.rglob("*.jpg")),
        },
    )

    def save() -> None:
        rfile.write_text(json.dumps(results, indent=1))

    for name, fn in (
        ("resume", lambda: bench_resume(r, libs, ks, meta, shard_of)),
        ("coverage", lambda: bench_coverage(r, libs, meta)),
        ("throughput", lambda: bench_throughput(r, libs, a.repeats, a.warm, a.timed)),
        ("s3", lambda: bench_s3(r, libs, meta)),
    ):
        if name not in skip:
            new = fn()
            if name == "coverage":
                for lib in libs:
                    for nw in ("1", "2"):
                        ref = results.get("resume", {}).get(lib, {}).get(nw, {})
                        n, d = ref.get("reference", {}).get("n"), ref.get("reference", {}).get("distinct")
                        if n is not None:
                            new[lib][f"1x{nw}"] = {
                                "per_rank": [n],
                                "total": n,
                                "distinct": d,
                                "missing": meta["n"] - d,
                                "duplicates": n - d,
                                "rank0_first1000_classes": ref["shuffle"]["distinct_classes"],
                                "from": "resume reference epoch",
                            }
            results[name] = {**results.get(name, {}), **new} if name != "throughput" else new
            save()
    save()
    report(results, a.out, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
