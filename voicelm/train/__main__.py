"""`python -m voicelm.train [hydra overrides]`: see voicelm.train.cli."""

from voicelm.train.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry()
