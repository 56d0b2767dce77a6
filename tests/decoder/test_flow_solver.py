"""FlowSolver (solver=decoder): reads a manifest with tokens, trains, exports a loadable decoder."""

import json

import numpy as np
import pytest
import torch

from decoder import SpeechDecoder
from decoder.flow import frames_for_tokens
from decoder.solver import FlowSolver
from voicelm.core.audio import save_audio
from voicelm.core.manifest import ManifestError
from voicelm.train import compose_config, train


def make_manifest(tmp_path, rows=6, with_tokens=True):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(rows):
        n_tokens = 30 + 10 * (i % 3)
        seconds = n_tokens / 12.5
        t = np.arange(int(seconds * 22050)) / 22050
        wav = 0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t) + 0.01 * rng.standard_normal(len(t))
        save_audio(tmp_path / f"{i}.wav", wav.astype(np.float32), 22050)
        row = {"audio": f"{i}.wav", "text": "x", "speaker": "tone", "duration": seconds,
               "split": "valid" if i == rows - 1 else "train"}
        if with_tokens:
            row["tokens"] = [int(v) for v in rng.integers(0, 64, n_tokens)]
        lines.append(json.dumps(row))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "manifest.jsonl"


def cfg(tmp_path, manifest, *overrides):
    return compose_config(["solver=decoder", "decoder=tiny", f"run_dir={tmp_path / 'run'}",
                           f"solver.train_manifest={manifest}", "solver.batch_size=4", "solver.segment_tokens=30",
                           "solver.warmup_steps=0", "solver.log_every=5", *overrides])


def test_solver_batches_align_tokens_and_mel(tmp_path):
    solver = FlowSolver(cfg(tmp_path, make_manifest(tmp_path), f"solver.mel_cache_dir={tmp_path / 'cache'}"))
    train_data, valid = solver.build_dataloaders()
    batch = next(iter(train_data))
    assert batch["tokens"].shape[1] == 30
    assert batch["mel"].shape == (4, 80, frames_for_tokens(30))
    assert valid is not None and len(list(valid)) == 1
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 6  # mel targets cached on disk


def test_solver_refuses_rows_without_tokens(tmp_path):
    solver = FlowSolver(cfg(tmp_path, make_manifest(tmp_path, with_tokens=False)))
    with pytest.raises(ManifestError, match="voicelm tokenize --manifest"):
        solver.build_dataloaders()


def test_training_through_harness_lowers_loss_and_exports(tmp_path):
    manifest = make_manifest(tmp_path)
    torch.manual_seed(0)
    solver = FlowSolver(cfg(tmp_path, manifest))
    model = solver.build_model()
    train_data, valid = solver.build_dataloaders()
    before = solver.evaluate(model, valid)["loss"]

    result = train(cfg(tmp_path, manifest, "solver.steps=60", "solver.lr=3e-3", "solver.eval_every=null",
                       "solver.checkpoint_every=null"))
    assert result.valid_metrics["loss"] < 0.8 * before
    decoder = SpeechDecoder.from_pretrained(result.export_dir)
    assert decoder.is_fallback_vocoder  # no vocoder_dir given: labelled Griffin-Lim
    assert decoder.vocab_size == 64
    wav = decoder.decode([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert wav.shape == (frames_for_tokens(10) * 256,)


def test_init_from_starts_a_fine_tune_from_trained_weights(tmp_path):
    manifest = make_manifest(tmp_path)
    first = train(cfg(tmp_path, manifest, "solver.steps=2", "solver.eval_every=null", "solver.checkpoint_every=1"))
    trained = SpeechDecoder.from_pretrained(first.export_dir).flow.state_dict()
    # from the export (a decoder part) and from the last training checkpoint: the same weights, and
    # a setting without weights (the attention window) comes from the preset
    for source in (first.export_dir, tmp_path / "run" / "checkpoints" / "last"):
        solver = FlowSolver(cfg(tmp_path, manifest, f"solver.init_from={source}", "decoder.attention_window=8"))
        model = solver.build_model()
        assert model.config.attention_window == 8
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(FileNotFoundError, match="no model.safetensors there"):
        FlowSolver(cfg(tmp_path, manifest, f"solver.init_from={tmp_path}")).build_model()
    with pytest.raises(Exception, match="is the `decoder` preset its geometry"):
        FlowSolver(cfg(tmp_path, manifest, f"solver.init_from={first.export_dir}", "decoder.encoder_dim=64",
                       "decoder.encoder_heads=2")).build_model()


def test_prefix_crops_are_the_utterance_start_in_whole_blocks(tmp_path):
    # what the streaming decoder's first chunk decodes alone: the first blocks of an utterance
    solver = FlowSolver(cfg(tmp_path, make_manifest(tmp_path), "solver.prefix_prob=1.0"))
    train_data, _ = solver.build_dataloaders()
    rows = {tuple(tokens[:10].tolist()): (tokens, mel) for tokens, mel in train_data.rows}
    lengths = set()
    for _ in range(10):
        batch = next(iter(train_data))
        for tokens, length, mel in zip(batch["tokens"], batch["lengths"].tolist(), batch["mel"]):
            row_tokens, row_mel = rows[tuple(tokens[:10].tolist())]
            assert length % 10 == 0 and 10 <= length <= 30 and length < len(row_tokens)
            assert torch.equal(tokens[:length], row_tokens[:length])
            assert torch.equal(mel[:, :frames_for_tokens(length)], row_mel[:, :frames_for_tokens(length)])
            lengths.add(length)
    assert {10, 20} <= lengths
    with pytest.raises(ValueError, match="prefix_prob"):
        FlowSolver(cfg(tmp_path, make_manifest(tmp_path), "solver.prefix_prob=1.5")).build_dataloaders()
