"""SimMIM pretraining: the mask generator, the masked-pixel loss, the decoder, the encoder's weights in a
classifier, the official checkpoint layout, the config checks, a pretraining run on a folder without
class folders that resumes bit-identically after a SIGKILL, and the two-stage digits-style recipe."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_folders import make_image_folder
from runs import assert_same_state, drive, load_state, steps_log, train
from swinv2 import create_model
from swinv2.config import load_config
from swinv2.errors import ConfigError, DataError
from swinv2.model.simmim import (
    MaskGenerator,
    SimMIM,
    check_geometry,
    encoder_stride,
    masked_l1,
    norm_targets,
    reconstruction_images,
)
from swinv2.weights.convert import detect_format
from swinv2.weights.factory import load_weights

MICRO = "swinv2_micro_window4_32"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def simmim_model(**kw) -> SimMIM:
    torch.manual_seed(0)
    return SimMIM(create_model(MICRO, num_classes=0, drop_path_rate=0.0), **kw).eval()


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "size, mask_patch, patch, grid, count",
    [
        (192, 32, 4, (6, 6), 22),  # SimMIM's: ceil(36 x 0.6) = 22 of 36 squares
        (32, 8, 4, (4, 4), 10),  # the digits recipe
        ((64, 96), 16, 4, (4, 6), 15),  # non-square: ceil(24 x 0.6)
    ],
)
def test_mask_generator_count_and_alignment(size, mask_patch, patch, grid, count):
    gen = MaskGenerator(size, mask_patch, patch, 0.6)
    assert (gen.grid, gen.count) == (grid, count)
    masks = gen(list(range(20)))
    scale = mask_patch // patch
    assert masks.shape == (20, grid[0] * scale, grid[1] * scale) and masks.dtype == torch.bool
    squares = masks.view(20, grid[0], scale, grid[1], scale)
    # Every mask square is wholly masked or wholly visible, and exactly `count` squares are masked.
    assert torch.equal(squares.all(dim=(2, 4)), squares.any(dim=(2, 4)))
    assert squares.all(dim=(2, 4)).sum(dim=(1, 2)).tolist() == [count] * 20
    assert torch.equal(gen([7, 3]), gen([7, 3]))  # a mask is a function of its seed alone
    assert torch.equal(gen([3])[0], gen([7, 3])[1])
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 15  # and seeds give different masks


def test_mask_geometry_is_checked_naming_the_key():
    check_geometry(32, 4, 8, 8)
    with pytest.raises(ConfigError, match="simmim.mask_patch_size=6: must be a multiple of the model's patch size 4"):
        check_geometry(32, 4, 8, 6)
    with pytest.raises(ConfigError, match="simmim.mask_patch_size=12: must divide the image size 32"):
        check_geometry(32, 4, 8, 12)
    with pytest.raises(ConfigError, match="model.img_size=36: .*multiple of it"):
        check_geometry(36, 4, 8, 4)
    assert encoder_stride(create_model(MICRO).config) == 8
    assert encoder_stride(create_model("swinv2_tiny_window8_256").config) == 32


# --------------------------------------------------------------------------- loss and decoder


def test_masked_l1_is_the_mean_error_over_masked_pixels_only():
    target = torch.zeros(1, 3, 2, 2)
    target[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # masked
    target[0, :, 1, 1] = torch.tensor([-4.0, 0.0, 4.0])  # masked
    target[0, :, 0, 1] = 100.0  # visible: its error must not count
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # |errors| on masked pixels: 1 + 2 + 3 + 4 + 0 + 4 = 14 over 2 pixels x 3 channels.
    expected = 14 / (2 + 1e-5) / 3
    assert masked_l1(torch.zeros(1, 3, 2, 2), target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_simmim_loss_is_the_masked_l1_of_the_reconstruction():
    model = simmim_model()
    x = torch.randn(2, 3, 32, 32)
    mask = MaskGenerator(32, 8, 4, 0.6)([1, 2])
    pixels = model.pixel_mask(mask)
    assert pixels.shape == (2, 1, 32, 32) and pixels.sum().item() == 2 * 10 * 8 * 8
    with torch.no_grad():
        expected = masked_l1(model.reconstruct(x, mask), x, pixels)
        assert model(x, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_decoder_output_at_a_non_square_size_and_masked_pixels_are_unseen():
    model = simmim_model()
    assert model.stride == 8 and model.decoder[0].out_channels == 8 * 8 * 3
    x = torch.randn(2, 3, 32, 48)
    mask = MaskGenerator((32, 48), 8, 4, 0.6)([5, 6])
    with torch.no_grad():
        assert model.encode(x, mask).shape == (2, model.encoder.num_features, 4, 6)
        out = model.reconstruct(x, mask)
        assert out.shape == (2, 3, 32, 48)
        # The masked patches' tokens are the mask token: what lies under the mask changes nothing.
        pixels = model.pixel_mask(mask).bool().expand_as(x)
        noisy = torch.where(pixels, torch.randn_like(x) * 5, x)
        assert torch.allclose(model.reconstruct(noisy, mask), out, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of the encoder stride 8"):
        model.reconstruct(torch.randn(1, 3, 36, 32), mask[:1])


def test_norm_targets_normalise_by_the_local_window():
    x = torch.randn(1, 3, 9, 9)
    y = norm_targets(x, 5)
    window = x[0, :, 2:7, 2:7].reshape(3, -1)  # the full 5x5 window around pixel (4, 4)
    expected = (x[0, :, 4, 4] - window.mean(1)) / (window.var(1, unbiased=True) + 1e-6).sqrt()
    assert torch.allclose(y[0, :, 4, 4], expected, atol=1e-5)
    corner = x[0, :, :3, :3].reshape(3, -1)  # at the border only the pixels inside count
    expected = (x[0, :, 0, 0] - corner.mean(1)) / (corner.var(1, unbiased=True) + 1e-6).sqrt()
    assert torch.allclose(y[0, :, 0, 0], expected, atol=1e-5)


def test_reconstruction_pictures_keep_the_visible_pixels():
    model = simmim_model()
    x = torch.randn(3, 3, 32, 32).clamp(-2, 2)
    mask = MaskGenerator(32, 8, 4, 0.6)([0, 1, 2])
    pics = reconstruction_images(model, x, mask, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert set(pics) == {"masked", "reconstruction", "original"}
    assert all(p.shape == (3, 32, 32, 3) and p.dtype == np.uint8 for p in pics.values())
    visible = ~model.pixel_mask(mask)[:, 0].bool().numpy()
    assert np.array_equal(pics["reconstruction"][visible], pics["original"][visible])
    assert (pics["masked"][~visible] == 128).all()  # grey where masked


# --------------------------------------------------------------------------- weights


def test_encoder_state_dict_loads_strictly_into_a_classifier():
    model = simmim_model()
    sd = model.encoder.state_dict()
    assert not any("mask_token" in k or k.startswith("decoder") for k in sd)
    classifier = create_model(MICRO, num_classes=10)
    missing, unexpected = classifier.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    report = load_weights(create_model(MICRO, num_classes=10), sd, strict=True)
    assert report.ok and report.reinitialised == ["head.weight", "head.bias"]


def _official_simmim_checkpoint(encoder_sd: dict) -> dict:
    """The layout of microsoft/Swin-Transformer's SimMIM: `encoder.` keys with the mask token, the
    decoder, derived buffers, and the CPB MLP under its released name `rpe_mlp`."""
    sd = {f"encoder.{k}".replace(".cpb_mlp.", ".rpe_mlp."): v.clone() for k, v in encoder_sd.items()}
    sd["encoder.mask_token"] = torch.randn(1, 1, 24)
    sd["decoder.0.weight"] = torch.randn(8 * 8 * 3, 48, 1, 1)
    sd["decoder.0.bias"] = torch.randn(8 * 8 * 3)
    sd["encoder.layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    sd["encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    return {"model": sd}


def test_official_simmim_checkpoint_maps_and_reports_the_dropped_decoder(tmp_path):
    encoder = simmim_model().encoder
    path = tmp_path / "simmim_pretrain.pth"
    torch.save(_official_simmim_checkpoint(encoder.state_dict()), path)
    assert detect_format(_official_simmim_checkpoint(encoder.state_dict())["model"]) == "simmim"
    # Fine-tuning at twice the size and window, the pretrained windows given (paper §3.3).
    model = create_model(MICRO, num_classes=10, img_size=64, window_size=8, pretrained_window_sizes=(4, 4))
    report = load_weights(model, path, strict=True)
    assert report.src == "simmim" and report.ok
    assert sorted(d.split(" ")[0] for d in report.dropped) == [
        "decoder.0.bias",
        "decoder.0.weight",
        "encoder.mask_token",
    ]
    assert "SimMIM decoder" in str(report) and report.reinitialised == ["head.weight", "head.bias"]
    for k, v in encoder.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# --------------------------------------------------------------------------- config


def test_config_checks_for_the_simmim_task():
    cfg = load_config(None, ["train.task=simmim", "train.best_metric=val_loss"])  # in either order
    assert cfg.simmim.mask_ratio == 0.6 and cfg.simmim.mask_patch_size is None
    with pytest.raises(ConfigError, match="train.best_metric=val_top1 with train.task=simmim"):
        load_config(None, ["train.task=simmim"])
    with pytest.raises(ConfigError, match="optim.layer_decay=0.75 with train.task=simmim"):
        load_config(None, ["train.task=simmim", "train.best_metric=val_loss", "optim.layer_decay=0.75"])
    with pytest.raises(ConfigError, match="simmim.norm_target_patch_size=4: must be odd"):
        load_config(None, ["simmim.norm_target_patch_size=4"])
    with pytest.raises(ConfigError, match=r"simmim.mask_ratio=1.0: must be in \(0, 1\)"):
        load_config(None, ["simmim.mask_ratio=1.0"])


def test_the_recipe_files_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    pre = load_config(root / "simmim_pretrain__swinv2_base__img192_window12__800ep.yaml")
    assert (pre.train.task, pre.simmim.mask_patch_size, pre.simmim.norm_target_patch_size) == ("simmim", 32, 47)
    ft = load_config(root / "simmim_finetune__swinv2_base__img224_window14__800ep.yaml")
    assert (ft.optim.layer_decay, ft.model.pretrained_window_sizes) == (0.75, (12, 12, 12, 6))
    digits = load_config(root / "simmim_digits.yaml")
    assert [s.train.task for s in digits.stages] == ["simmim", "classify"]


# --------------------------------------------------------------------------- data and runs

TINY = """\
model: {{name: swinv2_micro_window4_32, drop_path_rate: 0.1}}
data: {{root: {root}, batch_size: 4, workers: 0, aug: {{scale: [0.67, 1.0]}}}}
optim: {{lr: 2.0e-3, lr_scaling: none}}
schedule: {{warmup_epochs: 1, warmup_lr: 1.0e-5, min_lr: 1.0e-5}}
train: {{task: simmim, best_metric: val_loss, epochs: 3, ema: true, ema_decay: 0.9, log_every: 1, threads: 1,
        progress: false, tensorboard: false, checkpoint_every: 3, keep_best: 2}}
simmim: {{mask_patch_size: 8, reconstructions: 3}}
"""


def flat_folder(root: Path) -> Path:
    """train/ and val/ of images with no class folders (and a stray text file)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / f"{i:02d}.png")
    (root / "train" / "notes.txt").write_text("not an image")
    return root


def test_a_folder_without_class_folders_is_pretraining_data(tmp_path, capsys):
    from swinv2.cli import main
    from swinv2.train.datasets import ImageFilesDataset

    root = flat_folder(tmp_path / "flat")
    ds = ImageFilesDataset(root / "train")
    assert len(ds) == 16 and ds.classes == [] and {label for _, label in ds.samples} == {-1}
    assert [Path(p).name for p in ds.stray] == ["notes.txt"]
    tree = ImageFilesDataset(make_image_folder(tmp_path / "tree") / "train")  # class folders: labels ignored
    assert len(tree) == 16 and tree.classes == []
    assert main(["train", "--check-data", f"data.root={root}", "train.task=simmim", "train.best_metric=val_loss"]) == 0
    out = capsys.readouterr().out
    assert "16 images (no labels" in out and "4 images (no labels" in out and "notes.txt" in out
    from swinv2.train.engine import check_data

    with pytest.raises(DataError, match="no class folders"):  # a classifier still needs them
        check_data(load_config(None, [f"data.root={root}"]))


def test_a_flat_root_of_images_is_the_pretraining_set(tmp_path, caplog):
    """data.root holding images directly (no train/ folder) is read whole for SimMIM, without validation;
    a classifier on the same root is still refused, naming the folder it needs."""
    from swinv2.train.engine import check_data, fit

    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    cfg_file = tmp_path / "pt.yaml"
    cfg_file.write_text(TINY.format(root=root))
    cfg = load_config(cfg_file, ["train.epochs=2"])
    report = check_data(cfg)
    assert len(report.splits["train"]) == 12 and "val" not in report.splits
    with caplog.at_level(logging.INFO, logger="swinv2.train.tasks"):
        out = fit(cfg, tmp_path / "run")
    assert f"{root} has no train/ folder: pretraining on every image under it" in caplog.text
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["train_loss"] > 0 for h in history), out
    with pytest.raises(FileNotFoundError, match=f"training folder not found: {root / 'train'}"):
        check_data(load_config(None, [f"data.root={root}"]))


@pytest.mark.slow  # about 18 s; the shared resume path is tested on classification in make test
def test_pretraining_run_resumes_bit_identically_after_a_kill(tmp_path, monkeypatch):
    root = flat_folder(tmp_path / "data")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(root=root))
    ref = tmp_path / "reference"
    assert train(cfg, ref) == 0
    metrics = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert all("val_loss" in m and "val_ema_loss" in m and "val_top1" not in m for m in metrics)
    assert sorted(p.name for p in (ref / "reconstructions").iterdir()) == [f"epoch000{i}.png" for i in (1, 2, 3)]
    report = load_weights(create_model(MICRO, num_classes=5), ref / "best.safetensors", strict=True)
    assert report.ok and report.reinitialised == ["head.weight", "head.bias"]  # the encoder, a new head

    out = tmp_path / "run"
    r = drive(tmp_path, {"kill_at": 7}, cfg, out)  # mid-epoch 2, after the save at step 6
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert train(cfg, out) == 0
    assert_same_state(load_state(out), load_state(ref))
    ref_loss = {s["step"]: s["loss"] for s in steps_log(ref)}
    assert all(s["loss"] == ref_loss[s["step"]] for s in steps_log(out))
    best = load_state(ref, "last.pt")["best"]
    assert [b["metric"] for b in best] == sorted(b["metric"] for b in best)  # lowest loss first
    assert not math.isnan(best[0]["metric"])


def test_two_stage_recipe_hands_the_encoder_to_the_classifier(tmp_path):
    import yaml
    from safetensors.torch import load_file

    from swinv2.train.recipes import fit_recipe

    root = make_image_folder(tmp_path / "data")  # class folders: stage 1 ignores them
    text = (
        TINY.format(root=root)
        .replace("epochs: 3, ema: true", "epochs: 1, ema: false")
        .replace("train: {task: simmim, best_metric: val_loss,", "train: {")
    )
    text += """stages:
  - name: pretrain
    model: {freeze: []}
    train: {task: simmim, best_metric: val_loss}
  - name: finetune
    model: {freeze: []}
    optim: {layer_decay: 0.75}
"""
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(text)
    summary = fit_recipe(load_config(cfg), tmp_path / "run")
    stage1, stage2 = (tmp_path / "run" / d for d in ("stage1_pretrain", "stage2_finetune"))
    encoder = load_file(stage1 / "best.safetensors")
    assert "head.weight" not in encoder and "mask_token" not in encoder
    assert "val_top1" in summary["final"] and summary["stages"][0]["best"]["val_loss"] > 0
    resolved = yaml.safe_load((stage2 / "config.yaml").read_text())
    assert resolved["model"]["weights"] == str(stage1 / "best.safetensors")
    assert resolved["model"]["pretrained_window_sizes"] == [4, 4] and resolved["optim"]["layer_decay"] == 0.75
    assert resolved["train"]["task"] == "classify"
