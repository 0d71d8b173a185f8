"""The training step, each run in a fresh process, under glibc's default malloc and under
`swinv2.allocator.retain_freed_cpu_memory` (the policy `swinv2 train` applies), ours and timm.

`make bench` times every implementation in one process, where whichever ran first leaves its heap to
the others: there our step faults in almost no fresh pages, whereas alone in a process it faults in
most of its activations every step. This script measures what a user's own process sees: every
(implementation, policy) pair runs in its own process, the pairs alternate over rounds, and each reports
the median step time and the minor page faults per step (`getrusage`). Same weights, same step as
`make bench` (`swinv2.bench`: zero_grad, forward, cross-entropy, backward, AdamW).

    python benchmarks/train_allocator.py --rounds 2 --steps 6
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODEL = "swinv2_tiny_window8_256"
PAIRS = [("ours", "default"), ("ours", "retain"), ("timm", "default"), ("timm", "retain")]


def child(impl: str, policy: str, steps: int, batch: int, threads: int) -> None:
    from swinv2.allocator import retain_freed_cpu_memory

    applied = retain_freed_cpu_memory() if policy == "retain" else False
    import torch

    from swinv2 import bench
    from swinv2.registry import model_config

    torch.set_num_threads(threads)
    config = model_config(MODEL)
    state = bench.randomize_weights_(bench.SwinTransformerV2(config), 0).state_dict()
    x = torch.randn(batch, 3, *config.img_size, generator=torch.Generator().manual_seed(0))
    model = bench.build_impl(impl, config, state).train()
    step = bench._make_step(model, train=True, x=x, dtype=torch.float32, device=torch.device("cpu"))
    for _ in range(2):
        step()
    seconds, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(dict(impl=impl, policy=policy, applied=applied, step_s=statistics.median(seconds),
                          faults=statistics.median(faults))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, steps=args.steps, batch=args.batch, threads=args.threads)
        return 0

    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in PAIRS}
    for r in range(args.rounds):
        for impl, policy in PAIRS:
            cmd = [sys.executable, __file__, "--child", impl, policy, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[(impl, policy)].append(result)
            print(f"round {r + 1}: {impl:4s} {policy:7s} {result['step_s']:.3f} s/step, "
                  f"{result['faults']:7.0f} faults/step{'' if result['applied'] or policy == 'default' else ' (policy NOT applied)'}",
                  flush=True)
    step = {pair: statistics.median(x["step_s"] for x in runs[pair]) for pair in PAIRS}
    print(f"\n{MODEL}, batch {args.batch}, {args.threads} threads, median over {args.rounds} processes "
          f"of the median of {args.steps} steps")
    for impl, policy in PAIRS:
        print(f"  {impl:4s} {policy:7s} {step[(impl, policy)]:.3f} s/step  {args.batch / step[(impl, policy)]:.2f} img/s")
    print(f"ours, retain vs default:              {step[('ours', 'default')] / step[('ours', 'retain')]:.2f}x")
    print(f"timm, retain vs default:              {step[('timm', 'default')] / step[('timm', 'retain')]:.2f}x")
    print(f"ours vs timm, both default malloc:    {step[('timm', 'default')] / step[('ours', 'default')]:.2f}x")
    print(f"ours vs timm, both retaining:         {step[('timm', 'retain')] / step[('ours', 'retain')]:.2f}x")
    print(f"swinv2 train's process vs timm's (ours retaining, timm default): "
          f"{step[('timm', 'default')] / step[('ours', 'retain')]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
