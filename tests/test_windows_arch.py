"""Architecture coverage: per-stage and rectangular (h, w) windows, and SwinV2-H / G's extra norms.

References:
  * timm's `SwinTransformerV2` (timm.models.swin_transformer_v2), which takes a window per stage, each
    an int or (h, w), and (h, w) pre-training windows: logits at the native size, through our timm
    converter. Its window rule (`_calc_window_shift`, per axis) is the one ours follows for rectangular
    windows; square windows keep the official rule, which agrees with timm's on square maps.
  * At sizes that need padding timm is no reference: it rolls THEN pads, where ours (and transformers)
    pad then roll. There the reference is `official_forward` below, the official block written out
    independently of windows.py / attention.py: pad, torch.roll, raster window partition, the
    official per-window shift mask from slices, the CPB table and index as timm builds them, the
    plain attention formula, reverse. It is itself checked against timm at the native size.
  * SwinV2-H / G: mmpretrain's `arch_zoo` (not installed): parameter counts against an independent
    closed formula (checked on the official tiny...large counts) and against timm's SwinTransformerV2
    of the same widths plus the extra norms it lacks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from randomize import randomize_
from swinv2.errors import InputError
from swinv2.model.cpb import cpb_tables
from swinv2.model.transformer import SwinTransformerV2, SwinV2Config
from swinv2.model.windows import class_masks, effective_window, nonempty_classes, shift_mask, window_order
from swinv2.serve.dynamic_forward import DynamicSizeForward
from swinv2.tools.flops import count_flops
from swinv2.weights.convert import convert_state_dict, from_native, tv_derived_buffers
from swinv2.weights.factory import load_model
from swinv2.weights.files import save_weights
from swinv2.weights.hf_config import hf_config_from_kwargs
from swinv2.weights.registry import OFFICIAL_PARAMS, count_params, get_variant, list_models, model_config

timm = pytest.importorskip("timm")
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2  # noqa: E402

TOL = 1e-5
CPU = torch.device("cpu")
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=5, drop_path_rate=0.0)
# name: (window_size, pretrained_window_sizes, native size, a non-square size that needs padding)
CASES = {
    # official Swin-Transformer #163: a 7 x 9 window for 224 x 288 inputs. At 200 x 330 the last map is
    # 7 x 11: unshifted along H (7 <= 7), shifted and padded along W (one row of windows).
    "rect": ((7, 9), (0, 0, 0, 0), (224, 288), (200, 330)),
    # mmpretrain's window12to16 fine-tuning: windows (16, 16, 16, 8) from pre-training windows (12, 12, 12, 6).
    # At 250 x 330, stages 2 and 3 (16 x 21, 8 x 11) clamp to one unshifted window per row, padded along W.
    "per_stage": ((16, 16, 16, 8), (12, 12, 12, 6), (256, 256), (250, 330)),
    # A rectangle per stage, rectangular pre-training windows (one of them for a square window);
    # stage 3's (2, 3) window on its 4 x 3 map is shifted along H only.
    "mixed": (((8, 4), (4, 8), (4, 4), (2, 3)), ((6, 3), 0, (3, 2), (2, 2)), (128, 96), (100, 90)),
}


def _config(name: str, **kw) -> SwinV2Config:
    window, pretrained, native, _ = CASES[name]
    return SwinV2Config(img_size=native, window_size=window, pretrained_window_sizes=pretrained, **{**SMALL, **kw})


def _model(cfg: SwinV2Config, seed: int = 0) -> SwinTransformerV2:
    torch.manual_seed(seed)
    return randomize_(SwinTransformerV2(cfg), seed=seed).eval()


def _images(size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(size[0] * 1000 + size[1]))


def _timm(cfg: SwinV2Config) -> torch.nn.Module:
    return TimmSwinV2(
        img_size=cfg.img_size,
        embed_dim=cfg.embed_dim,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.stage_window_sizes,
        pretrained_window_sizes=cfg.pretrained_window_sizes,
        num_classes=cfg.num_classes,
    ).eval()


# --------------------------------------------------------------------------- the independent reference


def _official_window(H: int, W: int, window: tuple[int, int], shift: tuple[int, int]):
    """Square windows: the official `min(input_resolution) <= window_size` rule; rectangles: timm's per axis."""
    if window[0] == window[1]:
        return ((min(H, W),) * 2, (0, 0)) if min(H, W) <= window[0] else (window, shift)
    return (min(H, window[0]), min(W, window[1])), tuple(0 if n <= w else s for n, w, s in zip((H, W), window, shift))


def _official_mask(Hp: int, Wp: int, window, shift) -> torch.Tensor:
    """(nW, N, N) shift mask exactly as the official / timm code builds it, with slices."""
    img = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for h in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for w in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = img.view(Hp // window[0], window[0], Wp // window[1], window[1]).permute(0, 2, 1, 3)
    win = win.reshape(-1, window[0] * window[1])
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _official_bias(attn, window) -> torch.Tensor:
    """(nH, N, N) CPB as timm's `_make_pair_wise_relative_positions` + `forward` build it."""
    wh, ww = window
    ph, pw = attn.pretrained_window_size
    table = torch.stack(
        torch.meshgrid(
            torch.arange(-(wh - 1), wh, dtype=torch.float32),
            torch.arange(-(ww - 1), ww, dtype=torch.float32),
            indexing="ij",
        ),
        -1,
    )
    table[..., 0] /= max((ph if ph > 0 else wh) - 1, 1)
    table[..., 1] /= max((pw if ph > 0 else ww) - 1, 1)
    table = torch.sign(table * 8) * torch.log2((table * 8).abs() + 1.0) / math.log2(8)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1
    bias = attn.cpb_mlp(table.reshape(-1, 2))[index.reshape(-1)].view(wh * ww, wh * ww, -1).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias)


def _official_attention(attn, x: torch.Tensor, window, mask: torch.Tensor | None) -> torch.Tensor:
    """(B*nW, N, C) windows, image-major raster order; the official formula op for op."""
    rows, N, C = x.shape
    nH = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias)))
    q, k, v = qkv.reshape(rows, N, 3, nH, -1).permute(2, 0, 3, 1, 4)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.clamp(attn.logit_scale, max=math.log(100.0)).exp() + _official_bias(attn, window)
    if mask is not None:
        logits = (logits.view(-1, mask.shape[0], nH, N, N) + mask[None, :, None]).view(rows, nH, N, N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(rows, N, C)
    return attn.proj(out)


def _official_block(blk, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = _official_window(H, W, blk.window_size, blk.shift_size)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    y = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # pad, THEN shift
    y = torch.roll(y, (-sh, -sw), (1, 2))
    windows = y.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)
    mask = _official_mask(Hp, Wp, (wh, ww), (sh, sw)) if sh or sw else None
    out = _official_attention(blk.attn, windows, (wh, ww), mask)
    out = out.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    out = torch.roll(out, (sh, sw), (1, 2))[:, :H, :W]
    x = x + blk.norm1(out)
    x = x + blk.norm2(blk.mlp.fc2(F.gelu(blk.mlp.fc1(x))))
    return x if blk.norm3 is None else blk.norm3(x)


@torch.no_grad()
def official_forward(model: SwinTransformerV2, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)
    for layer in model.layers:
        for blk in layer.blocks:
            x = _official_block(blk, x)
        x = x if layer.downsample is None else layer.downsample(x)
    return model.head(model.norm(x).mean(dim=(1, 2)))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_timm_natively_and_the_official_path_with_padding(name):
    cfg = _config(name)
    ours = _model(cfg)
    ref = _timm(cfg)
    ref.load_state_dict(convert_state_dict(ours.state_dict(), dst="timm"), strict=True)
    _, _, native, padded = CASES[name]
    for size in (native, padded):
        x = _images(size)
        with torch.no_grad():
            fused = ours(x)
            ours.set_fused_attention(False)
            plain = ours(x)
            ours.set_fused_attention(True)
            dynamic = DynamicSizeForward(ours)(x)
        official = official_forward(ours, x)
        assert official.abs().max() > 0.1  # real logits: 1e-5 is 4 orders below the signal
        if size == native:  # timm, and through it the official path, at the size timm's layout holds
            with torch.no_grad():
                expected = ref(x)
            assert _diff(official, expected) <= TOL, (name, "official vs timm", _diff(official, expected))
            assert _diff(fused, expected) <= TOL, (name, "fused vs timm", _diff(fused, expected))
        for got, what in ((fused, "fused"), (plain, "plain"), (dynamic, "export forward")):
            assert _diff(got, official) <= TOL, (name, size, what, _diff(got, official))


def test_int_window_equals_its_per_stage_and_pair_spellings_bit_for_bit():
    """8, (8, 8), (8, 8, 8, 8) and ((8, 8),) * 4 are one config, serialised as the int 8 as before."""
    spellings = [8, (8, 8), (8, 8, 8, 8), ((8, 8),) * 4, [[8, 8]] * 4]
    configs = [SwinV2Config(img_size=64, window_size=w, **SMALL) for w in spellings]
    assert all(c == configs[0] for c in configs) and configs[0].window_size == 8
    x = _images((64, 80))
    logits = []
    for c in configs:
        with torch.no_grad():
            logits.append(_model(c, seed=3)(x))
    assert all(torch.equal(logits[0], y) for y in logits[1:])
    # metadata written before windows could be per stage still reads, and is written back unchanged
    old = {
        "img_size": [64, 64],
        "patch_size": 4,
        "in_chans": 3,
        "num_classes": 5,
        "embed_dim": 16,
        "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 2, 4],
        "window_size": 8,
        "pretrained_window_sizes": [0, 0, 0, 0],
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "patch_norm": True,
        "cpb_hidden_dim": 512,
    }
    assert SwinV2Config.from_dict(old) == configs[0] and configs[0].to_dict() == old


def test_window_rule_square_is_official_rectangle_is_per_axis():
    assert effective_window(4, 16, 8, 4) == ((4, 4), (0, 0))  # official: one min(H, W) window
    assert effective_window(4, 16, (8, 9), (4, 4)) == ((4, 9), (0, 4))  # timm, per axis
    assert effective_window(20, 16, (8, 9), (4, 4)) == ((8, 9), (4, 4))
    assert effective_window(7, 9, (7, 9), (3, 4)) == ((7, 9), (0, 0))


@pytest.mark.parametrize(
    "H, W, window, shift",
    [
        (14, 18, (7, 9), (3, 4)),
        (16, 27, (7, 9), (3, 4)),
        (12, 10, (4, 3), (2, 1)),
        (7, 22, (7, 9), (0, 4)),
        (20, 3, (8, 3), (4, 0)),  # shifted along one axis only: one row / column
    ],
)
def test_four_mask_classes_are_exact_for_rectangular_windows(H, W, window, shift):
    """Every window of class run c carries, in the official raster-order slice mask, exactly the class
    mask the layout gives it; empty classes (one-axis shifts) are dropped with their masks."""
    gather, _, _, counts = window_order(H, W, window, shift, CPU)
    Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
    N, nW = window[0] * window[1], (Hp // window[0]) * (Wp // window[1])
    official = _official_mask(Hp, Wp, window, shift)
    assert torch.equal(shift_mask(Hp, Wp, window, shift, CPU), official)
    rolled = torch.roll(torch.arange(Hp * Wp).view(Hp, Wp), (-shift[0], -shift[1]), (0, 1))
    raster = rolled.view(Hp // window[0], window[0], Wp // window[1], window[1]).permute(0, 2, 1, 3).reshape(nW, N)
    where = {tuple(r.tolist()): i for i, r in enumerate(raster)}
    masks, kept = nonempty_classes(window, shift, counts, CPU)
    classes = [c for c, n in enumerate(counts) if n]
    assert kept == tuple(counts[c] for c in classes) and masks.shape == (len(classes), N, N)
    assert (len(classes) < 4) == (0 in shift)
    rows = gather.view(nW, N)
    start = 0
    for m, n in zip(masks, kept):
        for row in rows[start : start + n]:
            assert torch.equal(official[where[tuple(row.tolist())]], m)
        start += n
    assert start == nW and torch.equal(masks, class_masks(window, shift, CPU)[classes])


# --------------------------------------------------------------------------- FLOPs, CPB tables


def test_flops_of_a_rectangular_window():
    """224 x 288, window 7 x 9: 8 x 8, 4 x 4, 2 x 2 windows, then one 7 x 9 window, 63 tokens each."""
    cfg = _config("rect")
    C, macs, (H, W) = cfg.embed_dim, 0, (56, 72)
    macs += H * W * C * 3 * 16 + H * W * C  # patch embedding + its norm
    for i, depth in enumerate(cfg.depths):
        n, heads = (H // 7) * (W // 9), cfg.num_heads[i]
        per_block = n * (63 * C * 3 * C + 2 * heads * 63 * 63 * (C // heads) + 63 * C * C)
        macs += depth * (per_block + 2 * H * W * C * 4 * C + 2 * H * W * C)
        if i < 3:
            H, W = H // 2, W // 2
            macs += H * W * 4 * C * 2 * C + H * W * 2 * C
            C *= 2
    macs += C * 56 * 72 // 16 + C * cfg.num_classes
    assert count_flops(cfg) == macs
    # the extra norms of SwinV2-H/G: one MAC per element each (blocks 2 of every stage here)
    extra = count_flops(SwinV2Config(**{**cfg.__dict__, "extra_norm_every_n_blocks": 2}))
    assert extra - macs == sum(56 * 72 // 4**i * 16 * 2**i for i in range(4))


def test_cpb_tables_of_a_rectangular_window_are_timms_and_what_attention_adds():
    cfg = _config("mixed")
    ours = _model(cfg)
    ref = _timm(cfg)
    ref.load_state_dict(convert_state_dict(ours.state_dict(), dst="timm"), strict=True)
    tables = cpb_tables(ours)
    assert [t.window for t in tables[::2]] == [(8, 4), (4, 8), 4, (2, 3)]
    assert [t.pretrained_window for t in tables[::2]] == [(6, 3), 0, (3, 2), 2]
    theirs = [blk.attn for stage in ref.layers for blk in stage.blocks]
    with torch.no_grad():
        for t, attn, blk in zip(tables, theirs, [b for layer in ours.layers for b in layer.blocks]):
            wh, ww = blk.window_size
            expected = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table))[0].permute(2, 0, 1)
            assert t.bias.shape == (attn.num_heads, 2 * wh - 1, 2 * ww - 1)
            assert _diff(t.bias, expected) <= 1e-6
            assert _diff(blk.attn.position_bias((wh, ww)), _official_bias(blk.attn, (wh, ww))) <= 1e-6
    wide = cpb_tables(ours, window=(5, 3))
    assert all(t.window == (5, 3) and t.bias.shape[1:] == (9, 5) for t in wide)


# --------------------------------------------------------------------------- converters


def test_converters_hold_per_stage_windows_where_the_format_can_and_refuse_in_one_line(tmp_path):
    cfg = _config("mixed")
    model = _model(cfg)
    sd = model.state_dict()
    # timm's state dict is window-free (its constructor takes the windows, as `_timm` does): a round trip
    back = convert_state_dict(convert_state_dict(sd, dst="timm"), src="timm")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # native: the windows are in our metadata, per stage, rectangles included
    assert SwinV2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    save_weights(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == cfg and loaded.config.window_size == ((8, 4), (4, 8), (4, 4), (2, 3))
    # torchvision has one window for all stages (a rectangle is fine), transformers one square window
    for dst, call in (
        ("torchvision", lambda: from_native(sd, "torchvision", config=cfg)),
        ("hf", lambda: hf_config_from_kwargs(cfg.to_dict())),
    ):
        with pytest.raises(InputError) as err:
            call()
        assert "\n" not in str(err.value) and "window" in str(err.value), dst
    rect = _config("rect")
    tv = from_native(_model(rect).state_dict(), "torchvision", config=rect).state_dict
    table, index = tv_derived_buffers((7, 9))
    assert table.shape == (1, 13, 17, 2) and index.shape == (63 * 63,)
    assert torch.equal(tv["features.1.0.attn.relative_coords_table"], table)


def test_torchvision_takes_a_uniform_rectangular_window():
    """torchvision's `window_size=[7, 9]`: its buffers are ours, and at 224 x 288 (no stage smaller than
    the window, where torchvision would pad instead of clamping) its logits too."""
    from torchvision.models import swin_transformer as tvm

    cfg = _config("rect")
    model = _model(cfg)
    theirs = tvm.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 4],
        window_size=[7, 9],
        stochastic_depth_prob=0.0,
        num_classes=5,
        block=tvm.SwinTransformerBlockV2,
        downsample_layer=tvm.PatchMergingV2,
    ).eval()
    theirs.load_state_dict(convert_state_dict(model.state_dict(), dst="torchvision", config=cfg), strict=True)
    x = _images((224, 288), batch=1)
    with torch.no_grad():
        assert _diff(theirs(x), model(x)) <= TOL


# --------------------------------------------------------------------------- SwinV2-H and -G


def _formula_params(cfg: SwinV2Config) -> int:
    """Closed-form parameter count, independent of the modules: per block 12C^2 + 12C (qkv, q/v biases,
    proj, MLP, two norms) + 513 nH + 1536 (logit scales, the 2-512-nH CPB MLP), 2C per extra norm; patch
    embedding, 8C^2 + 4C per merging, final norm and head."""
    p, E, K = cfg.patch_size, cfg.embed_dim, cfg.num_classes
    total = cfg.in_chans * p * p * E + E + 2 * E
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
        C = E * 2**i
        total += depth * (12 * C * C + 12 * C + 513 * heads + 2 * 512 + 512)
        if cfg.extra_norm_every_n_blocks:
            total += depth // cfg.extra_norm_every_n_blocks * 2 * C
        if i < len(cfg.depths) - 1:
            total += 8 * C * C + 4 * C
    C = E * 2 ** (len(cfg.depths) - 1)
    return total + 2 * C + C * K + K


def test_the_param_formula_reproduces_the_official_counts():
    for family, name in (
        ("tiny", "swinv2_tiny_window8_256"),
        ("small", "swinv2_small_window8_256"),
        ("base", "swinv2_base_window8_256"),
        ("large", "swinv2_large_window12to16_192to256"),
    ):
        assert _formula_params(model_config(name)) == OFFICIAL_PARAMS[family]


@pytest.mark.parametrize(
    "name, arch, n_extra, paper",
    [
        ("swinv2_huge_window12to14_192to224", (352, (2, 2, 18, 2), (8, 16, 32, 64)), 3, 658e6),
        ("swinv2_giant_window12to14_192to224", (512, (2, 2, 42, 4), (16, 32, 64, 128)), 7, 3.0e9),
    ],
)
def test_huge_and_giant_configs_and_parameter_counts(name, arch, n_extra, paper):
    v = get_variant(name)
    cfg = v.config
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads) == arch and cfg.extra_norm_every_n_blocks == 6
    assert (cfg.img_size, cfg.window_size, cfg.pretrained_window_sizes) == ((224, 224), 14, (12, 12, 12, 6))
    assert not v.official and v.pretrain == "none" and name not in list_models()
    assert name in list_models(include_unofficial=True)
    ours = count_params(cfg)
    assert ours == _formula_params(cfg)
    with torch.device("meta"):  # timm's SwinTransformerV2 of the same widths, which has no extra norms
        ref = _timm(cfg)
    extra = n_extra * 2 * cfg.embed_dim * 4  # all in stage 2 (dim 4C): 18 // 6 = 3, 42 // 6 = 7
    assert ours == sum(p.numel() for p in ref.parameters()) + extra
    assert round(ours / paper, 2) == 1.0  # paper: SwinV2-H 658M, SwinV2-G 3.0B parameters


def test_extra_norm_every_two_blocks_in_a_tiny_model():
    """mmpretrain `SwinBlockV2Sequence`: block j (from 0) of every stage gets an extra norm when
    (j + 1) % n == 0, the last stage's last block included, and the model's final norm follows it
    (timm's swin_transformer_v2_cr instead makes that last norm3 the final norm)."""
    cfg = SwinV2Config(
        img_size=64,
        window_size=4,
        depths=(2, 4, 2),
        num_heads=(1, 2, 4),
        embed_dim=16,
        pretrained_window_sizes=(0, 0, 0),
        num_classes=5,
        drop_path_rate=0.0,
        extra_norm_every_n_blocks=2,
    )
    model = _model(cfg, seed=4)
    where = [(i, j) for i, layer in enumerate(model.layers) for j, b in enumerate(layer.blocks) if b.norm3 is not None]
    assert where == [(0, 1), (1, 1), (1, 3), (2, 1)]
    assert count_params(cfg) == _formula_params(cfg)
    x = _images((64, 52))
    with torch.no_grad():
        out = model(x)
        dynamic = DynamicSizeForward(model)(x)
    official = official_forward(model, x)
    assert _diff(out, official) <= TOL and _diff(dynamic, official) <= TOL
    with torch.no_grad():  # the norm is applied: changing it changes the logits
        model.layers[1].blocks[1].norm3.weight.mul_(2)
        assert _diff(model(x), out) > 1e-3
    # converters that have no such norm refuse in one line; native / official keep it
    sd = model.state_dict()
    assert "layers.2.blocks.1.norm3.weight" in convert_state_dict(sd, dst="official")
    for dst in ("timm", "hf", "torchvision"):
        with pytest.raises(InputError, match="extra norm") as err:
            from_native(sd, dst, config=cfg)
        assert "\n" not in str(err.value)


def test_dynamic_onnx_graph_runs_rectangular_per_stage_windows(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from swinv2.serve.export import export_onnx

    cfg = SwinV2Config(
        img_size=32,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 2),
        window_size=((4, 3), (2, 2)),
        pretrained_window_sizes=((3, 2), 0),
        num_classes=5,
        drop_path_rate=0.0,
    )
    model = _model(cfg, seed=6)
    export_onnx(model, tmp_path / "m.onnx", img_size=32, dynamic_size=True, check=False)
    ort_run = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for size in ((32, 32), (45, 27), (13, 70)):
        x = _images(size)
        got = ort_run.run(None, {ort_run.get_inputs()[0].name: x.numpy()})[0]
        assert abs(got - official_forward(model, x).numpy()).max() <= 1e-4, size
