"""Two nodes on one machine, for real: two `torchrun --nnodes 2 --nproc-per-node 1` launchers meeting at a
c10d rendezvous on 127.0.0.1 (gloo), training from shards. Every epoch each sample reaches exactly one
rank once (data.drop_last=false: the last step is short); after the second node's trainer is killed
mid-epoch, both launchers started again resume to the uninterrupted run's state, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from image_folders import make_image_folder
from object_store import free_port
from runs import DRIVER, TESTS, assert_same_state, load_state, tiny_config
from swinv2.cli import main

# Mixup pairs images within a rank's batch and stochastic depth draws per rank: both off, as in test_ddp.
CONFIG = """\
model: {{name: swinv2_micro_window4_32, drop_path_rate: 0.0}}
data: {{root: {root}, source: shards, batch_size: 3, workers: 0, drop_last: false, aug: {{mixup: 0.0, cutmix: 0.0}}}}
optim: {{lr: 2.0e-3, lr_scaling: none}}
schedule: {{warmup_epochs: 1, warmup_lr: 1.0e-5, min_lr: 1.0e-5}}
train: {{epochs: 2, ema: false, log_every: 1, threads: 1, progress: false, tensorboard: false, checkpoint_every: 1}}
"""
STEPS_PER_EPOCH = 3  # 16 images, global batch 3 x 2: 6 + 6 + 4


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """Shard downloads and verdicts go to a folder of this module's, never to the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWINV2_CACHE", str(tmp_path_factory.mktemp("swinv2_cache")))
        yield


def two_nodes(tmp: Path, faults: dict, cfg: Path, out: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Both node launchers, started together; each returns when its node ends."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
    }
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "shards-test",
        "--max-restarts", "0",
    ]  # fmt: skip
    argv = [*launcher, str(driver), json.dumps(faults), "train", "--config", str(cfg), "--out", str(out)]
    procs = []
    for node in range(2):
        log = open(tmp / f"node{node}.log", "w")  # noqa: SIM115 -- closed below
        procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env), log))
    results = []
    for proc, log in procs:
        try:
            code = proc.wait(timeout=timeout)
        finally:
            proc.kill()
            log.close()
        results.append(subprocess.CompletedProcess(argv, code, Path(log.name).read_text(), ""))
    return results


def per_epoch_ids(records: list[dict]) -> list[list[int]]:
    epochs: dict[int, list[int]] = {}
    for r in records:
        epochs.setdefault(r["step"] // STEPS_PER_EPOCH, []).extend(r["indices"])
    return [sorted(epochs[e]) for e in sorted(epochs)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("multinode")
    folder = make_image_folder(tmp / "folder")
    shards = tmp / "shards"
    assert main(["data", "pack", str(folder / "train"), str(shards / "train"), "--shard-samples", "4"]) == 0
    classes = ["--classes", str(shards / "train")]
    assert main(["data", "pack", str(folder / "val"), str(shards / "val"), "--shard-samples", "4", *classes]) == 0
    return tiny_config(tmp, shards, text=CONFIG)


@pytest.mark.slow  # three two-node runs: about a minute on a quiet 2-core machine
def test_two_nodes_see_every_sample_once_per_epoch_and_resume_after_a_node_is_killed(data, tmp_path, monkeypatch):
    monkeypatch.setenv("SWINV2_CACHE", str(tmp_path / "cache"))
    whole, record = tmp_path / "whole", tmp_path / "whole.jsonl"
    for r in two_nodes(tmp_path, {"record": str(record)}, data, whole):
        assert r.returncode == 0, r.stdout[-3000:]
    records = [json.loads(line) for line in record.read_text().splitlines()]
    assert {r["rank"] for r in records} == {0, 1}
    assert per_epoch_ids(records) == [list(range(16))] * 2  # each sample once per epoch, over both nodes
    state = load_state(whole)
    assert state["world_size"] == 2 and state["progress"]["global_step"] == 2 * STEPS_PER_EPOCH

    out, record = tmp_path / "killed", tmp_path / "killed.jsonl"
    killed = two_nodes(tmp_path, {"kill_at": 4, "only_rank": 1, "record": str(record)}, data, out)
    assert all(r.returncode != 0 for r in killed)  # node 1's trainer died; node 0's could not go on alone
    assert load_state(out)["progress"]["global_step"] == 4  # checkpoint_every=1: the last step done
    before = [json.loads(line) for line in record.read_text().splitlines()]
    resumed = two_nodes(tmp_path, {"record": str(record)}, data, out)
    for r in resumed:
        assert r.returncode == 0, r.stdout[-3000:]
    assert any("resumed from" in r.stdout for r in resumed)
    assert_same_state(load_state(out), state)
    after = [json.loads(line) for line in record.read_text().splitlines()][len(before) :]
    assert sorted(r["step"] for r in after) == [4, 4, 5, 5]  # both ranks went on from the checkpoint
    committed = [r for r in before if r["step"] < 4] + after
    assert per_epoch_ids(committed) == [list(range(16))] * 2
    assert sorted(map(json.dumps, committed)) == sorted(map(json.dumps, records))  # the same samples, step by step
