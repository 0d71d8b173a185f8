"""Hugging Face datasets' image-classification layout: an `image` column (a struct of encoded `bytes` and
a `path`) and a `label` column (a `ClassLabel`, whose names the files' metadata carries), in parquet
files (what the Hub serves: `data/train-00000-of-00004.parquet`, ...) or in a `datasets.save_to_disk`
folder (Arrow files beside `dataset_info.json`). Read with pyarrow (`pip install 'swinv2[parquet]'`).

`HFDataset` reads such files as `Samples` by random access: labels are read once for all rows (a small
integer column); images a row group (parquet) or a memory-mapped file (Arrow) at a time, the last
few kept per process. The row groups are its `groups`, so the training shuffle reads a few of them
at a time, as it reads shards.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import DataError, InputError
from ..images import BadImageError
from .datasets import Samples

CACHED_GROUPS = 4  # decoded row groups a process keeps


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError(
            "reading Hugging Face parquet or Arrow files needs pyarrow: pip install 'swinv2[parquet]'"
        ) from None
    return pyarrow


def is_hf_layout(path: str | os.PathLike) -> bool:
    """A parquet file, a folder holding only parquet files, a `save_to_disk` folder, or a glob of parquet files."""
    text = str(path)
    if any(c in text for c in "*?["):
        return bool(glob.glob(text)) and all(p.endswith(".parquet") for p in glob.glob(text))
    p = Path(text)
    if p.is_file():
        return p.suffix == ".parquet"
    if not p.is_dir():
        return False
    if (p / "dataset_info.json").is_file() and any(p.glob("*.arrow")):
        return True
    files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
    return bool(files) and all(f.suffix == ".parquet" for f in files)


def _class_names(metadata: dict[bytes, bytes] | None, label_column: str) -> list[str] | None:
    if not metadata or b"huggingface" not in metadata:
        return None
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        names = features[label_column].get("names")
        return [str(n) for n in names] if names else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class HFDataset(Samples):
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        class_names: list[str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        pa = _pyarrow()
        self.root = str(path)
        self.image_column, self.label_column = image_column, label_column
        text = str(path)
        p = Path(text)
        self.arrow = not any(c in text for c in "*?[") and p.is_dir() and (p / "dataset_info.json").is_file()
        if any(c in text for c in "*?["):
            self.files = sorted(Path(f) for f in glob.glob(text))
        elif p.is_file():
            self.files = [p]
        elif self.arrow:
            self.files = self._arrow_files(p)
        elif p.is_dir():
            self.files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        else:
            raise FileNotFoundError(f"not found: {path}")
        if not self.files:
            raise DataError(f"{path}: no parquet or Arrow files")
        self._parts: list[tuple[int, int]] = []  # (file index, row group) of each group
        self._groups: list[int] = []
        labels: list[Any] = []
        names = None
        for f, file in enumerate(self.files):
            try:
                if self.arrow:
                    table = self._arrow_table(file)
                    schema, sizes = table.schema, [table.num_rows]
                    column = table.column(label_column) if label_column in schema.names else None
                else:
                    meta = pa.parquet.ParquetFile(file)
                    schema = meta.schema_arrow
                    sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
                    column = meta.read(columns=[label_column]).column(0) if label_column in schema.names else None
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{file}: not a readable {'Arrow' if self.arrow else 'parquet'} file ({e})") from None
            if image_column not in schema.names:
                raise DataError(f"{file}: no '{image_column}' column (columns: {', '.join(schema.names)})")
            names = names or _class_names(schema.metadata, label_column)
            if column is not None:
                labels.extend(column.to_pylist())
            for g, n in enumerate(sizes):
                self._parts.append((f, g))
                self._groups.append(n)
        self._firsts = [0]
        for n in self._groups[:-1]:
            self._firsts.append(self._firsts[-1] + n)
        self._file_firsts = [0] * len(self.files)
        for group in reversed(range(len(self._parts))):
            self._file_firsts[self._parts[group][0]] = self._firsts[group]
        self.labelled = bool(labels)
        if self.labelled and any(label is None or label < 0 for label in labels):
            raise DataError(f"{path}: some rows have no label (None or -1); pack them with --unlabelled")
        self.labels = [int(x) for x in labels]
        top = max(self.labels) if self.labels else -1
        if class_names is not None:
            if top >= len(class_names):
                raise DataError(f"{path}: label {top} is beyond the {len(class_names)} training classes")
            self.classes = list(class_names)
        elif self.labelled:
            self.classes = names if names and len(names) > top else [str(i) for i in range(top + 1)]
        else:
            self.classes = []
        counts = self.class_counts()
        self.empty_classes = [c for c, n in zip(self.classes, counts) if not n] if class_names is None else []
        self.stray, self.missing_classes, self.skipped_links = [], [], []
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    @staticmethod
    def _arrow_files(folder: Path) -> list[Path]:
        try:
            state = json.loads((folder / "state.json").read_text())
            return [folder / f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            return sorted(folder.glob("*.arrow"))

    @staticmethod
    def _arrow_table(file: Path) -> Any:
        pa = _pyarrow()
        return pa.ipc.open_stream(pa.memory_map(str(file))).read_all()  # zero-copy over the mapped file

    def __len__(self) -> int:
        return len(self.labels) if self.labelled else sum(self._groups)

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        group = bisect.bisect_right(self._firsts, index) - 1
        return group, index - self._firsts[group]

    def _group(self, group: int) -> Any:
        if self._pid != os.getpid():  # a forked loader worker: its own cache
            self._cache, self._pid = OrderedDict(), os.getpid()
        column = self._cache.get(group)
        if column is None:
            f, g = self._parts[group]
            file = self.files[f]
            pa = _pyarrow()
            try:
                if self.arrow:
                    column = self._arrow_table(file).column(self.image_column)
                else:
                    column = pa.parquet.ParquetFile(file).read_row_group(g, columns=[self.image_column]).column(0)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{file}: cannot read row group {g} ({e})") from None
            self._cache[group] = column
            while len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(group)
        return column

    def label_of(self, index: int) -> int:
        return self.labels[index] if self.labelled else -1

    def where(self, index: int) -> str:
        group, row = self._locate(index)
        f = self._parts[group][0]
        return f"{self.files[f]}:{index - self._file_firsts[f]}"

    def raw(self, index: int) -> bytes:
        group, row = self._locate(index)
        value = self._group(group)[row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise BadImageError(self.where(index), "no image bytes stored in the row")
        return bytes(data)

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for label in self.labels:
            counts[label] += 1
        return counts

    def groups(self) -> list[int]:
        return list(self._groups)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state
