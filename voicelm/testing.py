"""Build a tiny pipeline with random weights from the parts' `tiny` presets (tests, benches).

    python -m voicelm.testing /tmp/tiny-pipeline        # writes tokenizer/, voicelm/, decoder/

The weights are random: the answers are gibberish text and noise, but every shape, rate,
contract and code path is the real one, and a turn takes well under a second on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from voicelm.core.checkpoint import atomic_write_dir
from voicelm.core.presets import load_preset
from voicelm.pipeline import PART_DIRS, PIPELINE_FILE, Pipeline, load_pipeline

# A few sentences so the random pipeline's BPE has real merges (its text is still gibberish).
_CORPUS = [
    "what is seven plus five? seven plus five is twelve.",
    "count from one to ten: one two three four five six seven eight nine ten.",
    "hello, how are you today? i am fine, thank you.",
    "spell the word cat: c a t. say it slowly, please.",
    "the quick brown fox jumps over the lazy dog.",
]
TINY_TEXT_VOCAB = 300


def build_tiny_parts(seed: int = 0, long_answers: bool = True):
    """(tokenizer, lm, decoder) of the tiny presets with random weights (seeded).

    `long_answers`: scale the LM's output layer up and zero the rows of the stop tokens, so the
    random LM is confident (nearly deterministic) and never ends an answer on its own: every answer
    runs to `max_new_tokens`, which tests of cancel, barge-in and streaming need. Without it a
    random answer stops after about 20 tokens, often before the decoder's first chunk.
    """
    from decoder.flow import FlowConfig
    from decoder.hift import HiFTConfig, HiFTGenerator
    from decoder.model import SpeechDecoder
    from tokenizer.model import build_tokenizer
    from voicelm.core.checkpoint import config_from_dict
    from voicelm.lm.model import VoiceLM, VoiceLMConfig
    from voicelm.lm.text_tokenizer import train_text_tokenizer

    torch.manual_seed(seed)
    # No ASR head (a training-time part) and no k-means init: a random codebook gives varied codes.
    tokenizer_config = dict(load_preset("tokenizer", "tiny"), asr_head=False, kmeans_init=False)
    tokenizer = build_tokenizer(tokenizer_config).eval()
    text_tokenizer = train_text_tokenizer(_CORPUS, TINY_TEXT_VOCAB)
    lm = VoiceLM.random(VoiceLMConfig.from_preset("tiny"), text_tokenizer, seed=seed)
    if long_answers:
        with torch.no_grad():
            head = lm.model.lm_head.weight  # (vocab, hidden)
            head.mul_(50.0)
            head[list(lm.vocab.stop_ids)] = 0.0
    flow_config = config_from_dict(FlowConfig, load_preset("decoder", "tiny"), where="conf/decoder/tiny.yaml")
    vocoder = HiFTGenerator(config_from_dict(HiFTConfig, load_preset("vocoder", "tiny"), where="conf/vocoder/tiny.yaml"))
    decoder = SpeechDecoder(flow_config, vocoder).eval()
    return tokenizer, lm, decoder


def build_tiny_pipeline(directory: str | os.PathLike | None = None, seed: int = 0,
                        long_answers: bool = True) -> Pipeline:
    """A random tiny pipeline; with `directory`, saved there (atomically) and loaded back from it."""
    tokenizer, lm, decoder = build_tiny_parts(seed, long_answers)
    if directory is None:
        return Pipeline(tokenizer, lm, decoder, name="tiny-random", random_weights=True,
                        description="random weights from the tiny presets (tests and benchmarks)")
    directory = Path(directory)
    with atomic_write_dir(directory) as tmp:
        tokenizer.save_pretrained(tmp / PART_DIRS["tokenizer"])
        lm.save_pretrained(tmp / PART_DIRS["voicelm"])
        decoder.save_pretrained(tmp / PART_DIRS["decoder"])
        (tmp / PIPELINE_FILE).write_text(json.dumps({
            "name": "tiny-random",
            "description": "random weights from the tiny presets (tests and benchmarks); not a trained model",
            "random_weights": True,
            "seed": seed,
            "long_answers": long_answers,
        }, indent=2) + "\n")
    return load_pipeline(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a tiny random pipeline directory")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--natural-stops", action="store_true",
                        help="keep the random LM's stop tokens (answers end after ~20 tokens)")
    args = parser.parse_args(argv)
    pipeline = build_tiny_pipeline(args.directory, seed=args.seed, long_answers=not args.natural_stops)
    print(f"wrote {pipeline.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
