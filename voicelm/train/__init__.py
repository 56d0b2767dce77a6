"""The training harness shared by every stage (tokenizer, decoder, vocoder, LM, toy).

    python -m voicelm.train solver=toy solver.steps=200        # or: voicelm train solver=toy ...
    torchrun --nproc_per_node 2 -m voicelm.train solver=toy    # DDP (gloo on CPU, NCCL on GPU)

From Python (the recipe, tests):

    from voicelm.train import compose_config, train
    result = train(compose_config(["solver=toy", "run_dir=runs/toy"]))

A stage is a `voicelm.core.solver.Solver` registered in `registry.py`; docs/training.md has the
contract, the config layout and the resume semantics.
"""

from voicelm.train.config import ConfigError, OptimSettings, RunSettings, compose_config
from voicelm.train.harness import RunResult, TrainingError, lr_factor, train
from voicelm.train.registry import SOLVERS, get_solver_class, known_solvers

__all__ = [
    "ConfigError", "OptimSettings", "RunSettings", "compose_config", "RunResult", "TrainingError",
    "lr_factor", "train", "SOLVERS", "get_solver_class", "known_solvers",
]
