"""The tiny training run of test_reliability.py and test_ddp.py: its config, `swinv2 train` in this
process (`train`) or in a fresh one with faults installed (`drive`, see inject.py), and the reads and
comparisons of what a run leaves in its directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from image_folders import make_image_folder

TESTS = Path(__file__).resolve().parent
TINY = """\
model: {{name: swinv2_micro_window4_32, drop_path_rate: 0.1}}
data: {{root: {root}, batch_size: 4, workers: 0}}
optim: {{lr: 2.0e-3, lr_scaling: none}}
schedule: {{warmup_epochs: 1, warmup_lr: 1.0e-5, min_lr: 1.0e-5}}
train: {{epochs: 3, ema: true, ema_decay: 0.9, log_every: 1, threads: 1, progress: false, tensorboard: false,
        checkpoint_every: 3, keep_best: 2}}
"""
# Run as `python driver.py FAULTS ARGS` with tests/ on PYTHONPATH (set by `drive`).
DRIVER = """\
import json, sys
from inject import install_faults
install_faults(**json.loads(sys.argv[1]))
from swinv2.cli import main
sys.exit(main(sys.argv[2:]))
"""


def tiny_config(tmp: Path, data_root: Path | None = None, text: str = TINY) -> Path:
    root = data_root or make_image_folder(tmp / "data")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(text.format(root=root))
    return cfg


def train(cfg: Path, out: Path, *overrides: str, resume: str | None = None) -> int:
    """`swinv2 train` in this process."""
    from swinv2.cli import main

    before = torch.get_num_threads()
    try:
        return main(
            ["train", "--config", str(cfg), "--out", str(out), *overrides, *(["--resume", resume] if resume else [])]
        )
    finally:
        torch.set_num_threads(before)


def drive(
    tmp: Path,
    faults: dict,
    cfg: Path,
    out: Path,
    *overrides: str,
    nproc: int = 1,
    timeout: float = 240,
    own_group: bool = False,
) -> subprocess.CompletedProcess:
    """`swinv2 train` in a fresh process (or `nproc` torchrun processes) with `faults` installed.

    With `own_group` it runs in a process group of its own (for signals to the whole group), and its
    output goes to files instead of pipes, so this returns as soon as the trainer ends, not once every
    process that inherited a pipe (its DataLoader workers) has gone: what a supervisor sees."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    argv = [*launcher, str(driver), json.dumps(faults), "train", "--config", str(cfg), "--out", str(out), *overrides]
    if not own_group:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    with open(tmp / "stdout.txt", "w+") as o, open(tmp / "stderr.txt", "w+") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e, text=True, env=env, start_new_session=True)
        code = proc.wait(timeout=timeout)
        o.seek(0)
        e.seek(0)
        return subprocess.CompletedProcess(argv, code, o.read(), e.read())


def load_state(out: Path, name: str = "last.pt") -> dict:
    from swinv2.weights.training_state import load_training_state

    return load_training_state(out / "checkpoints" / name)


def assert_same_state(a: dict, b: dict) -> None:
    """Model, EMA, optimizer, scheduler, scaler, progress and sampler position bit-identical."""
    for part in ("model", "ema"):
        if a[part] is None or b[part] is None:  # a run without an EMA
            assert a[part] is None and b[part] is None, part
            continue
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(v, ob["state"][pid][k]), f"optimizer state {pid}.{k}"
    for part in ("scheduler", "scaler", "progress", "sampler", "best", "classes"):
        assert a[part] == b[part], part
    timing = {"img_per_s", "epoch_time_s", "train_time_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def steps_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def read_records(path: Path) -> list[dict]:
    """The step records `inject.record_batches` appended to `path` (none if it was never written)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
