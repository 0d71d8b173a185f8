"""predict: files, folders and globs; a corrupt file is reported and skipped, a grayscale PNG works;
the top-k agree with timm's eval transform + the model's own logits; --json has the documented fields."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import swinv2
from swinv2.checkpoint import load_model, save_weights
from swinv2.cli import main
from swinv2.predict import class_names_for, expand_paths, predict
from randomize import randomize_

timm_data = pytest.importorskip("timm.data")

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = randomize_(swinv2.create_model("swinv2_micro_window4_32", num_classes=len(CLASSES)), seed=3, std=0.02)
    weights = root / "w.safetensors"
    save_weights(model, weights, class_names=CLASSES)
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
    tf = timm_data.create_transform(input_size=32, crop_pct=0.875, interpolation="bicubic", is_training=False,
                                    mean=timm_data.IMAGENET_DEFAULT_MEAN, std=timm_data.IMAGENET_DEFAULT_STD)
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
    assert sorted(p.split("/")[-1] for p in paths) == ["gray.png", "rgb0.png", "rgb1.png", "rgb2.png", "rgb3.png",
                                                       "rgb4.png"]
    assert [e["path"] for e in preds.errors] == [str(imgs / "sub" / "corrupt.jpg")]
    assert preds.errors[0]["error"]
    for r in preds.results:
        idx, probs = _reference_top(weights, r["path"], 3)
        assert [t["index"] for t in r["top"]] == idx
        assert [t["label"] for t in r["top"]] == [CLASSES[i] for i in idx]
        assert np.allclose([t["prob"] for t in r["top"]], probs, atol=1e-5)


def test_cli_json_fields_and_exit_codes(setup, capsys):
    root, weights, imgs = setup
    args = ["predict", "--weights", str(weights), "--topk", "2", "--json", str(imgs / "rgb0.png"),
            str(imgs / "sub" / "*.*"), str(root / "missing.png")]
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
    files, errors = expand_paths([imgs / "sub", str(imgs / "rgb[01].png"), imgs / "rgb0.png", root / "nope",
                                  str(root / "*.gif")])
    assert [f.split("/")[-1] for f in files] == ["corrupt.jpg", "gray.png", "rgb0.png", "rgb1.png"]  # no duplicate
    assert [e["error"] for e in errors] == ["file not found", "no file matches this pattern"]


def test_unnamed_1000_class_model_gets_imagenet_names():
    model = swinv2.create_model("swinv2_micro_window4_32")  # 1000 classes, no names
    names, source = class_names_for(model)
    assert len(names) == 1000 and source.startswith("imagenet-1k")
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    unnamed = swinv2.create_model("swinv2_micro_window4_32", num_classes=7)
    assert class_names_for(unnamed) == ([str(i) for i in range(7)], "indices")
