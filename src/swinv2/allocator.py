"""The process's CPU memory allocator: keep freed memory for reuse instead of handing it back to the OS.

Why. glibc's malloc serves every block above its mmap threshold (dynamic, at most 32 MiB) from fresh
pages it maps for that block and unmaps on free, and it trims the top of the heap once more than twice
that threshold lies free there. A training step allocates and frees the same large activations, step
after step, so under these defaults each step faults its memory in again: the kernel zeroes every 4 KiB
page on first touch, about 1.7 us each here. Measured on a 2-core x86 VM (SwinV2-T, 256 px, batch 8,
fp32, each run in its own process, `swinv2 bench --train --own-process N [--default-malloc]`): 110k-260k
minor page faults per step (0.4-1 GB of fresh pages) under the defaults, and 0-3k with this policy;
3-17 % less time per step across runs (more when the machine is busy). Which process history happens to leave a
large heap behind decides how much of this a given process pays, so the defaults also make timings depend on what
ran before.

What. `retain_freed_cpu_memory()` raises the mmap threshold and the trim threshold to `limit` bytes
(1 GiB by default) with `mallopt`: blocks up to that size come from the heap and go back to it, so the
next step reuses pages that are already mapped. The process keeps its peak footprint mapped (as
PyTorch's CUDA caching allocator does on the GPU); blocks above `limit` are still mapped per use.

Where. `swinv2 train`, `eval` and `predict` call it at start (their DataLoader workers inherit it);
library users call it once at the start of their own training or serving process. It changes nothing
and returns False where the C library is not glibc, where the user chose malloc settings already
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES=glibc.malloc...`), or where
`SWINV2_RETAIN_FREED_MEMORY=0` opts out. Standard library only; no torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

from .errors import InputError

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

OPT_OUT_ENV = "SWINV2_RETAIN_FREED_MEMORY"
DEFAULT_LIMIT = 1 << 30
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def _user_chose_malloc_settings() -> str | None:
    """The environment variable through which the user already set glibc's malloc, if any."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def retain_freed_cpu_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Keep freed blocks of up to `limit` bytes in the heap for reuse (see the module docstring).

    Returns True when glibc's allocator now runs with this policy, False when nothing was changed
    (not glibc, the user's own malloc settings, or `SWINV2_RETAIN_FREED_MEMORY=0`).
    """
    if not 0 < limit <= _INT_MAX:
        raise InputError(f"limit must be between 1 and {_INT_MAX} bytes, got {limit}")
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    chosen = _user_chose_malloc_settings()
    if chosen is not None:
        log.debug("keeping the malloc settings chosen through %s", chosen)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: glibc builds that cap it refuse it, and then nothing is changed.
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
