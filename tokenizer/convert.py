"""`voicelm convert glm4voice-tokenizer SRC OUT`: the official glm-4-voice-tokenizer -> our format.

SRC is the released HF directory: `config.json` (WhisperVQConfig fields) and
`model*.safetensors` with keys under `model.encoder.` (a bare encoder's keys, without the
prefix, are accepted too). Only what tokenization uses is kept, as the official
`load_quantize_encoder` does: the conv stem, the first `pooling_position` encoder layers,
the codebook (+ its EMA statistics) and the second positional embedding. The encoder's
final layer_norm, later layers and the text decoder are dropped.

The official model was trained with Whisper's per-segment log-mel floor, so the converted
config uses mel_floor="segment_max" (offline tokens as the official code computes them);
load with `SpeechTokenizer.from_pretrained(OUT, mel_floor="fixed")` to stream.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from voicelm.core.checkpoint import CheckpointError

from tokenizer.config import TokenizerConfig
from tokenizer.model import SpeechTokenizer

_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_CODEBOOK = "quantizer.vq._codebook."


def config_from_official(hf: dict) -> TokenizerConfig:
    """Map the official WhisperVQConfig fields onto ours, refusing what we do not implement."""
    def need(name):
        if name not in hf:
            raise CheckpointError(f"official config.json lacks {name!r}: is this a glm-4-voice-tokenizer (WhisperVQConfig)?")
        return hf[name]

    problems = []
    if need("pooling_type") != "avg":
        problems.append(f"pooling_type {hf['pooling_type']!r} (only 'avg')")
    if need("pooling_kernel_size") != 4:
        problems.append(f"pooling_kernel_size {hf['pooling_kernel_size']} (only 4: 50 Hz -> 12.5 Hz)")
    position = need("pooling_position")
    if hf.get("quantize_position", 16) != position:
        problems.append(f"quantize_position {hf.get('quantize_position', 16)} != pooling_position {position}")
    if not hf.get("encoder_causal_convolution", False):
        problems.append("encoder_causal_convolution false (the stem must be causal)")
    if hf.get("encoder_causal_attention", False) or hf.get("quantize_causal_encoder", False):
        problems.append("fully causal attention (only block-causal is implemented)")
    if hf.get("quantize_causal_block_size") is None:
        problems.append("quantize_causal_block_size null (full attention cannot stream)")
    if need("max_source_positions") != 1500:
        problems.append(f"max_source_positions {hf['max_source_positions']} (only 1500: 30 s)")
    if hf.get("activation_function", "gelu") != "gelu":
        problems.append(f"activation_function {hf['activation_function']!r} (only 'gelu')")
    if problems:
        raise CheckpointError("unsupported official tokenizer config: " + "; ".join(problems))
    return TokenizerConfig(
        n_mels=need("num_mel_bins"),
        mel_floor="segment_max",
        n_audio_ctx=hf["max_source_positions"],
        n_audio_state=need("d_model"),
        n_audio_head=need("encoder_attention_heads"),
        n_audio_ffn=need("encoder_ffn_dim"),
        pooling_position=position,
        block_size=hf["quantize_causal_block_size"],
        codebook_size=need("quantize_vocab_size"),
        vq_decay=hf.get("quantize_ema_decay") or 0.99,
        commitment_weight=hf.get("quantize_commit_coefficient", 0.25),
        asr_head=False,
    )


def _read_official_tensors(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{src} has no model*.safetensors; expected the released glm-4-voice-tokenizer directory")
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def map_state(tensors: dict[str, torch.Tensor], config: TokenizerConfig) -> dict[str, torch.Tensor]:
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in tensors) else ""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue  # the text decoder, projection heads
        name = key[len(prefix):]
        if name.startswith(("conv1.", "conv2.")):
            state["encoder." + name] = tensor
        elif name == "embed_positions.weight":
            state["encoder.positional_embedding"] = tensor
        elif name == "embed_positions2.weight":
            state["encoder.positional_embedding2"] = tensor
        elif name == "codebook.weight":
            state[_CODEBOOK + "embed"] = tensor[None]  # (1, K, D): the library keeps a codebook axis
        elif name == "ema_weight":
            state[_CODEBOOK + "embed_avg"] = tensor[None]
        elif name == "ema_count":
            state[_CODEBOOK + "cluster_size"] = tensor[None]
        elif (match := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)):
            layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
            if layer >= config.pooling_position:
                continue  # layers after the pool are not part of the tokenizer
            if module not in _LAYER_RENAMES:
                raise CheckpointError(f"unexpected official tensor {key!r}")
            state[f"encoder.blocks.{layer}.{_LAYER_RENAMES[module]}.{kind}"] = tensor
        # anything else (layer_norm after the last layer, ...) is not used for tokens
    if _CODEBOOK + "embed" not in state:
        raise CheckpointError("no codebook.weight in the official checkpoint: it is a plain Whisper, not a tokenizer")
    codebook = state[_CODEBOOK + "embed"]
    # Without EMA statistics (a codebook trained by gradient) start them neutral.
    state.setdefault(_CODEBOOK + "embed_avg", codebook.clone())
    state.setdefault(_CODEBOOK + "cluster_size", torch.ones(codebook.shape[:2]))
    state[_CODEBOOK + "initted"] = torch.tensor(True)
    return state


def convert_glm4voice_tokenizer(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Convert the official tokenizer directory `src` into a voicelm tokenizer part at `out`."""
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{src} has no config.json; pass the glm-4-voice-tokenizer directory")
    config = config_from_official(json.loads(config_path.read_text()))
    state = map_state(_read_official_tensors(src), config)
    model = SpeechTokenizer(config)
    from voicelm.core.checkpoint import load_state_strict

    load_state_strict(model, state, where=f"official checkpoint {src}")
    return model.save_pretrained(out, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the glm-4-voice-tokenizer directory (config.json + model.safetensors)")
    parser.add_argument("out", help="output tokenizer directory (written atomically)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="cast floating-point weights (default: float32)")


def main(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = convert_glm4voice_tokenizer(args.src, args.out, dtype=dtype)
    print(f"wrote {out}")
    return 0
