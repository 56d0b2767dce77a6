"""Training stage: a tiny ASR-supervised run on espeak-ng speech, export, the harness, the CLI."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from tokenizer import SpeechTokenizer, tokenize_manifest
from voicelm.core.audio import load_audio
from tokenizer.solver import TokenizerSolver
from voicelm.core.manifest import read_manifest
from voicelm.core.presets import load_preset


def solver_cfg(manifest, **solver_overrides):
    solver = OmegaConf.to_container(OmegaConf.load("conf/solver/tokenizer.yaml"))
    solver.update(manifest=str(manifest), batch_size=6, max_text_tokens=32, valid_max_utterances=4)
    solver.update(solver_overrides)
    return OmegaConf.create({"solver": solver, "tokenizer": load_preset("tokenizer", "tiny")})


def test_tiny_training_lowers_asr_loss_and_uses_many_codes(speech_manifest, tmp_path):
    torch.manual_seed(0)
    solver = TokenizerSolver(solver_cfg(speech_manifest))
    model = solver.build_model()
    train, valid = solver.build_dataloaders()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batches = list(train)
    first = solver.evaluate(model, valid)
    losses = []
    model.train()
    for step in range(24):
        metrics = solver.compute_loss(model, batches[step % len(batches)])
        optimizer.zero_grad()
        metrics["loss"].backward()
        optimizer.step()
        losses.append(float(metrics["asr_loss"]))
    last = solver.evaluate(model, valid)
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses
    assert last["asr_loss"] < first["asr_loss"]
    assert last["codes_codes_used"] > 8, last  # more than a handful of the 64 codes
    assert 0.0 <= last["wer"] and last["codes_perplexity"] > 4
    solver.export(model, tmp_path / "export")
    exported = SpeechTokenizer.from_pretrained(tmp_path / "export")
    assert exported.asr_head is None  # shipped without the training-time head
    audio = batches[0]["audio"][0, : int(batches[0]["lengths"][0])]
    model.eval()
    assert torch.equal(exported.encode(audio, 16000), model.encode(audio, 16000))


def test_padding_does_not_change_the_loss_of_a_clip(speech_manifest):
    torch.manual_seed(0)
    solver = TokenizerSolver(solver_cfg(speech_manifest))
    model = solver.build_model().eval()
    batch = next(iter(solver.build_dataloaders()[0]))
    out_batch = model(batch["audio"], batch["lengths"], batch["text_in"])
    i = int(batch["lengths"].argmin())
    n = int(batch["lengths"][i])
    out_one = model(batch["audio"][i:i + 1, :n], batch["lengths"][i:i + 1], batch["text_in"][i:i + 1])
    torch.testing.assert_close(out_batch.asr_logits[i], out_one.asr_logits[0], atol=1e-4, rtol=1e-4)


def test_training_through_the_harness(speech_manifest, tmp_path):
    harness = pytest.importorskip("voicelm.train.harness")
    from voicelm.train.config import compose_config

    cfg = compose_config([
        "solver=tokenizer", "tokenizer=tiny", f"solver.manifest={speech_manifest}", f"run_dir={tmp_path / 'run'}",
        "solver.steps=4", "solver.batch_size=6", "solver.warmup_steps=1", "solver.log_every=2",
        "solver.eval_every=4", "solver.checkpoint_every=4", "solver.valid_max_utterances=2", "device=cpu",
    ])
    result = harness.train(cfg)
    assert result.step == 4 and result.export_dir is not None
    assert "wer" in result.valid_metrics
    assert SpeechTokenizer.from_pretrained(result.export_dir).codebook_size == 64


def test_tokenize_manifest_and_cli(speech_manifest, tmp_path, capsys):
    torch.manual_seed(0)
    tok = SpeechTokenizer(TokenizerSolver(solver_cfg(speech_manifest)).model_config).eval()
    tok.save_pretrained(tmp_path / "tok")
    out = tokenize_manifest(tok, speech_manifest, tmp_path / "sub" / "tokens.jsonl")
    rows = read_manifest(out)
    assert len(rows) == len(read_manifest(speech_manifest))
    first = rows[0]
    assert first.audio_path.exists()  # audio paths still resolve from the new folder
    assert len(first.extra["tokens"]) == -(-round(first.duration * 16000) // 1280)
    # batched by duration, written in the manifest's order, each clip's tokens as if alone
    assert [r.text for r in rows] == [r.text for r in read_manifest(speech_manifest)]
    for row in rows:
        alone = tok.encode(load_audio(row.audio_path, 16000, allow_silent=True), 16000, allow_silent=True)
        assert row.extra["tokens"] == alone.tolist()

    from voicelm.cli import main as cli

    assert cli(["tokenize", str(first.audio_path), "--checkpoint", str(tmp_path / "tok")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == first.extra["tokens"]
    assert cli(["tokenize", "--manifest", str(speech_manifest), "--out", str(tmp_path / "o.jsonl"),
                "--checkpoint", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "o.jsonl").exists()
    not_audio = tmp_path / "x.wav"
    not_audio.write_text("hello")
    assert cli(["tokenize", str(not_audio), "--checkpoint", str(tmp_path / "tok")]) == 1
    assert "not a readable audio file" in capsys.readouterr().err
    assert cli(["tokenize", str(first.audio_path), "--checkpoint", str(tmp_path / "missing")]) == 1
