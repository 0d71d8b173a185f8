"""Pure state-dict mappings: exact key sets of the real libraries, round trips, detection, unwrapping.

References are the state dicts of models built by timm, transformers and torchvision themselves
(tiny widths, 3 stages, window 4, 32 px, so each build takes milliseconds).
"""

from __future__ import annotations

import pytest
import torch

from swinv2.model.transformer import DERIVED_KEYS as MODEL_DERIVED_KEYS
from swinv2.model.transformer import SwinTransformerV2, SwinV2Config
from swinv2.weights.convert import (
    DERIVED_KEYS,
    Template,
    convert,
    convert_state_dict,
    detect_format,
    from_native,
    tv_derived_buffers,
    unwrap,
)

EMBED, DEPTHS, HEADS, WINDOW, IMG = 24, (2, 2, 2), (2, 4, 8), 4, 32
CFG = SwinV2Config(
    img_size=IMG,
    embed_dim=EMBED,
    depths=DEPTHS,
    num_heads=HEADS,
    window_size=WINDOW,
    pretrained_window_sizes=(0, 0, 0),
    num_classes=7,
)


def _randomised_sd(seed: int = 0, cfg: SwinV2Config = CFG) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = SwinTransformerV2(cfg)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _timm():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "swinv2_tiny_window8_256",
        img_size=IMG,
        embed_dim=EMBED,
        depths=DEPTHS,
        num_heads=HEADS,
        window_size=WINDOW,
        num_classes=7,
    )


def _hf(num_labels: int = 7, cls: str = "Swinv2ForImageClassification"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Swinv2Config(
        image_size=IMG,
        embed_dim=EMBED,
        depths=list(DEPTHS),
        num_heads=list(HEADS),
        window_size=WINDOW,
        num_labels=num_labels,
    )
    return getattr(transformers, cls)(cfg)


def _tv():
    from torchvision.models import swin_transformer as tv

    return tv.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=EMBED,
        depths=list(DEPTHS),
        num_heads=list(HEADS),
        window_size=[WINDOW, WINDOW],
        num_classes=7,
        block=tv.SwinTransformerBlockV2,
        downsample_layer=tv.PatchMergingV2,
    )


LIBS = {"timm": _timm, "hf": _hf, "torchvision": _tv}


def _assert_equal_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_derived_key_names_match_the_model() -> None:
    assert DERIVED_KEYS == MODEL_DERIVED_KEYS


@pytest.mark.parametrize("fmt", ["timm", "hf", "torchvision"])
def test_keys_and_shapes_match_the_real_library(fmt: str) -> None:
    theirs = LIBS[fmt]().state_dict()
    ours = convert_state_dict(_randomised_sd(), dst=fmt, config=CFG)
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:10]
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k
    if fmt == "torchvision":  # its persistent derived buffers: ours must equal the ones it computes
        for k in theirs:
            if k.endswith(("relative_coords_table", "relative_position_index")):
                assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("fmt", ["native", "official", "timm", "hf", "torchvision"])
def test_round_trip_native_to_x_to_native_is_bit_identical(fmt: str) -> None:
    sd = _randomised_sd(1)
    there = convert_state_dict(sd, dst=fmt, config=CFG)
    assert detect_format(unwrap(there)) == ("native" if fmt == "official" else fmt)
    _assert_equal_dicts(convert_state_dict(there, src="auto"), sd)
    _assert_equal_dicts(convert_state_dict(there, src=fmt), sd)


@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_round_trip_foreign_to_native_to_foreign_is_bit_identical(fmt: str) -> None:
    g = torch.Generator().manual_seed(2)
    theirs = {k: torch.randn(v.shape, generator=g) for k, v in LIBS[fmt]().state_dict().items()}
    _assert_equal_dicts(convert_state_dict(convert_state_dict(theirs), dst=fmt, config=CFG), theirs)


def test_torchvision_round_trip_zeroes_only_the_ignored_k_bias() -> None:
    tv = _tv()
    g = torch.Generator().manual_seed(3)
    theirs = {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() and "relative_coords" not in k else v)
        for k, v in tv.state_dict().items()
    }
    conv = convert(theirs)
    assert conv.src == "torchvision"
    assert "layers.0.blocks.0.attn.qkv.bias[C:2C]" in conv.dropped  # its random k part, reported
    back = convert_state_dict(conv.state_dict, dst="torchvision", config=CFG)
    for k, v in theirs.items():
        if k.endswith("attn.qkv.bias"):
            c = v.numel() // 3
            assert torch.equal(back[k][:c], v[:c]) and torch.equal(back[k][2 * c :], v[2 * c :])
            assert not back[k][c : 2 * c].any()
        else:
            assert torch.equal(back[k], v), k


def test_hf_swinv2model_without_prefix_loads_headless() -> None:
    base = _hf(cls="Swinv2Model")
    g = torch.Generator().manual_seed(4)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    assert not any(k.startswith("swinv2.") for k in sd)
    model = SwinTransformerV2(SwinV2Config(**{**CFG.to_dict(), "num_classes": 0}))
    model.load_state_dict(convert_state_dict(sd), strict=True)
    q = sd["encoder.layers.1.blocks.1.attention.self.query.weight"]
    assert torch.equal(model.layers[1].blocks[1].attn.qkv.weight[: q.shape[0]], q)


def test_unwrapping_and_derived_buffers() -> None:
    sd = _randomised_sd(5)
    official = dict(sd)
    official["layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    for wrapped in (
        {"model": official, "epoch": 3},
        {"state_dict": official},
        {"model": {"module." + k: v for k, v in official.items()}},
    ):
        conv = convert(wrapped)
        assert conv.src == "native"
        _assert_equal_dicts(conv.state_dict, sd)


def test_detection_refuses_unknown_dicts() -> None:
    with pytest.raises(ValueError, match="cannot tell the format"):
        convert_state_dict({"encoder.block.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown weights format"):
        convert_state_dict(_randomised_sd(), src="onnx")
    with pytest.raises(ValueError, match="cannot write weights format 'swinv1'"):
        convert_state_dict(_randomised_sd(), dst="swinv1")


def test_shape_checks_fail_loudly() -> None:
    sd = _randomised_sd(6)
    sd["layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(10, 24)
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0\.attn\.qkv\.weight: expected \(3C, C\)"):
        convert_state_dict(sd, dst="hf")
    with pytest.raises(ValueError, match="needs the model config"):
        from_native(_randomised_sd(), "torchvision")


def test_unknown_keys_pass_through_unmapped() -> None:
    sd = _randomised_sd(7)
    sd["swinv2.embeddings.mask_token"] = torch.zeros(1, 1, EMBED)  # masked-image-modelling only
    hf = convert_state_dict(sd, dst="hf")
    conv = convert(hf)
    assert conv.unmapped == ["swinv2.embeddings.mask_token"]
    assert "swinv2.embeddings.mask_token" in conv.state_dict


def test_template_index_arithmetic() -> None:
    t = Template("features.{2i+1}.{j}.{*}")
    assert t.match("features.5.3.attn.proj.weight") == {"i": 2, "j": 3, "*": "attn.proj.weight"}
    assert t.match("features.4.3.x") is None  # even: a merging layer, not a stage
    assert t.format({"i": 2, "j": 3, "*": "mlp.0.bias"}) == "features.5.3.mlp.0.bias"
    assert Template("layers.{i+1}.downsample.{*}").match("layers.0.downsample.norm.weight") is None


def test_tv_derived_buffers_formula_window_8() -> None:
    table, index = tv_derived_buffers(8)
    assert table.shape == (1, 15, 15, 2) and index.shape == (8**4,)
    # corner offset -(w-1) normalises to -8 -> sign * log2(9) / 3
    assert table[0, 0, 0, 0].item() == pytest.approx(-torch.log2(torch.tensor(9.0)).item() / 3)
    assert index.max().item() == 15 * 15 - 1 and index[0].item() == 7 * 15 + 7
