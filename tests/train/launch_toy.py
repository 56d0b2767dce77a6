"""Worker script for tests/train/test_launch.py, run under torchrun: the first part of a toy run,
stopped after `--stop-after` steps as if the processes were killed there. The test then starts
a fresh torchrun with resume to finish it, as a user would after a crash."""

import argparse

from voicelm.train import compose_config, train

parser = argparse.ArgumentParser()
parser.add_argument("--stop-after", type=int, required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
first = train(compose_config(args.overrides), stop_after=args.stop_after)
assert first.export_dir is None and first.step == args.stop_after, first
