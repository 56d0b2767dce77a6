"""Streaming tokenization: audio in pieces of any size, each token out as soon as its block allows.

With block-causal attention the tokens of block b (block_size frames at 50 Hz) depend on
audio up to 120 samples before the block's end, and on nothing later: so the stream runs
the encoder one complete block at a time, keeping per layer the keys and values of earlier
blocks (a KV cache), and emits the block's tokens at once. The front end and the conv stem
run frame by frame with small histories. At 30 s the stream starts a fresh context, as
offline encoding cuts long audio into 30 s segments. The result equals `encode` of the whole
input (up to float rounding in the features; the tests compare token ids).

The state lives in the stream object, not in the model, so one model can serve several
streams at once (e.g. several conversations).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from voicelm.core.audio import SAMPLES_PER_TOKEN, AudioError
from voicelm.core.streaming import StreamingState

from tokenizer.config import CONV_STRIDE, POOL_KERNEL, SEGMENT_SAMPLES
from tokenizer.frontend import StreamingLogMel
from tokenizer.modules import CausalConv1d, KVCache
from tokenizer.model import SpeechTokenizer


class _ConvStream:
    """A CausalConv1d applied to input arriving in pieces: output t as soon as input t exists."""

    def __init__(self, conv: CausalConv1d, channels: int):
        self.conv = conv
        # Inputs from position (next output * stride - context) on; zeros = causal padding.
        self.buffer = torch.zeros(1, channels, conv.context)

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, C, n) -> (1, C_out, k) outputs that are now complete."""
        self.buffer = torch.cat([self.buffer, x], dim=-1)
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        count = (self.buffer.shape[-1] - kernel) // stride + 1 if self.buffer.shape[-1] >= kernel else 0
        if count <= 0:
            return self.buffer.new_zeros(1, self.conv.out_channels, 0)
        window = self.buffer[..., : (count - 1) * stride + kernel]
        self.buffer = self.buffer[..., count * stride:]
        return F.conv1d(window, self.conv.weight, self.conv.bias, stride=stride)


@dataclasses.dataclass
class SegmentState(StreamingState):
    """Everything one 30 s segment of one stream carries between pushes."""

    mel: StreamingLogMel
    conv1: _ConvStream
    conv2: _ConvStream
    caches: list[KVCache]
    pending: torch.Tensor  # (1, k, D) 50 Hz frames of the unfinished block
    frames_done: int = 0  # 50 Hz frames already run through the blocks
    samples: int = 0  # samples of this segment received


class TokenStream:
    """Incremental tokenizer of one stream of 16 kHz mono samples.

        stream = tokenizer.stream()
        for piece in pieces:
            tokens = stream.push(piece)  # LongTensor (k,), possibly empty
        tokens = stream.flush()          # the rest; the stream is then finished
    """

    def __init__(self, tokenizer: SpeechTokenizer):
        config = tokenizer.config
        if config.mel_floor != "fixed":
            raise ValueError(
                f"this tokenizer uses mel_floor={config.mel_floor!r}, which needs the whole 30 s segment "
                f"before the first frame (Whisper's max - 8 floor), so it cannot stream. Load it with "
                f"SpeechTokenizer.from_pretrained(dir, mel_floor='fixed') to stream (tokens may then "
                f"differ slightly from the official offline ones)."
            )
        self.tokenizer = tokenizer
        self.config = config
        self.finished = False
        self.tokens_emitted = 0
        self._state = self._new_segment()

    def _new_segment(self) -> SegmentState:
        model, config = self.tokenizer.encoder, self.config
        return SegmentState(
            batch_size=1,
            mel=StreamingLogMel(config.n_mels, config.mel_floor_value),
            conv1=_ConvStream(model.conv1, config.n_mels),
            conv2=_ConvStream(model.conv2, config.n_audio_state),
            caches=[KVCache() for _ in model.blocks],
            pending=torch.zeros(1, 0, config.n_audio_state),
        )

    @torch.no_grad()
    def _frames(self, mel: torch.Tensor) -> None:
        """New mel frames (n_mels, k) -> 50 Hz frames appended to `pending`."""
        state, encoder = self._state, self.tokenizer.encoder
        x = F.gelu(state.conv1.push(mel[None]))
        x = F.gelu(state.conv2.push(x)).transpose(1, 2)  # (1, k, D)
        start = state.frames_done + state.pending.shape[1]
        x = x + encoder.positional_embedding[start:start + x.shape[1]]
        state.pending = torch.cat([state.pending, x], dim=1)

    @torch.no_grad()
    def _run_blocks(self, final: bool) -> torch.Tensor:
        """Encode every complete block in `pending` (and, if `final`, the partial rest)."""
        state, encoder, block = self._state, self.tokenizer.encoder, self.config.block_size
        out = []
        while state.pending.shape[1] > 0:
            # Blocks are aligned to the segment start; a block may already be partly done only
            # at the end of input, so `need` is a whole block except for the final remainder.
            need = block - state.frames_done % block
            if state.pending.shape[1] < need and not final:
                break
            x, state.pending = state.pending[:, :need], state.pending[:, need:]
            for layer, cache in zip(encoder.blocks, state.caches):
                x = layer.forward_cached(x, cache)
            state.frames_done += x.shape[1]
            out.append(self.tokenizer.quantizer.nearest(F.avg_pool1d(x.transpose(1, 2), POOL_KERNEL).transpose(1, 2))[0])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def _feed(self, samples: torch.Tensor) -> torch.Tensor:
        self._frames(self._state.mel.push(samples))
        self._state.samples += samples.numel()
        return self._run_blocks(final=False)

    def _end_segment(self) -> torch.Tensor:
        state = self._state
        remainder = state.samples % SAMPLES_PER_TOKEN
        if remainder:  # offline pads every clip with zeros to whole tokens
            self._frames(state.mel.push(torch.zeros(SAMPLES_PER_TOKEN - remainder)))
        self._frames(state.mel.finish())
        return self._run_blocks(final=True)

    def push(self, samples) -> torch.Tensor:
        """Feed 16 kHz mono samples (1-D tensor or array, any length, even 0).

        Returns the tokens that became final (LongTensor (k,), k >= 0). Resample other rates
        first (voicelm.core.audio.prepare_audio).
        """
        if self.finished:
            raise RuntimeError("this stream was flushed; start a new one with tokenizer.stream()")
        if isinstance(samples, np.ndarray):
            samples = torch.from_numpy(np.ascontiguousarray(samples))
        if not isinstance(samples, torch.Tensor) or samples.dim() != 1:
            raise AudioError(f"push() takes 1-D 16 kHz mono samples, got {type(samples).__name__} "
                             f"{tuple(getattr(samples, 'shape', ()))}; downmix and resample first")
        if not samples.is_floating_point():
            raise AudioError(f"push() takes float samples in [-1, 1], got dtype {samples.dtype}")
        samples = samples.float()
        if not torch.isfinite(samples).all():
            raise AudioError("push() got NaN/inf samples: check the audio source")
        out = []
        while samples.numel():
            room = SEGMENT_SAMPLES - self._state.samples
            piece, samples = samples[:room], samples[room:]
            out.append(self._feed(piece))
            if self._state.samples == SEGMENT_SAMPLES:  # 30 s: close the segment, as offline does
                out.append(self._end_segment())
                self._state = self._new_segment()
        tokens = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
        self.tokens_emitted += tokens.numel()
        return tokens

    def flush(self) -> torch.Tensor:
        """End of input: tokens of the last (partial) block. The stream is finished afterwards."""
        if self.finished:
            raise RuntimeError("this stream was already flushed")
        self.finished = True
        tokens = self._end_segment() if self._state.samples else torch.zeros(0, dtype=torch.long)
        if self.tokens_emitted + tokens.numel() == 0:
            raise AudioError("the stream received no audio: push some samples before flush()")
        self.tokens_emitted += tokens.numel()
        return tokens
