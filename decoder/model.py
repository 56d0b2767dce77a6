"""`SpeechDecoder`: the whole decoder part, flow model + vocoder, in one checkpoint directory.

    tokens (T,) ──► FlowModel ──► mel (80, F) ──► vocoder ──► wav (F * 256,) at 22,050 Hz

Checkpoint (part kind "decoder"): `config.json` holds
    {"flow": {FlowConfig fields}, "vocoder_type": "hift" | "griffinlim", "vocoder": {its config}}
and `model.safetensors` the weights under `flow.` and `vocoder.` prefixes. A decoder whose
vocoder is "griffinlim" has no trained vocoder yet: it is a labelled fallback (buzzy speech).
Streaming decoding lives in `decoder/streaming.py` (`StreamingDecoder`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoder.flow import FlowConfig, FlowInputError, FlowModel
from voicelm.core.audio import DECODER_SAMPLE_RATE, MEL_HOP
from voicelm.core.checkpoint import (
    CheckpointError,
    config_from_dict,
    load_part,
    load_state_strict,
    read_part_config,
    save_part,
)

CHECKPOINT_KIND = "decoder"
VOCODER_TYPES = ("hift", "griffinlim")


def build_vocoder(vocoder_type: str, config: dict[str, Any] | None) -> nn.Module:
    """Vocoder of a registered type from its config dict (as stored in config.json)."""
    config = dict(config or {})
    if vocoder_type == "hift":
        from decoder.hift import HiFTConfig, HiFTGenerator

        return HiFTGenerator(config_from_dict(HiFTConfig, config, where="decoder config.json 'vocoder'"))
    if vocoder_type == "griffinlim":
        from decoder.griffinlim import GriffinLimVocoder

        unknown = sorted(set(config) - {"n_iter", "momentum"})
        if unknown:
            raise CheckpointError(f"griffinlim vocoder config has unknown keys {unknown} (known: n_iter, momentum)")
        return GriffinLimVocoder(**config)
    raise CheckpointError(f"unknown vocoder type {vocoder_type!r}; known types: {list(VOCODER_TYPES)}")


def vocoder_config_dict(vocoder: nn.Module) -> tuple[str, dict[str, Any]]:
    """(type, config dict) to store for a vocoder instance."""
    from decoder.griffinlim import GriffinLimVocoder

    if isinstance(vocoder, GriffinLimVocoder):
        return "griffinlim", {"n_iter": int(vocoder.n_iter), "momentum": float(vocoder.momentum)}
    from decoder.hift import HiFTGenerator

    if isinstance(vocoder, HiFTGenerator):
        return "hift", dataclasses.asdict(vocoder.config)
    raise TypeError(f"cannot store a vocoder of type {type(vocoder).__name__}; use HiFTGenerator or GriffinLimVocoder")


def as_token_tensor(tokens: Any, what: str = "tokens") -> torch.Tensor:
    """A 1-D LongTensor from a tensor, list or array of ids, with a clear error otherwise."""
    if isinstance(tokens, torch.Tensor):
        tensor = tokens
    else:
        try:
            tensor = torch.as_tensor(list(tokens) if not hasattr(tokens, "__array__") else tokens)
        except (TypeError, ValueError) as exc:
            raise FlowInputError(f"{what} must be a sequence of integer speech token ids ({exc})") from None
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise FlowInputError(f"{what} must be 1-D (T,) speech token ids, got shape {tuple(tensor.shape)}")
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise FlowInputError(f"{what} must be integer speech token ids, got dtype {tensor.dtype}")
    return tensor.long()


class SpeechDecoder(nn.Module):
    """Speech tokens -> waveform at 22,050 Hz (the decoder part of a pipeline)."""

    sample_rate = DECODER_SAMPLE_RATE

    def __init__(self, flow_config: FlowConfig, vocoder: nn.Module):
        super().__init__()
        self.flow = FlowModel(flow_config)
        self.vocoder = vocoder
        # Contract between the two halves, asserted where they are assembled.
        if getattr(vocoder, "sample_rate", DECODER_SAMPLE_RATE) != DECODER_SAMPLE_RATE or \
                getattr(vocoder, "hop_length", MEL_HOP) != MEL_HOP:
            raise CheckpointError(
                f"vocoder runs at {getattr(vocoder, 'sample_rate', '?')} Hz / hop {getattr(vocoder, 'hop_length', '?')}; "
                f"the flow model makes mel at {DECODER_SAMPLE_RATE} Hz / hop {MEL_HOP}")

    @property
    def config(self) -> FlowConfig:
        return self.flow.config

    @property
    def vocab_size(self) -> int:
        return self.flow.config.vocab_size

    @property
    def is_fallback_vocoder(self) -> bool:
        return bool(getattr(self.vocoder, "is_fallback", False))

    @property
    def device(self) -> torch.device:
        return self.flow.encoder_proj.weight.device

    # --- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def decode_mel(self, tokens, speaker: torch.Tensor | None = None, prompt_tokens=None,
                   prompt_mel: torch.Tensor | None = None, n_timesteps: int | None = None) -> torch.Tensor:
        """Offline: speech token ids (T,) -> mel (80, frames_for_tokens(T))."""
        tokens = as_token_tensor(tokens)
        prompt = None if prompt_tokens is None else as_token_tensor(prompt_tokens, "prompt_tokens")
        return self.flow.inference(tokens, speaker=speaker, prompt_tokens=prompt,
                                   prompt_mel=None if prompt_mel is None else prompt_mel.to(self.device),
                                   n_timesteps=n_timesteps)

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (80, F) -> wav (F * 256,)."""
        wav, _ = self.vocoder.inference(mel[None].to(self.device))
        return wav[0].float()

    @torch.no_grad()
    def decode(self, tokens, speaker: torch.Tensor | None = None, prompt_tokens=None,
               prompt_mel: torch.Tensor | None = None, n_timesteps: int | None = None) -> torch.Tensor:
        """Offline: speech token ids (T,) -> float32 waveform (frames_for_tokens(T) * 256,) at 22,050 Hz."""
        return self.vocode(self.decode_mel(tokens, speaker, prompt_tokens, prompt_mel, n_timesteps))

    # --- checkpoints ------------------------------------------------------------------------
    def part_config(self) -> dict[str, Any]:
        vocoder_type, vocoder_config = vocoder_config_dict(self.vocoder)
        return {"flow": dataclasses.asdict(self.flow.config), "vocoder_type": vocoder_type, "vocoder": vocoder_config}

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        vocoder_dtype: torch.dtype | None = None) -> Path:
        """Write the decoder part (config.json + model.safetensors) atomically.

        `dtype` casts the floating-point tensors (None keeps them); `vocoder_dtype`, when given, is
        the vocoder's own (a small HiFT may stay float32 beside a float16 flow: it is a few MB, and
        rounding it to float16 costs intelligibility). Loading upcasts either to float32."""
        def cast(tensor: torch.Tensor, to: torch.dtype | None) -> torch.Tensor:
            return tensor.to(to) if to is not None and tensor.is_floating_point() else tensor

        vocoder_dtype = dtype if vocoder_dtype is None else vocoder_dtype
        state = {f"flow.{k}": cast(v, dtype) for k, v in self.flow.state_dict().items()}
        state.update({f"vocoder.{k}": cast(v, vocoder_dtype) for k, v in self.vocoder.state_dict().items()})
        return save_part(directory, CHECKPOINT_KIND, self.part_config(), state)

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], where: str = "decoder config") -> "SpeechDecoder":
        if not isinstance(config, dict) or "flow" not in config or "vocoder_type" not in config:
            raise CheckpointError(f"{where} must hold 'flow', 'vocoder_type' and 'vocoder'; got keys "
                                  f"{sorted(config) if isinstance(config, dict) else type(config).__name__}")
        flow_config = config_from_dict(FlowConfig, config["flow"], where=f"{where} 'flow'")
        return cls(flow_config, build_vocoder(config["vocoder_type"], config.get("vocoder")))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "SpeechDecoder":
        """Load a decoder part directory written by `save_pretrained` or `voicelm convert glm4voice-decoder`."""
        config, state = load_part(directory, CHECKPOINT_KIND)
        model = cls.from_config_dict(config, where=f"{directory}/config.json")
        load_state_strict(model, state, where=str(directory))
        return model.to(device).eval()

    @staticmethod
    def read_vocab_size(directory: str | os.PathLike) -> int:
        """The speech vocabulary of a decoder checkpoint, without loading its weights (for contracts)."""
        config = read_part_config(directory, CHECKPOINT_KIND)
        return int(config["flow"]["vocab_size"])

