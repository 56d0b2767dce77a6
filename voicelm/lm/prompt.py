"""The GLM-4-Voice prompt layout, conversation history, and the 13:26 interleaving of answers.

One conversation as LM ids (special tokens in <|...|>, `[...]` = text ids of that string):

    <|system|> ["\\n" + system]
    <|user|> ["\\n"] <|begin_of_audio|> <|audio_k|>... <|end_of_audio|>      (user speech)
    <|user|> ["\\n" + text]                                                  (or user text)
    <|assistant|> ["streaming_transcription\\n"] answer...                   (13 text, 26 speech, ...)
    <|user|> ...                                                            (next turn; its <|user|>
                                                                             also ends the answer)

The official model puts `[gMASK]<sop>` before everything (`Vocabulary.prompt_prefix`); ours does
not. Special tokens are inserted as ids, never parsed out of text, so typed text cannot inject them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

from voicelm.lm.text_tokenizer import TextTokenizer
from voicelm.lm.vocab import Vocabulary, VocabularyError

TEXT_TOKENS_PER_CYCLE = 13
SPEECH_TOKENS_PER_CYCLE = 26
ASSISTANT_TAG = "streaming_transcription\n"

# GLM-4-Voice's own system prompts (speech input and text input), plus the two single-task ones.
SYSTEM_SPEECH_INPUT = ("User will provide you with a speech instruction. Do it step by step. First, think about "
                       "the instruction and respond in a interleaved manner, with 13 text token followed by 26 "
                       "audio tokens.")
SYSTEM_TEXT_INPUT = ("User will provide you with a text instruction. Do it step by step. First, think about the "
                     "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio "
                     "tokens.")
SYSTEM_ASR = "Transcribe the user's speech into text."
SYSTEM_TTS = "Read the user's text aloud: answer with speech tokens only."
# Our own (not GLM-4-Voice's): text-only training dialogues, answered with text only.
SYSTEM_TEXT_ONLY = "User will provide you with a text instruction. Answer in text only."

AUTO = "auto"


class PromptError(ValueError):
    pass


@dataclasses.dataclass
class UserTurn:
    """What the user said: `speech` (speech codes 0..K-1, not LM ids) or `text`."""
    text: str | None = None
    speech: list[int] | None = None

    def __post_init__(self):
        if (self.text is None) == (self.speech is None):
            raise PromptError("a user turn has exactly one of text or speech")
        if self.speech is not None:
            self.speech = [int(k) for k in self.speech]
            if not self.speech:
                raise PromptError("user speech has no tokens; was the audio empty?")


@dataclasses.dataclass
class AssistantTurn:
    """What the assistant answered: its LM ids in the order generated (text and speech
    interleaved), without the stop token. Its text and speech are views of `ids`."""
    ids: list[int]

    @classmethod
    def from_parts(cls, vocab: Vocabulary, text_ids: Sequence[int], speech: Sequence[int],
                   text_tokens: int = TEXT_TOKENS_PER_CYCLE, speech_tokens: int = SPEECH_TOKENS_PER_CYCLE) -> "AssistantTurn":
        return cls(interleave(vocab, text_ids, speech, text_tokens, speech_tokens))

    def text_ids(self, vocab: Vocabulary) -> list[int]:
        return split_ids(vocab, self.ids)[0]

    def speech(self, vocab: Vocabulary) -> list[int]:
        return split_ids(vocab, self.ids)[1]


Turn = Union[UserTurn, AssistantTurn]


def interleave(vocab: Vocabulary, text_ids: Sequence[int], speech: Sequence[int],
               text_tokens: int = TEXT_TOKENS_PER_CYCLE, speech_tokens: int = SPEECH_TOKENS_PER_CYCLE) -> list[int]:
    """The answer layout: `text_tokens` text ids, `speech_tokens` speech ids, repeated while text
    remains; after the last (possibly short) text chunk, all remaining speech.

    The text must lead the speech: every text chunk but the last is followed by a full speech
    chunk, and at least one speech token follows the last. Speech too short for its text (it
    would run out before the text ends) raises `PromptError`; the dataset builder counts and skips
    such answers.
    """
    text_ids = [int(i) for i in text_ids]
    for i in text_ids:
        if not vocab.is_text(i):
            raise PromptError(f"answer text id {i} is not a text id (text ids are [0, {vocab.text_vocab_size}))")
    speech_ids = vocab.speech_ids(speech)
    n_chunks = -(-len(text_ids) // text_tokens)
    needed = speech_tokens * max(n_chunks - 1, 0) + 1
    if len(speech_ids) < needed:
        raise PromptError(
            f"{len(text_ids)} text tokens need at least {needed} speech tokens to stay ahead of the speech "
            f"({text_tokens}:{speech_tokens} layout), got {len(speech_ids)}")
    out: list[int] = []
    for c in range(n_chunks):
        out += text_ids[c * text_tokens:(c + 1) * text_tokens]
        if c < n_chunks - 1:
            out += speech_ids[c * speech_tokens:(c + 1) * speech_tokens]
    out += speech_ids[max(n_chunks - 1, 0) * speech_tokens:]
    return out


def split_ids(vocab: Vocabulary, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(text ids, speech codes) of a stream; the speech offset decides. Specials are dropped."""
    text, speech = [], []
    for i in ids:
        i = int(i)
        if vocab.is_speech(i):
            speech.append(i - vocab.speech_offset)
        elif vocab.is_text(i):
            text.append(i)
    return text, speech


def user_ids(vocab: Vocabulary, tokenizer: TextTokenizer, turn: UserTurn) -> list[int]:
    if turn.speech is not None:
        return ([vocab.user_id] + tokenizer.encode("\n") + [vocab.begin_of_audio_id]
                + vocab.speech_ids(turn.speech) + [vocab.end_of_audio_id])
    return [vocab.user_id] + tokenizer.encode("\n" + turn.text)


def assistant_header(vocab: Vocabulary, tokenizer: TextTokenizer) -> list[int]:
    return [vocab.assistant_id] + tokenizer.encode(ASSISTANT_TAG)


def system_ids(vocab: Vocabulary, tokenizer: TextTokenizer, system: str | None) -> list[int]:
    ids = [vocab.special(name) for name in vocab.prompt_prefix]
    if system is not None:
        ids += [vocab.system_id] + tokenizer.encode("\n" + system)
    return ids


def default_system(user_is_speech: bool) -> str:
    return SYSTEM_SPEECH_INPUT if user_is_speech else SYSTEM_TEXT_INPUT


def build_prompt(vocab: Vocabulary, tokenizer: TextTokenizer, history: Sequence[Turn] = (),
                 user_text: str | None = None, user_speech: Sequence[int] | None = None,
                 system: str | None = AUTO) -> list[int]:
    """LM ids for the next answer: system, the earlier turns, the new user turn, the assistant header.

    `history` alternates UserTurn, AssistantTurn (oldest first). Give exactly one of `user_text`
    and `user_speech` (speech codes 0..K-1). `system="auto"` picks GLM-4-Voice's system prompt for
    the first user turn's modality; `None` leaves the system segment out.
    """
    new_turn = UserTurn(text=user_text, speech=None if user_speech is None else list(user_speech))
    turns = list(history) + [new_turn]
    for i, turn in enumerate(turns):
        expected = UserTurn if i % 2 == 0 else AssistantTurn
        if not isinstance(turn, expected):
            raise PromptError(f"history[{i}] is a {type(turn).__name__}; turns must alternate UserTurn, "
                              f"AssistantTurn starting with a UserTurn")
    if system == AUTO:
        system = default_system(turns[0].speech is not None)
    ids = system_ids(vocab, tokenizer, system)
    for turn in turns:
        if isinstance(turn, UserTurn):
            try:
                ids += user_ids(vocab, tokenizer, turn)
            except VocabularyError as exc:
                raise PromptError(f"user speech: {exc}") from None
            ids += assistant_header(vocab, tokenizer)
        else:
            vocab.check_ids(turn.ids, where="assistant turn")
            ids += turn.ids
    return ids


def render_ids(vocab: Vocabulary, tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
    """A readable string of a stream: text decoded, specials and speech as their <|names|>.

    For a prompt this gives back the GLM-4-Voice layout string (`<|system|>\\n...<|user|>\\n
    <|begin_of_audio|><|audio_3|>...<|end_of_audio|><|assistant|>streaming_transcription\\n`).
    """
    vocab.check_ids(ids)
    pieces: list[str] = []
    text_run: list[int] = []
    for i in list(ids) + [None]:
        if i is not None and vocab.is_text(int(i)):
            text_run.append(int(i))
            continue
        if text_run:
            pieces.append(tokenizer.decode(text_run))
            text_run = []
        if i is not None:
            name = vocab.token_name(int(i))
            pieces.append(name if name is not None else f"<|unused_{int(i)}|>")
    return "".join(pieces)
