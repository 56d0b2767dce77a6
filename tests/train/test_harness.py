"""The training harness, proven with the toy solver: loss goes down, kill + resume is exact,
exports load back, and bad configs fail clearly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from voicelm.core.checkpoint import load_part
from voicelm.train import ConfigError, compose_config, get_solver_class, known_solvers, lr_factor, train
from voicelm.train.toy import ToySolver, load_toy

# Small and quick: 512 samples / batch 32 = 16 batches per epoch.
TOY = ["solver=toy", "solver.num_samples=512", "solver.valid_samples=128", "solver.hidden_dim=32"]


def _cfg(run_dir, *overrides):
    return compose_config([*TOY, f"run_dir={run_dir}", *overrides])


def _metrics(run_dir, split="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


def test_toy_run_lowers_its_loss_and_writes_the_run_layout(tmp_path):
    result = train(_cfg(tmp_path, "solver.steps=200", "solver.log_every=20", "solver.eval_every=100"))
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first / 3, (first, last)
    valid = _metrics(tmp_path, "valid")
    assert [r["step"] for r in valid] == [100, 200]
    assert result.step == 200 and result.resumed_from is None
    assert result.valid_metrics["loss"] == pytest.approx(valid[-1]["loss"])
    for name in ("config.yaml", "checkpoints/last/model.safetensors", "checkpoints/last/training_state.pt",
                 "export/config.json", "export/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())


def test_export_loads_back_with_identical_weights(tmp_path):
    result = train(_cfg(tmp_path, "solver.steps=30", "solver.eval_every=null"))
    config, state = load_part(result.export_dir, "toy")
    assert config["hidden_dim"] == 32
    trained = load_file(str(tmp_path / "checkpoints/last/model.safetensors"))  # no EMA: export == weights
    assert state.keys() == trained.keys()
    for name in state:
        assert torch.equal(state[name], trained[name]), name
    model = load_toy(result.export_dir)
    x = torch.randn(5, 8)
    reference = ToySolver(_cfg(tmp_path)).build_model()
    reference.load_state_dict(trained)
    assert torch.equal(model(x), reference.eval()(x))


def _disturb_rngs():
    # A new process would start from other RNG states: the resume must not depend on them.
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


def test_killed_and_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path):
    # Dropout (torch RNG), EMA, warmup + cosine schedule and shuffling all have to continue exactly.
    common = ["solver.steps=60", "solver.checkpoint_every=20", "solver.eval_every=25", "solver.log_every=5",
              "solver.ema_decay=0.9", "solver.dropout=0.2", "solver.warmup_steps=10"]
    whole = train(_cfg(tmp_path / "whole", *common))

    # Killed at step 45: the checkpoint at step 40 is mid-epoch (batch 8 of 16 of epoch 2) and
    # steps 41..45 are lost, as in a real crash.
    stopped = train(_cfg(tmp_path / "killed", *common), stop_after=45)
    assert stopped.step == 45 and stopped.export_dir is None
    assert not (tmp_path / "killed/export").exists()
    _disturb_rngs()
    resumed = train(_cfg(tmp_path / "killed", *common))
    assert resumed.resumed_from == 40 and resumed.step == 60

    a, b = tmp_path / "whole", tmp_path / "killed"
    weights_a = load_file(str(a / "checkpoints/last/model.safetensors"))
    weights_b = load_file(str(b / "checkpoints/last/model.safetensors"))
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    state_a = torch.load(a / "checkpoints/last/training_state.pt", weights_only=True)
    state_b = torch.load(b / "checkpoints/last/training_state.pt", weights_only=True)
    for name in state_a["ema"]:
        assert torch.equal(state_a["ema"][name], state_b["ema"][name]), name
    assert state_a["data"] == state_b["data"]
    export_a, export_b = load_part(whole.export_dir, "toy")[1], load_part(resumed.export_dir, "toy")[1]
    for name in export_a:
        assert torch.equal(export_a[name], export_b[name]), name
        # The export carries the EMA weights, not the last training weights.
        assert torch.equal(export_a[name], state_a["ema"][name]), name
    # The killed run's lines after step 40 were dropped, so the log reads like one run.
    steps_b = [r["step"] for r in _metrics(b)]
    assert steps_b == [r["step"] for r in _metrics(a)] == list(range(5, 61, 5))
    assert [r["loss"] for r in _metrics(b)] == pytest.approx([r["loss"] for r in _metrics(a)], rel=1e-6)


def test_resume_false_starts_over_and_a_finished_run_only_reexports(tmp_path):
    train(_cfg(tmp_path, "solver.steps=20"))
    again = train(_cfg(tmp_path, "solver.steps=20"))
    assert again.resumed_from == 20 and again.step == 20 and (tmp_path / "export/config.json").exists()
    fresh = train(_cfg(tmp_path, "solver.steps=10", "resume=false"))
    assert fresh.resumed_from is None and fresh.step == 10
    assert [r["step"] for r in _metrics(tmp_path)][-1] == 10


def test_resume_with_more_steps_stretches_the_schedule_to_the_new_length(tmp_path):
    train(_cfg(tmp_path, "solver.steps=20", "solver.checkpoint_every=10", "solver.warmup_steps=5"), stop_after=15)
    result = train(_cfg(tmp_path, "solver.steps=40", "solver.warmup_steps=5", "solver.log_every=10",
                        "solver.extend_lr=stretch"))
    assert result.resumed_from == 10 and result.step == 40
    # The cosine ends at lr * min_lr_ratio on the new last step, not on the old one.
    assert result.train_metrics["lr"] == pytest.approx(1e-2 * 0.1)
    lrs = [r["lr"] for r in _metrics(tmp_path)]
    assert lrs[1] > lrs[-1] > 0


def _lrs(run_dir):
    return {r["step"]: r["lr"] for r in _metrics(run_dir)}


def test_a_run_given_more_steps_continues_from_its_lr_without_a_jump(tmp_path):
    # solver.extend_lr=continue (the default): from the checkpoint's lr down to the floor at the new end.
    base = ["solver.warmup_steps=5", "solver.log_every=1", "solver.checkpoint_every=10"]
    train(_cfg(tmp_path, "solver.steps=30", *base), stop_after=20)
    at_checkpoint = _lrs(tmp_path)[20]
    train(_cfg(tmp_path, "solver.steps=60", *base), stop_after=45)  # checkpoint at 40, then "killed"
    result = train(_cfg(tmp_path, "solver.steps=60", *base))  # resumed again: the same continued schedule
    assert result.resumed_from == 40 and result.step == 60
    lrs = _lrs(tmp_path)
    after = [lrs[s] for s in range(21, 61)]
    assert after[0] <= at_checkpoint and after[0] == pytest.approx(at_checkpoint, rel=0.01)  # no jump
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[60] == pytest.approx(1e-2 * 0.1)
    # The second resume (same steps) rebuilt the same curve: one uninterrupted continued run agrees.
    other = tmp_path / "other"
    train(_cfg(other, "solver.steps=30", *base), stop_after=20)
    train(_cfg(other, "solver.steps=60", *base))
    assert [_lrs(other)[s] for s in range(21, 61)] == pytest.approx(after, rel=1e-9)


def test_a_finished_run_given_more_steps_stays_at_its_final_lr(tmp_path):
    base = ["solver.warmup_steps=5", "solver.log_every=1"]
    train(_cfg(tmp_path, "solver.steps=20", *base))
    result = train(_cfg(tmp_path, "solver.steps=30", *base))
    assert result.resumed_from == 20 and result.step == 30
    assert [_lrs(tmp_path)[s] for s in range(21, 31)] == pytest.approx([1e-2 * 0.1] * 10)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lambda s: lr_factor(s, steps=100, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_unknown_solver_name_lists_the_known_ones(tmp_path):
    with pytest.raises(KeyError, match="known solvers: .*toy"):
        get_solver_class("nope")
    with pytest.raises(KeyError, match="unknown solver 'nope'"):
        train(_cfg(tmp_path, "solver.name=nope"))
    assert {"toy", "tokenizer", "decoder", "vocoder", "lm"} <= set(known_solvers())


@pytest.mark.parametrize("override, words", [
    ("solver.steps=0", "solver.steps must be >= 1"),
    ("solver.lr=fast", "solver.lr must be a number"),
    ("solver.extend_lr=jump", "solver.extend_lr must be one of continue, stretch"),
    ("solver.betas=[0.9]", "solver.betas"),
    ("solver.ema_decay=1.0", "solver.ema_decay must be < 1.0"),
    ("solver.log_every=0", "solver.log_every must be >= 1"),
    ("device=tpu", "device must be one of"),
    ("precision=fp8", "precision must be one of"),
    ("~solver.lr", "the config has no `solver.lr`"),
])
def test_config_errors_name_the_key(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        train(_cfg(tmp_path, "solver.steps=10", override))
    assert not (tmp_path / "checkpoints").exists()


def test_a_misspelled_model_preset_is_refused_not_dropped():
    from voicelm.core.presets import preset_names

    part = next((p for p in ("lm", "tokenizer", "decoder", "vocoder") if preset_names(p)), None)
    if part is None:
        pytest.skip("no model presets in conf/ yet")
    with pytest.raises(ConfigError, match=f"no preset conf/{part}/nonexistent.yaml; known {part} presets"):
        compose_config([f"{part}=nonexistent"])


def test_solver_breaking_the_contract_gets_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ToySolver, "compute_loss", lambda self, model, batch: {"mse": model(batch[0]).mean()})
    with pytest.raises((RuntimeError, ValueError), match="must return a dict with a 'loss' entry"):
        train(_cfg(tmp_path, "solver.steps=5"))
    monkeypatch.setattr(ToySolver, "compute_loss", lambda self, model, batch: {"loss": model(batch[0]).sum() * float("nan")})
    with pytest.raises(RuntimeError, match="the loss is nan at step 1"):
        train(_cfg(tmp_path, "solver.steps=5"))
