"""Does pretraining pay off with few labels? Digits 0-4 -> digits 5-9 with 10% of the labels.

scikit-learn's handwritten digits (1797 real 8x8 scans, upscaled to 32 px as in the demo, the demo's
stratified 80/20 split) are cut by class: a model pretrained on digits 0-4 (all their training
images) is fine-tuned with `configs/finetune_micro.yaml` on digits 5-9 with 10% of their training labels
(stratified, fixed), and compared with the same budget from scratch (same images, epochs, batch and
seeds; the scratch runs use the demo's from-scratch recipe, whose LR suits a model without a start
point). Both are scored on all validation images of digits 5-9. The model is the demo's
swinv2_micro_window4_32 (0.09M parameters), so the whole comparison takes a few minutes on 2 CPU cores.

The fine-tune recipe is `configs/finetune_micro.yaml` as shipped, with only the data, the epochs and
the batch set here: `configs/finetune.yaml`'s values for the published variants, with the LR at the
micro model's scale (the demo's from-scratch LR per image: a 0.09M-parameter model trains at a far
higher LR than SwinV2-T). `--lr-ratios` scales its LR triple (LR, warm-up LR, minimum LR) by a factor.

    python benchmarks/finetune_digits.py                 # writes benchmarks/results/finetune_digits.{json,md}
    python benchmarks/finetune_digits.py --seeds 0 1 2 3 4 --lr-ratios 0.05 0.2 1.0

Runs go to runs/finetune_digits/ (a finished run is reused when the script runs again: delete the
folder to measure afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from swinv2 import create_model
from swinv2.config import Config, load_config
from swinv2.outputs import atomic_folder
from swinv2.train.datasets import build_digits_folder
from swinv2.train.engine import fit
from swinv2.weights.files import save_weights

ROOT = Path(__file__).resolve().parent.parent
MICRO = "swinv2_micro_window4_32"
PRETRAIN_CLASSES = ["0", "1", "2", "3", "4"]
TARGET_CLASSES = ["5", "6", "7", "8", "9"]
COMMON = [
    "train.threads=1",
    "data.workers=1",
    "train.tensorboard=false",
    "train.progress=false",
    "train.log_every=1000",
    "data.source=folder",
    "train.eval_every=5",
]


def build_splits(work: Path, label_fraction: float, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """(pretrain root, fine-tune root, image counts): class folders copied from the demo's digits folder."""
    full = build_digits_folder(ROOT / "runs" / ".cache" / "digits32")
    pre, ft = work / "data_pretrain_0-4", work / f"data_finetune_5-9_{label_fraction:g}"
    rng = np.random.default_rng(seed)
    for root, split, classes, fraction in (
        (pre, "train", PRETRAIN_CLASSES, 1.0),
        (pre, "val", PRETRAIN_CLASSES, 1.0),
        (ft, "train", TARGET_CLASSES, label_fraction),
        (ft, "val", TARGET_CLASSES, 1.0),
    ):
        copy_classes(full / split, root / split, classes, fraction, rng)
    counts = {
        f"{name}_{split}": sum(1 for _ in (root / split).rglob("*.png"))
        for name, root in (("pretrain", pre), ("finetune", ft))
        for split in ("train", "val")
    }
    counts["target_train_all"] = sum(1 for c in TARGET_CLASSES for _ in (full / "train" / c).glob("*.png"))
    return pre, ft, counts


def copy_classes(src: Path, dst: Path, classes: list[str], fraction: float, rng: np.random.Generator) -> None:
    """Copy class folders src/c to dst/c: every image, or a `fraction` of them drawn by `rng` (drawn even
    where dst/c exists, so one seed always gives the same selection; a folder built before is kept)."""
    for c in classes:
        files = sorted((src / c).glob("*.png"))
        keep = (
            files if fraction >= 1.0 else sorted(rng.choice(files, max(1, round(fraction * len(files))), replace=False))
        )
        if (dst / c).is_dir():
            continue
        with atomic_folder(dst / c) as tmp:
            for f in keep:
                shutil.copy2(f, tmp / f.name)


def cached_fit(cfg: Config, out: Path, numbers: Callable[[dict, Path], dict]) -> dict:
    """Train `cfg` into `out`, or reuse a finished run of the same config there; `numbers(summary, out)`
    and the wall time, weights and config, kept in out/result.json."""
    done = out / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("config") == cfg.to_dict():
            return result
        shutil.rmtree(out)  # another config: measure afresh
    t0 = time.perf_counter()
    summary = fit(cfg, out)
    result = {
        **numbers(summary, out),
        "seconds": round(time.perf_counter() - t0, 1),
        "weights": summary.get("weights"),
        "config": cfg.to_dict(),
    }
    done.write_text(json.dumps(result))
    return result


def run(cfg: Config, out: Path) -> dict:
    """Train (or reuse a finished run in `out`); its final-epoch and best val top-1 and wall time."""
    return cached_fit(
        cfg,
        out,
        lambda summary, _: {
            "final_top1": summary["final"]["val_top1"],
            "best_top1": summary["best"]["val_top1"],
            "best_epoch": summary["best"]["epoch"],
        },
    )


def _row(result: dict) -> dict:
    """A run's numbers for the results file (not its config or local paths)."""
    return {k: v for k, v in result.items() if k not in ("config", "weights")}


def _stats(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {
        "mean": round(statistics.mean(vals), 2),
        "std": round(std, 2),
        "min": round(min(vals), 2),
        "max": round(max(vals), 2),
    }


def arm_summary(runs: list[dict]) -> dict:
    """One arm's runs (one per seed) and their final / best val top-1 statistics and mean time."""
    return {
        "runs": runs,
        "final_top1": _stats(runs, "final_top1"),
        "best_top1": _stats(runs, "best_top1"),
        "seconds_per_run": round(statistics.mean(r["seconds"] for r in runs), 1),
    }


def arm_table(arms: dict[str, dict]) -> list[str]:
    """The markdown table of `arm_summary` results, one row per arm."""
    lines = [
        "| arm | val top-1, last epoch (mean ± std) | min - max | best epoch's top-1 (mean) | s per run |",
        "|---|---|---|---|---|",
    ]
    for k, a in arms.items():
        f = a["final_top1"]
        lines.append(
            f"| {k} | **{f['mean']:.2f}% ± {f['std']:.2f}** | {f['min']:.2f} - {f['max']:.2f} | "
            f"{a['best_top1']['mean']:.2f}% | {a['seconds_per_run']} |"
        )
    return lines


def per_image_lr(c: Config) -> float:
    return c.optim.lr / c.optim.lr_base_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "finetune_digits"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "finetune_digits"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--pretrain-epochs", type=int, default=40)
    p.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="fine-tune / scratch epochs: 100 x 4 steps of 16 images "
        "(finetune.yaml's 30 epochs are meant for thousands of images, here they would be 120 steps)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--lr-ratios",
        type=float,
        nargs="+",
        default=[1.0],
        help="fine-tune LR / the demo's from-scratch LR per image (default: finetune_micro.yaml's, 1)",
    )
    p.add_argument(
        "--scratch-lr-scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="from-scratch runs at these multiples of the demo's LR (a fairness check)",
    )
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pre_root, ft_root, counts = build_splits(work, args.label_fraction)
    print(f"images: {counts}", flush=True)

    demo = ROOT / "configs" / "demo_digits.yaml"
    recipe = ROOT / "configs" / "finetune_micro.yaml"
    ft_yaml = load_config(recipe)
    epochs = args.epochs
    demo_cfg = load_config(demo)
    # The recipe's LR relative to the demo's from-scratch LR, per image (1 as shipped).
    recipe_ratio = per_image_lr(ft_yaml) / per_image_lr(demo_cfg)
    ratios = args.lr_ratios

    # 1. Pretrain on digits 0-4 with the demo's from-scratch recipe, then keep the backbone only.
    pre_cfg = load_config(demo, [f"data.root={pre_root}", f"train.epochs={args.pretrain_epochs}", *COMMON])
    pre = run(pre_cfg, work / "pretrain_0-4")
    print(
        f"pretrain 0-4: val top-1 {pre['final_top1']:.2f}% (best {pre['best_top1']:.2f}%) in {pre['seconds']} s",
        flush=True,
    )
    backbone = work / "pretrain_0-4" / "backbone.safetensors"
    if not backbone.exists():
        save_weights(create_model(MICRO, num_classes=0, weights=pre["weights"]), backbone, model_name=MICRO)

    # 2. Fine-tune on 10% of digits 5-9 (finetune_micro.yaml) against the same budget from scratch (demo recipe).
    same = [
        f"data.root={ft_root}",
        f"train.epochs={epochs}",
        f"data.batch_size={args.batch_size}",
        "data.crop_pct=1.0",
        "data.aug.hflip=0.0",
        "train.ema=false",
        *COMMON,
    ]
    arms: dict[str, list[dict]] = {}
    for ratio in ratios:
        scale = ratio / recipe_ratio
        lrs = (
            []
            if scale == 1
            else [
                f"optim.lr={ft_yaml.optim.lr * scale:.6g}",
                f"schedule.warmup_lr={ft_yaml.schedule.warmup_lr * scale:.6g}",
                f"schedule.min_lr={ft_yaml.schedule.min_lr * scale:.6g}",
            ]
        )
        ft_over = [f"model.weights={backbone}", *lrs, *same]
        key = f"finetune (lr ratio {ratio:g})"
        arms[key] = []
        for seed in args.seeds:
            cfg = load_config(recipe, ft_over + [f"train.seed={seed}"])
            arms[key].append(
                {
                    "seed": seed,
                    "lr": cfg.optim.lr,
                    "lr_base_batch": cfg.optim.lr_base_batch,
                    **_row(run(cfg, work / f"finetune_r{ratio:g}_s{seed}")),
                }
            )
            print(f"{key} seed {seed}: {arms[key][-1]['final_top1']:.2f}%", flush=True)
    for mult in args.scratch_lr_scales:
        key = "scratch" if mult == 1.0 else f"scratch (lr x {mult:g})"
        sc = demo_cfg.schedule
        lrs = [
            f"optim.lr={demo_cfg.optim.lr * mult:.6g}",
            f"schedule.warmup_lr={sc.warmup_lr * mult:.6g}",
            f"schedule.min_lr={sc.min_lr * mult:.6g}",
        ]
        arms[key] = []
        for seed in args.seeds:
            cfg = load_config(demo, same + lrs + [f"train.seed={seed}"])
            out = work / (f"scratch_s{seed}" if mult == 1.0 else f"scratch_x{mult:g}_s{seed}")
            arms[key].append(
                {"seed": seed, "lr": cfg.optim.lr, "lr_base_batch": cfg.optim.lr_base_batch, **_row(run(cfg, out))}
            )
            print(f"{key} seed {seed}: {arms[key][-1]['final_top1']:.2f}%", flush=True)

    record = {
        "command": "python benchmarks/finetune_digits.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, "
        f"python {platform.python_version()}",
        "model": MICRO,
        "images": counts,
        "label_fraction": args.label_fraction,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "recipe_lr_ratio": recipe_ratio,
        "pretrain": _row(pre) | {"epochs": args.pretrain_epochs},
        "arms": {k: arm_summary(v) for k, v in arms.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        f"# Fine-tuning vs from scratch: digits 0-4 -> digits 5-9 with {args.label_fraction:.0%} of the labels",
        "",
        f"`{record['command'].strip()}` on {record['date']} ({record['machine']}); {record['wall_seconds']:.0f} s "
        "in all (runs found in the run folder are reused, their time as first measured).",
        "",
        f"Model {MICRO}; {counts['finetune_train']} training images of digits 5-9 "
        f"({args.label_fraction:.0%} of {counts['target_train_all']}, stratified, fixed), "
        f"{counts['finetune_val']} validation images; {epochs} epochs at batch {args.batch_size}, "
        f"seeds {', '.join(map(str, args.seeds))}. Pretraining: digits 0-4, {counts['pretrain_train']} images, "
        f"{args.pretrain_epochs} epochs of the demo recipe: {pre['final_top1']:.2f}% val top-1 on digits 0-4 "
        f"({pre['seconds']:.0f} s). Fine-tune: configs/finetune_micro.yaml (new head on the 0-4 backbone); scratch: "
        "configs/demo_digits.yaml (its from-scratch LR), both without EMA.",
        "",
        *arm_table(record["arms"]),
    ]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {results.with_suffix('.json')} and {results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
