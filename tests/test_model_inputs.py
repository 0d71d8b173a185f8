"""Edges of the public model API: a negative class count, and a single image where a batch is expected."""

from __future__ import annotations

import pytest
import torch

from swinv2 import create_model
from swinv2.model.transformer import SwinTransformerV2, SwinV2Config

MICRO = "swinv2_micro_window4_32"


@pytest.mark.parametrize("num_classes", [-1, -1000])
def test_negative_num_classes_is_refused(num_classes: int) -> None:
    with pytest.raises(ValueError, match=rf"num_classes.*{num_classes}"):
        create_model(MICRO, num_classes=num_classes)
    with pytest.raises(ValueError, match="num_classes"):
        SwinV2Config(num_classes=num_classes)
    model = create_model(MICRO, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(num_classes)
    assert model.head.out_features == 3  # untouched


def test_zero_classes_is_a_feature_extractor() -> None:
    model = create_model(MICRO, num_classes=0).eval()
    assert isinstance(model.head, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 48)  # pooled features, as timm's num_classes=0


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (2, 4, 32, 32)])
def test_input_that_is_not_a_batch_of_images_fails_in_one_line(shape: tuple[int, ...]) -> None:
    model = SwinTransformerV2(
        SwinV2Config(
            img_size=32,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
            pretrained_window_sizes=(0, 0),
            num_classes=5,
        )
    ).eval()
    x = torch.randn(shape)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError) as e:
            call(x)
        msg = str(e.value)
        assert "(B, 3, H, W)" in msg and str(tuple(shape)) in msg and "\n" not in msg, msg
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
