"""SpeechDecoder: offline decode, save/reload identical, clear errors for bad checkpoints, CLI."""

import json

import pytest
import soundfile as sf
import torch

from decoder import SpeechDecoder
from decoder.flow import FlowConfig, FlowInputError, frames_for_tokens
from decoder.griffinlim import GriffinLimVocoder
from decoder.hift import HiFTConfig, HiFTGenerator
from voicelm.cli import main as cli_main
from voicelm.core.checkpoint import CheckpointError, config_from_dict
from voicelm.core.presets import load_preset


def test_decode_gives_22khz_waveform_of_the_token_duration(decoder):
    wav = decoder.decode([1, 2, 3] * 5)
    assert decoder.sample_rate == 22050 and decoder.vocab_size == 64
    assert wav.dtype == torch.float32 and wav.shape == (frames_for_tokens(15) * 256,)
    assert torch.isfinite(wav).all()
    assert torch.equal(wav, decoder.decode(torch.tensor([1, 2, 3] * 5)))  # deterministic


def test_save_reload_identical(decoder, tmp_path):
    decoder.save_pretrained(tmp_path / "dec")
    loaded = SpeechDecoder.from_pretrained(tmp_path / "dec")
    for (name, a), (_, b) in zip(decoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 64, (25,))
    assert torch.equal(decoder.decode(tokens), loaded.decode(tokens))
    meta = json.loads((tmp_path / "dec" / "config.json").read_text())
    assert meta["kind"] == "decoder" and meta["config"]["vocoder_type"] == "hift"
    assert SpeechDecoder.read_vocab_size(tmp_path / "dec") == 64
    # half precision for shipping: loads back into float32 and still decodes
    decoder.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert torch.isfinite(SpeechDecoder.from_pretrained(tmp_path / "half").decode(tokens)).all()


def test_mixed_precision_keeps_the_vocoder_in_float32(decoder, tmp_path):
    from safetensors import safe_open

    decoder.save_pretrained(tmp_path / "mixed", dtype=torch.float16, vocoder_dtype=torch.float32)
    with safe_open(str(tmp_path / "mixed" / "model.safetensors"), "pt") as f:
        floats = {k: str(f.get_slice(k).get_dtype()) for k in f.keys() if f.get_slice(k).get_dtype() in ("F16", "F32")}
    assert {d for k, d in floats.items() if k.startswith("flow.")} == {"F16"}
    assert {d for k, d in floats.items() if k.startswith("vocoder.")} == {"F32"}
    loaded = SpeechDecoder.from_pretrained(tmp_path / "mixed")
    for name, value in decoder.vocoder.state_dict().items():  # the vocoder exactly, not rounded
        assert torch.equal(loaded.vocoder.state_dict()[name], value), name
    for name, value in decoder.flow.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded.flow.state_dict()[name], expected), name


def test_griffinlim_decoder_is_labelled_and_round_trips(tmp_path):
    flow_config = config_from_dict(FlowConfig, load_preset("decoder", "tiny"))
    decoder = SpeechDecoder(flow_config, GriffinLimVocoder(n_iter=3))
    decoder.save_pretrained(tmp_path / "gl")
    meta = json.loads((tmp_path / "gl" / "config.json").read_text())
    assert meta["config"]["vocoder_type"] == "griffinlim"
    assert SpeechDecoder.from_pretrained(tmp_path / "gl").is_fallback_vocoder


def test_mismatched_checkpoints_get_clear_errors(decoder, tmp_path):
    decoder.save_pretrained(tmp_path / "dec")
    meta = json.loads((tmp_path / "dec" / "config.json").read_text())
    meta["config"]["flow"]["encoder_dim"] = 48  # config and weights from different models
    (tmp_path / "dec" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        SpeechDecoder.from_pretrained(tmp_path / "dec")
    meta["config"]["flow"]["encoder_dim"] = 32
    meta["config"]["vocoder_type"] = "wavenet"
    (tmp_path / "dec" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown vocoder type"):
        SpeechDecoder.from_pretrained(tmp_path / "dec")
    with pytest.raises(CheckpointError, match="expected a 'decoder'"):
        HiFTGenerator(HiFTConfig(base_channels=32, f0_channels=16)).save_pretrained(tmp_path / "voc")
        SpeechDecoder.from_pretrained(tmp_path / "voc")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        SpeechDecoder.from_pretrained(tmp_path / "missing")


def test_bad_tokens_get_clear_errors(decoder):
    with pytest.raises(FlowInputError, match="vocabulary"):
        decoder.decode([1, 2, 99])
    with pytest.raises(FlowInputError, match="empty"):
        decoder.decode([])
    with pytest.raises(FlowInputError, match="1-D"):
        decoder.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(FlowInputError, match="integer"):
        decoder.decode([0.5, 1.5])


def test_synthesize_cli(decoder, tmp_path, capsys):
    decoder.save_pretrained(tmp_path / "pipeline" / "decoder")
    (tmp_path / "ids.json").write_text(json.dumps({"tokens": list(range(30))}))
    for extra in ([], ["--stream"]):
        out = tmp_path / f"x{len(extra)}.wav"
        code = cli_main(["synthesize", str(tmp_path / "ids.json"), "--out", str(out),
                         "--checkpoint", str(tmp_path / "pipeline"), *extra])
        assert code == 0
        info = sf.info(str(out))
        assert info.samplerate == 22050 and info.frames == frames_for_tokens(30) * 256
    assert cli_main(["synthesize", "[1, 2, 640]", "--out", str(tmp_path / "bad.wav"),
                     "--checkpoint", str(tmp_path / "pipeline" / "decoder")]) == 1
    assert "vocabulary" in capsys.readouterr().out
    assert not (tmp_path / "bad.wav").exists()
