"""Multi-file outputs killed between their files are never read back as a mix (reliability row 20).

A Hugging Face folder (model.safetensors, preprocessor_config.json, config.json), an ONNX graph with
its sidecar `<graph>.json`, an entry of the runtime's export cache and a download into the Hugging
Face cache, each killed for real: a fresh `swinv2` process (driver below) SIGKILLs itself at its n-th
`os.replace`, i.e. after n - 1 of the unit's files were renamed into place, for every n. What is read
back afterwards is exactly the old unit, exactly the new one, or a one-line CheckpointError that says
it looks like an interrupted write; the temp files a kill leaves are removed by the next write.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import swinv2
from randomize import randomize_
from swinv2 import cli
from swinv2.errors import CheckpointError
from swinv2.weights import hub
from swinv2.weights.factory import load_model
from swinv2.weights.files import UNIT_KEY, save_weights, write_weights
from swinv2.weights.registry import EvalPreprocess

MICRO = "swinv2_micro_window4_32"
TESTS = Path(__file__).resolve().parent

# `python driver.py SPEC ARGS`: SPEC {"kill_at": n, "log": file} SIGKILLs the process at its n-th
# os.replace (before it happens), after appending the destination of every os.replace to `log`;
# {"hub": ...} first points huggingface_hub at a stand-in and registers a record (see the hub test).
DRIVER = """\
import json, os, signal, sys
spec = json.loads(sys.argv[1])
_replace, calls = os.replace, [0]

def replace(src, dst, *a, **kw):
    calls[0] += 1
    with open(spec["log"], "a") as f:
        f.write(os.path.basename(os.fspath(dst)) + "\\n")
    if calls[0] == spec.get("kill_at"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **kw)

os.replace = replace
if "hub" in spec:
    exec(spec["hub"])
from swinv2.cli import main
sys.exit(main(sys.argv[2:]))
"""


def drive(
    tmp: Path, argv: list[str], *, kill_at: int | None = None, hub_setup: str | None = None, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`swinv2 ARGV` in a fresh process, killed at its `kill_at`-th os.replace; (result, names replaced
    onto, in order, the last one being where it was killed)."""
    driver, log = tmp / "driver.py", tmp / f"replaces-{time.monotonic_ns()}.log"
    driver.write_text(DRIVER)
    spec = {"log": str(log), "kill_at": kill_at, **({"hub": hub_setup} if hub_setup else {})}
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    res = subprocess.run(
        [sys.executable, str(driver), json.dumps(spec), *argv], capture_output=True, text=True, timeout=timeout, env=env
    )
    names = log.read_text().split() if log.exists() else []
    if kill_at is None:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr)
        assert len(names) == kill_at
    return res, names


@contextlib.contextmanager
def renames():
    """The names this process renames onto (os.replace) in the block, in order."""
    names, real = [], os.replace

    def replace(src, dst, *a, **kw):
        names.append(os.path.basename(os.fspath(dst)))
        return real(src, dst, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        yield names


def micro(seed: int, num_classes: int = 3) -> swinv2.SwinTransformerV2:
    torch.manual_seed(seed)
    return randomize_(swinv2.create_model(MICRO, num_classes=num_classes), seed, std=0.02).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text.strip(), text
    return text


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# Two models that differ in everything a reader takes from the unit: weights, classes, preprocessing.
A_CLASSES, B_CLASSES = ["ant", "bee", "cow"], ["dog", "eel", "fox"]
A_PREP = EvalPreprocess(32, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
B_PREP = EvalPreprocess(32, 1.0, "bilinear", (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """(model A, model B, B's self-describing .safetensors)."""
    tmp = tmp_path_factory.mktemp("models")
    a, b = micro(seed=1), micro(seed=2)
    b_file = tmp / "b.safetensors"
    save_weights(b, b_file, class_names=B_CLASSES, preprocess=B_PREP, model_name=MICRO)
    return a, b, b_file


# --------------------------------------------------------------------------- Hugging Face folders


def _write_a(folder: Path, a: torch.nn.Module) -> None:
    write_weights(a, folder, "hf", class_names=A_CLASSES, preprocess=A_PREP, model_name=MICRO)


def _read_back(folder: Path, a, b) -> str:
    """ "A", "B" or "refused": what `load_model(folder)` gives, asserting it is never a mix."""
    try:
        got = load_model(folder)
    except CheckpointError as e:
        msg = one_line(e)
        assert str(folder) in msg and "interrupted write" in msg and "write it again" in msg, msg
        return "refused"
    for name, model, classes, prep in (("A", a, A_CLASSES, A_PREP), ("B", b, B_CLASSES, B_PREP)):
        if same_weights(got, model):
            assert got.info.class_names == classes and got.info.preprocess == prep, f"{name}'s weights, mixed"
            return name
    raise AssertionError("the folder's weights are neither A's nor B's")


@pytest.mark.slow  # about 11 s
def test_hf_folder_killed_between_its_files_is_a_or_b_or_refused(tmp_path, two_models, capsys):
    """`swinv2 convert B.safetensors FOLDER --dst hf` over folder A, SIGKILLed at each of its renames."""
    a, b, b_file = two_models
    with renames() as clean:
        _write_a(tmp_path / "probe", a)
    assert clean == ["model.safetensors", "preprocessor_config.json", "config.json"]  # config.json last
    outcomes = {}
    for n in range(1, len(clean) + 1):
        folder = tmp_path / f"hf{n}"
        _write_a(folder, a)
        drive(tmp_path, ["convert", str(b_file), str(folder), "--dst", "hf"], kill_at=n)
        outcomes[n] = _read_back(folder, a, b)
        if outcomes[n] == "refused":  # every command refuses it the same way, in one line, exit 2
            assert cli.main(["convert", str(folder), str(tmp_path / f"out{n}.safetensors")]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and str(folder) in err and "interrupted write" in err
            assert not (tmp_path / f"out{n}.safetensors").exists()
        # Written again, completely: B, and the kill's temp file is gone.
        write_weights(load_model(b_file), folder, "hf")
        assert _read_back(folder, a, b) == "B" and temps(folder) == []
    # Killed before any rename: A as it was; after the weights (with or without the preprocessing): refused.
    assert outcomes == {1: "A", 2: "refused", 3: "refused"}


def test_a_new_folder_killed_after_its_weights_is_refused(tmp_path, two_models):
    """Into a new folder, killed after the weights: no config.json at all, so nothing says whose classes
    or preprocessing these are; refused even with --model, and by load_weights."""
    a, b, b_file = two_models
    folder = tmp_path / "new"
    drive(tmp_path, ["convert", str(b_file), str(folder), "--dst", "hf"], kill_at=2)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["model.safetensors"]
    for read in (lambda: load_model(folder, name=MICRO), lambda: swinv2.load_weights(micro(seed=0), folder)):
        with pytest.raises(CheckpointError, match="has no config.json beside it") as e:
            read()
        assert str(folder) in one_line(e.value) and "interrupted write" in str(e.value)


def test_a_transformers_folder_then_a_killed_write_is_refused(tmp_path, two_models, monkeypatch):
    """A folder transformers wrote (no write ids at all) loads as before; our write into it, killed after
    the weights, leaves weights with an id beside a config.json without one: refused."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b, b_file = two_models
    ours = tmp_path / "ours"
    _write_a(ours, a)
    theirs = tmp_path / "theirs"
    transformers.Swinv2ForImageClassification.from_pretrained(ours).save_pretrained(theirs)
    config = json.loads((theirs / "config.json").read_text())
    config.pop("swinv2")  # as if trained in transformers from the start: nothing of ours in the folder
    (theirs / "config.json").write_text(json.dumps(config))
    plain = load_model(theirs)
    assert same_weights(plain, a) and plain.info.class_names == A_CLASSES
    drive(tmp_path, ["convert", str(b_file), str(theirs), "--dst", "hf"], kill_at=2)
    with pytest.raises(CheckpointError, match="no write id") as e:
        load_model(theirs)
    assert str(theirs) in one_line(e.value) and "interrupted write" in str(e.value)


def test_our_folder_saved_again_by_transformers_still_loads(tmp_path, two_models, monkeypatch):
    """transformers keeps our "swinv2" block (write id included) in config.json but writes its own
    model.safetensors, without our metadata: that is a whole folder, not a torn one."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, _, _ = two_models
    ours, again = tmp_path / "ours", tmp_path / "again"
    _write_a(ours, a)
    transformers.Swinv2ForImageClassification.from_pretrained(ours).save_pretrained(again)
    assert json.loads((again / "config.json").read_text())["swinv2"]["unit_id"]
    from safetensors import safe_open

    with safe_open(again / "model.safetensors", framework="pt") as f:
        assert UNIT_KEY not in (f.metadata() or {})
    back = load_model(again)
    assert same_weights(back, a) and back.info.class_names == A_CLASSES and back.info.preprocess == A_PREP


def test_hf_folder_temp_files_of_a_kill_are_removed_by_the_next_write(tmp_path, two_models):
    a, b, b_file = two_models
    folder = tmp_path / "hf"
    _write_a(folder, a)
    _, names = drive(tmp_path, ["convert", str(b_file), str(folder), "--dst", "hf"], kill_at=1)
    left = temps(folder)
    assert len(left) == 1 and left[0].startswith(".model.safetensors.")  # the kill's
    (folder / ".notes.txt.abcd1234.tmp").write_text("not one of the folder's files")  # not ours to remove
    (folder / ".config.json.tmp").write_text("not our temp-name pattern")
    _write_a(folder, a)
    assert temps(folder) == [".config.json.tmp", ".notes.txt.abcd1234.tmp"]
    assert _read_back(folder, a, b) == "A"


def test_two_writers_of_one_folder_take_turns(tmp_path, two_models, monkeypatch):
    """A writes its weights and stops before its config.json; B starts writing meanwhile. B waits for A
    (the folder's lock), so the two never interleave (A's weights, B's..., A's config.json would be a
    folder refused for good) and the folder ends as B, whole."""
    import swinv2.weights.files as C

    a, b, _ = two_models
    folder = tmp_path / "hf"
    _write_a(folder, a)
    a_paused, a_go = threading.Event(), threading.Event()
    real = C.atomic_write

    def atomic_write(path, write):
        if Path(path).name == "config.json" and threading.current_thread().name == "A":
            a_paused.set()
            assert a_go.wait(30)
        return real(path, write)

    monkeypatch.setattr(C, "atomic_write", atomic_write)
    errors = []

    def writer(model, classes, prep):
        try:
            write_weights(model, folder, "hf", class_names=classes, preprocess=prep, model_name=MICRO)
        except BaseException as e:  # reported below
            errors.append(e)

    ta = threading.Thread(target=writer, args=(a, A_CLASSES, A_PREP), name="A")
    tb = threading.Thread(target=writer, args=(b, B_CLASSES, B_PREP), name="B")
    ta.start()
    assert a_paused.wait(30)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    tb.start()
    tb.join(1.0)
    assert tb.is_alive() and (folder / "model.safetensors").stat().st_mtime_ns == written  # B waits
    a_go.set()
    ta.join(30)
    tb.join(30)
    assert not errors and not ta.is_alive() and not tb.is_alive()
    assert _read_back(folder, a, b) == "B"


# --------------------------------------------------------------------------- ONNX graph + sidecar


def _onnx_read_back(graph: Path, a, b) -> str:
    """ "A", "B" or "refused" for an exported graph read with its sidecar (`export.read_sidecar`)."""
    import onnxruntime as ort

    from swinv2.serve.export import read_sidecar

    try:
        side = read_sidecar(graph)
    except CheckpointError as e:
        msg = one_line(e)
        assert str(graph) in msg and "interrupted write" in msg, msg
        return "refused"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    (got,) = session.run(None, {"images": x.numpy()})
    for name, model, classes in (("A", a, A_CLASSES), ("B", b, B_CLASSES)):
        with torch.no_grad():
            if np.abs(got - model(x).numpy()).max() <= 1e-4:
                assert side["class_names"] == classes, f"{name}'s graph with the other's sidecar"
                return name
    raise AssertionError("the graph is neither A's nor B's")


@pytest.mark.slow  # about 15 s
def test_onnx_graph_and_sidecar_killed_between_them(tmp_path, two_models):
    pytest.importorskip("onnxruntime")
    from swinv2.serve.export import UNIT_KEY as GRAPH_KEY
    from swinv2.serve.export import export_onnx, graph_metadata

    a, b, b_file = two_models
    a_file = tmp_path / "a.safetensors"
    save_weights(a, a_file, class_names=A_CLASSES, preprocess=A_PREP, model_name=MICRO)
    described = load_model(a_file)
    graph = tmp_path / "m.onnx"
    with renames() as clean:
        export_onnx(described, graph)
    assert clean == ["m.onnx", "m.onnx.json"]  # the sidecar last
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert graph_metadata(graph)[GRAPH_KEY] == side["unit_id"]  # the pair carries one id
    argv = ["export", "--weights", str(b_file), "--onnx", str(graph), "--no-check"]
    drive(tmp_path, argv, kill_at=1)  # before the graph's rename: A as it was, B's graph left as a temp file
    assert _onnx_read_back(graph, a, b) == "A"
    (left,) = temps(tmp_path)
    assert left.startswith(".m.onnx.")
    drive(tmp_path, argv, kill_at=2)  # after it, before the sidecar's: B's graph, A's sidecar
    assert _onnx_read_back(graph, a, b) == "refused"
    (left,) = temps(tmp_path)  # the first kill's was removed by this export, this one's is the sidecar's
    assert left.startswith(".m.onnx.json.")
    export_onnx(load_model(b_file), graph, check=False)  # exported again: B, whole, and no temp file left
    assert _onnx_read_back(graph, a, b) == "B" and temps(tmp_path) == []
    # A sidecar from before write ids, beside a graph with one: the sidecar is older than the graph.
    stale = json.loads((tmp_path / "m.onnx.json").read_text())
    del stale["unit_id"]
    (tmp_path / "m.onnx.json").write_text(json.dumps(stale))
    assert _onnx_read_back(graph, a, b) == "refused"


def test_graph_metadata_reads_what_onnx_reads():
    onnx = pytest.importorskip("onnx")
    import tempfile

    from swinv2.serve.export import add_graph_metadata, graph_metadata

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        m = onnx.helper.make_model(g)
        onnx.helper.set_model_props(m, {"producer.note": "é" * 300})
        onnx.save(m, path)
        add_graph_metadata(path, {"swinv2.unit_id": "0123abcd"})
        back = onnx.load(path)
        onnx.checker.check_model(back)
        assert {p.key: p.value for p in back.metadata_props} == graph_metadata(path)
        assert graph_metadata(path) == {"producer.note": "é" * 300, "swinv2.unit_id": "0123abcd"}
        raw = path.read_bytes()
        path.write_bytes(raw[:-5])  # torn in the last entry
        with pytest.raises(CheckpointError, match="not a complete ONNX graph"):
            graph_metadata(path)


# --------------------------------------------------------------------------- the runtime's export cache


def _logits(rt, model) -> float:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float((rt(x) - model(x)).abs().max())


@pytest.mark.slow  # about 30 s
def test_export_cache_killed_at_each_rename_runs_the_current_weights(tmp_path, two_models):
    """`swinv2 export --weights W --runtime onnxruntime` after W was retrained in place, killed at each
    rename of the cache entry (graph, sidecar, key); the next use runs W's weights, never the old
    graph, and removes what the kill left."""
    pytest.importorskip("onnxruntime")
    from swinv2.serve import runtime as R

    a, b, _ = two_models
    weights = tmp_path / "w.safetensors"
    root = tmp_path / "w.safetensors.exports"
    argv = ["export", "--weights", str(weights), "--runtime", "onnxruntime"]
    save_weights(a, weights)
    with renames() as clean:
        R.load_runtime(load_model(weights), "onnxruntime", "fp32", weights=weights)
    assert clean == ["32px-fp32.onnx", "32px-fp32.onnx.json", "32px-fp32.onnx.key.json"]  # the key last
    for n, new in enumerate((b, a, b), start=1):
        save_weights(new, weights)  # retrained in place since the entry was made
        _, names = drive(tmp_path, argv, kill_at=n)
        assert names == clean[:n]
        if n == 1:
            assert [p.startswith(".32px-fp32.onnx.") for p in temps(root)] == [True]
        rt = R.load_runtime(load_model(weights), "onnxruntime", "fp32", weights=weights)
        assert _logits(rt, new) <= 1e-4 and temps(root) == []


@pytest.mark.slow  # about 8 s
def test_export_cache_entry_of_another_write_is_made_again(tmp_path, two_models, caplog):
    """A graph (and sidecar) of another write beside an entry's key, e.g. a second process's write that
    interleaved, or a copy by hand: the key's binding catches it, the graph is made again."""
    pytest.importorskip("onnxruntime")
    import logging
    import shutil

    from swinv2.serve import runtime as R

    a, b, _ = two_models
    R.load_runtime(a, "onnxruntime", "fp32", cache_dir=tmp_path / "x")
    R.load_runtime(b, "onnxruntime", "fp32", cache_dir=tmp_path / "y")
    (ga,) = (tmp_path / "x").rglob("32px-fp32.onnx")
    (gb,) = (tmp_path / "y").rglob("32px-fp32.onnx")
    for files in (("32px-fp32.onnx",), ("32px-fp32.onnx", "32px-fp32.onnx.json")):
        for name in files:  # B's graph (and its sidecar) under A's key
            shutil.copy(gb.with_name(name), ga.with_name(name))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="swinv2.serve.runtime"):
            rt = R.load_runtime(a, "onnxruntime", "fp32", cache_dir=tmp_path / "x")
        assert _logits(rt, a) <= 1e-4
        assert any("does not match its key" in r.getMessage() and str(ga) in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- the Hugging Face download cache


HUB_SETUP = """
from huggingface_hub import constants
from huggingface_hub import file_download
import swinv2.weights.hub as H
hub_spec = spec["hub_spec"]
constants.ENDPOINT = hub_spec["url"]
constants.HUGGINGFACE_CO_URL_TEMPLATE = hub_spec["url"] + "/{repo_id}/resolve/{revision}/{filename}"
constants.HF_HUB_CACHE = hub_spec["cache"]
constants.AGENT_HARNESSES_PATH = hub_spec["cache"] + "/../.agent_harnesses.json"
rec = H.WeightsRecord(variant="swinv2_micro_window4_32", tag="torn", arch="swinv2_micro_window4_32", classes="test",
                      num_classes=10, top1=None, files=(H.HubFile(hub_spec["repo"], "model.safetensors", "timm"),),
                      official_url="https://example.invalid/micro.pth")
H.RECORDS["swinv2_micro_window4_32"] = (rec,)
_http_get = file_download.http_get

def http_get(url, temp_file, *a, **kw):  # half the file written and flushed, then killed
    import io, os, signal
    buf = io.BytesIO()
    _http_get(url, buf, *a, **kw)
    temp_file.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    temp_file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

file_download.http_get = http_get
"""


def test_a_download_killed_leaves_a_partial_removed_once_no_download_holds_it(tmp_path, monkeypatch):
    from filelock import FileLock
    from safetensors.torch import save as safetensors_bytes

    from swinv2.weights.convert import convert_state_dict
    from test_hub import FakeHub, _point_hub_at

    server = FakeHub()
    try:
        cache = tmp_path / "hf" / "hub"
        _point_hub_at(monkeypatch, server.url, cache)
        repo = "timm/micro.torn"
        data = safetensors_bytes(
            {
                k: v.contiguous()
                for k, v in convert_state_dict(micro(seed=4, num_classes=10).state_dict(), dst="timm").items()
            },
            metadata={"format": "pt"},
        )
        server.add(repo, "model.safetensors", data)
        rec = hub.WeightsRecord(
            variant=MICRO,
            tag="torn",
            arch=MICRO,
            classes="test",
            num_classes=10,
            top1=None,
            files=(hub.HubFile(repo, "model.safetensors", "timm"),),
            official_url="https://example.invalid/micro.pth",
        )
        monkeypatch.setitem(hub.RECORDS, MICRO, (rec,))
        driver, log = tmp_path / "driver.py", tmp_path / "replaces.log"
        driver.write_text(DRIVER)
        spec = {"log": str(log), "hub": HUB_SETUP, "hub_spec": {"url": server.url, "cache": str(cache), "repo": repo}}
        env = {
            **os.environ,
            "HF_HOME": str(tmp_path / "hf"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
        }
        env.pop("HF_HUB_CACHE", None)
        res = subprocess.run(
            [sys.executable, str(driver), json.dumps(spec), "download", f"{MICRO}.torn"],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert res.returncode == -signal.SIGKILL, res.stderr
        blobs = cache / "models--timm--micro.torn" / "blobs"
        (partial,) = blobs.glob("*.incomplete")
        assert 0 < partial.stat().st_size < len(data) and not hub.is_cached(rec)
        etag = partial.name.split(".")[0]
        # At once: it could be a download in progress on a filesystem without working locks: kept.
        assert hub.fetch(rec).read_bytes() == data and partial.exists()
        # Its lock held (a download of that blob in progress, here or in another process): kept, however old.
        old = time.time() - 2 * hub.STALE_AFTER_S
        os.utime(partial, (old, old))
        lock = FileLock(cache / ".locks" / "models--timm--micro.torn" / f"{etag}.lock")
        with lock:
            assert hub.fetch(rec).read_bytes() == data and partial.exists()
        # Lock free and unwritten for long enough: what a killed download left, removed by the next use.
        assert hub.fetch(rec).read_bytes() == data and not partial.exists()
        assert [p.name for p in blobs.iterdir()] == [etag]
    finally:
        server.close()
