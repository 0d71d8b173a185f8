"""Same-process A/B of a CPU training fast path against its alternative, with timm as a yardstick.

One model per setting (same weights) and timm's, each with its own AdamW, their training steps
(`swinv2.bench`: zero_grad, forward, cross-entropy, backward, AdamW) alternating in interleaved rounds;
it prints the median step time of each and the medians (with quartiles) of the per-round paired
speed-ups. As `make bench`, the process first keeps freed memory for reuse (`swinv2.allocator`).

  flush   the attention softmax with subnormal probabilities flushed to zero
          (`swinv2.fused.softmax_flushed`, ours), against the plain softmax, whose masked
          probabilities reach the next bmm as subnormal numbers

    python benchmarks/train_ab.py flush --rounds 7
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

import swinv2.model as swin_model
from swinv2 import bench
from swinv2.allocator import retain_freed_cpu_memory
from swinv2.registry import model_config


def plain_softmax() -> contextlib.AbstractContextManager:
    return mock.patch.object(swin_model, "softmax_flushed", lambda s: s.softmax(dim=-1))


# name -> (label of ours, label of the alternative, context manager that switches to the alternative)
COMPARISONS: dict[str, tuple[str, str, Callable[[], contextlib.AbstractContextManager]]] = {
    "flush": ("flushed softmax", "plain softmax", plain_softmax),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comparison", choices=sorted(COMPARISONS))
    ap.add_argument("--model", default="swinv2_tiny_window8_256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    retain_freed_cpu_memory()
    torch.set_num_threads(args.threads)

    ours, alternative, switch = COMPARISONS[args.comparison]
    config = model_config(args.model)
    state = bench.randomize_weights_(bench.SwinTransformerV2(config), 0).state_dict()
    x = torch.randn(args.batch, 3, *config.img_size, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    steps = {}
    for name, setting, impl in ((ours, contextlib.nullcontext, "ours"), (alternative, switch, "ours"),
                                ("timm", contextlib.nullcontext, "timm")):
        model = bench.build_impl(impl, config, state).train()
        steps[name] = (bench._make_step(model, train=True, x=x, dtype=torch.float32, device=cpu), setting)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for step, setting in steps.values():  # warm-up: the heap reaches its peak, then no page faults
        with setting():
            step(), step()
    for _ in range(args.rounds):
        for name, (step, setting) in steps.items():
            with setting():
                start = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - start)
    n = args.rounds
    for name in steps:
        line = f"{args.model} train batch {args.batch} {name:16s}: {statistics.median(seconds[name]):.3f} s/step"
        for other in (alternative, "timm"):
            if other != name:
                paired = sorted(a / b for a, b in zip(seconds[other], seconds[name]))
                line += f", {paired[n // 2]:.3f}x {other} ({paired[n // 4]:.3f}-{paired[3 * n // 4]:.3f})"
        print(line)


if __name__ == "__main__":
    main()
