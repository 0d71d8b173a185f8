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
"""
from __future__ import annotations

import fnmatch
import json
import logging
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

from . import convert, hub, units
from .errors import CheckpointError, InputError, UnreadableFileError, UnsafeCheckpointError
from .model import SwinTransformerV2, SwinV2Config
from .outputs import atomic_write
from .preprocess import EvalPreprocess
from .registry import ModelInfo, config_with, default_preprocess, get_variant, model_config, model_info

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
    return state


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
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
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
            return read_state_dict(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded: {"weight_map": {key: shard file}}
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                out.update(read_state_dict(path / shard))
            return out
    raise FileNotFoundError(f"{path}: folder holds no model.safetensors or pytorch_model.bin")


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.pt`/`.bin`/`.safetensors` file or a Hugging Face folder, unwrapped.

    Torch files are read with `weights_only=True` only (see `torch_load`); ``model`` / ``state_dict``
    containers and a DDP ``module.`` prefix are removed, non-tensor entries dropped.
    """
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
    text = resources.files("swinv2").joinpath("data/map22kto1k.txt").read_text()
    return [int(line) for line in text.split()]


def _fit_head(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: LoadReport) -> None:
    """Make the checkpoint's classifier fit the model's, in place: map 22k -> 1k, drop or reinitialise."""
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
    conv = convert.to_native(raw, src)
    sd = dict(conv.state_dict)
    target = model.state_dict()
    report = LoadReport(src=conv.src, dropped=[f"{k} ({why})" for k, why in conv.dropped.items()])
    _fit_head(sd, target, report)
    for key, t in target.items():
        if key not in sd:
            if conv.reinitialised is not None and conv.reinitialised.search(key):
                report.reinitialised.append(key)
            elif key not in report.reinitialised:
                report.missing.append(key)
        elif sd[key].shape != t.shape:
            report.mismatched.append(f"{key}: weights {tuple(sd[key].shape)} vs model {tuple(t.shape)}")
    report.unexpected = [k for k in sd if k not in target]
    if strict and not report.ok:
        parts = [f"{n} ({len(getattr(report, n))}): {_abbreviate(getattr(report, n))}"
                 for n in ("missing", "unexpected", "mismatched") if getattr(report, n)]
        raise InputError(f"{origin} ({conv.src} format) does not fit the model: " + "; ".join(parts))
    usable = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(usable, strict=False)
    report.loaded = list(usable)
    if report.reinitialised:
        log.info("left at their initialisation: %s", _abbreviate(report.reinitialised))
    if not report.ok:
        log.warning("weights loaded non-strictly: %s", str(report).replace("\n", "; "))
    return report


# --------------------------------------------------------------------------- self-describing weights


def _preprocess(d: Mapping[str, Any]) -> EvalPreprocess:
    """An `EvalPreprocess` from its `asdict` (JSON gives lists where it has tuples)."""
    return EvalPreprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
    ``NAME[.TAG]`` of published weights (`swinv2.hub`), fetched into the Hugging Face cache, with
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


def _measured_weights(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights of a training state that its best metric measures, those `best.safetensors` holds:
    the EMA's under ``train.best_metric: val_ema_top1`` (or ``val_ema_loss``), else the model's."""
    metric = state.get("config", {}).get("train", {}).get("best_metric") or ""
    return state["ema"] if metric.startswith("val_ema_") and state.get("ema") is not None else state["model"]


def _read_weights(path: Path) -> _Weights:
    """Tensors and self-description of our `.safetensors` (metadata), a Hugging Face folder
    (config.json, with our ``swinv2`` record if we wrote it), a training state of `engine.fit`
    (model config, classes, eval preprocessing, model name) or any other weights file (none)."""
    meta = read_metadata(path)
    if "swinv2.config" in meta:
        return _Weights(read_state_dict(path), SwinV2Config.from_dict(json.loads(meta["swinv2.config"])),
                        json.loads(meta["swinv2.class_names"]) if "swinv2.class_names" in meta else None,
                        _preprocess(json.loads(meta["swinv2.preprocess"])) if "swinv2.preprocess" in meta else None,
                        meta.get("swinv2.model_name"))
    if path.is_dir() and (path / "config.json").is_file():
        hf = _read_hf_config(path)  # read once: the weights are checked against this very config
        kwargs, class_names = convert.hf_config_to_kwargs(hf)
        ours = hf.get("swinv2") or {}
        return _Weights(_read_hf_folder(path, hf), SwinV2Config(**kwargs), class_names,
                        _preprocess(ours["preprocess"]) if "preprocess" in ours else None, ours.get("model_name"))
    if path.is_dir() or path.suffix == ".safetensors":
        return _Weights(read_state_dict(path))
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == TRAINING_STATE_FORMAT and "model_config" in obj:
        return _Weights(_tensors_of(_measured_weights(obj), path), SwinV2Config.from_dict(obj["model_config"]),
                        list(obj["classes"]), _preprocess(obj["preprocess"]), obj.get("model_name"))
    return _Weights(_tensors_of(obj, path))


def load_model(path: PathLike, *, name: str | None = None, src: str = "auto", **overrides: Any) -> SwinTransformerV2:
    """Build a model from weights, in eval mode; what the weights say about it is in `model.info`.

    The architecture comes from our `.safetensors` metadata, a Hugging Face folder's config.json, a
    training checkpoint of `swinv2 train` (`checkpoints/last.pt`, `best_epochNNNN.pt`: its weights
    are those the run's best metric measures, the EMA's for ``val_ema_top1``, as in best.safetensors),
    or, for formats that do not describe it (official `.pth`, timm, torchvision), the registry
    `name`, whose class count then follows the weights' head (a 21841-class head for a 1000-class
    variant is mapped, see `load_weights`). `overrides` change the config (e.g. ``num_classes=10``,
    ``img_size=384``). The load is strict. `model.info` (a `registry.ModelInfo`) holds the
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
    """`load_model` once the file is read."""
    sd, cfg, class_names, preprocess = weights.state_dict, weights.config, weights.class_names, weights.preprocess
    if cfg is None and name is not None:
        variant = get_variant(name)
        cfg = variant.config
        head = convert.to_native(sd, src).state_dict.get("head.weight")
        rows = 0 if head is None else head.shape[0]
        if rows and rows != cfg.num_classes and not (rows == 21841 and cfg.num_classes == 1000):
            cfg = replace(cfg, num_classes=rows)  # a fine-tuned checkpoint keeps its own classes
        preprocess = variant.preprocess
    elif cfg is None:
        raise InputError(f"{path} does not describe its architecture; pass the registry model name "
                         f"(--model NAME, see `swinv2 models`)")
    new_cfg = config_with(cfg, **overrides)
    if new_cfg.num_classes != cfg.num_classes:
        class_names = None
    if new_cfg.img_size != cfg.img_size:
        preprocess = None
    model = SwinTransformerV2(new_cfg)
    report = load_weights(model, sd, src=src, strict=True)
    model.info = ModelInfo(weights.model_name or name, class_names, preprocess or default_preprocess(new_cfg), report)
    return model.eval()


# --------------------------------------------------------------------------- writing any format

WRITE_FORMATS = ("native", "official", "timm", "hf", "torchvision")


def create_model(name: str, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 window_size: int | tuple | None = None, pretrained_window_sizes: tuple | None = None,
                 drop_path_rate: float | None = None, weights: Any = None, pretrained: bool | str | None = None,
                 strict: bool = True, **kw: Any) -> SwinTransformerV2:
    """Build a registered variant, optionally overriding its config and loading `weights` or `pretrained`.

    `weights` is a path or a state dict in any supported format (see `swinv2.load_weights`).
    `pretrained` names published weights (see `swinv2.hub`): True for the variant's default tag, a
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
