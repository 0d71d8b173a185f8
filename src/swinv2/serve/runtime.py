"""Inference runtimes behind one call: PyTorch, ONNX Runtime and OpenVINO, in fp32, bf16 or int8.

`load_runtime(model, runtime, precision, ...)` returns a `Runtime`: `rt(x)` maps (B, 3, H, W) float32
images (torch or numpy, normalised as in eval) to (B, num_classes) float32 logits.

* torch: the module itself (fp32), or a bf16 copy of it fed bf16 images (bf16).
* onnxruntime, openvino: the graph `export.export_onnx` writes and checks (dynamic batch, one image
  size, each block's position bias a constant), exported once and cached. OpenVINO runs bf16 through
  its inference-precision hint on the same fp32 graph. ONNX Runtime has no bf16 CPU kernels worth the
  name (a bf16 graph runs through casts), so bf16 is refused there.
* int8 is post-training static quantisation of that graph on calibration images from a folder, the
  patch embedding and the head kept fp32: NNCF for OpenVINO (its unquantised rest in bf16 where the CPU
  has it), ONNX Runtime's own QDQ quantiser for ONNX Runtime. Which is faster depends on the CPU: with
  VNNI (AVX-512 or AVX-VNNI) OpenVINO's int8 kernels lead, on plain AVX2 ONNX Runtime's
  (benchmarks/quantisers.py compares these and the other quantisers a user could pick, PyTorch's PT2E
  among them: docs/performance.md).
* auto: every installed runtime that supports the precision is timed once on this machine (same
  batch, interleaved rounds), OpenVINO with one stream and with two (`settings`), and the fastest is
  kept; the choice is remembered per machine, model architecture, image size, batch and precision in
  `runtime-auto.json` under the cache folder.

bf16 is refused where the CPU would emulate it (no AVX-512 BF16 / AMX): emulated bf16 is slower than
fp32. A runtime whose package is missing fails with one line naming the extra to install.

The export cache. An entry is a graph file plus `<entry>.key.json`, written last, holding the
SHA-256 of the weights (the model's config and every state-dict tensor, as loaded: the same for
any file format), the image size and the precision (and, for int8, which calibration images). It
lives in `<weights>.exports/` beside a weights file whose folder is writable, else in
`<cache>/exports/<sha256[:16]>/` (`cache_dir`, default `$SWINV2_CACHE` or `~/.cache/swinv2`).
An entry whose key differs (the weights were retrained in place) is reported as stale in one line
and made again; an entry without its key file (an interrupted write) is simply made again. Graph
files are written under temporary names and renamed into place.

An entry is one unit of files (`swinv2.units`): its key also binds the files it was written with
(`"bound"`: the SHA-256 of each file, the fp32 graph's and its sidecar's, the int8 .xml's and .bin's,
and the export id the fp32 graph and its sidecar share), checked on every use, so a graph of another
write beside the key (a write killed or interleaved, a file replaced by hand, another model's graph
given the right export id, a flipped byte) is made again with one warning, never run. The id alone
is not enough: it is a metadata entry anyone can append to any graph (`export.add_graph_metadata`).
Hashing on every use is cheap next to loading (medians on a shared 2-core machine): the micro
model's graph (0.8 MB) hashes in 0.7 ms against 0.27 s to open an ONNX Runtime session on it,
SwinV2-T/w8's (115 MB) in 0.11 s against 1.5 s.
The key also names the exporter (`exporter()`: torch's version, this package's and `EXPORT_FORMAT`,
with the opset), so a graph exported by another version of either is made again, not reused.
Processes using a cache folder take turns (`units.unit_lock`: check, build and load under it), and the
first one after a kill removes the temp files and folders it left there (`.NAME.XXXXXXXX.tmp`,
`.int8-XXXXXXXX`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..hardware import cpu_name
from ..model.transformer import SwinTransformerV2
from ..outputs import atomic_write, default_cache_dir
from ..preprocess import EvalPreprocess
from ..units import remove_stale_temps, unit_lock
from ..weights.registry import model_info

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
# The pip extra that installs each optional runtime (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
# Calibration images used for int8 at most (NNCF's default subset size).
CALIB_IMAGES = 300
ATOL_FP32 = 1e-4
AUTO_MAX_BATCH = 8
# What the export cache's graphs are made by, besides torch and opset: raise it whenever export.py or
# the model's traced forward changes the graph written for the same weights, so old entries are made again.
EXPORT_FORMAT = 3  # 3: position biases folded to constants


class RuntimeUnavailable(InputError):
    """The runtime or precision cannot run here: a missing package, an unsupported precision or CPU."""


# --------------------------------------------------------------------------- what is installed / supported


def _import(module: str, runtime: str) -> Any:
    """`module`, or one line naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeUnavailable(
            f"--runtime {runtime} needs the {module} package, which is not installed: "
            f"pip install 'swinv2[{EXTRAS[runtime]}]'"
        ) from None


def installed(runtime: str) -> bool:
    """Whether `runtime` can be imported here (torch always can)."""
    if runtime == "torch":
        return True
    try:
        importlib.import_module(runtime)
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _ov_core() -> Any:
    """The one OpenVINO Core of the process, never released. OpenVINO's CPU plugin swaps the thread's
    signal stack (sigaltstack) for its own when it starts and restores it when it is torn down; torn
    down from another thread (a request or model freed by the garbage collector there), it leaves the
    main thread's signal stack pointing at freed memory, and the next signal with a handler (SIGCHLD
    from a DataLoader worker or a subprocess) kills the process with SIGSEGV. One Core for the life
    of the process keeps its plugin, and that stack, alive."""
    return _import("openvino", "openvino").Core()


def native_bf16(runtime: str) -> bool:
    """Whether `runtime` runs bf16 matmuls natively on this CPU (AVX-512 BF16 or AMX), not emulated."""
    if runtime == "openvino":
        _import("openvino", runtime)
        return "BF16" in _ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if runtime == "torch":
        from ..hardware import BF16_EMULATED_SLOWDOWN, bf16_matmul_slowdown

        return bf16_matmul_slowdown("cpu") < BF16_EMULATED_SLOWDOWN
    return False


def check_supported(runtime: str, precision: str) -> None:
    """Raise `RuntimeUnavailable` (one line, with the alternative) where `runtime` cannot run `precision`."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)} or auto")
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if runtime != "torch":
        _import(runtime, runtime)
    if precision == "int8" and runtime not in INT8_FILES:
        raise RuntimeUnavailable(
            f"--precision int8 is not supported by --runtime {runtime}: int8 is post-training "
            f"quantisation for --runtime openvino or onnxruntime (--calib DIR)"
        )
    if precision == "bf16":
        if runtime == "onnxruntime":
            raise RuntimeUnavailable(
                "--precision bf16 is not supported by --runtime onnxruntime: its CPU provider "
                "has no bf16 kernels; use --runtime openvino or torch"
            )
        if not native_bf16(runtime):
            raise RuntimeUnavailable(
                f"--precision bf16 refused: this CPU has no native bf16 (AVX-512 BF16 or AMX), "
                f"{runtime} would emulate it, slower than fp32; use fp32 or int8"
            )


# --------------------------------------------------------------------------- the export cache


def weights_sha256(model: SwinTransformerV2) -> str:
    """SHA-256 of the model's config and state-dict tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def export_root(
    sha: str, *, weights: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder of a model's cached exports (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir) / "exports" / sha[:16]
    if weights is not None and Path(weights).is_file() and os.access(Path(weights).resolve().parent, os.W_OK):
        return Path(weights).with_name(Path(weights).name + ".exports")
    return default_cache_dir() / "exports" / sha[:16]


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    raw = (json.dumps(record, indent=1) + "\n").encode()
    atomic_write(path, lambda f: f.write(raw))


def _read_key(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# Temp folders `int8_graph` builds in (tempfile.TemporaryDirectory(prefix=...)), removed after a kill.
_TEMP_DIRS = (".int8-",)


@contextlib.contextmanager
def _cache_folder(root: Path):
    """`root` created and locked for this process (`units.unit_lock`); what a killed process left in it
    removed first. Every file in an export-cache folder is ours and written under this lock."""
    root.mkdir(parents=True, exist_ok=True)
    with unit_lock(root) as taken:
        if taken:
            remove_stale_temps(root, None, dirs=_TEMP_DIRS)
        yield


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _bind_onnx(graph: Path) -> dict[str, Any]:
    """What binds an fp32 entry's files: the SHA-256 of its graph and sidecar, and the export id they
    share (`export.read_sidecar` raises CheckpointError where they differ)."""
    from .export import UNIT_KEY, graph_metadata, read_sidecar, sidecar_path

    read_sidecar(graph)
    return {
        "unit_id": graph_metadata(graph).get(UNIT_KEY),
        "sha256": {p.name: _file_sha256(p) for p in (graph, sidecar_path(graph))},
    }


def _bind_file(graph: Path) -> dict[str, Any]:
    """What binds a one-file entry (ONNX Runtime's int8 graph): its SHA-256."""
    return {"sha256": {graph.name: _file_sha256(graph)}}


def _bind_ir(xml: Path) -> dict[str, Any]:
    """What binds an int8 entry's files: the SHA-256 of its .xml and .bin (OpenVINO's IR has no id to compare)."""
    return {"sha256": {p.name: _file_sha256(p) for p in (xml, xml.with_suffix(".bin"))}}


def _unbound(graph: Path, old: dict[str, Any], bind: Callable[[Path], dict[str, Any]]) -> str | None:
    """Why the entry's files are not those its key was written with (None: they are)."""
    bound = old.get("bound")
    if not isinstance(bound, dict) or not isinstance(bound.get("sha256"), dict):
        return "its key binds no file hashes (made by an older version)"
    try:
        now = bind(graph)
    except (OSError, ValueError) as e:  # CheckpointError (a torn pair), a file missing or unreadable
        return str(e).splitlines()[0]
    changed = [name for name, sha in now["sha256"].items() if bound["sha256"].get(name) != sha]
    if changed:
        name = changed[0]
        return (
            f"{name} is not the file its key was written with (SHA-256 {now['sha256'][name][:12]}... now, "
            f"{str(bound['sha256'].get(name))[:12]}... then): replaced, damaged or of another write"
        )
    return (
        None if now == bound else ("its files are not those its key was written with (an interrupted or mixed write)")
    )


def _cached(
    graph: Path, key: dict[str, Any], build: Callable[[Path], None], bind: Callable[[Path], dict[str, Any]]
) -> Path:
    """`graph`, made by `build(graph)` unless its key file matches `key` and its files are those the key
    binds (`bind(graph)`, stored as the key's "bound"). The key file is written after the files, so a
    graph without one (an interrupted write) is made again. Runs under the folder's lock."""
    key_path = graph.with_name(graph.name + ".key.json")
    with _cache_folder(graph.parent):
        old = _read_key(key_path) if key_path.exists() else None
        same = old is not None and {k: v for k, v in old.items() if k != "bound"} == key
        if same and graph.exists():
            problem = _unbound(graph, cast(dict[str, Any], old), bind)  # `same`: old is not None
            if problem is None:
                log.debug("using the cached export %s", graph)
                return graph
            log.warning("cached export %s does not match its key: %s; exporting again", graph, problem)
        elif old is not None and old.get("sha256") != key["sha256"]:
            log.warning(
                "stale cached export %s: the weights changed since it was made (sha256 %s... then, %s... "
                "now); exporting again",
                graph,
                str(old.get("sha256"))[:12],
                key["sha256"][:12],
            )
        elif old is not None:
            changed = ", ".join(k for k in key if old.get(k) != key[k]) or "its graph file is missing"
            log.info("cached export %s was made with other settings (%s); exporting again", graph, changed)
        key_path.unlink(missing_ok=True)
        build(graph)
        _write_json_atomic(key_path, {**key, "bound": bind(graph)})
    return graph


def exporter() -> dict[str, Any]:
    """What made the cache's graphs, as its keys record it: a graph of another exporter is made again."""
    from .. import __version__
    from .export import DEFAULT_OPSET

    return {"torch": torch.__version__, "swinv2": __version__, "format": EXPORT_FORMAT, "opset": DEFAULT_OPSET}


def _key(sha: str, img_size: int, precision: str, **extra: Any) -> dict[str, Any]:
    return {"sha256": sha, "img_size": img_size, "precision": precision, "exporter": exporter(), **extra}


def fp32_onnx(model: nn.Module, root: Path, sha: str, img_size: int) -> Path:
    """The checked fp32 ONNX graph of `model` at `img_size` in the cache folder `root`."""
    from .export import export_onnx

    def build(path: Path) -> None:
        check = installed("onnxruntime")  # export_onnx's own check runs in ONNX Runtime
        export_onnx(model, path, img_size=img_size, check=check)
        if not check:
            try:
                diffs = _check_runtime(openvino_fn(path, "fp32", None), model, img_size)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            log.info("OpenVINO vs PyTorch on %s: max |delta| %s", path.name, diffs)

    return _cached(root / f"{img_size}px-fp32.onnx", _key(sha, img_size, "fp32"), build, _bind_onnx)


def _check_runtime(
    fn: Callable[[np.ndarray], np.ndarray],
    model: nn.Module,
    img_size: int,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = ATOL_FP32,
) -> dict[int, float]:
    """Max |fn - PyTorch| at each batch size on seeded N(0,1) images; raises above `atol`."""
    g = torch.Generator().manual_seed(0)
    diffs = {}
    for b in batch_sizes:
        x = torch.randn(b, 3, img_size, img_size, generator=g)
        with torch.no_grad():
            expected = model(x).float().numpy()
        diffs[b] = float(np.abs(fn(x.numpy()) - expected).max())
    if not all(d <= atol for d in diffs.values()):
        raise InputError(f"the runtime differs from PyTorch by {max(diffs.values()):.3g} (> {atol:g}); not cached")
    return diffs


# --------------------------------------------------------------------------- calibration (int8)


def calibration_set(
    calib: str | os.PathLike, model: nn.Module, img_size: int, *, limit: int = CALIB_IMAGES
) -> tuple[list[np.ndarray], str]:
    """Up to `limit` preprocessed (1, 3, S, S) images from the folder `calib` (searched recursively;
    evenly spaced over the sorted files, so every class folder contributes), and a fingerprint of
    which files they were (SHA-256 of their paths relative to `calib` and sizes)."""
    from ..images import BadImageError, eval_pipeline, load_image
    from ..weights.registry import resolve_preprocess
    from .predict import expand_paths

    calib = os.fspath(calib)
    if not os.path.isdir(calib):
        raise FileNotFoundError(f"--calib {calib}: not a folder of images")
    files, errors = expand_paths([calib])
    if not files:
        raise InputError(f"--calib {calib}: {errors[0]['error'] if errors else 'no image files'}")
    if len(files) > limit:
        files = [files[i * len(files) // limit] for i in range(limit)]
    transform = eval_pipeline(resolve_preprocess(model, img_size=img_size))
    images, h = [], hashlib.sha256()
    for path in files:
        try:
            images.append(transform(load_image(path)).numpy()[None])
        except BadImageError as e:
            log.warning("calibration: skipped %s", e)
            continue
        h.update(f"{os.path.relpath(path, calib)}:{os.path.getsize(path)};".encode())
    if not images:
        raise InputError(f"--calib {calib}: no readable image")
    return images, h.hexdigest()


# Each runtime's int8 graph in the cache and the quantiser that makes it (recorded in the entry's key,
# so a graph of another quantiser or setting is made again). Chosen in benchmarks/quantisers.py, where
# every quantiser and setting tried is timed and scored (docs/performance.md).
INT8_FILES = {"openvino": "{size}px-int8-openvino.xml", "onnxruntime": "{size}px-int8-onnxruntime.onnx"}
QUANTISERS = {
    "openvino": "nncf, transformer, minmax ranges, 7-bit weights, no smooth quant, fp32 patch embedding and head",
    "onnxruntime": "onnxruntime static qdq, per channel, u8 activations, fp32 patch embedding and head",
}
# The first and the last layer stay fp32, the usual rule for post-training quantisation (raw pixels in,
# logits out), for a small share of the work (docs/performance.md: with the shipped ranges, quantising
# them too moved top-1 by at most one val image). Node names of our export.
KEEP_FP32 = (r".*patch_embed/proj/.*", r".*/head/.*")


def int8_graph(
    model: nn.Module,
    root: Path,
    sha: str,
    img_size: int,
    calib: str | os.PathLike | Sequence[np.ndarray] | None,
    runtime: str = "openvino",
) -> Path:
    """The int8 graph of `model` for `runtime` in the cache: NNCF's OpenVINO IR (.xml + .bin) or ONNX
    Runtime's QDQ graph (.onnx). `calib`: a folder of images, or preprocessed (1, 3, S, S) arrays; None
    only when an int8 entry for these weights is cached already."""
    path = root / INT8_FILES[runtime].format(size=img_size)
    bind = _bind_ir if runtime == "openvino" else _bind_file
    if calib is None:
        images, fingerprint = None, None
    elif isinstance(calib, (str, os.PathLike)):
        images, fingerprint = calibration_set(calib, model, img_size)
    else:
        images = [np.asarray(a, dtype=np.float32) for a in calib]
        fingerprint = hashlib.sha256(b"".join(a.tobytes() for a in images)).hexdigest()
    key = _key(sha, img_size, "int8", calib=fingerprint, quantiser=QUANTISERS[runtime])
    if calib is None:
        with _cache_folder(root):
            old = _read_key(path.with_name(path.name + ".key.json"))
            if old is None or not path.exists() or any(old.get(k) != key[k] for k in ("sha256", "img_size")):
                stale = " (the cached one is stale: the weights changed)" if old and old.get("sha256") != sha else ""
                raise InputError(
                    f"--precision int8 needs calibration images{stale}: --calib DIR, a folder of images "
                    f"like the ones to classify (e.g. the training set)"
                )
            problem = _unbound(path, old, bind)
            if problem is None and old.get("quantiser") != key["quantiser"]:
                problem = f"made by another quantiser ({old.get('quantiser')})"
            if problem is not None:
                raise InputError(
                    f"--precision int8 needs calibration images (the cached {path.name} does not match "
                    f"its key: {problem}): --calib DIR, a folder of images like the ones to classify"
                )
        return path
    images = cast(list[np.ndarray], images)  # calib is not None here: a calibration set
    onnx_path = fp32_onnx(model, root, sha, img_size)
    quantise = quantise_openvino if runtime == "openvino" else quantise_onnxruntime

    def build(path: Path) -> None:
        where = f" from {calib}" if isinstance(calib, (str, os.PathLike)) else ""
        log.info("int8: quantising for %s on %d calibration images%s", runtime, len(images), where)
        quantise(onnx_path, images, path)

    return _cached(path, key, build, bind)


def quantise_openvino(
    onnx_path: Path,
    images: list[np.ndarray],
    path: Path,
    *,
    smooth_quant: bool = False,
    keep_fp32: Sequence[str] = KEEP_FP32,
    preset: str | None = None,
    ranges: str = "minmax",
    bias_correction: bool = True,
    overflow_fix: str = "enable",
) -> None:
    """NNCF's post-training quantisation of the fp32 graph, saved as OpenVINO IR at `path` (.xml last).
    The defaults are what `--precision int8` ships; the others are the settings benchmarks/quantisers.py
    compares (`keep_fp32`: regexes of node names left unquantised; `preset`: "performance" for
    symmetric activations, "mixed", or None for the model type's default; `ranges`: a name of NNCF's
    `RangeEstimatorParametersSet` for activations; `overflow_fix`: "enable" (7-bit weights),
    "first_layer" (NNCF's default) or "disable")."""
    ov = _import("openvino", "openvino")
    try:
        nncf = importlib.import_module("nncf")
    except ImportError:
        raise RuntimeUnavailable(
            "int8 with --runtime openvino needs nncf, which is not installed: pip install 'swinv2[openvino]'"
        ) from None
    nncf.set_log_level(logging.ERROR)
    ov_model = _ov_core().read_model(os.fspath(onnx_path))
    # Measured on the two real sets of benchmarks/quantisers.py (docs/performance.md): activation ranges
    # from the min and max over all calibration images (NNCF's default, the mean of per-image ranges,
    # clips the outliers of photographs: -1.39 top-1 points there against -0.42), weights in 7 bits
    # (the overflow fix: without VNNI, x86 multiplies u8 x s8 pairs into saturating 16-bit sums),
    # SmoothQuant off (no better on either set).
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    alphas = AdvancedSmoothQuantParameters() if smooth_quant else AdvancedSmoothQuantParameters(matmul=-1)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=alphas,
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, ranges.upper()),
        disable_bias_correction=not bias_correction,
        overflow_fix=getattr(OverflowFix, overflow_fix.upper()),
    )
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    with _quiet_progress():
        quantised = nncf.quantize(
            ov_model,
            nncf.Dataset(images),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=presets[preset] if preset else None,
            subset_size=len(images),
            advanced_parameters=advanced,
            ignored_scope=nncf.IgnoredScope(patterns=list(keep_fp32), validate=False) if keep_fp32 else None,
        )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as tmp:
        ov.save_model(quantised, os.fspath(Path(tmp) / "m.xml"), compress_to_fp16=False)
        for name, dst in (("m.bin", path.with_suffix(".bin")), ("m.xml", path)):  # .xml last: the pair is done
            with open(Path(tmp) / name, "rb") as src:
                atomic_write(dst, functools.partial(shutil.copyfileobj, src))


def attention_products(onnx_path: Path) -> list[str]:
    """Names of the graph's MatMuls between two activations (q·kᵀ and attn·v): no initializer input."""
    import onnx

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]


def quantise_onnxruntime(
    onnx_path: Path,
    images: list[np.ndarray],
    path: Path,
    *,
    keep_fp32: Sequence[str] = KEEP_FP32,
    attention: bool = True,
    fmt: str = "qdq",
) -> None:
    """ONNX Runtime's static quantisation of the fp32 graph, written to `path`: QDQ (QuantizeLinear /
    DequantizeLinear pairs that its CPU provider fuses into int8 kernels; `fmt="qoperator"` for its
    QLinear operators instead), per-channel int8 weights and uint8 activations with MinMax ranges over
    `images`. The defaults ship; `attention=False` leaves the attention products in fp32."""
    import re

    import onnx

    _import("onnxruntime", "onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .export import INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {INPUT_NAME: x}

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    keep = [n.name for n in graph.node if any(re.fullmatch(p, n.name) for p in keep_fp32)]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as tmp:
        out = Path(tmp) / "m.onnx"
        with _quiet_progress():
            quantize_static(
                os.fspath(onnx_path),
                os.fspath(out),
                Reader(),
                quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=["MatMul", "Gemm", "Conv"],  # the linears and the attention products
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep,
                extra_options={"MatMulConstBOnly": not attention},
            )
        with open(out, "rb") as src:
            atomic_write(path, functools.partial(shutil.copyfileobj, src))


@contextlib.contextmanager
def _quiet_progress():
    """NNCF draws `rich` progress bars on the console and ONNX Runtime's quantiser logs advice through
    the root logger; both are swallowed (errors still raise)."""
    import io

    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


# --------------------------------------------------------------------------- the runtimes


def onnxruntime_fn(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    ort = _import("onnxruntime", "onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    ort_run = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    name = ort_run.get_inputs()[0].name
    return lambda x: ort_run.run(None, {name: x})[0]


def openvino_config(precision: str, threads: int | None, streams: int = 1) -> dict[str, Any]:
    """OpenVINO's CPU settings for `precision` on `threads` threads (None: its own choice) in `streams`."""
    # OpenVINO's CPU default on a bf16-capable CPU is bf16: fp32 asks for f32. int8 runs its unquantised
    # rest (softmax, norms) in bf16 where that is native: SwinV2-T 256 px batch 8 ran 1.18x the bf16
    # model's speed that way, 1.02x with an f32 rest.
    rest_bf16 = precision == "bf16" or (precision == "int8" and native_bf16("openvino"))
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if rest_bf16 else "f32"}
    # One stream (LATENCY): every thread works on the whole batch, op after op. More streams
    # (THROUGHPUT): the batch is cut into `streams` parts run at once, each on its own share of the
    # threads, so the small ops (norms, softmax, reshapes) of one part overlap the matmuls of another.
    # Which is faster depends on the machine: `--runtime auto` times both.
    config["PERFORMANCE_HINT"] = "LATENCY" if streams == 1 else "THROUGHPUT"
    if streams > 1:
        config["NUM_STREAMS"] = streams
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def openvino_fn(
    path: Path, precision: str, threads: int | None, streams: int = 1
) -> Callable[[np.ndarray], np.ndarray]:
    core = _ov_core()
    config = openvino_config(precision, threads, streams)
    # OpenVINO keeps what it compiled beside the graph and reuses it for the same graph file, settings
    # and version; given the file's path (not a read model) it then skips reading the graph too: a
    # later load of SwinV2-T took 0.2 s instead of 1.6.
    config["CACHE_DIR"] = os.fspath(path.parent / "openvino-compiled")
    compiled = core.compile_model(os.fspath(path), "CPU", config)
    if streams == 1:
        request = compiled.create_infer_request()
        return lambda x: request.infer({0: x})[0].copy()
    ov = _import("openvino", "openvino")
    queue = ov.AsyncInferQueue(compiled, streams)
    parts: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: parts.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def infer(x: np.ndarray) -> np.ndarray:
        chunks = np.array_split(x, min(streams, len(x)))
        parts.clear()
        for i, chunk in enumerate(chunks):
            queue.start_async({0: np.ascontiguousarray(chunk)}, i)
        queue.wait_all()
        return np.concatenate([parts[i] for i in range(len(chunks))])

    return infer


def _takes_any_size(graph: str | None) -> bool:
    """Whether `graph` was exported with dynamic height and width (`export_onnx(dynamic_size=True)`),
    as its sidecar `<graph>.json` records; a graph without one is fixed at its size. A sidecar of
    another export than the graph raises CheckpointError (`export.read_sidecar`)."""
    if graph is None or not graph.endswith(".onnx"):  # OpenVINO's int8 IR: fixed, no sidecar
        return False
    from .export import read_sidecar

    try:
        return read_sidecar(graph).get("dynamic_size") is True
    except FileNotFoundError:
        return False


@dataclass
class Runtime:
    """A loaded runtime: `rt(x)` -> (B, num_classes) float32 logits of (B, 3, img_size, img_size) images."""

    name: str
    precision: str
    img_size: int
    num_classes: int
    infer: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    path: str | None = None  # the graph it runs (None for torch)
    note: str = ""  # how it was chosen (auto) or what it runs
    streams: int = 1  # OpenVINO: parts of a batch run at once (`openvino_fn`)

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        if (
            self.name != "torch"
            and tuple(x.shape[2:]) != (self.img_size, self.img_size)
            and not _takes_any_size(self.path)
        ):
            raise InputError(
                f"the {self.name} graph is fixed at {self.img_size}x{self.img_size} px; got "
                f"{x.shape[2]}x{x.shape[3]} (use --img-size {x.shape[2]} to export at that size)"
            )
        return self.infer(x.detach().cpu().float())

    @property
    def label(self) -> str:
        """The runtime and its setting: "openvino", "openvino x2 streams"."""
        return _label(self.name, self.streams)

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.label} {self.precision}{where}" + (f"; {self.note}" if self.note else "")

    def as_module(self) -> nn.Module:
        """This runtime as an `nn.Module` (for `evaluate`): forward(x) = self(x)."""
        return _RuntimeModule(self)


class _RuntimeModule(nn.Module):
    def __init__(self, rt: Runtime) -> None:
        super().__init__()
        self.rt = rt
        self.num_classes = rt.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rt(x)


def _numpy_infer(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.from_numpy(np.asarray(fn(np.ascontiguousarray(x.numpy())), dtype=np.float32))


def _torch_infer(model: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if precision == "bf16":
        import copy

        model = copy.deepcopy(model).to(torch.bfloat16)
    model = model.eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(dtype)).float()

    return infer


def load_runtime(
    model: nn.Module,
    runtime: str = "auto",
    precision: str = "fp32",
    *,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    calib: str | os.PathLike | Sequence[np.ndarray] | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    streams: int = 1,
) -> Runtime:
    """`model` (a loaded SwinTransformerV2, eval preprocessing in `model.info`) run by `runtime`
    ("torch", "onnxruntime", "openvino" or "auto") in `precision` ("fp32", "bf16", "int8").

    `img_size` defaults to the model's eval size; the ONNX runtimes' graphs are fixed at it. `weights`
    (the file the model came from) places the export cache beside it; `cache_dir` puts it there
    instead. `calib` is the folder of calibration images for int8. "auto" times batches of
    `batch_size` images, at most `AUTO_MAX_BATCH` (the ranking, not the throughput, is what it needs),
    and weighs OpenVINO with one stream and with `auto_streams()`. `streams` > 1 runs an OpenVINO
    batch as that many parts at once (`openvino_fn`). Raises `RuntimeUnavailable` (a ValueError)
    with one line for a missing package or an unsupported precision.
    """
    model = cast(SwinTransformerV2, model)  # typed as a Module for callers; a SwinTransformerV2 here
    if img_size is None:  # model_info fills the preprocessing in from the config where the weights gave none
        img_size = cast(EvalPreprocess, model_info(model).preprocess).img_size
    if runtime == "auto":
        return _auto(
            model,
            precision,
            weights=weights,
            img_size=img_size,
            calib=calib,
            cache_dir=cache_dir,
            threads=threads,
            batch_size=batch_size,
        )
    check_supported(runtime, precision)
    model = model.eval().float().cpu()
    num_classes = model.config.num_classes
    if runtime == "torch":
        return Runtime("torch", precision, img_size, num_classes, _torch_infer(model, precision))
    sha = weights_sha256(model)
    root = export_root(sha, weights=weights, cache_dir=cache_dir)
    with _cache_folder(root):  # checked, made if needed and loaded while no other process changes the folder
        if precision == "int8":
            graph = int8_graph(model, root, sha, img_size, calib, runtime)
        else:
            graph = fp32_onnx(model, root, sha, img_size)
        if runtime == "onnxruntime":
            fn, streams = onnxruntime_fn(graph, threads), 1
        else:
            fn = openvino_fn(graph, precision, threads, streams)
    return Runtime(runtime, precision, img_size, num_classes, _numpy_infer(fn), path=os.fspath(graph), streams=streams)


# --------------------------------------------------------------------------- auto


def _machine() -> str:
    return f"{cpu_name()} x{os.cpu_count()}"


def _versions(runtimes: Iterable[str]) -> dict[str, str]:
    return {r: importlib.import_module(r).__version__ for r in runtimes}


def time_runtimes(
    runtimes: dict[str, Runtime],
    x: torch.Tensor,
    *,
    passes: int = 2,
    calls: int = 3,
    warmup: int = 1,
    settle_s: float = 0.3,
) -> dict[str, float]:
    """Images/s of each runtime on `x`: each timed in a block of its own (`warmup` calls, then the
    median of `calls`), in `passes` passes with the order reversed each time; a runtime's best block
    counts. Not call by call in turns: ONNX Runtime's and OpenVINO's thread pools keep spinning for a
    while after a call, and on a small machine that slows whichever runs next. `settle_s` of sleep
    before each block lets the last pool go idle."""
    from ..timing import median_seconds

    names = list(runtimes)
    best = dict.fromkeys(names, 0.0)
    for p in range(passes):
        for name in names if p % 2 == 0 else names[::-1]:
            time.sleep(settle_s)
            seconds = median_seconds(functools.partial(runtimes[name], x), calls=calls, warmup=warmup)
            best[name] = max(best[name], x.shape[0] / seconds)
    return best


def auto_streams() -> int:
    """The streams `--runtime auto` weighs beside one: two, or none where PyTorch runs on one thread."""
    return 2 if torch.get_num_threads() >= 2 else 1


def settings(runtime: str) -> list[tuple[str, int]]:
    """(runtime, streams) settings `--runtime auto` times for `runtime`."""
    if runtime == "openvino" and auto_streams() > 1:
        return [(runtime, 1), (runtime, auto_streams())]
    return [(runtime, 1)]


def _label(runtime: str, streams: int) -> str:
    """How a (runtime, streams) setting is named in notes and in `runtime-auto.json`."""
    return runtime + (f" x{streams} streams" if streams > 1 else "")


def _auto(
    model: SwinTransformerV2, precision: str, *, weights, img_size: int, calib, cache_dir, threads, batch_size: int
) -> Runtime:
    batch_size = min(batch_size, AUTO_MAX_BATCH)
    candidates: dict[str, tuple[str, int]] = {}
    reasons = []
    for r in RUNTIMES:
        try:
            check_supported(r, precision)
            candidates |= {_label(*setting): setting for setting in settings(r)}
        except RuntimeUnavailable as e:
            reasons.append(str(e))
    if not candidates:
        raise RuntimeUnavailable(f"--runtime auto: no installed runtime runs {precision} here ({'; '.join(reasons)})")
    memo_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "runtime-auto.json"
    memo_key = json.dumps(
        {
            "machine": _machine(),
            "threads": threads or torch.get_num_threads(),
            "versions": _versions({r for r, _ in candidates.values() if r != "torch"}) | {"torch": torch.__version__},
            "config": model.config.to_dict(),
            "img_size": img_size,
            "batch": batch_size,
            "precision": precision,
            "candidates": sorted(candidates),
        },
        sort_keys=True,
    )
    memo = _read_key(memo_path) or {}
    kw = dict(weights=weights, img_size=img_size, calib=calib, cache_dir=cache_dir, threads=threads)

    def load(label: str) -> Runtime:
        runtime, streams = candidates[label]
        return load_runtime(model, runtime, precision, streams=streams, **kw)

    if memo_key in memo and memo[memo_key]["pick"] in candidates:
        rec = memo[memo_key]
        rt = load(rec["pick"])
        rt.note = f"auto picked {rec['pick']}: " + _rates(rec["img_per_s"]) + f" (measured {rec['date']}, {memo_path})"
        return rt
    if len(candidates) == 1:
        rt = load(next(iter(candidates)))
        rt.note = f"auto: the only runtime here for {precision}"
        return rt
    runtimes = {label: load(label) for label in candidates}
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    rates = time_runtimes(runtimes, x)
    pick = max(rates, key=rates.__getitem__)
    memo[memo_key] = {"pick": pick, "img_per_s": rates, "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(memo_path, memo)
    except OSError as e:
        log.warning("could not remember the auto choice in %s: %s", memo_path, e)
    rt = runtimes[pick]
    rt.note = f"auto picked {pick}: " + _rates(rates) + f" at batch {batch_size} (measured now)"
    return rt


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{n} {v:.1f} img/s" for n, v in sorted(rates.items(), key=lambda kv: -kv[1]))
