"""The tokenizer's one config dataclass: geometry of the whole model, passed whole.

Presets live in `conf/tokenizer/{tiny,demo,glm4voice}.yaml` (flat mappings of these fields);
a checkpoint's `config.json` stores the same mapping, so inference never needs hydra.
"""

from __future__ import annotations

import dataclasses

from voicelm.core.audio import SAMPLE_RATE, SAMPLES_PER_TOKEN

HOP_LENGTH = 160  # mel hop at 16 kHz: 100 frames/s
N_FFT = 400  # 25 ms window, Whisper's
CONV_STRIDE = 2  # conv2 of the stem: 100 Hz mel -> 50 Hz encoder frames
POOL_KERNEL = 4  # avg pool after block `pooling_position`: 50 Hz -> 12.5 Hz tokens
MEL_FRAMES_PER_TOKEN = CONV_STRIDE * POOL_KERNEL  # 8 mel frames (1280 samples) per token
SEGMENT_SECONDS = 30  # encoder context: long audio is cut into 30 s segments and stitched
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE  # 480,000 samples = 375 tokens

assert HOP_LENGTH * MEL_FRAMES_PER_TOKEN == SAMPLES_PER_TOKEN
assert SEGMENT_SAMPLES % SAMPLES_PER_TOKEN == 0

MEL_FLOOR_MODES = ("fixed", "segment_max")


@dataclasses.dataclass
class TokenizerConfig:
    # --- front end ------------------------------------------------------------------------
    n_mels: int = 80  # 80 (Whisper tiny..large-v2) or 128 (large-v3, GLM-4-Voice)
    # "fixed": log-mel floored at a constant (causal; streaming == offline).
    # "segment_max": Whisper's floor at (max over the 30 s segment - 8), as the official
    # tokenizer was trained; offline only (the max depends on the whole segment).
    mel_floor: str = "fixed"
    mel_floor_value: float = -7.0  # log10 floor for mel_floor="fixed": Whisper's (max - 8) for speech peaking near 0.7
    # --- encoder (Whisper geometry) -------------------------------------------------------
    n_audio_ctx: int = 1500  # max encoder frames at 50 Hz (30 s); Whisper's max_source_positions
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_ffn: int = 1536  # Whisper uses 4 * n_audio_state
    pooling_position: int = 4  # encoder blocks before the pool = blocks kept for tokenization
    block_size: int = 200  # attention block in 50 Hz frames (full inside, causal across)
    # --- quantizer (vector-quantize-pytorch, EMA codebook) --------------------------------
    codebook_size: int = 1024
    vq_decay: float = 0.99
    commitment_weight: float = 0.25
    kmeans_init: bool = False
    threshold_ema_dead_code: float = 0.0  # 0 = no dead-code restarts
    # --- ASR head (training only; absent from shipped tokenizers) --------------------------
    asr_head: bool = False
    n_post_layer: int = 2  # encoder blocks after quantization (12.5 Hz), then ln_post
    n_vocab: int = 51865  # Whisper text vocabulary (51864 English-only, 51865 multilingual)
    n_text_ctx: int = 448
    n_text_head: int = 6
    n_text_layer: int = 4
    multilingual: bool = True  # which Whisper text tokenizer the head was trained with
    language: str = "en"

    def __post_init__(self) -> None:
        problems = []
        if self.n_mels not in (80, 128):
            problems.append(f"n_mels must be 80 or 128 (Whisper's mel filter banks), got {self.n_mels}")
        if self.mel_floor not in MEL_FLOOR_MODES:
            problems.append(f"mel_floor must be one of {MEL_FLOOR_MODES}, got {self.mel_floor!r}")
        if self.n_audio_state % self.n_audio_head:
            problems.append(f"n_audio_state {self.n_audio_state} is not divisible by n_audio_head {self.n_audio_head}")
        if self.pooling_position < 1:
            problems.append(f"pooling_position must be >= 1 (blocks before the pool), got {self.pooling_position}")
        if self.block_size < POOL_KERNEL or self.block_size % POOL_KERNEL:
            problems.append(
                f"block_size {self.block_size} must be a positive multiple of {POOL_KERNEL} so that "
                f"no pooled token straddles two attention blocks"
            )
        if self.n_audio_ctx % POOL_KERNEL or self.n_audio_ctx * CONV_STRIDE * HOP_LENGTH != SEGMENT_SAMPLES:
            problems.append(
                f"n_audio_ctx must be {SEGMENT_SAMPLES // (CONV_STRIDE * HOP_LENGTH)} (30 s at 50 Hz), got {self.n_audio_ctx}"
            )
        if self.codebook_size < 2:
            problems.append(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not 0.0 < self.vq_decay < 1.0:
            problems.append(f"vq_decay must be in (0, 1), got {self.vq_decay}")
        if self.asr_head and self.n_audio_state % self.n_text_head:
            problems.append(f"n_audio_state {self.n_audio_state} is not divisible by n_text_head {self.n_text_head}")
        if problems:
            raise ValueError("invalid tokenizer config: " + "; ".join(problems))

    @property
    def n_token_ctx(self) -> int:
        """Tokens per 30 s segment (375): length of the second positional embedding."""
        return self.n_audio_ctx // POOL_KERNEL

    @property
    def token_block_size(self) -> int:
        """The attention block after pooling, in 12.5 Hz tokens (block_size / 4)."""
        return self.block_size // POOL_KERNEL

    @property
    def block_samples(self) -> int:
        """Samples of 16 kHz audio per attention block: tokens of a block are final at its end."""
        return self.block_size * CONV_STRIDE * HOP_LENGTH
