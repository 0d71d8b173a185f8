"""`swinv2 predict` on a folder of JPEGs, the whole command, against the same runtime on the model alone.

The folder: N photographs' worth of JPEGs (500 x 375 or 375 x 500, quality 90), random crops of
scikit-learn's two sample photographs (china.jpg, flower.jpg) resized to that size, so decoding and
resizing cost what they cost on camera pictures of that size. The model: SwinV2-T window 8 at 256 px
with drawn weights (`swinv2.tools.bench.randomize_weights_`; the speed does not depend on the values),
saved as a self-describing `.safetensors` file. The runtime: OpenVINO, bf16 where the CPU has native
bf16, else fp32.

Each round runs, one after the other:

  * the user's command, in its own process (its export cache warmed by an untimed first run):
        swinv2 predict --weights W --runtime openvino --precision P --batch-size 32 --workers K FOLDER
    whose last line gives img/s for the whole command (process start to last result, loading the
    weights and compiling the runtime included) and once the runtime was compiled;
  * the model alone, just before and just after the command: the same runtime
    (`swinv2.serve.runtime.load_runtime`, same cached graph) on one batch of 32 images already in memory,
    median of 6 calls after 2 warm-up calls; the round's rate is the mean of the two (a shared
    machine's speed drifts over a minute).

The ratios (whole command / model alone, and once compiled / model alone) are medians over rounds; the
target is 0.8 for the whole command.

    python benchmarks/predict_folder.py [--images 800] [--rounds 3] [--workers 0]

Writes benchmarks/results/predict_folder.{md,json}; `make bench` adds the row to the performance table.
Work goes to runs/predict_folder/ (the JPEGs, the weights, the export cache), reused when present.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "predict_folder"
RESULTS = ROOT / "benchmarks" / "results" / "predict_folder"
MODEL = "swinv2_tiny_window8_256"
BATCH = 32
TARGET = 0.8
SIZES = ((500, 375), (375, 500))  # (width, height): landscape and portrait camera pictures, 4:3
LINE = re.compile(r"(\d+) images? in ([\d.]+) s: ([\d.]+) img/s for the whole command, ([\d.]+) img/s once")


def build_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` JPEGs in `folder`, random crops of scikit-learn's sample photographs resized to a 4:3 camera
    size (kept when the folder already holds exactly them)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from swinv2.outputs import atomic_write

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = SIZES[i % 2]
        scale = rng.uniform(0.6, 1.0) * min(photo.width / w, photo.height / h)
        cw, ch = int(w * scale), int(h * scale)
        x0, y0 = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
        img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        atomic_write(folder / f"{i:05d}.jpg", lambda f, img=img: img.save(f, format="JPEG", quality=90))
    return folder


def build_weights(path: Path) -> Path:
    """SwinV2-T with drawn weights, saved self-describing (kept when present)."""
    import swinv2
    from swinv2.tools.bench import randomize_weights_

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        swinv2.save_weights(randomize_weights_(swinv2.create_model(MODEL)), path, model_name=MODEL)
    return path


def predict_command(weights: Path, folder: Path, cache: Path, precision: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "swinv2",
        "predict",
        "--weights",
        str(weights),
        "--runtime",
        "openvino",
        "--precision",
        precision,
        "--batch-size",
        str(BATCH),
        "--workers",
        str(workers),
        "--cache-dir",
        str(cache),
        str(folder),
    ]


def run_predict(cmd: list[str]) -> dict:
    """One run of the user's command: its reported images, seconds and img/s."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    match = LINE.search(done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    n, seconds, whole, loaded = match.groups()
    return dict(images=int(n), seconds=float(seconds), whole_img_per_s=float(whole), loaded_img_per_s=float(loaded))


def model_alone(runtime, calls: int = 6) -> float:
    """img/s of `runtime` on one batch of BATCH images in memory: median of `calls` after 2 warm-ups."""
    import torch

    from swinv2.timing import median_seconds

    x = torch.randn(BATCH, 3, runtime.img_size, runtime.img_size, generator=torch.Generator().manual_seed(0))
    return BATCH / median_seconds(lambda: runtime(x), calls=calls, warmup=2)


def measure(*, images: int = 800, rounds: int = 3, workers: int = 0, work: Path = WORK) -> dict:
    """Rounds of [the whole command, the model alone]; the record `main` writes and `make bench` reads."""
    import torch

    import swinv2
    from swinv2.serve import runtime as rt

    precision = "bf16" if rt.native_bf16("openvino") else "fp32"
    folder = build_jpegs(work / f"jpegs{images}", images)
    weights = build_weights(work / f"{MODEL}.safetensors")
    cache = work / "cache"
    cmd = predict_command(weights, folder, cache, precision, workers)
    run_predict(cmd)  # warms the export cache: exporting once is not what the steady state costs
    runtime = rt.load_runtime(swinv2.load_model(weights), "openvino", precision, weights=weights, cache_dir=cache)
    per_round = []
    for _ in range(rounds):
        before = model_alone(runtime)
        command = run_predict(cmd)
        alone = (before + model_alone(runtime)) / 2
        per_round.append(
            dict(
                command,
                model_img_per_s=alone,
                whole_ratio=command["whole_img_per_s"] / alone,
                loaded_ratio=command["loaded_img_per_s"] / alone,
            )
        )
    whole = statistics.median(r["whole_ratio"] for r in per_round)
    return dict(
        model=MODEL,
        images=images,
        image_sizes=[f"{w}x{h}" for w, h in SIZES],
        batch_size=BATCH,
        runtime="openvino",
        precision=precision,
        workers=workers,
        threads=torch.get_num_threads(),
        command=" ".join(["swinv2"] + cmd[3:]).replace(f"{ROOT}/", ""),
        rounds=per_round,
        whole_ratio=whole,
        loaded_ratio=statistics.median(r["loaded_ratio"] for r in per_round),
        whole_img_per_s=statistics.median(r["whole_img_per_s"] for r in per_round),
        model_img_per_s=statistics.median(r["model_img_per_s"] for r in per_round),
        target=TARGET,
        met=whole >= TARGET,
    )


def markdown(record: dict) -> str:
    from swinv2.hardware import cpu_name

    lines = [
        "# `swinv2 predict` on a folder of JPEGs against the model alone",
        "",
        f"`python benchmarks/predict_folder.py --images {record['images']} --rounds {len(record['rounds'])} "
        f"--workers {record['workers']}` on {time.strftime('%Y-%m-%d')} ({cpu_name()}, "
        f"{record['threads']} threads). {record['images']} JPEGs ({' and '.join(record['image_sizes'])}, "
        f"crops of scikit-learn's sample photographs), {record['model']}, {record['runtime']} "
        f"{record['precision']}, batch {record['batch_size']}. Command: `{record['command']}`.",
        "",
        "| round | whole command (img/s) | once compiled (img/s) | model alone (img/s) | whole / alone | "
        "compiled / alone |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(record["rounds"], 1):
        lines.append(
            f"| {i} | {r['whole_img_per_s']:.1f} | {r['loaded_img_per_s']:.1f} | {r['model_img_per_s']:.1f} "
            f"| {r['whole_ratio']:.2f} | {r['loaded_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Median whole / alone: **{record['whole_ratio']:.2f}** (target >= {record['target']}: "
        f"{'met' if record['met'] else 'not met'}); once compiled / alone: {record['loaded_ratio']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="swinv2 predict --workers")
    args = ap.parse_args()
    print(write_results(measure(images=args.images, rounds=args.rounds, workers=args.workers)))
    return 0


def write_results(record: dict) -> str:
    """Write RESULTS.{json,md}; returns the markdown."""
    from swinv2.outputs import write_output

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_output(RESULTS.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    md = markdown(record)
    write_output(RESULTS.with_suffix(".md"), md)
    return md


if __name__ == "__main__":
    raise SystemExit(main())
