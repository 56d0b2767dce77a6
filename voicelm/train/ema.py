"""Exponential moving average of a model's trainable parameters.

Only trainable parameters are averaged. Buffers are not: some are counters or flags (e.g. a VQ
codebook's "initialised" marker) whose average means nothing, so the EMA model always uses the
live buffers. Frozen parameters never change, so averaging them would only cost memory.
Works on FSDP2 shards too: each rank averages its own shard (DTensor arithmetic is local).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * live, after each optimisation step."""
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            avg.lerp_(params[name].detach(), 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run code with the averaged weights in `model`; the live weights come back afterwards."""
        params = dict(model.named_parameters())
        live = {name: params[name].detach().clone() for name in self.shadow}
        for name, avg in self.shadow.items():
            params[name].copy_(avg)
        try:
            yield model
        finally:
            for name, value in live.items():
                params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors by parameter name. Collective under FSDP: call on every rank."""
        return {name: _full(t).cpu() for name, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"the saved EMA does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                " (the model or its trainable parameters changed since the checkpoint)"
            )
        for name, avg in self.shadow.items():
            avg.copy_(_like(state[name], avg))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `target` (sharded the same way if `target` is a DTensor shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device), target.device_mesh, target.placements)
    return full.to(device=target.device, dtype=target.dtype)
