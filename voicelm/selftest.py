"""`voicelm selftest`: show that the install works on real audio, in well under a minute.

Renders a few sentences with espeak-ng and piper, transcribes them with the real Whisper base
weights converted from the registry package (offline), prints each transcript and the word
error per engine, and exits non-zero when any engine's word error is above its limit (or any
step fails). It checks, end to end: the system TTS tools, the piper voice, the CT2 -> Whisper
conversion, audio validation/resampling and the Whisper front end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SENTENCES = (
    "What is seven plus five?",
    "Please spell the word garden.",
    "Count from one to five.",
)
# Fixed, clear voices: the self-test checks the install, not how well Whisper copes with odd voices.
VOICES = {"espeak": "espeak:en-us+f2:s150", "piper": "piper:joe:ls1.00"}
# Whisper base misses some robotic espeak words; piper speech is near perfect. Above these
# limits something is broken (wrong weights, wrong sample rate, clipped or silent audio).
MAX_WER = {"espeak": 0.5, "piper": 0.2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="base", help="Whisper model to judge with (default base)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the rendered audio in this directory")


def run(model_name: str = "base", keep: Path | None = None, out=sys.stdout) -> dict[str, float]:
    """Render, transcribe and score; returns the word error per engine."""
    from voicelm.core.audio import load_audio
    from voicelm.core.whisper_weights import load_whisper, normalized_wer, transcribe
    from voicelm.data.synth import Voice, render

    start = time.perf_counter()
    print(f"[selftest] loading Whisper {model_name} (converted from the installed package on first use)", file=out)
    model = load_whisper(model_name)
    print(f"[selftest] model ready in {time.perf_counter() - start:.1f} s", file=out)
    scores = {}
    with tempfile.TemporaryDirectory(prefix="voicelm-selftest-") as tmp:
        folder = keep if keep is not None else Path(tmp)
        for engine, speaker in VOICES.items():
            voice = Voice.parse(speaker)
            hypotheses = []
            for i, sentence in enumerate(SENTENCES):
                result = render(sentence, voice, folder / f"{engine}-{i}.wav")
                audio = load_audio(result.path, result.sample_rate)
                heard = transcribe(model, audio.numpy(), result.sample_rate)
                hypotheses.append(heard)
                print(f"  {speaker:<28} {result.duration:4.1f} s  said: {sentence!r}\n"
                      f"  {'':<28}         heard: {heard!r}", file=out)
            scores[engine] = normalized_wer(list(SENTENCES), hypotheses)
    for engine, wer in scores.items():
        verdict = "ok" if wer <= MAX_WER[engine] else f"TOO HIGH (limit {MAX_WER[engine]})"
        print(f"[selftest] {engine}: word error {wer:.3f} {verdict}", file=out)
    print(f"[selftest] done in {time.perf_counter() - start:.1f} s", file=out)
    return scores


def main(args: argparse.Namespace) -> int:
    try:
        scores = run(args.model, args.keep)
    except Exception as exc:  # the self-test's job is to say what is broken, in one line
        print(f"[selftest] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    failed = [engine for engine, wer in scores.items() if wer > MAX_WER[engine]]
    if failed:
        print(f"[selftest] FAILED: word error too high for {', '.join(failed)}", file=sys.stderr)
        return 1
    print("[selftest] PASSED: speech synthesis and offline Whisper work")
    return 0
