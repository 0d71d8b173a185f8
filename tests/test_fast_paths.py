"""The fast-path policy (`swinv2.model.fast_paths`): the default is the shipped model, a policy holds for
its block only, and each field really switches its path (the kernel it names runs or not) while the
logits stay the same computation. No module of the package patches another's names to switch a path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import swinv2
from randomize import randomize_
from swinv2.model import attention, kernels
from swinv2.model.fast_paths import FastPaths, fast_paths, use_fast_paths
from swinv2.model.transformer import SwinTransformerBlock

SRC = Path(__file__).resolve().parents[1] / "src" / "swinv2"


def _micro() -> swinv2.SwinTransformerV2:
    return randomize_(swinv2.create_model("swinv2_micro_window4_32", drop_path_rate=0.0), seed=4)


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def _spy(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of `module.name` (still calling it)."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_default_policy_is_in_effect_and_a_policy_holds_for_its_block_only():
    assert fast_paths() == FastPaths()
    assert FastPaths().onednn_linear_dtypes == (torch.bfloat16,)
    assert all(v is True for k, v in vars(FastPaths()).items() if k != "onednn_linear_dtypes")
    off = FastPaths(grouped_inference=False)
    with use_fast_paths(off) as inside:
        assert fast_paths() is inside is off
        with use_fast_paths(FastPaths(flushed_softmax=False)):
            assert not fast_paths().flushed_softmax and fast_paths().grouped_inference
        assert fast_paths() is off
    assert fast_paths() == FastPaths()
    with pytest.raises(RuntimeError), use_fast_paths(off):
        raise RuntimeError
    assert fast_paths() == FastPaths()
    with pytest.raises(AttributeError):
        off.grouped_inference = True  # frozen: a policy is changed by making another


def test_grouped_inference_off_runs_the_whole_batch_through_each_block(monkeypatch):
    monkeypatch.setattr(attention, "INFERENCE_CHUNK_BYTES", 1)  # groups of one image while the path is on
    sizes: list[int] = []
    block_forward = SwinTransformerBlock._forward
    monkeypatch.setattr(
        SwinTransformerBlock,
        "_forward",
        lambda self, x, out=None: sizes.append(x.shape[0]) or block_forward(self, x, out),
    )
    model, x = _micro().eval(), _images(3)
    with torch.no_grad():
        grouped = model(x)
        assert sizes == [1] * 3 * 4
        sizes.clear()
        with use_fast_paths(FastPaths(grouped_inference=False)):
            whole = model(x)
    assert sizes == [3] * 4
    assert (grouped - whole).abs().max() <= 1e-6


def test_onednn_linear_dtypes_and_packed_weights_pick_the_kernel(monkeypatch):
    """fp32 inference linears run on addmm by default; put on oneDNN they take the weight in its layout,
    made once (`_onednn_weight`), or with `packed_weights` off the plain weight."""
    if not kernels.onednn_linear_runs(torch.float32):
        pytest.skip("this PyTorch has no oneDNN")
    packed = _spy(monkeypatch, kernels, "_onednn_weight")
    model, x = _micro().eval(), _images(2)
    with torch.no_grad():
        addmm = model(x)
        assert not packed
        with use_fast_paths(FastPaths(onednn_linear_dtypes=(torch.float32,))):
            onednn = model(x)
        assert len(packed) == 4 * 4  # qkv, proj, fc1 and fc2 of each of the 4 blocks
        packed.clear()
        with use_fast_paths(FastPaths(onednn_linear_dtypes=(torch.float32,), packed_weights=False)):
            plain = model(x)
        assert not packed
    assert (onednn - addmm).abs().max() <= 1e-5 and torch.equal(plain, onednn)


def test_fp32_logits_off_takes_sdpa_on_the_half_precision_operands(monkeypatch):
    calls = _spy(monkeypatch, attention, "attention_fp32_logits")
    model, x = _micro().eval().bfloat16(), _images(2).bfloat16()
    with torch.no_grad():
        fp32_logits = model(x)
        assert len(calls) == 4
        calls.clear()
        with use_fast_paths(FastPaths(fp32_logits=False)):
            flash = model(x)
        assert not calls
    assert (fp32_logits.float() - flash.float()).abs().max() <= 0.1 * fp32_logits.float().abs().max()


def test_flushed_softmax_off_takes_the_plain_softmax_in_cpu_training(monkeypatch):
    calls = _spy(monkeypatch, attention, "softmax_flushed")
    model, x = _micro().train(), _images(2)
    torch.manual_seed(0)
    flushed = model(x)
    assert len(calls) == 4
    calls.clear()
    torch.manual_seed(0)
    with use_fast_paths(FastPaths(flushed_softmax=False)):
        plain = model(x)
    assert not calls
    assert (flushed - plain).abs().max() <= 1e-6


def test_no_module_patches_names_with_unittest_mock():
    """Fast paths are switched through the policy, not by patching module attributes."""
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "unittest" for n in names), path
