"""Dialogue manifests -> interleaved LM training sequences.

Dialogue manifest (JSONL, one dialogue per line; written by the corpus generator):

    {"id": "d000017", "split": "train", "system": "...optional...",
     "turns": [{"role": "user", "text": "what is seven plus five?", "audio": "wavs/d000017_0.wav",
                "tokens": [812, 33, ...]},                       # speech codes, or null
               {"role": "assistant", "text": "seven plus five is twelve.", "audio": "...", "tokens": [...]},
               ...]}

Turns alternate user, assistant, starting with the user. `tokens` are the speech tokenizer's
codes (0..K-1) of the turn's audio; `audio` paths are kept for other stages and not read here.

Samples built from one manifest (each an `LMSample`: ids + labels, -100 = no loss):
- "dialogue": system, then every turn: the user as speech when it has tokens (as text otherwise,
  or with probability `text_input_ratio`), the assistant as its interleaved answer (13 text, 26
  speech, ..., rest of speech) + `<|user|>`. Loss on the answers and their stop token only.
- "asr": system SYSTEM_ASR, user speech of any turn with tokens, answer = its text + stop.
- "tts": system SYSTEM_TTS, user text of an assistant turn, answer = its speech + stop (the
  assistant's voice only, so the model learns one voice).
- "text": system SYSTEM_TEXT_ONLY, every turn as text, answers as text only + stop: text-only
  dialogues (`SampleBuilder.text_sample`, from `solver.text_manifest` or the training
  dialogues' text). They teach what to answer from data that needs no audio; a text answer of
  up to 13 tokens is exactly the text a spoken answer starts with.
- "respoken": the text-only dialogues made spoken without rendering anything: each turn gets
  the speech tokens of a spoken training turn with the same role, words and style (drawn per
  dialogue with the seed; several user voices may meet in one dialogue), then it is a
  "dialogue" sample. Text dialogues with a turn nobody recorded are left out (counted as
  `respoken_uncovered`). A closed domain's few hundred thousand text dialogues reuse a few
  thousand recordings, so speech-in dialogues grow from the recorded count to nearly the text
  count (`SampleBuilder.respoken_dialogues`); `respoken_max` caps how many are built.

- "voicing": a spoken dialogue whose last answer is swapped for another recorded answer of the
  same style (half the time one that starts with the same word, "two hundred sixty ..."), so the
  question no longer tells what the answer says; only its own text does. The loss is on that
  answer's speech and stop token only: its text, wrong for the question, is never trained, and
  the earlier answers have none (their stop tokens keep theirs: stopping there is right). It
  teaches the speech to say the text it follows (long answers drifted to another number in speech).
- "restyle": a style request after an answer the question cannot predict: the first user turn
  of a spoken dialogue, a recorded answer drawn at random (no loss but its stop token), a
  recorded style request ("say it slowly."), then that same answer recorded in the requested
  style (trained). Only copying the answer in the context is right, not saying a likely answer
  to the question. Answers come from the texts recorded both plainly and in a style.
  Both draw with (seed, dialogue id), one sample per spoken dialogue.

Too long for `max_length`: the oldest (user, assistant) pairs of a dialogue are dropped until
it fits (counted as `truncated_dialogues` / `dropped_turns`); a sample whose last exchange alone
does not fit is skipped (`skipped_too_long`). Answers whose speech is too short to stay behind
their text are skipped (`skipped_speech_shorter_than_text`). Every count is in `BuildStats` and
logged as a warning; nothing is cut silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from voicelm.core.checkpoint import atomic_write_file
from voicelm.core.manifest import iter_jsonl
from voicelm.lm.prompt import (SYSTEM_ASR, SYSTEM_TEXT_ONLY, SYSTEM_TTS, TEXT_TOKENS_PER_CYCLE,
                               SPEECH_TOKENS_PER_CYCLE, PromptError,
                               UserTurn, assistant_header, default_system, interleave, system_ids, user_ids)
from voicelm.lm.text_tokenizer import TextTokenizer
from voicelm.lm.vocab import Vocabulary

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TASKS = ("dialogue", "asr", "tts", "text", "respoken", "voicing", "restyle")


class DialogueManifestError(ValueError):
    pass


@dataclasses.dataclass
class DialogueTurn:
    role: str
    text: str | None = None
    audio: str | None = None
    tokens: list[int] | None = None
    style: str | None = None  # how an assistant turn is spoken ("slow", ...); None = not given

    def to_json(self) -> dict[str, Any]:
        row = {"role": self.role, "text": self.text, "audio": self.audio, "tokens": self.tokens}
        return row if self.style is None else {**row, "style": self.style}


@dataclasses.dataclass
class Dialogue:
    id: str
    turns: list[DialogueTurn]
    split: str = "train"
    system: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row = {"id": self.id, "split": self.split}
        if self.system is not None:
            row["system"] = self.system
        row["turns"] = [t.to_json() for t in self.turns]
        return {**row, **self.extra}


def _parse_dialogue(row: Any, where: str) -> Dialogue:
    if not isinstance(row, dict):
        raise DialogueManifestError(f"{where}: a dialogue is a JSON object, got {type(row).__name__}")
    for key in ("id", "turns"):
        if key not in row:
            raise DialogueManifestError(f"{where}: missing field {key!r}; a dialogue needs 'id' and 'turns'")
    if not isinstance(row["turns"], list) or not row["turns"]:
        raise DialogueManifestError(f"{where}: 'turns' must be a non-empty list")
    turns = []
    for i, t in enumerate(row["turns"]):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(t, dict) or t.get("role") != expected:
            raise DialogueManifestError(f"{where}: turn {i} must have role {expected!r} (turns alternate user, "
                                        f"assistant, starting with the user), got {t!r:.80}")
        tokens = t.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, list) or not all(isinstance(k, int) and k >= 0 for k in tokens):
                raise DialogueManifestError(f"{where}: turn {i} 'tokens' must be a list of non-negative ints or null")
        text = t.get("text")
        if text is not None and not isinstance(text, str):
            raise DialogueManifestError(f"{where}: turn {i} 'text' must be a string or null")
        if text is None and tokens is None:
            raise DialogueManifestError(f"{where}: turn {i} has neither text nor tokens")
        style = t.get("style")
        turns.append(DialogueTurn(t["role"], text, t.get("audio"), tokens, None if style is None else str(style)))
    extra = {k: v for k, v in row.items() if k not in ("id", "split", "system", "turns")}
    return Dialogue(str(row["id"]), turns, str(row.get("split", "train")), row.get("system"), extra)


def read_dialogues(path: str | os.PathLike, split: str | None = None) -> list[Dialogue]:
    """Dialogues of a manifest (only those of `split` when given)."""
    out = []
    for where, row in iter_jsonl(path, error=DialogueManifestError, hint="make one with `voicelm data dialogues`"):
        dialogue = _parse_dialogue(row, where)
        if split is None or dialogue.split == split:
            out.append(dialogue)
    return out


def write_dialogues(path: str | os.PathLike, dialogues: Sequence[Dialogue]) -> Path:
    lines = [json.dumps(d.to_json(), ensure_ascii=False) for d in dialogues]
    return atomic_write_file(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + ("\n" if lines else "")))


@dataclasses.dataclass
class LMSample:
    input_ids: list[int]
    labels: list[int]          # same length; IGNORE_INDEX where no loss
    task: str
    source: str                # dialogue id (and turn) it came from
    styled: bool = False       # its last answer is spoken in a style ("slow", ...), not plainly

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class BuildStats:
    samples: dict[str, int] = dataclasses.field(default_factory=lambda: {t: 0 for t in TASKS})
    truncated_dialogues: int = 0
    dropped_turns: int = 0
    skipped_too_long: int = 0
    skipped_speech_shorter_than_text: int = 0
    skipped_no_assistant_speech: int = 0
    respoken_uncovered: int = 0  # text dialogues with a turn no spoken training turn says
    restyle_uncovered: int = 0   # spoken dialogues left without a "restyle" sample (no styled recordings)
    voicing_unpaired: int = 0    # last answers with no other recorded answer of their style to swap in

    def report(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


@dataclasses.dataclass(frozen=True)
class DataOptions:
    max_length: int = 1024
    text_tokens: int = TEXT_TOKENS_PER_CYCLE
    speech_tokens: int = SPEECH_TOKENS_PER_CYCLE
    text_input_ratio: float = 0.0    # share of dialogues whose user turns are given as text
    tasks: tuple[str, ...] = ("dialogue", "asr", "tts")  # which sample kinds to build (of TASKS)
    seed: int = 0
    respoken_max: int | None = None  # at most this many "respoken" samples (None: every covered dialogue)


class SampleBuilder:
    def __init__(self, vocab: Vocabulary, tokenizer: TextTokenizer, options: DataOptions = DataOptions()):
        unknown = set(options.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown sample tasks {sorted(unknown)}; choose from {TASKS}")
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.options = options
        self.stats = BuildStats()
        self._rng = random.Random(options.seed)

    # --- pieces -------------------------------------------------------------------------------
    def _answer(self, text_ids: list[int], speech: list[int]) -> list[int]:
        return interleave(self.vocab, text_ids, speech, self.options.text_tokens, self.options.speech_tokens)

    def _assemble(self, system: str | None, exchanges: list[tuple[list[int], list[int]]], task: str,
                  source: str, styled: bool = False) -> LMSample:
        """exchanges: (user part incl. assistant header, answer) pairs; the answer and its stop
        token get the loss. The `<|user|>` that opens the next user turn is the stop token of the
        answer before it (one token, as in a generated conversation); the last answer gets its own."""
        ids = system_ids(self.vocab, self.tokenizer, system)
        labels = [IGNORE_INDEX] * len(ids)
        for k, exchange in enumerate(exchanges):
            user_part, answer = exchange[0], exchange[1]
            if user_part[0] != self.vocab.user_id:
                raise AssertionError("a user part starts with <|user|>")
            ids += user_part
            labels += ([self.vocab.user_id] if k > 0 else [IGNORE_INDEX]) + [IGNORE_INDEX] * (len(user_part) - 1)
            ids += answer
            labels += exchange[2] if len(exchange) > 2 else answer  # (user, answer, labels): a masked answer
        ids.append(self.vocab.user_id)
        labels.append(self.vocab.user_id)
        return LMSample(ids, labels, task, source, styled)

    def _fit(self, system: str | None, exchanges, task: str, source: str, styled: bool = False) -> LMSample | None:
        sample = self._assemble(system, exchanges, task, source, styled)
        dropped = 0
        while len(sample) > self.options.max_length and len(exchanges) > 1:
            exchanges = exchanges[1:]
            dropped += 1
            sample = self._assemble(system, exchanges, task, source, styled)
        if len(sample) > self.options.max_length:
            self.stats.skipped_too_long += 1
            log.warning("%s sample %s: %d tokens even with one exchange > max_length %d; skipped",
                        task, source, len(sample), self.options.max_length)
            return None
        if dropped:
            self.stats.truncated_dialogues += 1
            self.stats.dropped_turns += 2 * dropped
            log.warning("dialogue %s: dropped its %d oldest exchange(s) to fit max_length %d",
                        source, dropped, self.options.max_length)
        self.stats.samples[task] += 1
        return sample

    # --- samples --------------------------------------------------------------------------------
    def dialogue_sample(self, dialogue: Dialogue, task: str = "dialogue") -> LMSample | None:
        made = self._exchanges(dialogue)
        answers = [t for t in dialogue.turns if t.role == "assistant"]
        styled = bool(answers) and _styled(answers[-1])
        return None if made is None else self._fit(made[0], made[1], task, dialogue.id, styled)

    def _exchanges(self, dialogue: Dialogue) -> tuple[str, list] | None:
        """(system, [(user part + assistant header, interleaved answer)]) of a dialogue, or None
        (counted) when it has nothing to learn or an answer cannot be laid out."""
        as_text = self._rng.random() < self.options.text_input_ratio
        exchanges = []
        first_user_is_speech = None
        for i in range(0, len(dialogue.turns) - 1, 2):
            user, assistant = dialogue.turns[i], dialogue.turns[i + 1]
            if assistant.tokens is None or assistant.text is None:
                self.stats.skipped_no_assistant_speech += 1
                log.warning("dialogue %s turn %d: assistant turn lacks text or speech tokens; dialogue skipped",
                            dialogue.id, i + 1)
                return None
            use_speech = user.tokens is not None and (user.text is None or not as_text)
            if first_user_is_speech is None:
                first_user_is_speech = use_speech
            turn = UserTurn(speech=user.tokens) if use_speech else UserTurn(text=user.text)
            try:
                user_part = user_ids(self.vocab, self.tokenizer, turn)
                answer = self._answer(self.tokenizer.encode(assistant.text), assistant.tokens)
            except PromptError as exc:
                self.stats.skipped_speech_shorter_than_text += 1
                log.warning("dialogue %s turn %d: %s; dialogue skipped", dialogue.id, i + 1, exc)
                return None
            exchanges.append((user_part + assistant_header(self.vocab, self.tokenizer), answer))
        if not exchanges:
            return None  # a lone user turn: nothing to learn
        system = dialogue.system if dialogue.system is not None else default_system(bool(first_user_is_speech))
        return system, exchanges

    def _speech_labels(self, answer: list[int]) -> list[int]:
        """Labels of an interleaved answer that train its speech only."""
        return [IGNORE_INDEX if self.vocab.is_text(i) else i for i in answer]

    def voicing_sample(self, dialogue: Dialogue, bank: "AnswerBank") -> LMSample | None:
        """`dialogue` with its last answer swapped for another recording (module docstring)."""
        last = max((i for i, t in enumerate(dialogue.turns) if t.role == "assistant"), default=None)
        if last is None or dialogue.turns[last].tokens is None:
            return None
        original = dialogue.turns[last]
        rng = random.Random(f"{self.options.seed}:voicing:{dialogue.id}")
        drawn = bank.other_answer(original.style or "normal", original.text, rng)
        if drawn is None:
            self.stats.voicing_unpaired += 1
            return None
        text, tokens = drawn
        turns = dialogue.turns[:last] + [DialogueTurn("assistant", text, None, tokens, original.style)]
        made = self._exchanges(Dialogue(f"{dialogue.id}:voicing", turns, dialogue.split, dialogue.system))
        if made is None:
            return None
        system, (*earlier, (user, answer)) = made
        exchanges = [(u, a, [IGNORE_INDEX] * len(a)) for u, a in earlier] + [(user, answer, self._speech_labels(answer))]
        return self._fit(system, exchanges, "voicing", f"{dialogue.id}:voicing", _styled(original))

    def restyle_sample(self, dialogue: Dialogue, bank: "AnswerBank") -> LMSample | None:
        """The first question of `dialogue`, a random recorded answer, a style request, that answer
        in the requested style; the loss on the last answer only (module docstring)."""
        question = dialogue.turns[0]
        rng = random.Random(f"{self.options.seed}:restyle:{dialogue.id}")
        drawn = bank.restyle(rng)
        if question.tokens is None or drawn is None:
            self.stats.restyle_uncovered += 1
            return None
        text, plain, request, styled, style = drawn
        turns = [question, DialogueTurn("assistant", text, None, plain, "normal"),
                 DialogueTurn("user", request[0], None, request[1]), DialogueTurn("assistant", text, None, styled, style)]
        made = self._exchanges(Dialogue(f"{dialogue.id}:restyle", turns, dialogue.split, dialogue.system))
        if made is None:
            return None
        system, ((q, first), second) = made
        return self._fit(system, [(q, first, [IGNORE_INDEX] * len(first)), second], "restyle", f"{dialogue.id}:restyle",
                         _styled(turns[-1]))

    def asr_samples(self, dialogue: Dialogue) -> list[LMSample]:
        out = []
        for i, turn in enumerate(dialogue.turns):
            if turn.tokens is None or not turn.text:
                continue
            user_part = user_ids(self.vocab, self.tokenizer, UserTurn(speech=turn.tokens))
            answer = self.tokenizer.encode(turn.text)
            sample = self._fit(SYSTEM_ASR, [(user_part + assistant_header(self.vocab, self.tokenizer), answer)],
                               "asr", f"{dialogue.id}:{i}")
            if sample is not None:
                out.append(sample)
        return out

    def tts_samples(self, dialogue: Dialogue) -> list[LMSample]:
        out = []
        for i, turn in enumerate(dialogue.turns):
            if turn.role != "assistant" or turn.tokens is None or not turn.text:
                continue
            user_part = user_ids(self.vocab, self.tokenizer, UserTurn(text=turn.text))
            answer = self.vocab.speech_ids(turn.tokens)
            sample = self._fit(SYSTEM_TTS, [(user_part + assistant_header(self.vocab, self.tokenizer), answer)],
                               "tts", f"{dialogue.id}:{i}", _styled(turn))
            if sample is not None:
                out.append(sample)
        return out

    def text_sample(self, dialogue: Dialogue) -> LMSample | None:
        """Every turn as text; the answers are text only (no speech tokens)."""
        exchanges = []
        for i in range(0, len(dialogue.turns) - 1, 2):
            user, assistant = dialogue.turns[i], dialogue.turns[i + 1]
            if not user.text or not assistant.text:
                return None  # a turn known only as speech: not a text dialogue
            user_part = user_ids(self.vocab, self.tokenizer, UserTurn(text=user.text))
            exchanges.append((user_part + assistant_header(self.vocab, self.tokenizer),
                              self.tokenizer.encode(assistant.text)))
        if not exchanges:
            return None
        return self._fit(SYSTEM_TEXT_ONLY, exchanges, "text", dialogue.id)

    def respoken_dialogues(self, spoken: Sequence[Dialogue], text_dialogues: Sequence[Dialogue]) -> Iterator[Dialogue]:
        """`text_dialogues` with speech: every turn gets the tokens of a turn of `spoken` with the
        same (role, text, style), drawn with (seed, dialogue id). Uncovered dialogues are skipped."""
        def key(turn: DialogueTurn) -> tuple:
            return turn.role, turn.text, (turn.style or "normal") if turn.role == "assistant" else None

        bank: dict[tuple, list[list[int]]] = {}
        for d in spoken:
            for turn in d.turns:
                if turn.tokens is not None and turn.text:
                    bank.setdefault(key(turn), []).append(turn.tokens)
        for d in text_dialogues:
            choices = [bank.get(key(turn)) for turn in d.turns]
            if not all(choices):
                self.stats.respoken_uncovered += 1
                continue
            rng = random.Random(f"{self.options.seed}:{d.id}")
            turns = [DialogueTurn(t.role, t.text, None, rng.choice(c), t.style) for t, c in zip(d.turns, choices)]
            yield Dialogue(f"{d.id}:respoken", turns, d.split, d.system)

    def build(self, dialogues: Sequence[Dialogue],
              text_dialogues: Sequence[Dialogue] | None = None) -> dict[str, list[LMSample]]:
        """Samples per task; `self.stats` counts what was built, truncated and skipped. The "text"
        task reads `text_dialogues` when given, else the text of `dialogues`; so does "respoken",
        with the speech of `dialogues`."""
        out: dict[str, list[LMSample]] = {t: [] for t in self.options.tasks}
        texts = dialogues if text_dialogues is None else text_dialogues
        if "text" in out:
            for d in texts:
                sample = self.text_sample(d)
                if sample is not None:
                    out["text"].append(sample)
        if "respoken" in out:
            limit = self.options.respoken_max
            for d in self.respoken_dialogues(dialogues, texts):
                if limit is not None and len(out["respoken"]) >= limit:
                    break
                sample = self.dialogue_sample(d, task="respoken")
                if sample is not None:
                    out["respoken"].append(sample)
        for d in dialogues:
            for turn in d.turns:
                if turn.tokens is not None and any(k >= self.vocab.speech_vocab_size for k in turn.tokens):
                    raise DialogueManifestError(
                        f"dialogue {d.id}: speech token {max(turn.tokens)} >= the LM's speech vocabulary "
                        f"({self.vocab.speech_vocab_size}); the manifest was tokenized with a different codebook")
            if "dialogue" in out:
                sample = self.dialogue_sample(d)
                if sample is not None:
                    out["dialogue"].append(sample)
            if "asr" in out:
                out["asr"] += self.asr_samples(d)
            if "tts" in out:
                out["tts"] += self.tts_samples(d)
        bank = AnswerBank(dialogues) if {"voicing", "restyle"} & set(out) else None
        if "restyle" in out and not bank.styles:
            log.warning("LM data: no answer is recorded both plainly and in a style; the restyle task is empty")
        for d in dialogues:
            if "voicing" in out:
                sample = self.voicing_sample(d, bank)
                if sample is not None:
                    out["voicing"].append(sample)
            if "restyle" in out and bank.styles:
                sample = self.restyle_sample(d, bank)
                if sample is not None:
                    out["restyle"].append(sample)
        skipped = (self.stats.skipped_too_long + self.stats.skipped_speech_shorter_than_text
                   + self.stats.skipped_no_assistant_speech)
        if skipped or self.stats.truncated_dialogues:
            log.warning("LM data: %s", self.stats.report())
        return out


class AnswerBank:
    """The recorded turns of spoken dialogues, for the "voicing" and "restyle" tasks: assistant
    answers by style, and user style requests with the style of the answer that followed them."""

    def __init__(self, dialogues: Sequence[Dialogue]):
        self.answers: dict[str, list[tuple[str, list[int]]]] = {}
        self.by_first_word: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
        recordings: dict[tuple[str, str], list[list[int]]] = {}
        self.requests: dict[str, list[tuple[str, list[int]]]] = {}
        for d in dialogues:
            for i, turn in enumerate(d.turns):
                if turn.role != "assistant" or turn.tokens is None or not turn.text:
                    continue
                style = turn.style or "normal"
                self.answers.setdefault(style, []).append((turn.text, turn.tokens))
                self.by_first_word.setdefault((style, turn.text.split()[0]), []).append((turn.text, turn.tokens))
                recordings.setdefault((turn.text, style), []).append(turn.tokens)
                before = d.turns[i - 1]
                if style != "normal" and before.tokens is not None and before.text:
                    self.requests.setdefault(style, []).append((before.text, before.tokens))
        # restyle: (text, its plain recordings, its recordings in the style) for every style requested
        self.styled: dict[str, list[tuple[str, list[list[int]], list[list[int]]]]] = {
            style: [(text, recordings[(text, "normal")], recordings[(text, style)])
                    for text in sorted({t for t, s in recordings if s == style}) if (text, "normal") in recordings]
            for style in sorted(self.requests)}
        self.styles = [style for style, texts in self.styled.items() if texts]

    def other_answer(self, style: str, text: str | None, rng: random.Random) -> tuple[str, list[int]] | None:
        """A recorded answer of `style` whose text is not `text`: half the time one with the same
        first word (when there is one), else any."""
        pools = []
        if text and rng.random() < 0.5:
            pools.append(self.by_first_word.get((style, text.split()[0]), []))
        pools.append(self.answers.get(style, []))
        for pool in pools:
            for _ in range(8):
                if pool:
                    drawn = rng.choice(pool)
                    if drawn[0] != text:
                        return drawn
        return None

    def restyle(self, rng: random.Random):
        """(text, plain tokens, (request text, request tokens), styled tokens, style), or None."""
        if not self.styles:
            return None
        style = rng.choice(self.styles)
        text, plain, styled = rng.choice(self.styled[style])
        return text, rng.choice(plain), rng.choice(self.requests[style]), rng.choice(styled), style


def _styled(turn: DialogueTurn) -> bool:
    """An assistant turn spoken in a style ("slow", ...) rather than plainly."""
    return (turn.style or "normal") != "normal"


def collate(samples: Sequence[LMSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids (B, T), attention_mask (B, T), labels (B, T);
    and styled (B,), bool: the row's last answer is spoken in a style."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, :len(s)] = torch.tensor(s.input_ids)
        labels[row, :len(s)] = torch.tensor(s.labels)
        mask[row, :len(s)] = 1
    styled = torch.tensor([s.styled for s in samples], dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "styled": styled}


class MixtureBatches:
    """An endless-by-epochs stream of padded batches drawn from several tasks by weight.

    Each batch draws every sample's task with probability proportional to `weights[task]`, then a
    sample of that task uniformly. `batches_per_epoch` batches make one pass of the iterable (the
    harness iterates it again). Under DDP each rank gets its own seed (`rank`).

    `group` > 1 draws the samples of `group` batches at once, sorts them by length and cuts them
    into batches (yielded in random order): the same samples and batch size, far less padding
    when short samples (text, ASR) mix with long ones (multi-turn dialogues).

    `batch_tokens` cuts the sorted samples by size instead: each batch holds as many samples as
    fit in `batch_tokens` padded tokens (at least one), so a step costs about the same whether it
    holds 100 short text samples or 12 long dialogues. Samples are still drawn `batch_size` x
    `group` at a time by the task weights (the weights stay shares of samples, not of tokens).
    """

    def __init__(self, samples: Mapping[str, Sequence[LMSample]], weights: Mapping[str, float], batch_size: int,
                 pad_id: int, batches_per_epoch: int, seed: int = 0, rank: int = 0, group: int = 1,
                 batch_tokens: int | None = None):
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive number of tokens, got {batch_tokens}")
        self.tasks = [t for t in samples if samples[t] and float(weights.get(t, 0.0)) > 0]
        if not self.tasks:
            raise ValueError(f"no training samples for any task with a positive weight (weights {dict(weights)}, "
                             f"sample counts { {t: len(s) for t, s in samples.items()} })")
        self.samples = samples
        self.weights = [float(weights[t]) for t in self.tasks]
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.group = max(1, int(group))
        self.batch_tokens = None if batch_tokens is None else int(batch_tokens)
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by the harness before each epoch: the batches depend only on (seed, rank, epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(hash((self.seed, self.rank, self.epoch)))
        self.epoch += 1
        left = self.batches_per_epoch
        while left > 0:
            n = min(self.group, left)
            tasks = rng.choices(self.tasks, weights=self.weights, k=self.batch_size * n)
            drawn = [rng.choice(self.samples[t]) for t in tasks]
            if n > 1 or self.batch_tokens is not None:
                drawn.sort(key=len)
            if self.batch_tokens is None:
                batches = [drawn[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]
            else:
                batches = _cut_by_tokens(drawn, self.batch_tokens)
            rng.shuffle(batches)
            for batch in batches[:left]:
                yield collate(batch, self.pad_id)
            left -= min(len(batches), left)


def _cut_by_tokens(ordered: Sequence[LMSample], budget: int) -> list[list[LMSample]]:
    """Consecutive runs of length-sorted samples, each padded to at most `budget` tokens (a
    single sample longer than the budget is a batch of its own)."""
    batches: list[list[LMSample]] = []
    current: list[LMSample] = []
    for sample in ordered:
        if current and (len(current) + 1) * len(sample) > budget:
            batches.append(current)
            current = []
        current.append(sample)
    if current:
        batches.append(current)
    return batches


def fixed_batches(samples: Sequence[LMSample], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Validation batches in order (length-sorted to waste little padding)."""
    ordered = sorted(samples, key=len)
    return [collate(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
