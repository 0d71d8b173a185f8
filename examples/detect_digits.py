"""Train a Faster R-CNN with a SwinV2 backbone to find and read handwritten digits, on the CPU.

    python examples/detect_digits.py --out runs/detect_digits

Scenes of 1..4 real handwritten digits (examples/digits_scenes.py: scikit-learn's scans, upscaled and
pasted; exact boxes; val digits never seen in training). The detector is torchvision's FasterRCNN on
a tiny 3-stage SwinV2 (embed dim 32, window 4, strides 4/8/16) under torchvision's FPN, with anchors
sized to the digits (12..36 px, tall). It trains from scratch for a fixed number of steps, then
reports mAP@0.5 on the val scenes and draws its detections. Writes into --out: metrics.json,
predictions.png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_scenes import (  # noqa: E402
    CLASS_NAMES,
    NUM_CLASSES,
    Scene,
    mean_average_precision,
    parse_args,
    scenes_for,
    train,
    write_metrics,
)
from swinv2 import SwinV2Config, create_backbone  # noqa: E402
from swinv2.serve.backbone import SwinV2FPN  # noqa: E402

# Anchor sizes per FPN level (strides 4, 8, 16) and tall aspect ratios (h / w): digit ink boxes are
# 7..29 px wide and 22..32 px high (h / w 1.3..1.8, up to ~4 for a "1").
ANCHOR_SIZES = ((12, 16), (20, 24), (28, 36))
ASPECT_RATIOS = ((1.0, 1.5, 2.5),) * 3


def tiny_config(size: int = 96, embed_dim: int = 32) -> SwinV2Config:
    """A 3-stage SwinV2 small enough to train on two CPU cores in minutes (window 4, strides 4/8/16)."""
    return SwinV2Config(
        img_size=size,
        embed_dim=embed_dim,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=4,
        pretrained_window_sizes=(0, 0, 0),
        num_classes=0,
        drop_path_rate=0.1,
    )


def build_detector(size: int = 96, embed_dim: int = 32, fpn_channels: int = 64) -> nn.Module:
    """torchvision FasterRCNN on SwinV2Backbone + FPN, with light heads (a 256-wide box MLP)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    body = create_backbone(tiny_config(size, embed_dim), out_indices=(0, 1, 2))
    backbone = SwinV2FPN(body, out_channels=fpn_channels, extra_pool=False)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=size,
        max_size=size,
        image_mean=[0.1] * 3,
        image_std=[0.25] * 3,
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS),
        box_roi_pool=MultiScaleRoIAlign(backbone.featmap_names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, NUM_CLASSES),
        rpn_pre_nms_top_n_train=400,
        rpn_post_nms_top_n_train=200,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=64,
        box_score_thresh=0.01,
        box_detections_per_img=20,
    )


def targets_of(scenes: list[Scene]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    return [s.image for s in scenes], [{"boxes": s.boxes, "labels": s.labels} for s in scenes]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scenes: list[Scene]) -> float:
    """One step on the summed Faster R-CNN losses (RPN objectness + box, classifier + box)."""
    model.train()
    images, targets = targets_of(scenes)
    loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model: nn.Module, scenes: list[Scene], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    model.eval()
    out = []
    for i in range(0, len(scenes), batch_size):
        out += model([s.image for s in scenes[i : i + batch_size]])
    return out


def draw(
    scenes: list[Scene], predictions: list[dict[str, torch.Tensor]], path: Path, threshold: float = 0.5, n: int = 12
) -> None:
    """Val scenes with the detections scoring >= threshold (label, score) and true boxes dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3 * cols, 3 * math.ceil(n / cols)))
    for ax, scene, pred in zip(axes.flat, scenes[:n], predictions[:n]):
        ax.imshow(scene.image[0], cmap="gray", vmin=0, vmax=1)
        for box in scene.boxes.tolist():
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="white", ls="--", lw=0.8))
        for box, label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist()):
            if score >= threshold:
                ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="lime", lw=1.5))
                ax.text(
                    box[0],
                    box[1] - 1,
                    f"{CLASS_NAMES[label]} {score:.2f}",
                    color="lime",
                    fontsize=8,
                    va="bottom",
                    bbox=dict(facecolor="black", alpha=0.6, pad=0.5, lw=0),
                )
        ax.axis("off")
    fig.suptitle(f"Faster R-CNN + SwinV2, val scenes: detections >= {threshold} (green), truth (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv, doc=__doc__, out="runs/detect_digits", steps=400)
    start = time.perf_counter()
    train_scenes, val = scenes_for(args)
    model = build_detector(args.size)
    losses = train(model, train_scenes, args, train_step)
    train_s = time.perf_counter() - start
    predictions = predict(model, val)
    mean_ap, per_class = mean_average_precision(predictions, val)
    wall = time.perf_counter() - start
    metrics = {
        "map50": mean_ap,
        "ap50_per_digit": dict(zip(CLASS_NAMES[1:], per_class)),
        "val_scenes": len(val),
        "val_digits": int(sum(len(s.labels) for s in val)),
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
    draw(val, predictions, args.out / "predictions.png")
    print(
        f"val mAP@0.5 {mean_ap:.3f} over {metrics['val_digits']} digits in {len(val)} scenes; "
        f"wall time {wall:.0f} s; wrote {args.out}/metrics.json, predictions.png"
    )
    return metrics


if __name__ == "__main__":
    main()
