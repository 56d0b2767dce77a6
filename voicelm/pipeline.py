"""A pipeline: speech tokenizer + voice LM + streaming decoder, loaded from one directory.

    pipeline/
      pipeline.json       optional: {"name": ..., "description": ..., "random_weights": false}
      tokenizer/          tokenizer part (config.json + model.safetensors)
      voicelm/            LM part (config.json + model.safetensors + text_tokenizer.json)
      decoder/            decoder part (flow + vocoder)

`load_pipeline(dir)` checks the contracts between the parts before any weights are read (speech
vocabulary of the LM == codebook of the tokenizer == token vocabulary of the decoder) and after
loading (12.5 tokens/s on both sides of the LM), and names the two disagreeing numbers and the
files they come from. Conversations run in `Session`s (`pipeline.session()`); any number of them
share the pipeline's weights, which are never written after loading.

This module is the one place that knows the parts' APIs; `Session` talks only to the small
methods below (tokenize, build_prompt, start_generation, new_audio_stream, new_token_stream).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from voicelm.core.audio import DECODER_SAMPLE_RATE, MEL_HOP, SAMPLE_RATE, TOKEN_RATE
from voicelm.core.checkpoint import CONFIG_NAME, CheckpointError, read_part_config

if TYPE_CHECKING:
    from voicelm.session import Session

PART_DIRS = {"tokenizer": "tokenizer", "voicelm": "voicelm", "decoder": "decoder"}
PIPELINE_FILE = "pipeline.json"
FIRST_CHUNK_TOKENS = 10  # the decoder's first audio comes after this many speech tokens


class PipelineError(CheckpointError):
    """A pipeline directory that cannot be used: missing parts or parts that disagree."""


def _speech_vocab_sizes(directory: Path) -> dict[str, tuple[int, str]]:
    """{part: (size, "file: key")} read from the three config.json files without loading weights."""
    tokenizer = read_part_config(directory / PART_DIRS["tokenizer"], "tokenizer")
    lm = read_part_config(directory / PART_DIRS["voicelm"], "voicelm")
    decoder = read_part_config(directory / PART_DIRS["decoder"], "decoder")
    try:
        return {
            "tokenizer": (int(tokenizer["codebook_size"]), f"{directory / 'tokenizer' / CONFIG_NAME}: codebook_size"),
            "voicelm": (int(lm["speech_vocab_size"]), f"{directory / 'voicelm' / CONFIG_NAME}: speech_vocab_size"),
            "decoder": (int(decoder["flow"]["vocab_size"]), f"{directory / 'decoder' / CONFIG_NAME}: flow.vocab_size"),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{directory}: a part's config.json lacks its vocabulary size ({exc!r}); "
                            f"the part was written by another version") from None


def check_vocab_contract(sizes: Mapping[str, tuple[int, str]]) -> None:
    """speech vocab of the LM == codebook of the tokenizer == decoder vocab, or a clear error."""
    (lm_size, lm_where) = sizes["voicelm"]
    for part in ("tokenizer", "decoder"):
        size, where = sizes[part]
        if size != lm_size:
            raise PipelineError(
                f"speech vocabulary mismatch: {where} = {size} but {lm_where} = {lm_size}. The LM's speech "
                f"tokens must be exactly the {part}'s codes: these parts were trained for different speech "
                f"tokenizers. Put parts trained together in one pipeline directory.")


def check_rate_contract(tokenizer, decoder) -> None:
    """12.5 speech tokens per second on both sides of the LM."""
    from tokenizer.config import CONV_STRIDE, HOP_LENGTH, POOL_KERNEL
    from decoder.flow import FRAMES_PER_TOKEN

    tokenizer_rate = SAMPLE_RATE / (HOP_LENGTH * CONV_STRIDE * POOL_KERNEL)
    if tokenizer_rate != TOKEN_RATE:
        raise PipelineError(f"the tokenizer makes {tokenizer_rate} tokens/s (hop {HOP_LENGTH} x stride "
                            f"{CONV_STRIDE} x pool {POOL_KERNEL} at {SAMPLE_RATE} Hz), the pipeline needs {TOKEN_RATE}")
    rate = getattr(decoder, "sample_rate", None)
    decoder_rate = float(rate) / MEL_HOP / float(FRAMES_PER_TOKEN) if rate else None
    if rate != DECODER_SAMPLE_RATE or decoder_rate != TOKEN_RATE:
        raise PipelineError(f"the decoder consumes {decoder_rate} tokens/s (sample rate {rate} Hz, hop {MEL_HOP}, "
                            f"{float(FRAMES_PER_TOKEN)} mel frames per token); the tokenizer makes {TOKEN_RATE}")


class _LockedAudioStream:
    """A decoder stream whose calls are serialised on the decoder's lock: `StreamingDecoder`s
    keep their own state but swap it into the shared modules for the duration of a call."""

    def __init__(self, stream, lock: threading.Lock):
        self._stream = stream
        self._lock = lock

    def push(self, codes: Sequence[int]) -> list[torch.Tensor]:
        with self._lock:
            return self._stream.push(list(codes))

    def finish(self) -> list[torch.Tensor]:
        with self._lock:
            if self._stream.tokens_received == 0:
                return []  # an answer without speech: nothing to decode
            return self._stream.finish()

    def reset(self) -> None:
        with self._lock:
            self._stream.reset()


class _Generation:
    """`VoiceLMGen` as the session sees it: `step() -> LM id | None`, `cancel()`, `hit_max_tokens`."""

    def __init__(self, gen):
        self._gen = gen

    def step(self) -> int | None:
        event = self._gen.step()
        return None if event is None else int(event.token_id)

    def cancel(self) -> None:
        self._gen.cancel()

    @property
    def hit_max_tokens(self) -> bool:
        from voicelm.lm.generate import CONTEXT_FULL, MAX_NEW_TOKENS

        return self._gen.stop_reason in (MAX_NEW_TOKENS, CONTEXT_FULL)


class Pipeline:
    """Tokenizer + LM + decoder with their contracts checked. Read-only after construction."""

    def __init__(self, tokenizer, lm, decoder, *, directory: str | os.PathLike | None = None,
                 name: str | None = None, description: str = "", random_weights: bool = False,
                 first_chunk_tokens: int = FIRST_CHUNK_TOKENS, chunk_tokens: Sequence[int] = (20, 40)):
        check_vocab_contract({
            "tokenizer": (int(tokenizer.codebook_size), "tokenizer.codebook_size"),
            "voicelm": (int(lm.vocab.speech_vocab_size), "lm.vocab.speech_vocab_size"),
            "decoder": (int(decoder.vocab_size), "decoder.vocab_size"),
        })
        check_rate_contract(tokenizer, decoder)
        self.tokenizer = tokenizer
        self.lm = lm
        self.decoder = decoder
        self.directory = Path(directory) if directory is not None else None
        self.name = name or (self.directory.name if self.directory else "pipeline")
        self.description = description
        self.random_weights = random_weights
        self.first_chunk_tokens = first_chunk_tokens
        self.chunk_tokens = tuple(chunk_tokens)
        self._decoder_lock = threading.Lock()
        for module in (tokenizer, lm.model, decoder):
            module.eval()

    # --- what users see -------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        """Rate of the audio the pipeline speaks (22,050 Hz)."""
        return int(self.decoder.sample_rate)

    @property
    def vocab(self):
        return self.lm.vocab

    @property
    def max_context(self) -> int:
        return int(self.lm.max_context)

    @property
    def default_system(self) -> str | None:
        from voicelm.lm.prompt import AUTO

        return AUTO

    def describe(self) -> str:
        """One line saying which model this is (shown by the demo, server and CLI)."""
        where = str(self.directory) if self.directory else "in memory"
        label = f"{self.name} ({where})"
        if self.random_weights:
            label += " - RANDOM WEIGHTS: untrained, it produces noise and gibberish"
        if getattr(self.decoder, "is_fallback_vocoder", False):
            label += " - fallback Griffin-Lim vocoder (no trained vocoder)"
        return label

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "directory": str(self.directory) if self.directory else None,
            "description": self.description, "random_weights": self.random_weights,
            "sample_rate": self.sample_rate, "input_sample_rate": SAMPLE_RATE, "token_rate": TOKEN_RATE,
            "speech_vocab_size": int(self.vocab.speech_vocab_size), "max_context": self.max_context,
        }

    def session(self, **kwargs) -> "Session":
        """A new conversation; see `voicelm.session.Session` for the arguments."""
        from voicelm.session import Session

        return Session(self, **kwargs)

    # --- sampling options ----------------------------------------------------------------------
    def make_options(self, options: Any = None, base: Any = None):
        """SamplingOptions from None / SamplingOptions / a mapping of overrides over `base`."""
        from voicelm.lm.generate import GenerationError, SamplingOptions

        base = base if base is not None else SamplingOptions()
        if options is None:
            return base
        if isinstance(options, SamplingOptions):
            return options
        if isinstance(options, Mapping):
            known = {f.name for f in dataclasses.fields(SamplingOptions)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ValueError(f"unknown sampling options {unknown}; known: {sorted(known)}")
            try:
                return dataclasses.replace(base, **dict(options))
            except (GenerationError, TypeError) as exc:
                raise ValueError(str(exc)) from None
        raise ValueError(f"options must be a SamplingOptions or a mapping, got {type(options).__name__}")

    # --- the parts, as the session uses them ---------------------------------------------------
    def tokenize(self, wav_16k: torch.Tensor) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(wav_16k, SAMPLE_RATE, max_seconds=None)]

    def new_token_stream(self):
        """A streaming tokenizer (state in the stream object): push(samples_16k), flush()."""
        stream = self.tokenizer.stream()
        return _TokenStream(stream)

    def check_speech_tokens(self, tokens: Sequence[int]) -> list[int]:
        codes = [int(t) for t in tokens]
        if not codes:
            raise ValueError("speech_tokens is empty: the utterance gave no speech tokens")
        size = int(self.vocab.speech_vocab_size)
        bad = [c for c in codes if not 0 <= c < size]
        if bad:
            raise ValueError(f"speech tokens {bad[:5]} are outside [0, {size}): they come from another tokenizer")
        return codes

    def build_prompt(self, history, system, *, user_text=None, user_speech=None) -> list[int]:
        from voicelm.lm.prompt import AssistantTurn, UserTurn, build_prompt

        turns = []
        for exchange in history:
            if exchange.user_speech is not None:
                turns.append(UserTurn(speech=list(exchange.user_speech)))
            else:
                turns.append(UserTurn(text=exchange.user_text))
            turns.append(AssistantTurn(list(exchange.output_ids)))
        return build_prompt(self.vocab, self.lm.text_tokenizer, turns, user_text=user_text,
                            user_speech=None if user_speech is None else list(user_speech), system=system)

    def start_generation(self, prompt_ids: Sequence[int], options, rng: torch.Generator) -> _Generation:
        from voicelm.lm.generate import VoiceLMGen

        if options.seed is None:  # draw this turn's seed from the session's generator
            seed = int(torch.randint(0, 2**62, (), generator=rng))
            options = dataclasses.replace(options, seed=seed)
        return _Generation(VoiceLMGen(self.lm, prompt_ids, options))

    def new_audio_stream(self) -> _LockedAudioStream:
        from decoder.streaming import StreamingDecoder

        stream = StreamingDecoder(self.decoder, first_chunk_tokens=self.first_chunk_tokens,
                                  chunk_tokens=self.chunk_tokens)
        return _LockedAudioStream(stream, self._decoder_lock)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.lm.text_tokenizer.decode(ids)


class _TokenStream:
    """The tokenizer's stream with plain lists out."""

    def __init__(self, stream):
        self._stream = stream

    def push(self, samples) -> list[int]:
        if not isinstance(samples, torch.Tensor):
            samples = torch.as_tensor(samples, dtype=torch.float32)
        return [int(t) for t in self._stream.push(samples)]

    def flush(self) -> list[int]:
        from voicelm.core.audio import AudioError

        try:
            return [int(t) for t in self._stream.flush()]
        except AudioError:
            if self._stream.tokens_emitted == 0:
                return []  # no audio reached the tokenizer: the caller reports the empty utterance
            raise


def read_pipeline_info(directory: Path) -> dict[str, Any]:
    path = directory / PIPELINE_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise PipelineError(f"{path} must hold a JSON object")
    return info


def load_pipeline(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> Pipeline:
    """Load `tokenizer/`, `voicelm/`, `decoder/` from `directory`, checking their contracts."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineError(f"pipeline directory {directory} does not exist (or is a file). A pipeline directory "
                            f"holds tokenizer/, voicelm/ and decoder/; train one (voicelm recipe demo) or build "
                            f"a random tiny one (python -m voicelm.testing DIR)")
    missing = [name for name in PART_DIRS.values() if not (directory / name / CONFIG_NAME).exists()]
    if missing:
        raise PipelineError(f"{directory} is not a complete pipeline: missing part(s) {missing} (each a directory "
                            f"with {CONFIG_NAME} + model.safetensors). Expected tokenizer/, voicelm/, decoder/.")
    check_vocab_contract(_speech_vocab_sizes(directory))
    info = read_pipeline_info(directory)

    from decoder.model import SpeechDecoder
    from tokenizer.model import SpeechTokenizer
    from voicelm.lm.model import VoiceLM

    tokenizer = SpeechTokenizer.from_pretrained(directory / PART_DIRS["tokenizer"]).to(device)
    lm = VoiceLM.from_pretrained(directory / PART_DIRS["voicelm"], device=device, dtype=torch.float32)
    decoder = SpeechDecoder.from_pretrained(directory / PART_DIRS["decoder"], device=device)
    return Pipeline(tokenizer, lm, decoder, directory=directory, name=info.get("name"),
                    description=info.get("description", ""), random_weights=bool(info.get("random_weights", False)))




def open_pipeline(directory: str | os.PathLike | None = None, *, random_tiny: bool = False,
                  device: str | torch.device = "cpu") -> Pipeline:
    """The pipeline a command should run: `directory`, else the shipped default
    (`voicelm.DEFAULT_PIPELINE`), or with `random_tiny` a tiny random one (labelled as such).

    Errors say what is missing and what to pass instead."""
    from voicelm import DEFAULT_PIPELINE

    if random_tiny:
        if directory is not None:
            raise PipelineError("give either a pipeline directory or --random-tiny, not both")
        from voicelm.testing import build_tiny_pipeline

        return build_tiny_pipeline(None)
    if directory is None:
        if not (DEFAULT_PIPELINE / PART_DIRS["voicelm"] / CONFIG_NAME).exists():
            raise PipelineError(
                f"no trained default pipeline is present at {DEFAULT_PIPELINE} (the demo recipe writes it: "
                f"voicelm recipe demo). Pass --pipeline DIR to use another pipeline directory, or "
                f"--random-tiny to try the machinery on a tiny model with random weights (it babbles).")
        directory = DEFAULT_PIPELINE
    return load_pipeline(directory, device=device)


def add_pipeline_arguments(parser) -> None:
    """--pipeline / --random-tiny, shared by `voicelm chat`, `serve` and `demo`."""
    parser.add_argument("--pipeline", metavar="DIR", default=None,
                        help="pipeline directory (tokenizer/, voicelm/, decoder/); default: the shipped models/demo")
    parser.add_argument("--random-tiny", action="store_true",
                        help="use a tiny pipeline with RANDOM weights (no trained model needed; it babbles)")
