"""Tolerances that follow from the computation instead of one CPU's rounding.

A fast path is judged against a float64 truth, side by side with the reference path computed in the
same low precision on the same machine: the two round through the same reductions, so the fast path
may be at most `factor` times further from the truth than the reference, plus a few units of the
dtype's rounding (for tensors the reference happens to get exactly right).
"""

from __future__ import annotations

import torch
from torch import Tensor


def relative_error(x: Tensor, truth: Tensor) -> float:
    """||x - truth|| / ||truth|| in float64 (0 where both are zero)."""
    truth = truth.double()
    return ((x.double() - truth).norm() / truth.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def assert_as_accurate(
    fast: Tensor, reference: Tensor, truth: Tensor, name: str, *, factor: float = 2.0, ulps: float = 16.0
) -> None:
    """`fast` is no further from the float64 `truth` than `factor` x the `reference`'s error + `ulps`
    units of the dtype's rounding; the message names the tensor and both errors."""
    fast_err, ref_err = relative_error(fast, truth), relative_error(reference, truth)
    bound = factor * ref_err + ulps * torch.finfo(fast.dtype).eps
    assert fast_err <= bound, (
        f"{name}: relative error {fast_err:.3e} against float64, the reference path's "
        f"{ref_err:.3e}; allowed {bound:.3e}"
    )
