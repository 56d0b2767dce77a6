"""The voice LM: transformers' `GlmForCausalLM` (GLM-4 architecture) over text + speech ids.

`VoiceLMConfig` is the one dataclass describing a model (the flat mapping of `conf/lm/*.yaml`);
`VoiceLM` bundles the network, its `Vocabulary` and its text tokenizer, and reads/writes the
"voicelm" part directory:

    config.json              {"format_version", "kind": "voicelm", "config": VoiceLMConfig}
    model.safetensors        GlmForCausalLM state dict (or model-0000k-of-0000n.safetensors +
                             model.safetensors.index.json for converted 9B weights)
    text_tokenizer.json      `tokenizers` JSON (our BPE, or GLM-4's tiktoken ranks converted)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import GlmConfig, GlmForCausalLM

from voicelm.core.checkpoint import (CheckpointError, WEIGHTS_NAME, check_state_matches, config_from_dict, load_state_strict,
                                     read_part_config, save_part)
from voicelm.core.presets import load_preset
from voicelm.lm.text_tokenizer import TOKENIZER_FILE, TextTokenizer, TextTokenizerError
from voicelm.lm.vocab import Vocabulary

PART_KIND = "voicelm"
SHARD_INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass
class VoiceLMConfig:
    # vocabulary: layout "voicelm" (ours, sized by the text tokenizer) or "glm4voice" (official ids)
    vocab_layout: str = "voicelm"
    text_vocab_size: int = 512
    speech_vocab_size: int = 256
    # transformer (GLM-4 block: RMSNorm, GQA attention with qkv bias, partial RoPE, SwiGLU)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            problems.append(f"head_dim * partial_rotary_factor ({self.head_dim} * {self.partial_rotary_factor}) "
                            f"must be even: RoPE rotates pairs of dims")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if problems:
            raise ValueError("invalid VoiceLMConfig: " + "; ".join(problems))
        self.vocab  # validates the vocabulary fields

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary.from_layout(self.vocab_layout, self.text_vocab_size, self.speech_vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.vocab.total_size

    def glm_config(self) -> GlmConfig:
        vocab = self.vocab
        return GlmConfig(
            vocab_size=vocab.total_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor},
            attention_bias=self.attention_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            pad_token_id=vocab.pad_id,
            eos_token_id=list(vocab.stop_ids),
            bos_token_id=None,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VoiceLMConfig":
        values = load_preset("lm", name)
        values.update(overrides)
        return config_from_dict(cls, values, where=f"conf/lm/{name}.yaml")


def build_glm(config: VoiceLMConfig, *, device: str | torch.device = "cpu", seed: int | None = None) -> GlmForCausalLM:
    """A randomly initialised `GlmForCausalLM` of `config`'s geometry (`device="meta"`: no memory)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = GlmForCausalLM(config.glm_config())
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_tokenizer(config: VoiceLMConfig, tokenizer: TextTokenizer, where: str) -> None:
    if tokenizer.vocab_size > config.text_vocab_size:
        raise CheckpointError(
            f"{where}: the text tokenizer has {tokenizer.vocab_size} tokens but the LM's text range holds "
            f"{config.text_vocab_size}; the tokenizer belongs to a different model")


class VoiceLM:
    """A GLM-4 causal LM with its vocabulary and text tokenizer (the "voicelm" part)."""

    def __init__(self, config: VoiceLMConfig, model: GlmForCausalLM, text_tokenizer: TextTokenizer):
        _check_tokenizer(config, text_tokenizer, "VoiceLM")
        if model.config.vocab_size != config.vocab_size:
            raise CheckpointError(f"model has {model.config.vocab_size} vocabulary rows, config says {config.vocab_size}")
        self.config = config
        self.model = model
        self.text_tokenizer = text_tokenizer
        self.vocab = config.vocab

    @classmethod
    def random(cls, config: VoiceLMConfig, text_tokenizer: TextTokenizer, seed: int | None = 0) -> "VoiceLM":
        return cls(config, build_glm(config, seed=seed), text_tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    # --- checkpoint -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the part directory atomically (`dtype=torch.float16` for a shipped model)."""
        return save_part(directory, PART_KIND, self.config, self.model.state_dict(), dtype=dtype,
                         extra_files={TOKENIZER_FILE: self.text_tokenizer.to_str()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, load_in: str | None = None) -> "VoiceLM":
        """Load a "voicelm" part directory.

        `load_in="int8"|"nf4"` quantizes the linear layers with bitsandbytes while loading; it needs
        a CUDA GPU and the `bitsandbytes` package (the 9B in nf4 fits in about 7 GB).
        """
        directory = Path(directory)
        config = config_from_dict(VoiceLMConfig, read_part_config(directory, PART_KIND), where=f"{directory}/config.json")
        tokenizer = _load_tokenizer(directory)
        _check_tokenizer(config, tokenizer, str(directory))
        if load_in is not None:
            model = _load_quantized(directory, config, load_in)
            return cls(config, model, tokenizer)
        model = build_glm(config, device="meta")
        state = _read_weights(directory)
        # Build on the meta device and adopt the file's tensors (assign=True): no second copy.
        model_dtype = dtype or next(iter(state.values())).dtype
        if not model_dtype.is_floating_point:
            model_dtype = torch.float32
        state = {k: v.to(model_dtype) if v.is_floating_point() else v for k, v in state.items()}
        expected = {k: v for k, v in model.state_dict().items()}
        check_state_matches(expected, state, where=str(directory))
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers (RoPE inverse frequencies) are still on meta: recompute them.
        rotary = model.model.rotary_emb
        inv_freq, _ = rotary.compute_default_rope_parameters(model.config)
        rotary.inv_freq = inv_freq
        rotary.original_inv_freq = inv_freq.clone()
        model.to(device)
        if dtype is not None:
            model.to(dtype)
        return cls(config, model.eval(), tokenizer)

    def load_state(self, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
        load_state_strict(self.model, state, where=where)


def _load_tokenizer(directory: Path) -> TextTokenizer:
    for name in (TOKENIZER_FILE, "tokenizer.model"):
        if (directory / name).exists():
            try:
                return TextTokenizer.load(directory / name)
            except TextTokenizerError as exc:
                raise CheckpointError(f"{directory / name}: {exc}") from None
    raise CheckpointError(f"{directory} has no {TOKENIZER_FILE} (or GLM-4 tokenizer.model); the LM checkpoint "
                          f"is incomplete: it needs the text tokenizer it was trained with")


def _weight_files(directory: Path) -> list[Path]:
    index = directory / SHARD_INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / name for name in weight_map.values()})
    elif (directory / WEIGHTS_NAME).exists():
        files = [directory / WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} or {SHARD_INDEX_NAME}; the checkpoint is incomplete")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory}: weight shards {missing} listed in {SHARD_INDEX_NAME} are missing")
    return files


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{path} cannot be read as safetensors ({exc}); the file is damaged") from None
    return state


QUANTIZED_MODES = ("int8", "nf4")


def _load_quantized(directory: Path, config: VoiceLMConfig, load_in: str) -> GlmForCausalLM:
    """Quantized loading through transformers + bitsandbytes (GPU only).

    transformers' loader wants its own config.json, so a temporary directory presents our shards
    (symlinked, not copied) with a GlmConfig beside them.
    """
    if load_in not in QUANTIZED_MODES:
        raise ValueError(f"load_in={load_in!r}: choose one of {QUANTIZED_MODES} (or None for full precision)")
    if not torch.cuda.is_available():
        raise RuntimeError(f"load_in={load_in!r} needs a CUDA GPU (bitsandbytes quantized kernels); this machine has "
                           f"none. Load without load_in (full precision) on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(f"load_in={load_in!r} needs the bitsandbytes package: pip install bitsandbytes") from None
    import tempfile

    from transformers import BitsAndBytesConfig

    quant = (BitsAndBytesConfig(load_in_8bit=True) if load_in == "int8" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp)
        config.glm_config().save_pretrained(view)
        for path in _weight_files(directory):
            (view / path.name).symlink_to(path.resolve())
        if (directory / SHARD_INDEX_NAME).exists():
            (view / SHARD_INDEX_NAME).symlink_to((directory / SHARD_INDEX_NAME).resolve())
        model = GlmForCausalLM.from_pretrained(view, quantization_config=quant, device_map="auto")
    return model.eval()
