"""Building blocks: Whisper-compatible attention blocks that take masks, the causal conv stem,
and the Whisper text decoder used as ASR head.

Parameter names and shapes follow openai-whisper (`attn.query/key/value/out`, `attn_ln`,
`mlp.0/mlp.2`, `mlp_ln`, `cross_attn`, `token_embedding`, ...), so an openai-whisper
checkpoint loads into these modules key for key. Whisper's own blocks ignore custom masks,
which block-causal attention and padded batches need; hence our own.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # a key bias shifts every score of a query equally
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, -1).transpose(1, 2)  # (B, H, T, Dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, Tq, D), k/v (B, Tk, D) already projected; mask broadcastable to (B, H, Tq, Tk), True = may attend."""
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=mask)
        batch, _, length, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, length, -1))  # (B, Tq, D)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        return self.attend(self.query(x), self.key(source), self.value(source), mask)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (self attention, optional cross attention, GELU MLP)."""

    def __init__(self, n_state: int, n_head: int, n_ffn: int | None = None, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        n_ffn = n_ffn or 4 * n_state
        self.mlp = nn.Sequential(nn.Linear(n_state, n_ffn), nn.GELU(), nn.Linear(n_ffn, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                xa: torch.Tensor | None = None, xa_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa, mask=xa_mask)
        return x + self.mlp(self.mlp_ln(x))

    def forward_cached(self, x: torch.Tensor, cache: "KVCache") -> torch.Tensor:
        """Self attention over everything cached so far plus `x`, all of it visible.

        Used by the stream: with block-causal attention a complete block sees every earlier
        frame and every frame of its own block, so no mask is needed.
        """
        h = self.attn_ln(x)
        cache.append(self.attn.key(h), self.attn.value(h))
        x = x + self.attn.attend(self.attn.query(h), cache.keys, cache.values, None)
        return x + self.mlp(self.mlp_ln(x))


@dataclasses.dataclass
class KVCache:
    keys: torch.Tensor | None = None  # (B, T, D)
    values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=1)


def block_causal_mask(length: int, block_size: int, key_valid: torch.Tensor | None = None,
                      device: torch.device | None = None) -> torch.Tensor:
    """(T, T) or (B, 1, T, T) bool: frame i may attend frame j iff block(j) <= block(i).

    This equals "causal OR same block" (full inside a block, causal across blocks).
    `key_valid` (B, T) removes padded keys.
    """
    block = torch.arange(length, device=device) // block_size
    mask = block[None, :] <= block[:, None]  # (T, T)
    if key_valid is not None:
        mask = mask[None, None] & key_valid[:, None, None, :]  # (B, 1, T, T)
    return mask


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so output frame t never sees input after t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.context = kernel_size - 1  # input frames from before the chunk that an output needs

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T); `history` (B, C, context) are the frames before x (zeros at the start)."""
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], self.context)
        return super().forward(torch.cat([history, x], dim=-1))


class TextDecoder(nn.Module):
    """Whisper's text decoder (same parameters), with a padding mask on the audio features."""

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # tied output: keep first logits small
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state).normal_(0, 0.01))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_state)

    def forward(self, tokens: torch.Tensor, xa: torch.Tensor, xa_valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L) long, xa (B, T, D) audio features, xa_valid (B, T) bool -> logits (B, L, V)."""
        length = tokens.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ValueError(f"transcript of {length} tokens exceeds the decoder context {self.positional_embedding.shape[0]}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        xa_mask = None if xa_valid is None else xa_valid[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask=causal, xa=xa, xa_mask=xa_mask)
        x = self.ln(x)
        return x @ self.token_embedding.weight.T  # tied output projection, as Whisper
