"""SwinV2 as a detection / segmentation backbone (swinv2.serve.backbone) and the two examples built on it.

The reference for the outputs is the model's own `forward_intermediates` plus a plain `F.layer_norm`
with the backbone's norm parameters, after every parameter is re-randomised (the official init makes
every block an identity); timm's SwinV2 with its own weights format is a second, independent one.
mmpretrain's key names and merging order are checked against a re-implementation of its merging
(nn.Unfold, as mmcv does it).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from randomize import randomize_
from swinv2 import create_backbone
from swinv2.model.transformer import PatchMerging, SwinTransformerV2, SwinV2Config
from swinv2.serve.backbone import SwinV2Backbone, load_backbone_weights
from swinv2.weights.convert import unfold_to_official_reduction

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = SwinV2Config(
    img_size=64,
    embed_dim=16,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8),
    window_size=4,
    pretrained_window_sizes=(0, 0, 0, 0),
    num_classes=0,
    cpb_hidden_dim=32,
)


def _stage_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """(B, C, H, W) through a LayerNorm over C, written out with F.layer_norm."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("out_indices", [None, (1, 3), (0, 2)])
def test_outputs_are_the_stage_maps_through_their_norms(out_indices, make_micro):
    model = make_micro(0, randomized=False) if out_indices is None else SwinTransformerV2(TINY)
    backbone = randomize_(SwinV2Backbone(model, out_indices)).eval()
    x = torch.randn(2, 3, 44, 60)
    with torch.no_grad():
        maps, reference = backbone(x), model.forward_intermediates(x, norm=False)
    assert len(maps) == len(backbone.out_indices)
    for i, got in zip(backbone.out_indices, maps):
        torch.testing.assert_close(got, _stage_norm(reference[i], getattr(backbone, f"norm{i}")), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, channels, strides",
    [
        ("swinv2_tiny_window8_256", [96, 192, 384, 768], [4, 8, 16, 32]),
        ("swinv2_micro_window4_32", [24, 48], [4, 8]),
    ],
)
def test_channels_strides_and_shapes_of_a_non_square_input(name, channels, strides):
    backbone = create_backbone(name).eval()
    assert backbone.out_channels == channels and backbone.strides == strides
    assert [f["num_chs"] for f in backbone.feature_info] == channels
    assert [f["reduction"] for f in backbone.feature_info] == strides
    assert [f["module"] for f in backbone.feature_info] == [f"norm{i}" for i in range(len(channels))]
    assert not hasattr(backbone, "head") and not any(k.startswith(("norm.", "head.")) for k in backbone.state_dict())
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 70, 100))
    assert [tuple(m.shape) for m in maps] == [(1, c, -(-70 // s), -(-100 // s)) for c, s in zip(channels, strides)]


def test_out_indices_and_frozen_stages_out_of_range_are_refused():
    with pytest.raises(ValueError, match="out_indices"):
        create_backbone(TINY, out_indices=(2, 4))
    with pytest.raises(ValueError, match="frozen_stages"):
        create_backbone(TINY, frozen_stages=4)


def _frozen_names(frozen_stages: int) -> set[str]:
    """Parameter-name prefixes mmpretrain's meaning freezes, in our layout (merging i -> i+1 is
    `layers.i.downsample`, part of mmpretrain's stage i+1)."""
    names = {"patch_embed."} if frozen_stages >= 0 else set()
    for i in range(frozen_stages + 1):
        names |= {f"layers.{i}.blocks.", f"norm{i}."} | ({f"layers.{i - 1}.downsample."} if i else set())
    return names


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode(frozen_stages):
    backbone = create_backbone(TINY, frozen_stages=frozen_stages, drop_path_rate=0.2).train()
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, 64, 64))).backward()
    frozen = _frozen_names(frozen_stages)
    for name, p in backbone.named_parameters():
        is_frozen = name.startswith(tuple(frozen))
        assert (p.grad is None) == is_frozen and p.requires_grad != is_frozen, name
    backbone.eval().train()
    for name, module in backbone.named_modules():  # a frozen module and all inside it: eval; the rest: training
        assert module.training != (f"{name}.".startswith(tuple(frozen)) or name == "pos_drop"), name
    assert backbone.layers[frozen_stages].downsample.training  # leads into the next, unfrozen stage


def test_frozen_stages_minus_one_freezes_nothing():
    backbone = create_backbone(TINY).train()
    assert all(p.requires_grad for p in backbone.parameters()) and all(m.training for m in backbone.modules())


def test_norm_eval_keeps_every_norm_in_eval_mode_and_the_rest_training():
    backbone = create_backbone(TINY, norm_eval=True).train()
    for name, module in backbone.named_modules():
        assert module.training != isinstance(module, nn.LayerNorm), name
    assert all(p.requires_grad for p in backbone.parameters())  # norm_eval freezes no parameter


def _outputs(backbone: SwinV2Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return backbone.eval()(x)


def test_backbone_prefixed_checkpoint_loads_and_reports_what_it_dropped(tmp_path):
    source = randomize_(create_backbone(TINY))
    detector = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    detector |= {
        "neck.lateral_convs.0.conv.weight": torch.ones(8, 16, 1, 1),
        "rpn_head.rpn_cls.bias": torch.ones(3),
        "roi_head.bbox_head.fc_cls.weight": torch.ones(11, 8),
        "backbone.layers.0.blocks.0.attn.attn_mask": torch.ones(1),
    }  # derived: dropped without a word
    torch.save({"state_dict": detector, "meta": {"epoch": 12}}, tmp_path / "mmdet.pth")
    target = create_backbone(TINY, weights=tmp_path / "mmdet.pth")
    report = target.load_report
    assert report.ok and len(report.loaded) == len(source.state_dict()) and not report.reinitialised
    assert sorted(d.split(" ")[0] for d in report.dropped) == [
        "neck.lateral_convs.0.conv.weight",
        "roi_head.bbox_head.fc_cls.weight",
        "rpn_head.rpn_cls.bias",
    ]
    assert "(the neck, not the backbone)" in " ".join(report.dropped)
    x = torch.randn(1, 3, 40, 56)
    for a, b in zip(_outputs(source, x), _outputs(target, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _to_mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native backbone keys -> mmpretrain's SwinTransformerV2 (the test's own inverse mapping)."""
    block = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(attn|mlp\.fc1|mlp\.fc2|norm1|norm2|norm3)\.(.+)")
    names = {
        "attn": "attn.w_msa",
        "mlp.fc1": "ffn.layers.0.0",
        "mlp.fc2": "ffn.layers.1",
        "norm1": "norm1",
        "norm2": "norm2",
        "norm3": "norm3",
    }
    out = {}
    for key, value in sd.items():
        if key.startswith("patch_embed.proj."):
            key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
            key = f"stages.{int(m[1]) + 1}.downsample.{m[2]}"
            if m[2] == "reduction.weight":  # official neighbour-major -> mmcv's unfold channel-major order
                o, i = value.shape
                value = value.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)
        elif m := block.fullmatch(key):
            key = f"stages.{m[1]}.blocks.{m[2]}.{names[m[3]]}.{m[4]}"
        out[key] = value
    return out


def test_mmpretrain_checkpoint_converts_to_the_same_outputs():
    source = randomize_(create_backbone(TINY, out_indices=(1, 2, 3)))
    mm = {f"backbone.{k}": v for k, v in _to_mmpretrain(source.state_dict()).items()}
    assert {"backbone.stages.1.downsample.reduction.weight", "backbone.stages.0.blocks.1.ffn.layers.1.bias"} <= set(mm)
    mm["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(16, 16, dtype=torch.int64)
    mm["decode_head.conv_seg.weight"] = torch.ones(11, 8, 1, 1)
    target = create_backbone(TINY, out_indices=(1, 2, 3))
    report = load_backbone_weights(target, mm)
    assert report.src == "mmpretrain" and report.ok and not report.reinitialised
    assert len(report.dropped) == 2
    x = torch.randn(2, 3, 52, 36)
    for a, b in zip(_outputs(source, x), _outputs(target, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mmpretrain_huge_giant_layout_brings_its_extra_norms():
    # SwinV2-H/G's extra LayerNorm (mmpretrain's SwinBlockV2 `norm3`), here every 2nd block of a tiny model.
    source = randomize_(create_backbone(TINY, extra_norm_every_n_blocks=2))
    mm = {f"backbone.{k}": v for k, v in _to_mmpretrain(source.state_dict()).items()}
    assert "backbone.stages.0.blocks.1.norm3.weight" in mm
    target = create_backbone(TINY, extra_norm_every_n_blocks=2)
    report = load_backbone_weights(target, mm)
    assert report.src == "mmpretrain" and report.ok and not report.reinitialised and not report.unexpected
    x = torch.randn(1, 3, 44, 60)
    for a, b in zip(_outputs(source, x), _outputs(target, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unfold_reduction_order_matches_mmcv_patch_merging():
    torch.manual_seed(0)
    C = 6
    ours = PatchMerging(C)
    nn.init.normal_(ours.norm.weight), nn.init.normal_(ours.norm.bias)
    mm_weight = torch.randn(2 * C, 4 * C)
    ours.reduction.weight.data.copy_(unfold_to_official_reduction(mm_weight))
    x = torch.randn(2, 8, 10, C)  # (B, H, W, C)
    unfolded = nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)  # mmcv's merging
    reference = F.layer_norm(F.linear(unfolded, mm_weight), (2 * C,), ours.norm.weight, ours.norm.bias)
    torch.testing.assert_close(ours(x).reshape(2, -1, 2 * C), reference, rtol=1e-5, atol=1e-5)


def test_classifier_checkpoint_gives_final_norm_to_last_stage_and_drops_the_head(make_micro):
    classifier = make_micro(7, std=0.01)
    backbone = create_backbone("swinv2_micro_window4_32", weights=classifier.state_dict())
    report = backbone.load_report
    assert report.ok and report.reinitialised == ["norm0.weight", "norm0.bias"]
    assert sorted(d.split(" ")[0] for d in report.dropped) == ["head.bias", "head.weight"]
    torch.testing.assert_close(backbone.norm1.weight, classifier.norm.weight, rtol=0, atol=0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final = classifier.eval().forward_features(x).permute(0, 3, 1, 2)
    torch.testing.assert_close(_outputs(backbone, x)[1], final, rtol=0, atol=0)


def test_timm_classifier_weights_give_timms_stage_maps():
    """timm's own forward_intermediates as the reference: an independent implementation and format."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    timm_model = randomize_(
        TimmSwinV2(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, num_classes=5)
    ).eval()
    backbone = create_backbone(replace(TINY, cpb_hidden_dim=512), weights=timm_model.state_dict()).eval()
    assert backbone.load_report.src == "timm" and backbone.load_report.ok
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = timm_model.forward_intermediates(x, norm=False, intermediates_only=True)
        maps = backbone(x)
    norms = [backbone.norm0, backbone.norm1, backbone.norm2, timm_model.norm]  # timm's final norm -> norm3
    for got, ref, norm in zip(maps, reference, norms):
        torch.testing.assert_close(got, _stage_norm(ref, norm), rtol=1e-5, atol=1e-5)


def test_strict_load_refuses_a_checkpoint_that_does_not_fit():
    other = create_backbone(replace(TINY, embed_dim=8))
    with pytest.raises(ValueError, match="mismatched"):
        create_backbone(TINY, weights={f"backbone.{k}": v for k, v in other.state_dict().items()})
    partial = {
        f"backbone.{k}": v for k, v in create_backbone(TINY).state_dict().items() if not k.startswith("layers.3.")
    }
    backbone = create_backbone(TINY, weights=partial, strict=False)
    assert backbone.load_report.missing and all(k.startswith("layers.3.") for k in backbone.load_report.missing)


# --------------------------------------------------------------------------- the examples


@pytest.fixture()
def examples(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return lambda name: importlib.import_module(name)


def _loss_drops_on_a_repeated_batch(model: nn.Module, loss_of, steps: int = 2) -> None:
    """Two AdamW steps on one batch; the loss, measured under the same seed before and after, drops."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def measured() -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return loss_of().item()

    before = measured()
    for _ in range(steps):
        torch.manual_seed(2)
        loss = loss_of()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = measured()
    assert after < before, (before, after)


def test_detector_trains_on_digit_scenes(examples):
    scenes_mod, detect = examples("digits_scenes"), examples("detect_digits")
    train, _ = scenes_mod.split_scans()
    scenes = scenes_mod.make_scenes(2, train, size=64, seed=3)
    torch.manual_seed(0)
    model = detect.build_detector(size=64, embed_dim=16, fpn_channels=32).train()
    images, targets = detect.targets_of(scenes)
    _loss_drops_on_a_repeated_batch(model, lambda: sum(model(images, targets).values()))


def test_segmenter_trains_on_digit_scenes(examples):
    scenes_mod, segment = examples("digits_scenes"), examples("segment_digits")
    train, _ = scenes_mod.split_scans()
    scenes = scenes_mod.make_scenes(2, train, size=64, seed=3)
    torch.manual_seed(0)
    model = segment.build_segmenter(size=64, embed_dim=16, channels=32).train()
    images, masks = segment.inputs_of(scenes)
    assert model(images).shape == (2, scenes_mod.NUM_CLASSES, 64, 64)
    _loss_drops_on_a_repeated_batch(model, lambda: F.cross_entropy(model(images), masks))


def test_scenes_are_exact_and_split_by_scan(examples):
    scenes_mod = examples("digits_scenes")
    train, val = scenes_mod.split_scans()
    assert not set(train) & set(val) and len(train) + len(val) == 1797
    scenes = scenes_mod.make_scenes(5, val, seed=4)
    assert all(torch.equal(a.image, b.image) for a, b in zip(scenes, scenes_mod.make_scenes(5, val, seed=4)))
    for s in scenes:
        covered = torch.zeros_like(s.mask, dtype=torch.bool)
        for (x0, y0, x1, y1), label in zip(s.boxes.long().tolist(), s.labels.tolist()):
            ink = s.mask[y0:y1, x0:x1] == label
            rows, cols = ink.any(1), ink.any(0)
            assert rows[0] and rows[-1] and cols[0] and cols[-1]  # tight: ink on all four edges
            covered[y0:y1, x0:x1] |= ink
        assert torch.equal(covered, s.mask > 0)  # every ink pixel lies in a box of its own digit


def test_map_is_one_for_the_truth_and_lower_for_a_wrong_label(examples):
    scenes_mod = examples("digits_scenes")
    scenes = scenes_mod.make_scenes(4, scenes_mod.split_scans()[1], seed=5)
    truth = [{"boxes": s.boxes, "labels": s.labels, "scores": torch.ones(len(s.labels))} for s in scenes]
    assert scenes_mod.mean_average_precision(truth, scenes)[0] == pytest.approx(1.0)
    wrong = [dict(t, labels=t["labels"] % 10 + 1) for t in truth]
    assert scenes_mod.mean_average_precision(wrong, scenes)[0] == pytest.approx(0.0)
    scores = scenes_mod.segmentation_scores(scenes_mod.confusion_matrix(scenes[0].mask, scenes[0].mask))
    assert scores["miou"] == pytest.approx(1.0) and scores["pixel_accuracy"] == pytest.approx(1.0)
