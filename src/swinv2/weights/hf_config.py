"""Hugging Face transformers' config files <-> our config and eval preprocessing; no file I/O.

`hf_config_to_kwargs` reads a transformers `Swinv2Config` (config.json) as `SwinV2Config` fields and
class names, each key type-checked and any key that would change the numerics refused by name;
`hf_config_from_kwargs` writes one that `from_pretrained` reads offline, and `hf_preprocessor_config`
the `preprocessor_config.json` that reproduces our eval transform in `AutoImageProcessor`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..preprocess import resize_size
from .formats import CPB_HIDDEN
from .messages import shown

log = logging.getLogger(__name__)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


# What each `SwinV2Config` field is called in a transformers config.json (for messages naming the key).
HF_KEYS = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "num_classes": "id2label",
    "embed_dim": "embed_dim",
    "depths": "depths",
    "num_heads": "num_heads",
    "window_size": "window_size",
    "pretrained_window_sizes": "pretrained_window_sizes",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "drop_rate": "hidden_dropout_prob",
    "attn_drop_rate": "attention_probs_dropout_prob",
    "drop_path_rate": "drop_path_rate",
}
# Keys of a transformers config.json that do not change what the classifier computes: bookkeeping, the
# initialisation, outputs of `Swinv2Backbone`, SimMIM's decoder stride, and the generic `PretrainedConfig`
# keys (text generation, tokenizers) that older transformers write into every config. Any other key we
# do not read is warned about: it may mean something this model does not do.
HF_IGNORED = frozenset(
    """
    _name_or_path transformers_version torch_dtype dtype label2id num_labels problem_type initializer_range
    encoder_stride path_norm out_features out_indices stage_names return_dict output_hidden_states
    output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads tie_word_embeddings
    chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention
    tie_encoder_decoder max_length min_length do_sample early_stopping num_beams num_beam_groups
    diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
    forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
    suppress_tokens begin_suppress_tokens finetuning_task tokenizer_class prefix bos_token_id pad_token_id
    eos_token_id sep_token_id decoder_start_token_id task_specific_params swinv2""".split()
)
HF_LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which every norm of our model uses
MAX_STAGES = 8  # the variants have 4 stages; a longer list in a file is a fault, not a model


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _hf_value(hf: Mapping[str, Any], key: str, default: Any, kind: str) -> Any:
    """`hf[key]` (or `default`) checked to be of `kind`: int, ints (a list of at most MAX_STAGES ints),
    size (an int or [h, w]), number (finite), bool or str; InputError naming the key otherwise."""
    v = hf.get(key, default)
    ok = {
        "int": _is_int(v),
        "number": _is_number(v),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "ints": isinstance(v, (list, tuple)) and len(v) <= MAX_STAGES and all(_is_int(x) for x in v),
        "size": _is_int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v)),
    }[kind]
    _check(ok, f"{key}: {shown(v)} is not {_KINDS[kind]}")
    return v


_KINDS = {
    "int": "an integer",
    "number": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "ints": f"a list of at most {MAX_STAGES} integers",
    "size": "an integer or [height, width]",
}


def _hf_class_names(hf: Mapping[str, Any]) -> list[str]:
    """The labels of `id2label` in class order: an object whose keys are exactly "0" .. "n-1"."""
    id2label = hf.get("id2label") or {}
    _check(
        isinstance(id2label, Mapping), f'id2label: a JSON {type(id2label).__name__}, not an object {{"0": "name", ...}}'
    )
    n = len(id2label)
    _check(
        set(map(str, id2label)) == {str(i) for i in range(n)},
        f"id2label: its keys must be the class indices 0 .. {n - 1}, got {shown(sorted(map(str, id2label)))}",
    )
    names = {str(k): v for k, v in id2label.items()}
    bad = next((k for k, v in names.items() if not isinstance(v, str)), None)
    _check(
        bad is None, f"id2label: the label of class {bad} is {shown(None if bad is None else names[bad])}, not a string"
    )
    num_labels = hf.get("num_labels", n)
    _check(num_labels == n, f"num_labels: {shown(num_labels)}, but id2label names {n} classes")
    return [names[str(i)] for i in range(n)]


def hf_config_to_kwargs(hf: Mapping[str, Any], source: str = "config.json") -> tuple[dict[str, Any], list[str] | None]:
    """A transformers `Swinv2Config` dict (config.json) -> `SwinV2Config` kwargs and class names.

    Defaults are transformers' own; its placeholder labels (``LABEL_i``) give no class names. Each key
    read is type-checked, keys that would change the numerics beyond what this model does
    (`use_absolute_embeddings`, another `hidden_act` or `layer_norm_eps`, a `hidden_size` or
    `num_layers` that contradicts the rest) raise InputError naming the key, and other keys it does not
    know are warned about, naming `source` (see `HF_IGNORED`).
    """
    _check(hf.get("model_type") in (None, "swinv2"), f"model_type: {shown(hf.get('model_type'))}, not 'swinv2'")
    _check(
        not _hf_value(hf, "use_absolute_embeddings", False, "bool"),
        "use_absolute_embeddings: true is not supported (SwinV2 has no absolute position embedding)",
    )
    act = _hf_value(hf, "hidden_act", "gelu", "str")
    _check(act == "gelu", f"hidden_act: {act!r}; this model's MLP uses gelu")
    eps = _hf_value(hf, "layer_norm_eps", HF_LAYER_NORM_EPS, "number")
    _check(
        eps == HF_LAYER_NORM_EPS,
        f"layer_norm_eps: {eps!r}; this model's LayerNorms use {HF_LAYER_NORM_EPS}, so its outputs would differ",
    )
    depths = tuple(_hf_value(hf, "depths", (2, 2, 6, 2), "ints"))
    embed_dim = _hf_value(hf, "embed_dim", 96, "int")
    width = embed_dim * 2 ** max(len(depths) - 1, 0)
    for key, expected in (("hidden_size", width), ("num_layers", len(depths))):
        _check(
            hf.get(key, expected) == expected,
            f"{key}: {shown(hf.get(key))}, but embed_dim {embed_dim} and depths {list(depths)} make it {expected}",
        )
    architectures = hf.get("architectures") or ["ForImageClassification"]
    _check(
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures),
        f"architectures: {shown(architectures)} is not a list of strings",
    )
    classify = any("ForImageClassification" in a for a in architectures)
    names = _hf_class_names(hf) if classify else []
    ours = hf.get("swinv2", {})
    _check(isinstance(ours, Mapping), f"swinv2: a JSON {type(ours).__name__}, not an object")
    unknown = sorted(k for k in hf if k not in HF_IGNORED and k not in _HF_READ)
    if unknown:
        log.warning("%s: ignoring keys this model does not use: %s", source, ", ".join(map(shown, unknown)))
    kwargs = dict(
        img_size=_hf_value(hf, "image_size", 224, "size"),
        patch_size=_hf_value(hf, "patch_size", 4, "int"),
        in_chans=_hf_value(hf, "num_channels", 3, "int"),
        num_classes=len(names),
        embed_dim=embed_dim,
        depths=depths,
        num_heads=tuple(_hf_value(hf, "num_heads", (3, 6, 12, 24), "ints")),
        window_size=_hf_value(hf, "window_size", 7, "int"),
        pretrained_window_sizes=tuple(
            _hf_value(hf, "pretrained_window_sizes", None, "ints")
            if hf.get("pretrained_window_sizes")
            else (0,) * len(depths)
        ),
        mlp_ratio=_hf_value(hf, "mlp_ratio", 4.0, "number"),
        qkv_bias=_hf_value(hf, "qkv_bias", True, "bool"),
        drop_rate=_hf_value(hf, "hidden_dropout_prob", 0.0, "number"),
        attn_drop_rate=_hf_value(hf, "attention_probs_dropout_prob", 0.0, "number"),
        drop_path_rate=_hf_value(hf, "drop_path_rate", 0.1, "number"),
    )
    if names and all(s == f"LABEL_{i}" for i, s in enumerate(names)):
        names = []
    return kwargs, names or None


# The keys `hf_config_to_kwargs` reads.
_HF_READ = frozenset(HF_KEYS.values()) | {
    "model_type",
    "use_absolute_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "hidden_size",
    "num_layers",
    "architectures",
}


def hf_config_from_kwargs(
    cfg: Mapping[str, Any], class_names: list[str] | None = None, *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`SwinV2Config.to_dict()` -> a transformers `Swinv2Config` dict that `from_pretrained` reads offline.

    `extra` is stored under the key ``"swinv2"`` (transformers keeps unknown keys as they are): what
    our config.json carries beyond transformers' (the registry name and the exact eval transform).
    """
    _check(
        cfg["cpb_hidden_dim"] == CPB_HIDDEN and cfg["patch_norm"],
        f"transformers hard-codes patch_norm=True and a CPB MLP of width {CPB_HIDDEN}",
    )
    # Its Swinv2Layer compares an int window with the map size: one square window for every stage.
    _check(
        isinstance(cfg["window_size"], int) and all(isinstance(p, int) for p in cfg["pretrained_window_sizes"]),
        f"transformers' Swinv2Config has one square window for all stages and square pre-training windows; "
        f"this model has window_size={cfg['window_size']}, pretrained_window_sizes={cfg['pretrained_window_sizes']}",
    )
    _check(
        not cfg.get("extra_norm_every_n_blocks"),
        "transformers' Swinv2 has no SwinV2-H/G extra norms (extra_norm_every_n_blocks)",
    )
    n = cfg["num_classes"]
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(n)]
    return {
        "architectures": ["Swinv2ForImageClassification" if n else "Swinv2Model"],
        "model_type": "swinv2",
        "image_size": list(cfg["img_size"]),
        "patch_size": cfg["patch_size"],
        "num_channels": cfg["in_chans"],
        "embed_dim": cfg["embed_dim"],
        "depths": list(cfg["depths"]),
        "num_heads": list(cfg["num_heads"]),
        "window_size": cfg["window_size"],
        "pretrained_window_sizes": list(cfg["pretrained_window_sizes"]),
        "mlp_ratio": cfg["mlp_ratio"],
        "qkv_bias": cfg["qkv_bias"],
        "hidden_dropout_prob": cfg["drop_rate"],
        "attention_probs_dropout_prob": cfg["attn_drop_rate"],
        "drop_path_rate": cfg["drop_path_rate"],
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "layer_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "encoder_stride": cfg["patch_size"] * 2 ** (len(cfg["depths"]) - 1),
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "torch_dtype": "float32",
        **({"swinv2": dict(extra)} if extra else {}),
    }


# PIL's resampling filters by name: transformers' image processors store them as `resample` codes.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def hf_preprocessor_config(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """Our eval transform (an `EvalPreprocess` as a dict) -> a transformers `preprocessor_config.json`.

    A `BitImageProcessor`: resize the shorter side to floor(img_size / crop_pct), centre-crop img_size,
    rescale to [0, 1], normalise: `images.eval_transform` step for step, at every size. (The
    `ViTImageProcessor` of the hub's SwinV2 folders resizes to a square with no crop, and the ConvNeXt one
    ignores crop_pct from 384 px on: neither reproduces a crop_pct.) Centre crops with an odd margin sit
    one pixel apart: transformers rounds the offset down, torchvision half to even.
    """
    size, interpolation = preprocess["img_size"], preprocess["interpolation"]
    _check(
        interpolation in PIL_RESAMPLE,
        f"transformers has no resampling filter {interpolation!r} (known: {', '.join(PIL_RESAMPLE)})",
    )
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resize_size(size, preprocess["crop_pct"])},
        "resample": PIL_RESAMPLE[interpolation],
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess["mean"]),
        "image_std": list(preprocess["std"]),
    }


__all__ = [
    "HF_IGNORED",
    "HF_KEYS",
    "HF_LAYER_NORM_EPS",
    "MAX_STAGES",
    "PIL_RESAMPLE",
    "hf_config_from_kwargs",
    "hf_config_to_kwargs",
    "hf_preprocessor_config",
]
