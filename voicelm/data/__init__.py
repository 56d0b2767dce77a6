"""Data generation: synthetic speech (`synth`) and, later, the spoken dialogue corpus."""
