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
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..images import BadImageError
from .datasets import Samples


def read_list(path: Path) -> list[tuple[str, int]]:
    """[(relative path, label)] of a list file: JSON `[[path, label], ...]`, or one `path<TAB>label`
    (or `path label`) per line. A malformed entry is a DataError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the list file ({e})") from None
    entries: list[tuple[str, int]] = []
    if text.lstrip().startswith("["):
        try:
            for i, (name, label) in enumerate(json.loads(text)):
                entries.append((_checked_name(str(name), path, i + 1), _label(label, path, i + 1)))
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: not a JSON list of [path, label] pairs ({e})") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t") if "\t" in line else line.rsplit(None, 1)
            if len(parts) < 2:
                raise DataError(f"{path}:{n}: expected '<path><TAB><label>', got {line[:80]!r}")
            entries.append((_checked_name(parts[0].strip(), path, n), _label(parts[1], path, n)))
    if not entries:
        raise DataError(f"{path}: the list file names no images")
    return entries


def _label(value: Any, path: Path, line: int) -> int:
    try:
        label = int(str(value).strip())
    except ValueError:
        raise DataError(f"{path}:{line}: label {value!r} is not a whole number") from None
    if label < 0:
        raise DataError(f"{path}:{line}: negative label {label}")
    return label


def _checked_name(name: str, path: Path, line: int) -> str:
    if not name:
        raise DataError(f"{path}:{line}: an empty image path")
    return name


def class_names_of(entries: list[tuple[str, int]]) -> list[str]:
    """Each label's folder name where the labels and top-level folders pair one to one, else numbers."""
    n = max(label for _, label in entries) + 1
    folders: dict[int, set[str]] = {}
    for name, label in entries:
        head, sep, _ = name.lstrip("/").partition("/")
        folders.setdefault(label, set()).add(head if sep else "")
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else "" for i in range(n)]
    if all(names[i] for i in folders) and len({names[i] for i in folders}) == len(folders):
        return [names[i] if i in folders else str(i) for i in range(n)]
    return [str(i) for i in range(n)]


class ListFileDataset(Samples):
    """The images of a list file, read from `images`: a folder, or a zip file (members named as listed)."""

    def __init__(self, list_file: str | os.PathLike, images: str | os.PathLike, class_names: list[str] | None = None):
        self.list_file, self.images = Path(list_file), Path(images)
        self.entries = read_list(self.list_file)
        self.zip = self.images.suffix.lower() == ".zip"
        if self.zip and not self.images.is_file():
            raise FileNotFoundError(f"zip file not found: {self.images}")
        if not self.zip and not self.images.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images}")
        top = max(label for _, label in self.entries)
        if class_names is not None:
            if top >= len(class_names):
                raise DataError(f"{self.list_file}: label {top} is beyond the {len(class_names)} training classes")
            self.classes = list(class_names)
        else:
            self.classes = class_names_of(self.entries)
        self.root = self.list_file
        counts = Counter(label for _, label in self.entries)
        self.empty_classes = [c for i, c in enumerate(self.classes) if not counts[i]] if class_names is None else []
        self.stray, self.missing_classes, self.skipped_links = [], [], []
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.entries)

    def label_of(self, index: int) -> int:
        return self.entries[index][1]

    def where(self, index: int) -> str:
        name = self.entries[index][0]
        return f"{self.images}@/{name.lstrip('/')}" if self.zip else str(self.images / name)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # a forked worker opens its own
            try:
                self._zip, self._pid = zipfile.ZipFile(self.images), os.getpid()
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"{self.images}: not a readable zip file ({e})") from None
        return self._zip

    def raw(self, index: int) -> bytes:
        name = self.entries[index][0]
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
        counts = Counter(label for _, label in self.entries)
        return [counts.get(i, 0) for i in range(len(self.classes))]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zip"] = None
        return state


def images_for(root: Path, prefix: str) -> Path:
    """Where a list's images are, as the official code lays them out: `root/<prefix>.zip` if it exists,
    else the folder `root/<prefix>` (`root` itself for a prefix of '' or '.')."""
    if prefix in ("", "."):
        return root
    archive = root / f"{prefix}.zip"
    return archive if archive.is_file() else root / prefix
