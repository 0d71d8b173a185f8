"""Reading a torch file safely: `torch.load(weights_only=True)` only, and one line naming the file.

Never `weights_only=False`: a pickle that needs any global beyond torch's allow-list is refused with
one line naming that global, before anything in it runs. Torch's own error there is a paragraph that
suggests `weights_only=False`; where it does not name the global (an opcode its unpickler lacks comes
first), the pickle is read opcode by opcode, never run, to find it. A file that cannot be read now
(permissions, an I/O error, a stale mount) is said to be so, never called corrupt.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import CheckpointError, UnreadableFileError, UnsafeCheckpointError

PathLike = str | os.PathLike

_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")
# The other messages of torch's weights-only unpickler that mean "this pickle wants to run code".
_UNSAFE_PREFIXES = ("Trying to call reduce", "Can only build", "Can only create new object")


# Lines of torch's weights-only errors that are advice, not the cause (it suggests weights_only=False).
_ADVICE = re.compile(r"weights_only|Weights only load failed|Please file an issue|Check the documentation", re.I)


def _cause(e: BaseException) -> str:
    """The first line of `e` that says what is wrong, without torch's advice around it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not _ADVICE.search(ln)]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _refused(path: Path, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to load: the pickle needs the global {name!r}, which is not "
        f"allowed for a weights-only checkpoint (nothing was executed)"
    )


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol <= 2 names, as pickle maps them


def _pickle_globals(f: Any) -> list[str]:
    """The globals ("module.name") the pickles in file `f` import, read opcode by opcode, never run.

    A legacy torch file is several pickles in a row (magic number, protocol, system info, the object,
    the storage keys) before raw bytes; protocol 4+ names a global by two strings on the stack
    (STACK_GLOBAL), so strings pushed and memoised are tracked far enough to resolve it.
    """
    found: list[str] = []
    for _ in range(8):
        memo: dict[int, Any] = {}
        pushed: list[Any] = []  # what each opcode pushed: its string, else None
        try:
            for op, arg, _pos in pickletools.genops(f):
                # genops types `arg` loosely; its type follows the opcode: "module name" for GLOBAL/INST,
                # a memo index for PUT/GET and their binary forms.
                if op.name in ("GLOBAL", "INST"):
                    module, name = cast(str, arg).split(" ", 1)
                    found.append(f"{_PY2_MODULES.get(module, module)}.{name}")
                    pushed.append(None)
                elif op.name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]):
                        found.append(f"{pushed[-2]}.{pushed[-1]}")
                    pushed.append(None)
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else cast(int, arg)] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(cast(int, arg)))
                elif op.stack_after:
                    pushed.append(arg if isinstance(arg, str) else None)
        except Exception:  # the raw tensor bytes after the last pickle, or a torn file: nothing more to read
            break
    return found


def _unsafe_global(path: Path) -> str | None:
    """The first global a torch file's pickle needs beyond torch's weights-only allow-list, if any.

    For the errors where torch's unpickler stops before naming it (an opcode it lacks, e.g. the
    FRAME of protocol 4, read before the global).
    """
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:  # a torch without it: name the first global outside torch and collections
        allowed = None
    else:  # torch's list, and what the user allowed with `torch.serialization.add_safe_globals`
        allowed = set(_get_allowed_globals()) | {
            g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
            for g in torch.serialization.get_safe_globals()
        }
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is None:
                    return None
                with z.open(pkl) as f:
                    names = _pickle_globals(f)
        else:
            with open(path, "rb") as f:
                names = _pickle_globals(f)
    except OSError:
        return None
    if allowed is None:
        return next((n for n in names if not n.startswith(("torch.", "collections."))), None)
    return next((n for n in names if n not in allowed), None)


def torch_load(path: PathLike) -> Any:
    """`torch.load(path, weights_only=True, map_location="cpu")` with one-line errors naming `path`.

    Raises FileNotFoundError if `path` is missing, UnsafeCheckpointError (naming the global) for a
    pickle that needs code outside torch's allow-list, CheckpointError for empty/torn/garbage files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:  # a file that cannot be read now is not a torn one: say so, never "corrupt"
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UnreadableFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph suggesting weights_only=False; keep the fact, drop the advice.
        m = _GLOBAL_RE.search(str(e))
        name = m.group(1) if m else _unsafe_global(path)
        if name:
            raise _refused(path, name) from None
        unsafe = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(_UNSAFE_PREFIXES)), None)
        if unsafe:
            raise UnsafeCheckpointError(f"{path}: refused to load: {unsafe} (nothing was executed)") from None
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (unsupported or corrupt pickle): {_cause(e)}"
        ) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... for torn or foreign bytes
        oserror = _os_error(e)
        if oserror is not None:  # the system failed to read it (EIO, ESTALE): not the file's fault
            raise UnreadableFileError(f"{path}: cannot be read: {oserror.strerror or oserror}") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {_cause(e)}") from None


def _os_error(e: BaseException) -> OSError | None:
    """The OSError with an errno behind `e`, if the failure was the system's (an I/O error, a stale mount)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


__all__ = ["PathLike", "torch_load"]
