"""Images of every mode, class folders, the eval/train transforms against timm, Mixup/CutMix, the
resumable sharded sampler, bad-file handling and the digits demo folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_folders import make_image_folder
from swinv2 import images
from swinv2.images import BadImageError, eval_transform, load_image
from swinv2.train import datasets as data
from swinv2.train.datasets import (
    ImageFolderDataset,
    SeededSamples,
    ShardedSampler,
    build_mixup,
    check_dataset,
    collate,
    scan_class_folders,
    train_transform,
)

# --------------------------------------------------------------------------- load_image


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_every_mode_becomes_rgb(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    files = {
        "L": _save(rgb.convert("L"), tmp_path / "l.png"),
        "LA": _save(rgb.convert("LA"), tmp_path / "la.png"),
        "P": _save(rgb.convert("P"), tmp_path / "p.png"),
        "RGBA": _save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
        "CMYK": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "1": _save(rgb.convert("1"), tmp_path / "one.png"),
        "I;16": _save(Image.fromarray((np.arange(120, dtype=np.uint16) * 500).reshape(12, 10)), tmp_path / "i16.png"),
        "F": _save(Image.fromarray(np.full((12, 10), 300.0, np.float32)), tmp_path / "f.tiff"),
        "RGB": _save(rgb, tmp_path / "rgb.jpg"),
    }
    tf = eval_transform(16, 0.875)
    for mode, path in files.items():
        with Image.open(path) as im:
            assert im.mode == mode or (mode == "I;16" and im.mode.startswith("I")), (mode, im.mode)
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (10, 12), mode
        x = tf(img)
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all(), mode


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    got = np.asarray(load_image(path))[0, :, 0]
    assert got.tolist() == [0, 100, 255]  # PIL's own convert("L") would give [0, 255, 255]


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque: kept
    arr[0, 1] = (200, 0, 0, 0)  # transparent: background, whatever the stored colour
    arr[1, 0] = (0, 0, 0, 128)  # half: blended with white
    path = _save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")
    got = np.asarray(load_image(path)).astype(int)
    assert images.ALPHA_BACKGROUND == (255, 255, 255)
    assert got[0, 0].tolist() == [10, 20, 30]
    assert got[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in got[1, 0])


def test_palette_transparency_and_la(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1
    path = _save(p, tmp_path / "p.png", transparency=1)
    assert np.asarray(load_image(path)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA")
    assert np.asarray(load_image(_save(la, tmp_path / "la.png"))).tolist() == [[[50] * 3, [255] * 3]]


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0] = 255  # top-left marker in the stored (landscape) pixels
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.png", exif=exif.tobytes())
    out = np.asarray(load_image(path))
    assert out.shape == (6, 4, 3)  # portrait once upright
    assert out[0, -1].tolist() == [255, 255, 255]  # stored top-left ends top-right after 90 CW


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        ("truncated", "cannot decode"),
    ],
)
def test_bad_files_raise_naming_the_path(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(BadImageError) as e:
        load_image(path)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(str(path)) and reason in str(e.value)
    with pytest.raises(BadImageError, match="file not found"):
        load_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- class folders


def test_class_folder_hygiene(tmp_path):
    root = make_image_folder(tmp_path, classes=("cat", "dog", "eel"), n_train=2, n_val=1)
    train = root / "train"
    (train / ".hidden").mkdir()
    _save(Image.new("RGB", (4, 4)), train / ".hidden" / "x.png")
    (train / "__MACOSX").mkdir()
    (train / "empty").mkdir()
    (train / "notes.txt").write_text("stray")
    (train / "cat" / "readme.md").write_text("stray")
    (train / "cat" / ".DS_Store").write_bytes(b"\0")
    (train / "dog" / "sub").mkdir()
    _save(Image.new("RGB", (4, 4)), train / "dog" / "sub" / "deep.png")
    assert scan_class_folders(train) == ["cat", "dog", "eel", "empty"]
    ds = ImageFolderDataset(train)
    assert ds.classes == ["cat", "dog", "eel", "empty"]  # the empty class keeps its label slot
    assert ds.empty_classes == ["empty"]
    assert sorted(Path(p).name for p in ds.stray) == ["notes.txt", "readme.md"]
    assert ds.class_counts() == [2, 3, 2, 0]
    assert all(".hidden" not in p for p, _ in ds.samples)
    import shutil

    shutil.rmtree(root / "val" / "eel")
    val = ImageFolderDataset(root / "val", class_names=ds.classes)
    assert val.missing_classes == ["eel", "empty"] and {lbl for _, lbl in val.samples} == {0, 1}
    warnings = data.hygiene_warnings(ds, val)
    assert any("empty" in w for w in warnings) and any("notes.txt" in w for w in warnings)
    assert any("eel" in w for w in warnings)
    (root / "val" / "zebra").mkdir()
    _save(Image.new("RGB", (4, 4)), root / "val" / "zebra" / "z.png")
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderDataset(root / "val", class_names=ds.classes)
    with pytest.raises(FileNotFoundError):
        scan_class_folders(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        scan_class_folders(tmp_path / "flat")


def test_an_empty_training_class_folder_is_warned_about_loudly(tmp_path):
    """It stays a class (labels never shift), so the warning names it and says what that costs: an
    output no image teaches, which the model may still predict. A val folder's empty class differs."""
    root = make_image_folder(tmp_path, classes=("cat", "eel"), n_train=2, n_val=1)
    for split in ("train", "val"):
        (root / split / "dog").mkdir()
    train = ImageFolderDataset(root / "train")
    val = ImageFolderDataset(root / "val", class_names=train.classes)
    assert train.classes == ["cat", "dog", "eel"] and train.empty_classes == val.empty_classes == ["dog"]
    lines = data.hygiene_warnings(train, val)
    assert len(lines) == 2
    assert lines[0].startswith(f"{root / 'train'}: empty class folders: dog;")
    assert "may still predict it" in lines[0] and "add images or remove the folder" in lines[0]
    assert lines[1].startswith(f"{root / 'val'}: empty class folders: dog;") and "predict" not in lines[1]
    many = [f"c{i:02d}" for i in range(30)]  # a long list is cut, with the count of the rest
    for c in many:
        (root / "train" / c).mkdir()
    line = data.folder_warnings(ImageFolderDataset(root / "train"), training=True)[0]
    assert "c00, c01" in line and "c09 ... (+21)" in line and "c29" not in line


def test_check_dataset_reports_bad_files_modes_and_balance(tmp_path):
    root = make_image_folder(tmp_path, n_train=3, n_val=1)
    (root / "train" / "a" / "zero.png").write_bytes(b"")
    _save(Image.new("L", (8, 8)), root / "train" / "b" / "grey.png")
    report = check_dataset(root / "train", root / "val", workers=2)
    assert not report.ok
    assert [Path(p).name for p, _ in report.bad["train"]] == ["zero.png"]
    assert report.modes["train"]["L"] == 1 and report.modes["train"]["RGB"] == 6
    text = report.format()
    assert "zero.png" in text and "empty file" in text and "4 images" not in text
    assert "train:" in text and "val:" in text


# --------------------------------------------------------------------------- transforms


def test_eval_transform_matches_timm():
    from timm.data import create_transform

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    for size, crop in ((32, 0.875), (48, 1.0), (40, 0.9)):
        ref = create_transform(size, is_training=False, crop_pct=crop, interpolation="bicubic")(img)
        assert torch.equal(eval_transform(size, crop)(img), ref)


def test_resize_crop_then_batch_normalize_is_timms_eval_transform_bit_for_bit():
    """predict's split of the eval transform (resize and crop per image, scale and normalise per
    batch) gives timm's eval tensors exactly, for landscape, portrait and upscaled images."""
    from timm.data import create_transform

    rng = np.random.default_rng(2)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((70, 90), (61, 40), (20, 25))]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for size, crop in ((32, 0.875), (48, 1.0)):
        ref = torch.stack(
            [
                create_transform(size, is_training=False, crop_pct=crop, interpolation="bicubic", mean=mean, std=std)(i)
                for i in imgs
            ]
        )
        resize_crop = images.eval_resize_crop(size, crop)
        raw = torch.stack([resize_crop(i) for i in imgs])
        assert raw.dtype == torch.uint8
        assert torch.equal(images.normalize_images(raw, mean, std), ref)


def test_train_transform_is_timms_with_the_official_small_image_rule():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms

    big = train_transform(64)
    small = train_transform(32)
    assert type(big.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    first = small.transforms[0]  # per image: the official padding crop, or the random-resized crop
    assert isinstance(first, data.SmallImageCrop) and isinstance(first.pad_crop, transforms.RandomCrop)
    assert first.pad_crop.padding == 4 and type(first.resized_crop).__name__ == "RandomResizedCropAndInterpolation"
    for tf in (big, small):
        assert any(isinstance(t, RandAugment) for t in tf.transforms)
        assert any(isinstance(t, RandomErasing) for t in tf.transforms)
    ra = next(t for t in big.transforms if isinstance(t, RandAugment))
    assert ra.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)


def test_a_model_sized_image_gets_the_official_padding_crop_bit_for_bit():
    """A 32x32 image at img_size 32 (the digits demo) goes through RandomCrop(32, padding=4), as the
    whole pipeline did before images of other sizes got a resized crop: under the same seed the same
    tensor comes out and every RNG is left in the same state (the same numbers drawn in the same
    order), which the demo's numbers and bit-exact resumes rely on."""
    import random

    from torchvision import transforms

    new = train_transform(32)
    old = train_transform(32)
    old.transforms[0] = transforms.RandomCrop(32, padding=4)  # what train_transform built before
    rng = np.random.default_rng(3)
    outputs = []
    for seed in range(24):
        img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        after = []
        for tf in (old, new):
            data.seed_everything(seed)
            after.append((tf(img), torch.get_rng_state(), random.getstate(), np.random.get_state()[1]))
        (x_old, torch_old, py_old, np_old), (x_new, torch_new, py_new, np_new) = after
        assert torch.equal(x_new, x_old)
        assert torch.equal(torch_new, torch_old) and py_new == py_old and np.array_equal(np_new, np_old)
        outputs.append(x_new)
    assert len({o.numpy().tobytes() for o in outputs}) == len(outputs)  # the seeds did vary the crops


def _corner_image(width: int, height: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """A grey image with a 40x30 block of its own colour in each corner (top-left, top-right,
    bottom-left, bottom-right), and those colours."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    arr = np.full((height, width, 3), 128, dtype=np.uint8)
    for (rows, cols), c in zip(
        [(np.s_[:30], np.s_[:40]), (np.s_[:30], np.s_[-40:]), (np.s_[-30:], np.s_[:40]), (np.s_[-30:], np.s_[-40:])],
        colours,
    ):
        arr[rows, cols] = c
    return Image.fromarray(arr), colours


def test_a_larger_image_is_resized_whole_not_cut_into_a_32px_patch():
    """At img_size 32 a 255x141 photograph gets the random-resized crop: at scale 1 and the image's own
    aspect ratio it is the whole image, resized, so all four corner colours land in the four corners.
    (A 32 px RandomCrop out of it, the official rule, shows one corner at best.) Each output corner
    pixel's bicubic support (2 px, widened by the 8x / 4.4x downscale: under 17 x 9 source pixels) lies
    inside its 40x30 block, so it is that colour up to one uint8 step of PIL's fixed-point weights."""
    img, colours = _corner_image(255, 141)
    tf = train_transform(
        32,
        scale=(1, 1),
        ratio=(255 / 141, 255 / 141),
        hflip=0,
        color_jitter=0,
        auto_augment=None,
        re_prob=0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    out = tf(img)
    assert out.shape == (3, 32, 32)
    for (r, c), colour in zip([(0, 0), (0, -1), (-1, 0), (-1, -1)], colours):
        assert torch.allclose(out[:, r, c] * 255, torch.tensor(colour, dtype=torch.float32), atol=1.0), (r, c)


def test_images_smaller_than_the_crop_and_mixed_sizes_go_through_a_worker(tmp_path):
    """13x9 (smaller than the 32 px crop: it crashed the DataLoader worker), 9x13, 33x32 and 255x141
    images next to 32x32 ones in one class folder: each gets its crop, one batch of (3, 32, 32)."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    sizes = [(13, 9), (9, 13), (32, 32), (33, 32), (255, 141)]
    for i, (w, h) in enumerate(sizes):
        _save(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), folder / f"{i}.png")
    samples = SeededSamples(ImageFolderDataset(tmp_path / "train"), train_transform(32))
    sampler = ShardedSampler(len(sizes), batch_size=len(sizes), seed=0)
    loader = data.make_loader(samples, sampler, batch_size=len(sizes), workers=1, persistent_workers=False)
    (batch,) = list(loader)
    assert batch.bad == [] and batch.images.shape == (len(sizes), 3, 32, 32)
    assert sorted(batch.indices.tolist()) == list(range(len(sizes)))


def test_posterize_at_full_magnitude_works():
    # m9 + mstd0.5 reaches magnitude 10 = 0 bits; current Pillow rejects that inside timm.
    tf = train_transform(32)
    ra = next(t for t in tf.transforms if hasattr(t, "ops"))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op.level_fn(10, op.hparams) == (0,)
    assert np.asarray(op.aug_fn(img, 0)).max() == 0
    assert np.asarray(op.aug_fn(img, 8)).tolist() == np.asarray(img).tolist()


def test_samples_are_a_function_of_their_key(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    samples = SeededSamples(ImageFolderDataset(root / "train"), train_transform(32))
    a, b, c = samples[(1, 123)], samples[(1, 123)], samples[(1, 124)]
    torch.manual_seed(999)  # the global state does not matter
    assert torch.equal(a.image, b.image) and torch.equal(a.image, samples[(1, 123)].image)
    assert not torch.equal(a.image, c.image)
    assert a.label == 0 and a.index == 1 and a.error is None


# --------------------------------------------------------------------------- mixup / cutmix


def test_mixup_targets_sum_to_one_and_carry_smoothing():
    mix = build_mixup(5, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    np.random.seed(0)
    _, target = mix(x.clone(), y)
    assert target.shape == (8, 5)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert target.min() >= 0.1 / 5 - 1e-6  # smoothing's off value
    assert build_mixup(5, mixup=0.0, cutmix=0.0) is None


@pytest.mark.parametrize("switch_prob", [0.0, 0.3, 1.0])
def test_cutmix_versus_mixup_follows_switch_prob(switch_prob):
    mix = build_mixup(4, mixup=0.8, cutmix=1.0, switch_prob=switch_prob, label_smoothing=0.0)
    np.random.seed(1)
    x0 = torch.rand(4, 1, 16, 16) + 1.0
    n, cut = 300, 0
    for _ in range(n):
        x, _ = mix(x0.clone(), torch.arange(4))
        # CutMix copies pixels: each is exactly the image's own or its partner's. Mixup blends all.
        own_or_partner = (x == x0) | (x == x0.flip(0))
        cut += bool(own_or_partner.all())
    if switch_prob in (0.0, 1.0):
        assert cut == n * switch_prob
    else:
        assert abs(cut - n * switch_prob) < 4 * (n * switch_prob * (1 - switch_prob)) ** 0.5


# --------------------------------------------------------------------------- sampler


def test_sampler_covers_each_sample_once_and_resumes_mid_epoch():
    s = ShardedSampler(50, batch_size=8, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 48 and len({i for i, _ in full}) == 48  # 6 whole batches, no repeats
    s2 = ShardedSampler(50, batch_size=8, seed=3)
    s2.load_state_dict({**s.state_dict(), "position": 24})
    assert list(s2) == full[24:] and len(s2) == 24
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]
    assert [i for i, _ in ShardedSampler(50, batch_size=8, seed=4)] != [i for i, _ in ShardedSampler(50, batch_size=8)]


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = list(ShardedSampler(40, batch_size=8, seed=1))
    ranks = [list(ShardedSampler(40, batch_size=4, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    for step in range(5):
        assert sorted(one[8 * step : 8 * step + 8]) == sorted(
            ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4]
        )
    # evaluation sharding: every sample on exactly one rank, nothing padded
    parts = [
        [i for i, _ in ShardedSampler(11, batch_size=2, num_replicas=3, rank=r, shuffle=False, drop_last=False)]
        for r in range(3)
    ]
    assert sorted(sum(parts, [])) == list(range(11))


def test_collate_drops_bad_files_without_substitutes(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    ds = ImageFolderDataset(root / "train")
    bad_path = ds.samples[1][0]
    Path(bad_path).write_bytes(b"garbage")
    samples = SeededSamples(ds, eval_transform(32, 1.0))
    batch = collate([samples[(i, 0)] for i in range(4)])
    assert batch.indices.tolist() == [0, 2, 3] and batch.labels.tolist() == [0, 1, 1]
    assert batch.images.shape == (3, 3, 32, 32)
    assert batch.bad == [(bad_path, "not an image PIL can identify")]


# --------------------------------------------------------------------------- the demo data


def test_digits_folder(tmp_path):
    root = data.build_digits_folder(tmp_path / "digits", img_size=16)
    train, val = ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")
    assert train.classes == [str(i) for i in range(10)] == val.classes
    assert len(train) + len(val) == 1797 and len(val) == 360
    names = {Path(p).name for p, _ in train.samples}
    assert not names & {Path(p).name for p, _ in val.samples}  # disjoint
    img = load_image(val.samples[0][0])
    assert img.size == (16, 16)
    from sklearn.datasets import load_digits

    i = int(Path(val.samples[0][0]).stem)
    assert val.samples[0][1] == load_digits().target[i]
    stamp = (root / ".complete").stat().st_mtime_ns
    assert data.build_digits_folder(root, img_size=16) == root and (root / ".complete").stat().st_mtime_ns == stamp
