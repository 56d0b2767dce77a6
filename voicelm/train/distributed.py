"""Process group, device choice and model wrapping, all from PyTorch's own engines.

A run is distributed when `torchrun` launched it (it sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address): the harness then joins the process group (NCCL on GPUs, gloo on CPUs) and
wraps the model in DDP, or FSDP (`fully_shard`) when `distributed=fsdp`. Without torchrun there
is one process and no process group.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # we created the process group, so we destroy it at the end

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or self.initialized_here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        from voicelm.train.config import ConfigError

        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_choice: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, pick_device(device_choice), initialized_here=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_choice, local_rank)
    initialized_here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        initialized_here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here)


def teardown(info: DistInfo, *, synchronize: bool = False) -> None:
    """Leave the process group this process joined. `synchronize=True` (every rank finished
    normally) first waits at a barrier: a rank that destroyed the group while another still had
    gloo work in flight made that rank abort ("terminate called without an active exception")."""
    if info.initialized_here and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, mode: str, *, find_unused_parameters: bool = False,
               fsdp_units: Callable[[nn.Module], Iterable[nn.Module]] | None = None) -> nn.Module:
    """DDP or FSDP around `model` (already on `info.device`); the model itself when not distributed.

    FSDP2 (`fully_shard`) shards in place: the returned object is `model`, its parameters become
    DTensor shards. `fsdp_units(model)` names the submodules to shard separately (e.g. the
    transformer blocks), so only one block's full weights exist at a time; the root is sharded last.
    """
    if not info.is_distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in (fsdp_units(model) if fsdp_units is not None else ()):
            fully_shard(unit)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 wraps in place, so nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def mean_across_ranks(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks; every rank must pass the same keys."""
    if not info.is_distributed or not values:
        return dict(values)
    keys = sorted(values)
    # gloo reduces CPU tensors, NCCL needs them on the GPU.
    vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    vector /= info.world_size
    reduced = dict(zip(keys, vector.tolist()))
    return {k: float(reduced[k]) for k in values}


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()
