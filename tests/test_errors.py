"""The command line reports faults in the user's input as one line and keeps a bug's traceback."""

from __future__ import annotations

import pytest

from swinv2 import cli
from swinv2.errors import CheckpointError, ConfigError, InputError, SwinV2Error, UnknownNameError
from swinv2.weights.registry import get_variant


def _failing_models(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc",
    [
        InputError("--precision int8 needs --calib"),
        ConfigError("train.epochs: must be >= 1"),
        CheckpointError("w.pt: truncated"),
        UnknownNameError("unknown model 'x'"),
        FileNotFoundError(2, "No such file or directory"),
    ],
)
def test_a_fault_in_the_input_is_one_line_and_exit_2(exc, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run_models", _failing_models(exc))
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swinv2 models: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and "'unknown model" not in err  # a KeyError's message is not quoted


@pytest.mark.parametrize("exc", [ValueError("internal shape mismatch"), KeyError("layers.0"), TypeError("bad call")])
def test_a_bug_keeps_its_traceback(exc, monkeypatch):
    monkeypatch.setattr(cli, "_run_models", _failing_models(exc))
    with pytest.raises(type(exc)):
        cli.main(["models"])


def test_project_errors_are_still_the_builtins_callers_catch():
    with pytest.raises(KeyError, match="did you mean"):
        get_variant("swinv2_tiny_window8_265")
    assert issubclass(InputError, ValueError) and issubclass(CheckpointError, OSError)
    assert all(issubclass(t, SwinV2Error) for t in (InputError, ConfigError, CheckpointError, UnknownNameError))


def test_unknown_model_name_on_the_command_line_is_one_line(capsys):
    assert cli.main(["eval", "--weights", "swinv2_tiny_window8_265.ms_in1k", "--data", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swinv2_tiny_window8_265'" in err and err.count("\n") == 1
