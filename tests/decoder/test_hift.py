"""HiFT vocoder: rates and shapes, streaming == offline, source cache, checkpoints, official import."""

from __future__ import annotations


import pytest
import torch

from decoder.hift import (
    HiFTConfig,
    HiFTGenerator,
    convert_official_hift_state_dict,
    infer_hift_config,
)
from voicelm.core.audio import DECODER_SAMPLE_RATE, MEL_HOP
from voicelm.core.checkpoint import CheckpointError, config_from_dict
from voicelm.core.presets import load_preset


def build(preset: str = "tiny", seed: int = 0, voiced_hz: float | None = 150.0) -> HiFTGenerator:
    torch.manual_seed(seed)
    model = HiFTGenerator(config_from_dict(HiFTConfig, load_preset("vocoder", preset))).eval()
    if voiced_hz is not None:
        # An untrained F0 predictor outputs ~0 Hz (all unvoiced); bias it so the sine source,
        # whose phase is what the cache must carry across chunks, is actually exercised.
        with torch.no_grad():
            model.f0_predictor.classifier.bias.fill_(voiced_hz / model.config.f0_output_scale)
    return model


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_mel_frames_give_256_samples_each_at_22050(preset):
    model = build(preset)
    assert model.sample_rate == DECODER_SAMPLE_RATE == 22050 and model.hop_length == MEL_HOP == 256
    for frames in (1, 7, 40):
        wav, source = model.inference(torch.randn(2, 80, frames))
        assert wav.shape == (2, frames * 256)
        assert source.shape == (2, model.m_source.state_channels, frames * 256)
        assert torch.isfinite(wav).all() and wav.abs().max() <= model.config.audio_limit
    assert model(torch.randn(1, 80, 5)).shape == (1, 5 * 256)  # forward: training path, same rate


def test_glm4voice_preset_has_the_official_parameter_count():
    with torch.device("meta"):
        model = HiFTGenerator(config_from_dict(HiFTConfig, load_preset("vocoder", "glm4voice")))
    count = sum(p.numel() for p in model.parameters())
    # The official hift.pt is ~82 MB of float32 (82e6 / 4 = 20.5M). Breakdown of 20,460,591:
    # resblocks 10,342,656; source_resblocks 3,840,768; f0_predictor 3,274,241; ups 2,622,592;
    # conv_pre 287,744; source_downs 76,416; conv_post 16,164; m_source 10.
    assert count == 20_460_591
    assert model.config == HiFTConfig()  # the dataclass defaults are the official geometry


def test_inference_is_deterministic_and_batch_independent():
    model = build()
    mel = torch.randn(2, 80, 12)
    wav_a, _ = model.inference(mel)
    wav_b, _ = model.inference(mel)
    single, _ = model.inference(mel[1:])
    assert torch.equal(wav_a, wav_b)
    torch.testing.assert_close(wav_a[1:], single, atol=1e-6, rtol=0)


def _max_jump(wav: torch.Tensor, positions: list[int]) -> float:
    diffs = (wav[1:] - wav[:-1]).abs()
    return max(float(diffs[p - 1]) for p in positions)


def test_streaming_push_flush_equals_offline_with_no_click_at_joins():
    model = build()
    torch.manual_seed(1)
    mel = torch.randn(1, 80, 90) * 0.5
    offline, _ = model.inference(mel)
    sizes = [10, 1, 17, 4, 30, 28]  # ragged chunks, including ones shorter than the look-ahead
    pieces, joins, emitted = [], [], 0
    with model.streaming(1):
        start = 0
        for size in sizes:
            piece = model.push(mel[:, :, start:start + size])
            start += size
            pieces.append(piece)
            emitted += piece.shape[-1]
            if piece.shape[-1]:
                joins.append(emitted)
        pieces.append(model.flush())
    streamed = torch.cat(pieces, dim=-1)[0]
    assert streamed.shape == offline[0].shape
    # Tolerance: float32 round-off only (measured ~1e-7 against a signal peak of ~0.05).
    torch.testing.assert_close(streamed, offline[0], atol=1e-5, rtol=0)
    joins = [j for j in joins[:-1] if 0 < j < streamed.shape[-1]]
    assert len(joins) >= 3
    # The step between samples at a join is the offline signal's step there: no click.
    jump_at_joins = _max_jump(streamed, joins)
    assert abs(jump_at_joins - _max_jump(offline[0], joins)) < 1e-5
    assert jump_at_joins <= (streamed[1:] - streamed[:-1]).abs().max()


def test_first_streamed_audio_waits_for_the_lookahead():
    model = build()
    lookahead = model.receptive_field_frames
    with model.streaming(1):
        assert model.push(torch.randn(1, 80, lookahead)).shape == (1, 0)
        assert model.push(torch.randn(1, 80, 3)).shape == (1, 3 * 256)
        assert model.flush().shape == (1, lookahead * 256)


def test_source_cache_continues_the_excitation_exactly():
    """The official-style protocol: re-feed the last k mel frames and pass their source back."""
    model = build()
    with torch.no_grad():  # a constant F0, so chunk edges cannot change the F0 itself
        model.f0_predictor.classifier.weight.zero_()
    mel = torch.randn(1, 80, 40) * 0.5
    _, offline_source = model.inference(mel)
    k = 1  # what the official GLM-4-Voice stack caches: 1 mel frame + 256 source samples
    _, first = model.inference(mel[:, :, :20])
    _, second = model.inference(mel[:, :, 20 - k:], cache_source=first[:, :, -k * 256:])
    joined = torch.cat([first[:, 0, :20 * 256], second[:, 0, k * 256:]], dim=-1)
    # Excitation identical to the offline one (float32 phase round-off only).
    torch.testing.assert_close(joined, offline_source[:, 0], atol=1e-4, rtol=0)
    # Without the cache, the sine phase restarts at the join: a visible difference.
    _, restarted = model.inference(mel[:, :, 20 - k:])
    assert (restarted[:, 0, k * 256:] - offline_source[:, 0, 20 * 256:]).abs().max() > 1e-2


def test_save_and_reload_is_identical(tmp_path):
    model = build("tiny", seed=3)
    mel = torch.randn(1, 80, 9)
    wav, _ = model.inference(mel)
    model.save_pretrained(tmp_path / "vocoder")
    loaded = HiFTGenerator.from_pretrained(tmp_path / "vocoder")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert torch.equal(loaded.inference(mel)[0], wav)


def test_bad_input_gets_clear_errors(tmp_path):
    model = build()
    with pytest.raises(ValueError, match="batch dimension"):
        model.inference(torch.randn(80, 10))
    with pytest.raises(ValueError, match=r"\(batch, 80, frames\)"):
        model.inference(torch.randn(1, 100, 10))
    with pytest.raises(ValueError, match="0 frames"):
        model.inference(torch.randn(1, 80, 0))
    with pytest.raises(ValueError, match="NaN"):
        model.inference(torch.full((1, 80, 4), float("nan")))
    with pytest.raises(ValueError, match="cache_source"):
        model.inference(torch.randn(1, 80, 4), cache_source=torch.zeros(1, 3, 256))
    with pytest.raises(ValueError, match="covers"):
        model.inference(torch.randn(1, 80, 1), cache_source=torch.zeros(1, 1, 512))
    with pytest.raises(RuntimeError, match="not streaming"):
        model.push(torch.randn(1, 80, 4))
    with pytest.raises(ValueError, match="invalid HiFTConfig"):
        HiFTConfig(upsample_rates=(8, 8), upsample_kernel_sizes=(16,))
    with pytest.raises(CheckpointError):
        HiFTGenerator.from_pretrained(tmp_path / "missing")
    build().save_pretrained(tmp_path / "tiny")
    other = dict(load_preset("vocoder", "tiny"), base_channels=32)
    wrong = HiFTGenerator(config_from_dict(HiFTConfig, other))
    from voicelm.core.checkpoint import load_part, load_state_strict
    _, state = load_part(tmp_path / "tiny", "vocoder")
    with pytest.raises(CheckpointError, match="shape"):
        load_state_strict(wrong, state)


def _official_style_state_dict(model: HiFTGenerator) -> dict[str, torch.Tensor]:
    """What the official hift.pt holds: same module names, old-style weight norm (g, v)."""
    official = {}
    for key, value in model.state_dict().items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        official[key] = value.clone()
    return official


def test_official_state_dict_converts_and_loads_at_reduced_width():
    config = HiFTConfig(base_channels=32, f0_channels=24)  # official structure, narrow
    torch.manual_seed(5)
    reference = HiFTGenerator(config).eval()
    official = _official_style_state_dict(reference)
    # Key names as they appear in the released file.
    for key in ("conv_pre.weight_g", "conv_pre.weight_v", "conv_pre.bias", "ups.1.weight_v",
                "m_source.l_linear.weight", "source_downs.0.weight", "source_resblocks.1.convs2.2.weight_g",
                "resblocks.5.activations2.2.alpha", "conv_post.weight_v", "f0_predictor.condnet.8.weight_v",
                "f0_predictor.classifier.weight"):
        assert key in official, key
    converted = convert_official_hift_state_dict({f"generator.{k}": v for k, v in official.items()}
                                                 | {"discriminator.mpd.weight": torch.zeros(1)})
    inferred = infer_hift_config(converted)
    assert inferred == config
    model = HiFTGenerator(inferred).eval()
    from voicelm.core.checkpoint import load_state_strict
    load_state_strict(model, converted)
    mel = torch.randn(1, 80, 6)
    assert torch.equal(model.inference(mel)[0], reference.inference(mel)[0])
    # weight = g * v / |v|: the parametrisation reproduces the stored tensors.
    g, v = official["conv_pre.weight_g"], official["conv_pre.weight_v"]
    expected = g * v / v.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(model.conv_pre.weight, expected)


def test_converter_rejects_what_is_not_hift():
    with pytest.raises(CheckpointError, match="not a HiFT"):
        convert_official_hift_state_dict({"encoder.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a tensor"):
        convert_official_hift_state_dict({"conv_pre.weight_v": [1, 2]})


def test_remove_weight_norm_keeps_the_output():
    model = build()
    mel = torch.randn(1, 80, 8)
    wav, _ = model.inference(mel)
    model.remove_weight_norm()
    torch.testing.assert_close(model.inference(mel)[0], wav, atol=1e-6, rtol=0)
    with pytest.raises(CheckpointError, match="remove_weight_norm"):
        model.save_pretrained("/nonexistent/never-written")


def test_sine_source_follows_f0():
    """A predicted F0 of 220 Hz gives an excitation made of 220 Hz and its harmonics."""
    model = build(voiced_hz=220.0)
    with torch.no_grad():
        model.f0_predictor.classifier.weight.zero_()  # F0 = |bias| = 220 Hz everywhere
    _, source = model.inference(torch.randn(1, 80, 86))
    excitation = source[0, 0] - source[0, 0].mean()
    power = torch.fft.rfft(excitation).abs().pow(2)
    freqs = torch.fft.rfftfreq(excitation.shape[-1], 1 / 22050)
    distance = (freqs - 220.0 * torch.round(freqs / 220.0)).abs()
    harmonic = (distance < 6.0) & (freqs > 100)
    assert float(power[harmonic].sum() / power.sum()) > 0.9
