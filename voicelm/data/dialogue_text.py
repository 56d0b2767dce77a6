"""The text of the demo recipe's dialogue domain: small, closed, and with real generalisation.

Tasks: arithmetic on numbers 0-20 (plus, minus, times), counting a short range, spelling a
short word, repeat-after-me, follow-ups that refer to the previous answer ("and plus two?") and
style requests that change how the previous answer is spoken ("say it slowly").

The held-out split holds *combinations* that never occur in training, each of which the
training data makes learnable:
- sums and products whose operands appear in training only in the other order (7+5 held out,
  5+7 trained: commutativity);
- differences, spellings, counts and follow-ups asked with a phrasing that training never pairs
  with that particular question (the question is trained with other phrasings);
- repeat-after-me phrases made of trained words in pairs that training never uses.
`repeat_drills` adds training-only repeat-after-me exchanges of random word pairs, so that a
model learns to repeat what it hears rather than the adjective-noun pairs it has heard before;
`number_drills` does the same for numbers (two or three of 0-20 in any order), so that it hears the
numbers of a question rather than the questions it was trained with;
`follow_up_drills` adds text-only chains of follow-ups, so that it sees the rare facts on
three-digit results often enough to answer them.
`answer_order="small_first"` restates a question's sum or product with the smaller operand first
("thirteen times eight?" -> "eight times thirteen is one hundred four."): a small LM learns the
product table per operand order and misses held-out orders whose twin it knows; restated, the
held-out order needs a sort of the operands and a fact it was trained on. A 700-step fine-tune
of the asked-order demo LM did not learn the sort (docs/recipe.md, session 31); untested from
scratch.
Everything is a pure function of the seed (the answer order changes answers, never which
dialogues are drawn).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Iterator

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

MAX_OPERAND = 20
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}

ARITHMETIC_PHRASINGS = [
    "what is {a} {op} {b}?",
    "how much is {a} {op} {b}?",
    "can you tell me what {a} {op} {b} is?",
    "what do you get for {a} {op} {b}?",
    "{a} {op} {b}?",
]
FOLLOW_UP_PHRASINGS = ["and {op} {c}?", "now {op} {c}?", "what about {op} {c}?"]
COUNT_PHRASINGS = ["count from {a} to {b}.", "can you count from {a} to {b}?", "please count from {a} to {b}."]
SPELL_PHRASINGS = ["how do you spell {w}?", "spell the word {w}.", "can you spell {w}?"]
REPEAT_PHRASINGS = ["repeat after me: {p}.", "say this after me: {p}.", "please repeat: {p}."]
STYLE_REQUESTS = {
    "slow": ["say it slowly.", "can you say that slowly?", "again, but slower please."],
    "fast": ["say it quickly.", "can you say that fast?", "again, but faster please."],
}
WORDS = ["cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "milk", "book", "door", "cake",
         "rain", "snow", "star", "moon", "ship", "frog", "lamp", "hat", "cup", "box", "bed", "pen",
         "egg", "bus", "map", "key", "ring", "sock", "boat", "cow", "pig", "hen", "bee", "owl"]
ADJECTIVES = ["big", "small", "red", "blue", "green", "happy", "old", "new", "warm", "cold", "tall", "soft"]
NOUNS = ["cat", "dog", "tree", "house", "car", "bird", "fish", "book", "cup", "hat", "boat", "star"]

HELD_OUT_SHARE = 0.1  # of the combinations of each kind
ANSWER_ORDERS = ("asked", "small_first")  # how an answer restates a sum or product (module docstring)


def number_words(n: int) -> str:
    """0 <= n < 1000 in words, as the assistant voice says them ("one hundred twenty one")."""
    if not 0 <= n < 1000:
        raise ValueError(f"number out of range for the dialogue domain: {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])
    hundreds, rest = divmod(n, 100)
    return ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One user turn and the assistant's answer."""

    user: str
    assistant: str
    task: str  # arithmetic | follow_up | count | spell | repeat | style
    style: str = "normal"  # how the assistant's answer is spoken: normal | slow | fast
    answer: str = ""  # the part of the answer a scorer checks (e.g. "twelve")
    split: str = "train"  # "heldout" when this exchange is a combination training never has


def _held_out(key: str, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELD_OUT_SHARE


def _arith_answer(a: int, op: str, b: int) -> tuple[str, int]:
    r = OPERATIONS[op](a, b)
    return f"{number_words(a)} {op} {number_words(b)} is {number_words(r)}.", r


def check_answer_order(answer_order: str) -> str:
    if answer_order not in ANSWER_ORDERS:
        raise ValueError(f"answer_order must be one of {', '.join(ANSWER_ORDERS)}, got {answer_order!r}")
    return answer_order


def question_answer(a: int, op: str, b: int, answer_order: str = "asked") -> tuple[str, int]:
    """The answer to the question "a op b?" and its result. With `answer_order="small_first"` a sum or
    product is restated with the smaller operand first; a difference always keeps the asked order."""
    if check_answer_order(answer_order) == "small_first" and op in ("plus", "times") and a > b:
        a, b = b, a
    return _arith_answer(a, op, b)


def arithmetic_split(a: int, op: str, b: int, phrasing: int, seed: int) -> str:
    """Which split the question (a op b, asked with phrasing number `phrasing`) belongs to."""
    if op in ("plus", "times") and a != b:
        lo, hi = min(a, b), max(a, b)
        # One order of a commutative pair may be held out; its twin always trains.
        return "heldout" if (a, b) == (hi, lo) and _held_out(f"{op}:{lo}:{hi}", seed) else "train"
    # Otherwise hold out one phrasing of some questions; the others train.
    chosen = int(hashlib.sha256(f"{seed}:{op}:{a}:{b}".encode()).digest()[4]) % len(ARITHMETIC_PHRASINGS)
    return "heldout" if phrasing == chosen and _held_out(f"{op}:{a}:{b}", seed) else "train"


def _phrasing_split(kind: str, key: str, phrasing: int, n_phrasings: int, seed: int) -> str:
    chosen = int(hashlib.sha256(f"{seed}:{kind}:{key}".encode()).digest()[4]) % n_phrasings
    return "heldout" if phrasing == chosen and _held_out(f"{kind}:{key}", seed) else "train"


def _arithmetic(rng: random.Random, op: str | None = None) -> tuple[int, str, int]:
    """Operands 0-20 of `op` (drawn when None), larger first for minus."""
    op = rng.choice(list(OPERATIONS)) if op is None else op
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if op == "minus" and a < b:
        a, b = b, a  # answers stay non-negative
    return a, op, b


def _follow_up_step(rng: random.Random, result: int) -> tuple[str, int] | None:
    """The operation and operand of a follow-up on `result` (times only on a result up to 20, no
    negative result), or None when the answer would reach 1,000, which the domain cannot say."""
    op = rng.choice(["plus", "minus"] + (["times"] if result <= 20 else []))
    c = rng.randint(1 if op != "times" else 2, 10 if op != "times" else 5)
    if op == "minus" and c > result:
        op = "plus"
    return None if OPERATIONS[op](result, c) >= 1000 else (op, c)


def sample_dialogue(rng: random.Random, seed: int, answer_order: str = "asked") -> tuple[list[Exchange], str]:
    """One dialogue of 1-3 exchanges and its split ("train" or "heldout").

    A dialogue is held out when any of its exchanges is a held-out combination. `answer_order`
    words the first answer of an arithmetic dialogue (`question_answer`); follow-ups always say the
    running result first ("and plus two?" -> "twelve plus two is fourteen.").
    """
    splits: list[str] = []
    exchanges: list[Exchange] = []
    kind = rng.choices(["arithmetic", "count", "spell", "repeat"], weights=[5, 2, 2, 2])[0]
    if kind == "arithmetic":
        a, op, b = _arithmetic(rng)
        p = rng.randrange(len(ARITHMETIC_PHRASINGS))
        answer, result = question_answer(a, op, b, answer_order)
        user = ARITHMETIC_PHRASINGS[p].format(a=number_words(a), op=op, b=number_words(b))
        exchanges.append(Exchange(user, answer, "arithmetic", answer=number_words(result)))
        splits.append(arithmetic_split(a, op, b, p, seed))
        # Follow-ups keep the running result small enough to say.
        while rng.random() < 0.35 and len(exchanges) < 3:
            step = _follow_up_step(rng, result)
            if step is None:
                break
            op2, c = step
            p2 = rng.randrange(len(FOLLOW_UP_PHRASINGS))
            answer2, result2 = _arith_answer(result, op2, c)
            user2 = FOLLOW_UP_PHRASINGS[p2].format(op=op2, c=number_words(c))
            exchanges.append(Exchange(user2, answer2, "follow_up", answer=number_words(result2)))
            splits.append(_phrasing_split("follow", f"{result}:{op2}:{c}", p2, len(FOLLOW_UP_PHRASINGS), seed))
            result = result2
    elif kind == "count":
        a = rng.randint(0, MAX_OPERAND - 2)
        b = min(MAX_OPERAND, a + rng.randint(2, 6))
        p = rng.randrange(len(COUNT_PHRASINGS))
        answer = ", ".join(number_words(n) for n in range(a, b + 1)) + "."
        user = COUNT_PHRASINGS[p].format(a=number_words(a), b=number_words(b))
        exchanges.append(Exchange(user, answer, "count", answer=answer.rstrip(".")))
        splits.append(_phrasing_split("count", f"{a}:{b}", p, len(COUNT_PHRASINGS), seed))
    elif kind == "spell":
        w = rng.choice(WORDS)
        p = rng.randrange(len(SPELL_PHRASINGS))
        letters = ", ".join(w)
        answer = f"{w} is spelled {letters}."
        exchanges.append(Exchange(SPELL_PHRASINGS[p].format(w=w), answer, "spell", answer=letters))
        splits.append(_phrasing_split("spell", w, p, len(SPELL_PHRASINGS), seed))
    else:
        adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
        phrase = f"the {adj} {noun}"
        p = rng.randrange(len(REPEAT_PHRASINGS))
        exchanges.append(Exchange(REPEAT_PHRASINGS[p].format(p=phrase), f"{phrase}.", "repeat", answer=phrase))
        splits.append("heldout" if _held_out(f"repeat:{adj}:{noun}", seed) else "train")
    exchanges = [dataclasses.replace(e, split=s) for e, s in zip(exchanges, splits)]
    if rng.random() < 0.15 and len(exchanges) < 3:
        style = rng.choice(list(STYLE_REQUESTS))
        last = exchanges[-1]
        request = rng.choice(STYLE_REQUESTS[style])
        exchanges.append(Exchange(request, last.assistant, "style", style=style, answer=last.answer, split=last.split))
    return exchanges, ("heldout" if "heldout" in splits else "train")


def heldout_repeat_pairs(seed: int) -> set[tuple[str, str]]:
    """The (adjective, noun) pairs whose repeat-after-me phrase is held out for `seed`."""
    return {(a, n) for a in ADJECTIVES for n in NOUNS if _held_out(f"repeat:{a}:{n}", seed)}


DRILL_WORDS = sorted(set(ADJECTIVES) | set(NOUNS) | set(WORDS))  # what repeat drills are made of


def repeat_drills(count: int, seed: int) -> Iterator[tuple[str, list[Exchange]]]:
    """`count` one-exchange training dialogues that ask to repeat "the W1 W2": half of them an adjective
    and any other word of `DRILL_WORDS` ("the tall cake", "the soft milk"), half any two distinct words
    in either order ("the boat green", "the lamp owl").

    In the generator's own repeat task every noun follows only the adjectives it was trained with, so a
    small LM learns those pairs as units and says "the soft bird" when it hears the held-out "the soft
    boat". Drills break that prior: after "the soft" any word may come, so only listening tells which.
    No drill holds both words of a held-out pair (in any order or phrasing): the held-out split stays
    unseen. Deterministic for `seed`; ids are "drill-{seed}-NNNNNN"."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    excluded = {frozenset(pair) for pair in heldout_repeat_pairs(seed)}
    rng = random.Random(f"drills:{seed}")
    for index in range(count):
        while True:
            if rng.random() < 0.5:
                first = rng.choice(ADJECTIVES)
                second = rng.choice([w for w in DRILL_WORDS if w != first])
            else:
                first, second = rng.sample(DRILL_WORDS, 2)
            if frozenset((first, second)) not in excluded:
                break
        phrase = f"the {first} {second}"
        user = rng.choice(REPEAT_PHRASINGS).format(p=phrase)
        yield f"drill-{seed}-{index:06d}", [Exchange(user, f"{phrase}.", "repeat", answer=phrase)]


def heldout_number_pairs(seed: int) -> set[tuple[int, int]]:
    """Ordered operand pairs (a, b) that some held-out question asks in that order: "a op b" for any
    operation and phrasing, or "count from a to b" in some phrasing (`arithmetic_split`, the count task)."""
    pairs = set()
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            asked = any(arithmetic_split(a, op, b, p, seed) == "heldout"
                        for op in OPERATIONS for p in range(len(ARITHMETIC_PHRASINGS)))
            counted = any(_phrasing_split("count", f"{a}:{b}", p, len(COUNT_PHRASINGS), seed) == "heldout"
                          for p in range(len(COUNT_PHRASINGS)))
            if asked or counted:
                pairs.add((a, b))
    return pairs


def number_drills(count: int, seed: int) -> Iterator[tuple[str, list[Exchange]]]:
    """`count` one-exchange training dialogues that ask to repeat two or three numbers of 0-20 drawn at
    random ("repeat after me: twelve, three." -> "twelve, three.", said like a count).

    An LM that learnt to hear numbers only inside the domain's questions leans on which questions it
    was trained with: it hears the held-out "how much is twelve plus three?" as "twenty plus three"
    and "thirteen plus ten" as "ten plus ten" (`docs/recipe.md`, session 32). Numbers in any order
    and any neighbour leave only listening. No two neighbouring numbers form an ordered pair some
    held-out question asks (`heldout_number_pairs`), and no drill names an operation or a count: the
    held-out split stays unseen. Deterministic for `seed`; ids are "ndrill-{seed}-NNNNNN"."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    excluded = heldout_number_pairs(seed)
    rng = random.Random(f"number-drills:{seed}")
    for index in range(count):
        numbers = [rng.randint(0, MAX_OPERAND)]
        for _ in range(rng.choice([1, 2])):
            options = [n for n in range(MAX_OPERAND + 1) if n != numbers[-1] and (numbers[-1], n) not in excluded]
            numbers.append(rng.choice(options))
        phrase = ", ".join(number_words(n) for n in numbers)
        user = rng.choice(REPEAT_PHRASINGS).format(p=phrase)
        yield f"ndrill-{seed}-{index:06d}", [Exchange(user, f"{phrase}.", "repeat", answer=phrase)]


def follow_up_drills(count: int, seed: int, max_follow_ups: int = 6,
                     answer_order: str = "asked") -> Iterator[tuple[str, list[Exchange]]]:
    """`count` text-only training dialogues that chain follow-ups: an arithmetic question, then 2 to
    `max_follow_ups` follow-ups, each applied to the last result ("and minus seven?").

    In the generator's own dialogues a follow-up comes after 35 % of the arithmetic answers and
    at most twice, so a fact on a three-digit result ("two hundred forty minus seven is two hundred
    thirty three") occurs about once in 200,000 text dialogues, and a small LM answers such
    follow-ups by guessing: it applies the operation to the previous question's first number
    instead of its result, or says a nearby number. Drills ask many of them, half of them after a
    product (the source of the three-digit results), with the operands drawn like the
    generator's. Nothing of the held-out split occurs: every exchange is asked with a phrasing
    training uses for it, and a held-out order of a pair is never asked. Deterministic for
    `seed`; ids are "fdrill-{seed}-NNNNNN". `answer_order` words the first answer as in
    `sample_dialogue`."""
    check_answer_order(answer_order)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if max_follow_ups < 2:
        raise ValueError(f"max_follow_ups must be >= 2, got {max_follow_ups}")
    rng = random.Random(f"follow-up-drills:{seed}")
    for index in range(count):
        while True:
            a, op, b = _arithmetic(rng, rng.choice(["times", "plus", "minus"]) if rng.random() < 0.5 else "times")
            phrasings = [p for p in range(len(ARITHMETIC_PHRASINGS)) if arithmetic_split(a, op, b, p, seed) == "train"]
            if phrasings:
                break
        p = rng.choice(phrasings)
        answer, result = question_answer(a, op, b, answer_order)
        user = ARITHMETIC_PHRASINGS[p].format(a=number_words(a), op=op, b=number_words(b))
        exchanges = [Exchange(user, answer, "arithmetic", answer=number_words(result))]
        for _ in range(rng.randint(2, max_follow_ups)):
            step = _follow_up_step(rng, result)
            if step is None:
                break
            op2, c = step
            phrasings = [p2 for p2 in range(len(FOLLOW_UP_PHRASINGS))
                         if _phrasing_split("follow", f"{result}:{op2}:{c}", p2, len(FOLLOW_UP_PHRASINGS), seed) == "train"]
            answer2, result2 = _arith_answer(result, op2, c)
            user2 = FOLLOW_UP_PHRASINGS[rng.choice(phrasings)].format(op=op2, c=number_words(c))
            exchanges.append(Exchange(user2, answer2, "follow_up", answer=number_words(result2)))
            result = result2
        yield f"fdrill-{seed}-{index:06d}", exchanges


def generate_dialogues(count: int, split: str, seed: int,
                       answer_order: str = "asked") -> Iterator[tuple[str, list[Exchange]]]:
    """`count` dialogues of `split` ("train" or "heldout"), deterministic for `seed`.

    Yields (dialogue_id, exchanges). Training dialogues may repeat a question (with other
    voices at render time); held-out ones are distinct questions. `answer_order` (`ANSWER_ORDERS`)
    words the answers and nothing else: the same seed draws the same questions either way.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    check_answer_order(answer_order)
    rng = random.Random(f"dialogues:{seed}:{split}")
    seen_heldout: set[tuple[str, ...]] = set()
    produced = attempts = 0
    while produced < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise RuntimeError(f"could not find {count} distinct {split} dialogues; ask for fewer")
        exchanges, which = sample_dialogue(rng, seed, answer_order)
        if which != split:
            continue
        if split == "heldout":
            key = tuple(e.user for e in exchanges)
            if key in seen_heldout:
                continue
            seen_heldout.add(key)
        yield f"{split}-{seed}-{produced:06d}", exchanges
        produced += 1
