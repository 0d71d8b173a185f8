"""Shards (`swinv2 data pack`, `data.source: shards`) and the official list files (`data.source: list`):
what a pack writes and that a killed pack finishes to the same bytes, every sample exactly once per epoch
at world sizes 1-3 with 1-2 loader workers, the shuffle's locality, each storage fault as one line, and
list files read from folders and zip files as the official code lays them out."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_folders import make_image_folder
from swinv2.cli import main
from swinv2.errors import DataError
from swinv2.train.datasets import ImageFolderDataset, SeededSamples, ShardedSampler, check_samples, make_loader
from swinv2.train.listfile import ListFileDataset, read_list
from swinv2.train.shards import ShardDataset

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """Shard downloads and verdicts go to a folder of this module's, never to the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWINV2_CACHE", str(tmp_path_factory.mktemp("swinv2_cache")))
        yield


def pack_cli(src: Path, out: Path, *args: str) -> int:
    return main(["data", "pack", str(src), str(out), "--workers", "1", *args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 21 + 20 + 20 train images (61: no batch size or world size here divides it)."""
    root = make_image_folder(tmp_path_factory.mktemp("folder") / "data", classes=("ant", "bee", "cat"), n_train=20)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "train" / "ant" / "extra.png")
    return root


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert pack_cli(folder / "train", out / "train", "--shard-samples", "8") == 0
    assert pack_cli(folder / "val", out / "val", "--shard-samples", "8", "--classes", str(out / "train")) == 0
    return out


# --------------------------------------------------------------------------- what a pack writes


def test_a_pack_is_webdataset_tars_holding_the_original_bytes_and_a_manifest_that_adds_up(folder, packed):
    manifest = json.loads((packed / "train" / "manifest.json").read_text())
    source = ImageFolderDataset(folder / "train")
    assert manifest["samples"] == len(source) == 61
    assert manifest["classes"] == ["ant", "bee", "cat"] and manifest["class_counts"] == source.class_counts()
    assert [s["samples"] for s in manifest["shards"]] == [8] * 7 + [5]
    originals = {
        str(Path(p).relative_to(folder / "train")): (Path(p).read_bytes(), label) for p, label in source.samples
    }
    seen = []
    for shard in manifest["shards"]:
        path = packed / "train" / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        with tarfile.open(path) as tar:  # the standard library reads it: any WebDataset reader does
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = sorted({name.split(".")[0] for name in members})
        assert len(keys) == shard["samples"]
        for key in keys:
            origin = json.loads(members[f"{key}.json"])["source"]
            data, label = originals[origin]
            assert members[f"{key}.png"] == data  # stored as packed: no re-encoding
            assert int(members[f"{key}.cls"]) == label
            seen.append(origin)
    assert sorted(seen) == sorted(originals)  # every image once
    # the order is shuffled across shards: the first shard holds more than one class
    first = ShardDataset(packed / "train")
    assert len({first.label_of(i) for i in range(8)}) > 1


def test_val_shards_packed_with_fewer_classes_keep_the_training_labels(folder, tmp_path):
    train = tmp_path / "train"
    assert pack_cli(folder / "train", train) == 0
    val_src = tmp_path / "val_src"
    (val_src / "cat").mkdir(parents=True)
    for p in (folder / "val" / "cat").iterdir():
        (val_src / "cat" / p.name).write_bytes(p.read_bytes())
    assert pack_cli(val_src, tmp_path / "val") == 0  # its own class list: ["cat"], label 0
    val = ShardDataset(tmp_path / "val", class_names=ShardDataset(train).classes)
    assert {val.label_of(i) for i in range(len(val))} == {2}  # "cat" of the training classes
    assert val.class_counts() == [0, 0, len(val)]


def test_resize_on_write_bounds_the_shorter_side_and_keeps_small_images_as_they_are(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(src / "big.png")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(src / "small.png")
    assert pack_cli(tmp_path / "src", tmp_path / "out", "--max-side", "64") == 0
    ds = ShardDataset(tmp_path / "out")
    sizes = sorted(ds.read(i).size for i in range(len(ds)))
    assert sizes == [(60, 40), (107, 64)]  # 500 x 64 / 300 = 106.7
    kinds = sorted(Image.open(io.BytesIO(ds.raw(i))).format for i in range(len(ds)))
    assert kinds == ["JPEG", "PNG"]


def test_an_image_that_does_not_decode_is_left_out_and_listed(folder, tmp_path):
    src = tmp_path / "src"
    for c in ("ant", "bee"):
        (src / c).mkdir(parents=True)
        for p in sorted((folder / "train" / c).iterdir())[:3]:
            (src / c / p.name).write_bytes(p.read_bytes())
    (src / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert pack_cli(src, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == 6 and [m[0] for m in manifest["skipped"]] == ["bee/broken.jpg"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


KILLING_PACK = """\
import os, signal, sys
from swinv2.train import pack
orig, calls = pack._write_shard, [0]
def write(job):
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(job)
pack._write_shard = write
from swinv2.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_pack_killed_midway_and_run_again_ends_with_the_files_of_an_uninterrupted_pack(folder, tmp_path):
    whole = tmp_path / "whole"
    assert main(["data", "pack", str(folder / "train"), str(whole), "--shard-samples", "8", "--workers", "2"]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    argv = ["data", "pack", str(folder / "train"), str(killed), "--shard-samples", "8", "--workers", "1"]
    r = subprocess.run([sys.executable, "-c", KILLING_PACK, *argv], env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (killed / "manifest.json").exists()  # not a shard set yet
    with pytest.raises(DataError, match="manifest.json: not found"):
        ShardDataset(killed)
    finished = sorted(p.name for p in killed.glob("shard-*.tar"))
    assert finished == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    (killed / "shard-000002.tar").write_bytes(b"torn")  # as if killed inside its rename: redone
    assert main(argv) == 0
    assert _tree(killed) == _tree(whole)  # byte for byte, whatever the worker count
    assert main(argv) == 0  # a third run: nothing to do


def test_a_rerun_over_a_changed_source_or_with_other_settings_is_refused(folder, tmp_path, capsys):
    src = tmp_path / "src"
    for c in ("ant", "bee"):
        (src / c).mkdir(parents=True)
        for p in sorted((folder / "train" / c).iterdir())[:4]:
            (src / c / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / ".pack-plan.json").write_text("{}")  # an unfinished pack of something else
    assert pack_cli(src, out) == 2
    assert "the source changed" in capsys.readouterr().err
    assert pack_cli(src, tmp_path / "out2", "--shard-samples", "3") == 0
    assert pack_cli(src, tmp_path / "out2", "--shard-samples", "4") == 2
    assert "holds another shard set" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert pack_cli(src, mine) == 2 and (mine / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- every sample once


def _epoch_ids(ds: ShardDataset, world: int, workers: int, *, drop_last: bool, batch: int = 4) -> list[list[int]]:
    """Per rank, the sample ids its loader gives in epoch 1, in order."""
    per_rank = []
    steps = set()
    for rank in range(world):
        sampler = ShardedSampler(
            len(ds), batch_size=batch, num_replicas=world, rank=rank, seed=3, groups=ds.groups(), block=2,
            drop_last=drop_last,
        )  # fmt: skip
        sampler.set_epoch(1)
        steps.add(sampler.batches_per_epoch)
        loader = make_loader(SeededSamples(ds, lambda img: torch.zeros(1)), sampler, batch_size=batch, workers=workers)
        per_rank.append([i for b in loader for i in b.indices.tolist()])
    assert len(steps) == 1  # every rank takes the same number of steps
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_sample_exactly_once_per_epoch_at_any_world_size_and_worker_count(packed, world, workers):
    ds = ShardDataset(packed / "train")
    ids = _epoch_ids(ds, world, workers, drop_last=False)
    flat = [i for rank in ids for i in rank]
    assert sorted(flat) == list(range(61))
    # the same global batches whatever the world size: rank r takes positions r, r + R, ...
    reference = _epoch_ids(ds, 1, 0, drop_last=False)[0]
    merged = [ids[p % world][p // world] for p in range(61)]
    assert merged == reference
    # drop_last (the official recipe): whole global batches, no sample twice, fewer than one batch left out
    kept = [i for rank in _epoch_ids(ds, world, workers, drop_last=True) for i in rank]
    assert len(kept) == len(set(kept)) == 61 - 61 % (4 * world)


def test_the_shuffle_reads_a_block_of_shards_at_a_time_and_changes_every_epoch(packed):
    ds = ShardDataset(packed / "train")
    shard_of = [ds._shard_of(i) for i in range(len(ds))]
    sampler = ShardedSampler(len(ds), batch_size=4, seed=0, groups=ds.groups(), block=2, drop_last=False)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        orders.append(order)
        stretches: list[set[int]] = [set()]  # the order cut into stretches of at most 2 shards each
        for i in order:
            if shard_of[i] not in stretches[-1] and len(stretches[-1]) == 2:
                stretches.append(set())
            stretches[-1].add(shard_of[i])
        assert len(stretches) == 4  # 8 shards, 2 at a time (a full shuffle would switch shards all along)
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(61))


# --------------------------------------------------------------------------- storage faults


def _copy(packed: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    for split in ("train", "val"):
        (out / split).mkdir(parents=True)
        for p in (packed / split).iterdir():
            (out / split / p.name).write_bytes(p.read_bytes())
    return out


@pytest.mark.parametrize("fault", ["missing", "truncated", "changed", "not_a_tar"])
def test_a_shard_missing_truncated_or_changed_is_one_line_naming_it(packed, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("SWINV2_CACHE", str(tmp_path / "cache"))
    data = _copy(packed, tmp_path)
    shard = data / "train" / "shard-000003.tar"
    if fault == "missing":
        shard.unlink()
    elif fault == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1024])
    elif fault == "changed":  # same size, one byte flipped inside an image
        raw = bytearray(shard.read_bytes())
        raw[2000] ^= 0xFF
        shard.write_bytes(bytes(raw))
    else:  # a file of the right size and hash that is not a tar: the manifest rewritten to match it
        shard.write_bytes(b"x" * shard.stat().st_size)
        manifest = json.loads((data / "train" / "manifest.json").read_text())
        manifest["shards"][3]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        (data / "train" / "manifest.json").write_text(json.dumps(manifest))
    ds = ShardDataset(data / "train")
    with pytest.raises(DataError) as e:
        for i in range(len(ds)):
            ds.read(i)
    message = str(e.value)
    assert str(shard) in message and "\n" not in message
    expected = {
        "missing": "shard not found",
        "truncated": "truncated or changed since packing",
        "changed": "SHA-256 is not the manifest's",
        "not_a_tar": "not a readable tar file",
    }[fault]
    assert expected in message
    # --check-data names it too, as a bad shard of the split
    report = check_samples(ShardDataset(data / "train"), None, decode=True, workers=1)
    assert not report.ok and [p for p, _ in report.bad["train"]] == [str(shard)]


def test_a_verified_shard_is_not_hashed_again_until_it_changes(packed, tmp_path, monkeypatch):
    from swinv2.train import store

    monkeypatch.setenv("SWINV2_CACHE", str(tmp_path / "cache"))
    data = _copy(packed, tmp_path)
    hashed = []
    orig = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda p: hashed.append(Path(p).name) or orig(p))
    ShardDataset(data / "train").read(0)
    ShardDataset(data / "train").read(0)  # another process would find the verdict in the cache
    assert len(hashed) == 1
    shard = data / "train" / ShardDataset(data / "train").manifest.shards[0].name
    os.utime(shard, ns=(0, 0))  # touched: checked again
    ShardDataset(data / "train").read(0)
    assert len(hashed) == 2


# --------------------------------------------------------------------------- list files


def _official_layout(folder: Path, root: Path, *, zipped: bool, json_list: bool = False) -> Path:
    """ImageNet's official copy: `train_map.txt` ('<class>/<file>\\t<label>') and the images in
    `train.zip` (zip mode) or `train/`; the 22k form is a JSON list of [path, label]."""
    source = ImageFolderDataset(folder / "train")
    entries = [(Path(p).relative_to(folder / "train").as_posix(), label) for p, label in source.samples]
    root.mkdir(parents=True)
    if json_list:
        (root / "train_map.txt").write_text(json.dumps([[f"train/{p}", label] for p, label in entries]))
    else:
        (root / "train_map.txt").write_text("".join(f"{p}\t{label}\n" for p, label in entries))
    if zipped:
        with zipfile.ZipFile(root / "train.zip", "w") as z:
            for p, _ in entries:
                z.write(folder / "train" / p, p)
    else:
        for p, _ in entries:
            (root / "train" / p).parent.mkdir(parents=True, exist_ok=True)
            (root / "train" / p).write_bytes((folder / "train" / p).read_bytes())
    return root


@pytest.mark.parametrize("zipped", [False, True])
def test_an_official_list_file_reads_the_same_images_and_labels_as_the_folder(folder, tmp_path, zipped):
    root = _official_layout(folder, tmp_path / "imagenet", zipped=zipped)
    images = root / ("train.zip" if zipped else "train")
    ds = ListFileDataset(root / "train_map.txt", images)
    folder_ds = ImageFolderDataset(folder / "train")
    assert ds.classes == ["ant", "bee", "cat"]  # the labels' folder names
    assert len(ds) == len(folder_ds) and ds.class_counts() == folder_ds.class_counts()
    for i in (0, 30, 60):
        assert ds.label_of(i) == folder_ds.label_of(i)
        assert np.array_equal(np.asarray(ds.read(i)), np.asarray(folder_ds.read(i)))
    if zipped:
        assert ds.where(0) == f"{images}@/ant/00.png"  # the official code's zip notation


def test_the_22k_json_list_and_a_list_with_unknown_folders_number_their_classes(folder, tmp_path):
    root = _official_layout(folder, tmp_path / "in22k", zipped=False, json_list=True)
    ds = ListFileDataset(root / "train_map.txt", root)
    assert ds.classes == ["0", "1", "2"]  # every path starts with train/: names cannot come from folders
    assert len(ds) == 61 and ds.read(0).size == (32, 32)


def test_a_malformed_list_line_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "train_map.txt"
    bad.write_text("a/1.jpg\t0\na/2.jpg\tzero\n")
    with pytest.raises(DataError, match=r"train_map.txt:2: label 'zero' is not a whole number"):
        read_list(bad)


def test_a_list_member_missing_from_the_zip_is_a_bad_image_that_training_skips(folder, tmp_path):
    root = _official_layout(folder, tmp_path / "imagenet", zipped=True)
    with open(root / "train_map.txt", "a") as f:
        f.write("ant/gone.png\t0\n")
    ds = ListFileDataset(root / "train_map.txt", root / "train.zip")
    sample = SeededSamples(ds, lambda img: torch.zeros(1))[(len(ds) - 1, 0)]
    assert sample.image is None and sample.error == (f"{root / 'train.zip'}@/ant/gone.png", "not in the zip file")


def test_pack_from_a_zipped_list_file_gives_the_shards_of_the_folder(folder, tmp_path):
    root = _official_layout(folder, tmp_path / "imagenet", zipped=True)
    assert pack_cli(root / "train_map.txt", tmp_path / "from_list") == 0  # images found in train.zip
    assert pack_cli(folder / "train", tmp_path / "from_folder") == 0
    a = json.loads((tmp_path / "from_list" / "manifest.json").read_text())
    b = json.loads((tmp_path / "from_folder" / "manifest.json").read_text())
    assert a["classes"] == b["classes"] and a["class_counts"] == b["class_counts"]
    assert a["source_digest"] == b["source_digest"]  # the same images under the same names and labels
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


# --------------------------------------------------------------------------- Hugging Face's layout


@pytest.fixture(scope="module")
def hf_files(folder, tmp_path_factory) -> dict:
    """The folder's training images written by Hugging Face `datasets` itself: parquet (row groups of 16)
    and a save_to_disk folder, with the class names in a ClassLabel."""
    import datasets  # a dev dependency, installed by `make test`

    tmp = tmp_path_factory.mktemp("hf")
    source = ImageFolderDataset(folder / "train")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=source.classes)})
    rows = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in source.samples],
            "label": [label for _, label in source.samples]}  # fmt: skip
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp / "train-00000-of-00001.parquet"), batch_size=16)
    ds.save_to_disk(str(tmp / "saved"))
    return {"parquet": tmp / "train-00000-of-00001.parquet", "saved": tmp / "saved", "source": source}


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_hugging_face_parquet_and_saved_folders_read_as_their_images(hf_files, kind):
    from swinv2.train.hf_layout import HFDataset, is_hf_layout

    path, source = hf_files[kind], hf_files["source"]
    assert is_hf_layout(path)
    ds = HFDataset(path)
    assert ds.classes == source.classes and len(ds) == len(source) and ds.class_counts() == source.class_counts()
    if kind == "parquet":
        assert ds.groups() == [16, 16, 16, 13]  # the row groups: what the shuffle reads a few of at a time
    for i in (0, 17, 60):
        assert ds.label_of(i) == source.label_of(i)
        assert ds.raw(i) == Path(source.where(i)).read_bytes()


def test_pack_from_hugging_face_parquet_gives_the_folders_samples(hf_files, tmp_path):
    assert pack_cli(hf_files["parquet"], tmp_path / "shards") == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    source = hf_files["source"]
    assert manifest["classes"] == source.classes and manifest["class_counts"] == source.class_counts()
    shards = ShardDataset(tmp_path / "shards")
    originals = sorted(Path(p).read_bytes() for p, _ in source.samples)
    assert sorted(shards.raw(i) for i in range(len(shards))) == originals


def test_the_22k_recipe_reads_the_official_layout_and_its_shards_by_one_override(folder, tmp_path, capsys):
    """configs/swinv2_base_window12_192_22k.yaml on ImageNet-22k's own layout (JSON lists, images under
    data.root), then on shards packed from those lists with data.source=shards: the same data both ways."""
    root = tmp_path / "in22k"
    for split in ("train", "val"):
        ds = ImageFolderDataset(folder / split)
        entries = []
        for p, label in ds.samples:
            name = f"{ds.classes[label]}/{split}_{Path(p).name}"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(Path(p).read_bytes())
            entries.append([name, label])
        (root / f"ILSVRC2011fall_whole_map_{split}.txt").write_text(json.dumps(entries))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "swinv2_base_window12_192_22k.yaml")
    assert main(["train", "--config", recipe, "--check-data", f"data.root={root}"]) == 0
    from_lists = capsys.readouterr().out
    shards = tmp_path / "shards"
    assert pack_cli(root / "ILSVRC2011fall_whole_map_train.txt", shards / "train") == 0
    classes = ["--classes", str(shards / "train")]
    assert pack_cli(root / "ILSVRC2011fall_whole_map_val.txt", shards / "val", *classes) == 0
    capsys.readouterr()
    assert main(["train", "--config", recipe, "--check-data", "data.source=shards", f"data.root={shards}"]) == 0
    from_shards = capsys.readouterr().out
    bars = lambda text: [line for line in text.splitlines() if line.startswith("  ") and "#" in line]  # noqa: E731
    assert bars(from_lists) == bars(from_shards) and len(bars(from_lists)) == 6  # 3 classes, 2 splits
    assert "61 images, 3 classes" in from_lists and "61 images, 3 classes" in from_shards
