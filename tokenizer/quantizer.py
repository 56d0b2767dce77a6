"""The single-codebook quantizer: one wrapper around `vector_quantize_pytorch.VectorQuantize`.

Every argument that changes behaviour is passed explicitly, so an upgrade of the library
cannot silently change what the tokenizer learns: plain Euclidean nearest neighbour (no
cosine, no projection), EMA codebook updates with Laplace smoothing (the codebook is a
buffer, not a learnable parameter), commitment loss, optional dead-code restarts from
the current batch, straight-through gradients (the library's rotation trick is off).
Padding is passed as `mask=` so it never moves the codebook or the loss.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize


@dataclasses.dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, T, D), straight-through in training; zeros at padding
    indices: torch.Tensor  # (B, T) long; -1 at padding
    commit_loss: torch.Tensor  # scalar, already weighted by commitment_weight
    counts: torch.Tensor  # (codebook_size,) how often each code was chosen in this batch


class SpeechQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int, *, decay: float, commitment_weight: float,
                 kmeans_init: bool, threshold_ema_dead_code: float):
        super().__init__()
        self.codebook_size = codebook_size
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=dim,  # no projection in or out: the official codebook lives in model space
            heads=1,
            decay=decay,
            eps=1e-5,
            kmeans_init=kmeans_init,
            kmeans_iters=10,
            use_cosine_sim=False,
            threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=commitment_weight,
            commitment_use_cross_entropy_loss=False,
            orthogonal_reg_weight=0.0,
            codebook_diversity_loss_weight=0.0,
            stochastic_sample_codes=False,
            straight_through=False,
            rotation_trick=False,  # plain straight-through estimator, as GLM-4-Voice
            directional_reparam=False,
            learnable_codebook=False,
            ema_update=True,
            sync_codebook=None,  # the library syncs EMA statistics under torch.distributed
            return_zeros_for_masked_padding=True,
        )

    @property
    def codebook(self) -> torch.Tensor:
        """(codebook_size, dim) the code vectors used for lookup."""
        return self.vq._codebook.embed[0]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """features (B, T, D), mask (B, T) bool True = real frame.

        In training the library updates the codebook (EMA, k-means init, restarts); in eval
        mode nothing changes: nearest codes only, so evaluation equals inference.
        """
        if not self.training:
            indices = self.nearest(features)
            quantized = self.lookup(indices)
            keep = torch.ones_like(indices, dtype=torch.bool) if mask is None else mask
            error = (features - quantized).pow(2).mean(-1)[keep]
            commit_loss = self.vq.commitment_weight * (error.mean() if error.numel() else error.sum())
            indices = indices.masked_fill(~keep, -1)
            quantized = quantized * keep[..., None]
            counts = torch.bincount(indices[keep], minlength=self.codebook_size)
            return QuantizerOutput(quantized, indices, commit_loss, counts)
        quantized, indices, commit_loss = self.vq(features, mask=mask)
        valid = indices[indices >= 0] if mask is not None else indices.reshape(-1)
        counts = torch.bincount(valid.reshape(-1), minlength=self.codebook_size)
        return QuantizerOutput(quantized, indices, commit_loss.reshape(()), counts)

    @torch.no_grad()
    def nearest(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) indices of the nearest codes, without touching any statistics."""
        codebook = self.codebook.to(features.dtype)
        flat = features.reshape(-1, features.shape[-1])
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
        distances = codebook.pow(2).sum(-1)[None] - 2 * flat @ codebook.T  # (N, K)
        return distances.argmin(-1).reshape(features.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices]


def codebook_stats(counts: torch.Tensor, ema_cluster_size: torch.Tensor | None = None,
                   dead_threshold: float = 1e-3) -> dict[str, float]:
    """Usage figures from code counts: perplexity (2^entropy), share of codes used, dead codes.

    Dead codes are those whose EMA count has fallen below `dead_threshold` (never chosen for a
    long time); without EMA statistics they are the codes unused in `counts`.
    """
    counts = counts.double()
    total = counts.sum().clamp(min=1)
    probs = counts / total
    entropy = -(probs[probs > 0] * probs[probs > 0].log2()).sum()
    used = int((counts > 0).sum())
    size = counts.numel()
    if ema_cluster_size is not None:
        dead = int((ema_cluster_size < dead_threshold).sum())
    else:
        dead = size - used
    return {"perplexity": float(2 ** entropy), "codes_used": float(used),
            "share_used": used / size, "dead_codes": float(dead)}
