"""`voicelm convert glm4voice-lm SRC OUT`: the released glm-4-voice-9b (ChatGLM format) -> a voicelm LM.

SRC holds the ChatGLM safetensors shards (+ `model.safetensors.index.json`), its `config.json` and
`tokenizer.model`. Tensor mapping (N = layer):

    transformer.embedding.word_embeddings                  -> model.embed_tokens
    transformer.encoder.layers.N.input_layernorm           -> model.layers.N.input_layernorm
    ...self_attention.query_key_value.{weight,bias}        -> self_attn.{q,k,v}_proj: rows split as
                                                              [heads*head_dim | groups*head_dim | groups*head_dim]
    ...self_attention.dense                                -> self_attn.o_proj
    ...post_attention_layernorm                            -> post_attention_layernorm
    ...mlp.dense_h_to_4h                                   -> mlp.gate_up_proj (as is: both put the
                                                              SiLU-gated half first)
    ...mlp.dense_4h_to_h                                   -> mlp.down_proj
    transformer.encoder.final_layernorm                    -> model.norm
    transformer.output_layer                               -> lm_head (untied)
    transformer.rotary_pos_emb.inv_freq                    -> dropped (recomputed; same formula)

RoPE needs no permutation: ChatGLM rotates the first half of each head's dims as interleaved
pairs (2i, 2i+1) with frequency base^(-2i/rot_dim), and transformers' Glm `apply_rotary_pos_emb`
does exactly that (`repeat_interleave` of cos/sin, pairwise `rotate_half`) on the first
`head_dim * partial_rotary_factor` dims.

Memory: one source shard is read (lazily, tensor by tensor) and written out as one output
shard before the next is opened, so peak memory is about one shard, never two copies of the
model. The output appears atomically (complete or absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from voicelm.core.checkpoint import CONFIG_NAME, FORMAT_VERSION, CheckpointError, atomic_write_dir
from voicelm.lm.model import PART_KIND, SHARD_INDEX_NAME, VoiceLMConfig, build_glm
from voicelm.lm.text_tokenizer import TOKENIZER_FILE, TextTokenizer
from voicelm.lm.vocab import GLM4VOICE_TOTAL_SIZE

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_DROPPED = ("transformer.rotary_pos_emb.inv_freq",)


def config_from_chatglm(chatglm: dict) -> VoiceLMConfig:
    """Our config from a ChatGLM `config.json` (glm-4-voice-9b's fields)."""
    try:
        hidden = int(chatglm["hidden_size"])
        heads = int(chatglm["num_attention_heads"])
        groups = int(chatglm["multi_query_group_num"]) if chatglm.get("multi_query_attention", True) else heads
        vocab = int(chatglm["padded_vocab_size"])
        values = dict(
            vocab_layout="glm4voice", text_vocab_size=151_329, speech_vocab_size=16_384,
            hidden_size=hidden, num_layers=int(chatglm["num_layers"]), num_heads=heads, num_kv_heads=groups,
            head_dim=int(chatglm.get("kv_channels", hidden // heads)), intermediate_size=int(chatglm["ffn_hidden_size"]),
            max_position_embeddings=int(chatglm.get("seq_length", 8192)),
            rms_norm_eps=float(chatglm.get("layernorm_epsilon", 1e-5)),
            rope_theta=10000.0 * float(chatglm.get("rope_ratio", 1.0)),
            partial_rotary_factor=0.5, attention_bias=bool(chatglm.get("add_qkv_bias", True)),
            tie_word_embeddings=False)
    except KeyError as exc:
        raise CheckpointError(f"the ChatGLM config.json lacks {exc}; is SRC the glm-4-voice-9b directory?") from None
    if vocab != GLM4VOICE_TOTAL_SIZE:
        raise CheckpointError(f"padded_vocab_size {vocab} != {GLM4VOICE_TOTAL_SIZE}: not a glm-4-voice-9b vocabulary "
                              f"(speech tokens at 152353..168736)")
    if not chatglm.get("rmsnorm", True) or chatglm.get("apply_residual_connection_post_layernorm", False):
        raise CheckpointError("only pre-norm RMSNorm ChatGLM models (GLM-4) can be converted")
    return VoiceLMConfig(**values)


def _source_shards(src: Path) -> list[Path]:
    index = src / SHARD_INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [src / n for n in names]
    else:
        shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{src} has no *.safetensors shards; download glm-4-voice-9b's safetensors files")
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise CheckpointError(f"{src}: shards {missing} named by {SHARD_INDEX_NAME} are missing")
    return shards


def convert_tensor(name: str, tensor: torch.Tensor, config: VoiceLMConfig) -> dict[str, torch.Tensor]:
    """Our tensors for one ChatGLM tensor ({} for dropped buffers)."""
    if name in _DROPPED:
        return {}
    if name in _TOP_MAP:
        return {_TOP_MAP[name]: tensor}
    match = _LAYER.match(name)
    if not match:
        raise CheckpointError(f"unexpected tensor {name!r} in the ChatGLM checkpoint; is it a GLM-4 model?")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_MAP:
        return {prefix + _LAYER_MAP[rest]: tensor}
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = rest.rsplit(".", 1)[1]
        q_rows = config.num_heads * config.head_dim
        kv_rows = config.num_kv_heads * config.head_dim
        if tensor.shape[0] != q_rows + 2 * kv_rows:
            raise CheckpointError(f"{name} has {tensor.shape[0]} rows; {config.num_heads} heads + 2 x "
                                  f"{config.num_kv_heads} groups of {config.head_dim} need {q_rows + 2 * kv_rows}")
        q, k, v = torch.split(tensor, [q_rows, kv_rows, kv_rows], dim=0)
        return {prefix + f"self_attn.q_proj.{kind}": q.contiguous(), prefix + f"self_attn.k_proj.{kind}": k.contiguous(),
                prefix + f"self_attn.v_proj.{kind}": v.contiguous()}
    raise CheckpointError(f"unexpected tensor {name!r} in the ChatGLM checkpoint")


def convert_glm4voice_lm(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                         tokenizer_path: str | Path | None = None, progress=None) -> Path:
    """Convert SRC (ChatGLM shards) into the voicelm part directory OUT; returns OUT."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory; give the glm-4-voice-9b directory")
    config_path = src / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{src} has no config.json (the ChatGLM config); is it the glm-4-voice-9b directory?")
    config = config_from_chatglm(json.loads(config_path.read_text()))
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else src / "tokenizer.model"
    if not tokenizer_path.exists():
        raise CheckpointError(f"no text tokenizer at {tokenizer_path}; glm-4-voice-9b ships tokenizer.model")
    tokenizer = TextTokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > config.text_vocab_size:
        raise CheckpointError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, more than GLM-4's text range "
                              f"{config.text_vocab_size}")
    expected = {k: tuple(v.shape) for k, v in build_glm(config, device="meta").state_dict().items()}
    shards = _source_shards(src)
    weight_map: dict[str, str] = {}
    with atomic_write_dir(out) as tmp:
        for number, shard in enumerate(shards, 1):
            out_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            converted: dict[str, torch.Tensor] = {}
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    for key, tensor in convert_tensor(name, f.get_tensor(name), config).items():
                        if key not in expected:
                            raise CheckpointError(f"{name} maps to {key}, which the model of config.json does not have")
                        if tuple(tensor.shape) != expected[key]:
                            raise CheckpointError(f"{name} -> {key}: shape {tuple(tensor.shape)}, the model expects "
                                                  f"{expected[key]}; config.json and the weights disagree")
                        if key in weight_map:
                            raise CheckpointError(f"{key} appears in two shards")
                        converted[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                        weight_map[key] = out_name
            save_file(converted, str(tmp / out_name), metadata={"format": "pt", "kind": PART_KIND})
            del converted
            if progress:
                progress(f"[{number}/{len(shards)}] {shard.name} -> {out_name}")
        missing = sorted(set(expected) - set(weight_map))
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors the model needs (e.g. {missing[:3]}); "
                                  f"a shard is missing or it is not glm-4-voice-9b")
        (tmp / SHARD_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                       indent=1) + "\n")
        meta = {"format_version": FORMAT_VERSION, "kind": PART_KIND, "config": dataclasses.asdict(config)}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_str())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="glm-4-voice-9b directory (ChatGLM safetensors shards, config.json, tokenizer.model)")
    parser.add_argument("out", help="output voicelm LM directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast weights (default: keep bf16)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of SRC/tokenizer.model")


def main(args: argparse.Namespace) -> int:
    try:
        out = convert_glm4voice_lm(args.src, args.out, dtype=DTYPES[args.dtype], tokenizer_path=args.tokenizer,
                                   progress=lambda msg: print(msg, file=sys.stderr))
    except CheckpointError as exc:
        print(f"voicelm convert glm4voice-lm: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
