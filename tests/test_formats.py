"""The weight-format records (`swinv2.weights.formats`): the command line offers exactly their names,
every step they name exists, and every readable format round-trips through `swinv2 convert` bit for bit.

Writable formats are written by our own writer; the read-only ones (SwinV1, SimMIM, mmpretrain and
the mmdet / mmseg models on its backbone) are built here from our weights by their libraries' key
rules, written out independently of the converter, so a mistake in its key table cannot cancel out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from randomize import randomize_
from swinv2 import cli, create_model
from swinv2.model.simmim import SimMIM
from swinv2.weights.convert import STEPS, convert, detect_format, unwrap
from swinv2.weights.factory import load_model
from swinv2.weights.files import read_state_dict, write_weights
from swinv2.weights.formats import FOLDER, FORMATS, READABLE, WRITABLE, get_format, guess_write_format, writable_format

MICRO = "swinv2_micro_window4_32"  # 2 stages: embed 24, depths (2, 2), heads (2, 4), window 4, 32 px


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model(MICRO, num_classes=7)).eval()


def _convert_subparser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["convert"]


def _choices(dest: str) -> list[str]:
    return list(next(a for a in _convert_subparser()._actions if a.dest == dest).choices)


# --------------------------------------------------------------------------- the records and who reads them


def test_the_cli_offers_exactly_the_records_names():
    assert _choices("src_format") == ["auto", *(f.name for f in FORMATS if f.readable)]
    assert _choices("dst_format") == [f.name for f in FORMATS if f.writable]
    assert "simmim" in _choices("src_format") and "mmpretrain" in _choices("src_format")


def test_convert_help_tables_every_format(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    rows = {cells[0]: cells for line in out.splitlines() if len(cells := re.split(r"\s{2,}", line.strip())) == 4}
    for f in FORMATS:
        assert rows[f.name][1] == ("read, write" if f.writable else "read"), rows[f.name]
        assert rows[f.name][3] == f.summary


def test_every_step_a_record_names_exists_and_every_key_table_is_used():
    for f in FORMATS:
        steps = (f.read or ()) + (f.write or ())
        assert set(steps) <= set(STEPS) | {"rename"}, f.name
        assert bool(f.rules) == ("rename" in steps), f.name  # a key table nobody applies, or renaming by none


def test_names_are_unique_and_writable_formats_say_what_they_write():
    assert len({f.name for f in FORMATS}) == len(FORMATS)
    for f in FORMATS:
        assert not f.writable or f.writes, f.name
        assert set(f.guessed_from) <= {("" if s == FOLDER else s) for s in f.writes}, f.name


@pytest.mark.parametrize("suffix", sorted({s for f in FORMATS for s in f.guessed_from}))
def test_the_output_suffix_selects_the_one_format_that_claims_it(suffix):
    claims = [f.name for f in FORMATS if suffix in f.guessed_from]
    assert len(claims) == 1 and guess_write_format(f"out/w{suffix}") == claims[0]


def test_an_unknown_suffix_or_name_is_refused_naming_the_formats():
    with pytest.raises(ValueError, match="pass --dst") as e:
        guess_write_format("w.npz")
    assert all(name in str(e.value) for name in WRITABLE)
    with pytest.raises(ValueError, match="unknown weights format 'onnx'"):
        get_format("onnx")
    read_only = next(f.name for f in FORMATS if not f.writable)
    with pytest.raises(ValueError, match=f"cannot write weights format '{read_only}'"):
        writable_format(read_only)


# --------------------------------------------------------------------------- read-only layouts, built here


def _v1_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """Official Swin V1 names of our tensors: a full qkv bias (k part random: V1 learns it), pre-norms,
    a merging norm over 4C, relative-position-bias tables; no logit scale or CPB MLP."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in sd.items():
        if re.search(r"attn\.(logit_scale|cpb_mlp\.)", k):
            continue
        if k.endswith("attn.q_bias"):
            p = k[: -len("q_bias")]
            v_bias = sd[p + "v_bias"]
            out[p + "qkv.bias"] = torch.cat((v, torch.randn(v.shape, generator=g), v_bias))
            out[p + "relative_position_bias_table"] = torch.randn(49, 2, generator=g)
        elif k.endswith("attn.v_bias"):
            continue
        elif k.endswith("downsample.norm.weight") or k.endswith("downsample.norm.bias"):
            out[k] = torch.randn(2 * v.shape[0], generator=g)  # V1 normalises the 4C concatenation
        else:
            out[k] = v
    return {"model": out}


def _simmim_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """A real SimMIM model of ours around our encoder, saved the official way: its `encoder.*` with the
    CPB MLP under the released SwinV2 name `rpe_mlp`, the mask token and the decoder."""
    encoder = create_model(MICRO, num_classes=0)
    encoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})
    state = SimMIM(encoder).state_dict()
    assert {"mask_token", "decoder.0.weight"} <= set(state)
    return {
        "model": {
            ("encoder." + k if k == "mask_token" else k).replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in state.items()
        }
    }


_MM_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(attn|mlp\.fc1|mlp\.fc2|norm1|norm2|norm3)\.(.+)")
_MM_PART = {
    "attn": "attn.w_msa",
    "mlp.fc1": "ffn.layers.0.0",
    "mlp.fc2": "ffn.layers.1",
    "norm1": "norm1",
    "norm2": "norm2",
    "norm3": "norm3",
}


def _mmpretrain_backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpretrain `SwinTransformerV2` names of our encoder tensors (its stage i > 0 starts with our
    merging i - 1, in mmcv's nn.Unfold input order), the final norm as the last stage's `norm{i}`."""
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    out = {}
    for key, value in sd.items():
        if key.startswith("patch_embed.proj."):
            key = key.replace("patch_embed.proj.", "patch_embed.projection.")
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
            key = f"stages.{int(m[1]) + 1}.downsample.{m[2]}"
            if m[2] == "reduction.weight":  # official neighbour-major -> mmcv's unfold channel-major order
                o, i = value.shape
                value = value.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)
        elif m := _MM_BLOCK.fullmatch(key):
            key = f"stages.{m[1]}.blocks.{m[2]}.{_MM_PART[m[3]]}.{m[4]}"
        elif key.startswith("norm."):
            key = f"norm{last}." + key[len("norm.") :]
        elif key.startswith("head."):
            continue
        out[key] = value
    return out


def _mmpretrain_classifier(sd: dict[str, torch.Tensor]) -> dict:
    """An mmpretrain ImageClassifier checkpoint: `backbone.*`, LinearClsHead `head.fc.*`, a derived buffer."""
    out = {f"backbone.{k}": v for k, v in _mmpretrain_backbone(sd).items()}
    out["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(16, 16, dtype=torch.int64)
    out |= {f"head.fc.{k[len('head.') :]}": v for k, v in sd.items() if k.startswith("head.")}
    return {"meta": {"mmengine_version": "0.10.0"}, "state_dict": out}


def _mmdet_detector(sd: dict[str, torch.Tensor]) -> dict:
    """An mmdet detector on that backbone: stage norms of every output (norm0 of stage 0 too), a neck and
    heads, no classifier."""
    out = {f"backbone.{k}": v for k, v in _mmpretrain_backbone(sd).items()}
    out["backbone.norm0.weight"], out["backbone.norm0.bias"] = torch.ones(24), torch.zeros(24)
    out["neck.lateral_convs.0.conv.weight"] = torch.ones(8, 24, 1, 1)
    out["rpn_head.rpn_cls.bias"] = torch.zeros(3)
    out["roi_head.bbox_head.fc_cls.weight"] = torch.ones(5, 8)
    return {"state_dict": out}


READ_ONLY_BUILDERS = {"swinv1": _v1_checkpoint, "simmim": _simmim_checkpoint, "mmpretrain": _mmpretrain_classifier}
# Native tensors each read-only format cannot carry: they keep a fresh model's values.
NOT_CARRIED = {
    "swinv1": re.compile(r"attn\.(logit_scale|cpb_mlp\.)|blocks\.\d+\.norm[12]\.|downsample\.norm\."),
    "simmim": re.compile(r"^head\."),
    "mmpretrain": re.compile(r"^$"),
}


def test_every_read_only_format_has_a_builder_here():
    assert set(READ_ONLY_BUILDERS) == {f.name for f in FORMATS if not f.writable}


# --------------------------------------------------------------------------- round trips


def _source_file(fmt: str, model: torch.nn.Module, tmp_path: Path) -> Path:
    """`model`'s weights as a file (or folder) of `fmt`."""
    if get_format(fmt).writable:
        suffix = get_format(fmt).writes[0]
        return write_weights(model, tmp_path / ("src" if suffix == FOLDER else f"src{suffix}"), fmt)
    path = tmp_path / "src.pth"
    torch.save(READ_ONLY_BUILDERS[fmt](model.state_dict()), path)
    return path


@pytest.mark.parametrize("fmt", READABLE)
def test_every_readable_format_round_trips_through_swinv2_convert(fmt, model, tmp_path, capsys):
    src = _source_file(fmt, model, tmp_path)
    assert detect_format(unwrap(read_state_dict(src))) == ("native" if fmt == "official" else fmt)
    out = tmp_path / "back.safetensors"
    assert cli.main(["convert", "--src", fmt, str(src), str(out), "--model", MICRO]) == 0
    said = capsys.readouterr().out
    assert f"format: {fmt};" in said and f"wrote {out} (native)" in said
    back = load_model(out).state_dict()
    skipped = NOT_CARRIED.get(fmt, re.compile(r"^$"))
    compared = [k for k in model.state_dict() if not skipped.search(k) and k in back]
    assert len(compared) > len(model.state_dict()) // 2, compared
    for k in compared:
        assert torch.equal(back[k], model.state_dict()[k]), k
    if fmt == "simmim":  # the encoder only: no head came with it
        assert not any(k.startswith("head.") for k in back)


@pytest.mark.parametrize("fmt", WRITABLE)
@pytest.mark.parametrize("index", [0, -1])
def test_every_suffix_a_writable_format_lists_reads_back(fmt, index, model, tmp_path):
    suffix = get_format(fmt).writes[index]
    path = write_weights(model, tmp_path / ("w" if suffix == FOLDER else f"w{suffix}"), fmt)
    assert path.is_dir() == (suffix == FOLDER)
    back = convert(read_state_dict(path), src=fmt).state_dict
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())


def test_simmim_converts_from_the_cli_and_drops_what_only_pretraining_uses(model, tmp_path, capsys):
    src = tmp_path / "simmim_pretrain.pth"
    torch.save(_simmim_checkpoint(model.state_dict()), src)
    out = tmp_path / "encoder.pth"
    assert cli.main(["convert", "--src", "simmim", str(src), str(out), "--dst", "official"]) == 0
    said = capsys.readouterr().out
    assert "format: simmim -> official" in said and "mask_token" in said and "decoder.0.weight" in said
    written = torch.load(out, weights_only=True)["model"]
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert written.keys() == encoder.keys()
    assert all(torch.equal(written[k], v) for k, v in encoder.items())


def test_an_mmdet_detector_gives_its_backbone_and_names_what_it_dropped(model, tmp_path, capsys):
    src = tmp_path / "faster_rcnn_swinv2.pth"
    torch.save(_mmdet_detector(model.state_dict()), src)
    out = tmp_path / "backbone.pth"
    assert cli.main(["convert", str(src), str(out), "--dst", "official"]) == 0  # detected
    said = capsys.readouterr().out
    assert "format: mmpretrain -> official" in said
    for part in (
        "neck.lateral_convs.0.conv.weight",
        "rpn_head.rpn_cls.bias",
        "roi_head.bbox_head.fc_cls.weight",
        "backbone.norm0.weight",
    ):
        assert part in said, part
    written = torch.load(out, weights_only=True)["model"]
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert written.keys() == encoder.keys()
    assert all(torch.equal(written[k], v) for k, v in encoder.items())
    # ... and as a model: the encoder (no head), the last stage's norm as its final norm.
    headless = tmp_path / "headless.safetensors"
    assert cli.main(["convert", "--src", "mmpretrain", str(src), str(headless), "--model", MICRO]) == 0
    loaded = load_model(headless)
    assert loaded.config.num_classes == 0 and torch.equal(loaded.norm.weight, model.norm.weight)


def test_the_backbones_mmpretrain_mapping_agrees_with_the_record(model):
    """serve.backbone keeps its own mmpretrain reader for stage norms; both must name every tensor alike."""
    from swinv2.serve.backbone import mmpretrain_to_native

    backbone = {k: v for k, v in _mmpretrain_backbone(model.state_dict()).items() if not re.match(r"norm\d", k)}
    theirs = mmpretrain_to_native(backbone, [])
    ours = convert(backbone, src="mmpretrain").state_dict
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("fmt", WRITABLE)
def test_only_the_formats_that_need_a_model_ask_for_model(fmt, model, tmp_path, capsys):
    """Weights that do not describe their architecture (an official .pth) convert by their keys alone to a
    format that is a key mapping, and are refused in one line, naming --model, for the others."""
    src = write_weights(model, tmp_path / "official.pth", "official")
    suffix = get_format(fmt).writes[0]
    out = tmp_path / ("out" if suffix == FOLDER else f"out{suffix}")
    code = cli.main(["convert", str(src), str(out), "--dst", fmt])
    err = capsys.readouterr().err
    if get_format(fmt).needs_model:
        assert code == 2 and "needs --model NAME" in err and not out.exists()
    else:
        assert code == 0 and out.is_file()
