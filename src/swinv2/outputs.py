"""Where the commands' results go (JSON reports, figures, metrics): checked before the work, and
written so that nothing is half-written and nothing but a regular file is ever replaced.

* A regular file, or a new name: written to a uniquely named temp file beside it, then renamed over
  it (`atomic_write`): a reader sees the old content or the new, and two processes never
  share a temp name.
* A symlink: written through; its target is replaced, the link stays.
* `-`, this process's own stdout (`/dev/stdout`, `/dev/fd/1`), a pipe, a FIFO, a character device
  (`/dev/null`, a terminal) or any other `/dev/`, `/proc/` name: streamed in place, never renamed over.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import IO, Any, Callable

from .errors import CheckpointError

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
    atomic_write(path, lambda f: f.write(raw))


# --------------------------------------------------------------------------- the atomic writer

def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); platforms without directory fds skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory; the data is already synced
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _temp_name(path: Path) -> str:
    return f".{path.name}."  # prefix of temp files: hidden, and never matching "*.pt"


# Read by setting it (to the strictest value, for an instant) and putting it back: once, at import.
_UMASK_AT_IMPORT = os.umask(0o077)
os.umask(_UMASK_AT_IMPORT)


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux: /proc/self/status),
    so a thread creating files meanwhile is never affected; elsewhere the umask at import."""
    try:
        with open("/proc/self/status") as f:
            return next((int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:")), _UMASK_AT_IMPORT)
    except (OSError, ValueError, IndexError):
        return _UMASK_AT_IMPORT


def _file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 less the umask (`mkstemp` makes 0600 files)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """A unique temp name beside `path` for the block to write to (by name: an exporter, a saver).

    When the block ends without an error the file is fsynced, given the mode an ordinary new file gets
    (0o666 less the umask, not mkstemp's 0600) and renamed onto `path`; else it is removed and `path`
    is left untouched. A symlink at `path` stays: its target is replaced.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot save {path}: directory {directory} does not exist")
    fd, name = tempfile.mkstemp(dir=directory, prefix=_temp_name(target), suffix=".tmp")
    os.close(fd)
    tmp: Path | None = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(directory)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(fileobj)` on a temp file beside `path`, then rename it onto `path` (`atomic_file`).

    On any failure the temp file is removed, a previous `path` is left untouched and CheckpointError
    names `path` and the cause (e.g. "No space left on device").
    """
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            write(f)
    except CheckpointError:
        raise
    except Exception as e:  # KeyboardInterrupt / SystemExit: cleaned up, passed on as they are
        raise CheckpointError(f"could not save {path}: {_write_cause(e)}; the previous file (if any) is "
                              f"unchanged") from e


def _write_cause(e: BaseException) -> str:
    """The OS's words for why a write failed ("No space left on device"), also where torch's writer
    wrapped the OSError of the file object in its own RuntimeError ("[enforce fail at ...]")."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__).splitlines()[0]


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Build a folder under a temp name beside `path`; rename it into place when the block ends without
    an error, else remove it: a killed or failed build never leaves half a folder under the final name.

    The rename fails (OSError) where a non-empty folder is already at `path`, e.g. another process
    finished first; the temp folder is removed then too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_name(path), suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # what mkdir gives, not mkdtemp's 0700
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
