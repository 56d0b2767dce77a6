"""ChatGLM (glm-4-voice-9b format) -> GlmForCausalLM conversion, checked against a reference
forward written here from the ChatGLM equations, at reduced width (real 168,960-row vocabulary)."""

import base64
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from voicelm.cli import main as cli_main
from voicelm.core.checkpoint import CheckpointError
from voicelm.lm import VoiceLM
from voicelm.lm.convert import convert_glm4voice_lm
from voicelm.lm.text_tokenizer import _bytes_to_unicode

HIDDEN, LAYERS, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB = 64, 2, 4, 2, 16, 96, 168960
EPS = 1e-5
ROPE_RATIO = 2.0   # base 10000 * rope_ratio: checks that the converter carries the ratio over


def _chatglm_config():
    return {"architectures": ["ChatGLMModel"], "num_layers": LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN,
            "kv_channels": HEAD_DIM, "num_attention_heads": HEADS, "multi_query_attention": True,
            "multi_query_group_num": GROUPS, "padded_vocab_size": VOCAB, "layernorm_epsilon": EPS,
            "rope_ratio": ROPE_RATIO, "seq_length": 256, "add_qkv_bias": True, "rmsnorm": True,
            "apply_residual_connection_post_layernorm": False}


def _chatglm_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    w = {"transformer.embedding.word_embeddings.weight": r(VOCAB, HIDDEN, s=1.0),
         "transformer.encoder.final_layernorm.weight": 1 + r(HIDDEN, s=0.1),
         "transformer.output_layer.weight": r(VOCAB, HIDDEN),
         "transformer.rotary_pos_emb.inv_freq": torch.zeros(HEAD_DIM // 4)}
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
    for n in range(LAYERS):
        p = f"transformer.encoder.layers.{n}."
        w[p + "input_layernorm.weight"] = 1 + r(HIDDEN, s=0.1)
        w[p + "self_attention.query_key_value.weight"] = r(qkv_rows, HIDDEN)
        w[p + "self_attention.query_key_value.bias"] = r(qkv_rows)
        w[p + "self_attention.dense.weight"] = r(HIDDEN, HEADS * HEAD_DIM)
        w[p + "post_attention_layernorm.weight"] = 1 + r(HIDDEN, s=0.1)
        w[p + "mlp.dense_h_to_4h.weight"] = r(2 * FFN, HIDDEN)
        w[p + "mlp.dense_4h_to_h.weight"] = r(HIDDEN, FFN)
    return w


def _rmsnorm(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _rope_first_half_interleaved(x, positions):
    """x (T, heads, head_dim): rotate dims [0, head_dim/2) as pairs (2i, 2i+1), angle = pos * theta_i."""
    rot = HEAD_DIM // 2
    theta = 1.0 / (10000.0 * ROPE_RATIO) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)  # (rot/2,)
    angle = positions[:, None].double() * theta[None, :]                                         # (T, rot/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]                                  # (T, 1, rot/2)
    pairs = x[..., :rot].reshape(*x.shape[:-1], rot // 2, 2)                                     # (T, h, rot/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


def _reference_chatglm_logits(w, ids):
    """ChatGLM forward from its equations, float64: pre-RMSNorm blocks, fused qkv + bias, partial
    interleaved RoPE, grouped-query attention, SwiGLU (first half gated), untied output layer."""
    w = {k: v.double() for k, v in w.items()}
    T = len(ids)
    positions = torch.arange(T)
    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]                     # (T, H)
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for n in range(LAYERS):
        p = f"transformer.encoder.layers.{n}."
        h = _rmsnorm(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([HEADS * HEAD_DIM, GROUPS * HEAD_DIM, GROUPS * HEAD_DIM], dim=-1)
        q = _rope_first_half_interleaved(q.view(T, HEADS, HEAD_DIM), positions)
        k = _rope_first_half_interleaved(k.view(T, GROUPS, HEAD_DIM), positions)
        v = v.view(T, GROUPS, HEAD_DIM)
        group_of_head = torch.arange(HEADS) // (HEADS // GROUPS)                                 # head -> kv group
        k, v = k[:, group_of_head], v[:, group_of_head]                                          # (T, heads, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM) + causal
        ctx = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, HEADS * HEAD_DIM)
        x = x + ctx @ w[p + "self_attention.dense.weight"].T
        h = _rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    return _rmsnorm(x, w["transformer.encoder.final_layernorm.weight"]) @ w["transformer.output_layer.weight"].T


def _write_chatglm_dir(path, weights, tokenizer):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(_chatglm_config()))
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: weights[k].contiguous() for k in keys}, str(path / shard))
        weight_map.update({k: shard for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = json.loads(tokenizer.to_str())["model"]
    to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
    (path / "tokenizer.model").write_text("".join(
        f"{base64.b64encode(bytes(to_byte[c] for c in tok)).decode()} {rank}\n"
        for tok, rank in sorted(model["vocab"].items(), key=lambda kv: kv[1])))


def test_converted_logits_equal_the_chatglm_reference(tmp_path, tokenizer):
    weights = _chatglm_weights()
    _write_chatglm_dir(tmp_path / "src", weights, tokenizer)
    assert cli_main(["convert", "glm4voice-lm", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) == 2          # written shard by shard
    lm = VoiceLM.from_pretrained(out, dtype=torch.float64)
    assert lm.vocab.speech_offset == 152353 and lm.vocab.user_id == 151336
    assert lm.text_tokenizer.encode("seven plus five") == tokenizer.encode("seven plus five")
    ids = [151331, 151333, 151335, 5, 17, 151336, 151343, 152353, 160000, 168736, 151344, 151337, 3, 9, 2]
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids])).logits[0]
    reference = _reference_chatglm_logits(weights, ids)
    # float64 on both sides; what is left (~3e-6) is transformers computing the RoPE angles in float32.
    # Any layout error (qkv split, rope pairing, gate/up order) is O(1).
    assert (ours - reference).abs().max() < 1e-5
    # and in float32, as it would run: within 1e-4
    lm32 = VoiceLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ours32 = lm32.model(torch.tensor([ids])).logits[0].double()
    assert (ours32 - reference).abs().max() < 1e-4


def test_conversion_errors_are_clear_and_leave_nothing(tmp_path, tokenizer):
    weights = _chatglm_weights()
    del weights["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    _write_chatglm_dir(tmp_path / "src", weights, tokenizer)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        convert_glm4voice_lm(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name != "src"] == []   # no temp dir left behind

    config = _chatglm_config() | {"padded_vocab_size": 151552}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a glm-4-voice-9b vocabulary"):
        convert_glm4voice_lm(tmp_path / "src", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a directory"):
        convert_glm4voice_lm(tmp_path / "missing", tmp_path / "out")
    assert cli_main(["convert", "glm4voice-lm", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
