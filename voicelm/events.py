"""Typed events that a conversation produces, in the order they are produced.

A turn yields, interleaved as the model generates them:

    TextDelta*      new characters of the answer's text (only complete UTF-8, never half a character)
    SpeechTokens*   new speech codes (0 <= code < speech vocab), the input of the decoder
    AudioChunk*     new waveform samples, ready to play, at `sample_rate` (the decoder's 22,050 Hz)
    TurnEnd         exactly once, last: why the turn ended and how long each stage took
    Error           before TurnEnd(reason="error") when something failed mid-turn

Turn taking over a live audio stream (`voicelm.bargein`) adds UserSpeechStart / UserSpeechEnd /
BargeIn. Every event has `to_dict()` (JSON-ready; audio samples left out), used by the server
and `voicelm chat --json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

# Why a turn ended (TurnEnd.reason).
END_STOP = "stop"  # the model produced a stop token (<|user|> or <|endoftext|>)
END_MAX_TOKENS = "max_tokens"  # the hard cap on new tokens was reached
END_CANCELLED = "cancelled"  # Session.cancel() (or the consumer stopped iterating)
END_INTERRUPTED = "interrupted"  # Session.interrupt(): barge-in, history keeps only the played part
END_ERROR = "error"  # an Error event precedes it; the history is unchanged
END_REASONS = (END_STOP, END_MAX_TOKENS, END_CANCELLED, END_INTERRUPTED, END_ERROR)


@dataclasses.dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"type": self.type, **values}


@dataclasses.dataclass(frozen=True)
class TextDelta(Event):
    type: ClassVar[str] = "text"
    text: str


@dataclasses.dataclass(frozen=True)
class SpeechTokens(Event):
    type: ClassVar[str] = "speech_tokens"
    tokens: tuple[int, ...]  # speech codes, not LM ids


@dataclasses.dataclass(frozen=True, eq=False)
class AudioChunk(Event):
    type: ClassVar[str] = "audio"
    samples: np.ndarray  # float32, mono, in [-1, 1]
    sample_rate: int
    start: int  # index of the first sample within this turn's audio

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "sample_rate": self.sample_rate, "start": self.start,
                "num_samples": int(len(self.samples))}

    def pcm16(self) -> bytes:
        """Little-endian 16-bit PCM bytes of the samples (the server's binary audio frames)."""
        return (np.clip(self.samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


@dataclasses.dataclass(frozen=True)
class TurnEnd(Event):
    """Last event of a turn.

    `timings` (seconds, measured with perf_counter; a stage that did not run is absent):
      tokenize            speech tokenizer on the user audio (or the flush of a streaming tokenizer)
      prompt              building the prompt (history fitting included)
      lm_prefill          the first LM step: prompt prefill + first token
      lm_first_audio_steps  LM steps from the first token up to the token that completed the
                          decoder's first chunk (13 text + 10 speech = 23 in the 13:26 layout)
      decoder_first_chunk decoder time spent producing the first audio chunk
      first_text          turn start -> first TextDelta
      first_audio         turn start -> first AudioChunk (end of user input to first audio sample)
      lm                  all LM steps
      decoder             all decoder calls
      total               turn start -> TurnEnd
    """

    type: ClassVar[str] = "turn_end"
    reason: str
    timings: dict[str, float]
    text: str  # the whole answer text produced in this turn
    num_text_tokens: int
    num_speech_tokens: int
    audio_seconds: float  # audio produced in this turn
    history_turns: int  # turns in the session history after this one was recorded (or not)
    dropped_turns: int = 0  # oldest turns dropped from the history so the prompt fits the context


@dataclasses.dataclass(frozen=True)
class Error(Event):
    type: ClassVar[str] = "error"
    code: str  # machine-readable: "bad_input", "too_long", "internal", ...
    message: str  # what went wrong and what to do


# --- turn taking over a live audio stream (voicelm.bargein) ---------------------------------------
@dataclasses.dataclass(frozen=True)
class UserSpeechStart(Event):
    type: ClassVar[str] = "user_speech_start"
    at_seconds: float  # position in the incoming stream


@dataclasses.dataclass(frozen=True)
class UserSpeechEnd(Event):
    type: ClassVar[str] = "user_speech_end"
    at_seconds: float
    speech_seconds: float  # length of the utterance handed to the model (pre-roll included)


@dataclasses.dataclass(frozen=True)
class BargeIn(Event):
    type: ClassVar[str] = "barge_in"
    at_seconds: float
    played_seconds: float  # how much of the answer had been played when the user spoke
