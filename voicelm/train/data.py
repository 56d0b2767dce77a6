"""Endless, resumable iteration over a solver's training iterable.

The harness, not the solver, drives the data, so that a resumed run sees exactly the batches the
killed run would have seen next. Position = (epoch, batches taken in that epoch). Each epoch:

1. `set_epoch(epoch)` is called on the iterable, its sampler or its batch sampler when they have
   one (`DistributedSampler` reshuffles per epoch this way);
2. the iterator is created and its first batch drawn with every RNG (torch, numpy, python)
   temporarily seeded from (seed, epoch, rank). A `DataLoader(shuffle=True)` draws its shuffling
   seed, and its workers' seeds, at that moment, so the epoch's order depends only on
   (seed, epoch, rank), not on what the model did with the RNG before.

On resume the epoch is restarted the same way and the batches already used are drawn again and
dropped (inside the seeded block, so the restored global RNG is untouched): exact for any
deterministic pipeline, at the cost of re-reading part of one epoch. An iterable whose `len()` is
known moves to the next epoch when that many batches were taken, without asking the old iterator.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch


class DataCursor:
    def __init__(self, iterable: Iterable, *, seed: int, rank: int):
        if isinstance(iterable, Iterator):
            raise TypeError(
                "build_dataloaders returned a one-shot iterator (e.g. a generator) as the train data; "
                "return a re-iterable object (a DataLoader, a list, or a class with __iter__) so "
                "each epoch can start again"
            )
        self.iterable = iterable
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.index = 0  # batches taken in the current epoch
        self._iterator: Iterator | None = None
        try:
            self._length: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self._length = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iterator = None  # the next batch restarts the epoch and skips `index` batches

    def next(self) -> Any:
        if self._length is not None and self.index >= self._length:
            self._new_epoch()
        if self._iterator is None:
            return self._start_epoch(skip=self.index)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._new_epoch()
            return self._start_epoch(skip=0)
        self.index += 1
        return batch

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.index = 0
        self._iterator = None

    def _start_epoch(self, skip: int) -> Any:
        for target in (self.iterable, getattr(self.iterable, "sampler", None),
                       getattr(getattr(self.iterable, "batch_sampler", None), "sampler", None)):
            if target is not None and callable(getattr(target, "set_epoch", None)):
                target.set_epoch(self.epoch)
        with seeded_rngs(_epoch_seed(self.seed, self.epoch, self.rank)):
            iterator = iter(self.iterable)
            taken = 0
            for batch in iterator:
                taken += 1
                if taken > skip:
                    break
            else:
                if taken == 0:
                    raise RuntimeError(
                        f"the train data yielded no batch in epoch {self.epoch} (an empty dataset, or a "
                        "batch size larger than the dataset with drop_last=True)"
                    )
                raise RuntimeError(
                    f"cannot resume at batch {skip} of epoch {self.epoch}: the train data now has only "
                    f"{taken} batches per epoch; it changed since the checkpoint was written"
                )
        self._iterator = iterator
        self.index = skip + 1
        return batch


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


@contextmanager
def seeded_rngs(seed: int):
    """Seed torch (CPU and current CUDA device), numpy and python RNGs for a block, then put
    their previous states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
