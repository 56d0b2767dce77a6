"""`voicelm train [overrides]` and `python -m voicelm.train [overrides]`: the hydra entry point.

Both run the same hydra application over conf/config.yaml, e.g.

    voicelm train solver=tokenizer tokenizer=demo solver.steps=100
    python -m voicelm.train solver=toy run_dir=runs/toy seed=1 --cfg job   # print the config only

A config mistake (unknown solver, bad value, missing preset) or an unusable checkpoint ends the
command with a one-line message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from voicelm.core.checkpoint import CheckpointError
from voicelm.core.presets import CONF_DIR
from voicelm.train.config import ConfigError, check_presets

PROG = "voicelm train"


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from voicelm.train.harness import train

    try:
        check_presets(cfg, HydraConfig.get().runtime.choices)
        train(cfg)
    except (ConfigError, CheckpointError, KeyError, MissingMandatoryValue) as exc:
        # MissingMandatoryValue: a `???` key of the yaml that the command line did not set.
        # KeyError: an unknown solver name (its message lists the known ones).
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def hydra_entry(argv: list[str] | None = None) -> None:
    """Run the hydra app; `argv` (hydra overrides and flags) replaces sys.argv[1:] when given."""
    import hydra

    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)
    if argv is None:
        app()
        return
    saved = sys.argv
    sys.argv = [sys.argv[0] if sys.argv else PROG, *argv]  # hydra reads its arguments from sys.argv
    try:
        app()
    finally:
        sys.argv = saved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run a training stage. Arguments are hydra overrides of conf/config.yaml, e.g. "
        "solver=tokenizer tokenizer=demo solver.steps=100 run_dir=runs/tok resume=false. "
        "Under torchrun the same command trains with DDP (docs/training.md)."
    )
    # Hydra's own flags, passed through (argparse would otherwise reject them before the overrides).
    parser.add_argument("--cfg", choices=["job", "hydra", "all"], help="print the composed config and exit (hydra)")
    parser.add_argument("--resolve", action="store_true", help="with --cfg: resolve interpolations (hydra)")
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep over comma-separated override values (hydra)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="hydra overrides key=value ...")


def main(args: argparse.Namespace) -> int:
    argv = list(args.overrides)
    if args.cfg:
        argv += ["--cfg", args.cfg]
    if args.resolve:
        argv.append("--resolve")
    if args.multirun:
        argv.append("--multirun")
    hydra_entry(argv)
    return 0
