"""ONNX export with a dynamic batch axis, checked against PyTorch in ONNX Runtime before it is kept.

By default the graph is traced at ONE image size: window padding, shift masks and each block's
position bias (the CPB MLP's output) are shape-dependent and become constants, so a model exported
at 256 px runs at 256 px only; export again for another size (`img_size=`). The batch axis stays
dynamic.

`dynamic_size=True` exports `dynamic_forward.DynamicSizeForward` instead: the same parameters and the
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

The graph and its sidecar are one unit (`swinv2.units`): each export draws an id, stored in the
graph's `metadata_props` (key "swinv2.unit_id") and in the sidecar ("unit_id"), which is written
after the graph. `read_sidecar` refuses, in one line, a sidecar of another export than its graph (an
export killed between the two). Exports into the same folder run one at a time, and the first one
after a kill removes the temp files it left (`.<out>.XXXXXXXX.tmp`).
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
from typing import Any, cast

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..model.transformer import SwinTransformerV2
from ..outputs import atomic_file, write_output
from ..units import new_unit_id, remove_stale_temps, torn, unit_lock
from ..weights.registry import model_info

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
UNIT_KEY = "swinv2.unit_id"  # the graph's metadata_props key holding the id its sidecar must carry


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
        lines = [
            f"wrote {self.path} (opset {self.opset}, input {INPUT_NAME}: (batch, 3, {shape}) float32, "
            f"output {OUTPUT_NAME}) in {self.seconds:.1f}s"
        ]
        if self.max_abs_diff:
            diffs = ", ".join(f"{d:.2e} at batch {b}" for b, d in self.max_abs_diff.items())
            at = (" at " + ", ".join(f"{h}x{w}" for h, w in self.checked_sizes) + " px") if self.dynamic_size else ""
            lines.append(f"ONNX Runtime vs PyTorch{at}: max |delta| = {diffs} (limit {self.atol:g})")
        else:
            lines.append("ONNX Runtime check skipped")
        if self.dynamic_size:
            lines.append(
                f"the graph takes any image size (batch, height and width dynamic); eval preprocessing "
                f"at {self.img_size} px"
            )
        else:
            lines.append(f"the graph is fixed at {self.img_size}x{self.img_size} px: export again for other sizes")
        return "\n".join(lines)


def _export_graph(model: nn.Module, path: str, x: torch.Tensor, opset: int) -> None:
    # One eager pass first fills each block's position-bias cache (CPU inference, `attention.py`): traced
    # after it, each (nH, N, N) bias is one constant of the graph, not the CPB MLP over a coordinate
    # table run on every call. Quantisers then cannot reach it (they would put the MLP's weights in int8).
    model(x)
    with warnings.catch_warnings():
        # Expected while tracing at a fixed size: shape tests become constants (TracerWarning), and
        # the TorchScript exporter announces its successor (see the module docstring).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )


def _export_dynamic_graph(model: nn.Module, path: str, x: torch.Tensor, opset: int) -> None:
    """`dynamic_forward.DynamicSizeForward(model)` with batch, height and width dynamic."""
    from .dynamic_forward import DynamicSizeForward

    with warnings.catch_warnings():
        # Here a TracerWarning means a shape became a Python number, i.e. a constant of the traced
        # size: the graph would silently be wrong at other sizes, so it fails the export instead.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The crops to a dynamic even size are slices with tensor bounds, which constant folding skips.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            DynamicSizeForward(cast(SwinTransformerV2, model)),
            (x,),
            path,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}},
        )


def dynamic_check_sizes(img_size: int) -> list[tuple[int, int]]:
    """(height, width) at which a dynamic graph is checked: the eval size, and a non-square one about 3/4
    x 1/2 of it with odd sides, no multiple of an even patch size (so padding from the first stage on)."""
    return [(img_size, img_size), ((img_size * 3 // 4) | 1, (img_size // 2 + 2) | 1)]


def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    img_size: int | tuple[int, int],
    *,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> dict[int, float]:
    """Max |ONNX Runtime - PyTorch| of the logits at each batch size, on seeded N(0,1) images of
    `img_size` (a side, or (height, width))."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError(
            "the export self-check needs onnxruntime (pip install onnxruntime), or skip it with --no-check"
        ) from None
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
            raise InputError(
                f"{path}: ONNX Runtime returned {tuple(got.shape)} at batch {b}, {height}x{width} px, "
                f"PyTorch {tuple(expected.shape)}"
            )
        diffs[b] = float((got - expected).abs().max())
    return diffs


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    img_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_batches: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    dynamic_size: bool = False,
) -> ExportReport:
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
        prep = model_info(cast(SwinTransformerV2, model)).preprocess
        assert prep is not None  # model_info fills it in from the config where the weights gave none
        img_size = prep.img_size
    if img_size < 1:
        raise InputError(f"img_size must be positive, got {img_size}")
    model = model.eval().float().cpu()
    start = time.perf_counter()
    unit = new_unit_id()  # this export's id, in the graph and in its sidecar
    sidecar = sidecar_path(path)
    # One export at a time into the folder: the graph and its sidecar are published as a pair, and a
    # temp file of ours for these names found meanwhile is a killed export's.
    with unit_lock(path.parent) as taken:
        if taken:
            remove_stale_temps(path.parent, (path.name, sidecar.name))
        # Written under a temp name and renamed into place only once it passed the check.
        with atomic_file(path) as tmp:
            # Traced at batch 2: a batch of 1 could let the tracer treat the batch axis as a constant 1.
            x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                (_export_dynamic_graph if dynamic_size else _export_graph)(model, os.fspath(tmp), x, opset)
            add_graph_metadata(tmp, {UNIT_KEY: unit})  # before the check: it checks the bytes that are kept
            sizes = dynamic_check_sizes(img_size) if dynamic_size else [(img_size, img_size)]
            diffs = _check_sizes(tmp, model, sizes, check_batches) if check else {}
            bad = {b: d for b, d in diffs.items() if not d <= atol}  # `not <=` also catches NaN
            if bad:
                raise InputError(
                    f"ONNX Runtime differs from PyTorch by {max(bad.values()):.3g} (> {atol:g}) at "
                    f"batch {', '.join(map(str, bad))}; {path} was not written"
                )
        _write_sidecar(path, model, img_size, opset, dynamic_size, unit)  # last: it describes the graph
    report = ExportReport(
        os.fspath(path), img_size, opset, time.perf_counter() - start, atol, diffs, dynamic_size, sizes if check else []
    )
    log.debug("%s", report)
    return report


def _check_sizes(
    path: Path, model: nn.Module, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int]
) -> dict[int, float]:
    """`check_onnx` at each (height, width) of `sizes`: per batch size, the largest difference of all."""
    diffs: dict[int, float] = {}
    for size in sizes:
        for b, d in check_onnx(path, model, size, batch_sizes=batch_sizes).items():
            old = diffs.get(b)
            diffs[b] = d if old is None or math.isnan(d) or d > old else old  # a NaN must survive the max
    return diffs


def _write_sidecar(
    path: Path, model: nn.Module, img_size: int, opset: int, dynamic_size: bool = False, unit: str | None = None
) -> None:
    """`<out>.json`: names, shapes, preprocessing and classes, so the .onnx can be used on its own.
    A dynamic graph has `"img_size": null` and `"dynamic_size": true`; `"eval_img_size"` (and the
    preprocessing's size) is the size its images are resized and cropped to in eval, `img_size`.
    `"unit_id"` is the id in the graph's metadata_props (`UNIT_KEY`): a reader compares the two."""
    swin = cast(SwinTransformerV2, model)  # typed as a Module for callers; a SwinV2 (or a wrapper of one) here
    described = model_info(swin)
    prep = described.preprocess
    assert prep is not None  # model_info fills it in from the config where the weights gave none
    spatial: list[Any] = ["height", "width"] if dynamic_size else [img_size, img_size]
    info: dict[str, Any] = {
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, *spatial], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", swin.config.num_classes]},
        "img_size": None if dynamic_size else img_size,
        "dynamic_size": dynamic_size,
        "eval_img_size": img_size,
        "opset": opset,
        "preprocess": asdict(prep),
        "class_names": described.class_names,
        "config": swin.config.to_dict(),
    }
    if unit is not None:
        info["unit_id"] = unit
    if prep.img_size != img_size:
        info["preprocess"] = {**asdict(prep), "img_size": img_size}
    write_output(sidecar_path(path), json.dumps(info, indent=1))


# --------------------------------------------------------------------------- the graph's metadata and its sidecar

_MODEL_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1; value = 2}
_MAX_ENTRY = 1 << 20  # a metadata entry larger than this is skipped, never read into memory


def sidecar_path(graph: str | os.PathLike) -> Path:
    """`<graph>.json`, the sidecar `export_onnx` writes beside the graph."""
    graph = Path(graph)
    return graph.with_name(graph.name + ".json")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def add_graph_metadata(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Add `props` to the ONNX file's `metadata_props`, by appending the serialized entries: protobuf
    parsers merge a message's concatenated parts, appending to a repeated field (onnx, ONNX Runtime
    and OpenVINO read them like any other entry), so the graph is not parsed or rewritten."""
    with open(path, "ab") as f:
        for key, value in props.items():
            f.write(_field(_MODEL_METADATA_PROPS, _field(1, key.encode()) + _field(2, value.encode())))


def _read_varint(f: Any) -> int | None:
    """The next varint of `f`; None at the end of the file."""
    n, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise EOFError
            return None
        n |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return n
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _entry(raw: bytes) -> tuple[str, str]:
    """(key, value) of a serialized StringStringEntryProto."""
    import io

    f, out = io.BytesIO(raw), {1: "", 2: ""}
    while (tag := _read_varint(f)) is not None:
        if tag & 7 != 2:
            raise ValueError("unexpected wire type in a metadata entry")
        n = _read_varint(f)
        if n is None:
            raise EOFError
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        if tag >> 3 in out:
            out[tag >> 3] = data.decode()
    return out[1], out[2]


def graph_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (a later entry wins), read by walking the top-level fields
    of its ModelProto and seeking past the others (the graph, the weights): cheap at any size.
    Raises CheckpointError naming the file where it is not a complete protobuf message."""
    props: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while (tag := _read_varint(f)) is not None:
                number, wire = tag >> 3, tag & 7
                if wire == 0:
                    if _read_varint(f) is None:
                        raise EOFError
                elif wire == 1 or wire == 5:
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                elif wire == 2:
                    n = _read_varint(f)
                    if n is None:
                        raise EOFError
                    if number == _MODEL_METADATA_PROPS and n <= _MAX_ENTRY:
                        raw = f.read(n)
                        if len(raw) != n:
                            raise EOFError
                        key, value = _entry(raw)
                        props[key] = value
                    else:
                        f.seek(n, os.SEEK_CUR)
                else:
                    raise ValueError(f"wire type {wire}")
                if number == 0 or f.tell() > size:
                    raise EOFError
    except (EOFError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: not a complete ONNX graph (truncated or not protobuf: "
            f"{type(e).__name__}{': ' + str(e) if str(e) else ''})"
        ) from None
    return props


def read_sidecar(graph: str | os.PathLike) -> dict[str, Any]:
    """The sidecar `<graph>.json` of an exported graph, checked to describe this graph.

    Where the graph carries an export id (`UNIT_KEY` in its metadata_props: `export_onnx` wrote it),
    the sidecar must carry the same: the sidecar is written after the graph, so an export killed
    between the two leaves the new graph beside the old sidecar (or none), and that is refused with
    CheckpointError (one line: an interrupted export, export again). A graph without one (exported
    elsewhere, or post-processed by a tool that drops metadata) goes with its sidecar as it is.
    Raises FileNotFoundError where there is no sidecar, CheckpointError where it is not JSON.
    """
    graph = Path(graph)
    side = sidecar_path(graph)
    unit = graph_metadata(graph).get(UNIT_KEY)
    try:
        info = json.loads(side.read_text())
    except FileNotFoundError:
        if unit is not None:
            raise torn(graph, f"the graph (export {unit}) has no sidecar {side.name}") from None
        raise
    except ValueError as e:
        raise CheckpointError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{side}: holds a JSON {type(info).__name__}, not an object")
    if unit is not None and info.get("unit_id") != unit:
        said = f"export {info['unit_id']}" if info.get("unit_id") else "no export id (an older sidecar)"
        raise torn(graph, f"the graph (export {unit}) and its sidecar {side.name} ({said}) come from different exports")
    return info
