"""StreamingModule: typed state inside `with streaming()`, none outside; streaming == offline."""

import dataclasses

import pytest
import torch
from torch import nn

from voicelm.core.streaming import StreamingModule, StreamingState


@dataclasses.dataclass
class _ConvState(StreamingState):
    history: torch.Tensor  # (B, C, kernel - 1): the last inputs the next step needs


class CausalConv(StreamingModule[_ConvState]):
    """A causal 1-D convolution: offline it left-pads, streaming it keeps the last inputs."""

    def __init__(self, channels=3, kernel=4):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel)

    def _init_streaming_state(self, batch_size):
        return _ConvState(batch_size, torch.zeros(batch_size, self.conv.in_channels, self.kernel - 1))

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        if not self.is_streaming:
            return self.conv(nn.functional.pad(x, (self.kernel - 1, 0)))
        state = self.streaming_state
        if x.shape[0] != state.batch_size:
            raise ValueError(f"batch {x.shape[0]} != streaming batch {state.batch_size}")
        joined = torch.cat([state.history, x], dim=-1)  # (B, C, kernel - 1 + T)
        state.history = joined[..., -(self.kernel - 1):]
        return self.conv(joined)


@dataclasses.dataclass
class _SumState(StreamingState):
    total: torch.Tensor  # (B, C)


class RunningSum(StreamingModule[_SumState]):
    def _init_streaming_state(self, batch_size):
        return _SumState(batch_size, torch.zeros(batch_size, 3))

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        out = x.cumsum(-1)
        if self.is_streaming:
            out = out + self.streaming_state.total[..., None]
            self.streaming_state.total = out[..., -1]
        return out


class Stack(StreamingModule[StreamingState]):
    def __init__(self):
        super().__init__()
        self.conv = CausalConv()
        self.sum = RunningSum()

    def _init_streaming_state(self, batch_size):
        return StreamingState(batch_size)

    def forward(self, x):
        return self.sum(self.conv(x))


def stream(model, x, sizes):
    pieces, start = [], 0
    for size in sizes:
        pieces.append(model(x[..., start:start + size]))
        start += size
    assert start == x.shape[-1]
    return torch.cat(pieces, dim=-1)


@pytest.mark.parametrize("sizes", [[1] * 17, [5, 5, 7], [17], [2, 1, 9, 3, 2]])
def test_streaming_equals_offline(sizes):
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(2, 3, 17)
    offline = model(x)
    with model.streaming(batch_size=2):
        streamed = stream(model, x, sizes)
    torch.testing.assert_close(streamed, offline, rtol=1e-5, atol=1e-5)


def test_parent_switches_children_and_state_is_none_offline():
    model = Stack()
    assert not model.is_streaming and not model.conv.is_streaming
    with model.streaming(2):
        assert model.conv.is_streaming and model.sum.is_streaming
        assert isinstance(model.conv.streaming_state, _ConvState)
        assert model.conv.streaming_state.batch_size == 2
    assert not model.conv.is_streaming
    with pytest.raises(RuntimeError, match="not streaming"):
        model.conv.streaming_state


def test_nested_streaming_is_refused():
    model = Stack()
    with model.streaming(1):
        with pytest.raises(RuntimeError, match="already streaming"):
            with model.streaming(1):
                pass
        with pytest.raises(RuntimeError, match="already streaming"):
            model.conv.start_streaming(1)
    assert not model.is_streaming  # the failed attempt did not leave anything half-started


def test_state_is_dropped_after_an_error_inside_the_context():
    model = Stack()
    with pytest.raises(ZeroDivisionError):
        with model.streaming(1):
            model(torch.randn(1, 3, 4))
            1 / 0
    assert not model.is_streaming and not model.sum.is_streaming


def test_reset_starts_a_new_stream():
    torch.manual_seed(0)
    model = Stack()
    a, b = torch.randn(1, 3, 9), torch.randn(1, 3, 9)
    with model.streaming(1):
        stream(model, a, [4, 5])
        model.reset_streaming()
        after_reset = stream(model, b, [3, 6])
        assert model.conv.streaming_state.batch_size == 1
    torch.testing.assert_close(after_reset, model(b), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="nothing to reset"):
        model.reset_streaming()


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        with Stack().streaming(0):
            pass
