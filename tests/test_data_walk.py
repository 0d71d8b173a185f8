"""Walking data folders: symlinked folders are followed but each real folder is read once (a loop
`ln -s . loop` once multiplied a class about 40x), the links not followed are named; a folder that
cannot be read is an error naming it, never an empty class. For training/eval/--check-data
(`ImageFolderDataset`, `ImageFilesDataset`) and predict (`expand_paths`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_folders import make_image_folder
from swinv2.cli import main
from swinv2.errors import DataError
from swinv2.serve.predict import expand_paths
from swinv2.train import datasets as data
from swinv2.train.datasets import ImageFilesDataset, ImageFolderDataset, check_dataset


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _without_root_file_access() -> None:
    """In a child before exec: drop the capabilities that let root read any folder (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from the bounding set, so folder modes apply to it as to any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swinv2", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
    )


# --------------------------------------------------------------------------- symlinked folders


def test_a_symlink_loop_is_read_once_and_named(tmp_path, capsys):
    """`ln -s . train/a/loop` and `ln -s .. train/b/up`: the counts are those without the links (before:
    class a about 40x, and b with every image of the root under its label), and one warning names both."""
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), n_train=3, n_val=2)
    train = root / "train"
    os.symlink(".", train / "a" / "loop")
    os.symlink("..", train / "b" / "up")
    ds = ImageFolderDataset(train)
    assert ds.class_counts() == [3, 3, 3]
    assert len({os.path.realpath(p) for p, _ in ds.samples}) == len(ds.samples) == 9
    assert ds.skipped_links == [str(train / "a" / "loop"), str(train / "b" / "up")]
    lines = [w for w in data.folder_warnings(ds, training=True) if "not followed" in w]
    assert lines == [
        f"{train}: 2 linked folders not followed, each leads to a folder already read (a symlink loop, "
        f"or a second link to the same images): {train / 'a' / 'loop'}, {train / 'b' / 'up'}"
    ]
    pretrain = ImageFilesDataset(train)  # pretraining reads every image under the folder
    assert len(pretrain.samples) == 9 and pretrain.skipped_links == ds.skipped_links

    assert main(["train", "--check-data", f"data.root={root}"]) == 0  # what a user runs first
    out = capsys.readouterr().out
    assert "train: " + str(train) + ": 9 images, 3 classes" in out
    assert f"warning: {lines[0]}" in out.splitlines()


def test_linked_datasets_elsewhere_still_count_and_one_folder_counts_once(tmp_path):
    """Users link datasets in: a class folder that is a link, and a link inside a class to images
    elsewhere, are read. Two links to the same folder read it once; a link from one class into another
    class is not followed (its images would get a second label)."""
    elsewhere = _images(tmp_path / "store" / "cats", 4)
    more = _images(tmp_path / "store" / "more_dogs", 2, seed=1)
    train = tmp_path / "train"
    train.mkdir()
    os.symlink(elsewhere, train / "cat")
    _images(train / "dog", 3, seed=2)
    os.symlink(more, train / "dog" / "extra")
    os.symlink(more, train / "dog" / "extra_again")
    os.symlink(train / "cat", train / "dog" / "cats_too")
    ds = ImageFolderDataset(train)
    assert ds.classes == ["cat", "dog"] and ds.class_counts() == [4, 5]
    assert (str(train / "dog" / "extra" / "00.png"), 1) in ds.samples
    assert ds.skipped_links == [str(train / "dog" / "cats_too"), str(train / "dog" / "extra_again")]
    report = check_dataset(train, decode=False)
    assert any("2 linked folders not followed" in w and "cats_too" in w for w in report.warnings)


def test_predict_reads_each_folder_and_file_once(tmp_path, caplog):
    """A folder argument with a loop, and a `**` glob through it (glob follows the loop ~40 levels):
    each image once, under its shortest path; one warning names the link."""
    imgs = _images(tmp_path / "imgs", 3)
    _images(imgs / "sub", 2, seed=1)
    os.symlink(".", imgs / "sub" / "loop")
    caplog.set_level(logging.WARNING, logger="swinv2")
    files, errors = expand_paths([imgs])
    assert errors == [] and files == [str(imgs / f"{i:02d}.png") for i in range(3)] + [
        str(imgs / "sub" / f"{i:02d}.png") for i in range(2)
    ]
    warned = [r.getMessage() for r in caplog.records if "not followed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith(str(imgs / "sub" / "loop"))
    files, errors = expand_paths([str(imgs / "**" / "*.png")])
    assert errors == [] and sorted(files) == sorted(
        str(imgs / f) for f in ("00.png", "01.png", "02.png", "sub/00.png", "sub/01.png")
    )


# --------------------------------------------------------------------------- unreadable folders


def test_an_unreadable_class_folder_is_an_error_naming_it_not_an_empty_class(image_folder, monkeypatch):
    root = image_folder  # classes a, b
    _images(root / "train" / "b" / "deep", 2)
    real_scandir = os.scandir
    denied = {root / "train" / "b", root / "train" / "b" / "deep"}
    current = {"path": None}

    def scandir(path="."):
        if Path(path) == current["path"]:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for folder in sorted(denied):  # the class folder itself, and a folder inside it
        current["path"] = folder
        expected = f"{folder}: cannot read this folder (Permission denied); its images would be left out"
        for read in (
            lambda: ImageFolderDataset(root / "train"),
            lambda: ImageFilesDataset(root / "train"),
            lambda: expand_paths([root / "train"]),
        ):
            with pytest.raises(DataError) as e:
                read()
            assert str(e.value).startswith(expected)


def test_an_unreadable_class_folder_stops_check_data_in_one_line(image_folder):
    """A really unreadable folder (mode 0; as root, the child runs without the capabilities that
    bypass modes): exit 2, one line naming it, no traceback. Before: an empty class, exit 0."""
    root = image_folder  # classes a, b
    locked = root / "train" / "b"
    locked.chmod(0)
    try:
        r = _run_unprivileged("train", "--check-data", f"data.root={root}")
    finally:
        locked.chmod(0o755)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"swinv2 train: error: {locked}: cannot read this folder (Permission denied); its images would be left "
        f"out: make it readable or move it out of the data folder"
    ]


def test_an_unreadable_folder_stops_predict_in_one_line(tmp_path, micro_weights):
    weights = micro_weights
    imgs = _images(tmp_path / "imgs", 2)
    locked = _images(imgs / "more", 2)
    locked.chmod(0)
    try:
        r = _run_unprivileged("predict", "--weights", str(weights), str(imgs))
    finally:
        locked.chmod(0o755)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [
        f"swinv2 predict: error: {locked}: cannot read this folder (Permission denied); its images would be left "
        f"out: make it readable or move it out of the data folder"
    ]
