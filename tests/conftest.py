"""What every test gets: its own seeded randomness, global state put back, and a summary line that
says in which order the suite ran and which CPU kernels it exercised, so a failure can be replayed
(`pytest --randomly-seed=N`) and read on another kind of machine."""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from machine import cpu_paths


@pytest.fixture(autouse=True)
def own_randomness_and_global_state(request):
    """Seed torch, numpy and `random` from the test's own id, so what a test draws never depends on
    which tests ran before it; afterwards put back the process-wide settings a test may change
    (intra-op threads, grad mode, default dtype) and fail the test that left the denormal flag set."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    threads, grad, dtype = torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    torch.set_default_dtype(dtype)
    flushed = (torch.tensor([1e-20]) * 1e-20).item() == 0.0  # 1e-40 is a float32 subnormal
    torch.set_flush_denormal(False)
    assert not flushed, "the test left subnormals flushed to zero (torch.set_flush_denormal)"


def pytest_terminal_summary(terminalreporter, config):
    seed = getattr(config.option, "randomly_seed", None)
    order = f"random order, --randomly-seed={seed}" if isinstance(seed, int) else "file order"
    terminalreporter.write_line(f"{order}; {cpu_paths()}")
