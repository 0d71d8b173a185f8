"""The memory-lean autograd functions: forward identical to the plain ops, gradients checked
numerically (float64) and against autograd of the plain formula at the clamped (zero-vector) point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from randomize import randomize_
from swinv2 import create_model
from swinv2.model import kernels as fused
from swinv2.model.kernels import cosine_qkv, gelu_linear, permute_rows, sequential_attention, softmax_flushed


def _qkv(dtype=torch.float64, zero_row: bool = False):
    """(B*nW, N, 3C) projection of B=2 images, nW=3 windows, N=5 tokens, nH=4 heads of d=6."""
    qkv = torch.randn(6, 5, 3 * 24, dtype=dtype)
    if zero_row:  # padded tokens give k = 0 (and q = 0 with no bias): the norm is clamped
        qkv[0, 0, 24:30] = 0
        qkv[1, 2, 0:6] = 0
    return qkv


def _plain(qkv, s):
    """The official formula: q, k, v from the (B, nW, N, 3, nH, d) view, F.normalize, times s."""
    q, k, v = qkv.view(2, 3, 5, 3, 4, 6).permute(3, 0, 1, 4, 2, 5).unbind(0)
    return F.normalize(q, dim=-1) * s, F.normalize(k, dim=-1), v


def test_forward_is_the_plain_formula():
    qkv, s = _qkv(torch.float32, zero_row=True), torch.rand(4, 1, 1) * 50
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ours = cosine_qkv(qkv.clone().requires_grad_(grad), 3, 4, s)
            for o, r in zip(ours, _plain(qkv, s)):
                assert o.is_contiguous() and o.shape == r.shape == (2, 3, 4, 5, 6)
                assert torch.allclose(o, r, rtol=1e-6, atol=1e-6)
            # The ops of the plain formula as written in the forward: bit-identical.
            q = qkv.view(2, 3, 5, 3, 4, 6).permute(3, 0, 1, 4, 2, 5)[0]
            norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
            assert torch.equal(ours[0], q * (s / norm.clamp_min(1e-12)))
    h, w, b = torch.randn(3, 7, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(gelu_linear(h.requires_grad_(), w, b), F.linear(F.gelu(h), w, b))


@pytest.mark.slow  # about 8 s; the fused kernels' gradients are also compared with autograd's in make test
def test_gradients_numerically():
    # (Not at a zero vector: there a finite difference leaves the clamped region; see the next test.)
    qkv = _qkv().requires_grad_()
    s = torch.rand(4, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda qkv, s: cosine_qkv(qkv, 3, 4, s), (qkv, s))
    assert torch.autograd.gradcheck(lambda qkv: cosine_qkv(qkv, 3, 4, s.detach()), (qkv,))
    h = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gelu_linear, (h, w, b))


def test_gradient_matches_autograd_of_the_plain_formula():
    """Also where the norm is clamped (padded, all-zero tokens), and when some outputs get no
    gradient (only q and k used)."""
    qkv = _qkv(zero_row=True).requires_grad_()
    s = torch.rand(4, 1, 1, dtype=torch.float64, requires_grad=True)
    gs = [torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) for _ in range(3)]
    for used in (3, 2):
        ours = torch.autograd.grad(sum((o * g).sum() for o, g in zip(cosine_qkv(qkv, 3, 4, s)[:used], gs)), (qkv, s))
        ref = torch.autograd.grad(sum((o * g).sum() for o, g in zip(_plain(qkv, s)[:used], gs)), (qkv, s))
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b)


def test_autocast_training_matches_the_plain_path():
    """Under bf16 autocast the backward runs outside autocast: it must keep the forward's dtype, and
    its gradients must be as close to the fp32 gradients as the plain ops' bf16 gradients are."""
    torch.manual_seed(0)
    h0 = torch.randn(4, 6, 16)
    fc2 = torch.nn.Linear(16, 8)

    def grads(fn, amp: bool):
        h = h0.clone().requires_grad_()
        fc2.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(h, fc2.weight, fc2.bias)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        out.float().square().sum().backward()
        return h.grad, fc2.weight.grad, fc2.bias.grad

    plain = lambda h, w, b: F.linear(F.gelu(h), w, b)  # noqa: E731
    exact = grads(plain, amp=False)
    for ours, ref, truth in zip(grads(gelu_linear, True), grads(plain, True), exact):
        assert ours.dtype == ref.dtype == torch.float32
        err = lambda g, truth=truth: ((g - truth).norm() / truth.norm()).item()  # noqa: E731
        assert err(ours) <= 2 * err(ref) + 1e-3


def test_linear_gelu_is_the_plain_ops():
    """fc1 + GELU: in eager inference (the GELU in place on the matmul's output) and with autograd
    (differentiable) it is F.gelu(F.linear), bit for bit."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g) * 0.2, torch.randn(40, generator=g)
    for x in (
        torch.randn(6, 24, generator=g),
        torch.randn(2, 5, 7, 24, generator=g),
        torch.randn(2, 24, 5, 7, generator=g).permute(0, 2, 3, 1),
    ):  # non-contiguous, channels-last
        for bias in (b, None):
            ref = F.gelu(F.linear(x, w, bias))
            with torch.inference_mode():
                assert torch.equal(fused.linear_gelu(x, w, bias), ref)
    xg = torch.randn(3, 24, requires_grad=True)
    fused.linear_gelu(xg, w, b).sum().backward()  # the autograd path
    (ref,) = torch.autograd.grad(F.gelu(F.linear(xg, w, b)).sum(), xg)
    assert torch.equal(xg.grad, ref)


@pytest.mark.slow  # about 10 s
def test_compiled_inference_is_one_graph_with_the_eager_logits(monkeypatch):
    """torch.compile(fullgraph=True) of fp32 CPU inference: no graph break, no recompile on a new
    input of the same size, the eager logits within 1e-5."""
    model = randomize_(create_model("swinv2_micro_window4_32").eval())
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        refs = [model(img) for img in imgs]
        outs = [compiled(img) for img in imgs]
    for out, ref in zip(outs, refs):
        assert (out - ref).abs().max() <= 1e-5


def test_permute_rows_gradient_is_the_inverse_gather():
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(12)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 5, dtype=torch.float64)
    out = permute_rows(x, order, inverse)
    assert torch.equal(out, x.index_select(0, order))
    (ours,) = torch.autograd.grad((out * g).sum(), x)
    (ref,) = torch.autograd.grad((x.index_select(0, order) * g).sum(), x)
    assert torch.equal(ours, ref)
    assert torch.autograd.gradgradcheck(lambda x: permute_rows(x, order, inverse), (x,))


def test_gelu_recomputing_fc2_gives_the_plain_gradients():
    """The GELU-recomputing fc2 gives F.linear(F.gelu(h))'s output and gradients, for h, weight and
    bias."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 5, 7, 24, generator=g)
    w0, b0 = torch.randn(40, 24, generator=g) * 0.2, torch.randn(40, generator=g)
    up = torch.randn(2, 5, 7, 40, generator=g)

    def run(fn):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = fn(x, w, b)
        return (out, *torch.autograd.grad((out * up).sum(), (x, w, b)))

    for a, r in zip(run(gelu_linear), run(lambda x, w, b: F.linear(F.gelu(x), w, b))):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-5)


def _subnormal(t):
    return (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)


@pytest.mark.parametrize("traced", [False, True])
def test_softmax_flushed_zeroes_only_the_subnormal_probabilities(traced, monkeypatch):
    """Masked logits about 100 below their row's maximum (the shift mask's -100) give subnormal
    probabilities; the flushed softmax returns 0 there and the plain softmax everywhere else, eager
    and in the plain ops used when traced or compiled."""
    monkeypatch.setattr(fused, "traced", lambda: traced)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.randn(4, 6, 64, 64, generator=g) * 2
        s[:, :, :, 40:] -= 90  # masked: exp lands in the subnormal range for many entries
        s = s.to(dtype)
        plain = s.softmax(-1)
        assert _subnormal(plain).sum() > 100  # the premise: there are subnormals to flush
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                ours = softmax_flushed(s.clone().requires_grad_(grad))
            assert not _subnormal(ours).any()
            assert torch.equal(ours, torch.where(_subnormal(plain), 0.0, plain).to(dtype))


def test_softmax_flushed_gradient_is_the_softmax_gradient():
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(3, 5, 16, 16, generator=g) * 5
    s0[..., 10:] -= 90
    up = torch.randn(3, 5, 16, 16, generator=g)
    s = s0.clone().requires_grad_()
    assert _subnormal(s0.softmax(-1)).any()
    (ours,) = torch.autograd.grad((softmax_flushed(s) * up).sum(), s)
    (ref,) = torch.autograd.grad((s.softmax(-1) * up).sum(), s)
    # Identical up to the flushed terms, each below 1.2e-38, and the rounding of the row sums.
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-30)


def test_training_attention_gives_the_official_formula_gradients():
    """With autograd, the CPU attention is written out with the flushed softmax: logits and every
    parameter's gradient match the plain official formula's (float rounding only)."""
    model = randomize_(create_model("swinv2_micro_window4_32", drop_path_rate=0.0), seed=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for fused_attention in (True, False):
        model.set_fused_attention(fused_attention)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, ours_grads), (ref, ref_grads) = results
    assert (ours - ref).abs().max() <= 1e-5
    for name, grad in ref_grads.items():
        err = (ours_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
        assert err <= 1e-4, (name, err)


@pytest.mark.parametrize("max_rows", [pytest.param(1, marks=pytest.mark.slow), 4, 100])  # 1 row: about 6 s
def test_sequential_attention_is_the_written_out_formula(max_rows):
    """Runs of 3, 2 and 1 windows of 2 images under three biases, cut into pieces of `max_rows` rows:
    outputs and all four gradients as autograd of the written-out formula, and a float64 gradcheck."""
    g = torch.Generator().manual_seed(0)
    counts, images, heads, N, d = (3, 2, 1), 2, 2, 5, 4
    rows = sum(counts) * images
    q, k, v = (torch.randn(rows, heads, N, d, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    bias = torch.randn(3, heads, N, N, dtype=torch.float64, generator=g)
    bias[1:, :, :, 0] -= 100.0  # masked-like logits, flushed in both
    bias.requires_grad_()

    def written_out(q, k, v, bias):
        per_window = torch.cat([bias[c : c + 1].expand(n, -1, -1, -1) for c, n in enumerate(counts)])
        s = (q @ k.transpose(-2, -1)).view(-1, images, heads, N, N) + per_window[:, None]
        return softmax_flushed(s).view(rows, heads, N, N) @ v

    out = sequential_attention(q, k, v, bias, counts, images, max_rows)
    ref = written_out(q, k, v, bias)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad((out * w).sum(), (q, k, v, bias))
    theirs = torch.autograd.grad((ref * w).sum(), (q, k, v, bias))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: sequential_attention(*t, counts, images, max_rows), (q, k, v, bias))
    with torch.no_grad():
        assert torch.allclose(sequential_attention(q, k, v, bias, counts, images, max_rows), ref, atol=1e-12)


def test_sequential_attention_bf16_bias_gradient_is_as_accurate_as_the_written_out_one():
    """In bf16, with 240 rows in pieces of one, the bias gradient (a sum over every piece) is no further
    from the float64 truth than autograd of the written-out formula in bf16: the pieces are summed
    in fp32, not in a bf16 running sum."""
    g = torch.Generator().manual_seed(0)
    counts, images, heads, N, d = (30, 2), 4, 2, 16, 8
    rows = sum(counts) * images
    q, k, v = (torch.randn(rows, heads, N, d, dtype=torch.float64, generator=g) for _ in range(3))
    bias = torch.randn(2, heads, N, N, dtype=torch.float64, generator=g)
    w = torch.randn(rows, heads, N, d, dtype=torch.float64, generator=g)

    def written_out(q, k, v, bias):
        per_window = torch.cat([bias[c : c + 1].expand(n, -1, -1, -1) for c, n in enumerate(counts)])
        s = (q @ k.transpose(-2, -1)).view(-1, images, heads, N, N) + per_window[:, None]
        return softmax_flushed(s).view(rows, heads, N, N) @ v

    def bias_grad(fn, dtype):
        b = bias.to(dtype).requires_grad_()
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype), b)
        (grad,) = torch.autograd.grad((out.double() * w).sum(), b)
        return grad.double()

    truth = bias_grad(written_out, torch.float64)
    error = lambda grad: ((grad - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
    sequential = error(bias_grad(lambda *t: sequential_attention(*t, counts, images, 1), torch.bfloat16))
    assert sequential <= error(bias_grad(written_out, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_rows", [1, 5, 100])
def test_half_precision_inference_attention_keeps_fp32_logits(dtype, max_rows, monkeypatch):
    """bf16 / fp16 inference attention from a half-precision projection: the float64 formula on the
    same projection values, to the two roundings the path keeps (probabilities and output, one unit
    roundoff each, relative to max |v|). Logits up to 100 make a half-precision logit (a step of 0.5
    in bf16) miss by far more, so this fails if the logits are not kept in fp32."""
    g = torch.Generator().manual_seed(0)
    counts, images, heads, N, d = (3, 2, 1), 2, 4, 9, 6
    rows = sum(counts) * images
    qkv = torch.randn(rows, N, 3 * heads * d, generator=g).to(dtype)
    scale = torch.tensor([100.0, 60.0, 20.0, 5.0]).view(heads, 1, 1)
    bias = torch.randn(len(counts), heads, N, N, generator=g)
    bias[1:, :, :, :3] -= 100.0  # shift-mask classes
    bias = bias.to(dtype)

    q, k, v = qkv.double().view(rows, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale.double()
    per_window = torch.cat([bias[c : c + 1].expand(n, -1, -1, -1) for c, n in enumerate(counts)]).double()
    s = s.view(-1, images, heads, N, N) + per_window[:, None]
    ref = s.softmax(-1).view(rows, heads, N, N) @ v

    with torch.no_grad():
        out = fused.attention_fp32_logits(qkv, heads, scale, bias, counts, max_rows)
    assert out.dtype == dtype and out.shape == (rows, heads, N, d)
    unit = torch.finfo(dtype).eps / 2
    bound = 2 * unit * v.abs().max() * (1 + 1e-3)  # + fp32 logits: about 1e-5 at a scale of 100
    assert (out.double() - ref).abs().max() <= bound

    # The bf16 path the model takes at inference (CPU, no autograd) is this one.
    model = randomize_(create_model("swinv2_micro_window4_32", drop_path_rate=0.0), seed=3).eval().to(dtype)
    calls = []
    original = fused.attention_fp32_logits

    def spy(*args):
        calls.append(args[0].dtype)
        return original(*args)

    monkeypatch.setattr("swinv2.model.attention.attention_fp32_logits", spy)
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32, generator=g).to(dtype))
    assert calls and set(calls) == {dtype}


def test_bf16_inference_linear_is_f_linear_with_the_bias_in_the_epilogue(monkeypatch):
    """bf16 CPU inference (bf16 weights, or fp32 weights under bf16 autocast) goes through oneDNN's
    linear: F.linear's result to one bf16 rounding of the fp32-accumulated value. fp32, autograd and
    no-bias calls stay F.linear itself, bit for bit. (A PyTorch built without oneDNN, or a CPU without
    oneDNN's bf16 kernels, takes F.linear for bf16 too, bit for bit.)"""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 7, 48, generator=g), torch.randn(40, 48, generator=g) * 0.1, torch.randn(40, generator=g)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or original(*a))
    exact = F.linear(x.double(), w.double(), b.double())
    if not fused.onednn_linear_runs(torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(
                fused.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()),
                F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()),
            )
        return
    with torch.no_grad():
        low = fused.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = fused.linear(x, w, b)
        assert len(calls) == 2
        assert torch.equal(fused.linear(x, w, b), F.linear(x, w, b)) and len(calls) == 2
        assert torch.equal(fused.linear(x.bfloat16(), w.bfloat16(), None), F.linear(x.bfloat16(), w.bfloat16()))
    assert len(calls) == 2
    for y in (low, auto):
        assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 40)
        # bf16 inputs: each product's operands rounded (relative 2^-8 each), the sum rounded once more
        bound = 2**-8 * (3 * (x.abs() @ w.abs().T + b.abs()).double() + exact.abs())
        assert ((y.double() - exact).abs() <= bound).all()
    assert torch.equal(fused.linear(x.requires_grad_(), w, b), F.linear(x, w, b)) and len(calls) == 2


def test_bf16_inference_linear_packs_each_weight_once_and_again_when_it_changes():
    """The weight in oneDNN's layout gives the plain-weight result bit for bit; it is made once per weight,
    made again after the weight changes in place or gets other data, dropped once the weight's memory is
    freed, and not kept for a weight made under inference mode (no version counter to notice a change).
    The weight tensor itself stays swappable (no weak reference to it). (A PyTorch built without oneDNN
    takes F.linear for bf16 and keeps nothing.)"""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 48, generator=g).bfloat16()
    w, b = (torch.randn(40, 48, generator=g) * 0.1).bfloat16(), torch.randn(40, generator=g).bfloat16()

    def packed_of(weight: torch.Tensor) -> list[torch.Tensor]:
        return [p for ref, _, p in fused._ONEDNN_WEIGHTS.values() if ref.cdata == weight.untyped_storage()._weak_ref()]

    if not fused.onednn_linear_runs(torch.bfloat16):
        # (Other tests may leave fp32 weights of their own in the cache: only this weight's entry counts.)
        with torch.no_grad():
            assert torch.equal(fused.linear(x, w, b), F.linear(x, w, b)) and not packed_of(w)
        return

    def plain(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, weight.detach().clone(), b, "none", [], "")

    with torch.no_grad():
        assert torch.equal(fused.linear(x, w, b), plain(w))
        (packed,) = packed_of(w)
        fused.linear(x[:1], w, b)
        assert packed_of(w) == [packed]  # reused, whatever the rows
        w.mul_(-2)  # in place: the version counter moves
        assert torch.equal(fused.linear(x, w, b), plain(w))
        w.data = torch.randn(40, 48, generator=g).bfloat16()  # other data, same tensor and version
        assert torch.equal(fused.linear(x, w, b), plain(w))
        torch.utils.swap_tensors(w, torch.randn(40, 48, generator=g).bfloat16())
        assert torch.equal(fused.linear(x, w, b), plain(w))
    with torch.inference_mode():
        w_inf = w.detach().clone()
        entries = len(fused._ONEDNN_WEIGHTS)
        assert torch.equal(fused.linear(x, w_inf, b), plain(w_inf)) and len(fused._ONEDNN_WEIGHTS) == entries
    del w
    with torch.no_grad():
        w2 = torch.randn(40, 48, generator=g).bfloat16()
        fused.linear(x, w2, b)  # a new weight: the entries of freed ones are dropped
    assert len(packed_of(w2)) == 1 and all(not ref.expired() for ref, _, _ in fused._ONEDNN_WEIGHTS.values())
