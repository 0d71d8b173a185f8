"""The figures of eval / predict / viz-cpb are valid PNGs; the CPB tables drawn are timm's (a real
reference), at the native window and at any other window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import swinv2
from swinv2 import plots
from swinv2.cli import main
from swinv2.model.cpb import cpb_tables

timm = pytest.importorskip("timm")
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2  # noqa: E402
from timm.models.swin_transformer_v2 import checkpoint_filter_fn  # noqa: E402


def _valid_png(path, min_side=150):
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
    with Image.open(path) as im:
        assert min(im.size) >= min_side
        arr = np.asarray(im.convert("L"))
        assert arr.std() > 5  # not a blank canvas


def test_eval_and_prediction_figures(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(8)]
    cm = rng.integers(0, 4, (8, 8)) + np.diag(rng.integers(5, 20, 8))
    _valid_png(plots.plot_confusion_matrix(cm, names, tmp_path / "cm.png"))
    acc = 100 * np.diag(cm) / cm.sum(1)
    _valid_png(plots.plot_per_class_accuracy(acc, names, tmp_path / "acc.png", counts=cm.sum(1).tolist()))
    big = rng.uniform(0, 100, 1000)  # only the worst are drawn
    _valid_png(plots.plot_per_class_accuracy(big, [str(i) for i in range(1000)], tmp_path / "acc1000.png"))
    images = [rng.integers(0, 256, (30 + 10 * i, 40, 3), dtype=np.uint8) for i in range(5)]
    captions = ["tabby  81.0%\ntiger  10.0%"] * 5
    _valid_png(plots.plot_prediction_grid(images, captions, tmp_path / "grid.png", titles=list("abcde")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "acc1000.png", "cm.png", "grid.png"]


def test_bad_figure_inputs_raise_and_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_matrix(np.zeros((3, 3)), ["a", "b"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="caption"):
        plots.plot_prediction_grid([np.zeros((4, 4, 3), np.uint8)], [], tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []


def _timm_tables(ours: swinv2.SwinTransformerV2, window: int) -> list[torch.Tensor]:
    """16 * sigmoid(cpb_mlp(relative_coords_table)) of every block of a timm model with our weights."""
    c = ours.config
    ref = TimmSwinV2(
        img_size=c.img_size,
        embed_dim=c.embed_dim,
        depths=c.depths,
        num_heads=c.num_heads,
        window_size=window,
        num_classes=c.num_classes,
        pretrained_window_sizes=c.pretrained_window_sizes,
    ).eval()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref))
    out = []
    with torch.no_grad():
        for stage in ref.layers:
            for blk in stage.blocks:
                table = blk.attn.cpb_mlp(blk.attn.relative_coords_table)  # (1, 2w-1, 2w-1, nH)
                out.append(16 * torch.sigmoid(table[0].permute(2, 0, 1)))
    return out


@pytest.mark.parametrize("pretrained", [0, 4])
def test_cpb_tables_match_timm(pretrained, make_micro):
    ours = make_micro(std=0.01, pretrained_window_sizes=(pretrained,) * 2)
    tables = cpb_tables(ours)  # native windows: 4 in stage 0; stage 1's 4x4 map is one window of 4
    ref = _timm_tables(ours, 4)
    assert [(t.stage, t.block, t.window) for t in tables] == [(0, 0, 4), (0, 1, 4), (1, 0, 4), (1, 1, 4)]
    for t, r in zip(tables, ref):
        assert t.bias.shape == r.shape == (ours.config.num_heads[t.stage], 7, 7)
        assert torch.allclose(t.bias, r, atol=1e-6)
        assert t.bias.std() > 1e-3  # re-randomised: not the flat table of a zero MLP
    # At a larger window (the log-spaced extrapolation) stage 0 matches timm built with that window.
    wide = cpb_tables(ours, window=8)
    ref8 = _timm_tables(ours, 8)
    for t, r in zip(wide[:2], ref8[:2]):
        assert t.window == 8 and torch.allclose(t.bias, r, atol=1e-6)


def test_cpb_table_is_what_attention_adds(make_micro):
    """The (2w-1)^2 table, gathered by relative offset, is the model's own (nH, N, N) position bias."""
    model = make_micro(std=0.01)
    w = 5
    table = cpb_tables(model, window=w)[0].bias  # (nH, 9, 9)
    with torch.no_grad():
        bias = model.layers[0].blocks[0].attn.position_bias(w)  # (nH, 25, 25)
    ys, xs = np.divmod(np.arange(w * w), w)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = ys[i] - ys[j], xs[i] - xs[j]
            assert torch.allclose(bias[:, i, j], table[:, dy + w - 1, dx + w - 1], atol=1e-6)


def test_viz_cpb_cli_writes_one_png_per_stage(tmp_path, make_micro_weights, capsys):
    weights = make_micro_weights(tmp_path / "w.safetensors", std=0.01)
    for window in (None, 9):
        out = tmp_path / f"cpb{window}"
        args = ["viz-cpb", "--weights", str(weights), "--out", str(out)] + (["--window", str(window)] if window else [])
        assert main(args) == 0
        assert sorted(p.name for p in out.iterdir()) == ["cpb_stage0.png", "cpb_stage1.png"]
        for p in out.iterdir():
            _valid_png(p)
    assert capsys.readouterr().out.count("wrote") == 4


def test_viz_cpb_draws_a_rectangular_window_with_its_own_axes(tmp_path, make_micro_weights, monkeypatch):
    seen = _drawn_figure(monkeypatch)
    weights = make_micro_weights(tmp_path / "w.safetensors", std=0.01, window_size=(4, 2))
    assert main(["viz-cpb", "--weights", str(weights), "--out", str(tmp_path / "cpb")]) == 0
    _valid_png(tmp_path / "cpb" / "cpb_stage1.png")
    assert "window (4, 2)" in seen["suptitle"]
    drawn = [ax for ax in seen["axes"] if ax["title"].startswith("block")]
    assert len(drawn) == 8  # 2 blocks x 4 heads of stage 1


def _drawn_figure(monkeypatch):
    """Keep the texts of the next figure `plots` saves (the figure itself is closed once saved)."""
    seen = {}
    real = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        seen["suptitle"] = fig.get_suptitle()
        seen["axes"] = [
            {
                "title": ax.get_title(),
                "color": ax.title.get_color(),
                "texts": [t.get_text() for t in ax.texts],
                "lines": len(ax.lines),
            }
            for ax in fig.axes
        ]
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_prediction_grid_marks_right_and_wrong_and_carries_a_title(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgba

    seen = _drawn_figure(monkeypatch)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    _valid_png(
        plots.plot_prediction_grid(
            images,
            ["cat 90%"] * 3,
            tmp_path / "g.png",
            titles=["a/1", "b/1", "c/1"],
            correct=[True, False, None],
            title="the first 3 of 9 images",
        ),
        100,
    )
    assert seen["suptitle"] == "the first 3 of 9 images"
    titles = [(a["title"], a["color"]) for a in seen["axes"][:3]]
    assert [t for t, _ in titles] == ["✓ a/1", "✗ b/1", "c/1"]
    assert [to_rgba(c) for _, c in titles] == [to_rgba("tab:green"), to_rgba("tab:red"), to_rgba("black")]


def test_curves_without_validation_say_so(tmp_path, monkeypatch):
    seen = _drawn_figure(monkeypatch)
    rows = [{"epoch": e, "train_loss": 2.0 / e, "lr": 1e-3 * e} for e in (1, 2, 3)]
    _valid_png(plots.plot_training_curves(rows, tmp_path / "curves.png"))
    loss, acc, lr = seen["axes"]
    assert acc["lines"] == 0 and any("no validation data" in t for t in acc["texts"])
    assert loss["lines"] == 1 and lr["lines"] == 1 and not loss["texts"]
    rows = [dict(r, val_loss=1.0, val_top1=50.0 + r["epoch"], val_top5=90.0) for r in rows]
    plots.plot_training_curves(rows, tmp_path / "curves.png")
    acc = seen["axes"][1]
    assert acc["lines"] == 2 and acc["texts"] == [] and acc["title"] == "best val top-1 53.00%"
