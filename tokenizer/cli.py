"""`voicelm tokenize`: audio file -> speech token ids as JSON, or a whole manifest.

    voicelm tokenize speech.wav [--checkpoint DIR]          # prints [12, 873, ...]
    voicelm tokenize --manifest in.jsonl --out out.jsonl     # adds "tokens" to every row
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CHECKPOINT_HINT = "pass --checkpoint DIR (a tokenizer directory, e.g. PIPELINE/tokenizer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", nargs="?", help="audio file (wav, flac, ogg, mp3; any rate, mono or stereo)")
    parser.add_argument("--checkpoint", help="tokenizer directory (config.json + model.safetensors)")
    parser.add_argument("--manifest", help="JSONL manifest to tokenize (instead of one file)")
    parser.add_argument("--out", help="output manifest with a `tokens` field per row (with --manifest)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mel-floor", choices=["fixed", "segment_max"], default=None,
                        help="override the checkpoint's log-mel floor mode")


def _default_checkpoint() -> Path | None:
    # The tokenizer of the shipped default pipeline, when there is one.
    from voicelm.core.paths import DEFAULT_PIPELINE

    candidate = DEFAULT_PIPELINE / "tokenizer"
    return candidate if (candidate / "config.json").exists() else None


def main(args: argparse.Namespace) -> int:
    from voicelm.core.audio import AudioError, load_audio
    from voicelm.core.checkpoint import CheckpointError
    from voicelm.core.manifest import ManifestError

    from tokenizer.manifest_tokens import tokenize_manifest
    from tokenizer.model import SpeechTokenizer

    if (args.audio is None) == (args.manifest is None):
        print("voicelm tokenize: give either AUDIO or --manifest IN.jsonl --out OUT.jsonl", file=sys.stderr)
        return 2
    if args.manifest and not args.out:
        print("voicelm tokenize: --manifest needs --out OUT.jsonl", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint) if args.checkpoint else _default_checkpoint()
    if checkpoint is None:
        print(f"voicelm tokenize: no tokenizer found; {DEFAULT_CHECKPOINT_HINT}", file=sys.stderr)
        return 2
    try:
        tokenizer = SpeechTokenizer.from_pretrained(checkpoint, mel_floor=args.mel_floor)
        if args.manifest:
            out = tokenize_manifest(tokenizer, args.manifest, args.out, batch_size=args.batch_size, progress=True)
            print(f"wrote {out}", file=sys.stderr)
        else:
            tokens = tokenizer.encode(load_audio(args.audio), max_seconds=None)
            print(json.dumps(tokens.tolist()))
    except (AudioError, CheckpointError, ManifestError) as exc:
        print(f"voicelm tokenize: {exc}", file=sys.stderr)
        return 1
    return 0
