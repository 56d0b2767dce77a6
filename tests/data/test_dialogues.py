"""The demo recipe's dialogue domain: answers are right, held-out combinations never train."""

import json

import pytest

from voicelm.core.manifest import read_manifest
from voicelm.data.dialogue_text import (ADJECTIVES, DRILL_WORDS, OPERATIONS, follow_up_drills, generate_dialogues,
                                        heldout_number_pairs, heldout_repeat_pairs, number_drills, number_words,
                                        repeat_drills)
from voicelm.data.dialogues import (build_corpus, build_drill_corpus, build_voiced_corpus, plan_corpus, plan_drills,
                                    plan_voiced, write_text_dialogues)
from voicelm.data.synth import SynthError
from voicelm.lm.data import read_dialogues


def test_number_words():
    assert number_words(0) == "zero"
    assert number_words(12) == "twelve"
    assert number_words(45) == "forty five"
    assert number_words(300) == "three hundred"
    assert number_words(121) == "one hundred twenty one"
    with pytest.raises(ValueError):
        number_words(1000)


def test_arithmetic_answers_are_correct():
    words = {number_words(n): n for n in range(1000)}
    for _, exchanges in generate_dialogues(400, "train", seed=3):
        for ex in exchanges:
            if ex.task in ("arithmetic", "follow_up"):
                left, result = ex.assistant.rstrip(".").split(" is ")
                for op, fn in OPERATIONS.items():
                    if f" {op} " in left:
                        a, b = left.split(f" {op} ")
                        assert fn(words[a], words[b]) == words[result], ex


def test_heldout_exchanges_never_occur_in_training():
    train = {(e.user, e.assistant) for _, ex in generate_dialogues(4000, "train", seed=0) for e in ex}
    heldout = [(e.user, e.assistant) for _, ex in generate_dialogues(200, "heldout", seed=0)
               for e in ex if e.split == "heldout" and e.task != "style"]
    assert len(heldout) > 100
    assert not [pair for pair in heldout if pair in train]


def test_text_corpus_is_readable_and_holds_no_heldout_exchange(tmp_path):
    path = write_text_dialogues(tmp_path / "text.jsonl", 3000, seed=0)
    dialogues = read_dialogues(path)
    assert len(dialogues) == 3000 and all(d.split == "train" for d in dialogues)
    assert all(t.tokens is None and t.audio is None and t.text for d in dialogues for t in d.turns)
    pairs = {(d.turns[i].text, d.turns[i + 1].text) for d in dialogues for i in range(0, len(d.turns), 2)}
    heldout = [(e.user, e.assistant) for _, ex in generate_dialogues(200, "heldout", seed=0)
               for e in ex if e.split == "heldout" and e.task != "style"]
    assert not [pair for pair in heldout if pair in pairs]
    assert write_text_dialogues(tmp_path / "again.jsonl", 3000, seed=0).read_bytes() == path.read_bytes()


def test_commutative_twin_of_a_heldout_sum_trains():
    train = {e.user for _, ex in generate_dialogues(4000, "train", seed=0) for e in ex}
    twins = 0
    for _, ex in generate_dialogues(200, "heldout", seed=0):
        first = ex[0]
        if first.split == "heldout" and first.task == "arithmetic" and " plus " in first.user:
            twins += any(q in train for q in _swapped_questions(first.user))
    assert twins > 0


def _swapped_questions(question: str) -> list[str]:
    head, _, tail = question.partition(" plus ")
    a = head.split()[-1]
    b = tail.rstrip("?").split()[0]
    return [question.replace(f"{a} plus {b}", f"{b} plus {a}")]


def test_generation_is_deterministic_and_splits_are_distinct():
    a = list(generate_dialogues(50, "heldout", seed=7))
    b = list(generate_dialogues(50, "heldout", seed=7))
    assert a == b
    assert len({tuple(e.user for e in ex) for _, ex in a}) == 50
    with pytest.raises(ValueError, match="split"):
        next(generate_dialogues(1, "test", seed=0))


def test_small_first_restates_first_sums_and_products_only(tmp_path):
    words = {number_words(n): n for n in range(1000)}
    asked = list(generate_dialogues(600, "train", seed=3))
    small = list(generate_dialogues(600, "train", seed=3, answer_order="small_first"))
    assert [(i, [e.user for e in ex]) for i, ex in asked] == [(i, [e.user for e in ex]) for i, ex in small]
    restated = 0
    for (_, ex_asked), (_, ex_small) in zip(asked, small):
        for k, (a, s) in enumerate(zip(ex_asked, ex_small)):
            assert (a.answer, a.task, a.style, a.split) == (s.answer, s.task, s.style, s.split)
            left, result = a.assistant.rstrip(".").split(" is ") if " is " in a.assistant else (a.assistant, "")
            op = next((op for op in ("plus", "times") if f" {op} " in left), None)
            first_arith = a.task == "arithmetic" or (a.task == "style" and k == 1 and ex_asked[0].task == "arithmetic")
            if first_arith and op and words[left.split(f" {op} ")[0]] > words[left.split(f" {op} ")[1]]:
                x, y = left.split(f" {op} ")
                assert s.assistant == f"{y} {op} {x} is {result}."
                restated += 1
            else:
                assert s.assistant == a.assistant, (a, s)
    assert restated > 50
    text = read_dialogues(write_text_dialogues(tmp_path / "text.jsonl", 600, seed=3, follow_up_drills=20,
                                               answer_order="small_first"))
    assert [t.text for t in text[0].turns] == [e for ex in small[0][1] for e in (ex.user, ex.assistant)]
    for _, ex in follow_up_drills(20, seed=3, answer_order="small_first"):
        left = ex[0].assistant.split(" is ")[0]
        for op in ("plus", "times"):
            if f" {op} " in left:
                x, y = left.split(f" {op} ")
                assert words[x] <= words[y]


def test_unknown_answer_order_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="answer_order must be one of asked, small_first, got 'sorted'"):
        next(generate_dialogues(1, "train", seed=0, answer_order="sorted"))
    with pytest.raises(SynthError, match="answer_order"):
        build_corpus(tmp_path / "c", train=1, heldout=0, answer_order="sorted")
    with pytest.raises(SynthError, match="answer_order"):
        write_text_dialogues(tmp_path / "t.jsonl", 5, answer_order="sorted")
    assert not (tmp_path / "c").exists() and not (tmp_path / "t.jsonl").exists()


@pytest.mark.slow
def test_corpus_renders_users_and_a_single_assistant_voice(tmp_path):
    path = build_corpus(tmp_path / "corpus", train=2, heldout=1, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "train", "heldout"]
    assistant = read_manifest(tmp_path / "corpus" / "assistant.jsonl")
    user = read_manifest(tmp_path / "corpus" / "user.jsonl")
    assert {u.speaker.split(":ls")[0] for u in assistant} == {"piper:joe"}
    assert all(u.extra["sample_rate"] == 22050 for u in assistant)
    assert len(user) == len(assistant) == sum(len(r["turns"]) for r in rows) // 2
    for row in rows:
        for turn in row["turns"]:
            assert (tmp_path / "corpus" / turn["audio"]).exists()
            assert turn["duration"] > 0.3


def test_voiced_dialogues_follow_the_spoken_corpus_and_share_answers():
    spoken, _, _ = plan_corpus(30, 0, seed=0)
    voiced, user_items, answer_items = plan_voiced(400, skip=30, seed=0)
    generated = [ex for _, ex in generate_dialogues(430, "train", 0)][30:]
    assert [[t["text"] for t in d["turns"]] for d in voiced] == \
        [[s for ex in exs for s in (ex.user, ex.assistant)] for exs in generated]
    assert not {d["id"] for d in voiced} & {d["id"] for d in spoken}
    assert not any(t.get("heldout") for d in voiced for t in d["turns"])
    # Every user turn is rendered; each distinct answer (text and style) exactly once, and every
    # assistant turn with that answer points at that one file.
    assert len(user_items) == sum(len(d["turns"]) for d in voiced) // 2
    answers = {(t["text"], t["style"]): t["audio"] for d in voiced for t in d["turns"] if t["role"] == "assistant"}
    assert len(answer_items) == len(answers) < len(user_items)
    assert {f"wavs/{i.name}.wav" for i in answer_items} == set(answers.values())
    for d in voiced:
        for t in d["turns"]:
            if t["role"] == "assistant":
                assert t["audio"] == answers[(t["text"], t["style"])]


def test_voiced_dialogues_can_be_only_those_with_long_answers():
    everything, _, _ = plan_voiced(3000, skip=30, seed=0)
    long, user_items, answer_items = plan_voiced(40, skip=30, seed=0, min_answer_words=9)
    longest = lambda d: max(len(t["text"].split()) for t in d["turns"] if t["role"] == "assistant")
    # The first 40 dialogues after the spoken corpus with a 9-word answer, in the generator's order
    # (the unfiltered plan holds them too): rare (a few in a hundred), and every one has such an answer.
    expected = [d for d in everything if longest(d) >= 9][:40]
    assert len(expected) == 40 and len(everything) > 10 * 40
    assert [d["id"] for d in long] == [d["id"] for d in expected]
    assert [[t["text"] for t in d["turns"]] for d in long] == [[t["text"] for t in d["turns"]] for d in expected]
    assert all(longest(d) >= 9 for d in long) and len(user_items) == sum(len(d["turns"]) for d in long) // 2
    assert any("hundred" in i.text for i in answer_items)
    with pytest.raises(SynthError, match="lower voiced.min_answer_words"):
        plan_voiced(2, skip=0, seed=0, min_answer_words=60)
    with pytest.raises(SynthError, match="min_answer_words must be >= 0"):
        plan_voiced(2, skip=0, seed=0, min_answer_words=-1)


def test_voiced_corpus_renders_and_rejects_nothing_to_do(tmp_path):
    path = build_voiced_corpus(tmp_path / "voiced", count=2, skip=5, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and all(r["id"].startswith("voiced-train-") for r in rows)
    for row in rows:
        for turn in row["turns"]:
            assert (tmp_path / "voiced" / turn["audio"]).exists() and turn["duration"] > 0.3
    # The same plan again (a rerun stage) keeps what is rendered; another plan renders anew.
    wav = tmp_path / "voiced" / rows[0]["turns"][0]["audio"]
    before = wav.stat().st_mtime_ns, path.stat().st_mtime_ns
    assert build_voiced_corpus(tmp_path / "voiced", count=2, skip=5, seed=0) == path
    assert (wav.stat().st_mtime_ns, path.stat().st_mtime_ns) == before
    build_voiced_corpus(tmp_path / "voiced", count=1, skip=5, seed=0)
    assert len(path.read_text().splitlines()) == 1 and path.stat().st_mtime_ns != before[1]
    with pytest.raises(SynthError, match="at least one voiced dialogue"):
        build_voiced_corpus(tmp_path / "none", count=0, skip=5)
    assert not (tmp_path / "none").exists()


def test_repeat_drills_pair_any_words_but_never_a_heldout_pair():
    drills = list(repeat_drills(3000, seed=0))
    assert drills == list(repeat_drills(3000, seed=0)) and drills != list(repeat_drills(3000, seed=1))
    heldout = heldout_repeat_pairs(0)
    # the held-out pairs are the generator's held-out repeat phrases
    phrases = {e.answer for _, ex in generate_dialogues(200, "heldout", seed=0) for e in ex if e.task == "repeat"}
    assert phrases and phrases <= {f"the {a} {n}" for a, n in heldout}
    pairs = []
    for dialogue_id, exchanges in drills:
        (ex,) = exchanges
        assert dialogue_id.startswith("drill-0-") and ex.task == "repeat" and ex.split == "train"
        the, first, second = ex.answer.split()
        assert the == "the" and first != second and {first, second} <= set(DRILL_WORDS)
        assert ex.assistant == ex.answer + "." and ex.user.endswith(ex.answer + ".")
        assert not any({first, second} == {a, n} for a, n in heldout), ex
        pairs.append((first, second))
    # After an adjective come words the generator never pairs it with: only listening tells which.
    trained = {(a, n) for _, ex in generate_dialogues(3000, "train", seed=0) for e in ex if e.task == "repeat"
               for _, a, n in [e.answer.split()]}
    unseen_after_adjective = [p for p in pairs if p[0] in ADJECTIVES and p not in trained]
    assert len(unseen_after_adjective) > len(drills) // 4
    with pytest.raises(ValueError, match="count must be >= 0"):
        list(repeat_drills(-1, seed=0))


def test_number_drills_repeat_random_numbers_but_never_a_heldout_questions_pair():
    drills = list(number_drills(3000, seed=0))
    assert drills == list(number_drills(3000, seed=0)) and drills != list(number_drills(3000, seed=1))
    words = {number_words(n): n for n in range(21)}
    # every held-out arithmetic question and count names an ordered pair of heldout_number_pairs
    excluded = heldout_number_pairs(0)
    held = [e for _, ex in generate_dialogues(300, "heldout", seed=0) for e in ex
            if e.split == "heldout" and e.task in ("arithmetic", "count")]
    assert held
    for e in held:
        named = [words[w] for w in e.user.rstrip("?.").replace(",", "").split() if w in words]
        assert tuple(named[:2]) in excluded, e
    neighbours = set()
    for dialogue_id, exchanges in drills:
        (ex,) = exchanges
        assert dialogue_id.startswith("ndrill-0-") and ex.task == "repeat" and ex.split == "train"
        numbers = [words[w] for w in ex.answer.split(", ")]
        assert 2 <= len(numbers) <= 3 and ex.assistant == ex.answer + "." and ex.user.endswith(ex.answer + ".")
        assert not any(w in ex.user for w in OPERATIONS) and "count" not in ex.user
        for pair in zip(numbers, numbers[1:]):
            assert pair[0] != pair[1] and pair not in excluded, ex
            neighbours.add(pair)
    # numbers in nearly every allowed order, not the questions' few
    assert len(neighbours) > 0.9 * (21 * 20 - len(excluded - {(n, n) for n in range(21)}))
    with pytest.raises(ValueError, match="count must be >= 0"):
        list(number_drills(-1, seed=0))


def test_follow_up_drills_chain_right_answers_on_the_last_result_and_hold_no_heldout_exchange(tmp_path):
    drills = list(follow_up_drills(2000, seed=0))
    assert drills == list(follow_up_drills(2000, seed=0)) and drills != list(follow_up_drills(2000, seed=1))
    words = {number_words(n): n for n in range(1000)}
    heldout = {(e.user, e.assistant) for _, ex in generate_dialogues(1000, "heldout", seed=0) for e in ex
               if e.split == "heldout"}
    follow_ups = three_digit = 0
    for dialogue_id, exchanges in drills:
        assert dialogue_id.startswith("fdrill-0-") and exchanges[0].task == "arithmetic"
        assert 1 <= len(exchanges) - 1 <= 6 and all(e.task == "follow_up" for e in exchanges[1:])
        result = None
        for ex in exchanges:
            assert ex.split == "train" and (ex.user, ex.assistant) not in heldout, ex
            left, said = ex.assistant.rstrip(".").split(" is ")
            (op,) = [op for op in OPERATIONS if f" {op} " in left]
            a, b = left.split(f" {op} ")
            assert OPERATIONS[op](words[a], words[b]) == words[said] and ex.answer == said
            if result is not None:  # a follow-up works on the last result, which the question does not say
                assert words[a] == result and ex.user.endswith(f" {op} {b}?")
                follow_ups += 1
                three_digit += result >= 100
            result = words[said]
    assert follow_ups > 3 * len(drills) and three_digit > follow_ups // 5  # the generator: 13 %
    with pytest.raises(ValueError, match="count must be >= 0"):
        list(follow_up_drills(-1, seed=0))
    path = write_text_dialogues(tmp_path / "text.jsonl", 10, seed=0, follow_up_drills=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows[10:]] == [f"text-{i}" for i, _ in follow_up_drills(5, seed=0)]
    assert rows[:10] == [json.loads(line) for line in write_text_dialogues(tmp_path / "plain.jsonl", 10).read_text().splitlines()]


def test_drill_corpus_plans_training_dialogues_and_renders(tmp_path):
    dialogues, user_items, answer_items = plan_drills(50, seed=0)
    assert [d["id"] for d in dialogues] == [i for i, _ in repeat_drills(50, seed=0)]
    assert all(d["split"] == "train" and len(d["turns"]) == 2 for d in dialogues)
    assert len(user_items) == 50 and len(answer_items) == len({d["turns"][1]["text"] for d in dialogues})
    path = build_drill_corpus(tmp_path / "drills", count=2, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and all((tmp_path / "drills" / t["audio"]).exists() for r in rows for t in r["turns"])
    with pytest.raises(SynthError, match="at least one repeat drill"):
        build_drill_corpus(tmp_path / "none", count=0)
    numbers, _, _ = plan_drills(50, seed=0, kind="numbers")
    assert [d["id"] for d in numbers] == [i for i, _ in number_drills(50, seed=0)]
    assert {d["speaker"] for d in numbers} != {d["speaker"] for d in dialogues}  # voices drawn apart
    with pytest.raises(SynthError, match="drill kind must be one of words, numbers, got 'letters'"):
        plan_drills(5, seed=0, kind="letters")


def test_follow_up_drills_without_text_dialogues_is_refused_before_rendering(tmp_path, capsys):
    from voicelm.cli import main

    assert main(["data", "dialogues", "--out", str(tmp_path / "c"), "--follow-up-drills", "5"]) == 2
    assert "and --text N too" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main(["data", "dialogues", "--out", str(tmp_path / "c"), "--text", "5", "--follow-up-drills", "-1"]) == 2
    assert "give a count >= 0" in capsys.readouterr().err and not (tmp_path / "c").exists()
