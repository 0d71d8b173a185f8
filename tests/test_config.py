"""Config schema: official defaults, YAML + dotted overrides, up-front rejection of bad keys/types."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from swinv2.config import AugConfig, Config, ConfigError, _build, _set_dotted, load_config, schema_keys

REPO = Path(__file__).resolve().parents[1]
RECIPES = [REPO / "configs" / f"swinv2_{f}_window{w}_256.yaml" for f in ("tiny", "small", "base") for w in (8, 16)]


def test_defaults_are_the_official_recipe():
    # microsoft/Swin-Transformer config.py defaults (TRAIN.*, AUG.*, MODEL.LABEL_SMOOTHING).
    c = Config()
    assert (c.optim.lr, c.optim.lr_base_batch, c.optim.weight_decay, c.optim.eps, c.optim.betas) == \
        (5e-4, 512, 0.05, 1e-8, (0.9, 0.999))
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == (20, 5e-7, 5e-6)
    assert (c.optim.clip_grad, c.train.epochs, c.data.batch_size) == (5.0, 300, 128)
    a = c.data.aug
    assert (a.auto_augment, a.re_prob, a.re_mode, a.re_count) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (a.mixup, a.cutmix, a.mixup_prob, a.switch_prob, a.mixup_mode) == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (a.label_smoothing, a.color_jitter, a.interpolation) == (0.1, 0.4, "bicubic")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name: swinv2_micro_window4_32\noptim:\n  lr: 1e-3\ntrain:\n  epochs: 5\n")
    cfg = load_config(p, ["train.epochs=2", "data.batch_size=16", "model.freeze=[patch_embed.*]",
                          "data.aug.scale=[0.5, 1]", "data.val_root=null", "train.amp=bf16"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # "1e-3" is a string to PyYAML
    assert cfg.train.epochs == 2 and cfg.data.batch_size == 16
    assert cfg.model.freeze == ("patch_embed.*",)
    assert cfg.data.aug.scale == (0.5, 1.0)
    assert cfg.data.val_root is None and cfg.train.amp == "bf16"


def test_round_trip():
    cfg = load_config(None, ["train.epochs=7", "data.aug.cutmix_minmax=[0.2, 0.8]"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert cfg.replace(**{"model.num_classes": 10}).model.num_classes == 10


@pytest.mark.parametrize("override, key, hint", [
    ("optim.lrr=1", "optim.lrr", "optim.lr"),
    ("lr=1", "lr", "optim.lr"),
    ("data.aug.mixpu=0.5", "data.aug.mixpu", "data.aug.mixup"),
    ("trian.epochs=3", "trian", "train"),
    ("train.epoch=3", "train.epoch", "train.epochs"),
])
def test_unknown_key_names_it_and_the_closest(override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert repr(key) in str(e.value) and repr(hint) in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.ema=3", "train.ema"),
    ("data.batch_size=true", "data.batch_size"),
    ("train.amp=fp8", "train.amp"),
    ("data.aug.scale=[0.5]", "data.aug.scale"),
    ("optim.lr=fast", "optim.lr"),
    ("model=3", "model"),
    ("model.freeze=patch_embed", "model.freeze"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@dataclass(frozen=True)
class Stage:
    epochs: int = 1
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass(frozen=True)
class WithStages:
    stages: tuple[Stage, ...] = ()


def test_schema_extends_with_lists_of_sections():
    """A future `stages: tuple[Stage, ...]` needs no parser change: lists of nested sections build and
    validate with indexed key names."""

    built = _build(WithStages, {"stages": [{"epochs": 2}, {"aug": {"mixup": 0.0}}]}, "")
    assert built.stages[0].epochs == 2 and built.stages[1].aug.mixup == 0.0
    with pytest.raises(ConfigError, match=r"stages\[1\]\.epochs"):
        _build(WithStages, {"stages": [{}, {"epochs": "x"}]}, "")
    with pytest.raises(ConfigError, match=r"'stages\[0\]\.aug\.mixpu' \(did you mean 'stages\[0\]\.aug\.mixup'"):
        _build(WithStages, {"stages": [{"aug": {"mixpu": 1}}]}, "")
    # dotted overrides index into lists: stages.1.epochs=5
    d = {"stages": [{"epochs": 2}, {"epochs": 3}]}
    _set_dotted(d, "stages.1.epochs", 5)
    assert _build(WithStages, d, "").stages[1].epochs == 5
    with pytest.raises(ConfigError, match="stages.2"):
        _set_dotted(d, "stages.2.epochs", 5)


def test_schema_keys_cover_the_documented_names():
    keys = set(schema_keys())
    assert {"model.name", "model.img_size", "model.window_size", "data.root", "data.batch_size", "train.epochs",
            "train.seed", "train.amp", "optim.lr"} <= keys


@pytest.mark.parametrize("path", RECIPES + [REPO / "configs" / "demo_digits.yaml"], ids=lambda p: p.name)
def test_recipes_load(path):
    cfg = load_config(path)
    from swinv2.registry import get_variant

    get_variant(cfg.model.name)  # names a registered model


def test_official_from_scratch_recipes():
    # The paper's ImageNet-1k recipe: 300 epochs, 1e-3 at 1024 images (5e-4 per 512), wd 0.05,
    # 20 warm-up epochs; drop path 0.2 / 0.3 / 0.5 for T / S / B.
    assert len(RECIPES) == 6
    for path in RECIPES:
        cfg = load_config(path)
        assert cfg.train.epochs == 300 and cfg.optim.weight_decay == 0.05 and cfg.schedule.warmup_epochs == 20
        assert cfg.optim.lr * 1024 / cfg.optim.lr_base_batch == pytest.approx(1e-3)
        family = cfg.model.name.split("_")[1]
        assert cfg.model.drop_path_rate == {"tiny": 0.2, "small": 0.3, "base": 0.5}[family]


def test_cli_print_config_and_bad_key(tmp_path):
    demo = str(REPO / "configs" / "demo_digits.yaml")
    r = subprocess.run([sys.executable, "-m", "swinv2", "train", "--config", demo, "--print-config", "train.epochs=3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Config.from_dict(yaml.safe_load(r.stdout)) == load_config(demo, ["train.epochs=3"])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "swinv2", "train", "--config", demo, "--out", str(out), "optim.lrr=1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'optim.lrr'" in lines[0] and "'optim.lr'" in lines[0]
    assert not out.exists()  # rejected before any work
