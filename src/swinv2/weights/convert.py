"""Pure state-dict mappings between the SwinV2 weight formats; no file I/O, no network.

Formats (names accepted by `src` / `dst`):
  * ``native`` / ``official`` — the microsoft/Swin-Transformer names, which are ours. Reading unwraps
    ``model`` / ``state_dict`` / ``module.`` and drops the derived buffers.
  * ``timm`` — `timm.models.swin_transformer_v2`: merging at the START of stage i+1, ``head.fc``.
  * ``hf`` — transformers `Swinv2ForImageClassification` (``swinv2.`` prefix, ``classifier``) or
    `Swinv2Model` (no prefix, read only): separate query/key/value, ``layernorm_before/after``.
  * ``torchvision`` — `swin_v2_t/s/b`: ``features.N`` layout, one full ``qkv.bias`` whose k part is
    ignored, and persistent derived buffers (so writing them needs ``config.window_size``).
  * ``swinv1`` (read only) — official Swin V1 weights initialising a V2 model: patch embedding,
    qkv / proj, MLPs, merging reduction, final norm and head transfer; the V1 pre-norms, the V1
    merging norm (over 4C, before the reduction), the relative-position-bias tables and the k bias
    are dropped; the V2-only logit scales, CPB MLPs and post-norms keep the V2 model's init.
  * ``simmim`` (read only) — SimMIM pretraining checkpoints, the official ones (microsoft/SimMIM and
    microsoft/Swin-Transformer `models/simmim.py`: ``encoder.*`` with ``encoder.mask_token``, ``decoder.*``;
    the released SwinV2 ones name the CPB MLP ``rpe_mlp``, renamed as the official loader does) and ours
    (`swinv2.model.simmim`: ``encoder.*``, ``mask_token``, ``decoder.*``): the encoder is kept under the
    classifier's names, the mask token and the decoder are dropped (pretraining only).

Key renames are declarative tables of templates (``{i}`` stage, ``{j}`` block, ``{2i+1}`` an index
computed from ``i``, ``{*}`` the rest of the key); the few tensor operations (qkv split/merge,
torchvision's qkv bias and derived buffers) sit beside them with shape checks.

Caveat — torchvision's numerics differ from the official model in two places, so its logits agree
with ours only where the math coincides: it never shrinks the window to a small feature map (it pads
the map up to the window and attends over the zero padding, where the official rule uses one
window of the map's size) and it has no ``pretrained_window_size`` (its CPB table is always
normalised by its own window). At 256 px with window 8 every stage coincides; ``swin_v2_t/s/b``
at their native 256 px / window 8 therefore convert exactly. Its patch embedding also drops pixels
of a size not divisible by 4 where ours pads.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import InputError
from ..model.transformer import DERIVED_KEYS
from ..model.windows import pair, relative_position_index
from ..preprocess import resize_size

log = logging.getLogger(__name__)

FORMATS = ("native", "official", "timm", "hf", "torchvision", "swinv1", "simmim")
READ_ONLY = ("swinv1", "simmim")
CPB_HIDDEN = 512  # timm, transformers and torchvision hard-code the CPB MLP width


class _Template:
    """A key pattern such as ``features.{2i+1}.{j}.{*}``: matched against keys, formatted from values."""

    _FIELD = re.compile(r"\{(?:(\d*)([ij])([+-]\d+)?|(\*))\}")

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields: list[tuple[int, str, int] | None] = []  # (a, var, b) for a*var+b; None for {*}
        parts, pos = [], 0
        for m in self._FIELD.finditer(text):
            parts.append(re.escape(text[pos:m.start()]))
            if m.group(4):
                parts.append("(.+)")
                self.fields.append(None)
            else:
                parts.append(r"(\d+)")
                self.fields.append((int(m.group(1) or 1), m.group(2), int(m.group(3) or 0)))
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(parts))

    def match(self, key: str) -> dict[str, Any] | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        values: dict[str, Any] = {}
        for spec, group in zip(self.fields, m.groups()):
            if spec is None:
                values["*"] = group
                continue
            a, var, b = spec
            v, rem = divmod(int(group) - b, a)
            if rem or v < 0 or values.get(var, v) != v:
                return None
            values[var] = v
        return values

    def format(self, values: Mapping[str, Any]) -> str:
        def sub(m: re.Match) -> str:
            if m.group(4):
                return values["*"]
            return str(int(m.group(1) or 1) * values[m.group(2)] + int(m.group(3) or 0))

        return self._FIELD.sub(sub, self.text)


# (native template, foreign template); the first rule that matches wins, in both directions.
_RULES_TEXT: dict[str, list[tuple[str, str]]] = {
    "timm": [
        ("layers.{i}.downsample.{*}", "layers.{i+1}.downsample.{*}"),
        ("head.{*}", "head.fc.{*}"),
        ("{*}", "{*}"),
    ],
    "hf": [
        ("patch_embed.proj.{*}", "swinv2.embeddings.patch_embeddings.projection.{*}"),
        ("patch_embed.norm.{*}", "swinv2.embeddings.norm.{*}"),
        ("layers.{i}.blocks.{j}.norm1.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.layernorm_before.{*}"),
        ("layers.{i}.blocks.{j}.norm2.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.layernorm_after.{*}"),
        ("layers.{i}.blocks.{j}.mlp.fc1.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.intermediate.dense.{*}"),
        ("layers.{i}.blocks.{j}.mlp.fc2.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.output.dense.{*}"),
        ("layers.{i}.blocks.{j}.attn.logit_scale", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.logit_scale"),
        ("layers.{i}.blocks.{j}.attn.cpb_mlp.{*}",
         "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.continuous_position_bias_mlp.{*}"),
        # q/k/v weights: the split `qkv.weight` (see `_split_qkv`), under these interim names
        ("layers.{i}.blocks.{j}.attn.q.weight", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.query.weight"),
        ("layers.{i}.blocks.{j}.attn.k.weight", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.key.weight"),
        ("layers.{i}.blocks.{j}.attn.v.weight", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.value.weight"),
        ("layers.{i}.blocks.{j}.attn.q_bias", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.query.bias"),
        ("layers.{i}.blocks.{j}.attn.v_bias", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.value.bias"),
        ("layers.{i}.blocks.{j}.attn.proj.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.attention.output.dense.{*}"),
        ("layers.{i}.downsample.{*}", "swinv2.encoder.layers.{i}.downsample.{*}"),
        ("norm.{*}", "swinv2.layernorm.{*}"),
        ("head.{*}", "classifier.{*}"),
    ],
    "torchvision": [
        ("patch_embed.proj.{*}", "features.0.0.{*}"),
        ("patch_embed.norm.{*}", "features.0.2.{*}"),
        ("layers.{i}.blocks.{j}.mlp.fc1.{*}", "features.{2i+1}.{j}.mlp.0.{*}"),
        ("layers.{i}.blocks.{j}.mlp.fc2.{*}", "features.{2i+1}.{j}.mlp.3.{*}"),
        # one (3C,) bias = [q_bias, k part, v_bias] (see `_merge_tv_bias`), under this interim name
        ("layers.{i}.blocks.{j}.attn.qkv_bias", "features.{2i+1}.{j}.attn.qkv.bias"),
        ("layers.{i}.blocks.{j}.{*}", "features.{2i+1}.{j}.{*}"),
        ("layers.{i}.downsample.{*}", "features.{2i+2}.{*}"),
        ("norm.{*}", "norm.{*}"),
        ("head.{*}", "head.{*}"),
    ],
}
_RULES = {fmt: [(_Template(a), _Template(b)) for a, b in rules] for fmt, rules in _RULES_TEXT.items()}

_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
# Native parameters a V1 checkpoint cannot provide: they keep the V2 model's initialisation.
V1_REINITIALISED = re.compile(
    r"(attn\.logit_scale|attn\.cpb_mlp\.\d+\.(weight|bias)|blocks\.\d+\.norm[12]\.(weight|bias)"
    r"|downsample\.norm\.(weight|bias))$")


@dataclass
class Conversion:
    """Result of one mapping: the state dict plus what the mapping deliberately left out.

    `dropped` maps each source key not carried over to the reason; `unmapped` lists keys no rule
    of the format knows (passed through unchanged, so a loader reports them as unexpected);
    `reinitialised` matches native keys the source format cannot provide (SwinV1 -> V2).
    """

    src: str
    dst: str
    state_dict: dict[str, Tensor]
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    reinitialised: re.Pattern | None = None


# --------------------------------------------------------------------------- helpers


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def unwrap(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """Unwrap ``model`` / ``state_dict`` containers and a DDP ``module.`` prefix; keep tensors only."""
    for _ in range(3):  # e.g. {"state_dict": {"model": ...}}
        inner = next((sd[k] for k in ("model", "state_dict") if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    out = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _drop_derived(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in DERIVED_KEYS}


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """Guess the format of an unwrapped state dict from its keys."""
    keys = list(sd)
    if any(k.startswith("encoder.patch_embed.") for k in keys):  # before hf: Swinv2Model has encoder.layers.
        return "simmim"
    if any(k.startswith("features.0.0.") or re.match(r"features\.\d+\.\d+\.attn\.", k) for k in keys):
        return "torchvision"
    if any(k.startswith(("swinv2.", "embeddings.patch_embeddings.", "encoder.layers.")) for k in keys):
        return "hf"
    if any(k.endswith("relative_position_bias_table") for k in keys) and not any(".cpb_mlp." in k for k in keys):
        return "swinv1"
    if _is_timm_layout(keys):
        return "timm"
    if any(k.startswith(("patch_embed.", "layers.")) for k in keys):
        return "native"
    raise InputError(f"cannot tell the format of this state dict (first keys: {', '.join(keys[:4]) or 'none'}); "
                     f"pass src= one of {', '.join(FORMATS)}")


def _is_timm_layout(keys: list[str]) -> bool:
    """timm merges at the start of stages 1.. (official: at the end of 0..) and names the head head.fc."""
    if "head.fc.weight" in keys:
        return True
    has_merge = any(re.match(r"layers\.\d+\.downsample\.", k) for k in keys)
    return has_merge and not any(k.startswith("layers.0.downsample.") for k in keys)


def _rename(sd: dict[str, Tensor], fmt: str, to_native: bool) -> tuple[dict[str, Tensor], list[str]]:
    out, unmapped = {}, []
    for key, value in sd.items():
        for native, foreign in _RULES[fmt]:
            src, dst = (foreign, native) if to_native else (native, foreign)
            values = src.match(key)
            if values is not None:
                key = dst.format(values)
                break
        else:
            unmapped.append(key)
        _check(key not in out, f"two {fmt} keys map to {key!r}")
        out[key] = value
    return out, unmapped


def _blocks(sd: Mapping[str, Tensor]) -> list[str]:
    """Native block prefixes ``layers.i.blocks.j.`` present in `sd`, in order."""
    found = {m.group(0): (int(m.group(1)), int(m.group(2))) for k in sd if (m := _BLOCK.match(k))}
    return sorted(found, key=found.get)


# --------------------------------------------------------------------------- tensor operations


def _split_qkv(sd: dict[str, Tensor]) -> None:
    """``attn.qkv.weight`` (3C, C) -> ``attn.{q,k,v}.weight`` (C, C) each, in place."""
    for p in _blocks(sd):
        w = sd.pop(p + "attn.qkv.weight", None)
        if w is None:
            continue
        _check(w.ndim == 2 and w.shape[0] == 3 * w.shape[1],
               f"{p}attn.qkv.weight: expected (3C, C), got {tuple(w.shape)}")
        for name, part in zip("qkv", w.chunk(3, dim=0)):
            sd[f"{p}attn.{name}.weight"] = part.clone()


def _merge_qkv(sd: dict[str, Tensor]) -> None:
    """``attn.{q,k,v}.weight`` (C, C) each -> ``attn.qkv.weight`` (3C, C), in place."""
    for p in _blocks(sd):
        parts = [sd.pop(f"{p}attn.{n}.weight", None) for n in "qkv"]
        if all(t is None for t in parts):
            continue
        _check(all(t is not None for t in parts), f"{p}attn: query, key and value weights must all be present")
        square = parts[0].ndim == 2 and parts[0].shape[0] == parts[0].shape[1]
        _check(len({tuple(t.shape) for t in parts}) == 1 and square,
               f"{p}attn: query/key/value weights must be square and equal, got {[tuple(t.shape) for t in parts]}")
        sd[p + "attn.qkv.weight"] = torch.cat(parts, dim=0)


def _merge_tv_bias(sd: dict[str, Tensor]) -> None:
    """``q_bias``, ``v_bias`` (C,) -> ``qkv_bias`` (3C,) with a zero k part, in place."""
    for p in _blocks(sd):
        q, v = sd.pop(p + "attn.q_bias", None), sd.pop(p + "attn.v_bias", None)
        if q is None and v is None:
            continue
        _check(q is not None and v is not None and q.shape == v.shape and q.ndim == 1,
               f"{p}attn: q_bias and v_bias must both be present, (C,) each")
        sd[p + "attn.qkv_bias"] = torch.cat((q, torch.zeros_like(q), v))


def _split_full_bias(sd: dict[str, Tensor], key: str, dropped: dict[str, str], why: str) -> None:
    """A full (3C,) ``qkv`` bias under `key` -> ``q_bias``, ``v_bias``; the k part is dropped."""
    for p in _blocks(sd):
        b = sd.pop(p + key, None)
        if b is None:
            continue
        _check(b.ndim == 1 and b.numel() % 3 == 0, f"{p}{key}: expected (3C,), got {tuple(b.shape)}")
        q, k, v = b.chunk(3)
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = q.clone(), v.clone()
        if torch.count_nonzero(k):
            dropped[f"{p}attn.qkv.bias[C:2C]"] = why


def tv_derived_buffers(window: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
    """torchvision's persistent buffers for a window w or (h, w): coords table (1, 2h-1, 2w-1, 2),
    index ((h*w)^2,).

    Its formula (no pretrained window): offsets / (window - 1) per axis * 8, then sign * log2(|x|+1) / 3.
    """
    wh, ww = pair(window)
    rh = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    rw = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rh, rw, indexing="ij"), dim=-1)[None]  # (1, 2h-1, 2w-1, 2)
    table = table / torch.tensor([wh - 1, ww - 1], dtype=torch.float32) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
    return table, relative_position_index((wh, ww), torch.device("cpu")).flatten().clone()


def _tv_window(config: Any) -> tuple[int, int]:
    """The one (h, w) window torchvision's SwinTransformer (`window_size=[h, w]`) has for every stage."""
    windows = set(config.stage_window_sizes)
    _check(len(windows) == 1, f"torchvision's SwinTransformer has one window for all stages (window_size=[h, w]); "
           f"this model's differ per stage: {config.window_size}")
    return windows.pop()


def _check_no_extra_norms(sd: Mapping[str, Tensor], dst: str) -> None:
    """timm's SwinTransformerV2, transformers and torchvision have no SwinV2-H/G extra main-branch norm."""
    extra = [k for k in sd if ".norm3." in k]
    _check(not extra, f"{dst} has no SwinV2-H/G extra norms (extra_norm_every_n_blocks); these weights have "
           f"{len(extra)} such tensors ({extra[0] if extra else ''}): write native / official instead")


# --------------------------------------------------------------------------- to / from native


def _from_swinv1(sd: dict[str, Tensor], dropped: dict[str, str]) -> dict[str, Tensor]:
    if _is_timm_layout(list(sd)):
        sd, _ = _rename(sd, "timm", to_native=True)
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.relative_position_bias_table"):
            dropped[k] = "V1 relative position bias table; V2 computes its bias with the CPB MLP"
        elif re.search(r"blocks\.\d+\.norm[12]\.(weight|bias)$", k):
            dropped[k] = "V1 pre-norm; V2 post-norms keep their V2 init"
        elif re.search(r"downsample\.norm\.(weight|bias)$", k):
            dropped[k] = "V1 merging norm over 4C before the reduction; V2 normalises 2C after it"
        else:
            out[k] = v
    _split_full_bias(out, "attn.qkv.bias", dropped, "V1 k bias; V2 fixes the k bias at zero")
    return out


def _from_simmim(sd: dict[str, Tensor], dropped: dict[str, str]) -> tuple[dict[str, Tensor], list[str]]:
    out, unmapped = {}, []
    for k, v in sd.items():
        if k.startswith("encoder.") and not k.endswith("mask_token"):
            out[k[len("encoder."):].replace(".rpe_mlp.", ".cpb_mlp.")] = v
        elif k.endswith("mask_token"):
            dropped[k] = "SimMIM mask token (pretraining only)"
        elif k.startswith("decoder."):
            dropped[k] = "SimMIM decoder (pretraining only)"
        else:  # unknown to SimMIM: passed on, so a strict load reports it
            out[k] = v
            unmapped.append(k)
    return out, unmapped


def to_native(sd: Mapping[str, Any], src: str = "auto") -> Conversion:
    """Map a state dict of format `src` (or "auto") to native names. See the module docstring."""
    flat = unwrap(sd)
    if src == "auto":
        src = detect_format(flat)
        log.info("weights format detected: %s", src)
    _check(src in FORMATS, f"unknown weights format {src!r}; known: {', '.join(FORMATS)}")
    flat = _drop_derived(flat)
    conv = Conversion(src, "native", {})
    if src in ("native", "official"):
        conv.state_dict = dict(flat)
    elif src == "swinv1":
        conv.state_dict = _from_swinv1(flat, conv.dropped)
        conv.reinitialised = V1_REINITIALISED
    elif src == "simmim":
        conv.state_dict, conv.unmapped = _from_simmim(flat, conv.dropped)
    else:
        if src == "hf" and not any(k.startswith("swinv2.") for k in flat):  # Swinv2Model: no prefix
            flat = {k if k.startswith("classifier.") else "swinv2." + k: v for k, v in flat.items()}
        out, conv.unmapped = _rename(flat, src, to_native=True)
        if src == "hf":
            _merge_qkv(out)
        elif src == "torchvision":
            _split_full_bias(out, "attn.qkv_bias", conv.dropped, "torchvision k bias; ignored by its forward too")
        conv.state_dict = out
    return conv


def from_native(sd: Mapping[str, Tensor], dst: str, *, config: Any = None) -> Conversion:
    """Map a native state dict to format `dst`. torchvision needs `config` (its window size)."""
    _check(dst in FORMATS and dst not in READ_ONLY,
           f"cannot write weights format {dst!r}; writable: {', '.join(f for f in FORMATS if f not in READ_ONLY)}")
    out = _drop_derived(dict(sd))
    conv = Conversion("native", dst, out)
    if dst in ("native", "official"):
        return conv
    _check_no_extra_norms(out, dst)
    cpb = [v for k, v in out.items() if k.endswith("attn.cpb_mlp.0.weight")]
    _check(all(t.shape[0] == CPB_HIDDEN for t in cpb),
           f"{dst} hard-codes a CPB MLP of width {CPB_HIDDEN}; these weights have {cpb[0].shape[0] if cpb else '?'}")
    if dst == "hf":
        _split_qkv(out)
    elif dst == "torchvision":
        _check(config is not None, "writing torchvision weights needs the model config (for its window size)")
        window = _tv_window(config)
        if any(pair(p) != (0, 0) for p in config.pretrained_window_sizes):
            log.warning("torchvision has no pretrained_window_size: its CPB table is normalised by the window "
                        "(%s), not by %s, so its outputs will differ", config.window_size,
                        config.pretrained_window_sizes)
        _merge_tv_bias(out)
        table, index = tv_derived_buffers(window)
        for p in _blocks(out):
            out[p + "attn.relative_coords_table"] = table.clone()
            out[p + "attn.relative_position_index"] = index.clone()
    conv.state_dict, conv.unmapped = _rename(out, dst, to_native=False)
    if conv.unmapped:
        log.warning("%d key(s) have no %s name and were kept as they are: %s", len(conv.unmapped), dst,
                    ", ".join(conv.unmapped[:5]))
    return conv


def convert(sd: Mapping[str, Any], src: str = "auto", dst: str = "native", *, config: Any = None) -> Conversion:
    """`convert_state_dict` with the record of what was dropped, unmapped or left to initialise."""
    to = to_native(sd, src)
    if dst == "native":
        return to
    out = from_native(to.state_dict, dst, config=config)
    out.src, out.dropped, out.reinitialised = to.src, {**to.dropped, **out.dropped}, to.reinitialised
    out.unmapped = to.unmapped + out.unmapped
    return out


def convert_state_dict(sd: Mapping[str, Any], src: str = "auto", dst: str = "native", *,
                       config: Any = None) -> dict[str, Tensor]:
    """Map a SwinV2 state dict between formats: native/official, timm, hf, torchvision (and swinv1 in).

    `sd` may be wrapped (``{"model": ...}``); `src="auto"` detects the format from the keys and logs
    it. `config` (a `SwinV2Config`) is needed only for ``dst="torchvision"``. Tensors are shared,
    not copied, where no operation changes them. Dropped keys are logged.
    """
    conv = convert(sd, src, dst, config=config)
    for key, why in conv.dropped.items():
        log.info("dropped %s: %s", key, why)
    return conv.state_dict


def map_head_rows(weight: Tensor, bias: Tensor | None, index: list[int]) -> tuple[Tensor, Tensor | None]:
    """Select head rows (e.g. the official 22k->1k map): (K, C), (K,) -> (len(index), C), (len(index),)."""
    _check(max(index) < weight.shape[0], f"head has {weight.shape[0]} rows; the class map needs {max(index) + 1}")
    idx = torch.as_tensor(index, dtype=torch.long)
    return weight[idx].clone(), None if bias is None else bias[idx].clone()


# --------------------------------------------------------------------------- Hugging Face config.json


# What each `SwinV2Config` field is called in a transformers config.json (for messages naming the key).
HF_KEYS = {"img_size": "image_size", "patch_size": "patch_size", "in_chans": "num_channels", "num_classes": "id2label",
           "embed_dim": "embed_dim", "depths": "depths", "num_heads": "num_heads", "window_size": "window_size",
           "pretrained_window_sizes": "pretrained_window_sizes", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias",
           "drop_rate": "hidden_dropout_prob", "attn_drop_rate": "attention_probs_dropout_prob",
           "drop_path_rate": "drop_path_rate"}
# Keys of a transformers config.json that do not change what the classifier computes: bookkeeping, the
# initialisation, outputs of `Swinv2Backbone`, SimMIM's decoder stride, and the generic `PretrainedConfig`
# keys (text generation, tokenizers) that older transformers write into every config. Any other key we
# do not read is warned about: it may mean something this model does not do.
HF_IGNORED = frozenset("""
    _name_or_path transformers_version torch_dtype dtype label2id num_labels problem_type initializer_range
    encoder_stride path_norm out_features out_indices stage_names return_dict output_hidden_states
    output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads tie_word_embeddings
    chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention
    tie_encoder_decoder max_length min_length do_sample early_stopping num_beams num_beam_groups
    diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
    forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
    suppress_tokens begin_suppress_tokens finetuning_task tokenizer_class prefix bos_token_id pad_token_id
    eos_token_id sep_token_id decoder_start_token_id task_specific_params swinv2""".split())
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
    ok = {"int": _is_int(v), "number": _is_number(v), "bool": isinstance(v, bool), "str": isinstance(v, str),
          "ints": isinstance(v, (list, tuple)) and len(v) <= MAX_STAGES and all(_is_int(x) for x in v),
          "size": _is_int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v))}[kind]
    _check(ok, f"{key}: {_shown(v)} is not {_KINDS[kind]}")
    return v


_KINDS = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
          "ints": f"a list of at most {MAX_STAGES} integers", "size": "an integer or [height, width]"}


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _hf_class_names(hf: Mapping[str, Any]) -> list[str]:
    """The labels of `id2label` in class order: an object whose keys are exactly "0" .. "n-1"."""
    id2label = hf.get("id2label") or {}
    _check(isinstance(id2label, Mapping), f"id2label: a JSON {type(id2label).__name__}, not an object "
           f'{{"0": "name", ...}}')
    n = len(id2label)
    _check(set(map(str, id2label)) == {str(i) for i in range(n)},
           f"id2label: its keys must be the class indices 0 .. {n - 1}, got {_shown(sorted(map(str, id2label)))}")
    names = {str(k): v for k, v in id2label.items()}
    bad = next((k for k, v in names.items() if not isinstance(v, str)), None)
    _check(bad is None, f"id2label: the label of class {bad} is {_shown(names.get(bad))}, not a string")
    num_labels = hf.get("num_labels", n)
    _check(num_labels == n, f"num_labels: {_shown(num_labels)}, but id2label names {n} classes")
    return [names[str(i)] for i in range(n)]


def hf_config_to_kwargs(hf: Mapping[str, Any], source: str = "config.json") -> tuple[dict[str, Any], list[str] | None]:
    """A transformers `Swinv2Config` dict (config.json) -> `SwinV2Config` kwargs and class names.

    Defaults are transformers' own; its placeholder labels (``LABEL_i``) give no class names. Each key
    read is type-checked, keys that would change the numerics beyond what this model does
    (`use_absolute_embeddings`, another `hidden_act` or `layer_norm_eps`, a `hidden_size` or
    `num_layers` that contradicts the rest) raise InputError naming the key, and other keys it does not
    know are warned about, naming `source` (see `HF_IGNORED`).
    """
    _check(hf.get("model_type") in (None, "swinv2"), f"model_type: {_shown(hf.get('model_type'))}, not 'swinv2'")
    _check(not _hf_value(hf, "use_absolute_embeddings", False, "bool"),
           "use_absolute_embeddings: true is not supported (SwinV2 has no absolute position embedding)")
    act = _hf_value(hf, "hidden_act", "gelu", "str")
    _check(act == "gelu", f"hidden_act: {act!r}; this model's MLP uses gelu")
    eps = _hf_value(hf, "layer_norm_eps", HF_LAYER_NORM_EPS, "number")
    _check(eps == HF_LAYER_NORM_EPS, f"layer_norm_eps: {eps!r}; this model's LayerNorms use {HF_LAYER_NORM_EPS}, "
           f"so its outputs would differ")
    depths = tuple(_hf_value(hf, "depths", (2, 2, 6, 2), "ints"))
    embed_dim = _hf_value(hf, "embed_dim", 96, "int")
    width = embed_dim * 2 ** max(len(depths) - 1, 0)
    for key, expected in (("hidden_size", width), ("num_layers", len(depths))):
        _check(hf.get(key, expected) == expected, f"{key}: {_shown(hf.get(key))}, but embed_dim {embed_dim} and "
               f"depths {list(depths)} make it {expected}")
    architectures = hf.get("architectures") or ["ForImageClassification"]
    _check(isinstance(architectures, list) and all(isinstance(a, str) for a in architectures),
           f"architectures: {_shown(architectures)} is not a list of strings")
    classify = any("ForImageClassification" in a for a in architectures)
    names = _hf_class_names(hf) if classify else []
    ours = hf.get("swinv2", {})
    _check(isinstance(ours, Mapping), f"swinv2: a JSON {type(ours).__name__}, not an object")
    unknown = sorted(k for k in hf if k not in HF_IGNORED and k not in _HF_READ)
    if unknown:
        log.warning("%s: ignoring keys this model does not use: %s", source, ", ".join(map(_shown, unknown)))
    kwargs = dict(
        img_size=_hf_value(hf, "image_size", 224, "size"), patch_size=_hf_value(hf, "patch_size", 4, "int"),
        in_chans=_hf_value(hf, "num_channels", 3, "int"), num_classes=len(names), embed_dim=embed_dim,
        depths=depths, num_heads=tuple(_hf_value(hf, "num_heads", (3, 6, 12, 24), "ints")),
        window_size=_hf_value(hf, "window_size", 7, "int"),
        pretrained_window_sizes=tuple(_hf_value(hf, "pretrained_window_sizes", None, "ints")
                                      if hf.get("pretrained_window_sizes") else (0,) * len(depths)),
        mlp_ratio=_hf_value(hf, "mlp_ratio", 4.0, "number"), qkv_bias=_hf_value(hf, "qkv_bias", True, "bool"),
        drop_rate=_hf_value(hf, "hidden_dropout_prob", 0.0, "number"),
        attn_drop_rate=_hf_value(hf, "attention_probs_dropout_prob", 0.0, "number"),
        drop_path_rate=_hf_value(hf, "drop_path_rate", 0.1, "number"),
    )
    if names and all(s == f"LABEL_{i}" for i, s in enumerate(names)):
        names = []
    return kwargs, names or None


# The keys `hf_config_to_kwargs` reads.
_HF_READ = frozenset(HF_KEYS.values()) | {"model_type", "use_absolute_embeddings", "hidden_act", "layer_norm_eps",
                                          "hidden_size", "num_layers", "architectures"}


def hf_config_from_kwargs(cfg: Mapping[str, Any], class_names: list[str] | None = None, *,
                          extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`SwinV2Config.to_dict()` -> a transformers `Swinv2Config` dict that `from_pretrained` reads offline.

    `extra` is stored under the key ``"swinv2"`` (transformers keeps unknown keys as they are): what
    our config.json carries beyond transformers' (the registry name and the exact eval transform).
    """
    _check(cfg["cpb_hidden_dim"] == CPB_HIDDEN and cfg["patch_norm"],
           f"transformers hard-codes patch_norm=True and a CPB MLP of width {CPB_HIDDEN}")
    # Its Swinv2Layer compares an int window with the map size: one square window for every stage.
    _check(isinstance(cfg["window_size"], int) and all(isinstance(p, int) for p in cfg["pretrained_window_sizes"]),
           f"transformers' Swinv2Config has one square window for all stages and square pre-training windows; "
           f"this model has window_size={cfg['window_size']}, pretrained_window_sizes={cfg['pretrained_window_sizes']}")
    _check(not cfg.get("extra_norm_every_n_blocks"),
           "transformers' Swinv2 has no SwinV2-H/G extra norms (extra_norm_every_n_blocks)")
    n = cfg["num_classes"]
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(n)]
    return {
        "architectures": ["Swinv2ForImageClassification" if n else "Swinv2Model"],
        "model_type": "swinv2", "image_size": list(cfg["img_size"]), "patch_size": cfg["patch_size"],
        "num_channels": cfg["in_chans"], "embed_dim": cfg["embed_dim"], "depths": list(cfg["depths"]),
        "num_heads": list(cfg["num_heads"]), "window_size": cfg["window_size"],
        "pretrained_window_sizes": list(cfg["pretrained_window_sizes"]), "mlp_ratio": cfg["mlp_ratio"],
        "qkv_bias": cfg["qkv_bias"], "hidden_dropout_prob": cfg["drop_rate"],
        "attention_probs_dropout_prob": cfg["attn_drop_rate"], "drop_path_rate": cfg["drop_path_rate"],
        "hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5, "initializer_range": 0.02,
        "encoder_stride": cfg["patch_size"] * 2 ** (len(cfg["depths"]) - 1),
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)}, "torch_dtype": "float32",
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
    _check(interpolation in PIL_RESAMPLE, f"transformers has no resampling filter {interpolation!r} "
           f"(known: {', '.join(PIL_RESAMPLE)})")
    return {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": resize_size(size, preprocess["crop_pct"])},
        "resample": PIL_RESAMPLE[interpolation],
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(preprocess["mean"]), "image_std": list(preprocess["std"]),
    }


__all__ = ["Conversion", "DERIVED_KEYS", "FORMATS", "convert", "convert_state_dict", "detect_format",
           "from_native", "hf_config_from_kwargs", "hf_config_to_kwargs", "hf_preprocessor_config", "map_head_rows",
           "to_native", "tv_derived_buffers", "unwrap"]
