"""Pretrained weights by name: one record per (variant, tag), fetched through `huggingface_hub`.

A record says which file holds the weights, in which format, for which classes, with the official
top-1, and where the official release file lives for a manual download. The identifiers were read,
not derived, from (checked when written; see `SOURCES`):

  * timm 1.0.31 `timm/models/swin_transformer_v2.py` `default_cfgs`: the keys ``NAME.TAG``, each with
    ``hf_hub_id='timm/'`` (timm completes it to the repo ``timm/NAME.TAG``) and the official release
    URL; the repo pages list ``model.safetensors`` and ``pytorch_model.bin`` (timm's own key layout);
  * the Hugging Face model list of ``swinv2`` models: the twelve ``microsoft/swinv2-*`` repos that
    transformers' `Swinv2ForImageClassification` reads (``config.json`` + ``pytorch_model.bin``);
  * microsoft/Swin-Transformer `MODELHUB.md`: the GitHub release files ``swinv2_*.pth`` and top-1.

No SHA-256 or exact byte size is published beside these files (the hub pages show rounded sizes),
so `HubFile.sha256` / `.size` are None; after every download the file is checked against the
SHA-256 the hub itself sends as the ETag of an LFS file, and against `sha256` where a record has one.

Downloads go through `huggingface_hub.hf_hub_download`: its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply; a transfer cut off is resumed with an HTTP range
request within the call (from the last 10 MB chunk written). Between calls nothing partial is kept:
huggingface_hub 2.4 (tested here) downloads into a per-process temporary file that it deletes on
failure (its PR #4228; 0.x versions resumed a shared ``.incomplete`` file instead), so a call that
gives up leaves nothing under the final name and the next one starts over. A file in the cache is
used without any network access.

A process killed while downloading does leave its temporary file, `blobs/<etag>.<8 hex>.incomplete`
(`<etag>.incomplete` from huggingface_hub 0.x), often 0 bytes; it is never read (only a finished
download is renamed to the blob). `fetch` removes those of the blob it is about to download or has
found in the cache, when huggingface_hub's own lock for that blob (``.locks/<repo>/<etag>.lock``,
held by every download of it) can be taken at once and the file was last written `STALE_AFTER_S`
ago: a download in progress, in this process or another, is never touched; the age also spares one
on a filesystem where that lock is not honoured (huggingface_hub allows for those). Nothing else in
the cache is removed. Sources of a record are tried in order (timm's safetensors first);
only "no such repo / file" moves on to the next one. This module imports `registry` only;
`huggingface_hub` is imported when a file is looked up, so `import swinv2` stays fast.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SwinV2Error, UnknownNameError
from .registry import ALIASES, VARIANTS, get_variant

log = logging.getLogger(__name__)

SOURCES = {
    "timm": "timm 1.0.31 timm/models/swin_transformer_v2.py default_cfgs (hf_hub_id 'timm/' + NAME.TAG); files "
            "as listed on huggingface.co/timm/swinv2_tiny_window8_256.ms_in1k",
    "hf": "huggingface.co/models?other=swinv2 (the microsoft/swinv2-* repos; files config.json, pytorch_model.bin)",
    "official": "github.com/microsoft/Swin-Transformer MODELHUB.md (SwinV2 table, GitHub release v2.0.0)",
}
OFFICIAL_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v2.0.0/"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")
STALE_AFTER_S = 60.0  # a download's temporary file unwritten for this long, with its lock free, is left by a kill


class WeightsUnavailableError(SwinV2Error, OSError):
    """The weights are not in the local cache and cannot be downloaded; the message says what to do."""


class WeightsDownloadError(SwinV2Error, OSError):
    """A download failed part-way (connection cut, size check); nothing partial is kept."""


class WeightsHashError(SwinV2Error, OSError):
    """A downloaded or cached file whose SHA-256 is not the published one; it has been removed."""


@dataclass(frozen=True)
class HubFile:
    """One file on the hub that holds a record's weights."""

    repo: str
    filename: str
    format: str                 # the `convert.py` source format of its keys: "timm" | "hf"
    sha256: str | None = None   # published SHA-256 (None: not published; the hub's ETag is checked instead)
    size: int | None = None     # published size in bytes (None: not published)

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}"


@dataclass(frozen=True)
class WeightsRecord:
    """Pretrained weights for `variant`, addressed as ``variant.tag``."""

    variant: str                # the registry variant the record is listed under
    tag: str
    arch: str                   # the variant the file was trained as (another one for a 22k start point)
    classes: str                # "imagenet-1k" | "imagenet-22k" (21841 classes, the official order)
    num_classes: int
    top1: float | None          # official ImageNet-1k val top-1 of these weights in `variant` (None: not 1k)
    files: tuple[HubFile, ...]  # tried in this order
    official_url: str           # the official release file, for a manual download (not on the hub)

    @property
    def spec(self) -> str:
        return f"{self.variant}.{self.tag}"


# (timm key NAME.TAG, microsoft repo, official release file) as read from the sources above.
_READ = (
    ("swinv2_tiny_window8_256.ms_in1k", "microsoft/swinv2-tiny-patch4-window8-256",
     "swinv2_tiny_patch4_window8_256.pth"),
    ("swinv2_tiny_window16_256.ms_in1k", "microsoft/swinv2-tiny-patch4-window16-256",
     "swinv2_tiny_patch4_window16_256.pth"),
    ("swinv2_small_window8_256.ms_in1k", "microsoft/swinv2-small-patch4-window8-256",
     "swinv2_small_patch4_window8_256.pth"),
    ("swinv2_small_window16_256.ms_in1k", "microsoft/swinv2-small-patch4-window16-256",
     "swinv2_small_patch4_window16_256.pth"),
    ("swinv2_base_window8_256.ms_in1k", "microsoft/swinv2-base-patch4-window8-256",
     "swinv2_base_patch4_window8_256.pth"),
    ("swinv2_base_window16_256.ms_in1k", "microsoft/swinv2-base-patch4-window16-256",
     "swinv2_base_patch4_window16_256.pth"),
    ("swinv2_base_window12_192.ms_in22k", "microsoft/swinv2-base-patch4-window12-192-22k",
     "swinv2_base_patch4_window12_192_22k.pth"),
    ("swinv2_large_window12_192.ms_in22k", "microsoft/swinv2-large-patch4-window12-192-22k",
     "swinv2_large_patch4_window12_192_22k.pth"),
    ("swinv2_base_window12to16_192to256.ms_in22k_ft_in1k",
     "microsoft/swinv2-base-patch4-window12to16-192to256-22kto1k-ft",
     "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth"),
    ("swinv2_base_window12to24_192to384.ms_in22k_ft_in1k",
     "microsoft/swinv2-base-patch4-window12to24-192to384-22kto1k-ft",
     "swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth"),
    ("swinv2_large_window12to16_192to256.ms_in22k_ft_in1k",
     "microsoft/swinv2-large-patch4-window12to16-192to256-22kto1k-ft",
     "swinv2_large_patch4_window12to16_192to256_22kto1k_ft.pth"),
    ("swinv2_large_window12to24_192to384.ms_in22k_ft_in1k",
     "microsoft/swinv2-large-patch4-window12to24-192to384-22kto1k-ft",
     "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.pth"),
)
# The official 22k -> 1k fine-tunes start from these 22k checkpoints (MODELHUB.md's "22K model" column).
_STARTS_FROM = {
    "swinv2_base_window12to16_192to256": "swinv2_base_window12_192",
    "swinv2_base_window12to24_192to384": "swinv2_base_window12_192",
    "swinv2_large_window12to16_192to256": "swinv2_large_window12_192",
    "swinv2_large_window12to24_192to384": "swinv2_large_window12_192",
}


def _build_records() -> dict[str, tuple[WeightsRecord, ...]]:
    native: dict[str, WeightsRecord] = {}
    for key, ms_repo, official in _READ:
        variant, tag = key.split(".")
        v = get_variant(variant)
        native[variant] = WeightsRecord(
            variant=variant, tag=tag, arch=variant,
            classes="imagenet-22k" if v.config.num_classes == 21841 else "imagenet-1k",
            num_classes=v.config.num_classes, top1=v.top1,
            files=(HubFile(f"timm/{key}", "model.safetensors", "timm"),
                   HubFile(f"timm/{key}", "pytorch_model.bin", "timm"),
                   HubFile(ms_repo, "pytorch_model.bin", "hf")),
            official_url=OFFICIAL_RELEASE + official)
    out = {name: (rec,) for name, rec in native.items()}
    for variant, start in _STARTS_FROM.items():  # the 22k start point, loaded into the fine-tune architecture
        src = native[start]
        out[variant] += (WeightsRecord(variant=variant, tag=src.tag, arch=start, classes=src.classes,
                                       num_classes=src.num_classes, top1=None, files=src.files,
                                       official_url=src.official_url),)
    return out


RECORDS: dict[str, tuple[WeightsRecord, ...]] = _build_records()


# --------------------------------------------------------------------------- names


def records(name: str) -> tuple[WeightsRecord, ...]:
    """The weights records of variant `name` (an alias works), the default one first; () for none."""
    return RECORDS.get(get_variant(name).name, ())


def all_records() -> list[WeightsRecord]:
    return [r for recs in RECORDS.values() for r in recs]


def get_record(name: str, tag: str | None = None) -> WeightsRecord:
    """The record `name.tag` (the default tag of `name` when `tag` is None); a KeyError listing the
    valid tags otherwise."""
    variant = get_variant(name).name
    recs = RECORDS.get(variant)
    if not recs:
        raise UnknownNameError(f"{variant} has no pretrained weights; variants with weights: {', '.join(RECORDS)}")
    if tag is None:
        return recs[0]
    for r in recs:
        if r.tag == tag:
            return r
    raise UnknownNameError(f"unknown weights tag {tag!r} for {variant}; valid: {', '.join(r.tag for r in recs)}")


def looks_like_name(text: str) -> bool:
    """True when `text` reads as ``NAME[.TAG]`` rather than a file path: no folder part, no weights
    suffix, NAME shaped like a variant name (every one, alias included, is ``swinv2_...``)."""
    if "/" in text or os.sep in text or text.lower().endswith(WEIGHT_SUFFIXES):
        return False
    return bool(re.fullmatch(r"swinv2_\w+", text.split(".", 1)[0]))


def lookup(spec: str) -> WeightsRecord:
    """The record for ``NAME`` (its default tag) or ``NAME.TAG``; KeyError naming what is wrong."""
    name, _, tag = spec.partition(".")
    return get_record(name, tag or None)


def resolve_pretrained(name: str, pretrained: bool | str) -> WeightsRecord:
    """What `create_model(name, pretrained=...)` loads: True -> the default tag of `name`; a tag of
    `name`; or ``OTHER[.TAG]``, another variant's weights (window / resolution transfer on loading)."""
    if pretrained is True:
        return get_record(name)
    if not isinstance(pretrained, str) or not pretrained:
        raise TypeError(f"pretrained must be True or a tag / NAME.TAG string, got {pretrained!r}")
    if "." in pretrained or pretrained in VARIANTS or pretrained in ALIASES:
        return lookup(pretrained)
    return get_record(name, pretrained)


# --------------------------------------------------------------------------- cache and download


def _hf():
    import huggingface_hub
    from huggingface_hub import constants

    return huggingface_hub, constants


def cache_dir() -> Path:
    """Where huggingface_hub keeps downloads (``HF_HUB_CACHE``, default ``HF_HOME/hub``)."""
    return Path(_hf()[1].HF_HUB_CACHE)


def cached_file(record: WeightsRecord) -> tuple[Path, HubFile] | None:
    """(path, source) of the first of the record's files already in the cache; None if none is."""
    hf, _ = _hf()
    for f in record.files:
        p = hf.try_to_load_from_cache(f.repo, f.filename)
        if isinstance(p, str):
            return Path(p), f
    return None


def is_cached(record: WeightsRecord) -> bool:
    return cached_file(record) is not None


def _manual(record: WeightsRecord) -> str:
    return (f"on a machine with network run `swinv2 download {record.spec}` and copy its Hugging Face cache "
            f"into {cache_dir()} (HF_HUB_CACHE / HF_HOME), or fetch {record.official_url} yourself and pass "
            f"--weights FILE.pth --model {record.variant}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, source: HubFile, *, downloaded: bool) -> None:
    """Check the SHA-256 against the record's (always) and the hub's LFS ETag (after a download:
    the blob is named by it); on a mismatch remove the file from the cache and raise."""
    blob = Path(os.path.realpath(path))
    expected, whose = source.sha256, "the record's"
    if expected is None and downloaded and _SHA256.fullmatch(blob.name):
        expected, whose = blob.name, "the hub's (ETag)"
    if expected is None:
        return
    actual = _sha256(path)
    if actual == expected:
        return
    for p in {path, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    raise WeightsHashError(f"{source}: SHA-256 {actual[:16]}... is not {whose} {expected[:16]}...; the file was "
                           f"refused and removed from the cache (run the command again to download it afresh)")


def fetch(record: WeightsRecord | str) -> Path:
    """The local path of the record's weights: from the cache, else downloaded (first source that
    exists). Raises WeightsUnavailableError (offline / hub unreachable, with the manual alternative),
    WeightsDownloadError (transfer failed, nothing kept) or WeightsHashError (file removed)."""
    rec = lookup(record) if isinstance(record, str) else record
    hit = cached_file(rec)
    if hit is not None:
        _verify(*hit, downloaded=False)
        log.info("%s: using the cached %s", rec.spec, hit[0])
        blob = Path(os.path.realpath(hit[0]))
        if blob.parent.name == "blobs":
            remove_stale_partials(blob.parent.parent, blob.name)
        return hit[0]
    hf, constants = _hf()
    from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    not_there = (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)  # gated: a repo error
    tried = ", ".join(map(str, rec.files))
    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailableError(f"{rec.spec} is not in the cache {cache_dir()} and HF_HUB_OFFLINE is set "
                                      f"(looked for {tried}); {_manual(rec)}")

    def unreachable(source: HubFile, e: BaseException) -> WeightsUnavailableError:
        return WeightsUnavailableError(f"{rec.spec}: cannot reach {constants.ENDPOINT} to download {source} and it "
                                       f"is not in the cache {cache_dir()} ({_first_line(e)}); {_manual(rec)}")

    missing = []
    for source in rec.files:
        # One HEAD first, without huggingface_hub's back-off: no network fails at once, in one line.
        try:
            meta = hf.get_hf_file_metadata(hf.hf_hub_url(source.repo, source.filename))
        except not_there as e:
            missing.append(f"{source} ({type(e).__name__})")
            continue
        except HfHubHTTPError:
            meta = None  # the hub answered, with an error (e.g. 503): hf_hub_download retries it
        except Exception as e:  # DNS, connection refused, timeout, proxy
            raise unreachable(source, e) from None
        if meta is not None and meta.etag:  # what an earlier download of this blob, killed, left
            repo_folder = constants.REPO_ID_SEPARATOR.join(["models", *source.repo.split("/")])
            remove_stale_partials(cache_dir() / repo_folder, meta.etag)
        log.info("%s: downloading %s from %s", rec.spec, source, constants.ENDPOINT)
        try:
            path = Path(hf.hf_hub_download(source.repo, source.filename))
        except LocalEntryNotFoundError as e:  # the connection went away after the HEAD
            raise unreachable(source, e) from None
        except not_there as e:
            missing.append(f"{source} ({type(e).__name__})")
            continue
        except Exception as e:  # httpx errors after the retries, size checks, disk full
            raise WeightsDownloadError(f"{rec.spec}: download of {source} failed: {_first_line(e)}; nothing partial "
                                       f"was kept, run the command again to retry") from None
        _verify(path, source, downloaded=True)
        return path
    raise WeightsUnavailableError(f"{rec.spec}: none of its files is on {constants.ENDPOINT}: {'; '.join(missing)}; "
                                  f"{_manual(rec)}")


def remove_stale_partials(repo_folder: Path, etag: str) -> list[Path]:
    """Remove what killed downloads of the blob `etag` left in `repo_folder/blobs` (see the module
    docstring for when a file counts as left); returns what was removed. Never raises."""
    blobs = repo_folder / "blobs"
    pattern = re.compile(re.escape(etag) + r"(\.[0-9a-f]{8})?\.incomplete")
    try:
        partials = [p for p in blobs.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    if not partials:
        return []
    from filelock import FileLock, Timeout  # huggingface_hub's own lock, on the same file

    lock = FileLock(cache_dir() / ".locks" / repo_folder.name / f"{etag}.lock", mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.debug("%s: a download of it is in progress; its partial files are left alone", etag)
        return []
    except Exception as e:  # no flock here (huggingface_hub falls back to a soft lock), a read-only cache
        log.debug("%s: cannot take its lock (%s); its partial files are left alone", etag, e)
        return []
    removed = []
    try:
        now = time.time()
        for p in partials:
            try:
                st = p.stat()
                if now - st.st_mtime < STALE_AFTER_S or not p.is_file():
                    continue
                p.unlink()
            except OSError as e:
                log.debug("could not remove %s: %s", p, e)
                continue
            log.warning("removed %s (%d bytes), left by an interrupted download", p, st.st_size)
            removed.append(p)
    finally:
        lock.release()
    return removed


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
