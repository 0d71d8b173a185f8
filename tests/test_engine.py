"""Training: the LR schedule against timm, the no-decay set, overfitting, accumulation, freezing,
EMA, init weights, and `swinv2 train` on the demo config writing (and resuming) a run directory."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from image_folders import make_image_folder
from swinv2 import create_model
from swinv2.config import load_config
from swinv2.train import distributed as D
from swinv2.train import engine
from swinv2.train.schedule import WarmupCosineLR, build_optimizer, param_groups, scaled_lrs

REPO = Path(__file__).resolve().parents[1]
# A plain, deterministic tiny setup: no augmentation randomness beyond the crop, no stochastic depth.
PLAIN = [
    "model.name=swinv2_micro_window4_32",
    "model.drop_path_rate=0.0",
    "data.batch_size=4",
    "data.workers=0",
    "data.aug.mixup=0",
    "data.aug.cutmix=0",
    "data.aug.auto_augment=null",
    "data.aug.re_prob=0",
    "data.aug.label_smoothing=0",
    "data.aug.hflip=0",
    "schedule.warmup_epochs=0",
    "optim.lr=2e-3",
    "optim.lr_scaling=none",
    "train.progress=false",
    "train.tensorboard=false",
    "train.epochs=2",
    "train.threads=1",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster (and fit()
    sets the same from train.threads); restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_trainer(tmp_path: Path, *overrides: str, data_root: Path | None = None) -> engine.Trainer:
    root = data_root or make_image_folder(tmp_path / "data")
    cfg = load_config(None, PLAIN + [f"data.root={root}", *overrides])
    return engine.Trainer(cfg, tmp_path / "run", D.setup("cpu"))


# --------------------------------------------------------------------------- optimiser and schedule


def _sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_schedule_matches_timm_cosine_with_warmup_prefix():
    from timm.scheduler import CosineLRScheduler

    W, T = 7, 50
    ours = WarmupCosineLR(_sgd(), lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=W, total_steps=T)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    # How the official code builds it (lr_scheduler.py): per step, warm-up prefix, one cycle.
    ref = CosineLRScheduler(
        ref_opt,
        t_initial=T - W,
        lr_min=1e-5,
        warmup_lr_init=1e-6,
        warmup_t=W,
        cycle_limit=1,
        t_in_epochs=False,
        warmup_prefix=True,
    )
    for step in range(T + 5):
        ref.step_update(step)
        assert ours.lr_at(step) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step


def test_schedule_closed_form_with_cooldown():
    opt = _sgd()
    s = WarmupCosineLR(
        opt, lr=1.0, warmup_lr=0.1, min_lr=0.01, warmup_steps=10, total_steps=110, cooldown_steps=20, cooldown_lr=0.001
    )
    assert opt.param_groups[0]["lr"] == 0.1  # set at construction: the LR of step 0
    assert s.lr_at(5) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(50) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine (10..90)
    assert s.lr_at(30) == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.lr_at(90) == s.lr_at(109) == 0.001  # cool-down
    for _ in range(40):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(s.lr_at(40))
    s2 = WarmupCosineLR(
        _sgd(),
        lr=1.0,
        warmup_lr=0.1,
        min_lr=0.01,
        warmup_steps=10,
        total_steps=110,
        cooldown_steps=20,
        cooldown_lr=0.001,
    )
    s2.load_state_dict(s.state_dict())
    assert s2.step_count == 40 and s2.get_last_lr() == s.get_last_lr()
    short = WarmupCosineLR(_sgd(), lr=1.0, warmup_lr=0.0, min_lr=0.0, warmup_steps=30, total_steps=10)
    assert short.lr_at(9) == pytest.approx(0.3)  # a run shorter than its warm-up stays in warm-up


def test_linear_lr_scaling():
    assert scaled_lrs(5e-4, 5e-7, 5e-6, total_batch=1024, base_batch=512, scaling="linear") == pytest.approx(
        (1e-3, 1e-6, 1e-5)
    )
    assert scaled_lrs(5e-4, 5e-7, 5e-6, total_batch=1024, base_batch=512, scaling="none") == (5e-4, 5e-7, 5e-6)


def test_schedule_build_gives_the_optimizer_and_its_schedule_from_the_config():
    """One call: the LRs scaled to the total batch (peak, warm-up, minimum and cool-down alike), warm-up
    and cool-down epochs as steps, the optimizer's groups and hyper-parameters from `optim`."""
    from swinv2.config import OptimConfig, ScheduleConfig
    from swinv2.train import schedule

    model = create_model("swinv2_micro_window4_32", num_classes=5)
    optim = OptimConfig(lr=5e-4, lr_base_batch=512, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6)
    sched = ScheduleConfig(warmup_epochs=1.5, warmup_lr=5e-7, min_lr=5e-6, cooldown_epochs=1, cooldown_lr=5e-8)
    opt, lrs = schedule.build(model, optim, sched, total_batch=1024, steps_per_epoch=10, epochs=6)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert (lrs.lr, lrs.warmup_lr, lrs.min_lr, lrs.cooldown_lr) == pytest.approx((1e-3, 1e-6, 1e-5, 1e-7))
    assert (lrs.warmup_steps, lrs.total_steps, lrs.cooldown_steps) == (15, 60, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # step 0 of the warm-up


def test_optimizer_is_fused_adamw_and_steps_like_the_for_loop_one():
    """build_optimizer uses torch's fused AdamW on the CPU; a few steps give what torch's reference
    for-loop implementation gives from the same state, weight decay and no-decay groups included."""
    model = create_model("swinv2_micro_window4_32", num_classes=5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    ref = torch.optim.AdamW(
        [
            {"params": [ref_params[n] for n in g["param_names"]], "weight_decay": g["weight_decay"]}
            for g in opt.param_groups
        ],
        lr=1e-2,
        foreach=False,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for n, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=g)
            ref_params[n].grad = p.grad.clone()
        opt.step()
        ref.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p, ref_params[n], rtol=1e-5, atol=1e-7), n
        assert not torch.equal(p, start[n]), n  # every parameter moved (decayed or not)


def test_no_weight_decay_set_is_the_official_one():
    model = create_model("swinv2_micro_window4_32", num_classes=5)
    model.patch_embed.proj.weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    names = {g["weight_decay"]: set(g["param_names"]) for g in opt.param_groups}
    assert len(opt.param_groups) == len(param_groups(model, 0.05)) == 2
    no_decay = re.compile(
        r"(norm\d?\.(weight|bias)|\.norm\.(weight|bias)|^norm\.(weight|bias)|q_bias|v_bias|"
        r"logit_scale|cpb_mlp\.\d\.(weight|bias)|\.bias)$"
    )
    all_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names[0.0] == {n for n in all_names if no_decay.search(n)}
    assert names[0.05] == all_names - names[0.0]
    # the 2-D and 3-D exceptions by keyword, and the weights that do decay
    assert {
        "layers.0.blocks.0.attn.logit_scale",
        "layers.0.blocks.0.attn.cpb_mlp.0.weight",
        "layers.0.blocks.0.attn.cpb_mlp.2.weight",
    } <= names[0.0]
    assert {
        "layers.0.blocks.0.attn.qkv.weight",
        "layers.0.blocks.0.attn.proj.weight",
        "head.weight",
        "layers.0.blocks.1.mlp.fc1.weight",
        "layers.0.downsample.reduction.weight",
    } <= names[0.05]
    assert "patch_embed.proj.weight" not in names[0.0] | names[0.05]  # frozen: not optimised


# --------------------------------------------------------------------------- the step


def test_tiny_model_overfits_two_batches(tmp_path):
    tr = make_trainer(tmp_path, "optim.lr=3e-3", "schedule.min_lr=3e-3")
    tr.sampler.set_epoch(0)
    it = iter(tr.train_loader)
    batches = [next(it), next(it)]
    first = tr.train_step([batches[0]])["loss"]
    for i in range(80):
        out = tr.train_step([batches[i % 2]])
    assert first > 0.5 and out["loss"] < 0.05, (first, out["loss"])


def test_accumulation_equals_the_large_batch(tmp_path):
    root = make_image_folder(tmp_path / "data")
    a = make_trainer(tmp_path / "a", "data.batch_size=8", data_root=root)
    b = make_trainer(tmp_path / "b", "data.batch_size=4", "optim.accum_steps=2", data_root=root)
    for tr in (a, b):
        tr.sampler.set_epoch(0)
        it = iter(tr.train_loader)
        for _ in range(2):
            tr.train_step([next(it) for _ in range(tr.accum)])
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_grad_checkpointing_sequential_attention_and_bf16_steps(tmp_path):
    root = make_image_folder(tmp_path / "data")
    plain = make_trainer(tmp_path / "p", data_root=root)
    ckpt = make_trainer(
        tmp_path / "c", "train.grad_checkpointing=true", "train.sequential_attention=true", data_root=root
    )
    assert all(layer.grad_checkpointing for layer in ckpt.model.layers)
    assert all(blk.attn.sequential for layer in ckpt.model.layers for blk in layer.blocks)
    assert not any(blk.attn.sequential for layer in plain.model.layers for blk in layer.blocks)
    for tr in (plain, ckpt):
        tr.sampler.set_epoch(0)
        tr.train_step([next(iter(tr.train_loader))])
    for pa, pb in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    bf16 = make_trainer(tmp_path / "h", "train.amp=bf16", data_root=root)
    bf16.sampler.set_epoch(0)
    out = bf16.train_step([next(iter(bf16.train_loader))])
    assert math.isfinite(out["loss"]) and not out["skipped"]


def test_bf16_amp_on_a_cpu_without_native_bf16_warns_naming_the_setting(tmp_path, monkeypatch, caplog):
    from swinv2 import hardware

    calls = []
    monkeypatch.setattr(hardware, "bf16_matmul_slowdown", lambda device, n=256: calls.append(device) or 80.0)
    with caplog.at_level("WARNING", logger="swinv2.hardware"):
        make_trainer(tmp_path, "train.amp=bf16")
    assert [torch.device(d).type for d in calls] == ["cpu"]
    assert any(r.getMessage().startswith("train.amp=bf16: this CPU has no native bf16") for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="swinv2.hardware"):
        make_trainer(tmp_path / "fp32")  # train.amp=none: no probe
    assert len(calls) == 1 and not caplog.records


def test_stochastic_depth_and_init_weights(tmp_path):
    from swinv2.weights.files import save_weights

    tr = make_trainer(tmp_path, "model.drop_path_rate=0.3")
    blocks = [b for layer in tr.model.layers for b in layer.blocks]
    assert blocks[0].drop_path.p == 0.0 and blocks[-1].drop_path.p == pytest.approx(0.3)
    src = create_model("swinv2_micro_window4_32", num_classes=7)
    torch.nn.init.normal_(src.layers[0].blocks[0].attn.qkv.weight)
    path = tmp_path / "init.safetensors"
    save_weights(src, path)
    ft = make_trainer(tmp_path / "ft", f"model.weights={path}")
    assert ft.model.num_classes == 2  # the 7-class head is replaced by a fresh 2-class one
    assert torch.equal(ft.model.layers[0].blocks[0].attn.qkv.weight, src.layers[0].blocks[0].attn.qkv.weight)


def test_freeze_ema_and_the_saved_state(tmp_path):
    from swinv2.weights.training_state import load_training_state

    tr = make_trainer(tmp_path, "model.freeze=[patch_embed.*]", "train.ema=true", "train.ema_decay=0.9")
    assert not any(n.startswith("patch_embed") for g in tr.optimizer.param_groups for n in g["param_names"])
    tr.run()
    state = load_training_state(tmp_path / "run" / "checkpoints" / "last.pt")
    engine.seed_everything(0)
    init = engine.build_model(tr.cfg, 2).state_dict()
    model, ema = state["model"], state["ema"]
    for k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight"):
        assert torch.equal(model[k], init[k]), k  # frozen: bit-identical after training
    assert not torch.equal(model["head.weight"], init["head.weight"])
    assert not torch.equal(ema["head.weight"], model["head.weight"])  # the EMA is its own average
    assert not torch.equal(ema["head.weight"], init["head.weight"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_ema_top1" in r for r in rows)
    with pytest.raises(ValueError, match="matches no parameter"):
        make_trainer(tmp_path / "typo", "model.freeze=[patch_embd.*]")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_the_training_state_is_its_table_and_a_resume_checks_before_it_loads(tmp_path):
    from swinv2.errors import InputError

    root = make_image_folder(tmp_path / "data")
    tr = make_trainer(tmp_path / "a", "train.ema=true", data_root=root)
    tr.sampler.set_epoch(0)
    tr.train_step([next(iter(tr.train_loader))])
    state = tr.state_dict()
    # The file's keys, in this order: what `weights.training_state` and older runs read.
    assert (
        list(state)
        == [p.key for p in engine.STATE]
        == [
            "format",
            "version",
            "model",
            "ema",
            "optimizer",
            "scheduler",
            "scaler",
            "progress",
            "sampler",
            "history",
            "best",
            "classes",
            "preprocess",
            "model_name",
            "model_config",
            "config",
            "world_size",
            "data",
        ]
    )
    assert [p.key for p in engine.STATE if p.finite] == ["model", "ema", "optimizer", "scaler"]

    other = make_trainer(tmp_path / "b", "train.ema=true", data_root=root)
    untouched = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(InputError, match="the class map changed"):  # checked before the weights are loaded
        other.load_state_dict({**state, "classes": ["x", "y"]}, Path("last.pt"))
    assert _same(other.model.state_dict(), untouched) and other.progress["global_step"] == 0
    other.load_state_dict(state, Path("last.pt"))
    assert _same(other.state_dict(), state)  # every part restored: it writes the same state again


# --------------------------------------------------------------------------- the command


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "swinv2",
            "train",
            "--config",
            str(REPO / "configs" / "demo_digits.yaml"),
            "train.epochs=1",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_config_one_epoch_writes_the_run_directory_then_resumes(tmp_path):
    from swinv2.weights.factory import load_model

    out = tmp_path / "run"
    extra = (f"data.root={tmp_path / 'digits'}", "data.workers=0")
    r = _train(out, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "best.safetensors", "curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").model.num_classes == 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "epoch_time_s"} <= set(
        rows[0]
    )
    assert 0 <= rows[0]["val_top1"] <= rows[0]["val_top5"] <= 100
    model = load_model(out / "best.safetensors")
    assert model.info.class_names == [str(i) for i in range(10)] and model.info.preprocess.crop_pct == 1.0
    assert f"run directory: {out}" in r.stdout and "best.safetensors" in r.stdout and "curves.png" in r.stdout
    before = (out / "checkpoints" / "last.pt").read_bytes()
    again = _train(out, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "already finished" in again.stderr
    assert "epoch 1/1" not in again.stderr  # no epoch redone
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    root = make_image_folder(tmp_path / "data")
    eager = make_trainer(tmp_path / "e", data_root=root)
    compiled = make_trainer(tmp_path / "c", "train.compile=true", data_root=root)
    for tr in (eager, compiled):
        tr.sampler.set_epoch(0)
        it = iter(tr.train_loader)
        for _ in range(2):
            tr.train_step([next(it)])
    for (n, pa), pb in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)
