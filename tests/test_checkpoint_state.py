"""Training-state files: atomic writes, torn / empty / garbage files, full disk, malicious pickles.

RELIABILITY rows 3, 4, 5 and 12: each fault is injected for real (truncating the bytes, writing
garbage, making the write raise ENOSPC, a pickle whose __reduce__ would create a file).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from swinv2.errors import CheckpointError, UnsafeCheckpointError
from swinv2.weights.training_state import find_resumable, load_training_state, save_training_state


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": seed,
        "rng": torch.get_rng_state(),
        "class_names": ["cat", "dog"],
        "config": {"train": {"epochs": 2}, "amp": None, "sizes": (1, 2)},
    }


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_state_equal(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


class _Evil:
    """Unpickling this would call os.mkdir(target): a stand-in for arbitrary code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_save_load_round_trip_and_no_temp_left(tmp_path: Path) -> None:
    state = _state(1)
    path = tmp_path / "last.pt"
    save_training_state(path, state)
    _assert_state_equal(load_training_state(path), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_training_state(path, _state(1))
    save_training_state(path, _state(2))
    assert load_training_state(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("fault", ["zero", "truncated", "garbage"])
def test_corrupt_file_fails_naming_it(tmp_path: Path, fault: str) -> None:
    path = tmp_path / "bad.pt"
    save_training_state(path, _state(1))
    data = path.read_bytes()
    path.write_bytes({"zero": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(len(data))}[fault])
    with pytest.raises(CheckpointError) as e:
        load_training_state(path)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_training_state(tmp_path / "nope.pt")


def test_disk_full_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_training_state(path, _state(1))
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # write part of the data, then fail as a full disk does
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        save_training_state(path, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(e.value)
    assert str(path) in msg and "No space left on device" in msg and "\n" not in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_training_state(path)["step"] == 1


def test_fsync_failure_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_training_state(path, _state(1))

    def bad_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", bad_fsync)
    with pytest.raises(CheckpointError, match="Input/output error"):
        save_training_state(path, _state(2))
    monkeypatch.undo()
    assert load_training_state(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_non_plain_state_is_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\['fn'\]"):
        save_training_state(path, {"extra": {"fn": _Evil("x")}})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": _Evil(str(target))}, path)  # a hostile file, made here
    with pytest.raises(UnsafeCheckpointError) as e:
        load_training_state(path)
    msg = str(e.value)
    assert "posix.mkdir" in msg or "os.mkdir" in msg  # names the offending global
    assert str(path) in msg and "\n" not in msg
    assert not target.exists()


def _touch(path: Path, state: dict, mtime: float) -> None:
    save_training_state(path, state)
    os.utime(path, (mtime, mtime))


def test_find_resumable_skips_bad_and_removes_temps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    _touch(tmp_path / "epoch1.pt", _state(1), now - 30)
    _touch(tmp_path / "epoch2.pt", _state(2), now - 20)
    (tmp_path / "epoch3.pt").write_bytes((tmp_path / "epoch2.pt").read_bytes()[:100])  # torn, newest
    (tmp_path / "epoch4.pt").write_bytes(b"")  # zero bytes, even newer
    os.utime(tmp_path / "epoch3.pt", (now - 10, now - 10))
    tmp = tmp_path / ".epoch5.pt.abc123.tmp"  # a save killed mid-write
    tmp.write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        found = find_resumable(tmp_path)
    assert found == tmp_path / "epoch2.pt"
    assert load_training_state(found)["step"] == 2
    assert not tmp.exists()
    text = caplog.text
    assert "epoch3.pt" in text and "epoch4.pt" in text


def test_find_resumable_goes_by_the_step_inside_never_by_file_time(tmp_path: Path) -> None:
    """A best-k file touched (or a run copied with `cp -r`) after last.pt is newer on disk but further
    back in training: resume picks the highest recorded step, last.pt first among equals."""
    now = time.time()
    for name, step, age in (("best_epoch0001.pt", 4, 0), ("best_epoch0003.pt", 12, 20), ("last.pt", 12, 30)):
        _touch(tmp_path / name, {**_state(step), "progress": {"global_step": step}}, now - age)
    assert find_resumable(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "last.pt").unlink()
    assert find_resumable(tmp_path) == tmp_path / "best_epoch0003.pt"


def test_find_resumable_empty_or_missing(tmp_path: Path) -> None:
    assert find_resumable(tmp_path) is None
    assert find_resumable(tmp_path / "absent") is None
    (tmp_path / "only.pt").write_bytes(b"garbage")
    assert find_resumable(tmp_path) is None


def test_find_resumable_skips_malicious(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    now = time.time()
    _touch(tmp_path / "good.pt", _state(1), now - 10)
    torch.save({"x": _Evil(str(target))}, tmp_path / "evil.pt")
    assert find_resumable(tmp_path) == tmp_path / "good.pt"
    assert not target.exists()


def test_disk_full_inside_torch_writer_still_says_no_space(tmp_path: Path, monkeypatch) -> None:
    """torch.save wraps the file object's ENOSPC in its own RuntimeError ("[enforce fail at
    inline_container.cc]"); the error still names the file and the OS's reason."""
    import swinv2.outputs as O

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 2048:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    # The atomic writer opens its temp file with `open(tmp, "wb")`; that file fills up.
    monkeypatch.setattr(
        O, "open", lambda f, mode="r": FullDisk(open(f, mode)) if mode == "wb" else open(f, mode), raising=False
    )
    path = tmp_path / "last.pt"
    with pytest.raises(CheckpointError) as err:
        save_training_state(path, {"w": torch.zeros(10_000)})
    assert str(err.value).startswith(f"could not save {path}: No space left on device")
    assert "enforce fail" not in str(err.value)
    assert not path.exists() and not list(tmp_path.iterdir())
