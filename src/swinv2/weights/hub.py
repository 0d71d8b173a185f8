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
so `HubFile.sha256` / `.size` are None. What the hub publishes for each file is checked instead
(`_verify`): after a download, against the hub's file listing (``/api/models/REPO/paths-info``,
`HfApi.get_paths_info`: the LFS SHA-256 and size of an LFS file, the git blob id and size of a file
kept in git) and against the ETag the blob is named by (huggingface_hub takes it from the file's
metadata, ``X-Linked-Etag`` or ``ETag``: the same LFS SHA-256 or git blob id); a cached file is
rechecked against its blob name before its first use in a process (the result is remembered per
file, size and mtime, so it is hashed once). A record's own `sha256` / `size` are checked always.
A file that does not match is removed from the cache (blob and snapshot link) and the call fails in
one line (`WeightsHashError`: the download was corrupted, run again). Only a file that nothing
published names (a mirror whose ETag is no hash and which has no file listing) goes unchecked, with
a warning after its download.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SwinV2Error, UnknownNameError
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
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
STALE_AFTER_S = 60.0  # a download's temporary file unwritten for this long, with its lock free, is left by a kill


class WeightsUnavailableError(SwinV2Error, OSError):
    """The weights are not in the local cache and cannot be downloaded; the message says what to do.

    `problem` is what went wrong and `record` the weights asked for: `in_config_words` restates the
    advice for a training config, whose keys differ from eval's and predict's options."""

    def __init__(
        self, problem: str, record: WeightsRecord | None = None, from_config: tuple[str, str] | None = None
    ) -> None:
        super().__init__(problem if record is None else f"{problem}; {_manual(record, from_config)}")
        self.problem, self.record = problem, record

    def in_config_words(self, from_config: tuple[str, str]) -> WeightsUnavailableError:
        """The same fault, its advice in config keys; `from_config`: see `_manual`."""
        return WeightsUnavailableError(self.problem, self.record, from_config)


class WeightsDownloadError(SwinV2Error, OSError):
    """A download failed part-way (connection cut, size check); nothing partial is kept."""


class WeightsHashError(SwinV2Error, OSError):
    """A downloaded or cached file whose SHA-256 is not the published one; it has been removed."""


@dataclass(frozen=True)
class HubFile:
    """One file on the hub that holds a record's weights."""

    repo: str
    filename: str
    format: str  # the `convert.py` source format of its keys: "timm" | "hf"
    sha256: str | None = None  # published SHA-256 (None: not published; the hub's ETag is checked instead)
    size: int | None = None  # published size in bytes (None: not published)

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}"


@dataclass(frozen=True)
class WeightsRecord:
    """Pretrained weights for `variant`, addressed as ``variant.tag``."""

    variant: str  # the registry variant the record is listed under
    tag: str
    arch: str  # the variant the file was trained as (another one for a 22k start point)
    classes: str  # "imagenet-1k" | "imagenet-22k" (21841 classes, the official order)
    num_classes: int
    top1: float | None  # official ImageNet-1k val top-1 of these weights in `variant` (None: not 1k)
    files: tuple[HubFile, ...]  # tried in this order
    official_url: str  # the official release file, for a manual download (not on the hub)

    @property
    def spec(self) -> str:
        return f"{self.variant}.{self.tag}"


# (timm key NAME.TAG, microsoft repo, official release file) as read from the sources above.
_READ = (
    (
        "swinv2_tiny_window8_256.ms_in1k",
        "microsoft/swinv2-tiny-patch4-window8-256",
        "swinv2_tiny_patch4_window8_256.pth",
    ),
    (
        "swinv2_tiny_window16_256.ms_in1k",
        "microsoft/swinv2-tiny-patch4-window16-256",
        "swinv2_tiny_patch4_window16_256.pth",
    ),
    (
        "swinv2_small_window8_256.ms_in1k",
        "microsoft/swinv2-small-patch4-window8-256",
        "swinv2_small_patch4_window8_256.pth",
    ),
    (
        "swinv2_small_window16_256.ms_in1k",
        "microsoft/swinv2-small-patch4-window16-256",
        "swinv2_small_patch4_window16_256.pth",
    ),
    (
        "swinv2_base_window8_256.ms_in1k",
        "microsoft/swinv2-base-patch4-window8-256",
        "swinv2_base_patch4_window8_256.pth",
    ),
    (
        "swinv2_base_window16_256.ms_in1k",
        "microsoft/swinv2-base-patch4-window16-256",
        "swinv2_base_patch4_window16_256.pth",
    ),
    (
        "swinv2_base_window12_192.ms_in22k",
        "microsoft/swinv2-base-patch4-window12-192-22k",
        "swinv2_base_patch4_window12_192_22k.pth",
    ),
    (
        "swinv2_large_window12_192.ms_in22k",
        "microsoft/swinv2-large-patch4-window12-192-22k",
        "swinv2_large_patch4_window12_192_22k.pth",
    ),
    (
        "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k",
        "microsoft/swinv2-base-patch4-window12to16-192to256-22kto1k-ft",
        "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth",
    ),
    (
        "swinv2_base_window12to24_192to384.ms_in22k_ft_in1k",
        "microsoft/swinv2-base-patch4-window12to24-192to384-22kto1k-ft",
        "swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth",
    ),
    (
        "swinv2_large_window12to16_192to256.ms_in22k_ft_in1k",
        "microsoft/swinv2-large-patch4-window12to16-192to256-22kto1k-ft",
        "swinv2_large_patch4_window12to16_192to256_22kto1k_ft.pth",
    ),
    (
        "swinv2_large_window12to24_192to384.ms_in22k_ft_in1k",
        "microsoft/swinv2-large-patch4-window12to24-192to384-22kto1k-ft",
        "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.pth",
    ),
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
            variant=variant,
            tag=tag,
            arch=variant,
            classes="imagenet-22k" if v.config.num_classes == 21841 else "imagenet-1k",
            num_classes=v.config.num_classes,
            top1=v.top1,
            files=(
                HubFile(f"timm/{key}", "model.safetensors", "timm"),
                HubFile(f"timm/{key}", "pytorch_model.bin", "timm"),
                HubFile(ms_repo, "pytorch_model.bin", "hf"),
            ),
            official_url=OFFICIAL_RELEASE + official,
        )
    out: dict[str, tuple[WeightsRecord, ...]] = {name: (rec,) for name, rec in native.items()}
    for variant, start in _STARTS_FROM.items():  # the 22k start point, loaded into the fine-tune architecture
        src = native[start]
        out[variant] += (
            WeightsRecord(
                variant=variant,
                tag=src.tag,
                arch=start,
                classes=src.classes,
                num_classes=src.num_classes,
                top1=None,
                files=src.files,
                official_url=src.official_url,
            ),
        )
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


def _manual(record: WeightsRecord, from_config: tuple[str, str] | None = None) -> str:
    """What to do without the hub, in the words of the command that asked: eval / predict / export
    options, or config keys where a training config asked (`from_config`: the dotted key that set
    pretrained, e.g. "model.pretrained", and where it was set, e.g. the recipe file)."""
    elsewhere = (
        f"on a machine with network run `swinv2 download {record.spec}` and copy its Hugging Face cache "
        f"into {cache_dir()} (HF_HUB_CACHE / HF_HOME), or fetch {record.official_url} yourself and "
    )
    if from_config is None:
        return elsewhere + f"pass --weights FILE.pth --model {record.variant}"
    key, set_by = from_config
    section = key.rpartition(".")[0]
    return elsewhere + (
        f"train from it with {section}.pretrained=false {section}.weights=FILE.pth ({key} was set by {set_by})"
    )


@dataclass(frozen=True)
class _Digest:
    """A digest a file must have, and whose word it is."""

    algo: str  # "sha256", or "git-sha1": git's blob id, sha1(b"blob SIZE\0" + content)
    hexdigest: str
    size: int | None  # bytes, where known
    whose: str


_ALGO_NAMES = {"sha256": "SHA-256", "git-sha1": "git blob id"}
_verified: set[tuple] = set()  # (blob path, dev, inode, size, mtime_ns, algo, digest) checked in this process


def _published(
    source: HubFile, blob_name: str, listed: _Digest | None = None, size: int | None = None
) -> list[_Digest]:
    """The digests a file of `source` stored as blob `blob_name` must have: the record's, the hub's
    file listing's (`listed`, after a download), and its blob name: huggingface_hub names a blob by the
    hub's ETag, the LFS SHA-256 of an LFS file or the git blob id of a file kept in git (`size`: the
    size the hub announced with it)."""
    out = []
    if source.sha256 is not None:
        out.append(_Digest("sha256", source.sha256, source.size, "the record's"))
    if listed is not None:
        out.append(listed)
    if _SHA256.fullmatch(blob_name):
        out.append(_Digest("sha256", blob_name, size, "the hub's (its ETag)"))
    elif _GIT_SHA1.fullmatch(blob_name):
        out.append(_Digest("git-sha1", blob_name, size, "the hub's (its ETag)"))
    return out


def _listed(source: HubFile, revision: str | None) -> _Digest | None:
    """What the hub's file listing publishes for `source` at `revision`; None where it does not answer
    (a mirror without the API, a network fault: the ETag is still checked)."""
    hf, constants = _hf()
    try:
        (info,) = hf.HfApi(endpoint=constants.ENDPOINT).get_paths_info(
            source.repo, [source.filename], revision=revision
        )
        if info.lfs is not None:
            return _Digest("sha256", info.lfs.sha256, info.lfs.size, "the hub's file listing (LFS SHA-256)")
        return _Digest("git-sha1", info.blob_id, info.size, "the hub's file listing (git blob id)")
    except Exception as e:  # no listing: nothing to add, never a reason to refuse the file
        log.debug("%s: no file listing from %s (%s)", source, constants.ENDPOINT, _first_line(e))
        return None


def _digests(path: Path, algos: set[str], size: int) -> dict[str, str]:
    """Each of `algos` of the file at `path` (`size` bytes), in one read."""
    hashes = {a: hashlib.sha256() if a == "sha256" else hashlib.sha1(b"blob %d\0" % size) for a in algos}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _verify(path: Path, source: HubFile, published: list[_Digest], *, downloaded: bool) -> None:
    """Check the file at `path` (a snapshot link to its blob) against every digest in `published`, its
    size first; on a mismatch remove it from the cache and raise WeightsHashError. A file that passed
    is not hashed again in this process while its size and mtime stay the same."""
    blob = Path(os.path.realpath(path))
    if not published:
        if downloaded:
            log.warning(
                "%s: downloaded but not verified: the hub published no hash for it (its ETag %s is no "
                "SHA-256 or git blob id, and it has no file listing)",
                source,
                blob.name,
            )
        return
    st = blob.stat()
    seen = (str(blob), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    todo = [d for d in published if (*seen, d.algo, d.hexdigest) not in _verified]
    if not todo:
        return
    problem = next(
        (
            f"it is {st.st_size} bytes, not the {d.size} {d.whose} says"
            for d in todo
            if d.size is not None and d.size != st.st_size
        ),
        None,
    )
    if problem is None:
        actual = _digests(blob, {d.algo for d in todo}, st.st_size)
        problem = next(
            (
                f"its {_ALGO_NAMES[d.algo]} {actual[d.algo][:16]}... is not {d.whose} {d.hexdigest[:16]}..."
                for d in todo
                if actual[d.algo] != d.hexdigest
            ),
            None,
        )
    if problem is None:
        _verified.update((*seen, d.algo, d.hexdigest) for d in todo)
        return
    for p in {path, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    what = "the download was corrupted" if downloaded else f"the cached file {blob} is corrupted"
    raise WeightsHashError(
        f"{source}: {what}: {problem}; it was removed from the cache {cache_dir()}: run the "
        f"command again to download it afresh"
    )


def _on_hub(
    rec: WeightsRecord, missing: list[str], from_config: tuple[str, str] | None
) -> Iterator[tuple[HubFile, Any]]:
    """Each of the record's files the hub has, in order, with its metadata (None where the hub answered
    with an error that a download retries), by one HEAD each without huggingface_hub's back-off, so
    that no network fails at once, in one line; the files it does not have are added to `missing`.
    Raises WeightsUnavailableError offline and where the hub cannot be reached (`from_config`: see
    `_manual`)."""
    hf, constants = _hf()
    from huggingface_hub.utils import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailableError(
            f"{rec.spec} is not in the cache {cache_dir()} and HF_HUB_OFFLINE is set "
            f"(looked for {', '.join(map(str, rec.files))})",
            rec,
            from_config,
        )
    for source in rec.files:
        try:
            meta = hf.get_hf_file_metadata(hf.hf_hub_url(source.repo, source.filename))
        except _not_there() as e:
            missing.append(f"{source} ({type(e).__name__})")
            continue
        except HfHubHTTPError:
            meta = None  # the hub answered, with an error (e.g. 503): hf_hub_download retries it
        except Exception as e:  # DNS, connection refused, timeout, proxy
            raise _unreachable(rec, source, e, from_config) from None
        yield source, meta


def _not_there() -> tuple[type[BaseException], ...]:
    """huggingface_hub's errors for "no such repo / file" (a gated repo is a repo error): only these
    move on to a record's next file."""
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    return EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError


def _unreachable(
    rec: WeightsRecord, source: HubFile, e: BaseException, from_config: tuple[str, str] | None
) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{rec.spec}: cannot reach {_hf()[1].ENDPOINT} to download {source} and it is "
        f"not in the cache {cache_dir()} ({_first_line(e)})",
        rec,
        from_config,
    )


def _none_there(rec: WeightsRecord, missing: list[str], from_config: tuple[str, str] | None) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{rec.spec}: none of its files is on {_hf()[1].ENDPOINT}: {'; '.join(missing)}", rec, from_config
    )


def _verify_cached(path: Path, source: HubFile) -> None:
    """`_verify` a file found in the cache against what its blob name (and the record) publish."""
    _verify(path, source, _published(source, Path(os.path.realpath(path)).name), downloaded=False)


def check_available(record: WeightsRecord | str, *, from_config: tuple[str, str] | None = None) -> None:
    """Raise now what `fetch` would for a file in the cache that does not match (WeightsHashError) or
    for one that is not there while the hub is offline, unreachable or has none of the record's files
    (WeightsUnavailableError). Downloads nothing (a HEAD per file), so a command can say so before it
    builds anything; `from_config`: see `_manual`."""
    rec = lookup(record) if isinstance(record, str) else record
    hit = cached_file(rec)
    if hit is not None:
        _verify_cached(*hit)  # remembered: fetch does not hash it again
        return
    missing: list[str] = []
    for _ in _on_hub(rec, missing, from_config):
        return
    raise _none_there(rec, missing, from_config)


def fetch(record: WeightsRecord | str) -> Path:
    """The local path of the record's weights: from the cache (rechecked, `_verify`), else downloaded
    (first source that exists) and verified. Raises WeightsUnavailableError (offline / hub unreachable,
    with the manual alternative), WeightsDownloadError (transfer failed, nothing kept) or
    WeightsHashError (the file did not match; removed)."""
    rec = lookup(record) if isinstance(record, str) else record
    hit = cached_file(rec)
    if hit is not None:
        path, source = hit
        _verify_cached(path, source)
        log.info("%s: using the cached %s", rec.spec, path)
        blob = Path(os.path.realpath(path))
        if blob.parent.name == "blobs":
            remove_stale_partials(blob.parent.parent, blob.name)
        return path
    hf, constants = _hf()
    from huggingface_hub.utils import LocalEntryNotFoundError

    missing: list[str] = []
    for source, meta in _on_hub(rec, missing, None):
        if meta is not None and meta.etag:  # what an earlier download of this blob, killed, left
            repo_folder = constants.REPO_ID_SEPARATOR.join(["models", *source.repo.split("/")])
            remove_stale_partials(cache_dir() / repo_folder, meta.etag)
        log.info("%s: downloading %s from %s", rec.spec, source, constants.ENDPOINT)
        try:
            path = Path(hf.hf_hub_download(source.repo, source.filename))
        except LocalEntryNotFoundError as e:  # the connection went away after the HEAD
            raise _unreachable(rec, source, e, None) from None
        except _not_there() as e:
            missing.append(f"{source} ({type(e).__name__})")
            continue
        except Exception as e:  # httpx errors after the retries, size checks, disk full
            raise WeightsDownloadError(
                f"{rec.spec}: download of {source} failed: {_first_line(e)}; nothing partial "
                f"was kept, run the command again to retry"
            ) from None
        listed = _listed(source, meta.commit_hash if meta is not None else None)
        size = meta.size if meta is not None else None
        _verify(path, source, _published(source, Path(os.path.realpath(path)).name, listed, size), downloaded=True)
        return path
    raise _none_there(rec, missing, None)


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
