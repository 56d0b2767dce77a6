"""`voicelm decoder average`: the flows' weighted mean, the first decoder's vocoder, clear refusals."""

import json

import pytest
import torch

from decoder import SpeechDecoder
from decoder.average import AverageError, average_decoders
from decoder.flow import FlowConfig
from decoder.hift import HiFTConfig, HiFTGenerator
from voicelm.cli import main as cli
from voicelm.core.checkpoint import config_from_dict
from voicelm.core.presets import load_preset


def _decoder(seed: int, **flow_changes) -> SpeechDecoder:
    torch.manual_seed(seed)
    flow_config = config_from_dict(FlowConfig, {**load_preset("decoder", "tiny"), **flow_changes})
    vocoder = HiFTGenerator(HiFTConfig(base_channels=32, f0_channels=16, nb_harmonics=2, f0_num_convs=2))
    return SpeechDecoder(flow_config, vocoder).eval()


def test_average_mixes_the_flows_and_keeps_the_first_vocoder(tmp_path):
    a, b = _decoder(0), _decoder(1, noise_scale=0.8)   # sampling settings may differ: the first's are kept
    a.save_pretrained(tmp_path / "a", dtype=torch.float16, vocoder_dtype=torch.float32)   # as the demo ships
    b.save_pretrained(tmp_path / "b")
    a16 = SpeechDecoder.from_pretrained(tmp_path / "a")
    mixed = average_decoders([tmp_path / "a", tmp_path / "b"], [3, 1])   # weights are normalised
    fa, fb = a16.flow.state_dict(), b.flow.state_dict()
    for k, v in mixed.flow.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.75 * fa[k] + 0.25 * fb[k], atol=1e-6), k
    assert not torch.equal(mixed.flow.state_dict()["encoder_proj.weight"], fa["encoder_proj.weight"])
    for k, v in mixed.vocoder.state_dict().items():   # the first's vocoder, untouched
        assert torch.equal(v, a.vocoder.state_dict()[k]), k
    assert mixed.config.noise_scale == a.config.noise_scale

    # the command: a pipeline directory is accepted, equal weights, the first's dtypes by default
    (tmp_path / "pipe").mkdir()
    (tmp_path / "a").rename(tmp_path / "pipe" / "decoder")
    assert cli(["decoder", "average", str(tmp_path / "pipe"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    header = json.loads((tmp_path / "ab" / "config.json").read_text())
    assert header["config"]["flow"]["noise_scale"] == a.config.noise_scale
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ab" / "model.safetensors"), framework="pt") as f:
        kinds = {(k.split(".")[0], f.get_slice(k).get_dtype()) for k in f.keys()}
    assert ("flow", "F16") in kinds and ("vocoder", "F32") in kinds and ("vocoder", "F16") not in kinds
    back = SpeechDecoder.from_pretrained(tmp_path / "ab")
    w = "encoder_proj.weight"
    assert torch.allclose(back.flow.state_dict()[w], (fa[w] + fb[w]) / 2, atol=2e-3)
    # and the averaged decoder decodes: tokens -> audio of the right length
    wav = back.decode(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    assert wav.ndim == 1 and wav.numel() > 0 and torch.isfinite(wav).all()


def test_average_refuses_what_cannot_be_averaged(tmp_path):
    _decoder(0).save_pretrained(tmp_path / "a")
    _decoder(0, encoder_layers=1).save_pretrained(tmp_path / "shallow")
    with pytest.raises(AverageError, match="differs .* in encoder_layers"):
        average_decoders([tmp_path / "a", tmp_path / "shallow"])
    with pytest.raises(AverageError, match="one weight per checkpoint"):
        average_decoders([tmp_path / "a", tmp_path / "a"], [1.0])
    with pytest.raises(AverageError, match="at least two"):
        average_decoders([tmp_path / "a"])
    with pytest.raises(AverageError, match="non-negative"):
        average_decoders([tmp_path / "a", tmp_path / "a"], [1.0, -1.0])
    with pytest.raises(AverageError, match="not a loadable decoder"):
        average_decoders([tmp_path / "a", tmp_path / "missing"])
    # the command: an existing --out is refused first; a refusal writes nothing
    with pytest.raises(SystemExit, match="already exists"):
        cli(["decoder", "average", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="encoder_layers"):
        cli(["decoder", "average", str(tmp_path / "a"), str(tmp_path / "shallow"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
