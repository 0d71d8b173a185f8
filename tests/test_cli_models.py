"""`swinv2 models`: the zoo table a user first meets."""

from __future__ import annotations

import subprocess
import sys

import pytest

import swinv2
from swinv2.cli import main


def test_models_lists_every_variant_with_its_numbers(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in swinv2.list_models():
        assert name in out
    assert "28.3M" in out and "115.4" in out and "87.6" in out
    demo = next(line for line in out.splitlines() if line.startswith("swinv2_micro_window4_32 "))
    assert demo.split()[4] == "none" and "in1k" not in demo  # the demo's model: no published weights


@pytest.mark.slow  # about 10 s; the CLI's other tests run it in-process
def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "swinv2", "models"], capture_output=True, text=True)
    assert res.returncode == 0 and "swinv2_micro_window4_32" in res.stdout


def test_unknown_subcommand_fails_cleanly():
    res = subprocess.run([sys.executable, "-m", "swinv2", "frobnicate"], capture_output=True, text=True)
    assert res.returncode != 0 and "invalid choice" in res.stderr


def test_help_does_not_import_torch():
    """`swinv2 --help` stays instant: the package loads its public names (and torch) on first use."""
    code = "import sys, swinv2.cli; swinv2.cli.build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_public_names_load_on_first_use():
    assert set(swinv2.__all__) <= set(dir(swinv2))
    for name in swinv2.__all__:
        assert getattr(swinv2, name) is not None
