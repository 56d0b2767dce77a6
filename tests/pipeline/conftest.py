"""One tiny random pipeline directory per test run, shared by the pipeline tests (built once)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from voicelm.core.audio import SAMPLE_RATE, load_audio


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from voicelm.testing import build_tiny_pipeline

    directory = tmp_path_factory.mktemp("pipeline") / "tiny"
    build_tiny_pipeline(directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from voicelm.pipeline import load_pipeline

    return load_pipeline(tiny_dir)


def espeak_wav(path, text: str) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz float32 samples (skips the test without espeak-ng)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text], check=True,
                   capture_output=True)
    return load_audio(path, SAMPLE_RATE).numpy()


@pytest.fixture(scope="session")
def speech_16k(tmp_path_factory) -> np.ndarray:
    return espeak_wav(tmp_path_factory.mktemp("speech") / "speech.wav", "What is seven plus five?")
