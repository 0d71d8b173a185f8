"""Outputs of several files that are only right together: a Hugging Face folder (model.safetensors,
config.json, preprocessor_config.json), an ONNX graph and its sidecar `<graph>.json`, an entry of the
runtime's export cache (graph, sidecar, key).

Each file is replaced atomically on its own (`outputs.atomic_write`), but a process killed between two
of them leaves a new file beside an old one. So every write of such a unit draws one fresh id
(`new_unit_id`) and stores it in each file that can carry it; the file that describes the others is
written last, and a reader refuses a unit whose ids disagree (`torn`: one line, "interrupted write").

Writers of the same folder take `unit_lock` on it (an exclusive `flock` on the folder itself: no file
is added; a killed holder holds nothing), so two processes never interleave their files and, while
it is held, a temp file of ours in the folder (`.NAME.XXXXXXXX.tmp`, the names `atomic_file` draws)
can only be the leftover of a killed write: `remove_stale_temps` removes those of the unit's names.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # not POSIX: no lock, so no clean-up either
    fcntl = None  # type: ignore[assignment]

# `outputs.atomic_file`'s temp names: "." + the final name + "." + mkstemp's 8 characters + ".tmp".
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")

_held: dict[tuple[int, int], tuple[int, int]] = {}  # (st_dev, st_ino) of a locked folder -> (thread id, depth)
_held_guard = threading.Lock()


def new_unit_id() -> str:
    """A fresh id for one write of a unit (32 hex digits)."""
    return uuid.uuid4().hex


def torn(where: os.PathLike | str, detail: str) -> CheckpointError:
    """The one-line error for a unit whose files come from different writes."""
    return CheckpointError(
        f"{where}: {detail}; it looks like an interrupted write (a process killed between its files): write it again"
    )


@contextlib.contextmanager
def unit_lock(folder: os.PathLike | str) -> Iterator[bool]:
    """Hold an exclusive lock on `folder` (which must exist) for the block; yields True where this call
    took it: then, and only then, may the caller clean up (`remove_stale_temps`).

    Waits (saying so once, at INFO) while another process holds it. Re-entrant in the thread that
    holds it: a nested call yields False (the outer call cleaned up already, and its writes may be in
    progress). Where the filesystem has no `flock` (some network mounts) or the OS no `fcntl`, the
    block runs without it and yields False.
    """
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        log.debug("no lock on %s: %s", folder, e)
        yield False
        return
    try:
        st = os.fstat(fd)
        ident, me = (st.st_dev, st.st_ino), threading.get_ident()
        with _held_guard:
            owner = _held.get(ident)
            if owner is not None and owner[0] == me:
                _held[ident] = (me, owner[1] + 1)
                nested = True
            else:
                nested = False
        if nested:
            try:
                yield False
            finally:
                with _held_guard:
                    depth = _held[ident][1] - 1
                    if depth:
                        _held[ident] = (me, depth)
                    else:
                        del _held[ident]
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing into %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            log.debug("no lock on %s: %s", folder, e)
            yield False
            return
        with _held_guard:
            _held[ident] = (me, 1)
        try:
            yield True
        finally:
            with _held_guard:
                _held.pop(ident, None)
    finally:
        os.close(fd)  # releases the flock


def remove_stale_temps(
    folder: os.PathLike[str] | str, names: Iterable[str] | None = None, *, dirs: Iterable[str] = ()
) -> list[Path]:
    """Remove the temp files `atomic_file` left in `folder` for the final names `names` (None: any
    name), and temp folders whose name starts with one of `dirs`; returns what was removed.

    Call it only while holding `unit_lock(folder)` (it yielded True) and only for names that every
    writer writes under that lock: then no such temp file belongs to a write in progress.
    """
    wanted = None if names is None else set(names)
    prefixes = tuple(dirs)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        log.debug("cannot list %s: %s", folder, e)
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        try:
            if m and (wanted is None or m.group("name") in wanted) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
            elif prefixes and entry.name.startswith(prefixes) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                continue
        except OSError as e:
            log.warning("could not remove %s, left by an interrupted write: %s", entry.path, e)
            continue
        log.warning("removed %s, left by an interrupted write", entry.path)
        removed.append(Path(entry.path))
    return removed
