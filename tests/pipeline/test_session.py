"""The streaming token API on a tiny random pipeline: event order, audio, cancel, threads, history."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from voicelm.core.audio import SAMPLES_PER_TOKEN, AudioError
from voicelm.events import AudioChunk, Error, SpeechTokens, TextDelta, TurnEnd
from voicelm.session import IncrementalDetokenizer, SessionBusyError, truncate_to_played

SHORT = {"max_new_tokens": 40}


def run(session, **kwargs):
    return list(session.respond(**kwargs))


def audio_of(events) -> np.ndarray:
    chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def test_text_turn_event_order_and_audio(tiny):
    session = tiny.session(seed=3)
    events = run(session, text="what is seven plus five?", options=SHORT)
    kinds = [type(e) for e in events]
    assert kinds[-1] is TurnEnd and kinds.count(TurnEnd) == 1
    assert Error not in kinds
    end = events[-1]
    assert end.reason == "max_tokens"
    # every speech token arrives before the audio that voices it: the first chunk needs 10
    first_audio = kinds.index(AudioChunk)
    assert sum(1 for k in kinds[:first_audio] if k is SpeechTokens) == tiny.first_chunk_tokens
    speech = [t for e in events if isinstance(e, SpeechTokens) for t in e.tokens]
    assert len(speech) == end.num_speech_tokens and all(0 <= t < tiny.vocab.speech_vocab_size for t in speech)
    # audio: the decoder's rate, finite, contiguous chunks, 1764 samples (22,050 / 12.5) per token
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert all(c.sample_rate == tiny.sample_rate == 22050 for c in chunks)
    starts = np.cumsum([0] + [len(c.samples) for c in chunks[:-1]])
    assert [c.start for c in chunks] == list(starts)
    wav = audio_of(events)
    assert np.isfinite(wav).all() and np.abs(wav).max() <= 1.0 and wav.std() > 0
    assert abs(len(wav) - len(speech) * 22050 / 12.5) <= 256  # up to one mel hop of rounding
    assert end.audio_seconds == pytest.approx(len(wav) / 22050)
    assert end.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    for key in ("prompt", "lm_prefill", "lm_first_audio_steps", "decoder_first_chunk", "first_audio", "total"):
        assert end.timings[key] >= 0
    assert end.timings["first_audio"] <= end.timings["total"]


def test_audio_turn_tokenizes_and_records_speech(tiny, speech_16k):
    session = tiny.session(seed=1)
    events = run(session, audio=speech_16k, sample_rate=16000, options=SHORT)
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.reason == "max_tokens" and "tokenize" in end.timings
    exchange = session.history[-1]
    assert exchange.user_text is None
    assert len(exchange.user_speech) == -(-len(speech_16k) // SAMPLES_PER_TOKEN)


def test_stereo_48k_audio_is_accepted(tiny, speech_16k):
    import torchaudio.functional as AF
    import torch

    wav48 = AF.resample(torch.from_numpy(speech_16k), 16000, 48000).numpy()
    stereo = np.stack([wav48, wav48])  # (2, T)
    end = run(tiny.session(seed=1), audio=stereo, sample_rate=48000, options={"max_new_tokens": 5})[-1]
    assert end.reason == "max_tokens"


def test_same_seed_same_answer_and_options_per_call(tiny):
    a = run(tiny.session(seed=7), text="hello", options=SHORT)
    b = run(tiny.session(seed=7), text="hello", options=SHORT)
    tokens = lambda ev: [t for e in ev if isinstance(e, SpeechTokens) for t in e.tokens]  # noqa: E731
    assert tokens(a) == tokens(b)
    np.testing.assert_array_equal(audio_of(a), audio_of(b))
    short = run(tiny.session(seed=7), text="hello", options={"max_new_tokens": 12})
    assert short[-1].num_speech_tokens + short[-1].num_text_tokens == 12


def test_cancel_from_another_thread_stops_within_a_token_and_session_stays_usable(tiny):
    session = tiny.session(seed=2)
    events = []
    cancelled_at = None
    for event in session.respond(text="count to ten", options={"max_new_tokens": 400}):
        events.append(event)
        if isinstance(event, AudioChunk) and cancelled_at is None:
            thread = threading.Thread(target=session.cancel)
            thread.start()
            thread.join()
            cancelled_at = len(events)
    end = events[-1]
    assert end.reason == "cancelled"
    # after cancel() returned, at most the token in flight arrives; no more audio is decoded
    assert len(events) - cancelled_at <= 2
    assert end.num_speech_tokens < 400
    assert not session.busy
    assert session.history[-1].interrupted
    # the next turn works and sees the cancelled one in its history
    events2 = run(session, text="again", options=SHORT)
    assert events2[-1].reason == "max_tokens" and any(isinstance(e, AudioChunk) for e in events2)
    assert len(session.history) == 2


def test_abandoning_the_generator_frees_the_session(tiny):
    session = tiny.session(seed=2)
    turn = session.respond(text="hi", options={"max_new_tokens": 200})
    next(turn)
    assert session.busy
    with pytest.raises(SessionBusyError):
        next(session.respond(text="second turn at once"))
    turn.close()
    assert not session.busy
    assert run(session, text="ok", options=SHORT)[-1].reason == "max_tokens"


def test_two_sessions_in_threads_do_not_interfere(tiny):
    def tokens_and_audio(events):
        return [t for e in events if isinstance(e, SpeechTokens) for t in e.tokens], audio_of(events)

    alone = {seed: tokens_and_audio(run(tiny.session(seed=seed), text=f"question {seed}", options=SHORT))
             for seed in (11, 12)}
    results, errors = {}, []

    def worker(seed):
        try:
            results[seed] = tokens_and_audio(run(tiny.session(seed=seed), text=f"question {seed}", options=SHORT))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in (11, 12):
        assert results[seed][0] == alone[seed][0]
        np.testing.assert_allclose(results[seed][1], alone[seed][1], atol=1e-5)


def test_history_grows_by_one_turn_and_prompt_contains_it(tiny):
    session = tiny.session(seed=4)
    lengths = []
    for i in range(3):
        end = run(session, text=f"turn {i}", options=SHORT)[-1]
        assert end.history_turns == i + 1
        lengths.append(len(tiny.build_prompt(session.history, session.system, user_text="next")))
    assert [e.user_text for e in session.history] == ["turn 0", "turn 1", "turn 2"]
    assert all(len(e.output_ids) == SHORT["max_new_tokens"] for e in session.history)
    # each turn adds its user input and the whole 40-token answer to the next prompt
    assert lengths[1] - lengths[0] >= 40 and lengths[2] - lengths[1] >= 40
    session.reset()
    assert session.history == []


def test_history_cap_drops_oldest_whole_turns(tiny):
    session = tiny.session(seed=4, max_history_turns=2)
    for i in range(4):
        run(session, text=f"turn {i}", options=SHORT)
    assert [e.user_text for e in session.history] == ["turn 2", "turn 3"]
    # context policy: the tiny LM holds 512 tokens, so 100-token answers fit only a few turns
    session = tiny.session(seed=4)
    dropped = []
    for i in range(6):
        end = run(session, text=f"turn {i}", options={"max_new_tokens": 100})[-1]
        assert end.reason == "max_tokens" and end.num_text_tokens + end.num_speech_tokens == 100
        dropped.append(end.dropped_turns)
    assert sum(dropped) > 0 and len(session.history) < 6
    assert len(tiny.build_prompt(session.history[1:], session.system, user_text="x")) + 100 <= tiny.max_context
    assert [e.user_text for e in session.history] == [f"turn {i}" for i in range(6 - len(session.history), 6)]


def test_input_beyond_context_is_an_error_and_history_unchanged(tiny):
    session = tiny.session(seed=4)
    run(session, text="first", options=SHORT)
    events = run(session, text="word " * 600, options=SHORT)
    assert isinstance(events[0], Error) and events[0].code == "too_long" and "context" in events[0].message
    assert events[-1].reason == "error" and len(session.history) == 1


def test_bad_input_is_refused_at_the_call(tiny):
    session = tiny.session()
    with pytest.raises(ValueError, match="exactly one"):
        session.respond(text="a", audio=np.zeros(100), sample_rate=16000)
    with pytest.raises(ValueError, match="exactly one"):
        session.respond()
    with pytest.raises(AudioError, match="silent"):
        session.respond(audio=np.zeros(16000, np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="NaN"):
        session.respond(audio=np.full(16000, np.nan, np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="sample_rate"):
        session.respond(audio=np.ones(100, np.float32))
    with pytest.raises(ValueError, match="empty"):
        session.respond(text="   ")
    with pytest.raises(ValueError, match="outside"):
        session.respond(speech_tokens=[0, 10_000])
    with pytest.raises(ValueError, match="unknown sampling options"):
        session.respond(text="hi", options={"temprature": 0.5})
    with pytest.raises(ValueError, match="top_p"):
        session.respond(text="hi", options={"top_p": 0})
    assert not session.busy


def test_arespond_streams_and_task_cancel_cancels_the_turn(tiny):
    async def main():
        session = tiny.session(seed=5)
        events = [e async for e in session.arespond(text="hi", options=SHORT)]
        assert isinstance(events[-1], TurnEnd) and events[-1].reason == "max_tokens"

        seen = []

        async def consume():
            async for event in session.arespond(text="long", options={"max_new_tokens": 2000}):
                seen.append(event)

        task = asyncio.create_task(consume())
        while not any(isinstance(e, AudioChunk) for e in seen):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not session.busy and len(session.history) == 2 and session.history[-1].interrupted
        again = [e async for e in session.arespond(text="still there?", options=SHORT)]
        assert again[-1].reason == "max_tokens"

    asyncio.run(main())


def test_interrupt_keeps_only_the_played_part(tiny):
    session = tiny.session(seed=6)
    run(session, text="hi", options={"max_new_tokens": 120})
    full = list(session.history[-1].output_ids)
    session.interrupt(played_seconds=1.0)  # answer complete, still playing: cut the last turn
    kept = session.history[-1].output_ids
    speech = [i for i in kept if tiny.vocab.is_speech(i)]
    text = [i for i in kept if tiny.vocab.is_text(i)]
    assert len(speech) == 12  # floor(1.0 s * 12.5)
    assert len(text) == min(6, sum(1 for i in full if tiny.vocab.is_text(i)))
    assert session.history[-1].interrupted


def test_truncate_to_played_follows_the_13_26_layout():
    is_speech = lambda i: i >= 100  # noqa: E731
    answer = list(range(13)) + list(range(100, 126)) + list(range(13, 20)) + list(range(126, 160))
    assert truncate_to_played(answer, is_speech, 0.0) == []
    kept = truncate_to_played(answer, is_speech, 2.0)  # 25 speech tokens heard
    assert [i for i in kept if i >= 100] == list(range(100, 125))
    assert [i for i in kept if i < 100] == list(range(13))  # ceil(25 / 2) = 13 text tokens
    assert truncate_to_played(answer, is_speech, 100.0) == answer
    with pytest.raises(ValueError):
        truncate_to_played(answer, is_speech, -1.0)


def test_incremental_detokenizer_never_splits_a_character():
    data = "héllo wörld €".encode()
    pieces = [bytes([b]) for b in data]  # one byte per "token"
    detok = IncrementalDetokenizer(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace"))
    deltas = [detok.push(i) for i in range(len(pieces))]
    assert "".join(deltas) == "héllo wörld €"
    assert all("\ufffd" not in d for d in deltas)
