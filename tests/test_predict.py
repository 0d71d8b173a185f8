"""predict: files, folders and globs; a corrupt file is reported and skipped, a grayscale PNG works;
the top-k agree with timm's eval transform + the model's own logits; --json has the documented fields."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2.cli import main
from swinv2.serve.predict import class_names_for, expand_paths, one_ahead, predict
from swinv2.weights.factory import load_model

timm_data = pytest.importorskip("timm.data")

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_micro_weights):
    root = tmp_path_factory.mktemp("predict")
    weights = make_micro_weights(root / "w.safetensors", CLASSES, seed=3)
    rng = np.random.default_rng(0)
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 52, 3), dtype=np.uint8)).save(imgs / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8), mode="L").save(imgs / "sub" / "gray.png")
    (imgs / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (imgs / "notes.txt").write_text("not an image, not an image extension: ignored in folders")
    return root, weights, imgs


def _reference_top(weights, path, k, amp_dtype=None):
    """timm's eval transform (same crop_pct / interpolation) + the model's logits (under autocast in
    `amp_dtype`, if given), softmax in fp32, top-k."""
    model = load_model(weights)
    tf = timm_data.create_transform(
        input_size=32,
        crop_pct=0.875,
        interpolation="bicubic",
        is_training=False,
        mean=timm_data.IMAGENET_DEFAULT_MEAN,
        std=timm_data.IMAGENET_DEFAULT_STD,
    )
    x = tf(Image.open(path).convert("RGB"))[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = model(x)
    p = logits.float().softmax(-1)[0]
    top = p.topk(k)
    return top.indices.tolist(), top.values.tolist()


def test_folder_with_corrupt_and_grayscale_files(setup):
    root, weights, imgs = setup
    preds = predict(load_model(weights), [imgs], topk=3, batch_size=4)  # 6 readable files: 2 batches
    paths = [r["path"] for r in preds.results]
    assert sorted(p.split("/")[-1] for p in paths) == [
        "gray.png",
        "rgb0.png",
        "rgb1.png",
        "rgb2.png",
        "rgb3.png",
        "rgb4.png",
    ]
    assert [e["path"] for e in preds.errors] == [str(imgs / "sub" / "corrupt.jpg")]
    assert preds.errors[0]["error"]
    for r in preds.results:
        idx, probs = _reference_top(weights, r["path"], 3)
        assert [t["index"] for t in r["top"]] == idx
        assert [t["label"] for t in r["top"]] == [CLASSES[i] for i in idx]
        assert np.allclose([t["prob"] for t in r["top"]], probs, atol=1e-5)


def test_cli_json_fields_and_exit_codes(setup, capsys):
    root, weights, imgs = setup
    args = [
        "predict",
        "--weights",
        str(weights),
        "--topk",
        "2",
        "--json",
        str(imgs / "rgb0.png"),
        str(imgs / "sub" / "*.*"),
        str(root / "missing.png"),
    ]
    assert main(args) == 0  # unreadable files do not fail the run ...
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert set(record) == {"topk", "class_names_from", "results", "errors"}
    assert record["topk"] == 2 and record["class_names_from"] == "weights"
    assert [r["path"].split("/")[-1] for r in record["results"]] == ["rgb0.png", "gray.png"]
    for r in record["results"]:
        assert set(r) == {"path", "top"} and len(r["top"]) == 2
        assert all(set(t) == {"index", "label", "prob"} and 0 <= t["prob"] <= 1 for t in r["top"])
        assert r["top"][0]["prob"] >= r["top"][1]["prob"]
    assert {e["path"].split("/")[-1] for e in record["errors"]} == {"corrupt.jpg", "missing.png"}
    assert "corrupt.jpg" in err and "missing.png" in err
    assert main(args + ["--fail-on-error"]) == 1  # ... unless asked to
    capsys.readouterr()


def test_bf16_autocast_is_applied_and_stays_close_to_fp32(setup):
    root, weights, imgs = setup
    model = load_model(weights)
    fp32 = predict(model, [imgs], topk=5)
    bf16 = predict(model, [imgs], topk=5, amp_dtype=torch.bfloat16)
    probs = [{r["path"]: {t["index"]: t["prob"] for t in r["top"]} for r in p.results} for p in (fp32, bf16)]
    assert probs[0].keys() == probs[1].keys() and len(probs[0]) == 6
    diffs = [abs(p32[i] - probs[1][path][i]) for path, p32 in probs[0].items() for i in p32]
    assert 0 < max(diffs) < 0.02  # moved by bf16 rounding (autocast ran), by no more than that
    idx, vals = _reference_top(weights, imgs / "rgb0.png", 5, amp_dtype=torch.bfloat16)
    got = probs[1][str(imgs / "rgb0.png")]
    assert max(abs(got[i] - v) for i, v in zip(idx, vals)) < 1e-6


def test_plain_output_and_plot(setup, capsys, tmp_path):
    root, weights, imgs = setup
    plot = tmp_path / "grid.png"
    assert main(["predict", "--weights", str(weights), str(imgs / "rgb*.png"), "--plot", str(plot)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(imgs))]
    assert len(lines) == 5 and all(line.count("%") == 5 for line in lines)
    with Image.open(plot) as im:
        im.verify()
        assert im.format == "PNG" and min(im.size) > 200


def test_expand_paths(setup):
    root, weights, imgs = setup
    files, errors = expand_paths(
        [imgs / "sub", str(imgs / "rgb[01].png"), imgs / "rgb0.png", root / "nope", str(root / "*.gif")]
    )
    assert [f.split("/")[-1] for f in files] == ["corrupt.jpg", "gray.png", "rgb0.png", "rgb1.png"]  # no duplicate
    assert [e["error"] for e in errors] == ["file not found", "no file matches this pattern"]


def test_unnamed_1000_class_model_gets_imagenet_names(make_micro):
    model = make_micro(randomized=False)  # 1000 classes, no names
    names, source = class_names_for(model)
    assert len(names) == 1000 and source.startswith("imagenet-1k")
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    unnamed = make_micro(7, randomized=False)
    assert class_names_for(unnamed) == ([str(i) for i in range(7)], "indices")


def test_nothing_classified_exits_2_naming_the_paths(setup, capsys):
    root, weights, imgs = setup
    typo, no_match = root / "imgs" / "rgb9.png", str(imgs / "*.jpeg")
    assert main(["predict", "--weights", str(weights), str(typo), no_match]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [
        f"swinv2 predict: error: no image classified: {typo}: file not found; {no_match}: no file matches this pattern"
    ]
    # only unreadable files: nothing classified either; --fail-on-error keeps meaning "any unreadable file" (1)
    assert main(["predict", "--weights", str(weights), str(imgs / "sub" / "corrupt.jpg")]) == 2
    assert "corrupt.jpg" in capsys.readouterr().err
    assert main(["predict", "--weights", str(weights), "--fail-on-error", str(imgs / "rgb0.png"), str(typo)]) == 1
    capsys.readouterr()


def test_plot_titles_tell_folders_apart_mark_right_and_wrong_and_say_when_cut(setup, capsys, tmp_path, monkeypatch):
    """The grid's titles are paths below the images' common folder; where the parent folder names a
    class, the top-1 is marked right or wrong; past 32 images the figure and the output say so."""
    import shutil

    from swinv2 import plots

    root, weights, imgs = setup
    src = imgs / "rgb0.png"
    top1 = predict(load_model(weights), [src], topk=1).results[0]["top"][0]["label"]
    other = next(c for c in CLASSES if c != top1)
    data = tmp_path / "data"
    for rel in (f"train/{top1}/1.png", f"val/{top1}/1.png", f"val/{other}/1.png", "misc/1.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, data / rel)
    for i in range(31):  # 35 images in all
        shutil.copy(src, data / "train" / top1 / f"z{i:02d}.png")
    drawn = {}
    real = plots.plot_prediction_grid

    def record(images, captions, path, **kw):
        drawn.update(kw, n_images=len(images))
        return real(images, captions, path, **kw)

    monkeypatch.setattr(plots, "plot_prediction_grid", record)
    grid = tmp_path / "grid.png"
    args = ["predict", "--weights", str(weights), "--topk", "2", "--plot", str(grid)]
    assert main(args + [str(data / "train" / top1 / "1.png"), str(data / "val"), str(data / "misc")]) == 0
    assert f"wrote {grid}\n" in capsys.readouterr().out  # all 4 shown: nothing to say
    assert drawn["titles"] == [f"train/{top1}/1.png", f"val/{top1}/1.png", f"val/{other}/1.png", "misc/1.png"]
    assert drawn["correct"] == [True, True, False, None]
    assert drawn["title"] == "4 images; top-1 right for 2 of the 3 whose folder names a class"

    assert main(args + [str(data)]) == 0
    assert f"wrote {grid} (the first 32 of 35 images)" in capsys.readouterr().out
    assert drawn["n_images"] == 32 and drawn["title"].startswith("the first 32 of 35 images")
    assert drawn["titles"][:2] == ["misc/1.png", f"train/{top1}/1.png"]
    with Image.open(grid) as im:
        im.verify()


def test_eval_reads_an_empty_class_folder_as_training_does_and_warns(setup, tmp_path, caplog, capsys):
    """An empty class folder keeps its class slot in eval as in training (`ImageFolderDataset`), and
    eval reports it with the same warning lines training uses (`data.folder_warnings`)."""
    import shutil

    from swinv2.train.datasets import ImageFolderDataset, folder_warnings

    root, weights, imgs = setup
    data = tmp_path / "val"
    for c in ("ant", "cat"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            shutil.copy(imgs / f"rgb{i + (c == 'cat') * 2}.png", data / c / f"{i}.png")
    (data / "bee").mkdir()  # empty, and a class of the weights
    out = tmp_path / "eval.json"
    caplog.set_level("WARNING")
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--json", str(out)]) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    expected = folder_warnings(ImageFolderDataset(data, class_names=CLASSES), training=False)
    assert report["warnings"] == expected and report["empty_classes"] == ["bee"]
    assert any(f"{data}: empty class folders: bee" in w for w in expected)
    assert any(
        f"{data}: empty class folders: bee" in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
    )
    assert report["classes"] == CLASSES and [r["class"] for r in report["per_class"]] == ["ant", "cat"]
    assert np.array(report["confusion"])[CLASSES.index("bee")].sum() == 0


def test_plot_path_is_checked_before_predicting(tmp_path, micro_weights, monkeypatch, capsys):
    import swinv2.serve.predict as P
    from swinv2.cli import main

    monkeypatch.setattr(P, "predict", lambda *a, **kw: pytest.fail("predicted before checking --plot"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["predict", "--weights", str(micro_weights), "--plot", str(blocker / "grid.png"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plot" in err[0] and str(blocker) in err[0], err


def test_one_ahead_makes_the_next_item_in_the_background_while_the_caller_works():
    """Items come in order, made in another thread, the next one under way while the caller holds this
    one; a failure while making one is raised to the caller after the items before it; leaving early
    does not hang."""
    started: list[int] = []

    def items(n: int, fail_at: int | None = None):
        for i in range(n):
            started.append(i)
            if i == fail_at:
                raise OSError(f"item {i}")
            yield i, threading.current_thread()

    got = []
    for i, thread in one_ahead(items(4)):
        assert thread is not threading.current_thread()
        deadline = time.monotonic() + 10
        while len(started) < min(i + 2, 4) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(started) == min(i + 2, 4)  # the next one started before this one was handed back
        got.append(i)
    assert got == [0, 1, 2, 3]

    got = []
    with pytest.raises(OSError, match="item 2"):
        for i, _ in one_ahead(items(4, fail_at=2)):
            got.append(i)
    assert got == [0, 1]

    started.clear()
    for _ in one_ahead(items(1000)):
        break
    assert len(started) <= 3


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_shell_glob_that_puts_a_photo_on_plot_is_refused_before_any_work(setup, tmp_path, monkeypatch, capsys, fmt):
    """`swinv2 predict --weights W --topk 3 --plot photos/*.jpg`: the shell makes the first photo the
    value of --plot. Refused in one line (exit 2) before anything is classified; the photo is
    byte-identical and nothing is written. With `photos/*.png` the photo is a PNG too, but not a
    figure of ours: refused the same way."""
    import swinv2.serve.predict as P

    root, weights, imgs = setup
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for name in ("cat_p0", "cat_p1", "dog_p0"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"{name}.{ext}", format=fmt)
    glob_matches = sorted(str(p) for p in photos.iterdir())  # what `photos/*.jpg` expands to
    first = photos / f"cat_p0.{ext}"
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    monkeypatch.setattr(P, "predict", lambda *a, **kw: pytest.fail("classified before checking --plot"))
    assert main(["predict", "--weights", str(weights), "--topk", "3", "--plot", *glob_matches]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    described = "JPEG image, not a PNG figure" if fmt == "JPEG" else "PNG image, not a PNG figure"
    assert err.strip().splitlines() == [
        f"swinv2 predict: error: --plot {first}: is an existing {described} this "
        f"command writes; refusing to replace it (did a shell glob put an input "
        f"here?)"
    ]
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_a_plot_that_is_one_of_the_inputs_is_refused(setup, tmp_path, capsys):
    """A grid of an earlier run, given again as an input (by name, through a glob or inside a folder
    classified): it is an input now, so --plot may not replace it; a grid elsewhere is replaced."""
    root, weights, imgs = setup
    grid = tmp_path / "grid.png"
    base = ["predict", "--weights", str(weights), "--topk", "2"]
    assert main(base + ["--plot", str(grid), str(imgs / "rgb0.png")]) == 0  # a figure of ours
    capsys.readouterr()
    made = grid.read_bytes()
    for inputs in ([str(grid)], [str(tmp_path / "*.png")], [str(tmp_path)]):
        assert main(base + ["--plot", str(grid), str(imgs / "rgb1.png"), *inputs]) == 2
        out, err = capsys.readouterr()
        err = err.strip().splitlines()
        assert out == "" and len(err) == 1 and err[0].startswith(f"swinv2 predict: error: --plot {grid}: is "), err
        assert "is also an input" in err[0] or f"is an image this command reads from PATH {tmp_path}" in err[0], err
        assert grid.read_bytes() == made
    assert main(base + ["--plot", str(grid), str(imgs / "rgb1.png")]) == 0  # our own figure, not an input: replaced
    assert grid.read_bytes() != made
    capsys.readouterr()
