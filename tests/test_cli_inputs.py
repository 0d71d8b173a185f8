"""Command-line values a user gives: each out-of-range option, an unusable device, a peer whose package is
missing and encoder-only weights end in one line with exit 2 before any work; --json means one thing in
eval and predict; Ctrl-C is one line and exit 130 in every command; top-5 is left out where it cannot be
anything but 100%; under torchrun the config's warnings are said by rank 0 alone."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2 import cli
from swinv2.cli import main
from swinv2.errors import InputError

MICRO = "swinv2_micro_window4_32"
REPO = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, n: int, rng: np.random.Generator, size=(36, 40)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_micro_weights):
    """Weights of 3 and 6 classes, encoder-only weights (a SimMIM run's best.safetensors: no head, the
    variant's name recorded), and a class folder of the 3 classes."""
    root = tmp_path_factory.mktemp("cli_inputs")
    three = make_micro_weights(root / "three.safetensors", ["ant", "bee", "cat"], seed=1, model_name=MICRO)
    six = make_micro_weights(
        root / "six.safetensors", ["ant", "bee", "cat", "dog", "eel", "fox"], seed=2, model_name=MICRO
    )
    encoder = make_micro_weights(root / "encoder.safetensors", [], seed=3, model_name=MICRO)
    rng = np.random.default_rng(0)
    data = root / "val"
    for c in ("ant", "bee", "cat"):
        _write_images(data / c, 3, rng)
    return root, three, six, encoder, data


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- item 14: option ranges

OUT_OF_RANGE = [
    (["eval", "--data", "D", "--batch-size", "0"], "--batch-size", "must be at least 1, got 0"),
    (["eval", "--data", "D", "--batch-size", "-1"], "--batch-size", "must be at least 1, got -1"),
    (["eval", "--data", "D", "--workers", "-1"], "--workers", "must be at least 0, got -1"),
    (["eval", "--data", "D", "--img-size", "0"], "--img-size", "must be from 1 to 8192, got 0"),
    (["eval", "--data", "D", "--img-size", "-32"], "--img-size", "must be from 1 to 8192, got -32"),
    (["eval", "--data", "D", "--img-size", "1000000000"], "--img-size", "must be from 1 to 8192"),
    (["eval", "--data", "D", "--crop-pct", "0"], "--crop-pct", "must be in (0, 1], got 0"),
    (["eval", "--data", "D", "--crop-pct", "nan"], "--crop-pct", "must be in (0, 1], got nan"),
    (["eval", "--data", "D", "--batch-size", "eight"], "--batch-size", "must be an integer, got 'eight'"),
    (["predict", "P.png", "--img-size", "0"], "--img-size", "must be from 1 to 8192, got 0"),
    (["predict", "P.png", "--topk", "0"], "--topk", "must be at least 1, got 0"),
    (["predict", "P.png", "--batch-size", "0"], "--batch-size", "must be at least 1, got 0"),
    (["bench", "--threads", "-1"], "--threads", "must be at least 1, got -1"),
    (["bench", "--batch-size", "8", "0"], "--batch-size", "must be at least 1, got 0"),
    (["bench", "--iters", "0"], "--iters", "must be at least 1, got 0"),
    (["bench", "--own-process", "0"], "--own-process", "must be at least 1, got 0"),
    (["export", "--opset", "5"], "--opset", "must be from 14 to "),
    (["export", "--opset", "99"], "--opset", "must be from 14 to "),
    (["viz-cpb", "--out", "O", "--window", "0"], "--window", "must be from 1 to 128, got 0"),
    (["viz-cpb", "--out", "O", "--window", "-3"], "--window", "must be from 1 to 128, got -3"),
]


@pytest.mark.parametrize(
    "argv, option, says", OUT_OF_RANGE, ids=[" ".join(a[0:1] + a[-2:]) for a, _, _ in OUT_OF_RANGE]
)
def test_an_out_of_range_option_is_one_line_at_parse_time(tmp_path, monkeypatch, capsys, argv, option, says):
    import swinv2.weights.factory as C

    # Weights that do not exist: had parsing passed, the error would name them instead.
    monkeypatch.setattr(C, "load_model", lambda *a, **kw: pytest.fail("loaded weights past a bad option"))
    weights = ["--model", MICRO] if argv[0] == "bench" else ["--weights", str(tmp_path / "none.safetensors")]
    with pytest.raises(SystemExit) as e:
        main([argv[0], *weights, *argv[1:]])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"swinv2 {argv[0]}: error: argument {option}: {says}"), line
    assert "usage:" not in line and str(tmp_path) not in line


def test_the_ends_of_each_range_are_accepted():
    top = cli.newest_opset()
    parse = cli.build_parser().parse_args
    args = parse(
        [
            "eval",
            "--weights",
            "W",
            "--data",
            "D",
            "--batch-size",
            "1",
            "--workers",
            "0",
            "--img-size",
            "1",
            "--crop-pct",
            "1",
        ]
    )
    assert (args.batch_size, args.workers, args.img_size, args.crop_pct) == (1, 0, 1, 1.0)
    assert parse(["predict", "--weights", "W", "P", "--img-size", "8192", "--topk", "1"]).img_size == 8192
    assert [parse(["export", "--weights", "W", "--opset", str(v)]).opset for v in (14, top)] == [14, top]
    assert [parse(["viz-cpb", "--weights", "W", "--out", "O", "--window", w]).window for w in ("1", "128")] == [1, 128]
    args = parse(["bench", "--model", MICRO, "--threads", "1", "--warmup", "0", "--batch-size", "1", "2"])
    assert (args.threads, args.warmup, args.batch_size) == (1, 0, [1, 2])


@pytest.mark.parametrize("end", ["lowest", "newest"])
def test_export_writes_a_checked_graph_at_both_ends_of_the_opset_range(files, tmp_path, capsys, end):
    """The --opset range is what the exporter really does for this model: the fixed graph's attention
    has an ONNX form from opset 14; the newest is the newest PyTorch's TorchScript exporter supports."""
    pytest.importorskip("onnxruntime")
    _, three, _, _, _ = files
    opset = 14 if end == "lowest" else cli.newest_opset()
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(three), "--onnx", str(out), "--opset", str(opset)]) == 0
    said = capsys.readouterr().out
    assert f"opset {opset}" in said and "ONNX Runtime vs PyTorch" in said and out.is_file()


def test_opset_without_onnx_is_refused_rather_than_ignored(files, monkeypatch, capsys):
    import swinv2.weights.factory as C

    _, three, _, _, _ = files
    monkeypatch.setattr(C, "load_model", lambda *a, **kw: pytest.fail("loaded weights before refusing"))
    assert main(["export", "--weights", str(three), "--runtime", "onnxruntime", "--opset", "15"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--opset needs --onnx" in line


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_the_commands_cannot_run_on_is_one_line_before_loading(files, monkeypatch, capsys, device):
    import swinv2.weights.factory as C
    from swinv2.tools import bench

    _, three, _, _, data = files
    monkeypatch.setattr(C, "load_model", lambda *a, **kw: pytest.fail("loaded weights for an unusable device"))
    monkeypatch.setattr(bench, "run", lambda *a, **kw: pytest.fail("benchmarked on an unusable device"))
    for argv in (
        ["eval", "--weights", str(three), "--data", str(data)],
        ["predict", "--weights", str(three), str(data)],
        ["bench", "--model", MICRO],
    ):
        assert main([*argv, "--device", device]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line == f"swinv2 {argv[0]}: error: --device={device}: not usable here; use cpu, cuda, cuda:N or auto"


def test_device_auto_is_a_device_of_this_machine(files, capsys):
    """`--device auto` used to reach torch.device("auto") (a RuntimeError traceback) in eval and predict."""
    _, three, _, _, data = files
    assert main(["eval", "--weights", str(three), "--data", str(data), "--device", "auto"]) == 0
    assert "9 images" in capsys.readouterr().out
    assert main(["predict", "--weights", str(three), str(data / "ant"), "--device", "auto", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3


# --------------------------------------------------------------------------- item 15: a peer not installed


@pytest.mark.parametrize("own_process", [False, True])
def test_compare_with_a_peer_whose_package_is_missing_says_what_to_install(monkeypatch, capsys, own_process):
    from swinv2.tools import bench

    # None in sys.modules is how Python marks a module that cannot be imported: `import transformers`
    # raises ImportError and importlib finds no spec, as where it was never installed.
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(bench, "build_impl", lambda *a, **kw: pytest.fail("built a model before the check"))
    monkeypatch.setattr(bench, "run_own_processes", lambda *a, **kw: pytest.fail("started processes before it"))
    start = time.perf_counter()
    argv = ["bench", "--model", MICRO, "--compare", "timm,hf,torchvision", "--no-memory"]
    assert main(argv + (["--own-process", "1"] if own_process else [])) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        "swinv2 bench: error: --compare hf needs the transformers package, which is not installed here: "
        "pip install transformers"
    )
    assert time.perf_counter() - start < 10


def test_every_installed_peer_passes_the_check():
    from swinv2.tools import bench

    installed = [p for p in bench.IMPLS if p == "ours" or importlib.util.find_spec(bench.PEER_PACKAGES[p])]
    assert {"ours", "timm", "torchvision"} <= set(installed)  # swinv2's own dependencies
    bench.check_peers(installed)
    with pytest.raises(InputError, match="unknown implementation 'tf'"):
        bench.check_peers(["ours", "tf"])


# --------------------------------------------------------------------------- item 17: one --json


def test_predict_json_file_is_written_like_evals(files, tmp_path, capsys):
    _, three, _, _, data = files
    out = tmp_path / "preds.json"
    assert main(["predict", "--weights", str(three), str(data), "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert set(record) == {"topk", "class_names_from", "results", "errors"} and len(record["results"]) == 9
    # the report for people stays on stdout: one line per image and where the JSON went
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"wrote {out}"
    assert [ln.split(": ")[0] for ln in lines[:-1]] == [r["path"] for r in record["results"]]


@pytest.mark.parametrize("form", [["--json"], ["--json", "-"]])
def test_predict_and_eval_json_alone_or_dash_is_stdout(files, capsys, form):
    _, three, _, _, data = files
    assert main(["predict", "--weights", str(three), str(data / "bee"), *form]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    assert main(["eval", "--weights", str(three), "--data", str(data), *form]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 9 and "top-1" in err


def test_predict_json_before_an_image_keeps_its_old_meaning(files, capsys):
    """`--json photo.png more/`: an image name, a folder or a glob right after --json is read, as before."""
    _, three, _, _, data = files
    first = str(data / "ant" / "000.png")
    cats = [str(data / "cat" / f"{i:03d}.png") for i in range(3)]
    for argv, read in (
        ([first, str(data / "cat")], [first, *cats]),
        ([first], [first]),
        ([str(data / "cat"), first], [*cats, first]),
        ([str(data / "cat" / "*.png")], cats),
    ):
        assert main(["predict", "--weights", str(three), "--json", *argv]) == 0
        assert [r["path"] for r in json.loads(capsys.readouterr().out)["results"]] == read
    with Image.open(first) as im:  # still the image: no JSON written over it
        assert im.format == "PNG" and im.size == (40, 36)


def test_predict_json_over_a_users_file_is_refused_before_work(files, tmp_path, monkeypatch, capsys):
    import swinv2.serve.predict as P

    _, three, _, _, data = files
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    monkeypatch.setattr(P, "predict", lambda *a, **kw: pytest.fail("predicted before checking --json"))
    assert main(["predict", "--weights", str(three), "--json", str(notes), str(data)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--json" in line and str(notes) in line
    assert notes.read_text() == "my notes\n"


def test_predict_json_file_is_not_written_when_nothing_was_classified(files, tmp_path, capsys):
    _, three, _, _, _ = files
    out = tmp_path / "preds.json"
    assert main(["predict", "--weights", str(three), str(tmp_path / "typo.png"), "--json", str(out)]) == 2
    assert "no image classified" in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_predict_without_a_path_is_one_line(files, capsys):
    _, three, _, _, _ = files
    assert main(["predict", "--weights", str(three), "--json"]) == 2
    assert "no PATH given" in _one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- item 19: encoder-only weights


@pytest.mark.parametrize("command", ["predict", "predict --plot", "eval"])
def test_encoder_weights_are_one_line_saying_to_fine_tune(files, tmp_path, capsys, command):
    _, _, _, encoder, data = files
    plot = tmp_path / "grid.png"
    argv = {
        "predict": ["predict", str(data)],
        "predict --plot": ["predict", str(data), "--plot", str(plot)],
        "eval": ["eval", "--data", str(data)],
    }[command]
    assert main([*argv, "--weights", str(encoder)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"swinv2 {argv[0]}: error: {encoder}: encoder weights without a classifier head")
    # the demo's model (its name recorded in the weights) is sent to its own recipe
    assert f"swinv2 train --config configs/finetune_micro.yaml model.weights={encoder} data.root=DIR" in line
    assert not plot.exists()


@pytest.mark.parametrize("named", [True, False])
def test_the_fine_tune_command_it_gives_resolves_to_a_config(files, make_micro_weights, tmp_path, capsys, named):
    """The command of the encoder-weights message, run as given (DIR and NAME filled in) with
    --print-config: the recipe exists and its overrides fit the schema."""
    import yaml

    from swinv2.weights.factory import load_model
    from swinv2.weights.registry import require_classifier

    _, _, _, encoder, data = files
    if not named:  # weights that do not name their variant: the general recipe, model.name to give
        encoder = make_micro_weights(tmp_path / "unnamed.safetensors", [], randomized=False)
    with pytest.raises(InputError) as e:
        require_classifier(load_model(encoder), encoder)
    command = str(e.value).split("fine-tune them on class folders first: ")[1].split(" (docs/")[0].split()
    assert command[:3] == ["swinv2", "train", "--config"]
    assert command[3] == ("configs/finetune_micro.yaml" if named else "configs/finetune.yaml")
    filled = [a.replace("=DIR", f"={data.parent}").replace("=NAME", f"={MICRO}") for a in command[4:]]
    assert main(["train", "--config", str(REPO / command[3]), "--print-config", *filled]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (model["name"], model["weights"]) == (MICRO, str(encoder)) and not model["pretrained"]


def test_library_predict_refuses_a_model_without_head(files):
    from swinv2.serve.predict import predict
    from swinv2.weights.factory import load_model

    _, _, _, encoder, data = files
    with pytest.raises(InputError, match="encoder weights without a classifier head"):
        predict(load_model(encoder), [data])


# --------------------------------------------------------------------------- item 20: Ctrl-C

# `swinv2 predict` in a fresh process whose model announces its first batch (a marker file) and then
# takes 0.2 s per batch, so that the signal lands mid-run, whatever the machine's speed.
DRIVER = """\
import sys, time
from pathlib import Path
from swinv2.model.transformer import SwinTransformerV2
forward, marker = SwinTransformerV2.forward, Path(sys.argv[1])
def slow(self, x):
    marker.touch()
    time.sleep(0.2)
    return forward(self, x)
SwinTransformerV2.forward = slow
from swinv2.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_during_predict_is_one_line_and_exit_130_leaving_no_output(files, tmp_path):
    """With loader processes: the group's SIGINT reaches them and the main process, whose next batch is
    being read by `predict.one_ahead`'s thread meanwhile."""
    _, three, _, _, _ = files
    rng = np.random.default_rng(1)
    _write_images(tmp_path / "imgs", 60, rng)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "first-batch"
    argv = [
        sys.executable,
        "-c",
        DRIVER,
        str(marker),
        "predict",
        "--weights",
        str(three),
        str(tmp_path / "imgs"),
        "--batch-size",
        "2",
        "--workers",
        "2",
        "--json",
        str(out_dir / "preds.json"),
        "--plot",
        str(out_dir / "grid.png"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w+") as err:
        # A session of its own: the SIGINT goes to the whole group (it and its loader processes), as a
        # terminal's Ctrl-C does.
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), "predict never reached its first batch"
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        text = err.read()
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    said = [ln for ln in text.strip().splitlines() if " INFO " not in ln]  # the log's "weights format" line
    assert said == ["swinv2 predict: interrupted"], text
    assert not list(out_dir.iterdir())  # neither output, nor a temp file of either


@pytest.mark.parametrize(
    "argv",
    [
        ["models"],
        ["download", "x"],
        ["convert", "a", "b"],
        ["eval", "--weights", "w", "--data", "d"],
        ["predict", "--weights", "w", "p"],
        ["export", "--weights", "w"],
        ["bench", "--model", MICRO],
        ["viz-cpb", "--weights", "w", "--out", "o"],
        ["train"],
    ],
)
def test_every_command_reports_ctrl_c_in_one_line(monkeypatch, capsys, argv):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_check_device", interrupted)  # the first step of every command
    assert main(argv) == 130
    assert capsys.readouterr().err == f"swinv2 {argv[0]}: interrupted\n"


# --------------------------------------------------------------------------- friction: top-5 of few classes


def test_eval_leaves_top5_out_for_five_classes_or_fewer(files, tmp_path, capsys):
    _, three, six, _, data = files
    out = tmp_path / "three.json"
    assert main(["eval", "--weights", str(three), "--data", str(data), "--json", str(out)]) == 0
    assert "top-5" not in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["top5"] is None and report["top1"] >= 0  # the key stays: null, not a constant 100
    assert main(["eval", "--weights", str(six), "--data", str(data), "--json", str(out)]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("top-1")]
    top5 = json.loads(out.read_text())["top5"]
    assert len(printed) == 1 and f"top-5 {top5:.2f}%" in printed[0]


@pytest.mark.parametrize("classes, shown", [(3, False), (5, False), (6, True)])
def test_the_epoch_log_line_shows_top5_only_above_five_classes(tmp_path, caplog, classes, shown):
    from swinv2.config import load_config
    from swinv2.train import distributed as D
    from swinv2.train.rundir import RunDir

    cfg = load_config(None, [f"model.num_classes={classes}"])
    rundir = RunDir(tmp_path / "run", D.DistEnv(0, 1, 0, torch.device("cpu")), cfg)
    try:
        rundir.begin(cfg)
        row = {
            "epoch": 1,
            "train_loss": 1.0,
            "val_loss": 0.9,
            "val_top1": 40.0,
            "val_top5": 100.0,
            "lr": 1e-3,
            "img_per_s": 10.0,
            "epoch_time_s": 1.0,
        }
        with caplog.at_level(logging.INFO, logger="swinv2"):
            rundir.log_epoch(row, epochs=3)
    finally:
        rundir.close()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/3"))
    assert "top-1 40.00%" in line and ("top-5 100.00%" in line) == shown


# --------------------------------------------------------------------------- friction: torchrun config warnings


@pytest.fixture
def config_logger_level():
    yield
    logging.getLogger("swinv2.config").setLevel(logging.NOTSET)


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_config_warnings_come_from_rank_0_alone(monkeypatch, caplog, capsys, config_logger_level, rank, said):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--print-config", "train.epochs=1", "schedule.warmup_epochs=5"]) == 0
    capsys.readouterr()
    warned = [r for r in caplog.records if "schedule.warmup_epochs=5 is not shorter" in r.getMessage()]
    assert len(warned) == (1 if said else 0)


def test_curves_and_the_final_line_leave_top5_out_for_five_classes_or_fewer(tmp_path, capsys):
    """The training summary line and curves.png: top-5 of <= 5 classes is always 100%, so it is not shown."""
    import matplotlib

    matplotlib.use("Agg")
    from swinv2 import plots

    rows = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0, "val_top1": 50.0 + e, "val_top5": 100.0, "lr": 1e-3}
        for e in (1, 2, 3)
    ]
    drawn = {}
    real = plots._save

    def keep(fig, out):
        drawn[Path(out).name] = [ln.get_label() for ln in fig.axes[1].lines]
        return real(fig, out)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", keep)
        plots.plot_training_curves(rows, tmp_path / "few.png", num_classes=3)
        plots.plot_training_curves(rows, tmp_path / "many.png", num_classes=10)
    assert drawn["few.png"] == ["val top-1"] and drawn["many.png"] == ["val top-1", "val top-5"]
