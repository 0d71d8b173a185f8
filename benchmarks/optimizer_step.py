"""One AdamW step over a SwinV2's parameters: torch's default (for-loop on the CPU), foreach and
fused implementations side by side, in interleaved rounds, on the optimizer groups `swinv2 train`
builds (official no-decay set). `build_optimizer` picks the fused kernel where it can.

    python benchmarks/optimizer_step.py --model swinv2_tiny_window8_256
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import swinv2
from swinv2.schedule import param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swinv2_tiny_window8_256")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    base = swinv2.create_model(args.model)
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {}
    for name, kwargs in kinds.items():
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizers[name] = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, **kwargs)
        optimizers[name].step()  # state allocated outside the timing
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            seconds[name].append(time.perf_counter() - start)
    n_params = sum(1 for _ in base.parameters())
    default = statistics.median(seconds["default"])
    for name in kinds:
        t = statistics.median(seconds[name])
        print(f"{args.model} ({n_params} tensors) AdamW {name:8s}: {t * 1e3:7.2f} ms/step  "
              f"({default / t:.2f}x the default)")


if __name__ == "__main__":
    main()
