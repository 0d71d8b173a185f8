"""The official code's list files: images named in a `*_map.txt`, in a folder or inside a zip file.

The official Swin Transformer code reads ImageNet-1k in "zip mode" as `train_map.txt` (lines
`<path>\\t<label>`) with the images inside `train.zip` (`DATA.ZIP_MODE`, paths written
`train.zip@/<path>`), and ImageNet-22k as `ILSVRC2011fall_whole_map_train.txt`, a JSON list of
`[path, label]` relative to the data folder. `ListFileDataset` reads both forms, from a zip file or a
folder, so an official copy of either dataset trains unchanged (`data.source: list`).

The list carries label numbers only. Class names are the labels' folder names where each label's
images sit in one top-level folder of their own (ImageNet's WordNet ids), else the numbers; a fixed
list (`class_names`, e.g. a val list read with the training classes) overrides both.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..images import BadImageError
from .datasets import Samples


def read_list(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(paths, labels) of a list file: JSON `[[path, label], ...]`, or one `path<TAB>label` (or `path label`)
    per line. Paths come back as a numpy bytes array and labels as int64, so that a list of 14M entries
    costs two arrays, not 14M Python objects that every forked loader worker would copy page by page.
    A malformed entry is a DataError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the list file ({e})") from None
    names: list[str] = []
    labels: list[int] = []
    if text.lstrip().startswith("["):
        try:
            for name, label in json.loads(text):
                names.append(str(name))
                labels.append(int(label))
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: not a JSON list of [path, label] pairs ({e})") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            name, tab, label = line.partition("\t")
            if not tab:
                name, _, label = line.strip().rpartition(" ")
                if not name:
                    if not line.strip():
                        continue
                    raise DataError(f"{path}:{n}: expected '<path><TAB><label>', got {line[:80]!r}")
            try:
                labels.append(int(label))
            except ValueError:
                raise DataError(f"{path}:{n}: label {label.strip()!r} is not a whole number") from None
            names.append(name.strip())
    if not names:
        raise DataError(f"{path}: the list file names no images")
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.min() < 0:
        entry = int(np.argmin(label_array)) + 1
        raise DataError(f"{path}: entry {entry}: negative label {int(label_array.min())}")
    if not all(names):
        raise DataError(f"{path}: entry {names.index('') + 1}: an empty image path")
    return np.asarray([n.encode() for n in names]), label_array


def class_names_of(names: np.ndarray, labels: np.ndarray) -> list[str]:
    """Each label's folder name where the labels and top-level folders pair one to one, else numbers."""
    n = int(labels.max()) + 1
    heads = np.asarray([name.lstrip(b"/").partition(b"/")[0] if b"/" in name.lstrip(b"/") else b"" for name in names])
    pairs = set(zip(labels.tolist(), heads.tolist()))
    by_label: dict[int, set[bytes]] = {}
    for label, head in pairs:
        by_label.setdefault(label, set()).add(head)
    folder = {label: next(iter(h)) for label, h in by_label.items() if len(h) == 1}
    if len(folder) == len(by_label) and all(folder.values()) and len(set(folder.values())) == len(folder):
        return [folder[i].decode() if i in folder else str(i) for i in range(n)]
    return [str(i) for i in range(n)]


class ListFileDataset(Samples):
    """The images of a list file, read from `images`: a folder, or a zip file (members named as listed)."""

    def __init__(self, list_file: str | os.PathLike, images: str | os.PathLike, class_names: list[str] | None = None):
        self.list_file, self.images = Path(list_file), Path(images)
        self.names, self.labels = read_list(self.list_file)
        self.zip = self.images.suffix.lower() == ".zip"
        if self.zip and not self.images.is_file():
            raise FileNotFoundError(f"zip file not found: {self.images}")
        if not self.zip and not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images}")
        top = int(self.labels.max())
        if class_names is not None:
            if top >= len(class_names):
                raise DataError(f"{self.list_file}: label {top} is beyond the {len(class_names)} training classes")
            self.classes = list(class_names)
        else:
            self.classes = class_names_of(self.names, self.labels)
        self.root = self.list_file
        counts = self.class_counts()
        self.empty_classes = [c for c, k in zip(self.classes, counts) if not k] if class_names is None else []
        self.stray, self.missing_classes, self.skipped_links = [], [], []
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.labels)

    def label_of(self, index: int) -> int:
        return int(self.labels[index])

    def name(self, index: int) -> str:
        return self.names[index].decode()

    def where(self, index: int) -> str:
        name = self.name(index)
        return f"{self.images}@/{name.lstrip('/')}" if self.zip else str(self.images / name)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # a forked worker opens its own
            try:
                self._zip, self._pid = zipfile.ZipFile(self.images), os.getpid()
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"{self.images}: not a readable zip file ({e})") from None
        return self._zip

    def raw(self, index: int) -> bytes:
        name = self.name(index)
        if self.zip:
            try:
                return self._archive().read(name.lstrip("/"))
            except KeyError:
                raise BadImageError(self.where(index), "not in the zip file") from None
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise BadImageError(self.where(index), f"cannot read from the zip ({e})") from None
        try:
            return (self.images / name).read_bytes()
        except FileNotFoundError:
            raise BadImageError(self.where(index), "file not found") from None
        except OSError as e:
            raise BadImageError(self.where(index), f"cannot read ({e.strerror or type(e).__name__})") from None

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None
        return state


def images_for(root: Path, prefix: str) -> Path:
    """Where a list's images are, as the official code lays them out: `root/<prefix>.zip` if it exists
    (zip mode), else the folder `root/<prefix>`, else `root` itself (ImageNet-22k's lists name their
    images relative to the data folder)."""
    if prefix not in ("", "."):
        archive = root / f"{prefix}.zip"
        if archive.is_file():
            return archive
        if (root / prefix).is_dir():
            return root / prefix
    return root
