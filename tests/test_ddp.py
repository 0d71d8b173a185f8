"""Data-parallel training under torchrun (gloo, CPU), docs/reliability.md row 15: two processes match one
process at the same global batch, hold identical parameters, only rank 0 writes, and a run killed
mid-way resumes bit-identically when torchrun starts it again."""

from __future__ import annotations

import json

import pytest
import torch

from runs import assert_same_state, drive, load_state, steps_log, tiny_config, train

# Per-sample augmentation is seeded by the sample, so it is the same on any number of ranks; Mixup
# pairs images within a rank's batch and stochastic depth draws per rank, so both are off here.
DDP = """\
model: {{name: swinv2_micro_window4_32, drop_path_rate: 0.0}}
data: {{root: {root}, batch_size: 4, workers: 0, aug: {{mixup: 0.0, cutmix: 0.0}}}}
optim: {{lr: 2.0e-3, lr_scaling: none}}
schedule: {{warmup_epochs: 1, warmup_lr: 1.0e-5, min_lr: 1.0e-5}}
train: {{epochs: 3, ema: true, ema_decay: 0.9, log_every: 1, threads: 1, progress: false, tensorboard: false,
        checkpoint_every: 3}}
"""


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory) -> dict:
    """An uninterrupted 2-process run (global batch 8) with per-rank parameter dumps; rank 1 is
    forbidden to create or write any file in the run directory."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = tiny_config(tmp, text=DDP)
    out = tmp / "run"
    r = drive(tmp, {"dump_params": str(tmp), "readonly": str(out)}, cfg, out, nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg, "out": out, "log": r.stderr}


def test_two_processes_match_one_and_only_rank0_writes(two_procs, tmp_path):
    tmp, out = two_procs["tmp"], two_procs["out"]
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP keeps the replicas identical
    single = tmp_path / "single"
    assert train(two_procs["cfg"], single, "data.batch_size=8") == 0
    one, two = steps_log(single), steps_log(out)
    assert [s["step"] for s in one] == [s["step"] for s in two] == list(range(1, 7))  # 16 images / 8 x 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert a["lr"] == b["lr"]
    state1, state2 = load_state(single), load_state(out)
    for k, v in state1["model"].items():
        torch.testing.assert_close(state2["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    m1 = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_n"] for r in m2] == [8, 8, 8]  # the val set split over the ranks, counted once
    assert [r["val_top1"] for r in m1] == [r["val_top1"] for r in m2]
    # rank 1 could not have written (it would have crashed); the files are those of one process
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        p.relative_to(single).as_posix() for p in single.rglob("*")
    )
    assert state2["world_size"] == 2
    assert two_procs["log"].count("INFO training swinv2_micro") == 1  # rank 1 logs warnings only


def test_two_processes_killed_and_restarted_resume_exactly(two_procs, tmp_path):
    out = tmp_path / "run"
    r = drive(tmp_path, {"kill_at": 5}, two_procs["cfg"], out, nproc=2)
    assert r.returncode != 0  # torchrun reports the killed worker and stops the other
    assert load_state(out)["progress"]["global_step"] == 4  # the end of epoch 2 (2 steps per epoch)
    r = drive(tmp_path, {}, two_procs["cfg"], out, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert_same_state(load_state(out), load_state(two_procs["out"]))


@pytest.mark.slow
def test_fsdp2_trains_like_ddp_resumes_and_loads_in_one_process(two_procs, tmp_path, make_micro):
    from swinv2.weights.factory import load_model

    out = tmp_path / "run"
    fsdp = ("train.parallel=fsdp", "train.ema=false")
    r = drive(tmp_path, {"kill_at": 5}, two_procs["cfg"], out, *fsdp, nproc=2)
    assert r.returncode != 0
    r = drive(tmp_path, {}, two_procs["cfg"], out, *fsdp, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    ddp = {s["step"]: s["loss"] for s in steps_log(two_procs["out"])}
    for s in steps_log(out):  # sharded parameters, the same training (re-done steps included)
        assert abs(s["loss"] - ddp[s["step"]]) <= 1e-6, s
    state = load_state(out)
    model = make_micro(2, randomized=False)
    model.load_state_dict(state["model"])  # full tensors: loads in one process
    reference = load_state(two_procs["out"])["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-4, atol=1e-5, msg=k)
    assert load_model(out / "best.safetensors").info.class_names == ["a", "b"]
