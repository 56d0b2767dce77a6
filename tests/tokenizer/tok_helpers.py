"""Helpers shared by the tokenizer tests."""

import torch

from voicelm.core.presets import load_preset

from tokenizer.config import TokenizerConfig


def tiny_config(**overrides) -> TokenizerConfig:
    values = load_preset("tokenizer", "tiny")
    values.update(overrides)
    return TokenizerConfig(**values)


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> torch.Tensor:
    """A voiced-looking test signal: a 180 Hz tone under a 3 Hz envelope, plus noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * rate)
    t = torch.arange(n) / rate
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t)
    return (0.3 * envelope * torch.sin(2 * torch.pi * 180 * t) + 0.05 * torch.randn(n, generator=g)).clamp(-1, 1)
