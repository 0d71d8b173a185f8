"""Where shard files live: a local folder, or an S3-compatible object store (`s3://bucket/prefix`).

`Store.fetch(name, size, sha256)` gives the local path of a file that matches the manifest:
* a local folder: the file itself, after its size is checked (always) and its SHA-256 (once per file
  version on this machine: the verdict is remembered under the cache, keyed by the file's path, size,
  modification time and inode, so N loader workers on M ranks do not hash the same terabytes N x M times);
* S3 (boto3; the endpoint from the standard `AWS_ENDPOINT_URL`, credentials from the usual chain): the
  object downloaded once per machine into the cache (`<cache>/shards/<sha256(url)[:16]>/`), under a
  file lock so that concurrent workers and ranks wait for one download, into a temp file renamed into
  place only after its SHA-256 matched; timeouts and 5xx answers are retried `retries` times with
  backoff, then one `DataError` names the object. `cache_limit` bounds the bytes kept (least recently
  used files go first).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DataError, InputError
from ..outputs import default_cache_dir

try:
    import fcntl
except ImportError:  # not POSIX: downloads are not shared between processes
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1 << 20
MANIFEST_LIMIT = 256 << 20  # a manifest is a list of shards; anything larger is not one


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a lock file beside the cached file) between processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


class Store:
    """A shard set's files. `where(name)` is what messages say; `read_small` reads the manifest."""

    def __init__(self, cache_dir: str | os.PathLike | None) -> None:
        self.cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def where(self, name: str) -> str:
        raise NotImplementedError

    def read_small(self, name: str) -> bytes:
        raise NotImplementedError

    def fetch(self, name: str, size: int, sha256: str, *, verify_again: bool = False) -> Path:
        raise NotImplementedError

    def _verified_marker(self, path: Path, st: os.stat_result) -> Path:
        key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
        return self.cache / "verified" / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _check(self, path: Path, name: str, size: int, sha256: str, verify_again: bool) -> None:
        """Size always; SHA-256 unless this version of the file was verified before."""
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"{self.where(name)}: shard not found (listed in the manifest)") from None
        except OSError as e:
            raise DataError(f"{self.where(name)}: cannot read ({e.strerror or type(e).__name__})") from None
        if st.st_size != size:
            raise DataError(
                f"{self.where(name)}: {st.st_size} bytes, the manifest says {size}: truncated or changed since packing"
            )
        marker = self._verified_marker(path, st)
        if not verify_again and marker.is_file() and marker.read_text() == sha256:
            return
        try:
            actual = file_sha256(path)
        except OSError as e:
            raise DataError(f"{self.where(name)}: cannot read ({e.strerror or type(e).__name__})") from None
        if actual != sha256:
            raise DataError(f"{self.where(name)}: its SHA-256 is not the manifest's: the shard changed since packing")
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
            tmp.write_text(sha256)
            os.replace(tmp, marker)
        except OSError:  # a read-only cache: verify again next time
            pass


class LocalStore(Store):
    def __init__(self, root: Path, cache_dir: str | os.PathLike | None) -> None:
        super().__init__(cache_dir)
        self.root = root

    def where(self, name: str) -> str:
        return str(self.root / name)

    def read_small(self, name: str) -> bytes:
        path = self.root / name
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder not found: {self.root}")
        try:
            if path.stat().st_size > MANIFEST_LIMIT:
                raise DataError(f"{path}: larger than {MANIFEST_LIMIT >> 20} MiB, not a shard manifest")
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: not found (a shard set holds {name}, written by `swinv2 data pack`)") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None

    def fetch(self, name: str, size: int, sha256: str, *, verify_again: bool = False) -> Path:
        path = self.root / name
        self._check(path, name, size, sha256, verify_again)
        return path


class S3Store(Store):
    """`s3://bucket/prefix` through boto3 (an optional dependency: `pip install 'swinv2[s3]'`)."""

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike | None,
        cache_limit: int | None,
        retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 0.5,
    ) -> None:
        super().__init__(cache_dir)
        self.url = url.rstrip("/")
        bucket, _, prefix = self.url[len("s3://") :].partition("/")
        if not bucket:
            raise InputError(f"{url}: no bucket (expected s3://bucket/prefix)")
        self.bucket, self.prefix = bucket, prefix
        self.retries, self.timeout, self.backoff, self.cache_limit = max(0, retries), timeout, backoff, cache_limit
        self.local = self.cache / "shards" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self._client: Any = None
        self._pid = -1

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():  # a client is not shared with forked workers
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise InputError(f"{self.url}: reading shards from S3 needs boto3: pip install 'swinv2[s3]'") from None
            config = Config(
                retries={"total_max_attempts": 1, "mode": "standard"},  # the retries are ours (`_retrying`)
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
            )
            self._client, self._pid = boto3.session.Session().client("s3", config=config), os.getpid()
        return self._client

    def _retrying(self, name: str, action: Callable[[], T]) -> T:
        """`action()`, retried on timeouts, dropped connections and 5xx answers; 4xx at once."""
        from botocore.exceptions import BotoCoreError, ClientError

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                return action()
            except ClientError as e:
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                code = e.response.get("Error", {}).get("Code", "")
                if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
                    raise NotInStore(f"{self.where(name)}: not in the store ({code or status})") from None
                if status == 403 or code in ("AccessDenied", "403"):
                    raise DataError(f"{self.where(name)}: access denied ({code or status})") from None
                last = f"{status} {code}".strip()
            except (BotoCoreError, OSError, _ShortRead) as e:
                last = f"{type(e).__name__}: {e}"
            log.warning("%s: %s (attempt %d of %d)", self.where(name), last, attempt + 1, self.retries + 1)
        raise DataError(f"{self.where(name)}: unreadable after {self.retries + 1} attempts (last: {last})")

    def read_small(self, name: str) -> bytes:
        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
            data = body.read(MANIFEST_LIMIT + 1)
            if len(data) > MANIFEST_LIMIT:
                raise DataError(f"{self.where(name)}: larger than {MANIFEST_LIMIT >> 20} MiB, not a shard manifest")
            return data

        return self._retrying(name, get)

    def fetch(self, name: str, size: int, sha256: str, *, verify_again: bool = False) -> Path:
        path = self.local / name
        with _locked(self.local / f".{name}.lock"):
            if path.is_file():
                try:
                    self._check(path, name, size, sha256, verify_again)
                    os.utime(path)  # recently used: the last to be evicted
                    return path
                except DataError as e:  # a cached copy gone bad: fetch it again
                    log.warning("%s; fetching it again", e)
                    path.unlink(missing_ok=True)
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")

            def download() -> None:
                h, n = hashlib.sha256(), 0
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
                with open(tmp, "wb") as f:
                    while chunk := body.read(CHUNK):
                        h.update(chunk)
                        f.write(chunk)
                        n += len(chunk)
                if n != size or h.hexdigest() != sha256:
                    raise _ShortRead(
                        f"got {n} bytes{'' if n != size else ' of another content'}, the manifest says {size}"
                    )

            try:
                self._retrying(name, download)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._check(path, name, size, sha256, verify_again=False)  # records the verdict
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        if not self.cache_limit:
            return
        stats = []
        for p in self.local.glob("shard-*"):
            try:  # another process may evict the same file at the same time
                stats.append((p, p.stat()))
            except OSError:
                continue
        total = sum(st.st_size for _, st in stats)
        for p, st in sorted(stats, key=lambda item: item[1].st_mtime):
            if total <= self.cache_limit:
                break
            if p != keep:
                total -= st.st_size
                p.unlink(missing_ok=True)  # a process reading it keeps its open file


class NotInStore(DataError):
    """The object or its bucket does not exist (404)."""


class _ShortRead(Exception):
    """A download that ended early or with other bytes than the manifest's: retried."""


def open_store(
    root: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
) -> Store:
    if root.startswith("s3://"):
        return S3Store(root, cache_dir, cache_limit, retries, timeout)
    if "://" in root:
        raise InputError(f"{root}: unsupported storage (shards are read from a folder or s3://bucket/prefix)")
    return LocalStore(Path(root), cache_dir)
