"""The training read path (`TrainPipeline.read`): a JPEG decoded at a reduced size where the random-resized
crop allows it, the same crop box and RNG draws as the plain path, the output a resampling of the same
region; other files and bad files as before; `swinv2 bench --data`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2.cli import main
from swinv2.images import BadImageError, load_image, load_image_reduced
from swinv2.train.datasets import (
    ImageFolderDataset,
    SeededSamples,
    read_crop,
    seed_everything,
    train_transform,
)

SEEDS = range(32)


@pytest.fixture(scope="module")
def photo_jpeg(tmp_path_factory) -> Path:
    """scikit-learn's china.jpg (640 x 427), a real photograph, saved as a JPEG."""
    from sklearn.datasets import load_sample_images

    path = tmp_path_factory.mktemp("jpeg") / "china.jpg"
    Image.fromarray(load_sample_images().images[0]).save(path, quality=90)
    return path


def _rng_state() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _same_state(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_the_reduced_read_draws_the_plain_crop_box_and_the_same_augmentation(photo_jpeg):
    """For each seed: the box the plain path's crop draws on the decoded image, the reduction the
    largest that keeps the box at least 96 px, and every RNG left as the plain path leaves it (so
    flip, RandAugment and erasing drew the same); at r = 1 the very tensor of the plain path."""
    tf = train_transform(96)
    crop = tf.transforms[0]
    full = load_image(photo_jpeg)
    reductions = []
    for seed in SEEDS:
        seed_everything(seed)
        box = crop.get_params(full, crop.scale, crop.ratio)
        seed_everything(seed)
        _, r, fast_box = read_crop(photo_jpeg, crop)
        assert fast_box == box
        _, _, h, w = box
        assert r == max(k for k in (1, 2, 4, 8) if k == 1 or (h // k >= 96 and w // k >= 96)), (box, r)
        reductions.append(r)

        seed_everything(seed)
        plain = tf(load_image(photo_jpeg))
        plain_state = _rng_state()
        seed_everything(seed)
        fast = tf.read(photo_jpeg)
        assert _same_state(_rng_state(), plain_state)
        assert fast.shape == plain.shape == (3, 96, 96)
        if r == 1:
            assert torch.equal(fast, plain)  # the plain path step for step
    assert {1, 2, 4} <= set(reductions)  # the seeds reached the full-size, 1/2 and 1/4 decodes


def _bicubic_abs_weight_sum(scale: float) -> float:
    """The largest sum of |weights| over an output pixel of Pillow's bicubic (a = -0.5) resize at this
    downscale: its weights are the kernel at the input pixels' distances / scale, normalised to sum 1."""
    a = -0.5

    def k(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        return np.where(
            x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * (x**3 - 5 * x**2 + 8 * x - 4), 0.0)
        )

    worst = 0.0
    for phase in np.linspace(0, 1, 64, endpoint=False):
        x = (np.arange(-int(2 * scale) - 2, int(2 * scale) + 3) + phase) / scale
        w = k(x)
        worst = max(worst, float(np.abs(w).sum() / w.sum()))
    return worst


def test_the_reduced_crop_differs_from_the_plain_path_at_its_size_by_the_decode_only(photo_jpeg):
    """At r > 1 the output is the box resized from the JPEG decoded at 1/r (libjpeg's scaled IDCT,
    D). The plain path at that size is the full decode reduced by r in the pixel domain (Pillow's r x r
    box average, P) and resized with the same box: `ref`. The resize is linear, so
    |out - ref| <= L * max|D - P| + 1 per pixel, L the largest sum of |weights| of the bicubic filter
    (its negative lobes make it above 1) and 1 for the two outputs' rounding to uint8. A box one
    reduced pixel off, what a wrong scaling of the box would give, breaks that bound."""
    tf = train_transform(64, scale=(0.3, 1.0))  # boxes of 64 * 2 px and more: every seed decodes reduced
    crop = tf.transforms[0]
    full = load_image(photo_jpeg)
    checked = 0
    for seed in SEEDS:
        seed_everything(seed)
        out, r, (i, j, h, w) = read_crop(photo_jpeg, crop)
        if r == 1:
            continue
        decoded, r2 = load_image_reduced(photo_jpeg, lambda width, height, r=r: r)
        assert r2 == r and decoded.size == (-(-full.width // r), -(-full.height // r))
        pixel_domain = full.reduce(r)  # the same size: ceil(W / r) x ceil(H / r)
        bound = _bicubic_abs_weight_sum(min(h, w) / r / 64) * np.abs(_arr(decoded) - _arr(pixel_domain)).max() + 1
        box = (j / r, i / r, (j + w) / r, (i + h) / r)
        ref = pixel_domain.resize((64, 64), Image.Resampling.BICUBIC, box=box)
        assert np.abs(_arr(out) - _arr(ref)).max() <= bound, (seed, r)
        off = decoded.resize((64, 64), Image.Resampling.BICUBIC, box=(box[0] + 1, box[1], box[2] + 1, box[3]))
        assert np.abs(_arr(off) - _arr(ref)).max() > bound, (seed, r)
        checked += 1
    assert checked >= len(SEEDS) // 2


def test_a_png_an_exif_rotated_jpeg_and_a_grey_jpeg_take_the_plain_path(tmp_path, photo_jpeg):
    """Not a JPEG, or a JPEG whose EXIF rotates it (its header's size is not the upright size): read
    decodes it whole, the same tensor as the plain path. A greyscale JPEG is reduced and comes out RGB."""
    photo = load_image(photo_jpeg)
    png = tmp_path / "a.png"
    photo.save(png)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    photo.save(rotated, quality=90, exif=exif)
    assert load_image(rotated).size == (photo.height, photo.width)
    tf = train_transform(64)
    for path in (png, rotated):
        for seed in SEEDS[:6]:
            seed_everything(seed)
            plain = tf(load_image(path))
            seed_everything(seed)
            assert torch.equal(tf.read(path), plain)
        assert load_image_reduced(path, lambda w, h: 8)[1] == 1
    grey = tmp_path / "grey.jpg"
    photo.convert("L").save(grey, quality=90)
    img, r = load_image_reduced(grey, lambda w, h: 2)
    assert r == 2 and img.mode == "RGB" and img.size == (320, 214)


def test_a_truncated_jpeg_is_the_one_line_bad_image_error_in_both_paths(tmp_path, photo_jpeg):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    data = photo_jpeg.read_bytes()
    bad = root / "a" / "cut.jpg"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(BadImageError) as plain:
        load_image(bad)
    with pytest.raises(BadImageError) as reduced:
        load_image_reduced(bad, lambda w, h: 4)
    assert str(reduced.value) == str(plain.value) and "\n" not in str(plain.value)
    assert str(plain.value).startswith(str(bad))
    sample = SeededSamples(ImageFolderDataset(root), train_transform(64))[(0, 7)]
    assert sample.image is None and sample.error == (str(bad), plain.value.reason)


def test_bench_data_prints_a_row_per_stage_and_decoder(tmp_path, capsys, photo_jpeg):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo = load_image(photo_jpeg)
    for k in range(3):
        photo.crop((k * 40, 0, k * 40 + 400, 300)).save(folder / f"{k}.jpg", quality=85)
    photo.resize((200, 150)).save(folder / "x.png")
    out = tmp_path / "data.json"
    assert main(["bench", "--data", str(folder), "--img-size", "64", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    from swinv2.tools.data_bench import available_decoders

    decoders = available_decoders()
    header = next(line for line in text.splitlines() if line.startswith("| images/s"))
    assert [c.strip() for c in header.strip("|").split("|")[1:]] == decoders
    for label in ("| decode |", "| decode + crop 64 px |", "| decode + train transform 64 px |"):
        assert sum(line.startswith(label) for line in text.splitlines()) == 1, label
    results = json.loads(out.read_text())["results"]
    assert {(r["stage"], r["impl"]) for r in results} == {
        (s, d) for s in ("decode", "crop", "train") for d in decoders if (s, d) != ("decode", "pillow-reduced")
    }
    assert all(r["images"] == 4 and r["img_per_s"] > 0 for r in results)
    assert next(r for r in results if r["impl"] == "pillow")["x_pillow"] == 1.0
