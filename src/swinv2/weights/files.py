"""Files of weights: reading any of them as tensors, and writing our own and every writable format.

Reading (`read_state_dict`): a torch file (only with `weights_only=True`, see `safe_load`), a
`.safetensors` file, or a Hugging Face folder (model.safetensors, pytorch_model.bin, or shards named by
an index, each a plain file name in the folder); containers (``model`` / ``state_dict``) and a DDP
``module.`` prefix unwrapped, and every tensor finite. What a file says about itself is read and
checked in `described`.

Writing: `save_weights` writes our self-describing `.safetensors` (config, class names, eval
preprocessing and model name in the metadata); `write_weights` any writable format of `formats.py`.
Every file is written atomically (`outputs.atomic_write`); a Hugging Face folder is one unit of files
(`units`): one write id in its weights and its config.json, so a folder killed between its files is
refused on read, never read as a mix. Files get the mode of any new file (0o666 less the umask).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import nn

from .. import units
from ..errors import CheckpointError, InputError
from ..model.transformer import DERIVED_KEYS, SwinTransformerV2
from ..outputs import atomic_write
from ..preprocess import EvalPreprocess
from .convert import from_native, unwrap
from .formats import get_format
from .hf_config import hf_config_from_kwargs, hf_preprocessor_config
from .messages import abbreviate, describe_error, shown
from .registry import model_info
from .safe_load import PathLike, torch_load

SAFETENSORS_FORMAT = {"format": "pt"}  # the key transformers and timm check in safetensors metadata


def _not_safetensors(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable .safetensors file: {describe_error(e).splitlines()[0]}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError: torn header, wrong bytes
        raise _not_safetensors(path, e) from None


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
        raise _not_safetensors(path, e) from None


# The files of a Hugging Face folder `write_weights` writes, in the order written: config.json, which
# describes the others, last. One id per write is stored in model.safetensors' metadata (UNIT_KEY) and
# in config.json's "swinv2" block ("unit_id"), so a folder killed between its files is refused on read.
HF_FILES = ("model.safetensors", "preprocessor_config.json", "config.json")
UNIT_KEY = "swinv2.unit_id"


def read_hf_config(path: Path) -> dict[str, Any]:
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
        raise _not_safetensors(path, e) from None
    unit = meta.get(UNIT_KEY)
    if unit is not None and config is None:
        raise units.torn(folder, f"model.safetensors (write {unit}) has no config.json beside it")
    if unit is not None:
        assert config is not None  # refused just above
        ours = config.get("swinv2")
        described = ours.get("unit_id") if isinstance(ours, dict) else None
        if described != unit:
            said = f"write {described}" if described else "no write id: an older config.json"
            raise units.torn(
                folder, f"model.safetensors (write {unit}) and config.json ({said}) come from different writes"
            )
    return tensors


def read_hf_folder(path: Path, config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder; `config`: its config.json as already read (else read here),
    which our model.safetensors must match (see `_read_hf_safetensors`)."""
    if config is None and (path / "config.json").is_file():
        config = read_hf_config(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            if name == "model.safetensors":
                return _read_hf_safetensors(path / name, path, config)
            return read_tensors(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded: {"weight_map": {key: shard file}}
            out: dict[str, torch.Tensor] = {}
            for shard in _shards(index):
                out.update(read_tensors(path / shard))
            return out
    raise FileNotFoundError(f"{path}: folder holds no model.safetensors or pytorch_model.bin")


def _shards(index: Path) -> list[str]:
    """The shard files a sharded folder's index names (`weight_map` values), each a plain file name in
    the folder: a path (``/etc/passwd``, ``../../x``) would read a file outside it, so it is refused."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError, RecursionError):  # not JSON (or not UTF-8), not an object, too deep
        raise CheckpointError(f'{index}: not a JSON object {{"weight_map": {{key: shard file}}}}') from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is {shown(weight_map)}, not an object {{key: shard file}}")
    for key, shard in weight_map.items():
        if not (
            isinstance(shard, str)
            and shard not in ("", ".", "..")
            and "/" not in shard
            and "\\" not in shard
            and not os.path.isabs(shard)
            and "\0" not in shard
        ):
            raise CheckpointError(
                f"{index}: weight_map entry {shown(key)}: {shown(shard, 300)} is not a plain file "
                f"name in the folder; refused (shards are read from the index's own folder only)"
            )
    return sorted(set(weight_map.values()))


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth`/`.pt`/`.bin`/`.safetensors` file or a Hugging Face folder, unwrapped.

    Torch files are read with `weights_only=True` only (see `torch_load`); ``model`` / ``state_dict``
    containers and a DDP ``module.`` prefix are removed, non-tensor entries dropped. Non-finite
    weights are refused (`check_finite`).
    """
    return check_finite(read_tensors(path), path)


def check_finite(sd: dict[str, torch.Tensor], origin: PathLike | str) -> dict[str, torch.Tensor]:
    """`sd`, if every floating-point tensor in it is finite; else CheckpointError naming the first few
    that are not, and how many. A NaN weight makes every output NaN ("loss nan"), an inf head one class
    for every image: never a number to report. Derived buffers are skipped (never loaded)."""
    bad = [
        k
        for k, t in sd.items()
        if (t.is_floating_point() or t.is_complex())
        and k.rsplit(".", 1)[-1] not in DERIVED_KEYS
        and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointError(
            f"{origin}: non-finite weights (NaN or inf) in {len(bad)} tensor{'s' * (len(bad) != 1)}"
            f": {abbreviate(bad, 5)}; refused (from a diverged training run?)"
        )
    return sd


def read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """`read_state_dict` without the finiteness check (its callers check once, on the whole file)."""
    path = Path(path)
    if path.is_dir():
        return read_hf_folder(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return tensors_of(torch_load(path), path)


def tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The unwrapped tensors of what a torch file held (see `read_state_dict`)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    sd = unwrap(obj)
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    return sd


# --------------------------------------------------------------------------- writing weights


def _descriptions(
    model: nn.Module, class_names: Sequence[str] | None, preprocess: EvalPreprocess | None, model_name: str | None
) -> tuple[list[str] | None, EvalPreprocess, str | None]:
    """(class names, eval preprocessing, registry name) to write with `model`'s weights: the arguments,
    else what its weights said (`model_info`), else (preprocessing) the official rule for its size."""
    swin = cast(SwinTransformerV2, model)  # typed as a Module for callers; a SwinV2 (or a wrapper of one) here
    info = model_info(swin)
    assert info.preprocess is not None  # model_info fills it in from the config where the weights gave none
    names = class_names if class_names is not None else info.class_names
    if names is not None and len(names) != swin.config.num_classes:
        raise InputError(f"{len(names)} class names for a {swin.config.num_classes}-class model")
    names = None if names is None else list(map(str, names))
    return names, preprocess or info.preprocess, model_name or info.model_name


def save_weights(
    model: SwinTransformerV2,
    path: PathLike,
    *,
    class_names: Sequence[str] | None = None,
    preprocess: EvalPreprocess | None = None,
    model_name: str | None = None,
) -> None:
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
    meta = {
        **SAFETENSORS_FORMAT,
        "swinv2.config": json.dumps(model.config.to_dict()),
        "swinv2.preprocess": json.dumps(asdict(prep)),
    }
    if names is not None:
        meta["swinv2.class_names"] = json.dumps(names)
    if model_name:
        meta["swinv2.model_name"] = model_name
    _write_safetensors(path, model.state_dict(), meta)


def _write_safetensors(path: Path, sd: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


def write_weights(
    model: SwinTransformerV2,
    path: PathLike,
    fmt: str = "native",
    *,
    class_names: Sequence[str] | None = None,
    preprocess: EvalPreprocess | None = None,
    model_name: str | None = None,
) -> Path:
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
    sd = from_native(model.state_dict(), fmt, config=model.config).state_dict
    if fmt == "hf":
        names, prep, model_name = _descriptions(model, class_names, preprocess, model_name)
        unit = units.new_unit_id()  # one id for this write, in the weights and in config.json
        ours = {"model_name": model_name, "preprocess": asdict(prep), "unit_id": unit}
        texts = {
            file: json.dumps(record, indent=2) + "\n"
            for file, record in (
                ("preprocessor_config.json", hf_preprocessor_config(asdict(prep))),
                ("config.json", hf_config_from_kwargs(model.config.to_dict(), names, extra=ours)),
            )
        }
        path.mkdir(parents=True, exist_ok=True)
        # One writer at a time in the folder; temp files of ours found then are of a killed write.
        with units.unit_lock(path) as taken:
            if taken:
                units.remove_stale_temps(path, HF_FILES)
            # In HF_FILES order: the weights first, config.json (which describes them) last.
            _write_safetensors(path / "model.safetensors", sd, {**SAFETENSORS_FORMAT, UNIT_KEY: unit})
            for file, text in texts.items():

                def write_text(f: IO[bytes], text: str = text) -> int:  # a lambda with a default: not inferable
                    return f.write(text.encode())

                atomic_write(path / file, write_text)
    else:
        write_state_dict(sd, path, fmt)
    return path


def write_state_dict(sd: Mapping[str, torch.Tensor], path: Path, fmt: str) -> None:
    """A plain `.safetensors` by suffix, else a torch file (official ones wrapped in ``{"model": ...}``)."""
    if path.suffix == ".safetensors":
        _write_safetensors(path, sd, dict(SAFETENSORS_FORMAT))
    else:
        wrap = get_format(fmt).wrap  # official: {"model": state dict}
        obj = {wrap: dict(sd)} if wrap else dict(sd)
        atomic_write(path, lambda f: torch.save(obj, f))


__all__ = [
    "HF_FILES",
    "SAFETENSORS_FORMAT",
    "UNIT_KEY",
    "check_finite",
    "read_hf_config",
    "read_hf_folder",
    "read_metadata",
    "read_state_dict",
    "read_tensors",
    "save_weights",
    "tensors_of",
    "write_state_dict",
    "write_weights",
]
