"""Synthetic speech: render speed (x real time) per engine and Whisper-base word error per engine.

    .venv/bin/python bench/synth_wer.py [--sentences 20] [--jobs 1 2] [--seed 0]

Renders the same sentences with random espeak voices (accents, variants, speed, pitch) and with
piper (random length_scale), side by side in one run, then transcribes every render with the
Whisper base weights converted from the registry package and prints the word error per engine
(Whisper's English normalizer on both sides, so "seven" == "7").
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from voicelm.core.audio import load_audio
from voicelm.core.manifest import read_manifest
from voicelm.core.whisper_weights import load_whisper, normalized_wer, transcribe
from voicelm.data.synth import plan_items, synthesize_manifest

SENTENCES = [
    "What is seven plus five?", "Seven plus five is twelve.", "What is three times four?",
    "Please spell the word garden.", "Count from one to ten.", "And what about plus two?",
    "Say it again, but slowly.", "Repeat after me: the sun is bright.", "How many letters are in apple?",
    "Nine minus six is three.", "What comes after fourteen?", "Eleven plus eight is nineteen.",
    "Can you count backwards from five?", "The word dog is spelled d o g.", "Twenty divided by four is five.",
    "What is half of sixteen?", "Tell me a number bigger than ten.", "Two plus two is four.",
    "I would like to hear that one more time.", "Thank you, that is all for today.",
]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return f"{model}; {torch.get_num_threads()} torch threads; {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=20)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sentences = (SENTENCES * (args.sentences // len(SENTENCES) + 1))[: args.sentences]
    print(f"machine: {machine()}")
    model = load_whisper("base")
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("espeak", "piper"):
            items = plan_items(sentences, [engine], 1, args.seed)
            manifest = None
            for jobs in args.jobs:
                out = Path(tmp) / f"{engine}-j{jobs}"
                start = time.perf_counter()
                manifest = synthesize_manifest(items, out, jobs=jobs, seed=args.seed)
                seconds = time.perf_counter() - start
                audio = sum(u.duration for u in read_manifest(manifest))
                print(f"{engine:<7} jobs={jobs}: {len(items)} clips, {audio:6.1f} s audio in {seconds:5.1f} s "
                      f"= {audio / seconds:6.1f}x real time (includes worker start-up)")
            utterances = read_manifest(manifest)
            start = time.perf_counter()
            heard = [transcribe(model, load_audio(u.audio_path, u.extra["sample_rate"]).numpy(),
                                u.extra["sample_rate"]) for u in utterances]
            wer = normalized_wer([u.text for u in utterances], heard)
            print(f"{engine:<7} Whisper-base WER {wer:.3f} over {len(utterances)} clips "
                  f"(transcribed in {time.perf_counter() - start:.0f} s)")
            worst = sorted(zip(utterances, heard), key=lambda p: -normalized_wer([p[0].text], [p[1]]))[:3]
            for utt, text in worst:
                print(f"    {utt.speaker:<36} said {utt.text!r} heard {text!r}")


if __name__ == "__main__":
    main()
