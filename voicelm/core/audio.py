"""Audio I/O, rate constants and input validation shared by every part.

Everything that enters the system as audio passes through `prepare_audio` (arrays) or
`load_audio` (files): they downmix, resample and reject input that would make a model
produce nonsense, with an error that says what was wrong and what to do.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from voicelm.core.checkpoint import atomic_write_file

SAMPLE_RATE = 16_000  # tokenizer input rate (Hz)
TOKEN_RATE = 12.5  # speech tokens per second, everywhere
SAMPLES_PER_TOKEN = 1_280  # SAMPLE_RATE / TOKEN_RATE
DECODER_SAMPLE_RATE = 22_050  # decoder / vocoder output rate (Hz)
MEL_HOP = 256  # decoder mel hop at 22,050 Hz
MEL_FRAMES_PER_TOKEN = DECODER_SAMPLE_RATE / MEL_HOP / TOKEN_RATE  # 6.890625

DEFAULT_MAX_SECONDS = 600.0  # longest clip a public entry point accepts by default
MAX_CHANNELS = 8  # beyond this the "audio" is almost certainly not speech
SILENCE_PEAK = 1e-4  # a clip whose absolute peak stays below this is treated as silent

assert SAMPLE_RATE / TOKEN_RATE == SAMPLES_PER_TOKEN


class AudioError(ValueError):
    """Audio input that cannot be used; the message says what to do instead."""


def prepare_audio(
    audio,
    sample_rate: int,
    target_rate: int = SAMPLE_RATE,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    allow_silent: bool = False,
    channels_first: bool | None = None,
) -> torch.Tensor:
    """Validate an array of samples and return a mono float32 tensor at `target_rate`.

    `audio` is 1-D (samples) or 2-D (channels x samples, or samples x channels: the shorter
    axis is taken as channels unless `channels_first` says otherwise). Integer PCM is scaled
    to [-1, 1]. Multi-channel audio is averaged to mono.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive integer number of Hz, got {sample_rate!r}")
    if audio.dtype.kind in "iu":
        info = np.iinfo(audio.dtype)
        audio = audio.astype(np.float32) / max(abs(info.min), info.max)
    elif audio.dtype.kind != "f":
        raise AudioError(f"audio must hold numbers (float or integer PCM), got dtype {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)

    if audio.ndim == 2:
        if channels_first is None:
            channels_first = audio.shape[0] <= audio.shape[1]
        if not channels_first:
            audio = audio.T  # (C, T)
        if audio.shape[0] > MAX_CHANNELS:
            raise AudioError(
                f"audio has {audio.shape[0]} channels; expected mono or stereo (at most "
                f"{MAX_CHANNELS} channels). Pass a (channels, samples) array or a 1-D array."
            )
        audio = audio.mean(axis=0)
    elif audio.ndim != 1:
        raise AudioError(
            f"audio must be 1-D (samples) or 2-D (channels x samples), got shape {audio.shape}"
        )

    if audio.size == 0:
        raise AudioError("audio is empty (0 samples): record or pass at least some speech")
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise AudioError(f"audio contains {bad} NaN/inf samples: check the source or decoder of this audio")
    seconds = audio.size / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            f"audio is {seconds:.1f} s long, over the limit of {max_seconds:.0f} s: split it into "
            f"shorter pieces or raise max_seconds"
        )
    peak = float(np.abs(audio).max())
    if not allow_silent and peak < SILENCE_PEAK:
        raise AudioError(
            f"audio is silent (peak amplitude {peak:.2e}): check the microphone or the file"
        )
    if peak > 1.0:
        warnings.warn(f"audio peaks at {peak:.2f} (> 1.0, clipped or unnormalised); clamping to [-1, 1]")
        audio = np.clip(audio, -1.0, 1.0)

    wav = torch.from_numpy(np.ascontiguousarray(audio))
    if sample_rate != target_rate:
        wav = AF.resample(wav, int(sample_rate), int(target_rate))
    return wav


def load_audio(
    path: str | os.PathLike,
    target_rate: int = SAMPLE_RATE,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    allow_silent: bool = False,
) -> torch.Tensor:
    """Read an audio file (anything libsndfile reads: wav, flac, ogg, mp3) as mono float32."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{path} is a directory; pass an audio file")
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile raises its own types for every unreadable file
        raise AudioError(
            f"{path} is not a readable audio file ({exc}). Use wav, flac, ogg or mp3."
        ) from exc
    if max_seconds is not None and info.frames / info.samplerate > max_seconds:
        raise AudioError(
            f"{path} is {info.frames / info.samplerate:.1f} s long, over the limit of "
            f"{max_seconds:.0f} s: split it into shorter files or raise max_seconds"
        )
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    try:
        return prepare_audio(
            data, rate, target_rate, max_seconds=max_seconds, allow_silent=allow_silent, channels_first=False
        )
    except AudioError as exc:
        raise AudioError(f"{path}: {exc}") from None


def save_audio(path: str | os.PathLike, audio, sample_rate: int) -> Path:
    """Write mono audio as 16-bit wav, atomically: the file is either complete or absent."""
    path = Path(path)
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().float().numpy()
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if not np.isfinite(audio).all():
        raise AudioError(f"refusing to write {path}: the audio contains NaN/inf samples")
    return atomic_write_file(
        path, lambda tmp: sf.write(tmp, np.clip(audio, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV")
    )


def num_tokens(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Speech tokens that `num_samples` at `sample_rate` yield (a partial last token counts)."""
    samples_16k = num_samples * SAMPLE_RATE / sample_rate
    return int(np.ceil(samples_16k / SAMPLES_PER_TOKEN - 1e-9))
