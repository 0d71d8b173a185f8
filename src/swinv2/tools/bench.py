"""Throughput, latency and peak memory of SwinV2, side by side with timm, Hugging Face and torchvision.

`run(...)` times every implementation of one variant with the SAME weights in the same process: for
each setting (batch size x image size x dtype) it builds all implementations, warms each up, measures
one step's peak memory, then times `repeats` rounds in which every implementation runs `iters` calls;
the order rotates every round, so slow drifts (thermal, other processes) hit all of them alike. The
ratios are medians of the per-round paired ratios. All implementations share the process's heap: the
callers (`swinv2 bench`, `benchmarks/run_cpu.py`) first make malloc retain freed memory
(`swinv2.allocator`), because under glibc's defaults the page faults each implementation takes, and so
the ratios, depend on which one ran before it.

A/B of one of our fast paths (`ab=NAME`, `swinv2 bench --ab NAME`, names in `AB_SWITCHES`): one more
row, "ours/<alternative>", is our model run under a `model.fast_paths.FastPaths` policy with that path
switched to its alternative during each of its calls, timed in the same interleaved rounds; its
`ours_speedup` is how many times faster the path is.
`only=IMPL` benchmarks one implementation alone (no ours): `swinv2 bench --own-process` runs every
implementation that way, each in a fresh process, to see what a user's own process sees.

What one call ("step") is:
  * inference (default): `model(x)` under `torch.inference_mode()`, the model in eval mode. With bf16 /
    fp16 the weights and the input are cast to that dtype ("half weights", as a deployment would).
  * `train=True`: zero_grad, forward, cross-entropy on random labels, backward, AdamW step, model in
    train mode (dropout / stochastic depth as configured). bf16 / fp16 use autocast over fp32 weights
    (mixed precision, as a training run would), fp16 with a GradScaler.
On CUDA every timed call is bracketed by `torch.cuda.synchronize()`.

Peak memory of one step, in bytes, above what was allocated before the step (so weights, and in
training the optimizer state, are excluded; activations, gradients and workspaces are included):
  * CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes
    allocated before the step.
  * CPU: the step is run once under `torch.profiler` with `profile_memory=True`; every allocation and
    free of PyTorch's CPU allocator is recorded with the running total ("Total Allocated"), and the
    peak is the largest running total minus the total before the first event. This sees exactly the
    tensors PyTorch allocates, in process, per implementation; it does not see memory that libraries
    allocate behind PyTorch's back (oneDNN scratch pads, the Python heap), and unlike peak RSS it is
    not blurred by the allocator's caching or by what earlier implementations left behind.

Result fields (one dict per implementation and setting; `write_json` adds a `meta` record):
  impl                 "ours" | "timm" | "hf" | "torchvision", or "onnxruntime/<precision>" |
                       "openvino/<precision>" (the exported graph in that runtime; dtype = the precision,
                       peak_mem_bytes and weights_bytes None: the runtime allocates outside PyTorch)
  model, mode          registry name; "infer" or "train"
  device, dtype        "cpu" / "cuda[:i]"; "fp32" | "bf16" | "fp16"
  compiled             torch.compile used (compile_s: duration of the first, compiling call)
  grad_checkpointing   per-block activation checkpointing on (ours only, with `grad_checkpointing=True`)
  sequential_attention attention probabilities recomputed in the backward (ours only, CPU training;
                       `sequential_attention=True`, `SwinTransformerV2.set_sequential_attention`)
  batch_size, img_size     images per call, square input side in pixels
  warmup, repeats, iters   untimed calls; timed rounds; calls per round
  img_per_s            median over rounds of images per second; img_per_s_min, img_per_s_max: extremes
  spread_pct           (max - min) / median of the per-round img/s, in percent
  latency_ms_p50, latency_ms_p90   percentiles of the single-call times over all timed calls
  peak_mem_bytes       peak memory of one step above its starting point (see above)
  minor_faults_per_call  minor page faults per timed call (getrusage of the process; CPU)
  weights_bytes        bytes of parameters and buffers
  gmacs_per_img        forward MACs per image (paper convention, `swinv2.count_flops`)
  gflop_per_s          2 * MACs * img/s (x3 for a training step, the usual forward+backward rule)
  ours_speedup         median over rounds of (this impl's time / ours), i.e. how many times faster
                       ours is (1.0 for ours; with `only`, relative to that impl itself);
                       ours_speedup_min, ours_speedup_max: its extremes
  ours_mem_ratio       ours' peak_mem_bytes / this impl's (below 1: ours needs less)
  max_abs_diff         max |logits - ours' logits| in fp32 eval at batch 1 (None for ours): proves
                       the peers run the same weights
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..hardware import DTYPES, cpu_name, warn_if_bf16_emulated
from ..model.fast_paths import FastPaths, use_fast_paths
from ..model.transformer import SwinTransformerV2, SwinV2Config
from ..outputs import write_output
from ..serve.runtime import load_runtime
from ..serve.runtime import settings as runtime_settings
from ..timing import sync, timed
from ..train import distributed as D
from ..weights.registry import model_config
from .flops import count_flops

log = logging.getLogger(__name__)

IMPLS = ("ours", "timm", "hf", "torchvision")
# The package each peer is built from; only timm and torchvision are dependencies of swinv2.
PEER_PACKAGES = {"timm": "timm", "hf": "transformers", "torchvision": "torchvision"}
# Inference runtimes running our exported graph (`swinv2.serve.runtime`), rows "<runtime>/<precision>".
RUNTIME_IMPLS = ("onnxruntime", "openvino")

# A/B name -> (row name of ours with the alternative, the fast paths that row runs under). Each
# alternative is what the fast path replaced (docs/performance.md, "Why the fast paths are built this way").
AB_SWITCHES: dict[str, tuple[str, FastPaths]] = {
    # eager CPU inference: the whole batch through each block at once, not groups within 16 MiB
    "grouping": ("ours/whole-batch", FastPaths(grouped_inference=False)),
    # eager CPU inference: each dtype's linears on the other kernel, fp32 on oneDNN's linear with the bias
    # in its epilogue, bf16 on addmm
    "linear": ("ours/other-linear", FastPaths(onednn_linear_dtypes=(torch.float32,))),
    # bf16 CPU inference: oneDNN's linear given the plain weight, reordered into its layout on every call
    "packed-weights": ("ours/plain-weights", FastPaths(packed_weights=False)),
    # bf16 / fp16 CPU inference: SDPA's flash kernel on the half-precision q, k, v, not fp32 logits
    "half-attention": ("ours/flash-half", FastPaths(fp32_logits=False)),
    # CPU training: the plain softmax, whose masked (subnormal) probabilities reach the next bmm
    "flush": ("ours/plain-softmax", FastPaths(flushed_softmax=False)),
}


def _switched(step: Callable[[], Any], paths: FastPaths) -> Callable[[], Any]:
    def run_switched() -> Any:
        with use_fast_paths(paths):
            return step()

    return run_switched


# --------------------------------------------------------------------------- the implementations


class _HFLogits(nn.Module):
    """Hugging Face models take `pixel_values=` and return an output object; bench calls `m(x)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


M = TypeVar("M", bound=nn.Module)


@torch.no_grad()
def randomize_weights_(
    model: M, seed: int = 0, *, std: float = 0.02, logit_scales: tuple[float, float] | None = None
) -> M:
    """Draws every parameter afresh: std `std`, norm weights around 1; logit scales kept, or drawn
    uniformly from `logit_scales` (the parity tests draw them on both sides of the log(100) clamp).

    The official init zeroes the res-post-norms, which makes every block an identity: the peers'
    logits would then agree however their attention differed, and `max_abs_diff` would prove nothing.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "logit_scale" in name:
            if logit_scales is not None:
                p.copy_(torch.empty(p.shape).uniform_(*logit_scales, generator=g))
        elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def check_peers(impls: Sequence[str]) -> None:
    """InputError for an implementation of `impls` that is not one of IMPLS, or whose package is not
    installed here (`pip install transformers` for hf): before any model is built."""
    import importlib.util

    for p in impls:
        if p not in IMPLS:
            raise InputError(f"unknown implementation {p!r} in --compare; choose from {', '.join(IMPLS[1:])}")
        package = PEER_PACKAGES.get(p)
        if package is not None and importlib.util.find_spec(package) is None:
            raise InputError(
                f"--compare {p} needs the {package} package, which is not installed here: pip install {package}"
            )


def build_impl(impl: str, config: SwinV2Config, state_dict: dict[str, Tensor]) -> nn.Module:
    """The `impl` implementation of `config` with our `state_dict` loaded (strict); `m(x) -> logits`.

    timm takes our state dict through its own `checkpoint_filter_fn` (our names are the official
    ones); Hugging Face and torchvision through `swinv2.convert_state_dict`.
    """
    c = config
    if impl == "ours":
        model: nn.Module = SwinTransformerV2(c)
        model.load_state_dict(state_dict)
        return model
    if impl == "timm":
        from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
        from timm.models.swin_transformer_v2 import checkpoint_filter_fn

        # The class timm.create_model builds for the registered names, here for any config.
        model = TimmSwinV2(
            img_size=c.img_size,
            patch_size=c.patch_size,
            in_chans=c.in_chans,
            num_classes=c.num_classes,
            embed_dim=c.embed_dim,
            depths=c.depths,
            num_heads=c.num_heads,
            window_size=c.window_size,
            mlp_ratio=c.mlp_ratio,
            qkv_bias=c.qkv_bias,
            drop_rate=c.drop_rate,
            attn_drop_rate=c.attn_drop_rate,
            drop_path_rate=c.drop_path_rate,
            pretrained_window_sizes=c.pretrained_window_sizes,  # type: ignore[arg-type]  # timm takes (h, w) pairs too
        )
        model.load_state_dict(checkpoint_filter_fn(state_dict, model))
        return model
    if impl == "hf":
        from transformers import Swinv2Config, Swinv2ForImageClassification

        from ..weights.convert import convert_state_dict

        hf_cfg = Swinv2Config(  # type: ignore[call-arg]  # num_labels: a PreTrainedConfig kwarg, untyped
            image_size=c.img_size[0],
            patch_size=c.patch_size,
            num_channels=c.in_chans,
            embed_dim=c.embed_dim,
            depths=list(c.depths),
            num_heads=list(c.num_heads),
            window_size=c.window_size,  # type: ignore[arg-type]  # passed as it is, as HF's own ints are
            pretrained_window_sizes=list(c.pretrained_window_sizes),  # type: ignore[arg-type]  # likewise
            mlp_ratio=c.mlp_ratio,
            qkv_bias=c.qkv_bias,
            hidden_dropout_prob=c.drop_rate,
            attention_probs_dropout_prob=c.attn_drop_rate,
            drop_path_rate=c.drop_path_rate,
            num_labels=c.num_classes,
            layer_norm_eps=1e-5,
        )
        hf = Swinv2ForImageClassification(hf_cfg)
        hf.load_state_dict(convert_state_dict(state_dict, src="native", dst="hf", config=c))
        return _HFLogits(hf)
    if impl == "torchvision":
        from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

        from ..weights.convert import convert_state_dict

        if any(c.pretrained_window_sizes):
            raise InputError(
                "torchvision's SwinV2 has no pretrained_window_sizes; compare this variant with timm or hf instead"
            )
        model = SwinTransformer(
            patch_size=[c.patch_size] * 2,
            embed_dim=c.embed_dim,
            depths=list(c.depths),
            num_heads=list(c.num_heads),
            window_size=[c.window_size] * 2,
            mlp_ratio=c.mlp_ratio,
            dropout=c.drop_rate,
            attention_dropout=c.attn_drop_rate,
            stochastic_depth_prob=c.drop_path_rate,
            num_classes=c.num_classes,
            block=SwinTransformerBlockV2,
            downsample_layer=PatchMergingV2,
        )
        model.load_state_dict(convert_state_dict(state_dict, src="native", dst="torchvision", config=c))
        return model
    raise InputError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS[1:])}")


# --------------------------------------------------------------------------- measuring one step


def _make_step(
    module: nn.Module, *, train: bool, x: Tensor, dtype: torch.dtype, device: torch.device
) -> Callable[[], Any]:
    """One benchmark call of `module` (already on `device`, cast for inference) as a closure."""
    if not train:

        def infer() -> Tensor:
            with torch.inference_mode():
                return module(x)

        return infer

    half = dtype != torch.float32
    labels = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train_step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=half):
            logits = module(x)
        loss = F.cross_entropy(logits.float(), labels % logits.shape[-1])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return train_step


def _cpu_peak_from_trace(path: str) -> int:
    """Peak of the CPU allocator's running total in a chrome trace, above its value before the trace."""
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - start)


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of `step` above those allocated before it (see module doc)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side (kineto) prints start/stop and device-probe lines straight to file
    # descriptor 2, which no Python setting silences once torch is loaded; the step itself already
    # ran (and warned, if it had to) during warm-up, so stderr is muted for this one call.
    with _stderr_muted(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    del out
    fd, path = tempfile.mkstemp(suffix=".json", prefix="swinv2-bench-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        return _cpu_peak_from_trace(path)
    finally:
        os.unlink(path)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default rule), q in [0, 100]."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------- the harness


def _check_dtype(dtype: str, device: torch.device) -> None:
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type != "cuda":
        raise InputError(
            "fp16 is benchmarked on CUDA only (CPU fp16 kernels are not a deployment path); use bf16 on CPU"
        )


def run(
    model: str,
    *,
    batch_sizes: Sequence[int] = (8,),
    img_sizes: Sequence[int | None] = (None,),
    dtypes: Sequence[str] = ("fp32",),
    compile: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
    train: bool = False,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
    iters: int = 3,
    compare: Sequence[str] = (),
    weights: str | os.PathLike | None = None,
    measure_memory: bool = True,
    seed: int = 0,
    grad_checkpointing: bool = False,
    sequential_attention: bool = False,
    ab: str | None = None,
    only: str | None = None,
    precisions: Sequence[str] = ("fp32",),
    calib: str | os.PathLike | None = None,
    runtime_cache: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Benchmark `model` (a registry name) and the `compare` peers; one result dict per impl and setting.

    Runtimes in `compare` ("onnxruntime", "openvino") become rows "<runtime>/<precision>", one per entry
    of `precisions` the runtime supports here (CPU inference only), timed in the same interleaved
    rounds: their `ours_speedup` compares them with ours at each `dtypes` entry. Their exports go to
    `runtime_cache` (default: a temporary folder of this call); int8 is calibrated on the `calib`
    folder, else on seeded noise (enough for timing, not for accuracy).

    `img_sizes` entries of None mean the variant's nominal size. Without `weights` every impl gets the
    same re-randomised weights (`randomize_weights_`); with `weights` (any file `swinv2.load_model`
    reads) they get those. `grad_checkpointing` turns on ours' per-block activation checkpointing and
    `sequential_attention` ours' sequential attention (the peers run as they are: the comparison is
    memory for the same result). `ab` adds ours with one fast path switched to its alternative
    (`AB_SWITCHES`); `only` benchmarks that one implementation alone. See the module docstring for
    the fields and the method.
    """
    dev = D.resolve_device(device, "--device")
    impls = [only] if only is not None else ["ours"] + [p for p in compare if p != "ours"]
    runtime_names = [p for p in impls if p in RUNTIME_IMPLS]
    impls = [p for p in impls if p not in RUNTIME_IMPLS]
    if not impls:
        raise InputError(f"{only}: a runtime is timed beside ours, not alone (no --own-process)")
    if runtime_names and (train or dev.type != "cpu"):
        raise InputError(f"--compare {','.join(runtime_names)}: runtimes are timed in CPU inference only")
    check_peers(impls)
    switches: dict[str, FastPaths] = {}
    if ab is not None:
        if ab not in AB_SWITCHES or impls[0] != "ours":
            raise InputError(f"--ab {ab!r}: choose from {', '.join(AB_SWITCHES)}, with ours in the run")
        name, paths = AB_SWITCHES[ab]
        switches[name] = paths
        impls.insert(1, name)
    for d in dtypes:
        _check_dtype(d, dev)
    if repeats < 1 or iters < 1 or warmup < 0:
        raise InputError("repeats and iters must be >= 1 and warmup >= 0")
    if "bf16" in dtypes:
        warn_if_bf16_emulated(dev, "--dtype bf16")

    if weights is not None:
        from ..weights.factory import load_model

        base = load_model(weights, name=model)
        base_config = base.config
    else:
        torch.manual_seed(seed)
        base_config = model_config(model)
        base = randomize_weights_(SwinTransformerV2(base_config), seed)
    state_dict = {k: v.detach().clone() for k, v in base.state_dict().items()}
    del base

    results = []
    with contextlib.ExitStack() as stack:
        if runtime_names and runtime_cache is None:  # the runtimes' exports, this call only
            runtime_cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="swinv2-bench-"))
        for img in img_sizes:
            size = img or base_config.img_size[0]
            config = replace(base_config, img_size=(size, size))
            modules = {p: build_impl("ours" if p in switches else p, config, state_dict) for p in impls}
            diffs = _max_abs_diffs(modules, size, switches)
            runtimes = _build_runtimes(
                runtime_names, precisions, modules[impls[0]], size, diffs, calib=calib, cache_dir=runtime_cache
            )
            for dtype in dtypes:
                for batch in batch_sizes:
                    results += _bench_setting(
                        modules,
                        diffs,
                        model=model,
                        config=config,
                        size=size,
                        batch=batch,
                        dtype=dtype,
                        compile=compile,
                        compile_kwargs=compile_kwargs or {},
                        train=train,
                        device=dev,
                        repeats=repeats,
                        warmup=warmup,
                        iters=iters,
                        measure_memory=measure_memory,
                        seed=seed,
                        grad_checkpointing=grad_checkpointing,
                        sequential_attention=sequential_attention,
                        switches=switches,
                        runtimes=runtimes,
                    )
    return results


@torch.no_grad()
def _build_runtimes(
    names: Sequence[str],
    precisions: Sequence[str],
    ours: nn.Module,
    size: int,
    diffs: dict[str, float | None],
    *,
    calib: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
) -> dict[str, tuple[Callable, str]]:
    """ "<runtime>/<precision>" -> (callable, precision) for every pair that runs here, OpenVINO also as
    "openvino x2 streams/<precision>" (`runtime.settings`; pairs that do not run here are skipped
    with a warning, e.g. bf16 on a CPU without it); their max |logits - ours fp32| go into `diffs`.
    int8 without `calib` is calibrated on 32 seeded N(0, 1) images."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))  # as in _max_abs_diffs
    ref = ours.eval()(x)
    out: dict[str, tuple[Callable, str]] = {}
    for name in names:
        for precision in precisions:
            images: str | os.PathLike | list[Any] | None = calib
            if precision == "int8" and images is None:
                g = torch.Generator().manual_seed(0)
                images = [torch.randn(1, 3, size, size, generator=g).numpy() for _ in range(32)]
            for _, streams in runtime_settings(name):  # OpenVINO also with streams, as --runtime auto weighs it
                try:
                    rt = load_runtime(
                        ours, name, precision, img_size=size, calib=images, cache_dir=cache_dir, streams=streams
                    )
                except ValueError as e:  # runtime.RuntimeUnavailable: one line saying why
                    log.warning("%s/%s skipped: %s", name, precision, e)
                    break
                out[f"{rt.label}/{precision}"] = (rt, precision)
                diffs[f"{rt.label}/{precision}"] = float((rt(x) - ref).abs().max())
    return out


@torch.no_grad()
def _max_abs_diffs(modules: dict[str, nn.Module], size: int, switches: dict[str, FastPaths]) -> dict[str, float | None]:
    """fp32 eval logits of every impl against the first (ours) on one seeded image; A/B rows switched."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    outs = {}
    for p, m in modules.items():
        with use_fast_paths(switches[p]) if p in switches else contextlib.nullcontext():
            outs[p] = m.eval()(x)
    ref = next(iter(outs))
    diffs: dict[str, float | None] = {ref: None}
    for p, out in outs.items():
        if p != ref:
            diffs[p] = diff = float((out - outs[ref]).abs().max())
            if diff > 1e-3:
                log.warning("%s logits differ from ours by %.3g: not the same computation", p, diff)
    return diffs


def _bench_setting(
    modules: dict[str, nn.Module],
    diffs: dict[str, float | None],
    *,
    model: str,
    config: SwinV2Config,
    size: int,
    batch: int,
    dtype: str,
    compile: bool,
    compile_kwargs: dict[str, Any],
    train: bool,
    device: torch.device,
    repeats: int,
    warmup: int,
    iters: int,
    measure_memory: bool,
    seed: int,
    grad_checkpointing: bool = False,
    sequential_attention: bool = False,
    switches: dict[str, FastPaths] | None = None,
    runtimes: dict[str, tuple[Callable, str]] | None = None,
) -> list[dict[str, Any]]:
    """Warm-up, memory and interleaved timed rounds of every impl at one (batch, size, dtype); ratios
    against the first impl (ours unless `only`); impls in `switches` run ours under their switch."""
    switches = switches or {}
    torch_dtype = DTYPES[dtype]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    steps: dict[str, Callable[[], Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for p, base in modules.items():
        # Each setting times a fresh copy: training steps and dtype casts must not leak between settings.
        m = copy.deepcopy(base).to(device)
        is_ours = p == "ours" or p in switches
        if is_ours and grad_checkpointing:
            cast(SwinTransformerV2, m).set_grad_checkpointing(True)
        if is_ours and sequential_attention:
            cast(SwinTransformerV2, m).set_sequential_attention(True)
        if train:
            m.train()
        else:
            m.eval().to(torch_dtype)
        weights_bytes = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
        run_m = cast(nn.Module, torch.compile(m, **compile_kwargs)) if compile else m  # an OptimizedModule
        steps[p] = _make_step(run_m, train=train, x=x if train else x.to(torch_dtype), dtype=torch_dtype, device=device)
        if p in switches:
            steps[p] = _switched(steps[p], switches[p])
        compile_s = None
        for i in range(warmup):
            t = timed(steps[p], device)
            if i == 0 and compile:
                compile_s = t
        peak = peak_memory(steps[p], device) if measure_memory else None
        rows[p] = dict(
            impl=p,
            model=model,
            mode="train" if train else "infer",
            device=str(device),
            dtype=dtype,
            compiled=compile,
            grad_checkpointing=grad_checkpointing and is_ours,
            sequential_attention=sequential_attention and is_ours,
            compile_s=compile_s,
            batch_size=batch,
            img_size=size,
            warmup=warmup,
            repeats=repeats,
            iters=iters,
            peak_mem_bytes=peak,
            weights_bytes=weights_bytes,
            gmacs_per_img=count_flops(config, size) / 1e9,
            max_abs_diff=diffs[p],
        )
        log.info(
            "%s %s %s batch %d img %d: warmed up%s",
            p,
            rows[p]["mode"],
            dtype,
            batch,
            size,
            f", compiled in {compile_s:.1f}s" if compile_s is not None else "",
        )

    first = next(iter(rows))
    for p, (fn, precision) in (runtimes or {}).items():  # the runtimes: CPU inference on fp32 images
        steps[p] = functools.partial(fn, x.float())
        for _ in range(warmup):
            steps[p]()
        rows[p] = dict(
            rows[first],
            impl=p,
            dtype=precision,
            compiled=False,
            compile_s=None,
            peak_mem_bytes=None,
            grad_checkpointing=False,
            sequential_attention=False,
            max_abs_diff=diffs[p],
            weights_bytes=None,
        )
    names = list(steps)
    round_times: dict[str, list[float]] = {p: [] for p in names}
    call_times: dict[str, list[float]] = {p: [] for p in names}
    faults = dict.fromkeys(names, 0)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no impl always runs first
        for p in order:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times = [timed(steps[p], device) for _ in range(iters)]
            faults[p] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            call_times[p] += times
            round_times[p].append(sum(times))

    ours = round_times[names[0]]
    for p in names:
        per_round = [batch * iters / t for t in round_times[p]]
        med = statistics.median(per_round)
        paired = [t / o for t, o in zip(round_times[p], ours)]
        row = rows[p]
        row.update(
            img_per_s=med,
            img_per_s_min=min(per_round),
            img_per_s_max=max(per_round),
            spread_pct=100 * (max(per_round) - min(per_round)) / med,
            latency_ms_p50=1e3 * _percentile(call_times[p], 50),
            latency_ms_p90=1e3 * _percentile(call_times[p], 90),
            gflop_per_s=2 * row["gmacs_per_img"] * med * (3 if train else 1),
            ours_speedup=statistics.median(paired),
            ours_speedup_min=min(paired),
            ours_speedup_max=max(paired),
            minor_faults_per_call=faults[p] / (repeats * iters),
        )
        ours_peak, peak = rows[names[0]]["peak_mem_bytes"], row["peak_mem_bytes"]
        row["ours_mem_ratio"] = ours_peak / peak if ours_peak is not None and peak else None
    return [rows[p] for p in names]


# --------------------------------------------------------------------------- other measurements


def run_own_processes(impls: Sequence[str], bench_args: Sequence[str], *, rounds: int = 2) -> list[dict[str, Any]]:
    """Every implementation of `impls` (ours first) alone in its own fresh process (`python -m swinv2
    bench BENCH_ARGS --only IMPL`), `rounds` processes each, alternating: what a user's own process sees,
    with no other implementation's heap before it. One row per impl and setting: medians over its
    processes of img/s and page faults per call; `ours_speedup` is ours' median img/s over this
    impl's (unpaired: the processes ran at different moments of the machine's load)."""
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for impl in impls:
            fd, path = tempfile.mkstemp(suffix=".json", prefix="swinv2-bench-")
            os.close(fd)
            try:
                cmd = [sys.executable, "-m", "swinv2", "bench", *bench_args, "--only", impl, "--json", path]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{impl} process failed: {done.stderr.strip().splitlines()[-1:]}")
                with open(path) as f:
                    record = json.load(f)
            finally:
                os.unlink(path)
            for row in record["results"]:
                runs.setdefault((row["mode"], row["dtype"], row["batch_size"], row["img_size"], impl), []).append(row)
                log.info(
                    "process %d/%d: %s %.2f img/s, %.0f faults/call",
                    r + 1,
                    rounds,
                    impl,
                    row["img_per_s"],
                    row["minor_faults_per_call"],
                )
    results = []
    for (*setting, impl), rows in runs.items():
        ours_key = (*setting, "ours")  # not inside runs[...]: mypy reads x[(*a, b)] as 3.11's x[*a, b]
        ips = [row["img_per_s"] for row in rows]
        med = statistics.median(ips)
        results.append(
            dict(
                rows[0],
                impl=impl,
                processes=len(rows),
                img_per_s=med,
                img_per_s_min=min(ips),
                img_per_s_max=max(ips),
                spread_pct=100 * (max(ips) - min(ips)) / med,
                latency_ms_p50=statistics.median(row["latency_ms_p50"] for row in rows),
                latency_ms_p90=statistics.median(row["latency_ms_p90"] for row in rows),
                minor_faults_per_call=statistics.median(row["minor_faults_per_call"] for row in rows),
                ours_speedup=statistics.median(row["img_per_s"] for row in runs[ours_key]) / med,
                ours_speedup_min=None,
                ours_speedup_max=None,
                ours_mem_ratio=None,
                max_abs_diff=None,
            )
        )
    return results


def optimizer_steps(model: str, *, rounds: int = 15, weight_decay: float = 0.05) -> list[dict[str, Any]]:
    """Time one AdamW step over `model`'s parameter groups as `swinv2 train` builds them (official
    no-decay set): torch's default implementation (a for-loop on the CPU), foreach and fused, in
    interleaved rounds. `ms_per_step` is the median; `x_default` how many times faster than the default."""
    from ..train.schedule import param_groups

    base = SwinTransformerV2(model_config(model))
    kinds: dict[str, dict[str, Any]] = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {}
    for name, kwargs in kinds.items():
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        optimizers[name] = torch.optim.AdamW(param_groups(m, weight_decay), lr=1e-3, **kwargs)
        optimizers[name].step()  # state allocated outside the timing
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            seconds[name].append(time.perf_counter() - start)
    default = statistics.median(seconds["default"])
    tensors = sum(1 for _ in base.parameters())
    return [
        dict(
            model=model,
            optimizer=f"AdamW {name}",
            tensors=tensors,
            rounds=rounds,
            ms_per_step=1e3 * statistics.median(seconds[name]),
            x_default=default / statistics.median(seconds[name]),
        )
        for name in kinds
    ]


# --------------------------------------------------------------------------- reporting


def environment(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: machine, versions, threads, date."""
    env: dict[str, Any] = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
    )
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for lib in ("timm", "transformers", "torchvision"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            env[lib] = None
    return env


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of `run`'s results; 'faults' is minor page faults per call, 'ours x' how
    many times faster ours is."""
    header = (
        "impl",
        "mode",
        "dtype",
        "compiled",
        "batch",
        "img",
        "img/s",
        "spread",
        "p50 ms",
        "p90 ms",
        "peak MB",
        "faults",
        "ours x",
        "ours mem",
        "max|d|",
    )
    rows = []
    for r in results:
        peak = r["peak_mem_bytes"]
        rows.append(
            (
                r["impl"],
                r["mode"],
                r["dtype"],
                "yes" if r["compiled"] else "no",
                str(r["batch_size"]),
                str(r["img_size"]),
                f"{r['img_per_s']:.2f}",
                f"{r['spread_pct']:.0f}%",
                f"{r['latency_ms_p50']:.1f}",
                f"{r['latency_ms_p90']:.1f}",
                "-" if peak is None else f"{peak / 2**20:.1f}",
                f"{r['minor_faults_per_call']:.0f}",
                f"{r['ours_speedup']:.2f}",
                "-" if r["ours_mem_ratio"] is None else f"{r['ours_mem_ratio']:.2f}",
                "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}",
            )
        )
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(
    path: str | os.PathLike, results: Sequence[dict[str, Any]], *, meta: dict[str, Any] | None = None
) -> None:
    """{"meta": environment + `meta`, "results": [...]}, written to a temp file then renamed."""
    path = os.fspath(path)
    record = {
        "meta": {**environment(results[0]["device"] if results else "cpu"), **(meta or {})},
        "results": list(results),
    }
    write_output(path, json.dumps(record, indent=1) + "\n")
