"""Training data in shards: WebDataset-layout tar files and a manifest, read by random access.

A shard set is a folder (or an `s3://bucket/prefix`) holding `manifest.json` and `shard-NNNNNN.tar`
files. Each tar holds, per sample, `<key>.<ext>` (the encoded image, bytes as they were packed),
`<key>.cls` (the label as decimal text; absent without labels) and `<key>.json` (where the image came
from), the layout WebDataset, timm's `wds` reader and Hugging Face `datasets` read as is. `<key>` is
the sample's index in the whole set, zero-padded to 9 digits. The manifest (written by `data pack`,
see `pack`) lists every shard with its sample count, size and SHA-256, and the class list.

Order is the sampler's (`datasets.ShardedSampler` with the shards as groups): a sample is read by
seeking to its member, so any order, any number of ranks and workers, and a resume from any position
read exactly the samples asked for. Each process checks a shard before its first read: its size always,
its SHA-256 once per file (remembered on this machine, see `verified`), and its members against the
manifest. A shard missing, truncated, changed or unreachable is a `DataError` naming it; training stops
on it rather than train on half a shard.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .datasets import Samples
from .store import Store, open_store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "swinv2-shards"
VERSION = 1
KEY_DIGITS = 9
OPEN_SHARDS = 16  # open shard files a process keeps (a shuffle block reads 8 by default)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    first: int  # index of its first sample in the set


@dataclass
class Manifest:
    """The parsed `manifest.json` of a shard set (see `pack.write_manifest` for the writer)."""

    classes: list[str]
    class_counts: list[int]
    shards: list[ShardInfo]
    raw: dict[str, Any]
    digest: str  # SHA-256 of the manifest file: what a resume checks

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} manifest (format {raw.get('format')!r})")
            if raw.get("version") != VERSION:
                raise ValueError(f"manifest version {raw.get('version')!r}, this swinv2 reads {VERSION}")
            shards, first = [], 0
            for s in raw["shards"]:
                shards.append(ShardInfo(str(s["name"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]), first))
                first += shards[-1].samples
            classes = [str(c) for c in raw["classes"]]
            counts = [int(n) for n in raw["class_counts"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: not a readable shard manifest ({e})") from None
        if not shards or first == 0:
            raise DataError(f"{where}: the manifest lists no samples")
        if len(counts) != len(classes) or (classes and sum(counts) != first):
            raise DataError(f"{where}: class counts {sum(counts)} do not add up to the {first} samples listed")
        for s in shards:
            if "/" in s.name or s.name.startswith("."):
                raise DataError(f"{where}: shard name {s.name!r} is not a file name in its folder")
        return cls(classes, counts, shards, raw, hashlib.sha256(data).hexdigest())


def is_shard_set(root: str | os.PathLike) -> bool:
    """Whether `root` is a shard set (a remote URL is taken to be one; the manifest read tells)."""
    text = str(root)
    return "://" in text or (Path(text) / MANIFEST).is_file()


class _Shard:
    """An open shard: its file and each sample's (image member offset, size, extension, label)."""

    def __init__(self, path: Path, info: ShardInfo, where: str, labelled: bool) -> None:
        self.where = where
        try:
            self.file = open(path, "rb")  # noqa: SIM115 -- held open while the shard is in use
        except OSError as e:
            raise DataError(f"{where}: cannot open ({e.strerror or type(e).__name__})") from None
        self.members: dict[int, tuple[int, int, str]] = {}
        self.labels: dict[int, int] = {}
        try:
            self._index(info, labelled)
        except BaseException:
            self.file.close()
            raise

    def _index(self, info: ShardInfo, labelled: bool) -> None:
        cls_members: dict[int, tuple[int, int]] = {}
        try:
            with tarfile.open(fileobj=self.file, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    if not key.isdigit():
                        raise DataError(f"{self.where}: member {m.name!r} is not <key>.<ext>")
                    index = int(key)
                    if ext == "cls":
                        cls_members[index] = (m.offset_data, m.size)
                    elif ext != "json":
                        self.members[index] = (m.offset_data, m.size, ext)
        except tarfile.TarError as e:
            raise DataError(f"{self.where}: not a readable tar file ({e}); repack or replace it") from None
        expected = range(info.first, info.first + info.samples)
        if len(self.members) != info.samples or (self.members and min(self.members) != expected[0]):
            raise DataError(
                f"{self.where}: holds {len(self.members)} images, the manifest lists samples "
                f"{expected[0]}..{expected[-1]}: the shard changed since packing"
            )
        if labelled:
            for index, (offset, size) in cls_members.items():
                self.file.seek(offset)
                self.labels[index] = int(self.file.read(size).decode("ascii").strip())
            if len(self.labels) != info.samples:
                raise DataError(f"{self.where}: {info.samples - len(self.labels)} samples have no .cls label")

    def raw(self, index: int) -> bytes:
        offset, size, _ = self.members[index]
        self.file.seek(offset)
        data = self.file.read(size)
        if len(data) != size:
            raise DataError(f"{self.where}: ends inside sample {sample_key(index)} (truncated since it was checked)")
        return data

    def close(self) -> None:
        self.file.close()


class ShardDataset(Samples):
    """A shard set as `Samples`. `class_names` fixes the class list (a val set read with the training
    classes): labels are mapped by class name, so a val set packed with fewer classes keeps its meaning.
    `cache_dir` holds downloaded shards of a remote set and the record of shards already verified."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        class_names: list[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        retries: int = 5,
        timeout: float = 60.0,
    ) -> None:
        self.root = str(root)
        self.store: Store = open_store(
            self.root, cache_dir=cache_dir, cache_limit=cache_limit, retries=retries, timeout=timeout
        )
        self.manifest = Manifest.parse(self.store.read_small(MANIFEST), self.store.where(MANIFEST))
        m = self.manifest
        self.labelled = bool(m.classes)
        self.classes = list(class_names) if class_names is not None else list(m.classes)
        self._label_map: list[int] | None = None
        if class_names is not None and m.classes and m.classes != self.classes:
            unknown = sorted(set(m.classes) - set(self.classes))
            if unknown:
                raise DataError(
                    f"{self.root}: classes not among the {len(self.classes)} training classes: "
                    f"{', '.join(unknown[:10])}"
                )
            position = {c: i for i, c in enumerate(self.classes)}
            self._label_map = [position[c] for c in m.classes]
        present = {c for c, n in zip(m.classes, m.class_counts) if n > 0}
        self.empty_classes = [c for c in m.classes if c not in present] if class_names is None else []
        self.missing_classes = [c for c in self.classes if c not in set(m.classes)] if class_names is not None else []
        self.stray, self.skipped_links = [], []
        self._firsts = [s.first for s in m.shards]
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._failed: dict[int, DataError] = {}
        self._pid = os.getpid()

    # ----------------------------------------------------------------------- Samples

    def __len__(self) -> int:
        return self.manifest.samples

    def _shard_of(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return bisect.bisect_right(self._firsts, index) - 1

    def _shard(self, i: int) -> _Shard:
        if self._pid != os.getpid():  # a forked loader worker: its own file handles
            self._open, self._failed, self._pid = OrderedDict(), {}, os.getpid()
        shard = self._open.get(i)
        if shard is None:
            if i in self._failed:  # said once: the other samples of the batch do not try again
                raise self._failed[i]
            info = self.manifest.shards[i]
            try:
                path = self.store.fetch(info.name, info.bytes, info.sha256)
                shard = _Shard(path, info, self.store.where(info.name), self.labelled)
            except DataError as e:
                self._failed[i] = e
                raise
            self._open[i] = shard
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(i)
        return shard

    def label_of(self, index: int) -> int:
        if not self.labelled:
            return -1
        label = self._shard(self._shard_of(index)).labels[index]
        return self._label_map[label] if self._label_map is not None else label

    def where(self, index: int) -> str:
        return f"{self.store.where(self.manifest.shards[self._shard_of(index)].name)}:{sample_key(index)}"

    def raw(self, index: int) -> bytes:
        return self._shard(self._shard_of(index)).raw(index)

    def class_counts(self) -> list[int]:
        if not self.labelled:
            return []
        counts = [0] * len(self.classes)
        for label, n in enumerate(self.manifest.class_counts):
            counts[self._label_map[label] if self._label_map is not None else label] += n
        return counts

    def fingerprint(self) -> str:
        return self.manifest.digest

    def groups(self) -> list[int]:
        return [s.samples for s in self.manifest.shards]

    def storage_line(self) -> str:
        m = self.manifest
        size = sum(s.bytes for s in m.shards) / 2**20
        return f"{len(m.shards)} shards, {size:.1f} MiB, manifest {m.digest[:12]}"

    def check_storage(self) -> list[tuple[str, str]]:
        """Every shard fetched and checked against the manifest (size, SHA-256, members)."""
        bad = []
        for i, info in enumerate(self.manifest.shards):
            try:
                self.store.fetch(info.name, info.bytes, info.sha256, verify_again=True)
                self._shard(i)
            except DataError as e:
                bad.append((self.store.where(info.name), str(e).split(": ", 1)[-1]))
        return bad

    def __getstate__(self) -> dict[str, Any]:  # workers started by spawn get no open files
        state = dict(self.__dict__)
        state["_open"], state["_failed"] = OrderedDict(), {}
        return state
