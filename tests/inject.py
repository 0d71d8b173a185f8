"""Faults injected for real into a training process: `install_faults` patches the process it runs in.
The driver script of runs.drive installs it in a real `swinv2 train` process (or each torchrun
worker); test_reliability.py also records batches in its own process with `record_batches`."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import torch


def install_faults(
    *,
    kill_at: int | None = None,
    signal_at: list | None = None,
    kill_in_save: int | None = None,
    record: str | None = None,
    dump_params: str | None = None,
    readonly: str | None = None,
    signal_group_at: list | None = None,
    children: str | None = None,
    only_rank: int | None = None,
) -> None:
    """Patch this process (the driver's, or the test's own for `record`):

    kill_at: SIGKILL itself inside the optimizer step of global step `kill_at` (after backward).
    signal_at: [step, signum]: send itself that signal inside that step's optimizer step.
    signal_group_at: [step, signum]: send that signal to its whole process group (itself and its
        DataLoader workers, as systemd, Slurm and `timeout` do) inside that step's optimizer step.
    children: before a kill_at SIGKILL, write the pids of its live child processes (its DataLoader
        workers) to this file, one per line.
    kill_in_save: SIGKILL half-way through writing the n-th torch.save (1-based).
    record: append {"step", "indices"} of every train step's samples to this JSONL file.
    dump_params: after training, save this rank's model state dict to DIR/rank{r}.pt.
    readonly: on ranks other than 0, any attempt to create or write a file under this folder raises.
    only_rank: kill_at / signal_at act on this rank (torchrun's RANK) alone.
    """
    import builtins
    import io

    from swinv2.train import engine

    if only_rank is not None and int(os.environ.get("RANK", "0")) != only_rank:
        kill_at = signal_at = None
    if kill_at is not None or signal_at is not None or signal_group_at is not None:
        orig_step = torch.optim.AdamW.step
        calls = [0]

        def step(self, *a, **kw):
            calls[0] += 1  # call n happens in global step n - 1 of a fresh run
            if kill_at is not None and calls[0] == kill_at + 1:
                if children is not None:
                    import multiprocessing

                    with open(children, "w") as f:
                        f.write("".join(f"{c.pid}\n" for c in multiprocessing.active_children()))
                os.kill(os.getpid(), signal.SIGKILL)
            if signal_at is not None and calls[0] == signal_at[0] + 1:
                os.kill(os.getpid(), signal_at[1])
            if signal_group_at is not None and calls[0] == signal_group_at[0] + 1:
                os.killpg(os.getpgid(0), signal_group_at[1])
            return orig_step(self, *a, **kw)

        torch.optim.AdamW.step = step
    if kill_in_save is not None:
        orig_save = torch.save
        saves = [0]

        def save(obj, f, *a, **kw):
            saves[0] += 1
            if saves[0] == kill_in_save:
                buf = io.BytesIO()
                orig_save(obj, buf, *a, **kw)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_save(obj, f, *a, **kw)

        torch.save = save
    if record is not None:
        record_batches(engine, record)
    if dump_params is not None:
        orig_run = engine.Trainer.run

        def run(self, *a, **kw):
            out = orig_run(self, *a, **kw)
            torch.save(
                {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                os.path.join(dump_params, f"rank{self.env.rank}.pt"),
            )
            return out

        engine.Trainer.run = run
    if readonly is not None and int(os.environ.get("RANK", "0")) != 0:
        root = os.path.realpath(readonly)
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def inside(path) -> bool:
            try:
                return os.path.realpath(os.fspath(path)).startswith(root)
            except TypeError:  # a file descriptor
                return False

        def guard(fn, is_write):
            def wrapper(path, *a, **kw):
                if inside(path) and is_write(*a, **kw):
                    raise PermissionError(f"rank {os.environ['RANK']} tried to write {path}")
                return fn(path, *a, **kw)

            return wrapper

        mode_writes = lambda mode="r", *a, **kw: any(c in mode for c in "wax+")  # noqa: E731
        builtins.open = io.open = guard(builtins.open, mode_writes)
        os.open = guard(os.open, lambda flags, *a, **kw: bool(flags & writes))
        os.mkdir = guard(os.mkdir, lambda *a, **kw: True)
        os.replace = guard(os.replace, lambda *a, **kw: True)


def record_batches(engine: Any, path: str) -> None:
    orig = engine.Trainer.train_step

    def train_step(self, micro):
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": self.progress["global_step"],
                        "indices": [i for b in micro for i in b.indices.tolist()],
                        **({"rank": int(os.environ["RANK"])} if "RANK" in os.environ else {}),
                    }
                )
                + "\n"
            )
        return orig(self, micro)

    engine.Trainer.train_step = train_step
