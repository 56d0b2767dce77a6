"""`voicelm decoder average`: a weighted average of the flow models of decoder checkpoints.

A flow fine-tuned from a trained one lands near it in weight space; averaging the two often keeps
part of what the fine-tune gained and part of what it lost (the same "model soup" as `voicelm lm
average`). Session 22 scored such averages of the demo flow (`docs/recipe.md`).

    voicelm decoder average models/demo runs/recipe-demo/runs/flow-f3/export --out DIR \
        [--weights 0.5 0.5] [--dtype float16] [--vocoder-dtype float32]

Only the flows are averaged. The vocoder is the first checkpoint's, unchanged: a vocoder is trained
on one flow's mels (or true mels) and is not a fine-tune of the others', and a run's own export may
carry the Griffin-Lim fallback. So list the decoder whose vocoder you want first. The flows must
share their geometry; sampling settings (steps, guidance, noise, attention window) are the first
checkpoint's. Each argument is a decoder part directory or a pipeline directory holding decoder/.
The average is taken in float32; the written dtypes default to what the first checkpoint stores.
Nothing is written when the checkpoints cannot be averaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch

from decoder.cli import resolve_checkpoint
from decoder.flow import SAMPLING_SETTINGS
from decoder.model import SpeechDecoder
from voicelm.core.averaging import (DTYPES, AverageError, add_average_arguments, normalised_weights,  # noqa: F401
                                     refuse_existing_out, stored_dtypes)
from voicelm.core.checkpoint import WEIGHTS_NAME, CheckpointError


def _geometry(decoder: SpeechDecoder) -> dict:
    """The flow config without its sampling settings (which may differ between averaged flows)."""
    return {k: v for k, v in dataclasses.asdict(decoder.config).items() if k not in SAMPLING_SETTINGS}


def average_decoders(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> SpeechDecoder:
    """The first decoder (float32) with its flow replaced by the weighted average of all the flows;
    weights are normalised to sum 1."""
    weights = normalised_weights(len(paths), weights)
    dirs = [resolve_checkpoint(p) for p in paths]

    def load(directory: Path) -> SpeechDecoder:
        try:
            return SpeechDecoder.from_pretrained(directory).float()
        except (CheckpointError, FileNotFoundError, OSError) as exc:
            raise AverageError(f"{directory}: not a loadable decoder checkpoint ({exc})") from None

    first = load(dirs[0])
    state = {k: v.clone() * weights[0] if v.is_floating_point() else v.clone()
             for k, v in first.flow.state_dict().items()}
    for directory, weight in zip(dirs[1:], weights[1:]):
        other = load(directory)
        if _geometry(other) != _geometry(first):
            differs = sorted(k for k, v in _geometry(other).items() if _geometry(first).get(k) != v)
            raise AverageError(f"{directory}: its flow differs from {dirs[0]}'s in {', '.join(differs)}; only flows "
                               f"of one geometry can be averaged")
        for k, v in other.flow.state_dict().items():
            if v.is_floating_point():
                state[k] += v * weight
    first.flow.load_state_dict(state)
    return first


def part_dtypes(directory: str | os.PathLike) -> tuple[torch.dtype, torch.dtype]:
    """The floating dtypes a decoder part stores its flow and its vocoder in (from the file header)."""
    found = stored_dtypes(resolve_checkpoint(directory) / WEIGHTS_NAME)
    flow = found.get("flow", torch.float32)
    return flow, found.get("vocoder", flow)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_average_arguments(parser, "decoder part (or pipeline with decoder/); the vocoder is the first's",
                          "dtype of the written flow (default: the first checkpoint's)")
    parser.add_argument("--vocoder-dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written vocoder (default: the first checkpoint's)")


def main(args: argparse.Namespace) -> int:
    out = refuse_existing_out("voicelm decoder average", args.out)
    try:
        decoder = average_decoders(args.checkpoints, args.weights)
    except AverageError as exc:
        raise SystemExit(f"voicelm decoder average: {exc}") from None
    flow_dtype, vocoder_dtype = part_dtypes(args.checkpoints[0])
    flow_dtype = DTYPES[args.dtype] if args.dtype else flow_dtype
    vocoder_dtype = DTYPES[args.vocoder_dtype] if args.vocoder_dtype else vocoder_dtype
    decoder.save_pretrained(out, dtype=flow_dtype, vocoder_dtype=vocoder_dtype)
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    print(f"averaged the flows of {len(args.checkpoints)} decoders into {out} (flow {name(flow_dtype)}, "
          f"vocoder of {args.checkpoints[0]}, {name(vocoder_dtype)})")
    return 0
