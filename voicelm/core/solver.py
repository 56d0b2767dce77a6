"""The solver interface every training stage implements.

The harness (`voicelm.train`) owns the loop: devices, DDP/FSDP wrapping, optimizer and schedule,
gradient clipping, EMA, logging, checkpoints and resume. A solver owns what is specific to
one stage: which model, which data, what a step computes, how to evaluate and what to export.
It lives beside its part (e.g. `tokenizer/solver.py`) and imports only `voicelm.core`.

    class MySolver(Solver):
        def build_model(self): ...                  # nn.Module on CPU, float32
        def build_dataloaders(self): ...            # (train_iterable, valid_iterable | None)
        def compute_loss(self, model, batch): ...   # {"loss": scalar, other metrics...}
        def evaluate(self, model, valid): ...       # {"metric": float, ...}, run under EMA weights
        def export(self, model, out_dir): ...       # write the part checkpoint (config.json + weights)

Solvers with several optimizers (a GAN vocoder) override `optimizer_groups` and `train_step`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn


class Solver(abc.ABC):
    def __init__(self, cfg: Any):
        # The whole composed hydra config: the solver's settings are `cfg.solver`, the model
        # presets `cfg.tokenizer`, `cfg.decoder`, `cfg.vocoder`, `cfg.lm`.
        self.cfg = cfg

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        ...

    @abc.abstractmethod
    def build_dataloaders(self) -> tuple[Iterable, Iterable | None]:
        """Train and validation iterables. The train one is iterated again when exhausted.

        Under DDP, `torch.distributed` is initialised before this is called, so a solver can
        shard its data with `DistributedSampler`.
        """

    @abc.abstractmethod
    def compute_loss(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        """Forward one batch; return a dict with a scalar `loss` and any other scalar metrics."""

    def evaluate(self, model: nn.Module, valid: Iterable | None) -> dict[str, float]:
        """Validation metrics (the harness calls this on rank 0 with the EMA weights if any)."""
        if valid is None:
            return {}
        totals: dict[str, float] = {}
        count = 0
        with torch.no_grad():
            for batch in valid:
                for k, v in self.compute_loss(model, batch).items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                count += 1
        return {k: v / max(count, 1) for k, v in totals.items()}

    @abc.abstractmethod
    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the inference checkpoint of the trained model (a part directory)."""

    # --- hooks for solvers that need more than one optimizer --------------------------------
    def optimizer_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups, one optimizer each; default: one group of everything."""
        return {"main": [p for p in model.parameters() if p.requires_grad]}

    def train_step(self, model: nn.Module, batch: Any, optimizers: Mapping[str, torch.optim.Optimizer],
                   backward_and_step) -> Mapping[str, torch.Tensor]:
        """One optimisation step. `backward_and_step(loss, name)` backpropagates `loss`, clips
        gradients and steps the optimizer `name` (and its schedule). The default covers
        single-optimizer solvers; a GAN overrides it to alternate its two optimizers.
        """
        metrics = self.compute_loss(model, batch)
        if not isinstance(metrics, Mapping) or "loss" not in metrics:
            got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
            raise ValueError(f"{type(self).__name__}.compute_loss must return a dict with a 'loss' entry, got {got}")
        backward_and_step(metrics["loss"], "main")
        return metrics
