"""Every matplotlib figure of the project: training curves, confusion matrix, per-class accuracy,
prediction grids, continuous-position-bias maps and SimMIM reconstructions. Figures are written as PNG files with
the Agg backend (no display needed)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# --------------------------------------------------------------------------- evaluation, predictions, CPB


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG through `outputs.write_output`: a regular file atomically (no half-written
    image, no temp name shared with another process), a symlink through to its target."""
    from .outputs import write_output

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_output(path, buf.getvalue())
    return Path(path)


def plot_confusion_matrix(
    confusion: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "Confusion matrix",
) -> Path:
    """(C, C) counts, rows = true class, columns = predicted, shown row-normalised (recall per row).

    Cells carry their count when C <= 20; class names label the axes when C <= 50.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    C = cm.shape[0]
    if cm.shape != (C, C) or len(class_names) != C:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(max(4.0, 0.45 * C + 2.5), 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if C <= 50:
        ax.set_xticks(
            range(C), labels=class_names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8 if C > 15 else 10
        )
        ax.set_yticks(range(C), labels=class_names, fontsize=8 if C > 15 else 10)
    if C <= 20:
        for i in range(C):
            for j in range(C):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=8 if C > 10 else 10,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
    acc = 100 * np.trace(cm) / max(cm.sum(), 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} — top-1 {acc:.1f}% of {int(cm.sum())} images")
    return _save(fig, path)


def plot_per_class_accuracy(
    accuracy: Sequence[float],
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    counts: Sequence[int] | None = None,
    max_classes: int = 40,
) -> Path:
    """Horizontal bars of top-1 accuracy (percent) per class, worst first.

    With more than `max_classes` classes only the `max_classes` worst are drawn (the title says so).
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    if len(acc) != len(class_names):
        raise ValueError(f"{len(acc)} accuracies for {len(class_names)} class names")
    order = np.argsort(acc, kind="stable")[:max_classes]
    shown = len(order)
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.3 * shown + 1.2)))
    y = np.arange(shown)[::-1]  # worst at the top
    colors = plt.cm.RdYlGn(acc[order] / 100)
    ax.barh(y, acc[order], color=colors, edgecolor="0.3", linewidth=0.5)
    labels = [class_names[i] if counts is None else f"{class_names[i]} (n={counts[i]})" for i in order]
    ax.set_yticks(y, labels=labels, fontsize=9 if shown <= 20 else 7)
    for yi, a in zip(y, acc[order]):
        ax.text(min(a + 1, 101), yi, f"{a:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("top-1 accuracy (%)")
    mean = float(acc.mean()) if len(acc) else 0.0
    what = f"the {shown} worst of {len(acc)} classes" if shown < len(acc) else f"{len(acc)} classes"
    ax.set_title(f"Per-class accuracy, {what} (class mean {mean:.1f}%)")
    ax.axvline(mean, color="0.4", linestyle="--", linewidth=1)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_prediction_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | os.PathLike,
    *,
    titles: Sequence[str] | None = None,
    correct: Sequence[bool | None] | None = None,
    title: str | None = None,
    cols: int = 4,
) -> Path:
    """Images (H, W, 3 uint8) in a grid, each above its caption (e.g. one "label  prob" line per top-k).

    `titles` go above the images; `correct[k]` True / False marks image k's title with a green ✓ / red ✗
    (None: no known truth, no mark). `title` heads the whole figure.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"need one caption per image and at least one image; got {len(images)} images, {len(captions)} captions"
        )
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    lines = max(c.count("\n") + 1 for c in captions)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, rows * (3.0 + 0.2 * lines)), squeeze=False, layout="constrained"
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[k])
        # The caption is the x label (not free text) so that the layout makes room for it.
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
        ax.set_xlabel(captions[k], loc="left", fontsize=8, family="monospace")
        mark = None if correct is None else correct[k]
        text = titles[k] if titles is not None else ""
        if mark is not None:
            text = f"{'✓' if mark else '✗'} {text}".rstrip()
        if text:
            ax.set_title(text, fontsize=8, color={None: "black", True: "tab:green", False: "tab:red"}[mark])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_cpb_maps(
    biases: Sequence[np.ndarray],
    path: str | os.PathLike,
    *,
    stage: int,
    window: int | tuple[int, int],
    pretrained_window: int | tuple[int, int] = 0,
    max_cols: int = 12,
) -> Path:
    """One stage's position bias: a heat map per block and head over the (2h-1) x (2w-1) offsets.

    `biases[j]` is block j's (heads, 2h-1, 2w-1) table of 16 * sigmoid(cpb_mlp(offset)) for a window
    w (square) or (h, w). Rows are blocks (wrapped every `max_cols` heads); one colour scale for the
    whole stage; offset (0, 0) is the centre of each map, dy down, dx right.
    """
    wh, ww = (window, window) if isinstance(window, int) else window
    biases = [np.asarray(b, dtype=np.float32) for b in biases]
    heads = biases[0].shape[0]
    cols = min(heads, max_cols)
    wraps = -(-heads // cols)
    rows = len(biases) * wraps
    vmin = min(float(b.min()) for b in biases)
    vmax = max(float(b.max()) for b in biases)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.45 * cols + 1.2, 1.5 * rows + 0.9), squeeze=False, layout="constrained"
    )
    extent = (-(ww - 1) - 0.5, ww - 0.5, wh - 0.5, -(wh - 1) - 0.5)
    im = None
    for j, b in enumerate(biases):
        for h in range(wraps * cols):
            ax = axes[j * wraps + h // cols, h % cols]
            if h >= heads:
                ax.axis("off")
                continue
            im = ax.imshow(b[h], cmap="viridis", vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
            ax.set_title(f"block {j} head {h}", fontsize=7)
            ax.set_xticks([-(ww - 1), 0, ww - 1])
            ax.set_yticks([-(wh - 1), 0, wh - 1])
            ax.tick_params(labelsize=6, length=2)
    pre = f", pre-trained window {pretrained_window}" if pretrained_window else ""
    fig.suptitle(
        f"Stage {stage}: continuous position bias 16·sigmoid(cpb_mlp), window {window}{pre}\n"
        f"(relative offset dy down, dx right; range {vmin:.2f} to {vmax:.2f})",
        fontsize=10,
    )
    assert im is not None  # heads >= 1 (0 would have divided by zero above): block 0 head 0 drew a map
    fig.colorbar(im, ax=axes, shrink=min(0.9, 0.3 + 0.25 * rows), aspect=30)
    return _save(fig, path)


def plot_reconstructions(rows: dict[str, np.ndarray], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """SimMIM's progress: one row per entry of `rows` (e.g. masked input, reconstruction, original),
    each a (N, H, W, 3) uint8 batch of the same N images, one column per image."""
    names = list(rows)
    n = len(rows[names[0]])
    if not n or any(len(rows[k]) != n for k in names):
        raise ValueError(f"every row needs the same number (> 0) of images, got {[len(rows[k]) for k in names]}")
    fig, axes = plt.subplots(
        len(names), n, figsize=(1.4 * n + 1.2, 1.5 * len(names) + 0.5), squeeze=False, layout="constrained"
    )
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(rows[name][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- training


def plot_training_curves(
    metrics: Sequence[dict], out_png: str | os.PathLike, *, num_classes: int | None = None
) -> Path:
    """Loss, accuracy and learning-rate curves from the rows of a run's metrics.jsonl.

    Uses the keys present: train_loss / val_loss / val_ema_loss, val_top1 / val_top5 / val_ema_top1
    (percent) and lr (the LR at each epoch's last step), all against `epoch`. Top-5 is left out for a
    model of `num_classes` <= 5, where it is always 100%.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    accuracy = [("val_top1", "val top-1"), ("val_top5", "val top-5"), ("val_ema_top1", "val top-1 (EMA)")]
    if num_classes is not None and num_classes <= 5:
        accuracy.remove(("val_top5", "val top-5"))
    panels = [
        (axes[0], "loss", [("train_loss", "train"), ("val_loss", "val"), ("val_ema_loss", "val (EMA)")]),
        (axes[1], "accuracy (%)", accuracy),
        (axes[2], "learning rate", [("lr", "lr")]),
    ]
    for ax, ylabel, series in panels:
        for key, label in series:
            pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None and np.isfinite(m[key])]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="." if len(pts) < 30 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines and ylabel != "learning rate":
            ax.legend()
    best = [m["val_top1"] for m in metrics if m.get("val_top1") is not None]
    if best:
        axes[1].set_title(f"best val top-1 {max(best):.2f}%")
    elif not axes[1].lines:  # say why the panel is empty rather than draw blank axes
        pretraining = any(m.get("val_loss") is not None for m in metrics)  # a loss but no accuracy: no labels
        why = (
            "no accuracy: pretraining without labels\n(its validation is the loss, left)"
            if pretraining
            else "no validation data\n(no val folder, or not evaluated yet)"
        )
        axes[1].text(0.5, 0.5, why, ha="center", va="center", transform=axes[1].transAxes, color="0.4")
        axes[1].set_yticks([])
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return _save(fig, out_png)
