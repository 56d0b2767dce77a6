"""The decoder's mel front end: 22,050 Hz audio -> 80 log-mel bins at hop 256 (86.13 frames/s).

One function for everything that needs this mel (flow targets, vocoder training and its mel
loss), so the flow model and the vocoder always agree on the representation. The geometry is
the one the official GLM-4-Voice decoder uses: n_fft 1024, win 1024, hop 256, 80 mels,
fmin 0, fmax 8000, natural log of the magnitude mel clamped at 1e-5.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch
import torch.nn.functional as F
import torchaudio

from voicelm.core.audio import DECODER_SAMPLE_RATE, MEL_HOP


@dataclasses.dataclass(frozen=True)
class MelConfig:
    sample_rate: int = DECODER_SAMPLE_RATE
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = MEL_HOP
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-5


@lru_cache(maxsize=8)
def _transform(config: MelConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        win_length=config.win_length,
        hop_length=config.hop_length,
        f_min=config.f_min,
        f_max=config.f_max,
        n_mels=config.n_mels,
        power=1.0,  # magnitude, not power
        center=False,  # we pad ourselves so that frame i is centred on sample i * hop
        norm="slaney",
        mel_scale="slaney",
    )


def mel_spectrogram(wav: torch.Tensor, config: MelConfig = MelConfig()) -> torch.Tensor:
    """(T,) or (B, T) waveform at `config.sample_rate` -> (n_mels, T // hop) or (B, n_mels, T // hop)."""
    squeeze = wav.dim() == 1
    if squeeze:
        wav = wav[None]
    pad = (config.n_fft - config.hop_length) // 2
    # Reflect padding so that T samples give exactly T // hop frames.
    padded = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    mel = _transform(config).to(wav.device)(padded)  # (B, n_mels, frames)
    frames = wav.shape[-1] // config.hop_length
    mel = torch.log(torch.clamp(mel[..., :frames], min=config.log_floor))
    return mel[0] if squeeze else mel
