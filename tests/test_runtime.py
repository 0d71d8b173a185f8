"""runtime: ONNX Runtime and OpenVINO reproduce PyTorch in fp32 at two batch sizes; bf16 and int8 keep
the top-1 of a trained model; a missing package, an unsupported precision and a stale cached export
each give one clear line.

OpenVINO and NNCF are an optional extra (`pip install 'swinv2[openvino]'`); the tests that need them
skip where they are not installed (`.[dev]` installs onnxruntime only)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import swinv2
from swinv2.cli import main
from swinv2.serve import runtime as R
from swinv2.weights.files import save_weights
from swinv2.weights.registry import EvalPreprocess, ModelInfo

MICRO = "swinv2_micro_window4_32"
ONNX_RUNTIMES = [
    pytest.param(r, marks=pytest.mark.skipif(not R.installed(r), reason=f"{r} not installed"))
    for r in ("onnxruntime", "openvino")
]


@pytest.mark.parametrize("name", ONNX_RUNTIMES)
def test_fp32_reproduces_pytorch_at_two_batch_sizes(tmp_path, name, make_micro):
    model = make_micro(10).eval()
    rt = R.load_runtime(model, name, "fp32", cache_dir=tmp_path)
    assert rt.name == name and rt.path.endswith("32px-fp32.onnx")
    for batch in (1, 5):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)) * 4 - 2
        with torch.no_grad():
            expected = model(x)
        assert expected.abs().max() > 0.1  # real logits, so that 1e-4 means something
        got = rt(x)
        assert got.shape == (batch, 10) and got.dtype == torch.float32
        assert (got - expected).abs().max() <= 1e-4
        assert (rt(x.numpy()) - expected).abs().max() <= 1e-4  # numpy in, the same
    with pytest.raises(ValueError, match="fixed at 32x32 px"):
        rt(torch.zeros(1, 3, 48, 48))
    if name == "openvino":  # what OpenVINO compiled is kept beside the graph for the next load
        assert any((Path(rt.path).parent / "openvino-compiled").iterdir())


def test_torch_runtime_fp32_is_the_model_itself(tmp_path, make_micro):
    model = make_micro(10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(R.load_runtime(model, "torch", "fp32")(x), model(x))


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, capsys, make_micro):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert not R.installed("openvino")
    with pytest.raises(R.RuntimeUnavailable, match=r"pip install 'swinv2\[openvino\]'"):
        R.load_runtime(make_micro(10).eval(), "openvino", "fp32", cache_dir=tmp_path)
    weights = tmp_path / "w.safetensors"
    save_weights(make_micro(10).eval(), weights)
    assert main(["predict", "--weights", str(weights), "--runtime", "openvino", str(tmp_path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("swinv2 predict: error:") and "pip install 'swinv2[openvino]'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # nothing exported


@pytest.mark.parametrize(
    "runtime, precision, says",
    [
        ("onnxruntime", "bf16", "no bf16 kernels"),
        ("torch", "int8", "not supported by --runtime torch"),
        ("onnxruntime", "fp16", "unknown precision"),
    ],
)
def test_an_unsupported_precision_is_one_line(tmp_path, runtime, precision, says, make_micro):
    if runtime != "torch":
        pytest.importorskip(runtime)
    with pytest.raises(R.RuntimeUnavailable, match=says) as e:
        R.load_runtime(make_micro(10).eval(), runtime, precision, cache_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_bf16_is_refused_where_the_cpu_would_emulate_it(tmp_path, monkeypatch, capsys, make_micro):
    monkeypatch.setattr(R, "native_bf16", lambda runtime: False)
    weights = tmp_path / "w.safetensors"
    save_weights(make_micro(10).eval(), weights)
    assert (
        main(["eval", "--weights", str(weights), "--data", str(tmp_path), "--runtime", "torch", "--precision", "bf16"])
        == 2
    )
    assert "no native bf16 (AVX-512 BF16 or AMX)" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ONNX_RUNTIMES)
def test_a_stale_cached_export_is_detected_and_made_again(tmp_path, name, caplog, make_micro):
    weights = tmp_path / "w.safetensors"
    first = make_micro(10, seed=0).eval()
    save_weights(first, weights)
    rt = R.load_runtime(swinv2.load_model(weights), name, "fp32", weights=weights)
    graph = tmp_path / "w.safetensors.exports" / "32px-fp32.onnx"
    assert rt.path == str(graph)
    key = json.loads(graph.with_name(graph.name + ".key.json").read_text())
    assert key["sha256"] == R.weights_sha256(first) and key["img_size"] == 32 and key["precision"] == "fp32"

    # Unchanged weights: the cached graph is used, not made again.
    mtime = graph.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="swinv2.serve.runtime"):
        R.load_runtime(swinv2.load_model(weights), name, "fp32", weights=weights)
    assert graph.stat().st_mtime_ns == mtime and "stale" not in caplog.text

    # Retrained in place: one warning line names the stale export; the new graph runs the new weights.
    second = make_micro(10, seed=1).eval()
    save_weights(second, weights)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="swinv2.serve.runtime"):
        rt = R.load_runtime(swinv2.load_model(weights), name, "fp32", weights=weights)
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and str(graph) in stale[0] and "weights changed" in stale[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (rt(x) - second(x)).abs().max() <= 1e-4
    assert json.loads(graph.with_name(graph.name + ".key.json").read_text())["sha256"] == R.weights_sha256(second)


def _ort_logits(graph: Path, x: torch.Tensor) -> torch.Tensor:
    """The graph file run by a fresh ONNX Runtime session, outside the cache's checks."""
    import onnxruntime as ort

    run = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return torch.from_numpy(run.run(None, {run.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.slow  # about 17 s; the cache key's binding of the files' hashes is tested in make test
def test_a_tampered_export_cache_entry_is_made_again_never_run(tmp_path, caplog, make_micro):
    """W.safetensors.exports/32px-fp32.onnx replaced behind the key's back, in each way the export id
    alone does not or does catch: another model's graph given the entry's id, one byte of a weight
    changed, another model's graph with its own id or with none, another cache's whole entry. Each
    time: one warning naming the graph, the graph made again, and what runs is the weights' model."""
    pytest.importorskip("onnxruntime")
    from swinv2.serve.export import (
        _MODEL_METADATA_PROPS,
        UNIT_KEY,
        _field,
        add_graph_metadata,
        export_onnx,
        graph_metadata,
        read_sidecar,
    )

    a, b = make_micro(10, seed=0).eval(), make_micro(10, seed=1).eval()
    weights = tmp_path / "W.safetensors"
    save_weights(a, weights)
    graph = tmp_path / "W.safetensors.exports" / "32px-fp32.onnx"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 4 - 2
    with torch.no_grad():
        want, other = a(x), b(x)
    assert (want - other).abs().max() > 0.1  # the two models' logits are told apart by the 1e-4 below

    # B exported by our exporter (its own id), and B's graph with its id entry cut off (no id at all).
    export_onnx(b, tmp_path / "b.onnx", check=False)
    b_raw = (tmp_path / "b.onnx").read_bytes()
    b_id = graph_metadata(tmp_path / "b.onnx")[UNIT_KEY]
    id_entry = _field(_MODEL_METADATA_PROPS, _field(1, UNIT_KEY.encode()) + _field(2, b_id.encode()))
    assert b_raw.endswith(id_entry)
    R.load_runtime(b, "onnxruntime", "fp32", cache_dir=tmp_path / "b-cache")
    (b_entry,) = (tmp_path / "b-cache").rglob("32px-fp32.onnx")

    def b_with_the_entrys_id(g: Path) -> None:
        entry_id = graph_metadata(g)[UNIT_KEY]
        g.write_bytes(b_raw)
        add_graph_metadata(g, {UNIT_KEY: entry_id})  # a later entry wins: the graph now reads as the entry's
        read_sidecar(g)  # the id check alone passes it

    def one_byte_of_the_head_bias(g: Path) -> None:
        raw = bytearray(g.read_bytes())
        at = raw.find(a.head.bias.detach().numpy().tobytes())
        assert at > 0
        raw[at + 3] ^= 0x40  # the sign-and-exponent byte of the first class's bias
        g.write_bytes(bytes(raw))
        assert (_ort_logits(g, x)[:, 0] - want[:, 0]).abs().min() > 1  # it would run, and be wrong

    def b_with_its_own_id(g: Path) -> None:
        g.write_bytes(b_raw)

    def b_with_no_id(g: Path) -> None:
        g.write_bytes(b_raw[: -len(id_entry)])
        assert UNIT_KEY not in graph_metadata(g)

    def another_caches_whole_entry(g: Path) -> None:
        for suffix in ("", ".json", ".key.json"):
            Path(str(g) + suffix).write_bytes(Path(str(b_entry) + suffix).read_bytes())

    R.load_runtime(swinv2.load_model(weights), "onnxruntime", "fp32", weights=weights)
    for tamper, says in (
        (b_with_the_entrys_id, "is not the file its key was written with"),
        (one_byte_of_the_head_bias, "is not the file its key was written with"),
        (b_with_its_own_id, "come from different exports"),
        (b_with_no_id, "is not the file its key was written with"),
        (another_caches_whole_entry, "the weights changed"),
    ):
        tamper(graph)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="swinv2.serve.runtime"):
            rt = R.load_runtime(swinv2.load_model(weights), "onnxruntime", "fp32", weights=weights)
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and str(graph) in warned[0] and says in warned[0], (tamper.__name__, warned)
        assert (rt(x) - want).abs().max() <= 1e-4, tamper.__name__
        assert (_ort_logits(graph, x) - want).abs().max() <= 1e-4, tamper.__name__  # the file itself made again


def test_the_export_cache_key_names_the_exporter_and_binds_the_files_hashes(tmp_path, caplog, make_micro):
    """A graph exported by another torch (or another version of our export code) is made again, as is
    an entry whose key predates the files' hashes; an entry that matches is used as it is."""
    pytest.importorskip("onnxruntime")
    import torch as torch_

    model = make_micro(10).eval()
    R.load_runtime(model, "onnxruntime", "fp32", cache_dir=tmp_path)
    (graph,) = tmp_path.rglob("32px-fp32.onnx")
    key_path = graph.with_name(graph.name + ".key.json")
    key = json.loads(key_path.read_text())
    assert key["exporter"] == {
        "torch": torch_.__version__,
        "swinv2": swinv2.__version__,
        "format": R.EXPORT_FORMAT,
        "opset": 17,
    }
    assert set(key["bound"]["sha256"]) == {"32px-fp32.onnx", "32px-fp32.onnx.json"}
    for edit, says in (
        (lambda k: k["exporter"].update(torch="2.0.0"), "other settings (exporter)"),
        (lambda k: k["bound"].pop("sha256"), "binds no file hashes"),
    ):
        old = json.loads(key_path.read_text())
        edit(old)
        key_path.write_text(json.dumps(old))
        mtime = graph.stat().st_mtime_ns
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="swinv2.serve.runtime"):
            R.load_runtime(model, "onnxruntime", "fp32", cache_dir=tmp_path)
        assert graph.stat().st_mtime_ns != mtime and says in caplog.text
        remade = json.loads(key_path.read_text())
        assert remade.pop("bound")["sha256"] and remade == {k: v for k, v in key.items() if k != "bound"}
    mtime = graph.stat().st_mtime_ns
    R.load_runtime(model, "onnxruntime", "fp32", cache_dir=tmp_path)
    assert graph.stat().st_mtime_ns == mtime


def test_weights_hash_follows_the_tensors(make_micro):
    a, b = make_micro(10, seed=0).eval(), make_micro(10, seed=0).eval()
    assert R.weights_sha256(a) == R.weights_sha256(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-6
    assert R.weights_sha256(a) != R.weights_sha256(b)


# --------------------------------------------------------------------------- a trained model: bf16 and int8

COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}


def _write_set(root, n: int, rng: np.random.Generator) -> None:
    """n 32x32 PNGs per class: the class's colour (0.3) plus a random colour cast (0..0.4 per channel)
    plus pixel noise (0..0.3). A cast can outweigh the tint, so some images are near-ties: a model
    cannot be sure of all of them, and a sloppy int8 / bf16 path would flip those."""
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = 0.3 * np.array(rgb) + 0.4 * rng.random(3) + 0.3 * rng.random((32, 32, 3))
            Image.fromarray((255 * img).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_micro):
    """A micro SwinV2 trained (40 Adam steps, seeded; ~97% val top-1) to tell the tints apart, and its
    image folders."""
    from swinv2.images import eval_transform, load_image

    root = tmp_path_factory.mktemp("tints")
    rng = np.random.default_rng(0)
    _write_set(root / "train", 40, rng)
    _write_set(root / "val", 30, rng)
    model = make_micro(3, randomized=False)
    torch.manual_seed(0)  # drop path draws from the global stream, which no test has seeded yet here
    transform = eval_transform(32, 1.0)
    classes = list(COLOURS)
    xs = torch.stack([transform(load_image(p)) for c in classes for p in sorted((root / "train" / c).iterdir())])
    ys = torch.tensor([i for i, c in enumerate(classes) for _ in range(40)])
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, len(xs), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.info = ModelInfo(preprocess=EvalPreprocess(32, 1.0))
    weights = root / "w.safetensors"
    save_weights(model, weights, class_names=classes)
    return weights, root


def _eval(weights, root, tmp_path, *args) -> dict:
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--weights",
                str(weights),
                "--data",
                str(root / "val"),
                "--compare-fp32",
                "--json",
                str(out),
                *args,
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def _int8_ops(graph: Path) -> dict[str, bool]:
    """Each linear and attention product of an int8 graph (its names) -> whether it runs in int8.
    OpenVINO: the precision each op of the compiled graph runs in, as the CPU plugin reports it.
    ONNX Runtime: every input comes out of a DequantizeLinear (its CPU provider then fuses the op into
    an int8 kernel)."""
    if graph.suffix == ".xml":
        import openvino as ov

        compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        ops = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if rt["layerType"].astype(str) in ("Convolution", "MatMul", "FullyConnected"):
                name = f"{op.get_friendly_name()},{rt['originalLayersNames'].astype(str)}"
                ops[name] = rt["runtimePrecision"].astype(str) in ("u8", "i8")
        return ops
    import onnx

    nodes = onnx.load(graph, load_external_data=False).graph.node
    made_by = {o: n.op_type for n in nodes for o in n.output}
    return {
        n.name: all(made_by.get(i) == "DequantizeLinear" for i in n.input)
        for n in nodes
        if n.op_type in ("Conv", "MatMul", "Gemm")
    }


@pytest.mark.parametrize("name", ONNX_RUNTIMES)
def test_int8_keeps_the_top1_of_a_trained_model(trained, tmp_path, capsys, name):
    if name == "openvino":
        pytest.importorskip("nncf")
    weights, root = trained
    cache = str(tmp_path / "cache")
    report = _eval(
        weights,
        root,
        tmp_path,
        "--runtime",
        name,
        "--precision",
        "int8",
        "--calib",
        str(root / "train"),
        "--cache-dir",
        cache,
    )
    ref = report["fp32"]
    assert ref["top1"] >= 90  # the model did learn the tints
    # 90 val images: one image is 1.1 points. int8 may move images near the decision boundary only.
    assert ref["top1_agreement"] >= 95 and abs(ref["top1_delta"]) <= 3.4
    assert report["runtime"] == name and report["precision"] == "int8"
    assert "top-1 agreement" in capsys.readouterr().out
    # The quantised graph is cached: a second run needs no --calib.
    report = _eval(weights, root, tmp_path, "--runtime", name, "--precision", "int8", "--cache-dir", cache)
    assert report["fp32"]["top1_agreement"] == ref["top1_agreement"]
    # The first and the last layer stay fp32, the blocks' linears and attention products run in int8,
    # and the position bias is a constant: no CPB MLP is left to quantise.
    (graph,) = (tmp_path / "cache").rglob(R.INT8_FILES[name].format(size=32))
    ops = _int8_ops(graph)
    kept = {n: q for n, q in ops.items() if "patch_embed/proj" in n or "/head/" in n or n.startswith("logits")}
    assert len(kept) == 2 and not any(kept.values()), kept
    blocks = {n: q for n, q in ops.items() if "/blocks." in n}
    assert not [n for n in blocks if "cpb_mlp" in n]
    # 4 blocks x (qkv, proj, fc1, fc2, q·kᵀ, attn·v) at least
    assert len(blocks) >= 24 and all(blocks.values()), blocks


@pytest.mark.parametrize("name", ONNX_RUNTIMES)
def test_int8_without_calibration_images_is_one_line(trained, tmp_path, capsys, name):
    weights, root = trained
    assert (
        main(
            [
                "eval",
                "--weights",
                str(weights),
                "--data",
                str(root / "val"),
                "--runtime",
                name,
                "--precision",
                "int8",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 2
    )
    assert "--calib DIR" in _one_line(capsys.readouterr().err)
    assert not list((tmp_path / "cache").rglob("*int8*"))  # nothing half-made


@pytest.mark.parametrize("name", ["openvino", "torch"])
def test_bf16_keeps_the_top1_of_a_trained_model(trained, tmp_path, name):
    if name == "openvino":
        pytest.importorskip("openvino")
    if not R.native_bf16(name):
        pytest.skip("this CPU has no native bf16")
    weights, root = trained
    report = _eval(
        weights, root, tmp_path, "--runtime", name, "--precision", "bf16", "--cache-dir", str(tmp_path / "cache")
    )
    # bf16 keeps 8 bits of mantissa: logits move by ~1e-2, so only near-ties may flip.
    assert report["fp32"]["top1_agreement"] >= 97 and abs(report["fp32"]["top1_delta"]) <= 2.3
    assert report["fp32"]["max_abs_logit_diff"] < 0.5


def test_auto_picks_an_installed_runtime_and_says_which(trained, tmp_path):
    weights, _ = trained
    model = swinv2.load_model(weights)
    rt = R.load_runtime(model, "auto", "fp32", cache_dir=tmp_path, batch_size=2)
    assert rt.name in [r for r in R.RUNTIMES if R.installed(r)] and "auto picked" in rt.note and "now" in rt.note
    memo = json.loads((tmp_path / "runtime-auto.json").read_text())
    assert [v["pick"] for v in memo.values()] == [rt.label]
    again = R.load_runtime(model, "auto", "fp32", cache_dir=tmp_path, batch_size=2)  # remembered, not re-timed
    assert again.name == rt.name and "measured" in again.note and "now" not in again.note


def test_auto_int8_weighs_every_runtime_and_setting_and_keeps_the_fastest_measured(trained, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("onnxruntime")
    weights, root = trained
    model = swinv2.load_model(weights)
    rt = R.load_runtime(model, "auto", "int8", calib=root / "train", cache_dir=tmp_path, batch_size=8)
    (record,) = json.loads((tmp_path / "runtime-auto.json").read_text()).values()
    rates = record["img_per_s"]
    expected = {"onnxruntime", "openvino"} | ({"openvino x2 streams"} if R.auto_streams() > 1 else set())
    assert set(rates) == expected  # torch has no int8
    assert record["pick"] == rt.label == max(rates, key=rates.__getitem__)
    assert rt.note.startswith(f"auto picked {rt.label}: ") and all(name in rt.note for name in rates)
    # The CLI's int8 without --runtime is that choice, remembered (eval times batches of 8 too).
    report = _eval(weights, root, tmp_path, "--precision", "int8", "--cache-dir", str(tmp_path))
    assert report["runtime"] == rt.name and report["precision"] == "int8"


def test_openvino_streams_split_the_batch_and_give_the_same_logits(tmp_path, make_micro):
    pytest.importorskip("openvino")
    model = make_micro(10).eval()
    one = R.load_runtime(model, "openvino", "fp32", cache_dir=tmp_path)
    two = R.load_runtime(model, "openvino", "fp32", cache_dir=tmp_path, streams=2)
    assert two.label == "openvino x2 streams" and "x2 streams" in two.describe()
    for batch in (1, 2, 5):  # a batch of one has one part; an odd batch, parts of 3 and 2
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        assert two(x).shape == (batch, 10)
        assert (two(x) - expected).abs().max() <= 1e-4 and (two(x) - one(x)).abs().max() <= 1e-4


def test_export_into_the_cache_then_eval_uses_it(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    weights, root = trained
    cache = tmp_path / "cache"
    assert main(["export", "--weights", str(weights), "--cache-dir", str(cache)]) == 0
    assert "ready for swinv2 eval / predict --runtime onnxruntime --precision fp32" in capsys.readouterr().out
    assert len(list(cache.glob("exports/*/32px-fp32.onnx"))) == 1
    assert main(["export", "--weights", str(weights), "--onnx", str(tmp_path / "m.onnx"), "--precision", "int8"]) == 2
    assert "drop --onnx" in _one_line(capsys.readouterr().err)


def test_bench_times_the_runtimes_as_rows_of_the_same_table(tmp_path, caplog):
    from swinv2.tools import bench

    names = [r for r in ("onnxruntime", "openvino") if R.installed(r)]
    if not names:
        pytest.skip("no ONNX runtime installed")
    with caplog.at_level(logging.WARNING, logger="swinv2.tools.bench"):
        results = bench.run(
            MICRO,
            batch_sizes=(2,),
            compare=["timm", *names],
            precisions=("fp32", "bf16"),
            repeats=2,
            iters=1,
            warmup=1,
            measure_memory=False,
            runtime_cache=tmp_path,
        )
    rows = {r["impl"]: r for r in results}
    if "onnxruntime" in names:  # no bf16 kernels there: a warning, no row
        assert "onnxruntime/bf16" not in rows and "onnxruntime/bf16 skipped" in caplog.text
    for name in names:
        row = rows[f"{name}/fp32"]
        assert row["dtype"] == "fp32" and row["max_abs_diff"] <= 1e-4 and row["img_per_s"] > 0
        assert row["ours_speedup_min"] <= row["ours_speedup"] <= row["ours_speedup_max"]
        assert row["peak_mem_bytes"] is None
    assert list(rows)[:2] == ["ours", "timm"] and f"{names[0]}/fp32" in bench.format_table(results)
    with pytest.raises(ValueError, match="CPU inference only"):
        bench.run(MICRO, compare=names, train=True, runtime_cache=tmp_path)


@pytest.mark.parametrize("name", ONNX_RUNTIMES)
def test_predict_through_a_runtime_with_loader_workers_matches_pytorch(trained, tmp_path, capsys, name):
    weights, root = trained
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths = [str(root / "val" / "red"), str(root / "val" / "blue"), str(tmp_path / "bad.png")]
    assert main(["predict", "--weights", str(weights), "--json", "--batch-size", "7", *paths]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "predict",
                "--weights",
                str(weights),
                "--json",
                "--batch-size",
                "7",
                "--workers",
                "2",
                "--runtime",
                name,
                "--cache-dir",
                str(tmp_path / "cache"),
                *paths,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert [r["path"] for r in got["results"]] == [r["path"] for r in expected["results"]] and len(got["results"]) == 60
    for g, e in zip(got["results"], expected["results"]):
        assert [t["index"] for t in g["top"]] == [t["index"] for t in e["top"]]
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(g["top"], e["top"])) <= 1e-5
    assert [e["path"] for e in got["errors"]] == [str(tmp_path / "bad.png")]
    assert "60 images in" in err and "img/s for the whole command" in err and f"{name} fp32" in err


def test_a_failed_export_leaves_no_cache_entry(tmp_path, monkeypatch, make_micro):
    pytest.importorskip("onnxruntime")
    import swinv2.serve.export

    def broken(model, path, **kw):
        path.write_bytes(b"half a graph")  # what an interrupted export could leave under the final name
        raise OSError("disk full")

    monkeypatch.setattr(swinv2.serve.export, "export_onnx", broken)
    with pytest.raises(OSError, match="disk full"):
        R.load_runtime(make_micro(10).eval(), "onnxruntime", "fp32", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.key.json"))  # no key: the half graph is never used...
    monkeypatch.undo()
    model = make_micro(10).eval()
    rt = R.load_runtime(model, "onnxruntime", "fp32", cache_dir=tmp_path)  # ...but made again
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (rt(x) - model(x)).abs().max() <= 1e-4


# A child process: an OpenVINO runtime is built on the main thread and freed on another, then the
# process forks with a SIGCHLD handler installed (as a DataLoader with workers does).
_FREED_ELSEWHERE_THEN_FORK = """
import gc, signal, subprocess, sys, tempfile, threading
import torch
import swinv2
from swinv2.serve.runtime import load_runtime
signal.signal(signal.SIGCHLD, lambda *a: None)
model = swinv2.create_model("swinv2_micro_window4_32", num_classes=3).eval()
held = {"rt": load_runtime(model, "openvino", "fp32", cache_dir=tempfile.mkdtemp())}
held["rt"](torch.zeros(1, 3, 32, 32))
thread = threading.Thread(target=lambda: (held.clear(), gc.collect()))
thread.start(); thread.join()
print(subprocess.run([sys.executable, "-c", "print('child ok')"], capture_output=True, text=True).stdout.strip())
"""


@pytest.mark.slow  # about 9 s
def test_openvino_freed_on_another_thread_then_fork_survives():
    """OpenVINO's CPU plugin swaps the thread's signal stack and, torn down on another thread, left the
    main thread's pointing at freed memory: the next SIGCHLD killed the process (SIGSEGV)."""
    import subprocess

    pytest.importorskip("openvino")
    done = subprocess.run(
        [sys.executable, "-c", _FREED_ELSEWHERE_THEN_FORK], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.strip().endswith("child ok")


def test_auto_times_each_runtime_in_blocks_of_its_own():
    """Each runtime's calls run back to back (warm-up then timed), in two passes of reversed order,
    so one runtime's spinning thread pool is not charged to the next; the faster one rates higher."""
    import time

    order = []

    def fake(name, seconds):
        def infer(x):
            order.append(name)
            time.sleep(seconds)
            return torch.zeros(x.shape[0], 10)

        return infer

    runtimes = {"a": fake("a", 0.001), "b": fake("b", 0.05)}
    rates = R.time_runtimes(runtimes, torch.zeros(4, 3, 8, 8), passes=2, calls=3, warmup=1, settle_s=0.0)
    assert order == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4
    assert rates["a"] > rates["b"] > 0
