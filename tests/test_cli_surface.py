"""The command line's surface, pinned: the sub-commands and every option of each (option strings, nargs, choices,
required, flag or value) as `swinv2.cli`'s parser declares them, compared with the listing checked in
beside this file. An option added, removed, renamed or changed in what it takes fails here, naming each
line, until the listing is regenerated on purpose:

    python tests/test_cli_surface.py --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LISTING = Path(__file__).with_name("cli_surface.txt")
HEADER = """\
# The command line's surface, one option per line: COMMAND OPTION [what it takes]. tests/test_cli_surface.py
# reads it from swinv2.cli's parser and compares; a difference is a change users see. Regenerate on purpose:
#   python tests/test_cli_surface.py --write
"""
REGENERATE = "python tests/test_cli_surface.py --write"

# What an action takes, for the kinds whose class says it: everything else stores a value.
_KINDS = {
    argparse._StoreTrueAction: "flag",
    argparse._StoreFalseAction: "flag (sets false)",
    argparse._StoreConstAction: "flag (sets a constant)",
    argparse._AppendAction: "repeatable",
    argparse._AppendConstAction: "repeatable flag",
    argparse._CountAction: "counted flag",
    argparse._VersionAction: "prints the version",
}


def _describe(action: argparse.Action) -> str:
    name = ", ".join(action.option_strings) if action.option_strings else f"<{action.dest}>"
    parts = [name]
    kind = _KINDS.get(type(action))
    if kind is not None:
        parts.append(kind)
    elif action.nargs is not None:
        parts.append(f"nargs={action.nargs}")
    if action.choices is not None:
        parts.append("choices=" + ",".join(map(str, action.choices)))
    if action.required and action.option_strings:  # positionals are required unless their nargs says not
        parts.append("required")
    return " ".join(parts)


def _walk(parser: argparse.ArgumentParser, command: str) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):  # -h/--help: every parser has it
            continue
        if isinstance(action, argparse._SubParsersAction):
            lines.append(f"{command} <{action.dest}> choices={','.join(action.choices)}")
            named: dict[int, list[str]] = {}
            for name, sub in action.choices.items():  # aliases share one parser
                named.setdefault(id(sub), []).append(name)
            for name, sub in action.choices.items():
                names = named.pop(id(sub), None)
                if names is None:
                    continue
                if len(names) > 1:
                    lines.append(f"{name} aliases={','.join(names[1:])}")
                lines += _walk(sub, name if command == "swinv2" else f"{command} {name}")
            continue
        lines.append(f"{command} {_describe(action)}")
    return lines


def surface() -> list[str]:
    """One line per option of every command, in the parser's order."""
    from swinv2.cli import build_parser

    return _walk(build_parser(), "swinv2")


def _listed() -> list[str]:
    return [ln for ln in LISTING.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_the_command_line_is_the_listed_one():
    now, listed = surface(), _listed()
    added = [ln for ln in now if ln not in listed]
    removed = [ln for ln in listed if ln not in now]
    if added or removed:
        lines = [f"the command line differs from {LISTING.name}:"]
        lines += [f"  added:   {ln}" for ln in added] + [f"  removed: {ln}" for ln in removed]
        lines.append(
            f"if the change is meant, regenerate the listing ({REGENERATE}) and commit it with the "
            "change, and say it in README / docs where the option is described"
        )
        raise AssertionError("\n".join(lines))
    assert len(now) == len(set(now)), "an option is listed twice"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(f"usage: {REGENERATE}   (writes {LISTING})")
    LISTING.write_text(HEADER + "\n".join(surface()) + "\n")
    print(f"wrote {LISTING}: {len(surface())} options")
