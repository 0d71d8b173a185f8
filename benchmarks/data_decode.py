"""Training-data throughput per worker with each JPEG decoder: decode alone, + random-resized crop, + the
whole training transform (`swinv2.tools.data_bench`, the code behind `swinv2 bench --data`).

Two folders of JPEGs cut, flipped and scaled from scikit-learn's sample photographs
(`data_bench.sample_jpegs`): "imagenet-like" (shorter side 300-500 px, as ImageNet's photos) and
"large" (shorter side 900-1500 px, upscaled from the 427 x 640 originals: smoother than camera
pictures of that size, so their decoding costs somewhat less than such pictures would).

Each round runs one fresh process per environment, one after the other (the order alternates per
round): this interpreter, with every decoder installed here, and, with `--pillow-simd DIR`, the same
with DIR ahead on the path (pillow-simd installed there by `pip install --target DIR pillow-simd`),
Pillow's rows only. A row's img/s is the median over rounds; its ratio the median over rounds of
(Pillow's time in this interpreter in that round / the row's). Within a process the decoders take
turns every 10 images, so their ratios are paired closely; pillow-simd's come from the process beside
it in the same round, minutes apart, and move more with the machine's load.

    python benchmarks/data_decode.py [--rounds 3] [--pillow-simd DIR] [--work runs/data_decode]

Writes benchmarks/results/data_decode.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data_decode"
SETS = {"imagenet-like": ((300, 500), 500), "large": ((900, 1500), 100)}  # short side, images
SIZES = (192, 256)
STAGE_ORDER = ("decode", "crop", "train")


def child(folder: Path, decoders: list[str], out: Path) -> None:
    from swinv2.tools import data_bench

    paths = data_bench.find_images(folder)
    results = data_bench.run(paths, img_sizes=SIZES, decoders=decoders, repeats=1)
    out.write_text(json.dumps({"env": data_bench.environment(), "results": results}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pillow-simd", metavar="DIR", default=None, help="a folder holding pillow-simd's PIL")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "data_decode", help="the JPEG folders")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "DECODERS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1].split(","), Path(args.child[2]))

    from swinv2.tools import data_bench

    decoders = data_bench.available_decoders()
    envs = {"": (decoders, None)}
    if args.pillow_simd:
        envs["pillow-simd"] = (["pillow", "pillow-reduced"], args.pillow_simd)
    record: dict[str, Any] = {"meta": {}, "sets": {}}
    for name, (short_side, n) in SETS.items():
        folder = args.work / name
        data_bench.sample_jpegs(folder, n, short_side=short_side)
        rounds: list[dict[str, dict]] = []
        for rnd in range(args.rounds):
            order = list(envs) if rnd % 2 == 0 else list(reversed(envs))
            got: dict[str, dict] = {}
            for env in order:
                decs, simd = envs[env]
                out = args.work / f"{name}-{env or 'pillow'}.json"
                path = os.pathsep.join(p for p in (simd, str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
                cmd = [sys.executable, __file__, "--child", str(folder), ",".join(decs), str(out)]
                subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": path})
                got[env] = json.loads(out.read_text())
                record["meta"][env or "pillow"] = got[env]["env"]
            rounds.append(got)
            print(f"{name}: round {rnd + 1}/{args.rounds} done", flush=True)
        record["sets"][name] = {"short_side": short_side, "images": n, "rows": _rows(rounds, envs)}
    _write(record, args.rounds)


def _rows(rounds: list[dict[str, dict]], envs: dict[str, Any]) -> list[dict[str, Any]]:
    """Median img/s over rounds and median per-round ratio to this interpreter's Pillow."""

    def find(res: list[dict], stage: str, size: Any, impl: str) -> dict:
        return next(r for r in res if (r["stage"], r["img_size"], r["impl"]) == (stage, size, impl))

    rows = []
    for r0 in rounds[0][""]["results"]:
        if r0["impl"] != "pillow":
            continue
        stage, size = r0["stage"], r0["img_size"]
        for env in envs:
            for r in rounds[0][env]["results"]:
                if (r["stage"], r["img_size"]) != (stage, size):
                    continue
                impl = r["impl"] if not env else f"{env}" + ("" if r["impl"] == "pillow" else "-reduced")
                base = [find(rd[""]["results"], stage, size, "pillow")["seconds"][0] for rd in rounds]
                mine = [find(rd[env]["results"], stage, size, r["impl"])["seconds"][0] for rd in rounds]
                n = r["images"]
                rows.append(
                    dict(
                        stage=stage,
                        img_size=size,
                        impl=impl,
                        images=n,
                        img_per_s=statistics.median(n / t for t in mine),
                        x_pillow=statistics.median(b / t for b, t in zip(base, mine)),
                        reductions=r.get("reductions"),
                    )
                )
    order = ["pillow", "pillow-reduced", "simplejpeg", "turbojpeg", "pillow-simd", "pillow-simd-reduced"]
    return sorted(rows, key=lambda r: (STAGE_ORDER.index(r["stage"]), r["img_size"] or 0, order.index(r["impl"])))


def _write(record: dict[str, Any], rounds: int) -> None:
    from swinv2.outputs import write_output
    from swinv2.tools import data_bench

    meta = record["meta"]["pillow"]
    lines = [
        "# Training-data throughput per worker, by JPEG decoder",
        "",
        f"{meta['cpu']}, 1 process, 1 torch thread; Pillow {meta['pillow']}, simplejpeg {meta['simplejpeg']}, "
        f"PyTurboJPEG {meta['turbojpeg']}"
        + (f", pillow-simd {record['meta']['pillow-simd']['pillow']}" if "pillow-simd" in record["meta"] else "")
        + f", timm {meta['timm']}, torch {meta['torch']}; {meta['date'][:10]}; median of {rounds} rounds, "
        "(x) = median per-round ratio to Pillow, above 1 faster. `python benchmarks/data_decode.py`",
    ]
    for name, s in record["sets"].items():
        lo, hi = s["short_side"]
        lines += ["", f"{s['images']} JPEGs, shorter side {lo}-{hi} px ({name}):", ""]
        lines.append(data_bench.format_table(s["rows"]))
        for r in s["rows"]:
            if r["reductions"] and r["impl"] == "pillow-reduced":
                counts = ", ".join(f"1/{k}: {v}" for k, v in r["reductions"].items())
                lines.append(f"\npillow-reduced at {r['img_size']} px decoded the images at {counts}.")
    write_output(f"{RESULTS}.md", "\n".join(lines) + "\n")
    write_output(f"{RESULTS}.json", json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS}.md and .json")


if __name__ == "__main__":
    main()
