"""The weight formats: one record each, read by everything that names a format.

A record says what a format is called (`--src` / `--dst`, `convert_state_dict(src=, dst=)`), how its
keys are recognised, its key table (templates of native and foreign names, see `convert.Template`),
the steps that move its tensors to and from native names (the names of `convert.STEPS`, in order;
"rename" applies the key table), whether it can be written and what files it writes. `convert`
maps state dicts by these records, the factory writes files by them, `swinv2 convert` offers their
names and prints their table in its help, and the tests go through every record. A new layout is one
record here plus its key table (and a step in `convert` if its tensors need more than renaming).

The records are in the order the command line lists them; `detect_format` tries them LAST TO FIRST,
so a later record is a more specific layout whose keys an earlier test could also accept: SimMIM's
``encoder.layers.`` look like a Hugging Face `Swinv2Model`, SwinV1 and mmpretrain checkpoints carry
timm's ``head.fc``, and every layout with ``layers.`` or ``patch_embed.`` looks native.

This module imports no torch: the command line builds its options from it before anything loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

FOLDER = "/"  # in `WeightFormat.writes`: a folder of files, not one file
CPB_HIDDEN = 512  # timm, transformers and torchvision hard-code the CPB MLP width (step fixed_architecture)


@dataclass(frozen=True)
class WeightFormat:
    """One weight format: its name, how it is recognised, its key table and how it is written."""

    name: str
    summary: str  # one line for `swinv2 convert --help`
    detect: Callable[[Sequence[str]], bool] | None = None  # keys of an unwrapped state dict -> this layout?
    rules: tuple[tuple[str, str], ...] = ()  # key table: (native template, this format's template)
    read: tuple[str, ...] | None = ("rename",)  # steps from its keys to native ones (`convert.STEPS`)
    write: tuple[str, ...] | None = None  # steps from native keys to its own; None: read only
    writes: tuple[str, ...] = ()  # suffixes of the files it writes (FOLDER: a folder)
    guessed_from: tuple[str, ...] = ()  # output suffixes that select it when no --dst is given
    wrap: str | None = None  # the key a torch file of it keeps the state dict under
    needs_model: bool = False  # writing it needs the architecture, not a key mapping alone
    reinitialised: str | None = None  # regex of native keys it cannot provide (left at init)

    @property
    def readable(self) -> bool:
        return self.read is not None

    @property
    def writable(self) -> bool:
        return self.write is not None


# --------------------------------------------------------------------------- how each layout is recognised


def _has_prefix(*prefixes: str) -> Callable[[Sequence[str]], bool]:
    return lambda keys: any(k.startswith(prefixes) for k in keys)


def is_timm_layout(keys: Sequence[str]) -> bool:
    """timm merges at the start of stages 1.. (official: at the end of 0..) and names the head head.fc."""
    if "head.fc.weight" in keys:
        return True
    has_merge = any(re.match(r"layers\.\d+\.downsample\.", k) for k in keys)
    return has_merge and not any(k.startswith("layers.0.downsample.") for k in keys)


def _is_torchvision(keys: Sequence[str]) -> bool:
    return any(k.startswith("features.0.0.") or re.match(r"features\.\d+\.\d+\.attn\.", k) for k in keys)


def _is_swinv1(keys: Sequence[str]) -> bool:
    """A relative-position-bias table (V1) and no CPB MLP (V2)."""
    return any(k.endswith("relative_position_bias_table") for k in keys) and not any(".cpb_mlp." in k for k in keys)


def is_mmpretrain_layout(keys: Sequence[str]) -> bool:
    """mmpretrain's SwinV2 names its stages `stages.i` and its attention `attn.w_msa` with a CPB MLP;
    under ``backbone.`` in a classifier, detector or segmenter."""
    return any(k.removeprefix("backbone.").startswith("stages.") and ".w_msa.cpb_mlp." in k for k in keys)


# --------------------------------------------------------------------------- key tables
#
# (native template, foreign template); the first rule that matches wins, in both directions. Templates:
# ``{i}`` stage, ``{j}`` block, ``{2i+1}`` an index computed from ``i``, ``{*}`` the rest of the key.

TIMM_RULES = (
    ("layers.{i}.downsample.{*}", "layers.{i+1}.downsample.{*}"),
    ("head.{*}", "head.fc.{*}"),
    ("{*}", "{*}"),
)

HF_RULES = (
    ("patch_embed.proj.{*}", "swinv2.embeddings.patch_embeddings.projection.{*}"),
    ("patch_embed.norm.{*}", "swinv2.embeddings.norm.{*}"),
    ("layers.{i}.blocks.{j}.norm1.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.layernorm_before.{*}"),
    ("layers.{i}.blocks.{j}.norm2.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.layernorm_after.{*}"),
    ("layers.{i}.blocks.{j}.mlp.fc1.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.intermediate.dense.{*}"),
    ("layers.{i}.blocks.{j}.mlp.fc2.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.output.dense.{*}"),
    ("layers.{i}.blocks.{j}.attn.logit_scale", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.logit_scale"),
    (
        "layers.{i}.blocks.{j}.attn.cpb_mlp.{*}",
        "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.continuous_position_bias_mlp.{*}",
    ),
    # q/k/v weights: the split `qkv.weight` (steps split_qkv / merge_qkv), under these interim names
    ("layers.{i}.blocks.{j}.attn.q.weight", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.query.weight"),
    ("layers.{i}.blocks.{j}.attn.k.weight", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.key.weight"),
    ("layers.{i}.blocks.{j}.attn.v.weight", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.value.weight"),
    ("layers.{i}.blocks.{j}.attn.q_bias", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.query.bias"),
    ("layers.{i}.blocks.{j}.attn.v_bias", "swinv2.encoder.layers.{i}.blocks.{j}.attention.self.value.bias"),
    ("layers.{i}.blocks.{j}.attn.proj.{*}", "swinv2.encoder.layers.{i}.blocks.{j}.attention.output.dense.{*}"),
    ("layers.{i}.downsample.{*}", "swinv2.encoder.layers.{i}.downsample.{*}"),
    ("norm.{*}", "swinv2.layernorm.{*}"),
    ("head.{*}", "classifier.{*}"),
)

TORCHVISION_RULES = (
    ("patch_embed.proj.{*}", "features.0.0.{*}"),
    ("patch_embed.norm.{*}", "features.0.2.{*}"),
    ("layers.{i}.blocks.{j}.mlp.fc1.{*}", "features.{2i+1}.{j}.mlp.0.{*}"),
    ("layers.{i}.blocks.{j}.mlp.fc2.{*}", "features.{2i+1}.{j}.mlp.3.{*}"),
    # one (3C,) bias = [q_bias, k part, v_bias] (steps merge_tv_bias / split_tv_bias), under this interim name
    ("layers.{i}.blocks.{j}.attn.qkv_bias", "features.{2i+1}.{j}.attn.qkv.bias"),
    ("layers.{i}.blocks.{j}.{*}", "features.{2i+1}.{j}.{*}"),
    ("layers.{i}.downsample.{*}", "features.{2i+2}.{*}"),
    ("norm.{*}", "norm.{*}"),
    ("head.{*}", "head.{*}"),
)

# The official SimMIM (microsoft/SimMIM, microsoft/Swin-Transformer `models/simmim.py`; its released
# SwinV2 weights name the CPB MLP `rpe_mlp`, renamed as the official loader does) and ours
# (`swinv2.model.simmim`): the encoder under ``encoder.``; the mask token and decoder are dropped first.
SIMMIM_RULES = (
    ("layers.{i}.blocks.{j}.attn.cpb_mlp.{*}", "encoder.layers.{i}.blocks.{j}.attn.rpe_mlp.{*}"),
    ("{*}", "encoder.{*}"),
)

# mmpretrain's `SwinTransformerV2` under ``backbone.`` (step mmpretrain_parts adds the prefix to a bare
# backbone, and names the last stage's output norm `norm{last}` `backbone.norm`). Its stage i > 0 starts
# with the merging that ours ends stage i - 1 with (its `nn.Unfold` input order: step unfold_reduction);
# its FFN is mmcv's (layers.0.0 = fc1, layers.1 = fc2); attention sits under `w_msa`; a classifier's head
# is mmpretrain's LinearClsHead.
MMPRETRAIN_RULES = (
    ("patch_embed.proj.{*}", "backbone.patch_embed.projection.{*}"),
    ("patch_embed.norm.{*}", "backbone.patch_embed.norm.{*}"),
    ("layers.{i}.downsample.{*}", "backbone.stages.{i+1}.downsample.{*}"),
    ("layers.{i}.blocks.{j}.attn.{*}", "backbone.stages.{i}.blocks.{j}.attn.w_msa.{*}"),
    ("layers.{i}.blocks.{j}.mlp.fc1.{*}", "backbone.stages.{i}.blocks.{j}.ffn.layers.0.0.{*}"),
    ("layers.{i}.blocks.{j}.mlp.fc2.{*}", "backbone.stages.{i}.blocks.{j}.ffn.layers.1.{*}"),
    ("layers.{i}.blocks.{j}.{*}", "backbone.stages.{i}.blocks.{j}.{*}"),  # norm1, norm2, SwinV2-H/G's norm3
    ("norm.{*}", "backbone.norm.{*}"),
    ("head.{*}", "head.fc.{*}"),
)

# Native parameters a V1 checkpoint cannot provide: they keep the V2 model's initialisation.
V1_REINITIALISED = (
    r"(attn\.logit_scale|attn\.cpb_mlp\.\d+\.(weight|bias)|blocks\.\d+\.norm[12]\.(weight|bias)"
    r"|downsample\.norm\.(weight|bias))$"
)

TORCH_FILES = (".pth", ".pt", ".bin", ".safetensors")  # a state dict as a torch file, or a plain .safetensors


# --------------------------------------------------------------------------- the records

FORMATS: tuple[WeightFormat, ...] = (
    WeightFormat(
        "native",
        "our .safetensors: config, classes, eval preprocessing inside",
        _has_prefix("patch_embed.", "layers."),
        read=(),
        write=(),
        writes=(".safetensors",),
        guessed_from=(".safetensors",),
        needs_model=True,
    ),
    WeightFormat(
        "official",
        "microsoft/Swin-Transformer: {'model': state dict}",
        read=(),
        write=(),
        writes=(".pth", ".pt", ".bin"),
        guessed_from=(".pth", ".pt", ".bin"),
        wrap="model",
    ),
    WeightFormat(
        "timm",
        "timm swinv2_*: merging at a stage's start, head.fc",
        is_timm_layout,
        TIMM_RULES,
        write=("fixed_architecture", "rename"),
        writes=TORCH_FILES,
    ),
    WeightFormat(
        "hf",
        "transformers Swinv2ForImageClassification / Swinv2Model",
        _has_prefix("swinv2.", "embeddings.patch_embeddings.", "encoder.layers."),
        HF_RULES,
        read=("hf_prefix", "rename", "merge_qkv"),
        write=("fixed_architecture", "split_qkv", "rename"),
        writes=(FOLDER,),
        guessed_from=("",),
        needs_model=True,
    ),
    WeightFormat(
        "torchvision",
        "torchvision swin_v2_t/s/b: features.N, derived buffers",
        _is_torchvision,
        TORCHVISION_RULES,
        read=("rename", "split_tv_bias"),
        write=("fixed_architecture", "merge_tv_bias", "tv_buffers", "rename"),
        writes=TORCH_FILES,
        needs_model=True,
    ),
    WeightFormat(
        "swinv1",
        "official Swin V1: shared parts; V2-only ones keep their init",
        _is_swinv1,
        read=("timm_layout", "drop_v1", "split_v1_bias"),
        reinitialised=V1_REINITIALISED,
    ),
    WeightFormat(
        "simmim",
        "SimMIM pretraining, official or ours: its encoder",
        _has_prefix("encoder.patch_embed."),
        SIMMIM_RULES,
        read=("drop_simmim", "rename"),
    ),
    WeightFormat(
        "mmpretrain",
        "mmpretrain SwinTransformerV2; mmdet / mmseg backbones",
        is_mmpretrain_layout,
        MMPRETRAIN_RULES,
        read=("mmpretrain_parts", "rename", "unfold_reduction"),
    ),
)

BY_NAME = {f.name: f for f in FORMATS}
READABLE = tuple(f.name for f in FORMATS if f.readable)
WRITABLE = tuple(f.name for f in FORMATS if f.writable)


def get_format(name: str) -> WeightFormat:
    """The record of format `name`; InputError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise InputError(f"unknown weights format {name!r}; known: {', '.join(READABLE)}") from None


def writable_format(name: str) -> WeightFormat:
    """The record of format `name` if it can be written; InputError naming the writable ones otherwise."""
    fmt = BY_NAME.get(name)
    if fmt is None or not fmt.writable:
        raise InputError(f"cannot write weights format {name!r}; writable: {', '.join(WRITABLE)}")
    return fmt


def guess_write_format(path: str | os.PathLike[str]) -> str:
    """The format an output path asks for by its suffix (`WeightFormat.guessed_from`): native for
    .safetensors, official for .pth/.pt/.bin, hf for a folder (no suffix)."""
    suffix = Path(path).suffix
    found = next((f.name for f in FORMATS if f.writable and suffix in f.guessed_from), None)
    if found is None:
        raise InputError(f"{path}: cannot tell the format to write from {suffix!r}; pass --dst ({', '.join(WRITABLE)})")
    return found


def table() -> str:
    """The formats as a plain-text table (name, read / write, what it writes, what it is): the help of
    `swinv2 convert`."""
    rows = [
        (
            f.name,
            "read" + (", write" if f.writable else ""),
            " ".join("folder" if s == FOLDER else s for s in f.writes) or "-",
            f.summary,
        )
        for f in FORMATS
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


__all__ = [
    "BY_NAME",
    "CPB_HIDDEN",
    "FOLDER",
    "FORMATS",
    "READABLE",
    "WRITABLE",
    "WeightFormat",
    "get_format",
    "guess_write_format",
    "is_mmpretrain_layout",
    "is_timm_layout",
    "table",
    "writable_format",
]
