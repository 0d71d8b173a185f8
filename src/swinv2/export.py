"""ONNX export with a dynamic batch axis, checked against PyTorch in ONNX Runtime before it is kept.

By default the graph is traced at ONE image size: window padding, shift masks and the position-bias
table are shape-dependent and become constants, so a model exported at 256 px runs at 256 px only;
export again for another size (`img_size=`). The batch axis stays dynamic.

`dynamic_size=True` exports `export_graph.DynamicSizeForward` instead: the same parameters and the
official math, with the padding, roll, window partition, shift masks, each stage's effective window
(min(H, W) and no shift where the map is not larger than the window) and the position bias for it
computed in the graph from the input's shape. Its input is (batch, 3, height, width), all three
dynamic, and it runs at any size (1 px and up). The fixed graph stays the default: its tables are
constants and it does no shape arithmetic. Measured on SwinV2-T/w8 (random weights), 256 px, batch
8, 2 threads, fp32, on a shared 2-core machine: images/s of the fixed graph over the dynamic one,
medians of interleaved rounds in three runs, were 1.06, 1.00 and 1.02 in ONNX Runtime 1.32 and 1.06,
0.99 and 1.00 in OpenVINO 2026.4 (in the last run, each round timing both back to back: 0.99 and
1.05), i.e. the dynamic graph costs 0-6%. The scale of the cosine attention is folded into q/|q|
there (as the fused path does): multiplying the N x N logits instead, and F.normalize's exported
Expand, had made it 1.17x slower in ONNX Runtime.

We use PyTorch's TorchScript-based exporter (`dynamo=False`). Its torch.export-based successor (the
default since PyTorch 2.9) fails on this model in PyTorch 2.14: its type-promotion pass re-runs the
fused attention's output reshape with fake strides that differ from the traced ones ("Cannot view a
tensor ..."), and the tracing calls reach model.py's per-size lru caches with fake tensors.

The file is written next to its final name, run in ONNX Runtime at every batch size of
`check_batches` on seeded random images (a dynamic graph also at a second, non-square size that is
no multiple of the window) and compared with the PyTorch model; only when every max |difference| is
within `atol` is it renamed into place, so a failed export leaves nothing behind. A sidecar
`<out>.json` records what a deployment needs besides the graph: input / output names, the image
size (null for a dynamic graph, with `"dynamic_size": true`), the eval preprocessing and the class
names.
"""
from __future__ import annotations

import json
import logging
import math
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
from .outputs import atomic_file, write_output
from .registry import model_info

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime reproduced PyTorch."""

    path: str
    img_size: int  # the fixed graph's size; for a dynamic graph, the eval size it was checked at first
    opset: int
    seconds: float
    atol: float
    # batch size -> max |ONNX Runtime logits - PyTorch logits| over `checked_sizes`; empty when skipped
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    dynamic_size: bool = False
    checked_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each check

    def __str__(self) -> str:
        shape = "height, width" if self.dynamic_size else f"{self.img_size}, {self.img_size}"
        lines = [f"wrote {self.path} (opset {self.opset}, input {INPUT_NAME}: (batch, 3, {shape}) float32, "
                 f"output {OUTPUT_NAME}) in {self.seconds:.1f}s"]
        if self.max_abs_diff:
            diffs = ", ".join(f"{d:.2e} at batch {b}" for b, d in self.max_abs_diff.items())
            at = (" at " + ", ".join(f"{h}x{w}" for h, w in self.checked_sizes) + " px") if self.dynamic_size else ""
            lines.append(f"ONNX Runtime vs PyTorch{at}: max |delta| = {diffs} (limit {self.atol:g})")
        else:
            lines.append("ONNX Runtime check skipped")
        if self.dynamic_size:
            lines.append(f"the graph takes any image size (batch, height and width dynamic); eval preprocessing "
                         f"at {self.img_size} px")
        else:
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


def _export_dynamic_graph(model: nn.Module, path: str, x: torch.Tensor, opset: int) -> None:
    """`export_graph.DynamicSizeForward(model)` with batch, height and width dynamic."""
    from .export_graph import DynamicSizeForward

    with warnings.catch_warnings():
        # Here a TracerWarning means a shape became a Python number, i.e. a constant of the traced
        # size: the graph would silently be wrong at other sizes, so it fails the export instead.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The crops to a dynamic even size are slices with tensor bounds, which constant folding skips.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(DynamicSizeForward(model), (x,), path, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}})


def dynamic_check_sizes(img_size: int) -> list[tuple[int, int]]:
    """(height, width) at which a dynamic graph is checked: the eval size, and a non-square one about 3/4
    x 1/2 of it with odd sides, no multiple of an even patch size (so padding from the first stage on)."""
    return [(img_size, img_size), ((img_size * 3 // 4) | 1, (img_size // 2 + 2) | 1)]


def check_onnx(path: str | os.PathLike, model: nn.Module, img_size: int | tuple[int, int], *,
               batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> dict[int, float]:
    """Max |ONNX Runtime - PyTorch| of the logits at each batch size, on seeded N(0,1) images of
    `img_size` (a side, or (height, width))."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("the export self-check needs onnxruntime (pip install onnxruntime), "
                         "or skip it with --no-check") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    ort_run = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batch_sizes:
        x = torch.randn(b, 3, height, width, generator=g)
        with torch.no_grad():
            expected = model(x).float()
        got = torch.from_numpy(ort_run.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        if got.shape != expected.shape:
            raise InputError(f"{path}: ONNX Runtime returned {tuple(got.shape)} at batch {b}, {height}x{width} px, "
                             f"PyTorch {tuple(expected.shape)}")
        diffs[b] = float((got - expected).abs().max())
    return diffs


def export_onnx(model: nn.Module, path: str | os.PathLike, *, img_size: int | None = None,
                opset: int = DEFAULT_OPSET, check: bool = True, check_batches: Sequence[int] = (1, 3),
                atol: float = 1e-4, dynamic_size: bool = False) -> ExportReport:
    """Export `model` (B, 3, img_size, img_size) -> (B, num_classes) to ONNX at `path`.

    `img_size` defaults to the model's eval size (`model.info`'s preprocessing, else its
    config's). With `dynamic_size` the graph takes (B, 3, H, W) at any H, W (slower, see the module
    docstring) and `img_size` is the eval size it is checked at first and the sidecar records. With
    `check` the file is kept only if ONNX Runtime matches PyTorch within `atol` at every batch size in
    `check_batches` (and, dynamic, at every size of `dynamic_check_sizes`). The model is exported in
    eval mode on the CPU in fp32.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise InputError(f"{path}: the ONNX file name must end in .onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {path.parent}")
    if img_size is None:
        img_size = model_info(model).preprocess.img_size
    if img_size < 1:
        raise InputError(f"img_size must be positive, got {img_size}")
    model = model.eval().float().cpu()
    start = time.perf_counter()
    # Written under a temp name and renamed into place only once it passed the check.
    with atomic_file(path) as tmp:
        # Traced at batch 2: a batch of 1 could let the tracer treat the batch axis as a constant 1.
        x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            (_export_dynamic_graph if dynamic_size else _export_graph)(model, os.fspath(tmp), x, opset)
        sizes = dynamic_check_sizes(img_size) if dynamic_size else [(img_size, img_size)]
        diffs = _check_sizes(tmp, model, sizes, check_batches) if check else {}
        bad = {b: d for b, d in diffs.items() if not d <= atol}  # `not <=` also catches NaN
        if bad:
            raise InputError(f"ONNX Runtime differs from PyTorch by {max(bad.values()):.3g} (> {atol:g}) at batch "
                             f"{', '.join(map(str, bad))}; {path} was not written")
    _write_sidecar(path, model, img_size, opset, dynamic_size)
    report = ExportReport(os.fspath(path), img_size, opset, time.perf_counter() - start, atol, diffs,
                          dynamic_size, sizes if check else [])
    log.debug("%s", report)
    return report


def _check_sizes(path: Path, model: nn.Module, sizes: Sequence[tuple[int, int]],
                 batch_sizes: Sequence[int]) -> dict[int, float]:
    """`check_onnx` at each (height, width) of `sizes`: per batch size, the largest difference of all."""
    diffs: dict[int, float] = {}
    for size in sizes:
        for b, d in check_onnx(path, model, size, batch_sizes=batch_sizes).items():
            old = diffs.get(b)
            diffs[b] = d if old is None or math.isnan(d) or d > old else old  # a NaN must survive the max
    return diffs


def _write_sidecar(path: Path, model: nn.Module, img_size: int, opset: int, dynamic_size: bool = False) -> None:
    """`<out>.json`: names, shapes, preprocessing and classes, so the .onnx can be used on its own.
    A dynamic graph has `"img_size": null` and `"dynamic_size": true`; `"eval_img_size"` (and the
    preprocessing's size) is the size its images are resized and cropped to in eval, `img_size`."""
    described = model_info(model)
    prep = described.preprocess
    spatial: list[Any] = ["height", "width"] if dynamic_size else [img_size, img_size]
    info: dict[str, Any] = {
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, *spatial], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", model.config.num_classes]},
        "img_size": None if dynamic_size else img_size,
        "dynamic_size": dynamic_size,
        "eval_img_size": img_size,
        "opset": opset,
        "preprocess": asdict(prep),
        "class_names": described.class_names,
        "config": model.config.to_dict(),
    }
    if prep.img_size != img_size:
        info["preprocess"] = {**asdict(prep), "img_size": img_size}
    write_output(path.with_name(path.name + ".json"), json.dumps(info, indent=1))
