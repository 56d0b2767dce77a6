"""The speech tokenizer: log mel -> causal conv stem (50 Hz) -> block-causal Whisper encoder
blocks -> avg pool x4 (12.5 Hz) -> one VQ codebook -> token ids.

Shapes: 16 kHz samples N (a multiple of 1280) -> mel (n_mels, N / 160) -> stem (N / 320, D)
-> `pooling_position` blocks -> pool (N / 1280, D) -> tokens (N / 1280,).

Training adds an ASR head (the official recipe): quantized tokens + a second positional
embedding -> `n_post_layer` more block-causal encoder blocks at 12.5 Hz -> ln_post -> Whisper
text decoder, trained with cross-entropy on transcripts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voicelm.core.audio import SAMPLE_RATE, SAMPLES_PER_TOKEN, AudioError, prepare_audio
from voicelm.core.checkpoint import config_from_dict, load_part, load_state_strict, save_part

from tokenizer.config import CONV_STRIDE, POOL_KERNEL, SEGMENT_SAMPLES, TokenizerConfig
from tokenizer.frontend import log_mel_spectrogram
from tokenizer.modules import CausalConv1d, ResidualAttentionBlock, TextDecoder, block_causal_mask
from tokenizer.quantizer import QuantizerOutput, SpeechQuantizer

PART_KIND = "tokenizer"


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's sinusoidal positional embedding (sin half, then cos half)."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class TokenizerEncoder(nn.Module):
    """Conv stem + the encoder blocks before the pool (the part a tokenizer keeps)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        d = config.n_audio_state
        self.config = config
        self.conv1 = CausalConv1d(config.n_mels, d, kernel_size=3)
        self.conv2 = CausalConv1d(d, d, kernel_size=3, stride=CONV_STRIDE)
        # Frozen, as in Whisper and GLM-4-Voice, but a parameter so converted weights carry it.
        self.positional_embedding = nn.Parameter(sinusoids(config.n_audio_ctx, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(d, config.n_audio_head, config.n_audio_ffn) for _ in range(config.pooling_position)]
        )
        # Added to the quantized tokens before the blocks after quantization (official layout).
        self.positional_embedding2 = nn.Parameter(sinusoids(config.n_audio_ctx, d)[: config.n_token_ctx].clone())

    def stem(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, F) -> (B, F / 2, D) with positions added."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, D)
        return x + self.positional_embedding[: x.shape[1]]

    def forward(self, mel: torch.Tensor, frame_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_mels, F) log mel, F a multiple of 8; frame_valid (B, F / 2) -> pooled (B, F / 8, D)."""
        x = self.stem(mel)
        if x.shape[1] > self.config.n_audio_ctx:
            raise ValueError(f"{x.shape[1]} encoder frames exceed the context of {self.config.n_audio_ctx} (30 s)")
        mask = block_causal_mask(x.shape[1], self.config.block_size, frame_valid, device=x.device)
        for block in self.blocks:
            x = block(x, mask=mask)
        return pool_to_tokens(x)


def pool_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) 50 Hz -> (B, ceil(T / 4), D) 12.5 Hz; a partial last group is zero padded (official)."""
    remainder = x.shape[1] % POOL_KERNEL
    if remainder:
        x = F.pad(x, (0, 0, 0, POOL_KERNEL - remainder))
    return F.avg_pool1d(x.transpose(1, 2), POOL_KERNEL).transpose(1, 2)


class ASRHead(nn.Module):
    """Training-time head: the remaining encoder blocks at 12.5 Hz + a Whisper text decoder."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        d = config.n_audio_state
        self.config = config
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(d, config.n_audio_head, config.n_audio_ffn) for _ in range(config.n_post_layer)]
        )
        self.ln_post = nn.LayerNorm(d)
        self.decoder = TextDecoder(config.n_vocab, config.n_text_ctx, d, config.n_text_head, config.n_text_layer)

    def encode(self, x: torch.Tensor, token_valid: torch.Tensor | None) -> torch.Tensor:
        mask = block_causal_mask(x.shape[1], self.config.token_block_size, token_valid, device=x.device)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.ln_post(x)

    def forward(self, x: torch.Tensor, token_valid: torch.Tensor | None, text_tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(text_tokens, self.encode(x, token_valid), token_valid)


@dataclasses.dataclass
class TokenizerOutput:
    tokens: torch.Tensor  # (B, T) long, -1 at padding
    token_valid: torch.Tensor  # (B, T) bool
    features: torch.Tensor  # (B, T, D) pre-quantization (pooled) features
    quantized: torch.Tensor  # (B, T, D) straight-through quantized features
    commit_loss: torch.Tensor  # scalar
    code_counts: torch.Tensor  # (codebook_size,)
    asr_logits: torch.Tensor | None = None  # (B, L, V) when text tokens were given


def _as_batch(audio, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        raise AudioError(f"expected a (B, T) tensor of 16 kHz samples, got {type(audio).__name__} "
                         f"{tuple(getattr(audio, 'shape', ()))}")
    if lengths is None:
        lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if lengths.shape != (audio.shape[0],) or (lengths < 1).any() or (lengths > audio.shape[1]).any():
        raise AudioError(f"lengths must give 1..{audio.shape[1]} samples for each of the {audio.shape[0]} rows, "
                         f"got {lengths.tolist()}")
    return audio, lengths


class SpeechTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = TokenizerEncoder(config)
        self.quantizer = SpeechQuantizer(
            config.n_audio_state, config.codebook_size, decay=config.vq_decay,
            commitment_weight=config.commitment_weight, kmeans_init=config.kmeans_init,
            threshold_ema_dead_code=config.threshold_ema_dead_code,
        )
        self.asr_head = ASRHead(config) if config.asr_head else None

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # --- the differentiable path (training, offline encoding) -----------------------------
    def mel(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) 16 kHz, lengths (B,) -> log mel (B, n_mels, F), F a multiple of 8, and token counts (B,).

        Each clip is zero padded to whole tokens (1280 samples) and framed on its own, so a
        clip gives the same mel in any batch; frames past a clip's end hold the floor.
        """
        token_counts = (lengths + SAMPLES_PER_TOKEN - 1) // SAMPLES_PER_TOKEN
        padded_samples = int(token_counts.max()) * SAMPLES_PER_TOKEN
        if padded_samples > SEGMENT_SAMPLES:
            raise AudioError(f"a clip of {int(lengths.max())} samples exceeds the 30 s encoder context; "
                             f"use encode()/encode_batch(), which cut long audio into 30 s segments")
        frames = padded_samples // 160
        mels = []
        for row, length, count in zip(audio, lengths.tolist(), token_counts.tolist()):
            clip = F.pad(row[:length], (0, count * SAMPLES_PER_TOKEN - length))
            mel = log_mel_spectrogram(clip, self.config.n_mels, self.config.mel_floor, self.config.mel_floor_value)
            mels.append(F.pad(mel, (0, frames - mel.shape[-1]), value=float(mel.detach().min())))
        return torch.stack(mels), token_counts

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None) -> TokenizerOutput:
        """(B, N) 16 kHz samples of at most 30 s, lengths (B,) -> TokenizerOutput (tokens at 12.5 Hz).

        With `text_tokens` (B, L) the ASR head also runs (teacher forcing) and `asr_logits` is set.
        """
        audio, lengths = _as_batch(audio, lengths)
        mel, token_counts = self.mel(audio, lengths)
        n_tokens = mel.shape[-1] // (CONV_STRIDE * POOL_KERNEL)
        token_valid = torch.arange(n_tokens, device=mel.device)[None] < token_counts[:, None].to(mel.device)
        frame_valid = token_valid.repeat_interleave(POOL_KERNEL, dim=1)  # (B, T * 4) at 50 Hz
        features = self.encoder(mel, frame_valid)  # (B, T, D)
        q: QuantizerOutput = self.quantizer(features, mask=token_valid)
        out = TokenizerOutput(q.indices, token_valid, features, q.quantized, q.commit_loss, q.counts)
        if text_tokens is not None:
            out.asr_logits = self._head().decoder(text_tokens, self.asr_audio_features(out), token_valid)
        return out

    def _head(self) -> ASRHead:
        if self.asr_head is None:
            raise RuntimeError("this tokenizer has no ASR head (config.asr_head is false); it can only tokenize")
        return self.asr_head

    def asr_audio_features(self, out: TokenizerOutput) -> torch.Tensor:
        """Quantized tokens + second positions -> post-quantization blocks -> (B, T, D)."""
        x = out.quantized + self.encoder.positional_embedding2[: out.quantized.shape[1]]
        return self._head().encode(x, out.token_valid)

    @torch.no_grad()
    def greedy_transcribe(self, audio: torch.Tensor, lengths: torch.Tensor, prompt: Sequence[int], eot: int,
                          max_tokens: int = 96) -> list[list[int]]:
        """Greedy ASR through the quantized tokens: text token ids per clip (prompt and eot removed)."""
        head = self._head()
        out = self(audio, lengths)
        xa = self.asr_audio_features(out)
        batch = audio.shape[0]
        tokens = torch.tensor([list(prompt)] * batch, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        limit = min(max_tokens, self.config.n_text_ctx - len(prompt))
        for _ in range(limit):  # no KV cache: transcripts here are short
            logits = head.decoder(tokens, xa, out.token_valid)[:, -1]
            next_token = torch.where(done, torch.full_like(done, eot, dtype=torch.long), logits.argmax(-1))
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == eot
            if done.all():
                break
        results = []
        for row in tokens[:, len(prompt):].tolist():
            results.append(row[: row.index(eot)] if eot in row else row)
        return results

    # --- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def _tokens_of_segments(self, segments: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        results = []
        for start in range(0, len(segments), batch_size):
            group = segments[start:start + batch_size]
            lengths = torch.tensor([s.numel() for s in group])
            audio = torch.zeros(len(group), int(lengths.max()))
            for i, s in enumerate(group):
                audio[i, : s.numel()] = s
            mel, counts = self.mel(audio, lengths)
            token_valid = torch.arange(mel.shape[-1] // 8)[None] < counts[:, None]
            features = self.encoder(mel, token_valid.repeat_interleave(POOL_KERNEL, dim=1))
            tokens = self.quantizer.nearest(features)
            results.extend(tokens[i, : int(counts[i])] for i in range(len(group)))
        return results

    def encode_batch(self, audios, sample_rate: int = SAMPLE_RATE, lengths=None, *, batch_size: int = 16,
                     max_seconds: float | None = 600.0, allow_silent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize several clips: a list of 1-D/2-D arrays, or a (B, T) tensor with `lengths`.

        Returns (tokens (B, T') long padded with -1, token_lengths (B,)); clip i gives
        ceil(seconds * 12.5) tokens. Audio longer than 30 s is cut into 30 s segments, each
        encoded with a fresh context, and the tokens are concatenated (375 per full segment):
        nothing is dropped. Every clip is validated, resampled to 16 kHz and downmixed; an
        all-silent clip is an error unless `allow_silent`.
        """
        if isinstance(audios, torch.Tensor) and audios.dim() == 2 and lengths is not None:
            audios_list = [audios[i, : int(n)] for i, n in enumerate(torch.as_tensor(lengths).tolist())]
        elif isinstance(audios, (list, tuple)):
            audios_list = list(audios)
        elif isinstance(audios, (torch.Tensor, np.ndarray)) and np.ndim(audios) == 2:
            audios_list = [audios[i] for i in range(len(audios))]  # rows are clips of equal length
        else:
            raise AudioError("encode_batch takes a list of clips or a (B, T) tensor (+ lengths); "
                             "for one clip use encode(audio, sample_rate)")
        if not audios_list:
            raise AudioError("encode_batch got no clips")
        clips = []
        for i, clip in enumerate(audios_list):
            try:
                clips.append(prepare_audio(clip, sample_rate, SAMPLE_RATE, max_seconds=max_seconds, allow_silent=allow_silent))
            except AudioError as exc:
                raise AudioError(f"clip {i}: {exc}") from None
        owners, segments = [], []
        for i, clip in enumerate(clips):
            for start in range(0, clip.numel(), SEGMENT_SAMPLES):
                segments.append(clip[start:start + SEGMENT_SAMPLES])
                owners.append(i)
        was_training = self.training
        self.eval()
        try:
            pieces = self._tokens_of_segments(segments, batch_size)
        finally:
            self.train(was_training)
        per_clip: list[list[torch.Tensor]] = [[] for _ in clips]
        for owner, piece in zip(owners, pieces):
            per_clip[owner].append(piece)
        token_lists = [torch.cat(p) for p in per_clip]
        token_lengths = torch.tensor([t.numel() for t in token_lists])
        tokens = torch.full((len(clips), int(token_lengths.max())), -1, dtype=torch.long)
        for i, t in enumerate(token_lists):
            tokens[i, : t.numel()] = t
        return tokens, token_lengths

    def encode(self, audio, sample_rate: int = SAMPLE_RATE, *, max_seconds: float | None = 600.0,
               allow_silent: bool = False) -> torch.Tensor:
        """One clip (1-D samples, or 2-D channels x samples / samples x channels) at any rate
        -> LongTensor (T,) of ids in [0, codebook_size), T = ceil(seconds * 12.5)."""
        tokens, lengths = self.encode_batch([audio], sample_rate, max_seconds=max_seconds, allow_silent=allow_silent)
        return tokens[0, : int(lengths[0])]

    def stream(self) -> "TokenStream":
        """A streaming encoder: `push(samples_16k)` -> new tokens, `flush()` -> the rest."""
        from tokenizer.streaming import TokenStream

        return TokenStream(self)

    # --- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, mel_floor: str | None = None) -> "SpeechTokenizer":
        """Load a tokenizer part directory. `mel_floor` overrides the front end's floor mode
        (e.g. "fixed" to stream a converted official model, at a small cost in fidelity)."""
        config_dict, state = load_part(directory, PART_KIND)
        config = config_from_dict(TokenizerConfig, config_dict, where=f"{directory}/config.json")
        if mel_floor is not None:
            config = dataclasses.replace(config, mel_floor=mel_floor)
        model = cls(config)
        load_state_strict(model, state, where=str(directory))
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        include_asr_head: bool = False) -> Path:
        """Write config.json + model.safetensors atomically; the ASR head only if asked."""
        keep_head = include_asr_head and self.asr_head is not None
        if include_asr_head and self.asr_head is None:
            raise ValueError("include_asr_head=True but this tokenizer has no ASR head")
        config = dataclasses.replace(self.config, asr_head=keep_head)
        state = {k: v for k, v in self.state_dict().items() if keep_head or not k.startswith("asr_head.")}
        return save_part(directory, PART_KIND, config, state, dtype=dtype)


def build_tokenizer(config: TokenizerConfig | dict) -> SpeechTokenizer:
    if isinstance(config, dict):
        config = config_from_dict(TokenizerConfig, config, where="tokenizer preset")
    return SpeechTokenizer(config)
