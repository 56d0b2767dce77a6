"""Whisper's log-mel front end, computable frame by frame.

16 kHz samples -> `n_mels` x (samples / 160) log-mel frames (100 frames/s), as Whisper:
400-sample Hann window (periodic), hop 160, power spectrum, Slaney mel filters (whisper's
`mel_filters.npz`), log10, floor, then (x + 4) / 4.

Two deviations make it streamable (streamed frames equal offline frames):
- Edges: Whisper reflect-pads 200 samples on both sides (`center=True`) and drops the last
  frame. Frame i covers padded samples [160 i, 160 i + 400), i.e. signal samples
  [160 i - 200, 160 i + 200). We do the same, but split it so that a stream computes frame i as
  soon as signal sample 160 i + 199 has arrived, and only the frames that touch the right edge
  wait for the end of input (where the right reflect padding is known).
- Floor: Whisper floors log10 mel at (max of the whole clip - 8), which depends on the future.
  `mel_floor="fixed"` floors at a constant instead; `mel_floor="segment_max"` keeps Whisper's
  rule (per 30 s segment, as the official GLM-4-Voice tokenizer was trained) for offline use of
  official weights; a stream refuses it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from whisper.audio import mel_filters

from tokenizer.config import HOP_LENGTH, N_FFT

EDGE = N_FFT // 2  # 200 samples of reflect padding on each side (Whisper's center=True)
WHISPER_DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum by Whisper's floor


@lru_cache(maxsize=4)
def _filters(n_mels: int) -> torch.Tensor:
    return mel_filters("cpu", n_mels).float()  # (n_mels, 201)


def power_mel_frames(padded: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(B, S) samples already padded -> (B, n_mels, (S - 400) // 160 + 1) mel power frames.

    Frame j covers padded[:, 160 j : 160 j + 400]; no padding is added here.
    """
    window = torch.hann_window(N_FFT, device=padded.device, dtype=padded.dtype)
    spec = torch.stft(padded, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    power = spec.abs() ** 2  # (B, 201, frames)
    return _filters(n_mels).to(padded.device, padded.dtype) @ power


def log_compress(mel_power: torch.Tensor, mel_floor: str, floor_value: float) -> torch.Tensor:
    """(B, n_mels, F) mel power -> Whisper-scaled log mel. "segment_max" floors per example."""
    log_mel = torch.clamp(mel_power, min=1e-10).log10()
    if mel_floor == "fixed":
        log_mel = torch.clamp(log_mel, min=floor_value)
    elif mel_floor == "segment_max":
        peak = log_mel.amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
        log_mel = torch.maximum(log_mel, peak - WHISPER_DYNAMIC_RANGE)
    else:
        raise ValueError(f"unknown mel_floor {mel_floor!r}; use 'fixed' or 'segment_max'")
    return (log_mel + 4.0) / 4.0


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int, mel_floor: str = "fixed", floor_value: float = -7.0) -> torch.Tensor:
    """(B, N) or (N,) 16 kHz samples -> (B, n_mels, N // 160) log mel, Whisper's framing.

    N must be > 200 (reflect padding); callers pad clips to whole tokens (1280 samples) first.
    """
    squeeze = audio.dim() == 1
    if squeeze:
        audio = audio[None]
    if audio.shape[-1] <= EDGE:
        raise ValueError(f"need more than {EDGE} samples for a log-mel frame, got {audio.shape[-1]}")
    padded = F.pad(audio[:, None], (EDGE, EDGE), mode="reflect")[:, 0]  # (B, N + 400)
    frames = audio.shape[-1] // HOP_LENGTH
    power = power_mel_frames(padded, n_mels)[..., :frames]  # Whisper drops the last frame
    mel = log_compress(power, mel_floor, floor_value)
    return mel[0] if squeeze else mel


class StreamingLogMel:
    """Frame-by-frame log mel of one stream, equal to `log_mel_spectrogram` on the whole input.

    `push(samples)` returns the frames that no longer depend on the future; `finish()` pads
    the right edge as the offline function does and returns the remaining frames. Only the
    "fixed" floor streams.
    """

    def __init__(self, n_mels: int, floor_value: float):
        self.n_mels = n_mels
        self.floor_value = floor_value
        self.signal_length = 0  # signal samples received so far
        self.next_frame = 0  # index of the first frame not yet returned
        # Padded-signal samples from 160 * next_frame on (the left reflect padding is added
        # once the first 201 samples are known).
        self._tail = torch.zeros(0)
        self._head: torch.Tensor | None = torch.zeros(0)  # first samples, until the left pad is made

    def _frames_from_tail(self, count: int) -> torch.Tensor:
        if count <= 0:
            return torch.zeros(self.n_mels, 0)
        needed = (count - 1) * HOP_LENGTH + N_FFT
        power = power_mel_frames(self._tail[None, :needed], self.n_mels)[0]  # (n_mels, count)
        self._tail = self._tail[count * HOP_LENGTH:]
        self.next_frame += count
        return log_compress(power[None], "fixed", self.floor_value)[0]

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """(n,) float samples -> (n_mels, k) newly final frames (k may be 0)."""
        samples = samples.reshape(-1).float()
        self.signal_length += samples.numel()
        if self._head is not None:
            self._head = torch.cat([self._head, samples])
            if self._head.numel() <= EDGE:
                return torch.zeros(self.n_mels, 0)
            left = self._head[1 : EDGE + 1].flip(0)  # reflect padding: x[200], ..., x[1]
            self._tail, self._head = torch.cat([left, self._head]), None
        else:
            self._tail = torch.cat([self._tail, samples])
        # Frames whose whole window lies inside the padded signal received so far.
        available = (self._tail.numel() - N_FFT) // HOP_LENGTH + 1 if self._tail.numel() >= N_FFT else 0
        return self._frames_from_tail(available)

    def finish(self) -> torch.Tensor:
        """Frames that needed the right edge: (n_mels, signal_length // 160 - frames so far)."""
        total = self.signal_length // HOP_LENGTH
        if self._head is not None:
            raise ValueError(f"need more than {EDGE} samples for a log-mel frame, got {self.signal_length}")
        # The last 200 padded samples hold signal[-2..-201] reversed: rebuild from the tail,
        # which always holds at least the last 400 - 160 samples of the signal.
        signal_tail = self._tail[-(EDGE + 1):]
        right = signal_tail[:-1].flip(0)[:EDGE]  # x[-2], ..., x[-201]
        self._tail = torch.cat([self._tail, right])
        return self._frames_from_tail(total - self.next_frame)
