"""Result files: regular files replaced atomically, symlinks written through, stdout, pipes, FIFOs
and devices streamed and never replaced; output folders checked before the work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from swinv2.outputs import check_output, is_stdout, write_output


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output="stdout" not in kw, timeout=60, **kw)


def test_a_regular_file_is_replaced_whole_and_a_new_one_follows_the_umask(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    write_output(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    old = os.umask(0o022)
    try:
        write_output(tmp_path / "new.json", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "r.json"]  # no temp file left


def test_a_symlink_is_written_through_to_its_target(tmp_path):
    target = tmp_path / "real" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_output(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"


def test_a_fifo_is_streamed_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_output(fifo, "through the fifo")
    reader.join(timeout=30)
    assert got == ["through the fifo"]
    assert not fifo.is_file() and fifo.exists()  # still a FIFO


def test_dev_stdout_and_dash_go_to_this_process_stdout_without_replacing_anything(tmp_path):
    code = "from swinv2.outputs import write_output; print('report', flush=True); write_output({!r}, '{{}}')"
    for name in ("/dev/stdout", "-"):
        piped = _python(code.format(name))
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == b"report\n{}"
        redirected = tmp_path / "out.txt"  # `> out.txt`: stdout is a regular file, which must not be replaced
        with open(redirected, "wb") as f:
            assert _python(code.format(name), stdout=f).returncode == 0
        assert redirected.read_bytes() == b"report\n{}"
    assert Path("/dev/stdout").is_symlink() or not Path("/dev/stdout").is_file()


def test_a_process_substitution_pipe_is_streamed():
    """`--json >(jq .)` hands over /dev/fd/N, a pipe: written in place, no `/dev/fd/N.tmp`."""
    r, w = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-c", f"from swinv2.outputs import write_output; "
                               f"write_output('/dev/fd/{w}', 'piped')"], pass_fds=(w,), timeout=60,
                              capture_output=True)
        os.close(w)
        assert proc.returncode == 0, proc.stderr
        assert os.read(r, 100) == b"piped"
    finally:
        os.close(r)


def test_character_devices_are_written_in_place():
    write_output("/dev/null", "discarded")
    assert Path("/dev/null").is_char_device()


def test_is_stdout_only_for_this_process_stdout(tmp_path):
    assert is_stdout("-")
    assert not is_stdout(tmp_path / "x.json")


def test_check_output_creates_missing_folders_and_refuses_what_cannot_be_written(tmp_path):
    check_output(tmp_path / "a" / "b" / "r.json", "--json")
    assert (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"^--json .*file/r\.json: cannot create its folder"):
        check_output(blocker / "r.json", "--json")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_output(tmp_path / "a", "--json")
    for name in ("-", "/dev/stdout", "/dev/null"):
        check_output(name)


def test_bench_refuses_an_unwritable_json_path_before_measuring(tmp_path, monkeypatch, capsys):
    from swinv2 import bench
    from swinv2.cli import main

    monkeypatch.setattr(bench, "run", lambda *a, **kw: pytest.fail("measured before checking --json"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--model", "swinv2_micro_window4_32", "--json", str(blocker / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--json" in err[0] and str(blocker) in err[0]


def test_json_records_are_whole_json(tmp_path):
    from swinv2.cli import _write_json

    _write_json(str(tmp_path / "r.json"), {"top1": 50.0})
    assert json.loads((tmp_path / "r.json").read_text()) == {"top1": 50.0}
