"""What this machine is and what its matrix multiplies can do: the CPU's name, the measured matmul
peak, and whether bf16 is native.

Used by training (`engine`, to warn before a bf16 run that would be slower than fp32), by `cli` and
`runtime` for the same warning, and by `bench` for its "share of the matmul peak" figures. Imports
torch only.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many times the time of an fp32 matmul, bf16 on the device is emulated, not native.
BF16_EMULATED_SLOWDOWN = 2.0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _timed_mm(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - t0


def matmul_peak(device: str | torch.device = "cpu", dtype: str = "fp32", *, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n x n x n matrix multiply: the machine's practical compute limit."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(DTYPES[dtype])
    b = torch.randn(n, n, device=dev).to(DTYPES[dtype])
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best = min(_timed_mm(a, b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def bf16_matmul_slowdown(device: str | torch.device = "cpu", *, n: int = 256) -> float:
    """How many times longer an n x n x n matmul takes in bf16 than in fp32 on `device`.

    Below 1 where bf16 is native (AVX-512 BF16 / AMX, or a GPU); far above 1 on a CPU without it, where
    PyTorch falls back to a generic kernel: on a 2-core AVX2 CPU, 60-80x at n = 256 and 150x at n = 512
    (1.2 against 179 GFLOP/s), and a SwinV2-T forward under bf16 autocast took 6.5x as long as in fp32.
    Takes a few milliseconds, about 0.1 s where bf16 is emulated. The fp32 matmul (a fraction of a
    millisecond) is timed 20 times, its best taken: on a loaded machine a few of them lose the core.
    """
    return matmul_peak(device, "fp32", n=n, repeats=20) / matmul_peak(device, "bf16", n=n, repeats=3)


def warn_if_bf16_emulated(device: str | torch.device, what: str) -> None:
    """Log a warning naming `what` (the setting that asked for bf16) when bf16 matmuls are emulated here."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return
    slowdown = bf16_matmul_slowdown(dev)
    if slowdown > BF16_EMULATED_SLOWDOWN:
        log.warning(
            "%s: this CPU has no native bf16 matmul (AVX-512 BF16 or AMX); PyTorch emulates it, "
            "%.0fx slower than an fp32 matmul here, so fp32 will be faster",
            what,
            slowdown,
        )
