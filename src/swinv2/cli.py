"""The `swinv2` command line: the only module that reads argv.

Each subcommand parses its arguments and calls one library function. Errors a user can cause
(missing file, bad key, wrong model name) end in one line on stderr and a non-zero exit; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import allocator
from .errors import InputError, SwinV2Error

if TYPE_CHECKING:  # torch is imported inside the commands that need it: `swinv2 models` stays fast
    import torch

    from .config import Config

log = logging.getLogger("swinv2")


# --------------------------------------------------------------------------- option values
#
# argparse `type=` checks shared by the commands: a value out of range ends at parse time, before any
# weights or data are read, in argparse's one line "argument --batch-size: must be at least 1, got 0".

# Well above the largest images SwinV2 was trained on (1536 px, SwinV2-G); a typo such as 1000000000
# would otherwise be a resize target that allocates without bound.
MAX_IMG_SIZE = 8192
MAX_DATA_IMAGES = 500  # `bench --data`: images timed per pass
# viz-cpb evaluates the bias MLP on (2w-1)^2 offsets per block and draws a (2w-1)-pixel map per head.
MAX_CPB_WINDOW = 128


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer from `low` to `high` (no upper bound where None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            valid = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {valid}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse `type`: a number in (0, 1] (the centre crop's share of the resized image)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _opset(text: str) -> int:
    """An argparse `type`: an ONNX opset the exporter can write this model at. From 14: the fixed
    graph's attention (scaled_dot_product_attention) has no ONNX form before it; up to the newest
    opset this PyTorch's TorchScript exporter (the one `swinv2.serve.export` uses) supports."""
    return _int_in(14, newest_opset())(text)


def newest_opset() -> int:
    """The newest opset of PyTorch's TorchScript exporter (20 in PyTorch 2.14; newer ones it writes with a
    warning that they are not supported)."""
    import torch.onnx

    return getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)


POSITIVE = _int_in(1)
NON_NEGATIVE = _int_in(0)
IMG_SIZE = _int_in(1, MAX_IMG_SIZE)


def _check_device(args: argparse.Namespace) -> None:
    """--device, where the command has it, as a device this machine has (cpu, cuda[:N]; "auto" becomes
    one of them), or InputError naming it: before any work, and never a device the commands cannot
    run on (meta, mps)."""
    if getattr(args, "device", "cpu") == "cpu":
        return
    from .train.distributed import resolve_device

    device = resolve_device(args.device, "--device")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device={args.device}: not usable here; use cpu, cuda, cuda:N or auto")
    args.device = str(device)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors in one line (exit 2) as every other error of the command
    line; the usage is one --help away. Sub-parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- models


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the model zoo: the 12 official variants, SwinV2-H and -G, and the demo's model"
    )
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .tools.flops import count_flops
    from .weights import hub
    from .weights.registry import count_params, get_variant, list_models

    rows = []
    for name in list_models(include_unofficial=True):
        v = get_variant(name)
        cfg = v.config
        pws = ",".join(map(str, cfg.pretrained_window_sizes)) if any(cfg.pretrained_window_sizes) else "-"
        tags = ", ".join(r.tag + ("*" if hub.is_cached(r) else "") for r in hub.records(name)) or "-"
        rows.append(
            (
                name,
                f"{cfg.img_size[0]}",
                f"{cfg.window_size}",
                pws,
                v.pretrain,
                f"{cfg.num_classes}",
                f"{count_params(cfg) / 1e6:.1f}M",
                f"{count_flops(cfg) / 1e9:.1f}",
                f"{v.top1:.1f}" if v.top1 else "-",
                f"{v.top5:.1f}" if v.top5 else "-",
                tags,
            )
        )
    header = (
        "name",
        "img",
        "window",
        "pretrained win",
        "weights",
        "classes",
        "params",
        "GMACs",
        "top-1",
        "top-5",
        "tags (* cached)",
    )
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    right = {1, 2, 5, 6, 7, 8, 9}

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(fmt(header).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r).rstrip())
    print(
        "\nswinv2_huge_* and swinv2_giant_* are the paper's SwinV2-H and -G (an extra LayerNorm every 6 blocks), "
        "to build or to load SimMIM / mmpretrain weights into; no classification weights are published. "
        "swinv2_micro_window4_32 is not official: the model `make demo` trains (no published weights). "
        "GMACs at the native size (paper convention); top-1/top-5: paper, ImageNet-1k val. "
        "Aliases: the official config names, e.g. swinv2_base_patch4_window12to16_192to256_22kto1k_ft."
    )
    print(
        f"Tags: pretrained weights, used as --weights NAME.TAG or create_model(NAME, pretrained=TAG), the first "
        f"is the default; * = in the cache {hub.cache_dir()}; `swinv2 download NAME.TAG` fetches ahead of time."
    )
    return 0


# --------------------------------------------------------------------------- download


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch pretrained weights into the Hugging Face cache, ahead of time",
        description="Download published weights by name (see the tags of `swinv2 models`) into the "
        "Hugging Face cache (HF_HOME / HF_HUB_CACHE), or find them there, and print where they are. "
        "Copy that cache to a machine without network and set HF_HUB_OFFLINE=1 there.",
    )
    p.add_argument(
        "names",
        nargs="+",
        metavar="NAME[.TAG]",
        help="e.g. swinv2_tiny_window8_256 (its default tag) or swinv2_base_window12to16_192to256.ms_in22k",
    )
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from .weights import hub

    failed = 0
    for spec in args.names:
        try:
            record = hub.lookup(spec)
            path = hub.fetch(record)
        except (SwinV2Error, OSError) as e:  # one line per name; the others still download
            failed += 1
            print(f"swinv2 download: error: {e}", file=sys.stderr)
            continue
        print(f"{record.spec}: {path} ({path.stat().st_size / 1e6:.1f} MB, {record.classes})")
    print(f"cache: {hub.cache_dir()}")
    return 2 if failed else 0


# --------------------------------------------------------------------------- convert


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from .weights import formats  # no torch: the records the choices and the table below come from

    p = sub.add_parser(
        "convert",
        help=f"convert weights between formats ({', '.join(formats.WRITABLE)})",
        description="Convert SwinV2 weights between the formats below (official .pth files with\n"
        "22k heads too); torch files are read only with weights_only=True.",
        epilog="formats:\n" + formats.table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="weights file, Hugging Face folder or published weights NAME[.TAG]")
    by_suffix = "; ".join(
        f"{', '.join(s or 'none (a folder)' for s in f.guessed_from)}: {f.name}"
        for f in formats.FORMATS
        if f.guessed_from
    )
    p.add_argument("dst", help=f"output file or folder; without --dst its suffix picks the format ({by_suffix})")
    p.add_argument(
        "--src",
        dest="src_format",
        default="auto",
        choices=["auto", *formats.READABLE],
        help="source format (default: detected from the keys)",
    )
    p.add_argument(
        "--dst",
        dest="dst_format",
        default=None,
        choices=formats.WRITABLE,
        help="target format (default: from DST's suffix)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="registry name, for sources that do not describe their "
        f"architecture (needed for {', '.join(f.name for f in formats.FORMATS if f.needs_model)} targets)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .outputs import check_output
    from .weights.factory import convert_file
    from .weights.formats import FOLDER, get_format, guess_write_format

    fmt = get_format(args.dst_format or guess_write_format(args.dst))
    kind = (
        "hf"
        if FOLDER in fmt.writes
        else "safetensors"
        if fmt.writes == (".safetensors",) or Path(args.dst).suffix == ".safetensors"
        else "torch"
    )
    check_output(args.dst, "DST", kind=kind, inputs=_reads(("SRC", args.src)), create=False)
    print(
        convert_file(args.src, args.dst, src_format=args.src_format, dst_format=args.dst_format, model_name=args.model)
    )
    return 0


# --------------------------------------------------------------------------- eval, predict, export, bench, viz-cpb


def _add_weights_args(p: argparse.ArgumentParser, *, preprocess: bool = True) -> None:
    p.add_argument(
        "--weights",
        required=True,
        help="weights: our .safetensors, an official .pth (with --model), "
        "timm / torchvision files (with --model), a Hugging Face folder, or published weights by name, "
        "NAME[.TAG] (see `swinv2 models`; downloaded once into the Hugging Face cache)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="registry name, for weights that do not describe their architecture (see `swinv2 models`)",
    )
    if preprocess:
        p.add_argument("--img-size", type=IMG_SIZE, default=None, help="eval image size (default: from the weights)")
        p.add_argument(
            "--crop-pct",
            type=_fraction,
            default=None,
            help="resize to img_size / crop_pct, then centre-crop (0 < crop_pct <= 1)",
        )
        p.add_argument(
            "--interpolation",
            default=None,
            choices=["bicubic", "bilinear", "nearest"],
            help="resize interpolation (default: from the weights, bicubic)",
        )


def _load_for_use(args: argparse.Namespace):
    """(model, eval preprocessing) from --weights / --model and the preprocessing overrides."""
    from .serve.predict import require_classifier, resolve_preprocess
    from .weights.factory import load_model

    model = load_model(args.weights, name=args.model)
    require_classifier(model, args.weights)  # eval and predict classify: encoder weights cannot
    prep = resolve_preprocess(
        model,
        img_size=getattr(args, "img_size", None),
        crop_pct=getattr(args, "crop_pct", None),
        interpolation=getattr(args, "interpolation", None),
    )
    return model, prep


def _write_json(path: str, record: object) -> None:
    """The JSON record to `path`: a regular file atomically (through symlinks), `-` or /dev/stdout,
    pipes and devices streamed (`outputs.write_output`)."""
    import json

    from .outputs import write_output

    write_output(path, json.dumps(record, indent=1) + "\n")


def _reads(*given: tuple[str, str | None], folder_files: bool = True) -> list[tuple[str, str]]:
    """(option, path) of what a command reads, for `outputs.check_output(inputs=...)`: each path given,
    the files directly in a folder given (a Hugging Face weights folder; not with `folder_files=False`)
    and the matches of a glob that predict expands itself. Names that are not paths stay and match
    nothing."""
    import glob
    import os

    found: list[tuple[str, str]] = []
    for option, value in given:
        if value is None:
            continue
        found.append((option, value))
        if os.path.isdir(value):
            if folder_files:
                with os.scandir(value) as entries:
                    found += [(option, e.path) for e in entries if e.is_file()]
        elif not os.path.lexists(value) and set("*?[") & set(value):
            found += [(option, m) for m in glob.glob(value, recursive=True)]
    return found


def _add_amp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="run the model under autocast in this dtype (fp16: CUDA only; on a CPU, bf16 pays off only "
        "with AVX-512 BF16 or AMX, and a warning says when it is emulated)",
    )


def _amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """--amp as an autocast dtype (None for none), checked against --device, which must exist here."""
    from .hardware import DTYPES, warn_if_bf16_emulated
    from .train.distributed import resolve_device

    device = resolve_device(args.device, "--device")
    if args.amp == "none":
        return None
    if args.amp == "fp16" and device.type != "cuda":
        raise InputError(
            f"--amp fp16 needs a CUDA device, not {args.device} (CPU fp16 autocast is a slow "
            "reference path); use --amp bf16 or none"
        )
    if args.amp == "bf16":
        warn_if_bf16_emulated(device, "--amp bf16")
    return DTYPES[args.amp]


def _add_runtime_args(p: argparse.ArgumentParser, *, default_runtime: str | None = "torch") -> None:
    p.add_argument(
        "--runtime",
        choices=("torch", "onnxruntime", "openvino", "auto"),
        default=None if default_runtime == "torch" else default_runtime,  # torch: `_runtime_for` decides
        help="what runs the model: PyTorch, or the exported ONNX graph (cached beside the weights) in ONNX "
        "Runtime or OpenVINO (pip install 'swinv2[onnxruntime]' / 'swinv2[openvino]'); auto: the fastest "
        "installed here, timed once per machine and precision"
        + (
            " (default torch; auto with --precision int8)"
            if default_runtime == "torch"
            else f" (default {default_runtime})"
            if default_runtime
            else ""
        ),
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="bf16: OpenVINO or torch, only on CPUs with AVX-512 BF16 or AMX; int8: OpenVINO (NNCF) or ONNX "
        "Runtime (its QDQ quantiser), post-training quantised on the --calib images (default fp32)",
    )
    p.add_argument(
        "--calib",
        metavar="DIR",
        default=None,
        help="int8: folder of calibration images (searched "
        "recursively; up to 300, evenly spread), e.g. the training set",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="cache exported graphs in DIR/exports/<weights "
        "hash>/ (default: WEIGHTS.exports/ beside a weights file, else under $SWINV2_CACHE or "
        "~/.cache/swinv2 the same way)",
    )


def _runtime_for(args: argparse.Namespace, model, prep):
    """The `runtime.Runtime` that --runtime / --precision ask for; None for plain PyTorch fp32 (with --amp).
    int8 without --runtime is the fastest int8 here (auto): PyTorch has none."""
    if args.runtime is None:
        args.runtime = "auto" if args.precision == "int8" else "torch"
    if args.runtime == "torch" and args.precision == "fp32":
        if args.calib:
            raise InputError("--calib is for --precision int8")
        return None
    if args.amp != "none":
        raise InputError("--amp is autocast for --runtime torch --precision fp32; use --precision bf16 instead")
    if args.device != "cpu":
        raise InputError(f"--runtime {args.runtime} --precision {args.precision} runs on the CPU; drop --device")
    from .serve.runtime import load_runtime

    rt = load_runtime(
        model,
        args.runtime,
        args.precision,
        weights=args.weights,
        img_size=prep.img_size,
        calib=args.calib,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
    )
    print(f"runtime: {rt.describe()}", file=sys.stderr)
    return rt


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1 / top-5 / loss / per-class accuracy of weights on an image folder",
        description="Evaluate weights on DIR/<class>/<images>. With class names in the weights, every "
        "class folder must be one of them; without (official .pth), the sorted folders are the class "
        "indices and must number exactly the model's classes. Unreadable images are reported and "
        "skipped.",
    )
    _add_weights_args(p)
    p.add_argument("--data", required=True, help="class folder: DIR/<class>/<image files>")
    p.add_argument("--batch-size", type=POSITIVE, default=64)
    p.add_argument(
        "--workers", type=NON_NEGATIVE, default=0, help="data-loading processes (default 0: in this process)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_amp_arg(p)
    _add_runtime_args(p)
    p.add_argument(
        "--compare-fp32",
        action="store_true",
        help="also evaluate PyTorch fp32 on the same images and "
        "report the top-1 difference and the logit agreement (for --precision bf16 / int8)",
    )
    p.add_argument(
        "--json",
        metavar="OUT",
        nargs="?",
        const="-",
        default=None,
        help="write every metric, the "
        "per-class accuracy and the confusion matrix to this JSON file; on stdout with --json alone or "
        "--json - (the report for people then goes to stderr)",
    )
    p.add_argument(
        "--plots", metavar="DIR", default=None, help="write confusion_matrix.png and per_class_accuracy.png into DIR"
    )
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .outputs import check_output, check_output_folder, is_stdout
    from .train.evaluate import evaluate_folder, save_eval_plots
    from .weights.registry import describe_model

    # Never one of the user's own files: an input, or a file of another kind (a shell glob's first match).
    reads = _reads(("--weights", args.weights), ("--calib", args.calib), ("--data", args.data), folder_files=False)
    images = [("--data", args.data, 2), ("--calib", args.calib, 1)]
    if args.json:
        check_output(args.json, "--json", kind="json", inputs=reads, image_folders=images)
    if args.plots:
        check_output_folder(
            args.plots,
            "--plots",
            {"confusion_matrix.png": "png", "per_class_accuracy.png": "png"},
            inputs=reads,
            image_folders=images,
        )
    # With the JSON on stdout, the report for people goes to stderr.
    say = functools.partial(print, file=sys.stderr if args.json and is_stdout(args.json) else sys.stdout)
    amp_dtype = _amp_dtype(args)
    model, prep = _load_for_use(args)
    rt = _runtime_for(args, model, prep)
    report = evaluate_folder(
        model,
        args.data,
        weights=args.weights,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        preprocess=prep,
        amp_dtype=amp_dtype,
        runtime=rt,
        compare_fp32=args.compare_fp32,
    )
    for e in report["errors"]:
        print(f"swinv2 eval: skipped {e['path']}: {e['error']}", file=sys.stderr)
    skipped = f", {len(report['errors'])} unreadable skipped" if report["errors"] else ""
    say(f"model: {describe_model(model)} ({model.config.num_classes} classes), weights {args.weights}")
    say(
        f"{args.data}: {report['n']} images, {len(report['per_class'])} classes{skipped}; "
        f"{prep.img_size} px, crop {prep.crop_pct}, {prep.interpolation}"
        + ("" if amp_dtype is None else f", autocast {args.amp}")
        + ("" if rt is None else f", {rt.label} {rt.precision}")
    )
    top5 = "" if report["top5"] is None else f"top-5 {report['top5']:.2f}%  "  # None: 5 classes or fewer
    say(f"top-1 {report['top1']:.2f}%  {top5}loss {report['loss']:.4f}  ({report['img_per_s']:.1f} img/s)")
    if "fp32" in report:
        ref = report["fp32"]
        say(
            f"vs PyTorch fp32: top-1 {ref['top1']:.2f}% ({ref['img_per_s']:.1f} img/s), delta "
            f"{ref['top1_delta']:+.2f} points; top-1 agreement {ref['top1_agreement']:.2f}%, logits max |delta| "
            f"{ref['max_abs_logit_diff']:.3g}, mean {ref['mean_abs_logit_diff']:.3g}"
        )
    rows = sorted(report["per_class"], key=lambda r: r["top1"])
    shown = rows if len(rows) <= 30 else rows[:10]
    say("per-class top-1" + ("" if shown is rows else f" (the 10 worst of {len(rows)})") + ":")
    width = max(len(r["class"]) for r in shown)
    for r in shown:
        say(f"  {r['class']:<{width}}  {r['top1']:6.2f}%  ({r['correct']}/{r['n']})")
    if args.json:
        _write_json(
            args.json,
            {
                "weights": args.weights,
                "model": describe_model(model),
                "model_config": model.config.to_dict(),
                "data": args.data,
                "amp": args.amp,
                "runtime": rt.name if rt else "torch",
                "precision": args.precision,
                **report,
            },
        )
        if not is_stdout(args.json):
            say(f"wrote {args.json}")
    if args.plots:
        for path in save_eval_plots(report, args.plots):
            say(f"wrote {path}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files, folders and globs",
        description="Print the top-k classes of each image. Unreadable files are reported on stderr "
        "and skipped; the exit code is non-zero for them only with --fail-on-error (1), and 2 when no "
        "image at all was classified (e.g. a mistyped path). --json prints (--json OUT: writes) "
        '{"topk", "class_names_from", "results": [{"path", "top": [{"index", "label", "prob"}]}], '
        '"errors": [{"path", "error"}]} (prob: softmax probability, 0..1).',
    )
    _add_weights_args(p)
    # PATH may be empty to argparse: an image right after --json is a PATH too (`_json_flag_then_path`).
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument("--topk", type=POSITIVE, default=5)
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument(
        "--workers",
        type=NON_NEGATIVE,
        default=0,
        help="processes decoding and resizing images while the "
        "model runs (default 0: a thread of this process reads the next batch meanwhile)",
    )
    p.add_argument("--device", default="cpu")
    _add_amp_arg(p)
    _add_runtime_args(p)
    p.add_argument(
        "--json",
        metavar="OUT",
        nargs="?",
        const="-",
        default=None,
        help="the results as JSON: on "
        "stdout (--json alone, or --json -), or written to the file OUT, as eval --json does. An image "
        "file, folder or glob right after --json is still read as a PATH (JSON on stdout), as before "
        "--json took a file",
    )
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        default=None,
        help="draw a grid of the first 32 images with "
        "their top-k labels; an image in a folder named like a class is marked right (green ✓) or "
        "wrong (red ✗) by its top-1",
    )
    p.add_argument("--fail-on-error", action="store_true", help="exit with code 1 if any file could not be read")
    p.set_defaults(func=_run_predict)


def _json_flag_then_path(args: argparse.Namespace) -> None:
    """`predict --json photo.jpg more.jpg`: before --json took a file, this printed JSON for both images.
    A value after --json that names something predict reads (an image file name, a folder, a glob) is
    therefore taken as the first PATH, with the JSON on stdout, rather than as a file to write over."""
    from .outputs import IMG_EXTENSIONS

    value = args.json
    if value is not None and (
        value.lower().endswith(IMG_EXTENSIONS) or os.path.isdir(value) or set("*?[") & set(value)
    ):
        args.paths.insert(0, value)
        args.json = "-"


def _run_predict(args: argparse.Namespace) -> int:
    import json
    import time

    start = time.perf_counter()
    from .outputs import check_output, is_stdout
    from .serve.predict import predict, save_prediction_grid
    from .weights.registry import describe_model

    _json_flag_then_path(args)
    if not args.paths:
        raise InputError("no PATH given: name the image files, folders or globs to classify")
    json_out = args.json is not None and is_stdout(args.json)  # then nothing else goes to stdout
    # Outputs: never an input, nor a photo a shell glob put there (`--plot photos/*.jpg`).
    reads = _reads(
        ("--weights", args.weights), ("--calib", args.calib), *(("PATH", p) for p in args.paths), folder_files=False
    )
    images = [("PATH", p, 1) for p in args.paths] + [("--calib", args.calib, 1)]
    if args.json is not None and not json_out:
        check_output(args.json, "--json", kind="json", inputs=reads, image_folders=images)
    if args.plot:
        check_output(args.plot, "--plot", kind="png", inputs=reads, image_folders=images)
    amp_dtype = _amp_dtype(args)
    model, prep = _load_for_use(args)
    rt = _runtime_for(args, model, prep)
    ready = time.perf_counter()
    preds = predict(
        model,
        args.paths,
        topk=args.topk,
        batch_size=args.batch_size,
        device=args.device,
        preprocess=prep,
        thumbnails=32 if args.plot else 0,
        amp_dtype=amp_dtype,
        runtime=rt,
        workers=args.workers,
    )
    end = time.perf_counter()
    if preds.results:  # the model that ran heads the report, on stderr: stdout holds one line per image (or JSON)
        print(
            f"model: {describe_model(model)} ({model.config.num_classes} classes), weights {args.weights}",
            file=sys.stderr,
        )
    if json_out:
        print(json.dumps(preds.to_json(), indent=1))
    else:
        for r in preds.results:
            print(f"{r['path']}: " + ", ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"]))
    if not preds.results:  # e.g. a typo in every path: an error, never an empty success
        more = f"; ... (+{len(preds.errors) - 5})" if len(preds.errors) > 5 else ""
        raise InputError(
            "no image classified: " + "; ".join(f"{e['path']}: {e['error']}" for e in preds.errors[:5]) + more
        )
    for e in preds.errors:
        print(f"swinv2 predict: skipped {e['path']}: {e['error']}", file=sys.stderr)
    n = len(preds.results)
    print(
        f"{n} image{'s' * (n != 1)} in {end - start:.1f} s: {n / (end - start):.1f} img/s for the whole command, "
        f"{n / (end - ready):.1f} img/s once the model was loaded{' and the runtime compiled' if rt else ''} "
        f"(reading, resizing and {rt.label if rt else 'torch'} {args.precision}; --workers {args.workers})",
        file=sys.stderr,
    )
    if args.json is not None and not json_out:
        _write_json(args.json, preds.to_json())
        print(f"wrote {args.json}")
    if args.plot:
        path = save_prediction_grid(preds, args.plot)
        n, shown = len(preds.results), len(preds.thumbnails)
        print(
            f"wrote {path}" + (f" (the first {shown} of {n} images)" if shown < n else ""),
            file=sys.stderr if json_out else sys.stdout,
        )
    return 1 if (args.fail_on_error and preds.errors) else 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve weights over HTTP: a JSON API with dynamic batching, and a web page",
        description="Serve a classifier: POST /v1/predict (an image, multipart field `file` or the raw "
        "body; ?topk=) answers the top-k as JSON, the same numbers as `swinv2 predict`; GET / is a "
        "page to drop images on; GET /health, /v1/model, /metrics (Prometheus). Concurrent requests "
        "are batched. SIGTERM drains and exits 0. Needs pip install 'swinv2[serve]'; see "
        "docs/serving.md.",
    )
    _add_weights_args(p)
    _add_runtime_args(p, default_runtime="auto")

    def number(low: float, high: float) -> Callable[[str], float]:
        def parse(text: str) -> float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
            if not low <= value <= high:  # also refuses nan
                raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {text}")
            return value

        return parse

    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--port", type=_int_in(0, 65535), default=8000, help="port (default 8000; 0: a free one, printed at start)"
    )
    p.add_argument("--max-batch", type=_int_in(1, 1024), default=16, help="images per model call at most (default 16)")
    p.add_argument(
        "--max-wait-ms",
        type=number(0, 10_000),
        default=5.0,
        help="how long a request may wait for others to fill its batch (default 5)",
    )
    p.add_argument(
        "--queue",
        type=_int_in(1, 100_000),
        default=64,
        help="predictions in progress at most "
        "(reading, decoding, waiting, in the model); more are answered 503 with Retry-After (default 64)",
    )
    p.add_argument(
        "--max-body-mb",
        type=number(0.001, 1024),
        default=20.0,
        help="request body size limit in MiB; larger ones are answered 413 (default 20)",
    )
    p.add_argument(
        "--max-megapixels",
        type=number(0.001, 1000),
        default=40.0,
        help="larger images are refused from their header, before decoding (422; decompression bombs; default 40)",
    )
    p.add_argument(
        "--timeout-s",
        type=number(0.001, 3600),
        default=30.0,
        help="a prediction not answered in this time is answered 504 (default 30)",
    )
    p.add_argument(
        "--workers",
        type=_int_in(1, 256),
        default=min(4, os.cpu_count() or 1),
        help="threads decoding and resizing uploads (default: the CPU count, at most 4)",
    )
    p.add_argument(
        "--threads",
        type=_int_in(1, 1024),
        default=None,
        help="threads of the runtime per model call "
        "(default: its own, every core; fewer where other processes share the CPU)",
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve.server import require_serve_extra

    require_serve_extra()  # before the weights are read: one line naming the extra
    allocator.retain_freed_cpu_memory()  # a server runs the model call after call (see swinv2.allocator)
    model, prep = _load_for_use(args)
    from .serve.server import serve
    from .serve.service import ServeSettings

    settings = ServeSettings(
        runtime=args.runtime,
        precision=args.precision,
        calib=args.calib,
        cache_dir=args.cache_dir,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        workers=args.workers,
        max_pixels=int(args.max_megapixels * 1e6),
        threads=args.threads,
    )
    return serve(
        model,
        prep,
        settings,
        host=args.host,
        port=args.port,
        queue=args.queue,
        max_body_bytes=int(args.max_body_mb * 2**20),
        timeout_s=args.timeout_s,
        weights=args.weights,
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export weights to ONNX (dynamic batch), checked in ONNX Runtime",
        description="Export to ONNX with a dynamic batch axis. The graph is fixed at one image size "
        "(default: the weights' eval size): export again for another size, or use --dynamic-size. "
        "The file is kept only if ONNX Runtime reproduces PyTorch within 1e-4 at batch 1 and 3; a "
        "sidecar OUT.onnx.json holds the input/output names, preprocessing and class names.",
    )
    _add_weights_args(p, preprocess=False)
    p.add_argument(
        "--onnx",
        metavar="OUT.onnx",
        default=None,
        help="write the fp32 graph here; without it the graph "
        "for --runtime / --precision is made in the runtime cache (what eval / predict --runtime use)",
    )
    p.add_argument(
        "--img-size",
        type=IMG_SIZE,
        default=None,
        help="input size of the exported graph (with "
        "--dynamic-size: the eval size it is checked at and the sidecar's preprocessing)",
    )
    p.add_argument(
        "--dynamic-size",
        action="store_true",
        help="with --onnx: a graph whose height and width are "
        "dynamic too (window layout, shift masks and position bias computed in the graph), so one file "
        "runs at any image size; 0-6%% slower than the fixed graph in ONNX Runtime and OpenVINO "
        "(SwinV2-T, 256 px, batch 8, 2 threads)",
    )
    p.add_argument(
        "--opset",
        type=_opset,
        default=None,
        help="with --onnx: the ONNX opset, 14 to the newest this PyTorch exports (default 17, as the runtime cache)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    _add_runtime_args(p, default_runtime=None)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .serve.export import DEFAULT_OPSET, export_onnx
    from .weights.factory import load_model

    if args.onnx is not None and (args.precision != "fp32" or args.runtime is not None or args.calib):
        raise InputError(
            "--onnx writes the fp32 graph; --runtime / --precision / --calib export into the runtime "
            "cache instead (drop --onnx)"
        )
    if args.dynamic_size and args.onnx is None:
        raise InputError("--dynamic-size needs --onnx OUT.onnx: the runtime cache holds fixed-size graphs")
    if args.opset is not None and args.onnx is None:
        raise InputError(f"--opset needs --onnx OUT.onnx: the runtime cache holds opset-{DEFAULT_OPSET} graphs")
    if args.onnx is not None:  # the graph and its sidecar OUT.onnx.json: never an input or another kind of file
        from .outputs import check_output

        reads = _reads(("--weights", args.weights))
        check_output(args.onnx, "--onnx", kind="onnx", inputs=reads, create=False)
        check_output(args.onnx + ".json", "--onnx (its sidecar)", kind="json", inputs=reads, create=False)
    model = load_model(args.weights, name=args.model)
    if args.onnx is not None:
        print(
            export_onnx(
                model,
                args.onnx,
                img_size=args.img_size,
                opset=args.opset or DEFAULT_OPSET,
                check=not args.no_check,
                dynamic_size=args.dynamic_size,
            )
        )
        return 0
    from .serve.runtime import load_runtime

    runtime = args.runtime or ("onnxruntime" if args.precision == "fp32" else "openvino")
    rt = load_runtime(
        model,
        runtime,
        args.precision,
        weights=args.weights,
        img_size=args.img_size,
        calib=args.calib,
        cache_dir=args.cache_dir,
    )
    print(f"{rt.describe()}: ready for swinv2 eval / predict --runtime {rt.name} --precision {rt.precision}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, latency and peak memory, side by side with timm / hf / torchvision",
        description="Benchmark a registry variant, optionally against timm, Hugging Face and "
        "torchvision built with the same weights and timed interleaved in this process. "
        "'ours x' = how many times faster ours is (median of per-round paired ratios); "
        "'ours mem' = our peak memory / theirs. See swinv2.tools.bench for the method and JSON fields.",
    )
    p.add_argument("--model", default=None, help="registry name (see `swinv2 models`); required unless --data")
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="instead: training-data images/s per worker (one process, one thread) for the images under DIR "
        f"(at most {MAX_DATA_IMAGES}), or `samples` for {MAX_DATA_IMAGES} JPEGs made from scikit-learn's sample "
        "photos: JPEG decode, + random-resized crop, + the whole training transform (RandAugment), with each "
        "decoder installed, as ratios to plain Pillow (--img-size: the crop sizes, default 192 256; --repeats)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="weights to time, a file or NAME[.TAG] (default: the same random weights for all)",
    )
    p.add_argument("--batch-size", type=POSITIVE, nargs="+", default=[8])
    p.add_argument("--img-size", type=IMG_SIZE, nargs="+", default=[None], help="default: the variant's size")
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16", "fp16"],
        help="inference: weights and input in this dtype; --train: autocast (fp16: CUDA only)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every implementation")
    p.add_argument("--train", action="store_true", help="time forward + backward + AdamW step instead of inference")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="ours with per-block activation checkpointing (peers unchanged)",
    )
    p.add_argument(
        "--sequential-attention",
        action="store_true",
        help="ours with sequential attention: CPU training recomputes the attention probabilities in "
        "the backward instead of keeping them (peers unchanged)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=POSITIVE, default=5, help="timed rounds (median and spread over them)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed calls per implementation first")
    p.add_argument("--iters", type=POSITIVE, default=3, help="timed calls per implementation per round")
    p.add_argument(
        "--compare",
        default="",
        help="comma-separated peers: timm,hf,torchvision, and the runtimes "
        "onnxruntime,openvino (our exported graph; CPU inference)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16", "int8"],
        help="the runtimes' precisions, one row each (bf16 where the CPU has it; int8 calibrated on "
        "--calib, else on seeded noise: fine for speed, not for accuracy)",
    )
    p.add_argument("--calib", metavar="DIR", default=None, help="int8 runtime rows: calibration images")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", metavar="OUT", default=None, help="write meta + results to this JSON file")
    # Last in the help: what these answer is how swinv2 itself is built, not what a model costs.
    dev = p.add_argument_group(
        "developer options: measuring the implementation itself",
        "A/Bs of swinv2's own fast paths, the process's malloc and floating-point settings "
        "the timings depend on, the machine's matmul limit (docs/performance.md).",
    )
    dev.add_argument(
        "--ab",
        metavar="NAME",
        default=None,
        help="also time ours with one fast path switched to its alternative, interleaved in this "
        "process: grouping (eager CPU inference in groups of images vs the whole batch), linear "
        "(eager CPU inference linears on the other kernel: MKL addmm <-> oneDNN), packed-weights "
        "(with --dtype bf16: oneDNN's weight layout made once vs on every call), half-attention "
        "(with --dtype bf16/fp16: fp32 logits vs SDPA's flash kernel), flush (with --train: "
        "flushed vs plain attention softmax)",
    )
    dev.add_argument(
        "--own-process",
        type=POSITIVE,
        metavar="ROUNDS",
        default=None,
        help="run ours and each --compare peer alone, each in ROUNDS fresh processes (alternating), "
        "instead of side by side in this one",
    )
    dev.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults; by default freed memory is retained for reuse "
        "(swinv2.allocator), so that no implementation's page faults depend on which one ran first",
    )
    dev.add_argument(
        "--flush-denormal",
        action="store_true",
        help="flush subnormal floats to zero (FTZ/DAZ) before PyTorch starts its threads: what an "
        "implementation gains shows the time it spends on subnormal arithmetic",
    )
    dev.add_argument("--matmul-peak", action="store_true", help="also measure the matrix-multiply GFLOP/s limit")
    dev.add_argument(
        "--optimizer-step",
        action="store_true",
        help="instead: time one AdamW step (default, foreach, fused) over the model's parameter groups",
    )
    dev.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one implementation alone (--own-process)
    p.set_defaults(func=_run_bench)


def _bench_child_args(args: argparse.Namespace) -> list[str]:
    """The `swinv2 bench` arguments of `args` that each --own-process child repeats."""
    argv = [
        "--model",
        args.model,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--batch-size",
        *map(str, args.batch_size),
        "--dtype",
        *args.dtype,
    ]
    if args.img_size != [None]:
        argv += ["--img-size", *map(str, args.img_size)]
    for flag in (
        "compile",
        "train",
        "grad_checkpointing",
        "sequential_attention",
        "no_memory",
        "default_malloc",
        "flush_denormal",
    ):
        argv += [f"--{flag.replace('_', '-')}"] if getattr(args, flag) else []
    argv += ["--weights", args.weights] if args.weights else []
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from . import hardware
    from .outputs import check_output
    from .tools import bench

    if args.data is not None:
        return _run_data_bench(args)
    if args.model is None:
        raise InputError("bench: give --model NAME (or --data DIR for the training-data throughput)")
    if args.json:
        check_output(
            args.json,
            "--json",
            kind="json",
            inputs=_reads(("--weights", args.weights), ("--calib", args.calib), folder_files=False),
            image_folders=[("--calib", args.calib, 1)],
        )
    # Each thread keeps its own FTZ/DAZ flags and passes them on to the threads it creates: set first.
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise InputError("--flush-denormal: this CPU cannot flush subnormals to zero")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimizer_step:
        for r in bench.optimizer_steps(args.model, rounds=args.repeats):
            print(
                f"{r['model']} ({r['tensors']} tensors) {r['optimizer']:13s}: {r['ms_per_step']:7.2f} ms/step "
                f"({r['x_default']:.2f}x the default)"
            )
        return 0
    # The implementations share this process's heap. Under glibc's defaults each one's page faults
    # then depend on the heap the others left behind (measured: eager ours vs timm 1.10x or 1.29x with
    # the build order swapped); retained, none faults after its warm-up, whatever the order.
    retained = False if args.default_malloc else allocator.retain_freed_cpu_memory()
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    bench.check_peers([c for c in compare if c not in bench.RUNTIME_IMPLS])  # also for --own-process's children
    if args.own_process and args.ab:
        raise InputError("--ab compares within one process; leave out --own-process")
    if args.own_process:
        results = bench.run_own_processes(
            ["ours"] + [c for c in compare if c != "ours"], _bench_child_args(args), rounds=args.own_process
        )
    else:
        results = bench.run(
            args.model,
            batch_sizes=args.batch_size,
            img_sizes=args.img_size,
            dtypes=args.dtype,
            compile=args.compile,
            train=args.train,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            iters=args.iters,
            compare=compare,
            weights=args.weights,
            measure_memory=not args.no_memory,
            grad_checkpointing=args.grad_checkpointing,
            sequential_attention=args.sequential_attention,
            ab=args.ab,
            only=args.only,
            precisions=args.precision,
            calib=args.calib,
        )
    print(bench.format_table(results))
    print(
        "ours x: how many times faster ours is than the row (median of paired rounds); ours mem: our peak "
        "memory / the row's"
    )
    meta: dict[str, object] = {
        "malloc": "retains freed memory (swinv2.allocator)" if retained else "as given",
        "flush_denormal": args.flush_denormal,
        "own_process": args.own_process,
    }
    if args.matmul_peak:
        for dtype in dict.fromkeys(args.dtype):
            meta[f"matmul_peak_gflop_s_{dtype}"] = hardware.matmul_peak(args.device, dtype)
            print(f"matmul peak ({dtype}, 2048^3): {meta[f'matmul_peak_gflop_s_{dtype}']:.0f} GFLOP/s")
    if args.json:
        bench.write_json(args.json, results, meta=meta)
        print(f"wrote {args.json}")
    return 0


def _run_data_bench(args: argparse.Namespace) -> int:
    """`swinv2 bench --data DIR`: training-data images/s per worker, per decoder (tools.data_bench)."""
    import tempfile

    from .outputs import check_output
    from .tools import data_bench

    if args.json:
        check_output(args.json, "--json", kind="json")
    sizes = [s for s in args.img_size if s is not None] or [192, 256]
    with tempfile.TemporaryDirectory(prefix="swinv2-data-bench-") as tmp:
        if args.data == "samples":
            paths = data_bench.sample_jpegs(tmp, MAX_DATA_IMAGES)
        else:
            paths = data_bench.find_images(args.data, MAX_DATA_IMAGES)
        decoders = data_bench.available_decoders()
        print(f"{len(paths)} images from {args.data}; decoders: {', '.join(decoders)}; {args.repeats} rounds")
        results = data_bench.run(paths, img_sizes=sizes, decoders=decoders, repeats=args.repeats)
    print(data_bench.format_table(results))
    print("img/s per worker (1 process, 1 thread); (x) = median paired ratio to pillow, above 1: faster")
    if args.json:
        data_bench.write_json(args.json, results, meta={"data": args.data})
        print(f"wrote {args.json}")
    return 0


def _add_viz_cpb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz-cpb",
        help="heat maps of the learned continuous position bias, every layer and head",
        description="Draw 16*sigmoid(cpb_mlp(offset)) over the (2w-1)x(2w-1) relative offsets of every "
        "block and head, one PNG per stage. --window evaluates every stage at that window (any size "
        f"up to {MAX_CPB_WINDOW}: shows the log-spaced extrapolation).",
    )
    _add_weights_args(p, preprocess=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--window",
        type=_int_in(1, MAX_CPB_WINDOW),
        default=None,
        help=f"window for every stage, 1 to {MAX_CPB_WINDOW} (default: each stage's own)",
    )
    p.set_defaults(func=_run_viz_cpb)


def _run_viz_cpb(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .model.cpb import cpb_tables
    from .outputs import check_output_folder
    from .plots import plot_cpb_maps
    from .weights.factory import load_model

    out = Path(args.out)  # every cpb_stage<k>.png there already: a figure of ours, never an input
    pngs = {p.name: "png" for p in (out.glob("cpb_stage*.png") if out.is_dir() else ())} or {"cpb_stage0.png": "png"}
    check_output_folder(out, "--out", pngs, inputs=_reads(("--weights", args.weights)))
    model = load_model(args.weights, name=args.model)
    tables = cpb_tables(model, args.window)
    out.mkdir(parents=True, exist_ok=True)
    for stage in sorted({t.stage for t in tables}):
        rows = [t for t in tables if t.stage == stage]
        path = plot_cpb_maps(
            [t.bias.numpy() for t in rows],
            out / f"cpb_stage{stage}.png",
            stage=stage,
            window=rows[0].window,
            pretrained_window=rows[0].pretrained_window,
        )
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare training data: pack a folder or list file into shards",
        description="Training data at scale. `swinv2 data pack SRC OUT` writes the images of SRC into "
        "WebDataset-layout tar shards and a manifest (samples, bytes and SHA-256 per shard, class list and "
        "counts), which `data.source: shards` trains from, locally or from s3://. Killed, the same command "
        "finishes the pack.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = actions.add_parser(
        "pack",
        help="pack images into shards",
        description="SRC: a folder of class folders, an official list file (train_map.txt: '<path><TAB><label>' "
        "lines; ILSVRC2011fall_whole_map_train.txt: a JSON list) with its images in <prefix>.zip or the folder "
        "<prefix>/ beside it, Hugging Face image/label parquet files (a file, a folder or a glob) or a "
        "save_to_disk folder, or with --unlabelled any folder of images. Images that do not decode are left out "
        "and listed in the manifest.",
    )
    k.add_argument("src", metavar="SRC", help="class-folder tree, list file, or (with --unlabelled) image folder")
    k.add_argument("out", metavar="OUT", help="the new shard folder (a killed pack there is finished)")
    k.add_argument("--images", metavar="PATH", help="list files: the zip file or folder of the images")
    k.add_argument(
        "--classes",
        metavar="PATH",
        help="the class list, fixed: a shard set (its manifest) or a text file with one class per line; "
        "pack a val split with the training shards' classes",
    )
    k.add_argument("--unlabelled", action="store_true", help="every image under SRC, without labels (pretraining)")
    k.add_argument("--shard-samples", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    k.add_argument(
        "--max-side",
        type=int,
        metavar="PX",
        help="resize-on-write: images whose shorter side is longer are resized to it and stored as JPEG",
    )
    k.add_argument("--seed", type=int, default=0, help="the order samples are dealt into shards (default 0)")
    k.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes (default: CPUs)")
    k.set_defaults(func=_run_data_pack)
    g = actions.add_parser(
        "digits",
        help="write scikit-learn's digits as class folders (the demo's data)",
        description="scikit-learn's handwritten digits (1797 real scans shipped inside scikit-learn) as OUT/train "
        "and OUT/val class folders, upscaled to --img-size, split 80/20 stratified; an existing complete folder "
        "is kept.",
    )
    g.add_argument("out", metavar="OUT", help="the folder to write")
    g.add_argument("--img-size", type=int, default=32, help="image side in pixels (default 32)")
    g.set_defaults(func=_run_data_digits)


def _pack_classes(path: str | None) -> list[str] | None:
    from pathlib import Path

    from .errors import DataError

    if path is None:
        return None
    p = Path(path)
    if p.is_dir() or "://" in path:
        from .train.shards import ShardDataset

        return ShardDataset(path).classes
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"--classes: not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--classes {path}: cannot read ({e})") from None
    if not names:
        raise DataError(f"--classes {path}: no class names in it")
    return names


def _run_data_digits(args: argparse.Namespace) -> int:
    from .train.datasets import build_digits_folder

    if not 8 <= args.img_size <= 4096:
        raise InputError(f"--img-size {args.img_size}: expected 8 to 4096")
    print(f"digits in {build_digits_folder(args.out, img_size=args.img_size)}")
    return 0


def _run_data_pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train.datasets import ImageFilesDataset, ImageFolderDataset, Samples
    from .train.hf_layout import HFDataset, is_hf_layout
    from .train.listfile import ListFileDataset, images_for
    from .train.pack import PackOptions, pack_or_report
    from .train.shards import ShardDataset, is_shard_set

    src = Path(args.src)
    classes = _pack_classes(args.classes)
    source: Samples
    if is_shard_set(args.src):  # repacked (other shard sizes, a resize), also from s3://
        source = ShardDataset(args.src, class_names=classes)
    elif is_hf_layout(src):
        source = HFDataset(src, class_names=classes, label_column="" if args.unlabelled else "label")
    elif args.unlabelled:
        source = ImageFilesDataset(src)
    elif src.is_file():
        prefix = src.stem[: -len("_map")] if src.stem.endswith("_map") else "."
        images = Path(args.images) if args.images else images_for(src.parent, prefix)
        source = ListFileDataset(src, images, class_names=classes)
    elif src.is_dir():
        source = ImageFolderDataset(src, class_names=classes)
    else:
        raise FileNotFoundError(f"not found: {src}")
    options = PackOptions(args.shard_samples, args.max_side, args.seed, max(1, args.workers))
    print(pack_or_report(source, args.out, options, description=str(src)))
    return 0


# --------------------------------------------------------------------------- train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a SwinV2 from a YAML recipe (auto-resumes; torchrun for data-parallel)",
        description="Train with the official SwinV2 recipe. Starting again with the same --out resumes from the "
        "valid checkpoint furthest along in it (a config that changes the run needs --allow-config-change). "
        "A config with `stages:` trains them in turn, each in --out/stage<k>_<name> "
        "from the previous stage's weights; running it again skips finished stages. Data-parallel: "
        "torchrun --nproc_per_node N -m swinv2 train ...",
    )
    p.add_argument("--config", help="YAML recipe, e.g. configs/demo_digits.yaml (default: built-in defaults)")
    p.add_argument("--out", help="run directory (default: runs/<config file name>)")
    p.add_argument(
        "--resume",
        metavar="CKPT",
        help="resume from this training-state file instead of the newest checkpoint in --out",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from "
        "the checkpoint's in keys that change the run (e.g. data.batch_size, model.window_size)",
    )
    p.add_argument(
        "--start-over",
        action="store_true",
        help="replace the run already in --out (its checkpoints, "
        "metrics and weights are removed) instead of resuming it; needed to --resume a checkpoint of "
        "another run into a folder that holds a run",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument(
        "--list-keys",
        action="store_true",
        help="list every config key (for the recipe or as KEY=VALUE) with its type, default and valid values, and exit",
    )
    p.add_argument(
        "--check-data",
        action="store_true",
        help="scan the dataset (unreadable files, image modes, "
        "empty or mismatched classes, class balance) and exit; non-zero exit if files are unreadable",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.epochs=2 "
        "data.batch_size=64 optim.lr=1e-3; a stage's own keys: stages.0.train.epochs=1 "
        "(--list-keys lists the keys)",
    )
    p.set_defaults(func=_run_train)


def _published_start(cfg: Config, args: argparse.Namespace) -> tuple[str, str] | None:
    """(the key that set model.pretrained, where it was set) when the config starts from published
    weights; weights that can be had neither from the cache nor from the hub are said now, in config
    keys, before the data and model are built."""
    from .config import key_origin, start_point
    from .weights import hub

    start = start_point(cfg)
    key, pretrained = start["pretrained"]
    if not pretrained:
        return None
    from_config = (key, key_origin(key, args.config, args.overrides))
    hub.check_available(hub.resolve_pretrained(start["name"][1], pretrained), from_config=from_config)
    return from_config


def _run_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .config import load_config, schema_text

    if args.list_keys:
        print(schema_text(), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from .train.engine import NonFiniteError, TrainingInterrupted, check_data, fit
    from .weights.hub import WeightsUnavailableError

    if args.check_data:
        report = check_data(cfg)
        print(report.format())
        return 0 if report.ok else 1
    out = args.out or str(Path("runs") / (Path(args.config).stem if args.config else "default"))
    published = _published_start(cfg, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: say which rank speaks
        for h in logging.getLogger().handlers:
            h.setFormatter(
                logging.Formatter(
                    f"%(asctime)s [rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s", datefmt="%H:%M:%S"
                )
            )
    try:
        if cfg.stages:  # a multi-stage recipe: one run directory per stage under --out
            from .train.recipes import fit_recipe, shadowed_overrides

            for warning in shadowed_overrides(cfg, args.overrides):  # config warnings: rank 0's alone (`main`)
                logging.getLogger("swinv2.config").warning("%s", warning)
            summary = fit_recipe(
                cfg, out, resume=args.resume, allow_config_change=args.allow_config_change, start_over=args.start_over
            )
        else:
            summary = fit(
                cfg, out, resume=args.resume, allow_config_change=args.allow_config_change, start_over=args.start_over
            )
    except TrainingInterrupted as e:
        print(f"swinv2 train: {e}", file=sys.stderr)
        return e.exit_code
    except WeightsUnavailableError as e:  # the hub went away after `_published_start` asked it
        raise (e.in_config_words(published) if published else e) from None
    except NonFiniteError as e:
        print(f"swinv2 train: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary.get("final", {})
        if "val_top1" in final:
            best = summary.get("best")
            best = f"; best {best[next(k for k in best if k != 'epoch')]:.2f}% at epoch {best['epoch']}" if best else ""
            ema = f" (EMA top-1 {final['val_ema_top1']:.2f}%)" if "val_ema_top1" in final else ""
            top5 = f"  top-5 {final['val_top5']:.2f}%" if (summary.get("num_classes") or 6) > 5 else ""  # else 100%
            print(f"final val top-1 {final['val_top1']:.2f}%{top5}{ema}{best}")
        elif "val_loss" in final:  # pretraining (train.task: simmim): a reconstruction loss, no accuracy
            best = summary.get("best")
            best = f"; best {best[next(k for k in best if k != 'epoch')]:.4f} at epoch {best['epoch']}" if best else ""
            print(f"final val loss {final['val_loss']:.4f}{best}")
        print(f"run directory: {summary['run_dir']}")
        if "weights" in summary:
            print(f"weights:       {summary['weights']}")
        print(f"curves:        {summary['curves']}")
        print(f"metrics:       {summary['metrics']}")
        print(f"checkpoint:    {summary['checkpoint']}")
    return 0


# --------------------------------------------------------------------------- entry point

# Commands whose process runs the model step after step: freed CPU memory is kept for reuse (see
# `swinv2.allocator`; SwinV2-T training steps 3-10 % faster on the CPU here). `bench` decides for itself
# (`--default-malloc`).
RETAIN_MEMORY_COMMANDS = ("train", "eval", "predict")

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_download,
    _add_convert,
    _add_eval,
    _add_predict,
    _add_serve,
    _add_export,
    _add_bench,
    _add_viz_cpb,
    _add_train,
    _add_data,
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("swinv2")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="swinv2", description="Swin Transformer V2: train, evaluate, convert, export and benchmark."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"swinv2 {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    _check_device(args)
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options too (`train --config F a=1 --out D b=2`), which plain
    # argparse cannot take for one positional list.
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.parse_args(argv)  # argparse's own error for anything else
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not args.debug:  # huggingface_hub's own retry warnings (several lines each) are not the CLI's one line
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub is first imported
        if "huggingface_hub" in sys.modules:
            logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # Under torchrun every rank reads the same config: its warnings are said once, by rank 0.
    logging.getLogger("swinv2.config").setLevel(logging.NOTSET if os.environ.get("RANK", "0") == "0" else logging.ERROR)
    if args.command in RETAIN_MEMORY_COMMANDS:
        allocator.retain_freed_cpu_memory()
    if args.debug:
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C; outputs are renamed into place whole, so none is half-written
        print(f"swinv2 {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (SwinV2Error, OSError) as e:  # the user's input or files; anything else is a bug: traceback
        print(f"swinv2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
