"""How images are normalised and cropped for evaluation: the ImageNet mean/std and the official crop
rule, in one place for the data pipeline, the weights' metadata, the converters and the runtimes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(img_size: int, crop_pct: float) -> int:
    """The official eval crop rule: the shorter side is resized to floor(img_size / crop_pct), then
    the centre img_size x img_size is cropped (crop_pct 1.0: resize straight to img_size)."""
    if not 0 < crop_pct <= 1:
        raise InputError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return math.floor(img_size / crop_pct)


@dataclass(frozen=True)
class EvalPreprocess:
    """Official eval transform: resize to img_size / crop_pct (bicubic), centre crop img_size."""

    img_size: int
    crop_pct: float
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_size(self) -> int:
        return resize_size(self.img_size, self.crop_pct)
