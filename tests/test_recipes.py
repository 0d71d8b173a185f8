"""Multi-stage recipes (recipes.py), the stage schema, and the recipe files in configs/.

The runs use the tiny `swinv2_micro_window4_32` on a generated 2-class image folder, one epoch of
two steps per stage. Reference values come from outside the code under test: the weights files
the previous stage wrote, fnmatch over the model's parameter names, feature-map arithmetic done
by hand, and the registry's official pretrained windows (from the official configs).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import swinv2
from swinv2.cli import main
from swinv2.config import Config, ConfigError, load_config
from swinv2.train import engine
from swinv2.train.recipes import fit_recipe, next_pretrained_windows, plan_recipe, shadowed_overrides
from swinv2.weights.files import read_state_dict, save_weights
from swinv2.weights.registry import get_variant, model_config
from swinv2.weights.training_state import load_training_state

REPO = Path(__file__).resolve().parents[1]
MICRO = "swinv2_micro_window4_32"


def _image_folder(root: Path, *, n_train: int = 8, n_val: int = 4, size: int = 32) -> Path:
    """root/{train,val}/{dark,light}/*.png: noisy images whose brightness gives the class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, base in (("dark", 60), ("light", 190)):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    return root


def _recipe(root: Path, stages: list[dict], **top: dict) -> dict:
    """A tiny recipe: batch 8 over 16 training images = 2 steps per epoch, one epoch per stage."""
    d = {
        "model": {"name": MICRO, "drop_path_rate": 0.0},
        "data": {
            "root": str(root),
            "batch_size": 8,
            "workers": 0,
            "persistent_workers": False,
            "pin_memory": False,
            "crop_pct": 1.0,
            "aug": {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0},
        },
        "optim": {"lr": 2e-3, "lr_base_batch": 8},
        "schedule": {"warmup_epochs": 0, "warmup_lr": 1e-6, "min_lr": 1e-4},
        "train": {"epochs": 1, "device": "cpu", "tensorboard": False, "progress": False},
        "stages": stages,
    }
    for section, values in top.items():
        d[section] = {**d.get(section, {}), **values}
    return d


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


def _names_matching(names: list[str], *prefixes: str) -> set[str]:
    return {n for n in names if n.startswith(prefixes)} if prefixes else set()


# --------------------------------------------------------------------------- the three-stage run


def test_three_stages_hand_off_exact_weights_with_the_declared_freezing(tmp_path, monkeypatch, caplog):
    data = _image_folder(tmp_path / "data")
    # Stage 1 starts from a weights file (as a fine-tune from any checkpoint would).
    init_model = swinv2.create_model(MICRO, num_classes=2, img_size=16)
    init_path = tmp_path / "init.safetensors"
    save_weights(init_model, init_path)
    stages = [
        {"name": "a16", "model": {"img_size": 16, "freeze": ["patch_embed.*"]}},
        {
            "name": "b32",
            "model": {"img_size": 32, "freeze": ["patch_embed.*", "layers.0.*"]},
            "optim": {"layer_decay": 0.8},
        },
        {"name": "c32w8", "init_from": "last", "model": {"img_size": 32, "window_size": 8, "freeze": []}},
    ]
    # With the EMA ranked, best.safetensors holds EMA weights, which differ from the raw weights in
    # last.pt (timm's EMA copies the weights for its first two updates: 4 steps per stage here), so
    # the `best` and `last` hand-offs are told apart.
    cfg = Config.from_dict(
        _recipe(
            data,
            stages,
            model={"weights": str(init_path)},
            data={"batch_size": 4},
            train={"ema": True, "ema_decay": 0.5, "best_metric": "val_ema_top1"},
        )
    )

    starts = []  # what engine.fit built for each stage, before any training step
    real_build = engine.build_model

    def spy(*args, **kwargs):
        m = real_build(*args, **kwargs)
        starts.append(
            {
                "state": {k: v.detach().clone() for k, v in m.state_dict().items()},
                "frozen": {n for n, p in m.named_parameters() if not p.requires_grad},
                "arch": m.config,
            }
        )
        return m

    monkeypatch.setattr(engine, "build_model", spy)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        summary = fit_recipe(cfg, run)
    assert len(starts) == 3
    dirs = [run / "stage1_a16", run / "stage2_b32", run / "stage3_c32w8"]
    finals = [load_training_state(d / "checkpoints" / "last.pt")["model"] for d in dirs]

    # Each stage starts from exactly the weights the previous one selected.
    _assert_same(starts[0]["state"], read_state_dict(init_path))
    _assert_same(starts[1]["state"], read_state_dict(dirs[0] / "best.safetensors"))  # init_from: best
    _assert_same(starts[2]["state"], finals[1])  # init_from: last
    for best, last in (
        (read_state_dict(dirs[0] / "best.safetensors"), finals[0]),
        (read_state_dict(dirs[1] / "best.safetensors"), finals[1]),
    ):
        assert any(not torch.equal(best[k], last[k]) for k in last)  # the two hand-offs differ
    assert any(not torch.equal(starts[1]["state"][k], finals[1][k]) for k in finals[1])  # stage 2 did train

    # Freezing is exactly what each stage says, and holds through the stage.
    names = [n for n, _ in init_model.named_parameters()]
    expected = [_names_matching(names, "patch_embed."), _names_matching(names, "patch_embed.", "layers.0."), set()]
    assert [s["frozen"] for s in starts] == expected
    for start, final, frozen in zip(starts, finals, expected):
        for n in names:
            assert torch.equal(start["state"][n], final[n]) == (n in frozen), n
    assert "stage 3/3 'c32w8' UNFROZEN since stage 2/3 'b32': patch_embed.proj.weight" in caplog.text
    assert "stage 2/3 'b32' FROZEN by model.freeze=['patch_embed.*', 'layers.0.*']" in caplog.text

    # Resolution, window and pretrained windows per stage: 16 px -> feature maps 4, 2 -> windows 4, 2.
    assert [(s["arch"].img_size, s["arch"].window_size, s["arch"].pretrained_window_sizes) for s in starts] == [
        ((16, 16), 4, (0, 0)),
        ((32, 32), 4, (4, 2)),
        ((32, 32), 8, (4, 2)),
    ]

    # optim.layer_decay reached stage 2's optimizer: group LR / head LR = 0.8 ** (5 - layer id).
    opt = load_training_state(dirs[1] / "checkpoints" / "last.pt")["optimizer"]
    top = max(g["lr"] for g in opt["param_groups"])
    for g in opt["param_groups"]:
        layer = {int(n.split(".")[3]) + 3 if n.startswith("layers.1.blocks") else 5 for n in g["param_names"]}
        assert len(layer) == 1, g["param_names"]
        assert g["lr"] == pytest.approx(top * 0.8 ** (5 - layer.pop()), rel=1e-12)

    # The recipe's own files: record, joined metrics over the three stages, curves; the summary.
    rec = json.loads((run / "recipe.json").read_text())
    assert [rec["stages"][d.name]["status"] for d in dirs] == ["done"] * 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"], r["stage_epoch"]) for r in rows] == [(1, 1, 1), (2, 2, 1), (3, 3, 1)]
    assert (run / "curves.png").stat().st_size > 0 and (run / "config.yaml").exists()
    assert summary["weights"] == str(dirs[2] / "best.safetensors") and len(summary["stages"]) == 3

    # Running it again trains nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fit_recipe(cfg, run)
    assert len(starts) == 3
    assert caplog.text.count("already finished") == 3


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.slow  # about 30 s
def test_sigkill_in_stage_2_then_same_command_finishes_2_and_3_without_redoing_1(tmp_path):
    data = _image_folder(tmp_path / "data")
    stages = [
        {"name": "a", "model": {"img_size": 16, "freeze": []}},
        {
            "name": "b",
            "model": {"img_size": 32, "freeze": ["patch_embed.*"]},
            "train": {"epochs": 3, "checkpoint_every": 1},
        },
        {"name": "c", "model": {"img_size": 32, "freeze": []}},
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data, stages)))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "swinv2", "train", "--config", str(recipe), "--out", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stage1, stage2 = run / "stage1_a", run / "stage2_b"

    with open(tmp_path / "first.log", "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while not (stage2 / "checkpoints" / "last.pt").exists():  # stage 2 saved after its first step
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "stage 2 never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_in = load_training_state(stage2 / "checkpoints" / "last.pt")["progress"]
    assert killed_in["epoch"] < 3  # stage 2 had not finished
    assert "stage2_b" not in json.loads((run / "recipe.json").read_text())["stages"]
    stage1_files = {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()}

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "stage 1/3 'a' already finished" in again.stderr
    assert f"resumed from {stage2 / 'checkpoints'}" in again.stderr
    assert "stage 1/3 'a' in" not in again.stderr  # stage 1 was not started again
    assert {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()} == stage1_files
    epochs_b = [json.loads(x)["epoch"] for x in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert epochs_b == [1, 2, 3]
    rec = json.loads((run / "recipe.json").read_text())
    assert sorted(rec["stages"]) == ["stage1_a", "stage2_b", "stage3_c"]


# --------------------------------------------------------------------------- pretrained windows


def test_pretrained_windows_follow_the_previous_stage_and_keep_its_function():
    # The official 22k->1k fine-tunes set 12, 12, 12, 6 for the 192 px / window-12 checkpoint.
    assert (
        next_pretrained_windows(get_variant("swinv2_base_window12_192").config)
        == get_variant("swinv2_base_window12to16_192to256").config.pretrained_window_sizes
        == (12, 12, 12, 6)
    )
    # 96 px, window 12: feature maps 24, 12, 6, 3; a stage that had pretrained windows keeps them.
    b96 = model_config("swinv2_base_window12_192", img_size=96)
    assert next_pretrained_windows(b96) == (12, 12, 6, 3)
    assert next_pretrained_windows(
        model_config("swinv2_base_window12_192", img_size=384, pretrained_window_sizes=(12, 12, 6, 3))
    ) == (12, 12, 6, 3)

    # (h, w) and per-stage windows: each stage's effective window, an int where square (8x8 then 4x4 maps).
    assert next_pretrained_windows(model_config(MICRO, window_size=(4, 8))) == ((4, 8), 4)
    assert next_pretrained_windows(
        model_config(MICRO, window_size=((2, 4), 4), pretrained_window_sizes=((4, 8), 0))
    ) == ((4, 8), 4)

    # A stage-2 model built this way computes stage 1's function at stage 1's size and window.
    torch.manual_seed(0)
    first = swinv2.create_model(MICRO, num_classes=3, img_size=16).eval()
    for p in first.parameters():  # post-norms start at zero: make every block do something
        p.data.add_(0.05 * torch.randn_like(p))
    pws = next_pretrained_windows(first.config)
    assert pws == (4, 2)
    second = swinv2.create_model(
        MICRO, num_classes=3, img_size=32, pretrained_window_sizes=pws, weights=first.state_dict()
    ).eval()
    naive = swinv2.create_model(
        MICRO, num_classes=3, img_size=32, pretrained_window_sizes=(4, 4), weights=first.state_dict()
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = first(x)
        assert torch.allclose(second(x), ref, rtol=0, atol=1e-6)
        assert not torch.allclose(naive(x), ref, rtol=0, atol=1e-4)  # re-normalising moves the learned bias


# --------------------------------------------------------------------------- layer decay


def _simmim_layer_ids(model: swinv2.SwinTransformerV2) -> dict[str, int]:
    """Layer ids by walking the modules in forward order: patch embedding 0, blocks 1..L in order,
    a stage's patch merging with that stage's last block (SimMIM), final norm and head L + 1."""
    ids = {f"patch_embed.{n}": 0 for n, _ in model.patch_embed.named_parameters()}
    block = 0
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            block += 1
            ids |= {f"layers.{i}.blocks.{j}.{n}": block for n, _ in blk.named_parameters()}
        if layer.downsample is not None:
            ids |= {f"layers.{i}.downsample.{n}": block for n, _ in layer.downsample.named_parameters()}
    ids |= {f"norm.{n}": block + 1 for n, _ in model.norm.named_parameters()}
    ids |= {f"head.{n}": block + 1 for n, _ in model.head.named_parameters()}
    return ids


def test_layer_decay_gives_each_parameter_lr_times_decay_to_the_depth_from_the_top():
    from swinv2.train.schedule import WarmupCosineLR, build_optimizer, param_groups, swin_layer_id

    cfg = swinv2.SwinV2Config(
        img_size=(32, 32),
        embed_dim=16,
        depths=(1, 2, 3, 1),
        num_heads=(1, 2, 4, 8),
        window_size=2,
        pretrained_window_sizes=(0, 0, 0, 0),
        num_classes=5,
    )
    model = swinv2.SwinTransformerV2(cfg)
    model.patch_embed.proj.weight.requires_grad_(False)
    ids = _simmim_layer_ids(model)
    assert set(ids) == {n for n, _ in model.named_parameters()}
    L, decay, lr = sum(cfg.depths), 0.75, 1e-3
    opt = build_optimizer(model, lr=lr, weight_decay=0.05, layer_decay=decay)
    sched = WarmupCosineLR(opt, lr=lr, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=3, total_steps=10)
    for _ in range(4):
        sched.step()
    base = sched.lr_at(4)
    no_decay = {n for g in param_groups(model, 0.05) if g["weight_decay"] == 0 for n, _ in g["params"]}
    seen = set()
    for g in opt.param_groups:
        for n in g["param_names"]:
            seen.add(n)
            assert g["lr"] == pytest.approx(base * decay ** (L + 1 - ids[n]), rel=1e-12), n
            assert g["weight_decay"] == (0.0 if n in no_decay else 0.05), n
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    # The official names of SwinV2-B (depths 2, 2, 18, 2), by the SimMIM rule.
    b = (2, 2, 18, 2)
    assert [
        swin_layer_id(n, b)
        for n in (
            "patch_embed.proj.weight",
            "layers.0.blocks.0.attn.qkv.weight",
            "layers.0.blocks.1.norm2.bias",
            "layers.0.downsample.reduction.weight",
            "layers.1.blocks.0.mlp.fc1.weight",
            "layers.2.blocks.17.attn.cpb_mlp.0.weight",
            "layers.2.downsample.norm.weight",
            "layers.3.blocks.1.norm1.weight",
            "norm.weight",
            "head.bias",
        )
    ] == [0, 1, 2, 2, 3, 22, 22, 24, 25, 25]


# --------------------------------------------------------------------------- config and CLI


def test_print_config_of_the_first_reproduction_shows_every_hyperparameter(capsys):
    path = REPO / "configs" / "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml"
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    c = yaml.safe_load(capsys.readouterr().out)
    m, d, a, o, s, t = c["model"], c["data"], c["data"]["aug"], c["optim"], c["schedule"], c["train"]
    assert get_variant(m["name"]).aliases == ("swinv2_base_patch4_window12to16_192to256_22kto1k_ft",)
    assert (m["img_size"], m["window_size"], m["pretrained_window_sizes"]) == (256, 16, [12, 12, 12, 6])
    assert (m["num_classes"], m["drop_path_rate"]) == (1000, 0.2)
    assert (t["epochs"], s["cooldown_epochs"], s["cooldown_lr"]) == (40, 10, 2e-7)  # 30 + 10 cool-down
    assert (o["name"], o["lr"], s["min_lr"], s["warmup_epochs"], s["warmup_lr"]) == ("adamw", 5e-5, 2e-7, 5, 2e-8)
    assert (o["weight_decay"], o["clip_grad"], t["amp"]) == (1e-8, 5.0, "fp16")  # fp16: dynamic scaler
    assert (a["label_smoothing"], a["mixup"], a["cutmix"], a["switch_prob"], a["mixup_mode"]) == (
        0.1,
        0.8,
        1.0,
        0.5,
        "batch",
    )
    assert (a["auto_augment"], a["re_prob"], a["re_mode"]) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel")
    assert (d["interpolation"], a["interpolation"], d["crop_pct"]) == ("bicubic", "bicubic", 0.875)
    # 32 per device on 8 devices: the LR is stated at that total batch (the device count is a launch setting).
    assert (d["batch_size"], o["lr_base_batch"], o["lr_scaling"]) == (32, 256, "linear")
    assert "--nproc_per_node 8" in path.read_text()


RECIPES = [
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml",
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft_official.yaml",
    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml",
    "swinv2_large_patch4_window12to16_192to256_22kto1k_ft.yaml",
    "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.yaml",
    "swinv2_base_window12_progressive_96_192_384.yaml",
    "demo_digits_progressive.yaml",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_files_load_plan_and_state_command_hardware_time_accuracy(name, tmp_path):
    path = REPO / "configs" / name
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"swinv2 train --config configs/{name}" in header.replace("\\\n#       ", "")
    for key in ("Hardware:", "Expected time:", "Expected accuracy:"):
        assert f"\n# {key} " in header, key
    cfg = load_config(path, ["model.weights=null"])  # weights are placeholders the user sets
    if "22kto1k" in name:  # from the 22k model at 192 px / window 12: its windows, as the official alias says
        start = get_variant(
            cfg.model.name.replace("_window12to16_192to256", "_window12_192").replace(
                "_window12to24_192to384", "_window12_192"
            )
        ).config
        assert (
            cfg.model.pretrained_window_sizes
            == next_pretrained_windows(start)
            == get_variant(cfg.model.name).config.pretrained_window_sizes
        )
        assert (cfg.model.img_size, cfg.model.window_size) == get_variant(cfg.model.name).config.img_size[:1] + (
            get_variant(cfg.model.name).config.window_size,
        )
    if cfg.stages:
        plans = plan_recipe(cfg, tmp_path)
        assert [p.dir.name.startswith(f"stage{p.index}_") for p in plans] == [True] * len(plans)
    if name.startswith("swinv2_base_window12_progressive"):
        assert [p.arch.img_size[0] for p in plans] == [96, 192, 384]
        assert [p.cfg.train.epochs for p in plans] == [20, 10, 5]
        assert [bool(p.frozen) for p in plans] == [True, True, False]
        assert all(n.startswith("patch_embed.") for p in plans for n in p.frozen)
        assert [p.arch.pretrained_window_sizes for p in plans] == [(0, 0, 0, 0), (12, 12, 6, 3), (12, 12, 6, 3)]


def test_stage_keys_are_checked_up_front_naming_the_dotted_key(tmp_path):
    data = tmp_path / "d"
    ok = [{"name": "a", "model": {"img_size": 16, "freeze": []}}, {"name": "b", "model": {"freeze": []}}]

    def plan(stages, **top):
        return plan_recipe(Config.from_dict(_recipe(data, stages, **top)), tmp_path / "run")

    with pytest.raises(ConfigError, match=r"unknown key 'stages\[1\]\.model\.img_sise'"):
        plan([ok[0], {"model": {"img_sise": 32, "freeze": []}}])
    with pytest.raises(ConfigError, match=r"stages\[1\]\.train\.epochs: expected int"):
        plan([ok[0], {"model": {"freeze": []}, "train": {"epochs": "two"}}])
    with pytest.raises(ConfigError, match=r"stages\[1\]\.model\.freeze is not set"):
        plan([ok[0], {"name": "b"}])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.model\.freeze: pattern 'patch_embedding\.\*' matches no"):
        plan([{"model": {"freeze": ["patch_embedding.*"]}}])
    with pytest.raises(ConfigError, match=r"stages\[1\]\.model\.weights: a later stage starts from"):
        plan([ok[0], {"model": {"freeze": [], "weights": "x.safetensors"}}])
    with pytest.raises(ConfigError, match=r"stages\[1\]: the weights of stage 1/2 'a' do not fit"):
        plan([ok[0], {"model": {"name": "swinv2_tiny_window8_256", "freeze": []}}])
    with pytest.raises(ConfigError, match=r"model\.freeze=\['patch_embed\.\*'\] at the top level"):
        plan(ok, model={"freeze": ["patch_embed.*"]})
    with pytest.raises(ConfigError, match=r"stages\[1\]\.name: 'a' names two stages"):
        plan([ok[0], {"name": "a", "model": {"freeze": []}}])
    with pytest.raises(FileNotFoundError, match="model.weights not found: nope.pth"):
        plan(ok, model={"weights": "nope.pth"})
    assert [p.dir.name for p in plan(ok)] == ["stage1_a", "stage2_b"]


def test_stage_overrides_on_the_command_line_and_shadowed_top_level_keys(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    stages = [
        {"name": "a", "model": {"img_size": 16, "freeze": []}, "train": {"epochs": 4}},
        {"name": "b", "model": {"freeze": []}},
    ]
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path / "d", stages)))
    cfg = load_config(recipe, ["stages.0.train.epochs=2", "stages.1.optim.lr=1e-4"])
    assert (cfg.stages[0].train.epochs, cfg.stages[1].optim.lr) == (2, 1e-4)
    assert shadowed_overrides(cfg, ["train.epochs=1", "optim.lr=1"]) == [
        "override 'train.epochs=1' does not reach stage 1, which sets train.epochs itself; "
        "use stages.0.train.epochs=...",
        "override 'optim.lr=1' does not reach stage 2, which sets optim.lr itself; use stages.1.optim.lr=...",
    ]
    assert shadowed_overrides(cfg, ["train.epochs=1", "stages.0.train.epochs=1"]) == []
    # The CLI: stages shown by --print-config; a bad stage key is one line and exit code 2, nothing written.
    assert main(["train", "--config", str(recipe), "--print-config", "stages.1.train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["stages"]
    assert printed[1] == {"name": "b", "init_from": "best", "model": {"freeze": []}, "train": {"epochs": 3}}
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(out), "stages.5.train.epochs=1"]) == 2
    assert main(["train", "--config", str(recipe), "--out", str(out), "stages.1.model.freez=[]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "swinv2 train: error: cannot set 'stages.5.train.epochs': 'stages' has entries 0..1",
        "swinv2 train: error: override stages.1.model.freez=[]: unknown key 'stages[1].model.freez' "
        "(did you mean 'stages[1].model.freeze'?)",
    ]
    assert not out.exists()


def test_finetune_micro_is_finetune_yaml_at_the_demo_models_lr():
    """configs/finetune_micro.yaml (what benchmarks/finetune_digits.py measures) is finetune.yaml's
    recipe for the published variants, with the LR triple at the demo's from-scratch LR per image."""
    from swinv2.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    ft, micro, demo = (load_config(configs / f) for f in ("finetune.yaml", "finetune_micro.yaml", "demo_digits.yaml"))
    assert micro.model.name == demo.model.name == "swinv2_micro_window4_32" and not micro.model.pretrained
    per_image = lambda c: c.optim.lr / c.optim.lr_base_batch  # noqa: E731
    assert per_image(micro) == pytest.approx(per_image(demo), rel=1e-12)
    for c in (ft, micro):
        assert c.schedule.warmup_lr / c.optim.lr == pytest.approx(
            1e-3
        ) and c.schedule.min_lr / c.optim.lr == pytest.approx(1e-2)
    assert (micro.optim.weight_decay, micro.optim.layer_decay, micro.schedule.warmup_epochs, micro.data.aug) == (
        ft.optim.weight_decay,
        ft.optim.layer_decay,
        ft.schedule.warmup_epochs,
        ft.data.aug,
    )
