"""The least time PyTorch's own kernels need for a SwinV2 forward and training step, beside the time
the project's ratio targets allow.

What it measures. One forward (or forward + backward) of a reference implementation, timm's SwinV2
(the plain formula, none of our fast paths), runs under a dispatch mode that records every ATen
kernel it calls with its input shapes, strides and arguments. Then only the kernels that any
implementation of the same model must run are replayed, each alone at its recorded shape on fresh
random inputs, and their least times summed (times how often each shape occurs):

  * matrix multiplies: every `mm` and `bmm`, and every `addmm` replayed as `mm` (its bias treated as
    free, as if added in the GEMM's epilogue), each also with contiguous operands and in bf16 as
    oneDNN's linear on a weight already in its layout, the fastest counting; the patch embedding's
    convolution (and its backward);
  * the softmax's exponential only, over a tensor of the softmax's shape into a kept buffer;
  * exact GELU, into a kept buffer, and its backward;
  * the layer norms and their backward;
  * in a training step, AdamW's update through torch's fused kernel over the model's parameters.

Everything else costs nothing in this floor: copies, gathers, rolls, residual adds, the cosine
normalisation, the logit scale, the bias and mask adds, the softmax's max / sum / divide and its
backward, the bias gradients, the loss, and at inference the CPB MLP (it depends on the parameters
only; a training step has to run it, and its matmuls count). Each kernel runs alone with its inputs
hot in cache. So no implementation built from these kernels can take less than the floor; fusing all
the excluded work into them is the most any such implementation can do.

Against it: the time a ratio target allows, from the peers measured in the same process
(`swinv2.tools.bench.run`): for eager inference the fastest peer's batch time over 1.3, for the training
step timm's over 1.25, and for the compiled share of the matmul peak the model's FLOPs over 0.85 of
the measured peak. A floor above the allowance means the target cannot be met with PyTorch's kernels
on this machine; only kernels that do the unavoidable work faster (an exact erf or exp, a GEMM)
could.

    python benchmarks/floor.py [--batch-size 8] [--repeats 3]      (SwinV2-T window 8, 256 px)

`benchmarks/run_cpu.py` (`make bench`) adds the same rows to the performance table.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from swinv2 import hardware, timing
from swinv2.model.kernels import onednn_linear_runs
from swinv2.tools import bench
from swinv2.weights.registry import model_config

aten = torch.ops.aten
CPU = torch.device("cpu")

# What each recorded kernel counts as in the floor; kernels not listed cost nothing.
GROUPS = {
    aten.mm.default: "matmuls",
    aten.addmm.default: "matmuls",
    aten.bmm.default: "matmuls",
    aten.convolution.default: "matmuls",
    aten.convolution_backward.default: "matmuls",
    aten._softmax.default: "softmax exp",
    aten.gelu.default: "GELU",
    aten.gelu_backward.default: "GELU",
    aten.native_layer_norm.default: "layer norms",
    aten.native_layer_norm_backward.default: "layer norms",
}


@dataclass(frozen=True)
class _Meta:
    """A tensor argument, by what a replay needs of it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return _Meta(tuple(a.shape), tuple(a.stride()), a.dtype)
    if isinstance(a, (list, tuple)):  # tuples, so that a call's metadata can be a Counter key
        return tuple(_meta(b) for b in a)
    return a


class KernelRecorder(TorchDispatchMode):
    """Counts the kernels of GROUPS that run under it, by (kernel, argument metadata), except while
    `paused` is above zero."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GROUPS and not self.paused:
            self.calls[(func, _meta(tuple(args)), tuple(sorted(_meta(kwargs or {}).items())))] += 1
        return func(*args, **(kwargs or {}))


def _fresh(a: Any, g: torch.Generator) -> Any:
    """A random tensor with the recorded shape, strides and dtype (other arguments as recorded)."""
    if isinstance(a, _Meta):
        t = torch.empty_strided(a.shape, a.stride, dtype=a.dtype)
        return t.normal_(generator=g) if t.is_floating_point() else t.zero_()
    if isinstance(a, tuple):
        return tuple(_fresh(b, g) for b in a)
    return a


def _replay(func, args: tuple, kwargs: dict) -> list[Callable[[], Any]]:
    """The calls the floor may time for one recorded kernel (see the module docstring); the fastest counts.

    A matrix multiply is also timed with contiguous operands, in case another layout runs faster.
    """
    if func in (aten.addmm.default, aten.mm.default, aten.bmm.default):
        a, b = args[-2:]  # addmm's bias is free: the GEMM alone
        mm = torch.bmm if func is aten.bmm.default else torch.mm
        a2, b2 = a.contiguous(), b.contiguous()
        calls = [lambda: mm(a, b), lambda: mm(a2, b2)]
        if mm is torch.mm and a.dtype == torch.bfloat16 and onednn_linear_runs(torch.bfloat16):
            # a linear's weight in oneDNN's layout, made once (as `swinv2.model.kernels.linear` keeps it)
            w = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), a.shape[0])
            calls.append(lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""))
        return calls
    if func is aten._softmax.default:  # the exponential alone, into a buffer kept from call to call
        x = args[0]
        y = torch.empty_like(x)
        return [lambda: torch.exp(x, out=y)]
    if func is aten.gelu.default:  # exact GELU, into a buffer kept from call to call
        x = args[0]
        y = torch.empty_like(x)
        return [lambda: aten.gelu.out(x, **kwargs, out=y)]
    return [lambda: func(*args, **kwargs)]


def _least_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls after two untimed ones: a floor takes the best case (as
    `hardware.matmul_peak` does)."""
    fn()
    fn()
    return min(timing.timed(fn, CPU) for _ in range(repeats))


def record(step: Callable[[], Any], skip: Sequence[torch.nn.Module] = ()) -> collections.Counter:
    """The GROUPS kernels one call of `step` runs, with how often each (kernel, shapes) occurs; the
    forward of each module in `skip` is not recorded."""
    rec = KernelRecorder()

    def pause(*_: Any) -> None:
        rec.paused += 1

    def resume(*_: Any) -> None:
        rec.paused -= 1

    hooks = [h for m in skip for h in (m.register_forward_pre_hook(pause), m.register_forward_hook(resume))]
    try:
        with rec:
            step()
    finally:
        for h in hooks:
            h.remove()
    return rec.calls


def time_kernels(calls: collections.Counter, repeats: int = 7) -> dict[str, float]:
    """Seconds per group: each recorded kernel replayed alone, its least time times its count."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = collections.defaultdict(float)
    with torch.no_grad():
        for (func, args, kwargs), count in calls.items():
            candidates = _replay(func, _fresh(args, g), dict(_fresh(kwargs, g)))
            out[GROUPS[func]] += count * min(_least_time(fn, repeats) for fn in candidates)
    return dict(out)


def adamw_time(model: torch.nn.Module, repeats: int = 7) -> float:
    """Seconds of one fused AdamW step over the model's parameters (state allocated beforehand)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=True)
    return _least_time(opt.step, repeats)


@dataclass
class Floor:
    """The least seconds of one forward (`train=False`) or training step, by group."""

    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def breakdown(self) -> str:
        return ", ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1]))


def reference_calls(
    model: str, *, batch_size: int, train: bool, dtype: torch.dtype = torch.float32
) -> tuple[collections.Counter, torch.nn.Module]:
    """The recorded kernels of one forward (or forward + backward) of timm's `model` at its nominal size,
    and that timm model; in bf16, weights and input cast to it (inference, as `swinv2.tools.bench` runs it)."""
    config = model_config(model)
    ref = bench.build_impl("timm", config, bench.SwinTransformerV2(config).state_dict()).to(dtype)
    ref.train(train)
    x = torch.randn(batch_size, 3, *config.img_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    if train:
        labels = torch.zeros(batch_size, dtype=torch.long)

        def step() -> None:
            F.cross_entropy(ref(x), labels).backward()
    else:

        def step() -> None:
            with torch.no_grad():
                ref(x)

    step()  # warm: timm builds its buffers on the first call
    # The CPB MLP depends on the parameters only: inference computes it once (ours caches it), while a
    # training step has to run it, forward and backward, since the parameters change every step.
    cpb = [] if train else [m for name, m in ref.named_modules() if name.endswith("cpb_mlp")]
    return record(step, skip=cpb), ref


def kernel_floor(
    model: str = "swinv2_tiny_window8_256",
    *,
    batch_size: int = 8,
    train: bool = False,
    repeats: int = 7,
    dtype: torch.dtype = torch.float32,
) -> Floor:
    """The floor (module docstring) of `model` at its nominal size, in `dtype`, on this CPU."""
    calls, ref = reference_calls(model, batch_size=batch_size, train=train, dtype=dtype)
    seconds = time_kernels(calls, repeats)
    if train:
        seconds["AdamW (fused)"] = adamw_time(ref, repeats)
    return Floor(seconds)


@dataclass
class Gap:
    """One ratio target: the seconds it allows, the floor, and ours now (None: not measured here)."""

    what: str
    target: str
    allowed_s: float
    floor: Floor
    ours_s: float | None

    @property
    def ratio(self) -> float:
        """Floor over allowance; above 1, the target is out of reach of PyTorch's kernels."""
        return self.floor.total / self.allowed_s


def gaps(
    eager: dict[str, dict],
    train: dict[str, dict],
    peers: Sequence[str],
    peak_gflop_s: float,
    model: str = "swinv2_tiny_window8_256",
    compiled: dict[str, dict] | None = None,
    eager_bf16: dict[str, dict] | None = None,
) -> list[Gap]:
    """The ratio targets against the floor, from `bench.run` results by implementation: `eager`
    (inference, ours and `peers`), `train` (training step, ours and timm) and, if measured, `compiled`
    (compiled inference, ours) and `eager_bf16` (bf16 inference, ours and timm; its floor is timm's
    bf16 kernels, so the matmuls count at the bf16 peak)."""
    batch = eager["ours"]["batch_size"]
    fastest = max(eager[p]["img_per_s"] for p in peers)
    flop = 2 * eager["ours"]["gmacs_per_img"] * 1e9 * batch
    forward = kernel_floor(model, batch_size=batch)
    step = kernel_floor(model, batch_size=batch, train=True)
    return [
        Gap(
            "eager fp32 forward",
            "1.3 x fastest eager peer",
            batch / (1.3 * fastest),
            forward,
            batch / eager["ours"]["img_per_s"],
        ),
        Gap(
            "compiled fp32 forward",
            "0.85 of the matmul peak",
            flop / (0.85 * peak_gflop_s * 1e9),
            forward,
            None if compiled is None else batch / compiled["ours"]["img_per_s"],
        ),
        Gap(
            "train step fp32",
            "1.25 x timm",
            batch / (1.25 * train["timm"]["img_per_s"]),
            step,
            batch / train["ours"]["img_per_s"],
        ),
    ] + (
        []
        if eager_bf16 is None
        else [
            Gap(
                "eager bf16 forward",
                "1.3 x timm bf16",
                batch / (1.3 * eager_bf16["timm"]["img_per_s"]),
                kernel_floor(model, batch_size=batch, dtype=torch.bfloat16),
                batch / eager_bf16["ours"]["img_per_s"],
            ),
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of the peers' comparison")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from swinv2.allocator import retain_freed_cpu_memory

    retain_freed_cpu_memory()
    torch.set_num_threads(args.threads)
    model, peers = "swinv2_tiny_window8_256", ("timm", "hf", "torchvision")
    common = dict(batch_sizes=(args.batch_size,), repeats=args.repeats, warmup=2, iters=1, measure_memory=False)
    eager = {r["impl"]: r for r in bench.run(model, compare=peers, **common)}
    train = {r["impl"]: r for r in bench.run(model, compare=("timm",), train=True, **common)}
    peak = hardware.matmul_peak("cpu", "fp32")
    print(
        f"{model}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, "
        f"matmul peak {peak:.0f} GFLOP/s; times in ms"
    )
    print(
        "| step | target | target allows | floor of PyTorch's kernels | floor / allowed | ours now | floor by group |"
    )
    print("|---|---|---|---|---|---|---|")
    for g in gaps(eager, train, peers, peak, model):
        ours = "" if g.ours_s is None else f"{g.ours_s * 1e3:.0f}"
        print(
            f"| {g.what} | {g.target} | {g.allowed_s * 1e3:.0f} | {g.floor.total * 1e3:.0f} | {g.ratio:.2f} | "
            f"{ours} | {g.floor.breakdown()} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
