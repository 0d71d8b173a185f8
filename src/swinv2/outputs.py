"""Where the commands' results go (JSON reports, figures, metrics): checked before the work, and
written so that nothing is half-written and nothing but a regular file is ever replaced.

* A regular file, or a new name: written to a uniquely named temp file beside it, then renamed over
  it (`atomic_write`): a reader sees the old content or the new, and two processes never
  share a temp name.
* A symlink: written through; its target is replaced, the link stays.
* `-`, this process's own stdout (`/dev/stdout`, `/dev/fd/1`), a pipe, a FIFO, a character device
  (`/dev/null`, a terminal) or any other `/dev/`, `/proc/` name: streamed in place, never renamed over.
* A replaced regular file keeps its owner, group and mode (`atomic_file`); where its owner cannot be
  kept (not root, someone else's file) the write is refused and the file left as it was. A new file
  gets 0o666 less the umask, as `open()` gives.
* The user's own files are never taken for an output (`check_output`, before any work): an output that
  is one of the command's inputs (the same file after symlinks, or an image inside an input folder) or
  an existing non-empty file of another kind than the command writes there (a JPEG where a PNG figure
  goes: what a shell glob such as `--plot photos/*.jpg` does) is refused in one line, naming the option.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import CheckpointError, SwinV2Error

PathLike = str | os.PathLike


class OutputRefusedError(SwinV2Error, FileExistsError):
    """An output path that holds a file the command must not replace: one of its inputs, a file of
    another kind than it writes there, or someone else's file whose owner cannot be kept."""


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


def check_output(
    path: PathLike,
    what: str = "output",
    *,
    kind: str | None = None,
    inputs: Iterable[tuple[str, PathLike | None]] = (),
    image_folders: Iterable[tuple[str, PathLike | None, int]] = (),
    create: bool = True,
) -> None:
    """Before any work: make sure `path` can be written, creating its missing folders (unless not
    `create`: then a missing folder is left for the writer to report), and that it is none of the
    user's own files.

    `kind` is what the command writes there (a key of `KINDS`: "png", "json", "safetensors", "torch",
    "onnx", or "hf" for a Hugging Face folder): an existing non-empty regular file (a folder, for "hf")
    that is not of that kind is refused. `inputs` are (option, path) of the files and folders the
    command reads: the same file, or folder, after symlinks is refused. `image_folders` are (option,
    folder, depth) of folders whose image files at `depth` or deeper the command reads (1: any image
    under it; 2: eval's folder/<class>/<image>): an existing image there is refused too. Names that are
    not paths (e.g. NAME.TAG weights) are skipped. Streamed outputs (`-`, stdout, pipes, devices) are
    never checked.

    Raises OSError with one line naming `what` and `path`: its folder cannot be created, it is a
    directory (for a file output), or its folder is not writable; `OutputRefusedError` (an OSError
    too) for a file that must not be replaced.
    """
    if _streamed(path):
        return
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(KINDS)}")
    real = Path(os.path.realpath(path))
    folder_output = kind == "hf"
    if real.is_dir() and not folder_output:
        raise IsADirectoryError(f"{what} {path}: is a directory, not a file")
    _refuse_inputs(path, what, inputs, image_folders)
    try:
        st = os.stat(real)
    except OSError:
        st = None
    if st is not None and kind is not None:
        found = _refused_content(real, st, kind)
        if found:
            raise OutputRefusedError(
                f"{what} {path}: is an existing {found}, not {KINDS[kind]} this command "
                f"writes; refusing to replace it (did a shell glob put an input here?)"
            )
    if st is not None and stat.S_ISREG(st.st_mode):
        _refuse_unkeepable_owner(path, what, st)
    if folder_output and st is not None and stat.S_ISDIR(st.st_mode):
        for file, file_kind in HF_FOLDER_FILES.items():
            check_output(Path(path) / file, what, kind=file_kind)
        if not os.access(real, os.W_OK):
            raise PermissionError(f"{what} {path}: folder is not writable")
        return
    if not create and not real.parent.is_dir():
        return
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what} {path}: cannot create its folder {real.parent}: {e.strerror or e}") from None
    if not os.access(real.parent, os.W_OK):
        raise PermissionError(f"{what} {path}: folder {real.parent} is not writable")


def check_output_folder(
    path: PathLike,
    what: str,
    files: Mapping[str, str],
    *,
    inputs: Iterable[tuple[str, PathLike | None]] = (),
    image_folders: Iterable[tuple[str, PathLike | None, int]] = (),
) -> None:
    """Before any work: a folder the command writes `files` (name -> kind, see `check_output`) into
    (eval --plots, viz-cpb --out) is a folder or not there yet, and each file passes `check_output`."""
    real = os.path.realpath(path)
    if os.path.lexists(path) and not os.path.isdir(real):
        found = describe_file(real) if os.path.isfile(real) else "special file"
        raise OutputRefusedError(
            f"{what} {path}: is an existing {found}, not a folder this command writes into; "
            f"refusing to replace it (did a shell glob put an input here?)"
        )
    inputs, image_folders = list(inputs), list(image_folders)
    for name, kind in files.items():
        check_output(Path(path) / name, what, kind=kind, inputs=inputs, image_folders=image_folders)


# --------------------------------------------------------------------------- what an existing output holds

# The image files the commands read (`data` reads these): never taken for an output inside an input folder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# What each output kind is called in a refusal ("not <this> this command writes").
KINDS = {
    "png": "a PNG figure",
    "json": "a JSON file",
    "safetensors": "a .safetensors file",
    "torch": "a PyTorch file",
    "onnx": "an ONNX graph",
    "hf": "a Hugging Face model folder",
}
# The files `weights.files.write_weights(..., "hf")` writes into its folder, and their kinds.
HF_FOLDER_FILES = {"config.json": "json", "model.safetensors": "safetensors", "preprocessor_config.json": "json"}
_SNIFF = 4096  # bytes read from the start of an existing file to tell its kind

# Signatures of files a command never writes where the user may keep them: refused by name.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"%PDF-", "PDF document"),
    (b"\x1f\x8b", "gzip file"),
    (b"BZh", "bzip2 file"),
    (b"\xfd7zXZ\x00", "xz file"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"\x7fELF", "ELF executable"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000 image"),
    (b"\x00\x00\x01\x00", "ICO image"),
    (b"\x89HDF\r\n\x1a\n", "HDF5 file"),
    (b"\x93NUMPY", "NumPy array file"),
    (b"<?xml", "XML file"),
)


def _png_software(path: Path) -> str | None:
    """The PNG's tEXt "Software" value (Matplotlib writes "Matplotlib version..."), else None. Walks the
    chunk headers only (seeking past the data), up to the first 64 chunks."""
    try:
        with open(path, "rb") as f:
            f.seek(8)
            for _ in range(64):
                header = f.read(8)
                if len(header) < 8:
                    return None
                length, ctype = int.from_bytes(header[:4], "big"), header[4:]
                if ctype == b"IEND":
                    return None
                if ctype in (b"tEXt", b"iTXt") and length <= 65536:
                    key, _, value = f.read(length).partition(b"\x00")
                    if key == b"Software":
                        return value.lstrip(b"\x00").decode("latin-1", "replace")
                    f.seek(4, os.SEEK_CUR)  # CRC
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return None
    return None


def _is_torch_zip(path: Path) -> bool:
    """A zip archive as torch.save writes it: `<name>/data.pkl` inside."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def describe_file(path: PathLike) -> str:
    """What a regular file holds, by content: one of the names `_refused_content` compares, e.g.
    "JPEG image", "PNG image", "PNG figure drawn by Matplotlib", "JSON file", "safetensors file",
    "PyTorch file", "ONNX graph", "zip archive", "text file", "file of unknown kind"."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except OSError as e:
        return f"file that cannot be read ({e.strerror or e})"
    if not head:
        return "empty file"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        software = _png_software(path) or ""
        return "PNG figure drawn by Matplotlib" if software.lower().startswith("matplotlib") else "PNG image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP image"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "PyTorch file" if _is_torch_zip(path) else "zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "PyTorch file"  # a pickle, protocol 2-5: torch's legacy format
    if len(head) >= 10:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors file"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:2] == b"BM" and len(head) >= 14 and int.from_bytes(head[2:6], "little") == size:
        return "BMP image"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON file"
    if len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x80:
        return "ONNX graph"  # protobuf ModelProto: field 1 (ir_version, a small varint) first
    try:
        head.decode("utf-8")
        return "text file"
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3:  # a multi-byte character cut by the sniff window
            return "text file"
    return "file of unknown kind"


# The descriptions (`describe_file`) each output kind may replace.
_ACCEPTS = {
    "png": ("PNG figure drawn by Matplotlib",),
    "json": ("JSON file",),
    "safetensors": ("safetensors file",),
    "torch": ("PyTorch file",),
    "onnx": ("ONNX graph",),
}


def _refused_content(real: Path, st: os.stat_result, kind: str) -> str | None:
    """Why the existing `real` may not be replaced by an output of `kind` (what it is), or None."""
    if kind == "hf":
        if not stat.S_ISDIR(st.st_mode):
            return describe_file(real) if stat.S_ISREG(st.st_mode) else "special file"
        try:
            names = sorted(n for n in os.listdir(real) if not n.startswith("."))  # .DS_Store, our temp files
        except OSError as e:
            return f"folder that cannot be listed ({e.strerror or e})"
        if not names or any(n in HF_FOLDER_FILES or n.endswith((".safetensors", ".bin", ".index.json")) for n in names):
            return None
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"folder with no config.json or model files in it ({len(names)} entries: {shown})"
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None  # an empty file (e.g. `touch out.json`): nothing to lose
    found = describe_file(real)
    return None if found in _ACCEPTS[kind] else found


def _refuse_unkeepable_owner(path: PathLike, what: str, st: os.stat_result) -> None:
    """Refuse to replace a file whose owner and group `atomic_file` could not give its replacement."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return
    if st.st_uid == os.geteuid() and (st.st_gid == os.getegid() or st.st_gid in os.getgroups()):
        return
    raise OutputRefusedError(
        f"{what} {path}: belongs to uid {st.st_uid} gid {st.st_gid}; a replacement "
        f"written by uid {os.geteuid()} could not keep that owner, so it is left as it is"
    )


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(path: PathLike, folder: PathLike) -> str | None:
    """`path` below `folder` as a relative path (by the names as given, or after symlinks), else None."""
    for p, d in ((os.path.abspath(path), os.path.abspath(folder)), (os.path.realpath(path), os.path.realpath(folder))):
        rel = os.path.relpath(p, d)
        if rel != "." and not rel.startswith(".." + os.sep) and rel != ".." and not os.path.isabs(rel):
            return rel
    return None


def _refuse_inputs(
    path: PathLike,
    what: str,
    inputs: Iterable[tuple[str, PathLike | None]],
    image_folders: Iterable[tuple[str, PathLike | None, int]],
) -> None:
    """The inputs check of `check_output`."""
    for option, given in inputs:
        if given is not None and _same_file(path, given):
            label = f"{option} {given}" if os.fspath(given) != os.fspath(path) else option
            raise OutputRefusedError(
                f"{what} {path}: is also an input of this command ({label}); refusing to "
                f"replace it (did a shell glob put an input here?)"
            )
    folders = [(option, folder, depth) for option, folder, depth in image_folders if folder is not None]
    if not folders or not os.path.isfile(path):
        return
    for option, folder, depth in folders:
        rel = _inside(path, folder) if os.path.isdir(folder) else None
        if rel is None:
            continue
        parts = rel.split(os.sep)
        if (
            len(parts) >= depth
            and not any(p.startswith(".") for p in parts)
            and parts[-1].lower().endswith(IMG_EXTENSIONS)
        ):
            raise OutputRefusedError(
                f"{what} {path}: is an image this command reads from {option} {folder}; "
                f"refusing to replace it (did a shell glob put an input here?)"
            )


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


def _keep_owner_and_mode(tmp: Path, target: Path, path: PathLike) -> None:
    """Give `tmp` what `target` has now, where it is a regular file or folder about to be replaced: its
    owner and group (os.chown, first: it clears set-id bits) and its mode (st_mode & 0o7777); else the
    mode a new file or folder gets (0o666 / 0o777 less the umask). Raises CheckpointError where the owner
    cannot be kept (not root, someone else's file): the caller then replaces nothing."""
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    is_dir = tmp.is_dir()
    if st is None or not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())
        return
    own = os.stat(tmp)
    if (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.chown(tmp, st.st_uid, st.st_gid)
        except OSError as e:
            raise CheckpointError(
                f"cannot replace {path}: it belongs to uid {st.st_uid} gid {st.st_gid}, which "
                f"its replacement cannot keep ({e.strerror or e}); the previous one is "
                f"unchanged"
            ) from None
    os.chmod(tmp, stat.S_IMODE(st.st_mode))


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """A unique temp name beside `path` for the block to write to (by name: an exporter, a saver).

    When the block ends without an error the file is fsynced and renamed onto `path`; else it is removed
    and `path` is left untouched. A symlink at `path` stays: its target is replaced. A file it replaces
    keeps its owner, group and mode (CheckpointError, nothing replaced, where the owner cannot be kept);
    a new file gets the mode an ordinary new file gets (0o666 less the umask, not mkstemp's 0600).
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot save {path}: directory {directory} does not exist")
    fd, name = tempfile.mkstemp(dir=directory, prefix=_temp_name(target), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    leftover: Path | None = tmp  # the temp to remove on the way out; None once renamed onto `target`
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _keep_owner_and_mode(tmp, target, path)
        os.replace(tmp, target)
        leftover = None
        _fsync_dir(directory)
    finally:
        if leftover is not None:
            leftover.unlink(missing_ok=True)


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
        raise CheckpointError(
            f"could not save {path}: {_write_cause(e)}; the previous file (if any) is unchanged"
        ) from e


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
        _keep_owner_and_mode(tmp, path, path)  # an (empty) folder it replaces keeps its owner and mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_cache_dir() -> Path:
    """swinv2's cache (exported graphs, downloaded shards): `$SWINV2_CACHE`, else `$XDG_CACHE_HOME/swinv2`,
    else `~/.cache/swinv2`."""
    if os.environ.get("SWINV2_CACHE"):
        return Path(os.environ["SWINV2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swinv2"
