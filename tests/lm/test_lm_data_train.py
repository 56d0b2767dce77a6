"""Dialogue manifests -> interleaved samples, and training: a tiny model overfits a small set."""

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from voicelm.lm import VoiceLM, Vocabulary, render_ids
from voicelm.lm.data import (IGNORE_INDEX, DataOptions, Dialogue, DialogueManifestError, DialogueTurn, SampleBuilder,
                             collate, read_dialogues, write_dialogues)
from voicelm.lm.prompt import ASSISTANT_TAG, SYSTEM_ASR, SYSTEM_TEXT_ONLY, SYSTEM_TTS
from voicelm.lm.solver import LMSolver

ANSWERS = ["seven plus five is twelve.", "two plus two is four.", "c, a, t.",
           "one, two, three, four, five, six, seven, eight, nine, ten."]


def _dialogues(speech_vocab=64, seed=0):
    rng = random.Random(seed)
    out = []
    for i, answer in enumerate(ANSWERS):
        user = DialogueTurn("user", f"question {i}", f"wavs/{i}_u.wav", [rng.randrange(speech_vocab) for _ in range(10)])
        assistant = DialogueTurn("assistant", answer, f"wavs/{i}_a.wav",
                                 [rng.randrange(speech_vocab) for _ in range(30 + 12 * i)])
        out.append(Dialogue(f"d{i}", [user, assistant], split="train"))
    # a two-exchange dialogue whose follow-up refers to the first answer
    follow = DialogueTurn("user", "and plus two?", None, [rng.randrange(speech_vocab) for _ in range(8)])
    reply = DialogueTurn("assistant", "seven plus seven is fourteen.", None, [rng.randrange(speech_vocab) for _ in range(40)])
    out.append(Dialogue("d9", out[0].turns + [follow, reply], split="train"))
    return out


def test_manifest_round_trip_and_errors(tmp_path):
    path = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    back = read_dialogues(path)
    assert [d.to_json() for d in back] == [d.to_json() for d in _dialogues()]
    assert read_dialogues(path, split="valid") == []
    bad = {"id": "x", "turns": [{"role": "assistant", "text": "hi", "tokens": None}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DialogueManifestError, match=r"bad.jsonl:1: turn 0 must have role 'user'"):
        read_dialogues(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"id": "x", "turns": [{"role": "user", "text": "a", "tokens": [1, -2]}]}\n')
    with pytest.raises(DialogueManifestError, match="non-negative ints"):
        read_dialogues(tmp_path / "bad2.jsonl")


def test_dialogue_sample_layout_and_loss_mask(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=512))
    dialogues = _dialogues()
    samples = builder.build(dialogues)
    assert {k: len(s) for k, s in samples.items()} == {"dialogue": 5, "asr": 12, "tts": 6}
    long_answer = samples["dialogue"][3]
    trained = [i for i, l in zip(long_answer.input_ids, long_answer.labels) if l != IGNORE_INDEX]
    assert all(l == i for i, l in zip(long_answer.input_ids, long_answer.labels) if l != IGNORE_INDEX)
    # the loss covers exactly the answer (13 text, 26 speech, rest of text, rest of speech) + <|user|>
    n_text = len(tokenizer.encode(ANSWERS[3]))
    assert 26 < n_text <= 39 and len(dialogues[3].turns[1].tokens) == 66
    kinds = "".join("s" if v.is_speech(i) else "t" for i in trained[:-1])
    assert kinds == ("t" * 13 + "s" * 26) * 2 + "t" * (n_text - 26) + "s" * (66 - 52)
    assert trained[-1] == v.user_id
    # multi-turn: the first answer's speech stays in the context and both answers are trained
    multi = samples["dialogue"][4]
    rendered = render_ids(v, tokenizer, multi.input_ids)
    assert rendered.count("<|assistant|>streaming_transcription\n") == 2 and rendered.count("<|system|>") == 1
    n_trained_speech = sum(1 for l in multi.labels if l != IGNORE_INDEX and v.is_speech(l))
    assert n_trained_speech == 30 + 40
    # one <|user|> between the turns: it ends the first answer (trained) and opens the next turn
    assert "<|audio_" + str(dialogues[4].turns[1].tokens[-1]) + "|><|user|>\n<|begin_of_audio|>" in rendered
    assert multi.labels.count(v.user_id) == 2 and multi.input_ids[-1] == v.user_id
    # ASR / TTS samples use their own system prompts; TTS answers are speech only
    asr, tts = samples["asr"][0], samples["tts"][0]
    assert render_ids(v, tokenizer, asr.input_ids).startswith(f"<|system|>\n{SYSTEM_ASR}<|user|>\n<|begin_of_audio|>")
    assert render_ids(v, tokenizer, tts.input_ids).startswith(f"<|system|>\n{SYSTEM_TTS}<|user|>\n")
    assert all(v.is_speech(l) for l in tts.labels if l not in (IGNORE_INDEX, v.user_id))
    batch = collate([asr, tts], v.pad_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == len(asr) + len(tts)


def test_text_task_answers_in_text_only_from_its_own_manifest(tokenizer, tmp_path):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    dialogues = _dialogues()
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=512, tasks=("text",)))
    samples = builder.build(dialogues)["text"]
    assert len(samples) == 5 and builder.stats.samples["text"] == 5
    multi = samples[4]
    rendered = render_ids(v, tokenizer, multi.input_ids)
    assert rendered.startswith(f"<|system|>\n{SYSTEM_TEXT_ONLY}<|user|>\nquestion 0")
    assert not any(v.is_speech(i) for i in multi.input_ids)
    # the loss covers both text answers and their stop tokens, nothing of the questions
    trained = [l for l in multi.labels if l != IGNORE_INDEX]
    expected = tokenizer.encode(ANSWERS[0]) + [v.user_id] + tokenizer.encode("seven plus seven is fourteen.")
    assert trained == expected + [v.user_id]
    # text dialogues given separately replace the training dialogues' text; speech-only turns are skipped
    extra = [Dialogue("t0", [DialogueTurn("user", "what is one plus one?"),
                             DialogueTurn("assistant", "one plus one is two.")]),
             Dialogue("t1", [DialogueTurn("user", None, None, [1, 2, 3]), DialogueTurn("assistant", "hi.")])]
    samples = SampleBuilder(v, tokenizer, DataOptions(tasks=("dialogue", "text"))).build(dialogues, extra)
    assert [s.source for s in samples["text"]] == ["t0"] and len(samples["dialogue"]) == 5


def test_respoken_text_dialogues_take_recorded_turns_of_the_same_words_and_style(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    spoken = _dialogues()
    slow = DialogueTurn("assistant", ANSWERS[0], None, [5] * 50, style="slow")
    spoken.append(Dialogue("d10", spoken[0].turns + [DialogueTurn("user", "say it slowly.", None, [6] * 9), slow]))
    again = DialogueTurn("user", "question 0", None, [7] * 11)  # a second recording of "question 0"
    spoken.append(Dialogue("d11", [again, spoken[0].turns[1]]))
    texts = [  # text dialogues: words recorded above in a new order, a style turn, one never recorded
        Dialogue("t0", [DialogueTurn("user", "question 1"), DialogueTurn("assistant", ANSWERS[1]),
                        DialogueTurn("user", "question 0"), DialogueTurn("assistant", ANSWERS[0])]),
        Dialogue("t1", [DialogueTurn("user", "question 0"), DialogueTurn("assistant", ANSWERS[0]),
                        DialogueTurn("user", "say it slowly."), DialogueTurn("assistant", ANSWERS[0], style="slow")]),
        Dialogue("t2", [DialogueTurn("user", "never said"), DialogueTurn("assistant", ANSWERS[1])]),
    ]
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("respoken",)))
    made = list(builder.respoken_dialogues(spoken, texts))
    assert [d.id for d in made] == ["t0:respoken", "t1:respoken"] and builder.stats.respoken_uncovered == 1
    recorded = {}
    for d in spoken:
        for t in d.turns:
            recorded.setdefault((t.role, t.text, t.style), []).append(t.tokens)
    for d in made:
        for t in d.turns:
            assert t.tokens in recorded[(t.role, t.text, t.style)], (d.id, t.text, t.style)
    assert made[1].turns[3].tokens == [5] * 50  # the slow answer is the slow recording, not the normal one
    assert made[1].turns[1].tokens == spoken[0].turns[1].tokens
    # drawn with (seed, dialogue id): the same every build, and both recordings of "question 0" get used
    again_made = list(SampleBuilder(v, tokenizer, DataOptions(tasks=("respoken",))).respoken_dialogues(spoken, texts))
    assert [t.tokens for d in again_made for t in d.turns] == [t.tokens for d in made for t in d.turns]
    many = [Dialogue(f"m{i}", [DialogueTurn("user", "question 0"), DialogueTurn("assistant", ANSWERS[0])]) for i in range(40)]
    assert {tuple(d.turns[0].tokens) for d in builder.respoken_dialogues(spoken, many)} == {
        tuple(spoken[0].turns[0].tokens), (7,) * 11}
    # the samples are dialogue samples of the respoken dialogues, under their own task name
    samples = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("respoken",))).build(spoken, texts)
    reference = SampleBuilder(v, tokenizer, DataOptions(max_length=1024)).dialogue_sample(made[0])
    assert [s.task for s in samples["respoken"]] == ["respoken", "respoken"]
    assert samples["respoken"][0].input_ids == reference.input_ids and samples["respoken"][0].labels == reference.labels
    capped = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("respoken",), respoken_max=1))
    assert len(capped.build(spoken, texts)["respoken"]) == 1


def _styled_dialogues():
    """_dialogues() plus two recorded style turns: ANSWERS[0] slow and ANSWERS[1] fast."""
    spoken = _dialogues()
    slow = DialogueTurn("assistant", ANSWERS[0], None, [5] * 50, style="slow")
    fast = DialogueTurn("assistant", ANSWERS[1], None, [6] * 25, style="fast")
    spoken.append(Dialogue("d10", spoken[0].turns + [DialogueTurn("user", "say it slowly.", None, [7] * 9), slow]))
    spoken.append(Dialogue("d11", spoken[1].turns + [DialogueTurn("user", "say it quickly.", None, [8] * 9), fast]))
    return spoken


def _answers(v, tokenizer, sample):
    """[(text ids, speech codes, labels)] of each assistant answer of a sample, in order."""
    ids, labels = sample.input_ids, sample.labels
    header = [v.assistant_id] + tokenizer.encode(ASSISTANT_TAG)
    out = []
    for start in [i for i in range(len(ids)) if ids[i:i + len(header)] == header]:
        body = range(start + len(header), ids.index(v.user_id, start))
        out.append(([ids[i] for i in body if v.is_text(ids[i])],
                    [ids[i] - v.speech_offset for i in body if v.is_speech(ids[i])], [labels[i] for i in body]))
    return out


def test_voicing_swaps_the_last_answer_and_trains_only_speech_that_says_its_text(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    spoken = _styled_dialogues()
    recorded = {}
    for d in spoken:
        for t in d.turns:
            if t.role == "assistant":
                recorded.setdefault(tuple(t.tokens), set()).add((t.text, t.style or "normal"))
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("voicing",)))
    samples = builder.build(spoken)["voicing"]
    # the two style turns have no other answer recorded in their style: counted, not swapped
    assert len(samples) == builder.stats.samples["voicing"] == 5 and builder.stats.voicing_unpaired == 2
    assert [s.source for s in samples] == [f"{d.id}:voicing" for d in spoken[:5]]
    for d, sample in zip(spoken, samples):
        last = _answers(v, tokenizer, sample)[-1]
        text = tokenizer.decode(last[0])
        # the answer is another recording of the same style, and its speech is that text's recording
        assert text != d.turns[-1].text
        assert (text, d.turns[-1].style or "normal") in recorded[tuple(last[1])], (d.id, text)
        # loss on that speech and the stop tokens only: never on its text, never on earlier answers
        trained = [l for l in sample.labels if l != IGNORE_INDEX]
        earlier = len(d.turns) // 2 - 1
        assert trained == [v.user_id] * earlier + [c + v.speech_offset for c in last[1]] + [v.user_id]
    # drawn with (seed, dialogue id): the same every build
    again = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("voicing",))).build(spoken)["voicing"]
    assert [s.input_ids for s in again] == [s.input_ids for s in samples]


def test_restyle_copies_an_unpredictable_answer_in_the_requested_style(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    spoken = _styled_dialogues()
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("restyle",)))
    samples = builder.build(spoken)["restyle"]
    assert len(samples) == len(spoken) and builder.stats.restyle_uncovered == 0
    seen = set()
    for d, sample in zip(spoken, samples):
        rendered = render_ids(v, tokenizer, sample.input_ids)
        first, second = _answers(v, tokenizer, sample)
        assert first[0] == second[0]                      # the same words, said twice
        style = "slow" if second[1] == [5] * 50 else "fast"
        assert second[1] == {"slow": [5] * 50, "fast": [6] * 25}[style]      # the recording in the style
        assert first[1] == next(t.tokens for x in spoken for t in x.turns     # and a plain recording of it
                                if t.text == tokenizer.decode(first[0]) and t.style is None)
        request = {"slow": 7, "fast": 8}[style]                            # the recorded request of that style
        assert f"<|begin_of_audio|>{f'<|audio_{request}|>' * 9}<|end_of_audio|>" in rendered
        assert "<|audio_" + str(d.turns[0].tokens[0]) + "|>" in rendered   # the dialogue's own first question
        # no loss on the first answer; the whole second answer and its stop token are trained
        assert all(l == IGNORE_INDEX for l in first[2]) and second[2] == [i for i in second[2] if i != IGNORE_INDEX]
        assert [l for l in sample.labels if l != IGNORE_INDEX][-1] == v.user_id
        seen.add(style)
    assert seen == {"slow", "fast"}
    # nothing recorded in a style: no samples, and the log says why
    plain = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("restyle",)))
    assert plain.build(_dialogues())["restyle"] == []


def test_too_long_and_too_short_are_counted_never_silent(tokenizer, caplog):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    dialogues = _dialogues()
    full = SampleBuilder(v, tokenizer, DataOptions(max_length=4096, tasks=("dialogue",))).build(dialogues)["dialogue"]
    limit = len(full[4]) - 1   # only the two-exchange dialogue d9 is too long
    assert max(len(s) for s in full[:4]) <= limit
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=limit, tasks=("dialogue",)))
    samples = builder.build(dialogues)["dialogue"]
    stats = builder.stats
    assert stats.truncated_dialogues == 1 and stats.dropped_turns == 2     # d9 lost its first exchange
    assert len(samples) == 5 and all(len(s) <= limit for s in samples)
    assert "dropped its 1 oldest exchange" in caplog.text
    # speech that cannot keep up with its text
    short = Dialogue("s", [DialogueTurn("user", "q", None, [1, 2]), DialogueTurn("assistant", ANSWERS[3], None, [1] * 20)])
    builder = SampleBuilder(v, tokenizer, DataOptions(tasks=("dialogue",)))
    assert builder.build([short])["dialogue"] == [] and builder.stats.skipped_speech_shorter_than_text == 1
    builder = SampleBuilder(v, tokenizer, DataOptions(max_length=20, tasks=("dialogue",)))
    assert builder.build(dialogues[:1])["dialogue"] == [] and builder.stats.skipped_too_long == 1
    with pytest.raises(DialogueManifestError, match="different codebook"):
        SampleBuilder(Vocabulary.voicelm(tokenizer.vocab_size, 16), tokenizer).build(dialogues)


def _cfg(manifest, **solver):
    lm = OmegaConf.to_container(OmegaConf.load("conf/lm/tiny.yaml"))
    lm.update(hidden_size=96, intermediate_size=192)
    base = dict(name="lm", train_manifest=str(manifest), batch_size=8, mix={"dialogue": 1.0}, eval_generate=8,
                text_input_ratio=0.0, seed=0)
    base.update(solver)
    return OmegaConf.create({"solver": base, "lm": lm})


def test_tiny_model_overfits_and_greedy_generation_reproduces_the_answers(tmp_path):
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    solver = LMSolver(_cfg(manifest))
    model = solver.build_model()
    train, _ = solver.build_dataloaders()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    torch.manual_seed(0)
    for step in range(150):
        for batch in train:
            metrics = solver.compute_loss(model, batch)
            opt.zero_grad()
            metrics["loss"].backward()
            opt.step()
            break
    model.eval()
    with torch.no_grad():
        final = solver.compute_loss(model, next(iter(train)))
    assert float(final["loss"]) < 0.05, {k: float(v) for k, v in final.items()}
    assert float(final["text_loss"]) < 0.05 and float(final["speech_loss"]) < 0.05
    generated = solver.generation_metrics(model, solver.train_dialogues)
    assert generated == {"answer_text_accuracy": 1.0, "speech_token_accuracy": 1.0}
    # the exported part reloads and still answers the same
    solver.export(model, tmp_path / "export")
    lm = VoiceLM.from_pretrained(tmp_path / "export")
    again = solver.generation_metrics(lm.model, solver.train_dialogues)
    assert again == generated


def test_samples_know_whether_their_last_answer_is_spoken_in_a_style(tokenizer):
    v = Vocabulary.voicelm(tokenizer.vocab_size, 64)
    samples = SampleBuilder(v, tokenizer, DataOptions(max_length=1024, tasks=("dialogue", "tts", "restyle"))).build(
        _styled_dialogues())
    styled = {f"d{i}": i in (10, 11) for i in (0, 1, 2, 3, 9, 10, 11)}   # d10 ends slow, d11 fast
    assert {s.source: s.styled for s in samples["dialogue"]} == styled
    # a TTS sample is styled as the answer it speaks; d10's and d11's first answers are plain
    assert {s.source for s in samples["tts"] if s.styled} == {"d10:3", "d11:3"}
    assert samples["restyle"] and all(s.styled for s in samples["restyle"])
    batch = collate(samples["dialogue"], v.pad_id)
    assert batch["styled"].tolist() == [styled[s.source] for s in samples["dialogue"]]


def _self_fed_batch(tmp_path, dialogues=None, **solver_settings):
    """A solver with these settings, its random tiny model, one training batch (ids, labels,
    mask), the speech id range and the model's teacher-forced top-1 speech code at each place."""
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues() if dialogues is None else dialogues)
    solver = LMSolver(_cfg(manifest, **solver_settings))
    model = solver.build_model()
    batch = next(iter(solver.build_dataloaders()[0]))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lo, hi = solver.vocab.speech_offset, solver.vocab.speech_offset + solver.vocab.speech_vocab_size
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits[:, :-1, lo:hi].argmax(-1) + lo
    return solver, model, batch, (ids, labels, mask), (lo, hi), own


def test_self_feed_gives_answer_speech_inputs_the_models_own_codes_and_keeps_the_labels(tmp_path):
    solver, model, batch, (ids, labels, mask), (lo, hi), own = _self_fed_batch(tmp_path, self_feed=1.0)
    manifest = tmp_path / "d.jsonl"
    torch.manual_seed(0)
    fed, changed = solver.self_fed_inputs(model, ids, labels, mask)
    answer_speech = (labels[:, 1:] >= lo) & (labels[:, 1:] < hi)
    assert answer_speech.sum() > 100
    # every answer speech input is the model's own choice there; every other token is untouched
    assert torch.equal(fed[:, 1:][answer_speech], own[answer_speech])
    assert torch.equal(fed[:, 1:][~answer_speech], ids[:, 1:][~answer_speech]) and torch.equal(fed[:, 0], ids[:, 0])
    differs = (own != ids[:, 1:]) & answer_speech
    assert float(changed) == pytest.approx(float(differs.sum() / answer_speech.sum())) and float(changed) > 0.5

    # half the positions: an independent share of them, never a token that is not a speech code
    half = LMSolver(_cfg(manifest, self_feed=0.5))
    half._prepare()
    torch.manual_seed(1)
    fed_half, _ = half.self_fed_inputs(model, ids, labels, mask)
    took_own = (fed_half[:, 1:] == own) & differs
    assert 0.35 < float(took_own.sum() / differs.sum()) < 0.65
    assert torch.equal(fed_half[:, 1:][~answer_speech], ids[:, 1:][~answer_speech])

    # training sees the fed inputs and reports the share; validation (no grad) and eval mode do not
    model.train()
    fed_loss = solver.compute_loss(model, batch)
    plain = LMSolver(_cfg(manifest))
    plain._prepare()
    plain_loss = plain.compute_loss(model, batch)
    assert "self_fed" in fed_loss and "self_fed" not in plain_loss
    assert not torch.allclose(fed_loss["loss"], plain_loss["loss"])
    with torch.no_grad():
        assert torch.allclose(solver.compute_loss(model, batch)["loss"], plain_loss["loss"])


@pytest.mark.parametrize("value", [1.5, -0.1, "half"])
def test_self_feed_out_of_range_is_a_clear_error(tmp_path, value):
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    with pytest.raises(ValueError, match=r"solver.self_feed=.* must be a share in \[0, 1\]"):
        LMSolver(_cfg(manifest, self_feed=value))


def test_self_feed_scope_last_feeds_only_the_answer_being_spoken(tmp_path):
    # d9 answers twice: its first answer is history, which a style request copies; it stays recorded
    solver, model, _, (ids, labels, mask), (lo, hi), own = _self_fed_batch(
        tmp_path, self_feed=1.0, self_feed_scope="last", batch_size=16)
    v = solver.vocab
    place = torch.arange(ids.shape[1]).expand_as(ids)
    last = torch.where(ids == v.assistant_id, place, -1).max(dim=1, keepdim=True).values
    answer_speech = (labels[:, 1:] >= lo) & (labels[:, 1:] < hi)
    spoken_now = answer_speech & (place[:, 1:] > last)
    history = answer_speech & ~spoken_now
    assert history.sum() >= 30 and spoken_now.sum() > 100      # the batch holds the two-answer dialogue
    fed, changed = solver.self_fed_inputs(model, ids, labels, mask)
    assert torch.equal(fed[:, 1:][spoken_now], own[spoken_now])
    assert torch.equal(fed[:, 1:][~spoken_now], ids[:, 1:][~spoken_now])
    assert float(changed) == pytest.approx(float(((own != ids[:, 1:]) & spoken_now).sum() / spoken_now.sum()))
    # the default scope feeds the history's answer too
    every = LMSolver(_cfg(tmp_path / "d.jsonl", self_feed=1.0, batch_size=16))
    every._prepare()
    fed_all, _ = every.self_fed_inputs(model, ids, labels, mask)
    assert torch.equal(fed_all[:, 1:][history], own[history])


def test_self_feed_temperature_samples_speech_codes_instead_of_the_top_1(tmp_path):
    solver, model, _, (ids, labels, mask), (lo, hi), own = _self_fed_batch(
        tmp_path, self_feed=1.0, self_feed_temperature=1.0)
    answer_speech = (labels[:, 1:] >= lo) & (labels[:, 1:] < hi)
    torch.manual_seed(0)
    fed, _ = solver.self_fed_inputs(model, ids, labels, mask)
    sampled = fed[:, 1:][answer_speech]
    assert bool(((sampled >= lo) & (sampled < hi)).all())          # always a speech code
    assert float((sampled == own[answer_speech]).float().mean()) < 0.5   # a random model's samples are spread
    assert torch.equal(fed[:, 1:][~answer_speech], ids[:, 1:][~answer_speech])
    # a temperature near zero is the top-1 again
    cold = LMSolver(_cfg(tmp_path / "d.jsonl", self_feed=1.0, self_feed_temperature=1e-6))
    cold._prepare()
    fed_cold, _ = cold.self_fed_inputs(model, ids, labels, mask)
    assert torch.equal(fed_cold[:, 1:][answer_speech], own[answer_speech])


def test_self_feed_styled_false_leaves_styled_answers_recorded(tmp_path):
    solver, model, batch, (ids, labels, mask), (lo, hi), own = _self_fed_batch(
        tmp_path, _styled_dialogues(), self_feed=1.0, self_feed_styled=False, batch_size=16)
    styled = batch["styled"]
    assert styled.any() and not styled.all()
    answer_speech = (labels[:, 1:] >= lo) & (labels[:, 1:] < hi)
    fed, _ = solver.self_fed_inputs(model, ids, labels, mask, styled)
    plain_rows = answer_speech & ~styled.view(-1, 1)
    assert torch.equal(fed[:, 1:][plain_rows], own[plain_rows])
    assert torch.equal(fed[styled], ids[styled])
    # training honours the setting: rows of styled answers only are not fed; plain rows are
    model.train()
    unfed = LMSolver(_cfg(tmp_path / "d.jsonl", batch_size=16))
    unfed._prepare()
    for rows, fed_here in ((styled, False), (~styled, True)):
        part = {k: t[rows] for k, t in batch.items()}
        same = torch.allclose(solver.compute_loss(model, part)["loss"], unfed.compute_loss(model, part)["loss"])
        assert same != fed_here


@pytest.mark.parametrize("setting, match", [
    (dict(self_feed_styled="no"), r"solver.self_feed_styled='no' must be true .* or false"),
    (dict(self_feed_scope="history"), r"solver.self_feed_scope='history' must be 'all' .* or 'last'"),
    (dict(self_feed_temperature=-1.0), r"solver.self_feed_temperature=-1.0 must be a number >= 0"),
    (dict(self_feed_temperature="hot"), r"solver.self_feed_temperature=hot must be a number >= 0"),
])
def test_bad_self_feed_scope_temperature_or_styled_is_a_clear_error(tmp_path, setting, match):
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    with pytest.raises(ValueError, match=match):
        LMSolver(_cfg(manifest, self_feed=1.0, **setting))


def test_a_self_fed_tiny_model_still_lowers_its_speech_loss(tmp_path):
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    solver = LMSolver(_cfg(manifest, self_feed=0.5))
    model = solver.build_model()
    train, _ = solver.build_dataloaders()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    torch.manual_seed(0)
    batch = next(iter(train))
    first = float(solver.compute_loss(model, batch)["speech_loss"])
    shares = []
    for _ in range(80):
        metrics = solver.compute_loss(model, next(iter(train)))
        shares.append(float(metrics["self_fed"]))
        opt.zero_grad()
        metrics["loss"].backward()
        opt.step()
    model.eval()
    assert float(solver.compute_loss(model, batch)["speech_loss"]) < 0.6 * first, shares
    # about half the answer speech inputs are picked, and most of a random model's picks differ
    assert all(0.3 < share < 0.6 for share in shares[:5]), shares


def test_through_the_harness_then_fine_tune_with_init_from(tmp_path):
    from voicelm.train import compose_config, train

    dialogues = _dialogues()
    dialogues[1].split = "valid"
    manifest = write_dialogues(tmp_path / "d.jsonl", dialogues)
    common = ["solver=lm", "lm=tiny", f"solver.train_manifest={manifest}", "solver.steps=6", "solver.batch_size=4",
              "solver.eval_every=null", "solver.checkpoint_every=null", "solver.log_every=3", "solver.eval_generate=1",
              "solver.eval_max_new_tokens=20"]
    result = train(compose_config([*common, f"run_dir={tmp_path / 'run'}"]))
    assert {"loss", "text_loss", "speech_loss", "answer_text_accuracy"} <= set(result.valid_metrics)
    lm = VoiceLM.from_pretrained(result.export_dir)
    assert lm.config.text_vocab_size == lm.text_tokenizer.vocab_size
    tuned = train(compose_config([*common, f"run_dir={tmp_path / 'tune'}", f"solver.init_from={result.export_dir}",
                                  "lm.hidden_size=32"]))   # ignored: the checkpoint's geometry wins
    lm2 = VoiceLM.from_pretrained(tuned.export_dir)
    assert lm2.config == lm.config
    assert lm2.text_tokenizer.to_str() == lm.text_tokenizer.to_str()
    changed = [k for k, t in lm2.model.state_dict().items() if not torch.equal(t, lm.model.state_dict()[k])]
    assert changed   # fine-tuning moved the weights


def test_lr_scale_layers_train_the_chosen_layers_faster(tmp_path):
    """What a grown LM's inserted layers need: the listed decoder layers move about
    `layers_lr_scale` times as far as with the base lr, the other layers about as far."""
    from voicelm.train import compose_config, train

    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    common = ["solver=lm", "lm=tiny", f"solver.train_manifest={manifest}", "solver.steps=4", "solver.batch_size=4",
              "solver.warmup_steps=0", "solver.lr=1e-4", "solver.eval_every=null", "solver.checkpoint_every=null",
              "solver.eval_generate=0"]
    start = train(compose_config([*common, "solver.steps=1", f"run_dir={tmp_path / 'start'}"])).export_dir
    before = VoiceLM.from_pretrained(start).model.state_dict()

    def moved(run: str, *extra: str) -> tuple[float, float]:
        out = train(compose_config([*common, f"run_dir={tmp_path / run}", f"solver.init_from={start}", *extra]))
        after = VoiceLM.from_pretrained(out.export_dir).model.state_dict()
        by_layer = {0: 0.0, 1: 0.0}
        for key, value in after.items():
            if key.startswith("model.layers."):
                by_layer[int(key.split(".")[2])] += float((value - before[key]).abs().sum())
        return by_layer[0], by_layer[1]

    base0, base1 = moved("base")
    fast0, fast1 = moved("fast", "solver.lr_scale_layers=[1]", "solver.layers_lr_scale=10")
    assert fast1 > 4 * base1
    assert 0.5 < fast0 / base0 < 2

    # killed and resumed, the chosen layers keep their 10 x through the rest of the schedule
    scaled = [*common, "solver.steps=8", "solver.checkpoint_every=4", f"run_dir={tmp_path / 'resumed'}",
              f"solver.init_from={start}", "solver.lr_scale_layers=[1]", "solver.layers_lr_scale=10"]
    train(compose_config(scaled), stop_after=5)
    assert train(compose_config(scaled)).resumed_from == 4
    state = torch.load(tmp_path / "resumed/checkpoints/last/training_state.pt", weights_only=True)
    rest, chosen = state["optimizers"]["main"]["param_groups"]
    assert 0 < rest["lr"] < 1e-4 and chosen["lr"] == pytest.approx(10 * rest["lr"])


@pytest.mark.parametrize("setting, match", [
    (dict(lr_scale_layers=[5]), r"solver.lr_scale_layers has \[5\], but the model has 2 decoder layers"),
    (dict(lr_scale_layers="2,5"), r"solver.lr_scale_layers='2,5' must be a list of decoder layer indices"),
    (dict(lr_scale_layers=[1], layers_lr_scale=-2.0), r"solver.layers_lr_scale=-2.0 must be a number > 0"),
])
def test_bad_lr_scale_layers_is_a_clear_error(tmp_path, setting, match):
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    with pytest.raises(ValueError, match=match):
        solver = LMSolver(_cfg(manifest, **setting))
        solver.optimizer_groups(solver.build_model())


def test_generation_metrics_skip_a_history_whose_speech_cannot_follow_its_text(tmp_path):
    # The earlier answer has 30 text-ish words but only 3 speech tokens: it cannot be laid out
    # 13:26, so the dialogue is skipped (as the dataset builder skips it), not an error.
    dialogues = _dialogues()
    short = DialogueTurn("assistant", " ".join(["seven"] * 30), None, [1, 2, 3])
    bad = Dialogue("bad", [dialogues[0].turns[0], short] + dialogues[4].turns[-2:], split="train")
    manifest = write_dialogues(tmp_path / "d.jsonl", dialogues)
    solver = LMSolver(_cfg(manifest))
    model = solver.build_model()
    assert solver.generation_metrics(model, [bad]) == {}
    assert set(solver.generation_metrics(model, [bad, dialogues[0]])) == {"answer_text_accuracy", "speech_token_accuracy"}


def test_solver_reads_text_dialogues_from_text_manifest(tmp_path):
    manifest = write_dialogues(tmp_path / "d.jsonl", _dialogues())
    text = write_dialogues(tmp_path / "t.jsonl", [
        Dialogue(f"t{i}", [DialogueTurn("user", f"how do you spell {w}?"), DialogueTurn("assistant", ", ".join(w) + ".")])
        for i, w in enumerate(["zebra", "quiz", "jazz"])])
    solver = LMSolver(_cfg(manifest, mix={"dialogue": 1.0, "text": 0.5}, text_manifest=str(text)))
    train, _ = solver.build_dataloaders()
    assert solver.train_stats.samples["text"] == 3 and solver.train_stats.samples["dialogue"] == 5
    assert "text" in train.tasks
    # the BPE is trained on the text dialogues too: their words encode back exactly
    assert solver.tokenizer.decode(solver.tokenizer.encode("how do you spell zebra?")) == "how do you spell zebra?"
    with pytest.raises(ValueError, match="text_manifest"):
        empty = write_dialogues(tmp_path / "e.jsonl", [Dialogue("v", [DialogueTurn("user", "a")], split="valid")])
        LMSolver(_cfg(manifest, mix={"text": 1.0}, text_manifest=str(empty), valid_split="valid")).build_dataloaders()


def test_length_grouped_batches_keep_size_and_cut_padding():
    from voicelm.lm.data import LMSample, MixtureBatches

    def pool(task, lengths):
        return [LMSample([1] * n, [1] * n, task, f"{task}{i}") for i, n in enumerate(lengths)]

    samples = {"text": pool("text", range(10, 40)), "dialogue": pool("dialogue", range(200, 400, 5))}

    def run(group):
        batches = MixtureBatches(samples, {"text": 1.0, "dialogue": 1.0}, 8, 0, 40, seed=3, group=group)
        batches.set_epoch(2)
        out = list(batches)
        padded = sum(b["input_ids"].numel() for b in out)
        real = sum(int(b["attention_mask"].sum()) for b in out)
        return out, padded, real

    plain, plain_padded, plain_real = run(1)
    grouped, grouped_padded, grouped_real = run(8)
    assert len(grouped) == 40 and all(b["input_ids"].shape[0] == 8 for b in grouped)
    assert grouped_padded < 0.75 * plain_padded, (grouped_padded, plain_padded)
    assert abs(grouped_real / plain_real - 1) < 0.3   # the same mixture of tasks, only batched differently
    again, _, _ = run(8)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again))  # resumable


def test_token_budget_batches_hold_many_short_samples_or_few_long_ones():
    from voicelm.lm.data import LMSample, MixtureBatches

    def pool(task, lengths):
        return [LMSample([1] * n, [1] * n, task, f"{task}{i}") for i, n in enumerate(lengths)]

    samples = {"text": pool("text", range(20, 40)), "dialogue": pool("dialogue", range(200, 300, 5)),
               "long": pool("long", [900])}
    batches = MixtureBatches(samples, {"text": 4.0, "dialogue": 1.0, "long": 0.1}, 16, 0, 60, seed=1, group=4,
                             batch_tokens=1000)
    out = list(batches)
    assert len(out) == 60  # batches_per_epoch still counts batches
    for b in out:
        rows, width = b["input_ids"].shape
        assert rows * width <= 1000 or rows == 1  # a sample over the budget goes alone
    rows_by_width = [(b["input_ids"].shape[1], b["input_ids"].shape[0]) for b in out]
    assert max(r for w, r in rows_by_width if w < 40) >= 25 and max(r for w, r in rows_by_width if w >= 200) <= 5
    batches.set_epoch(0)
    again = list(batches)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, again))
    with pytest.raises(ValueError, match="batch_tokens"):
        MixtureBatches(samples, {"text": 1.0}, 16, 0, 10, batch_tokens=0)
