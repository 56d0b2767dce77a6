"""Shapes and rates, streaming == offline, block causality, save/load, bad input."""

import json
import random

import numpy as np
import pytest
import torch

from voicelm.core.audio import AudioError
from voicelm.core.checkpoint import CheckpointError

from tokenizer import SpeechTokenizer
from tokenizer.config import SEGMENT_SAMPLES, TokenizerConfig
from tokenizer.frontend import StreamingLogMel, log_mel_spectrogram
from tok_helpers import speechlike, tiny_config


def test_four_seconds_give_fifty_tokens_in_range(tiny_tokenizer):
    tokens = tiny_tokenizer.encode(speechlike(4.0), 16000)
    assert tokens.dtype == torch.long and tokens.shape == (50,)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tiny_tokenizer.codebook_size
    assert len(set(tokens.tolist())) > 3  # not a constant stream


def test_token_count_rounds_up_and_rates_are_handled(tiny_tokenizer):
    assert tiny_tokenizer.encode(speechlike(1.0), 16000).numel() == 13  # 12.5 -> 13
    audio_48k = speechlike(2.0, rate=48000)
    assert tiny_tokenizer.encode(audio_48k, 48000).numel() == 25
    stereo = torch.stack([speechlike(2.0), speechlike(2.0, seed=1)])  # (2, T)
    mono = stereo.mean(0)
    assert torch.equal(tiny_tokenizer.encode(stereo, 16000), tiny_tokenizer.encode(mono, 16000))


def test_batch_equals_single_clips(tiny_tokenizer):
    clips = [speechlike(s, seed=i) for i, s in enumerate([0.7, 2.3, 4.0])]
    tokens, lengths = tiny_tokenizer.encode_batch(clips, 16000)
    assert lengths.tolist() == [9, 29, 50]
    for i, clip in enumerate(clips):
        assert torch.equal(tokens[i, : lengths[i]], tiny_tokenizer.encode(clip, 16000))
        assert (tokens[i, lengths[i]:] == -1).all()
    padded = torch.zeros(3, clips[-1].numel())
    for i, c in enumerate(clips):
        padded[i, : c.numel()] = c
    tokens2, lengths2 = tiny_tokenizer.encode_batch(padded, 16000, lengths=[c.numel() for c in clips])
    assert torch.equal(tokens2, tokens) and torch.equal(lengths2, lengths)


def test_streaming_log_mel_equals_offline():
    audio = speechlike(1.3)
    offline = log_mel_spectrogram(audio, 80, "fixed", -7.0)
    stream, pieces, i = StreamingLogMel(80, -7.0), [], 0
    rng = random.Random(0)
    while i < audio.numel():
        n = rng.randint(1, 700)
        pieces.append(stream.push(audio[i:i + n]))
        i += n
    pieces.append(stream.finish())
    torch.testing.assert_close(torch.cat(pieces, -1), offline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_random_pieces_equals_offline(tiny_tokenizer, seed):
    rng = random.Random(seed)
    audio = speechlike(rng.uniform(2.0, 6.0), seed=seed)
    offline = tiny_tokenizer.encode(audio, 16000)
    stream = tiny_tokenizer.stream()
    pieces, i = [], 0
    while i < audio.numel():
        n = rng.choice([0, 1, 7, 160, 333, 1280, 4000, 17000])
        pieces.append(stream.push(audio[i:i + n]))
        i += n
    pieces.append(stream.flush())
    assert torch.equal(torch.cat(pieces), offline)


def test_streaming_emits_each_block_when_it_ends(tiny_tokenizer):
    block = tiny_tokenizer.config.block_samples  # 20 frames at 50 Hz = 6400 samples = 5 tokens
    stream = tiny_tokenizer.stream()
    audio = speechlike(3.0)
    assert stream.push(audio[: block - 121]).numel() == 0
    assert stream.push(audio[block - 121: block - 120]).numel() == 5  # needs only up to 120 before the end
    assert stream.push(audio[block - 120: 2 * block - 200]).numel() == 0
    assert stream.push(audio[2 * block - 200: 2 * block]).numel() == 5


def test_long_audio_is_chunked_at_30_s_and_streams_alike(tiny_tokenizer):
    audio = speechlike(31.0)
    tokens = tiny_tokenizer.encode(audio, 16000)
    assert tokens.numel() == 388  # 375 + ceil(1 s * 12.5), nothing dropped
    first = tiny_tokenizer.encode(audio[:SEGMENT_SAMPLES], 16000)
    assert torch.equal(tokens[:375], first)  # segments are encoded independently
    stream = tiny_tokenizer.stream()
    out = [stream.push(audio[i:i + 48000]) for i in range(0, audio.numel(), 48000)]
    assert torch.equal(torch.cat(out + [stream.flush()]), tokens)


def test_block_causality_of_features():
    torch.manual_seed(0)
    model = SpeechTokenizer(tiny_config(asr_head=False)).eval()
    block_samples = model.config.block_samples
    audio = speechlike(3 * block_samples / 16000)[None].clone().requires_grad_(True)
    features = model(audio).features  # (1, T, D) before quantization
    tokens_per_block = model.config.token_block_size
    for t in [0, tokens_per_block - 1, tokens_per_block, 2 * tokens_per_block + 1]:
        (grad,) = torch.autograd.grad(features[0, t].sum(), audio, retain_graph=True)
        block_end = (t // tokens_per_block + 1) * block_samples
        assert (grad[0, block_end:] == 0).all(), f"token {t} depends on audio after its block"
        block_start = (t // tokens_per_block) * block_samples
        assert grad[0, block_start:block_end - 120].abs().sum() > 0


def test_save_and_reload_give_identical_tokens(tiny_tokenizer, tmp_path):
    audio = speechlike(3.0)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = SpeechTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(reloaded.encode(audio, 16000), tiny_tokenizer.encode(audio, 16000))
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["config"]["codebook_size"] == 64


def test_export_drops_the_asr_head_unless_asked(tmp_path):
    model = SpeechTokenizer(tiny_config(asr_head=True))
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", include_asr_head=True)
    assert SpeechTokenizer.from_pretrained(tmp_path / "a").asr_head is None
    assert SpeechTokenizer.from_pretrained(tmp_path / "b").asr_head is not None


def test_half_precision_checkpoint_loads(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "half", dtype=torch.float16)
    reloaded = SpeechTokenizer.from_pretrained(tmp_path / "half")
    tokens = reloaded.encode(speechlike(2.0), 16000)
    assert tokens.numel() == 25 and int(tokens.max()) < 64


def test_checkpoint_whose_config_and_weights_disagree_is_refused(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    path = tmp_path / "tok" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["codebook_size"] = 128
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")
    meta["config"]["codebook_size"] = 64
    meta["config"]["bogus"] = 1
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bogus"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")


def test_bad_audio_gets_clear_errors(tiny_tokenizer):
    with pytest.raises(AudioError, match="empty"):
        tiny_tokenizer.encode(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="NaN"):
        tiny_tokenizer.encode(torch.full((16000,), float("nan")), 16000)
    with pytest.raises(AudioError, match="silent"):
        tiny_tokenizer.encode(torch.zeros(16000), 16000)
    assert tiny_tokenizer.encode(torch.zeros(16000), 16000, allow_silent=True).numel() == 13
    with pytest.raises(AudioError, match="sample_rate"):
        tiny_tokenizer.encode(speechlike(1.0), 0)
    with pytest.raises(AudioError, match="over the limit"):
        tiny_tokenizer.encode(speechlike(2.0), 16000, max_seconds=1.0)
    stream = tiny_tokenizer.stream()
    with pytest.raises(AudioError, match="1-D"):
        stream.push(torch.zeros(2, 100))
    with pytest.raises(AudioError, match="NaN"):
        stream.push(torch.tensor([float("inf")]))
    with pytest.raises(AudioError, match="no audio"):
        tiny_tokenizer.stream().flush()


def test_official_mel_floor_refuses_to_stream():
    model = SpeechTokenizer(tiny_config(asr_head=False, mel_floor="segment_max"))
    with pytest.raises(ValueError, match="cannot stream"):
        model.stream()


def test_config_validation():
    with pytest.raises(ValueError, match="block_size"):
        TokenizerConfig(block_size=10)
    with pytest.raises(ValueError, match="n_mels"):
        TokenizerConfig(n_mels=64)


def test_glm4voice_geometry_has_the_official_parameter_count():
    from voicelm.core.presets import load_preset

    with torch.device("meta"):
        model = SpeechTokenizer(TokenizerConfig(**load_preset("tokenizer", "glm4voice")))
    params = sum(p.numel() for p in model.parameters())
    codebook = model.quantizer.codebook.numel()  # a buffer here (EMA), a frozen parameter officially
    total = params + codebook
    assert model.asr_head is None
    assert round(total / 1e6, 1) == 343.6, total
