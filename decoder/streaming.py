"""`StreamingDecoder`: speech tokens in as they arrive, waveform chunks out, constant cost per chunk.

    dec = StreamingDecoder(speech_decoder, first_chunk_tokens=10, chunk_tokens=(20, 40))
    for tokens in lm_stream:
        for wav in dec.push(tokens):   # 1-D float tensors at 22,050 Hz, ready to play
            play(wav)
    for wav in dec.finish():          # the tail
        play(wav)

How a chunk is made (F(n) = floor(n * 441 / 64) mel frames for n tokens):
1. Encoder: the new tokens (whole blocks of 10) attend to the cached keys/values of every earlier
   block, so earlier tokens are never re-encoded (GLM-4-Voice re-encodes them all, every chunk).
   Block-causal attention makes this exact: the cached encoder equals the offline encoder.
2. Length regulator over the new frames plus `context_frames` frames of left context (its convs).
3. Flow ODE over a window: `left_context_frames` frames already emitted + the new frames. The
   left-context frames are pinned, at every Euler step, to the values they had when they were
   computed (a cached trajectory), so the estimator sees the stream's past exactly as it was;
   noise is a function of (seed, frame index), so every frame gets the noise it gets offline.
4. The last `holdback_frames` frames lack right context: they are kept back, recomputed with the
   next chunk and cross-faded (raised cosine) into it, so joins carry no step.
5. Vocoder: HiFT streams exactly (its own push/flush with left context and source cache);
   a vocoder without streaming support (Griffin-Lim fallback) runs on overlapping windows
   joined by a cross-fade.

Cost per chunk is bounded by the chunk size plus the fixed contexts, whatever came before.
The first chunk comes out when exactly `first_chunk_tokens` (10) tokens have arrived, not before.

Several `StreamingDecoder`s may share one `SpeechDecoder`: each keeps its own encoder and vocoder
state and swaps it into the shared modules only for the duration of a call (not thread-safe:
serialise calls per model).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from decoder.flow import FlowInputError, frames_for_tokens, token_of_frames
from decoder.model import SpeechDecoder, as_token_tensor


def raised_cosine(length: int, device=None) -> torch.Tensor:
    """Fade-in weights (length,) rising from near 0 to near 1; 1 - w is the matching fade-out."""
    positions = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / max(length, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * positions)


class _WindowedVocoderStream:
    """Streams a vocoder that has only `inference(mel)`: overlapping windows joined by cross-fades."""

    def __init__(self, vocoder, left_context: int = 8, overlap: int = 4):
        self.vocoder, self.left_context, self.overlap = vocoder, left_context, overlap
        self.hop = vocoder.hop_length
        self.mel: torch.Tensor | None = None  # (1, 80, F) every frame received (trimmed to the context)
        self.mel_start = 0  # absolute index of mel[..., 0]
        self.emitted = 0  # frames whose samples were returned
        self.tail: torch.Tensor | None = None  # samples of frames [emitted, emitted + overlap) from the last run

    def push(self, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], dim=-1)
        end = self.mel_start + self.mel.shape[-1]
        emit_end = end if final else end - self.overlap
        if emit_end <= self.emitted:
            return mel.new_zeros(0)
        start = max(self.mel_start, self.emitted - self.left_context)
        wav, _ = self.vocoder.inference(self.mel[..., start - self.mel_start:])
        wav = wav[0, (self.emitted - start) * self.hop:]  # samples of frames [emitted, end)
        if self.tail is not None:
            fade = min(len(self.tail), len(wav))
            ramp = raised_cosine(fade, wav.device)
            wav = torch.cat([self.tail[:fade] * (1 - ramp) + wav[:fade] * ramp, wav[fade:]])
        keep = (emit_end - self.emitted) * self.hop
        out, self.tail = wav[:keep], (None if final else wav[keep:])
        self.emitted = emit_end
        trim = max(0, self.emitted - self.left_context - self.mel_start)
        self.mel, self.mel_start = self.mel[..., trim:], self.mel_start + trim
        return out


class StreamingDecoder:
    """Push speech tokens, get waveform chunks. See the module docstring for the algorithm."""

    def __init__(
        self,
        decoder: SpeechDecoder,
        first_chunk_tokens: int = 10,
        chunk_tokens: Sequence[int] | int = (20, 40),
        *,
        left_context_frames: int = 69,
        holdback_frames: int = 24,
        crossfade_frames: int | None = None,
        speaker: torch.Tensor | None = None,
        n_timesteps: int | None = None,
        reencode: bool = False,
        vocode: bool = True,
    ):
        """`chunk_tokens`: sizes of the chunks after the first, the last one repeating.

        Chunk sizes must be multiples of the encoder block (10): a token's encoding depends on its
        whole block. `reencode=True` re-encodes every earlier token at each chunk instead of using
        the key/value cache (the GLM-4-Voice behaviour; for benchmarks and tests only).
        `vocode=False` returns mel chunks (80, frames) instead of waveforms (to run another vocoder).
        `crossfade_frames`: how many of the recomputed held-back frames are blended with their first,
        right-context-less version (None: all `holdback_frames` of them; 0: replaced outright).
        """
        if not isinstance(decoder, SpeechDecoder):
            raise TypeError(f"StreamingDecoder needs a SpeechDecoder, got {type(decoder).__name__}")
        block = decoder.config.block_size
        sizes = [first_chunk_tokens] + ([chunk_tokens] if isinstance(chunk_tokens, int) else list(chunk_tokens))
        if len(sizes) < 2:
            raise ValueError("chunk_tokens must name at least one chunk size, e.g. (20, 40)")
        for size in sizes:
            if not isinstance(size, int) or size < block or size % block:
                raise ValueError(f"chunk sizes must be positive multiples of the encoder block ({block} tokens), "
                                 f"got {sizes}: a token's encoding depends on its whole block")
        regulator_context = decoder.flow.length_regulator.context_frames
        if holdback_frames < regulator_context:
            raise ValueError(f"holdback_frames must be >= {regulator_context} (the length regulator's reach)")
        if holdback_frames >= frames_for_tokens(min(sizes)):
            raise ValueError(f"holdback_frames ({holdback_frames}) must be smaller than the frames of the "
                             f"smallest chunk ({frames_for_tokens(min(sizes))})")
        if crossfade_frames is not None and not 0 <= crossfade_frames <= holdback_frames:
            raise ValueError(f"crossfade_frames must be between 0 and holdback_frames ({holdback_frames}), "
                             f"got {crossfade_frames}")
        if left_context_frames < 0:
            raise ValueError(f"left_context_frames must be >= 0, got {left_context_frames}")
        self.decoder = decoder
        self.chunk_sizes = sizes
        self.left_context_frames = left_context_frames
        self.holdback_frames = holdback_frames
        self.crossfade_frames = holdback_frames if crossfade_frames is None else crossfade_frames
        self.speaker = speaker
        self.n_timesteps = n_timesteps
        self.reencode = reencode
        self.vocode = vocode
        self.reset()

    # --- public API -------------------------------------------------------------------------
    @property
    def first_chunk_tokens(self) -> int:
        return self.chunk_sizes[0]

    @property
    def tokens_received(self) -> int:
        return self._tokens_encoded + len(self._pending)

    def reset(self) -> None:
        """Forget the current stream (e.g. after barge-in); the next push starts a new answer."""
        flow = self.decoder.flow
        self._encoder_state = flow.encoder._init_streaming_state(1)
        vocoder = self.decoder.vocoder
        if hasattr(vocoder, "push") and hasattr(vocoder, "flush"):
            self._vocoder_state = vocoder._init_streaming_state(1)
            self._windowed_vocoder = None
        else:
            self._vocoder_state = None
            self._windowed_vocoder = _WindowedVocoderStream(vocoder)
        self._pending: list[int] = []
        self._all_tokens = torch.zeros(1, 0, dtype=torch.long)  # only kept when reencode=True
        self._tokens_encoded = 0
        self._chunks_done = 0
        self._encoded = torch.zeros(1, 0, flow.config.n_mels)  # projected encoder output of kept tokens
        self._encoded_offset = 0  # token index of self._encoded[:, 0]
        self._frames_emitted = 0
        self._tentative: torch.Tensor | None = None  # (80, H) held-back frames from the last chunk
        self._trajectory: torch.Tensor | None = None  # (steps, 1, 80, K) of frames [emitted - K, emitted)
        self._finished = False

    def push(self, tokens: Iterable[int] | torch.Tensor) -> list[torch.Tensor]:
        """Add speech token ids; return the waveform chunks (1-D, 22,050 Hz) that are ready now."""
        if self._finished:
            raise RuntimeError("this stream is finished; call reset() to start a new one")
        ids = as_token_tensor(tokens)
        if ids.numel():
            self.decoder.flow.check_tokens(ids)
        self._pending.extend(int(t) for t in ids)
        chunks = []
        while len(self._pending) >= self._next_chunk_size():
            size = self._next_chunk_size()
            batch, self._pending = self._pending[:size], self._pending[size:]
            chunks.extend(self._process(batch, final=False))
        return chunks

    def finish(self) -> list[torch.Tensor]:
        """Decode every token not yet decoded and flush the vocoder; ends the stream."""
        if self._finished:
            raise RuntimeError("this stream is already finished; call reset() to start a new one")
        if self.tokens_received == 0:
            raise FlowInputError("no speech tokens were pushed: nothing to decode")
        chunks = self._process(self._pending, final=True)
        self._pending = []
        self._finished = True
        return chunks

    # --- internals --------------------------------------------------------------------------
    def _next_chunk_size(self) -> int:
        return self.chunk_sizes[min(self._chunks_done, len(self.chunk_sizes) - 1)]

    @contextmanager
    def _own_state(self) -> Iterator[None]:
        """Swap this stream's state into the shared modules for one call."""
        encoder, vocoder = self.decoder.flow.encoder, self.decoder.vocoder
        if encoder._streaming_state is not None:
            raise RuntimeError("the decoder's encoder is already streaming elsewhere; calls must not overlap")
        encoder._streaming_state = self._encoder_state
        if self._vocoder_state is not None:
            vocoder._streaming_state = self._vocoder_state
        try:
            yield
        finally:
            self._encoder_state = encoder._streaming_state
            encoder._streaming_state = None
            if self._vocoder_state is not None:
                self._vocoder_state = vocoder._streaming_state
                vocoder._streaming_state = None

    @torch.no_grad()
    def _encode(self, new_tokens: list[int]) -> None:
        flow = self.decoder.flow
        device = self.decoder.device
        if new_tokens:
            ids = torch.tensor(new_tokens, dtype=torch.long, device=device)[None]
            if self.reencode:  # reference behaviour: run the encoder over every token so far
                self._all_tokens = torch.cat([self._all_tokens.to(device), ids], dim=1)
                encoded_new = flow.encode(self._all_tokens)[:, -len(new_tokens):]
            else:
                encoded_new = flow.encode_step(ids)
            self._encoded = torch.cat([self._encoded.to(encoded_new), encoded_new], dim=1)
            self._tokens_encoded += len(new_tokens)

    @torch.no_grad()
    def _process(self, new_tokens: list[int], final: bool) -> list[torch.Tensor]:
        flow = self.decoder.flow
        with self._own_state():
            self._encode(new_tokens)
            available = frames_for_tokens(self._tokens_encoded)  # frames whose mu can be computed
            emitted = self._frames_emitted
            start = max(0, emitted - self.left_context_frames)
            reach = flow.length_regulator.context_frames
            regulator_start = max(0, start - reach)
            mu = flow.length_regulator(self._encoded, regulator_start, available, self._encoded_offset)
            mu = mu[:, :, start - regulator_start:]  # (1, 80, available - start)
            device, dtype = mu.device, mu.dtype
            noise = flow.start_noise(start, available, device, dtype)
            pinned = None
            if self._trajectory is not None and emitted > start:
                pinned = self._trajectory[..., -(emitted - start):]
            speaker = flow.speaker_condition(self.speaker, 1)
            mel, trajectory = flow.sample(mu, noise, speaker, torch.zeros_like(mu), n_timesteps=self.n_timesteps,
                                          fixed_trajectory=pinned, return_trajectory=True)
            mel = mel[0, :, emitted - start:]  # (80, available - emitted): frames [emitted, available)
            emit_end = available if final else available - self.holdback_frames
            out = mel[:, : emit_end - emitted]
            if self._tentative is not None and out.shape[-1] and self.crossfade_frames:
                fade = min(self.crossfade_frames, self._tentative.shape[-1], out.shape[-1])
                ramp = raised_cosine(fade, device).to(dtype)
                out = torch.cat([self._tentative[:, :fade] * (1 - ramp) + out[:, :fade] * ramp, out[:, fade:]], dim=1)
            self._tentative = None if final else mel[:, emit_end - emitted:]
            keep = min(self.left_context_frames, emit_end - start)
            self._trajectory = trajectory[..., emit_end - start - keep: emit_end - start] if keep else None
            self._frames_emitted = emit_end
            self._chunks_done += 1
            self._trim_encoded()
            result = self._vocode(out, final) if self.vocode else out
        return [result] if result.numel() else []

    def _trim_encoded(self) -> None:
        """Drop encoder outputs no future window can reach (keeps memory flat on long answers)."""
        earliest_frame = max(0, self._frames_emitted - self.left_context_frames
                             - self.decoder.flow.length_regulator.context_frames)
        first_needed = int(token_of_frames(torch.tensor(earliest_frame)))
        drop = first_needed - self._encoded_offset
        if drop > 0:
            self._encoded = self._encoded[:, drop:]
            self._encoded_offset += drop

    def _vocode(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        vocoder = self.decoder.vocoder
        if self._windowed_vocoder is not None:
            wav = self._windowed_vocoder.push(mel[None], final=final) if mel.shape[-1] or final else mel.new_zeros(0)
            return wav.float().reshape(-1)
        pieces = []
        if mel.shape[-1]:
            pieces.append(vocoder.push(mel[None])[0])
        if final:
            pieces.append(vocoder.flush()[0])
        return torch.cat(pieces).float() if pieces else mel.new_zeros(0)
