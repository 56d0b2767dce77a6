import shutil
import subprocess

import numpy as np
import pytest
import torch

from voicelm.core.audio import SAMPLE_RATE, load_audio, save_audio
from voicelm.core.manifest import write_manifest

from tokenizer.model import SpeechTokenizer
from tok_helpers import tiny_config

SENTENCES = [
    "what is seven plus five", "seven plus five is twelve", "count to three",
    "one two three", "say it slowly", "what is two plus two", "two plus two is four",
    "spell cat", "repeat after me hello", "and plus two",
]


@pytest.fixture
def tiny_tokenizer() -> SpeechTokenizer:
    torch.manual_seed(0)
    model = SpeechTokenizer(tiny_config(asr_head=False, kmeans_init=False)).eval()
    # Random uniform codebooks sit far from the features; give the codes the features' scale
    # so that ids spread over the codebook (and near-ties are rare) in tests.
    with torch.no_grad():
        model.quantizer.vq._codebook.embed.normal_(0, 1.0)
    return model


@pytest.fixture(scope="session")
def speech_manifest(tmp_path_factory):
    """A few espeak-ng sentences at 16 kHz, split train / valid, in a manifest."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("speech")
    rows = []
    voices = ["en-us", "en-gb+m3", "en+f3"]
    for i, text in enumerate(SENTENCES * 2):
        voice = voices[i % len(voices)]
        raw = root / f"raw_{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(150 + 10 * (i % 3)), "-w", str(raw), text],
                       check=True, capture_output=True)
        audio = load_audio(raw, SAMPLE_RATE)
        audio = audio / audio.abs().max() * 0.7
        save_audio(root / f"utt_{i}.wav", audio, SAMPLE_RATE)
        raw.unlink()
        rows.append({"audio": f"utt_{i}.wav", "text": text, "speaker": f"espeak:{voice}",
                     "duration": audio.numel() / SAMPLE_RATE, "split": "valid" if i % 10 == 9 else "train"})
    return write_manifest(root / "manifest.jsonl", rows)
