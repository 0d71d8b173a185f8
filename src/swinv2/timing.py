"""Timing a call: the median of timed calls after warm-up ones, the device synchronised around each.
Benchmarks and the runtimes' own choice of the fastest setting measure the same way."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_DEVICE = torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for `device` to finish its queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `step` takes on `device`, queued work included."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def median_seconds(step: Callable[[], Any], *, calls: int, warmup: int, device: torch.device = CPU_DEVICE) -> float:
    """The median time of `calls` timed calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    return statistics.median(timed(step, device) for _ in range(calls))
