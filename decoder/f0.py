"""Pitch (F0) targets for vocoder training, one value per decoder mel frame.

HiFT predicts F0 from the mel and turns it into its sine excitation; training that predictor
needs a target. This is a small YIN-style estimator in torch (no extra dependency): for every
mel frame (1024-sample window centred like `decoder.mel`'s frames) it computes the difference
function (from an FFT autocorrelation and cumulative energies), its cumulative mean normalised
form, and takes the first lag below a threshold, refined to the local minimum and by parabolic
interpolation. Unvoiced frames
(no lag below the threshold, or too quiet) get 0 Hz, which HiFT's source treats as noise.

It is a training target, not a reference pitch tracker: octave errors happen on creaky or
very breathy frames, and it is conservative about voicing (on the piper "joe" voice, ~32% of
frames come out voiced at threshold 0.2; raising the threshold admits octave errors). torchaudio's `detect_pitch_frequency` was tried first: it gives no
voicing decision and is median-smoothed over ~20 frames, too coarse for mel-rate targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voicelm.core.audio import DECODER_SAMPLE_RATE, MEL_HOP


def estimate_f0(
    wav: torch.Tensor,
    sample_rate: int = DECODER_SAMPLE_RATE,
    hop_length: int = MEL_HOP,
    *,
    window: int = 1024,
    f0_min: float = 60.0,
    f0_max: float = 500.0,
    threshold: float = 0.2,
    silence_db: float = -50.0,
) -> torch.Tensor:
    """(T,) or (B, T) waveform -> F0 in Hz per frame, (T // hop,) or (B, T // hop); 0 = unvoiced."""
    if wav.dim() not in (1, 2):
        raise ValueError(f"wav must be (samples,) or (batch, samples), got shape {tuple(wav.shape)}")
    if not 0 < f0_min < f0_max < sample_rate / 2:
        raise ValueError(f"need 0 < f0_min < f0_max < sample_rate / 2, got {f0_min}, {f0_max}, {sample_rate}")
    squeeze = wav.dim() == 1
    wav = (wav[None] if squeeze else wav).float()
    frames = wav.shape[-1] // hop_length
    if frames == 0:
        out = wav.new_zeros(wav.shape[0], 0)
        return out[0] if squeeze else out
    # Centre frame i on the same samples as mel frame i (decoder.mel pads (n_fft - hop) / 2).
    pad = (window - hop_length) // 2
    padded = F.pad(wav[:, None], (pad, window - hop_length - pad + hop_length), mode="constant")[:, 0]
    segments = padded.unfold(-1, window, hop_length)[:, :frames]  # (B, frames, window)
    segments = segments - segments.mean(dim=-1, keepdim=True)

    max_lag = min(int(sample_rate / f0_min) + 2, window // 2)
    min_lag = max(int(sample_rate / f0_max), 2)
    spectrum = torch.fft.rfft(segments, n=2 * window)
    autocorr = torch.fft.irfft(spectrum.abs().pow(2), n=2 * window)[..., : max_lag + 2]  # (B, frames, lags)
    # Difference function d(tau) = sum_j (x_j - x_{j+tau})^2 over the overlapping samples
    # = energy of x[:N - tau] + energy of x[tau:] - 2 r(tau), with the energies from a cumsum.
    lags = torch.arange(autocorr.shape[-1], device=wav.device, dtype=wav.dtype)
    lag_index = lags.long()
    squares = torch.cumsum(segments.pow(2), dim=-1)  # (B, frames, window)
    total = squares[..., -1:]
    head = squares[..., window - 1 - lag_index]  # sum of x_j^2 for j < N - tau
    tail = total - F.pad(squares, (1, 0))[..., lag_index]  # sum of x_j^2 for j >= tau
    diff = (head + tail - 2 * autocorr).clamp(min=0)
    # Cumulative mean normalised difference (YIN): d'(0) = 1, d'(tau) = d(tau) tau / sum d(1..tau).
    cumulative = torch.cumsum(diff[..., 1:], dim=-1)
    cmnd = torch.ones_like(diff)
    cmnd[..., 1:] = diff[..., 1:] * lags[1:] / cumulative.clamp(min=1e-12)

    search = cmnd[..., min_lag:max_lag + 1]  # (B, frames, candidate lags)
    below = search < threshold
    voiced = below.any(dim=-1)
    first = below.float().argmax(dim=-1)  # first candidate under the threshold
    # Walk down to the local minimum after the first crossing (bounded, vectorised).
    index = first
    last = search.shape[-1] - 1
    for _ in range(max_lag):
        nxt = (index + 1).clamp(max=last)
        better = search.gather(-1, nxt[..., None])[..., 0] < search.gather(-1, index[..., None])[..., 0]
        if not better.any():
            break
        index = torch.where(better, nxt, index)
    # Parabolic interpolation around the minimum for sub-sample lag precision.
    left = search.gather(-1, (index - 1).clamp(min=0)[..., None])[..., 0]
    centre = search.gather(-1, index[..., None])[..., 0]
    right = search.gather(-1, (index + 1).clamp(max=last)[..., None])[..., 0]
    denominator = left - 2 * centre + right
    offset = torch.where(denominator.abs() > 1e-9, 0.5 * (left - right) / denominator, torch.zeros_like(centre))
    lag = (index + min_lag).to(wav.dtype) + offset.clamp(-0.5, 0.5)
    f0 = sample_rate / lag

    energy_db = 10 * torch.log10(segments.pow(2).mean(dim=-1) + 1e-12)
    voiced = voiced & (energy_db > silence_db) & (f0 >= f0_min) & (f0 <= f0_max)
    f0 = torch.where(voiced, f0, torch.zeros_like(f0))
    return f0[0] if squeeze else f0
