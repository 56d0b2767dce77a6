"""Worker script for tests/train/test_launch.py, run under torchrun: one toy run stopped after
`--stop-after` steps as if killed, then started again with resume (same processes, process group
torn down and rebuilt in between), with the RNGs disturbed in between."""

import argparse
import random

import numpy as np
import torch

from voicelm.train import compose_config, train

parser = argparse.ArgumentParser()
parser.add_argument("--stop-after", type=int, required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
cfg = compose_config(args.overrides)
first = train(cfg, stop_after=args.stop_after)
assert first.export_dir is None and first.step == args.stop_after, first
torch.manual_seed(4321 + torch.initial_seed() % 7)
random.seed(4321)
np.random.seed(4321)
second = train(cfg)
assert second.resumed_from is not None and second.resumed_from < args.stop_after, second
assert second.step == cfg.solver.steps and second.export_dir is not None, second
