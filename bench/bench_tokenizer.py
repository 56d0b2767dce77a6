"""Tokenizer encode speed (x real time), offline and streaming, for the demo and glm4voice
geometries with random weights, on this machine's CPU.

    .venv/bin/python bench/bench_tokenizer.py [--seconds 20] [--presets demo glm4voice] [--threads 2]

Offline = `encode` of the whole clip; streaming = `stream()` fed 80 ms pieces (1280 samples)
plus `flush()`. Both run in the same process, side by side, best of --repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import time

import torch

from voicelm.core.presets import load_preset

from tokenizer import SpeechTokenizer, TokenizerConfig


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--presets", nargs="+", default=["demo", "glm4voice"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--piece", type=int, default=1280, help="streaming piece in samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    audio = (0.1 * torch.randn(int(args.seconds * 16000))).clamp(-1, 1)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); torch threads {args.threads}; load average {load}; "
          f"audio {args.seconds:.0f} s; fp32; random weights; stream pieces {args.piece} samples")
    print(f"{'preset':<10} {'params':>8} {'offline xRT':>12} {'stream xRT':>11} {'stream/offline':>15} {'first tokens at':>16}")
    for name in args.presets:
        # "fixed" floor so that both modes run the same front end (glm4voice ships segment_max).
        config = dataclasses.replace(TokenizerConfig(**load_preset("tokenizer", name)), asr_head=False, mel_floor="fixed")
        model = SpeechTokenizer(config).eval()
        params = sum(p.numel() for p in model.parameters()) + model.quantizer.codebook.numel()

        def offline():
            return model.encode(audio, 16000)

        def streaming():
            stream = model.stream()
            out = [stream.push(audio[i:i + args.piece]) for i in range(0, audio.numel(), args.piece)]
            out.append(stream.flush())
            return torch.cat(out)

        with torch.inference_mode():
            assert torch.equal(offline(), streaming())
            t_off = best_time(offline, args.repeats)
            t_str = best_time(streaming, args.repeats)
        print(f"{name:<10} {params / 1e6:7.1f}M {args.seconds / t_off:11.1f}x {args.seconds / t_str:10.1f}x "
              f"{t_str / t_off:14.2f}x {config.block_samples / 16000:14.2f} s")


if __name__ == "__main__":
    main()
