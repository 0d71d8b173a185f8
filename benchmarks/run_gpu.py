"""The performance table on a CUDA GPU: fp16 / bf16 inference at batch 128 and training, against timm eager
and compiled, with the official model zoo's V100 throughput as a reference point.

    python benchmarks/run_gpu.py --out benchmarks/results [--models swinv2_tiny_window8_256 ...]

Writes OUT/gpu.json and OUT/gpu.md. Uses `swinv2.tools.bench.run` (same weights for every implementation,
CUDA-synchronised, interleaved repeats, medians of paired ratios).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from swinv2.tools import bench
from swinv2.weights.registry import get_variant


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", nargs="+", default=["swinv2_tiny_window8_256", "swinv2_base_window16_256"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("run_gpu.py: no CUDA device is available (use benchmarks/run_cpu.py)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, "
        f"{datetime.date.today().isoformat()}",
        "",
        "| model | mode | dtype | compiled | ours img/s | timm img/s | ours x timm | ours mem / timm | "
        "official FPS (V100, fp16, batch 64) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    raw = []
    for name in args.models:
        fps = get_variant(name).fps_v100
        for train in (False, True):
            for dtype in ("fp16", "bf16"):
                for compiled in (False, True):
                    res = bench.run(
                        name,
                        batch_sizes=(args.batch_size,),
                        dtypes=(dtype,),
                        compile=compiled,
                        train=train,
                        device="cuda",
                        repeats=args.repeats,
                        warmup=3,
                        iters=5,
                        compare=("timm",),
                    )
                    raw += res
                    r = {x["impl"]: x for x in res}
                    lines.append(
                        f"| {name} | {'train' if train else 'infer'} | {dtype} | {'yes' if compiled else 'no'} | "
                        f"{r['ours']['img_per_s']:.0f} | {r['timm']['img_per_s']:.0f} | "
                        f"{r['timm']['ours_speedup']:.2f} | {r['timm']['ours_mem_ratio']:.2f} | "
                        f"{fps if fps and not train else ''} |"
                    )
                    print(lines[-1], flush=True)
    (out / "gpu.json").write_text(json.dumps(dict(meta=bench.environment("cuda"), results=raw), indent=1, default=str))
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
