"""Config schema: official defaults, YAML + dotted overrides, up-front rejection of bad keys/types/ranges."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from swinv2.config import (
    INHERIT,
    MAX_RECIPE_BYTES,
    RESUME_MAY_CHANGE,
    AugConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    StageTrainConfig,
    TrainConfig,
    _build,
    _set_dotted,
    auto_workers,
    check_resume_config,
    config_changes,
    load_config,
    schema_keys,
    schema_table,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = [REPO / "configs" / f"swinv2_{f}_window{w}_256.yaml" for f in ("tiny", "small", "base") for w in (8, 16)]


def test_defaults_are_the_official_recipe():
    # microsoft/Swin-Transformer config.py defaults (TRAIN.*, AUG.*, MODEL.LABEL_SMOOTHING).
    c = Config()
    assert (c.optim.lr, c.optim.lr_base_batch, c.optim.weight_decay, c.optim.eps, c.optim.betas) == (
        5e-4,
        512,
        0.05,
        1e-8,
        (0.9, 0.999),
    )
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == (20, 5e-7, 5e-6)
    assert (c.optim.clip_grad, c.train.epochs, c.data.batch_size) == (5.0, 300, 128)
    a = c.data.aug
    assert (a.auto_augment, a.re_prob, a.re_mode, a.re_count) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (a.mixup, a.cutmix, a.mixup_prob, a.switch_prob, a.mixup_mode) == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (a.label_smoothing, a.color_jitter, a.interpolation) == (0.1, 0.4, "bicubic")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  name: swinv2_micro_window4_32\noptim:\n  lr: 1e-3\ntrain:\n  epochs: 5\n")
    cfg = load_config(
        p,
        [
            "train.epochs=2",
            "data.batch_size=16",
            "model.freeze=[patch_embed.*]",
            "data.aug.scale=[0.5, 1]",
            "data.val_root=null",
            "train.amp=bf16",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # "1e-3" is a string to PyYAML
    assert cfg.train.epochs == 2 and cfg.data.batch_size == 16
    assert cfg.model.freeze == ("patch_embed.*",)
    assert cfg.data.aug.scale == (0.5, 1.0)
    assert cfg.data.val_root is None and cfg.train.amp == "bf16"


def test_windows_per_stage_and_rectangular(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  window_size: [16, 16, 16, 8]\n  pretrained_window_sizes: [[12, 6], 12, 12, 6]\n")
    cfg = load_config(p, [])
    assert cfg.model.window_size == (16, 16, 16, 8)
    assert cfg.model.pretrained_window_sizes == ((12, 6), 12, 12, 6)
    assert load_config(None, ["model.window_size=[7, 9]"]).model.window_size == (7, 9)
    assert load_config(None, ["model.window_size=12"]).model.window_size == 12
    assert load_config(p, []).to_dict()["model"]["window_size"] == [16, 16, 16, 8]  # YAML / JSON-able
    for bad in ("model.window_size=[7, 0]", "model.window_size=[[8, 0], 4, 4, 4]"):
        with pytest.raises(ConfigError, match=r"each value must be in \[1, 64\]"):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="expected"):
        load_config(None, ["model.window_size=[[8, 4, 2]]"])


def test_round_trip():
    cfg = load_config(None, ["train.epochs=7", "data.aug.cutmix_minmax=[0.2, 0.8]"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert cfg.replace(**{"model.num_classes": 10}).model.num_classes == 10


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("optim.lrr=1", "optim.lrr", "optim.lr"),
        ("lr=1", "lr", "optim.lr"),
        ("data.aug.mixpu=0.5", "data.aug.mixpu", "data.aug.mixup"),
        ("trian.epochs=3", "trian", "train"),
        ("train.epoch=3", "train.epoch", "train.epochs"),
    ],
)
def test_unknown_key_names_it_and_the_closest(override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert repr(key) in str(e.value) and repr(hint) in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.ema=3", "train.ema"),
        ("data.batch_size=true", "data.batch_size"),
        ("train.amp=fp8", "train.amp"),
        ("data.aug.scale=[0.5]", "data.aug.scale"),
        ("optim.lr=fast", "optim.lr"),
        ("model=3", "model"),
        ("model.freeze=patch_embed", "model.freeze"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"override {override}: expected ")  # the override names the key
    assert e.value.key == key


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
    assert {
        "model.name",
        "model.img_size",
        "model.window_size",
        "data.root",
        "data.batch_size",
        "train.epochs",
        "train.seed",
        "train.amp",
        "optim.lr",
    } <= keys


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(path, caplog):
    """Every shipped recipe is inside the ranges and warns about nothing (e.g. no warm-up as long as a stage)."""
    caplog.set_level(logging.WARNING, logger="swinv2.config")
    cfg = load_config(path)
    from swinv2.weights.registry import get_variant

    get_variant(cfg.model.name)  # names a registered model
    assert caplog.records == []


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
    r = subprocess.run(
        [sys.executable, "-m", "swinv2", "train", "--config", demo, "--print-config", "train.epochs=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert Config.from_dict(yaml.safe_load(r.stdout)) == load_config(demo, ["train.epochs=3"])
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "swinv2", "train", "--config", demo, "--out", str(out), "optim.lrr=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'optim.lrr'" in lines[0] and "'optim.lr'" in lines[0]
    assert not out.exists()  # rejected before any work


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "override, reason",
    [
        ("data.batch_size=0", "must be in [1, 65536]"),  # was a ZeroDivisionError
        ("optim.accum_steps=0", "must be in [1, 4096]"),  # was a ZeroDivisionError
        ("train.epochs=0", "must be in [1, 100000]"),  # "finished" on a fresh directory
        ("train.epochs=-3", "must be in [1, 100000]"),
        ("model.drop_path_rate=2", "must be in [0, 1)"),
        ("data.aug.label_smoothing=1.5", "must be in [0, 1)"),
        ("model.img_size=0", "must be in [1, 4096]"),
        ("train.ema_decay=2", "must be in [0, 1)"),  # was accepted
        ("schedule.warmup_epochs=-1", "must be in [0, 100000]"),  # was accepted
        ("data.aug.hflip=2", "must be in [0, 1]"),  # was accepted
        ("optim.lr=-1", "must be >= 0"),  # was torch's message, without the key
    ],
)
def test_out_of_range_names_the_key(override, reason):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override {override}: {reason}"
    # The same value set in code names the key, the value (as the schema holds it: 2 -> 2.0 for a
    # float field) and the range.
    key, raw = override.split("=")
    with pytest.raises(ConfigError) as e:
        Config().replace(**{key: yaml.safe_load(raw)})
    assert str(e.value) in (f"{key}={raw}: {reason}", f"{key}={float(raw)}: {reason}")
    assert e.value.key == key


@pytest.mark.parametrize(
    "override, reason",
    [
        ("data.aug.scale=[0.5, 2]", "each value must be in (0, 1]"),
        ("data.aug.scale=[1, 0.5]", "must be (min, max) with min <= max"),
        ("data.aug.cutmix_minmax=[0.8, 0.2]", "must be (min, max) with min <= max"),
        ("optim.betas=[0.9, 1]", "each value must be in [0, 1)"),
        ("data.std=[0.2, 0, 0.2]", "each value must be > 0"),
        ("model.pretrained_window_sizes=[12, -1]", "each value must be in [0, 64]"),
        ("data.crop_pct=0", "must be in (0, 1]"),
        ("optim.layer_decay=0", "must be in (0, 1]"),
        ("optim.clip_grad=-1", "must be >= 0"),
        ("optim.lr=.nan", "must be a finite number >= 0"),  # NaN is in no range, and named
        ("data.aug.re_count=0", "must be in [1, 64]"),
        ("data.workers=-1", "must be in [0, 256]"),
        ("train.eval_every=0", "must be >= 1"),  # was a ZeroDivisionError at the first epoch end
        ("train.keep_best=0", "must be >= 1"),
        ("train.log_every=0", "must be >= 1"),
        ("train.threads=0", "must be in [1, 1024]"),
        ("train.seed=-1", "must be in [0, 18446744073709551615]"),
        ("train.seed=18446744073709551616", "must be in [0, 18446744073709551615]"),  # torch.manual_seed overflows
    ],
)
def test_other_ranges(override, reason):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override {override}: {reason}"


def test_range_edges_and_null_are_accepted():
    """The ends a range includes, and None where None means off / the default."""
    cfg = load_config(
        None,
        [
            "data.workers=0",
            "train.checkpoint_every=0",
            "optim.clip_grad=0",
            "schedule.warmup_epochs=0",
            "data.aug.hflip=1",
            "data.aug.mixup=0",
            "model.drop_path_rate=0",
            "train.ema_decay=0",
            "model.pretrained_window_sizes=[0, 0, 0, 0]",
            "data.aug.scale=[1, 1]",
            "optim.layer_decay=1",
            "train.seed=18446744073709551615",
            "train.epochs=1",
            "data.batch_size=1",
            "optim.lr=0",
            "model.img_size=null",
            "optim.clip_grad=null",
            "train.threads=null",
            "data.eval_batch_size=null",
        ],
    )
    assert (cfg.data.workers, cfg.optim.clip_grad, cfg.train.seed) == (0, None, 2**64 - 1)


def _numeric(tp: typing.Any) -> bool:
    """Whether a schema type holds numbers (int or float, alone, optional or in a list)."""
    return tp in (int, float) or any(_numeric(a) for a in typing.get_args(tp))


def test_every_numeric_field_declares_a_range():
    sections = (ModelConfig, DataConfig, AugConfig, OptimConfig, ScheduleConfig, TrainConfig)
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in sections
        for f, tp in ((f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls))
        if _numeric(tp) and "range" not in f.metadata
    ]
    assert missing == []
    # A stage's sparse sections carry the same ranges, and the defaults are inside them.
    stage = {f.name: f.metadata.get("range") for f in dataclasses.fields(StageTrainConfig)}
    assert stage == {f.name: f.metadata.get("range") for f in dataclasses.fields(TrainConfig)}
    Config()  # __post_init__ checks every default


def test_stage_values_are_checked_and_inherited_ones_skipped():
    recipe = REPO / "configs" / "demo_digits_progressive.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(recipe, ["stages.1.train.epochs=0"])
    assert str(e.value) == "override stages.1.train.epochs=0: must be in [1, 100000]"
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.data\.aug\.hflip=2\.0: must be in \[0, 1\]$"):
        Config.from_dict({"stages": [{"data": {"aug": {"hflip": 2}}}]})
    assert Config.from_dict({"stages": [{"name": "a"}]}).stages[0].train.epochs is INHERIT


def test_a_fault_names_the_file_or_the_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"{bad}: data.batch_size=0: must be in [1, 65536]"
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  batch_size: 8\n")
    for override, reason in [
        ("data.batch_size=0", "must be in [1, 65536]"),
        ("data.batch_size=many", "expected int, got 'many' (str)"),
        ("data.aug.mixpu=1", "unknown key 'data.aug.mixpu' (did you mean 'data.aug.mixup'?)"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(good, ["train.epochs=2", override])
        assert str(e.value) == f"override {override}: {reason}"  # not the file, which is fine
    # A fault inside an override's list names the element's key after the override.
    with pytest.raises(ConfigError) as e:
        load_config(good, ["data.aug.scale=[0.5, x]"])
    assert str(e.value) == "override data.aug.scale=[0.5, x]: data.aug.scale[1]: expected float, got 'x' (str)"


def test_warmup_not_shorter_than_the_run_is_warned(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="swinv2.config")
    cfg = load_config(None, ["schedule.warmup_epochs=20", "train.epochs=5"])  # a warning, not an error
    assert cfg.train.epochs == 5
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "schedule.warmup_epochs=20" in record.getMessage() and "train.epochs=5" in record.getMessage()
    caplog.clear()
    load_config(None, ["schedule.warmup_epochs=4.5", "train.epochs=5"])
    assert caplog.records == []
    # Per stage: the second stage inherits the top-level warm-up of 3 epochs and runs 3.
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(
        "schedule: {warmup_epochs: 3}\nstages:\n  - train: {epochs: 10}\n  - train: {epochs: 3}\n"
        "  - {schedule: {warmup_epochs: 1}, train: {epochs: 3}}\n"
    )
    load_config(recipe)
    assert [r.getMessage().split(" is not")[0] for r in caplog.records] == ["stages[1].schedule.warmup_epochs=3"]
    assert "stages[1].train.epochs=3" in caplog.records[0].getMessage()


def test_cli_rejects_an_out_of_range_override_before_any_work(tmp_path, capsys):
    from swinv2.cli import main

    out = tmp_path / "run"
    demo = str(REPO / "configs" / "demo_digits.yaml")
    assert main(["train", "--config", demo, "--out", str(out), "data.batch_size=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "swinv2 train: error: override data.batch_size=0: must be in [1, 65536]"
    ]
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else


# --------------------------------------------------------------------------- hostile recipes (issue 35)


def _refused(capsys, argv: list[str], out: Path) -> str:
    """The one stderr line of `swinv2 ARGV` run in this process, which must refuse it with exit 2 within
    10 s, writing nothing (no run directory)."""
    from swinv2.cli import main

    t0 = time.perf_counter()
    assert main(argv + ["--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 10
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert not out.exists()
    return lines[0]


def _billion_laughs(tmp_path: Path) -> Path:
    """417 bytes whose aliases expand to 9^9 = 387M strings under model.freeze (2.4 GB and 120 s+ once)."""
    text = (
        "a0: &a0 [x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9))
        + "model:\n  freeze: *a8\n"
    )
    p = tmp_path / "laughs.yaml"
    p.write_text(text)
    return p


def test_aliases_are_refused_before_they_expand(tmp_path, capsys):
    p = _billion_laughs(tmp_path)
    assert p.stat().st_size < 500
    line = _refused(capsys, ["train", "--config", str(p), "--print-config"], tmp_path / "run")
    assert line == (
        f"swinv2 train: error: {p}: line 1: anchors and aliases (&name, *name) are not supported in "
        f"a recipe; write the value out"
    )
    with pytest.raises(ConfigError, match=r"^override model.freeze=\[&a x, \*a\]: line 1: anchors and aliases"):
        load_config(None, ["model.freeze=[&a x, *a]"])


@pytest.mark.parametrize(
    "text, line, key, first",
    [
        ("train:\n  epochs: 3\n  epochs: 5\n", 3, "train.epochs", 2),
        ("train: {epochs: 3}\ndata: {batch_size: 4}\ntrain: {seed: 1}\n", 3, "train", 1),
        ("data:\n  aug: {mixup: 0.1, cutmix: 0, mixup: 0.2}\n", 2, "data.aug.mixup", 2),
        ("stages:\n  - train: {epochs: 3}\n  - model: {freeze: []}\n    model: {name: x}\n", 4, "stages[1].model", 3),
    ],
)
def test_a_duplicate_key_names_the_file_the_key_and_both_lines(tmp_path, text, line, key, first):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (
        f"{p}: line {line}: duplicate key {key!r} (first at line {first}); YAML would "
        f"silently keep the last, so set it once"
    )
    assert e.value.key == key
    # Before: the last one won. The same keys, once each, load.
    p.write_text(text.replace("  epochs: 5\n", "").replace(", mixup: 0.2", "").replace("train: {seed: 1}\n", ""))
    if "stages" not in text:
        load_config(p)


def test_an_override_value_with_a_duplicate_key_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"^override data.aug=\{mixup: 0.1, mixup: 0.2\}: line 1: duplicate "
        r"key 'mixup' \(first at line 1\)",
    ):
        load_config(None, ["data.aug={mixup: 0.1, mixup: 0.2}"])


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"  # 200,000 brackets: a RecursionError once; now refused for its size
    deep.write_text("model:\n  freeze: " + "[" * 200_000 + "]" * 200_000 + "\n")
    line = _refused(capsys, ["train", "--config", str(deep), "--print-config"], tmp_path / "run")
    assert line == (
        f"swinv2 train: error: {deep}: larger than {MAX_RECIPE_BYTES // 1024} KiB, too large for a "
        f"recipe (the shipped ones are a few KB)"
    )
    for n in (40, 5000):  # within the size: refused for the depth (by this loader at 32, by libyaml at 1000)
        deep.write_text("model:\n  freeze: " + "[" * n + "]" * n + "\n")
        with pytest.raises(ConfigError) as e:
            load_config(deep)
        assert str(e.value).startswith(f"{deep}: not valid YAML: line 2, column ") and "nest" in str(e.value)
    # An override keeps text that is not YAML (a folder named with brackets); a list key then names the type.
    with pytest.raises(
        ConfigError,
        match=r"^override 'model.freeze=\[\[\[.*\]\]\]' \(400013 characters\): "
        r"expected a list of str, got '\[\[\[",
    ):
        load_config(None, ["model.freeze=" + "[" * 200_000 + "]" * 200_000])
    assert load_config(None, ["data.root=[[[" + "[" * 200_000]).data.root.startswith("[[[[")


def test_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"model:\n  name: swinv2_micro_window4_32\ndata:\n  root: caf\xe9\n")
    line = _refused(capsys, ["train", "--config", str(p), "--print-config"], tmp_path / "run")
    assert line == f"swinv2 train: error: {p}: line 4: byte 0xe9 is not UTF-8 text; save the file as UTF-8"
    p.write_bytes("data:\n  root: café\n".encode())  # the same in UTF-8 loads
    assert load_config(p).data.root == "café"


@pytest.mark.parametrize(
    "text, fault",
    [
        ("train:\n  epochs: 3\x00\n", "line 2: character U+0000 is not allowed in YAML"),
        ("train:\n\tepochs: 3\n", "line 2, column 1: while scanning for the next token"),
        ("train: {epochs: 3}\n---\ntrain: {epochs: 4}\n", "line 2, column 1: expected a single document in the stream"),
        ("data:\n  root: 2024-13-45\n", "line 2, column 9: cannot read '2024-13-45': month must be in 1..12"),
        ("train:\n  epochs: " + "9" * 5000 + "\n", "line 2, column 11: cannot read '99999"),
    ],
)
def test_malformed_yaml_is_one_line_with_its_place(tmp_path, text, fault):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: not valid YAML: {fault}")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def _float_fields() -> list[tuple[str, int]]:
    """(dotted key, list length or 0) of every float setting of the schema."""
    return [
        (key, int(tp.split()[3]) if tp.startswith("a list of ") and "values (float" in tp else 0)
        for key, tp, _, _ in schema_table()
        if "float" in tp
    ]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=str)
def test_every_float_setting_refuses_non_finite_values_naming_the_key(bad):
    fields_ = _float_fields()
    assert {"data.std", "data.mean", "optim.lr", "schedule.warmup_epochs", "data.aug.scale"} <= {k for k, _ in fields_}
    for key, n in fields_:
        value = [bad] * n if n else bad
        with pytest.raises(ConfigError) as e:
            Config().replace(**{key: value})
        assert e.value.key == key and "finite number" in e.value.reason, (key, str(e.value))


@pytest.mark.parametrize(
    "override, reason",
    [
        ("data.std=[inf,inf,inf]", "each value must be a finite number > 0"),  # trained on zeros once
        ("data.std=[.inf, .inf, .inf]", "each value must be a finite number > 0"),
        ("schedule.warmup_epochs=inf", "must be a finite number in [0, 100000]"),  # an OverflowError once
        ("schedule.warmup_epochs=1e400", "must be a finite number in [0, 100000]"),
        ("data.aug.scale=[.nan, 1]", "each value must be a finite number in (0, 1]"),
    ],
)
def test_non_finite_settings_name_the_override(override, reason):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override {override}: {reason}"


def test_non_finite_in_a_recipe_names_the_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  std: [.inf, .inf, .inf]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: data.std=[inf, inf, inf]: each value must be a finite number > 0"
    p.write_text("optim:\n  lr: " + "1" * 400 + "\n")  # an int beyond any float: an OverflowError once
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (
        f"{p}: optim.lr: 1111111111111111111111111111...11111111111111111111111111111 "
        f"is too large (a float holds up to 1.8e308)"
    )


@pytest.mark.parametrize(
    "override, reason",
    [
        ("model.img_size=1000000000", "must be in [1, 4096]"),  # a MemoryError traceback once
        ("model.window_size=100000", "must be in [1, 64]"),
        ("model.pretrained_window_sizes=[12, 12, 12, 1000]", "each value must be in [0, 64]"),
        ("model.num_classes=1000000000", "must be in [1, 100000]"),
        ("data.batch_size=100000000", "must be in [1, 65536]"),
        ("data.workers=100000", "must be in [0, 256]"),
        ("data.aug.re_count=1000000000", "must be in [1, 64]"),
        ("train.epochs=" + "9" * 40, "must be in [1, 100000]"),
        ("simmim.reconstructions=1000000", "must be in [0, 64]"),
    ],
)
def test_sizes_have_upper_bounds(override, reason):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override {override}: {reason}"


def test_huge_img_size_is_one_line_on_the_command_line(tmp_path, capsys):
    line = _refused(capsys, ["train", "model.img_size=1000000000"], tmp_path / "run")
    assert line == "swinv2 train: error: override model.img_size=1000000000: must be in [1, 4096]"


def test_every_registered_variant_is_inside_the_bounds():
    """The bounds leave every variant (official or not) its own sizes, set explicitly as a recipe would."""
    from swinv2.weights.registry import VARIANTS

    for name, v in VARIANTS.items():
        c = v.config
        window = list(c.window_size) if isinstance(c.window_size, tuple) else c.window_size
        load_config(
            None,
            [
                f"model.name={name}",
                f"model.img_size={c.img_size[0]}",
                f"model.window_size={window}",
                f"model.pretrained_window_sizes={list(c.pretrained_window_sizes)}",
                f"model.num_classes={c.num_classes}",
            ],
        )


def test_long_lists_are_refused():
    with pytest.raises(
        ConfigError,
        match=r"^override 'model.freeze=\[a.\*,.*\]' \(4014 characters\): a list of "
        r"1000 entries; at most 256 are accepted$",
    ):
        load_config(None, ["model.freeze=[" + ",".join(["a.*"] * 1000) + "]"])
    assert len(load_config(None, ["model.freeze=[" + ",".join(["a.*"] * 256) + "]"]).model.freeze) == 256


# --------------------------------------------------------------------------- data.workers: auto


@pytest.mark.parametrize(
    "cpus, local, expected",
    [
        (1, None, 0),
        (2, None, 1),
        (4, None, 3),
        (16, None, 8),
        (64, None, 8),
        (16, "4", 3),
        (16, "16", 0),
        (16, "many", 8),
        (8, "0", 7),
    ],
)
def test_auto_workers_rule(monkeypatch, cpus, local, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert auto_workers() == expected


def test_workers_auto_resolves_to_a_number_torch_does_not_warn_about():
    from torch.utils.data import DataLoader

    cfg = load_config(REPO / "configs" / "finetune.yaml")
    n = cfg.data.workers
    assert isinstance(n, int) and n == auto_workers() and cfg.to_dict()["data"]["workers"] == n
    assert load_config(None, ["data.workers=auto"]).data.workers == n == Config().data.workers
    assert load_config(None, ["data.workers=3"]).data.workers == 3
    cpus = len(os.sched_getaffinity(0))
    for workers, warns in ((n, False), (cpus + 1, True)):  # the check that warned twice per run on 2 CPUs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DataLoader(range(4), num_workers=workers).check_worker_number_rationality()
        assert any("worker processes" in str(w.message) for w in caught) == warns


def test_shipped_recipes_ask_auto_workers_where_they_asked_for_many():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        asked = yaml.safe_load(path.read_text()).get("data", {}).get("workers")
        assert asked == "auto" or (isinstance(asked, int) and asked <= 1), path.name


def test_workers_auto_in_a_stage_and_on_resume():
    cfg = Config.from_dict({"stages": [{"data": {"workers": "auto"}}, {"data": {"workers": 0}}]})
    assert cfg.stages[0].data.workers == "auto"  # resolved when the stage's config is built (recipes.py)
    assert cfg.replace(**{"data.workers": cfg.stages[0].data.workers}).data.workers == auto_workers()
    with pytest.raises(ConfigError, match=r"^override data.workers=many: expected int or one of 'auto'"):
        load_config(None, ["data.workers=many"])
    # The checkpoint holds the number that ran; a resume on a machine that resolves another number is allowed.
    saved = Config().replace(**{"data.workers": auto_workers() + 1}).to_dict()
    check_resume_config(saved, load_config(None, ["data.workers=auto"]), Path("last.pt"), allowed=False)


# --------------------------------------------------------------------------- a resumed run's config


def test_config_changes_lists_each_differing_leaf_by_its_dotted_key():
    saved = {"model": {"name": "a", "freeze": ["x"]}, "optim": {"lr": 1.0}, "gone": 1}
    now = {"model": {"name": "a", "freeze": ["y"]}, "optim": {"lr": 2.0}, "new": {"k": 1}}
    # Keys only one side has (a schema that gained or lost a field since the checkpoint) are no change.
    assert config_changes(saved, now) == {"model.freeze": (["x"], ["y"]), "optim.lr": (1.0, 2.0)}
    assert config_changes(saved, saved) == {}


def test_a_resume_may_change_where_the_data_lives_and_how_the_run_is_logged(caplog):
    saved = Config().to_dict()
    source = Path("run/checkpoints/last.pt")
    check_resume_config(None, Config(), source, allowed=False)  # a checkpoint without a config: nothing to compare
    check_resume_config(saved, Config(), source, allowed=False)
    assert caplog.records == []
    cfg = Config().replace(**{"data.root": "/elsewhere", "train.log_every": 7})
    assert {"data.root", "train.log_every"} <= set(RESUME_MAY_CHANGE)
    with caplog.at_level(logging.WARNING, logger="swinv2.config"):
        check_resume_config(saved, cfg, source, allowed=False)
    d = Config()
    assert [r.getMessage() for r in caplog.records] == [
        f"resuming {source} with a changed config: data.root {d.data.root!r} -> '/elsewhere', "
        f"train.log_every {d.train.log_every} -> 7"
    ]


def test_a_resume_that_changes_what_is_computed_needs_the_flag(caplog):
    d = Config()
    saved = d.to_dict()
    cfg = d.replace(**{"optim.lr": 1e-3, "train.log_every": 7})  # one key that changes the run, one that does not
    listed = f"optim.lr {d.optim.lr!r} -> 0.001, train.log_every {d.train.log_every} -> 7"
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, cfg, Path("last.pt"), allowed=False)
    assert str(e.value) == (
        f"last.pt: resuming with a config that changes the run ({listed}); train with "
        f"--allow-config-change to resume with it anyway, or into another --out"
    )
    with caplog.at_level(logging.WARNING, logger="swinv2.config"):
        check_resume_config(saved, cfg, Path("last.pt"), allowed=True)
    assert [r.getMessage() for r in caplog.records] == [f"resuming last.pt with a changed config: {listed}"]


# --------------------------------------------------------------------------- --list-keys


def test_list_keys_prints_every_key_with_type_default_and_range(capsys):
    from swinv2.cli import main

    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "TYPE", "DEFAULT", "VALID"]
    listed = [ln.split()[0] for ln in lines[1:]]
    leaves = [k for k in schema_keys() if not any(o.startswith(k + ".") for o in schema_keys())]
    assert listed == leaves
    row = {ln.split()[0]: ln for ln in lines[1:]}
    assert row["data.batch_size"].split() == ["data.batch_size", "int", "128", "in", "[1,", "65536]"]
    assert row["data.workers"].split()[-4:] == ['"auto"', "in", "[0,", "256]"]
    assert row["train.amp"].split()[1:] == ["one", "of", "'none',", "'bf16',", "'fp16'", '"none"']
