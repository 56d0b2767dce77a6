"""Full-duplex turn taking over a live microphone stream: VAD end-pointing and barge-in.

    duplex = DuplexConversation(pipeline.session())
    while mic_is_open:
        for event in duplex.feed(mic_samples, 48_000):    # any rate; returns at once
            handle(event)                                 # UserSpeechStart, TextDelta, AudioChunk, ...

The rules:
- Listening: silero-vad watches the stream (512-sample windows at 16 kHz). Speech starts after
  `min_speech_ms` of speech; `pre_roll_ms` of audio from before the start is kept so the first
  syllable is not lost.
- While the user speaks, the audio goes into the speech tokenizer's stream as it arrives (held
  back by the end-of-speech silence, which is trimmed), so at the end only a flush remains.
- `min_silence_ms` of silence ends the utterance: the answer starts in a worker thread, and its
  events come back from `feed()` / `poll()` as they are produced.
- Barge-in: user speech while the answer is being generated or still playing cancels it
  (`Session.interrupt(played_seconds)`: the history keeps only what was heard), `BargeIn` is
  emitted, audio of the cancelled answer still in flight is dropped, and the new speech becomes
  the next turn. `barge_in=False` ignores speech during answers (half duplex, e.g. loudspeakers
  without echo cancellation).
- Played time: by default the answer is assumed to play in real time from the moment its first
  chunk is handed out, measured on the clock of the incoming stream itself (samples fed so far).
  A client that knows better calls `report_played(seconds)`.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from voicelm.events import AudioChunk, BargeIn, Error, Event, TextDelta, TurnEnd, UserSpeechEnd, UserSpeechStart
from voicelm.vad import VAD_SAMPLE_RATE, VAD_WINDOW, WINDOW_SECONDS, SpeechSegmenter, VADConfig, VoiceActivityDetector, to_16k

if TYPE_CHECKING:
    from voicelm.session import Session

LISTENING = "listening"
USER_SPEAKING = "user_speaking"
RESPONDING = "responding"

# Silence kept at the end of an utterance (of the min_silence_ms that ended it).
TRAILING_SILENCE_MS = 160.0


class DuplexConversation:
    """VAD-driven turns and barge-in over one incoming audio stream, on top of a Session."""

    def __init__(
        self,
        session: "Session",
        *,
        vad: VoiceActivityDetector | None = None,
        config: VADConfig | None = None,
        barge_in: bool = True,
        barge_in_min_speech_ms: float | None = 192.0,
        options=None,
        max_utterance_seconds: float | None = None,
    ):
        self.session = session
        self.config = config or VADConfig()
        self.vad = vad or VoiceActivityDetector()
        self.segmenter = SpeechSegmenter(self.config)
        # Barge-in needs longer evidence of speech than a first turn: a cough should not cut an answer.
        self.barge_in = barge_in
        self._barge_segmenter = SpeechSegmenter(
            VADConfig(threshold=self.config.threshold, release=self.config.release,
                      min_speech_ms=barge_in_min_speech_ms or self.config.min_speech_ms,
                      min_silence_ms=self.config.min_silence_ms, pre_roll_ms=self.config.pre_roll_ms))
        self.options = options
        self.max_utterance_seconds = max_utterance_seconds or session.max_input_seconds
        self.input_samples = 0  # 16 kHz samples fed so far: the conversation's clock
        self._pending = np.zeros(0, dtype=np.float32)
        pre_roll_windows = self.config.windows(self.config.pre_roll_ms) + self.config.windows(
            max(self.config.min_speech_ms, barge_in_min_speech_ms or 0))
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=pre_roll_windows)
        self._utterance: list[np.ndarray] | None = None
        self._utterance_start = 0.0
        self._token_stream = None
        self._held: collections.deque[np.ndarray] = collections.deque()  # windows not yet tokenized
        self._hold_windows = max(0, self.config.windows(self.config.min_silence_ms)
                                 - self.config.windows(TRAILING_SILENCE_MS))
        self._tokens: list[int] = []
        self._events: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._turn_id = 0
        self._muted_turn = -1
        self._answer_samples = 0
        self._answer_rate = session.pipeline.sample_rate
        self._play_start: int | None = None
        self._reported_played: float | None = None

    # --- state -----------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.input_samples / VAD_SAMPLE_RATE

    @property
    def generating(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def answer_seconds(self) -> float:
        return self._answer_samples / self._answer_rate

    def played_seconds(self) -> float:
        """How much of the current answer has been heard (capped at what was generated)."""
        if self._reported_played is not None:
            return min(self._reported_played, self.answer_seconds)
        if self._play_start is None:
            return 0.0
        return min((self.input_samples - self._play_start) / VAD_SAMPLE_RATE, self.answer_seconds)

    @property
    def playing(self) -> bool:
        return self._play_start is not None and self.played_seconds() < self.answer_seconds - 1e-6

    @property
    def state(self) -> str:
        if self._utterance is not None:
            return USER_SPEAKING
        if self.generating or self.playing:
            return RESPONDING
        return LISTENING

    def report_played(self, seconds: float) -> None:
        """The client's playback position in the current answer (overrides the stream clock)."""
        self._reported_played = max(0.0, float(seconds))

    # --- input -----------------------------------------------------------------------------
    def feed(self, samples, sample_rate: int) -> list[Event]:
        """Push microphone audio (any length, any rate); returns the events ready now."""
        out = self.poll()
        samples = to_16k(samples, sample_rate)
        self._pending = np.concatenate([self._pending, samples])
        count = len(self._pending) // VAD_WINDOW
        for i in range(count):
            window = self._pending[i * VAD_WINDOW:(i + 1) * VAD_WINDOW]
            self.input_samples += VAD_WINDOW
            out.extend(self._on_window(window, self.vad.window_probability(window)))
        self._pending = self._pending[count * VAD_WINDOW:].copy()
        out.extend(self.poll())
        return out

    def poll(self) -> list[Event]:
        """Events the answer produced since the last call (never blocks)."""
        out: list[Event] = []
        while True:
            try:
                turn_id, event = self._events.get_nowait()
            except queue.Empty:
                return out
            out.extend(self._accept(turn_id, event))

    def wait(self, timeout: float | None = None) -> list[Event]:
        """Block until the running answer has been generated (or `timeout`); returns its events."""
        if self._worker is not None:
            self._worker.join(timeout)
        return self.poll()

    def end_of_input(self) -> list[Event]:
        """The stream ended (e.g. the client stopped the microphone): an utterance in progress is
        answered now instead of waiting for silence."""
        if self._utterance is None:
            return self.poll()
        return self.poll() + self._end_utterance()

    def close(self) -> None:
        self.session.cancel()
        if self._worker is not None:
            self._worker.join(timeout=30)

    # --- internals ---------------------------------------------------------------------------
    def _accept(self, turn_id: int, event: Event) -> list[Event]:
        if turn_id == self._muted_turn and isinstance(event, (AudioChunk, TextDelta)):
            return []  # the user barged in: nobody should hear the rest of that answer
        if isinstance(event, AudioChunk) and turn_id == self._turn_id:
            if self._play_start is None:
                self._play_start = self.input_samples
            self._answer_samples += len(event.samples)
        return [event]

    def _on_window(self, window: np.ndarray, prob: float) -> list[Event]:
        out: list[Event] = []
        responding = self.state == RESPONDING
        segmenter = self._barge_segmenter if responding else self.segmenter
        decision = segmenter.update(prob)
        if self._utterance is None:
            self._recent.append(window)
            if decision == "start" and (not responding or self.barge_in):
                if responding:
                    out.extend(self._barge())
                self.segmenter.in_speech = True
                self._start_utterance()
                out.append(UserSpeechStart(at_seconds=self._utterance_start))
            elif decision == "start":
                segmenter.reset()  # half duplex: ignore speech over the answer
            return out
        self._add_to_utterance(window)
        utterance_seconds = sum(len(w) for w in self._utterance) / VAD_SAMPLE_RATE
        if decision == "end" or utterance_seconds >= self.max_utterance_seconds:
            out.extend(self._end_utterance())
        return out

    def _barge(self) -> list[Event]:
        played = self.played_seconds()
        self.session.interrupt(played)
        self._muted_turn = self._turn_id
        return [BargeIn(at_seconds=self.now, played_seconds=played)] + self.poll()

    def _start_utterance(self) -> None:
        self._utterance = list(self._recent)
        self._recent.clear()
        self._utterance_start = max(0.0, self.now - len(self._utterance) * WINDOW_SECONDS)
        self._tokens = []
        self._held.clear()
        self._token_stream = self.session.pipeline.new_token_stream()
        for window in self._utterance:
            self._hold(window)

    def _add_to_utterance(self, window: np.ndarray) -> None:
        self._utterance.append(window)
        self._hold(window)

    def _hold(self, window: np.ndarray) -> None:
        # Windows are tokenized once they are older than the silence that could end the
        # utterance, so the trailing silence never reaches the tokenizer.
        self._held.append(window)
        while len(self._held) > self._hold_windows:
            self._tokens.extend(self._token_stream.push(self._held.popleft()))

    def _end_utterance(self) -> list[Event]:
        speech_seconds = sum(len(w) for w in self._utterance) / VAD_SAMPLE_RATE
        self._utterance = None
        self.segmenter.reset()
        self._barge_segmenter.reset()
        out: list[Event] = [UserSpeechEnd(at_seconds=self.now, speech_seconds=speech_seconds)]
        # Keep TRAILING_SILENCE_MS of the held-back tail, drop the rest of the silence.
        keep = self.config.windows(TRAILING_SILENCE_MS) if len(self._held) >= self._hold_windows else len(self._held)
        t = time.perf_counter()
        for window in list(self._held)[:keep]:
            self._tokens.extend(self._token_stream.push(window))
        self._tokens.extend(self._token_stream.flush())
        flush_seconds = time.perf_counter() - t
        self._held.clear()
        self._token_stream = None
        tokens, self._tokens = self._tokens, []
        if self._worker is not None:  # the interrupted answer: ends within one token
            self._worker.join()
            out.extend(self.poll())
        if not tokens:
            return out + [Error("bad_input", "the utterance was too short to give a speech token")]
        self._start_answer(tokens, flush_seconds)
        return out

    def _start_answer(self, tokens: list[int], flush_seconds: float) -> None:
        self._turn_id += 1
        turn_id = self._turn_id
        self._answer_samples = 0
        self._play_start = None
        self._reported_played = None
        turn = self.session.respond(speech_tokens=tokens, tokenize_seconds=flush_seconds, options=self.options)

        def work() -> None:
            try:
                for event in turn:
                    self._events.put((turn_id, event))
            except BaseException as exc:  # reported as events, never lost in the thread
                self._events.put((turn_id, Error("internal", f"{type(exc).__name__}: {exc}")))
                self._events.put((turn_id, TurnEnd("error", {}, "", 0, 0, 0.0, len(self.session.history))))

        self._worker = threading.Thread(target=work, name="voicelm-duplex-turn", daemon=True)
        self._worker.start()
