"""FALLBACK vocoder: Griffin-Lim inversion of the decoder's log-mel. Not a trained vocoder.

Use it only for a decoder that has no trained HiFT yet (e.g. to listen to a flow model early
in training): it inverts the mel filterbank by least squares (torchaudio InverseMelScale) and
estimates the missing phase by Griffin-Lim iterations (torchaudio GriffinLim). Speech comes out
intelligible but buzzy/metallic, and each call is independent (no state across chunks), so
chunk joins are not phase-continuous. It has the same `inference(mel, cache_source=None)`
signature as `HiFTGenerator` so the streaming decoder can use either; `cache_source` is
accepted and ignored, and the returned source is always None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio

from decoder.mel import MelConfig


class GriffinLimVocoder(torch.nn.Module):
    """Fallback mel -> waveform by Griffin-Lim (no weights). See the module docstring."""

    is_fallback = True

    def __init__(self, mel_config: MelConfig = MelConfig(), n_iter: int = 32, momentum: float = 0.99):
        super().__init__()
        if not isinstance(mel_config, MelConfig):
            raise TypeError(f"GriffinLimVocoder needs a decoder.mel.MelConfig, got {type(mel_config).__name__}")
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.mel_config = mel_config
        self.sample_rate = mel_config.sample_rate
        self.hop_length = mel_config.hop_length
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=mel_config.n_fft // 2 + 1,
            n_mels=mel_config.n_mels,
            sample_rate=mel_config.sample_rate,
            f_min=mel_config.f_min,
            f_max=mel_config.f_max,
            norm="slaney",
            mel_scale="slaney",
        )
        self.n_iter = n_iter
        self.momentum = momentum
        self.register_buffer("window", torch.hann_window(mel_config.win_length), persistent=False)

    @torch.no_grad()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Log-mel (B, n_mels, F) as made by `decoder.mel.mel_spectrogram` -> (wav (B, F * hop), None)."""
        config = self.mel_config
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[1] != config.n_mels:
            shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise ValueError(f"mel must be a tensor of shape (batch, {config.n_mels}, frames), got {shape}")
        if mel.shape[-1] == 0:
            raise ValueError("mel has 0 frames: nothing to vocode")
        if not torch.isfinite(mel).all():
            raise ValueError("mel contains NaN or inf values: check the model that produced it")
        frames = mel.shape[-1]
        magnitude_mel = torch.exp(mel.float())  # undo the natural log
        linear = self.inverse_mel.to(mel.device)(magnitude_mel)  # (B, n_fft / 2 + 1, F)
        length = frames * self.hop_length
        # A centred STFT of F * hop samples has F + 1 frames: repeat the last one.
        linear = torch.cat([linear, linear[..., -1:]], dim=-1)  # (B, n_fft / 2 + 1, F + 1)
        # Fixed start phase (rand_init=False): the same mel always gives the same waveform.
        wav = torchaudio.functional.griffinlim(
            linear, self.window.to(mel.device), config.n_fft, config.hop_length, config.win_length,
            power=1.0,  # decoder.mel is a magnitude mel
            n_iter=self.n_iter, momentum=self.momentum, length=length, rand_init=False,
        )  # (B, F * hop), frame i centred on sample i * hop
        # decoder.mel centres frame i on sample i * hop + hop / 2; GriffinLim's frame i is
        # centred on sample i * hop, so shift right by half a hop to line the two up.
        shift = self.hop_length // 2
        wav = F.pad(wav, (shift, 0))[..., :length]
        return wav.clamp(-1.0, 1.0).to(mel.dtype), None

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.inference(mel)[0]
