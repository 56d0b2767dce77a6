"""Pieces every part shares: audio I/O and rates, checkpoints, streaming state, manifests, solvers.

`tokenizer/` and `decoder/` import only this package from the project.
"""
