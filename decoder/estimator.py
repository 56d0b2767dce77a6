"""The flow-matching estimator: a 1-D U-Net with transformer blocks (Matcha-TTS / CosyVoice shape).

It predicts the velocity field v(x_t, t | mu, speaker, prompt) of conditional flow matching. The
four inputs are stacked on the channel axis (x, mu, speaker broadcast over time, prompt mel:
4 x 80 = 320 channels), then go down through `channels` levels (resnet block + transformer blocks +
stride-2 conv), through `num_mid_blocks` middle levels, and back up with skip connections.

Module and parameter names follow the released GLM-4-Voice `flow.pt` (`down_blocks.i.0` resnet,
`down_blocks.i.1.j` transformer, `down_blocks.i.2` resampler, `time_mlp.linear_1`, ...), so the
official estimator loads without renaming. Written from the published architecture, not copied.

One deliberate option: `frame_local_norm`. The official blocks use GroupNorm over (channels, time),
a statistic of the whole utterance, which no streaming decoder can reproduce chunk by chunk. With
`frame_local_norm=True` (our own presets) the same parameters normalise each frame over its channel
groups only, so a frame's features depend on its neighbours only through convolutions and attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the config lives with the flow model; imported only for type hints
    from decoder.flow import FlowConfig


class GroupNorm1d(nn.GroupNorm):
    """GroupNorm on (B, C, T) that can normalise per frame instead of over the whole sequence."""

    def __init__(self, num_groups: int, num_channels: int, frame_local: bool):
        super().__init__(num_groups, num_channels)
        self.frame_local = frame_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frame_local:
            return super().forward(x)
        batch, channels, frames = x.shape
        grouped = x.reshape(batch, self.num_groups, channels // self.num_groups, frames)  # (B, G, C/G, T)
        mean = grouped.mean(dim=2, keepdim=True)
        var = grouped.var(dim=2, unbiased=False, keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape(batch, channels, frames)
        return normed * self.weight[:, None] + self.bias[:, None]


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """(B,) flow times in [0, 1] -> (B, dim): sin half then cos half, log-spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = scale * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, t_embedding: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_embedding)))


class ConvNormMish(nn.Module):
    """conv3 -> group norm -> Mish, on masked input (official name: Block1D)."""

    def __init__(self, dim_in: int, dim_out: int, frame_local_norm: bool, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim_in, dim_out, 3, padding=1), GroupNorm1d(groups, dim_out, frame_local_norm), nn.Mish()
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock(nn.Module):
    """Two conv blocks with the time embedding added between them, plus a 1x1 residual path."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, frame_local_norm: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = ConvNormMish(dim_in, dim_out, frame_local_norm)
        self.block2 = ConvNormMish(dim_out, dim_out, frame_local_norm)
        self.res_conv = nn.Conv1d(dim_in, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb)[:, :, None]
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, frames, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

        out = F.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)),
            attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch, frames, self.heads * self.head_dim)  # (B, T, h*hd)
        return self.to_out[1](self.to_out[0](out))


class GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward (official: Matcha's BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GeluProj(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), attn_mask)
        h = self.norm3(x)
        for layer in self.ff.net:
            h = layer(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalUNet1D(nn.Module):
    """v = estimator(x_t (B, 80, T), mask (B, 1, T), mu (B, 80, T), t (B,), spk (B, 80), cond (B, 80, T))."""

    def __init__(self, config: "FlowConfig"):
        super().__init__()
        self.config = config
        in_channels = 4 * config.n_mels  # x, mu, speaker, prompt
        channels = tuple(config.unet_channels)
        time_dim = 4 * channels[0]
        local = config.frame_local_norm
        self.in_channels = in_channels
        self.time_mlp = TimeMLP(in_channels, time_dim)

        def transformer_stack(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, config.unet_heads, config.unet_head_dim, config.unet_dropout)
                for _ in range(config.unet_blocks)
            )

        self.down_blocks = nn.ModuleList()
        dim_out = in_channels
        for level, width in enumerate(channels):
            dim_in, dim_out = dim_out, width
            is_last = level == len(channels) - 1
            resample = nn.Conv1d(dim_out, dim_out, 3, padding=1) if is_last else Downsample(dim_out)
            self.down_blocks.append(
                nn.ModuleList([ResnetBlock(dim_in, dim_out, time_dim, local), transformer_stack(dim_out), resample])
            )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock(channels[-1], channels[-1], time_dim, local), transformer_stack(channels[-1])])
            for _ in range(config.unet_mid_blocks)
        )
        up_widths = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for level in range(len(up_widths) - 1):
            dim_in, dim_out = up_widths[level] * 2, up_widths[level + 1]  # *2: skip connection concatenated
            is_last = level == len(up_widths) - 2
            resample = nn.Conv1d(dim_out, dim_out, 3, padding=1) if is_last else Upsample(dim_out)
            self.up_blocks.append(
                nn.ModuleList([ResnetBlock(dim_in, dim_out, time_dim, local), transformer_stack(dim_out), resample])
            )
        self.final_block = ConvNormMish(up_widths[-1], up_widths[-1], local)
        self.final_proj = nn.Conv1d(up_widths[-1], config.n_mels, 1)
        self.input_shortcut = None
        if config.input_shortcut:
            # Initialised to v = mu - x: the straight path from x toward the condition, which is the
            # exact field at t = 0 once mu approximates the mel (the prior loss); the U-Net learns the rest.
            self.input_shortcut = nn.Conv1d(in_channels, config.n_mels, 1)
            with torch.no_grad():
                self.input_shortcut.weight.zero_()
                self.input_shortcut.bias.zero_()
                eye = torch.eye(config.n_mels)
                self.input_shortcut.weight[:, : config.n_mels, 0] = -eye  # x
                self.input_shortcut.weight[:, config.n_mels: 2 * config.n_mels, 0] = eye  # mu

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        # (B, 1, T) frame mask -> (B, 1, T, T) boolean "may attend": padding keys are hidden; padded
        # queries see everything (their output is masked away later) so no softmax row is empty.
        # With config.attention_window = W, a frame sees only keys at most W frames away.
        valid = mask[:, 0].bool()  # (B, T)
        allowed = valid[:, None, None, :]
        window = self.config.attention_window
        if window is not None:
            positions = torch.arange(mask.shape[-1], device=mask.device)
            allowed = allowed & ((positions[None, :] - positions[:, None]).abs() <= window)[None, None]
        return allowed | ~valid[:, None, :, None]

    def _run_transformers(self, blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = self._attention_mask(mask)
        h = x.transpose(1, 2)  # (B, T, C)
        for block in blocks:
            h = block(h, attn_mask)
        return h.transpose(1, 2)  # (B, C, T)

    def forward(self, x, mask, mu, t, spk, cond) -> torch.Tensor:
        time_emb = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels))  # (B, 4*C0)
        frames = x.shape[-1]
        h = torch.cat([x, mu, spk[:, :, None].expand(-1, -1, frames), cond], dim=1)  # (B, 320, T)
        shortcut = self.input_shortcut(h * mask) if self.input_shortcut is not None else 0.0  # (B, 80, T)

        skips, masks = [], [mask]
        for resnet, transformers, downsample in self.down_blocks:
            level_mask = masks[-1]
            h = resnet(h, level_mask, time_emb)
            h = self._run_transformers(transformers, h, level_mask)
            skips.append(h)
            h = downsample(h * level_mask)
            masks.append(level_mask[:, :, ::2])
        masks.pop()  # the mask after the last (non-downsampling) level is not used
        mid_mask = masks[-1]
        for resnet, transformers in self.mid_blocks:
            h = resnet(h, mid_mask, time_emb)
            h = self._run_transformers(transformers, h, mid_mask)
        for resnet, transformers, upsample in self.up_blocks:
            level_mask, skip = masks.pop(), skips.pop()
            h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)  # transposed conv may overshoot by one
            h = resnet(h, level_mask, time_emb)
            h = self._run_transformers(transformers, h, level_mask)
            h = upsample(h * level_mask)
        h = self.final_block(h, level_mask)
        return (self.final_proj(h * level_mask) + shortcut) * mask
