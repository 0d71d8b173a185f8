"""torch.distributed plumbing for training: process-group setup from torchrun's environment,
the rank-0 logging filter, reductions and model wrapping (DDP, or FSDP2 `fully_shard`).

One process is a world of size 1: every helper here is then a no-op, so the training loop has
no separate single-process path.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, ValueType


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, what: str = "train.device") -> torch.device:
    """`device` ("auto": CUDA where there is one) as a device this machine has; otherwise a ValueError
    of one line naming the setting `what` it came from."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"{what}={device}: not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{what}={device} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{what}={device} but this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    with gloo on CPU and nccl on CUDA, or return a world of one. The rank-0 filter: on other ranks
    the `swinv2` loggers pass warnings and errors only (until `teardown`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            device_kw: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **device_kw)
    if rank != 0:
        # A level, not a logger filter: filters on "swinv2" would not see records of its children.
        logging.getLogger("swinv2").setLevel(logging.WARNING)
    return DistEnv(rank, world, local_rank, dev)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
    if env.rank != 0:
        logging.getLogger("swinv2").setLevel(logging.NOTSET)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op in a world of one); returns `t`."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, env: DistEnv, parallel: str = "ddp") -> nn.Module:
    """DDP (or FSDP2: each SwinV2 block and the root `fully_shard`ed) in a distributed world;
    the model itself otherwise."""
    if not env.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in cast(nn.ModuleList, model.layers):  # SwinTransformerV2's stages
            for block in cast(nn.ModuleList, layer.blocks):
                fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if `flag` is True on any rank."""
    if not env.distributed:
        return flag
    t = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------- full (unsharded) state


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _full_options(**kw: Any) -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module, env: DistEnv, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The model's whole state dict. Under FSDP it is gathered from the shards (a collective) to
    rank 0's CPU, or with `everywhere` to every rank's device."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True) if everywhere else _full_options()
        return cast("dict[str, torch.Tensor]", get_model_state_dict(model, options=opts))  # a model's: tensors
    return model.state_dict()


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], env: DistEnv) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, cast("dict[str, ValueType]", state), options=_full_options())
        return
    model.load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """The optimizer's state dict; under FSDP gathered to full tensors (keyed by parameter name)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_options())
    return optimizer.state_dict()


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], env: DistEnv
) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_full_options())
        return
    optimizer.load_state_dict(state)
