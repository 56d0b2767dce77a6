"""The toy stage: a small MLP fitted to a synthetic regression.

It proves the harness end to end in seconds on a CPU (the loss goes down, a killed and resumed
run ends with the same weights, torchrun works) and is the smallest example of a solver. The
data is drawn once from `cfg.seed`: inputs x ~ N(0, 1) of `input_dim` features, targets from a
fixed random "teacher" y = sin(x W1) w2 + noise, so the best reachable MSE is `noise_std ** 2`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from voicelm.core.checkpoint import config_from_dict, load_part, load_state_strict, save_part
from voicelm.core.solver import Solver

KIND = "toy"


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    input_dim: int = 8
    hidden_dim: int = 64
    output_dim: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("input_dim", "hidden_dim", "output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ToyConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ToyConfig.dropout must be in [0, 1), got {self.dropout!r}")


class ToyMLP(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, input_dim) -> (B, output_dim)
        if x.dim() != 2 or x.shape[-1] != self.config.input_dim:
            raise ValueError(f"ToyMLP expects inputs of shape (batch, {self.config.input_dim}), got {tuple(x.shape)}")
        return self.net(x)


def load_toy(directory: str | Path) -> ToyMLP:
    """The model a toy run exported (`run_dir/export`)."""
    config_dict, state = load_part(directory, KIND)
    model = ToyMLP(config_from_dict(ToyConfig, config_dict, where=f"{directory}/config.json"))
    load_state_strict(model, state, where=str(directory))
    return model.eval()


def make_toy_data(num_samples: int, input_dim: int, output_dim: int, *, seed: int, noise_std: float,
                  split: int) -> TensorDataset:
    """`num_samples` (x, y) pairs; the teacher depends on `seed` only, the samples on (seed, split)."""
    teacher = torch.Generator().manual_seed(seed)
    w1 = torch.randn(input_dim, 16, generator=teacher) / input_dim**0.5
    w2 = torch.randn(16, output_dim, generator=teacher) / 2.0
    gen = torch.Generator().manual_seed(seed * 1000 + 1 + split)
    x = torch.randn(num_samples, input_dim, generator=gen)
    y = torch.sin(x @ w1) @ w2  # (N, output_dim)
    y = y + noise_std * torch.randn(y.shape, generator=gen)
    return TensorDataset(x, y)


class ToySolver(Solver):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        s = cfg.solver
        self.model_config = ToyConfig(
            input_dim=int(s.get("input_dim", 8)), hidden_dim=int(s.get("hidden_dim", 64)),
            output_dim=int(s.get("output_dim", 1)), dropout=float(s.get("dropout", 0.0)),
        )
        self.batch_size = int(s.get("batch_size", 32))
        self.num_samples = int(s.get("num_samples", 1024))
        self.valid_samples = int(s.get("valid_samples", 256))
        self.noise_std = float(s.get("noise_std", 0.05))
        if self.batch_size < 1 or self.num_samples < self.batch_size:
            raise ValueError(f"solver.batch_size ({self.batch_size}) must be >= 1 and <= solver.num_samples ({self.num_samples})")
        self.seed = int(cfg.get("seed", 0))

    def build_model(self) -> nn.Module:
        return ToyMLP(self.model_config)

    def build_dataloaders(self) -> tuple[Iterable, Iterable | None]:
        c = self.model_config
        train = make_toy_data(self.num_samples, c.input_dim, c.output_dim, seed=self.seed, noise_std=self.noise_std, split=0)
        valid = make_toy_data(self.valid_samples, c.input_dim, c.output_dim, seed=self.seed, noise_std=self.noise_std, split=1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Each rank sees its own shard; the harness calls set_epoch so shards reshuffle per epoch.
            sampler = DistributedSampler(train, shuffle=True, seed=self.seed, drop_last=True)
            train_loader = DataLoader(train, batch_size=self.batch_size, sampler=sampler, drop_last=True)
        else:
            train_loader = DataLoader(train, batch_size=self.batch_size, shuffle=True, drop_last=True)
        valid_loader = DataLoader(valid, batch_size=256) if self.valid_samples > 0 else None
        return train_loader, valid_loader

    def compute_loss(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        x, y = batch
        prediction = model(x)
        return {"loss": nn.functional.mse_loss(prediction, y)}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        save_part(out_dir, KIND, model.config, model.state_dict())
