"""Shared fixtures of the voice LM tests: a small BPE and tiny random models."""

import pytest
import torch

from voicelm.lm import VoiceLM, VoiceLMConfig, train_text_tokenizer

CORPUS = [
    "what is seven plus five?", "seven plus five is twelve.", "what is two plus two?", "two plus two is four.",
    "count to three.", "one, two, three.", "spell cat.", "c, a, t.", "and plus two?", "say it slowly.",
]


@pytest.fixture(scope="session")
def corpus():
    return list(CORPUS)


@pytest.fixture(scope="session")
def tokenizer():
    return train_text_tokenizer(CORPUS * 20, 320)


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return VoiceLMConfig.from_preset("tiny", text_vocab_size=tokenizer.vocab_size)


@pytest.fixture()
def tiny_lm(tiny_config, tokenizer):
    torch.manual_seed(0)
    return VoiceLM.random(tiny_config, tokenizer, seed=0)
