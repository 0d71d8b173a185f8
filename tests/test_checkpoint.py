"""Weights in and out: load_weights (strict, heads, window transfer, SwinV1), self-describing
safetensors, every written format read back, Hugging Face folders (with their preprocessing), unsafe
pickles in every torch format, file modes, training checkpoints read as weights, `swinv2 convert`."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import swinv2
from swinv2 import cli, create_model
from swinv2.errors import CheckpointError, UnsafeCheckpointError
from swinv2.weights.factory import convert_file, load_model, load_weights
from swinv2.weights.files import read_state_dict, save_weights, write_weights
from swinv2.weights.registry import EvalPreprocess, ModelInfo, get_variant
from swinv2.weights.safe_load import torch_load
from swinv2.weights.training_state import TRAINING_STATE_FORMAT, load_training_state, save_training_state

MICRO = "swinv2_micro_window4_32"


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """All parameters random (post-norms included: their zero init would hide a swapped mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if p.ndim == 1 else 1 / math.sqrt(p[0].numel())
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and name.endswith("weight") else 0))
    return model.eval()


def micro(num_classes: int = 5, seed: int = 0, **kw) -> swinv2.SwinTransformerV2:
    return randomise(create_model(MICRO, num_classes=num_classes, **kw), seed)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


# --------------------------------------------------------------------------- load_weights


def test_strict_failure_lists_keys_and_leaves_model_untouched() -> None:
    src = micro(seed=1).state_dict()
    del src["layers.0.blocks.1.attn.q_bias"]
    src["extra.weight"] = torch.zeros(2)
    src["layers.1.blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    model = micro(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_weights(model, src)
    msg = str(e.value)
    assert "missing (1): layers.0.blocks.1.attn.q_bias" in msg and "unexpected (1): extra.weight" in msg
    assert "layers.1.blocks.0.mlp.fc1.weight: weights (3, 3) vs model (192, 48)" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = load_weights(model, src, strict=False)  # the rest loads, the report says what did not
    assert report.missing == ["layers.0.blocks.1.attn.q_bias"] and report.unexpected == ["extra.weight"]
    assert torch.equal(model.layers[0].blocks[0].attn.q_bias, src["layers.0.blocks.0.attn.q_bias"])
    assert torch.equal(model.layers[0].blocks[1].attn.q_bias, before["layers.0.blocks.1.attn.q_bias"])


def test_21841_head_maps_to_exactly_the_official_rows() -> None:
    src_model = micro(num_classes=21841, seed=3)
    official = {
        "model": {
            **src_model.state_dict(),
            "layers.0.blocks.0.attn.relative_position_index": torch.zeros(16, 16, dtype=torch.long),
        }
    }
    model = create_model(MICRO, num_classes=1000)
    report = load_weights(model, official)
    rows = [int(line) for line in (resources.files("swinv2.weights") / "map22kto1k.txt").read_text().split()]
    assert len(rows) == 1000 and max(rows) < 21841
    assert torch.equal(model.head.weight, src_model.head.weight[rows])
    assert torch.equal(model.head.bias, src_model.head.bias[rows])
    assert report.ok and len(report.reshaped) == 2


def test_other_class_count_reinitialises_head_and_headless_drops_it(caplog: pytest.LogCaptureFixture) -> None:
    src = micro(num_classes=5, seed=4).state_dict()
    model = create_model(MICRO, num_classes=3)
    fresh = model.head.weight.clone()
    with caplog.at_level(logging.WARNING):
        report = load_weights(model, src)
    assert "5-class head" in caplog.text
    assert report.reinitialised == ["head.weight", "head.bias"] and torch.equal(model.head.weight, fresh)
    assert torch.equal(model.norm.weight, src["norm.weight"])
    backbone = create_model(MICRO, num_classes=0)
    report = load_weights(backbone, src)
    assert report.ok and any(d.startswith("head.weight") for d in report.dropped)
    assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, 48)  # pooled features


@pytest.mark.parametrize(
    "target,window", [("swinv2_base_window12to16_192to256", 16), ("swinv2_base_window12to24_192to384", 24)]
)
def test_window_and_resolution_transfer(target: str, window: int) -> None:
    # The real base variants' configs (windows, pretrained windows, heads, classes), with depth and
    # width scaled down for speed; the transfer does not depend on either.
    small = dict(depths=(2, 2, 2, 2), embed_dim=32)
    pre = create_model("swinv2_base_window12_192", **small)
    assert pre.config.window_size == 12 and pre.config.num_classes == 21841
    sd = dict(pre.state_dict())
    for k in [k for k in sd if k.endswith("attn.logit_scale")]:  # what an official w12 checkpoint also holds
        p = k.rsplit(".", 1)[0]
        sd[p + ".relative_position_index"] = torch.zeros(144, 144, dtype=torch.long)
        sd[p + ".relative_coords_table"] = torch.zeros(1, 23, 23, 2)
    model = create_model(target, **small)
    assert model.config.window_size == window and model.config.pretrained_window_sizes == (12, 12, 12, 6)
    report = load_weights(model, {"model": sd})
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.reinitialised == []
    for k, v in pre.state_dict().items():
        if "cpb_mlp" in k or "logit_scale" in k:
            assert torch.equal(model.state_dict()[k], v), k
    rows = torch.tensor([int(x) for x in (resources.files("swinv2.weights") / "map22kto1k.txt").read_text().split()])
    assert torch.equal(model.head.weight, pre.head.weight[rows])
    # the same through create_model(weights=...)
    again = create_model(target, weights={"model": sd}, **small)
    _assert_same_weights(again, model)


def _timm_v1():
    timm = pytest.importorskip("timm")
    return randomise(
        timm.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
            num_classes=5,
        ),
        seed=5,
    )


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_swinv1_initialises_v2(layout: str) -> None:
    v1 = _timm_v1().state_dict()
    if layout == "official":  # official V1 names: merging at the end of stage i, plain `head`
        v1 = {
            re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k).replace(
                "head.fc.", "head."
            ): v
            for k, v in v1.items()
        }
        v1["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
        v1["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    model = create_model(MICRO, num_classes=5)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights(model, v1)
    assert report.src == "swinv1" and report.ok
    sd = model.state_dict()
    tv1 = _timm_v1().state_dict()  # the timm-named original, as the reference
    assert torch.equal(sd["layers.0.blocks.1.attn.qkv.weight"], tv1["layers.0.blocks.1.attn.qkv.weight"])
    assert torch.equal(sd["layers.1.blocks.0.attn.q_bias"], tv1["layers.1.blocks.0.attn.qkv.bias"][:48])
    assert torch.equal(sd["layers.1.blocks.0.attn.v_bias"], tv1["layers.1.blocks.0.attn.qkv.bias"][96:])
    assert torch.equal(sd["layers.0.downsample.reduction.weight"], tv1["layers.1.downsample.reduction.weight"])
    for k in (
        "patch_embed.proj.weight",
        "layers.1.blocks.1.mlp.fc2.bias",
        "layers.0.blocks.0.attn.proj.weight",
        "norm.weight",
    ):
        assert torch.equal(sd[k], tv1[k]), k
    assert torch.equal(sd["head.weight"], tv1["head.fc.weight"])
    v2_only = [k for k in sd if re.search(r"logit_scale|cpb_mlp|norm[12]\.|downsample\.norm", k)]
    assert sorted(report.reinitialised) == sorted(v2_only) and len(v2_only) == 4 * 8 + 2
    for k in v2_only:
        assert torch.equal(sd[k], fresh[k]), k
    dropped = " ".join(report.dropped)
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in dropped
    assert "layers.0.blocks.0.norm1.weight" in dropped and "layers.0.downsample.norm.weight" in dropped
    assert model(torch.randn(1, 3, 32, 32)).isfinite().all()


# --------------------------------------------------------------------------- files


def test_save_weights_metadata_and_load_model(tmp_path: Path) -> None:
    model = micro(num_classes=3)
    path = tmp_path / "m.safetensors"
    save_weights(model, path, class_names=["cat", "dog", "eel"], model_name=MICRO)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["swinv2.config"]) == model.config.to_dict()
    assert json.loads(meta["swinv2.class_names"]) == ["cat", "dog", "eel"]
    assert meta["swinv2.model_name"] == MICRO
    assert json.loads(meta["swinv2.preprocess"])["crop_pct"] == 0.875
    loaded = load_model(path)
    _assert_same_weights(loaded, model)
    assert loaded.config == model.config and loaded.info.class_names == ["cat", "dog", "eel"]
    assert loaded.info.preprocess == get_variant(MICRO).preprocess and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    resaved = tmp_path / "again.safetensors"
    save_weights(loaded, resaved)  # class names and preprocess travel with the model
    assert load_model(resaved).info.class_names == ["cat", "dog", "eel"]
    bigger = load_model(path, num_classes=4, img_size=64)
    assert bigger.info.class_names is None and bigger.info.preprocess.img_size == 64
    assert torch.equal(bigger.layers[1].blocks[1].attn.q_bias, model.layers[1].blocks[1].attn.q_bias)
    with pytest.raises(ValueError, match="2 class names for a 3-class model"):
        save_weights(model, tmp_path / "x.safetensors", class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_weights(model, tmp_path / "x.pth")


@pytest.mark.parametrize(
    "fmt,name",
    [
        ("official", "w.pth"),
        ("timm", "w.safetensors"),
        ("timm", "w.pth"),
        ("torchvision", "w.pth"),
        ("hf", "folder"),
        ("native", "w.safetensors"),
    ],
)
def test_native_to_file_to_native_is_bit_identical(tmp_path: Path, fmt: str, name: str) -> None:
    model = micro(num_classes=5, seed=6)
    path = write_weights(model, tmp_path / name, fmt)
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []
    again = create_model(MICRO, num_classes=5)
    report = load_weights(again, path)
    assert report.src == ("native" if fmt == "official" else fmt) and report.ok
    _assert_same_weights(again, model)
    rebuilt = load_model(path, name=MICRO)  # foreign files: the architecture from the registry name
    _assert_same_weights(rebuilt, model)


def test_hf_folder_loads_in_transformers_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = micro(num_classes=3, seed=7)
    model.info = ModelInfo(class_names=["a", "b", "c"])
    folder = write_weights(model, tmp_path / "hf", "hf")
    theirs = transformers.Swinv2ForImageClassification.from_pretrained(folder).eval()
    assert theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (theirs(pixel_values=x).logits - model(x)).abs().max().item() <= 1e-5
    back = load_model(folder)
    assert back.info.class_names == ["a", "b", "c"]
    _assert_same_weights(back, model)
    (folder / "model.safetensors").rename(folder / "other.safetensors")  # a .bin folder reads the same
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    _assert_same_weights(load_model(folder), model)


def test_load_model_needs_a_name_for_foreign_files(tmp_path: Path) -> None:
    path = write_weights(micro(num_classes=7), tmp_path / "w.pth", "official")
    with pytest.raises(ValueError, match="--model NAME"):
        load_model(path)
    model = load_model(path, name=MICRO)  # a fine-tuned checkpoint keeps its own 7 classes
    assert model.config.num_classes == 7 and model.info.preprocess == get_variant(MICRO).preprocess


@pytest.mark.parametrize("fault", ["truncated", "garbage", "missing"])
def test_unreadable_weights_fail_naming_the_file(tmp_path: Path, fault: str) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(micro(), path)
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif fault == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    else:
        path.unlink()
    err = FileNotFoundError if fault == "missing" else CheckpointError
    with pytest.raises(err, match=re.escape(str(path))):
        load_weights(create_model(MICRO, num_classes=5), path)


def test_malicious_pickle_refused_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"head.weight": torch.zeros(1)}, "x": _Evil(str(target))}, evil)
    for call in (
        lambda: load_weights(create_model(MICRO), evil),
        lambda: read_state_dict(evil),
        lambda: load_model(evil, name=MICRO),
        lambda: create_model(MICRO, weights=evil),
        lambda: convert_file(evil, tmp_path / "out.pth", dst_format="timm"),
    ):
        with pytest.raises(UnsafeCheckpointError, match="posix.mkdir|os.mkdir"):
            call()
    assert cli.main(["convert", str(evil), str(tmp_path / "out.safetensors"), "--model", MICRO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil.pth" in err and "mkdir" in err
    assert not target.exists() and not (tmp_path / "out.pth").exists() and not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- swinv2 convert


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = micro(num_classes=5, seed=8)
    official = write_weights(model, tmp_path / "official.pth", "official")
    native = tmp_path / "native.safetensors"
    assert cli.main(["convert", str(official), str(native), "--model", MICRO]) == 0
    out = capsys.readouterr().out
    assert "format: native" in out and "loaded 79 tensors" in out and str(native) in out
    _assert_same_weights(load_model(native), model)
    # a self-describing source needs no --model; hf and torchvision targets
    assert cli.main(["convert", str(native), str(tmp_path / "hf")]) == 0
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "tv.pth"), "--dst", "torchvision"]) == 0
    _assert_same_weights(load_model(tmp_path / "tv.pth", name=MICRO), model)
    # without an architecture: official/timm are a pure key mapping, others need --model
    assert cli.main(["convert", str(official), str(tmp_path / "timm.safetensors"), "--dst", "timm"]) == 0
    assert "pure key mapping" in capsys.readouterr().out
    _assert_same_weights(load_model(tmp_path / "timm.safetensors", name=MICRO), model)
    assert cli.main(["convert", str(official), str(tmp_path / "x"), "--dst", "hf"]) == 2
    err = capsys.readouterr().err
    assert "needs --model NAME" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    assert cli.main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "y.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err


# ------------------------------------------------------------------------ Hugging Face folders keep the preprocessing

PREP = EvalPreprocess(32, 1.0, "bilinear", (0.5, 0.25, 0.125), (0.3, 0.2, 0.1))  # not the 32 px default (0.875)


def _described(tmp_path: Path, prep: EvalPreprocess = PREP) -> Path:
    """Our .safetensors with class names, a non-default eval preprocessing and the model name."""
    path = tmp_path / "ours.safetensors"
    save_weights(
        micro(num_classes=3, seed=9), path, class_names=["cat", "dog", "eel"], preprocess=prep, model_name=MICRO
    )
    return path


def test_hf_folder_round_trip_keeps_preprocessing_name_and_classes(tmp_path: Path) -> None:
    ours = _described(tmp_path)
    folder, back = tmp_path / "hf", tmp_path / "back.safetensors"
    convert_file(ours, folder)
    assert (folder / "preprocessor_config.json").is_file()
    convert_file(folder, back)
    original = load_model(ours)
    for model in (load_model(folder), load_model(back)):
        assert model.info.preprocess == PREP
        assert model.info.model_name == MICRO and model.info.class_names == ["cat", "dog", "eel"]
        assert model.config == original.config
        _assert_same_weights(model, original)


@pytest.mark.parametrize("crop_pct,interpolation", [(0.875, "bicubic"), (1.0, "bilinear")])
def test_hf_folder_preprocessing_loads_in_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crop_pct: float, interpolation: str
) -> None:
    from transformers import AutoImageProcessor

    from swinv2.images import eval_transform

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prep = EvalPreprocess(32, crop_pct, interpolation, PREP.mean, PREP.std)
    folder = write_weights(load_model(_described(tmp_path, prep)), tmp_path / "hf", "hf")
    # 45 x 60 px: every centre-crop margin is even, where transformers (rounding down) and
    # torchvision (rounding half to even) place the crop alike.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    ours = eval_transform(prep.img_size, prep.crop_pct, prep.interpolation, prep.mean, prep.std)(image)
    theirs = AutoImageProcessor.from_pretrained(folder, backend="pil")(image, return_tensors="pt")["pixel_values"]
    assert theirs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(theirs[0], ours, rtol=0, atol=1e-5)  # the same resize, crop and normalisation
    default = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
    assert default.shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = micro(num_classes=3)
    previous = os.umask(umask)
    try:
        save_training_state(tmp_path / "last.pt", {"model": model.state_dict(), "epoch": 1})
        save_weights(model, tmp_path / "w.safetensors", model_name=MICRO)
        write_weights(model, tmp_path / "w.pth", "official")
        convert_file(tmp_path / "w.safetensors", tmp_path / "hf")
        convert_file(tmp_path / "w.pth", tmp_path / "timm.safetensors", dst_format="timm")
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(modes) == [
        "hf/config.json",
        "hf/model.safetensors",
        "hf/preprocessor_config.json",
        "last.pt",
        "timm.safetensors",
        "w.pth",
        "w.safetensors",
    ]
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


# --------------------------------------------------------------------------- pickles with code, any torch format


class _Shell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("zipped,protocol", [(False, 2), (False, 4), (True, 4)])
def test_pickle_with_code_is_refused_naming_the_global(tmp_path: Path, zipped: bool, protocol: int) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save(
        {"model": {"head.weight": torch.zeros(1)}, "x": _Shell(f"echo pwned > {target}")},
        evil,
        _use_new_zipfile_serialization=zipped,
        pickle_protocol=protocol,
    )
    for call in (lambda: torch_load(evil), lambda: read_state_dict(evil), lambda: load_model(evil, name=MICRO)):
        with pytest.raises(UnsafeCheckpointError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{evil}: refused to load") and f"'{os.system.__module__}.system'" in msg, msg
        assert "nothing was executed" in msg and "\n" not in msg
        assert "corrupt" not in msg and "weights_only" not in msg, msg
    assert not target.exists()


def test_unreadable_legacy_pickle_message_drops_torchs_advice(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"  # no code in it, but a pickle opcode torch's weights-only reader lacks
    torch.save(
        {"model": {"head.weight": torch.zeros(1)}}, path, _use_new_zipfile_serialization=False, pickle_protocol=4
    )
    with pytest.raises(CheckpointError) as e:
        torch_load(path)
    msg = str(e.value)
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert msg.startswith(f"{path}: not a readable torch checkpoint") and "\n" not in msg
    assert "weights_only" not in msg and "False" not in msg, msg


# --------------------------------------------------------------------------- training checkpoints as weights

TINY_RUN = [
    "model.name=swinv2_micro_window4_32",
    "model.drop_path_rate=0.0",
    "data.batch_size=4",
    "data.workers=0",
    "data.aug.mixup=0",
    "data.aug.cutmix=0",
    "data.aug.auto_augment=null",
    "data.aug.re_prob=0",
    "schedule.warmup_epochs=0",
    "optim.lr=2e-3",
    "optim.lr_scaling=none",
    "train.epochs=1",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.ema=true",
    "train.ema_decay=0.9",
    "data.crop_pct=1.0",
    "data.interpolation=bilinear",
]


def test_the_training_state_tag_is_written_once() -> None:
    """One tag, in weights/training_state.py: the engine writes the very tag its readers check."""
    from swinv2.train import engine

    package = Path(swinv2.__file__).parent
    spelled = sorted(
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if f'"{TRAINING_STATE_FORMAT}"' in p.read_text()
    )
    assert spelled == ["weights/training_state.py"]
    assert engine.STATE_FORMAT == TRAINING_STATE_FORMAT


@pytest.mark.parametrize("best_metric", ["val_top1", "val_ema_top1"])
def test_training_checkpoint_loads_as_self_describing_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture, best_metric: str
) -> None:
    from image_folders import make_image_folder
    from swinv2.config import load_config
    from swinv2.train import engine

    root = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    engine.fit(load_config(None, TINY_RUN + [f"data.root={root}", f"train.best_metric={best_metric}"]), run)
    last = run / "checkpoints" / "last.pt"
    best = load_model(run / "best.safetensors")
    assert best.info.preprocess == EvalPreprocess(32, 1.0, "bilinear")
    x = torch.randn(2, 3, 32, 32)
    for path in (last, run / "checkpoints" / "best_epoch0001.pt"):
        model = load_model(path)
        assert not model.training and model.config == best.config and model.info.model_name == MICRO
        assert (
            model.info.class_names == best.info.class_names == ["a", "b"]
            and model.info.preprocess == best.info.preprocess
        )
        _assert_same_weights(model, best)  # the weights the best metric measured, as best.safetensors holds
        assert torch.equal(model(x), best(x))
    state = load_training_state(last)
    measured, other = ("ema", "model") if best_metric == "val_ema_top1" else ("model", "ema")
    weights = load_model(last).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in state[measured].items())
    assert not torch.equal(weights["head.weight"], state[other]["head.weight"])
    # the way back from a run whose best.safetensors was never written
    (run / "best.safetensors").unlink()
    out = tmp_path / "from_last.safetensors"
    convert_file(last, out)
    again = load_model(out)
    _assert_same_weights(again, best)
    assert (
        again.info.class_names == ["a", "b"]
        and again.info.preprocess == best.info.preprocess
        and again.info.model_name == MICRO
    )
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(last), "--data", str(root / "val")]) == 0
    assert "top-1" in capsys.readouterr().out
