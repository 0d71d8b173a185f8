"""Same-process A/B of eager CPU inference with and without the per-block image grouping.

`swinv2.model.INFERENCE_CHUNK_BYTES` sets how many images each block runs at once in eager CPU
inference; a huge value turns the grouping off (the whole batch at once). This script alternates the
two settings on one model, in interleaved rounds, and prints throughput, minor page faults per forward
(`getrusage`), and the median of the per-round paired speed-ups with its quartiles.

    python benchmarks/inference_grouping.py --batch 8 --rounds 21
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import swinv2
import swinv2.model as swin_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinv2_tiny_window8_256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = swinv2.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    settings = {"whole batch": 1 << 62, "grouped": swin_model.INFERENCE_CHUNK_BYTES}
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    faults = dict.fromkeys(settings, 0)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        for _ in range(args.rounds):
            for name, chunk_bytes in settings.items():
                swin_model.INFERENCE_CHUNK_BYTES = chunk_bytes
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                model(x)
                seconds[name].append(time.perf_counter() - start)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    n = args.rounds
    for name in settings:
        paired = sorted(a / b for a, b in zip(seconds["whole batch"], seconds[name]))
        print(f"{args.model} batch {args.batch} {name:11s}: {args.batch / statistics.median(seconds[name]):6.2f} img/s, "
              f"{faults[name] // n:7d} page faults/forward, speed-up {paired[n // 2]:.3f} "
              f"(quartiles {paired[n // 4]:.3f}-{paired[3 * n // 4]:.3f})")


if __name__ == "__main__":
    main()
