"""Pure state-dict mappings between the SwinV2 weight formats; no file I/O, no network.

Each format is a record of `formats.py`: its key table (templates, see `Template`) and the tensor
steps around it, named in the record and defined here in `STEPS`. Reading unwraps ``model`` /
``state_dict`` / ``module.`` and drops the derived buffers first, whatever the format.

  * native / official: our names, which are the official microsoft/Swin-Transformer ones: no step.
  * timm: its key table only (merging at the START of stage i+1, ``head.fc``).
  * hf: separate query/key/value weights (merge_qkv / split_qkv), ``layernorm_before/after``; a
    `Swinv2Model` has no ``swinv2.`` prefix (hf_prefix).
  * torchvision: one full ``qkv.bias`` whose k part is ignored (split_tv_bias / merge_tv_bias) and
    persistent derived buffers (tv_buffers, which needs ``config.window_size``).
  * swinv1 (read only): official Swin V1 weights initialising a V2 model: patch embedding, qkv / proj,
    MLPs, merging reduction, final norm and head transfer; the V1 pre-norms, the V1 merging norm (over
    4C, before the reduction), the relative-position-bias tables and the k bias are dropped; the
    V2-only logit scales, CPB MLPs and post-norms keep the V2 model's init.
  * simmim (read only): the encoder of a SimMIM pretraining under the classifier's names; the mask
    token and the decoder are dropped (pretraining only).
  * mmpretrain (read only): its classifier (``backbone.`` + ``head.fc``), or the backbone of an mmdet /
    mmseg model, whose neck and heads are dropped; its merging weights come in `nn.Unfold` order.

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
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import InputError
from ..model.transformer import DERIVED_KEYS
from ..model.windows import pair, relative_position_index
from .formats import CPB_HIDDEN, FORMATS, READABLE, WeightFormat, get_format, is_timm_layout, writable_format

log = logging.getLogger(__name__)


class Template:
    """A key pattern such as ``features.{2i+1}.{j}.{*}``: matched against keys, formatted from values."""

    _FIELD = re.compile(r"\{(?:(\d*)([ij])([+-]\d+)?|(\*))\}")

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields: list[tuple[int, str, int] | None] = []  # (a, var, b) for a*var+b; None for {*}
        parts, pos = [], 0
        for m in self._FIELD.finditer(text):
            parts.append(re.escape(text[pos : m.start()]))
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


# Each format's key table, compiled; the first rule that matches wins, in both directions.
_RULES = {f.name: [(Template(a), Template(b)) for a, b in f.rules] for f in FORMATS}
_REINITIALISED = {f.name: re.compile(f.reinitialised) for f in FORMATS if f.reinitialised}
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")


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
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _drop_derived(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in DERIVED_KEYS}


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """Guess the format of an unwrapped state dict from its keys: the last record of `formats.FORMATS`
    whose test accepts them (later records are the more specific layouts)."""
    keys = list(sd)
    for fmt in reversed(FORMATS):
        if fmt.detect is not None and fmt.detect(keys):
            return fmt.name
    raise InputError(
        f"cannot tell the format of this state dict (first keys: {', '.join(keys[:4]) or 'none'}); "
        f"pass src= one of {', '.join(READABLE)}"
    )


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
    return sorted(found, key=found.__getitem__)


# --------------------------------------------------------------------------- tensor operations


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


def unfold_to_official_reduction(weight: Tensor) -> Tensor:
    """A merging `reduction.weight` (2C, 4C) from mmcv's nn.Unfold input order to the official one.

    Unfold lays the 4C inputs out channel-major, c * 4 + (2 * row + col); the official merging
    concatenates the four neighbours [x(0,0), x(1,0), x(0,1), x(1,1)], neighbour-major.
    """
    out_ch, in_ch = weight.shape
    return weight.reshape(out_ch, in_ch // 4, 4)[:, :, [0, 2, 1, 3]].transpose(1, 2).reshape(out_ch, in_ch)


# --------------------------------------------------------------------------- the steps of the records
#
# Each step takes the state dict (foreign names before "rename" when reading, native ones before it
# when writing), the `Conversion` it records drops in, the format's record and the model config (None
# when reading); it returns the state dict (changed in place or new).

Step = Callable[[dict[str, Tensor], Conversion, WeightFormat, Any], dict[str, Tensor]]


def _hf_prefix(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """A `Swinv2Model` (no classifier) has no ``swinv2.`` prefix: add it, so one key table reads both."""
    if any(k.startswith("swinv2.") for k in sd):
        return sd
    return {k if k.startswith("classifier.") else "swinv2." + k: v for k, v in sd.items()}


def _merge_qkv(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """``attn.{q,k,v}.weight`` (C, C) each -> ``attn.qkv.weight`` (3C, C), in place."""
    for p in _blocks(sd):
        parts = [sd.pop(f"{p}attn.{n}.weight", None) for n in "qkv"]
        if all(t is None for t in parts):
            continue
        _check(all(t is not None for t in parts), f"{p}attn: query, key and value weights must all be present")
        qkv = cast("list[Tensor]", parts)  # all present: _check raised otherwise
        square = qkv[0].ndim == 2 and qkv[0].shape[0] == qkv[0].shape[1]
        _check(
            len({tuple(t.shape) for t in qkv}) == 1 and square,
            f"{p}attn: query/key/value weights must be square and equal, got {[tuple(t.shape) for t in qkv]}",
        )
        sd[p + "attn.qkv.weight"] = torch.cat(qkv, dim=0)
    return sd


def _split_qkv(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """``attn.qkv.weight`` (3C, C) -> ``attn.{q,k,v}.weight`` (C, C) each, in place."""
    for p in _blocks(sd):
        w = sd.pop(p + "attn.qkv.weight", None)
        if w is None:
            continue
        _check(
            w.ndim == 2 and w.shape[0] == 3 * w.shape[1], f"{p}attn.qkv.weight: expected (3C, C), got {tuple(w.shape)}"
        )
        for name, part in zip("qkv", w.chunk(3, dim=0)):
            sd[f"{p}attn.{name}.weight"] = part.clone()
    return sd


def _split_tv_bias(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    _split_full_bias(sd, "attn.qkv_bias", conv.dropped, "torchvision k bias; ignored by its forward too")
    return sd


def _merge_tv_bias(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """``q_bias``, ``v_bias`` (C,) -> ``qkv_bias`` (3C,) with a zero k part, in place."""
    for p in _blocks(sd):
        q, v = sd.pop(p + "attn.q_bias", None), sd.pop(p + "attn.v_bias", None)
        if q is None and v is None:
            continue
        _check(
            q is not None and v is not None and q.shape == v.shape and q.ndim == 1,
            f"{p}attn: q_bias and v_bias must both be present, (C,) each",
        )
        assert q is not None and v is not None  # _check raised otherwise
        sd[p + "attn.qkv_bias"] = torch.cat((q, torch.zeros_like(q), v))
    return sd


def _tv_buffers(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """torchvision's persistent derived buffers, for the one window its SwinTransformer has."""
    _check(config is not None, "writing torchvision weights needs the model config (for its window size)")
    windows = set(config.stage_window_sizes)
    _check(
        len(windows) == 1,
        f"torchvision's SwinTransformer has one window for all stages (window_size=[h, w]); "
        f"this model's differ per stage: {config.window_size}",
    )
    if any(pair(p) != (0, 0) for p in config.pretrained_window_sizes):
        log.warning(
            "torchvision has no pretrained_window_size: its CPB table is normalised by the window "
            "(%s), not by %s, so its outputs will differ",
            config.window_size,
            config.pretrained_window_sizes,
        )
    table, index = tv_derived_buffers(windows.pop())
    for p in _blocks(sd):
        sd[p + "attn.relative_coords_table"] = table.clone()
        sd[p + "attn.relative_position_index"] = index.clone()
    return sd


def _fixed_architecture(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """timm's SwinTransformerV2, transformers and torchvision have no SwinV2-H/G extra main-branch norm
    and hard-code a CPB MLP of width CPB_HIDDEN."""
    extra = [k for k in sd if ".norm3." in k]
    _check(
        not extra,
        f"{fmt.name} has no SwinV2-H/G extra norms (extra_norm_every_n_blocks); these weights have "
        f"{len(extra)} such tensors ({extra[0] if extra else ''}): write native / official instead",
    )
    cpb = [v for k, v in sd.items() if k.endswith("attn.cpb_mlp.0.weight")]
    _check(
        all(t.shape[0] == CPB_HIDDEN for t in cpb),
        f"{fmt.name} hard-codes a CPB MLP of width {CPB_HIDDEN}; these weights have {cpb[0].shape[0] if cpb else '?'}",
    )
    return sd


def _timm_layout(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """SwinV1 weights saved by timm: its key table first (merging at the start of a stage, head.fc)."""
    return _rename(sd, "timm", to_native=True)[0] if is_timm_layout(list(sd)) else sd


def _drop_v1(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.relative_position_bias_table"):
            conv.dropped[k] = "V1 relative position bias table; V2 computes its bias with the CPB MLP"
        elif re.search(r"blocks\.\d+\.norm[12]\.(weight|bias)$", k):
            conv.dropped[k] = "V1 pre-norm; V2 post-norms keep their V2 init"
        elif re.search(r"downsample\.norm\.(weight|bias)$", k):
            conv.dropped[k] = "V1 merging norm over 4C before the reduction; V2 normalises 2C after it"
        else:
            out[k] = v
    return out


def _split_v1_bias(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    _split_full_bias(sd, "attn.qkv.bias", conv.dropped, "V1 k bias; V2 fixes the k bias at zero")
    return sd


def _drop_simmim(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """The parts of a SimMIM model only pretraining uses: the mask token and the decoder."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mask_token"):
            conv.dropped[k] = "SimMIM mask token (pretraining only)"
        elif k.startswith("decoder."):
            conv.dropped[k] = "SimMIM decoder (pretraining only)"
        else:
            out[k] = v
    return out


_MM_STAGE = re.compile(r"backbone\.stages\.(\d+)\.")
_MM_STAGE_NORM = re.compile(r"backbone\.norm(\d+)\.(.+)")
_REDUCTION = re.compile(r"layers\.\d+\.downsample\.reduction\.weight")


def _mmpretrain_parts(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """mmpretrain's backbone under ``backbone.`` (a bare backbone gets the prefix), its last stage's output
    norm as the final norm (``backbone.norm``, as mmpretrain's classifiers use it), and the rest of a
    detector or segmenter (its other stage norms, neck and heads) dropped, naming the part."""
    if not any(k.startswith("backbone.") for k in sd):
        sd = {"backbone." + k: v for k, v in sd.items()}
    last = max((int(m.group(1)) for k in sd if (m := _MM_STAGE.match(k))), default=-1)
    out = {}
    for key, value in sd.items():
        if m := _MM_STAGE_NORM.fullmatch(key):
            if int(m.group(1)) == last:
                out[f"backbone.norm.{m.group(2)}"] = value
            else:
                conv.dropped[key] = (
                    f"output norm of stage {m.group(1)} (a detection / segmentation backbone's; "
                    f"a classifier normalises the last stage only)"
                )
        elif key.startswith(("backbone.", "head.")):
            out[key] = value
        else:
            conv.dropped[key] = f"the {key.split('.')[0]} of a detector or segmenter, not the backbone"
    return out


def _unfold_reduction(sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any) -> dict[str, Tensor]:
    """mmcv's merging (`nn.Unfold`) orders the reduction's inputs channel-major; ours neighbour-major."""
    for key in [k for k in sd if _REDUCTION.fullmatch(k)]:
        w = sd[key]
        _check(w.ndim == 2 and w.shape[1] % 4 == 0, f"{key}: expected (2C, 4C), got {tuple(w.shape)}")
        sd[key] = unfold_to_official_reduction(w)
    return sd


# The steps a record may name ("rename", its key table, is applied by `_run` itself).
STEPS: dict[str, Step] = {
    "hf_prefix": _hf_prefix,
    "merge_qkv": _merge_qkv,
    "split_qkv": _split_qkv,
    "split_tv_bias": _split_tv_bias,
    "merge_tv_bias": _merge_tv_bias,
    "tv_buffers": _tv_buffers,
    "fixed_architecture": _fixed_architecture,
    "timm_layout": _timm_layout,
    "drop_v1": _drop_v1,
    "split_v1_bias": _split_v1_bias,
    "drop_simmim": _drop_simmim,
    "mmpretrain_parts": _mmpretrain_parts,
    "unfold_reduction": _unfold_reduction,
}


def _run(
    steps: tuple[str, ...], sd: dict[str, Tensor], conv: Conversion, fmt: WeightFormat, config: Any, *, to_native: bool
) -> dict[str, Tensor]:
    for step in steps:
        if step == "rename":
            sd, unmapped = _rename(sd, fmt.name, to_native)
            conv.unmapped += unmapped
        else:
            sd = STEPS[step](sd, conv, fmt, config)
    return sd


# --------------------------------------------------------------------------- to / from native


def to_native(sd: Mapping[str, Any], src: str = "auto") -> Conversion:
    """Map a state dict of format `src` (or "auto") to native names. See the module docstring."""
    flat = unwrap(sd)
    if src == "auto":
        src = detect_format(flat)
        log.info("weights format detected: %s", src)
    fmt = get_format(src)
    _check(fmt.readable, f"weights format {src!r} cannot be read; readable: {', '.join(READABLE)}")
    conv = Conversion(src, "native", {}, reinitialised=_REINITIALISED.get(src))
    conv.state_dict = _run(fmt.read or (), _drop_derived(flat), conv, fmt, None, to_native=True)
    return conv


def from_native(sd: Mapping[str, Tensor], dst: str, *, config: Any = None) -> Conversion:
    """Map a native state dict to format `dst`. torchvision needs `config` (its window size)."""
    fmt = writable_format(dst)
    conv = Conversion("native", dst, {})
    conv.state_dict = _run(fmt.write or (), _drop_derived(dict(sd)), conv, fmt, config, to_native=False)
    if conv.unmapped:
        log.warning(
            "%d key(s) have no %s name and were kept as they are: %s",
            len(conv.unmapped),
            dst,
            ", ".join(conv.unmapped[:5]),
        )
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


def convert_state_dict(
    sd: Mapping[str, Any], src: str = "auto", dst: str = "native", *, config: Any = None
) -> dict[str, Tensor]:
    """Map a SwinV2 state dict between formats: any readable one of `formats.FORMATS` in, any writable
    one out.

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


__all__ = [
    "Conversion",
    "DERIVED_KEYS",
    "STEPS",
    "Template",
    "convert",
    "convert_state_dict",
    "detect_format",
    "from_native",
    "map_head_rows",
    "to_native",
    "tv_derived_buffers",
    "unfold_to_official_reduction",
    "unwrap",
]
