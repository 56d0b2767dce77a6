"""The "voicelm" part directory: save/reload, presets, clear errors."""

import json

import pytest
import torch

from voicelm.core.checkpoint import CheckpointError
from voicelm.lm import VoiceLM, VoiceLMConfig, build_glm, count_parameters


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits


def test_save_and_reload_is_identical(tiny_lm, tmp_path):
    ids = [1, 2, tiny_lm.vocab.user_id, tiny_lm.vocab.speech_id(5), 7]
    tiny_lm.save_pretrained(tmp_path / "lm")
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["config.json", "model.safetensors", "text_tokenizer.json"]
    back = VoiceLM.from_pretrained(tmp_path / "lm")
    assert back.config == tiny_lm.config and back.vocab == tiny_lm.vocab
    assert back.text_tokenizer.encode("seven plus five") == tiny_lm.text_tokenizer.encode("seven plus five")
    assert torch.equal(_logits(back, ids), _logits(tiny_lm, ids))
    # half precision for shipping: loads back (as fp16, or cast to fp32) and stays close
    tiny_lm.save_pretrained(tmp_path / "half", dtype=torch.float16)
    half = VoiceLM.from_pretrained(tmp_path / "half", dtype=torch.float32)
    assert torch.allclose(_logits(half, ids), _logits(tiny_lm, ids), atol=2e-2)
    assert VoiceLM.from_pretrained(tmp_path / "half").model.dtype == torch.float16


def test_mismatched_or_incomplete_checkpoints_are_refused(tiny_lm, tmp_path):
    tiny_lm.save_pretrained(tmp_path / "lm")
    meta = json.loads((tmp_path / "lm" / "config.json").read_text())
    meta["config"]["hidden_size"] = 96
    (tmp_path / "lm" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match"):
        VoiceLM.from_pretrained(tmp_path / "lm")

    tiny_lm.save_pretrained(tmp_path / "lm2")
    (tmp_path / "lm2" / "text_tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="text tokenizer"):
        VoiceLM.from_pretrained(tmp_path / "lm2")

    tiny_lm.save_pretrained(tmp_path / "lm3")
    meta = json.loads((tmp_path / "lm3" / "config.json").read_text())
    meta["config"]["text_vocab_size"] = 100   # smaller than the tokenizer it ships with
    (tmp_path / "lm3" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="text tokenizer has"):
        VoiceLM.from_pretrained(tmp_path / "lm3")

    meta["kind"] = "decoder"
    (tmp_path / "lm3" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected a 'voicelm'"):
        VoiceLM.from_pretrained(tmp_path / "lm3")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        VoiceLM.from_pretrained(tmp_path / "nowhere")


def test_quantized_loading_needs_a_gpu(tiny_lm, tmp_path):
    tiny_lm.save_pretrained(tmp_path / "lm")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        VoiceLM.from_pretrained(tmp_path / "lm", load_in="nf4")
    with pytest.raises(ValueError, match="choose one of"):
        VoiceLM.from_pretrained(tmp_path / "lm", load_in="int3")


def test_glm4voice_preset_has_the_official_geometry_and_count():
    config = VoiceLMConfig.from_preset("glm4voice")
    model = build_glm(config, device="meta")
    assert count_parameters(model) == 9_542_557_696   # = 4 shards of ~19.1 GB in bf16
    glm = model.config
    assert (glm.num_hidden_layers, glm.hidden_size, glm.num_attention_heads, glm.num_key_value_heads) == (40, 4096, 32, 2)
    assert glm.intermediate_size == 13696 and glm.vocab_size == 168960 and glm.attention_bias
    assert not glm.tie_word_embeddings and glm.rms_norm_eps == 3.90625e-08
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (256, 4096)
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 13696, 4096)


@pytest.mark.parametrize("name", ["tiny", "demo", "mid"])
def test_presets_build(name):
    config = VoiceLMConfig.from_preset(name)
    model = build_glm(config, device="meta")
    assert model.config.vocab_size == config.vocab.total_size
    assert config.vocab.speech_vocab_size == config.speech_vocab_size


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        VoiceLMConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(KeyError, match="known presets"):
        VoiceLMConfig.from_preset("huge")
