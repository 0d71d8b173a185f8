"""Registry and MAC counter against the official reference numbers (paper table, official code)."""

from __future__ import annotations

import pytest
import torch

import swinv2
from swinv2.weights.registry import OFFICIAL_PARAMS, count_params, get_variant, model_config

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("family", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_ones(family):
    name = {
        "tiny": "swinv2_tiny_window8_256",
        "small": "swinv2_small_window8_256",
        "base": "swinv2_base_window8_256",
        "large": "swinv2_large_window12to16_192to256",
    }[family]
    assert count_params(model_config(name)) == OFFICIAL_PARAMS[family]


@pytest.mark.parametrize("name", swinv2.list_models())
def test_parameter_counts_equal_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    assert count_params(get_variant(name).config) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", [n for n in swinv2.list_models() if get_variant(n).paper_gmacs])
def test_count_flops_reproduces_the_paper_table(name):
    assert round(swinv2.count_flops(name) / 1e9, 1) == get_variant(name).paper_gmacs


def test_count_flops_grows_with_input_and_accepts_models():
    model = swinv2.create_model("swinv2_micro_window4_32")
    assert swinv2.count_flops(model) == swinv2.count_flops("swinv2_micro_window4_32")
    assert swinv2.count_flops(model, (64, 48)) > swinv2.count_flops(model, 32)
    # Padding is counted as it runs: 30 px pads to the 32 px patch grid.
    assert swinv2.count_flops(model, 30) == swinv2.count_flops(model, 32)


def test_official_config_names_are_aliases():
    v = get_variant("swinv2_base_patch4_window12to16_192to256_22kto1k_ft")
    assert v.name == "swinv2_base_window12to16_192to256"
    assert v.config.pretrained_window_sizes == (12, 12, 12, 6) and v.config.window_size == 16


def test_22k_variants_have_21841_classes():
    for name in ("swinv2_base_window12_192", "swinv2_large_window12_192"):
        assert get_variant(name).config.num_classes == 21841


def test_eval_preprocessing_matches_the_official_rule():
    assert get_variant("swinv2_tiny_window8_256").preprocess.crop_pct == 0.875
    assert get_variant("swinv2_base_window12to24_192to384").preprocess.crop_pct == 1.0
    assert get_variant("swinv2_tiny_window8_256").preprocess.interpolation == "bicubic"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="swinv2_tiny_window8_256"):
        swinv2.create_model("swinv2_tiny_windw8_256")


def test_create_model_overrides():
    m = swinv2.create_model("swinv2_micro_window4_32", num_classes=0, img_size=64, window_size=8)
    assert m.config.img_size == (64, 64) and m.config.window_size == 8
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)
