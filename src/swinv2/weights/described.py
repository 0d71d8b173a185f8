"""What a weights file says about itself, checked before anything is built from it.

Our `.safetensors` (metadata), a Hugging Face folder (config.json, with our ``swinv2`` record if we
wrote it) and a training state of `engine.fit` describe their architecture, class names, eval
preprocessing and registry name. Nothing a file says is trusted before it is checked, in one line
naming the file and the key: types and ranges of the architecture (`_config_from`), the architecture
against the file's own tensor shapes (`check_tensors`, so a lying file is refused before a model of
its size is allocated), the preprocessing and the class names; and every tensor is finite. `read_weights`
reads a file once, tensors and description together; `factory` builds the model from it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..config import MAX_CLASSES, MAX_IMG_SIZE, MAX_WINDOW
from ..errors import CheckpointError, InputError
from ..model.transformer import SwinV2Config
from ..model.windows import pair
from ..preprocess import EvalPreprocess
from .files import check_finite, read_hf_config, read_hf_folder, read_metadata, read_tensors, tensors_of
from .hf_config import HF_KEYS, MAX_STAGES, hf_config_to_kwargs
from .messages import shown
from .registry import ALIASES, get_variant
from .safe_load import torch_load
from .training_state import TRAINING_STATE_FORMAT, check_training_state

# Bounds of what a weights file may describe, checked before anything is built from it. Far above every
# variant (registry.py: SwinV2-G has embed_dim 512, 4 stages, 42 blocks in a stage, a 4096-wide last
# stage, CPB MLPs of 512), so no real file meets them; the tensors themselves then decide the rest
# (`check_tensors`). Image and window sizes and class counts share the recipe schema's bounds (config.py).
_ARCH_RANGES = {
    "patch_size": (1, MAX_IMG_SIZE),
    "in_chans": (1, 64),
    "num_classes": (0, MAX_CLASSES),
    "embed_dim": (1, 8192),
    "cpb_hidden_dim": (1, 8192),
    "extra_norm_every_n_blocks": (0, 256),
}
_MAX_WIDTH = 65_536  # channels of the last stage, embed_dim * 2 ** (stages - 1)
_MAX_BLOCKS = 256  # blocks in all stages together
_MAX_MLP_RATIO = 64.0
_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")  # torchvision's
# The JSON type each field of a described config must have: checked before `SwinV2Config` converts it
# (it would take "22" for depths (2, 2), or 2.7 for 2).
_CONFIG_KINDS = {
    "img_size": "size",
    "patch_size": "int",
    "in_chans": "int",
    "num_classes": "int",
    "embed_dim": "int",
    "depths": "ints",
    "num_heads": "ints",
    "window_size": "windows",
    "pretrained_window_sizes": "windows",
    "mlp_ratio": "number",
    "qkv_bias": "bool",
    "drop_rate": "number",
    "attn_drop_rate": "number",
    "drop_path_rate": "number",
    "patch_norm": "bool",
    "cpb_hidden_dim": "int",
    "extra_norm_every_n_blocks": "int",
}
_KIND_TEXT = {
    "int": "an integer",
    "number": "a finite number",
    "bool": "true or false",
    "size": "an integer or [height, width]",
    "ints": f"a list of at most {MAX_STAGES} integers",
    "windows": "an integer or a list (one per stage) of integers or [height, width] pairs",
}


def _is_kind(v: Any, kind: str) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    seq = isinstance(v, (list, tuple)) and len(v) <= MAX_STAGES
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
        raise CheckpointError(
            f"{source}: unknown keys {', '.join(map(shown, unknown[:5]))}; known: {', '.join(_CONFIG_KINDS)}"
        )
    for field_name, value in d.items():
        if not _is_kind(value, _CONFIG_KINDS[field_name]):
            key = (keys or {}).get(field_name, field_name)
            raise CheckpointError(f"{source}: {key}: {shown(value)} is not {_KIND_TEXT[_CONFIG_KINDS[field_name]]}")
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
    check_ranges(cfg, source, keys)
    return cfg


def _flat_ints(v: Any) -> list[int]:
    """The integers in a size or window spec (an int, or lists of them, nested once)."""
    return [v] if isinstance(v, int) else [x for item in v for x in _flat_ints(item)]


def _out_of_range(source: str, keys: Mapping[str, str] | None, name: str, value: Any, allowed: str) -> None:
    raise CheckpointError(
        f"{source}: {(keys or {}).get(name, name)}: {shown(value)} is out of range ({allowed}); "
        f"refused before building anything from it"
    )


def check_ranges(cfg: SwinV2Config, source: str, keys: Mapping[str, str] | None = None) -> None:
    """CheckpointError naming `source` and the key if a field of `cfg` is outside what any real model has."""

    def refuse(name: str, value: Any, allowed: str) -> None:
        _out_of_range(source, keys, name, value, allowed)

    for name, (low, high) in _ARCH_RANGES.items():
        if not low <= getattr(cfg, name) <= high:
            refuse(name, getattr(cfg, name), f"{low} to {high}")
    if not all(1 <= s <= MAX_IMG_SIZE for s in cfg.img_size):
        refuse("img_size", cfg.img_size, f"1 to {MAX_IMG_SIZE} px")
    if not 1 <= len(cfg.depths) <= MAX_STAGES or min(cfg.depths) < 1 or sum(cfg.depths) > _MAX_BLOCKS:
        refuse("depths", cfg.depths, f"1 to {MAX_STAGES} stages of at least 1 block, {_MAX_BLOCKS} blocks in all")
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
        what = f"unknown keys {', '.join(map(shown, unknown[:5]))}" if unknown else f"no {' or '.join(missing)}"
        raise CheckpointError(f"{source}: {what}; its keys are {', '.join(known)}")

    def refuse(key: str, wanted: str) -> None:
        raise CheckpointError(f"{source}: {key}: {shown(d[key])} is not {wanted}")

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
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # checked above
    return EvalPreprocess(**fields)


def _class_names(value: Any, num_classes: int, source: str) -> list[str]:
    """Class names a file gives for its `num_classes`-class head: a list of that many strings."""
    if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise CheckpointError(f"{source}: {shown(value)} is not a list of class names (strings)")
    if len(value) != num_classes:
        raise CheckpointError(
            f"{source}: {len(value)} class names for a {num_classes}-class model (its head); one name per class"
        )
    return value


# --------------------------------------------------------------------------- the architecture against the tensors


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
    found: list[tuple[str, Any, str]] = [
        ("depths", tuple(len(stages[i]) for i in sorted(stages)), "layers.N.blocks.M tensors")
    ]
    patch = tensor("patch_embed.proj.weight", 4)
    patch_key = f"patch_embed.proj.weight {tuple(patch.shape)}" if patch is not None else "patch_embed.proj.weight"
    found += [
        (name, None if patch is None else patch.shape[dim], patch_key)
        for name, dim in (("embed_dim", 0), ("in_chans", 1), ("patch_size", 2))
    ]
    for name, key, ndim in (("num_heads", "attn.logit_scale", 3), ("mlp_hidden", "mlp.fc1.weight", 2)):
        ts = [tensor(f"layers.{i}.blocks.0.{key}", ndim) for i in sorted(stages)]
        # cast: every `t` is a tensor where the tuple is built (the `all` check)
        value = tuple(cast(torch.Tensor, t).shape[0] for t in ts) if ts and all(t is not None for t in ts) else None
        found.append((name, value, f"layers.N.blocks.0.{key}"))
    cpb = tensor("layers.0.blocks.0.attn.cpb_mlp.0.weight", 2)
    found.append(("cpb_hidden_dim", None if cpb is None else cpb.shape[0], "layers.0.blocks.0.attn.cpb_mlp.0.weight"))
    head = tensor("head.weight", 2)
    found.append(
        (
            "num_classes",
            0 if head is None else head.shape[0],
            "no head.weight" if head is None else f"head.weight {tuple(head.shape)}",
        )
    )
    return found


def check_tensors(
    cfg: SwinV2Config,
    sd: Mapping[str, torch.Tensor],
    source: str,
    keys: Mapping[str, str] | None = None,
    *,
    complete: bool,
) -> None:
    """CheckpointError if `cfg` (what `source` says) disagrees with the native tensors `sd` on a field
    that sets parameter sizes (`_tensor_architecture`): so the model built from `cfg` is no larger than
    the weights that fill it, and a lying file (embed_dim=30000 beside 24-wide tensors, a 10-class
    description of a 5-row head) is refused before anything is allocated. `complete`: the file
    describes itself, so every such tensor must be there to check (a description of the registry,
    `complete=False`, skips fields whose tensor the format lacks, e.g. SwinV1's heads)."""
    for name, value, tensor in _tensor_architecture(sd):
        said = (
            tuple(int(cfg.embed_dim * 2**i * cfg.mlp_ratio) for i in range(len(cfg.depths)))
            if name == "mlp_hidden"
            else getattr(cfg, name)
        )
        if name == "num_classes" and not complete:
            continue  # the registry's class count follows the head (`_build`)
        key = (keys or {}).get(name, "mlp_ratio" if name == "mlp_hidden" else name)
        if value is None:
            if complete:
                raise CheckpointError(
                    f"{source} describes {key}, but the weights have no {tensor} to check it "
                    f"against: not a whole SwinV2 model"
                )
            continue
        if value != said:
            if name == "mlp_hidden":
                what = f"{key} {cfg.mlp_ratio} (MLP widths {list(said)})"
            elif name == "num_classes":
                what = f"{said} classes ({key})"
            else:
                what = f"{key} {shown(list(said) if isinstance(said, tuple) else said)}"
            has = list(value) if isinstance(value, tuple) else value
            raise CheckpointError(
                f"{source} says {what}, but the weights have {has} ({tensor}); refused before building the model"
            )


def check_same_model(weights: Weights, name: str, path: Path) -> None:
    """InputError unless the registry model `name` (--model) is the one self-describing weights say
    they are: the weights' architecture is what runs, so a --model that differs would be ignored."""
    variant = get_variant(name)
    said = weights.model_name
    if said is not None:
        if ALIASES.get(said, said) != variant.name:
            raise InputError(
                f"{path}: the weights say they are {said}, --model says {name}; drop --model (these "
                f"weights describe their architecture) or pass weights of {name}"
            )
        return
    for field_name in ("embed_dim", "depths", "num_heads", "patch_size", "in_chans"):
        ours, theirs = getattr(weights.config, field_name), getattr(variant.config, field_name)
        if ours != theirs:
            raise InputError(
                f"{path}: the weights describe {field_name}={shown(ours)}, --model {name} has "
                f"{shown(theirs)}; drop --model (these weights describe their architecture) or pass "
                f"weights of {name}"
            )


# --------------------------------------------------------------------------- a weights file read once


@dataclass
class Weights:
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


def read_weights(path: Path) -> Weights:
    """Tensors and self-description of our `.safetensors` (metadata), a Hugging Face folder
    (config.json, with our ``swinv2`` record if we wrote it), a training state of `engine.fit`
    (model config, classes, eval preprocessing, model name) or any other weights file (none).
    What a file says about itself is checked as it is read (`_config_from`, `_preprocess`,
    `_class_names`), and every tensor is finite (`check_finite`), before anything is built."""
    weights = _described(path)
    check_finite(weights.state_dict, path)
    return weights


def _described(path: Path) -> Weights:
    """`read_weights` before the finiteness check. What the file says is checked before its tensors
    are read."""
    meta = read_metadata(path)
    if "swinv2.config" in meta:
        where = f"{path}: metadata"
        said = {
            k: _metadata_json(meta, k, where)
            for k in ("swinv2.config", "swinv2.class_names", "swinv2.preprocess")
            if k in meta
        }
        cfg = _config_from(said["swinv2.config"], f"{where} swinv2.config")
        names = said.get("swinv2.class_names")
        if names is not None:
            names = _class_names(names, cfg.num_classes, f"{where} swinv2.class_names")
        prep = said.get("swinv2.preprocess")
        if prep is not None:
            prep = _preprocess(prep, f"{where} swinv2.preprocess")
        return Weights(
            read_tensors(path), cfg, names, prep, meta.get("swinv2.model_name") or None, f"{where} swinv2.config"
        )
    if path.is_dir() and (path / "config.json").is_file():
        hf = read_hf_config(path)  # read once: the weights are checked against this very config
        where = str(path / "config.json")
        try:
            kwargs, names = hf_config_to_kwargs(hf, where)
        except InputError as e:
            raise CheckpointError(f"{where}: {e}") from None
        cfg = _config_from(kwargs, where, HF_KEYS)
        ours = hf.get("swinv2") or {}
        model_name = ours.get("model_name")
        if model_name is not None and not isinstance(model_name, str):
            raise CheckpointError(f"{where}: swinv2.model_name: {shown(model_name)} is not a string")
        prep = _preprocess(ours["preprocess"], f"{where} swinv2.preprocess") if "preprocess" in ours else None
        return Weights(read_hf_folder(path, hf), cfg, names, prep, model_name or None, where, HF_KEYS)
    if path.is_dir() or path.suffix == ".safetensors":
        return Weights(read_tensors(path))
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == TRAINING_STATE_FORMAT and "model_config" in obj:
        check_training_state(obj, path)
        cfg = _config_from(obj["model_config"], f"{path}: model_config")
        # A SimMIM pretraining's state names the folders' classes for a head it does not have.
        names = _class_names(obj["classes"], cfg.num_classes, f"{path}: classes") if cfg.num_classes else None
        prep = _preprocess(obj["preprocess"], f"{path}: preprocess")
        model_name = obj.get("model_name")
        return Weights(
            tensors_of(_measured_weights(obj), path),
            cfg,
            names,
            prep,
            model_name if isinstance(model_name, str) and model_name else None,
            f"{path}: model_config",
        )
    return Weights(tensors_of(obj, path))


def _metadata_json(meta: Mapping[str, str], key: str, where: str) -> Any:
    """The JSON value of our metadata entry `key`; CheckpointError naming it if it is not JSON."""
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(f"{where} {key}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{where} {key}: JSON nested too deeply") from None


__all__ = ["Weights", "check_ranges", "check_same_model", "check_tensors", "read_weights"]
