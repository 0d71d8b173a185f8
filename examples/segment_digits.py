"""Train a semantic segmenter with a SwinV2 backbone to label every pixel of handwritten digits, on the CPU.

    python examples/segment_digits.py --out runs/segment_digits

Scenes of 1..4 real handwritten digits (examples/digits_scenes.py: scikit-learn's scans, upscaled and
pasted; exact per-pixel masks; val digits never seen in training), 11 classes (background + 10
digits). The model is `swinv2.serve.backbone.SwinV2Segmenter`: a tiny 4-stage SwinV2 (embed dim 32, window
4, strides 4..32) under a light Semantic-FPN decoder, trained from scratch with per-pixel cross-entropy
for a fixed number of steps. Reports mIoU and pixel accuracy on the val scenes and draws the masks.
Writes into --out: metrics.json, predictions.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_scenes import (  # noqa: E402
    CLASS_NAMES,
    NUM_CLASSES,
    Scene,
    confusion_matrix,
    parse_args,
    scenes_for,
    segmentation_scores,
    train,
    write_metrics,
)
from swinv2 import SwinV2Config, create_backbone  # noqa: E402
from swinv2.serve.backbone import SwinV2Segmenter  # noqa: E402

MEAN, STD = 0.1, 0.25  # of the scenes' pixels, roughly: inputs centred for the patch embedding
# Ten colours told apart at a glance on a dark image (Trubetskoy's "distinct colours"); digit d gets the d-th.
DIGIT_COLOURS = [
    "#4363d8",
    "#f58231",
    "#3cb44b",
    "#e6194b",
    "#911eb4",
    "#ffe119",
    "#f032e6",
    "#42d4f4",
    "#bfef45",
    "#fabed4",
]


def tiny_config(size: int = 96, embed_dim: int = 32) -> SwinV2Config:
    """A 4-stage SwinV2 small enough to train on two CPU cores in minutes (window 4, strides 4..32)."""
    return SwinV2Config(
        img_size=size,
        embed_dim=embed_dim,
        depths=(2, 2, 2, 2),
        num_heads=(2, 4, 8, 16),
        window_size=4,
        pretrained_window_sizes=(0, 0, 0, 0),
        num_classes=0,
        drop_path_rate=0.1,
    )


def build_segmenter(size: int = 96, embed_dim: int = 32, channels: int = 64) -> SwinV2Segmenter:
    """SwinV2Backbone (every stage) + Semantic-FPN decoder, 11 classes."""
    return SwinV2Segmenter(create_backbone(tiny_config(size, embed_dim)), NUM_CLASSES, channels)


def inputs_of(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) normalised images and (B, H, W) class masks."""
    return (torch.stack([s.image for s in scenes]) - MEAN) / STD, torch.stack([s.mask for s in scenes])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scenes: list[Scene]) -> float:
    """One step of per-pixel cross-entropy over the 11 classes."""
    model.train()
    images, masks = inputs_of(scenes)
    loss = F.cross_entropy(model(images), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model: nn.Module, scenes: list[Scene], batch_size: int = 32) -> torch.Tensor:
    """(N, H, W) predicted classes."""
    model.eval()
    return torch.cat(
        [model(inputs_of(scenes[i : i + batch_size])[0]).argmax(1) for i in range(0, len(scenes), batch_size)]
    )


def _colour(mask: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """(H, W, 4) RGBA: digit classes in their colour, background transparent."""
    rgba = palette[mask.numpy()]
    rgba[..., 3] = np.where(mask.numpy() > 0, 0.75, 0.0)
    return rgba


def draw(scenes: list[Scene], predicted: torch.Tensor, path: Path, n: int = 6) -> None:
    """Per val scene: the image, the true mask and the predicted mask, coloured by digit, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = np.array([(0, 0, 0, 0)] + [matplotlib.colors.to_rgba(c) for c in DIGIT_COLOURS], dtype=np.float64)
    fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 7))
    for col, (scene, pred) in enumerate(zip(scenes[:n], predicted[:n])):
        for row, (mask, title) in enumerate([(None, "image"), (scene.mask, "truth"), (pred, "predicted")]):
            ax = axes[row, col]
            ax.imshow(scene.image[0], cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                ax.imshow(_colour(mask, palette.copy()), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.legend(
        handles=[Patch(color=palette[c], label=CLASS_NAMES[c]) for c in range(1, NUM_CLASSES)],
        loc="lower center",
        ncol=10,
        fontsize=8,
        title="digit",
    )
    fig.suptitle("SwinV2 + Semantic FPN, val scenes: per-pixel digit classes")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv, doc=__doc__, out="runs/segment_digits", steps=1200)
    start = time.perf_counter()
    train_scenes, val = scenes_for(args)
    model = build_segmenter(args.size)
    losses = train(model, train_scenes, args, train_step)
    train_s = time.perf_counter() - start
    predicted = predict(model, val)
    scores = segmentation_scores(confusion_matrix(predicted, torch.stack([s.mask for s in val])))
    wall = time.perf_counter() - start
    metrics = {
        "miou": scores["miou"],
        "miou_digits": scores["miou_digits"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "iou_per_class": dict(zip(CLASS_NAMES, scores["iou_per_class"])),
        "val_scenes": len(val),
        "train_scenes": len(train_scenes),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "final_loss": float(np.mean(losses[-50:])),
        "train_s": round(train_s, 1),
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "seed": args.seed,
        "params": sum(p.numel() for p in model.parameters()),
    }
    write_metrics(args.out, metrics)
    draw(val, predicted, args.out / "predictions.png")
    print(
        f"val mIoU {scores['miou']:.3f} (digits only {scores['miou_digits']:.3f}), pixel accuracy "
        f"{scores['pixel_accuracy']:.4f} over {len(val)} scenes; wall time {wall:.0f} s; "
        f"wrote {args.out}/metrics.json, predictions.png"
    )
    return metrics


if __name__ == "__main__":
    main()
