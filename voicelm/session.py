"""One conversation with a pipeline: the streaming token API.

    pipeline = voicelm.load_pipeline("models/demo")
    session = pipeline.session(system="You are a helpful voice assistant.")
    for event in session.respond(audio=wav, sample_rate=16000):   # or respond(text="hi")
        if isinstance(event, TextDelta): print(event.text, end="")
        elif isinstance(event, AudioChunk): player.play(event.samples, event.sample_rate)
        elif isinstance(event, TurnEnd): print(event.reason, event.timings)

A turn runs: tokenize the user audio -> build the prompt from the history -> LM steps; each text
token becomes a `TextDelta` (detokenized incrementally, complete UTF-8 only), each speech token a
`SpeechTokens` event and goes to the streaming decoder, whose chunks come out as `AudioChunk`s
(the first after 10 speech tokens) -> `TurnEnd` with per-stage timings.

Concurrency. `cancel()` (and `interrupt()`) may be called from any thread: generation stops before
the next LM token and decoding before the next chunk; the turn ends with `TurnEnd(reason=
"cancelled")` and the session takes the next turn normally. `arespond()` is the asyncio variant
(the work runs in a thread; cancelling the consuming task cancels the turn). One session runs one
turn at a time; many sessions may share one `Pipeline` (its weights are read-only; every piece of
per-conversation state - KV cache, decoder and tokenizer stream state, history, RNG - belongs to
the session or to the turn).

History policy. Each completed or cancelled turn is kept: the user's input (text or speech tokens)
and the assistant's output tokens (text and speech, as generated), because GLM-4-Voice conditions
on its own earlier speech. Before a turn the prompt must leave room for the answer: `min(
max_new_tokens, answer_reserve)` tokens (`answer_reserve` defaults to half the context). The
oldest whole turns (user input + answer together) are dropped, for good, until it does; the
system prompt always stays; at most `max_history_turns` turns are kept. If the new input alone
does not leave that room, the turn fails with `Error(code="too_long")` and the history is
unchanged. An answer that reaches the end of the context stops with reason "max_tokens". A barge-in (`interrupt(played_seconds)`)
keeps only what was played: `floor(played_seconds * 12.5)` speech tokens and, by the 13:26 layout,
half as many text tokens (all of them when the whole answer was played).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping, Sequence

import numpy as np
import torch

from voicelm.core.audio import SAMPLE_RATE, TOKEN_RATE, AudioError, prepare_audio
from voicelm.events import (END_CANCELLED, END_ERROR, END_INTERRUPTED, END_MAX_TOKENS, END_STOP, AudioChunk,
                            Error, Event, SpeechTokens, TextDelta, TurnEnd)

if TYPE_CHECKING:
    from voicelm.pipeline import Pipeline

# The LM's output layout: 13 text tokens, then 26 speech tokens, repeated.
TEXT_TOKENS_PER_BLOCK = 13
SPEECH_TOKENS_PER_BLOCK = 26

DEFAULT_MAX_INPUT_SECONDS = 60.0
DEFAULT_MAX_TEXT_CHARS = 4_000


class SessionBusyError(RuntimeError):
    """A turn was started while another turn of the same session is still running."""


@dataclasses.dataclass
class Exchange:
    """One turn of the history: what the user said and what the assistant generated."""

    user_text: str | None
    user_speech: tuple[int, ...] | None  # speech codes of the user's audio
    output_ids: list[int]  # the assistant's LM ids in generation order (text and speech), no stop token
    text: str  # the assistant's text (of output_ids)
    interrupted: bool = False  # truncated to the part that was played


def truncate_to_played(output_ids: Sequence[int], is_speech, played_seconds: float) -> list[int]:
    """The part of an answer that `played_seconds` of its audio voiced.

    Speech tokens last 1 / 12.5 s each, so `floor(played * 12.5)` of them were heard. Text leads
    speech by the 13:26 layout (one text token per two speech tokens), so about half as many text
    tokens were spoken; when every speech token was played, all text stays. The kept ids are a
    subsequence of `output_ids` in the original order.
    """
    if played_seconds < 0 or not math.isfinite(played_seconds):
        raise ValueError(f"played_seconds must be a finite number >= 0, got {played_seconds!r}")
    speech_total = sum(1 for i in output_ids if is_speech(i))
    speech_keep = min(speech_total, int(math.floor(played_seconds * TOKEN_RATE + 1e-9)))
    if speech_keep == speech_total:
        return list(output_ids)
    text_keep = math.ceil(speech_keep * TEXT_TOKENS_PER_BLOCK / SPEECH_TOKENS_PER_BLOCK)
    kept: list[int] = []
    for token in output_ids:
        if is_speech(token):
            if speech_keep > 0:
                kept.append(token)
                speech_keep -= 1
        elif text_keep > 0:
            kept.append(token)
            text_keep -= 1
    return kept


class IncrementalDetokenizer:
    """Text ids -> text deltas that never split a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding then ends in U+FFFD.
    Such a tail is held back until the next token completes it.
    """

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode(self.ids)
        stable = text.rstrip("\ufffd")
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return ""
        delta = stable[len(self.emitted):]
        self.emitted = stable
        return delta

    def flush(self) -> str:
        """The rest at the end of the turn, an unfinished character included (as U+FFFD)."""
        text = self._decode(self.ids) if self.ids else ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


class Session:
    """A conversation: history, per-call sampling options, cancel, sync and async turns.

    Create with `Pipeline.session(...)`. Not for two turns at once (SessionBusyError); make one
    session per conversation.
    """

    def __init__(
        self,
        pipeline: "Pipeline",
        *,
        system: str | None = None,
        options: Any = None,
        max_history_turns: int | None = None,
        seed: int | None = None,
        max_input_seconds: float = DEFAULT_MAX_INPUT_SECONDS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        decode_audio: bool = True,
        answer_reserve: int | None = None,
    ):
        if max_history_turns is not None and max_history_turns < 0:
            raise ValueError(f"max_history_turns must be >= 0 or None, got {max_history_turns}")
        self.pipeline = pipeline
        self.system = pipeline.default_system if system is None else system
        self.options = pipeline.make_options(options)
        self.max_history_turns = max_history_turns
        self.max_input_seconds = max_input_seconds
        self.max_text_chars = max_text_chars
        self.decode_audio = decode_audio
        self.answer_reserve = answer_reserve if answer_reserve is not None else pipeline.max_context // 2
        if not 1 <= self.answer_reserve < pipeline.max_context:
            raise ValueError(f"answer_reserve must be in [1, {pipeline.max_context}), got {self.answer_reserve}")
        self.history: list[Exchange] = []
        # The session's own RNG: sampling never touches torch's global generator, so sessions in
        # threads do not perturb each other and a seed reproduces a conversation.
        self.rng = torch.Generator()
        self.rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self._lock = threading.Lock()  # guards the fields below
        self._busy = False
        self._cancelled = threading.Event()
        self._played_limit: float | None = None
        self._active_generation = None
        self._audio_stream = None  # the decoder stream, made once and reset per turn

    # --- control from any thread -------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._busy

    def cancel(self) -> None:
        """Stop the running turn (no effect when idle). Returns at once; the turn ends with
        TurnEnd(reason="cancelled") before the next LM token / decoder chunk."""
        with self._lock:
            if not self._busy:
                return
            self._cancelled.set()
            generation = self._active_generation
        if generation is not None:
            generation.cancel()

    def interrupt(self, played_seconds: float) -> None:
        """Barge-in: stop the running turn and keep in the history only the part of the answer
        that was played (`played_seconds` of its audio). When the answer was already complete
        but still playing, the last history turn is cut down the same way."""
        if played_seconds is None or not math.isfinite(played_seconds) or played_seconds < 0:
            raise ValueError(f"played_seconds must be a finite number >= 0, got {played_seconds!r}")
        with self._lock:
            if self._busy:
                self._played_limit = float(played_seconds)
                self._cancelled.set()
                generation = self._active_generation
            else:
                generation = None
                if self.history:
                    self._truncate(self.history[-1], played_seconds)
        if generation is not None:
            generation.cancel()

    def reset(self) -> None:
        """Forget the history (the system prompt and options stay)."""
        with self._lock:
            if self._busy:
                raise SessionBusyError("cannot reset the history during a turn: cancel() it and wait for TurnEnd")
            self.history.clear()

    # --- turns -----------------------------------------------------------------------------
    def respond(
        self,
        *,
        audio=None,
        sample_rate: int | None = None,
        text: str | None = None,
        speech_tokens: Sequence[int] | None = None,
        options: Any = None,
        tokenize_seconds: float | None = None,
    ) -> Iterator[Event]:
        """One turn: give exactly one of `audio` (+ `sample_rate`), `text` or `speech_tokens`
        (codes of an already tokenized utterance; `tokenize_seconds` is then reported as the
        tokenize timing). `options` overrides the session's sampling options for this call (a
        SamplingOptions or a mapping such as {"temperature": 0.2}).

        Bad input raises here, before anything runs (AudioError / ValueError). Failures while
        generating arrive as an Error event followed by TurnEnd(reason="error").
        """
        given = [name for name, value in (("audio", audio), ("text", text), ("speech_tokens", speech_tokens))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"respond() takes exactly one of audio=, text=, speech_tokens=; got {given or 'none'}")
        turn_options = self.pipeline.make_options(options, base=self.options)
        wav = None
        if audio is not None:
            if sample_rate is None:
                raise AudioError("respond(audio=...) needs sample_rate= (Hz) of the audio")
            wav = prepare_audio(audio, sample_rate, SAMPLE_RATE, max_seconds=self.max_input_seconds)
        elif text is not None:
            if not isinstance(text, str):
                raise ValueError(f"text must be a str, got {type(text).__name__}")
            if not text.strip():
                raise ValueError("text is empty: type something to say")
            if len(text) > self.max_text_chars:
                raise ValueError(f"text is {len(text)} characters, over the limit of {self.max_text_chars}: shorten it")
        else:
            speech_tokens = self.pipeline.check_speech_tokens(speech_tokens)
        return self._turn(wav, text, speech_tokens, turn_options, tokenize_seconds)

    def arespond(self, **kwargs) -> AsyncIterator[Event]:
        """`respond()` for asyncio: the turn runs in a worker thread, events arrive as produced.
        Cancelling the consuming task (or leaving the loop early) cancels the turn. Bad input
        raises here, at the call, like `respond()`."""
        return self._arun(self.respond(**kwargs))

    async def _arun(self, turn: Iterator[Event]) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        finished = object()

        def work() -> None:
            try:
                for event in turn:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, finished)

        worker = threading.Thread(target=work, name="voicelm-turn", daemon=True)
        worker.start()
        done = False
        try:
            while True:
                item = await queue.get()
                if item is finished:
                    done = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not done:
                self.cancel()
                await asyncio.to_thread(worker.join)

    # --- internals ---------------------------------------------------------------------------
    def _begin(self) -> None:
        with self._lock:
            if self._busy:
                raise SessionBusyError(
                    "this session is already running a turn: cancel() it and wait for its TurnEnd, or use "
                    "another session for a parallel conversation")
            self._busy = True
            self._cancelled.clear()
            self._played_limit = None

    def _truncate(self, exchange: Exchange, played_seconds: float) -> None:
        vocab = self.pipeline.vocab
        kept = truncate_to_played(exchange.output_ids, vocab.is_speech, played_seconds)
        if len(kept) < len(exchange.output_ids):
            exchange.output_ids = kept
            exchange.text = self.pipeline.decode_text([i for i in kept if vocab.is_text(i)])
            exchange.interrupted = True

    def _fit_history(self, user_text, user_speech, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids with as much history as fits; returns (ids, number of dropped turns)."""
        history = list(self.history)
        if self.max_history_turns is not None:
            history = history[len(history) - self.max_history_turns:] if self.max_history_turns else []
        dropped = len(self.history) - len(history)
        reserve = min(max_new_tokens, self.answer_reserve)
        limit = self.pipeline.max_context - reserve
        while True:
            ids = self.pipeline.build_prompt(history, self.system, user_text=user_text, user_speech=user_speech)
            if len(ids) <= limit:
                return ids, dropped
            if not history:
                raise _TurnFailure(
                    "too_long",
                    f"the input needs {len(ids)} prompt tokens, and the answer {reserve} more, but the "
                    f"model's context holds {self.pipeline.max_context}: send a shorter message (or shorter "
                    f"audio), or lower max_new_tokens")
            history.pop(0)
            dropped += 1

    def _turn(self, wav, text, speech_tokens, options, tokenize_seconds) -> Iterator[Event]:
        self._begin()
        pipeline = self.pipeline
        vocab = pipeline.vocab
        start = time.perf_counter()
        timings: dict[str, float] = {}
        detok = IncrementalDetokenizer(pipeline.decode_text)
        output_ids: list[int] = []
        speech_count = 0
        audio_samples = 0
        reason = END_STOP
        dropped = 0
        record = False
        failure: Error | None = None

        def since(t: float) -> float:
            return time.perf_counter() - t

        def add(key: str, seconds: float) -> None:
            timings[key] = timings.get(key, 0.0) + seconds

        def emit_audio(chunks, decode_seconds: float):
            # Waveform chunks -> AudioChunk events; a cancel stops within one chunk.
            nonlocal audio_samples
            for chunk in chunks:
                if "first_audio" not in timings:
                    timings["decoder_first_chunk"] = decode_seconds
                    timings["first_audio"] = since(start)
                samples = _as_samples(chunk)
                yield AudioChunk(samples, pipeline.sample_rate, audio_samples)
                audio_samples += len(samples)
                if self._cancelled.is_set():
                    break

        try:
            # 1. user input -> speech codes
            if wav is not None:
                t = time.perf_counter()
                speech_tokens = pipeline.tokenize(wav)
                timings["tokenize"] = since(t)
                if not speech_tokens:
                    raise _TurnFailure("bad_input", "the audio is too short to give a single speech token (80 ms)")
            elif speech_tokens is not None and tokenize_seconds is not None:
                timings["tokenize"] = float(tokenize_seconds)
            # 2. prompt, with as much history as fits
            t = time.perf_counter()
            prompt_ids, dropped = self._fit_history(text, speech_tokens, options.max_new_tokens)
            timings["prompt"] = since(t)
            # 3. generate, detokenize, decode
            generation = pipeline.start_generation(prompt_ids, options, self.rng)
            with self._lock:
                self._active_generation = generation
            if self._cancelled.is_set():
                generation.cancel()
            audio = None
            if self.decode_audio:
                if self._audio_stream is None:
                    self._audio_stream = pipeline.new_audio_stream()
                audio = self._audio_stream
                audio.reset()
            first_token_time = None
            lm_steps = 0
            while True:
                if self._cancelled.is_set():
                    reason = END_CANCELLED
                    break
                t = time.perf_counter()
                token = generation.step()
                step_seconds = since(t)
                add("lm", step_seconds)
                if token is None:
                    reason = END_MAX_TOKENS if generation.hit_max_tokens else END_STOP
                    break
                lm_steps += 1
                if first_token_time is None:
                    first_token_time = time.perf_counter()
                    timings["lm_prefill"] = step_seconds
                elif "first_audio" not in timings:
                    add("lm_first_audio_steps", step_seconds)
                output_ids.append(token)
                if vocab.is_speech(token):
                    code = vocab.speech_index(token)
                    speech_count += 1
                    yield SpeechTokens((code,))
                    if audio is not None:
                        t = time.perf_counter()
                        chunks = audio.push([code])
                        decode_seconds = since(t)
                        add("decoder", decode_seconds)
                        yield from emit_audio(chunks, decode_seconds)
                elif vocab.is_text(token):
                    delta = detok.push(token)
                    if delta:
                        if "first_text" not in timings:
                            timings["first_text"] = since(start)
                        yield TextDelta(delta)
                # other specials (e.g. <|begin_of_audio|>) carry no content for the listener
            record = True
            tail = detok.flush()
            if tail:
                yield TextDelta(tail)
            if audio is not None and not self._cancelled.is_set():
                t = time.perf_counter()
                chunks = audio.finish()
                decode_seconds = since(t)
                add("decoder", decode_seconds)
                yield from emit_audio(chunks, decode_seconds)
            if self._cancelled.is_set() and reason not in (END_CANCELLED,):
                reason = END_CANCELLED
        except GeneratorExit:
            # The consumer stopped iterating: the turn counts as cancelled; what was generated stays.
            record = bool(output_ids) or record
            reason = END_CANCELLED
            self._finish(text, speech_tokens, output_ids, detok, record, reason, dropped)
            raise
        except _TurnFailure as exc:
            failure = Error(exc.code, exc.message)
        except (AudioError, ValueError) as exc:
            failure = Error("bad_input", str(exc))
        except Exception as exc:  # a model failure must not kill the caller's loop
            failure = Error("internal", f"{type(exc).__name__}: {exc}")
        if failure is not None:
            reason = END_ERROR
            record = False
            yield failure
        reason = self._finish(text, speech_tokens, output_ids, detok, record, reason, dropped)
        timings["total"] = since(start)
        yield TurnEnd(
            reason=reason, timings=timings, text=detok.emitted,
            num_text_tokens=len(detok.ids), num_speech_tokens=speech_count,
            audio_seconds=audio_samples / pipeline.sample_rate, history_turns=len(self.history),
            dropped_turns=dropped if record else 0,
        )

    def _finish(self, user_text, user_speech, output_ids, detok, record: bool, reason: str, dropped: int) -> str:
        """Record the turn in the history (or not), free the session; returns the final reason."""
        with self._lock:
            try:
                if record:
                    # The turns left out of this prompt are gone for good: history == context.
                    del self.history[:dropped]
                    self._drop_for_record()
                    exchange = Exchange(
                        user_text=user_text,
                        user_speech=tuple(user_speech) if user_speech is not None else None,
                        output_ids=list(output_ids),
                        text=detok.emitted,
                    )
                    self.history.append(exchange)
                    if self._played_limit is not None:
                        self._truncate(exchange, self._played_limit)
                        reason = END_INTERRUPTED
                    elif reason == END_CANCELLED:
                        exchange.interrupted = True
                return reason
            finally:
                self._active_generation = None
                self._busy = False
                self._played_limit = None

    def _drop_for_record(self) -> None:
        if self.max_history_turns is not None:
            excess = len(self.history) + 1 - self.max_history_turns
            if excess > 0:
                del self.history[:excess]


class _TurnFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _as_samples(chunk) -> np.ndarray:
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().to(torch.float32).cpu().numpy()
    return np.asarray(chunk, dtype=np.float32).reshape(-1)
