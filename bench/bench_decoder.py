"""Decoder benchmark: cost per chunk as the answer grows, and real-time factor streaming vs offline.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_decoder.py [--preset demo] [--chunks 30]

Random weights (cost does not depend on what the weights are). Three ways to make chunk k of
an answer streamed in chunks of `--chunk` tokens, timed side by side in one run:
  ours       StreamingDecoder: cached encoder keys/values, estimator on a bounded window
  reencode   StreamingDecoder(reencode=True): the encoder re-runs over every earlier token
  reference  GLM-4-Voice's flow_inference: the whole flow (encoder + ODE over every frame) re-runs
             with all earlier tokens and their mel as the prompt
Chunk costs are flow only (tokens -> mel); the vocoder costs the same per chunk in all three.
The real-time factor (compute seconds / audio seconds) includes the HiFT vocoder (`--vocoder`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

from decoder import SpeechDecoder, StreamingDecoder
from decoder.flow import FlowConfig, frames_for_tokens
from decoder.hift import HiFTConfig, HiFTGenerator
from voicelm.core.checkpoint import config_from_dict
from voicelm.core.presets import load_preset


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def chunk_times(decoder: SpeechDecoder, tokens: torch.Tensor, chunk: int, reencode: bool) -> list[float]:
    stream = StreamingDecoder(decoder, first_chunk_tokens=chunk, chunk_tokens=(chunk,), vocode=False, reencode=reencode)
    times = []
    for start in range(0, len(tokens), chunk):
        began = time.perf_counter()
        stream.push(tokens[start:start + chunk])
        times.append(time.perf_counter() - began)
    return times


def reference_chunk_time(decoder: SpeechDecoder, tokens: torch.Tensor, chunk: int, index: int) -> float:
    """GLM-4-Voice style: chunk `index` (0-based) re-runs the flow with every earlier token as prompt."""
    earlier = tokens[: index * chunk]
    new = tokens[index * chunk:(index + 1) * chunk]
    prompt_mel = torch.randn(80, frames_for_tokens(len(earlier))) if len(earlier) else None
    began = time.perf_counter()
    decoder.flow.inference(new, prompt_tokens=earlier if len(earlier) else None, prompt_mel=prompt_mel)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="decoder preset (conf/decoder/)")
    parser.add_argument("--vocoder", default="demo", help="HiFT preset (conf/vocoder/) for the real-time factor")
    parser.add_argument("--chunk", type=int, default=20, help="tokens per chunk")
    parser.add_argument("--chunks", type=int, default=30, help="chunks in the answer")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()
    if args.chunks < 4:
        parser.error("--chunks must be at least 4 (chunk 3 is compared with the last)")

    torch.manual_seed(0)
    flow_config = config_from_dict(FlowConfig, load_preset("decoder", args.preset))
    vocoder = HiFTGenerator(config_from_dict(HiFTConfig, load_preset("vocoder", args.vocoder)))
    decoder = SpeechDecoder(flow_config, vocoder).eval()
    tokens = torch.randint(0, flow_config.vocab_size, (args.chunk * args.chunks,))
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, no GPU; torch {torch.__version__}")
    print(f"decoder preset {args.preset} ({sum(p.numel() for p in decoder.flow.parameters()) / 1e6:.1f} M flow params), "
          f"vocoder {args.vocoder}; answer of {args.chunks} chunks x {args.chunk} tokens "
          f"({len(tokens) / 12.5:.0f} s of speech)")

    with torch.inference_mode():
        third, last = 2, args.chunks - 1
        ours = [chunk_times(decoder, tokens, args.chunk, reencode=False) for _ in range(args.repeats)]
        reenc = [chunk_times(decoder, tokens, args.chunk, reencode=True) for _ in range(args.repeats)]
        ref3 = statistics.median(reference_chunk_time(decoder, tokens, args.chunk, third) for _ in range(args.repeats))
        ref30 = statistics.median(reference_chunk_time(decoder, tokens, args.chunk, last) for _ in range(args.repeats))

        def at(runs, index):
            return statistics.median(run[index] for run in runs)

        print(f"\nflow cost per chunk (median of {args.repeats}), ms")
        print(f"{'method':<12}{'chunk 3':>10}{f'chunk {args.chunks}':>11}{'ratio':>8}")
        for name, c3, c30 in (("ours", at(ours, third), at(ours, last)),
                              ("reencode", at(reenc, third), at(reenc, last)),
                              ("reference", ref3, ref30)):
            print(f"{name:<12}{c3 * 1e3:>10.1f}{c30 * 1e3:>11.1f}{c30 / c3:>8.2f}")
        print(f"chunk {args.chunks}: reference / ours = {ref30 / at(ours, last):.1f}x, "
              f"reencode / ours = {at(reenc, last) / at(ours, last):.2f}x")

        # real-time factor, with the vocoder: a 10 s answer, offline vs streamed (10, 20, 40, 40, ...)
        answer = tokens[:125]
        audio_seconds = frames_for_tokens(len(answer)) * 256 / 22050
        offline, streamed, first = [], [], []
        for _ in range(args.repeats):
            began = time.perf_counter()
            decoder.decode(answer)
            offline.append(time.perf_counter() - began)
            stream = StreamingDecoder(decoder)
            began = time.perf_counter()
            out = stream.push(answer[:10])
            first.append(time.perf_counter() - began)
            assert out, "no chunk after 10 tokens"
            stream.push(answer[10:])
            stream.finish()
            streamed.append(time.perf_counter() - began)
        off, st, fst = statistics.median(offline), statistics.median(streamed), statistics.median(first)
        print(f"\nreal-time factor for {audio_seconds:.1f} s of speech (compute / audio, lower is faster)")
        print(f"offline   {off / audio_seconds:.3f}")
        print(f"streaming {st / audio_seconds:.3f}  (streaming / offline = {st / off:.2f}x)")
        print(f"first chunk (after 10 tokens: {frames_for_tokens(10) - 24} of {frames_for_tokens(10)} mel frames, "
              f"24 held back) ready after {fst * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
