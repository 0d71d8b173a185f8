"""ONNX export with a dynamic batch axis, checked against PyTorch in ONNX Runtime before it is kept.

The graph is traced at ONE image size: window padding, shift masks and the position-bias table are
shape-dependent and become constants, so a model exported at 256 px runs at 256 px only; export
again for another size (`img_size=`). The batch axis stays dynamic.

We use PyTorch's TorchScript-based exporter (`dynamo=False`). Its torch.export-based successor (the
default since PyTorch 2.9) fails on this model in PyTorch 2.14: its type-promotion pass re-runs the
fused attention's output reshape with fake strides that differ from the traced ones ("Cannot view a
tensor ..."), and the tracing calls reach model.py's per-size lru caches with fake tensors.

The file is written next to its final name, run in ONNX Runtime at every batch size of
`check_batches` on seeded random images and compared with the PyTorch model; only when every max
|difference| is within `atol` is it renamed into place, so a failed export leaves nothing behind.
A sidecar `<out>.json` records what a deployment needs besides the graph: input / output names,
image size, the eval preprocessing and the class names.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduced PyTorch."""

    path: str
    img_size: int
    opset: int
    seconds: float
    atol: float
    # batch size -> max |ONNX Runtime logits - PyTorch logits|; empty when the check was skipped
    max_abs_diff: dict[int, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"wrote {self.path} (opset {self.opset}, input {INPUT_NAME}: (batch, 3, {self.img_size}, "
                 f"{self.img_size}) float32, output {OUTPUT_NAME}) in {self.seconds:.1f}s"]
        if self.max_abs_diff:
            diffs = ", ".join(f"{d:.2e} at batch {b}" for b, d in self.max_abs_diff.items())
            lines.append(f"ONNX Runtime vs PyTorch: max |delta| = {diffs} (limit {self.atol:g})")
        else:
            lines.append("ONNX Runtime check skipped")
        lines.append(f"the graph is fixed at {self.img_size}x{self.img_size} px: export again for other sizes")
        return "\n".join(lines)


def _export_graph(model: nn.Module, path: str, x: torch.Tensor, opset: int) -> None:
    with warnings.catch_warnings():
        # Expected while tracing at a fixed size: shape tests become constants (TracerWarning), and
        # the TorchScript exporter announces its successor (see the module docstring).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, do_constant_folding=True)


def check_onnx(path: str | os.PathLike, model: nn.Module, img_size: int, *,
               batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> dict[int, float]:
    """Max |ONNX Runtime - PyTorch| of the logits at each batch size, on seeded N(0,1) images."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("the export self-check needs onnxruntime (pip install onnxruntime), "
                         "or skip it with --no-check") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batch_sizes:
        x = torch.randn(b, 3, img_size, img_size, generator=g)
        with torch.no_grad():
            expected = model(x).float()
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        if got.shape != expected.shape:
            raise InputError(f"{path}: ONNX Runtime returned {tuple(got.shape)} at batch {b}, "
                             f"PyTorch {tuple(expected.shape)}")
        diffs[b] = float((got - expected).abs().max())
    return diffs


def export_onnx(model: nn.Module, path: str | os.PathLike, *, img_size: int | None = None,
                opset: int = DEFAULT_OPSET, check: bool = True, check_batches: Sequence[int] = (1, 3),
                atol: float = 1e-4) -> ExportReport:
    """Export `model` (B, 3, img_size, img_size) -> (B, num_classes) to ONNX at `path`.

    `img_size` defaults to the model's eval size (`model.preprocess.img_size` when set, else its
    config's). With `check` the file is kept only if ONNX Runtime matches PyTorch within `atol` at
    every batch size in `check_batches`. The model is exported in eval mode on the CPU in fp32.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise InputError(f"{path}: the ONNX file name must end in .onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {path.parent}")
    if img_size is None:
        prep = getattr(model, "preprocess", None)
        img_size = prep.img_size if prep is not None else model.config.img_size[0]
    if img_size < 1:
        raise InputError(f"img_size must be positive, got {img_size}")
    model = model.eval().float().cpu()
    start = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # Traced at batch 2: a batch of 1 could let the tracer treat the batch axis as a constant 1.
        x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _export_graph(model, os.fspath(tmp), x, opset)
        diffs = check_onnx(tmp, model, img_size, batch_sizes=check_batches) if check else {}
        bad = {b: d for b, d in diffs.items() if not d <= atol}  # `not <=` also catches NaN
        if bad:
            raise InputError(f"ONNX Runtime differs from PyTorch by {max(bad.values()):.3g} (> {atol:g}) at batch "
                             f"{', '.join(map(str, bad))}; {path} was not written")
        os.replace(tmp, path)
        _write_sidecar(path, model, img_size, opset)
    finally:
        tmp.unlink(missing_ok=True)
    report = ExportReport(os.fspath(path), img_size, opset, time.perf_counter() - start, atol, diffs)
    log.debug("%s", report)
    return report


def _write_sidecar(path: Path, model: nn.Module, img_size: int, opset: int) -> None:
    """`<out>.json`: names, shapes, preprocessing and classes, so the .onnx can be used on its own."""
    prep = getattr(model, "preprocess", None)
    info: dict[str, Any] = {
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, img_size, img_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", model.config.num_classes]},
        "opset": opset,
        "preprocess": asdict(prep) if prep is not None else None,
        "class_names": getattr(model, "class_names", None),
        "config": model.config.to_dict(),
    }
    if prep is not None and prep.img_size != img_size:
        info["preprocess"] = {**asdict(prep), "img_size": img_size}
    sidecar = path.with_name(path.name + ".json")
    tmp = sidecar.with_name(f".{sidecar.name}.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, sidecar)
