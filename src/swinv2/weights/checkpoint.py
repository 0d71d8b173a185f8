"""The only module that reads or writes files of weights or training state.

Two kinds of files:
  * training state (`save_training_state` / `load_training_state` / `find_resumable`): one torch
    file per save holding tensors and plain Python data only, written atomically (temp file, fsync,
    `os.replace`, fsync of the directory), so a kill or a full disk never leaves a torn file under
    the final name, and always read with `torch.load(weights_only=True)`.
  * weights (`read_state_dict`, `load_weights`, `save_weights`, `load_model`, `write_weights`, and
    `create_model`, which builds a registry variant and loads its weights by path or hub name): our
    self-describing `.safetensors` (config, class names and eval preprocessing in the metadata),
    training checkpoints (which describe themselves as well) and every foreign format `convert.py`
    maps (official `.pth`, timm, Hugging Face folders, torchvision, SwinV1).

Files of weights and training state get the mode of any new file (0o666 less the umask).

Never `weights_only=False`: a pickle that needs any global beyond torch's allow-list is refused
with one line naming that global, before anything in it runs.

Nothing a file says is trusted before it is checked, in one line naming the file and the key: the
architecture, class names and preprocessing a file describes (types, ranges, and the architecture
against the file's own tensor shapes, before a model is built from it), non-finite weights, the shard
names of a Hugging Face index (plain file names in its folder), and the keys of a training state.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import convert, hub
from .. import units
from ..config import MAX_CLASSES, MAX_IMG_SIZE, MAX_WINDOW
from ..errors import CheckpointError, InputError, UnreadableFileError, UnsafeCheckpointError
from ..model.transformer import SwinTransformerV2, SwinV2Config
from ..outputs import atomic_write
from ..preprocess import EvalPreprocess
from .registry import ALIASES, ModelInfo, config_with, default_preprocess, get_variant, model_config, model_info
from ..model.windows import pair

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- safe torch files

_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")
# The other messages of torch's weights-only unpickler that mean "this pickle wants to run code".
_UNSAFE_PREFIXES = ("Trying to call reduce", "Can only build", "Can only create new object")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# Lines of torch's weights-only errors that are advice, not the cause (it suggests weights_only=False).
_ADVICE = re.compile(r"weights_only|Weights only load failed|Please file an issue|Check the documentation", re.I)


def _cause(e: BaseException) -> str:
    """The first line of `e` that says what is wrong, without torch's advice around it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not _ADVICE.search(ln)]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _refused(path: Path, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path}: refused to load: the pickle needs the global {name!r}, which is not "
                                 f"allowed for a weights-only checkpoint (nothing was executed)")


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
                if op.name in ("GLOBAL", "INST"):
                    module, name = arg.split(" ", 1)
                    found.append(f"{_PY2_MODULES.get(module, module)}.{name}")
                    pushed.append(None)
                elif op.name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and all(isinstance(v, str) for v in pushed[-2:]):
                        found.append(f"{pushed[-2]}.{pushed[-1]}")
                    pushed.append(None)
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
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
        allowed = set(_get_allowed_globals()) | {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                                                 for g in torch.serialization.get_safe_globals()}
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
        raise CheckpointError(f"{path}: not a readable torch checkpoint (unsupported or corrupt pickle): "
                              f"{_cause(e)}") from None
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


# --------------------------------------------------------------------------- training state

TRAINING_STATE_FORMAT = "swinv2.training_state"  # `engine.STATE_FORMAT`: the tag of a state `fit` writes

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
        f"weights_only=True")


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
        _check_training_state(state, path)
    return state


# What a training state of `engine.fit` holds (`Trainer.state_dict`), each key with the types it may have;
# "ema" and "scaler" are None where the run has none.
_STATE_KEYS: dict[str, tuple[type, ...]] = {
    "model": (dict,), "ema": (dict, type(None)), "optimizer": (dict,), "scheduler": (dict,),
    "scaler": (dict, type(None)), "progress": (dict,), "sampler": (dict,), "history": (list,), "best": (list,),
    "classes": (list,), "preprocess": (dict,)}


def _check_training_state(state: Mapping[str, Any], path: PathLike) -> None:
    """CheckpointError naming `path` and the key if a tagged training state lacks one that resuming or
    reading its weights needs, or holds the wrong type there: a file that loads but was cut down or
    edited is as unusable as a torn one (`find_resumable` skips it with a warning; an explicit
    `--resume` of it is one line)."""
    for key, types in _STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{path}: training state without {key!r} (damaged or edited); not usable")
        if not isinstance(state[key], types):
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{path}: training state {key!r} holds a {type(state[key]).__name__}, not a "
                                  f"{wanted} (damaged or edited); not usable")
    if not all(isinstance(c, str) for c in state["classes"]):
        raise CheckpointError(f"{path}: training state 'classes' holds {_shown(state['classes'])}, not class names "
                              f"(strings); not usable")


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
        raise UnreadableFileError(f"{directory}: cannot be read: {e.strerror or e}; stopped without changing "
                                  f"anything") from None
    best: tuple[tuple[int, bool, str], Path] | None = None
    for p in (directory / n for n in names if fnmatch.fnmatchcase(n, pattern) and not n.startswith(".")):
        if not p.is_file():
            continue
        try:
            state = load_training_state(p)
        except UnreadableFileError as e:
            raise UnreadableFileError(f"{e}; stopped without changing anything (a checkpoint that cannot be "
                                      f"read is not skipped: fix its permissions or mount, or move it away)") from None
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


# --------------------------------------------------------------------------- reading weights

SAFETENSORS_FORMAT = {"format": "pt"}  # the key transformers and timm check in safetensors metadata


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError: torn header, wrong bytes
        raise CheckpointError(f"{path}: not a readable .safetensors file: {_describe(e).splitlines()[0]}") from None


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a `.safetensors` file (empty for other files and folders)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file: {_describe(e).splitlines()[0]}") from None


# The files of a Hugging Face folder `write_weights` writes, in the order written: config.json, which
# describes the others, last. One id per write is stored in model.safetensors' metadata (UNIT_KEY) and
# in config.json's "swinv2" block ("unit_id"), so a folder killed between its files is refused on read.
HF_FILES = ("model.safetensors", "preprocessor_config.json", "config.json")
UNIT_KEY = "swinv2.unit_id"


def _read_hf_config(path: Path) -> dict[str, Any]:
    """config.json of the Hugging Face folder `path`, parsed (CheckpointError naming it if it is not JSON)."""
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path / 'config.json'}: JSON nested too deeply") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path / 'config.json'}: holds a JSON {type(hf).__name__}, not an object")
    return hf


def _read_hf_safetensors(path: Path, folder: Path, config: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The tensors of the folder's model.safetensors, read through one open file with its metadata, and
    checked to be of the same write as `config` (its config.json): where the weights carry our unit id
    (we wrote them), config.json must carry the same. Weights without one (transformers wrote them,
    e.g. `save_pretrained` of a model loaded from our folder) go with any config.json: our writer
    writes the weights first, so a write of ours cut short always leaves weights with the new id."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError: torn header, wrong bytes
        raise CheckpointError(f"{path}: not a readable .safetensors file: {_describe(e).splitlines()[0]}") from None
    unit = meta.get(UNIT_KEY)
    if unit is not None and config is None:
        raise units.torn(folder, f"model.safetensors (write {unit}) has no config.json beside it")
    if unit is not None:
        ours = config.get("swinv2")
        described = ours.get("unit_id") if isinstance(ours, dict) else None
        if described != unit:
            said = f"write {described}" if described else "no write id: an older config.json"
            raise units.torn(folder, f"model.safetensors (write {unit}) and config.json ({said}) come from "
                                     f"different writes")
    return tensors


def _read_hf_folder(path: Path, config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder; `config`: its config.json as already read (else read here),
    which our model.safetensors must match (see `_read_hf_safetensors`)."""
    if config is None and (path / "config.json").is_file():
        config = _read_hf_config(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            if name == "model.safetensors":
                return _read_hf_safetensors(path / name, path, config)
            return _read_tensors(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded: {"weight_map": {key: shard file}}
            out: dict[str, torch.Tensor] = {}
            for shard in _shards(index):
                out.update(_read_tensors(path / shard))
            return out
    raise FileNotFoundError(f"{path}: folder holds no model.safetensors or pytorch_model.bin")


def _shards(index: Path) -> list[str]:
    """The shard files a sharded folder's index names (`weight_map` values), each a plain file name in
    the folder: a path (``/etc/passwd``, ``../../x``) would read a file outside it, so it is refused."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError, RecursionError):  # not JSON (or not UTF-8), not an object, too deep
        raise CheckpointError(f"{index}: not a JSON object {{\"weight_map\": {{key: shard file}}}}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is {_shown(weight_map)}, not an object {{key: shard file}}")
    for key, shard in weight_map.items():
        if not (isinstance(shard, str) and shard not in ("", ".", "..") and "/" not in shard and "\\" not in shard
                and not os.path.isabs(shard) and "\0" not in shard):
            raise CheckpointError(f"{index}: weight_map entry {_shown(key)}: {_shown(shard, 300)} is not a plain file "
                                  f"name in the folder; refused (shards are read from the index's own folder only)")
    return sorted(set(weight_map.values()))


def _shown(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: a file's content quoted in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.pt`/`.bin`/`.safetensors` file or a Hugging Face folder, unwrapped.

    Torch files are read with `weights_only=True` only (see `torch_load`); ``model`` / ``state_dict``
    containers and a DDP ``module.`` prefix are removed, non-tensor entries dropped. Non-finite
    weights are refused (`_check_finite`).
    """
    return _check_finite(_read_tensors(path), path)


def _check_finite(sd: dict[str, torch.Tensor], origin: PathLike | str) -> dict[str, torch.Tensor]:
    """`sd`, if every floating-point tensor in it is finite; else CheckpointError naming the first few
    that are not, and how many. A NaN weight makes every output NaN ("loss nan"), an inf head one class
    for every image: never a number to report. Derived buffers are skipped (never loaded)."""
    bad = [k for k, t in sd.items() if (t.is_floating_point() or t.is_complex()) and
           k.rsplit(".", 1)[-1] not in convert.DERIVED_KEYS and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{origin}: non-finite weights (NaN or inf) in {len(bad)} tensor{'s' * (len(bad) != 1)}"
                              f": {_abbreviate(bad, 5)}; refused (from a diverged training run?)")
    return sd


def _read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """`read_state_dict` without the finiteness check (its callers check once, on the whole file)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _tensors_of(torch_load(path), path)


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The unwrapped tensors of what a torch file held (see `read_state_dict`)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    sd = convert.unwrap(obj)
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    return sd


# --------------------------------------------------------------------------- loading into a model


@dataclass
class LoadReport:
    """What `load_weights` did, key by key (native names)."""

    src: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # in the model, not in the weights
    unexpected: list[str] = field(default_factory=list)     # in the weights, not in the model
    mismatched: list[str] = field(default_factory=list)     # "key: weights (a, b) vs model (c, d)"
    reshaped: list[str] = field(default_factory=list)       # transformed to fit, e.g. 22k -> 1k head rows
    reinitialised: list[str] = field(default_factory=list)  # deliberately left at the model's init
    dropped: list[str] = field(default_factory=list)        # "key (why)": in the weights, deliberately unused

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"format: {self.src}; loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched", "reshaped", "reinitialised", "dropped"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): {_abbreviate(keys, 12)}")
        return "\n".join(lines)


def _abbreviate(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


@lru_cache(maxsize=1)
def imagenet_22k_to_1k() -> list[int]:
    """Row of each ImageNet-1k class in the official 21841-class head (official map22kto1k.txt)."""
    text = resources.files("swinv2.weights").joinpath("map22kto1k.txt").read_text()
    return [int(line) for line in text.split()]


def _fit_head(sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport, *,
              new_head: bool = True) -> None:
    """Make the checkpoint's classifier fit the model's, in place: map 22k -> 1k, drop or (`new_head`: a
    fine-tune, a new head on purpose) reinitialise. Without `new_head` a head that does not fit stays as
    it is, for the key check to report as missing or mis-shaped."""
    head = [k for k in ("head.weight", "head.bias") if k in target]
    src_w = sd.get("head.weight")
    if not head:  # num_classes=0: a feature extractor
        for k in [k for k in ("head.weight", "head.bias") if k in sd]:
            report.dropped.append(f"{k} (the model has no head)")
            del sd[k]
        return
    n_model = target["head.weight"].shape[0]
    if src_w is not None and src_w.shape == target["head.weight"].shape:
        return
    if src_w is not None and src_w.shape[1:] == target["head.weight"].shape[1:] and src_w.shape[0] == 21841 \
            and n_model == 1000:
        sd["head.weight"], bias = convert.map_head_rows(src_w, sd.get("head.bias"), imagenet_22k_to_1k())
        if bias is not None:
            sd["head.bias"] = bias
        report.reshaped += [f"{k} (21841 -> 1000 rows, official 22k->1k map)" for k in ("head.weight", "head.bias")
                            if k in sd]
        log.info("classifier head mapped from 21841 to 1000 ImageNet-1k classes (official map)")
        return
    if not new_head:
        return
    what = "no classifier head" if src_w is None else f"a {src_w.shape[0]}-class head"
    log.warning("the weights have %s; the model's %d-class head keeps its fresh initialisation", what, n_model)
    for k in ("head.weight", "head.bias"):
        sd.pop(k, None)
    report.reinitialised += head


def load_weights(model: nn.Module, path_or_state_dict: PathLike | Mapping[str, Any], *, src: str = "auto",
                 strict: bool = True) -> LoadReport:
    """Load weights of any supported format into a `SwinTransformerV2`; returns what happened.

    Window and resolution changes need nothing (no derived table is stored); a 21841-class head
    becomes 1000 classes through the official map; any other class-count change keeps the model's
    fresh head with a warning; a `num_classes=0` model drops the head. SwinV1 weights leave the
    V2-only parameters at their init (listed as reinitialised). With `strict`, any missing,
    unexpected or mis-shaped key raises ValueError listing them, before the model is touched.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw, origin = path_or_state_dict, "state dict"
    else:
        raw, origin = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    conv = _to_native(raw, src, origin)
    report, usable = _match(conv, model.state_dict(), origin, strict=strict)
    _apply(model, usable, report)
    _detected(conv, src)
    return report


def _match(conv: convert.Conversion, target: Mapping[str, torch.Tensor], origin: str, *, strict: bool,
           new_head: bool = True) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """How converted weights fit a model whose state dict is `target`: the report, and the tensors to
    load. With `strict`, a missing, unexpected or mis-shaped key (or integers for a floating-point
    parameter) raises InputError listing them, before the model is touched. `new_head`: see `_fit_head`."""
    sd = dict(conv.state_dict)
    report = LoadReport(src=conv.src, dropped=[f"{k} ({why})" for k, why in conv.dropped.items()])
    _fit_head(sd, target, report, new_head=new_head)
    for key, t in target.items():
        if key not in sd:
            if conv.reinitialised is not None and conv.reinitialised.search(key):
                report.reinitialised.append(key)
            elif key not in report.reinitialised:
                report.missing.append(key)
        elif sd[key].shape != t.shape:
            report.mismatched.append(f"{key}: weights {tuple(sd[key].shape)} vs model {tuple(t.shape)}")
        elif sd[key].is_floating_point() != t.is_floating_point():  # integers for weights: not a model's file
            report.mismatched.append(f"{key}: weights {sd[key].dtype} vs model {t.dtype}")
    report.unexpected = [k for k in sd if k not in target]
    if strict and not report.ok:
        parts = [f"{n} ({len(getattr(report, n))}): {_abbreviate(getattr(report, n))}"
                 for n in ("missing", "unexpected", "mismatched") if getattr(report, n)]
        raise InputError(f"{origin} ({conv.src} format) does not fit the model: " + "; ".join(parts))
    usable = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape
              and v.is_floating_point() == target[k].is_floating_point()}
    report.loaded = list(usable)
    return report, usable


def _apply(model: nn.Module, usable: Mapping[str, torch.Tensor], report: LoadReport) -> LoadReport:
    """Load the tensors `_match` found usable into `model`, and say what was left out."""
    model.load_state_dict(usable, strict=False)
    if report.reinitialised:
        log.info("left at their initialisation: %s", _abbreviate(report.reinitialised))
    if not report.ok:
        log.warning("weights loaded non-strictly: %s", str(report).replace("\n", "; "))
    return report


# --------------------------------------------------------------------------- self-describing weights


# Bounds of what a weights file may describe, checked before anything is built from it. Far above every
# variant (registry.py: SwinV2-G has embed_dim 512, 4 stages, 42 blocks in a stage, a 4096-wide last
# stage, CPB MLPs of 512), so no real file meets them; the tensors themselves then decide the rest
# (`_check_tensors`). Image and window sizes and class counts share the recipe schema's bounds (config.py).
_ARCH_RANGES = {"patch_size": (1, MAX_IMG_SIZE), "in_chans": (1, 64), "num_classes": (0, MAX_CLASSES),
                "embed_dim": (1, 8192), "cpb_hidden_dim": (1, 8192), "extra_norm_every_n_blocks": (0, 256)}
_MAX_WIDTH = 65_536      # channels of the last stage, embed_dim * 2 ** (stages - 1)
_MAX_BLOCKS = 256        # blocks in all stages together
_MAX_MLP_RATIO = 64.0
_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")  # torchvision's
# The JSON type each field of a described config must have: checked before `SwinV2Config` converts it
# (it would take "22" for depths (2, 2), or 2.7 for 2).
_CONFIG_KINDS = {"img_size": "size", "patch_size": "int", "in_chans": "int", "num_classes": "int", "embed_dim": "int",
                 "depths": "ints", "num_heads": "ints", "window_size": "windows", "pretrained_window_sizes": "windows",
                 "mlp_ratio": "number", "qkv_bias": "bool", "drop_rate": "number", "attn_drop_rate": "number",
                 "drop_path_rate": "number", "patch_norm": "bool", "cpb_hidden_dim": "int",
                 "extra_norm_every_n_blocks": "int"}
_KIND_TEXT = {"int": "an integer", "number": "a finite number", "bool": "true or false", "size": "an integer or "
              "[height, width]", "ints": f"a list of at most {convert.MAX_STAGES} integers", "windows": "an integer "
              "or a list (one per stage) of integers or [height, width] pairs"}


def _is_kind(v: Any, kind: str) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    seq = isinstance(v, (list, tuple)) and len(v) <= convert.MAX_STAGES
    if kind == "int":
        return is_int
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "size":
        return is_int or (seq and len(v) == 2 and all(_is_kind(x, "int") for x in v))
    if kind == "ints":
        return seq and all(_is_kind(x, "int") for x in v)
    return is_int or (seq and all(_is_kind(x, "size") for x in v))  # windows


def _config_from(d: Any, source: str, keys: Mapping[str, str] | None = None) -> SwinV2Config:
    """The `SwinV2Config` a file describes (`d`: its JSON), checked: known fields of the right types,
    a valid architecture, within `_ARCH_RANGES`; else CheckpointError naming `source` (the file and
    where in it) and the key (`keys`: what the file calls each field, e.g. config.json's names)."""
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{source}: a JSON {type(d).__name__}, not an object of SwinV2Config fields")
    unknown = sorted(map(str, set(d) - set(_CONFIG_KINDS)))
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {', '.join(map(_shown, unknown[:5]))}; known: "
                              f"{', '.join(_CONFIG_KINDS)}")
    for field_name, value in d.items():
        if not _is_kind(value, _CONFIG_KINDS[field_name]):
            key = (keys or {}).get(field_name, field_name)
            raise CheckpointError(f"{source}: {key}: {_shown(value)} is not {_KIND_TEXT[_CONFIG_KINDS[field_name]]}")
    # The bounds the config's own checks would state without the key: said here with it.
    for name, (low, high) in _ARCH_RANGES.items():
        if name in d and not low <= d[name] <= high:
            _out_of_range(source, keys, name, d[name], f"{low} to {high}")
    for name, low in (("window_size", 1), ("pretrained_window_sizes", 0)):
        sizes = d.get(name, ())
        if not all(low <= w <= MAX_WINDOW for w in _flat_ints(sizes)):
            _out_of_range(source, keys, name, sizes, f"{low} to {MAX_WINDOW}")
    try:
        cfg = SwinV2Config(**d)
    except (ValueError, TypeError, ArithmeticError) as e:  # a dim not divisible by its heads, 0 heads, ...
        raise CheckpointError(f"{source}: not a valid architecture: {e}") from None
    _check_ranges(cfg, source, keys)
    return cfg


def _flat_ints(v: Any) -> list[int]:
    """The integers in a size or window spec (an int, or lists of them, nested once)."""
    return [v] if isinstance(v, int) else [x for item in v for x in _flat_ints(item)]


def _out_of_range(source: str, keys: Mapping[str, str] | None, name: str, value: Any, allowed: str) -> None:
    raise CheckpointError(f"{source}: {(keys or {}).get(name, name)}: {_shown(value)} is out of range ({allowed}); "
                          f"refused before building anything from it")


def _check_ranges(cfg: SwinV2Config, source: str, keys: Mapping[str, str] | None = None) -> None:
    """CheckpointError naming `source` and the key if a field of `cfg` is outside what any real model has."""
    def refuse(name: str, value: Any, allowed: str) -> None:
        _out_of_range(source, keys, name, value, allowed)

    for name, (low, high) in _ARCH_RANGES.items():
        if not low <= getattr(cfg, name) <= high:
            refuse(name, getattr(cfg, name), f"{low} to {high}")
    if not all(1 <= s <= MAX_IMG_SIZE for s in cfg.img_size):
        refuse("img_size", cfg.img_size, f"1 to {MAX_IMG_SIZE} px")
    if not 1 <= len(cfg.depths) <= convert.MAX_STAGES or min(cfg.depths) < 1 or sum(cfg.depths) > _MAX_BLOCKS:
        refuse("depths", cfg.depths, f"1 to {convert.MAX_STAGES} stages of at least 1 block, {_MAX_BLOCKS} blocks "
               f"in all")
    if cfg.num_features > _MAX_WIDTH:
        refuse("embed_dim", cfg.embed_dim, f"the last stage at most {_MAX_WIDTH} wide")
    if min(cfg.num_heads) < 1:
        refuse("num_heads", cfg.num_heads, "at least 1 per stage")
    if not all(1 <= w <= MAX_WINDOW for hw in cfg.stage_window_sizes for w in hw):
        refuse("window_size", cfg.window_size, f"1 to {MAX_WINDOW}")
    if not all(0 <= w <= MAX_WINDOW for p in cfg.pretrained_window_sizes for w in pair(p)):
        refuse("pretrained_window_sizes", cfg.pretrained_window_sizes, f"0 to {MAX_WINDOW}")
    if not 0 < cfg.mlp_ratio <= _MAX_MLP_RATIO:
        refuse("mlp_ratio", cfg.mlp_ratio, f"above 0, at most {_MAX_MLP_RATIO:g}")
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if not 0 <= getattr(cfg, name) <= 1:
            refuse(name, getattr(cfg, name), "0 to 1")


def _preprocess(d: Any, source: str) -> EvalPreprocess:
    """The `EvalPreprocess` a file describes (`d`: its `asdict`, where JSON gives lists for tuples),
    checked: a size in range, a crop fraction in (0, 1], a torchvision interpolation, three finite
    means and three finite positive stds (a zero std divides every pixel by zero: "nan%");
    CheckpointError naming `source` and the key otherwise."""
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{source}: a {type(d).__name__}, not an object of eval preprocessing settings")
    known = ("img_size", "crop_pct", "interpolation", "mean", "std")
    unknown = sorted(map(str, set(d) - set(known)))
    missing = [k for k in ("img_size", "crop_pct") if k not in d]
    if unknown or missing:
        what = f"unknown keys {', '.join(map(_shown, unknown[:5]))}" if unknown else f"no {' or '.join(missing)}"
        raise CheckpointError(f"{source}: {what}; its keys are {', '.join(known)}")

    def refuse(key: str, wanted: str) -> None:
        raise CheckpointError(f"{source}: {key}: {_shown(d[key])} is not {wanted}")

    size, crop = d["img_size"], d["crop_pct"]
    if not _is_kind(size, "int") or not 1 <= size <= MAX_IMG_SIZE:
        refuse("img_size", f"an image size from 1 to {MAX_IMG_SIZE} px")
    if not _is_kind(crop, "number") or not 0 < crop <= 1 or size / crop > 2 * MAX_IMG_SIZE:
        refuse("crop_pct", f"a fraction in (0, 1] that resizes to at most {2 * MAX_IMG_SIZE} px")
    if d.get("interpolation", "bicubic") not in _INTERPOLATIONS:
        refuse("interpolation", f"one of {', '.join(_INTERPOLATIONS)}")
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        v = d.get(key, (0.5,) * 3)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_kind(x, "number") and x > low for x in v)):
            refuse(key, "three finite numbers" + (" above 0" if key == "std" else ""))
    return EvalPreprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _class_names(value: Any, num_classes: int, source: str) -> list[str]:
    """Class names a file gives for its `num_classes`-class head: a list of that many strings."""
    if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise CheckpointError(f"{source}: {_shown(value)} is not a list of class names (strings)")
    if len(value) != num_classes:
        raise CheckpointError(f"{source}: {len(value)} class names for a {num_classes}-class model (its head); "
                              f"one name per class")
    return value


def _descriptions(model: nn.Module, class_names: Sequence[str] | None, preprocess: EvalPreprocess | None,
                  model_name: str | None) -> tuple[list[str] | None, EvalPreprocess, str | None]:
    """(class names, eval preprocessing, registry name) to write with `model`'s weights: the arguments,
    else what its weights said (`model_info`), else (preprocessing) the official rule for its size."""
    info = model_info(model)
    names = class_names if class_names is not None else info.class_names
    if names is not None and len(names) != model.config.num_classes:
        raise InputError(f"{len(names)} class names for a {model.config.num_classes}-class model")
    return (None if names is None else list(map(str, names))), preprocess or info.preprocess, model_name or info.model_name


def save_weights(model: SwinTransformerV2, path: PathLike, *, class_names: Sequence[str] | None = None,
                 preprocess: EvalPreprocess | None = None, model_name: str | None = None) -> None:
    """Write `model`'s weights to a self-describing `.safetensors` file, atomically.

    Metadata: "swinv2.config" (JSON of the config), "swinv2.class_names" (JSON list, if any),
    "swinv2.preprocess" (JSON of the eval transform) and "swinv2.model_name" (if any), so `load_model`
    and `swinv2 eval/predict --weights` need nothing else. `class_names` / `preprocess` /
    `model_name` default to the attributes `load_model` sets.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: weights are saved as .safetensors (got {path.suffix or 'no suffix'})")
    names, prep, model_name = _descriptions(model, class_names, preprocess, model_name)
    meta = {**SAFETENSORS_FORMAT, "swinv2.config": json.dumps(model.config.to_dict()),
            "swinv2.preprocess": json.dumps(asdict(prep))}
    if names is not None:
        meta["swinv2.class_names"] = json.dumps(names)
    if model_name:
        meta["swinv2.model_name"] = model_name
    _write_safetensors(path, model.state_dict(), meta)


def _write_safetensors(path: Path, sd: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


def resolve_weights(path: PathLike, name: str | None = None) -> tuple[Path, str | None]:
    """(local file, registry name) for a weights argument: an existing path as given; otherwise
    ``NAME[.TAG]`` of published weights (`swinv2.weights.hub`), fetched into the Hugging Face cache, with
    `name` defaulting to NAME (``..._192to256.ms_in22k``: the 22k weights in the 256 px model)."""
    if Path(path).exists() or not hub.looks_like_name(str(path)):
        return Path(path), name
    record = hub.lookup(str(path))
    return hub.fetch(record), name or record.variant


@dataclass
class _Weights:
    """A weights file read once: its tensors, and what it says about itself (None: nothing)."""

    state_dict: dict[str, torch.Tensor]
    config: SwinV2Config | None = None
    class_names: list[str] | None = None
    preprocess: EvalPreprocess | None = None
    model_name: str | None = None
    source: str = ""  # where the config was read ("W.safetensors: metadata swinv2.config"), for messages
    keys: Mapping[str, str] = field(default_factory=dict)  # what that file calls each config field


def _measured_weights(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights of a training state that its best metric measures, those `best.safetensors` holds:
    the EMA's under ``train.best_metric: val_ema_top1`` (or ``val_ema_loss``), else the model's."""
    config = state.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    metric = train.get("best_metric") if isinstance(train, dict) else None
    use_ema = isinstance(metric, str) and metric.startswith("val_ema_") and state.get("ema") is not None
    return state["ema"] if use_ema else state["model"]


def _read_weights(path: Path) -> _Weights:
    """Tensors and self-description of our `.safetensors` (metadata), a Hugging Face folder
    (config.json, with our ``swinv2`` record if we wrote it), a training state of `engine.fit`
    (model config, classes, eval preprocessing, model name) or any other weights file (none).
    What a file says about itself is checked as it is read (`_config_from`, `_preprocess`,
    `_class_names`), and every tensor is finite (`_check_finite`), before anything is built."""
    weights = _described(path)
    _check_finite(weights.state_dict, path)
    return weights


def _described(path: Path) -> _Weights:
    """`_read_weights` before the finiteness check. What the file says is checked before its tensors
    are read."""
    meta = read_metadata(path)
    if "swinv2.config" in meta:
        where = f"{path}: metadata"
        said = {k: _metadata_json(meta, k, where) for k in ("swinv2.config", "swinv2.class_names", "swinv2.preprocess")
                if k in meta}
        cfg = _config_from(said["swinv2.config"], f"{where} swinv2.config")
        names = said.get("swinv2.class_names")
        if names is not None:
            names = _class_names(names, cfg.num_classes, f"{where} swinv2.class_names")
        prep = said.get("swinv2.preprocess")
        if prep is not None:
            prep = _preprocess(prep, f"{where} swinv2.preprocess")
        return _Weights(_read_tensors(path), cfg, names, prep, meta.get("swinv2.model_name") or None,
                        f"{where} swinv2.config")
    if path.is_dir() and (path / "config.json").is_file():
        hf = _read_hf_config(path)  # read once: the weights are checked against this very config
        where = str(path / "config.json")
        try:
            kwargs, names = convert.hf_config_to_kwargs(hf, where)
        except InputError as e:
            raise CheckpointError(f"{where}: {e}") from None
        cfg = _config_from(kwargs, where, convert.HF_KEYS)
        ours = hf.get("swinv2") or {}
        model_name = ours.get("model_name")
        if model_name is not None and not isinstance(model_name, str):
            raise CheckpointError(f"{where}: swinv2.model_name: {_shown(model_name)} is not a string")
        prep = _preprocess(ours["preprocess"], f"{where} swinv2.preprocess") if "preprocess" in ours else None
        return _Weights(_read_hf_folder(path, hf), cfg, names, prep, model_name or None, where, convert.HF_KEYS)
    if path.is_dir() or path.suffix == ".safetensors":
        return _Weights(_read_tensors(path))
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == TRAINING_STATE_FORMAT and "model_config" in obj:
        _check_training_state(obj, path)
        cfg = _config_from(obj["model_config"], f"{path}: model_config")
        # A SimMIM pretraining's state names the folders' classes for a head it does not have.
        names = _class_names(obj["classes"], cfg.num_classes, f"{path}: classes") if cfg.num_classes else None
        prep = _preprocess(obj["preprocess"], f"{path}: preprocess")
        model_name = obj.get("model_name")
        return _Weights(_tensors_of(_measured_weights(obj), path), cfg, names, prep,
                        model_name if isinstance(model_name, str) and model_name else None, f"{path}: model_config")
    return _Weights(_tensors_of(obj, path))


def _metadata_json(meta: Mapping[str, str], key: str, where: str) -> Any:
    """The JSON value of our metadata entry `key`; CheckpointError naming it if it is not JSON."""
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(f"{where} {key}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where} {key}: JSON nested too deeply") from None


def load_model(path: PathLike, *, name: str | None = None, src: str = "auto", **overrides: Any) -> SwinTransformerV2:
    """Build a model from weights, in eval mode; what the weights say about it is in `model.info`.

    The architecture comes from our `.safetensors` metadata, a Hugging Face folder's config.json, a
    training checkpoint of `swinv2 train` (`checkpoints/last.pt`, `best_epochNNNN.pt`: its weights
    are those the run's best metric measures, the EMA's for ``val_ema_top1``, as in best.safetensors),
    or, for formats that do not describe it (official `.pth`, timm, torchvision), the registry
    `name`, whose class count then follows the weights' head (a 21841-class head for a 1000-class
    variant is mapped, see `load_weights`; weights without a head give an encoder, ``num_classes=0``).
    Weights that describe themselves take `name` only where it agrees with them (InputError
    otherwise: it would be ignored). `overrides` change the config (e.g. ``num_classes=10``,
    ``img_size=384``). The load is strict: the head is the weights' own, and a new one (fresh) only
    with a ``num_classes`` override that asks for another class count. The architecture is checked
    against the weights' tensor shapes before the model is built, and every tensor must be finite. `model.info` (a `registry.ModelInfo`) holds the
    `load_report`, the `class_names` (from the metadata; dropped with a num_classes override), the
    eval `preprocess` (the metadata's, else the registry record of `name`, else the official rule for
    the config's img_size, which any img_size override also selects) and the `model_name` (the
    metadata's or `name`). `path` may also name published weights, ``NAME[.TAG]``
    (see `resolve_weights`).
    """
    path, name = resolve_weights(path, name)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    return _build(_read_weights(path), path, name, src, overrides)


def _build(weights: _Weights, path: Path, name: str | None, src: str, overrides: dict[str, Any]) -> SwinTransformerV2:
    """`load_model` once the file is read: the architecture it describes (which `name`, if given, must
    agree with) or the registry's, checked against the tensors before the model is built; the head
    stays the weights' own unless an override changes the class count (a new head on purpose)."""
    conv = _to_native(weights.state_dict, src, path)  # once per load: the format is detected (and logged) once
    cfg, class_names, preprocess = weights.config, weights.class_names, weights.preprocess
    if cfg is not None:
        if name is not None:
            _check_same_model(weights, name, path)
        _check_tensors(cfg, conv.state_dict, weights.source, weights.keys, complete=True)
    elif name is not None:
        variant = get_variant(name)
        head = conv.state_dict.get("head.weight")
        rows = head.shape[0] if head is not None and head.ndim == 2 else 0
        cfg = variant.config
        if rows != cfg.num_classes and not (rows == 21841 and cfg.num_classes == 1000):
            cfg = replace(cfg, num_classes=rows)  # a fine-tuned checkpoint keeps its own classes; none: an encoder
        _check_tensors(cfg, conv.state_dict, f"{path}: --model {name}", complete=False)
        preprocess = variant.preprocess
    else:
        raise InputError(f"{path} does not describe its architecture; pass the registry model name "
                         f"(--model NAME, see `swinv2 models`)")
    new_cfg = config_with(cfg, **overrides)
    if new_cfg != cfg:
        _check_ranges(new_cfg, f"load_model({path}) overrides")
    if new_cfg.num_classes != cfg.num_classes:
        class_names = None
    if new_cfg.img_size != cfg.img_size:
        preprocess = None
    model = SwinTransformerV2(new_cfg)
    report, usable = _match(conv, model.state_dict(), str(path), strict=True,
                            new_head=new_cfg.num_classes != cfg.num_classes)
    _apply(model, usable, report)
    _detected(conv, src)
    model.info = ModelInfo(weights.model_name or name, class_names, preprocess or default_preprocess(new_cfg), report)
    return model.eval()


def _to_native(sd: Mapping[str, Any], src: str, origin: PathLike | str) -> convert.Conversion:
    """`convert.to_native`, its errors (a format it cannot tell, q/k/v that do not fit) naming `origin`.
    The format it detects is not logged here: `_detected` says it once the load succeeded, so a file
    refused is one line."""
    try:
        return convert.to_native(sd, convert.detect_format(convert.unwrap(sd)) if src == "auto" else src)
    except InputError as e:
        raise InputError(f"{origin}: {e}") from None


def _detected(conv: convert.Conversion, src: str) -> None:
    if src == "auto":
        log.info("weights format detected: %s", conv.src)


_BLOCK_KEY = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")


def _tensor_architecture(sd: Mapping[str, torch.Tensor]) -> list[tuple[str, Any, str]]:
    """What native tensors themselves show of the architecture: (field, value, the tensor that shows it)
    for the fields that set every parameter's size (the patch embedding, blocks per stage, heads, MLP and
    CPB widths, classes); a field whose tensor is absent is (field, None, that tensor)."""
    def tensor(key: str, ndim: int) -> torch.Tensor | None:
        t = sd.get(key)
        return t if isinstance(t, torch.Tensor) and t.ndim == ndim else None

    stages: dict[int, set[int]] = {}
    for k in sd:
        m = _BLOCK_KEY.match(k)
        if m:
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    found: list[tuple[str, Any, str]] = [("depths", tuple(len(stages[i]) for i in sorted(stages)),
                                          "layers.N.blocks.M tensors")]
    patch = tensor("patch_embed.proj.weight", 4)
    shown = f"patch_embed.proj.weight {tuple(patch.shape)}" if patch is not None else "patch_embed.proj.weight"
    found += [(name, None if patch is None else patch.shape[dim], shown)
              for name, dim in (("embed_dim", 0), ("in_chans", 1), ("patch_size", 2))]
    for name, key, ndim in (("num_heads", "attn.logit_scale", 3), ("mlp_hidden", "mlp.fc1.weight", 2)):
        ts = [tensor(f"layers.{i}.blocks.0.{key}", ndim) for i in sorted(stages)]
        value = tuple(t.shape[0] for t in ts) if ts and all(t is not None for t in ts) else None
        found.append((name, value, f"layers.N.blocks.0.{key}"))
    cpb = tensor("layers.0.blocks.0.attn.cpb_mlp.0.weight", 2)
    found.append(("cpb_hidden_dim", None if cpb is None else cpb.shape[0], "layers.0.blocks.0.attn.cpb_mlp.0.weight"))
    head = tensor("head.weight", 2)
    found.append(("num_classes", 0 if head is None else head.shape[0],
                  "no head.weight" if head is None else f"head.weight {tuple(head.shape)}"))
    return found


def _check_tensors(cfg: SwinV2Config, sd: Mapping[str, torch.Tensor], source: str,
                   keys: Mapping[str, str] | None = None, *, complete: bool) -> None:
    """CheckpointError if `cfg` (what `source` says) disagrees with the native tensors `sd` on a field
    that sets parameter sizes (`_tensor_architecture`): so the model built from `cfg` is no larger than
    the weights that fill it, and a lying file (embed_dim=30000 beside 24-wide tensors, a 10-class
    description of a 5-row head) is refused before anything is allocated. `complete`: the file
    describes itself, so every such tensor must be there to check (a description of the registry,
    `complete=False`, skips fields whose tensor the format lacks, e.g. SwinV1's heads)."""
    for name, value, tensor in _tensor_architecture(sd):
        said = tuple(int(cfg.embed_dim * 2**i * cfg.mlp_ratio) for i in range(len(cfg.depths))) \
            if name == "mlp_hidden" else getattr(cfg, name)
        if name == "num_classes" and not complete:
            continue  # the registry's class count follows the head (`_build`)
        key = (keys or {}).get(name, "mlp_ratio" if name == "mlp_hidden" else name)
        if value is None:
            if complete:
                raise CheckpointError(f"{source} describes {key}, but the weights have no {tensor} to check it "
                                      f"against: not a whole SwinV2 model")
            continue
        if value != said:
            if name == "mlp_hidden":
                shown = f"{key} {cfg.mlp_ratio} (MLP widths {list(said)})"
            elif name == "num_classes":
                shown = f"{said} classes ({key})"
            else:
                shown = f"{key} {_shown(list(said) if isinstance(said, tuple) else said)}"
            has = list(value) if isinstance(value, tuple) else value
            raise CheckpointError(f"{source} says {shown}, but the weights have {has} ({tensor}); refused before "
                                  f"building the model")


def _check_same_model(weights: _Weights, name: str, path: Path) -> None:
    """InputError unless the registry model `name` (--model) is the one self-describing weights say
    they are: the weights' architecture is what runs, so a --model that differs would be ignored."""
    variant = get_variant(name)
    said = weights.model_name
    if said is not None:
        if ALIASES.get(said, said) != variant.name:
            raise InputError(f"{path}: the weights say they are {said}, --model says {name}; drop --model (these "
                             f"weights describe their architecture) or pass weights of {name}")
        return
    for field_name in ("embed_dim", "depths", "num_heads", "patch_size", "in_chans"):
        ours, theirs = getattr(weights.config, field_name), getattr(variant.config, field_name)
        if ours != theirs:
            raise InputError(f"{path}: the weights describe {field_name}={_shown(ours)}, --model {name} has "
                             f"{_shown(theirs)}; drop --model (these weights describe their architecture) or pass "
                             f"weights of {name}")


# --------------------------------------------------------------------------- writing any format

WRITE_FORMATS = ("native", "official", "timm", "hf", "torchvision")


def create_model(name: str, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 window_size: int | tuple | None = None, pretrained_window_sizes: tuple | None = None,
                 drop_path_rate: float | None = None, weights: Any = None, pretrained: bool | str | None = None,
                 strict: bool = True, **kw: Any) -> SwinTransformerV2:
    """Build a registered variant, optionally overriding its config and loading `weights` or `pretrained`.

    `weights` is a path or a state dict in any supported format (see `swinv2.load_weights`).
    `pretrained` names published weights (see `swinv2.weights.hub`): True for the variant's default tag, a
    tag (``"ms_in22k"``) or ``"NAME.TAG"`` of another variant; they are downloaded once into the
    Hugging Face cache. Either way window and resolution changes transfer by construction, 21841 ->
    1000 heads go through the official map, and another class count keeps a fresh head (a warning).
    """
    if pretrained and weights is not None:
        raise InputError(f"create_model({name!r}): pass weights or pretrained, not both")
    cfg = model_config(name, num_classes=num_classes, img_size=img_size, window_size=window_size,
                       pretrained_window_sizes=pretrained_window_sizes, drop_path_rate=drop_path_rate, **kw)
    if pretrained:
        weights = hub.fetch(hub.resolve_pretrained(name, pretrained))
    model = SwinTransformerV2(cfg)
    if weights is not None:
        load_weights(model, weights, strict=strict)
    return model


def guess_write_format(path: PathLike) -> str:
    """native for .safetensors, official for .pth/.pt/.bin, hf for a folder (no suffix)."""
    suffix = Path(path).suffix
    if suffix == ".safetensors":
        return "native"
    if suffix in (".pth", ".pt", ".bin"):
        return "official"
    if not suffix:
        return "hf"
    raise InputError(f"{path}: cannot tell the format to write from {suffix!r}; pass --dst "
                     f"({', '.join(WRITE_FORMATS)})")


def write_weights(model: SwinTransformerV2, path: PathLike, fmt: str = "native", *,
                  class_names: Sequence[str] | None = None, preprocess: EvalPreprocess | None = None,
                  model_name: str | None = None) -> Path:
    """Write `model`'s weights as `fmt`; returns the path written.

    native: our `.safetensors` (see `save_weights`). official: ``{"model": state_dict}`` `.pth`
    (derived buffers omitted: the official loaders use ``strict=False`` and rebuild them). timm:
    `.safetensors` or a torch file by suffix, for `timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))` or `load_state_dict`. torchvision: a torch state dict
    with its derived buffers, for `swin_v2_*().load_state_dict(torch.load(...))`. hf: a folder with config.json and
    model.safetensors for `Swinv2ForImageClassification.from_pretrained(folder)` and preprocessor_config.json for
    `AutoImageProcessor.from_pretrained(folder)`; config.json also keeps the registry name and the exact eval
    preprocessing under ``"swinv2"``, so `load_model(folder)` restores them. Class names, preprocessing and
    name default to the model's attributes, as in `save_weights`. The folder's files are one unit: one
    writer at a time (`units.unit_lock`), config.json written last, and an id of this write in it and in
    model.safetensors' metadata, so a folder killed between its files is refused on read, never read as a
    mix; temp files a killed write left are removed by the next one.
    """
    path = Path(path)
    if fmt == "native":
        save_weights(model, path, class_names=class_names, preprocess=preprocess, model_name=model_name)
        return path
    sd = convert.from_native(model.state_dict(), fmt, config=model.config).state_dict
    if fmt == "hf":
        names, prep, model_name = _descriptions(model, class_names, preprocess, model_name)
        unit = units.new_unit_id()  # one id for this write, in the weights and in config.json
        ours = {"model_name": model_name, "preprocess": asdict(prep), "unit_id": unit}
        texts = {file: json.dumps(record, indent=2) + "\n" for file, record in (
            ("preprocessor_config.json", convert.hf_preprocessor_config(asdict(prep))),
            ("config.json", convert.hf_config_from_kwargs(model.config.to_dict(), names, extra=ours)))}
        path.mkdir(parents=True, exist_ok=True)
        # One writer at a time in the folder; temp files of ours found then are of a killed write.
        with units.unit_lock(path) as taken:
            if taken:
                units.remove_stale_temps(path, HF_FILES)
            # In HF_FILES order: the weights first, config.json (which describes them) last.
            _write_safetensors(path / "model.safetensors", sd, {**SAFETENSORS_FORMAT, UNIT_KEY: unit})
            for file, text in texts.items():
                atomic_write(path / file, lambda f, text=text: f.write(text.encode()))
    else:
        _write_state_dict(sd, path, fmt)
    return path


def _write_state_dict(sd: Mapping[str, torch.Tensor], path: Path, fmt: str) -> None:
    """A plain `.safetensors` by suffix, else a torch file (official ones wrapped in ``{"model": ...}``)."""
    if path.suffix == ".safetensors":
        _write_safetensors(path, sd, dict(SAFETENSORS_FORMAT))
    else:
        obj = {"model": dict(sd)} if fmt == "official" else dict(sd)
        atomic_write(path, lambda f: torch.save(obj, f))


def convert_file(src: PathLike, dst: PathLike, *, src_format: str = "auto", dst_format: str | None = None,
                 model_name: str | None = None) -> str:
    """Convert a weights file or folder to another format; returns a summary for the user.

    With an architecture (our `.safetensors`, a Hugging Face folder, a training checkpoint, or `model_name`)
    the weights go through a model (strict load, so the result is known to fit) and keep their class
    names, eval preprocessing and model name where the target can hold them. Without one,
    official/timm targets are a pure key mapping; other targets need `model_name`. The source is read once.
    """
    fmt = dst_format or guess_write_format(dst)
    if fmt not in WRITE_FORMATS:
        raise InputError(f"unknown weights format {fmt!r}; writable: {', '.join(WRITE_FORMATS)}")
    src, model_name = resolve_weights(src, model_name)
    weights = _read_weights(src)
    if weights.config is not None or model_name is not None:
        model = _build(weights, src, model_name, src_format, {})
        out = write_weights(model, dst, fmt)
        return f"{model.info.load_report}\nwrote {out} ({fmt})"
    if fmt not in ("official", "timm"):
        raise InputError(f"{src} does not describe its architecture; writing {fmt} needs --model NAME")
    conv = convert.convert(weights.state_dict, src_format, fmt)
    _write_state_dict(conv.state_dict, Path(dst), fmt)
    lines = [f"format: {conv.src} -> {fmt}; {len(conv.state_dict)} tensors (pure key mapping, no --model)"]
    if conv.dropped:
        lines.append(f"dropped ({len(conv.dropped)}): {_abbreviate(list(conv.dropped), 12)}")
    if conv.unmapped:
        lines.append(f"kept unmapped ({len(conv.unmapped)}): {_abbreviate(conv.unmapped, 12)}")
    return "\n".join(lines + [f"wrote {dst} ({fmt})"])
