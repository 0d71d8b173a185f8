"""Training state: the one file per save `engine.fit` resumes from, and finding the newest one.

One torch file per save holding tensors and plain Python data only (so it loads with
`torch.load(weights_only=True)`, see `safe_load`), written atomically (temp file, fsync, `os.replace`,
fsync of the directory): a kill or a full disk never leaves a torn file under the final name. A state
tagged `TRAINING_STATE_FORMAT` is checked for the keys resuming and reading its weights need, since a
file that loads but was cut down or edited is as unusable as a torn one. Files get the mode of any new
file (0o666 less the umask).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnreadableFileError
from ..outputs import atomic_write
from .messages import shown
from .safe_load import PathLike, torch_load

log = logging.getLogger(__name__)

TRAINING_STATE_FORMAT = "swinv2.training_state"  # the tag of a state `engine.fit` writes: this one, there is no other

_PLAIN = (torch.Tensor, int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Raise CheckpointError if `obj` holds anything `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (dict, OrderedDict)) and type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set, frozenset):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"training state {where} is a {type(obj).__module__}.{type(obj).__qualname__}; only tensors and plain "
        f"Python data (dict/list/tuple/int/float/str/bool/None) can be saved so that the file loads with "
        f"weights_only=True"
    )


def save_training_state(path: PathLike, state: dict[str, Any]) -> None:
    """Atomically write `state` (tensors and plain Python data only) to `path` with `torch.save`.

    Written to a temp file in the same directory, flushed and fsynced, then renamed over `path`,
    and the directory fsynced: a reader sees the old file or the new one, never a torn one.
    Raises CheckpointError (naming `path` and the cause) on any failure, e.g. a full disk; the
    previous file under `path` is then untouched and no temp file remains.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot save {path}: training state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    atomic_write(path, lambda f: torch.save(state, f))


def load_training_state(path: PathLike) -> dict[str, Any]:
    """Read a training-state file written by `save_training_state` (weights_only, on the CPU).

    Raises FileNotFoundError if missing, CheckpointError naming the file if empty, truncated or not
    a torch file, UnsafeCheckpointError naming the offending global for a pickle with code.
    """
    state = torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training-state dict")
    if state.get("format") == TRAINING_STATE_FORMAT:
        check_training_state(state, path)
    return state


# What a training state of `engine.fit` holds (`Trainer.state_dict`), each key with the types it may have;
# "ema" and "scaler" are None where the run has none.
_STATE_KEYS: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "ema": (dict, type(None)),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "scaler": (dict, type(None)),
    "progress": (dict,),
    "sampler": (dict,),
    "history": (list,),
    "best": (list,),
    "classes": (list,),
    "preprocess": (dict,),
}


def check_training_state(state: Mapping[str, Any], path: PathLike) -> None:
    """CheckpointError naming `path` and the key if a tagged training state lacks one that resuming or
    reading its weights needs, or holds the wrong type there: a file that loads but was cut down or
    edited is as unusable as a torn one (`find_resumable` skips it with a warning; an explicit
    `--resume` of it is one line)."""
    for key, types in _STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{path}: training state without {key!r} (damaged or edited); not usable")
        if not isinstance(state[key], types):
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(
                f"{path}: training state {key!r} holds a {type(state[key]).__name__}, not a "
                f"{wanted} (damaged or edited); not usable"
            )
    if not all(isinstance(c, str) for c in state["classes"]):
        raise CheckpointError(
            f"{path}: training state 'classes' holds {shown(state['classes'])}, not class names (strings); not usable"
        )


def find_resumable(directory: PathLike, pattern: str = "*.pt", *, remove_temp: bool = True) -> Path | None:
    """The file matching `pattern` in `directory` that loads and is furthest along: the highest
    training step recorded inside it (`progress.global_step`), `last.pt` first among equals, then by
    name. Never by modification time, which a `touch` or a `cp -r` of the run rewrites.

    Files read and found torn are skipped with a warning naming them. A file (or the directory) that
    cannot be read now (permissions, an I/O error, a stale mount) raises UnreadableFileError before
    anything is changed: starting over would replace a run that is still there. Temp files left by a
    save that was killed (`.NAME.*.tmp`) are never candidates and are removed, once every candidate
    was read, when `remove_temp` (set it False while another process may be saving into
    `directory`). Returns None if nothing loads.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    try:
        names = sorted(os.listdir(directory))  # Path.glob would take an unreadable folder for an empty one
    except OSError as e:
        raise UnreadableFileError(
            f"{directory}: cannot be read: {e.strerror or e}; stopped without changing anything"
        ) from None
    best: tuple[tuple[int, bool, str], Path] | None = None
    for p in (directory / n for n in names if fnmatch.fnmatchcase(n, pattern) and not n.startswith(".")):
        if not p.is_file():
            continue
        try:
            state = load_training_state(p)
        except UnreadableFileError as e:
            raise UnreadableFileError(
                f"{e}; stopped without changing anything (a checkpoint that cannot be "
                f"read is not skipped: fix its permissions or mount, or move it away)"
            ) from None
        except OSError as e:  # CheckpointError (read and found torn), or the file vanished meanwhile
            log.warning("skipping checkpoint %s: %s", p, e)
            continue
        progress = state.get("progress")
        step = progress.get("global_step", -1) if isinstance(progress, dict) else -1
        key = (step, p.name == "last.pt", p.name)
        del state
        if best is None or key > best[0]:
            best = (key, p)
    if remove_temp:
        for tmp in (directory / n for n in names if n.startswith(".") and n.endswith(".tmp")):
            log.warning("removing %s: temp file of an interrupted checkpoint save", tmp)
            try:
                tmp.unlink()
            except OSError as e:
                log.warning("could not remove %s: %s", tmp, e)
    return None if best is None else best[1]


__all__ = [
    "TRAINING_STATE_FORMAT",
    "check_training_state",
    "find_resumable",
    "load_training_state",
    "save_training_state",
]
