"""`voicelm data dialogues`: the spoken dialogue corpus of the demo recipe.

Text comes from `voicelm.data.dialogue_text` (a closed domain with a held-out split of unseen
combinations); audio from `voicelm.data.synth`:
- user turns: many espeak-ng voices (accents, variants, speeds, pitches) at 16 kHz, and a share
  rendered by piper at several speaking rates;
- assistant turns: one fixed natural voice (piper joe, 22,050 Hz, the decoder's rate); a style
  request ("say it slowly") changes the speaking rate of that answer.

Output directory:
    dialogues.jsonl   one dialogue per line, the format `voicelm.lm.data` reads (turns with role,
                      text, audio; `tokens` filled in later by the tokenizer), plus per-turn
                      `task`, `style`, `answer` and `heldout` fields for scoring
    user.jsonl        manifest of every user utterance (tokenizer training, ASR samples)
    assistant.jsonl   manifest of every assistant utterance (decoder and vocoder training)
    wavs/             the audio
    text_dialogues.jsonl  (with `--text N`) N training dialogues as text only, no audio: the LM's
                      text data (`solver.text_manifest`), which costs no rendering; held-out
                      combinations never occur in it either. `--follow-up-drills M` appends M
                      chains of follow-ups (`dialogue_text.follow_up_drills`)
Deterministic for a seed: same text, same voices, same audio bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import random
import sys
import time
from pathlib import Path

from voicelm.core.checkpoint import atomic_write_file
from voicelm.core.manifest import read_manifest
from voicelm.data.dialogue_text import (ANSWER_ORDERS, check_answer_order, follow_up_drills as follow_up_drills_of,
                                        generate_dialogues, number_drills, repeat_drills)
from voicelm.data.synth import PIPER_VOICE, SynthError, SynthItem, Voice, sample_voice, synthesize_manifest

log = logging.getLogger(__name__)

ASSISTANT_LENGTH_SCALE = {"normal": 1.0, "slow": 1.5, "fast": 0.75}
PIPER_USER_SHARE = 0.2  # share of user turns spoken by piper instead of espeak
DIALOGUES_NAME = "dialogues.jsonl"
TEXT_DIALOGUES_NAME = "text_dialogues.jsonl"


def assistant_voice(style: str) -> Voice:
    return Voice("piper", PIPER_VOICE, length_scale=ASSISTANT_LENGTH_SCALE[style])


def _exchange_turns(ex, user_audio: str | None = None, assistant_audio: str | None = None) -> list[dict]:
    """The user and assistant turn rows of one exchange; audio-less (text-only) when no paths are given."""
    user = {"role": "user", "text": ex.user}
    assistant = {"role": "assistant", "text": ex.assistant}
    if user_audio is not None:
        user.update(audio=user_audio, tokens=None)
        assistant.update(audio=assistant_audio, tokens=None)
    user["task"] = ex.task
    assistant.update(task=ex.task, style=ex.style, answer=ex.answer)
    if user_audio is not None:
        assistant["heldout"] = ex.split == "heldout"
    return [user, assistant]


def plan_corpus(train: int, heldout: int, seed: int,
                answer_order: str = "asked") -> tuple[list[dict], list[SynthItem], list[SynthItem]]:
    """Dialogue rows (without audio durations) and the user / assistant utterances to render.
    `answer_order`: how answers restate sums and products (`dialogue_text.ANSWER_ORDERS`)."""
    voice_rng = random.Random(f"voices:{seed}")
    dialogues, user_items, assistant_items = [], [], []
    for split, count in (("train", train), ("heldout", heldout)):
        for dialogue_id, exchanges in generate_dialogues(count, split, seed, answer_order):
            # One speaker per dialogue, as in a real conversation.
            engine = "piper" if voice_rng.random() < PIPER_USER_SHARE else "espeak"
            user_voice = sample_voice(voice_rng, engine)
            turns = []
            for k, ex in enumerate(exchanges):
                user_name, assistant_name = f"{dialogue_id}_{k}_user", f"{dialogue_id}_{k}_assistant"
                user_items.append(SynthItem(ex.user, user_voice, {"split": split, "dialogue": dialogue_id,
                                                                  "turn": 2 * k}, name=user_name))
                assistant_items.append(SynthItem(ex.assistant, assistant_voice(ex.style),
                                                 {"split": split, "dialogue": dialogue_id, "turn": 2 * k + 1,
                                                  "style": ex.style}, name=assistant_name))
                turns += _exchange_turns(ex, f"wavs/{user_name}.wav", f"wavs/{assistant_name}.wav")
            dialogues.append({"id": dialogue_id, "split": split, "speaker": user_voice.speaker, "turns": turns})
    return dialogues, user_items, assistant_items


def assistant_audio_name(text: str, style: str) -> str:
    """One file per distinct answer and style: the voiced corpus renders each answer once."""
    return "answer-" + hashlib.sha1(f"{style}|{text}".encode()).hexdigest()[:16]


def _plan_training_dialogue(dialogue_id: str, exchanges, voice_rng: random.Random, user_items: list[SynthItem],
                            assistant_items: list[SynthItem], answers: set[str]) -> dict:
    """The row of one training dialogue with a new user voice drawn from `voice_rng`; appends its user
    turns to `user_items` and each answer not in `answers` yet to `assistant_items` (rendered once)."""
    engine = "piper" if voice_rng.random() < PIPER_USER_SHARE else "espeak"
    user_voice = sample_voice(voice_rng, engine)
    turns = []
    for k, ex in enumerate(exchanges):
        user_name, assistant_name = f"{dialogue_id}_{k}_user", assistant_audio_name(ex.assistant, ex.style)
        user_items.append(SynthItem(ex.user, user_voice, {"split": "train", "dialogue": dialogue_id,
                                                          "turn": 2 * k}, name=user_name))
        if assistant_name not in answers:
            answers.add(assistant_name)
            assistant_items.append(SynthItem(ex.assistant, assistant_voice(ex.style),
                                             {"split": "train", "style": ex.style}, name=assistant_name))
        turns += _exchange_turns(ex, f"wavs/{user_name}.wav", f"wavs/{assistant_name}.wav")
    return {"id": dialogue_id, "split": "train", "speaker": user_voice.speaker, "turns": turns}


VOICED_SCAN_FACTOR = 1000  # min_answer_words: give up after this many generated dialogues per one asked for


def plan_voiced(count: int, skip: int, seed: int, min_answer_words: int = 0,
                answer_order: str = "asked") -> tuple[list[dict], list[SynthItem], list[SynthItem]]:
    """`count` more training dialogues, the generator's dialogues after the spoken corpus's first `skip`
    (so none repeats a spoken-corpus dialogue and held-out combinations never occur), with new user
    voices drawn as in `plan_corpus`, and each distinct assistant answer (text + style) rendered once.

    `min_answer_words` > 0 keeps only the dialogues with an answer of at least that many words, in the
    generator's order: long answers (three-digit follow-ups, "two hundred forty minus seven is two
    hundred thirty three") are ~2 % of the generator's dialogues and the LM's worst spoken ones."""
    if min_answer_words < 0:
        raise SynthError(f"min_answer_words must be >= 0 (got {min_answer_words})")
    voice_rng = random.Random(f"voiced-voices:{seed}")
    dialogues, user_items, assistant_items, answers = [], [], [], set()
    scan_limit = skip + VOICED_SCAN_FACTOR * count
    for index, (dialogue_id, exchanges) in enumerate(generate_dialogues(scan_limit, "train", seed, answer_order)):
        if len(dialogues) == count:
            break
        if index < skip:
            continue
        if min_answer_words and max(len(ex.assistant.split()) for ex in exchanges) < min_answer_words:
            continue
        dialogues.append(_plan_training_dialogue(f"voiced-{dialogue_id}", exchanges, voice_rng, user_items,
                                                 assistant_items, answers))
    if len(dialogues) < count:
        raise SynthError(f"only {len(dialogues)} of the generator's first {scan_limit} training dialogues after "
                         f"{skip} have an answer of >= {min_answer_words} words, {count} asked for: lower "
                         f"voiced.min_answer_words or voiced.dialogues")
    return dialogues, user_items, assistant_items


DRILL_KINDS = {"words": repeat_drills, "numbers": number_drills}  # what a drill corpus repeats


def plan_drills(count: int, seed: int, kind: str = "words") -> tuple[list[dict], list[SynthItem], list[SynthItem]]:
    """`count` repeat-after-me drills as training dialogues, with user voices drawn as in `plan_corpus`:
    `kind="words"`: `dialogue_text.repeat_drills` (random word pairs, never both words of a held-out
    pair); `"numbers"`: `dialogue_text.number_drills` (two or three numbers 0-20, never a held-out
    ordered pair side by side)."""
    if kind not in DRILL_KINDS:
        raise SynthError(f"drill kind must be one of {', '.join(DRILL_KINDS)}, got {kind!r}")
    # word drills keep the voice stream they were first rendered with (a rendered corpus is matched by plan)
    voice_rng = random.Random(f"drill-voices:{seed}" if kind == "words" else f"{kind}-drill-voices:{seed}")
    dialogues, user_items, assistant_items, answers = [], [], [], set()
    for dialogue_id, exchanges in DRILL_KINDS[kind](count, seed):
        dialogues.append(_plan_training_dialogue(dialogue_id, exchanges, voice_rng, user_items, assistant_items,
                                                 answers))
    return dialogues, user_items, assistant_items


def _answer_order(answer_order: str) -> str:
    try:
        return check_answer_order(answer_order)
    except ValueError as exc:
        raise SynthError(str(exc)) from None


def build_corpus(out_dir: str | Path, *, train: int, heldout: int, seed: int = 0, jobs: int = 1,
                 progress: bool = False, answer_order: str = "asked") -> Path:
    """Render the corpus into `out_dir`; returns the path of dialogues.jsonl (written last)."""
    if train < 0 or heldout < 0 or train + heldout == 0:
        raise SynthError(f"ask for at least one dialogue (train={train}, heldout={heldout})")
    plan = plan_corpus(train, heldout, seed, _answer_order(answer_order))
    return _render_corpus(Path(out_dir), *plan, seed=seed, jobs=jobs, progress=progress)


def build_voiced_corpus(out_dir: str | Path, *, count: int, skip: int, seed: int = 0, jobs: int = 1,
                        min_answer_words: int = 0, progress: bool = False, answer_order: str = "asked") -> Path:
    """Render `plan_voiced(count, skip, seed, min_answer_words)` into `out_dir` (the spoken corpus's
    layout: dialogues.jsonl, user.jsonl, assistant.jsonl, wavs/); returns the path of dialogues.jsonl
    (written last).

    The LM needs far more dialogues than the tokenizer and decoder: the recipe's `voiced` stage uses this
    to give it `count` more spoken dialogues at the cost of rendering the new user turns (espeak-ng, fast)
    and each distinct answer once (piper)."""
    if count < 1 or skip < 0:
        raise SynthError(f"ask for at least one voiced dialogue after skip >= 0 (count={count}, skip={skip})")
    plan = plan_voiced(count, skip, seed, min_answer_words, _answer_order(answer_order))
    return _render_corpus(Path(out_dir), *plan, seed=seed, jobs=jobs, progress=progress)


def build_drill_corpus(out_dir: str | Path, *, count: int, seed: int = 0, jobs: int = 1,
                       progress: bool = False, kind: str = "words") -> Path:
    """Render `plan_drills(count, seed, kind)` into `out_dir` (the spoken corpus's layout); returns the
    path of dialogues.jsonl (written last). The recipe's `voiced` stage adds these to the LM's dialogues."""
    if count < 1:
        raise SynthError(f"ask for at least one repeat drill (count={count})")
    return _render_corpus(Path(out_dir), *plan_drills(count, seed, kind), seed=seed, jobs=jobs, progress=progress)


def _already_rendered(out_dir: Path, dialogues: list[dict]) -> bool:
    """Whether `out_dir` holds a finished render of exactly these dialogues (same ids, speakers, turn
    texts and audio files, every file present): then a rerun (a resumed or re-chosen recipe stage)
    reuses it instead of rendering it again."""
    path = out_dir / DIALOGUES_NAME
    if not all((out_dir / name).is_file() for name in (DIALOGUES_NAME, "user.jsonl", "assistant.jsonl")):
        return False
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, ValueError):
        return False
    shape = lambda ds: [(d["id"], d.get("speaker"), [(t["role"], t["text"], t.get("audio")) for t in d["turns"]])
                        for d in ds]
    if shape(rows) != shape(dialogues):
        return False
    return all((out_dir / t["audio"]).is_file() for d in rows for t in d["turns"])


def _render_corpus(out_dir: Path, dialogues: list[dict], user_items: list[SynthItem],
                   assistant_items: list[SynthItem], *, seed: int, jobs: int, progress: bool) -> Path:
    if _already_rendered(out_dir, dialogues):
        log.info("%s already holds these %d dialogues, rendered: kept", out_dir, len(dialogues))
        return out_dir / DIALOGUES_NAME
    user_manifest = synthesize_manifest(user_items, out_dir, jobs=jobs, seed=seed, manifest_name="user.jsonl",
                                        progress=progress)
    assistant_manifest = synthesize_manifest(assistant_items, out_dir, jobs=jobs, seed=seed,
                                             manifest_name="assistant.jsonl", progress=progress)
    durations = {u.audio: u.duration for m in (user_manifest, assistant_manifest) for u in read_manifest(m)}
    for dialogue in dialogues:
        for turn in dialogue["turns"]:
            turn["duration"] = durations[turn["audio"]]
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogues)
    return atomic_write_file(out_dir / DIALOGUES_NAME, lambda tmp: Path(tmp).write_text(lines))


def write_text_dialogues(path: str | Path, count: int, seed: int = 0, follow_up_drills: int = 0,
                         answer_order: str = "asked") -> Path:
    """`count` training-split dialogues as text only (the dialogue-manifest format, no audio or
    tokens), drawn from the same generator as the spoken corpus: the first ones are the spoken
    corpus's own dialogues, the rest more of the same distribution. Then `follow_up_drills` chains
    of follow-ups (`dialogue_text.follow_up_drills`). `answer_order` as in `plan_corpus`. Written
    atomically."""
    _answer_order(answer_order)
    if count < 1:
        raise SynthError(f"ask for at least one text dialogue (text={count})")
    if follow_up_drills < 0:
        raise SynthError(f"follow_up_drills must be >= 0, got {follow_up_drills}")
    rows = []
    dialogues = itertools.chain(generate_dialogues(count, "train", seed, answer_order),
                                follow_up_drills_of(follow_up_drills, seed, answer_order=answer_order))
    for dialogue_id, exchanges in dialogues:
        turns = [turn for ex in exchanges for turn in _exchange_turns(ex)]
        rows.append({"id": f"text-{dialogue_id}", "split": "train", "turns": turns})
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_file(Path(path), lambda tmp: Path(tmp).write_text(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2000, help="training dialogues (default 2000)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out dialogues (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--text", type=int, default=0, metavar="N",
                        help=f"also write {TEXT_DIALOGUES_NAME}: N text-only training dialogues (no audio)")
    parser.add_argument("--follow-up-drills", type=int, default=0, metavar="N",
                        help=f"with --text: N more text dialogues in {TEXT_DIALOGUES_NAME} that chain 2-6 follow-ups")
    parser.add_argument("--answer-order", choices=ANSWER_ORDERS, default="asked",
                        help="how answers restate a sum or product: as asked, or with the smaller operand first "
                             "(\"thirteen times eight?\" -> \"eight times thirteen is ...\")")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.follow_up_drills < 0 or (args.follow_up_drills and not args.text):
        print(f"voicelm data dialogues: --follow-up-drills {args.follow_up_drills}: give a count >= 0, and --text N "
              "too (the drills are added to the text dialogues)", file=sys.stderr)
        return 2
    try:
        path = build_corpus(args.out, train=args.train, heldout=args.heldout, seed=args.seed, jobs=args.jobs,
                            progress=sys.stderr.isatty(), answer_order=args.answer_order)
        if args.text:
            text_path = write_text_dialogues(Path(args.out) / TEXT_DIALOGUES_NAME, args.text, args.seed,
                                             follow_up_drills=args.follow_up_drills, answer_order=args.answer_order)
            print(f"wrote {text_path}: {args.text + args.follow_up_drills} text-only dialogues")
    except (SynthError, ValueError) as exc:
        print(f"voicelm data dialogues: {exc}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    turns = sum(len(r["turns"]) for r in rows)
    audio = sum(t["duration"] for r in rows for t in r["turns"])
    print(f"wrote {path}: {len(rows)} dialogues, {turns} turns, {audio / 60:.1f} min of audio "
          f"in {time.perf_counter() - start:.0f} s")
    return 0
