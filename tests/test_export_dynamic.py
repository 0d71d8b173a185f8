"""ONNX export with dynamic height and width (`export_onnx(dynamic_size=True)`, `swinv2 export --dynamic-size`):
ONE exported file reproduces the PyTorch model in ONNX Runtime (and OpenVINO, where installed) at
sizes that exercise window padding, a stage whose map is not larger than the window (window =
min(H, W), no shift), non-square maps and a pretrained-window CPB, at two batch sizes; the sidecar,
the report and the runtime's size check know the graph takes any size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import swinv2
from randomize import randomize_
from swinv2.cli import main
from swinv2.serve import runtime as R
from swinv2.serve.dynamic_forward import DynamicSizeForward
from swinv2.serve.export import export_onnx
from swinv2.weights.files import save_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4
# Patch 4, window 4, three stages. Token maps per stage (the effective window in brackets):
#   32 x 32: 8x8 [4, shifted, no padding], 4x4 [4: map == window, no shift], 2x2 [2]
#   45 x 27: 12x7 [4, shifted, padded to 12x8], 6x4 [4, no shift, padded to 8x4], 3x2 [2, padded to 4x2]
#   13 x 70: 4x18 [4 = min(H, W): no shift at stage 0, padded to 4x20], 2x9 [2, padded], 1x5 [1]
SIZES = [(32, 32), (45, 27), (13, 70)]
BATCHES = (1, 3)


def _tiny_model() -> swinv2.SwinTransformerV2:
    torch.manual_seed(0)
    # Stage 1 has a pretrained window (3): its CPB coordinates are normalised by it, not by the window.
    cfg = swinv2.SwinV2Config(
        img_size=32,
        embed_dim=16,
        depths=(2, 2, 2),
        num_heads=(2, 2, 4),
        window_size=4,
        pretrained_window_sizes=(0, 3, 0),
        num_classes=5,
        drop_path_rate=0.0,
    )
    return randomize_(swinv2.SwinTransformerV2(cfg), std=0.02).eval()


def _images(batch: int, size: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * batch + size[0] + size[1])
    return torch.rand(batch, 3, *size, generator=g) * 4 - 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path, report): the tiny model exported once with dynamic height and width."""
    model = _tiny_model()
    path = tmp_path_factory.mktemp("dynamic") / "tiny.onnx"
    return model, path, export_onnx(model, path, dynamic_size=True)


def _expected(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = model(x)
    assert logits.abs().max() > 0.05  # real logits, so that the 1e-4 agreement means something
    return logits.numpy()


def test_the_shape_arithmetic_matches_the_model_in_eager_mode():
    """The formulas themselves, before any exporter: every size down to a single patch."""
    model = _tiny_model()
    dynamic = DynamicSizeForward(model)
    for size in SIZES + [(1, 1), (4, 9), (17, 17), (100, 64)]:
        x = _images(2, size)
        with torch.no_grad():
            assert (dynamic(x) - model(x)).abs().max() <= 1e-5, size
    assert not model.training  # the wrapper leaves the shared model in its mode


def test_one_file_reproduces_pytorch_in_onnx_runtime_at_every_size_and_batch(exported):
    model, path, report = exported
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"] and dims[1].dim_value == 3
    ort_run = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in SIZES:
        for batch in BATCHES:
            x = _images(batch, size)
            (got,) = ort_run.run(None, {"images": x.numpy()})
            expected = _expected(model, x)
            assert got.shape == expected.shape == (batch, 5)
            assert np.abs(got - expected).max() <= ATOL, (size, batch)


def test_one_file_reproduces_pytorch_in_openvino_at_every_size_and_batch(exported):
    ov = pytest.importorskip("openvino")
    model, path, _ = exported
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    for size in SIZES:
        for batch in BATCHES:
            x = _images(batch, size)
            got = request.infer({0: x.numpy()})[0]
            assert np.abs(got - _expected(model, x)).max() <= ATOL, (size, batch)


def test_report_and_sidecar_say_the_graph_takes_any_size(exported):
    model, path, report = exported
    assert report.dynamic_size and report.checked_sizes == [(32, 32), (25, 19)]
    assert set(report.max_abs_diff) == {1, 3} and max(report.max_abs_diff.values()) <= ATOL
    text = str(report)
    assert "fixed at" not in text and "(batch, 3, height, width)" in text and "any image size" in text
    side = json.loads(path.with_name(path.name + ".json").read_text())
    assert side["img_size"] is None and side["dynamic_size"] is True and side["eval_img_size"] == 32
    assert side["input"]["shape"] == ["batch", 3, "height", "width"]


def test_the_runtime_accepts_any_size_for_a_dynamic_graph_only(exported, tmp_path):
    model, path, _ = exported
    dynamic = R.Runtime("onnxruntime", "fp32", 32, 5, R._numpy_infer(R.onnxruntime_fn(path, 1)), path=str(path))
    x = _images(2, (45, 27))
    assert np.abs(dynamic(x).numpy() - _expected(model, x)).max() <= ATOL
    fixed_path = tmp_path / "fixed.onnx"
    export_onnx(model, fixed_path, check=False)
    fixed = R.Runtime(
        "onnxruntime", "fp32", 32, 5, R._numpy_infer(R.onnxruntime_fn(fixed_path, 1)), path=str(fixed_path)
    )
    with pytest.raises(ValueError, match="fixed at 32x32 px"):
        fixed(x)


def test_cli_export_dynamic_size_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize_(swinv2.create_model("swinv2_micro_window4_32", num_classes=3), std=0.02).eval()
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights, class_names=["ant", "bee", "cow"])
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(weights), "--onnx", str(out), "--dynamic-size", "--img-size", "40"]) == 0
    text = capsys.readouterr().out
    assert "40x40, 31x23 px" in text and "any image size" in text and "fixed at" not in text
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["dynamic_size"] is True and side["preprocess"]["img_size"] == 40 and side["class_names"][2] == "cow"
    ort_run = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _images(2, (57, 33))
    (got,) = ort_run.run(None, {"images": x.numpy()})
    assert np.abs(got - _expected(model, x)).max() <= ATOL


def test_cli_dynamic_size_needs_an_output_file(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_weights(swinv2.create_model("swinv2_micro_window4_32"), weights)
    assert main(["export", "--weights", str(weights), "--dynamic-size"]) == 2
    assert "--dynamic-size needs --onnx" in capsys.readouterr().err
