"""The model: numerics against timm (a real reference), any input size, features, checkpointing, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import swinv2
from machine import cpu_paths
from randomize import randomize_
from swinv2.model.transformer import DERIVED_KEYS, WindowAttention
from swinv2.model.windows import class_masks, shift_mask, window_order
from tolerance import assert_as_accurate

timm = pytest.importorskip("timm")
from timm.models.swin_transformer_v2 import checkpoint_filter_fn  # noqa: E402

FAST_PARITY = [
    "swinv2_tiny_window8_256",
    "swinv2_tiny_window16_256",
    "swinv2_small_window8_256",
    "swinv2_small_window16_256",
]


def micro(**kw) -> swinv2.SwinTransformerV2:
    return swinv2.create_model("swinv2_micro_window4_32", **kw)


def _timm_parity(name: str) -> None:
    torch.manual_seed(0)
    ours = randomize_(swinv2.create_model(name)).eval()
    ref = timm.create_model(name, pretrained=False).eval()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
    x = torch.randn(1, 3, *ours.config.img_size)
    with torch.no_grad():
        expected = ref(x)
        fused = ours(x)
        ours.set_fused_attention(False)
        plain = ours(x)
    assert expected.abs().max() > 0.1  # the 1e-5 bound is >= 4 orders of magnitude below the signal
    assert (fused - expected).abs().max().item() <= 1e-5
    assert (plain - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAST_PARITY)
def test_parity_with_timm(name):
    _timm_parity(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in swinv2.list_models() if n not in FAST_PARITY])
def test_parity_with_timm_large_variants(name):
    _timm_parity(name)


def test_registry_covers_the_twelve_official_variants():
    assert len(swinv2.list_models()) == 12
    for name in swinv2.list_models():
        assert timm.is_model(name), name


@pytest.mark.parametrize("size", [(32, 32), (20, 44), (13, 7), (4, 4)])
def test_fused_attention_matches_plain_formula(size):
    model = randomize_(micro(), seed=1).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attention(False)
        plain = model(x)
    assert (fused - plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [(224, 224), (250, 330), (97, 61)])
def test_any_input_size_gives_finite_logits_and_grads(size):
    model = randomize_(micro(num_classes=5), seed=2).train()
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.slow  # about 20 s
def test_1024px_on_the_real_tiny_architecture():
    model = randomize_(swinv2.create_model("swinv2_tiny_window8_256", num_classes=10, depths=(2, 2, 2, 2)), seed=3)
    model.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 1024, 1024)
    out = model(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_native_size_is_unchanged_by_the_any_size_machinery():
    """At a native size nothing is padded: the padded path agrees with an exact window-multiple crop."""
    model = randomize_(micro(), seed=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        b = model(F.pad(x, (0, 0, 0, 0)))
    assert torch.equal(a, b)


def test_pad_then_shift_mask_matches_the_official_slices():
    """The vectorised mask equals the official construction with slices, on a padded map."""
    Hp, Wp, w, s = 12, 16, 4, 2
    img = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    sl = (slice(0, -w), slice(-w, -s), slice(-s, None))
    for h in sl:
        for ww in sl:
            img[:, h, ww, :] = cnt
            cnt += 1
    win = img.view(1, Hp // w, w, Wp // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w)
    ref = win.unsqueeze(1) - win.unsqueeze(2)
    ref = ref.masked_fill(ref != 0, -100.0).masked_fill(ref == 0, 0.0)
    assert torch.equal(shift_mask(Hp, Wp, w, s, torch.device("cpu")), ref)
    assert shift_mask(Hp, Wp, w, s, torch.device("cpu")) is shift_mask(Hp, Wp, w, s, torch.device("cpu"))


@pytest.mark.parametrize("H, W, w, s", [(12, 16, 4, 2), (16, 16, 4, 2), (19, 23, 4, 2), (9, 30, 8, 4), (24, 24, 6, 3)])
def test_windows_are_grouped_by_their_shift_mask(H, W, w, s):
    """`window_order` puts the windows in runs of `counts` by mask class; every window of run c carries
    (in the official raster-order mask) exactly `class_masks[c]`, and the gather is still the shifted
    windows' tokens, only with the windows reordered."""
    cpu = torch.device("cpu")
    gather, inverse, scatter, counts = window_order(H, W, w, s, cpu)
    Hp, Wp = H + -H % w, W + -W % w
    N, nW = w * w, (Hp // w) * (Wp // w)
    assert len(counts) == 4 and sum(counts) == nW and min(counts) >= 1
    rolled = torch.roll(torch.arange(Hp * Wp).view(1, Hp, Wp, 1), (-s, -s), (1, 2))
    raster = rolled.view(Hp // w, w, Wp // w, w).permute(0, 2, 1, 3).reshape(nW, N)  # official order
    where = {tuple(row.tolist()): i for i, row in enumerate(raster)}
    official = shift_mask(Hp, Wp, w, s, cpu)
    masks = class_masks(w, s, cpu)
    windows = gather.view(nW, N)
    start = 0
    for c, n in enumerate(counts):
        for row in windows[start : start + n]:
            assert torch.equal(official[where[tuple(row.tolist())]], masks[c])
        start += n
    assert sorted(where[tuple(r.tolist())] for r in windows) == list(range(nW))  # each window once
    assert torch.equal(gather[inverse], torch.arange(Hp * Wp))
    assert torch.equal(masks[0], torch.zeros(N, N)) and all((masks[c] != 0).any() for c in (1, 2, 3))


def test_attention_bias_does_not_grow_with_the_image(monkeypatch):
    """Attention gets one (1, nH, N, N) bias per call, one call per mask class, at 32 px (2 x 2
    windows) as at 160 px (10 x 10 windows), never one bias per window; the cache holds one
    (1, nH, N, N) position bias per block; and the logits are timm's (which builds one bias per
    window) at both sizes."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    model = randomize_(micro(), seed=13).eval()
    sdpa = F.scaled_dot_product_attention
    bias_shapes = []
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda *a, attn_mask, **k: bias_shapes.append(attn_mask.shape) or sdpa(*a, attn_mask=attn_mask, **k),
    )
    with torch.no_grad():
        for size in (32, 160):
            ref = TimmSwinV2(img_size=size, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4).eval()
            ref.load_state_dict(checkpoint_filter_fn(model.state_dict(), ref), strict=True)
            x = torch.randn(1, 3, size, size)
            expected = ref(x)
            assert expected.abs().max() > 0.1
            bias_shapes.clear()
            assert (model(x) - expected).abs().max() <= 1e-5
            # stage 1: 1 call unshifted + 4 shifted; stage 2 (a 4 x 4 map at 32 px is one window,
            # unshifted: 1 + 1)
            stage2 = 2 if size == 32 else 5
            assert bias_shapes == [(1, 2, 16, 16)] * 5 + [(1, 4, 16, 16)] * stage2
            for blk in model.layers[0].blocks:
                (bias,) = [entry[1] for entry in blk.attn._bias_cache.values()]
                assert bias.shape == (1, 2, 16, 16)


def test_training_gradients_match_timm():
    """The CPU training path (attention written out, each window biased by its mask class, the
    memory-lean autograd functions) gives timm's gradients for every parameter."""
    ours = randomize_(
        swinv2.create_model("swinv2_tiny_window8_256", depths=(2, 2, 2, 2), drop_path_rate=0.0), seed=5
    ).train()
    ref = timm.create_model("swinv2_tiny_window8_256", depths=(2, 2, 2, 2), drop_path_rate=0.0).train()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
    x = torch.randn(2, 3, 256, 256)
    ours(x).square().mean().backward()
    ref(x).square().mean().backward()
    grads = checkpoint_filter_fn({n: p.grad for n, p in ours.named_parameters()}, ref)
    for name, p in ref.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * scale, name


def test_state_dict_has_no_derived_buffers_and_official_extras_load():
    model = micro()
    sd = model.state_dict()
    assert not [k for k in sd if k.rsplit(".", 1)[-1] in DERIVED_KEYS]
    official = dict(sd)
    official["layers.0.blocks.1.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    official["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    micro().load_state_dict(official, strict=True)


def test_post_norms_are_zero_initialised_and_blocks_start_as_identity():
    model = micro()
    for layer in model.layers:
        for blk in layer.blocks:
            for norm in (blk.norm1, blk.norm2):
                assert torch.count_nonzero(norm.weight) == 0 and torch.count_nonzero(norm.bias) == 0
    x = torch.randn(1, 8, 8, 24)
    with torch.no_grad():
        assert torch.equal(model.layers[0].blocks[0](x), x)


def test_grad_checkpointing_gives_identical_outputs_and_grads():
    torch.manual_seed(0)
    a = randomize_(micro(drop_path_rate=0.0), seed=5)
    b = randomize_(micro(drop_path_rate=0.0), seed=5)
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad), n


def _saved_attention_maps(model, x, N):
    """Sizes of the tensors autograd saves during model(x) whose last two dims are (N, N)."""
    sizes = []

    def pack(t):
        if t.ndim >= 2 and t.shape[-2:] == (N, N):
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sizes


def _sequential_against_written_out(monkeypatch):
    """(written-out fp32, sequential fp32, written-out float64) outputs and gradients of one tiny
    training step on a 48 x 40 input: 12 x 10 tokens, 3 x 3 windows (padded), all four mask classes;
    sequential attention in pieces of 3 windows, smaller than one block's probabilities. Also the
    sizes of the (N, N) tensors autograd saved in the two fp32 forwards."""
    import swinv2.model.attention as A

    monkeypatch.setattr(A, "SEQUENTIAL_ATTENTION_BYTES", 3 * 2 * 16 * 16 * 4)  # 3 windows' worth
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    runs = []
    for sequential, dtype in ((False, torch.float32), (True, torch.float32), (False, torch.float64)):
        model = randomize_(micro(drop_path_rate=0.0), seed=6).to(dtype).train()
        model.set_sequential_attention(sequential)
        y, saved = _saved_attention_maps(model, x.to(dtype), 16)
        y.square().sum().backward()
        runs.append((y, {n: p.grad for n, p in model.named_parameters()}, saved))
    return runs


def test_sequential_attention_same_gradients_without_keeping_the_probabilities(monkeypatch):
    """CPU training with sequential attention: outputs and every gradient as close to the float64 truth
    as the written-out attention's in fp32 (which sums the same products in another order), and
    autograd keeps no (windows, heads, N, N) probabilities, only the biases (at most four (heads, N, N)
    per block)."""
    (ya, ga, saved_a), (yb, gb, saved_b), (y64, g64, _) = _sequential_against_written_out(monkeypatch)
    per_block_probs = 2 * 9 * 2 * 16 * 16  # images x windows x heads x N x N, stage 1
    assert max(saved_a) >= per_block_probs  # premise: the written-out path keeps the probabilities
    assert max(saved_b) <= 4 * 4 * 16 * 16  # four class biases of the 4-head stage at most
    assert_as_accurate(yb, ya, y64, "output")
    assert ga.keys() == gb.keys() == g64.keys()
    for name in g64:
        assert_as_accurate(gb[name], ga[name], g64[name], f"{name}.grad")


def test_sequential_attention_test_catches_a_bias_gradient_off_by_1e_3(monkeypatch):
    """The comparison above is tight enough to see a relative error of 1e-3 planted in the sequential
    path's bias gradient (it reaches the CPB MLP's weights)."""
    import swinv2.model.kernels as fused

    backward = fused._SequentialAttention.backward

    def planted(ctx, grad):
        dq, dk, dv, dbias, *rest = backward(ctx, grad)
        return (dq, dk, dv, dbias * (1 + 1e-3), *rest)

    monkeypatch.setattr(fused._SequentialAttention, "backward", staticmethod(planted))
    (_, ga, _), (_, gb, _), (_, g64, _) = _sequential_against_written_out(monkeypatch)
    name = "layers.0.blocks.0.attn.cpb_mlp.2.weight"
    with pytest.raises(AssertionError, match=f"{name}.grad: relative error"):
        assert_as_accurate(gb[name], ga[name], g64[name], f"{name}.grad")


def test_forward_intermediates_shapes():
    model = swinv2.create_model("swinv2_tiny_window8_256", depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 250, 330)
    maps = model.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(2, 96, 63, 83), (2, 192, 32, 42), (2, 384, 16, 21), (2, 768, 8, 11)]
    with torch.no_grad():
        last = model.forward_intermediates(x, norm=True)[-1]
        feats = model.forward_features(x)
    assert torch.allclose(last.permute(0, 2, 3, 1), feats)


def test_bf16_autocast_stays_close_to_fp32():
    model = randomize_(micro(num_classes=16), seed=6).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        low_weights = model.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    for y in (low, low_weights):
        assert torch.isfinite(y).all(), cpu_paths()
        similarity = F.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0)
        assert similarity >= 0.99, f"cosine {similarity:.4f} on {cpu_paths()}"


def test_stochastic_depth_is_linear_over_blocks():
    model = swinv2.create_model("swinv2_tiny_window8_256", drop_path_rate=0.2)
    rates = [blk.drop_path.p for layer in model.layers for blk in layer.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.2, rel_tol=1e-6)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert max(steps) - min(steps) < 1e-6


def test_window_clamp_when_stage_not_larger_than_window():
    """A 16 px input gives 4x4 then 2x2 maps under window 4: one unshifted window per stage (official)."""
    model = randomize_(micro(), seed=7).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 16, 16))
    assert torch.isfinite(y).all()
    cached = {key for m in model.modules() if isinstance(m, WindowAttention) for key in m._bias_cache}
    assert cached == {(4, None), (2, None)}


def test_cpb_table_extrapolates_with_pretrained_window():
    """pretrained_window_sizes only rescales the CPB input: same parameters, different bias."""
    a = swinv2.create_model("swinv2_micro_window4_32", window_size=8)
    b = swinv2.create_model("swinv2_micro_window4_32", window_size=8, pretrained_window_sizes=(4, 4))
    b.load_state_dict(a.state_dict(), strict=True)
    attn_a, attn_b = a.layers[0].blocks[0].attn, b.layers[0].blocks[0].attn
    with torch.no_grad():
        assert not torch.allclose(attn_a.position_bias(8), attn_b.position_bias(8))
        # The central 7x7 offsets of an 8-window under pretrained 4 reuse the 4-window table exactly.
        c = swinv2.create_model("swinv2_micro_window4_32")
        c.load_state_dict(a.state_dict(), strict=True)
        small = c.layers[0].blocks[0].attn.position_bias(4)
        big = attn_b.position_bias(8)
        idx = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27])
        assert torch.allclose(big[:, idx][:, :, idx], small, atol=1e-6)


def test_fused_error_is_float_rounding():
    """Under a harsh draw (fp32 ill-conditioned) our fused path is no further from the fp64 truth than
    timm's own fp32 forward is: the SDPA path differs from the official formula by rounding only."""
    ours = randomize_(
        swinv2.create_model("swinv2_tiny_window8_256", depths=(2, 2, 2, 2)), std=0.05, scale_max=5.5
    ).eval()
    ref = timm.create_model("swinv2_tiny_window8_256", depths=(2, 2, 2, 2)).eval()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        timm32, ours32 = ref(x).double(), ours(x).double()
        truth = ref.double()(x.double())
    timm_err = (timm32 - truth).abs().max().item()
    ours_err = (ours32 - truth).abs().max().item()
    assert ours_err <= 2 * timm_err + 1e-6


def test_chunked_cpu_inference_matches_timm_and_the_whole_batch(monkeypatch):
    """Eager CPU inference runs each block over groups of images (`INFERENCE_CHUNK_BYTES`). Forced down
    to one image per group, every block runs per image and the logits still match timm's at 1e-5 and
    the whole-batch forward's; with grad enabled nothing is grouped."""
    import swinv2.model.attention as A
    import swinv2.model.transformer as M

    ours = randomize_(swinv2.create_model("swinv2_tiny_window8_256", depths=(2, 2, 2, 2)), seed=3).eval()
    ref = timm.create_model("swinv2_tiny_window8_256", depths=(2, 2, 2, 2)).eval()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
    x = torch.randn(3, 3, 256, 256)
    group_sizes = []
    block_forward = M.SwinTransformerBlock._forward
    monkeypatch.setattr(
        M.SwinTransformerBlock,
        "_forward",
        lambda self, x, out=None: group_sizes.append(x.shape[0]) or block_forward(self, x, out),
    )
    with torch.no_grad():
        expected = ref(x)
        monkeypatch.setattr(A, "INFERENCE_CHUNK_BYTES", 1)
        grouped = ours(x)
        assert group_sizes == [1] * (3 * 8)  # 8 blocks, one image at a time
        group_sizes.clear()
        monkeypatch.setattr(A, "INFERENCE_CHUNK_BYTES", 1 << 62)
        whole = ours(x)
        assert group_sizes == [3] * 8
    assert expected.abs().max() > 0.1
    assert (grouped - expected).abs().max().item() <= 1e-5
    assert (grouped - whole).abs().max().item() <= 1e-6
    group_sizes.clear()
    monkeypatch.setattr(A, "INFERENCE_CHUNK_BYTES", 1)
    ours(x[:2]).sum().backward()  # training: the whole batch at once
    assert group_sizes == [2] * 8


def _cached_bias(model) -> torch.Tensor:
    attn = model.layers[0].blocks[1].attn
    return next(iter(attn._bias_cache.values()))[1]


def test_cached_bias_is_reused_then_recomputed_after_an_optimizer_step():
    model = randomize_(micro(), seed=8)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        y0 = model(x)
        first = _cached_bias(model)
        assert torch.equal(model(x), y0) and _cached_bias(model) is first  # reused, same logits
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        y1 = model(x)
        second = _cached_bias(model)
        assert second is not first and not torch.equal(second, first)
        model.set_fused_attention(False)  # the uncached official formula agrees with the new cache
        assert (model(x) - y1).abs().max() <= 1e-5


def test_cached_bias_follows_autocast():
    """Under bf16 autocast the CPB MLP runs in bf16: a model that first ran in fp32 must not reuse its
    fp32 bias there, and back in fp32 it must not reuse the bf16 one."""
    x = torch.randn(2, 3, 32, 32)
    state = randomize_(micro(), seed=12, std=0.05).state_dict()  # a CPB output large enough for bf16 to show

    def fresh() -> swinv2.SwinTransformerV2:
        model = micro().eval()
        model.load_state_dict(state)
        return model

    def bf16(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    with torch.no_grad():
        ref32, ref16 = fresh()(x), bf16(fresh())
        assert (ref32 - ref16).abs().max() > 1e-3  # premise: autocast changes the logits
        model = fresh()
        assert torch.equal(model(x), ref32)
        assert torch.equal(bf16(model), ref16)  # not the fp32 bias
        assert torch.equal(model(x), ref32)  # not the bf16 bias
    entries = {key[1]: bias for key, (_, bias) in model.layers[0].blocks[1].attn._bias_cache.items()}
    assert entries.keys() == {None, torch.bfloat16} and entries[torch.bfloat16].dtype == torch.bfloat16
    assert not torch.equal(entries[None].bfloat16(), entries[torch.bfloat16])  # premise: they differ


def test_cached_bias_is_recomputed_after_updates_that_bump_no_version_counter():
    """A fused AdamW step and an in-place update through `.data` leave the parameters' version counters
    as they were; the cache still sees the new values."""
    model = randomize_(micro(), seed=11)
    x = torch.randn(2, 3, 32, 32)
    cpb = model.layers[0].blocks[1].attn.cpb_mlp[2].weight
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for update in ("fused AdamW step", ".data"):
        model.eval()
        with torch.no_grad():
            model(x)
        before = _cached_bias(model)
        version = cpb._version
        if update == ".data":
            cpb.data.mul_(3.0)
        else:
            model.train()
            model(x).square().sum().backward()
            opt.step()
        assert cpb._version == version, update  # what a version-counter check would miss
        model.eval()
        with torch.no_grad():
            y = model(x)
            assert not torch.equal(_cached_bias(model), before), update
            model.set_fused_attention(False)  # the uncached official formula
            assert (model(x) - y).abs().max() <= 1e-5, update
            model.set_fused_attention(True)


def test_cached_bias_is_recomputed_after_load_state_dict_and_dtype_change():
    model = randomize_(micro(), seed=9).eval()
    other = randomize_(micro(), seed=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        before = _cached_bias(model)
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x), other(x))
        assert not torch.equal(_cached_bias(model), before)
        model.to(torch.float64)
        y = model(x.double())
        assert _cached_bias(model).dtype == torch.float64 and y.dtype == torch.float64
