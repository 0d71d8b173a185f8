"""Where the commands' results go (JSON reports, figures, metrics): checked before the work, and
written so that nothing is half-written and nothing but a regular file is ever replaced.

* A regular file, or a new name: written to a uniquely named temp file beside it, then renamed over
  it (`checkpoint.atomic_write`): a reader sees the old content or the new, and two processes never
  share a temp name.
* A symlink: written through; its target is replaced, the link stays.
* `-`, this process's own stdout (`/dev/stdout`, `/dev/fd/1`), a pipe, a FIFO, a character device
  (`/dev/null`, a terminal) or any other `/dev/`, `/proc/` name: streamed in place, never renamed over.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

PathLike = str | os.PathLike


def is_stdout(path: PathLike) -> bool:
    """`-`, or a name for the file this process's stdout already is (`/dev/stdout`, `/dev/fd/1`)."""
    if os.fspath(path) == "-":
        return True
    try:
        target, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no such file, or a stdout without a descriptor
        return False
    return (target.st_dev, target.st_ino) == (out.st_dev, out.st_ino)


def _streamed(path: PathLike) -> bool:
    """True where the output is written in place: stdout, devices, pipes, FIFOs, sockets."""
    if is_stdout(path):
        return True
    real = os.path.realpath(path)
    if real.startswith(("/dev/", "/proc/")):
        return True
    try:
        mode = os.stat(real).st_mode
        return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))  # a folder is refused by check_output
    except OSError:  # not there yet (or its folder is not): a new regular file
        return False


def check_output(path: PathLike, what: str = "output") -> None:
    """Before any work: make sure `path` can be written, creating its missing folders.

    Raises OSError with one line naming `what` and `path`: its folder cannot be created, it is a
    directory, or its folder is not writable.
    """
    if _streamed(path):
        return
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise IsADirectoryError(f"{what} {path}: is a directory, not a file")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what} {path}: cannot create its folder {real.parent}: {e.strerror or e}") from None
    if not os.access(real.parent, os.W_OK):
        raise PermissionError(f"{what} {path}: folder {real.parent} is not writable")


def write_output(path: PathLike, data: str | bytes) -> None:
    """Write `data` to `path` as the module doc says (atomically for regular files)."""
    raw = data.encode() if isinstance(data, str) else data
    if is_stdout(path):
        sys.stdout.flush()
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return
    if _streamed(path):
        with open(path, "wb") as f:
            f.write(raw)
        return
    from .checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(raw))
