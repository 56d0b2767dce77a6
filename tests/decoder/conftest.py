"""Fixtures shared by the decoder tests."""

import pytest
import torch

from decoder import SpeechDecoder
from decoder.flow import FlowConfig
from decoder.hift import HiFTConfig, HiFTGenerator
from voicelm.core.checkpoint import config_from_dict
from voicelm.core.presets import load_preset


@pytest.fixture(scope="module")
def decoder() -> SpeechDecoder:
    """A random tiny flow with a small HiFT vocoder, in eval mode (one per test module)."""
    torch.manual_seed(0)
    flow_config = config_from_dict(FlowConfig, load_preset("decoder", "tiny"))
    vocoder = HiFTGenerator(HiFTConfig(base_channels=32, f0_channels=16, nb_harmonics=2, f0_num_convs=2))
    return SpeechDecoder(flow_config, vocoder).eval()
