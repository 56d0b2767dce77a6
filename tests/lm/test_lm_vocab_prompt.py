"""Vocabulary layout, text tokenizer, prompt layout and the 13:26 interleaving."""

import base64
import json

import pytest

from voicelm.lm import (AssistantTurn, PromptError, TextTokenizer, UserTurn, Vocabulary, VocabularyError,
                       build_prompt, interleave, load_tiktoken_file, render_ids, split_ids)
from voicelm.lm.prompt import SYSTEM_SPEECH_INPUT, SYSTEM_TEXT_INPUT
from voicelm.lm.text_tokenizer import _bytes_to_unicode



def test_official_layout_has_the_released_ids():
    v = Vocabulary.glm4voice()
    assert v.eot_id == 151329
    assert (v.system_id, v.user_id, v.assistant_id) == (151335, 151336, 151337)
    assert (v.begin_of_audio_id, v.end_of_audio_id) == (151343, 151344)
    assert v.speech_id(0) == 152353 and v.speech_id(16383) == 168736
    assert v.total_size == 168960
    assert v.stop_ids == (151329, 151336, 151338)
    assert not v.is_speech(152352) and v.is_speech(152353) and v.is_speech(168736) and not v.is_speech(168737)
    assert v.prompt_prefix == ("[gMASK]", "<sop>")


def test_own_layout_is_contiguous_and_padded():
    v = Vocabulary.voicelm(300, 64)
    specials = sorted(v.special_ids.values())
    assert specials == list(range(300, 300 + len(specials)))
    assert v.speech_offset == specials[-1] + 1
    assert v.total_size % 64 == 0 and v.total_size >= v.speech_offset + 64
    for k in (0, 1, 63):
        assert v.speech_index(v.speech_id(k)) == k and v.is_speech(v.speech_id(k))
    assert not v.is_speech(v.speech_offset - 1) and not v.is_speech(v.speech_offset + 64)
    assert Vocabulary.from_dict(json.loads(json.dumps(v.to_dict()))) == v


def test_bad_ids_are_refused_clearly():
    v = Vocabulary.voicelm(300, 64)
    with pytest.raises(VocabularyError, match="outside"):
        v.speech_id(64)
    with pytest.raises(VocabularyError, match="not a speech token"):
        v.speech_index(5)
    with pytest.raises(VocabularyError, match="outside the vocabulary"):
        v.check_ids([1, v.total_size])
    with pytest.raises(VocabularyError, match="glm4voice layout"):
        Vocabulary.from_layout("glm4voice", 300, 64)


def test_text_tokenizer_round_trip_and_no_injection(tokenizer):
    text = "what is seven plus five? Ünïcode too\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    assert all(v.is_text(i) for i in tokenizer.encode("<|user|><|audio_3|>"))
    with pytest.raises(ValueError, match="not text ids"):
        tokenizer.decode([v.user_id])


def test_speech_prompt_encodes_and_decodes_to_the_glm4voice_layout(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    speech = [5, 0, 63, 17, 17, 2]
    ids = build_prompt(v, tokenizer, user_speech=speech)
    expected = (f"<|system|>\n{SYSTEM_SPEECH_INPUT}<|user|>\n<|begin_of_audio|>"
                + "".join(f"<|audio_{k}|>" for k in speech) + "<|end_of_audio|><|assistant|>streaming_transcription\n")
    assert render_ids(v, tokenizer, ids) == expected
    # the speech offset splits the ids exactly: the N speech ids are the user's codes, in order
    assert [v.speech_index(i) for i in ids if v.is_speech(i)] == speech
    start = ids.index(v.begin_of_audio_id)
    assert ids[start + 1:start + 1 + len(speech)] == [v.speech_offset + k for k in speech]
    assert ids[start + 1 + len(speech)] == v.end_of_audio_id


def test_multi_turn_history_keeps_the_assistant_speech(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    answer = AssistantTurn.from_parts(v, tokenizer.encode("seven plus five is twelve."), list(range(30)))
    ids = build_prompt(v, tokenizer, [UserTurn(text="what is seven plus five?"), answer], user_text="and plus two?")
    rendered = render_ids(v, tokenizer, ids)
    assert rendered.startswith(f"<|system|>\n{SYSTEM_TEXT_INPUT}<|user|>\nwhat is seven plus five?<|assistant|>"
                               "streaming_transcription\nseven plus five is twelve.<|audio_0|>")
    assert rendered.endswith("<|audio_29|><|user|>\nand plus two?<|assistant|>streaming_transcription\n")
    assert split_ids(v, answer.ids)[1] == list(range(30))
    assert ids.count(v.system_id) == 1
    with pytest.raises(PromptError, match="alternate"):
        build_prompt(v, tokenizer, [answer], user_text="hi")
    with pytest.raises(PromptError, match="exactly one"):
        build_prompt(v, tokenizer, user_text="hi", user_speech=[1])


def test_interleave_13_text_26_speech_then_the_rest():
    v = Vocabulary.voicelm(300, 2048)
    text = list(range(30))            # chunks of 13, 13, 4
    speech = list(range(100))
    ids = interleave(v, text, speech)
    kinds = "".join("s" if v.is_speech(i) else "t" for i in ids)
    assert kinds == "t" * 13 + "s" * 26 + "t" * 13 + "s" * 26 + "t" * 4 + "s" * 48
    assert split_ids(v, ids) == (text, speech)
    assert interleave(v, [], [1, 2]) == v.speech_ids([1, 2])   # no text: speech only
    with pytest.raises(PromptError, match="at least 53 speech tokens"):
        interleave(v, text, list(range(52)))


def _tiktoken_file(tokenizer, path):
    """Write a tokenizer's BPE as a tiktoken rank file (ranks = merge order)."""
    model = json.loads(tokenizer.to_str())["model"]
    to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}"
             for token, rank in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")


def test_tiktoken_loader_reproduces_the_bpe(tokenizer, corpus, tmp_path):
    path = tmp_path / "tokenizer.model"
    _tiktoken_file(tokenizer, path)
    loaded = load_tiktoken_file(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in corpus + ["seven plus twelve is nineteen!", "  spaces\n\nand  lines", "unseen wörds 12345"]:
        assert loaded.encode(text) == tokenizer.encode(text), text
        assert loaded.decode(loaded.encode(text)) == text
    assert TextTokenizer.load(path).encode("two plus two") == tokenizer.encode("two plus two")
    (tmp_path / "bad.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="tiktoken format"):
        load_tiktoken_file(tmp_path / "bad.model")
