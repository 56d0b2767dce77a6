"""`voicelm chat`: one turn with a pipeline from the command line.

    voicelm chat --audio question.wav --out reply.wav
    voicelm chat --text "what is seven plus five?" --out reply.wav --json

Prints the answer text as it streams (or, with --json, one JSON event per line: text deltas,
speech tokens, audio chunk headers, turn end with per-stage timings) and writes the spoken
answer to --out (16-bit wav at the decoder's 22,050 Hz, written atomically).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def add_arguments(parser) -> None:
    from voicelm.pipeline import add_pipeline_arguments

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", metavar="WAV", help="what the user says, as an audio file (any rate)")
    source.add_argument("--text", help="what the user types")
    parser.add_argument("--out", metavar="WAV", help="write the spoken answer here")
    parser.add_argument("--json", action="store_true", help="print the event stream as JSON lines")
    add_pipeline_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: GLM-4-Voice's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)


def main(args) -> int:
    from voicelm.core.audio import AudioError, load_audio, save_audio
    from voicelm.events import AudioChunk, Error, TextDelta, TurnEnd
    from voicelm.pipeline import PipelineError, open_pipeline

    err = sys.stderr
    try:
        pipeline = open_pipeline(args.pipeline, random_tiny=args.random_tiny)
    except PipelineError as exc:
        print(f"voicelm chat: {exc}", file=err)
        return 2
    options = {name: value for name, value in (
        ("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k),
        ("max_new_tokens", args.max_new_tokens)) if value is not None}
    try:
        session = pipeline.session(system=args.system, seed=args.seed, options=options or None)
        if args.audio is not None:
            wav = load_audio(args.audio)
            turn = session.respond(audio=wav, sample_rate=16000)
        else:
            turn = session.respond(text=args.text)
    except (AudioError, ValueError) as exc:
        print(f"voicelm chat: {exc}", file=err)
        return 2
    if not args.json:
        print(f"[model: {pipeline.describe()}]", file=err)
    audio, status = [], 0
    for event in turn:
        if args.json:
            print(json.dumps(event.to_dict()), flush=True)
        elif isinstance(event, TextDelta):
            print(event.text, end="", flush=True)
        if isinstance(event, AudioChunk):
            audio.append(event.samples)
        elif isinstance(event, Error):
            print(f"\nvoicelm chat: {event.message}", file=err)
            status = 1
        elif isinstance(event, TurnEnd) and not args.json:
            timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in event.timings.items())
            print(f"\n[{event.reason}; {event.audio_seconds:.2f} s of audio; {timings}]", file=err)
    if args.out and status == 0:
        if not audio:
            print("voicelm chat: the answer has no audio; nothing written", file=err)
            return 1
        save_audio(args.out, np.concatenate(audio), pipeline.sample_rate)
        if not args.json:
            print(f"[wrote {args.out}]", file=err)
    return status
