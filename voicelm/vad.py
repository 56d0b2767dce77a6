"""Voice activity detection on a live 16 kHz stream: silero-vad, wrapped for streaming.

`load_silero_vad()` reads the model that ships inside the `silero-vad` wheel (no download).
The model is stateful (it carries an RNN state and 64 samples of context between windows), so
every stream needs its own instance: `VoiceActivityDetector` owns one.

Silero works on windows of exactly 512 samples at 16 kHz (32 ms); `VoiceActivityDetector.push`
takes pieces of any length (at any rate, resampled) and returns one speech probability per
completed window. `SpeechSegmenter` turns probabilities into speech start / end decisions with
hysteresis: speech starts after `min_speech_ms` above `threshold`, ends after `min_silence_ms`
below `threshold - 0.15` (silero's own recipe for the lower threshold).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

from voicelm.core.audio import SAMPLE_RATE, AudioError, prepare_audio

VAD_SAMPLE_RATE = SAMPLE_RATE  # silero's 16 kHz model
VAD_WINDOW = 512  # samples per decision at 16 kHz (32 ms); the model accepts nothing else
WINDOW_SECONDS = VAD_WINDOW / VAD_SAMPLE_RATE

_load_lock = threading.Lock()


def load_silero_vad():
    """A fresh silero-vad model (TorchScript) from the installed wheel; works offline.

    Importing silero_vad calls `torch.set_num_threads(1)` for the whole process; the caller's
    thread count is restored so loading a VAD never slows the models down.
    """
    with _load_lock:
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad as _load
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise RuntimeError("silero-vad is not installed: pip install silero-vad (without the [audio] extra)") from exc
        try:
            model = _load(onnx=False)
        finally:
            torch.set_num_threads(threads)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class VADConfig:
    threshold: float = 0.5  # speech probability that starts speech
    release: float = 0.15  # speech ends below threshold - release
    min_speech_ms: float = 96.0  # this long above threshold before speech counts as started
    min_silence_ms: float = 600.0  # this long below the lower threshold ends the utterance
    pre_roll_ms: float = 256.0  # audio kept from before the detected start (the onset of the word)

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.release < self.threshold:
            raise ValueError(f"release must be in [0, threshold), got {self.release}")
        for name in ("min_speech_ms", "min_silence_ms", "pre_roll_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def windows(self, ms: float) -> int:
        return max(1, int(round(ms / 1000.0 / WINDOW_SECONDS)))


class VoiceActivityDetector:
    """Per-stream silero VAD: `push(samples, sample_rate) -> speech probability per 512-sample window`."""

    def __init__(self, model=None):
        self.model = model if model is not None else load_silero_vad()
        self._pending = np.zeros(0, dtype=np.float32)
        self.windows_seen = 0
        self.model.reset_states()

    def reset(self) -> None:
        self.model.reset_states()
        self._pending = np.zeros(0, dtype=np.float32)
        self.windows_seen = 0

    def push(self, samples, sample_rate: int = VAD_SAMPLE_RATE) -> np.ndarray:
        """Feed audio; returns the probabilities of the windows it completed (maybe none)."""
        samples = to_16k(samples, sample_rate)
        self._pending = np.concatenate([self._pending, samples])
        count = len(self._pending) // VAD_WINDOW
        probs = np.empty(count, dtype=np.float32)
        for i in range(count):
            probs[i] = self.window_probability(self._pending[i * VAD_WINDOW:(i + 1) * VAD_WINDOW])
        self._pending = self._pending[count * VAD_WINDOW:]
        return probs

    def window_probability(self, window: np.ndarray) -> float:
        """Speech probability of the next 512-sample window of the stream (16 kHz)."""
        if len(window) != VAD_WINDOW:
            raise ValueError(f"silero-vad takes windows of exactly {VAD_WINDOW} samples at 16 kHz, got {len(window)}")
        with torch.inference_mode():
            prob = float(self.model(torch.from_numpy(np.array(window, dtype=np.float32)), VAD_SAMPLE_RATE))
        self.windows_seen += 1
        return prob


def to_16k(samples, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz; silence and empty pieces are allowed (a live stream has both)."""
    samples = np.asarray(samples)
    if samples.size == 0:
        return np.zeros(0, dtype=np.float32)
    wav = prepare_audio(samples, sample_rate, VAD_SAMPLE_RATE, max_seconds=None, allow_silent=True)
    return wav.numpy().astype(np.float32, copy=False)


@dataclasses.dataclass
class SpeechSegmenter:
    """Hysteresis over window probabilities: `update(prob)` -> "start", "end" or None."""

    config: VADConfig = dataclasses.field(default_factory=VADConfig)
    in_speech: bool = False
    _above: int = 0
    _below: int = 0

    def reset(self) -> None:
        self.in_speech = False
        self._above = self._below = 0

    def update(self, prob: float) -> str | None:
        cfg = self.config
        if not self.in_speech:
            self._above = self._above + 1 if prob >= cfg.threshold else 0
            if self._above >= cfg.windows(cfg.min_speech_ms):
                self.in_speech = True
                self._below = 0
                return "start"
            return None
        self._below = self._below + 1 if prob < cfg.threshold - cfg.release else 0
        if self._below >= cfg.windows(cfg.min_silence_ms):
            self.in_speech = False
            self._above = 0
            return "end"
        return None


__all__ = ["VAD_SAMPLE_RATE", "VAD_WINDOW", "VADConfig", "VoiceActivityDetector", "SpeechSegmenter",
           "load_silero_vad", "to_16k", "AudioError"]
