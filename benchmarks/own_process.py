"""Ours and timm, each alone in a fresh process, under glibc's default malloc and under
`swinv2.allocator.retain_freed_cpu_memory` (the policy `swinv2 train/eval/predict` apply).

`make bench` times every implementation in one process, so under glibc's defaults each one's page
faults depend on the heap the others left. This script measures what a user's own process sees: every
(implementation, policy) pair runs in its own process, the pairs alternate over rounds, and each reports
the median call time and the minor page faults per call (`getrusage`). Same weights and the same call
as `make bench` (`swinv2.bench`): `--mode infer` is the eager forward under inference_mode, `--mode
train` the training step (zero_grad, forward, cross-entropy, backward, AdamW). Processes run at
different moments of a shared machine's load, so their ratios are noisier than same-process ones.
`--flush-denormal` makes every process flush subnormal floats to zero (FTZ/DAZ, set before PyTorch
starts its threads): what each implementation gains from it shows how much of its time went to
subnormal arithmetic (timm's attention feeds its masked, subnormal probabilities to a matmul; ours
flushes them itself in training, `swinv2.fused.softmax_flushed`).

    python benchmarks/own_process.py --mode train --rounds 2 --steps 6
    python benchmarks/own_process.py --mode infer --rounds 3 --steps 8
    python benchmarks/own_process.py --mode train --rounds 2 --steps 6 --flush-denormal
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


def child(impl: str, policy: str, mode: str, steps: int, batch: int, threads: int, flush_denormal: bool) -> None:
    from swinv2.allocator import retain_freed_cpu_memory

    applied = retain_freed_cpu_memory() if policy == "retain" else False
    import torch

    # Each thread keeps its own FTZ/DAZ flags, inherited by the threads it creates: set before the
    # first parallel op, it reaches PyTorch's whole thread pool.
    if flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("this CPU cannot flush denormals")

    from swinv2 import bench
    from swinv2.registry import model_config

    torch.set_num_threads(threads)
    config = model_config(MODEL)
    state = bench.randomize_weights_(bench.SwinTransformerV2(config), 0).state_dict()
    x = torch.randn(batch, 3, *config.img_size, generator=torch.Generator().manual_seed(0))
    model = bench.build_impl(impl, config, state)
    model = model.train() if mode == "train" else model.eval()
    step = bench._make_step(model, train=mode == "train", x=x, dtype=torch.float32, device=torch.device("cpu"))
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
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flush-denormal", action="store_true", help="every process flushes subnormal floats to zero")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, mode=args.mode, steps=args.steps, batch=args.batch, threads=args.threads,
              flush_denormal=args.flush_denormal)
        return 0

    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in PAIRS}
    for r in range(args.rounds):
        for impl, policy in PAIRS:
            cmd = [sys.executable, __file__, "--child", impl, policy, "--mode", args.mode, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            cmd += ["--flush-denormal"] if args.flush_denormal else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[(impl, policy)].append(result)
            note = "" if result["applied"] or policy == "default" else " (policy NOT applied)"
            print(f"round {r + 1}: {impl:4s} {policy:7s} {result['step_s']:.3f} s/call, "
                  f"{result['faults']:7.0f} faults/call{note}", flush=True)
    step = {pair: statistics.median(x["step_s"] for x in runs[pair]) for pair in PAIRS}
    print(f"\n{MODEL} {args.mode}, batch {args.batch}, {args.threads} threads, median over {args.rounds} "
          f"processes of the median of {args.steps} calls{', subnormals flushed' if args.flush_denormal else ''}")
    for impl, policy in PAIRS:
        print(f"  {impl:4s} {policy:7s} {step[(impl, policy)]:.3f} s/call  {args.batch / step[(impl, policy)]:.2f} img/s")
    print(f"ours, retain vs default:              {step[('ours', 'default')] / step[('ours', 'retain')]:.2f}x")
    print(f"timm, retain vs default:              {step[('timm', 'default')] / step[('timm', 'retain')]:.2f}x")
    print(f"ours vs timm, both default malloc:    {step[('timm', 'default')] / step[('ours', 'default')]:.2f}x")
    print(f"ours vs timm, both retaining:         {step[('timm', 'retain')] / step[('ours', 'retain')]:.2f}x")
    print(f"swinv2's CLI process vs timm's (ours retaining, timm default): "
          f"{step[('timm', 'default')] / step[('ours', 'retain')]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
