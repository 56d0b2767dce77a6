"""Composing and validating the training config.

Hydra composes `conf/config.yaml` (solver + one model preset per part); this module turns the
keys the harness itself reads into two frozen dataclasses, refusing bad values with a message that
names the key, the value and what is allowed. Stage-specific keys in `cfg.solver` (data paths,
batch size, ...) belong to the solver and are not checked here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from voicelm.core.presets import CONF_DIR, preset_names

MODEL_PARTS = ("tokenizer", "decoder", "vocoder", "lm")
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED_MODES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")
EXTEND_LR = ("continue", "stretch")


class ConfigError(ValueError):
    """A training config the harness cannot run; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Top-level keys of the composed config: where and how the run happens."""

    run_dir: Path
    seed: int
    device: str
    resume: bool
    distributed: str
    precision: str

    @classmethod
    def from_cfg(cls, cfg: Any) -> "RunSettings":
        run_dir = _get(cfg, "run_dir", "run_dir", required=True)
        if not isinstance(run_dir, str) or not run_dir.strip():
            raise ConfigError(f"run_dir must be a non-empty path, got {run_dir!r}")
        return cls(
            run_dir=Path(run_dir),
            seed=_as_int(_get(cfg, "seed", "seed", default=0), "seed", minimum=0),
            device=_choice(_get(cfg, "device", "device", default="auto"), "device", DEVICES),
            resume=_as_bool(_get(cfg, "resume", "resume", default=True), "resume"),
            distributed=_choice(_get(cfg, "distributed", "distributed", default="ddp"), "distributed", DISTRIBUTED_MODES),
            precision=_choice(_get(cfg, "precision", "precision", default="fp32"), "precision", PRECISIONS),
        )


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The keys of `cfg.solver` that the harness reads (every solver shares them)."""

    steps: int
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    ema_decay: float | None = None
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    # DDP only: models whose forward leaves some parameters unused in a step (e.g. a GAN
    # generator step that never touches the discriminator) need this.
    find_unused_parameters: bool = False
    # What the lr does when a run is resumed with a different `steps` (e.g. a finished run given
    # more): "continue" decays from the lr it had at the checkpoint to lr * min_lr_ratio at the new
    # last step (no jump); "stretch" recomputes the whole warmup + cosine on the new length.
    extend_lr: str = "continue"

    @classmethod
    def from_cfg(cls, solver_cfg: Any) -> "OptimSettings":
        if solver_cfg is None:
            raise ConfigError("the config has no `solver` section; choose one with solver=<name>")
        g = lambda key, **kw: _get(solver_cfg, key, f"solver.{key}", **kw)  # noqa: E731
        steps = _as_int(g("steps", required=True), "solver.steps", minimum=1)
        betas = g("betas", default=[0.9, 0.999])
        if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
            raise ConfigError(f"solver.betas must be a list of two numbers in [0, 1), got {betas!r}")
        betas = tuple(_as_float(b, "solver.betas", minimum=0.0, below=1.0) for b in betas)
        ema = g("ema_decay", default=None)
        ema = None if ema is None else _as_float(ema, "solver.ema_decay", minimum=0.0, below=1.0)
        clip = g("grad_clip", default=None)
        clip = None if clip is None else _as_float(clip, "solver.grad_clip", minimum=0.0)
        # warmup_steps >= steps is allowed: a short trial run of a long recipe is all warmup.
        warmup = _as_int(g("warmup_steps", default=0), "solver.warmup_steps", minimum=0)
        return cls(
            steps=steps,
            lr=_as_float(g("lr", required=True), "solver.lr", minimum=0.0),
            weight_decay=_as_float(g("weight_decay", default=0.0), "solver.weight_decay", minimum=0.0),
            betas=betas,  # type: ignore[arg-type]
            warmup_steps=warmup,
            min_lr_ratio=_as_float(g("min_lr_ratio", default=0.0), "solver.min_lr_ratio", minimum=0.0, maximum=1.0),
            grad_clip=clip if clip else None,
            ema_decay=ema,
            log_every=_as_int(g("log_every", default=10), "solver.log_every", minimum=1),
            eval_every=_optional_every(g("eval_every", default=None), "solver.eval_every"),
            checkpoint_every=_optional_every(g("checkpoint_every", default=None), "solver.checkpoint_every"),
            find_unused_parameters=_as_bool(g("find_unused_parameters", default=False), "solver.find_unused_parameters"),
            extend_lr=_as_extend_lr(g("extend_lr", default="continue")),
        )


def compose_config(overrides: Sequence[str] = (), *, config_dir: str | Path | None = None) -> DictConfig:
    """The config `python -m voicelm.train <overrides>` would run, composed without hydra's app.

    For programs that start training runs themselves (the recipe, tests). Preset names are
    checked like on the command line.
    """
    from hydra import compose, initialize_config_dir

    config_dir = Path(config_dir or CONF_DIR).resolve()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    check_presets(cfg, choices, config_dir=config_dir)
    return cfg


def check_presets(cfg: DictConfig, choices: Mapping[str, Any], *, config_dir: str | Path | None = None) -> None:
    """Refuse a model preset that hydra skipped because its file does not exist.

    The defaults list marks the part groups `optional` so that a stage runs in an install where
    some part is absent altogether; but hydra then also skips a misspelled preset silently. A
    part that has presets and a chosen name without a file is a mistake: say so.
    """
    for part in MODEL_PARTS:
        choice = choices.get(part)
        if choice is None or (part in cfg and cfg[part] is not None):
            continue
        if config_dir is None or Path(config_dir).resolve() == CONF_DIR.resolve():
            known = preset_names(part)
        else:
            known = sorted(p.stem for p in (Path(config_dir) / part).glob("*.yaml"))
        if known:
            raise ConfigError(f"{part}={choice}: there is no preset conf/{part}/{choice}.yaml; known {part} presets: {known}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# --- value checks -------------------------------------------------------------------------------
_MISSING = object()


def _get(node: Any, key: str, name: str, *, default: Any = _MISSING, required: bool = False) -> Any:
    if node is None or key not in node:
        if required or default is _MISSING:
            raise ConfigError(f"the config has no `{name}`; set it in the yaml or on the command line ({name}=...)")
        return default
    try:
        value = node[key]
    except Exception as exc:  # an interpolation that cannot be resolved
        raise ConfigError(f"{name} cannot be resolved: {exc}") from None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _as_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_float(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
              below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    if below is not None and value >= below:
        raise ConfigError(f"{name} must be < {below}, got {value}")
    return value


def _as_extend_lr(value: Any) -> str:
    if value not in EXTEND_LR:
        raise ConfigError(f"solver.extend_lr must be one of {', '.join(EXTEND_LR)}, got {value!r}")
    return value


def _as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _optional_every(value: Any, name: str) -> int | None:
    """null or 0 = never periodically (the harness still does it once at the end)."""
    if value is None:
        return None
    value = _as_int(value, name, minimum=0)
    return value or None
