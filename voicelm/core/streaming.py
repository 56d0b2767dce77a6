"""Streaming state for modules that process input piece by piece.

A streaming module keeps a typed state (a dataclass) while inside `with module.streaming(B):`
and none outside it: `None` state means offline. Entering the context on a parent puts every
streaming child into streaming mode too, so a model is switched as a whole. Each streaming
module must give the same output when fed piece by piece as when fed the whole input at once.

    with model.streaming(batch_size=1):
        for piece in pieces:
            out.append(model.step(piece))
"""

from __future__ import annotations

import abc
import dataclasses
from contextlib import contextmanager
from typing import Generic, Iterator, TypeVar

import torch
from torch import nn

State = TypeVar("State", bound="StreamingState")


@dataclasses.dataclass
class StreamingState:
    """Base for per-module state; subclasses add their own fields."""

    batch_size: int


class StreamingModule(nn.Module, Generic[State], abc.ABC):
    def __init__(self) -> None:
        super().__init__()
        self._streaming_state: State | None = None

    @abc.abstractmethod
    def _init_streaming_state(self, batch_size: int) -> State:
        """A fresh state for a stream of `batch_size` sequences."""

    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    @property
    def streaming_state(self) -> State:
        if self._streaming_state is None:
            raise RuntimeError(
                f"{type(self).__name__} is not streaming: call it inside `with module.streaming(batch_size):`"
            )
        return self._streaming_state

    def _streaming_modules(self) -> Iterator["StreamingModule"]:
        for module in self.modules():
            if isinstance(module, StreamingModule):
                yield module

    def start_streaming(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for module in self._streaming_modules():
            if module._streaming_state is not None:
                raise RuntimeError(f"{type(module).__name__} is already streaming; streams cannot nest")
        for module in self._streaming_modules():
            module._streaming_state = module._init_streaming_state(batch_size)

    def stop_streaming(self) -> None:
        for module in self._streaming_modules():
            module._streaming_state = None

    def reset_streaming(self) -> None:
        """Start a new stream with the same batch size, dropping everything seen so far."""
        for module in self._streaming_modules():
            if module._streaming_state is None:
                raise RuntimeError(f"{type(module).__name__} is not streaming; nothing to reset")
            module._streaming_state = module._init_streaming_state(module._streaming_state.batch_size)

    @contextmanager
    def streaming(self, batch_size: int = 1) -> Iterator[None]:
        self.start_streaming(batch_size)
        try:
            yield
        finally:
            self.stop_streaming()


def detach_state(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()
