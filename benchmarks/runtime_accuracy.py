"""What bf16 and int8 cost in accuracy against fp32, on two sets of real images, with models trained here.

Two sets, both built from data that ships inside scikit-learn (nothing is downloaded):

* digits: the demo's set (`swinv2.train.datasets.build_digits_folder`: 1797 real 8x8 digit scans upscaled to
  32 px, stratified 80/20 split, 360 val images), model trained with configs/demo_digits.yaml.
* digits on photos: each image is one real handwritten digit (the same scans, bicubic-upscaled to a
  random size) pasted at a random place, in a random colour and opacity, onto a random crop of one of
  scikit-learn's two sample photographs (china.jpg, flower.jpg), RGB, 48 px (`build_photo_digits`).
  Train / val are split by digit sample with the demo's rule (the same 360 val digits, never seen in
  training) and by photo region (train crops from the left 70% of each photo, val from the right
  30%). Model: configs/digits_on_photos.yaml, a fine-tune of the digits model at 48 px (from scratch
  the small model stayed at chance for as long as this script can afford).

For each set and each runtime / precision this machine runs (torch fp32 is the reference; torch bf16
and OpenVINO bf16 only where the CPU has native bf16, `swinv2.serve.runtime.native_bf16`; OpenVINO and
ONNX Runtime int8 calibrated on 128 training images, evenly spread over the sorted training files;
ONNX Runtime fp32),
the user's command does the measuring:

    swinv2 eval --weights W --data VAL --runtime R --precision P [--calib CALIB] --compare-fp32 --json OUT

and its report gives val top-1, the top-1 delta against PyTorch fp32, the top-1 agreement and the max /
mean |logit difference|. Its img/s is end to end (PNG decoding and resizing in the same process,
batch 64); the model alone is timed too, on one batch of 64 val images, each runtime in its own block
(median of 25 calls after 3 warm-up calls), one after another in one process (see `time_models`).

    python benchmarks/runtime_accuracy.py            # writes benchmarks/results/runtime_accuracy.{json,md}
    python benchmarks/runtime_accuracy.py --fresh    # rebuild the data, retrain, export again

Work goes to runs/runtime_accuracy/ (data folders, runs, calibration folders, eval reports, exported
graphs); whatever is finished there is reused on the next run unless --fresh.
`--demo-from RUN` takes the digits model from a finished run of configs/demo_digits.yaml (e.g.
runs/demo_digits, what `make demo` writes) instead of training it again; its config is checked
against the recipe first.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "runtime_accuracy"
RESULTS = ROOT / "benchmarks" / "results" / "runtime_accuracy"
SWINV2 = [sys.executable, "-m", "swinv2"]
CALIB_IMAGES = 128
QUIET = ["train.tensorboard=false", "train.progress=false", "train.log_every=1000"]
TARGETS = {"bf16": 0.3, "int8": 0.5}  # the project's: |top-1 delta| vs fp32 at most this many points


# --------------------------------------------------------------------------- digits on photographs


def build_photo_digits(
    root: str | os.PathLike,
    *,
    img_size: int = 48,
    train_copies: int = 2,
    val_copies: int = 2,
    val_fraction: float = 0.2,
    train_region: float = 0.7,
    seed: int = 0,
) -> Path:
    """scikit-learn's digits pasted onto crops of its two sample photographs, as an image folder
    `root/{train,val}/<digit>/<n>.png` (RGB, `img_size` px); built once, atomically (see the module doc).

    Per image: a square crop of side 1-2 x `img_size` from one photo (train: left `train_region` of
    its width; val: the rest), resized to `img_size`; the digit scan upscaled (bicubic) to 60-85% of
    `img_size`, placed at random wholly inside; its ink pasted in a random colour at opacity 0.85-1,
    the colour drawn until its luminance differs by at least 100 (of 255) from the background under
    the digit (so dark digits on light ground and light on dark both occur). Each training digit gives
    `train_copies` images, each val digit `val_copies`, every one on its own crop, place, size and colour.
    Deterministic in `seed`.
    """
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images
    from sklearn.model_selection import train_test_split

    from swinv2.outputs import atomic_folder

    root = Path(root)
    if (root / ".complete").exists():
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but is not complete (no .complete marker); remove it")
    digits = load_digits()
    ink = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in 0..1
    idx = np.arange(len(ink))
    # The demo's split rule (build_digits_folder): the same 360 val digits.
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]  # china, flower: 427 x 640
    rng = np.random.default_rng(seed)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)

    def compose(i: int, split: str) -> Image.Image:
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        cut = int(round(w * train_region))
        x_lo, x_hi = (0, cut) if split == "train" else (cut, w)
        side = int(rng.integers(img_size, min(int(img_size * 2), x_hi - x_lo, h) + 1))
        x0 = int(rng.integers(x_lo, x_hi - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        bg = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side]).resize((img_size, img_size), Image.BICUBIC)
        bg = np.asarray(bg, dtype=np.float32)
        d = int(rng.integers(int(0.6 * img_size), int(0.85 * img_size) + 1))
        glyph = Image.fromarray(ink[i], mode="F").resize((d, d), Image.BICUBIC)
        alpha = np.clip(np.asarray(glyph, dtype=np.float32), 0.0, 1.0) * rng.uniform(0.85, 1.0)
        px, py = (int(rng.integers(0, img_size - d + 1)) for _ in range(2))
        under = bg[py : py + d, px : px + d]
        bg_luma = float((under.reshape(-1, 3) @ luma).mean())
        for _ in range(100):
            colour = rng.integers(0, 256, size=3).astype(np.float32)
            if abs(float(colour @ luma) - bg_luma) >= 100:
                break
        else:
            colour = np.full(3, 0.0 if bg_luma > 127 else 255.0, dtype=np.float32)
        a = alpha[..., None]
        bg[py : py + d, px : px + d] = under * (1 - a) + colour * a
        return Image.fromarray(bg.round().clip(0, 255).astype(np.uint8), mode="RGB")

    with atomic_folder(root) as tmp:
        for split, ids, copies in (("train", train_idx, train_copies), ("val", val_idx, val_copies)):
            for i in sorted(ids):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(copies):
                    compose(int(i), split).save(folder / f"{i:04d}_{k}.png")
        (tmp / ".complete").write_text(
            f"digits on photos: sklearn load_digits on load_sample_images crops, {img_size}px, train copies "
            f"{train_copies}, val copies {val_copies}, val_fraction {val_fraction}, train region {train_region}, "
            f"seed {seed}\n"
        )
    return root


def build_calib(train: Path, out: Path, n: int = CALIB_IMAGES) -> Path:
    """`n` training images evenly spread over the sorted files of `train`, copied to `out/<class>/`."""
    from swinv2.outputs import atomic_folder

    if out.is_dir():
        return out
    files = sorted(p for p in train.rglob("*.png"))
    pick = [files[i * len(files) // n] for i in range(n)]
    with atomic_folder(out) as tmp:
        for f in pick:
            (tmp / f.parent.name).mkdir(exist_ok=True)
            shutil.copy2(f, tmp / f.parent.name / f.name)
    return out


# --------------------------------------------------------------------------- the models


def _train_seconds(run: Path) -> float:
    """Training wall time of a run: the sum of its epochs' times in metrics.jsonl."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return round(sum(r.get("epoch_time_s", 0.0) for r in rows if "epoch" in r), 1)


def _last_metrics(run: Path) -> dict:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if "val_top1" in r][-1]


def train(recipe: Path, overrides: list[str], out: Path) -> dict:
    """Train `recipe` into `out/run` (a finished run there is reused; fit resumes an unfinished one);
    the run's numbers, kept in out/result.json."""
    from swinv2.config import load_config
    from swinv2.train.engine import fit

    cfg = load_config(recipe, overrides)
    done = out / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("config") == cfg.to_dict() and Path(result["weights"]).is_file():
            return result
        shutil.rmtree(out / "run", ignore_errors=True)  # another recipe: train afresh, do not resume
        done.unlink()
    t0 = time.perf_counter()
    summary = fit(cfg, out / "run")
    run = out / "run"
    last = _last_metrics(run)
    result = {
        "recipe": os.path.relpath(recipe, ROOT),
        "overrides": overrides,
        "weights": summary["weights"],
        "final_val_top1": last["val_top1"],
        "final_val_ema_top1": last.get("val_ema_top1"),
        "best": summary.get("best"),
        "epochs": last["epoch"],
        "train_seconds": _train_seconds(run),
        "fit_call_seconds": round(time.perf_counter() - t0, 1),
        "config": cfg.to_dict(),
    }
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def adopt(run: Path, recipe: Path, overrides: list[str], out: Path) -> dict:
    """The weights of a finished run `run` of `recipe` (e.g. runs/demo_digits from `make demo`), copied to
    `out/run/` so that a retraining there later does not change what was measured; refused when the run's
    config differs from the recipe in anything but where the data lives and how the run was logged."""
    import yaml

    from swinv2.config import RESUME_MAY_CHANGE, config_changes, load_config

    cfg = load_config(recipe, overrides)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    changes = config_changes(saved, cfg.to_dict())
    if cfg.model.num_classes is None:  # the recipe leaves it to the data; the run resolved it
        changes.pop("model.num_classes", None)
    altering = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if altering:
        raise SystemExit(f"--demo-from {run}: its config differs from {recipe}: {altering}")
    last = _last_metrics(run)
    if last["epoch"] < cfg.train.epochs:
        raise SystemExit(f"--demo-from {run}: unfinished ({last['epoch']} of {cfg.train.epochs} epochs)")
    dst = out / "run"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("best.safetensors", "config.yaml", "metrics.jsonl"):
        shutil.copy2(run / name, dst / name)
    weights = dst / "best.safetensors"
    result = {
        "recipe": os.path.relpath(recipe, ROOT),
        "overrides": overrides,
        "weights": str(weights),
        "adopted_from": os.path.relpath(run.resolve(), ROOT),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "final_val_top1": last["val_top1"],
        "final_val_ema_top1": last.get("val_ema_top1"),
        "epochs": last["epoch"],
        "train_seconds": _train_seconds(run),
        "config": cfg.to_dict(),
        "config_differences_allowed": {k: list(v) for k, v in changes.items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# --------------------------------------------------------------------------- measuring


COMBOS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
]


def eval_cli(weights: str, val: Path, calib: Path, cache: Path, runtime: str, precision: str, out: Path) -> dict:
    """One `swinv2 eval ... --compare-fp32 --json` run; its report, or why it did not run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "swinv2",
        "eval",
        "--weights",
        weights,
        "--data",
        str(val),
        "--runtime",
        runtime,
        "--precision",
        precision,
        *(["--calib", str(calib)] if precision == "int8" else []),
        "--cache-dir",
        str(cache),
        "--compare-fp32",
        "--json",
        str(out),
    ]
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(SWINV2 + cmd[1:], capture_output=True, text=True, cwd=ROOT)
    row = {
        "runtime": runtime,
        "precision": precision,
        "command": " ".join(_rel(c) for c in cmd),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "exit": proc.returncode,
    }
    if proc.returncode != 0 or not out.is_file():
        row["error"] = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        row["error"] = row["error"][0]
        return row
    report = json.loads(out.read_text())
    ref = report["fp32"]
    row.update(
        {
            "top1": report["top1"],
            "top5": report["top5"],
            "loss": report["loss"],
            "n": report["n"],
            "img_per_s_end_to_end": report["img_per_s"],
            "fp32_top1": ref["top1"],
            "top1_delta": ref["top1_delta"],
            "top1_agreement": ref["top1_agreement"],
            "max_abs_logit_diff": ref["max_abs_logit_diff"],
            "mean_abs_logit_diff": ref["mean_abs_logit_diff"],
            "stderr_notes": [ln for ln in proc.stderr.splitlines() if ln.strip()][-6:],
        }
    )
    return row


def _rel(s: str) -> str:
    """A path argument relative to the repository (for the record); anything else unchanged."""
    try:
        p = Path(s)
        return os.path.relpath(p, ROOT) if p.is_absolute() else s
    except ValueError:
        return s


def time_models(
    weights: str, val: Path, calib: Path, cache: Path, rows: list[dict], batch: int = 64, calls: int = 25
) -> dict:
    """Model-only images/s of every runtime that ran in `rows` on one batch of `batch` val images: each
    runtime in its own block (3 warm-up calls, then the median of `calls`), one after another in one
    process, on the exports eval cached. Not interleaved (`swinv2.serve.runtime.time_runtimes`): on 2 cores a
    runtime timed right after ONNX Runtime or OpenVINO ran several times slower than alone (their
    thread pools keep spinning after a call), which interleaving charges to whoever comes next."""
    import torch

    import swinv2
    from swinv2.serve.runtime import calibration_set, load_runtime
    from swinv2.timing import median_seconds

    model = swinv2.load_model(weights)
    img_size = swinv2.weights.registry.model_info(model).preprocess.img_size
    images, _ = calibration_set(val, model, img_size, limit=batch)
    x = torch.from_numpy(np.concatenate(images))
    rates = {}
    for r in rows:
        if "top1" not in r:
            continue
        rt = load_runtime(model, r["runtime"], r["precision"], calib=calib, cache_dir=cache, img_size=img_size)
        rates[f"{r['runtime']} {r['precision']}"] = len(x) / median_seconds(partial(rt, x), calls=calls, warmup=3)
        del rt
        time.sleep(0.5)  # let the last runtime's pool go idle
    return {
        "batch": len(x),
        "img_size": img_size,
        "torch_threads": torch.get_num_threads(),
        "calls": calls,
        "img_per_s": rates,
    }


def machine() -> str:
    from swinv2.hardware import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} CPUs, python {platform.python_version()}"


def versions() -> dict:
    import importlib

    out = {}
    for name in ("torch", "openvino", "nncf", "onnxruntime", "swinv2"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not needed
            out[name] = f"not available ({type(e).__name__})"
    return out


# --------------------------------------------------------------------------- the report


def target_check(row: dict) -> str:
    limit = TARGETS.get(row["precision"])
    if limit is None or "top1" not in row:
        return ""
    return f"{'met' if abs(row['top1_delta']) <= limit + 1e-9 else 'MISSED'} (±{limit})"


def table(record: dict) -> list[str]:
    lines = [
        "| set | runtime / precision | val top-1 | Δ top-1 vs torch fp32 | top-1 agreement | "
        "max / mean abs logit diff | img/s, eval end to end | img/s, model only (batch 64) | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in record["sets"]:
        rates = s["model_only"]["img_per_s"]
        for r in s["rows"]:
            name = f"{r['runtime']} {r['precision']}"
            if "top1" not in r:
                lines.append(f"| {s['label']} | {name} | not run here: {r['error']} | | | | | | |")
                continue
            lines.append(
                f"| {s['label']} | {name} | {r['top1']:.2f}% | {r['top1_delta']:+.2f} | "
                f"{r['top1_agreement']:.2f}% | {r['max_abs_logit_diff']:.3g} / {r['mean_abs_logit_diff']:.3g} | "
                f"{r['img_per_s_end_to_end']:.0f} | {rates.get(name, float('nan')):.0f} | "
                f"{target_check(r)} |"
            )
    return lines


def markdown(record: dict) -> str:
    def trained(t: dict) -> str:
        where = f", the run in {t['adopted_from']}" if t.get("adopted_from") else ""
        return f"trained with {t['recipe']} ({t['train_seconds']:.0f} s of training{where}; its best epoch's weights)"

    sets = "; ".join(
        f"{s['label']}: {s['n_val']} val images ({s['description']}), {s['model']} {trained(s['training'])}"
        for s in record["sets"]
    )
    return "\n".join(
        [
            "# Accuracy of bf16 and int8 against fp32",
            "",
            f"`{record['command']}` on {record['date']} ({record['machine']}; {record['wall_seconds']:.0f} s in all; "
            "runs found finished are reused, their training is not in it).",
            "",
            f"{sets}. Each row is `swinv2 eval --runtime R --precision P --compare-fp32` (int8: NNCF or ONNX "
            f"Runtime, calibrated on {CALIB_IMAGES} training images); Δ and agreement are against PyTorch fp32 on "
            "the same images. "
            "End-to-end img/s includes PNG decoding and resizing in one process; model-only img/s is the median of 25 "
            "calls on one batch of 64 val images, each runtime timed alone after warm-up (a shared machine: img/s is "
            "indicative only). Targets: bf16 within 0.3 points of fp32, "
            "int8 within 0.5.",
            "",
            *table(record),
            "",
        ]
    )


def trained_sets(work: Path, demo_from: str | None, timings: dict[str, float]) -> list[dict]:
    """Both sets built under `work/data` and their models trained (or reused, or adopted from
    `demo_from`); each set's dict holds its key, label, root, recipe and training record. Adds the
    seconds each step took to `timings`."""
    from swinv2.train.datasets import build_digits_folder

    t0 = time.perf_counter()
    digits = build_digits_folder(work / "data" / "digits32")
    photos = build_photo_digits(work / "data" / "digits_on_photos48")
    timings["data"] = round(time.perf_counter() - t0, 1)

    quiet_data = lambda root: [f"data.root={root}", *QUIET]  # noqa: E731
    demo_recipe, photo_recipe = ROOT / "configs" / "demo_digits.yaml", ROOT / "configs" / "digits_on_photos.yaml"
    sets = [
        {
            "key": "digits",
            "label": "digits 32 px",
            "root": digits,
            "recipe": demo_recipe,
            "description": "scikit-learn digits, the demo's set",
        },
        {
            "key": "digits_on_photos",
            "label": "digits on photos 48 px",
            "root": photos,
            "recipe": photo_recipe,
            "description": "one digit per image on a crop of china.jpg / flower.jpg, val digits and photo regions "
            "unseen in training; the model is a fine-tune of the digits model",
        },
    ]
    for s in sets:
        t0 = time.perf_counter()
        out = work / s["key"]
        overrides = quiet_data(s["root"])
        if s["key"] == "digits_on_photos":  # a fine-tune of the digits model (configs/digits_on_photos.yaml)
            overrides.append(f"model.weights={sets[0]['training']['weights']}")
        if s["key"] == "digits" and demo_from and not (out / "result.json").is_file():
            s["training"] = adopt(Path(demo_from), s["recipe"], overrides, out)
        else:
            s["training"] = train(s["recipe"], overrides, out)
        timings[f"train_{s['key']}"] = round(time.perf_counter() - t0, 1)
        print(
            f"{s['key']}: model {s['training']['weights']}: val top-1 {s['training']['final_val_top1']:.2f}% "
            f"({s['training']['train_seconds']:.0f} s of training)",
            flush=True,
        )

    return sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(WORK), help="data, runs, exports and eval reports (default %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="writes RESULTS.json and RESULTS.md")
    p.add_argument(
        "--demo-from",
        metavar="RUN",
        default=None,
        help="take the digits model from this finished run "
        "of configs/demo_digits.yaml (e.g. runs/demo_digits) instead of training it",
    )
    p.add_argument("--fresh", action="store_true", help="rebuild the data folders, retrain, export again")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from swinv2.outputs import check_output, write_output

    results = Path(args.results)
    for suffix in (".json", ".md"):
        check_output(results.with_suffix(suffix), "results")
    work = Path(args.work).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    sets = trained_sets(work, args.demo_from, timings)

    for s in sets:
        t0 = time.perf_counter()
        out = work / s["key"]
        weights = s["training"]["weights"]
        val, calib, cache = (
            s["root"] / "val",
            build_calib(s["root"] / "train", out / f"calib{CALIB_IMAGES}"),
            out,
        )  # graphs: out/exports/
        s["rows"] = []
        for runtime, precision in COMBOS:
            row = eval_cli(weights, val, calib, cache, runtime, precision, out / "eval" / f"{runtime}-{precision}.json")
            s["rows"].append(row)
            shown = (
                f"top-1 {row['top1']:.2f}% delta {row['top1_delta']:+.2f} agreement {row['top1_agreement']:.2f}%"
                if "top1" in row
                else f"not run: {row['error']}"
            )
            print(f"  {s['key']} {runtime} {precision}: {shown} ({row['wall_seconds']} s)", flush=True)
        s["model_only"] = time_models(weights, val, calib, cache, s["rows"])
        timings[f"eval_{s['key']}"] = round(time.perf_counter() - t0, 1)
        s["model"] = s["training"]["config"]["model"]["name"] + (
            f" at {s['training']['config']['model']['img_size']} px"
            if s["training"]["config"]["model"]["img_size"]
            else ""
        )
        s["n_val"] = sum(1 for _ in val.rglob("*.png"))
        s["n_train"] = sum(1 for _ in (s["root"] / "train").rglob("*.png"))
        s["root"], s["recipe"] = _rel(str(s["root"])), _rel(str(s["recipe"]))
        s["training"] = {k: (_rel(v) if k == "weights" else v) for k, v in s["training"].items() if k != "config"}

    record = {
        "command": "python benchmarks/runtime_accuracy.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "targets_abs_top1_delta_points": TARGETS,
        "calibration_images": CALIB_IMAGES,
        "sets": sets,
        "timings_seconds": timings,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    record["machine"] += f", load average {record['load_average_at_end']} at the end"
    write_output(results.with_suffix(".json"), json.dumps(record, indent=1, default=str) + "\n")
    md = markdown(record)
    write_output(results.with_suffix(".md"), md)
    print(md)
    print(f"wrote {results.with_suffix('.json')} and {results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
