"""What `voicelm lm average` and `voicelm decoder average` share: weights, dtypes, the command line.

Both write the weighted mean of checkpoints fine-tuned from one model ("model soup"); each part's
module knows how to load, check and save its own checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


class AverageError(ValueError):
    """Checkpoints that cannot be averaged, or bad weights; the message says which and why."""


def normalised_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """One weight per checkpoint (equal when None), scaled to sum 1; a clear error otherwise."""
    if count < 2:
        raise AverageError(f"averaging needs at least two checkpoints, got {count}")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise AverageError(f"{len(weights)} weights for {count} checkpoints; give one weight per checkpoint")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise AverageError(f"weights must be non-negative with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights]


def stored_dtypes(weights_file: str | Path) -> dict[str, torch.dtype]:
    """The floating dtype each top-level module of a safetensors file is stored in ({"flow": float16,
    "vocoder": float32}), read from the header without loading the tensors."""
    from safetensors import safe_open

    found: dict[str, torch.dtype] = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                found.setdefault(key.split(".", 1)[0], dtype)
    return found


def add_average_arguments(parser: argparse.ArgumentParser, part: str, dtype_help: str) -> None:
    parser.add_argument("checkpoints", nargs="+", help=f"{part} directories")
    parser.add_argument("--out", required=True, help=f"where to write the averaged {part} (must not exist)")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one weight per checkpoint (normalised to sum 1; default: equal)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)


def refuse_existing_out(command: str, out: str | Path) -> Path:
    """--out as a Path; refused before anything is read when it exists (nothing is overwritten)."""
    out = Path(out)
    if out.exists():
        raise SystemExit(f"{command}: {out} already exists; choose a new --out directory")
    return out
