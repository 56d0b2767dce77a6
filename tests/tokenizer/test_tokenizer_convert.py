"""The official checkpoint converter, on a synthetic glm-4-voice-tokenizer at reduced width.

The reference below follows the official equations (speech_tokenizer/modeling_whisper.py and
utils.py of THUDM/GLM-4-Voice), written independently: HF's WhisperFeatureExtractor for the
mel (per-clip max - 8 floor, padding to a multiple of 1280 samples), causal convs, additive
block-causal mask, attention with q scaled by head_dim^-0.5, AvgPool1d(4), L2 nearest code.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from voicelm.core.checkpoint import CheckpointError

from tokenizer import SpeechTokenizer
from tokenizer.convert import convert_glm4voice_tokenizer
from tok_helpers import speechlike

D, HEADS, FFN, LAYERS, KEPT, CODES, BLOCK, MELS = 64, 4, 128, 3, 2, 32, 20, 128


def official_config() -> dict:
    return {
        "architectures": ["WhisperVQForConditionalGeneration"], "model_type": "whisper",
        "d_model": D, "encoder_layers": LAYERS, "encoder_attention_heads": HEADS, "encoder_ffn_dim": FFN,
        "decoder_layers": 1, "decoder_attention_heads": HEADS, "decoder_ffn_dim": FFN,
        "num_mel_bins": MELS, "max_source_positions": 1500, "max_target_positions": 448,
        "activation_function": "gelu", "pooling_kernel_size": 4, "pooling_type": "avg",
        "pooling_position": KEPT, "quantize_position": KEPT, "quantize_vocab_size": CODES,
        "quantize_causal_block_size": BLOCK, "quantize_commit_coefficient": 0.25,
        "quantize_ema_decay": 0.99, "quantize_encoder_only": False, "quantize_causal_encoder": False,
        "encoder_causal_attention": False, "encoder_causal_convolution": True,
    }


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    p = "model.encoder."
    state = {
        p + "conv1.weight": r(D, MELS, 3, s=0.1), p + "conv1.bias": r(D),
        p + "conv2.weight": r(D, D, 3, s=0.1), p + "conv2.bias": r(D),
        p + "embed_positions.weight": r(1500, D, s=0.1), p + "embed_positions2.weight": r(375, D, s=0.1),
        p + "codebook.weight": r(CODES, D, s=1.0), p + "ema_weight": r(CODES, D), p + "ema_count": torch.rand(CODES, generator=g),
        p + "layer_norm.weight": torch.ones(D), p + "layer_norm.bias": torch.zeros(D),
        "model.decoder.embed_tokens.weight": r(100, D), "proj_out.weight": r(100, D),
    }
    for i in range(LAYERS):
        q = f"{p}layers.{i}."
        for name in ("q_proj", "v_proj", "out_proj"):
            state[q + f"self_attn.{name}.weight"] = r(D, D, s=0.15)
            state[q + f"self_attn.{name}.bias"] = r(D)
        state[q + "self_attn.k_proj.weight"] = r(D, D, s=0.15)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            state[q + f"{ln}.weight"] = 1 + r(D)
            state[q + f"{ln}.bias"] = r(D)
        state[q + "fc1.weight"], state[q + "fc1.bias"] = r(FFN, D, s=0.1), r(FFN)
        state[q + "fc2.weight"], state[q + "fc2.bias"] = r(D, FFN, s=0.1), r(D)
    # Codes drawn from real features (as a k-means init would), so that ids spread.
    features = reference_features(state, speechlike(3.0, seed=99))
    state[p + "codebook.weight"] = features[torch.randperm(features.shape[0], generator=g)[:CODES]].clone()
    return state


def reference_features(state: dict, audio: torch.Tensor) -> torch.Tensor:
    """Pooled pre-quantization features (T, D) of one clip by the official equations."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=MELS)
    feats = fe([audio.numpy()], sampling_rate=16000, return_attention_mask=True, return_tensors="pt",
               padding="longest", pad_to_multiple_of=1280)
    x = feats.input_features.float()  # (1, MELS, F)
    p = "model.encoder."
    x = F.gelu(F.conv1d(F.pad(x, (2, 0)), state[p + "conv1.weight"], state[p + "conv1.bias"]))
    x = F.gelu(F.conv1d(F.pad(x, (2, 0)), state[p + "conv2.weight"], state[p + "conv2.bias"], stride=2))
    x = x.permute(0, 2, 1)
    t = x.shape[1]
    x = x + state[p + "embed_positions.weight"][:t]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    blocks = torch.block_diag(*[torch.ones(min(BLOCK, t - s), min(BLOCK, t - s)) for s in range(0, t, BLOCK)]).bool()
    additive = (1.0 - (causal | blocks).float()) * torch.finfo(torch.float32).min
    for i in range(KEPT):
        q = f"{p}layers.{i}."
        lin = lambda h, n, bias=True: F.linear(h, state[q + n + ".weight"], state.get(q + n + ".bias") if bias else None)  # noqa: E731
        h = F.layer_norm(x, (D,), state[q + "self_attn_layer_norm.weight"], state[q + "self_attn_layer_norm.bias"])
        split = lambda y: y.view(1, t, HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
        qs = split(lin(h, "self_attn.q_proj") * (D // HEADS) ** -0.5)
        ks, vs = split(lin(h, "self_attn.k_proj", bias=False)), split(lin(h, "self_attn.v_proj"))
        w = torch.softmax(qs @ ks.transpose(2, 3) + additive, dim=-1)
        x = x + lin((w @ vs).transpose(1, 2).reshape(1, t, D), "self_attn.out_proj")
        h = F.layer_norm(x, (D,), state[q + "final_layer_norm.weight"], state[q + "final_layer_norm.bias"])
        x = x + lin(F.gelu(lin(h, "fc1")), "fc2")
    return F.avg_pool1d(x.permute(0, 2, 1), 4).permute(0, 2, 1)[0]


def reference_tokens(state: dict, audio: torch.Tensor) -> torch.Tensor:
    x = reference_features(state, audio)
    codebook = state["model.encoder.codebook.weight"]
    distances = (codebook ** 2).sum(1)[None] + (x ** 2).sum(1, keepdim=True) - 2 * x @ codebook.T
    return distances.argmin(1)


@pytest.fixture
def official_dir(tmp_path):
    src = tmp_path / "glm-4-voice-tokenizer"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(official_config()))
    save_file(official_state(), str(src / "model.safetensors"))
    return src


def test_converted_tokens_equal_the_official_equations(official_dir, tmp_path):
    convert_glm4voice_tokenizer(official_dir, tmp_path / "ours")
    model = SpeechTokenizer.from_pretrained(tmp_path / "ours")
    assert model.config.mel_floor == "segment_max" and model.config.pooling_position == KEPT
    assert len(model.encoder.blocks) == KEPT and model.codebook_size == CODES
    state = official_state()
    for seconds in (1.0, 5.3):
        audio = speechlike(seconds, seed=int(seconds))
        ours = model.encode(audio, 16000)
        reference = reference_tokens(state, audio)
        assert ours.numel() == math.ceil(seconds * 12.5) == reference.numel()
        assert len(set(reference.tolist())) > 3
        assert (ours == reference).float().mean() >= 0.98, (ours, reference)


def test_converted_weights_land_in_place(official_dir, tmp_path):
    from voicelm.cli import main as cli

    assert cli(["convert", "glm4voice-tokenizer", str(official_dir), str(tmp_path / "ours")]) == 0
    model = SpeechTokenizer.from_pretrained(tmp_path / "ours")
    state = official_state()
    p = "model.encoder."
    torch.testing.assert_close(model.encoder.blocks[1].attn.key.weight, state[p + "layers.1.self_attn.k_proj.weight"])
    torch.testing.assert_close(model.encoder.blocks[0].mlp[2].bias, state[p + "layers.0.fc2.bias"])
    torch.testing.assert_close(model.quantizer.codebook, state[p + "codebook.weight"])
    torch.testing.assert_close(model.quantizer.vq._codebook.cluster_size[0], state[p + "ema_count"])
    torch.testing.assert_close(model.encoder.positional_embedding2, state[p + "embed_positions2.weight"])


def test_converted_official_model_streams_with_the_fixed_floor(official_dir, tmp_path):
    convert_glm4voice_tokenizer(official_dir, tmp_path / "ours")
    model = SpeechTokenizer.from_pretrained(tmp_path / "ours", mel_floor="fixed")
    audio = speechlike(2.5)
    stream = model.stream()
    streamed = torch.cat([stream.push(audio[i:i + 3000]) for i in range(0, audio.numel(), 3000)] + [stream.flush()])
    assert torch.equal(streamed, model.encode(audio, 16000))


def test_unsupported_or_wrong_sources_are_refused(tmp_path, official_dir):
    with pytest.raises(CheckpointError, match="config.json"):
        convert_glm4voice_tokenizer(tmp_path / "nowhere", tmp_path / "out")
    config = official_config()
    config["pooling_type"] = "max"
    (official_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="pooling_type"):
        convert_glm4voice_tokenizer(official_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    config["pooling_type"] = "avg"
    config["d_model"] = 2 * D  # config and weights disagree
    config["encoder_ffn_dim"] = FFN
    (official_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        convert_glm4voice_tokenizer(official_dir, tmp_path / "out")
