"""Same-process A/B of an eager CPU inference fast path against its alternative.

Each comparison switches one setting on the same model and alternates the two settings in interleaved
rounds (this shared 2-core machine drifts by +-10 % between runs, so only paired, same-process
ratios mean anything). It prints throughput, minor page faults per forward (`getrusage`), and the
median of the per-round paired speed-ups with its quartiles. As `make bench`, the process first keeps
freed memory for reuse (`swinv2.allocator`); `--default-malloc` keeps glibc's defaults instead.

  grouping  each block over groups of images within `swinv2.model.INFERENCE_CHUNK_BYTES`, against
            the whole batch at once
  linear    the linears as F.linear (MKL's addmm; ours), against oneDNN's linear with the bias in its
            epilogue (`mkldnn._linear_pointwise`); fc1's GELU in place after either

    python benchmarks/inference_ab.py grouping --batch 8 --rounds 21
    python benchmarks/inference_ab.py linear --batch 8 --rounds 21 [--default-malloc]
    python benchmarks/inference_ab.py linear --dtype bf16 --rounds 15   (bf16 weights and input)
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

import swinv2
import swinv2.model as swin_model
from swinv2.allocator import retain_freed_cpu_memory


def whole_batch() -> contextlib.AbstractContextManager:
    return mock.patch.object(swin_model, "INFERENCE_CHUNK_BYTES", 1 << 62)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linears() -> contextlib.AbstractContextManager:
    """Every F.linear (the model's, and the one inside `fused.linear_gelu`) as oneDNN's linear."""
    return mock.patch.object(torch.nn.functional, "linear", _onednn_linear)


# name -> (label of ours, label of the alternative, context manager that switches to the alternative)
COMPARISONS: dict[str, tuple[str, str, Callable[[], contextlib.AbstractContextManager]]] = {
    "grouping": ("grouped", "whole batch", whole_batch),
    "linear": ("addmm", "oneDNN linear", onednn_linears),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comparison", choices=sorted(COMPARISONS))
    ap.add_argument("--model", default="swinv2_tiny_window8_256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc defaults")
    args = ap.parse_args()
    if not args.default_malloc:
        retain_freed_cpu_memory()

    ours, alternative, switch = COMPARISONS[args.comparison]
    settings = {alternative: switch, ours: contextlib.nullcontext}
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = swinv2.create_model(args.model).eval().to(dtype)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size).to(dtype)
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    faults = dict.fromkeys(settings, 0)
    with torch.inference_mode():
        for setting in settings.values():
            with setting():
                model(x)
        for _ in range(args.rounds):
            for name, setting in settings.items():
                with setting():
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    model(x)
                    seconds[name].append(time.perf_counter() - start)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    n = args.rounds
    width = max(map(len, settings))
    for name in settings:
        paired = sorted(a / b for a, b in zip(seconds[alternative], seconds[name]))
        print(f"{args.model} {args.dtype} batch {args.batch} {name:{width}s}: {args.batch / statistics.median(seconds[name]):6.2f} "
              f"img/s, {faults[name] // n:7d} page faults/forward, speed-up {paired[n // 2]:.3f} "
              f"(quartiles {paired[n // 4]:.3f}-{paired[3 * n // 4]:.3f})")


if __name__ == "__main__":
    main()
