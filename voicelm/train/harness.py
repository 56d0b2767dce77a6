"""The training loop shared by every stage.

`train(cfg)` runs the solver named by `cfg.solver.name` (see `registry.py`) for `cfg.solver.steps`
optimisation steps: seeding, DDP/FSDP under torchrun, AdamW per optimizer group with linear
warmup + cosine decay, gradient clipping, optional EMA (used for evaluation and export),
metrics (tqdm, TensorBoard, metrics.jsonl), atomic checkpoints and exact resume. The solver
contract is `voicelm.core.solver.Solver`; docs/training.md describes everything here.

Layout of `run_dir`:
    config.yaml                 the composed config of the latest start
    metrics.jsonl               one JSON object per log/eval line: {"step", "split", metrics...}
    tensorboard/                scalars train/* and valid/*
    checkpoints/last/           model.safetensors (training weights) + training_state.pt + meta.json
    export/                     the solver's inference checkpoint (EMA weights when EMA is on)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn

from voicelm.core.checkpoint import CheckpointError, atomic_write_dir, atomic_write_file, load_state_strict
from voicelm.core.solver import Solver
from voicelm.train import distributed
from voicelm.train.config import ConfigError, OptimSettings, RunSettings, to_yaml
from voicelm.train.data import DataCursor, seeded_rngs
from voicelm.train.ema import EMA
from voicelm.train.registry import get_solver_class

log = logging.getLogger("voicelm.train")

TRAINING_STATE_VERSION = 1
CHECKPOINT_DIR = Path("checkpoints") / "last"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"


class TrainingError(RuntimeError):
    """The run cannot go on (diverged loss, a solver breaking its contract); the message says why."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int                          # optimisation steps done when `train` returned
    resumed_from: int | None           # the checkpoint step this start continued from
    export_dir: Path | None            # None when the run stopped before the end
    train_metrics: dict[str, float]    # the last logged training metrics
    valid_metrics: dict[str, float]    # the last evaluation


def train(cfg: DictConfig, *, stop_after: int | None = None) -> RunResult:
    """Run (or resume) the training stage described by the composed config `cfg`.

    `stop_after=N` ends this start after step N as if the process had been killed: no final
    checkpoint, no export (tests use it; a later start with resume=true finishes the run).
    """
    run = RunSettings.from_cfg(cfg)
    optim = OptimSettings.from_cfg(cfg.get("solver"))
    solver_cls = get_solver_class(str(cfg.solver.get("name")))
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be a positive step number, got {stop_after}")
    _ensure_log_handler()
    info = distributed.setup(run.device)
    finished = False
    try:
        result = _Trainer(cfg, run, optim, solver_cls, info).run(stop_after)
        finished = True
        return result
    finally:
        # Ranks that all got here normally wait for each other before the process group goes;
        # after an error on one rank a barrier could hang, so the group is just torn down.
        distributed.teardown(info, synchronize=finished)


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float,
              origin: tuple[int, float] | None = None) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup, then cosine
    decay from 1 to `min_lr_ratio` at the last step.

    `origin` = (step s0, factor f0): from s0 on, a cosine from f0 down to `min_lr_ratio` at the last
    step instead (a run given more steps continues from the lr it had, `solver.extend_lr=continue`).
    """
    if origin is not None and step >= origin[0]:
        start, factor = origin
        progress = min(1.0, (step - start) / max(1, steps - start))
        return min_lr_ratio + (factor - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Trainer:
    def __init__(self, cfg: DictConfig, run: RunSettings, optim: OptimSettings, solver_cls: type[Solver],
                 info: distributed.DistInfo):
        self.cfg, self.run_settings, self.optim, self.info = cfg, run, optim, info
        self.run_dir = run.run_dir
        self.solver_name = str(cfg.solver.name)
        self.solver = solver_cls(cfg)
        if not info.is_main:
            log.setLevel(logging.WARNING)  # one copy of the progress lines, from rank 0
        self.step = 0
        self.train_metrics: dict[str, float] = {}
        self.valid_metrics: dict[str, float] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}

    # --- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        # Same seed on every rank while building, so all ranks start from the same weights
        # (DDP also broadcasts rank 0's, but FSDP shards assume equal initialisation).
        _seed_everything(self.run_settings.seed)
        model = self.solver.build_model()
        if not isinstance(model, nn.Module):
            raise TrainingError(f"{type(self.solver).__name__}.build_model returned {type(model).__name__}, not an nn.Module")
        model.to(self.info.device)
        fsdp_units = getattr(self.solver, "fsdp_units", None)
        self.model = distributed.wrap_model(
            model, self.info, self.run_settings.distributed,
            find_unused_parameters=self.optim.find_unused_parameters, fsdp_units=fsdp_units,
        )
        self.module = distributed.unwrap(self.model)
        self.fsdp = self.info.is_distributed and self.run_settings.distributed == "fsdp"
        # Parameters are collected after wrapping: FSDP replaces them with sharded ones.
        self.optimizers, self.schedulers, self.group_params = self._build_optimizers()
        self.schedule_origins: dict[str, tuple[int, float]] = {}
        self.ema = EMA(self.module, self.optim.ema_decay) if self.optim.ema_decay is not None else None
        # Per-rank training randomness (dropout etc.) differs across ranks, as in any DDP run.
        _seed_everything(self.run_settings.seed + self.info.rank)
        train_data, self.valid_data = self.solver.build_dataloaders()
        self.cursor = DataCursor(train_data, seed=self.run_settings.seed, rank=self.info.rank)

    def _build_optimizers(self):
        groups = self.solver.optimizer_groups(self.module)
        if not isinstance(groups, Mapping) or not groups:
            raise TrainingError(f"{type(self.solver).__name__}.optimizer_groups must return a non-empty dict name -> parameters")
        optimizers, schedulers, group_params = {}, {}, {}
        for name, spec in groups.items():
            # A group is a list of parameters, or a dict {"params": [...], "lr"/"weight_decay"/"betas": ...}
            # overriding cfg.solver for that optimizer (e.g. a GAN discriminator's own lr).
            # "params" may also be a list of {"params": [...], "lr_scale": k} parts: torch parameter
            # groups of one optimizer, each at k x the group's lr through warmup and decay.
            spec = dict(spec) if isinstance(spec, Mapping) else {"params": spec}
            raw = list(spec.pop("params"))
            parts = raw if raw and all(isinstance(x, Mapping) for x in raw) else [{"params": raw}]
            unknown = set(spec) - {"lr", "weight_decay", "betas"}
            if unknown:
                raise TrainingError(f"optimizer group {name!r} has unknown options {sorted(unknown)}; allowed: lr, weight_decay, betas")
            lr = float(spec.get("lr", self.optim.lr))
            torch_groups, params = [], []
            for part in parts:
                part = dict(part)
                trainable = [p for p in part.pop("params") if p.requires_grad]
                scale = float(part.pop("lr_scale", 1.0))
                if part or not math.isfinite(scale) or scale <= 0:
                    raise TrainingError(f"optimizer group {name!r}: a part may set only a positive lr_scale, got "
                                        f"{sorted(part) or scale}")
                if trainable:
                    torch_groups.append({"params": trainable, "lr": lr * scale})
                    params += trainable
            if not params:
                raise TrainingError(f"optimizer group {name!r} has no trainable parameters")
            opt = torch.optim.AdamW(
                torch_groups,
                lr=lr,
                weight_decay=float(spec.get("weight_decay", self.optim.weight_decay)),
                betas=tuple(spec.get("betas", self.optim.betas)),
            )
            factor = make_schedule(self.optim.steps, self.optim.warmup_steps, self.optim.min_lr_ratio)
            optimizers[name] = opt
            schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            group_params[name] = params
        return optimizers, schedulers, group_params

    # --- the loop -----------------------------------------------------------------------------
    def run(self, stop_after: int | None) -> RunResult:
        self._build()
        resumed_from = self._maybe_resume()
        if self.info.is_main:
            atomic_write_file(self.run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(to_yaml(self.cfg)))
            self._trim_metrics_log(resumed_from)
        writer = self._tensorboard(resumed_from)
        steps = self.optim.steps
        start = self.step
        if start < steps:
            log.info("%s: training steps %d..%d in %s (%s, world size %d)", self.solver_name, start + 1, steps,
                     self.run_dir, self.info.device, self.info.world_size)
        bar = self._progress_bar(start, steps)
        sums: dict[str, torch.Tensor] = {}
        count, t_last = 0, time.perf_counter()
        last_eval = last_ckpt = start
        redirect = _logging_redirect(bar)
        autocast = self._autocast()
        try:
            with redirect:
                while self.step < steps:
                    batch = _to_device(self.cursor.next(), self.info.device)
                    self.model.train()
                    self._grad_norms.clear()
                    with autocast:
                        metrics = self.solver.train_step(self.model, batch, self.optimizers, self._backward_and_step)
                    self._check_metrics(metrics)
                    if self.ema is not None:
                        self.ema.update(self.module)
                    self.step += 1
                    for k, v in {**metrics, **self._grad_norms}.items():
                        sums[k] = sums.get(k, 0.0) + _scalar(v, k)
                    count += 1
                    if bar is not None:
                        bar.update(1)
                    if self.step % self.optim.log_every == 0 or self.step == steps:
                        now = time.perf_counter()
                        means = {k: float(v) / count for k, v in sums.items()}
                        means["steps_per_s"] = count / max(now - t_last, 1e-9)
                        self._log_train(means, writer, bar)
                        sums, count, t_last = {}, 0, now
                    if self.optim.eval_every and self.step % self.optim.eval_every == 0:
                        self._evaluate(writer)
                        last_eval = self.step
                    if self.optim.checkpoint_every and self.step % self.optim.checkpoint_every == 0:
                        self._save_checkpoint()
                        last_ckpt = self.step
                    if stop_after is not None and self.step >= stop_after and self.step < steps:
                        log.info("%s: stopping after step %d as asked (resume to finish)", self.solver_name, self.step)
                        return RunResult(self.run_dir, self.step, resumed_from, None, self.train_metrics, self.valid_metrics)
                if start < steps:
                    if last_eval != self.step:
                        self._evaluate(writer)
                    if last_ckpt != self.step:
                        self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        export_dir = self._export()
        return RunResult(self.run_dir, self.step, resumed_from, export_dir, self.train_metrics, self.valid_metrics)

    def _backward_and_step(self, loss: torch.Tensor, name: str = "main") -> None:
        if name not in self.optimizers:
            raise TrainingError(f"train_step asked to step optimizer {name!r}; the groups are {sorted(self.optimizers)}")
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise TrainingError(f"the loss given for optimizer {name!r} must be a scalar tensor, got {_describe(loss)}")
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.group_params[name], self.optim.grad_clip)
            key = "grad_norm" if len(self.optimizers) == 1 else f"grad_norm_{name}"
            self._grad_norms[key] = _full_value(norm)
        optimizer.step()
        self.schedulers[name].step()

    def _check_metrics(self, metrics: Any) -> None:
        if not isinstance(metrics, Mapping) or "loss" not in metrics:
            raise TrainingError(f"{type(self.solver).__name__}.train_step must return a dict with a 'loss' entry, got {_describe(metrics)}")
        loss = float(metrics["loss"].detach() if torch.is_tensor(metrics["loss"]) else metrics["loss"])
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss is {loss} at step {self.step + 1}: training diverged. Lower solver.lr, set "
                f"solver.grad_clip, or check the data; resume continues from the last checkpoint."
            )

    def _autocast(self):
        if self.run_settings.precision == "bf16":
            return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # --- metrics ----------------------------------------------------------------------------
    def _log_train(self, means: dict[str, float], writer, bar) -> None:
        means = distributed.mean_across_ranks(means, self.info)
        for name, sched in self.schedulers.items():
            means["lr" if len(self.schedulers) == 1 else f"lr_{name}"] = sched.get_last_lr()[0]
        self.train_metrics = means
        if not self.info.is_main:
            return
        self._record("train", means, writer)
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
        log.info("%s step %d/%d  %s", self.solver_name, self.step, self.optim.steps, _format(means))

    def _record(self, split: str, values: Mapping[str, float], writer) -> None:
        row = {"step": self.step, "split": split, **{k: float(v) for k, v in values.items()}, "time": time.time()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(f"{split}/{k}", float(v), self.step)
            writer.flush()

    def _evaluate(self, writer) -> None:
        # DDP: rank 0 evaluates the plain module while the others wait. FSDP: every rank must take
        # part in each forward (weights are gathered collectively), so all evaluate; rank 0 logs.
        if self.fsdp or self.info.is_main:
            swap = self.ema.swapped_in(self.module) if self.ema is not None else nullcontext()
            self.module.eval()
            try:
                # A fixed seed: evaluations at different steps see the same noise, and the training
                # RNG stream is the same whether or not an evaluation happened.
                with swap, seeded_rngs(self.run_settings.seed), torch.no_grad(), self._autocast():
                    metrics = self.solver.evaluate(self.module, self.valid_data) or {}
            finally:
                self.module.train()
            self.valid_metrics = {k: float(v) for k, v in metrics.items()}
            if self.info.is_main and self.valid_metrics:
                self._record("valid", self.valid_metrics, writer)
                log.info("%s step %d valid%s  %s", self.solver_name, self.step,
                         " (EMA)" if self.ema is not None else "", _format(self.valid_metrics))
        distributed.barrier(self.info)

    def _tensorboard(self, resumed_from: int | None):
        if not self.info.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what a killed run logged after its last checkpoint.
        purge = resumed_from + 1 if resumed_from is not None else None
        if resumed_from is None and (self.run_dir / "tensorboard").exists():
            shutil.rmtree(self.run_dir / "tensorboard")  # a fresh start: old curves belong to another run
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def _trim_metrics_log(self, resumed_from: int | None) -> None:
        """Drop metrics.jsonl lines that a killed run wrote after the checkpoint we resume from."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        if resumed_from is None:
            path.unlink()  # a fresh start: the old lines describe another run
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resumed_from]
        atomic_write_file(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def _progress_bar(self, start: int, steps: int):
        if not self.info.is_main or start >= steps:
            return None
        if os.environ.get("VOICELM_NO_PROGRESS") == "1" or not sys.stderr.isatty():
            return None  # in logs and CI, the periodic log lines say the same without \r noise
        from tqdm import tqdm

        return tqdm(total=steps, initial=start, desc=self.solver_name, unit="step", dynamic_ncols=True)

    # --- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def _save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        # Full (unsharded) CPU tensors keyed by the plain module's names: the same files whether
        # the run used one process, DDP or FSDP. Gathering is collective: every rank takes part.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_states = {name: get_optimizer_state_dict(self.model, opt, options=options)
                        for name, opt in self.optimizers.items()}
        ema_state = self.ema.state_dict() if self.ema is not None else None
        rng_states = distributed.all_gather_objects(_capture_rng(self.info.device), self.info)
        if self.info.is_main:
            state = {
                "format_version": TRAINING_STATE_VERSION,
                "solver": self.solver_name,
                "step": self.step,
                "steps": self.optim.steps,
                "world_size": self.info.world_size,
                "data": self.cursor.state_dict(),
                "optimizers": optim_states,
                "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
                "schedule_origins": self.schedule_origins,
                "ema": ema_state,
                "rng": rng_states,
            }
            meta = {"step": self.step, "steps": self.optim.steps, "solver": self.solver_name,
                    "world_size": self.info.world_size, "time": time.time()}
            with atomic_write_dir(self.checkpoint_dir) as tmp:
                save_file(_unshared(model_state), str(tmp / MODEL_FILE))
                torch.save(state, tmp / STATE_FILE)
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            log.info("%s step %d: checkpoint written to %s", self.solver_name, self.step, self.checkpoint_dir)
        distributed.barrier(self.info)

    def _maybe_resume(self) -> int | None:
        ckpt = self.checkpoint_dir
        if not (ckpt / STATE_FILE).exists():
            return None
        if not self.run_settings.resume:
            log.warning("%s: resume=false, starting over; %s will be overwritten", self.solver_name, ckpt)
            return None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
            model_state = load_file(str(ckpt / MODEL_FILE))
        except Exception as exc:
            raise CheckpointError(
                f"cannot read the training checkpoint {ckpt} ({exc}); delete it or set resume=false to start over"
            ) from None
        if state.get("format_version") != TRAINING_STATE_VERSION:
            raise CheckpointError(f"{ckpt / STATE_FILE} has format_version {state.get('format_version')!r}, "
                                  f"this voicelm reads {TRAINING_STATE_VERSION}; set resume=false to start over")
        if state.get("solver") != self.solver_name:
            raise CheckpointError(f"{ckpt} was written by the {state.get('solver')!r} solver, not {self.solver_name!r}; "
                                  f"use another run_dir or resume=false")
        if set(state["optimizers"]) != set(self.optimizers):
            raise CheckpointError(f"{ckpt} has optimizers {sorted(state['optimizers'])} but the solver now builds "
                                  f"{sorted(self.optimizers)}; set resume=false to start over")
        if state["world_size"] != self.info.world_size:
            log.warning("%s: resuming a %d-process run with %d processes: the data order and RNG streams "
                        "will differ from an uninterrupted run", self.solver_name, state["world_size"], self.info.world_size)
        if self.fsdp:
            set_model_state_dict(self.model, model_state, options=StateDictOptions(full_state_dict=True))
        else:
            load_state_strict(self.module, model_state, where=str(ckpt / MODEL_FILE))
        for name, opt in self.optimizers.items():
            set_optimizer_state_dict(self.model, opt, state["optimizers"][name],
                                     options=StateDictOptions(full_state_dict=True))
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        self._resume_schedule(state)
        if self.ema is not None:
            if state["ema"] is None:
                log.warning("%s: the checkpoint has no EMA (ema_decay was off); starting the EMA from the current weights",
                            self.solver_name)
                self.ema = EMA(self.module, self.optim.ema_decay)  # type: ignore[arg-type]
            else:
                self.ema.load_state_dict(state["ema"])
        self.cursor.load_state_dict(state["data"])
        rng = state["rng"]
        _restore_rng(rng[self.info.rank] if self.info.rank < len(rng) else rng[0], self.info.device)
        self.step = int(state["step"])
        log.info("%s: resumed from %s at step %d", self.solver_name, ckpt, self.step)
        return self.step

    def _resume_schedule(self, state: dict) -> None:
        """Rebuild the lr schedules of a resumed run: the checkpoint's origins if `steps` is
        unchanged; if it changed, a new origin at the lr each optimizer has now ("continue",
        once warmup is over) or none, the plain schedule on the new length ("stretch")."""
        old_steps, o = int(state["steps"]), self.optim
        origins = {name: tuple(v) for name, v in (state.get("schedule_origins") or {}).items()}
        if old_steps != o.steps:
            # Each scheduler counts its own steps (a GAN discriminator's start late): its origin is
            # its own step count and the factor it has reached there.
            origins = {} if o.extend_lr == "stretch" else {
                name: (s.last_epoch, s.get_last_lr()[0] / s.base_lrs[0] if s.base_lrs[0] else 1.0)
                for name, s in self.schedulers.items() if s.last_epoch >= o.warmup_steps}
            if origins:
                how = "decays from the lr it has now (x%.3g) to x%g at the new last step" % (
                    max(f for _, f in origins.values()), o.min_lr_ratio)
            else:
                how = "restarts on the new length (solver.extend_lr=stretch or warmup not over)"
            log.warning("%s: solver.steps changed from %d to %d since the checkpoint; the lr schedule %s",
                        self.solver_name, old_steps, o.steps, how)
        self.schedule_origins = origins
        for name, sched in self.schedulers.items():
            # one multiplier per torch parameter group (a group at lr_scale x the lr follows the same curve)
            sched.lr_lambdas = [make_schedule(o.steps, o.warmup_steps, o.min_lr_ratio, origins.get(name))] * len(sched.base_lrs)

    # --- export -------------------------------------------------------------------------------
    def _export(self) -> Path | None:
        out_dir = self.run_dir / "export"
        if self.fsdp:
            model = self._gather_for_export()
        else:
            model = self.module
        if self.info.is_main:
            swap = self.ema.swapped_in(model) if (self.ema is not None and not self.fsdp) else nullcontext()
            model.eval()
            with swap:
                self.solver.export(model, out_dir)
            log.info("%s: exported to %s", self.solver_name, out_dir)
        distributed.barrier(self.info)
        return out_dir

    def _gather_for_export(self) -> nn.Module | None:
        """FSDP: the full weights (EMA if on) in a freshly built plain model on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema_state = self.ema.state_dict() if self.ema is not None else {}
        if not self.info.is_main:
            return None
        model = self.solver.build_model()
        state.update(ema_state)
        load_state_strict(model, state, where="FSDP export")
        return model


def make_schedule(steps: int, warmup_steps: int, min_lr_ratio: float, origin: tuple[int, float] | None = None):
    """The lr multiplier for LambdaLR. A plain function on purpose: LambdaLR saves the attributes
    of callable objects in its state_dict and would bring back the old `steps` on resume."""
    def factor(step: int) -> float:
        return lr_factor(step, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, origin=origin)

    return factor


# --- helpers ----------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def _capture_rng(device: torch.device) -> dict[str, Any]:
    # numpy's state as tensors and ints so the file loads with torch.load(weights_only=True).
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_name, "key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors inside (nested) dicts, lists, tuples and dataclasses to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give repeats their own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def _scalar(value: Any, name: str) -> torch.Tensor:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise TrainingError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().float().reshape(())
    try:
        return torch.tensor(float(value))
    except (TypeError, ValueError):
        raise TrainingError(f"metric {name!r} must be a number or a scalar tensor, got {type(value).__name__}") from None


def _full_value(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _format(values: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in values.items())


def _logging_redirect(bar):
    if bar is None:
        return nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _ensure_log_handler() -> None:
    """Show the harness's INFO lines when no one configured logging (hydra's app does)."""
    root = logging.getLogger()
    if not root.handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
