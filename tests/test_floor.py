"""benchmarks/floor.py: it records the kernels a step runs (backward included, the CPB MLP skipped at
inference), and its replays do the work of the kernels they stand for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import floor  # noqa: E402
from swinv2.model import kernels as fused  # noqa: E402
from swinv2.weights.registry import model_config  # noqa: E402

aten = torch.ops.aten
MICRO = "swinv2_micro_window4_32"


def _ops(calls) -> dict:
    counts: dict = {}
    for (func, _, _), n in calls.items():
        counts[func] = counts.get(func, 0) + n
    return counts


def test_record_counts_the_floor_kernels_of_forward_and_backward_and_nothing_else():
    linear = torch.nn.Linear(8, 16)
    x = torch.randn(2, 3, 8, requires_grad=True)

    def step():
        h = F.gelu(linear(x)).softmax(-1)
        (F.layer_norm(h, (16,)) + 1).sum().backward()

    assert _ops(floor.record(step)) == {
        aten.addmm.default: 1,
        aten.gelu.default: 1,
        aten._softmax.default: 1,
        aten.native_layer_norm.default: 1,
        aten.native_layer_norm_backward.default: 1,
        aten.gelu_backward.default: 1,
        aten.mm.default: 2,  # the input's and the weight's gradients
    }
    # A skipped module's forward kernels are left out; its backward is not a forward and stays.
    skipped = _ops(floor.record(step, skip=[linear]))
    assert aten.addmm.default not in skipped and skipped[aten.mm.default] == 2


def test_replays_do_the_recorded_kernels_work():
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(5, 7, generator=g), torch.randn(9, 7, generator=g).t(), torch.randn(9, generator=g)
    for fn in floor._replay(aten.addmm.default, (bias, a, b), {}):  # the GEMM, the bias left to an epilogue
        torch.testing.assert_close(fn(), a @ b)
    # bf16: also oneDNN's linear on the weight in its layout (`swinv2.model.kernels.linear`); one bf16 rounding
    # of the fp32-accumulated product of the bf16 operands
    a16, b16, bias16 = a.bfloat16(), b.bfloat16(), bias.bfloat16()
    exact = a16.double() @ b16.double()
    candidates = floor._replay(aten.addmm.default, (bias16, a16, b16), {})
    assert len(candidates) == (3 if fused.onednn_linear_runs(torch.bfloat16) else 2)
    for fn in candidates:
        y = fn()
        assert y.dtype == torch.bfloat16 and ((y.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-6).all()
    x = torch.randn(4, 6, generator=g)
    (exp,) = floor._replay(aten._softmax.default, (x, -1, False), {})
    torch.testing.assert_close(exp(), torch.exp(x))
    (gelu,) = floor._replay(aten.gelu.default, (x,), {})
    torch.testing.assert_close(gelu(), F.gelu(x))
    # Replayed arguments keep the recorded strides: a transposed weight stays transposed.
    meta = floor._meta((b,))
    assert floor._fresh(meta, g)[0].stride() == b.stride()


def test_reference_calls_skip_the_cpb_mlp_only_at_inference():
    def cpb_first_layer(calls):  # the CPB MLP's first linear: (relative coordinates, 2) @ (2, 512)
        return sum(n for (func, args, _), n in calls.items() if func is aten.addmm.default and args[1].shape[-1] == 2)

    infer, _ = floor.reference_calls(MICRO, batch_size=2, train=False)
    train, _ = floor.reference_calls(MICRO, batch_size=2, train=True)
    blocks = sum(model_config(MICRO).depths)
    assert cpb_first_layer(infer) == 0 and cpb_first_layer(train) == blocks
    ops = _ops(train)
    # Every forward GELU and layer norm has its backward in the recording.
    assert ops[aten.gelu_backward.default] == ops[aten.gelu.default] == blocks
    assert ops[aten.native_layer_norm_backward.default] == ops[aten.native_layer_norm.default]


def test_kernel_floor_of_a_training_step_exceeds_the_forward():
    forward = floor.kernel_floor(MICRO, batch_size=2, repeats=2)
    step = floor.kernel_floor(MICRO, batch_size=2, train=True, repeats=2)
    assert set(forward.seconds) == {"matmuls", "GELU", "layer norms", "softmax exp"}
    assert set(step.seconds) == set(forward.seconds) | {"AdamW (fused)"}
    assert all(v > 0 for v in step.seconds.values())
    assert step.seconds["matmuls"] > forward.seconds["matmuls"]


def test_gaps_turn_the_targets_into_allowed_seconds(monkeypatch):
    monkeypatch.setattr(floor, "kernel_floor", lambda *a, train=False, **k: floor.Floor({"matmuls": 1.0 + train}))
    eager = {
        "ours": dict(batch_size=8, img_per_s=10.0, gmacs_per_img=5.0),
        "timm": dict(img_per_s=4.0),
        "hf": dict(img_per_s=8.0),
    }
    train = {"ours": dict(img_per_s=3.0), "timm": dict(img_per_s=2.0)}
    e, c, t = floor.gaps(eager, train, ("timm", "hf"), peak_gflop_s=100.0)
    assert floor.gaps(eager, train, ("timm", "hf"), 100.0, compiled={"ours": dict(img_per_s=16.0)})[1].ours_s == 0.5
    # eager: 1.3 x the FASTEST peer (hf's 8 img/s), a batch of 8
    assert e.allowed_s == pytest.approx(8 / (1.3 * 8.0)) and e.ours_s == pytest.approx(0.8)
    assert c.allowed_s == pytest.approx(2 * 5e9 * 8 / (0.85 * 100e9)) and c.ours_s is None
    assert t.allowed_s == pytest.approx(8 / (1.25 * 2.0)) and t.ratio == pytest.approx(2.0 / t.allowed_s)
    # bf16: 1.3 x timm in bf16, against the floor of timm's bf16 kernels
    monkeypatch.setattr(
        floor,
        "kernel_floor",
        lambda *a, dtype=torch.float32, **k: floor.Floor({"matmuls": 0.5 if dtype == torch.bfloat16 else 1.0}),
    )
    bf16 = {"ours": dict(img_per_s=20.0), "timm": dict(img_per_s=16.0)}
    *_, b = floor.gaps(eager, train, ("timm", "hf"), 100.0, eager_bf16=bf16)
    assert b.allowed_s == pytest.approx(8 / (1.3 * 16.0)) and b.ours_s == pytest.approx(0.4)
    assert b.ratio == pytest.approx(0.5 / b.allowed_s)


def test_bf16_reference_records_bf16_kernels():
    calls, ref = floor.reference_calls(MICRO, batch_size=2, train=False, dtype=torch.bfloat16)
    assert next(ref.parameters()).dtype == torch.bfloat16
    mms = [args for (func, args, _), _n in calls.items() if func is aten.mm.default or func is aten.addmm.default]
    assert mms and all(a.dtype == torch.bfloat16 for args in mms for a in args if isinstance(a, floor._Meta))
