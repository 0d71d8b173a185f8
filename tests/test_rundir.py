"""The run directory's log as a user keeps it: `swinv2 train ... 2> train.log` (stderr not a terminal)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from image_folders import make_image_folder


@pytest.mark.slow  # about 12 s
def test_a_log_file_gets_progress_lines_not_carriage_returns(tmp_path):
    """No tqdm redraws ('\\r') in a log file, but a progress line every train.log_every steps; and
    the empty class folder is warned about, naming it, before training."""
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), n_train=8, n_val=2, seed=1)
    (root / "train" / "c").mkdir()  # an empty class folder
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "swinv2",
                "train",
                "--out",
                str(tmp_path / "run"),
                "model.name=swinv2_micro_window4_32",
                f"data.root={root}",
                "data.batch_size=4",
                "data.workers=0",
                "data.aug.mixup=0",
                "train.epochs=2",
                "train.log_every=2",
                "train.tensorboard=false",
                "train.threads=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=f,
            timeout=300,
        )
    text = log.read_bytes().decode()  # not read_text(): universal newlines would turn each '\r' into '\n'
    assert proc.returncode == 0, text
    assert "\r" not in text
    lines = text.splitlines()
    progress = [line.split(" INFO ", 1)[1] for line in lines if " step " in line and "step/s" in line]
    assert [p.split("  loss")[0] for p in progress] == [f"epoch {e}/2  step {s}/4" for e in (1, 2) for s in (2, 4)]
    assert all("  lr " in p and "ETA" in p for p in progress)
    empty = [line for line in lines if "WARNING" in line and "empty class folders: c;" in line]
    assert len(empty) == 1 and str(root / "train") in empty[0] and "may still predict it" in empty[0]
