"""Training from shards and list files, for real: a run killed at a random step resumes bit-identically
from shards; a run from an S3-compatible store (moto on 127.0.0.1) that answers 503 and stalls is the
run from the local shards, bit for bit, and one that never answers stops in one line naming the shard;
a resume against changed shards is refused; an official zipped list file trains exactly as its folder.
The tiny run is test_reliability's (runs.TINY): 16 images, batch 4, 3 epochs = 12 steps."""

from __future__ import annotations

import random
import signal
import zipfile
from pathlib import Path

import pytest
import torch

from image_folders import make_image_folder
from inject import record_batches
from object_store import s3_store, upload
from runs import assert_same_state, drive, load_state, read_records, steps_log, tiny_config, train
from swinv2.cli import main

STEPS = 12
SHARDS = ("data.source=shards",)


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """Shard downloads and verdicts go to a folder of this module's, never to the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWINV2_CACHE", str(tmp_path_factory.mktemp("swinv2_cache")))
        yield


@pytest.fixture(autouse=True)
def _threads(monkeypatch, tmp_path):
    monkeypatch.setenv("SWINV2_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The tiny run from shards (4 images a shard), uninterrupted: state, losses, each step's samples."""
    tmp = tmp_path_factory.mktemp("shards_reference")
    folder = make_image_folder(tmp / "folder")
    shards = tmp / "shards"
    for split in ("train", "val"):
        classes = ["--classes", str(shards / "train")] if split == "val" else []
        argv = ["data", "pack", str(folder / split), str(shards / split), "--shard-samples", "4", "--workers", "1"]
        assert main([*argv, *classes]) == 0
    cfg = tiny_config(tmp, shards)
    from swinv2.train import engine

    orig = engine.Trainer.train_step
    record_batches(engine, str(tmp / "batches.jsonl"))
    try:
        assert train(cfg, tmp / "run", *SHARDS) == 0
    finally:
        engine.Trainer.train_step = orig
    return {
        "tmp": tmp,
        "folder": folder,
        "shards": shards,
        "cfg": cfg,
        "state": load_state(tmp / "run"),
        "steps": steps_log(tmp / "run"),
        "batches": read_records(tmp / "batches.jsonl"),
    }


def test_the_reference_run_sees_every_sample_once_per_epoch_in_a_new_order(reference):
    batches = reference["batches"]
    assert [b["step"] for b in batches] == list(range(STEPS))
    epochs = [[i for b in batches[4 * e : 4 * e + 4] for i in b["indices"]] for e in range(3)]
    assert all(sorted(e) == list(range(16)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert reference["state"]["data"] == json_digest(reference["shards"] / "train")


def json_digest(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def test_sigkill_at_a_random_step_of_a_shards_run_then_resume_is_bit_identical(reference, tmp_path, monkeypatch):
    kill_at = random.Random(7).randrange(1, STEPS)
    out, record = tmp_path / "run", tmp_path / "batches.jsonl"
    faults = {"kill_at": kill_at, "record": str(record)}
    r = drive(tmp_path, faults, reference["cfg"], out, *SHARDS, "data.workers=1")  # killed with a loader worker
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    from swinv2.train import engine

    monkeypatch.setattr(engine.Trainer, "train_step", engine.Trainer.train_step)
    record_batches(engine, str(record))
    assert train(reference["cfg"], out, *SHARDS) == 0
    assert_same_state(load_state(out), reference["state"])
    ref_loss = {s["step"]: s["loss"] for s in reference["steps"]}
    assert all(s["loss"] == ref_loss[s["step"]] for s in steps_log(out))
    records = read_records(record)
    assert all(b in reference["batches"] for b in records)  # every step drew the reference's samples


def test_a_resume_against_changed_shards_is_refused(reference, tmp_path, capsys):
    out = tmp_path / "run"
    r = drive(tmp_path, {"kill_at": 6}, reference["cfg"], out, *SHARDS)
    assert r.returncode == -signal.SIGKILL
    # the data repacked in another order: the same images, other shards
    repacked = tmp_path / "repacked"
    for split in ("train", "val"):
        classes = ["--classes", str(repacked / "train")] if split == "val" else []
        argv = ["data", "pack", str(reference["folder"] / split), str(repacked / split), "--seed", "1"]
        assert main([*argv, "--shard-samples", "4", "--workers", "1", *classes]) == 0
    before = load_state(out)
    assert train(reference["cfg"], out, *SHARDS, f"data.root={repacked}") == 2
    err = capsys.readouterr().err
    assert "the shards changed, an exact resume is impossible" in err and err.count("\n") == 1, err
    assert_same_state(load_state(out), before)  # nothing was touched


def test_a_shard_lost_mid_run_stops_training_in_one_line_naming_it(reference, tmp_path, capsys):
    shards = tmp_path / "shards"
    for p in reference["shards"].rglob("*"):
        if p.is_file():
            (shards / p.relative_to(reference["shards"])).parent.mkdir(parents=True, exist_ok=True)
            (shards / p.relative_to(reference["shards"])).write_bytes(p.read_bytes())
    lost = shards / "train" / "shard-000002.tar"
    lost.write_bytes(lost.read_bytes()[:-600])  # truncated, as by a copy that did not finish
    code = train(reference["cfg"], tmp_path / "run", *SHARDS, f"data.root={shards}")
    err = capsys.readouterr().err
    assert code == 2 and f"{lost}: " in err and "truncated or changed since packing" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- an object store


def test_training_from_s3_through_503s_and_stalls_is_the_local_run_bit_for_bit(reference, tmp_path, monkeypatch):
    with s3_store(monkeypatch) as (_, faults):
        upload(reference["shards"], "bucket", "imagenet/shards")
        faults.match, faults.fail, faults.stall, faults.stall_s = "train/shard-000001.tar", 2, 1, 3.0
        overrides = (*SHARDS, "data.root=s3://bucket/imagenet/shards", "data.timeout=1", "data.retries=4")
        assert train(reference["cfg"], tmp_path / "run", *overrides) == 0
        assert faults.fail == 0 and faults.stall == 0 and faults.gets == 4  # 2 x 503, 1 stalled, then read
    assert_same_state(load_state(tmp_path / "run"), reference["state"])
    cached = sorted(p.name for p in (tmp_path / "cache" / "shards").rglob("shard-*.tar"))
    assert cached == ["shard-000000.tar", "shard-000000.tar", "shard-000001.tar"] + [
        f"shard-00000{i}.tar" for i in (1, 2, 3)
    ]  # 4 train and 2 val shards, each downloaded once


def test_an_object_store_that_keeps_failing_stops_in_one_line_after_bounded_retries(
    reference, tmp_path, monkeypatch, capsys
):
    with s3_store(monkeypatch) as (_, faults):
        upload(reference["shards"], "bucket", "shards")
        faults.match, faults.fail = "train/shard-000003.tar", 1000
        overrides = (*SHARDS, "data.root=s3://bucket/shards", "data.retries=2")
        code = train(reference["cfg"], tmp_path / "run", *overrides)
        assert faults.gets == 3  # the first try and 2 retries, then no more
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "swinv2 train: error: s3://bucket/shards/train/shard-000003.tar: unreadable after 3 attempts"
    )
    assert "503" in last and "Traceback" not in err
    steps = steps_log(tmp_path / "run") if (tmp_path / "run" / "steps.jsonl").exists() else []
    assert len(steps) < STEPS  # it stopped; nothing was trained past the unreadable shard


# --------------------------------------------------------------------------- list files


def test_an_official_zipped_list_file_trains_exactly_as_its_folder(tmp_path):
    folder = make_image_folder(tmp_path / "folder")
    root = tmp_path / "imagenet"
    root.mkdir()
    from swinv2.train.datasets import ImageFolderDataset

    for split in ("train", "val"):
        ds = ImageFolderDataset(folder / split)
        names = [Path(p).relative_to(folder / split).as_posix() for p, _ in ds.samples]
        (root / f"{split}_map.txt").write_text("".join(f"{n}\t{label}\n" for n, (_, label) in zip(names, ds.samples)))
        with zipfile.ZipFile(root / f"{split}.zip", "w") as z:
            for n in names:
                z.write(folder / split / n, n)
    cfg = tiny_config(tmp_path, folder)
    assert train(cfg, tmp_path / "from_folder", "train.epochs=1") == 0
    assert train(cfg, tmp_path / "from_list", "train.epochs=1", "data.source=list", f"data.root={root}") == 0
    a, b = load_state(tmp_path / "from_folder"), load_state(tmp_path / "from_list")
    assert_same_state(a, b)
    assert b["classes"] == ["a", "b"]


def test_a_bounded_cache_keeps_the_most_recent_shards_and_every_read_is_right(reference, tmp_path, monkeypatch):
    from swinv2.train.shards import ShardDataset

    local = ShardDataset(reference["shards"] / "train")
    limit = max(s.bytes for s in local.manifest.shards) + 1  # room for one shard
    with s3_store(monkeypatch) as _:
        upload(reference["shards"], "bucket", "shards")
        remote = ShardDataset("s3://bucket/shards/train", cache_dir=tmp_path / "cache", cache_limit=limit)
        for i in range(len(local)):  # shard after shard: each download evicts the one before
            assert remote.raw(i) == local.raw(i) and remote.label_of(i) == local.label_of(i)
    kept = list((tmp_path / "cache" / "shards").rglob("shard-*.tar"))
    assert [p.name for p in kept] == [local.manifest.shards[-1].name]
