"""swinv2 eval: top-1 / top-5 / loss / per-class accuracy reproduced independently from the model's
logits; class-map mismatches fail naming both sides; official .pth files work with --model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from machine import cpu_paths
from swinv2.cli import main
from swinv2.weights.factory import load_model

timm_data = pytest.importorskip("timm.data")

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]


def _write_images(folder, n, rng, size=(40, 44)):
    """Smooth colour gradients (each image its own): varied enough that the model's argmax varies."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]] / max(size)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        img = a + b * yy[..., None] - c * xx[..., None] + rng.normal(0, 8, (*size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def _reference(model, data, classes, *, varied=True):
    """Independent metrics: timm's eval transform, the model's logits, our own arithmetic."""
    tf = timm_data.create_transform(input_size=32, crop_pct=0.875, interpolation="bicubic", is_training=False)
    xs, ys = [], []
    for label, c in enumerate(classes):
        for p in sorted((data / c).glob("*.png")) if (data / c).is_dir() else []:
            try:
                xs.append(tf(Image.open(p).convert("RGB")))
            except OSError:
                continue  # the corrupt file: eval skips it too
            ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys)
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    pred = top5[:, 0]
    per_class = {classes[c]: 100.0 * int((pred[y == c] == c).sum()) / int((y == c).sum()) for c in y.unique().tolist()}
    assert not varied or len(pred.unique()) > 1, "degenerate test data: the model predicts one class for every image"
    return {
        "top1": 100.0 * int((pred == y).sum()) / len(y),
        "top5": 100.0 * int((top5 == y[:, None]).any(1).sum()) / len(y),
        "loss": float(F.cross_entropy(logits, y)),
        "n": len(y),
        "per_class": per_class,
    }


@pytest.fixture(scope="module")
def named(tmp_path_factory, make_micro_weights):
    root = tmp_path_factory.mktemp("eval")
    weights = make_micro_weights(root / "w.safetensors", CLASSES, seed=5)
    rng = np.random.default_rng(1)
    data = root / "val"
    for c in CLASSES[:5]:  # the val folder lacks "fox": allowed
        _write_images(data / c, 4, rng)
    (data / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root, weights, data


def test_eval_reproduces_independent_metrics(named, tmp_path, capsys):
    root, weights, data = named
    out, plots = tmp_path / "eval.json", tmp_path / "plots"
    assert (
        main(
            [
                "eval",
                "--weights",
                str(weights),
                "--data",
                str(data),
                "--batch-size",
                "7",
                "--json",
                str(out),
                "--plots",
                str(plots),
            ]
        )
        == 0
    )
    text, err = capsys.readouterr()
    assert "broken.png" in err and "top-1" in text
    report = json.loads(out.read_text())
    ref = _reference(load_model(weights), data, CLASSES)
    assert report["n"] == ref["n"] == 20 and len(report["errors"]) == 1
    assert report["top1"] == pytest.approx(ref["top1"], abs=1e-9)
    assert report["top5"] == pytest.approx(ref["top5"], abs=1e-9)
    assert report["top5"] < 100  # 6 classes: top-5 is a real test
    assert report["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert {r["class"]: r["top1"] for r in report["per_class"]} == pytest.approx(ref["per_class"])
    assert report["classes"] == CLASSES and np.array(report["confusion"]).shape == (6, 6)
    assert np.array(report["confusion"]).sum() == 20
    for name in ("confusion_matrix.png", "per_class_accuracy.png"):
        with Image.open(plots / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_eval_under_bf16_autocast_reproduces_the_model_under_autocast(named, tmp_path, capsys):
    root, weights, data = named
    out = tmp_path / "eval.json"
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--amp", "bf16", "--json", str(out)]) == 0
    assert "autocast bf16" in capsys.readouterr().out
    report = json.loads(out.read_text())
    model = load_model(weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = _reference(model, data, CLASSES, varied=False)
    ref32 = _reference(model, data, CLASSES, varied=False)
    # premise: bf16 autocast moves the loss (by about 4e-5)
    assert abs(ref16["loss"] - ref32["loss"]) > 1e-5, cpu_paths()
    assert report["amp"] == "bf16" and report["n"] == ref16["n"] == 20
    assert report["loss"] == pytest.approx(ref16["loss"], abs=1e-6)
    assert report["top1"] == pytest.approx(ref16["top1"], abs=1e-9)


def test_amp_fp16_on_the_cpu_fails_in_one_line(named, tmp_path, capsys):
    root, weights, data = named
    out = tmp_path / "eval.json"
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--amp", "fp16", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "swinv2 eval: error: --amp fp16 needs a CUDA device, not cpu (CPU fp16 autocast is a slow "
        "reference path); use --amp bf16 or none"
    ]
    assert not out.exists()


def test_class_map_mismatch_names_both(named, tmp_path, capsys):
    root, weights, data = named
    bad = tmp_path / "val"
    rng = np.random.default_rng(2)
    _write_images(bad / "ant", 1, rng)
    _write_images(bad / "zebra", 1, rng)
    assert main(["eval", "--weights", str(weights), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "class map mismatch" in err and "zebra" in err and str(weights) in err and str(bad) in err


def test_official_pth_with_model_name(tmp_path, capsys, make_micro):
    """An official-format .pth (no architecture, no class names) evaluates with --model; the sorted
    folders are the 1000 class indices, so 999 folders are refused."""
    model = make_micro(seed=7).eval()
    pth = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, pth)
    data = tmp_path / "val"
    classes = [f"n{i:04d}" for i in range(1000)]
    rng = np.random.default_rng(3)
    for c in classes:
        (data / c).mkdir(parents=True)
    for c in (classes[0], classes[7], classes[999]):
        _write_images(data / c, 2, rng)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--weights",
                str(pth),
                "--model",
                "swinv2_micro_window4_32",
                "--data",
                str(data),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    ref = _reference(model, data, classes, varied=False)  # 1000 classes, 6 images: top-1 is ~0 anyway
    assert report["n"] == 6 and report["top1"] == pytest.approx(ref["top1"])
    assert report["top5"] == pytest.approx(ref["top5"]) and report["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert [r["class"] for r in report["per_class"]] == ["n0000", "n0007", "n0999"]
    capsys.readouterr()

    (data / "n0500").rmdir()
    assert main(["eval", "--weights", str(pth), "--model", "swinv2_micro_window4_32", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "class map mismatch" in err and "999 class folders" in err and str(pth) in err


def test_missing_inputs_fail_in_one_line(named, tmp_path, capsys):
    root, weights, data = named
    assert main(["eval", "--weights", str(tmp_path / "nope.safetensors"), "--data", str(data)]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "nodata")]) == 2
    assert "nodata" in capsys.readouterr().err


def test_json_on_stdout_is_pure_json_and_the_report_goes_to_stderr(named, capsys):
    _, weights, data = named
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 20  # nothing but the JSON record on stdout
    assert "top-1" in err and "wrote" not in out + err


@pytest.mark.parametrize("device, says", [("gpu", "--device=gpu: not a device"), ("cuda:7", "--device=cuda:7 but")])
def test_a_device_this_machine_lacks_is_one_line(named, capsys, device, says):
    _, weights, data = named
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        says = "never"  # such a machine has the device: the premise does not hold
    for cmd in (["eval", "--data", str(data)], ["predict", str(data)]):
        assert main([*cmd, "--weights", str(weights), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_output_paths_are_checked_before_evaluating(named, tmp_path, monkeypatch, capsys):
    import swinv2.train.evaluate as P

    _, weights, data = named
    monkeypatch.setattr(P, "evaluate_folder", lambda *a, **kw: pytest.fail("evaluated before checking outputs"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for flag in ("--json", "--plots"):
        assert main(["eval", "--weights", str(weights), "--data", str(data), flag, str(blocker / "sub")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and str(blocker) in err[0], err


def test_version():
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_json_through_a_symlink_replaces_the_report_and_keeps_the_files_mode(named, tmp_path, capsys):
    """`swinv2 eval ... --json link.json` with link.json -> the user's private.json (0600): the report is
    written into private.json, which stays 0600 (not 0644 under umask 022); the link stays."""
    _, weights, data = named
    private = tmp_path / "private.json"
    private.write_text('{"old": true}\n')
    os.chmod(private, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(private)
    old = os.umask(0o022)
    try:
        assert main(["eval", "--weights", str(weights), "--data", str(data), "--json", str(link)]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert json.loads(private.read_text())["n"] == 20
    assert private.stat().st_mode & 0o7777 == 0o600
    assert link.is_symlink() and os.readlink(link) == str(private)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "private.json"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another uid needs root")
def test_json_over_another_users_file_keeps_its_owner(named, tmp_path, capsys):
    _, weights, data = named
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chown(private, 12345, 12346)
    os.chmod(private, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(private)
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--json", str(link)]) == 0
    capsys.readouterr()
    st = private.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12345, 12346, 0o600)
    assert json.loads(private.read_text())["n"] == 20 and link.is_symlink()


def test_an_output_that_is_an_input_is_refused_before_evaluating(named, tmp_path, monkeypatch, capsys):
    """--json or --plots onto the weights or an image of --data (also through a symlink): exit 2, one
    line, nothing evaluated, nothing changed."""
    import shutil

    import swinv2.train.evaluate as P

    _, weights, data = named
    copy = tmp_path / "val"
    shutil.copytree(data, copy)
    shutil.copy(copy / "ant" / "0.png", copy / "ant" / "confusion_matrix.png")  # a photo named like a figure
    w = tmp_path / "w.json"  # weights under a name that looks like a report
    w.write_bytes(weights.read_bytes())
    alias = tmp_path / "alias.json"
    alias.symlink_to(w)
    monkeypatch.setattr(P, "evaluate_folder", lambda *a, **kw: pytest.fail("evaluated before checking outputs"))
    before = _snapshot(tmp_path)
    for flag, out, says in (
        ("--json", w, "is also an input of this command (--weights)"),
        ("--json", alias, f"is also an input of this command (--weights {w})"),
        ("--json", copy / "bee" / "1.png", f"is an image this command reads from --data {copy}"),
        ("--plots", copy / "ant", f"is an image this command reads from --data {copy}"),
    ):
        assert main(["eval", "--weights", str(w), "--data", str(copy), flag, str(out)]) == 2
        out_text, err = capsys.readouterr()
        err = err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"swinv2 eval: error: {flag} {out}") and says in err[0], err
        assert out_text == ""
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "flag, at", [("--json", "r.json"), ("--plots", "plots/per_class_accuracy.png"), ("--plots", "plots")]
)
def test_eval_outputs_refuse_a_file_of_another_kind(named, tmp_path, monkeypatch, capsys, flag, at):
    import swinv2.train.evaluate as P

    _, weights, data = named
    photo = tmp_path / at
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (10, 200, 40)).save(photo, format="JPEG")
    before = _snapshot(tmp_path)
    monkeypatch.setattr(P, "evaluate_folder", lambda *a, **kw: pytest.fail("evaluated before checking outputs"))
    target = tmp_path / ("plots" if flag == "--plots" else "r.json")
    assert main(["eval", "--weights", str(weights), "--data", str(data), flag, str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"swinv2 eval: error: {flag} {photo}: is an existing JPEG image"), err
    assert _snapshot(tmp_path) == before
