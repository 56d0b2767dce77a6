"""Vocoder speed on this machine: real-time factor (compute seconds per audio second) of HiFT
presets offline and streamed, and of the Griffin-Lim fallback, measured side by side.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_vocoder.py [--seconds 4] [--repeats 3] [--clock cpu]

Weights are random (speed does not depend on their values). RTF < 1 means faster than real time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

from decoder.griffinlim import GriffinLimVocoder
from decoder.hift import HiFTConfig, HiFTGenerator
from voicelm.core.audio import MEL_FRAMES_PER_TOKEN
from voicelm.core.checkpoint import config_from_dict
from voicelm.core.presets import load_preset


def timed(fn, repeats: int) -> float:
    """Median seconds per call: CPU time of this process (--clock cpu, robust when other jobs
    share the machine; equals wall time on an idle machine with one thread) or wall time."""
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


CLOCK = "wall"


def stream(model: HiFTGenerator, mel: torch.Tensor, chunk_frames: int) -> None:
    with model.streaming(1):
        for start in range(0, mel.shape[-1], chunk_frames):
            model.push(mel[:, :, start:start + chunk_frames])
        model.flush()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["demo", "glm4voice"])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.manual_seed(0)
    frames = int(args.seconds * 22050 / 256)
    mel = torch.randn(1, 80, frames) - 4.0
    chunk = round(10 * MEL_FRAMES_PER_TOKEN)  # 10 speech tokens = 69 mel frames per push
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"clock: {args.clock} time")
    print(f"audio: {args.seconds:.1f} s ({frames} mel frames); streamed in pushes of {chunk} frames (10 tokens)")
    print(f"{'vocoder':<28}{'params':>10}{'offline RTF':>14}{'stream RTF':>13}{'stream/offline':>16}")
    for preset in args.presets:
        model = HiFTGenerator(config_from_dict(HiFTConfig, load_preset("vocoder", preset))).eval()
        params = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            offline = timed(lambda: model.inference(mel), args.repeats) / args.seconds
            streamed = timed(lambda: stream(model, mel, chunk), args.repeats) / args.seconds
            model.remove_weight_norm()
            folded = timed(lambda: model.inference(mel), args.repeats) / args.seconds
        print(f"{'hift ' + preset:<28}{params / 1e6:>9.2f}M{offline:>14.3f}{streamed:>13.3f}{streamed / offline:>16.2f}")
        print(f"{'hift ' + preset + ' (weight norm folded)':<28}{'':>10}{folded:>14.3f}{'':>13}{folded / offline:>16.2f}")
    griffin = GriffinLimVocoder()
    with torch.inference_mode():
        gl = timed(lambda: griffin.inference(mel), args.repeats) / args.seconds
    print(f"{'griffin-lim (32 iters)':<28}{'0':>10}{gl:>14.3f}{'-':>13}{'-':>16}")


if __name__ == "__main__":
    main()
