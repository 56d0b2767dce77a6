"""The LM vocabulary: text tokens, then special tokens, then one contiguous range of speech tokens.

    [0, text_vocab_size)                       text (the BPE of the text tokenizer)
    [special ids ...]                          <|endoftext|>, <|system|>, <|user|>, ...
    [speech_offset, speech_offset + K)         <|audio_0|> .. <|audio_{K-1}|>
    [speech_offset + K, total_size)            padding rows of the embedding (never produced)

A token is speech iff `speech_offset <= id < speech_offset + K`; speech index k (the tokenizer's
code) is `id - speech_offset`. Two layouts exist:
- `Vocabulary.voicelm(text_vocab_size, speech_vocab_size)`: our own models. Specials follow the
  text directly, speech follows the specials, the total is padded to a multiple of 64 (matmul
  friendly rows, as GLM pads 168,938 -> 168,960).
- `Vocabulary.glm4voice()`: the released glm-4-voice-9b ids (<|endoftext|> 151329, <|system|>
  151335, <|user|> 151336, <|assistant|> 151337, <|begin_of_audio|> 151343, <|end_of_audio|>
  151344, <|audio_0|> 152353, 16,384 speech tokens, 168,960 rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# The GLM-4 special tokens in their official order; <|endoftext|> is the first id after the text.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>",
)

LAYOUTS = ("voicelm", "glm4voice")

# The official layout (GLM4VOICE.md).
GLM4VOICE_TEXT_VOCAB_SIZE = 151_329
GLM4VOICE_SPEECH_OFFSET = 152_353
GLM4VOICE_SPEECH_VOCAB_SIZE = 16_384
GLM4VOICE_TOTAL_SIZE = 168_960

PAD_MULTIPLE = 64


class VocabularyError(ValueError):
    """A token id or vocabulary layout that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    layout: str
    text_vocab_size: int
    special_ids: Mapping[str, int]
    speech_offset: int
    speech_vocab_size: int
    total_size: int
    # Tokens the official tokenizer puts before every input ("[gMASK]<sop>"); ours uses none.
    prompt_prefix: tuple[str, ...] = ()

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise VocabularyError(f"unknown vocabulary layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.text_vocab_size < 1 or self.speech_vocab_size < 1:
            raise VocabularyError(
                f"text_vocab_size ({self.text_vocab_size}) and speech_vocab_size ({self.speech_vocab_size}) must be >= 1")
        for name in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>"):
            if name not in self.special_ids:
                raise VocabularyError(f"vocabulary lacks the special token {name}")
        for name, token_id in self.special_ids.items():
            if not self.text_vocab_size <= token_id < self.speech_offset:
                raise VocabularyError(
                    f"special token {name} has id {token_id}, outside [{self.text_vocab_size}, {self.speech_offset}): "
                    f"specials sit between the text and the speech ranges")
        if self.speech_offset + self.speech_vocab_size > self.total_size:
            raise VocabularyError(
                f"speech range [{self.speech_offset}, {self.speech_offset + self.speech_vocab_size}) exceeds "
                f"the vocabulary size {self.total_size}")
        for name in self.prompt_prefix:
            if name not in self.special_ids:
                raise VocabularyError(f"prompt prefix token {name} is not a special token")

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def voicelm(cls, text_vocab_size: int, speech_vocab_size: int) -> "Vocabulary":
        specials = {name: text_vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        speech_offset = text_vocab_size + len(SPECIAL_TOKENS)
        used = speech_offset + speech_vocab_size
        total = -(-used // PAD_MULTIPLE) * PAD_MULTIPLE
        return cls("voicelm", text_vocab_size, specials, speech_offset, speech_vocab_size, total)

    @classmethod
    def glm4voice(cls) -> "Vocabulary":
        specials = {name: GLM4VOICE_TEXT_VOCAB_SIZE + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls("glm4voice", GLM4VOICE_TEXT_VOCAB_SIZE, specials, GLM4VOICE_SPEECH_OFFSET,
                   GLM4VOICE_SPEECH_VOCAB_SIZE, GLM4VOICE_TOTAL_SIZE, prompt_prefix=("[gMASK]", "<sop>"))

    @classmethod
    def from_layout(cls, layout: str, text_vocab_size: int, speech_vocab_size: int) -> "Vocabulary":
        if layout == "voicelm":
            return cls.voicelm(text_vocab_size, speech_vocab_size)
        if layout == "glm4voice":
            vocab = cls.glm4voice()
            if (text_vocab_size, speech_vocab_size) != (vocab.text_vocab_size, vocab.speech_vocab_size):
                raise VocabularyError(
                    f"the glm4voice layout has {vocab.text_vocab_size} text and {vocab.speech_vocab_size} speech "
                    f"tokens, not {text_vocab_size} and {speech_vocab_size}")
            return vocab
        raise VocabularyError(f"unknown vocabulary layout {layout!r}; choose one of {LAYOUTS}")

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "text_vocab_size": self.text_vocab_size,
                "special_ids": dict(self.special_ids), "speech_offset": self.speech_offset,
                "speech_vocab_size": self.speech_vocab_size, "total_size": self.total_size,
                "prompt_prefix": list(self.prompt_prefix)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Vocabulary":
        values = dict(values)
        values["prompt_prefix"] = tuple(values.get("prompt_prefix", ()))
        return cls(**values)

    # --- ids ------------------------------------------------------------------------------------
    def special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise VocabularyError(f"no special token {name!r}; known: {sorted(self.special_ids)}") from None

    @property
    def eot_id(self) -> int:
        return self.special_ids["<|endoftext|>"]

    @property
    def user_id(self) -> int:
        return self.special_ids["<|user|>"]

    @property
    def system_id(self) -> int:
        return self.special_ids["<|system|>"]

    @property
    def assistant_id(self) -> int:
        return self.special_ids["<|assistant|>"]

    @property
    def begin_of_audio_id(self) -> int:
        return self.special_ids["<|begin_of_audio|>"]

    @property
    def end_of_audio_id(self) -> int:
        return self.special_ids["<|end_of_audio|>"]

    @property
    def pad_id(self) -> int:
        # Padding positions never get a loss; any real id is fine, GLM uses <|endoftext|>.
        return self.eot_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn (GLM-4-Voice's eos list)."""
        ids = [self.eot_id, self.user_id]
        if "<|observation|>" in self.special_ids:
            ids.append(self.special_ids["<|observation|>"])
        return tuple(ids)

    def is_speech(self, token_id: int) -> bool:
        return self.speech_offset <= token_id < self.speech_offset + self.speech_vocab_size

    def is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.text_vocab_size

    def is_special(self, token_id: int) -> bool:
        return self.text_vocab_size <= token_id < self.speech_offset and token_id in self._special_id_set

    @property
    def _special_id_set(self) -> frozenset[int]:
        return frozenset(self.special_ids.values())

    def speech_id(self, index: int) -> int:
        """LM id of speech code `index` (0 <= index < speech_vocab_size)."""
        if not 0 <= int(index) < self.speech_vocab_size:
            raise VocabularyError(
                f"speech token {index} is outside [0, {self.speech_vocab_size}): the speech tokenizer's codebook "
                f"does not match this LM's speech vocabulary")
        return self.speech_offset + int(index)

    def speech_ids(self, indices) -> list[int]:
        return [self.speech_id(k) for k in indices]

    def speech_index(self, token_id: int) -> int:
        """Speech code of LM id `token_id`; errors on text and special ids."""
        if not self.is_speech(token_id):
            raise VocabularyError(f"token id {token_id} is not a speech token (speech ids are "
                                  f"[{self.speech_offset}, {self.speech_offset + self.speech_vocab_size}))")
        return int(token_id) - self.speech_offset

    def check_ids(self, ids, where: str = "token ids") -> None:
        """Raise if any id is negative or beyond the vocabulary."""
        for i in ids:
            if not 0 <= int(i) < self.total_size:
                raise VocabularyError(f"{where}: id {int(i)} is outside the vocabulary [0, {self.total_size})")

    def token_name(self, token_id: int) -> str | None:
        """`<|audio_k|>` or a special token's name; None for text ids."""
        if self.is_speech(token_id):
            return f"<|audio_{token_id - self.speech_offset}|>"
        for name, i in self.special_ids.items():
            if i == token_id:
                return name
        return None
