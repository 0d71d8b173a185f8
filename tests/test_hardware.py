"""The hardware probes: the bf16 slowdown probe against the CPU features PyTorch reports, and the warning
it drives (train.amp=bf16, --amp bf16, --dtype bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from machine import cpu_paths
from swinv2 import hardware


def test_bf16_probe_agrees_with_the_cpu_features_pytorch_reports():
    """Where the CPU has neither AVX-512 BF16 nor AMX nor oneDNN's bf16 path, PyTorch's bf16 matmul is
    the generic fallback and the probe must see it far slower than fp32; where it has AVX-512 BF16 or
    AMX, the probe must not call bf16 emulated."""
    slowdown = hardware.bf16_matmul_slowdown("cpu")
    path = f"{cpu_paths()}; oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; slowdown {slowdown:.2f}x"
    assert np.isfinite(slowdown) and slowdown > 0, path
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not native and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert slowdown > hardware.BF16_EMULATED_SLOWDOWN, path
    if native:
        assert slowdown < hardware.BF16_EMULATED_SLOWDOWN, path


@pytest.mark.parametrize("slowdown, warned", [(80.0, True), (0.4, False)])
def test_bf16_requests_warn_only_where_bf16_is_emulated(monkeypatch, caplog, slowdown, warned):
    monkeypatch.setattr(hardware, "bf16_matmul_slowdown", lambda device, n=256: slowdown)
    with caplog.at_level("WARNING", logger="swinv2.hardware"):
        hardware.warn_if_bf16_emulated("cpu", "train.amp=bf16")
    lines = [r.getMessage() for r in caplog.records]
    assert bool(lines) == warned
    if warned:
        assert len(lines) == 1 and lines[0].startswith("train.amp=bf16: ") and "80x slower" in lines[0]


def test_bf16_probe_is_not_run_on_an_accelerator(monkeypatch):
    def probe(device, n=256):
        raise AssertionError("probed")

    monkeypatch.setattr(hardware, "bf16_matmul_slowdown", probe)
    hardware.warn_if_bf16_emulated("cuda", "--dtype bf16")  # a GPU's bf16 is native: no probe, no warning
