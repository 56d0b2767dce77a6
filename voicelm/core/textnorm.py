"""Words for scoring speech and answers: one normalisation shared by the answer matcher
(`voicelm.evaluate.answer_correct`) and the Whisper judge's word error (`normalized_wer`).

`spoken_words(text)`: lower case, punctuation gone, British spellings made American, every
number (words or digits, up to 999) as digits, and the arithmetic signs Whisper writes for
spoken operators ("15-12", "13x20", "5 + 7") as the words that were said. Punctuation separates
numbers, so the count "zero, one, two" stays three numbers ("0 1 2") while "twenty one" is one.

`split_joined_numbers(heard, said)`: Whisper sometimes writes a quickly spoken count without
separators ("17181920" for "seventeen, eighteen, nineteen, twenty"); a digit run that is exactly
a run of the reference's numbers written together is split back into them before scoring. The
other way round, a number Whisper split at a pause ("130 6" for "one hundred thirty six") is
read as the one number those words make.

Whisper's own `EnglishTextNormalizer` is not used for numbers: it joins a spoken count into one
number ("seventeen, eighteen, nineteen" -> "171819") and reads "minus twelve" as "-12", while
Whisper writes "15-12" for "fifteen minus twelve"; both made correct speech score as errors.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

_ONES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_WORD_OR_MARK = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[,.;:!?]")
_MARKS = ",.;:!?"
# A sign between two numbers is the operator that was spoken ("15-12", "13 x 20", "5+7", "6÷3").
_OPERATORS = [(re.compile(r"(?<=\d)\s*[-\u2013\u2212]\s*(?=\d)"), " minus "),
              (re.compile(r"(?<=\d)\s*[x\u00d7*]\s*(?=\d)"), " times "),
              (re.compile(r"(?<=\d)\s*\+\s*(?=\d)"), " plus "),
              (re.compile(r"(?<=\d)\s*[/\u00f7]\s*(?=\d)"), " divided by "),
              (re.compile(r"\s*=\s*"), " equals ")]


def _below_hundred(words: Sequence[str], i: int) -> tuple[int, int] | None:
    """A number 0..99 spelled at words[i:] ("twenty one", "seven", "42") -> (value, next index)."""
    if i >= len(words):
        return None
    word = words[i]
    if word in _TENS:
        value = _TENS[word]
        if i + 1 < len(words) and 1 <= _ONES.get(words[i + 1], 0) <= 9:
            return value + _ONES[words[i + 1]], i + 2
        return value, i + 1
    if word in _ONES:
        return _ONES[word], i + 1
    return None


def _read_number(words: Sequence[str], i: int) -> tuple[int, int] | None:
    word = words[i]
    if 1 <= _ONES.get(word, 0) <= 9 and i + 1 < len(words) and words[i + 1] == "hundred":
        rest = _below_hundred(words, i + 2)
        if rest is None:
            return 100 * _ONES[word], i + 2
        return 100 * _ONES[word] + rest[0], rest[1]
    return _below_hundred(words, i)


def _one_number(first: str, second: str) -> str | None:
    """The number two digit runs written apart make when read aloud as words, if they make one:
    "130" "6" is "one hundred thirty six" (136) and "200" "34" is 234; "13" "6", "20" "21" and
    runs with a leading zero ("012", a count said without pauses) stay apart."""
    if first.startswith("0") or second.startswith("0"):
        return None
    a, b = int(first), int(second)
    if (a in range(100, 1000, 100) and 1 <= b <= 99) or (a < 1000 and a % 10 == 0 and a % 100 >= 20 and 1 <= b <= 9):
        return str(a + b)
    return None


@lru_cache(maxsize=1)
def _spelling():
    from whisper.normalizers.english import EnglishSpellingNormalizer

    return EnglishSpellingNormalizer()


def spoken_words(text: str) -> list[str]:
    """The words of `text` as scored (see the module docstring)."""
    text = text.lower()
    for pattern, words in _OPERATORS:
        text = pattern.sub(words, text)
    tokens = _WORD_OR_MARK.findall(text)
    words: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i].isdigit():  # as written: "012" may be a count said without pauses
            if i > 0 and tokens[i - 1].isdigit() and (joined := _one_number(words[-1], tokens[i])) is not None:
                words[-1] = joined  # "130 6": Whisper split "one hundred thirty six" at a pause
            else:
                words.append(tokens[i])
            i += 1
            continue
        number = None if tokens[i] in _MARKS else _read_number(tokens, i)
        if number is not None:
            words.append(str(number[0]))
            i = number[1]
            continue
        if tokens[i] not in _MARKS:
            words.append(tokens[i])
        i += 1
    spelling = _spelling()
    return [spelling(w) for w in words]


def split_joined_numbers(heard: Sequence[str], said: Sequence[str]) -> list[str]:
    """`heard` (spoken_words of a transcript) with every digit run that is not itself a number of
    `said` but equals two or more consecutive numbers of `said` written together replaced by
    those numbers ("17181920" -> "17 18 19 20" when "17 18 19 20" was said)."""
    said_set = set(said)
    out: list[str] = []
    for word in heard:
        if word.isdigit() and word not in said_set:
            run = _joined_run(word, said)
            if run is not None:
                out.extend(run)
                continue
        out.append(word)
    return out


def _joined_run(word: str, said: Sequence[str]) -> list[str] | None:
    for start in range(len(said)):
        joined = ""
        for end in range(start, len(said)):
            if not said[end].isdigit():
                break
            joined += said[end]
            if len(joined) >= len(word):
                if joined == word and end > start:
                    return list(said[start:end + 1])
                break
    return None
