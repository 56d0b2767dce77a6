"""The harness from the command line: `python -m voicelm.train`, `voicelm train`, and 2-process
`torchrun` runs on CPU (gloo), DDP and FSDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voicelm.core.checkpoint import load_part

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))
SMALL = ["solver.num_samples=512", "solver.valid_samples=64", "solver.hidden_dim=16", "solver.log_every=5"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "VOICELM_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}


def _run(cmd, timeout=180):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args):
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--monitor_interval", "0.5", *args]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_python_m_and_voicelm_train_run_the_same_hydra_app(tmp_path):
    proc = _run([PYTHON, "-m", "voicelm.cli", "train", f"run_dir={tmp_path}", "solver.steps=10", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_part(tmp_path / "export", "toy")[0]["hidden_dim"] == 16
    assert (tmp_path / "train.log").exists() and not (tmp_path / ".hydra").exists()
    assert not (REPO / "outputs").exists()  # hydra's own output dir stays off



def test_a_config_error_is_one_clear_line_and_exit_status_2(tmp_path, capsys):
    from voicelm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"run_dir={tmp_path}", "solver.steps=0"])
    assert exit_info.value.code == 2
    assert "voicelm train: error: solver.steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_torchrun_two_processes_ddp_and_fsdp_killed_and_resumed_end_with_the_same_model(tmp_path):
    # Dropout, EMA and a DistributedSampler (per-rank shards, reshuffled per epoch): what a
    # distributed resume must restore per rank. 512 samples / 2 ranks / batch 32 = 8 batches
    # per epoch, so the checkpoint at step 20 is mid-epoch.
    common = [*SMALL, "solver.steps=30", "solver.checkpoint_every=10", "solver.ema_decay=0.9", "solver.dropout=0.2"]
    _torchrun("-m", "voicelm.train", f"run_dir={tmp_path / 'ddp'}", *common)
    meta = json.loads((tmp_path / "ddp/checkpoints/last/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 30
    rows = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]  # written once (rank 0), not per rank
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    _, ddp = load_part(tmp_path / "ddp/export", "toy")

    # FSDP shards the same model differently (reduce-scatter instead of all-reduce: the same sums
    # in another order), and this run is killed after step 25, then resumed by new processes from
    # its step-20 checkpoint.
    fsdp_run = ["solver=toy", f"run_dir={tmp_path / 'fsdp'}", "distributed=fsdp", *common]
    _torchrun(str(Path(__file__).with_name("launch_toy.py")), "--stop-after", "25", *fsdp_run)
    assert not (tmp_path / "fsdp/export").exists()
    resumed = _torchrun("-m", "voicelm.train", *fsdp_run)
    log = resumed.stdout + resumed.stderr + (tmp_path / "fsdp/train.log").read_text()
    assert "resumed from" in log and "at step 20" in log, log[-2000:]
    _, fsdp = load_part(tmp_path / "fsdp/export", "toy")
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6)
