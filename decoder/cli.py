"""`voicelm synthesize TOKENS --out x.wav [--stream] [--checkpoint DIR]`: speech token ids -> wav.

TOKENS is a JSON list of ids (`[12, 7, 4021]`), or a file holding one (a JSON list, a JSON object
with a `tokens` list as `voicelm tokenize` writes, or whitespace/comma separated ids).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from decoder.flow import FlowInputError
from voicelm.core.audio import save_audio
from voicelm.core.checkpoint import CheckpointError


def parse_tokens(text_or_path: str) -> list[int]:
    """Token ids from a JSON list, or from a file (JSON list, {"tokens": [...]}, or plain ids)."""
    path = Path(text_or_path)
    text = path.read_text() if not text_or_path.lstrip().startswith("[") and path.is_file() else text_or_path
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = [int(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise FlowInputError(
                f"TOKENS must be a JSON list of ids like [12, 7, 4021] or a file holding one; got {text_or_path[:60]!r}"
                + ("" if path.exists() else " (no such file)")) from None
    if isinstance(value, dict):
        value = value.get("tokens")
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FlowInputError("TOKENS must be a list of integer speech token ids (or {\"tokens\": [...]})")
    if not value:
        raise FlowInputError("TOKENS is empty: pass at least one speech token id")
    return value


def resolve_checkpoint(directory: str) -> Path:
    path = Path(directory)
    if (path / "decoder" / "config.json").exists() and not (path / "config.json").exists():
        return path / "decoder"  # a pipeline directory
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tokens", help="JSON list of speech token ids, or a file holding them")
    parser.add_argument("--out", required=True, help="output wav path (22,050 Hz, 16-bit)")
    parser.add_argument("--checkpoint", required=True,
                        help="decoder directory (config.json + model.safetensors) or a pipeline directory with decoder/")
    parser.add_argument("--stream", action="store_true",
                        help="decode with the StreamingDecoder (chunks as they would stream) instead of offline")
    parser.add_argument("--first-chunk", type=int, default=10, help="tokens before the first chunk (--stream)")
    parser.add_argument("--chunk", type=int, nargs="+", default=[20, 40], help="later chunk sizes in tokens (--stream)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps of the flow ODE (default: the model's)")


def main(args: argparse.Namespace) -> int:
    from decoder.model import SpeechDecoder
    from decoder.streaming import StreamingDecoder

    try:
        tokens = parse_tokens(args.tokens)
        decoder = SpeechDecoder.from_pretrained(resolve_checkpoint(args.checkpoint))
        if decoder.is_fallback_vocoder:
            print("note: this decoder has no trained vocoder; using the Griffin-Lim FALLBACK (buzzy audio)")
        started = time.perf_counter()
        if args.stream:
            stream = StreamingDecoder(decoder, args.first_chunk, tuple(args.chunk), n_timesteps=args.steps)
            chunks = stream.push(tokens)
            first_chunk_s = time.perf_counter() - started
            chunks += stream.finish()
            wav = torch.cat(chunks)
            print(f"{len(chunks)} chunks; first after {first_chunk_s:.2f} s")
        else:
            wav = decoder.decode(tokens, n_timesteps=args.steps)
    except (FlowInputError, CheckpointError, ValueError) as exc:
        print(f"voicelm synthesize: {exc}")
        return 1
    elapsed = time.perf_counter() - started
    seconds = wav.numel() / decoder.sample_rate
    save_audio(args.out, wav, decoder.sample_rate)
    print(f"wrote {args.out}: {seconds:.2f} s of audio in {elapsed:.2f} s (real-time factor {elapsed / seconds:.2f})")
    return 0
