"""HiFT vocoder: 80-bin log-mel at 22,050 Hz / hop 256 -> waveform.

HiFT (HiFTNet) is a HiFi-GAN generator with a neural source filter (NSF) and an iSTFT head:

    mel (B, 80, F) ──► f0_predictor ──► F0 (B, F) ──► sine source (harmonics + noise) ─┐
       │                                               excitation (B, 1, F*256)        │ STFT
       └──► conv_pre ──► [LeakyReLU, ConvTranspose x8] + source fusion + resblocks ◄───┤
                         [LeakyReLU, ConvTranspose x8] + source fusion + resblocks ◄───┘
                         ──► conv_post ──► magnitude, phase (n_fft 16) ──► iSTFT hop 4 ──► wav

Each upsampling stage multiplies the frame rate (8 x 8 = 64) and the iSTFT hop gives the last
factor (64 x 4 = 256 samples per mel frame). Module names follow the official GLM-4-Voice /
CosyVoice `hift.pt`, so `convert_official_hift_state_dict` only renames weight-norm tensors.

Source cache (streaming). The excitation is a cumulative phase (a running sum of F0 over
samples), so cutting the mel into chunks would restart it at every join. `inference` returns
`source` (B, 1 + (nb_harmonics + 1) + 1, T): channel 0 is the excitation fed to the filter,
then the phase (in cycles) of every harmonic, then the sample position (modulo the noise
table). A caller that re-feeds the last k mel frames of one call at the start of the next
passes `source[..., -k * 256:]` back as `cache_source`: those samples are reused as they are
and the phases and the noise continue from their last sample, so the excitation is identical
to the one an offline call produces. `HiFTGenerator.push` / `flush` (inside
`with vocoder.streaming(B):`) do this bookkeeping with enough left context and look-ahead that
the streamed waveform equals the offline one to float precision.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from voicelm.core.audio import DECODER_SAMPLE_RATE
from voicelm.core.checkpoint import (
    CheckpointError,
    config_from_dict,
    load_part,
    load_state_strict,
    save_part,
)
from voicelm.core.streaming import StreamingModule, StreamingState

CHECKPOINT_KIND = "vocoder"
NOISE_TABLE_LENGTH = 1 << 16  # eval-mode noise repeats every 65,536 samples (~3 s)
_NOISE_SEED = 1234
_PHASE_SEED = 4321


@dataclasses.dataclass
class HiFTConfig:
    """Geometry of a HiFT generator. Defaults are the official GLM-4-Voice `hift.pt` geometry."""

    in_channels: int = 80  # mel bins
    base_channels: int = 512  # width after conv_pre; halves at every upsampling stage
    nb_harmonics: int = 8  # overtones above F0 in the sine source (nb_harmonics + 1 sines)
    sampling_rate: int = DECODER_SAMPLE_RATE
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced samples (unvoiced: nsf_alpha / 3)
    nsf_voiced_threshold: float = 10.0  # Hz; F0 at or below this counts as unvoiced
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_n_fft: int = 16
    istft_hop_length: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)  # one per upsampling stage
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_channels: int = 512  # width of the F0 predictor's conv stack
    f0_num_convs: int = 5
    # F0 in Hz = |read-out| x f0_output_scale. 1.0 in the official geometry; our own presets use
    # 100 (the read-out works in units of 100 Hz), which Adam's per-parameter steps learn in a
    # few hundred steps instead of tens of thousands.
    f0_output_scale: float = 1.0

    def __post_init__(self) -> None:
        # YAML and JSON give lists; the model wants tuples (hashable, immutable).
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "source_resblock_kernel_sizes"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            setattr(self, name, tuple(tuple(int(d) for d in ds) for ds in getattr(self, name)))
        problems = []
        stages = len(self.upsample_rates)
        if stages == 0 or len(self.upsample_kernel_sizes) != stages:
            problems.append("upsample_rates and upsample_kernel_sizes need the same non-zero length")
        if len(self.source_resblock_kernel_sizes) != stages or len(self.source_resblock_dilation_sizes) != stages:
            problems.append("source_resblock_kernel_sizes/dilation_sizes need one entry per upsampling stage")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if (kernel - rate) % 2 or kernel < rate:
                problems.append(f"upsample kernel {kernel} must be >= rate {rate} with an even difference")
        if self.base_channels % (2 ** stages):
            problems.append(f"base_channels {self.base_channels} must be divisible by 2**{stages}")
        if self.f0_output_scale <= 0:
            problems.append(f"f0_output_scale must be positive, got {self.f0_output_scale}")
        if self.istft_n_fft % self.istft_hop_length:
            problems.append("istft_n_fft must be a multiple of istft_hop_length")
        if problems:
            raise ValueError("invalid HiFTConfig: " + "; ".join(problems))

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame: product of upsample rates times the iSTFT hop."""
        return math.prod(self.upsample_rates) * self.istft_hop_length


# --- building blocks ----------------------------------------------------------------------

class Snake(nn.Module):
    """Periodic activation x + sin^2(alpha x) / alpha with a learned alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]  # (1, C, 1) against x (B, C, T)
        return x + torch.sin(alpha * x).pow(2) / (alpha + 1e-9)


def _init_conv(module: nn.Module) -> None:
    # Small initial weights (HiFi-GAN's choice) keep the untrained output quiet and stable.
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        nn.init.normal_(module.weight, 0.0, 0.01)


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: per dilation, snake-conv-snake-conv + skip."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2))
            for _ in dilations
        )
        for conv in (*self.convs1, *self.convs2):
            nn.init.normal_(conv.parametrizations.weight.original1, 0.0, 0.01)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """Mel (B, in_channels, F) -> F0 in Hz (B, F): a conv stack and a linear read-out."""

    def __init__(self, in_channels: int, channels: int, num_convs: int, output_scale: float = 1.0):
        super().__init__()
        self.output_scale = output_scale
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # official names: condnet.{0,2,4,...}
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = self.condnet(mel).transpose(1, 2)  # (B, F, C)
        return self.classifier(hidden).squeeze(-1).abs() * self.output_scale  # (B, F) Hz, non-negative


class SourceModule(nn.Module):
    """Harmonic-plus-noise excitation from a per-sample F0 (the NSF source).

    Sines at F0 x 1..nb_harmonics+1 (zeroed where unvoiced) plus noise are merged by a learned
    linear layer and tanh into one excitation channel. In training the noise and the harmonics'
    start phases are random; in eval mode they are fixed (a noise table indexed by sample
    position, seeded start phases) so that the same mel always gives the same waveform and a
    stream continues exactly where the previous chunk stopped.
    """

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.config = config
        self.num_sines = config.nb_harmonics + 1
        self.l_linear = nn.Linear(self.num_sines, 1)  # official name
        self._noise_table: torch.Tensor | None = None

    @property
    def state_channels(self) -> int:
        return 1 + self.num_sines + 1  # excitation, phase per sine, position

    def _eval_noise(self, positions: torch.Tensor) -> torch.Tensor:
        """Fixed standard-normal noise (B, num_sines, T) at absolute sample `positions` (B, T)."""
        if self._noise_table is None:
            generator = torch.Generator().manual_seed(_NOISE_SEED)
            self._noise_table = torch.randn(self.num_sines, NOISE_TABLE_LENGTH, generator=generator)
        table = self._noise_table.to(positions.device)
        return table[:, positions].permute(1, 0, 2)  # (num_sines, B, T) -> (B, num_sines, T)

    def forward(self, f0_samples: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        """f0 per sample (B, T) in Hz -> source state (B, state_channels, T), float32.

        `cache` (B, state_channels, S) is the state of the first S samples, taken from the end of
        an earlier call: it is reused as is and phases/positions continue from its last sample.
        """
        batch = f0_samples.shape[0]
        config = self.config
        f0 = f0_samples.detach().to(torch.float64)
        harmonic_numbers = torch.arange(1, self.num_sines + 1, device=f0.device, dtype=torch.float64)
        cycles_per_sample = f0[:, None, :] * harmonic_numbers[None, :, None] / config.sampling_rate  # (B, H+1, T)
        cached = 0 if cache is None else cache.shape[-1]
        if cache is None:
            if self.training:
                start_phase = torch.rand(batch, self.num_sines, device=f0.device, dtype=torch.float64)
            else:
                generator = torch.Generator().manual_seed(_PHASE_SEED)
                start_phase = torch.rand(self.num_sines, generator=generator, dtype=torch.float64)
                start_phase = start_phase.to(f0.device).expand(batch, -1)
            start_phase = start_phase.clone()
            start_phase[:, 0] = 0.0  # the fundamental starts at phase 0, as in the official NSF
            start_position = torch.zeros(batch, device=f0.device, dtype=torch.long)
            # Phase of sample n includes its own increment (a running sum), as the official SineGen.
            new_phase = start_phase[:, :, None] + torch.cumsum(cycles_per_sample, dim=-1)
        else:
            last_phase = cache[:, 1:1 + self.num_sines, -1].to(torch.float64)  # (B, H+1)
            start_position = cache[:, -1, -1].round().long() + 1
            new_phase = last_phase[:, :, None] + torch.cumsum(cycles_per_sample[:, :, cached:], dim=-1)
        new_phase = torch.remainder(new_phase, 1.0)  # (B, H+1, T - cached)
        steps = torch.arange(new_phase.shape[-1], device=f0.device)
        positions = torch.remainder(start_position[:, None] + steps[None, :], NOISE_TABLE_LENGTH)  # (B, T - cached)

        new_f0 = f0[:, None, cached:]  # (B, 1, T - cached)
        voiced = (new_f0 > config.nsf_voiced_threshold).to(torch.float32)
        sines = config.nsf_alpha * torch.sin(2 * math.pi * new_phase).to(torch.float32)
        noise_std = voiced * config.nsf_sigma + (1 - voiced) * config.nsf_alpha / 3
        noise = torch.randn_like(sines) if self.training else self._eval_noise(positions)
        harmonics = sines * voiced + noise_std * noise  # (B, H+1, T - cached)
        weight = self.l_linear.weight.float()
        bias = self.l_linear.bias.float()
        excitation = torch.tanh(F.linear(harmonics.transpose(1, 2), weight, bias)).transpose(1, 2)  # (B, 1, T')
        state = torch.cat([excitation, new_phase.float(), positions[:, None].float()], dim=1)
        if cache is not None:
            state = torch.cat([cache.to(state.dtype), state], dim=-1)
        return state


# --- the generator ------------------------------------------------------------------------

@dataclasses.dataclass
class HiFTStreamState(StreamingState):
    mel: torch.Tensor | None = None  # (B, in_channels, context + pending) frames not yet dropped
    context_frames: int = 0  # leading frames of `mel` already emitted (left context only)
    source: torch.Tensor | None = None  # source state of the context frames


@dataclasses.dataclass
class HiFTOutput:
    wav: torch.Tensor  # (B, F * hop_length)
    source: torch.Tensor  # (B, state_channels, F * hop_length): pass the tail back as cache_source
    f0: torch.Tensor  # (B, F) predicted F0 in Hz


class HiFTGenerator(StreamingModule[HiFTStreamState]):
    sample_rate: int
    hop_length: int

    def __init__(self, config: HiFTConfig):
        super().__init__()
        if not isinstance(config, HiFTConfig):
            raise TypeError(f"HiFTGenerator needs a HiFTConfig, got {type(config).__name__}")
        self.config = config
        self.sample_rate = config.sampling_rate
        self.hop_length = config.hop_length
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.n_fft = config.istft_n_fft

        self.m_source = SourceModule(config)
        self.conv_pre = weight_norm(nn.Conv1d(config.in_channels, config.base_channels, 7, padding=3))

        self.ups = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            channels_in, channels_out = config.base_channels // 2 ** i, config.base_channels // 2 ** (i + 1)
            self.ups.append(weight_norm(nn.ConvTranspose1d(channels_in, channels_out, kernel, rate, padding=(kernel - rate) // 2)))

        # The source enters every stage as its STFT (n_fft + 2 channels: real and imaginary
        # parts), downsampled to that stage's rate: stage i runs at prod(rates[:i+1]) x the mel
        # rate, the source STFT at prod(rates) x, so the downsampling factor is the product
        # of the remaining rates.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        stft_channels = self.n_fft + 2
        for i, (kernel, dilations) in enumerate(zip(config.source_resblock_kernel_sizes, config.source_resblock_dilation_sizes)):
            channels = config.base_channels // 2 ** (i + 1)
            factor = math.prod(config.upsample_rates[i + 1:])
            if factor == 1:
                self.source_downs.append(nn.Conv1d(stft_channels, channels, 1))
            else:
                self.source_downs.append(nn.Conv1d(stft_channels, channels, factor * 2, factor, padding=factor // 2))
            self.source_resblocks.append(ResBlock(channels, kernel, dilations))

        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            channels = config.base_channels // 2 ** (i + 1)
            for kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(channels, kernel, dilations))

        self.conv_post = weight_norm(nn.Conv1d(channels, stft_channels, 7, padding=3))
        for conv in (*self.ups, self.conv_post):
            nn.init.normal_(conv.parametrizations.weight.original1, 0.0, 0.01)
        self.f0_predictor = F0Predictor(config.in_channels, config.f0_channels, config.f0_num_convs,
                                        config.f0_output_scale)
        self.register_buffer("stft_window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    # --- core computation -------------------------------------------------------------------
    def _check_mel(self, mel: torch.Tensor) -> None:
        if not isinstance(mel, torch.Tensor):
            raise TypeError(f"mel must be a torch.Tensor (B, {self.config.in_channels}, frames), got {type(mel).__name__}")
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels:
            hint = " (add a batch dimension: mel[None])" if mel.dim() == 2 else ""
            raise ValueError(
                f"mel must have shape (batch, {self.config.in_channels}, frames), got {tuple(mel.shape)}{hint}"
            )
        if mel.shape[-1] == 0:
            raise ValueError("mel has 0 frames: nothing to vocode")
        if not mel.is_floating_point():
            raise ValueError(f"mel must be a floating-point tensor, got {mel.dtype}")
        if not torch.isfinite(mel).all():
            raise ValueError("mel contains NaN or inf values: check the model that produced it")

    def _check_cache(self, cache_source: torch.Tensor, mel: torch.Tensor) -> None:
        total = mel.shape[-1] * self.hop_length
        if cache_source.dim() != 3 or cache_source.shape[0] != mel.shape[0]:
            raise ValueError(
                f"cache_source must be (batch={mel.shape[0]}, channels, samples) from an earlier call's "
                f"`source`, got {tuple(cache_source.shape)}"
            )
        if cache_source.shape[1] not in (1, self.m_source.state_channels):
            raise ValueError(
                f"cache_source has {cache_source.shape[1]} channels; pass a slice of the `source` that "
                f"inference returned ({self.m_source.state_channels} channels) or an excitation (1 channel)"
            )
        if cache_source.shape[-1] > total:
            raise ValueError(
                f"cache_source covers {cache_source.shape[-1]} samples but this mel only gives {total}; "
                f"cache at most the samples of the mel frames you feed again"
            )

    def _source(self, f0: torch.Tensor, cache_source: torch.Tensor | None) -> torch.Tensor:
        f0_samples = f0.repeat_interleave(self.hop_length, dim=-1)  # (B, F) -> (B, F * hop)
        if cache_source is not None and cache_source.shape[-1] == 0:
            cache_source = None
        if cache_source is not None and cache_source.shape[1] == 1:
            # An excitation-only cache (official GLM-4-Voice style): overwrite the first samples;
            # the phases restart, as they do in the official stack.
            source = self.m_source(f0_samples)
            source = source.clone()
            source[:, :1, :cache_source.shape[-1]] = cache_source.float()
            return source
        return self.m_source(f0_samples, cache_source)

    def _stft(self, excitation: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(excitation, self.n_fft, self.config.istft_hop_length, self.n_fft,
                          window=self.stft_window.float(), return_complex=True)  # (B, n_fft/2+1, frames)
        return torch.cat([spec.real, spec.imag], dim=1)  # (B, n_fft + 2, frames)

    def _decode(self, mel: torch.Tensor, excitation: torch.Tensor) -> torch.Tensor:
        """Filter: mel (B, C, F) + excitation (B, F * hop) -> waveform (B, F * hop)."""
        dtype = mel.dtype
        source_spec = self._stft(excitation.float()).to(dtype)  # (B, n_fft + 2, F * 64 + 1)
        x = self.conv_pre(mel)  # (B, base, F)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.config.lrelu_slope))  # (B, base / 2^(i+1), F * rates[:i+1])
            if i == len(self.ups) - 1:
                # One extra sample on the left so the length matches the source STFT's
                # F * 64 + 1 frames (a centred STFT has one frame more than samples / hop).
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # official: default slope (0.01) here
        bins = self.n_fft // 2 + 1
        # exp then clip at 100, as the official head, but clipped before exp so that a large
        # log-magnitude cannot overflow to inf (whose gradient would be NaN in training).
        magnitude = torch.exp(x[:, :bins].float().clamp(max=math.log(1e2)))  # (B, bins, frames)
        phase = torch.sin(x[:, bins:]).float()  # the official head squashes phase with sin
        spec = torch.polar(magnitude, phase)
        wav = torch.istft(spec, self.n_fft, self.config.istft_hop_length, self.n_fft,
                          window=self.stft_window.float())  # (B, (frames - 1) * hop) = (B, F * 256)
        return wav.clamp(-self.config.audio_limit, self.config.audio_limit).to(dtype)

    def forward_full(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None) -> HiFTOutput:
        """Waveform, source state and predicted F0 (the training solver uses the F0)."""
        self._check_mel(mel)
        if cache_source is not None:
            self._check_cache(cache_source, mel)
        f0 = self.f0_predictor(mel)  # (B, F)
        source = self._source(f0, cache_source)  # (B, state_channels, F * hop)
        wav = self._decode(mel, source[:, 0])
        return HiFTOutput(wav=wav, source=source, f0=f0)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, F) -> waveform (B, F * 256), differentiable (training)."""
        return self.forward_full(mel).wav

    @torch.no_grad()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, F) -> (wav (B, F * 256), source (B, state_channels, F * 256)).

        To continue a stream, start the next mel with the last k frames of this one and pass
        `source[..., -k * 256:]` as `cache_source` (k >= 1; the official stack uses k = 1).
        """
        with parametrize.cached():
            out = self.forward_full(mel, cache_source)
        return out.wav, out.source

    # --- streaming (moshi style) --------------------------------------------------------------
    @property
    def receptive_field_frames(self) -> int:
        """Mel frames on each side that can change one output sample (rounded up, with margin)."""
        config = self.config
        def resblock_reach(kernel: int, dilations: tuple[int, ...]) -> int:
            return sum((kernel - 1) // 2 * (d + 1) for d in dilations)
        reach = 3.0  # conv_pre, in frames
        rate = 1
        for i, (up_rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            rate *= up_rate
            main = max(resblock_reach(k, d) for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes))
            source = resblock_reach(config.source_resblock_kernel_sizes[i], config.source_resblock_dilation_sizes[i])
            reach += (kernel / up_rate + max(main, source)) / rate
        reach += (3 + self.n_fft / config.istft_hop_length) / rate  # conv_post and the iSTFT window
        reach = max(reach, config.f0_num_convs + 1)  # the F0 predictor feeds the source too
        return int(math.ceil(reach)) + 1

    def _init_streaming_state(self, batch_size: int) -> HiFTStreamState:
        return HiFTStreamState(batch_size=batch_size)

    def _run_window(self, state: HiFTStreamState, emit_frames: int) -> torch.Tensor:
        mel, context = state.mel, state.context_frames
        wav, source = self.inference(mel, cache_source=state.source)
        hop = self.hop_length
        end = context + emit_frames
        keep = min(self.receptive_field_frames, end)
        state.mel = mel[:, :, end - keep:]
        state.source = source[:, :, (end - keep) * hop:end * hop]
        state.context_frames = keep
        return wav[:, context * hop:end * hop]

    def push(self, mel: torch.Tensor) -> torch.Tensor:
        """Streaming: feed mel frames (B, 80, n), get the waveform that is final so far (B, m * 256).

        Output lags the input by `receptive_field_frames` frames of look-ahead; `flush()` returns
        the rest at the end. The concatenation equals `inference(whole_mel)` to float precision.
        """
        state = self.streaming_state
        self._check_mel(mel)
        if mel.shape[0] != state.batch_size:
            raise ValueError(f"stream was opened for batch {state.batch_size}, got mel batch {mel.shape[0]}")
        state.mel = mel if state.mel is None else torch.cat([state.mel, mel.to(state.mel)], dim=-1)
        pending = state.mel.shape[-1] - state.context_frames
        ready = pending - self.receptive_field_frames
        if ready <= 0:
            return mel.new_zeros(state.batch_size, 0)
        return self._run_window(state, ready)

    def flush(self) -> torch.Tensor:
        """Streaming: the waveform of every frame pushed but not yet returned; ends the stream."""
        state = self.streaming_state
        if state.mel is None:
            return torch.zeros(state.batch_size, 0)
        pending = state.mel.shape[-1] - state.context_frames
        wav = self._run_window(state, pending) if pending > 0 else state.mel.new_zeros(state.batch_size, 0)
        self._streaming_state = self._init_streaming_state(state.batch_size)
        return wav

    # --- checkpoints --------------------------------------------------------------------------
    def remove_weight_norm(self) -> "HiFTGenerator":
        """Fold weight norm into plain weights (faster inference; no longer loads/saves its checkpoint keys)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self

    def save_pretrained(self, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write a `vocoder` part checkpoint (config.json + model.safetensors) atomically."""
        if any(True for _ in self._folded_modules()):
            raise CheckpointError("this generator had remove_weight_norm() applied; save before folding")
        return save_part(directory, CHECKPOINT_KIND, self.config, self.state_dict(), dtype=dtype)

    def _folded_modules(self):
        for module in (self.conv_pre, self.conv_post, *self.ups):
            if not parametrize.is_parametrized(module, "weight"):
                yield module

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> "HiFTGenerator":
        """Load a `vocoder` part checkpoint written by `save_pretrained` (or the converter)."""
        config_dict, state = load_part(directory, CHECKPOINT_KIND)
        config = config_from_dict(HiFTConfig, config_dict, where=f"{directory}/config.json")
        model = cls(config)
        load_state_strict(model, state, where=str(directory))
        return model.to(device).eval()


# --- official checkpoint import ------------------------------------------------------------

def convert_official_hift_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Official `hift.pt` (CosyVoice HiFTGenerator) state dict -> this module's state dict.

    The module names are the same; only weight norm is stored differently: the official file
    was written with the old `torch.nn.utils.weight_norm` (`<name>.weight_g`, `.weight_v`),
    newer CosyVoice files use parametrizations (already our format). A `generator.` prefix (a
    file saved from the GAN wrapper) or `module.` prefix (DDP) is stripped; discriminator
    weights are dropped.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a state dict (mapping of names to tensors), got {type(state_dict).__name__}")
    items = dict(state_dict)
    if any(k.startswith("generator.") for k in items):
        items = {k[len("generator."):]: v for k, v in items.items() if k.startswith("generator.")}
    converted: dict[str, torch.Tensor] = {}
    for key, value in items.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key} is a {type(value).__name__}, not a tensor: is this really hift.pt?")
        if key.endswith(".weight_g"):
            key = key[: -len(".weight_g")] + ".parametrizations.weight.original0"
        elif key.endswith(".weight_v"):
            key = key[: -len(".weight_v")] + ".parametrizations.weight.original1"
        converted[key] = value
    if "conv_pre.parametrizations.weight.original1" not in converted:
        raise CheckpointError(
            "no conv_pre weights found: this is not a HiFT generator state dict (expected keys like "
            "conv_pre.weight_v, ups.0.weight_v, m_source.l_linear.weight, f0_predictor.condnet.0.weight_v)"
        )
    return converted


def infer_hift_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> HiFTConfig:
    """Read the widths and kernel sizes of a (converted) HiFT state dict into a HiFTConfig.

    Strides (upsample rates, iSTFT hop) and NSF constants are not stored in weights: they
    come from `overrides` or the official defaults.
    """
    def weight(name: str) -> torch.Tensor:
        for key in (f"{name}.parametrizations.weight.original1", f"{name}.weight"):
            if key in state_dict:
                return state_dict[key]
        raise CheckpointError(f"state dict has no weight for {name}: not a HiFT generator")

    conv_pre = weight("conv_pre")  # (base, in, 7)
    stages = len({k.split(".")[1] for k in state_dict if k.startswith("ups.")})
    kernels_per_stage = len({k.split(".")[1] for k in state_dict if k.startswith("resblocks.")}) // max(stages, 1)
    values: dict[str, Any] = dict(
        in_channels=conv_pre.shape[1],
        base_channels=conv_pre.shape[0],
        nb_harmonics=weight("m_source.l_linear").shape[1] - 1,
        upsample_kernel_sizes=tuple(weight(f"ups.{i}").shape[-1] for i in range(stages)),
        istft_n_fft=weight("conv_post").shape[0] - 2,
        resblock_kernel_sizes=tuple(weight(f"resblocks.{j}.convs1.0").shape[-1] for j in range(kernels_per_stage)),
        source_resblock_kernel_sizes=tuple(weight(f"source_resblocks.{i}.convs1.0").shape[-1] for i in range(stages)),
        f0_channels=weight("f0_predictor.condnet.0").shape[0],
        f0_num_convs=len({k.split(".")[2] for k in state_dict if k.startswith("f0_predictor.condnet.")}),
    )
    if stages != 2 and "upsample_rates" not in overrides:
        raise CheckpointError(f"{stages} upsampling stages found: pass upsample_rates=... explicitly")
    values.update(overrides)
    return HiFTConfig(**values)
