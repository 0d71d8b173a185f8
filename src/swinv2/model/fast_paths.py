"""Which of the model stack's switchable fast paths run: one explicit policy, read at call time.

Each field of `FastPaths` is one fast path of `kernels` or `attention` that replaced a plainer way of
computing the same thing; the default policy (every field at its default) is the model as shipped.
A policy with a field changed runs that one path's alternative, so a benchmark can time the two side
by side in one process (`swinv2 bench --ab NAME`, docs/performance.md "Why the fast paths are built
this way"). Outputs agree to float rounding either way; the parity tests hold the defaults.

`use_fast_paths(policy)` puts a policy in effect for a block of code, process-wide: the kernels read it
from a module variable at each call (no cost worth measuring, and no per-thread copies to keep in
step). The switches concern eager execution: traced, compiled and exported graphs take the plain ops
whatever the policy, except `flushed_softmax`, which a compiled CPU training step reads when traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FastPaths:
    """The fast paths in effect; each default is the shipped choice, the comment its alternative."""

    # Eager CPU inference runs each block over groups of images within `attention.INFERENCE_CHUNK_BYTES`.
    # Off: the whole batch through each block at once.
    grouped_inference: bool = True
    # Eager CPU inference linears with a bias in these dtypes run on oneDNN's linear (the bias in the
    # GEMM's epilogue, `kernels.linear`); the others on aten's (MKL's addmm). Alternative: (float32,).
    onednn_linear_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    # oneDNN's linear gets each weight reordered into its blocked layout once (`kernels._onednn_weight`).
    # Off: the plain weight, which oneDNN reorders on every call.
    packed_weights: bool = True
    # Eager bf16 / fp16 CPU inference computes the attention logits in fp32 (`kernels.attention_fp32_logits`).
    # Off: SDPA's flash kernel on the half-precision q, k and v.
    fp32_logits: bool = True
    # CPU training's written-out attention flushes subnormal probabilities (`kernels.softmax_flushed`).
    # Off: the plain softmax, its subnormals reaching the next product.
    flushed_softmax: bool = True


_in_effect = FastPaths()


def fast_paths() -> FastPaths:
    """The policy in effect."""
    return _in_effect


@contextlib.contextmanager
def use_fast_paths(policy: FastPaths) -> Iterator[FastPaths]:
    """`policy` in effect inside the block (process-wide), the previous one again after it."""
    global _in_effect
    previous, _in_effect = _in_effect, policy
    try:
        yield policy
    finally:
        _in_effect = previous
