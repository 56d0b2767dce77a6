"""LM generation speed: our step-wise loop vs `model.generate` (KV cache) vs the memory-bandwidth bound.

    .venv/bin/python bench/bench_lm.py [--presets demo mid] [--new-tokens 100] [--prompt-tokens 100]

For each preset (random weights, fp32) it measures, side by side in one run:
- ours:      VoiceLMGen, greedy, 13:26 layout enforced (logits mask + per-token Python bookkeeping);
- generate:  transformers `model.generate(do_sample=False, use_cache=True)` with the same prompt;
- bound:     bandwidth / bytes of weights read per token (every matrix once, one embedding row),
             bandwidth measured here by copying a 256 MB tensor (bytes read + written / time).
Decode speed excludes the prompt: each method's prefill time is measured alone and subtracted.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from voicelm.lm import SamplingOptions, VoiceLM, VoiceLMConfig, VoiceLMGen, train_text_tokenizer


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best  # bytes/s (read + write)


def bytes_per_token(model: torch.nn.Module) -> int:
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()


def time_ours(lm: VoiceLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    def run(n: int) -> float:
        gen = VoiceLMGen(lm, prompt, SamplingOptions(temperature=0.0, max_new_tokens=n))
        # Benchmark only: a random model may pick a stop token early; time exactly n tokens.
        gen._stop_mask[:] = False
        gen._stop_set = frozenset()
        start = time.perf_counter()
        count = sum(1 for _ in gen)
        assert count == n, count
        return time.perf_counter() - start

    run(4)  # warm-up
    prefill = min(run(1) for _ in range(3))
    total = run(new_tokens)
    return prefill, total


def time_generate(lm: VoiceLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        start = time.perf_counter()
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, use_cache=True, pad_token_id=lm.vocab.pad_id)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - start

    run(4)
    prefill = min(run(1) for _ in range(3))
    total = run(new_tokens)
    return prefill, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["demo", "mid"])
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU")
    print(f"measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s (256 MB tensor copy, read + write)")
    tokenizer = train_text_tokenizer(["what is seven plus five? seven plus five is twelve."] * 10, 300)
    print(f"{'preset':<8} {'params':>8} {'MB/token':>9} {'ours tok/s':>11} {'generate tok/s':>15} "
          f"{'bound tok/s':>12} {'ours/gen':>9} {'ours/bound':>11}")
    for name in args.presets:
        config = VoiceLMConfig.from_preset(name)
        lm = VoiceLM.random(config, tokenizer, seed=0)
        params = sum(p.numel() for p in lm.model.parameters())
        prompt = [i % tokenizer.vocab_size for i in range(args.prompt_tokens // 2)]
        prompt += lm.vocab.speech_ids([i % config.speech_vocab_size for i in range(args.prompt_tokens - len(prompt))])
        with torch.inference_mode():
            ours_prefill, ours_total = time_ours(lm, prompt, args.new_tokens)
            gen_prefill, gen_total = time_generate(lm, prompt, args.new_tokens)
        ours = (args.new_tokens - 1) / (ours_total - ours_prefill)
        generate = (args.new_tokens - 1) / (gen_total - gen_prefill)
        per_token = bytes_per_token(lm.model)
        bound = bandwidth / per_token
        print(f"{name:<8} {params / 1e6:>7.1f}M {per_token / 1e6:>9.1f} {ours:>11.1f} {generate:>15.1f} "
              f"{bound:>12.1f} {ours / generate:>9.2f} {ours / bound:>11.2f}")


if __name__ == "__main__":
    main()
