"""Vocoder GAN solver: F0 targets, data from a manifest, a tiny run lowers the mel loss, export."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from decoder.f0 import estimate_f0
from decoder.hift import HiFTGenerator
from decoder.mel import mel_spectrogram
from decoder.model import SpeechDecoder
from decoder.vocoder_solver import VocoderSolver
from voicelm.core.manifest import ManifestError, write_manifest
from voicelm.core.presets import load_preset

SR = 22050


@pytest.mark.parametrize("f0", [90.0, 150.0, 260.0, 420.0])
def test_f0_target_tracks_harmonic_tones(f0):
    t = torch.arange(SR) / SR
    tone = sum(0.3 / k * torch.sin(2 * math.pi * f0 * k * t) for k in range(1, 6))
    estimate = estimate_f0(tone)
    assert estimate.shape == (SR // 256,)
    inner = estimate[4:-4]
    assert (inner > 0).all()
    assert float((inner - f0).abs().max()) < 0.02 * f0


def test_f0_target_is_zero_for_noise_and_silence():
    torch.manual_seed(0)
    assert float((estimate_f0(0.1 * torch.randn(SR)) > 0).float().mean()) < 0.1
    assert float(estimate_f0(torch.zeros(SR)).abs().max()) == 0.0
    batch = estimate_f0(torch.zeros(2, 1000))
    assert batch.shape == (2, 3)


def _render(text: str, path, voice: str) -> None:
    """A real (if robotic) voice: espeak-ng at its native 22,050 Hz; harmonic glides otherwise."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        return
    t = np.arange(int(1.5 * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    sf.write(path, sum(0.2 / k * np.sin(k * phase) for k in range(1, 8)), SR)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("voice")
    rows = []
    texts = ["seven plus five is twelve", "three times four", "hello there, how are you", "count to ten"]
    for i, text in enumerate(texts):
        _render(text, root / f"{i}.wav", "en-us")
        info = sf.info(root / f"{i}.wav")
        rows.append({"audio": f"{i}.wav", "text": text, "speaker": "espeak:en-us",
                     "duration": info.duration, "split": "valid" if i == 3 else "train"})
    return write_manifest(root / "manifest.jsonl", rows)


def _cfg(manifest, **overrides):
    solver = OmegaConf.load("conf/solver/vocoder.yaml")
    solver.train_manifest = str(manifest)
    solver.batch_size = 3
    solver.segment_frames = 24
    solver.valid_segment_frames = 48
    solver.disc_start_step = 15
    solver.discriminator.period_channels = [8, 16, 32]
    solver.discriminator.periods = [2, 3, 5]
    solver.discriminator.fft_sizes = [512, 256]
    solver.discriminator.stft_channels = 8
    for key, value in overrides.items():
        OmegaConf.update(solver, key, value)
    # The tiny preset at twice its width: base 16 (4 channels in the last stage) barely learns.
    vocoder = dict(load_preset("vocoder", "tiny"), base_channels=32, f0_channels=32)
    return OmegaConf.create({"solver": solver, "vocoder": vocoder, "seed": 0})


def _run(solver, model, train, steps, lr=2e-3):
    optimizers = {}
    for name, spec in solver.optimizer_groups(model).items():
        spec = spec if isinstance(spec, dict) else {"params": spec}
        optimizers[name] = torch.optim.AdamW(spec["params"], lr=spec.get("lr", lr), betas=(0.8, 0.99))
    names = []

    def backward_and_step(loss, name):
        names.append(name)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    metrics = []
    batches = iter(())
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            train.sampler.set_epoch(len(metrics))
            batches = iter(train)
            batch = next(batches)
        metrics.append({k: float(v) for k, v in solver.train_step(model, batch, optimizers, backward_and_step).items()})
    return metrics, names


def test_tiny_gan_run_lowers_the_mel_loss_and_exports(manifest, tmp_path):
    torch.manual_seed(0)
    solver = VocoderSolver(_cfg(manifest))
    model = solver.build_model()
    train, valid = solver.build_dataloaders()
    assert valid is not None and len(valid.dataset) == 1  # the row with split "valid"
    assert len(train.dataset) == 3
    batch = next(iter(train))
    assert batch["wav"].shape == (3, 24 * 256) and batch["mel"].shape == (3, 80, 24) and batch["f0"].shape == (3, 24)
    assert float((batch["f0"] > 0).float().mean()) > 0.2  # speech is partly voiced

    before = solver.evaluate(model, valid)
    metrics, names = _run(solver, model, train, steps=40)
    after = solver.evaluate(model, valid)
    # Generator-only warm-up, then alternating D and G half-steps.
    assert names[:30] == ["generator", "f0_predictor"] * 15
    assert names[30:36] == ["discriminator", "generator", "f0_predictor"] * 2
    assert {"d_loss", "g_adv", "feature_matching", "mel_l1", "f0_l1"} <= set(metrics[-1])
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    # 40 steps on a CPU: the generator first learns the level and spectral envelope (measured
    # 2.43 -> 2.0..2.2 mel L1, natural-log units, depending on the thread count's summation
    # order); following the fine structure takes thousands.
    assert after["mel_l1"] < 0.95 * before["mel_l1"], (before, after)
    assert after["f0_l1"] < before["f0_l1"]

    solver.export(model, tmp_path / "export")
    exported = HiFTGenerator.from_pretrained(tmp_path / "export")
    mel = valid.dataset[0]["mel"][None]
    model.generator.eval()
    assert torch.equal(exported.inference(mel)[0], model.generator.inference(mel)[0])


def test_solver_refuses_missing_data(tmp_path):
    solver = VocoderSolver(_cfg(tmp_path / "none.jsonl", train_manifest=None))
    with pytest.raises(ValueError, match="train_manifest"):
        solver.build_dataloaders()
    write_manifest(tmp_path / "empty.jsonl", [])
    solver = VocoderSolver(_cfg(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="empty"):
        solver.build_dataloaders()


def test_runs_through_the_training_harness(manifest, tmp_path):
    from voicelm.train import compose_config, train

    disc = "solver.discriminator"
    cfg = compose_config([
        "solver=vocoder", "vocoder=tiny", f"run_dir={tmp_path / 'run'}", f"solver.train_manifest={manifest}",
        "solver.steps=6", "solver.disc_start_step=3", "solver.batch_size=2", "solver.segment_frames=16",
        "solver.valid_segment_frames=32", "solver.log_every=3", "solver.eval_every=null", "solver.checkpoint_every=3",
        f"{disc}.periods=[2,3]", f"{disc}.period_channels=[4,8]", f"{disc}.fft_sizes=[256]", f"{disc}.stft_channels=4",
    ])
    result = train(cfg, stop_after=3)  # killed after 3 steps, then resumed
    assert result.step == 3 and result.export_dir is None
    result = train(cfg)
    assert result.step == 6
    assert {"d_loss", "mel_l1", "grad_norm_generator", "grad_norm_discriminator"} <= set(result.train_metrics)
    assert "mel_l1" in result.valid_metrics
    vocoder = HiFTGenerator.from_pretrained(result.export_dir)
    assert vocoder.inference(torch.randn(1, 80, 3))[0].shape == (1, 768)


@pytest.fixture(scope="module")
def flow_dir(decoder, tmp_path_factory):
    """A saved tiny decoder part: the flow whose mels the vocoder is fine-tuned on."""
    path = tmp_path_factory.mktemp("flow") / "decoder"
    decoder.save_pretrained(path)
    return path


def _with_tokens(manifest, tmp_path, vocab_size):
    """The voice manifest with made-up stored tokens of the right length for each row's audio."""
    rows = []
    for i, line in enumerate(manifest.read_text().splitlines()):
        row = json.loads(line)
        count = max(1, round(row["duration"] * 12.5))
        row["tokens"] = [(7 * i + 3 * k) % vocab_size for k in range(count)]
        row["audio"] = str(manifest.parent / row["audio"])
        rows.append(row)
    return write_manifest(tmp_path / "tokens.jsonl", rows)


def test_fine_tuning_on_the_flows_mels_feeds_them_and_keeps_the_true_targets(manifest, decoder, flow_dir, tmp_path,
                                                                             monkeypatch):
    tokens_manifest = _with_tokens(manifest, tmp_path, decoder.flow.config.vocab_size)
    cache = tmp_path / "flow-mels"
    solver = VocoderSolver(_cfg(tokens_manifest, input_flow=str(flow_dir), flow_mel_cache_dir=str(cache)))
    model = solver.build_model()
    train, valid = solver.build_dataloaders()
    rows = [json.loads(line) for line in tokens_manifest.read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(list(cache.glob("*.pt"))) == len(rows)  # one sampled mel per row, kept on disk

    # Each item's generator input is the flow's mel of that row's tokens, over the same frames
    # as its true audio, mel and F0 targets.
    dataset = train.dataset
    for index, row in enumerate(train_rows):
        item = dataset[index]
        flow_mel = decoder.decode_mel(row["tokens"]).float()
        frames = dataset.wavs[index].shape[-1] // dataset.hop
        expected = torch.cat([flow_mel, flow_mel[:, -1:].expand(-1, max(0, frames - flow_mel.shape[-1]))], -1)[:, :frames]
        start = next(s for s in range(frames) if torch.allclose(
            dataset.wavs[index][s * 256:(s + 24) * 256], item["wav"]))
        assert torch.allclose(item["input_mel"], expected[:, start:start + 24], atol=1e-5)
        assert not torch.allclose(item["input_mel"], item["mel"], atol=0.1)  # not the true mel
        assert torch.allclose(item["mel"], mel_spectrogram(item["wav"]))
    assert "input_mel" in valid.dataset[0]

    # The generator hears the input mel: the loss changes when only the input changes.
    batch = next(iter(train))
    model.eval()
    with torch.no_grad():
        with_flow = model.reconstruction_losses(batch)["mel_l1"]
        with_true = model.reconstruction_losses({k: v for k, v in batch.items() if k != "input_mel"})["mel_l1"]
    assert not torch.isclose(with_flow, with_true)

    # A second build reads the cache: the same mels, without sampling the flow again.
    def no_sampling(*args, **kwargs):
        raise AssertionError("the flow was sampled again although its mels are cached")

    monkeypatch.setattr(SpeechDecoder, "decode_mel", no_sampling)
    again = VocoderSolver(_cfg(tokens_manifest, input_flow=str(flow_dir), flow_mel_cache_dir=str(cache)))
    train2, _ = again.build_dataloaders()
    assert all(torch.equal(a, b) for a, b in zip(train2.dataset.input_mels, dataset.input_mels))

    # Nor when only the decoder's HiFT changed (a fine-tuned vocoder shipped): the flow's mels are the same.
    new_hift = tmp_path / "new-hift-decoder"
    other = SpeechDecoder.from_pretrained(flow_dir)
    with torch.no_grad():
        for param in other.vocoder.parameters():
            param.add_(0.01)
    other.save_pretrained(new_hift)
    assert (new_hift / "model.safetensors").read_bytes() != (flow_dir / "model.safetensors").read_bytes()
    by_new_hift = VocoderSolver(_cfg(tokens_manifest, input_flow=str(new_hift), flow_mel_cache_dir=str(cache)))
    assert all(torch.equal(a, b) for a, b in zip(by_new_hift.build_dataloaders()[0].dataset.input_mels,
                                                  dataset.input_mels))

    # The same weights sampled with other settings are not served the cached mels of the first:
    # they are sampled anew, whether the settings come from the part's config.json or from
    # solver.input_flow_sampling (the shipped pipeline's, for a recipe).
    monkeypatch.undo()
    cooler = tmp_path / "cooler-decoder"
    shutil.copytree(flow_dir, cooler)
    config = json.loads((cooler / "config.json").read_text())
    config["config"]["flow"]["noise_scale"] = 0.5
    (cooler / "config.json").write_text(json.dumps(config))
    by_config = VocoderSolver(_cfg(tokens_manifest, input_flow=str(cooler), flow_mel_cache_dir=str(cache)))
    by_config_mels = by_config.build_dataloaders()[0].dataset.input_mels
    assert len(list(cache.glob("*.pt"))) == 2 * len(rows)
    assert not any(torch.allclose(a, b) for a, b in zip(by_config_mels, dataset.input_mels))
    by_setting = VocoderSolver(_cfg(tokens_manifest, input_flow=str(flow_dir), flow_mel_cache_dir=str(cache),
                                    input_flow_sampling={"noise_scale": 0.5}))
    by_setting_mels = by_setting.build_dataloaders()[0].dataset.input_mels
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(by_setting_mels, by_config_mels))
    with pytest.raises(ValueError, match="solver.input_flow_sampling: steps is not a flow sampling setting"):
        VocoderSolver(_cfg(tokens_manifest, input_flow=str(flow_dir), input_flow_sampling={"steps": 4})
                      ).build_dataloaders()


def test_flow_fine_tuning_needs_stored_tokens(manifest, flow_dir):
    solver = VocoderSolver(_cfg(manifest, input_flow=str(flow_dir)))
    with pytest.raises(ManifestError, match="has no `tokens`, which solver.input_flow needs"):
        solver.build_dataloaders()


def test_init_from_starts_from_a_trained_vocoder(manifest, tmp_path):
    torch.manual_seed(1)
    trained = VocoderSolver(_cfg(manifest)).build_model()
    trained.generator.save_pretrained(tmp_path / "part")
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))

    from_part = VocoderSolver(_cfg(manifest, init_from=str(tmp_path / "part"))).build_model()
    for name, value in trained.generator.state_dict().items():
        assert torch.equal(from_part.generator.state_dict()[name], value), name
    from_checkpoint = VocoderSolver(_cfg(manifest, init_from=str(tmp_path))).build_model()
    for name, value in trained.state_dict().items():
        assert torch.equal(from_checkpoint.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="neither a vocoder part directory"):
        VocoderSolver(_cfg(manifest, init_from=str(tmp_path / "nothing"))).build_model()
