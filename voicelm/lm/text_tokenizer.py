"""Text tokenizer: a byte-level BPE (`tokenizers` library) that produces only text ids.

Special tokens and speech tokens are not part of it: they live in `Vocabulary` above the text
range, and the prompt builder inserts their ids directly, so no user text can ever produce a
control token (typing "<|user|>" gives ordinary text ids).

Two sources:
- `train_text_tokenizer(texts, vocab_size)`: our models, trained on the training transcripts.
- `load_tiktoken_file(path)`: the official GLM-4 `tokenizer.model` (one "base64(token) rank" per
  line). Merges are recovered from the ranks: a token of rank r is the merge of the two pieces that
  byte-pair encoding restricted to ranks < r leaves, which reproduces tiktoken's encoding exactly.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "text_tokenizer.json"

# GLM-4's pre-tokenizer split (cl100k style): contractions, words, 1-3 digit numbers, punctuation
# runs, newlines, spaces.
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TextTokenizerError(ValueError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2), so merges are strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TextTokenizer:
    """`encode(str) -> list[int]`, `decode(ids) -> str` over text ids only."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TextTokenizerError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode text ids; ids outside the text range are an error (split the stream first)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TextTokenizerError(
                f"ids {bad[:5]} are not text ids (text ids are [0, {self.vocab_size})); route speech and "
                f"special tokens away before decoding text")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, json_text: str) -> "TextTokenizer":
        try:
            return cls(Tokenizer.from_str(json_text))
        except Exception as exc:
            raise TextTokenizerError(f"not a `tokenizers` JSON file ({exc})") from None

    def save(self, path: str | os.PathLike) -> None:
        from voicelm.core.checkpoint import atomic_write_file

        atomic_write_file(path, lambda tmp: Path(tmp).write_text(self.to_str()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        """A `tokenizers` JSON file, or a tiktoken-format `tokenizer.model` (GLM-4)."""
        path = Path(path)
        if not path.exists():
            raise TextTokenizerError(f"text tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls.from_str(path.read_text())
        return load_tiktoken_file(path)


def _byte_level_tokenizer(model: models.BPE, split_pattern: str | None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_pattern is None)
    if split_pattern is None:
        tokenizer.pre_tokenizer = byte_level
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_text_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE on `texts`. The result may have fewer than `vocab_size` tokens when
    the corpus has fewer distinct merges; it never has fewer than the 256 byte tokens, so any
    string can be encoded."""
    if vocab_size < 256:
        raise TextTokenizerError(f"vocab_size {vocab_size} < 256: a byte-level BPE needs all 256 bytes")
    tokenizer = _byte_level_tokenizer(models.BPE(), GLM4_SPLIT_PATTERN)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(list(texts), trainer)
    return TextTokenizer(tokenizer)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError:
            raise TextTokenizerError(
                f"{path}:{lineno}: expected 'base64-token rank' (tiktoken format), got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TextTokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair encode `token` using only merges of rank < max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def load_tiktoken_file(path: str | os.PathLike, split_pattern: str = GLM4_SPLIT_PATTERN) -> TextTokenizer:
    """Read a tiktoken BPE file (GLM-4 `tokenizer.model`) into a `tokenizers` byte-level BPE."""
    ranks = read_tiktoken_ranks(path)
    to_unicode = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _split_by_lower_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise TextTokenizerError(
                f"{path}: token of rank {rank} cannot be built from two lower-ranked tokens; not a BPE rank file")
        merges.append((as_str(parts[0]), as_str(parts[1])))
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    return TextTokenizer(_byte_level_tokenizer(model, split_pattern))
