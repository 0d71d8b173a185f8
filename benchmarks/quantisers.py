"""Which int8 quantiser, which ops in int8 and which runtime settings: every one a user could pick,
timed on SwinV2-T and scored on two sets of real images, side by side in one run.

Speed: SwinV2-T/w8 at 256 px (random weights, `bench.randomize_weights_`), batch 8, `--threads`
threads, each variant in blocks of its own (`runtime.time_runtimes`: warm-up, then the median of
`--calls` calls, two passes in reversed order, the better pass counts) beside our eager fp32, so each
is also a ratio to it. int8 variants are calibrated on 32 seeded N(0, 1) images (the speed does not
depend on the ranges).

Accuracy: the two real sets of benchmarks/runtime_accuracy.py and its trained models (digits 32 px and
digits on photos 48 px, reused from runs/runtime_accuracy/ or trained there first), every variant
calibrated on the same 128 training images; val top-1, its delta against PyTorch fp32 and the top-1
agreement on the same images.

Where the time goes: OpenVINO's per-op performance counters (`PERF_COUNT`) on SwinV2-T, for its fp32
graph and the int8 graph `--precision int8` ships, summed by op type and the precision it ran in.

The variants:
* NNCF -> OpenVINO, as shipped (transformer model type, SmoothQuant off, patch embedding and head fp32),
  with one stream and with two (`--runtime auto` weighs both); with SmoothQuant on; with the
  performance preset (symmetric activations: no zero-point subtraction); with the attention products
  (q·kᵀ, attn·v) left fp32; with every layer in int8 (patch embedding and head too).
* ONNX Runtime static quantisation (MinMax ranges): QDQ, as `--runtime onnxruntime --precision int8`
  ships; QDQ with the attention products fp32; QOperator format; the shipped QDQ graph run by OpenVINO.
* ONNX Runtime dynamic quantisation (weights int8, activation ranges per batch, no calibration).
* PyTorch's PT2E path: `X86InductorQuantizer` + `torch.compile` (torchao's `quantize_pt2e`; where
  torchao is installed: `pip install torchao`).

    python benchmarks/quantisers.py            # writes benchmarks/results/quantisers.{json,md}, and the
                                               # table into docs/performance.md
    python benchmarks/quantisers.py --no-pt2e  # without the PT2E rows (minutes of compiling each)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swinv2.serve.runtime import INT8_FILES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "quantisers"
SHIPPED = {"openvino": "NNCF -> OpenVINO (shipped)", "onnxruntime": "ONNX Runtime static QDQ (shipped)"}
# The shipped graphs' names in a work folder (the cache's, without the size and the suffix).
SHIPPED_OV, SHIPPED_ORT = (Path(INT8_FILES[r].format(size="shipped")).stem for r in ("openvino", "onnxruntime"))
log = logging.getLogger("quantisers")

Fn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Variant:
    name: str
    precision: str
    what: str  # how it is made, for the table
    make: Callable[[Context], Fn]  # builds the callable on (B, 3, S, S) float32 images


@dataclass
class Context:
    model: torch.nn.Module
    onnx: Path  # our checked fp32 graph of `model`
    calib: list[np.ndarray]
    work: Path  # where this model's graphs go
    threads: int


# --------------------------------------------------------------------------- the variants


def _ov(path: Path, precision: str, ctx: Context, streams: int = 1) -> Fn:
    from swinv2.serve.runtime import openvino_fn

    return openvino_fn(path, precision, ctx.threads, streams)


def _ort(path: Path, ctx: Context) -> Fn:
    from swinv2.serve.runtime import onnxruntime_fn

    return onnxruntime_fn(path, ctx.threads)


def _made(ctx: Context, name: str, build: Callable[[Path], None]) -> Path:
    """`ctx.work/name`, built once per run of this script."""
    path = ctx.work / name
    if not path.exists():
        t0 = time.perf_counter()
        build(path)
        log.info("%s built in %.1f s", name, time.perf_counter() - t0)
    return path


def _nncf(name: str, **options) -> Callable[[Context], Path]:
    from swinv2.serve.runtime import quantise_openvino

    return lambda ctx: _made(ctx, f"{name}.xml", lambda p: quantise_openvino(ctx.onnx, ctx.calib, p, **options))


def _nncf_attention_fp32(ctx: Context) -> Path:
    from swinv2.serve.runtime import KEEP_FP32, attention_products, quantise_openvino

    keep = [*KEEP_FP32, *(re.escape(n) for n in attention_products(ctx.onnx))]
    return _made(ctx, "nncf-attn-fp32.xml", lambda p: quantise_openvino(ctx.onnx, ctx.calib, p, keep_fp32=keep))


def _ort_static(name: str, **options) -> Callable[[Context], Path]:
    from swinv2.serve.runtime import quantise_onnxruntime

    return lambda ctx: _made(ctx, f"{name}.onnx", lambda p: quantise_onnxruntime(ctx.onnx, ctx.calib, p, **options))


def _ort_dynamic(ctx: Context) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def build(path: Path) -> None:
        quantize_dynamic(os.fspath(ctx.onnx), os.fspath(path), weight_type=QuantType.QInt8, per_channel=True)

    return _made(ctx, "ort-dynamic.onnx", build)


def _pt2e(ctx: Context) -> Fn:
    """PT2E: torch.export, X86InductorQuantizer's default (static, per-channel weights) config, calibrated
    on `ctx.calib` in batches of 8, converted and compiled by Inductor with freezing."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batch = 8
    x = torch.from_numpy(np.concatenate(ctx.calib[:batch]))
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    with torch.no_grad():
        exported = torch.export.export(ctx.model.eval(), (x,), dynamic_shapes=dims).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for i in range(0, len(ctx.calib), batch):
            prepared(torch.from_numpy(np.concatenate(ctx.calib[i : i + batch])))
        converted = convert_pt2e(prepared)
    torch._inductor.config.freezing = True
    compiled = torch.compile(converted, dynamic=False)

    def fn(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return compiled(torch.from_numpy(a)).float().numpy()

    t0 = time.perf_counter()
    fn(ctx.calib[0].repeat(batch, 0))
    log.info("pt2e compiled in %.1f s", time.perf_counter() - t0)
    return fn


def variants(pt2e: bool, bf16: bool) -> list[Variant]:
    out = [
        Variant("torch eager fp32", "fp32", "the reference", lambda ctx: _torch(ctx.model)),
        Variant("OpenVINO fp32", "fp32", "our ONNX graph", lambda ctx: _ov(ctx.onnx, "fp32", ctx)),
        Variant("ONNX Runtime fp32", "fp32", "our ONNX graph", lambda ctx: _ort(ctx.onnx, ctx)),
    ]
    if bf16:
        out.append(Variant("OpenVINO bf16", "bf16", "inference-precision hint", lambda c: _ov(c.onnx, "bf16", c)))
    out += [
        Variant(
            SHIPPED["openvino"],
            "int8",
            "transformer model type, min / max ranges over all images, 7-bit weights, SmoothQuant off, "
            "patch embedding and head fp32",
            lambda ctx: _ov(_nncf(SHIPPED_OV)(ctx), "int8", ctx),
        ),
        Variant(
            SHIPPED["openvino"] + ", 2 streams",
            "int8",
            "the same graph, THROUGHPUT hint: the batch in 2 parts at once",
            lambda ctx: _ov(_nncf(SHIPPED_OV)(ctx), "int8", ctx, streams=2),
        ),
        Variant(
            "NNCF, NNCF's default ranges and overflow fix",
            "int8",
            "as shipped, activation ranges the mean of per-image min / max, 7-bit weights in the first layer only",
            lambda ctx: _ov(_nncf("nncf-defaults", ranges="mean_minmax", overflow_fix="first_layer")(ctx), "int8", ctx),
        ),
        Variant(
            "NNCF, SmoothQuant on",
            "int8",
            "as shipped, SmoothQuant with NNCF's default alphas",
            lambda ctx: _ov(_nncf("nncf-sq", smooth_quant=True)(ctx), "int8", ctx),
        ),
        Variant(
            "NNCF, performance preset",
            "int8",
            "as shipped, symmetric activations (no zero points)",
            lambda ctx: _ov(_nncf("nncf-perf", preset="performance")(ctx), "int8", ctx),
        ),
        Variant(
            "NNCF, attention products fp32",
            "int8",
            "as shipped, q·kᵀ and attn·v left fp32",
            lambda ctx: _ov(_nncf_attention_fp32(ctx), "int8", ctx),
        ),
        Variant(
            "NNCF, every layer int8",
            "int8",
            "as shipped, patch embedding and head quantised too",
            lambda ctx: _ov(_nncf("nncf-all", keep_fp32=())(ctx), "int8", ctx),
        ),
        Variant(
            SHIPPED["onnxruntime"],
            "int8",
            "MinMax, per-channel s8 weights, u8 activations, patch embedding and head fp32",
            lambda ctx: _ort(_ort_static(SHIPPED_ORT)(ctx), ctx),
        ),
        Variant(
            "ONNX Runtime QDQ, attention products fp32",
            "int8",
            "as shipped, MatMulConstBOnly",
            lambda ctx: _ort(_ort_static("ort-attn-fp32", attention=False)(ctx), ctx),
        ),
        Variant(
            "ONNX Runtime QOperator",
            "int8",
            "as shipped, QLinear operators instead of QDQ",
            lambda ctx: _ort(_ort_static("ort-qop", fmt="qoperator")(ctx), ctx),
        ),
        Variant(
            "ONNX Runtime QDQ graph in OpenVINO",
            "int8",
            "the shipped QDQ graph, read by OpenVINO",
            lambda ctx: _ov(_ort_static(SHIPPED_ORT)(ctx), "int8", ctx),
        ),
        Variant(
            "ONNX Runtime dynamic",
            "int8",
            "int8 weights per channel, activation ranges per batch, no calibration",
            lambda ctx: _ort(_ort_dynamic(ctx), ctx),
        ),
    ]
    if pt2e:
        out.append(Variant("PT2E X86InductorQuantizer", "int8", "torchao quantize_pt2e + torch.compile", _pt2e))
    return out


def _torch(model: torch.nn.Module) -> Fn:
    def fn(a: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()

    return fn


def _on_tensors(fn: Fn) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda t: fn(t.numpy())


def _build(v: Variant, ctx: Context) -> tuple[Fn | None, str, float]:
    """The variant's callable (None where it does not build here, with why) and its build seconds."""
    t0 = time.perf_counter()
    try:
        fn = v.make(ctx)
        fn(np.concatenate(ctx.calib[:8]))  # it runs (at the batch timed: PT2E compiles per batch size)
        return fn, "", time.perf_counter() - t0
    except Exception as e:  # a quantiser that fails to build here is a result, not a crash of the run
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
        log.warning("%s: not built: %s", v.name, why)
        return None, why, time.perf_counter() - t0


# --------------------------------------------------------------------------- speed and profile


def speed(vs: list[Variant], name: str, threads: int, calls: int, work: Path) -> tuple[list[dict], dict]:
    import swinv2
    from swinv2.serve.runtime import export_root, fp32_onnx, time_runtimes, weights_sha256
    from swinv2.tools.bench import randomize_weights_
    from swinv2.weights.registry import model_config

    model = randomize_weights_(swinv2.SwinTransformerV2(model_config(name))).eval()
    size = model.config.img_size[0]
    sha = weights_sha256(model)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(1, 3, size, size, generator=g).numpy() for _ in range(32)]
    onnx = fp32_onnx(model, export_root(sha, cache_dir=work), sha, size)
    ctx = Context(model, onnx, calib, onnx.parent, threads)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    rows, fns = [], {}
    for v in vs:
        fn, why, seconds = _build(v, ctx)
        row = {"variant": v.name, "precision": v.precision, "what": v.what, "build_seconds": round(seconds, 1)}
        if fn is None:
            row["error"] = why
        else:
            out = torch.as_tensor(fn(x.numpy()))
            row["max_abs_logit_diff"] = float((out - ref).abs().max())
            fns[v.name] = fn
        rows.append(row)
    rates = time_runtimes({k: _on_tensors(f) for k, f in fns.items()}, x, calls=calls)
    base = rates["torch eager fp32"]
    for row in rows:
        if row["variant"] in rates:
            row["img_per_s"] = round(rates[row["variant"]], 2)
            row["x_eager_fp32"] = round(rates[row["variant"]] / base, 2)
    profile = {
        "OpenVINO fp32": op_profile(onnx, "fp32", threads, x.numpy()),
        SHIPPED["openvino"]: op_profile(_nncf(SHIPPED_OV)(ctx), "int8", threads, x.numpy()),
    }
    return rows, profile


# Op types of OpenVINO's CPU plugin, grouped by what they do in SwinV2 (`_group`).
GROUPS = {
    "linears (FullyConnected)": ("FullyConnected", "FullyConnectedQuantizedLegacy", "Convolution"),
    "attention products (MatMul)": ("MatMul",),
    "softmax": ("Softmax",),
    "norms (LayerNorm, q/k L2 norms)": ("RMS", "MVN", "ReduceL2", "ReduceMean", "PowerStatic", "Sqrt", "Divide"),
    "quantise / dequantise": ("FakeQuantize",),
    "data movement": ("Transpose", "Reshape", "Gather", "Slice", "Concat", "Reorder", "VariadicSplit", "Split"),
    "elementwise (fused Subgraphs, GELU, adds, multiplies)": ("Subgraph", "Add", "Subtract", "Multiply", "Gelu"),
}


def _group(node_type: str, node_name: str) -> str:
    """The `GROUPS` entry of one executed op; the zero-point subtractions and scale multiplications
    that NNCF's dequantisation left (named "...Dequantization...") count as quantise / dequantise."""
    if "Dequantization" in node_name:
        return "quantise / dequantise"
    return next((g for g, ops in GROUPS.items() if node_type in ops), "other")


def op_profile(path: Path, precision: str, threads: int, x: np.ndarray, rounds: int = 3) -> dict:
    """OpenVINO's per-op counters for one batch (the best of `rounds` after a warm-up), summed by op
    type and the precision it ran in (`exec_type`), and by `GROUPS`."""
    from swinv2.serve.runtime import _ov_core, openvino_config

    config = openvino_config(precision, threads) | {"PERF_COUNT": True}
    request = _ov_core().compile_model(os.fspath(path), "CPU", config).create_infer_request()
    request.infer({0: x})
    best = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        request.infer({0: x})
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, request.get_profiling_info())
    assert best is not None
    by_type: dict[str, float] = collections.defaultdict(float)
    groups: dict[str, float] = collections.defaultdict(float)
    for p in best[1]:
        if p.status == p.Status.EXECUTED:
            precision_run = p.exec_type.rsplit("_", 1)[-1] if "_" in p.exec_type else p.exec_type
            ms = p.real_time.total_seconds() * 1000
            by_type[f"{p.node_type} ({precision_run})"] += ms
            groups[_group(p.node_type, p.node_name)] += ms
    total = sum(by_type.values())
    return {
        "wall_ms": round(best[0] * 1000, 1),
        "counted_ms": round(total, 1),
        "by_type_ms": {k: round(v, 1) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
        "by_group_ms": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
    }


# --------------------------------------------------------------------------- accuracy


def _val_set(val: Path, model: torch.nn.Module, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the class folders under `val`, preprocessed as eval does, and its label."""
    from swinv2.images import eval_pipeline
    from swinv2.train.datasets import ImageFolderDataset
    from swinv2.weights.registry import model_info, resolve_preprocess

    transform = eval_pipeline(resolve_preprocess(model, img_size=img_size))
    data = ImageFolderDataset(val, transform, class_names=model_info(model).class_names)
    xs, ys = zip(*(data[i] for i in range(len(data))))
    return np.stack([x.numpy() for x in xs]), np.array(ys)


def accuracy(vs: list[Variant], threads: int, work: Path) -> list[dict]:
    import runtime_accuracy as ra
    import swinv2
    from swinv2.serve.runtime import calibration_set, export_root, fp32_onnx, weights_sha256
    from swinv2.weights.registry import model_info

    timings: dict[str, float] = {}
    sets = ra.trained_sets(ra.WORK, None, timings)
    out = []
    for s in sets:
        model = swinv2.load_model(s["training"]["weights"]).eval()
        img_size = model_info(model).preprocess.img_size
        root = Path(s["root"])
        calib_dir = ra.build_calib(root / "train", ra.WORK / s["key"] / f"calib{ra.CALIB_IMAGES}")
        calib, _ = calibration_set(calib_dir, model, img_size, limit=ra.CALIB_IMAGES)
        sha = weights_sha256(model)
        onnx = fp32_onnx(model, export_root(sha, cache_dir=work / s["key"]), sha, img_size)
        ctx = Context(model, onnx, calib, onnx.parent, threads)
        xs, ys = _val_set(root / "val", model, img_size)
        ref = None
        for v in vs:
            if "2 streams" in v.name:  # the same graph as the row above it
                continue
            fn, why, _ = _build(v, ctx)
            row = {"set": s["label"], "variant": v.name, "precision": v.precision}
            if fn is None:
                out.append({**row, "error": why})
                continue
            logits = np.concatenate([fn(xs[i : i + 64]) for i in range(0, len(xs), 64)])
            pred = logits.argmax(1)
            if ref is None:
                ref = (logits, pred)
            top1 = float((pred == ys).mean() * 100)
            out.append(
                {
                    **row,
                    "n": len(ys),
                    "top1": round(top1, 2),
                    "top1_delta": round(top1 - float((ref[1] == ys).mean() * 100), 2),
                    "top1_agreement": round(float((pred == ref[1]).mean() * 100), 2),
                    "mean_abs_logit_diff": float(np.abs(logits - ref[0]).mean()),
                }
            )
            print(f"  {s['key']} {v.name}: top-1 {top1:.2f}%", flush=True)
    return out


# --------------------------------------------------------------------------- report


def markdown(record: dict) -> str:
    lines = [
        "## int8 quantisers and runtime settings, side by side",
        "",
        f"`{record['command']}` on {record['date']} ({record['machine']}; {record['wall_seconds']:.0f} s in all).",
        "",
        f"Speed: {record['model']} (random weights), batch 8, {record['threads']} threads, img/s (best of two "
        f"passes of blocks, median of {record['calls']} calls each) and the ratio to our eager fp32 in the same run. "
        "Accuracy: val top-1 on the two real sets of benchmarks/runtime_accuracy.py, calibrated on the same "
        "128 training images; delta and agreement against PyTorch fp32 on the same images.",
        "",
    ]
    sets = list(dict.fromkeys(r["set"] for r in record["accuracy"]))
    head = ["variant", "how", "img/s", "x eager fp32", *(f"{s}: top-1 (delta, agreement)" for s in sets)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    acc = {(r["set"], r["variant"]): r for r in record["accuracy"]}
    for r in record["speed"]:
        cells = [r["variant"], r["what"]]
        cells += (
            [f"{r['img_per_s']:.2f}", f"{r['x_eager_fp32']:.2f}"]
            if "img_per_s" in r
            else ["not built", r.get("error", "")]
        )
        for s in sets:
            a = acc.get((s, r["variant"])) or acc.get((s, r["variant"].replace(", 2 streams", "")))
            if a is None:
                cells.append("")
            elif "error" in a:
                cells.append("not built")
            else:
                cells.append(f"{a['top1']:.2f}% ({a['top1_delta']:+.2f}, {a['top1_agreement']:.2f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"### Where the time goes (OpenVINO per-op counters, {record['model']}, batch 8)", ""]
    names = list(record["profile"])
    lines += ["| op group | " + " | ".join(f"{n} (ms)" for n in names) + " |", "|---|" + "---|" * len(names)]
    groups = list(dict.fromkeys(g for p in record["profile"].values() for g in p["by_group_ms"]))
    for g in groups:
        cells = []
        for n in names:
            p = record["profile"][n]
            ms = p["by_group_ms"].get(g, 0.0)
            cells.append(f"{ms:.0f} ({100 * ms / p['counted_ms']:.0f}%)")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append(
        "| counted / wall | "
        + " | ".join(f"{p['counted_ms']:.0f} / {p['wall_ms']:.0f}" for p in record["profile"].values())
        + " |"
    )
    for n in names:
        top = list(record["profile"][n]["by_type_ms"].items())[:8]
        lines += [
            "",
            f"{n}, the largest op types (type (precision run): ms): " + ", ".join(f"{k}: {v:.0f}" for k, v in top),
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="writes RESULTS.json and RESULTS.md")
    p.add_argument("--model", default="swinv2_tiny_window8_256", help="the model timed (random weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=5, help="timed calls per block (median)")
    p.add_argument("--no-pt2e", action="store_true", help="leave out PyTorch's PT2E path")
    p.add_argument("--no-accuracy", action="store_true", help="speed and profile only")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from importlib.util import find_spec

    from runtime_accuracy import machine, versions
    from swinv2.outputs import check_output, write_output
    from swinv2.serve.runtime import native_bf16

    results = Path(args.results)
    for suffix in (".json", ".md"):
        check_output(results.with_suffix(suffix), "results")
    torch.set_num_threads(args.threads)
    pt2e = not args.no_pt2e and find_spec("torchao") is not None
    vs = variants(pt2e, native_bf16("openvino"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swinv2-quantisers-") as work:
        rows, profile = speed(vs, args.model, args.threads, args.calls, Path(work) / "speed")
        acc = [] if args.no_accuracy else accuracy(vs, args.threads, Path(work) / "accuracy")
    record = {
        "command": "python benchmarks/quantisers.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": versions() | ({"torchao": __import__("torchao").__version__} if pt2e else {}),
        "model": args.model,
        "threads": args.threads,
        "calls": args.calls,
        "speed": rows,
        "accuracy": acc,
        "profile": profile,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_output(results.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    md = markdown(record)
    write_output(results.with_suffix(".md"), md)
    from run_cpu import PERFORMANCE, update_block

    update_block(md.split("\n", 2)[2].strip(), PERFORMANCE, ("<!-- quantisers:start -->", "<!-- quantisers:end -->"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
