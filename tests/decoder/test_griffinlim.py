"""Griffin-Lim fallback vocoder: same interface as HiFT, reconstructs a tone from its mel."""

from __future__ import annotations

import math

import pytest
import torch

from decoder.griffinlim import GriffinLimVocoder
from decoder.mel import MelConfig, mel_spectrogram


def _stft_magnitude(wav: torch.Tensor) -> torch.Tensor:
    return torch.stft(wav, 1024, 256, window=torch.hann_window(1024), return_complex=True).abs()


def test_reconstructs_a_tone_with_the_hift_interface():
    vocoder = GriffinLimVocoder()
    assert vocoder.sample_rate == 22050 and vocoder.hop_length == 256 and vocoder.is_fallback
    t = torch.arange(22050) / 22050
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t)
    mel = mel_spectrogram(tone)[None]  # (1, 80, 86)
    wav, source = vocoder.inference(mel, cache_source=torch.zeros(1, 1, 256))
    assert source is None
    assert wav.shape == (1, mel.shape[-1] * 256)
    target = _stft_magnitude(tone[: wav.shape[-1]])
    rebuilt = _stft_magnitude(wav[0])
    spectral_convergence = float((target - rebuilt).norm() / target.norm())
    # Measured 0.27: the mel filterbank blurs the partial (80 bins up to 8 kHz), so a pure tone
    # cannot come back exact; noise or a wrong pitch would be near 1.
    assert spectral_convergence < 0.4
    peak_hz = float(torch.fft.rfftfreq(wav.shape[-1], 1 / 22050)[torch.fft.rfft(wav[0]).abs().argmax()])
    assert abs(peak_hz - 440) < 10  # mel bands near 440 Hz are ~30 Hz wide
    # The mel of the output matches the input mel (log domain, mean abs difference).
    assert float((mel_spectrogram(wav[0]) - mel[0]).abs().mean()) < 0.35


def test_deterministic_and_validates_input():
    vocoder = GriffinLimVocoder(MelConfig(), n_iter=4)
    mel = mel_spectrogram(0.1 * torch.randn(4096))[None]
    assert torch.equal(vocoder.inference(mel)[0], vocoder.inference(mel)[0])
    with pytest.raises(ValueError, match=r"\(batch, 80, frames\)"):
        vocoder.inference(mel[0])
    with pytest.raises(ValueError, match="0 frames"):
        vocoder.inference(torch.zeros(1, 80, 0))
    with pytest.raises(ValueError, match="NaN"):
        vocoder.inference(torch.full((1, 80, 3), float("inf")))
    with pytest.raises(TypeError, match="MelConfig"):
        GriffinLimVocoder({"n_mels": 80})
