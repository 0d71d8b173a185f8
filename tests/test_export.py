"""ONNX export: ONNX Runtime reproduces PyTorch (tiny model and the real SwinV2-T/w8 architecture) at
batch 1 and 3 from one file, the batch axis is dynamic, a failed export leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import swinv2
from randomize import randomize_
from swinv2.cli import main
from swinv2.serve.export import export_onnx
from swinv2.weights.factory import load_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _ort_vs_torch(path, model, size: int, batch: int) -> float:
    """Our own comparison, independent of export.py's self-check: fresh images, a fresh InferenceSession."""
    ort_run = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(100 + batch)) * 4 - 2
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = ort_run.run(None, {ort_run.get_inputs()[0].name: x.numpy()})
    assert got.shape == expected.shape == (batch, model.config.num_classes)
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize(
    "name", ["swinv2_micro_window4_32", pytest.param("swinv2_tiny_window8_256", marks=pytest.mark.slow)]
)  # SwinV2-T: about 45 s
def test_onnx_runtime_matches_pytorch_at_batch_1_and_3(tmp_path, name):
    torch.manual_seed(0)
    model = randomize_(swinv2.create_model(name), std=0.02).eval()
    size = model.config.img_size[0]
    with torch.no_grad():  # logits of a real size, so that the 1e-4 agreement below means something
        assert model(torch.randn(1, 3, size, size)).abs().max() > 0.1
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, check_batches=(1, 3))
    assert set(report.max_abs_diff) == {1, 3} and max(report.max_abs_diff.values()) <= 1e-4
    for batch in (1, 3):
        assert _ort_vs_torch(path, model, size, batch) <= 1e-4
    # The graph declares a symbolic batch axis and the fixed image size.
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, size, size]
    # Each block's position bias is one constant of the graph, the small maps' one-window stages too:
    # the CPB MLP is neither run nor kept (a quantiser would put its weights in int8).
    graph = onnx.load(str(path), load_external_data=False).graph
    assert not [n.name for n in graph.node if "cpb_mlp" in n.name or n.op_type == "Sigmoid"]
    assert not [t.name for t in graph.initializer if "cpb_mlp" in t.name]


def test_cli_export_prints_the_check_and_writes_the_sidecar(tmp_path, make_micro_weights, capsys):
    weights = make_micro_weights(tmp_path / "w.safetensors", ["ant", "bee", "cow"], std=0.01)
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(weights), "--onnx", str(out), "--img-size", "48"]) == 0
    text = capsys.readouterr().out
    assert "max |delta|" in text and "batch 1" in text and "batch 3" in text and "export again" in text
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["class_names"] == ["ant", "bee", "cow"]
    assert side["input"]["shape"] == ["batch", 3, 48, 48] and side["preprocess"]["img_size"] == 48
    assert side["img_size"] == side["eval_img_size"] == 48 and side["dynamic_size"] is False
    assert _ort_vs_torch(out, load_model(weights), 48, 2) <= 1e-4


def test_failed_check_leaves_nothing_behind(tmp_path, make_micro):
    model = make_micro(randomized=False)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="not written"):
        export_onnx(model, path, atol=-1.0)  # no difference can pass a negative limit
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths_fail_cleanly(tmp_path, micro_weights, capsys):
    weights = micro_weights
    assert main(["export", "--weights", str(weights), "--onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "output folder not found" in capsys.readouterr().err
    assert main(["export", "--weights", str(weights), "--onnx", str(tmp_path / "m.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [weights.name]
