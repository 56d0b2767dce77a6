"""Harness overhead: optimizer steps/s of `voicelm.train.train` vs a bare PyTorch loop doing the
same work (same model, data, AdamW, clipping, schedule), measured side by side in one process.

    OMP_NUM_THREADS=1 python bench/train_harness.py [--steps 300]

The harness adds per step: moving the batch, metric accumulation, the loss finiteness check and
(when on) the EMA update. Checkpoint and export time is excluded from both (they happen once).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from voicelm.train import compose_config, train
from voicelm.train.harness import make_schedule
from voicelm.train.toy import ToySolver


def bare_loop(cfg, steps: int) -> float:
    torch.manual_seed(0)
    solver = ToySolver(cfg)
    model = solver.build_model()
    loader, _ = solver.build_dataloaders()
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.solver.lr), weight_decay=float(cfg.solver.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(steps, int(cfg.solver.warmup_steps), 0.1))
    done, start = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return steps / (time.perf_counter() - start)


def harness(cfg_overrides: list[str], steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([*cfg_overrides, f"run_dir={run_dir}", f"solver.log_every={steps}",
                              "solver.eval_every=null", "solver.checkpoint_every=null"])
        train(cfg)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "train"][-1]["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging

    logging.getLogger("voicelm.train").setLevel(logging.WARNING)
    print(f"{'model':<28} {'bare steps/s':>12} {'harness':>10} {'+EMA':>10} {'harness/bare':>13}")
    for hidden in (64, 1024):
        base = ["solver=toy", f"solver.hidden_dim={hidden}", f"solver.steps={args.steps}", "solver.batch_size=64",
                "solver.num_samples=4096"]
        cfg = compose_config(base)
        # Interleaved repeats, best of each: the machine is shared, so single timings are noisy.
        bare = plain = ema = 0.0
        for _ in range(args.repeats):
            bare = max(bare, bare_loop(cfg, args.steps))
            plain = max(plain, harness(base, args.steps))
            ema = max(ema, harness([*base, "solver.ema_decay=0.999"], args.steps))
        params = sum(p.numel() for p in ToySolver(cfg).build_model().parameters())
        print(f"{f'toy MLP {params / 1e3:.1f}k params':<28} {bare:>12.0f} {plain:>10.0f} {ema:>10.0f} {plain / bare:>13.2f}")


if __name__ == "__main__":
    main()
