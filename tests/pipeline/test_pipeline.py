"""Loading a pipeline directory and the contracts between its parts."""

from __future__ import annotations

import json
import shutil

import pytest

from voicelm.pipeline import PipelineError, load_pipeline, open_pipeline


def test_loaded_pipeline_agrees_and_says_what_it_is(tiny):
    assert tiny.tokenizer.codebook_size == tiny.vocab.speech_vocab_size == tiny.decoder.vocab_size
    assert tiny.sample_rate == 22050
    assert "RANDOM WEIGHTS" in tiny.describe() and tiny.info()["token_rate"] == 12.5


def test_speech_vocab_mismatch_names_both_numbers_and_files(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    config_path = broken / "tokenizer" / "config.json"
    meta = json.loads(config_path.read_text())
    meta["config"]["codebook_size"] = 128
    config_path.write_text(json.dumps(meta))
    with pytest.raises(PipelineError) as info:
        load_pipeline(broken)
    message = str(info.value)
    assert "128" in message and "64" in message
    assert "tokenizer/config.json" in message and "voicelm/config.json" in message


def test_decoder_vocab_mismatch(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    config_path = broken / "decoder" / "config.json"
    meta = json.loads(config_path.read_text())
    meta["config"]["flow"]["vocab_size"] = 1024
    config_path.write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match=r"decoder/config.json: flow.vocab_size = 1024"):
        load_pipeline(broken)


def test_missing_parts_and_directories_are_clear(tiny_dir, tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir, partial)
    shutil.rmtree(partial / "decoder")
    with pytest.raises(PipelineError, match=r"missing part\(s\) \['decoder'\]"):
        load_pipeline(partial)


def test_open_pipeline_without_default_offers_the_alternatives(monkeypatch, tmp_path):
    import voicelm

    monkeypatch.setattr(voicelm, "DEFAULT_PIPELINE", tmp_path / "models" / "demo")
    with pytest.raises(PipelineError, match="--pipeline DIR.*--random-tiny"):
        open_pipeline(None)
