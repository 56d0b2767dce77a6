"""Step-wise generation: the enforced 13:26 layout, stopping, cancellation, the KV cache."""

import threading
import types

import pytest
import torch

from voicelm.lm import GenerationError, SamplingOptions, VoiceLM, VoiceLMGen, build_prompt
from voicelm.lm.prompt import split_ids


def _kinds(events):
    return "".join("t" if e.kind == "text" else "s" for e in events)


def _assert_layout(kinds: str, text_tokens=13, speech_tokens=26):
    """Cycles of exactly 13 text + 26 speech while the text lasts; after a short text chunk only speech."""
    i = 0
    while i < len(kinds):
        run = kinds[i:i + text_tokens]
        n_text = len(run) - len(run.lstrip("t"))
        if n_text < text_tokens:  # the text ended (or never started): speech only from here
            assert set(kinds[i + n_text:]) <= {"s"}, kinds
            return
        rest = kinds[i + text_tokens:i + text_tokens + speech_tokens]
        assert rest == "s" * len(rest), kinds
        i += text_tokens + speech_tokens


class ScriptedModel(torch.nn.Module):
    """Stands in for GlmForCausalLM: returns logits preferring `favourite(step)` (order of preference)."""

    def __init__(self, config, preference):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.preference = preference
        self.calls = 0

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
        logits = torch.zeros(1, 1, self.config.vocab_size)
        for rank, token in enumerate(self.preference(self.calls)):
            logits[0, 0, token] = 100.0 - rank
        self.calls += 1
        return types.SimpleNamespace(logits=logits)


def _scripted_lm(tiny_lm, preference):
    model = ScriptedModel(tiny_lm.model.config, preference)
    lm = VoiceLM.__new__(VoiceLM)
    lm.__dict__.update(tiny_lm.__dict__, model=model)
    return lm


def test_random_tiny_model_follows_the_enforced_layout(tiny_lm):
    v = tiny_lm.vocab
    prompt = build_prompt(v, tiny_lm.text_tokenizer, user_speech=[3, 1, 4, 1, 5])
    reasons = set()
    for seed in range(12):
        gen = VoiceLMGen(tiny_lm, prompt, SamplingOptions(temperature=1.5, top_p=1.0, seed=seed, max_new_tokens=120))
        events = gen.run()
        _assert_layout(_kinds(events))
        assert [e.token_id for e in events] == gen.generated
        for e in events:
            assert (e.speech_index is not None) == (e.kind == "speech")
            if e.kind == "speech":
                assert e.token_id - v.speech_offset == e.speech_index and 0 <= e.speech_index < v.speech_vocab_size
            else:
                assert 0 <= e.token_id < tiny_lm.text_tokenizer.vocab_size
        reasons.add(gen.stop_reason)
        if gen.stop_reason == "stop_token":
            assert gen.stop_token_id in v.stop_ids and events and events[-1].kind == "speech"
        else:
            assert gen.stop_reason == "max_new_tokens" and len(events) == 120
    assert reasons <= {"stop_token", "max_new_tokens"}


def test_a_text_loving_model_is_held_to_13_text_then_26_speech_until_the_cap(tiny_lm):
    v = tiny_lm.vocab
    stops = list(v.stop_ids)
    # prefers: stop, then text 7, then speech 0 -- stop must wait for speech, text for its phase
    lm = _scripted_lm(tiny_lm, lambda step: stops + [7, v.speech_offset])
    gen = VoiceLMGen(lm, [v.user_id, 1], SamplingOptions(temperature=0.0, max_new_tokens=100))
    kinds = _kinds(gen.run())
    # stop is preferred, so it ends the answer at the first place it is allowed: right after a speech token
    assert kinds == "t" * 13 + "s", kinds
    assert gen.stop_reason == "stop_token"

    lm = _scripted_lm(tiny_lm, lambda step: [7, v.speech_offset])
    gen = VoiceLMGen(lm, [v.user_id, 1], SamplingOptions(temperature=0.0, max_new_tokens=100))
    kinds = _kinds(gen.run())
    assert kinds == ("t" * 13 + "s" * 26) * 2 + "t" * 13 + "s" * 9 and gen.stop_reason == "max_new_tokens"


def test_speech_in_the_text_phase_ends_the_text(tiny_lm):
    v = tiny_lm.vocab
    # 5 text tokens, then the model picks speech once; afterwards it prefers text again: refused
    lm = _scripted_lm(tiny_lm, lambda step: ([7] if step < 5 else [v.speech_offset + 2] if step == 5 else [7, v.speech_offset]))
    gen = VoiceLMGen(lm, [v.user_id, 1], SamplingOptions(temperature=0.0, max_new_tokens=60))
    kinds = _kinds(gen.run())
    assert kinds == "t" * 5 + "s" * 55
    assert gen.speech_indices[0] == 2


def test_without_enforcement_anything_goes_but_specials(tiny_lm):
    v = tiny_lm.vocab
    lm = _scripted_lm(tiny_lm, lambda step: [v.begin_of_audio_id, v.total_size - 1, 7] if step < 20 else [v.user_id])
    gen = VoiceLMGen(lm, [v.user_id, 1], SamplingOptions(temperature=0.0, max_new_tokens=100, enforce_interleave=False))
    kinds = _kinds(gen.run())
    assert kinds == "t" * 20 and gen.stop_reason == "stop_token"


def test_cancel_between_tokens_from_another_thread(tiny_lm):
    prompt = build_prompt(tiny_lm.vocab, tiny_lm.text_tokenizer, user_text="what is two plus two?")
    gen = VoiceLMGen(tiny_lm, prompt, SamplingOptions(temperature=1.0, seed=0, max_new_tokens=500))
    first = [gen.step() for _ in range(3)]
    assert all(e is not None for e in first)
    worker = threading.Thread(target=gen.cancel)
    worker.start()
    worker.join()
    assert gen.step() is None and gen.stop_reason == "cancelled"
    assert gen.step() is None and len(gen.generated) == 3
    assert gen.assistant_turn().ids == gen.generated

    gen = VoiceLMGen(tiny_lm, prompt, SamplingOptions(max_new_tokens=5))
    gen.cancel()
    assert list(gen) == [] and gen.stop_reason == "cancelled"


def test_kv_cache_matches_full_recomputation(tiny_lm):
    """Greedy tokens of the cached loop == argmax of a full forward over the whole sequence each step."""
    v = tiny_lm.vocab
    prompt = build_prompt(v, tiny_lm.text_tokenizer, user_speech=[1, 2, 3, 4, 5, 6])
    gen = VoiceLMGen(tiny_lm, prompt, SamplingOptions(temperature=0.0, max_new_tokens=40, enforce_interleave=False))
    gen.run()
    allowed = gen._text_mask | gen._speech_mask | gen._stop_mask
    seq = list(prompt)
    with torch.no_grad():
        for token in gen.generated + ([gen.stop_token_id] if gen.stop_token_id is not None else []):
            logits = tiny_lm.model(torch.tensor([seq])).logits[0, -1].masked_fill(~allowed, float("-inf"))
            assert int(logits.argmax()) == token
            seq.append(token)


def test_same_seed_same_answer(tiny_lm):
    prompt = build_prompt(tiny_lm.vocab, tiny_lm.text_tokenizer, user_text="spell cat.")
    runs = [VoiceLMGen(tiny_lm, prompt, SamplingOptions(temperature=1.0, seed=7, max_new_tokens=60)).run() for _ in range(2)]
    assert runs[0] == runs[1]


def test_context_and_input_errors(tiny_lm):
    v = tiny_lm.vocab
    ctx = tiny_lm.max_context
    with pytest.raises(GenerationError, match="no room for an answer"):
        VoiceLMGen(tiny_lm, [1] * ctx)
    with pytest.raises(GenerationError, match="empty"):
        VoiceLMGen(tiny_lm, [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        VoiceLMGen(tiny_lm, [1, v.total_size + 3])
    with pytest.raises(GenerationError, match="top_p"):
        SamplingOptions(top_p=0.0)
    gen = VoiceLMGen(tiny_lm, [v.user_id] * (ctx - 4), SamplingOptions(temperature=1.0, seed=0, max_new_tokens=100))
    events = gen.run()
    assert len(events) <= 4
    if len(events) == 4:
        assert gen.stop_reason == "context"
    with pytest.raises(ValueError, match="speech token 64 is outside"):
        build_prompt(v, tiny_lm.text_tokenizer, user_speech=[64])
