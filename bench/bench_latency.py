"""First-audio latency: end of user audio -> first audio sample out, P50/P90 over 20 utterances.

    .venv/bin/python bench/bench_latency.py                 # tiny random pipeline (+ default if present)
    .venv/bin/python bench/bench_latency.py --pipeline DIR  # a given pipeline

For each utterance (espeak-ng sentences; 16 kHz) the user audio is pushed through the streaming
tokenizer as it would arrive, then the clock starts ("end of user audio"):
  tokenizer flush   tokens of the last partial block
  LM prefill        prompt (history-free) prefill + first token
  LM steps 2..23    the 22 further steps before the decoder's first chunk in the 13:26 layout
                    (13 text + 10 speech tokens)
  decoder 1st chunk flow + vocoder on the first 10 speech tokens
The stage figures are measured on those exact steps; "sum" is their total, the first-audio
latency of a model that follows the 13 text + 10 speech layout. "session" is the measured
end-to-end figure of `Session.respond` (tokenizer flush + TurnEnd.timings["first_audio"]),
whatever layout the model produced (a random tiny LM puts speech right after 1 text token).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voicelm import DEFAULT_PIPELINE  # noqa: E402
from voicelm.core.audio import load_audio  # noqa: E402
from voicelm.events import TurnEnd  # noqa: E402

SENTENCES = [
    "What is seven plus five?", "Count from one to ten.", "How do you spell cat?", "Say hello slowly.",
    "What is three times four?", "And plus two?", "Repeat after me: good morning.", "What is nine minus six?",
    "Spell the word dog.", "What is twenty minus eight?", "Tell me a number.", "What comes after eleven?",
    "Is five bigger than three?", "Say it again, please.", "What is two plus two?", "Count down from five.",
    "How many legs does a cat have?", "What is ten plus ten?", "Say goodbye.", "What is one plus zero?",
]
FIRST_AUDIO_LAYOUT_STEPS = 23  # 13 text + 10 speech tokens


def utterances(n: int) -> list[np.ndarray]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            text = SENTENCES[i % len(SENTENCES)]
            path = Path(tmp) / f"{i}.wav"
            if shutil.which("espeak-ng"):
                voice = ["en-us", "en", "en-gb-x-rp", "en-us+f3"][i % 4]
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(140 + 10 * (i % 5)), "-w", str(path), text],
                               check=True, capture_output=True)
                out.append(load_audio(path).numpy())
            else:  # no espeak: noise bursts of similar length
                out.append((np.random.default_rng(i).standard_normal(24_000) * 0.1).astype(np.float32))
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def measure(pipeline, audios: list[np.ndarray]) -> dict[str, list[float]]:
    from voicelm.lm.generate import SamplingOptions, VoiceLMGen

    stages = {k: [] for k in ("tokenizer flush", "LM prefill", "LM steps 2..23", "decoder 1st chunk", "sum", "session")}
    options = SamplingOptions(temperature=0.2, top_p=0.8, max_new_tokens=60, seed=0)
    for audio in audios:
        # user audio arrives in 100 ms pieces while the user speaks; only the flush is after the end
        stream = pipeline.new_token_stream()
        tokens = []
        for start in range(0, len(audio), 1600):
            tokens += stream.push(torch.from_numpy(audio[start:start + 1600]))
        t = time.perf_counter()
        tokens += stream.flush()
        flush = time.perf_counter() - t

        prompt = pipeline.build_prompt([], pipeline.default_system, user_speech=tokens)
        gen = VoiceLMGen(pipeline.lm, prompt, options)
        t = time.perf_counter()
        gen.step()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        steps = 1
        while steps < FIRST_AUDIO_LAYOUT_STEPS and gen.step() is not None:
            steps += 1
        rest = time.perf_counter() - t

        decoder_stream = pipeline.new_audio_stream()
        decoder_stream.reset()
        codes = [int(c) for c in np.random.default_rng(len(tokens)).integers(0, pipeline.vocab.speech_vocab_size,
                                                                             pipeline.first_chunk_tokens)]
        t = time.perf_counter()
        chunks = decoder_stream.push(codes)
        first_chunk = time.perf_counter() - t
        assert chunks, "the decoder gave no audio after its first chunk of tokens"

        session = pipeline.session(seed=0)
        end = [e for e in session.respond(speech_tokens=tokens, tokenize_seconds=flush,
                                          options={"max_new_tokens": 40}) if isinstance(e, TurnEnd)][0]
        stages["tokenizer flush"].append(flush)
        stages["LM prefill"].append(prefill)
        stages["LM steps 2..23"].append(rest)
        stages["decoder 1st chunk"].append(first_chunk)
        stages["sum"].append(flush + prefill + rest + first_chunk)
        if "first_audio" in end.timings:
            stages["session"].append(flush + end.timings["first_audio"])
    return stages


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, no GPU, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", action="append", default=[], help="pipeline directory (repeatable)")
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    from voicelm.pipeline import load_pipeline
    from voicelm.testing import build_tiny_pipeline

    pipelines = [("tiny (random)", build_tiny_pipeline(None))]
    dirs = list(args.pipeline)
    if not dirs and (DEFAULT_PIPELINE / "voicelm").exists():
        dirs.append(str(DEFAULT_PIPELINE))
    pipelines += [(Path(d).name, load_pipeline(d)) for d in dirs]
    if not dirs:
        print(f"(no default pipeline at {DEFAULT_PIPELINE}: only the tiny one is measured)")

    audios = utterances(args.utterances)
    seconds = [len(a) / 16000 for a in audios]
    print(f"machine: {machine()}")
    print(f"{len(audios)} utterances, {min(seconds):.1f}-{max(seconds):.1f} s each; times in ms (P50 / P90)")
    for name, pipeline in pipelines:
        measure(pipeline, audios[: args.warmup])  # warm-up: allocator, first-call overheads
        stages = measure(pipeline, audios)
        print(f"\n{name}: {pipeline.describe()}")
        print(f"  {'stage':<20} {'P50':>8} {'P90':>8}")
        for stage, values in stages.items():
            if values:
                print(f"  {stage:<20} {pct(values, 50):8.1f} {pct(values, 90):8.1f}")
        total = statistics.median(stages["sum"])
        shares = ", ".join(f"{k} {100 * statistics.median(v) / total:.0f}%" for k, v in stages.items()
                           if k not in ("sum", "session") and v)
        print(f"  share of the median sum: {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
