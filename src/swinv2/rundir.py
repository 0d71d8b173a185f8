"""The run directory of `swinv2 train --out DIR`, written by rank 0 only:

    config.yaml          the resolved config
    metrics.jsonl        one JSON object per epoch (epoch, train_loss, val_loss, val_top1, val_top5, lr,
                         img_per_s, epoch_time_s, ...); rewritten from the training state on resume
    steps.jsonl          every train.log_every steps: step, epoch, loss, lr, grad_norm, skipped
    tensorboard/         TensorBoard events (train loss / LR / grad norm per log_every steps, val per epoch)
    checkpoints/last.pt  the training state at the latest step boundary
    checkpoints/best_epochNNNN.pt   the best-k training states by train.best_metric
    best.safetensors     the best weights, self-describing (config, class names, eval preprocessing)
    curves.png           loss, accuracy and LR curves
    bad_images.jsonl     unreadable images met, one line per file and epoch (only if any)
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from . import distributed as D
from .checkpoint import find_resumable, save_training_state, save_weights
from .config import Config
from .registry import EvalPreprocess

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, out: Path, env: D.DistEnv, cfg: Config) -> None:
        self.out, self.env, self.cfg = out, env, cfg
        self.is_main = env.is_main
        self.checkpoint_dir = out / "checkpoints"
        self._tb = None
        self._tb_purge: int | None = None
        self._epoch_times: list[float] = []
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(cfg.to_yaml())
        D.barrier(env)

    # ----------------------------------------------------------------------- checkpoints

    def find_resumable(self) -> Path | None:
        """Rank 0 picks the newest loadable checkpoint (removing temp files of killed saves)."""
        path = find_resumable(self.checkpoint_dir) if self.is_main else None
        path = D.broadcast_object(str(path) if path else None, self.env)
        return Path(path) if path else None

    def write_last(self, state: dict[str, Any]) -> Path:
        """checkpoints/last.pt (rank 0)."""
        path = self.checkpoint_dir / "last.pt"
        if self.is_main:
            save_training_state(path, state)
        return path

    def write_best(self, entry: dict[str, Any], state: dict[str, Any], model: nn.Module, classes: list[str],
                   preprocess: EvalPreprocess, model_name: str, *, top: bool) -> None:
        """The new best-k member's training state, and best.safetensors when it ranks first. Written
        before last.pt: a kill in between leaves the best file as the newest complete checkpoint."""
        if self.is_main:
            save_training_state(self.checkpoint_dir / entry["file"], state)
        if top:
            self.write_weights(model, classes, preprocess, model_name)

    def write_weights(self, model: nn.Module, classes: list[str], preprocess: EvalPreprocess, model_name: str) -> None:
        """best.safetensors (rank 0): the best weights, or the latest for a run without validation data."""
        if self.is_main:
            save_weights(model, self.out / "best.safetensors", class_names=classes, preprocess=preprocess,
                         model_name=model_name)

    def prune_best(self, best: list[dict[str, Any]]) -> None:
        """Remove best-k files that fell out of the list (or were left by a kill before pruning)."""
        if not self.is_main:
            return
        keep = {b["file"] for b in best}
        for p in self.checkpoint_dir.glob("best_epoch*.pt"):
            if p.name not in keep:
                p.unlink(missing_ok=True)

    # ----------------------------------------------------------------------- logs and metrics

    def progress_bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                    disable=not (self.is_main and self.cfg.train.progress), unit="step")

    def _writer(self):
        if self._tb is None and self.is_main and self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self._tb_purge)
        return self._tb

    def log_step(self, row: dict[str, Any]) -> None:
        """One line of steps.jsonl (step, epoch, loss, lr, grad_norm, skipped) and its TensorBoard points.
        Lines are only appended: after a resume, re-done steps appear twice (with identical losses)."""
        if not self.is_main:
            return
        with open(self.out / "steps.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.scalars(row["step"], {f"train/{k}": float(row[k]) for k in ("loss", "lr", "grad_norm")})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        w = self._writer()
        if w is not None:
            for k, v in values.items():
                w.add_scalar(k, v, step)

    def resumed(self, history: list[dict[str, Any]], best: list[dict[str, Any]], global_step: int) -> None:
        """Make the files agree with the resumed state: metrics rows, TensorBoard, best-k files."""
        if not self.is_main:
            return
        self._write_metrics(history)
        self._tb_purge = global_step  # TensorBoard drops events at or after this step
        self.prune_best(best)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        path = self.out / "metrics.jsonl"
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        tmp.replace(path)

    def report_bad_files(self, epoch: int, split: str, bad: dict[str, str]) -> int:
        """Gather the unreadable files of every rank; rank 0 lists each once. Returns their count."""
        merged: dict[str, str] = {}
        for part in D.gather_objects(bad, self.env):
            merged.update(part)
        if merged and self.is_main:
            lines = "".join(f"\n  {p}: {r}" for p, r in sorted(merged.items()))
            log.warning("epoch %d: %d unreadable %s images skipped (never replaced by another sample):%s",
                        epoch + 1, len(merged), split, lines)
            with open(self.out / "bad_images.jsonl", "a") as f:
                for p, r in sorted(merged.items()):
                    f.write(json.dumps({"epoch": epoch + 1, "split": split, "path": p, "error": r}) + "\n")
        return len(merged)

    def epoch_done(self, history: list[dict[str, Any]]) -> None:
        """Append the epoch's metrics row, send it to TensorBoard, redraw the curves."""
        if not self.is_main:
            return
        row = history[-1]
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.scalars(row["step"], {f"epoch/{k}": v for k, v in row.items()
                                   if isinstance(v, (int, float)) and k not in ("epoch", "step")})
        if self._tb is not None:
            self._tb.flush()
        from .plots import plot_training_curves

        plot_training_curves(history, self.out / "curves.png")

    def log_epoch(self, row: dict[str, Any], epochs: int) -> None:
        self._epoch_times.append(row["epoch_time_s"])
        eta = (epochs - row["epoch"]) * sum(self._epoch_times) / len(self._epoch_times)
        val = ""
        if "val_top1" in row:
            val = f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"
            if "val_ema_top1" in row:
                val += f" (EMA top-1 {row['val_ema_top1']:.2f}%)"
        log.info("epoch %d/%d  train loss %.4f%s  lr %.2e  %.0f img/s  %.1fs  ETA %s", row["epoch"], epochs,
                 row["train_loss"], val, row["lr"], row["img_per_s"], row["epoch_time_s"], _hms(eta))

    def summary(self, history: list[dict[str, Any]], best: list[dict[str, Any]]) -> dict[str, Any]:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        out: dict[str, Any] = {"run_dir": str(self.out), "checkpoint": str(self.checkpoint_dir / "last.pt"),
                               "curves": str(self.out / "curves.png"), "metrics": str(self.out / "metrics.jsonl")}
        if (self.out / "best.safetensors").exists():
            out["weights"] = str(self.out / "best.safetensors")
        if history:
            out["final"] = history[-1]
        if best:
            out["best"] = {"epoch": best[0]["epoch"], self.cfg.train.best_metric: best[0]["metric"]}
        return out


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
