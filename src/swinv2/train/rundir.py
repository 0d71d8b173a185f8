"""The run directory of `swinv2 train --out DIR`, written by rank 0 only:

.lock                held by the training process (its pid and host inside); a second start refuses.
                     Its presence marks the folder as a run's: a new --out that holds other files
                     is refused (they are the user's), and nothing here is written through a link
config.yaml          the resolved config, written once the run starts (after a successful resume)
metrics.jsonl        one JSON object per epoch (epoch, train_loss, val_loss, val_top1, val_top5, lr,
                     img_per_s, epoch_time_s, ...); rewritten from the training state on resume
steps.jsonl          every train.log_every steps: step, epoch, loss, lr, grad_norm, skipped
tensorboard/         TensorBoard events (train loss / LR / grad norm per log_every steps, val per epoch)
checkpoints/last.pt  the training state at the latest step boundary
checkpoints/best_epochNNNN.pt   the best-k training states by train.best_metric
best.safetensors     the best weights, self-describing (config, class names, eval preprocessing)
curves.png           loss, accuracy and LR curves
reconstructions/     SimMIM pretraining: masked input, reconstruction and original of a few val images per epoch
bad_images.jsonl     unreadable images met, one line per file and epoch (only if any)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import InputError, SwinV2Error
from ..outputs import write_output
from ..preprocess import EvalPreprocess
from ..weights.files import save_weights
from ..weights.training_state import find_resumable, save_training_state
from . import distributed as D

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..model.transformer import SwinTransformerV2

log = logging.getLogger(__name__)


class RunLockedError(SwinV2Error, OSError):
    """The run directory is held by another live training process."""


class RunFolderError(InputError):
    """An --out folder a run must not write into: it holds a link where a run file goes, files no run
    wrote, or another run that this start would replace."""


# What a run writes in its directory (the module doc); nothing else there is ever touched.
RUN_FILES = (
    ".lock",
    "config.yaml",
    "metrics.jsonl",
    "steps.jsonl",
    "bad_images.jsonl",
    "best.safetensors",
    "curves.png",
    "checkpoints",
    "tensorboard",
    "reconstructions",
)
_RUN_FOLDERS = ("checkpoints", "tensorboard", "reconstructions")


def claim(out: Path, owned: Sequence[str] = RUN_FILES, folders: Sequence[str] = _RUN_FOLDERS) -> None:
    """Before a run writes anything into `out`: refuse (RunFolderError, one line) a symbolic link where
    the run writes (at one of the `owned` names, or inside one of the `folders`), since writing through
    it would truncate or replace whatever it points to; and refuse a folder that no run has claimed
    (no `.lock`) but that holds anything besides the run's `folders` (a `checkpoints/` copied there to
    resume from is the run's): a config.yaml or best.safetensors there is the user's own.
    A new or empty `out` passes. Reads only; creates nothing."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file, not a run directory")
    try:
        entries = sorted(os.listdir(out))
    except OSError as e:
        raise RunFolderError(f"--out {out}: cannot be read: {e.strerror or e}") from None
    links = [out / name for name in entries if name in owned and (out / name).is_symlink()]
    for name in folders:
        sub = out / name
        if sub.is_dir() and not sub.is_symlink():
            links += [sub / n for n in sorted(os.listdir(sub)) if (sub / n).is_symlink()]
    if links:
        shown = ", ".join(f"{p.relative_to(out)} -> {os.readlink(p)}" for p in links[:4])
        raise RunFolderError(
            f"run directory {out}: {shown}: a symbolic link where the run writes (a run never "
            f"writes through links); remove {'it' if len(links) == 1 else 'them'}, or train into "
            f"another --out"
        )
    if ".lock" in entries:  # a run folder: what a run wrote there is its own, the rest is never touched
        return
    foreign = [n for n in entries if not (n in folders and (out / n).is_dir())]  # e.g. checkpoints/ copied over
    if foreign:
        shown = ", ".join(foreign[:6]) + (f", ... ({len(foreign) - 6} more)" if len(foreign) > 6 else "")
        raise RunFolderError(
            f"--out {out} holds files no run wrote ({shown}); train into a new or empty folder (nothing was changed)"
        )


# Descriptors of the run locks this process holds. A forked child (a DataLoader worker) gets a copy of
# each, and an flock lasts while any copy is open: a worker outliving a killed trainer would keep the
# run locked. So every fork points the child's copies at /dev/null: only the trainer holds the lock.
_HELD: set[int] = set()


def _drop_locks_in_child() -> None:
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in _HELD:
            os.dup2(null, fd)  # the number stays valid (a later close is harmless); the lock is not held here
    finally:
        os.close(null)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class RunLock:
    """`out/.lock`, held with an flock (released by the kernel when this process ends, however it ends)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        _HELD.add(fd)

    def close(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(text: str) -> str:
    """Who holds the lock, from what it wrote: "process N on HOST (swinv2 train)"; a holder on this host
    that is no longer alive is said to be dead."""
    m = re.match(r"process (\d+) on (\S+)", text)
    if m and m.group(2) == socket.gethostname() and not _alive(int(m.group(1))):
        return (
            f"process {m.group(1)}, which has ended (a process it started still holds the lock; it should "
            f"end within seconds)"
        )
    return text or "another process"


def _lock(out: Path) -> RunLock:
    """Hold `out/.lock` (never through a symbolic link) and write who holds it; RunLockedError naming
    the holder if another process does."""
    try:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFolderError(
                f"run directory {out}: .lock is a symbolic link; a run never writes through links: remove it"
            ) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunLockedError(
            f"run directory {out} is in use by {_holder(holder)}; wait for it to end, or train into another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (swinv2 train)\n".encode(), 0)
    return RunLock(fd)


def append_line(path: Path, line: str) -> None:
    """Append `line` to a run's log file, never through a symbolic link (one planted meanwhile is refused)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFolderError(f"{path}: is a symbolic link; a run never writes through links") from None
        raise
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class RunDir:
    """The files of one run. Constructing it locks the directory (rank 0) and changes nothing else:
    the config is written by `begin()`, once the run is known to start (its resume succeeded)."""

    def __init__(self, out: Path, env: D.DistEnv, cfg: Config) -> None:
        self.out, self.env, self.cfg = out, env, cfg
        self.is_main = env.is_main
        self.checkpoint_dir = out / "checkpoints"
        self._tb: SummaryWriter | None = None
        self._tb_purge: int | None = None
        self._epoch_times: list[float] = []
        self._lock: RunLock | None = None
        # What this start creates, removed again if it is refused (`close(refused=True)`).
        self._new = [p for p in (out, out / ".lock", self.checkpoint_dir) if not os.path.lexists(p)]
        self.begun = False
        refused: tuple[str, str] | None = None
        if self.is_main:
            try:
                claim(out)
                out.mkdir(parents=True, exist_ok=True)
                self._lock = _lock(out)
                self.checkpoint_dir.mkdir(exist_ok=True)
            except (RunLockedError, RunFolderError) as e:
                refused = (type(e).__name__, str(e))
        refused = D.broadcast_object(refused, env)  # every rank stops, not only rank 0
        if refused:
            self.close()
            raise (RunLockedError if refused[0] == "RunLockedError" else RunFolderError)(refused[1])

    def existing_run(self) -> list[str]:
        """The files of a run already in this directory (training states, weights, metrics), if any."""
        found = [f"checkpoints/{p.name}" for p in sorted(self.checkpoint_dir.glob("*.pt"))]
        found += [name for name in ("best.safetensors", "metrics.jsonl") if (self.out / name).is_file()]
        return found

    def clear(self, keep: Path | None = None) -> None:
        """Remove the files of the run that was here (asked for with --start-over), except `keep`;
        files no run writes stay."""
        if not self.is_main:
            return
        for p in self.checkpoint_dir.iterdir():
            if keep is None or not (p.exists() and keep.exists() and p.samefile(keep)):
                p.unlink()
        for name in (
            "config.yaml",
            "metrics.jsonl",
            "steps.jsonl",
            "bad_images.jsonl",
            "best.safetensors",
            "curves.png",
        ):
            (self.out / name).unlink(missing_ok=True)
        for name in ("tensorboard", "reconstructions"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        log.warning("--start-over: removed the files of the run that was in %s", self.out)

    def begin(self, cfg: Config) -> None:
        """The run starts (fresh or resumed): the resolved config.yaml."""
        self.cfg = cfg
        self.begun = True
        if self.is_main:
            write_output(self.out / "config.yaml", cfg.to_yaml())

    def close(self, *, refused: bool = False) -> None:
        """Flush TensorBoard and release the directory's lock. A start `refused` before the run began
        (bad data, a resume that does not fit) also removes what it created: the `.lock`, an empty
        `checkpoints/`, the folder itself if it is empty again."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if refused and self._lock is not None:
            for p in reversed(self._new):
                try:
                    p.unlink() if p.name == ".lock" else p.rmdir()  # rmdir: only where still empty
                except OSError:
                    pass
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ----------------------------------------------------------------------- checkpoints

    def find_resumable(self) -> Path | None:
        """Rank 0 picks the loadable checkpoint furthest along (removing temp files of killed saves)."""
        path = find_resumable(self.checkpoint_dir) if self.is_main else None
        path = D.broadcast_object(str(path) if path else None, self.env)
        return Path(path) if path else None

    def write_last(self, state: dict[str, Any]) -> Path:
        """checkpoints/last.pt (rank 0)."""
        path = self.checkpoint_dir / "last.pt"
        if self.is_main:
            save_training_state(path, state)
        return path

    def write_best(
        self,
        entry: dict[str, Any],
        state: dict[str, Any],
        model: SwinTransformerV2,
        classes: list[str],
        preprocess: EvalPreprocess,
        model_name: str,
        *,
        top: bool,
    ) -> None:
        """The new best-k member's training state, and best.safetensors when it ranks first. Written
        before last.pt: a kill in between leaves the best file as the newest complete checkpoint."""
        if self.is_main:
            save_training_state(self.checkpoint_dir / entry["file"], state)
        if top:
            self.write_weights(model, classes, preprocess, model_name)

    def write_weights(
        self, model: SwinTransformerV2, classes: list[str], preprocess: EvalPreprocess, model_name: str
    ) -> None:
        """best.safetensors (rank 0): the best weights, or the latest for a run without validation data."""
        if self.is_main:
            save_weights(
                model, self.out / "best.safetensors", class_names=classes, preprocess=preprocess, model_name=model_name
            )

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
        """A tqdm bar (update / set_postfix / close) on a terminal. Where stderr is not one (a log file,
        a pipe) redraws would fill it with carriage returns: a log line every `train.log_every` steps
        and at the epoch's end instead."""
        enabled = self.is_main and self.cfg.train.progress
        if enabled and not sys.stderr.isatty():
            return _LogProgress(total, initial, desc, self.cfg.train.log_every)
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not (self.is_main and self.cfg.train.progress),
            unit="step",
        )

    def _writer(self) -> SummaryWriter | None:
        if self._tb is None and self.is_main and self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self._tb_purge)
        return self._tb

    def log_step(self, row: dict[str, Any]) -> None:
        """One line of steps.jsonl (step, epoch, loss, lr, grad_norm, skipped) and its TensorBoard points.
        Lines are only appended: after a resume, re-done steps appear twice (with identical losses)."""
        if not self.is_main:
            return
        append_line(self.out / "steps.jsonl", json.dumps(row) + "\n")
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
        write_output(self.out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))

    def report_bad_files(self, epoch: int, split: str, bad: dict[str, str]) -> int:
        """Gather the unreadable files of every rank; rank 0 lists each once. Returns their count."""
        merged: dict[str, str] = {}
        for part in D.gather_objects(bad, self.env):
            merged.update(part)
        if merged and self.is_main:
            lines = "".join(f"\n  {p}: {r}" for p, r in sorted(merged.items()))
            log.warning(
                "epoch %d: %d unreadable %s images skipped (never replaced by another sample):%s",
                epoch + 1,
                len(merged),
                split,
                lines,
            )
            append_line(
                self.out / "bad_images.jsonl",
                "".join(
                    json.dumps({"epoch": epoch + 1, "split": split, "path": p, "error": r}) + "\n"
                    for p, r in sorted(merged.items())
                ),
            )
        return len(merged)

    def epoch_done(self, history: list[dict[str, Any]]) -> None:
        """Append the epoch's metrics row, send it to TensorBoard, redraw the curves."""
        if not self.is_main:
            return
        row = history[-1]
        append_line(self.out / "metrics.jsonl", json.dumps(row) + "\n")
        self.scalars(
            row["step"],
            {f"epoch/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")},
        )
        if self._tb is not None:
            self._tb.flush()
        from ..plots import plot_training_curves

        plot_training_curves(history, self.out / "curves.png", num_classes=self.cfg.model.num_classes)

    def log_epoch(self, row: dict[str, Any], epochs: int) -> None:
        self._epoch_times.append(row["epoch_time_s"])
        eta = (epochs - row["epoch"]) * sum(self._epoch_times) / len(self._epoch_times)
        val = ""
        if "val_top1" in row:
            val = f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}%" + (  # top-5 of <= 5 classes: 100%
                f" top-5 {row['val_top5']:.2f}%" if (self.cfg.model.num_classes or 6) > 5 else ""
            )
            if "val_ema_top1" in row:
                val += f" (EMA top-1 {row['val_ema_top1']:.2f}%)"
        elif "val_loss" in row:  # pretraining: a loss, no accuracy
            val = f"  val loss {row['val_loss']:.4f}" + (
                f" (EMA {row['val_ema_loss']:.4f})" if "val_ema_loss" in row else ""
            )
        log.info(
            "epoch %d/%d  train loss %.4f%s  lr %.2e  %.0f img/s  %.1fs  ETA %s",
            row["epoch"],
            epochs,
            row["train_loss"],
            val,
            row["lr"],
            row["img_per_s"],
            row["epoch_time_s"],
            _hms(eta),
        )

    def summary(self, history: list[dict[str, Any]], best: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_dir": str(self.out),
            "checkpoint": str(self.checkpoint_dir / "last.pt"),
            "curves": str(self.out / "curves.png"),
            "metrics": str(self.out / "metrics.jsonl"),
        }
        if (self.out / "best.safetensors").exists():
            out["weights"] = str(self.out / "best.safetensors")
        out["num_classes"] = self.cfg.model.num_classes
        if history:
            out["final"] = history[-1]
        if best:
            out["best"] = {"epoch": best[0]["epoch"], self.cfg.train.best_metric: best[0]["metric"]}
        return out


class _LogProgress:
    """`RunDir.progress_bar` as log lines: `update` logs every `every` steps (and the last) with the
    latest `set_postfix` values, the step rate and the epoch's ETA."""

    def __init__(self, total: int, initial: int, desc: str, every: int) -> None:
        self.total, self.n, self.desc, self.every = total, initial, desc, max(1, every)
        self.postfix: dict[str, Any] = {}
        self._n0, self._t0 = initial, time.perf_counter()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every and self.n < self.total:
            return
        rate = (self.n - self._n0) / max(time.perf_counter() - self._t0, 1e-9)
        values = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        log.info(
            "%s  step %d/%d%s  %.2f step/s  ETA %s",
            self.desc,
            self.n,
            self.total,
            values,
            rate,
            _hms((self.total - self.n) / max(rate, 1e-9)),
        )

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
