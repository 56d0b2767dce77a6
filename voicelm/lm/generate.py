"""Step-wise generation of an interleaved answer (one token per `step()`, KV cache).

    gen = VoiceLMGen(lm, prompt_ids, SamplingOptions(temperature=0.2, top_p=0.8))
    for event in gen:                       # or: while (event := gen.step()) is not None
        if event.kind == "text": ...        # event.token_id: a text id
        else: ...                           # event.speech_index: a speech code 0..K-1
    gen.stop_reason                         # "stop_token" | "max_new_tokens" | "context" | "cancelled"
    history.append(gen.assistant_turn())    # the answer as the next prompt's history

The interleaving rule enforced with `enforce_interleave=True` (a logits mask, nothing else):
- An answer is cycles of up to 13 text tokens and 26 speech tokens.
- Text phase of a cycle (fewer than 13 text tokens so far, no speech yet): any text id or any
  speech id. A speech id here means "the text is finished": from then on only speech (and stop).
- Speech phase (13 text tokens emitted in this cycle): speech ids only, until 26 of them; then a
  new cycle starts with its text phase.
- Stop (`<|user|>`, `<|endoftext|>`, `<|observation|>`) is allowed only directly after a speech
  token: never as the first token and never right after text, so an answer always ends with speech
  and all its text has been voiced (the training layout ends the same way).
- Other special tokens and the padding rows of the vocabulary are never produced.
Without enforcement, text, speech and stop ids are allowed anywhere (use it for ASR/TTS prompts).

`cancel()` may be called from any thread; the generator stops before computing the next token.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from voicelm.lm.model import VoiceLM
from voicelm.lm.prompt import SPEECH_TOKENS_PER_CYCLE, TEXT_TOKENS_PER_CYCLE, AssistantTurn, split_ids

STOP_TOKEN = "stop_token"
MAX_NEW_TOKENS = "max_new_tokens"
CONTEXT_FULL = "context"
CANCELLED = "cancelled"


class GenerationError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.2        # 0 = greedy (GLM-4-Voice's demo: 0.2)
    top_p: float = 0.8              # nucleus; 1.0 = off (GLM-4-Voice's demo: 0.8)
    top_k: int = 0                  # 0 = off
    repetition_penalty: float = 1.0  # HF semantics, over the ids generated in this answer; 1.0 = off
    max_new_tokens: int = 2000
    enforce_interleave: bool = True
    text_tokens: int = TEXT_TOKENS_PER_CYCLE
    speech_tokens: int = SPEECH_TOKENS_PER_CYCLE
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature {self.temperature} < 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p {self.top_p} not in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k {self.top_k} < 0")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty {self.repetition_penalty} <= 0")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens {self.max_new_tokens} < 1")
        if self.text_tokens < 1 or self.speech_tokens < 1:
            problems.append("text_tokens and speech_tokens must be >= 1")
        if problems:
            raise GenerationError("invalid SamplingOptions: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class GenEvent:
    kind: str                   # "text" or "speech"
    token_id: int               # LM id
    speech_index: int | None    # speech code (id - speech_offset) for speech, else None
    position: int               # 0-based index of this token in the answer


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already cover top_p (the best one always stays).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class VoiceLMGen:
    """Generates one answer token by token from `prompt_ids` (batch of one)."""

    def __init__(self, lm: VoiceLM, prompt_ids: Sequence[int], options: SamplingOptions = SamplingOptions()):
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise GenerationError("the prompt is empty; build one with build_prompt()")
        lm.vocab.check_ids(prompt_ids, where="prompt")
        room = lm.max_context - len(prompt_ids)
        if room < 1:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {lm.max_context}: no room for an "
                f"answer. Shorten the history (drop the oldest turns) or the user audio.")
        self.lm = lm
        self.vocab = lm.vocab
        self.options = options
        self.prompt_ids = prompt_ids
        self.limit = min(options.max_new_tokens, room)
        self.limit_reason = MAX_NEW_TOKENS if options.max_new_tokens <= room else CONTEXT_FULL
        self.generated: list[int] = []
        self.stop_reason: str | None = None
        self.stop_token_id: int | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._cache = None
        self._next_logits: torch.Tensor | None = None
        self._pending: int | None = None  # last sampled id, not yet fed to the model
        # interleaving state
        self._text_done = False
        self._cycle_text = 0
        self._cycle_speech = 0
        self._last_kind: str | None = None
        self._generator = torch.Generator(device="cpu")
        if options.seed is not None:
            self._generator.manual_seed(options.seed)
        else:
            self._generator.seed()
        self._build_masks()

    # --- public ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop before the next token (thread-safe)."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def step(self) -> GenEvent | None:
        """The next token, or None once the answer has ended (see `stop_reason`)."""
        with self._lock:
            if self.stop_reason is not None:
                return None
            if self._cancel.is_set():
                return self._finish(CANCELLED)
            if len(self.generated) >= self.limit:
                return self._finish(self.limit_reason)
            logits = self._advance()
            if self._cancel.is_set():
                return self._finish(CANCELLED)
            token = self._sample(logits)
            if token in self._stop_set:
                self.stop_token_id = token
                return self._finish(STOP_TOKEN)
            self._record(token)
            position = len(self.generated) - 1
            if self.vocab.is_speech(token):
                return GenEvent("speech", token, token - self.vocab.speech_offset, position)
            return GenEvent("text", token, None, position)

    def __iter__(self) -> Iterator[GenEvent]:
        while (event := self.step()) is not None:
            yield event

    def run(self) -> list[GenEvent]:
        return list(self)

    @property
    def text_ids(self) -> list[int]:
        return split_ids(self.vocab, self.generated)[0]

    @property
    def speech_indices(self) -> list[int]:
        return split_ids(self.vocab, self.generated)[1]

    def text(self) -> str:
        return self.lm.text_tokenizer.decode(self.text_ids)

    def assistant_turn(self) -> AssistantTurn:
        """The answer so far as history for the next prompt (a cancelled answer is kept as far as
        it went, as GLM-4-Voice keeps what was generated)."""
        return AssistantTurn(list(self.generated))

    # --- internals ------------------------------------------------------------------------------
    def _finish(self, reason: str) -> None:
        self.stop_reason = reason
        self._cache = None  # free the KV cache
        self._next_logits = None
        return None

    def _build_masks(self) -> None:
        vocab = self.vocab
        size = self.lm.model.config.vocab_size
        text_end = min(vocab.text_vocab_size, self.lm.text_tokenizer.vocab_size)
        self._text_mask = torch.zeros(size, dtype=torch.bool)
        self._text_mask[:text_end] = True
        self._speech_mask = torch.zeros(size, dtype=torch.bool)
        self._speech_mask[vocab.speech_offset:vocab.speech_offset + vocab.speech_vocab_size] = True
        self._stop_mask = torch.zeros(size, dtype=torch.bool)
        self._stop_mask[list(vocab.stop_ids)] = True
        self._stop_set = frozenset(vocab.stop_ids)

    def _allowed(self) -> torch.Tensor:
        opts = self.options
        if not opts.enforce_interleave:
            return self._text_mask | self._speech_mask | self._stop_mask
        if self._text_done or self._cycle_text >= opts.text_tokens:
            allowed = self._speech_mask.clone()       # speech phase, or text has ended
        else:
            allowed = self._text_mask | self._speech_mask  # text phase: speech here ends the text
        if self._last_kind == "speech":
            allowed |= self._stop_mask
        return allowed

    def _record(self, token: int) -> None:
        self.generated.append(token)
        self._pending = token
        opts = self.options
        if self.vocab.is_speech(token):
            if not self._text_done and self._cycle_text < opts.text_tokens:
                self._text_done = True   # speech chosen in the text phase: the text is over
            self._cycle_speech += 1
            self._last_kind = "speech"
            if not self._text_done and self._cycle_speech >= opts.speech_tokens:
                self._cycle_text = self._cycle_speech = 0
        else:
            self._cycle_text += 1
            self._last_kind = "text"

    @torch.inference_mode()
    def _advance(self) -> torch.Tensor:
        """Logits for the next position: prefill the prompt once, then feed the last token."""
        model = self.lm.model
        device = self.lm.device
        if self._cache is None:
            self._cache = DynamicCache(config=model.config)
            ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        else:
            ids = torch.tensor([[self._pending]], dtype=torch.long, device=device)
        out = model(input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().cpu()

    def _sample(self, logits: torch.Tensor) -> int:
        opts = self.options
        if opts.repetition_penalty != 1.0 and self.generated:
            seen = torch.tensor(sorted(set(self.generated)), dtype=torch.long)
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / opts.repetition_penalty, picked * opts.repetition_penalty)
        logits = logits.masked_fill(~self._allowed(), float("-inf"))
        if opts.temperature == 0:
            return int(torch.argmax(logits))
        logits = _filter_top_k_top_p(logits / opts.temperature, opts.top_k, opts.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))
