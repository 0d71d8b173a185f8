"""What a training run does when something goes wrong (docs/reliability.md): stop signals that
checkpoint at the next step boundary, errors for unrecoverable states, and the checks that keep
non-finite or mismatched tensors out of (and away from) checkpoints."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary. `exit_code` = 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving {checkpoint}; run the same command again to resume"
        )
        self.signum, self.checkpoint, self.exit_code = signum, checkpoint, 128 + signum


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: training cannot recover by skipping."""


class StopSignals:
    """Within the block, SIGTERM/SIGINT only record the signal (a second SIGINT interrupts at once).
    Handlers can only be installed from the main thread; elsewhere signals keep their defaults."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- state checks


def assert_finite(state: dict[str, Any], where: str = "state") -> None:
    """Raise InputError (a ValueError) naming the first non-finite floating tensor in a nested state."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            raise InputError(f"refusing to save a checkpoint: {where} holds non-finite values")
    elif isinstance(state, dict):
        for k, v in state.items():
            assert_finite(v, f"{where}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            assert_finite(v, f"{where}[{i}]")


def check_fits(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """Raise InputError listing missing, unexpected and mis-shaped keys of a state dict."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [
        f"{k} {tuple(got[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{name} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped))
        if keys
    ]
    if problems:
        raise InputError(f"{what} does not fit the model: " + "; ".join(problems))
