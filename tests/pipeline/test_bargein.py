"""Turn taking with silero-vad over synthesized speech: end of speech answers, speech during the
answer cancels it (barge-in) and becomes the next turn; history keeps only the played part."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from voicelm.bargein import DuplexConversation
from voicelm.events import AudioChunk, BargeIn, TurnEnd, UserSpeechEnd, UserSpeechStart
from voicelm.vad import VAD_WINDOW, SpeechSegmenter, VADConfig, VoiceActivityDetector

from conftest import espeak_wav

RATE = 48_000  # what a browser microphone delivers
FRAME = RATE // 10  # 100 ms


def to_48k(x16: np.ndarray) -> np.ndarray:
    return AF.resample(torch.from_numpy(x16), 16000, RATE).numpy()


def feed(conversation, audio: np.ndarray) -> list:
    events = []
    for start in range(0, len(audio), FRAME):
        events += conversation.feed(audio[start:start + FRAME], RATE)
    return events


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def wait_for(conversation, kind, timeout: float = 60.0) -> list:
    events, deadline = [], time.time() + timeout
    while not any(isinstance(e, kind) for e in events):
        assert time.time() < deadline, f"no {kind.__name__} within {timeout} s"
        events += conversation.poll()
        time.sleep(0.01)
    return events


@pytest.fixture(scope="module")
def second_speech(tmp_path_factory) -> np.ndarray:
    return espeak_wav(tmp_path_factory.mktemp("barge") / "stop.wav", "No wait, stop. Tell me a story instead.")


def test_vad_finds_speech_and_not_silence(speech_16k):
    vad = VoiceActivityDetector()
    assert vad.push(np.zeros(16000, np.float32)).max() < 0.2
    probs = vad.push(speech_16k)
    assert len(probs) == len(speech_16k) // VAD_WINDOW + (16000 % VAD_WINDOW + len(speech_16k) % VAD_WINDOW) // VAD_WINDOW
    assert (probs > 0.5).mean() > 0.3
    segmenter = SpeechSegmenter(VADConfig(min_speech_ms=64, min_silence_ms=320))
    decisions = [segmenter.update(p) for p in list(probs) + [0.0] * 20]
    assert decisions.count("start") >= 1 and decisions[-20:].count("end") == 1


def test_speech_then_silence_answers_and_speech_during_answer_barges_in(tiny, speech_16k, second_speech):
    session = tiny.session(seed=1, options={"max_new_tokens": 120})
    conversation = DuplexConversation(session)
    assert feed(conversation, silence(1.0)) == []
    events = feed(conversation, to_48k(speech_16k)) + feed(conversation, silence(1.0))
    kinds = [type(e) for e in events]
    assert kinds[0] is UserSpeechStart and UserSpeechEnd in kinds
    start = events[0]
    assert 0.4 < start.at_seconds < 1.3  # after the 1 s of silence, less the pre-roll kept before it
    assert conversation.state == "responding"
    events += wait_for(conversation, AudioChunk)  # the answer streams while we listen

    # the user talks over the answer: it is cancelled and the new speech is the next turn
    played_before = conversation.played_seconds()
    events2 = feed(conversation, to_48k(second_speech)) + feed(conversation, silence(1.0))
    barge = [e for e in events2 if isinstance(e, BargeIn)]
    assert len(barge) == 1 and barge[0].played_seconds >= played_before
    ends = [e for e in events2 if isinstance(e, TurnEnd)]
    assert ends and ends[0].reason == "interrupted"
    after_barge = events2[events2.index(barge[0]):]
    assert isinstance(after_barge[1] if not isinstance(after_barge[1], TurnEnd) else after_barge[2], UserSpeechStart) \
        or any(isinstance(e, UserSpeechStart) for e in after_barge)
    assert any(isinstance(e, UserSpeechEnd) for e in after_barge)
    # no audio of the interrupted answer is handed out after the barge-in
    first_turn_audio_after = [e for e in after_barge[: after_barge.index(ends[0])] if isinstance(e, AudioChunk)]
    assert first_turn_audio_after == []
    # the history keeps only what was heard of the first answer
    first = session.history[0]
    speech_kept = sum(1 for i in first.output_ids if tiny.vocab.is_speech(i))
    assert first.interrupted and speech_kept == int(barge[0].played_seconds * 12.5 + 1e-9)
    # the second turn is answered
    events3 = wait_for(conversation, TurnEnd, timeout=120) if conversation.generating else []
    conversation.close()
    assert len(session.history) == 2 and session.history[1].user_speech
    assert any(isinstance(e, AudioChunk) for e in events2 + events3)


def test_half_duplex_ignores_speech_during_the_answer(tiny, speech_16k):
    session = tiny.session(seed=1, options={"max_new_tokens": 200})
    conversation = DuplexConversation(session, barge_in=False)
    feed(conversation, to_48k(speech_16k))
    feed(conversation, silence(1.0))
    wait_for(conversation, AudioChunk)
    events = feed(conversation, to_48k(speech_16k))
    assert not any(isinstance(e, (BargeIn, UserSpeechStart)) for e in events)
    events += conversation.wait(timeout=120)
    conversation.close()
    assert [e.reason for e in events if isinstance(e, TurnEnd)] in ([], ["max_tokens"])
    assert len(session.history) == 1 and not session.history[0].interrupted
