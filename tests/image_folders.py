"""Generated image-folder datasets, for the test files that read or train on one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: Path, *, classes=("a", "b"), n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """root/{train,val}/<class>/NN.png: noisy images whose bright half (left/right/...) is the class,
    so that a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size, 3))
                half = size // 2
                region = [np.s_[:, :half], np.s_[:, half:], np.s_[:half, :], np.s_[half:, :]][c % 4]
                img[region] += 150
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root
