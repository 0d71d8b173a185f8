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
        proc = subprocess.run(
            [sys.executable, "-c", f"from swinv2.outputs import write_output; write_output('/dev/fd/{w}', 'piped')"],
            pass_fds=(w,),
            timeout=60,
            capture_output=True,
        )
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
    from swinv2.cli import main
    from swinv2.tools import bench

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


# --------------------------------------------------------------------------- the user's own files

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="creating a file owned by another uid needs root"
)
OTHER_UID, OTHER_GID = 12345, 12346


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o7777


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_a_file_replaced_through_a_symlink_keeps_its_mode(tmp_path, mode):
    """`--json link.json` -> the user's private.json (0600): the content is replaced, the mode is not,
    whatever the umask; the link stays a link. A new file still follows the umask."""
    private = tmp_path / "private.json"
    private.write_text('{"old": 1}')
    os.chmod(private, mode)
    link = tmp_path / "link.json"
    link.symlink_to(private)
    old = os.umask(0o022)
    try:
        write_output(link, '{"new": 2}')
        write_output(private, '{"newer": 3}')  # and directly, not through the link
        write_output(tmp_path / "fresh.json", "{}")
    finally:
        os.umask(old)
    assert private.read_text() == '{"newer": 3}' and _mode(private) == mode
    assert link.is_symlink() and os.readlink(link) == str(private)
    assert _mode(tmp_path / "fresh.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json", "link.json", "private.json"]


@needs_root
def test_a_file_replaced_as_root_keeps_its_owner_and_group(tmp_path):
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chown(private, OTHER_UID, OTHER_GID)
    os.chmod(private, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(private)
    write_output(link, '{"new": 1}')
    st = os.stat(private)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (OTHER_UID, OTHER_GID, 0o600)
    assert private.read_text() == '{"new": 1}' and link.is_symlink()


def _as_another_user(calls) -> list[str]:
    """Run each of `calls` in a forked child that dropped root for uid OTHER_UID; what each raised (an
    OSError as "Type: message") or "done"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exception may leave it
        try:
            os.setgroups([])
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)
            lines = []
            for call in calls:
                try:
                    call()
                    lines.append("done")
                except OSError as e:
                    lines.append(f"{type(e).__name__}: {e}")
            os.write(w, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return out.splitlines()


@needs_root
def test_a_file_whose_owner_cannot_be_kept_is_refused_and_left_as_it_was():
    """Not root, someone else's file in a folder anyone may write: `check_output` refuses it up front,
    and the writer itself (called without the check) refuses before the rename, its temp file gone."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="swinv2-owner-"))  # not under pytest's 0700 tmp folder
    try:
        os.chmod(folder, 0o777)
        theirs = folder / "theirs.json"
        theirs.write_bytes(b'{"theirs": 1}')
        os.chown(theirs, OTHER_UID + 1, OTHER_GID)
        os.chmod(theirs, 0o666)
        checked, written = _as_another_user(
            [lambda: check_output(theirs, "--json", kind="json"), lambda: write_output(theirs, "{}")]
        )
        assert checked.startswith(f"OutputRefusedError: --json {theirs}: belongs to uid {OTHER_UID + 1}"), checked
        assert written.startswith(f"CheckpointError: cannot replace {theirs}: it belongs to uid {OTHER_UID + 1}")
        assert "unchanged" in written
        assert theirs.read_bytes() == b'{"theirs": 1}' and os.stat(theirs).st_uid == OTHER_UID + 1
        assert [p.name for p in folder.iterdir()] == ["theirs.json"]  # no temp file left
    finally:
        shutil.rmtree(folder)


def _files_of_each_kind(folder: Path) -> dict[str, Path]:
    """A real file of each kind the sniffers tell apart, named without the usual suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    folder.mkdir()
    files = {
        name: folder / name
        for name in (
            "jpeg",
            "png_photo",
            "png_figure",
            "json",
            "safetensors",
            "torch_zip",
            "torch_legacy",
            "onnx",
            "zip",
            "text",
            "gif",
        )
    }
    Image.new("RGB", (16, 16), (200, 30, 30)).save(files["jpeg"], format="JPEG")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(files["png_photo"], format="PNG")
    Image.new("RGB", (16, 16), (30, 30, 200)).save(files["gif"], format="GIF")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(files["png_figure"], format="png")
    plt.close(fig)
    files["json"].write_text(' \n{"top1": 50.0}\n')
    save_file({"a": torch.zeros(2)}, files["safetensors"])
    torch.save({"a": torch.zeros(2)}, files["torch_zip"])
    torch.save({"a": torch.zeros(2)}, files["torch_legacy"], _use_new_zipfile_serialization=False)
    files["onnx"].write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x062.14.1")  # ModelProto: ir_version, producer
    import zipfile

    with zipfile.ZipFile(files["zip"], "w") as z:
        z.writestr("notes.txt", "hello")
    files["text"].write_text("dear diary\n")
    return files


# kind -> the files of `_files_of_each_kind` it may replace; every other one is refused
REPLACEABLE = {
    "png": {"png_figure"},
    "json": {"json"},
    "safetensors": {"safetensors"},
    "torch": {"torch_zip", "torch_legacy"},
    "onnx": {"onnx"},
}


@pytest.mark.parametrize("kind", sorted(REPLACEABLE))
def test_an_existing_file_of_another_kind_is_refused_by_content(tmp_path, kind):
    from swinv2.outputs import OutputRefusedError

    files = _files_of_each_kind(tmp_path / "files")
    before = {name: path.read_bytes() for name, path in files.items()}
    for name, path in files.items():
        if name in REPLACEABLE[kind]:
            check_output(path, "--out", kind=kind)
            continue
        with pytest.raises(OutputRefusedError) as e:
            check_output(path, "--out", kind=kind)
        msg = str(e.value)
        assert msg.startswith(f"--out {path}: is an existing ") and "refusing to replace it" in msg, msg
        assert "\n" not in msg
    assert {name: path.read_bytes() for name, path in files.items()} == before
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    check_output(empty, "--out", kind=kind)  # nothing to lose: `touch out.json` first is fine


def test_the_refusal_names_what_the_file_is():
    import tempfile

    from swinv2.outputs import OutputRefusedError

    with tempfile.TemporaryDirectory() as d:
        files = _files_of_each_kind(Path(d) / "f")
        with pytest.raises(
            OutputRefusedError,
            match=r"is an existing JPEG image, not a PNG figure this command "
            r"writes; refusing to replace it \(did a shell glob put an "
            r"input here\?\)$",
        ):
            check_output(files["jpeg"], "--plot", kind="png")
        with pytest.raises(OutputRefusedError, match="is an existing PNG image, not a PNG figure"):
            check_output(files["png_photo"], "--plot", kind="png")  # `--plot photos/*.png`: a photo, not a plot
        with pytest.raises(OutputRefusedError, match="is an existing PyTorch file, not a .safetensors file"):
            check_output(files["torch_zip"], "DST", kind="safetensors")


def test_an_output_that_is_an_input_is_refused_also_through_a_symlink(tmp_path):
    from swinv2.outputs import OutputRefusedError

    weights = tmp_path / "w.json"
    weights.write_text("{}")  # of the output's own kind: only the inputs check can refuse it
    alias = tmp_path / "alias.json"
    alias.symlink_to(weights)
    with pytest.raises(OutputRefusedError, match=r"alias\.json: is also an input of this command \(--weights "):
        check_output(alias, "--json", kind="json", inputs=[("--weights", str(weights)), ("PATH", None)])
    check_output(tmp_path / "other.json", "--json", kind="json", inputs=[("--weights", str(weights))])
    assert weights.read_text() == "{}"


def test_an_image_inside_an_input_folder_is_refused_at_the_depth_read(tmp_path):
    """eval reads DATA/<class>/<image>, predict any image under a folder: an existing image there is an
    input; a root-level file of eval's folder, a hidden one or a non-image is not."""
    from swinv2.outputs import OutputRefusedError

    files = _files_of_each_kind(tmp_path / "f")
    data = tmp_path / "data"
    (data / "ant").mkdir(parents=True)
    (data / ".hidden").mkdir()
    for rel in ("ant/grid.png", "top.png", ".hidden/grid.png", "ant/report.json"):
        (data / rel).write_bytes(files["png_figure" if rel.endswith(".png") else "json"].read_bytes())
    for depth, refused in ((2, {"ant/grid.png"}), (1, {"ant/grid.png", "top.png"})):
        for rel in ("ant/grid.png", "top.png", ".hidden/grid.png", "ant/report.json"):
            kind = "png" if rel.endswith(".png") else "json"

            def call(rel: str = rel, kind: str = kind, depth: int = depth) -> object:
                return check_output(data / rel, "--plot", kind=kind, image_folders=[("--data", str(data), depth)])

            if rel in refused:
                with pytest.raises(OutputRefusedError, match=f"is an image this command reads from --data {data}"):
                    call()
            else:
                call()


def test_a_folder_output_must_be_empty_or_a_model_folder(tmp_path):
    from swinv2.outputs import OutputRefusedError

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(_files_of_each_kind(tmp_path / "f")["jpeg"].read_bytes())
    with pytest.raises(
        OutputRefusedError,
        match="is an existing folder with no config.json or model files in it "
        r"\(1 entries: cat.jpg\), not a Hugging Face model folder",
    ):
        check_output(photos, "DST", kind="hf")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_text("")
    check_output(empty, "DST", kind="hf")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    check_output(model, "DST", kind="hf")
    (model / "model.safetensors").write_bytes((tmp_path / "f" / "jpeg").read_bytes())  # a photo under its name
    with pytest.raises(OutputRefusedError, match=r"model/model\.safetensors: is an existing JPEG image"):
        check_output(model, "DST", kind="hf")
    with pytest.raises(OutputRefusedError, match="is an existing JPEG image, not a Hugging Face model folder"):
        check_output(tmp_path / "f" / "jpeg", "DST", kind="hf")


def test_streamed_outputs_are_never_sniffed(tmp_path):
    for name in ("-", "/dev/stdout", "/dev/null"):
        check_output(name, "--json", kind="json", inputs=[("--weights", "/dev/null")])


# --------------------------------------------------------------------------- every output option of every command


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_micro_weights):
    """Tiny self-describing weights, an eval folder and a real JPEG photo."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cmds")
    weights = make_micro_weights(root / "w.safetensors", ["ant", "bee"], randomized=False)
    for c in ("ant", "bee"):
        (root / "val" / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), (120, 60 * len(c), 30)).save(root / "val" / c / "0.png")
    photo = root / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(photo, format="JPEG", quality=90)
    return weights, root / "val", photo.read_bytes()


# option, where the photo goes (relative to the test's folder), argv (OUT: that folder)
OUTPUTS = [
    ("--json", "r.json", ["eval", "--weights", "W", "--data", "DATA", "--json", "OUT/r.json"]),
    ("--plots", "plots/confusion_matrix.png", ["eval", "--weights", "W", "--data", "DATA", "--plots", "OUT/plots"]),
    ("--plots", "plots", ["eval", "--weights", "W", "--data", "DATA", "--plots", "OUT/plots"]),
    ("--plot", "grid.png", ["predict", "--weights", "W", "--plot", "OUT/grid.png", "DATA"]),
    ("DST", "w2.safetensors", ["convert", "W", "OUT/w2.safetensors"]),
    ("DST", "w2.pth", ["convert", "W", "OUT/w2.pth"]),
    ("DST", "timm.pth", ["convert", "W", "OUT/timm.pth", "--dst", "timm"]),
    ("DST", "hf/config.json", ["convert", "W", "OUT/hf"]),
    ("DST", "hf/cat.jpg", ["convert", "W", "OUT/hf"]),  # a photo folder, not a model folder
    ("DST", "hf", ["convert", "W", "OUT/hf"]),
    ("--onnx", "m.onnx", ["export", "--weights", "W", "--onnx", "OUT/m.onnx"]),
    ("--onnx (its sidecar)", "m.onnx.json", ["export", "--weights", "W", "--onnx", "OUT/m.onnx"]),
    ("--json", "b.json", ["bench", "--model", "swinv2_micro_window4_32", "--json", "OUT/b.json"]),
    ("--out", "cpb/cpb_stage1.png", ["viz-cpb", "--weights", "W", "--out", "OUT/cpb"]),
    ("--out", "cpb", ["viz-cpb", "--weights", "W", "--out", "OUT/cpb"]),
]


@pytest.mark.parametrize("option, photo_at, argv", OUTPUTS, ids=[f"{a[2][0]} {a[1]}" for a in OUTPUTS])
def test_every_output_option_refuses_a_photo_and_writes_nothing(tiny, tmp_path, capsys, option, photo_at, argv):
    """A JPEG where the command would write its own kind of file (a shell glob's first match): exit 2,
    one line naming the option and the path, the photo byte-identical, nothing else written."""
    from swinv2.cli import main

    weights, data, jpeg = tiny
    photo = tmp_path / photo_at
    photo.parent.mkdir(parents=True, exist_ok=True)
    photo.write_bytes(jpeg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [
        a.replace("OUT", str(tmp_path)) if a.startswith("OUT") else {"W": str(weights), "DATA": str(data)}.get(a, a)
        for a in argv
    ]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    named = str(photo.parent if photo_at.endswith("cat.jpg") else photo)
    assert len(lines) == 1 and lines[0].startswith(f"swinv2 {argv[0]}: error: {option} {named}"), lines
    assert "is an existing" in lines[0] and "refusing to replace it" in lines[0], lines
    assert "JPEG image" in lines[0] or "cat.jpg" in lines[0], lines
    assert photo.read_bytes() == jpeg
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "wrote" not in out


def test_convert_over_a_private_file_through_a_symlink_keeps_its_mode_and_the_link(tiny, tmp_path, capsys):
    """`swinv2 convert a.safetensors secret.safetensors` over an existing 0600 file, directly and
    through a link: the weights are replaced, the mode kept (not 0644 under umask 022)."""
    from safetensors import safe_open

    from swinv2.cli import main

    weights, _, _ = tiny
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(weights.read_bytes())
    os.chmod(secret, 0o600)
    link = tmp_path / "link.safetensors"
    link.symlink_to(secret)
    official = tmp_path / "official.pth"
    old = os.umask(0o022)
    try:
        assert main(["convert", str(weights), str(official)]) == 0
        assert main(["convert", str(official), str(link), "--dst", "timm"]) == 0  # timm keys: other content
        assert _mode(secret) == 0o600 and link.is_symlink() and os.readlink(link) == str(secret)
        with safe_open(secret, "pt") as f:
            assert (f.metadata() or {}).get("swinv2.config") is None  # really replaced: timm has no metadata
        assert main(["convert", str(weights), str(secret)]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert secret.read_bytes() != b"" and _mode(secret) == 0o600
    assert _mode(official) == 0o644  # a new file still follows the umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "official.pth", "secret.safetensors"]


@needs_root
def test_convert_over_another_users_file_keeps_its_owner(tiny, tmp_path, capsys):
    from swinv2.cli import main

    weights, _, _ = tiny
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(weights.read_bytes())
    os.chown(theirs, OTHER_UID, OTHER_GID)
    os.chmod(theirs, 0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(theirs)
    assert main(["convert", str(weights), str(link)]) == 0
    capsys.readouterr()
    st = os.stat(theirs)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (OTHER_UID, OTHER_GID, 0o640) and link.is_symlink()


def test_convert_refuses_to_write_over_its_source(tiny, tmp_path, capsys):
    from swinv2.cli import main

    weights, _, _ = tiny
    src = tmp_path / "w.safetensors"
    src.write_bytes(weights.read_bytes())
    alias = tmp_path / "alias.safetensors"
    alias.symlink_to(src)
    hf = tmp_path / "hf"
    assert main(["convert", str(src), str(hf)]) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for dst, source in ((alias, src), (src, src), (hf, hf), (hf / "model.safetensors", hf)):
        assert main(["convert", str(source), str(dst), "--dst", "hf" if dst == hf else "native"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"DST {dst}: is also an input of this command (SRC" in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
