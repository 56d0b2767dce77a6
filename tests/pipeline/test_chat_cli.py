"""`voicelm chat` end to end through the command table (in process: no second model load)."""

from __future__ import annotations

import json

import soundfile as sf

from voicelm.cli import main as cli


def test_chat_text_json_and_wav(tiny_dir, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    status = cli(["chat", "--text", "hello there", "--out", str(out), "--json", "--pipeline", str(tiny_dir),
                  "--max-new-tokens", "30", "--seed", "1"])
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["type"] == "turn_end" and "first_audio" in lines[-1]["timings"]
    assert {"speech_tokens", "audio"} <= {line["type"] for line in lines}
    wav, rate = sf.read(out)
    assert rate == 22050 and len(wav) == sum(l["num_samples"] for l in lines if l["type"] == "audio")


def test_chat_audio_prints_text(tiny_dir, tmp_path, speech_16k, capsys):
    question = tmp_path / "q.wav"
    sf.write(question, speech_16k, 16000)
    status = cli(["chat", "--audio", str(question), "--pipeline", str(tiny_dir), "--max-new-tokens", "20"])
    assert status == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS" in err and "max_tokens" in err


def test_chat_errors_are_clear(tmp_path, tiny_dir, capsys):
    assert cli(["chat", "--text", "hi", "--pipeline", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    not_audio = tmp_path / "x.wav"
    not_audio.write_text("hello")
    assert cli(["chat", "--audio", str(not_audio), "--pipeline", str(tiny_dir)]) == 2
    assert "not a readable audio file" in capsys.readouterr().err
