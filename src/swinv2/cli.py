"""The `swinv2` command line: the only module that reads argv.

Each subcommand parses its arguments and calls one library function. Errors a user can cause
(missing file, bad key, wrong model name) end in one line on stderr and a non-zero exit; `--debug`
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("swinv2")


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


# --------------------------------------------------------------------------- models


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--all", action="store_true", help="include the unofficial test/demo variants")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .flops import count_flops
    from .registry import count_params, get_variant, list_models

    rows = []
    for name in list_models(include_unofficial=args.all):
        v = get_variant(name)
        cfg = v.config
        pws = ",".join(map(str, cfg.pretrained_window_sizes)) if any(cfg.pretrained_window_sizes) else "-"
        rows.append((
            name, f"{cfg.img_size[0]}", f"{cfg.window_size}", pws, v.pretrain,
            f"{cfg.num_classes}", f"{count_params(cfg) / 1e6:.1f}M", f"{count_flops(cfg) / 1e9:.1f}",
            f"{v.top1:.1f}" if v.top1 else "-", f"{v.top5:.1f}" if v.top5 else "-",
        ))
    header = ("name", "img", "window", "pretrained win", "weights", "classes", "params", "GMACs", "top-1",
              "top-5")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    right = {1, 2, 5, 6, 7, 8, 9}

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))
    print("\nGMACs at the native size (paper convention); top-1/top-5: paper, ImageNet-1k val. "
          "Aliases: the official config names, e.g. swinv2_base_patch4_window12to16_192to256_22kto1k_ft.")
    return 0


# --------------------------------------------------------------------------- entry point

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinv2", description="Swin Transformer V2: train, evaluate, convert, "
                                     "export and benchmark.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except (UserError, OSError, KeyError, ValueError, TypeError) as e:  # OSError: checkpoint.CheckpointError too
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"swinv2 {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
