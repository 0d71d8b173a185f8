"""evaluate(): loss / top-1 / top-5 / confusion checked against scikit-learn's metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, log_loss, top_k_accuracy_score
from torch import nn

from swinv2.train.datasets import Batch
from swinv2.train.evaluate import evaluate


class FixedLogits(nn.Module):
    """Returns precomputed logits for the sample whose index is written in pixel [0, 0, 0]."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.num_classes = logits.shape[1]
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()] + self.dummy


def _loader(n: int, labels: torch.Tensor, batch: int):
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        x = torch.zeros(len(idx), 3, 2, 2)
        x[:, 0, 0, 0] = idx.float()
        yield x, labels[idx]


@pytest.mark.parametrize("num_classes", [7, 3])
def test_metrics_match_sklearn(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    n = 103
    logits = torch.randn(n, num_classes, generator=g) * 2
    labels = torch.randint(0, num_classes, (n,), generator=g)
    model = FixedLogits(logits).train()
    out = evaluate(model, _loader(n, labels, 16), return_confusion=True)
    assert model.training  # mode restored
    y, p = labels.numpy(), torch.softmax(logits.double(), 1).numpy()
    assert out["n"] == n
    assert out["loss"] == pytest.approx(log_loss(y, p, labels=list(range(num_classes))), rel=1e-6)
    assert out["top1"] == pytest.approx(100 * top_k_accuracy_score(y, p, k=1, labels=list(range(num_classes))))
    k = min(5, num_classes)
    top5 = 100 * top_k_accuracy_score(y, p, k=k, labels=list(range(num_classes))) if k < num_classes else 100.0
    assert out["top5"] == pytest.approx(top5)
    ref = confusion_matrix(y, logits.argmax(1).numpy(), labels=list(range(num_classes)))
    assert out["confusion"].dtype == torch.int64 and np.array_equal(out["confusion"].numpy(), ref)
    assert out["img_per_s"] > 0


def test_batches_with_dropped_files_and_empty_batches():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    model = FixedLogits(logits)
    x = torch.zeros(3, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(3).float()
    batches = [
        Batch(x[:2], torch.tensor([0, 0]), torch.tensor([0, 1]), [("bad.jpg", "cannot decode")]),
        Batch(
            torch.empty(0),
            torch.empty(0, dtype=torch.int64),
            torch.empty(0, dtype=torch.int64),
            [("a.png", "empty file"), ("b.png", "empty file")],
        ),
        Batch(x[2:], torch.tensor([0]), torch.tensor([2]), []),
    ]
    out = evaluate(model, batches)
    assert out["n"] == 3 and out["skipped"] == 3
    assert out["top1"] == pytest.approx(200 / 3)
