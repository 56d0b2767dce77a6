"""Discriminators and GAN losses for vocoder training (training-time only; never exported).

- Multi-period (HiFi-GAN): the waveform folded into (T / p, p) for periods 2, 3, 5, 7, 11, each
  judged by a stack of (k x 1) 2-D convolutions, so every discriminator sees one phase of a
  periodic structure (pitch harmonics) at a time.
- Multi-resolution STFT: log-magnitude spectrograms at several FFT sizes judged by 2-D convs
  strided along frequency, which catches the metallic/buzzy artefacts a periodic view misses.
Losses are least squares (LSGAN, as HiFi-GAN) plus L1 feature matching over every layer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

LRELU_SLOPE = 0.1


@dataclasses.dataclass
class DiscriminatorConfig:
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)  # HiFi-GAN widths
    fft_sizes: tuple[int, ...] = (2048, 1024, 512)
    stft_channels: int = 32

    def __post_init__(self) -> None:
        self.periods = tuple(int(p) for p in self.periods)
        self.period_channels = tuple(int(c) for c in self.period_channels)
        self.fft_sizes = tuple(int(n) for n in self.fft_sizes)
        if not self.periods and not self.fft_sizes:
            raise ValueError("DiscriminatorConfig needs at least one period or one FFT size")
        if len(self.period_channels) < 2:
            raise ValueError("period_channels needs at least two widths")


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: tuple[int, ...]):
        super().__init__()
        self.period = period
        widths = (1, *channels)
        self.convs = nn.ModuleList()
        for i in range(len(channels)):
            stride = 3 if i < len(channels) - 1 else 1
            self.convs.append(weight_norm(nn.Conv2d(widths[i], widths[i + 1], (5, 1), (stride, 1), padding=(2, 0))))
        self.conv_post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch, length = wav.shape
        remainder = (-length) % self.period
        x = F.pad(wav, (0, remainder), mode="reflect" if remainder < length else "constant")
        x = x.view(batch, 1, -1, self.period)  # (B, 1, T / p, p)
        return _conv_stack(self.convs, self.conv_post, x)


def _conv_stack(convs: nn.ModuleList, conv_post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaky-ReLU conv stack of a sub-discriminator: (flattened logits, every layer's features)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        features.append(x)
    x = conv_post(x)
    features.append(x)
    return x.flatten(1), features


class STFTDiscriminator(nn.Module):
    def __init__(self, n_fft: int, channels: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (3, 9), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))),
        ])
        self.conv_post = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(wav.float(), self.n_fft, self.hop_length, window=self.window, return_complex=True)
        x = torch.log(spec.abs().clamp(min=1e-5))[:, None].transpose(2, 3).to(wav.dtype)  # (B, 1, frames, bins)
        return _conv_stack(self.convs, self.conv_post, x)


class VocoderDiscriminator(nn.Module):
    """All sub-discriminators: wav (B, T) -> (list of logits, list of feature-map lists)."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        self.period_discriminators = nn.ModuleList(
            PeriodDiscriminator(p, config.period_channels) for p in config.periods
        )
        self.stft_discriminators = nn.ModuleList(
            STFTDiscriminator(n, config.stft_channels) for n in config.fft_sizes
        )

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        if wav.dim() != 2:
            raise ValueError(f"discriminator input must be (batch, samples), got {tuple(wav.shape)}")
        logits, features = [], []
        for discriminator in (*self.period_discriminators, *self.stft_discriminators):
            score, maps = discriminator(wav)
            logits.append(score)
            features.append(maps)
        return logits, features


def discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: push real scores to 1 and generated ones to 0."""
    return sum(torch.mean((1 - r) ** 2) + torch.mean(g ** 2) for r, g in zip(real_logits, fake_logits))


def generator_adversarial_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """LSGAN: the generator wants its scores at 1."""
    return sum(torch.mean((1 - g) ** 2) for g in fake_logits)


def feature_matching_loss(real_features: list[list[torch.Tensor]], fake_features: list[list[torch.Tensor]]) -> torch.Tensor:
    """Mean L1 distance between the discriminators' activations on real and generated audio."""
    total = 0.0
    for real_maps, fake_maps in zip(real_features, fake_features):
        for real, fake in zip(real_maps, fake_maps):
            total = total + torch.mean(torch.abs(real.detach() - fake))
    return total
