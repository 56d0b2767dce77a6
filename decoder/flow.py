"""The flow model: speech tokens -> 80-bin mel at 22,050 Hz / hop 256, by conditional flow matching.

    tokens (B, T) -> embedding (B, T, D_in) -> block-causal conformer encoder (B, T, D)
      -> projection (B, T, 80) -> length regulation (B, F, 80) = mu,  F = floor(T * 441 / 64)
      -> Euler ODE from noise to mel with the U-Net estimator, conditioned on mu, a speaker
         embedding (zeros = the default voice) and an optional prompt mel.

Shape and parameter names follow GLM-4-Voice's `MaskedDiffWithXvec` (CosyVoice 1 flow) so that the
released `flow.pt` maps with the small table in `decoder/convert.py`. Our own code, written from the
published architecture.

Exact frame alignment: one token is 22050 / 256 / 12.5 = 441/64 = 6.890625 mel frames. A prefix
of n tokens owns F(n) = floor(n * 441 / 64) frames, so token i owns frames [F(i), F(i + 1)) (6 or
7 of them). Integer arithmetic on cumulative counts: a stream of any length never drifts by a frame.

Streaming (`with flow.streaming(1):`): the encoder keeps the keys/values of every finished block of
10 tokens, so a new block costs the same however long the answer is. `decoder/streaming.py` drives it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from decoder.estimator import ConditionalUNet1D, GroupNorm1d
from voicelm.core.audio import DECODER_SAMPLE_RATE, MEL_HOP, TOKEN_RATE
from voicelm.core.streaming import StreamingModule, StreamingState

FRAMES_PER_TOKEN = Fraction(DECODER_SAMPLE_RATE, MEL_HOP) / Fraction(TOKEN_RATE)  # 441/64 = 6.890625
NOISE_PAGE_FRAMES = 256  # the per-stream noise is drawn in pages of this many frames (see `stream_noise`)


def frames_for_tokens(num_tokens: int) -> int:
    """Mel frames owned by a prefix of `num_tokens` tokens: floor(n * 441 / 64)."""
    return num_tokens * FRAMES_PER_TOKEN.numerator // FRAMES_PER_TOKEN.denominator


def token_of_frames(frame_index: torch.Tensor) -> torch.Tensor:
    """Token owning each mel frame: the largest i with F(i) <= f, i.e. ((f + 1) * 64 - 1) // 441."""
    return ((frame_index + 1) * FRAMES_PER_TOKEN.denominator - 1) // FRAMES_PER_TOKEN.numerator


def _whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The inference-only settings of a flow: changed after training (a shipped model's steps, guidance,
# temperature) without touching its weights. name -> (what it must be, check)
SAMPLING_SETTINGS = {
    "n_timesteps": ("an integer >= 1", lambda v: _whole_number(v) and v >= 1),
    "inference_cfg_rate": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "noise_scale": ("a number > 0", lambda v: _number(v) and v > 0),
    "attention_window": ("null (the whole window) or an integer >= 1",
                         lambda v: v is None or (_whole_number(v) and v >= 1)),
    # the starting noise's seed (`stream_noise`): another draw of the same sampler, e.g. to see how
    # much of a score difference between two flows is the draw (`voicelm eval --decoder-noise-seed`)
    "noise_seed": ("an integer >= 0", lambda v: _whole_number(v) and v >= 0),
}


@dataclasses.dataclass
class FlowConfig:
    vocab_size: int = 16384
    n_mels: int = 80
    spk_embed_dim: int = 192  # speaker (x-vector) size; zeros select the default voice
    # encoder: token embedding -> block-causal conformer (rel. positions, no conv module)
    input_size: int = 512
    encoder_dim: int = 512
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    encoder_layers: int = 6
    block_size: int = 10  # tokens per attention block; the streaming unit
    encoder_dropout: float = 0.1
    # length regulator: nearest upsampling + N x (conv3, group norm, Mish) + conv1
    regulator_layers: int = 4
    regulator_groups: int = 1
    # estimator (1-D U-Net)
    unet_channels: tuple[int, ...] = (256, 256)
    unet_blocks: int = 4  # transformer blocks per U-Net level
    unet_mid_blocks: int = 12
    unet_heads: int = 8
    unet_head_dim: int = 64
    unet_dropout: float = 0.0
    frame_local_norm: bool = False  # True: per-frame group norm (streamable); False: official
    # True: + a 1x1 conv from the stacked inputs (x, mu, speaker, prompt) straight to the output,
    # initialised to v = mu - x. Every other path ends in a group norm, which a small model on a short
    # run cannot learn to see through (it learns v = mu - x, the bulk of the field, only very slowly);
    # this linear shortcut carries that part at once. False: official (GLM-4-Voice flow.pt).
    input_shortcut: bool = False
    # conditional flow matching
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2  # probability of dropping every condition in training
    inference_cfg_rate: float = 0.7  # classifier-free guidance strength
    n_timesteps: int = 10
    noise_seed: int = 42
    # Inference: the ODE starts from noise_scale x N(0, 1) (a sampling temperature; 1.0 = as trained).
    # Below 1 trades variety for clearer, more average speech (Matcha-TTS samples at 0.667).
    noise_scale: float = 1.0
    # The estimator's self-attention reach: each frame attends to frames at most this many away
    # (null: the whole window). A streamed chunk's window is short (the first is 68 frames); with a
    # local reach every frame sees the same neighbours streamed as offline. Also a sampling setting:
    # a flow trained on short crops can be given a reach near its crop length for long inputs.
    attention_window: int | None = None
    # training: probability that a batch uses the block-causal (streaming) encoder mask
    streaming_mask_prob: float = 0.5
    prompt_prob: float = 0.5  # probability that a training row gets a prompt-mel prefix

    def __post_init__(self) -> None:
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for name, (what, ok) in SAMPLING_SETTINGS.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {what} (got {getattr(self, name)!r})")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"t_scheduler must be 'cosine' or 'linear', got {self.t_scheduler!r}")
        if any(c % 8 for c in self.unet_channels):
            raise ValueError(f"unet_channels {self.unet_channels} must be multiples of 8 (group norm groups)")


def with_sampling(config: FlowConfig, settings) -> FlowConfig:
    """`config` with the sampling settings in the mapping `settings` replaced; a clear ValueError
    for a name that is not one of SAMPLING_SETTINGS, or (from FlowConfig) a value out of range."""
    if not isinstance(settings, dict):
        raise ValueError(f"sampling settings must be a mapping of {', '.join(SAMPLING_SETTINGS)} (got {settings!r})")
    unknown = [name for name in settings if name not in SAMPLING_SETTINGS]
    if unknown:
        raise ValueError(f"{unknown[0]} is not a flow sampling setting (use {', '.join(SAMPLING_SETTINGS)})")
    return dataclasses.replace(config, **settings)


class FlowInputError(ValueError):
    """Tokens or conditions the flow model cannot use; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
def relative_position_encoding(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """(R,) signed distances query - key -> (R, dim) interleaved sin/cos (ESPnet rel_pos layout)."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angles = distances.float()[:, None] * freqs[None]  # (R, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(distances), dim)


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL attention: score = (q + u).k + (q + v).W_pos(pe(i - j)).

    Relative positions are what make the key/value cache valid: a cached key means the same to a
    new query whatever the absolute offset.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, query_offset: int,
                cache: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, Tq, D) at absolute positions query_offset..; allowed (B|1, Tq, Tk) boolean."""
        q, k, v = self._heads(self.linear_q(x)), self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, h, Tk, hd)
        num_q, num_k = q.shape[2], k.shape[2]
        # distances i - j for query i in [offset, offset+Tq) and key j in [0, Tk)
        smallest = query_offset - (num_k - 1)
        distances = torch.arange(smallest, query_offset + num_q, device=x.device)  # (R,)
        pos = self.linear_pos(relative_position_encoding(distances, q.shape[1] * self.head_dim).to(x.dtype))
        pos = pos.view(len(distances), self.heads, self.head_dim).permute(1, 2, 0)  # (h, hd, R)
        q_v = q + self.pos_bias_v[None, :, None]
        position_scores = torch.matmul(q_v, pos)  # (B, h, Tq, R)
        index = (torch.arange(num_q, device=x.device)[:, None] + query_offset
                 - torch.arange(num_k, device=x.device)[None, :] - smallest)  # (Tq, Tk)
        position_scores = position_scores.gather(-1, index.expand(*position_scores.shape[:2], -1, -1))
        bias = position_scores / math.sqrt(self.head_dim)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        out = F.scaled_dot_product_attention(q + self.pos_bias_u[None, :, None], k, v, attn_mask=bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(x.shape[0], num_q, -1)  # (B, Tq, D)
        return self.linear_out(out), (k, v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.silu(self.w_1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(config.encoder_dim, config.encoder_heads, config.encoder_dropout)
        self.feed_forward = FeedForward(config.encoder_dim, config.encoder_ffn, config.encoder_dropout)
        self.norm_mha = nn.LayerNorm(config.encoder_dim, eps=1e-5)
        self.norm_ff = nn.LayerNorm(config.encoder_dim, eps=1e-5)
        self.dropout = nn.Dropout(config.encoder_dropout)

    def forward(self, x, allowed, query_offset, cache):
        attended, new_cache = self.self_attn(self.norm_mha(x), allowed, query_offset, cache)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.feed_forward(self.norm_ff(x)))
        return x, new_cache


@dataclasses.dataclass
class _EncoderState(StreamingState):
    caches: list  # per layer: (keys, values) of every finished block, (B, h, T_done, hd)
    tokens_done: int = 0


class BlockCausalEncoder(StreamingModule[_EncoderState]):
    """Conformer-style encoder with block-causal attention: full inside a block, causal across.

    Streaming (`step`) accepts whole blocks only (the last, partial block only at the end of a
    stream), since a token's output depends on every token of its own block.
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Module()
        self.embed.out = nn.Sequential(
            nn.Linear(config.input_size, config.encoder_dim),
            nn.LayerNorm(config.encoder_dim, eps=1e-5),
            nn.Dropout(config.encoder_dropout),
        )
        self.encoders = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.after_norm = nn.LayerNorm(config.encoder_dim, eps=1e-5)

    def _init_streaming_state(self, batch_size: int) -> _EncoderState:
        return _EncoderState(batch_size=batch_size, caches=[None] * len(self.encoders))

    def allowed_mask(self, num_q: int, query_offset: int, num_k: int, block_causal: bool,
                     key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B|1, Tq, Tk) boolean: query i may see key j."""
        device = self.after_norm.weight.device
        q_pos = torch.arange(query_offset, query_offset + num_q, device=device)
        k_pos = torch.arange(num_k, device=device)
        if block_causal:
            block = self.config.block_size
            allowed = (k_pos[None, :] // block) <= (q_pos[:, None] // block)
        else:
            allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=device)
        allowed = allowed[None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        return allowed

    def _layers(self, x, allowed, offset, caches):
        x = self.embed.out(x) * math.sqrt(self.config.encoder_dim)
        new_caches = []
        for layer, cache in zip(self.encoders, caches):
            x, new_cache = layer(x, allowed, offset, cache)
            new_caches.append(new_cache)
        return self.after_norm(x), new_caches

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, block_causal: bool = True) -> torch.Tensor:
        """Offline: (B, T, D_in) -> (B, T, D). Padded positions are hidden from every query."""
        num = x.shape[1]
        key_valid = None
        if lengths is not None:
            key_valid = torch.arange(num, device=x.device)[None] < lengths[:, None]
        allowed = self.allowed_mask(num, 0, num, block_causal, key_valid)
        out, _ = self._layers(x, allowed, 0, [None] * len(self.encoders))
        return out

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Streaming: encode the next tokens (B, T_new, D_in) against the cached earlier blocks."""
        state = self.streaming_state
        offset = state.tokens_done
        if offset % self.config.block_size:
            raise RuntimeError(
                f"encoder stream is at token {offset}, inside a block of {self.config.block_size}: only the "
                f"final step of a stream may be a partial block"
            )
        allowed = self.allowed_mask(x.shape[1], offset, offset + x.shape[1], block_causal=True)
        out, state.caches = self._layers(x, allowed, offset, state.caches)
        state.tokens_done = offset + x.shape[1]
        return out


# --------------------------------------------------------------------------------------------
# Length regulator
# --------------------------------------------------------------------------------------------
class LengthRegulator(nn.Module):
    """Token-rate features -> mel-rate features: nearest upsampling by 441/64, then a conv stack.

    The conv stack looks `context_frames` frames to each side, which the streaming decoder
    accounts for (it recomputes that many frames of left context and holds back as many on the right).
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        channels = config.n_mels
        layers: list[nn.Module] = []
        for _ in range(config.regulator_layers):
            layers += [nn.Conv1d(channels, channels, 3, padding=1),
                       GroupNorm1d(config.regulator_groups, channels, config.frame_local_norm), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1))
        self.model = nn.Sequential(*layers)
        self.context_frames = config.regulator_layers

    def forward(self, h: torch.Tensor, frame_start: int, frame_end: int, token_offset: int = 0,
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, C) holding tokens token_offset.. -> (B, C, frame_end - frame_start) for those frames."""
        frames = torch.arange(frame_start, frame_end, device=h.device)
        index = (token_of_frames(frames) - token_offset).clamp(0, h.shape[1] - 1)
        upsampled = h[:, index].transpose(1, 2)  # (B, C, F)
        if frame_mask is not None:
            upsampled = upsampled * frame_mask
        out = self.model(upsampled)
        return out if frame_mask is None else out * frame_mask


# --------------------------------------------------------------------------------------------
# Noise shared by offline and streaming decoding
# --------------------------------------------------------------------------------------------
def stream_noise(seed: int, frame_start: int, frame_end: int, n_mels: int, device=None) -> torch.Tensor:
    """Deterministic N(0, 1) noise for mel frames [frame_start, frame_end): (n_mels, F).

    The noise of a frame depends only on (seed, frame index), so a chunk of a stream gets exactly
    the noise the same frames get offline, and chunks join consistently.
    """
    pages = []
    first, last = frame_start // NOISE_PAGE_FRAMES, (max(frame_end, frame_start + 1) - 1) // NOISE_PAGE_FRAMES
    for page in range(first, last + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + page)
        pages.append(torch.randn(n_mels, NOISE_PAGE_FRAMES, generator=generator))
    noise = torch.cat(pages, dim=1)[:, frame_start - first * NOISE_PAGE_FRAMES: frame_end - first * NOISE_PAGE_FRAMES]
    return noise.to(device) if device is not None else noise


# --------------------------------------------------------------------------------------------
# Flow model
# --------------------------------------------------------------------------------------------
class FlowModel(nn.Module):
    """Tokens -> mel. `forward` returns the training loss; `sample` integrates the ODE."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.n_mels)
        self.encoder = BlockCausalEncoder(config)
        self.encoder_proj = nn.Linear(config.encoder_dim, config.n_mels)
        self.length_regulator = LengthRegulator(config)
        self.estimator = ConditionalUNet1D(config)

    # --- validation -------------------------------------------------------------------------
    def check_tokens(self, tokens: torch.Tensor, what: str = "tokens") -> None:
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise FlowInputError(f"{what} must be integer speech token ids, got dtype {tokens.dtype}")
        if tokens.numel() == 0:
            raise FlowInputError(f"{what} is empty: pass at least one speech token")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise FlowInputError(
                f"{what} holds id {bad}, outside this decoder's speech vocabulary [0, {self.config.vocab_size}). "
                f"Pass speech token ids (LM ids minus the speech offset), from a tokenizer with the same codebook size."
            )

    def speaker_condition(self, speaker: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, spk_embed_dim) x-vector or None -> (B, n_mels). None means the default voice (zeros)."""
        device = self.encoder_proj.weight.device
        if speaker is None:
            speaker = torch.zeros(batch, self.config.spk_embed_dim, device=device)
        speaker = speaker.to(device, self.encoder_proj.weight.dtype)
        if speaker.dim() == 1:
            speaker = speaker[None].expand(batch, -1)
        if speaker.shape != (batch, self.config.spk_embed_dim):
            raise FlowInputError(f"speaker embedding must be ({self.config.spk_embed_dim},) or "
                                 f"(B, {self.config.spk_embed_dim}), got {tuple(speaker.shape)}")
        return self.spk_embed_affine_layer(F.normalize(speaker, dim=1))

    # --- pieces -----------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, block_causal: bool = True) -> torch.Tensor:
        """(B, T) ids -> (B, T, n_mels) projected encoder output (offline)."""
        embedded = self.input_embedding(tokens)
        if lengths is not None:
            embedded = embedded * (torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None])[..., None]
        return self.encoder_proj(self.encoder(embedded, lengths, block_causal))

    def encode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Streaming: (B, T_new) ids -> (B, T_new, n_mels), keeping the encoder's key/value cache."""
        return self.encoder_proj(self.encoder.step(self.input_embedding(tokens)))

    def _t_schedule(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - torch.cos(t * 0.5 * math.pi) if self.config.t_scheduler == "cosine" else t

    # --- training ---------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, token_lengths: torch.Tensor, mel: torch.Tensor,
                speaker: torch.Tensor | None = None, block_causal: bool | None = None,
                prior_weight: float = 0.0, parts: bool = False):
        """Flow-matching loss. tokens (B, T), mel (B, 80, F) with F = frames_for_tokens(T) per row.

        `block_causal=None` draws the encoder mask at random (streaming with probability
        `streaming_mask_prob`), so the model learns to decode well both streamed and offline.
        `prior_weight` > 0 adds the mean squared error between the encoder's output `mu` and the
        target mel (Matcha-TTS's prior loss): the condition itself becomes a coarse mel, which makes
        small models on short (CPU) runs converge far faster; it changes nothing at inference.
        `parts=True` returns {"loss", "flow", "prior"} instead of the total.
        """
        config = self.config
        batch = tokens.shape[0]
        if block_causal is None:
            block_causal = random.random() < config.streaming_mask_prob
        frame_lengths = torch.tensor([frames_for_tokens(int(n)) for n in token_lengths], device=mel.device)
        num_frames = int(frame_lengths.max())
        if mel.shape[-1] < num_frames:
            raise FlowInputError(f"mel has {mel.shape[-1]} frames, the tokens need {num_frames}")
        mel = mel[:, :, :num_frames]
        frame_mask = (torch.arange(num_frames, device=mel.device)[None] < frame_lengths[:, None])[:, None].to(mel.dtype)

        h = self.encode(tokens, token_lengths, block_causal)
        mu = self.length_regulator(h, 0, num_frames, frame_mask=frame_mask)  # (B, 80, F)
        spk = self.speaker_condition(speaker, batch)
        frames = frame_mask.sum() * config.n_mels
        prior = ((mu - mel) * frame_mask).pow(2).sum() / frames

        # A random prefix of the target mel as the prompt, as at inference with a voice prompt.
        cond = torch.zeros_like(mel)
        for row in range(batch):
            if random.random() < config.prompt_prob:
                prefix = random.randint(0, int(0.3 * int(frame_lengths[row])))
                cond[row, :, :prefix] = mel[row, :, :prefix]

        t = self._t_schedule(torch.rand(batch, 1, 1, device=mel.device, dtype=mel.dtype))
        noise = torch.randn_like(mel)
        x_t = (1 - (1 - config.sigma_min) * t) * noise + t * mel
        target_velocity = mel - (1 - config.sigma_min) * noise
        if config.training_cfg_rate > 0:  # drop all conditions together: learn the unconditional field
            keep = (torch.rand(batch, device=mel.device) > config.training_cfg_rate).to(mel.dtype)
            mu, spk, cond = mu * keep[:, None, None], spk * keep[:, None], cond * keep[:, None, None]
        predicted = self.estimator(x_t, frame_mask, mu, t.view(batch), spk, cond)
        flow = F.mse_loss(predicted * frame_mask, target_velocity * frame_mask, reduction="sum") / frames
        total = flow + prior_weight * prior if prior_weight else flow
        return {"loss": total, "flow": flow, "prior": prior} if parts else total

    # --- inference --------------------------------------------------------------------------
    def time_grid(self, n_timesteps: int | None = None) -> torch.Tensor:
        steps = n_timesteps or self.config.n_timesteps
        return self._t_schedule(torch.linspace(0, 1, steps + 1))

    @torch.no_grad()
    def start_noise(self, frame_start: int, frame_end: int, device, dtype) -> torch.Tensor:
        """(1, 80, F) where the ODE starts for frames [frame_start, frame_end): the stream's noise
        of those frames (`stream_noise`, the same offline and streamed) x `noise_scale`."""
        noise = stream_noise(self.config.noise_seed, frame_start, frame_end, self.config.n_mels, device)
        return (self.config.noise_scale * noise)[None].to(dtype)

    def sample(self, mu: torch.Tensor, noise: torch.Tensor, spk: torch.Tensor, cond: torch.Tensor,
               frame_mask: torch.Tensor | None = None, n_timesteps: int | None = None,
               cfg_rate: float | None = None, fixed_trajectory: torch.Tensor | None = None,
               return_trajectory: bool = False):
        """Euler-integrate dx/dt = v(x, t) from noise (t=0) to mel (t=1). All (B, 80, F) but spk (B, 80).

        Guidance: v = (1 + w) v(cond) - w v(uncond), both halves in one batch.
        `fixed_trajectory` (n_steps, B, 80, K) pins the first K frames to a known trajectory at every
        step (the streaming decoder's left context); `return_trajectory` returns x at every step.
        """
        cfg_rate = self.config.inference_cfg_rate if cfg_rate is None else cfg_rate
        grid = self.time_grid(n_timesteps).to(mu.device, mu.dtype)
        batch = mu.shape[0]
        if frame_mask is None:
            frame_mask = torch.ones(batch, 1, mu.shape[-1], device=mu.device, dtype=mu.dtype)
        x = noise
        trajectory = []
        if cfg_rate > 0:
            mu_in, spk_in, cond_in = (torch.cat([mu, torch.zeros_like(mu)]), torch.cat([spk, torch.zeros_like(spk)]),
                                      torch.cat([cond, torch.zeros_like(cond)]))
            mask_in = torch.cat([frame_mask, frame_mask])
        for step in range(len(grid) - 1):
            if fixed_trajectory is not None:
                pinned = fixed_trajectory.shape[-1]
                x = torch.cat([fixed_trajectory[step], x[:, :, pinned:]], dim=-1)
            if return_trajectory:
                trajectory.append(x)
            t, dt = grid[step], grid[step + 1] - grid[step]
            if cfg_rate > 0:
                both = self.estimator(torch.cat([x, x]), mask_in, mu_in, t.expand(2 * batch), spk_in, cond_in)
                conditional, unconditional = both[:batch], both[batch:]
                velocity = (1 + cfg_rate) * conditional - cfg_rate * unconditional
            else:
                velocity = self.estimator(x, frame_mask, mu, t.expand(batch), spk, cond)
            x = x + dt * velocity
        if return_trajectory:
            return x, torch.stack(trajectory)
        return x

    @torch.no_grad()
    def inference(self, tokens: torch.Tensor, speaker: torch.Tensor | None = None,
                  prompt_tokens: torch.Tensor | None = None, prompt_mel: torch.Tensor | None = None,
                  n_timesteps: int | None = None, block_causal: bool = True) -> torch.Tensor:
        """Offline: tokens (T,) -> mel (80, F) with F = frames_for_tokens(P + T) - frames_for_tokens(P).

        A voice prompt is `prompt_tokens` (P,) with its mel `prompt_mel` (80, >= frames_for_tokens(P));
        its frames condition the ODE and are cut from the output.
        """
        self.check_tokens(tokens)
        prompt_frames, cond_prefix = self.prepare_prompt(prompt_tokens, prompt_mel)
        all_tokens = tokens if prompt_tokens is None or prompt_tokens.numel() == 0 else torch.cat([prompt_tokens, tokens])
        device = self.encoder_proj.weight.device
        all_tokens = all_tokens.to(device).long()
        num_frames = frames_for_tokens(len(all_tokens))
        h = self.encode(all_tokens[None], block_causal=block_causal)
        mu = self.length_regulator(h, 0, num_frames)
        cond = torch.zeros_like(mu)
        if prompt_frames:
            cond[0, :, :prompt_frames] = cond_prefix.to(cond)
        noise = self.start_noise(0, num_frames, device, mu.dtype)
        mel = self.sample(mu, noise, self.speaker_condition(speaker, 1), cond, n_timesteps=n_timesteps)
        return mel[0, :, prompt_frames:]

    def prepare_prompt(self, prompt_tokens: torch.Tensor | None, prompt_mel: torch.Tensor | None):
        """-> (prompt frames P_f, prompt mel (80, P_f)) checked for consistency."""
        if prompt_tokens is None or prompt_tokens.numel() == 0:
            if prompt_mel is not None and prompt_mel.numel() > 0:
                raise FlowInputError("prompt_mel was given without prompt_tokens: pass the speech tokens of the prompt audio too")
            return 0, None
        self.check_tokens(prompt_tokens, "prompt_tokens")
        frames = frames_for_tokens(len(prompt_tokens))
        if prompt_mel is None:
            raise FlowInputError("prompt_tokens were given without prompt_mel: pass the prompt audio's mel (decoder/mel.py)")
        if prompt_mel.dim() != 2 or prompt_mel.shape[0] != self.config.n_mels:
            raise FlowInputError(f"prompt_mel must be ({self.config.n_mels}, frames), got {tuple(prompt_mel.shape)}")
        if prompt_mel.shape[1] < frames - 2:
            raise FlowInputError(
                f"prompt_mel has {prompt_mel.shape[1]} frames but its {len(prompt_tokens)} tokens need {frames}: "
                f"they do not come from the same audio")
        prompt_mel = prompt_mel[:, :frames]
        if prompt_mel.shape[1] < frames:  # at most two frames short: repeat the last frame
            prompt_mel = torch.cat([prompt_mel, prompt_mel[:, -1:].expand(-1, frames - prompt_mel.shape[1])], dim=1)
        return frames, prompt_mel
