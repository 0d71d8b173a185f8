"""What every test gets: its own seeded randomness, global state put back, and a summary line that
says in which order the suite ran and which CPU kernels it exercised, so a failure can be replayed
(`pytest --randomly-seed=N`) and read on another kind of machine.

And what many tests ask for: the micro model (`make_micro`), a weights file of it (`make_micro_weights`,
`micro_weights`) and a small class-folder data set (`image_folder`)."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import swinv2
from image_folders import make_image_folder
from machine import cpu_paths

MICRO = "swinv2_micro_window4_32"  # the demo's model: 32 px, window 4, 2 stages, 0.09M parameters


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


@pytest.fixture(scope="session")
def make_micro():
    """`make_micro(num_classes=None, *, seed=0, std=0.02, randomized=True, **overrides)`: a fresh micro
    SwinV2 (`swinv2.create_model(MICRO, num_classes=..., **overrides)`) that depends on its arguments
    alone. `randomized`: every parameter drawn afresh from `seed` (tests/randomize.py: the official init
    zeroes the res-post-norms, which makes every block an identity and hides what attention does);
    otherwise the official init, drawn under `torch.manual_seed(seed)`. The test's own random stream is
    left where it was."""

    def make(
        num_classes: int | None = None, *, seed: int = 0, std: float = 0.02, randomized: bool = True, **overrides
    ) -> swinv2.SwinTransformerV2:
        from randomize import randomize_  # here, so that a suite that never asks for it never imports swinv2.tools

        if num_classes is not None:
            overrides["num_classes"] = num_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = swinv2.create_model(MICRO, **overrides)
        return randomize_(model, seed=seed, std=std) if randomized else model

    return make


@pytest.fixture(scope="session")
def make_micro_weights(make_micro):
    """`make_micro_weights(path, classes=("ant", "bee", "cat"), *, seed=0, model_name=None, **make_micro
    arguments) -> path`: our self-describing `.safetensors` of `make_micro(len(classes), ...)` with those
    class names (no classes: encoder-only weights, no head)."""

    def make(path: Path, classes=("ant", "bee", "cat"), *, seed: int = 0, model_name: str | None = None, **kw) -> Path:
        model = make_micro(len(classes), seed=seed, **kw)
        swinv2.save_weights(model, path, class_names=list(classes) or None, model_name=model_name)
        return Path(path)

    return make


@pytest.fixture
def micro_weights(tmp_path, make_micro_weights) -> Path:
    """A weights file of the micro model with 3 classes (ant, bee, cat), seed 0, in the test's own
    directory (commands may write beside it, e.g. the export cache)."""
    return make_micro_weights(tmp_path / "micro.safetensors")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """tmp_path/data/{train,val}/{a,b}/NN.png, 8 + 4 images of 32 px per class whose bright half is the
    class (tests/image_folders.py; call `make_image_folder` itself for other sizes)."""
    return make_image_folder(tmp_path / "data")
