"""Logit parity with the real timm, transformers and torchvision SwinV2 models, both directions.

Every parameter on both sides is re-randomised (post-norms, logit scales, CPB MLPs included: the
official zero init of the post-norms would hide a swapped or dropped norm). The tiny variant's
widths and heads at its native 256 px / window 8, with depths shrunk to (2, 2, 2, 2) on both sides
to keep the test fast; every stage still has a regular and a shifted block.
Reference: the other library's forward on the other library's parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from swinv2.model.transformer import SwinTransformerV2, SwinV2Config
from swinv2.weights.convert import convert_state_dict

TOL = 1e-5
DEPTHS = (2, 2, 2, 2)
CFG = SwinV2Config(
    img_size=256,
    embed_dim=96,
    depths=DEPTHS,
    num_heads=(3, 6, 12, 24),
    window_size=8,
    num_classes=10,
    drop_path_rate=0.0,
)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random: matrices ~ N(0, 0.8/fan_in), LN weights ~ 1 + N(0, .3), vectors ~ N(0, .3),
    logit scales ~ U(0.5, 5) (above log(100) ~ 4.6 too, so the clamp is exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 4.5 + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.8 / math.sqrt(p[0].numel()))
    return model.eval()


def ours(seed: int | None = None) -> SwinTransformerV2:
    with torch.device("meta"):  # every parameter is overwritten: skip the init
        model = SwinTransformerV2(CFG)
    model = model.to_empty(device="cpu")
    return randomise(model, seed) if seed is not None else model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"256": torch.randn(1, 3, 256, 256, generator=g), "250x330": torch.randn(1, 3, 250, 330, generator=g)}


def _both_directions(
    theirs: nn.Module, fmt: str, forward, x: torch.Tensor, *, config=None, x_theirs_to_ours: torch.Tensor | None = None
) -> None:
    """Their random weights -> ours (on `x_theirs_to_ours`, default `x`), then our random weights -> theirs."""
    randomise(theirs, seed=1)
    model = ours()
    model.load_state_dict(convert_state_dict(theirs.state_dict(), src=fmt), strict=True)
    x1 = x if x_theirs_to_ours is None else x_theirs_to_ours
    with torch.no_grad():
        ref, out = forward(theirs, x1), model(x1)
    assert ref.shape == (1, 10)
    assert _max_diff(out, ref) <= TOL, f"{fmt} -> ours: {_max_diff(out, ref)}"
    model = ours(seed=2)
    theirs.load_state_dict(convert_state_dict(model.state_dict(), dst=fmt, config=config), strict=True)
    with torch.no_grad():
        ref, out = model(x), forward(theirs, x)
    assert _max_diff(out, ref) <= TOL, f"ours -> {fmt}: {_max_diff(out, ref)}"


def test_timm_parity(images) -> None:
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("swinv2_tiny_window8_256", depths=DEPTHS, num_classes=10)
    _both_directions(theirs, "timm", lambda m, x: m(x), images["256"])


def test_torchvision_parity(images) -> None:
    from torchvision.models import swin_transformer as tv

    # swin_v2_t's own arguments, depths shrunk; torchvision's window stays 8 at every stage, which
    # coincides with the official rule at 256 px (the last 8x8 stage is one unshifted window).
    theirs = tv.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=96,
        depths=list(DEPTHS),
        num_heads=[3, 6, 12, 24],
        window_size=[8, 8],
        stochastic_depth_prob=0.0,
        num_classes=10,
        block=tv.SwinTransformerBlockV2,
        downsample_layer=tv.PatchMergingV2,
    )
    _both_directions(theirs, "torchvision", lambda m, x: m(x), images["256"], config=CFG)


def test_hf_parity_including_non_divisible_input(images) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Swinv2Config(
        image_size=256,
        embed_dim=96,
        depths=list(DEPTHS),
        num_heads=[3, 6, 12, 24],
        window_size=8,
        num_labels=10,
        drop_path_rate=0.0,
    )
    theirs = transformers.Swinv2ForImageClassification(hf_cfg)
    forward = lambda m, x: m(pixel_values=x).logits  # noqa: E731
    # HF -> ours on 250x330: both pad to the patch, then to the window, THEN shift; HF fixed its
    # windows at construction from image_size=256, ours applies the same rule at run time.
    _both_directions(theirs, "hf", forward, images["256"], x_theirs_to_ours=images["250x330"])


def test_hf_parity_with_pretrained_window(images) -> None:
    """Window 16 from a window-8 pre-training (CPB coords normalised by 8): ours -> HF -> same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = SwinV2Config(
        img_size=128,
        embed_dim=96,
        depths=DEPTHS,
        num_heads=(3, 6, 12, 24),
        window_size=16,
        pretrained_window_sizes=(8, 8, 8, 4),
        num_classes=10,
        drop_path_rate=0.0,
    )
    hf_cfg = transformers.Swinv2Config(
        image_size=128,
        embed_dim=96,
        depths=list(DEPTHS),
        num_heads=[3, 6, 12, 24],
        window_size=16,
        pretrained_window_sizes=[8, 8, 8, 4],
        num_labels=10,
        drop_path_rate=0.0,
    )
    theirs = transformers.Swinv2ForImageClassification(hf_cfg).eval()
    model = randomise(SwinTransformerV2(cfg), seed=3)
    theirs.load_state_dict(convert_state_dict(model.state_dict(), dst="hf"), strict=True)
    x = images["256"][:, :, :128, :128]
    with torch.no_grad():
        diff = _max_diff(model(x), theirs(pixel_values=x).logits)
    assert diff <= TOL, diff
