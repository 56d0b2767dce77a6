"""`voicelm lm average`: a weighted average of LM checkpoints of one geometry and tokenizer.

Fine-tuning phases from one starting point land in nearby weights; averaging them ("model
soup") often keeps what each phase gained while undoing some of the drift it added. The demo
recipe uses it to merge a short targeted fine-tune with the model it started from
(`docs/recipe.md`, session 17).

    voicelm lm average models/demo/voicelm runs/recipe-demo/runs/lm-p17a/export --out DIR \
        [--weights 0.5 0.5] [--dtype float16]

The average is taken in float32 whatever the files hold, then written in `--dtype`
(default: the first checkpoint's). The parts must share their config and text tokenizer
exactly; otherwise the command says which differs and writes nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch

from voicelm.core.averaging import (DTYPES, AverageError, add_average_arguments, normalised_weights,  # noqa: F401
                                     refuse_existing_out, stored_dtypes)
from voicelm.lm.model import VoiceLM, _weight_files


def average_lms(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> VoiceLM:
    """The weighted average (float32) of the LM parts in `paths`; weights are normalised to sum 1."""
    weights = normalised_weights(len(paths), weights)
    first = VoiceLM.from_pretrained(paths[0], dtype=torch.float32)
    state = {k: v.clone() * weights[0] for k, v in first.model.state_dict().items()}
    for path, weight in zip(paths[1:], weights[1:]):
        other = VoiceLM.from_pretrained(path, dtype=torch.float32)
        if other.config != first.config:
            raise AverageError(f"{path}: its config differs from {paths[0]}'s ({other.config} vs {first.config}); "
                               f"only checkpoints of one geometry can be averaged")
        if other.text_tokenizer.to_str() != first.text_tokenizer.to_str():
            raise AverageError(f"{path}: its text tokenizer differs from {paths[0]}'s; average only fine-tunes of "
                               f"one model")
        for k, v in other.model.state_dict().items():
            state[k] += v * weight
    first.model.load_state_dict(state)
    return first


def _stored_dtype(directory: str | os.PathLike) -> torch.dtype:
    """The floating dtype a part's weights are stored in (read from the file header)."""
    return next(iter(stored_dtypes(_weight_files(Path(directory))[0]).values()), torch.float32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_average_arguments(parser, "LM part (config.json, model.safetensors)",
                          "dtype of the written weights (default: the first checkpoint's)")


def main(args: argparse.Namespace) -> int:
    out = refuse_existing_out("voicelm lm average", args.out)
    try:
        lm = average_lms(args.checkpoints, args.weights)
    except AverageError as exc:
        raise SystemExit(f"voicelm lm average: {exc}") from None
    dtype = DTYPES[args.dtype] if args.dtype is not None else _stored_dtype(args.checkpoints[0])
    lm.save_pretrained(out, dtype=dtype)
    print(f"averaged {len(args.checkpoints)} checkpoints into {out} ({str(dtype).removeprefix('torch.')})")
    return 0
