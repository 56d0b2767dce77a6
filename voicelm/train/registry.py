"""Solver names -> classes, imported only when chosen.

Each entry is a "module:Class" string, so choosing the toy stage never imports the tokenizer's
or the LM's dependencies, and one broken stage cannot stop the others. Class paths live here, in
code, not in YAML: a config names a solver, never a class.
"""

from __future__ import annotations

import importlib

from voicelm.core.solver import Solver

SOLVERS: dict[str, str] = {
    "toy": "voicelm.train.toy:ToySolver",
    "tokenizer": "tokenizer.solver:TokenizerSolver",
    "decoder": "decoder.solver:FlowSolver",
    "vocoder": "decoder.vocoder_solver:VocoderSolver",
    "lm": "voicelm.lm.solver:LMSolver",
}


def known_solvers() -> list[str]:
    return sorted(SOLVERS)


def get_solver_class(name: str) -> type[Solver]:
    """The Solver subclass registered as `name` (KeyError listing the known names otherwise)."""
    if name not in SOLVERS:
        raise KeyError(f"unknown solver {name!r}; known solvers: {known_solvers()} (choose one with solver=<name>)")
    module_name, _, class_name = SOLVERS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"solver {name!r} lives in module {module_name!r}, which cannot be imported ({exc}); "
            f"is that part installed and complete?"
        ) from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise ImportError(f"solver {name!r}: {module_name}.{class_name} is missing or is not a voicelm.core.solver.Solver subclass")
    return cls
