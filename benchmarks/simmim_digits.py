"""Does SimMIM pretraining without labels pay off with few labels? The demo's digits, 10% of the labels.

scikit-learn's handwritten digits (1797 real 8x8 scans upscaled to 32 px, the demo's stratified 80/20
split) as three folders: all 1437 training images (and the 360 val images) copied into flat folders
with NO class folders for the pretraining, and a class-folder tree with 10% of the training labels
(stratified, fixed) plus all val images for the fine-tuning. The two stages are those of
`configs/simmim_digits.yaml` (resolved by `recipes.plan_recipe`, data roots and budget overridden):
SimMIM pretraining of swinv2_micro_window4_32 (0.09M parameters) once, then fine-tuning from its best
encoder with layer-wise LR decay, against the same fine-tuning budget from a random initialisation
(same images, epochs, batch, seeds, recipe; layer decay off, as nothing is pretrained). Both are
scored on all 360 validation images; the whole comparison takes minutes on 2 CPU cores.

    python benchmarks/simmim_digits.py                  # writes benchmarks/results/simmim_digits.{json,md,png}
    python benchmarks/simmim_digits.py --seeds 0 1 2 3 4 --pretrain-epochs 200

Runs go to runs/simmim_digits_bench/ (a finished run is reused when the script runs again with the same
config: delete the folder to measure afresh). Helpers shared with benchmarks/finetune_digits.py are
imported from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_digits import (  # noqa: E402
    COMMON,
    MICRO,
    ROOT,
    _row,
    arm_summary,
    arm_table,
    cached_fit,
    copy_classes,  # (benchmarks/ is not a package)
    run,
)
from swinv2.config import Config, load_config  # noqa: E402
from swinv2.outputs import (
    IMG_EXTENSIONS,  # noqa: E402
    atomic_folder,  # noqa: E402
)
from swinv2.train.datasets import build_digits_folder  # noqa: E402
from swinv2.train.recipes import plan_recipe  # noqa: E402

RECIPE = ROOT / "configs" / "simmim_digits.yaml"


def build_folders(work: Path, label_fraction: float, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """(unlabelled root, fine-tune root, image counts) from the demo's digits folder."""
    full = build_digits_folder(ROOT / "runs" / ".cache" / "digits32")
    flat, ft = work / "data_unlabelled", work / f"data_finetune_{label_fraction:g}"
    for split in ("train", "val"):
        if not (flat / split).is_dir():  # every image of the split, class folders flattened away
            with atomic_folder(flat / split) as tmp:
                for f in sorted((full / split).rglob("*.png")):
                    shutil.copy2(f, tmp / f.name)
    rng = np.random.default_rng(seed)
    for split, fraction in (("train", label_fraction), ("val", 1.0)):
        copy_classes(
            full / split, ft / split, sorted(d.name for d in (full / split).iterdir() if d.is_dir()), fraction, rng
        )
    count = lambda d: sum(1 for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)  # noqa: E731
    counts = {
        "pretrain_train": count(flat / "train"),
        "pretrain_val": count(flat / "val"),
        "finetune_train": count(ft / "train"),
        "finetune_val": count(ft / "val"),
    }
    return flat, ft, counts


def pretrain(cfg: Config, out: Path) -> dict:
    """Pretrain (or reuse a finished run in `out`): val reconstruction loss per evaluated epoch, time."""

    def numbers(summary: dict, out: Path) -> dict:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {
            "final_val_loss": summary["final"]["val_loss"],
            "best_val_loss": summary["best"]["val_loss"],
            "best_epoch": summary["best"]["epoch"],
            "curve": [[r["epoch"], r["train_loss"], r.get("val_loss")] for r in rows],
        }

    return cached_fit(cfg, out, numbers)


def curve(out: Path) -> list[list[float]]:
    """[epoch, train loss, val top-1] of a classification run's evaluated epochs."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r["epoch"], r["train_loss"], r["val_top1"]] for r in rows if "val_top1" in r]


def plot(record: dict, path: Path) -> None:
    """Pretraining losses, and val top-1 per epoch of every fine-tuning run of both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    c = np.array(record["pretrain"]["curve"], dtype=float)
    axes[0].plot(c[:, 0], c[:, 1], label="train (random masks)")
    ok = ~np.isnan(c[:, 2])
    axes[0].plot(c[ok, 0], c[ok, 2], marker=".", label="val (fixed masks)")
    axes[0].set(xlabel="pretraining epoch", ylabel="masked-pixel L1 loss", title="SimMIM pretraining, no labels")
    for (arm, a), color in zip(record["arms"].items(), ("tab:blue", "tab:orange")):
        for i, r in enumerate(a["runs"]):
            c = np.array(r["curve"], dtype=float)
            axes[1].plot(c[:, 0], c[:, 2], color=color, alpha=0.8, label=arm if i == 0 else None)
    axes[1].set(
        xlabel="fine-tuning epoch",
        ylabel="val top-1 (%)",
        title=f"{record['images']['finetune_train']} labelled images, one line per seed",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "simmim_digits_bench"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "simmim_digits"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument(
        "--epochs",
        type=int,
        default=200,
        help="fine-tune / scratch epochs (at batch 16: 9 steps each; both arms still gain at 100)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides, e.g. stages.0.optim.lr=1e-3"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    flat, ft_root, counts = build_folders(work, args.label_fraction)
    print(f"images: {counts}", flush=True)

    over = [
        f"stages.0.data.root={flat}",
        "stages.0.data.source=folder",
        f"stages.1.data.root={ft_root}",
        "stages.1.data.source=folder",
        f"stages.1.train.epochs={args.epochs}",
        f"stages.1.data.batch_size={args.batch_size}",
        *COMMON,
        *args.set,
    ]
    if args.pretrain_epochs:
        over.append(f"stages.0.train.epochs={args.pretrain_epochs}")
    recipe = load_config(RECIPE, over)
    plans = plan_recipe(recipe, work)
    pre_cfg, ft_base = plans[0].cfg, plans[1].cfg

    pre = pretrain(pre_cfg, plans[0].dir)
    print(
        f"pretrain: val loss {pre['final_val_loss']:.4f} (best {pre['best_val_loss']:.4f} at epoch "
        f"{pre['best_epoch']}) in {pre['seconds']} s",
        flush=True,
    )

    arms = {
        "SimMIM -> fine-tune": ft_base,
        "scratch": ft_base.replace(
            **{"model.weights": None, "model.pretrained_window_sizes": None, "optim.layer_decay": None}
        ),
    }
    record_arms: dict[str, list[dict]] = {}
    for arm, base in arms.items():
        record_arms[arm] = []
        for seed in args.seeds:
            out = work / f"{'finetune' if base is ft_base else 'scratch'}_s{seed}"
            cfg = base.replace(**{"train.seed": seed})
            result = run(cfg, out)
            record_arms[arm].append({"seed": seed, **_row(result), "curve": curve(out)})
            print(f"{arm} seed {seed}: {result['final_top1']:.2f}% ({result['seconds']} s)", flush=True)

    record = {
        "command": "python benchmarks/simmim_digits.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, "
        f"python {platform.python_version()}",
        "model": MICRO,
        "images": counts,
        "label_fraction": args.label_fraction,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "overrides": over,
        "pretrain": _row(pre)
        | {
            "epochs": pre_cfg.train.epochs,
            "lr": pre_cfg.optim.lr,
            "mask_patch_size": pre_cfg.simmim.mask_patch_size,
            "mask_ratio": pre_cfg.simmim.mask_ratio,
        },
        "finetune": {"lr": ft_base.optim.lr, "layer_decay": ft_base.optim.layer_decay},
        "arms": {k: arm_summary(v) for k, v in record_arms.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_results(record, Path(args.results))
    return 0


def write_results(record: dict, results: Path) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, results.with_suffix(".png"))
    pre, n = record["pretrain"], record["images"]
    lines = [
        f"# SimMIM pretraining without labels, then fine-tuning with {record['label_fraction']:.0%} of the labels",
        "",
        f"`{record['command'].strip()}` on {record['date']} ({record['machine']}); {record['wall_seconds']:.0f} s "
        "in all (runs found in the run folder are reused, their time as first measured).",
        "",
        f"Model {record['model']}. Pretraining (`configs/simmim_digits.yaml` stage 1): {n['pretrain_train']} "
        f"training images in a flat folder (no labels), {pre['epochs']} epochs, {pre['mask_patch_size']} px squares "
        f"at ratio {pre['mask_ratio']}, lr {pre['lr']:g} at batch 32: "
        f"val reconstruction loss {pre['final_val_loss']:.4f} "
        f"(best {pre['best_val_loss']:.4f} at epoch {pre['best_epoch']}; {pre['seconds']:.0f} s). "
        f"Fine-tuning (stage 2): {n['finetune_train']} labelled training images ({record['label_fraction']:.0%}, "
        f"stratified, fixed), {record['epochs']} epochs at batch {record['batch_size']}, layer decay "
        f"{record['finetune']['layer_decay']}; scratch: the same recipe from a random initialisation (layer decay "
        f"off). Seeds {', '.join(map(str, record['seeds']))}; scored on all {n['finetune_val']} val images.",
        "",
        *arm_table(record["arms"]),
    ]
    lines += [
        "",
        f"Curves: `{results.with_suffix('.png').name}` (pretraining losses; val top-1 per epoch of "
        "every fine-tuning run).",
    ]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {results.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    raise SystemExit(main())
