"""Every row of docs/reliability.md, each with the fault injected for real: SIGKILL of a training
process at a random step (and during a checkpoint write), SIGTERM/SIGINT, torn and zero-byte
checkpoints, a full disk, NaN/Inf losses and gradients, corrupt images, every image mode, messy
class folders, pickles with code, checkpoints of another model, reseeding, bad command lines.

The tiny run: SwinV2 micro (embed 24, depths (2,2), window 4, 32 px) on 16 generated images,
batch 4, 3 epochs = 12 steps, with the full augmentation recipe (RandAugment, random erasing,
Mixup/CutMix, stochastic depth) and an EMA, so that "bit-identical" covers every random draw.
Faults are injected by `install_faults` (inject.py), which a driver script (`python driver.py FAULTS
ARGS`, runs.drive) installs in a real `swinv2 train` process; the uninterrupted reference and most resumes run in
this process through `swinv2.cli.main`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from image_folders import make_image_folder
from inject import record_batches
from runs import assert_same_state, drive, load_state, read_records, steps_log, tiny_config, train

STEPS = 12  # 16 images / batch 4 x 3 epochs


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _threads_and_logs(caplog):
    caplog.set_level("INFO")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted tiny run: final state, loss trace and the samples of every step."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tmp)
    from swinv2.train import engine

    orig = engine.Trainer.train_step
    record_batches(engine, str(tmp / "batches.jsonl"))
    try:
        assert train(cfg, tmp / "run") == 0
    finally:
        engine.Trainer.train_step = orig
    return {
        "tmp": tmp,
        "cfg": cfg,
        "data": tmp / "data",
        "out": tmp / "run",
        "state": load_state(tmp / "run"),
        "steps": steps_log(tmp / "run"),
        "batches": read_records(tmp / "batches.jsonl"),
    }


def resume_recording(cfg: Path, out: Path, record: Path, monkeypatch, *overrides: str) -> int:
    from swinv2.train import engine

    monkeypatch.setattr(engine.Trainer, "train_step", engine.Trainer.train_step)
    record_batches(engine, str(record))
    return train(cfg, out, *overrides)


# --------------------------------------------------------------------------- rows 1, 2: SIGKILL, mid-epoch


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path, monkeypatch, seed):
    kill_at = random.Random(seed).randrange(1, STEPS)
    out, record = tmp_path / "run", tmp_path / "batches.jsonl"
    # The killed process loads data in a worker process; the resumed one in-process: same stream.
    r = drive(tmp_path, {"kill_at": kill_at, "record": str(record)}, reference["cfg"], out, "data.workers=1")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    killed = read_records(record)
    assert killed[-1]["step"] == kill_at
    assert resume_recording(reference["cfg"], out, record, monkeypatch) == 0
    assert_same_state(load_state(out), reference["state"])

    # Row 1: losses of the steps run twice (after the last checkpoint, before the kill) are identical.
    ref_loss = {s["step"]: s["loss"] for s in reference["steps"]}
    logged = steps_log(out)
    assert all(s["loss"] == ref_loss[s["step"]] for s in logged)
    assert {s["step"] for s in logged} == set(ref_loss)
    # Row 2: every step's samples in the reference order; each epoch sees every sample exactly once.
    records = read_records(record)
    resumed_from = records[len(killed)]["step"]
    saves = {3, 4, 6, 8, 9}  # checkpoint_every=3 and every epoch end (4 steps per epoch)
    assert resumed_from == max({0} | {s for s in saves if s <= kill_at})  # the last save before the kill
    committed = [b for b in killed if b["step"] < resumed_from] + records[len(killed) :]
    assert committed == reference["batches"] and [b["step"] for b in committed] == list(range(STEPS))
    for epoch in range(3):
        seen = [i for b in committed[4 * epoch : 4 * epoch + 4] for i in b["indices"]]
        assert sorted(seen) == list(range(16))
    assert all(b in reference["batches"] for b in killed)  # the re-done steps drew the same samples


# --------------------------------------------------------------------------- row 3: kill during a write


def test_kill_during_a_checkpoint_write(reference, tmp_path):
    from swinv2.weights.training_state import load_training_state

    out = tmp_path / "run"
    r = drive(tmp_path, {"kill_in_save": 3}, reference["cfg"], out)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpts = out / "checkpoints"
    temps = list(ckpts.glob(".*.tmp"))
    assert temps, "the kill should leave the temp file of the interrupted save"
    for p in ckpts.glob("*.pt"):
        load_training_state(p)  # every file under a final name is complete
    assert train(reference["cfg"], out) == 0
    assert not list(ckpts.glob(".*.tmp"))
    assert_same_state(load_state(out), reference["state"])


# --------------------------------------------------------------------------- row 4: torn checkpoints


@pytest.mark.parametrize("damage", ["truncated", "zero bytes"])
def test_damaged_latest_checkpoint_falls_back(reference, tmp_path, caplog, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    assert train(reference["cfg"], out) == 0
    assert any("skipping checkpoint" in m and str(last) in m for m in caplog.messages)
    assert any("resumed from" in m and "best_epoch" in m for m in caplog.messages)
    assert_same_state(load_state(out), reference["state"])
    # an explicit --resume of a damaged file is an error naming it
    capsys.readouterr()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[:100])
    assert train(reference["cfg"], tmp_path / "other", resume=str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


# --------------------------------------------------------------------------- row 5: disk full


def test_disk_full_while_saving_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    orig_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if hasattr(f, "write"):
            f.write(b"\0" * 4096)  # part of the file made it to disk, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train(reference["cfg"], out, "train.epochs=4") == 2  # one more epoch: its first save fails
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(last) in err[0]
    assert last.read_bytes() == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- row 6: preemption


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)]
)  # the same save path; SIGINT in make test-all
def test_sigterm_sigint_checkpoint_at_the_step_boundary(reference, tmp_path, signum, code):
    out = tmp_path / "run"
    r = drive(tmp_path, {"signal_at": [5, int(signum)]}, reference["cfg"], out)
    assert r.returncode == code, r.stderr[-2000:]
    assert signal.Signals(signum).name in r.stderr and "run the same command again" in r.stderr
    state = load_state(out)
    assert state["progress"]["global_step"] == 6  # the signalled step finished, then the save
    assert state["progress"]["step_in_epoch"] == 2 and state["sampler"]["position"] == 8
    assert train(reference["cfg"], out) == 0
    assert_same_state(load_state(out), reference["state"])


# --------------------------------------------------------------------------- row 7: NaN / Inf


def _trainer(tmp: Path, *overrides: str):
    from swinv2.config import load_config
    from swinv2.train import distributed as D
    from swinv2.train import engine

    cfg = load_config(tiny_config(tmp), [*overrides])
    torch.set_num_threads(1)
    tr = engine.Trainer(cfg, tmp / "run", D.setup("cpu"))
    tr.sampler.set_epoch(0)
    return tr, iter(tr.train_loader)


def _snapshot(tr) -> dict:
    return {
        "model": {k: v.clone() for k, v in tr.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in tr.ema.module.state_dict().items()},
        "opt": {p: {k: v.clone() for k, v in s.items()} for p, s in tr.optimizer.state_dict()["state"].items()},
    }


def _equal(a: dict, b: dict) -> bool:
    return all(
        torch.equal(x, y) for part in ("model", "ema") for x, y in zip(a[part].values(), b[part].values())
    ) and all(torch.equal(v, b["opt"][p][k]) for p, s in a["opt"].items() for k, v in s.items())


def test_non_finite_steps_are_skipped_counted_and_abort(tmp_path, caplog):
    from swinv2.train import engine

    tr, it = _trainer(tmp_path, "train.max_bad_steps=3")
    tr.train_step([next(it)])
    criterion = tr.task.criterion
    # A NaN loss ...
    tr.task.criterion = lambda out, y: criterion(out, y) * float("nan")
    before = _snapshot(tr)
    out = tr.train_step([next(it)])
    assert out["skipped"] and _equal(before, _snapshot(tr))
    assert tr.progress["bad_steps"] == 1 and any("step 1: non-finite loss" in m for m in caplog.messages)
    # ... and an Inf gradient with a finite loss.
    tr.task.criterion = criterion
    handle = tr.model.head.weight.register_hook(lambda g: g * float("inf"))
    before = _snapshot(tr)
    out = tr.train_step([next(it)])
    assert out["skipped"] and math.isfinite(out["loss"]) and _equal(before, _snapshot(tr))
    assert any("step 2: non-finite gradient" in m for m in caplog.messages)
    handle.remove()
    out = tr.train_step([next(it)])  # a good step resets the run of bad ones
    assert not out["skipped"] and not _equal(before, _snapshot(tr)) and tr.progress["consecutive_bad"] == 0
    # K in a row abort with a clear message
    tr.task.criterion = lambda out, y: criterion(out, y) * float("inf")
    tr.sampler.set_epoch(1)
    it = iter(tr.train_loader)
    tr.train_step([next(it)])
    tr.train_step([next(it)])
    with pytest.raises(engine.NonFiniteError, match="3 consecutive steps"):
        tr.train_step([next(it)])
    assert tr.progress["bad_steps"] == 5


def test_no_checkpoint_ever_holds_a_non_finite_tensor(tmp_path):
    tr, it = _trainer(tmp_path)
    tr.train_step([next(it)])
    tr.save()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with torch.no_grad():
        tr.ema.module.head.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save a checkpoint: state\.ema\.head\.bias holds non-finite"):
        tr.save()
    assert last.read_bytes() == before


# --------------------------------------------------------------------------- row 8: fp16 loss scaling


@pytest.mark.slow  # about 15 s
def test_fp16_scaler_and_scheduler_survive_a_kill(tmp_path):
    cfg = tiny_config(tmp_path)
    fp16 = ("train.amp=fp16", "train.epochs=2")
    assert train(cfg, tmp_path / "ref", *fp16) == 0
    ref = load_state(tmp_path / "ref")
    assert ref["scaler"]["_growth_tracker"] > 0 or ref["scaler"]["scale"] < 2.0**16  # the scaler really ran
    out = tmp_path / "run"
    r = drive(tmp_path, {"kill_at": 5}, cfg, out, *fp16)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert load_state(out)["scaler"] is not None
    assert train(cfg, out, *fp16) == 0
    got = load_state(out)
    assert got["scaler"] == ref["scaler"] and got["scheduler"] == ref["scheduler"]
    assert_same_state(got, ref)


# --------------------------------------------------------------------------- row 9: corrupt images


def _break_images(train_dir: Path) -> list[str]:
    files = sorted(train_dir.rglob("*.png"))
    bad = [files[1], files[6], files[12]]
    bad[0].write_bytes(b"")  # zero bytes
    bad[1].write_bytes(b"GIF89a but not really an image")  # garbage
    jpeg = bad[2].with_suffix(".jpg")
    from PIL import Image

    Image.open(bad[2]).convert("RGB").save(jpeg, "JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # truncated JPEG
    bad[2].unlink()
    return sorted(map(str, bad[:2] + [jpeg]))


def test_corrupt_images_are_reported_and_never_substituted(tmp_path, monkeypatch, caplog, capsys):
    from swinv2.train import engine
    from swinv2.train.datasets import ImageFolderDataset

    root = make_image_folder(tmp_path / "data")
    bad = _break_images(root / "train")
    cfg = tiny_config(tmp_path, root)
    record = tmp_path / "batches.jsonl"
    monkeypatch.setattr(engine.Trainer, "train_step", engine.Trainer.train_step)
    record_batches(engine, str(record))
    assert train(cfg, tmp_path / "run", "train.epochs=2") == 0
    for epoch in (1, 2):
        reports = [m for m in caplog.messages if m.startswith(f"epoch {epoch}: 3 unreadable train images")]
        assert len(reports) == 1 and all(p in reports[0] for p in bad)
    lines = [json.loads(x) for x in (tmp_path / "run" / "bad_images.jsonl").read_text().splitlines()]
    assert sorted(x["path"] for x in lines if x["epoch"] == 1) == bad
    samples = ImageFolderDataset(root / "train").samples
    bad_idx = {i for i, (p, _) in enumerate(samples) if p in bad}
    seen = [i for b in read_records(record) for i in b["indices"]]
    assert not bad_idx & set(seen) and len(seen) == 2 * (16 - 3)  # dropped, never replaced
    # strict mode: fails up front, listing all of them, before anything is written
    capsys.readouterr()
    assert train(cfg, tmp_path / "strict", "data.strict=true") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 unreadable images" in err[0] and all(p in err[0] for p in bad)
    assert not (tmp_path / "strict").exists()


def test_micro_batch_of_only_unreadable_files(tmp_path):
    from swinv2.train.datasets import Batch

    tr, it = _trainer(tmp_path, "optim.accum_steps=2", "data.aug.mixup=0", "data.aug.cutmix=0")
    good = next(it)
    empty = Batch(
        torch.empty(0),
        torch.empty(0, dtype=torch.int64),
        torch.empty(0, dtype=torch.int64),
        [("x.png", "empty file")] * 4,
    )
    out = tr.train_step([good, empty])  # takes part with zero weight: the loss is the good batch's
    assert not out["skipped"] and out["n"] == 4 and math.isfinite(out["loss"])
    before = _snapshot(tr)
    out = tr.train_step([empty, empty])  # nothing readable at all: a skipped, counted step
    assert out["skipped"] and tr.progress["bad_steps"] == 1 and _equal(before, _snapshot(tr))


# --------------------------------------------------------------------------- row 10: image modes


def test_every_image_mode_trains(tmp_path):
    import numpy as np
    from PIL import Image

    root = make_image_folder(tmp_path / "data", n_train=2, n_val=1)
    rgb = Image.open(next((root / "train" / "a").glob("*.png"))).convert("RGB")
    for cls in ("a", "b"):
        d = root / "train" / cls
        rgb.convert("L").save(d / "l.png")
        rgb.convert("LA").save(d / "la.png")
        rgb.convert("P").save(d / "p.png")
        rgb.convert("RGBA").save(d / "rgba.png")
        rgb.convert("CMYK").save(d / "cmyk.jpg")
        Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(d / "grey16.png")
        exif = Image.Exif()
        exif[0x0112] = 8
        rgb.save(d / "exif.jpg", exif=exif.tobytes())
    cfg = tiny_config(tmp_path, root)
    out = tmp_path / "run"
    assert train(cfg, out, "train.epochs=1", "data.batch_size=2") == 0
    assert not (out / "bad_images.jsonl").exists()
    assert all(math.isfinite(s["loss"]) and not s["skipped"] for s in steps_log(out))
    assert len(steps_log(out)) == (2 + 7) * 2 // 2


# --------------------------------------------------------------------------- row 11: class folders


def test_class_folder_hygiene_is_reported_and_stored(tmp_path, caplog):
    from swinv2.weights.factory import load_model

    root = make_image_folder(tmp_path / "data", classes=("ant", "bee", "cow"))
    (root / "train" / "dog").mkdir()  # empty class: kept, so labels never shift
    (root / "train" / ".cache").mkdir()  # hidden: never a class
    (root / "train" / ".cache" / "x.png").write_bytes((root / "train" / "ant" / "00.png").read_bytes())
    (root / "train" / "labels.csv").write_text("stray")
    shutil.rmtree(root / "val" / "cow")  # a class missing from val
    out = tmp_path / "run"
    assert train(tiny_config(tmp_path, root), out, "train.epochs=1") == 0
    text = "\n".join(caplog.messages)
    first_step = text.index("training swinv2_micro")
    for needle in ("empty class folders", "dog", "labels.csv", "no folder for training classes cow"):
        assert needle in text[:first_step], needle  # reported before training starts
    classes = ["ant", "bee", "cow", "dog"]
    for ckpt in (out / "checkpoints").glob("*.pt"):
        assert load_state(out, ckpt.name)["classes"] == classes
    model = load_model(out / "best.safetensors")
    assert model.info.class_names == classes and model.num_classes == 4


# --------------------------------------------------------------------------- row 12: untrusted pickles


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused(reference, tmp_path, capsys, caplog):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, evil)  # a .pt file whose unpickling would run a shell command
    capsys.readouterr()
    assert train(reference["cfg"], tmp_path / "run", resume=str(evil)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(evil) in err[0] and "system" in err[0] and "nothing was executed" in err[0]
    # planted as the run's latest checkpoint: skipped with a warning, training starts afresh
    out = tmp_path / "planted"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(evil, out / "checkpoints" / "last.pt")
    assert train(reference["cfg"], out, "train.epochs=1") == 0
    assert any("skipping checkpoint" in m and "system" in m for m in caplog.messages)
    assert not marker.exists()


# --------------------------------------------------------------------------- row 13: wrong checkpoint


def test_wrong_checkpoint_lists_the_keys(reference, tmp_path, capsys):
    capsys.readouterr()
    last = str(reference["out"] / "checkpoints" / "last.pt")
    assert train(reference["cfg"], tmp_path / "a", "model.num_classes=3", resume=last) == 2
    err = capsys.readouterr().err
    assert "mis-shaped (2): head.weight (2, 48) vs model (3, 48), head.bias (2,) vs model (3,)" in err
    state = load_state(reference["out"])
    del state["model"]["norm.weight"]
    state["model"]["extra.weight"] = torch.zeros(1)
    from swinv2.weights.training_state import save_training_state

    save_training_state(tmp_path / "edited.pt", state)
    assert train(reference["cfg"], tmp_path / "b", resume=str(tmp_path / "edited.pt")) == 2
    err = capsys.readouterr().err
    assert "missing (1): norm.weight" in err and "unexpected (1): extra.weight" in err


# --------------------------------------------------------------------------- row 14: seeds


def test_same_seed_same_bits_other_seed_differs(reference, tmp_path):
    assert train(reference["cfg"], tmp_path / "again") == 0
    assert_same_state(load_state(tmp_path / "again"), reference["state"])
    assert [s["loss"] for s in steps_log(tmp_path / "again")] == [s["loss"] for s in reference["steps"]]
    assert train(reference["cfg"], tmp_path / "seed1", "train.seed=1", "train.epochs=1") == 0
    other = load_state(tmp_path / "seed1")
    assert not torch.equal(other["model"]["head.weight"], reference["state"]["model"]["head.weight"])
    assert steps_log(tmp_path / "seed1")[0]["loss"] != reference["steps"][0]["loss"]


# --------------------------------------------------------------------------- row 16: bad command lines


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "{tmp}/missing.yaml"], "missing.yaml"),
        (["model.name=swinv2_tiny_windw8_256"], "did you mean 'swinv2_tiny_window8_256'"),
        (["optim.lrr=1"], "did you mean 'optim.lr'"),
        (["data.root={tmp}/nowhere"], "nowhere"),
        (["data.batch_size=many"], "data.batch_size"),
    ],
)
def test_bad_command_lines_fail_in_one_line(reference, tmp_path, capsys, args, needle):
    from swinv2.cli import main

    args = [a.format(tmp=tmp_path) for a in args]
    config = [] if args[0] == "--config" else ["--config", str(reference["cfg"])]
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *config, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("swinv2 train: error:") and needle in err[0], err
    assert not out.exists()


def test_check_data_reports_without_training(tmp_path, capsys):
    from swinv2.cli import main

    root = make_image_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, root)
    assert main(["train", "--config", str(cfg), "--check-data"]) == 0
    ok = capsys.readouterr().out
    assert "train:" in ok and "16 images, 2 classes" in ok and "RGB: 16" in ok and "OK" in ok
    bad = _break_images(root / "train")
    (root / "train" / "empty_class").mkdir()
    assert main(["train", "--config", str(cfg), "--check-data"]) == 1
    report = capsys.readouterr().out
    assert all(p in report for p in bad) and "empty_class" in report and "3 unreadable image files" in report


# --------------------------------------------------------------------------- rows 17-21: the run directory


def _snapshot_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_training_in_the_same_run_directory_is_refused(reference, tmp_path, capsys):
    """While a live process holds the run (here: this one), another start refuses in one line naming
    the run and the holder, and writes nothing; a holder killed with SIGKILL holds nothing."""
    from swinv2.train.rundir import _lock

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    before = _snapshot_files(out)
    held = _lock(out)
    try:
        capsys.readouterr()
        assert train(reference["cfg"], out, "train.epochs=4") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run directory {out} is in use by process {os.getpid()}" in err[0], err
    finally:
        held.close()
    assert {k: v for k, v in _snapshot_files(out).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
    dead = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys; from pathlib import Path; "
            "from swinv2.train.rundir import _lock; f = _lock(Path(sys.argv[1])); "
            "os.kill(os.getpid(), signal.SIGKILL)",
            str(out),
        ],
        timeout=120,
    )
    assert dead.returncode == -signal.SIGKILL
    assert "process" in (out / ".lock").read_text()  # the dead holder's name is still in the file ...
    assert train(reference["cfg"], out) == 0  # ... but its lock went with it


def test_a_failed_best_weights_save_is_made_good_by_the_next_start(reference, tmp_path, monkeypatch, capsys):
    """Disk full at the first save of best.safetensors: the run stops with the clear line; space freed,
    the same command writes best.safetensors (the best-k leader's weights) and the summary lists it."""
    from swinv2.errors import CheckpointError
    from swinv2.train import rundir
    from swinv2.weights.factory import load_model

    out = tmp_path / "run"
    real = rundir.save_weights

    def full_disk(model, path, **kw):
        raise CheckpointError(f"could not save {path}: No space left on device")

    monkeypatch.setattr(rundir, "save_weights", full_disk)
    assert train(reference["cfg"], out) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (out / "best.safetensors").exists()
    monkeypatch.setattr(rundir, "save_weights", real)
    assert train(reference["cfg"], out) == 0
    assert f"weights:       {out / 'best.safetensors'}" in capsys.readouterr().out
    state = load_state(out)
    leader = load_state(out, state["best"][0]["file"])
    weights = load_model(out / "best.safetensors").state_dict()
    assert all(torch.equal(weights[k], v) for k, v in leader["model"].items())
    assert_same_state(state, reference["state"])


def test_a_refused_resume_changes_nothing_in_the_run_directory(reference, tmp_path, capsys):
    """A resume that fails (another model) leaves config.yaml and every other file as they were."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    before = _snapshot_files(out)
    capsys.readouterr()
    assert train(reference["cfg"], out, "model.name=swinv2_tiny_window8_256", "model.drop_path_rate=0") == 2
    assert "swinv2_tiny_window8_256" not in (out / "config.yaml").read_text()
    assert {k: v for k, v in _snapshot_files(out).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_a_resume_that_changes_the_run_shows_the_change_and_needs_the_flag(reference, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    capsys.readouterr()
    assert train(reference["cfg"], out, "data.batch_size=2", "optim.lr=1e-3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.batch_size 4 -> 2" in err[0] and "optim.lr 0.002 -> 0.001" in err[0]
    assert "--allow-config-change" in err[0]
    # Keys that do not change what is computed pass, and are shown.
    assert train(reference["cfg"], out, "train.log_every=2") == 0
    assert any("train.log_every 1 -> 2" in r.getMessage() for r in caplog.records)
    assert train(reference["cfg"], out, "optim.lr=1e-3", "--allow-config-change") == 0


# --------------------------------------------------------------------------- the user's files and the run folder


def _files_and_modes(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != ".lock"
    }


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("name", [".lock", "steps.jsonl", "config.yaml", "metrics.jsonl", "checkpoints/last.pt"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh out", "finished run"])
def test_a_planted_symlink_in_the_run_folder_is_refused_and_its_target_untouched(
    reference, tmp_path, capsys, name, fresh
):
    """A link where the run writes (planted, or kept by `cp -a`) would truncate or replace what it points
    to, any file on the machine for root: the start is refused naming the link; the target keeps its
    bytes and mode, and the run's own files are as they were."""
    victim = tmp_path / "private.json"
    victim.write_text('{"secret": 1}\n')
    victim.chmod(0o600)
    out = tmp_path / "run"
    if fresh:
        (out / "checkpoints").mkdir(parents=True)
    else:
        shutil.copytree(reference["out"], out)
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    before = _files_and_modes(out)
    capsys.readouterr()
    assert train(reference["cfg"], out) == 2
    line = _one_error_line(capsys)
    assert f"{name} -> {victim}" in line and "symbolic link" in line, line
    assert victim.read_bytes() == b'{"secret": 1}\n' and victim.stat().st_mode & 0o777 == 0o600
    assert (out / name).is_symlink() and _files_and_modes(out) == before


def test_a_link_planted_during_a_run_is_never_appended_through(tmp_path):
    from swinv2.errors import InputError
    from swinv2.train.rundir import append_line

    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    (tmp_path / "steps.jsonl").symlink_to(victim)
    with pytest.raises(InputError, match="steps.jsonl: is a symbolic link"):
        append_line(tmp_path / "steps.jsonl", '{"step": 1}\n')
    assert victim.read_text() == "keep\n"
    append_line(tmp_path / "metrics.jsonl", "a\n")
    append_line(tmp_path / "metrics.jsonl", "b\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "a\nb\n"


def test_a_fresh_out_holding_the_users_files_is_refused(reference, tmp_path, capsys):
    """`--config myexp/config.yaml --out myexp`: the hand-written recipe is never replaced by the dump."""
    exp = tmp_path / "myexp"
    exp.mkdir()
    mine = "# my experiment: the tiny run, one epoch\n" + reference["cfg"].read_text()
    (exp / "config.yaml").write_text(mine)
    (exp / "notes.txt").write_text("ideas\n")
    capsys.readouterr()
    from swinv2.cli import main

    assert main(["train", "--config", str(exp / "config.yaml"), "--out", str(exp), "train.epochs=1"]) == 2
    line = _one_error_line(capsys)
    assert "holds files no run wrote (config.yaml, notes.txt)" in line, line
    assert (exp / "config.yaml").read_text() == mine
    assert sorted(p.name for p in exp.iterdir()) == ["config.yaml", "notes.txt"]  # no .lock, no checkpoints/


def _without_root_file_access() -> None:
    """In a child before exec: drop the capabilities that let root read any file (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from the bounding set, so file modes apply to it as to any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unreadable_checkpoint_stops_the_run_touching_nothing(reference, tmp_path):
    """Checkpoints that cannot be read now (permissions) are not torn ones: the run stops in one line
    naming the file, and nothing in the run is changed (before, it trained from step 0 and its saves
    pruned the best checkpoints). As root, the trainer runs without the capabilities that bypass modes."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    ckpts = out / "checkpoints"
    hidden = [ckpts / "last.pt", *ckpts.glob("best_epoch*.pt")]
    assert len(hidden) == 3
    for p in hidden:
        p.chmod(0)
    before = _files_and_modes(out)  # the test (root or owner) reads them to compare
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "swinv2", "train", "--config", str(reference["cfg"]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and any(f"{p}: cannot be read: Permission denied" in err[0] for p in hidden), r.stderr[-2000:]
    assert "stopped without changing anything" in err[0]
    assert "Traceback" not in r.stderr and "skipping checkpoint" not in r.stderr
    assert _files_and_modes(out) == before


def test_an_unreadable_checkpoint_folder_is_not_taken_for_an_empty_one(reference, tmp_path, monkeypatch):
    from swinv2.errors import UnreadableFileError
    from swinv2.weights.training_state import find_resumable

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference["out"] / "checkpoints", ckpts)
    real = os.listdir

    def listdir(path="."):
        if Path(path) == ckpts:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(UnreadableFileError, match="checkpoints: cannot be read: Permission denied"):
        find_resumable(ckpts)


def test_resuming_another_run_into_a_finished_run_is_refused(reference, tmp_path, capsys):
    """`--out r_done --resume r_one/checkpoints/X.pt` would cut r_done's history and prune its best
    checkpoints: refused in one line, every file of r_done as it was; `--start-over` replaces it."""
    done, other = tmp_path / "r_done", tmp_path / "r_one"
    shutil.copytree(reference["out"], done)
    shutil.copytree(reference["out"], other)
    source = sorted((other / "checkpoints").glob("best_epoch*.pt"))[0]
    before = _files_and_modes(done)
    capsys.readouterr()
    assert train(reference["cfg"], done, resume=str(source)) == 2
    line = _one_error_line(capsys)
    assert f"--out {done} already holds a run" in line and "--start-over" in line, line
    assert _files_and_modes(done) == before
    # A checkpoint of the run itself stays the user's explicit choice; --start-over replaces the run.
    assert train(reference["cfg"], done, "--start-over", resume=str(source)) == 0
    assert_same_state(load_state(done), reference["state"])
    epochs = [json.loads(ln)["epoch"] for ln in (done / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_rerun_at_once_after_sigkill_of_the_trainer_resumes_while_its_workers_live(reference, tmp_path, monkeypatch):
    """A supervisor restarts a SIGKILLed trainer at once: its DataLoader workers are still alive then
    (they leave within seconds), and must not hold the run's lock; the restart resumes bit-exactly."""
    out, children = tmp_path / "run", tmp_path / "children.txt"
    r = drive(
        tmp_path, {"kill_at": 7, "children": str(children)}, reference["cfg"], out, "data.workers=2", own_group=True
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    pids = [int(p) for p in children.read_text().split()]
    assert len(pids) >= 2 and any(_alive(p) for p in pids), "the workers should outlive the trainer a while"
    assert train(reference["cfg"], out) == 0
    assert_same_state(load_state(out), reference["state"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_forked_child_never_holds_the_run_lock(tmp_path):
    """The lock goes with the trainer, whatever its children do: a child forked while it is held (as
    DataLoader workers are) and still alive after the trainer's SIGKILL holds nothing."""
    from swinv2.train.rundir import _lock

    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import os, signal, sys, time; from pathlib import Path; from swinv2.train.rundir import _lock; "
        "f = _lock(Path(sys.argv[1])); pid = os.fork()\n"
        "if pid == 0:\n    os.close(1); time.sleep(60); os._exit(0)\n"
        "print(pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    child = int(r.stdout.split()[0])
    try:
        assert _alive(child)
        _lock(out).close()  # free at once, though a process forked by the holder is alive
    finally:
        os.kill(child, signal.SIGKILL)


def test_sigterm_to_the_whole_process_group_saves_at_the_step_boundary(reference, tmp_path):
    """systemd, Slurm and `timeout` signal the whole group, DataLoader workers included: the workers
    live on until the trainer has saved at the step boundary; exit 143; the resume is bit-exact."""
    out = tmp_path / "run"
    r = drive(
        tmp_path, {"signal_group_at": [5, int(signal.SIGTERM)]}, reference["cfg"], out, "data.workers=2", own_group=True
    )
    assert r.returncode == 143, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr, r.stderr[-3000:]
    assert "SIGTERM" in r.stderr and "run the same command again" in r.stderr
    state = load_state(out)
    assert state["progress"]["global_step"] == 6  # the signalled step finished, then the save
    assert train(reference["cfg"], out) == 0
    assert_same_state(load_state(out), reference["state"])


def test_a_lock_held_in_the_name_of_a_dead_trainer_says_it_has_ended(tmp_path):
    """Where a process the trainer started still holds the lock (not a DataLoader worker: those drop it),
    the refusal says the named trainer has ended instead of sending the user after a dead pid."""
    import fcntl
    import socket

    from swinv2.train.rundir import RunLockedError, _lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(f"process {pid} on {socket.gethostname()} (swinv2 train)\n")
    with open(tmp_path / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunLockedError, match=f"in use by process {pid}, which has ended"):
            _lock(tmp_path)
    _lock(tmp_path).close()


@pytest.mark.parametrize("case", ["out is a file", "resume missing", "resume of another model", "run locked"])
def test_a_refused_start_fails_before_any_work_and_leaves_nothing_behind(
    reference, tmp_path, capsys, monkeypatch, case
):
    """Paths, the lock and the resume source are checked before the data is scanned and the model built;
    a start refused at any point leaves no `.lock` or empty `checkpoints/` in a folder it created."""
    from swinv2.train import engine
    from swinv2.train.rundir import _lock

    built = []
    monkeypatch.setattr(engine, "prepare_data", lambda *a, real=engine.prepare_data: built.append(1) or real(*a))
    out, extra, held = tmp_path / "run", [], None
    if case == "out is a file":
        out = tmp_path / "README.md"
        out.write_text("mine\n")
    elif case == "resume missing":
        extra = ["--resume", str(tmp_path / "nothere.pt")]
    elif case == "resume of another model":
        extra = [
            "--resume",
            str(reference["out"] / "checkpoints" / "last.pt"),
            "model.name=swinv2_tiny_window8_256",
            "model.drop_path_rate=0",
        ]
    else:
        out.mkdir()
        held = _lock(out)
    capsys.readouterr()
    from swinv2.cli import main

    try:
        assert main(["train", "--config", str(reference["cfg"]), "--out", str(out), *extra]) == 2
    finally:
        if held is not None:
            held.close()
    line = _one_error_line(capsys)
    if case == "resume of another model":  # the checkpoint must be read against a built model
        assert "does not fit" in line or "mis-shaped" in line, line
        assert not out.exists()
    else:
        assert not built, f"the data was scanned before refusing: {line}"
        assert {
            "out is a file": "is a file, not a run directory",
            "resume missing": "nothere.pt: no such checkpoint",
            "run locked": "is in use by process",
        }[case] in line, line
    if case == "out is a file":
        assert out.read_text() == "mine\n"
    elif case == "run locked":
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    else:
        assert not out.exists()
