"""Does the LM alone know the answers? Held-out answer accuracy of a voice LM with the gold history.

    .venv/bin/python bench/lm_accuracy.py --lm runs/recipe-demo/runs/lm/export \
        [--recipe-dir runs/recipe-demo] [--count 100] [--asked speech|text|both] [--checkpoint CKPT]
    .venv/bin/python bench/lm_accuracy.py --lm models/demo/voicelm --table times

Unlike `voicelm eval` (the whole pipeline, the model's own earlier answers as history), every
exchange here is asked on its own with the *reference* earlier turns as history, and no audio is
decoded, so one wrong answer does not drag its follow-ups down and a run of 100 dialogues takes
a few minutes. `--asked speech` asks with the stored speech tokens of the user's recording (what
the pipeline does), `--asked text` with the user's words as text: the gap between the two is
what the LM loses in reading speech. `--lm` is an LM part directory (an export, or the `voicelm`
folder of a pipeline); `--checkpoint` loads a training checkpoint's weights into it
(`runs/lm/checkpoints/last/model.safetensors`), to follow a run while it trains.

Scored with `voicelm.evaluate.answer_correct`, the eval's own rule. Greedy, 13:26 layout.

`--table OP` (plus, minus or times) asks every operand pair 0-20 of that operation in text, with
no history, in the first phrasing, and counts the right answers by split and operand order:
the pairs training has in both orders, the trained twin (small operand first) and the held-out
order (large first) of the held-out pairs. It tells memorising from generalising: the session-10
LM had every trained product right and 16 of the 22 held-out orders.

`--asr` also scores the LM's own transcription task (the ASR system prompt it is trained with)
on every held-out user utterance: word error of its text against what was said
(`normalized_wer`), per task: how well it reads the question, apart from answering it.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import torch


def held_out_dialogues(recipe_dir: Path, count: int) -> list[dict]:
    """The first `count` held-out dialogues of a recipe run's tokenized corpus."""
    manifest = recipe_dir / "tokens" / "dialogues.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: run the recipe's tokenize stage first")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("split") == "heldout"][:count]
    if not rows:
        raise SystemExit(f"{manifest} has no held-out dialogues")
    return rows


def _task_row(answer: dict) -> str:
    """The table row of an exchange: its task, and for sums the operation ("arithmetic (times)"),
    since held-out products and sums fail differently."""
    from voicelm.data.dialogue_text import OPERATIONS

    task = answer["task"]
    if task in ("arithmetic", "follow_up"):
        words = answer["text"].split()
        ops = [op for op in OPERATIONS if op in words]
        if ops:
            return f"{task} ({ops[0]})"
    return task


def score(lm, dialogues: list[dict], asked: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """-> ({(task row, held-out?): [right, asked]}, [(question, reference, answer) of held-out misses])."""
    from voicelm.evaluate import answer_correct
    from voicelm.lm.generate import SamplingOptions, VoiceLMGen
    from voicelm.lm.prompt import AssistantTurn, UserTurn, build_prompt

    vocab, text_tok = lm.config.vocab, lm.text_tokenizer
    options = SamplingOptions(temperature=0.0, max_new_tokens=80, text_tokens=13, speech_tokens=26)
    tally: dict = collections.defaultdict(lambda: [0, 0])
    misses = []
    for dialogue in dialogues:
        turns, history = dialogue["turns"], []
        for user, answer in zip(turns[0::2], turns[1::2]):
            by_text = asked == "text"
            prompt = build_prompt(vocab, text_tok, history, user_text=user["text"] if by_text else None,
                                  user_speech=None if by_text else user["tokens"], system="auto")
            generation = VoiceLMGen(lm, prompt, options)
            generation.run()
            said = generation.text()
            right = answer_correct(answer["answer"], said, reference=answer["text"])
            key = (_task_row(answer), bool(answer.get("heldout")))
            tally[key][0] += right
            tally[key][1] += 1
            if not right and answer.get("heldout"):
                misses.append((user["text"], answer["text"], said))
            history.append(UserTurn(text=user["text"]) if by_text else UserTurn(speech=user["tokens"]))
            history.append(AssistantTurn.from_parts(vocab, text_tok.encode(answer["text"]), answer["tokens"], 13, 26))
    return tally, misses


def asr_wer(lm, dialogues: list[dict]) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """-> ({task: WER of the LM's transcripts of the user turns asking it, "all": ...}, misheard)."""
    from voicelm.core.whisper_weights import normalized_wer
    from voicelm.lm.generate import SamplingOptions, VoiceLMGen
    from voicelm.lm.prompt import SYSTEM_ASR, build_prompt

    options = SamplingOptions(temperature=0.0, max_new_tokens=60, enforce_interleave=False)
    by_task: dict[str, tuple[list[str], list[str]]] = collections.defaultdict(lambda: ([], []))
    misheard = []
    for dialogue in dialogues:
        turns = dialogue["turns"]
        for user, answer in zip(turns[0::2], turns[1::2]):
            prompt = build_prompt(lm.config.vocab, lm.text_tokenizer, (), user_speech=user["tokens"], system=SYSTEM_ASR)
            generation = VoiceLMGen(lm, prompt, options)
            generation.run()
            heard = generation.text()
            for key in (answer["task"], "all"):
                by_task[key][0].append(user["text"])
                by_task[key][1].append(heard)
            if normalized_wer([user["text"]], [heard]) > 0:
                misheard.append((user["text"], heard))
    return {task: normalized_wer(refs, hyps) for task, (refs, hyps) in by_task.items()}, misheard


def operand_table(lm, op: str, seed: int = 0) -> tuple[dict[str, list[int]], list[tuple[str, str]]]:
    """-> ({row: [right, asked]}, [(question, answer) of the misses]) for every pair of `op`."""
    from voicelm.data.dialogue_text import (ARITHMETIC_PHRASINGS, MAX_OPERAND, _arith_answer, arithmetic_split,
                                             number_words)
    from voicelm.evaluate import answer_correct
    from voicelm.lm.generate import SamplingOptions, VoiceLMGen
    from voicelm.lm.prompt import build_prompt

    options = SamplingOptions(temperature=0.0, max_new_tokens=40, text_tokens=13, speech_tokens=26)
    tally: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    misses = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            if op == "minus" and a < b:
                continue  # the domain's differences are never negative
            split = arithmetic_split(a, op, b, 0, seed=seed)
            if split == "heldout":
                row = "held out (large operand first)" if a > b else "held out"
            elif op != "minus" and a != b and arithmetic_split(max(a, b), op, min(a, b), 0, seed=seed) == "heldout":
                row = "trained twin of a held-out pair"
            else:
                row = "trained"
            question = ARITHMETIC_PHRASINGS[0].format(a=number_words(a), op=op, b=number_words(b))
            prompt = build_prompt(lm.config.vocab, lm.text_tokenizer, (), user_text=question, system="auto")
            generation = VoiceLMGen(lm, prompt, options)
            generation.run()
            said = generation.text()
            reference, result = _arith_answer(a, op, b)  # the corpus's own answer template
            right = answer_correct(number_words(result), said, reference=reference)
            tally[row][0] += right
            tally[row][1] += 1
            if not right:
                misses.append((question, said))
    return tally, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, required=True, help="LM part directory (export or PIPELINE/voicelm)")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint weights to load into it")
    parser.add_argument("--recipe-dir", type=Path, default=Path("runs/recipe-demo"))
    parser.add_argument("--count", type=int, default=100, help="held-out dialogues")
    parser.add_argument("--asked", choices=("speech", "text", "both"), default="speech")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--misses", type=int, default=10, help="held-out misses to print")
    parser.add_argument("--asr", action="store_true", help="also the LM's ASR word error on the user turns")
    parser.add_argument("--table", choices=("plus", "minus", "times"),
                        help="instead: every operand pair of this operation, asked in text, by split and order")
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed whose split --table uses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from voicelm.lm.model import VoiceLM

    lm = VoiceLM.from_pretrained(args.lm, dtype=torch.float32)
    if args.checkpoint is not None:
        lm.load_state(load_file(str(args.checkpoint)), where=str(args.checkpoint))
    lm.model.eval()
    if args.table:
        start = time.perf_counter()
        with torch.no_grad():
            tally, misses = operand_table(lm, args.table, args.seed)
        print(f"\nevery '{args.table}' pair 0-20 asked in text (the split of recipe seed {args.seed}); LM {args.lm}; "
              f"{platform.machine()}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s")
        print("| pairs | right |\n|---|---|")
        for row, (right, total) in sorted(tally.items()):
            print(f"| {row} | {right}/{total} |")
        for question, said in misses[:args.misses]:
            print(f"  x {question!r}: {said!r}")
        return
    dialogues = held_out_dialogues(args.recipe_dir, args.count)
    for asked in (("speech", "text") if args.asked == "both" else (args.asked,)):
        start = time.perf_counter()
        with torch.no_grad():
            tally, misses = score(lm, dialogues, asked)
        held = [v for (task, h), v in tally.items() if h]
        right, total = sum(v[0] for v in held), sum(v[1] for v in held)
        print(f"\nasked in {asked}: {len(dialogues)} held-out dialogues of {args.recipe_dir}; LM {args.lm}"
              f"{'; weights ' + str(args.checkpoint) if args.checkpoint else ''}; "
              f"{platform.machine()}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s")
        print("| task | held-out exchanges right | context exchanges right |\n|---|---|---|")
        for task in sorted({task for task, _ in tally}):
            cells = [f"{tally[(task, h)][0]}/{tally[(task, h)][1]}" if (task, h) in tally else "-" for h in (True, False)]
            print(f"| {task} | {cells[0]} | {cells[1]} |")
        print(f"held-out accuracy: {right}/{total} = {100 * right / max(total, 1):.1f} %")
        for question, reference, said in misses[:args.misses]:
            print(f"  x {question!r}: {said!r} (reference {reference!r})")
    if args.asr:
        start = time.perf_counter()
        with torch.no_grad():
            wers, misheard = asr_wer(lm, dialogues)
        print(f"\nthe LM's ASR of the {len(dialogues)} dialogues' user turns, {time.perf_counter() - start:.0f} s")
        print("| user turns of | word error |\n|---|---|")
        for task in sorted(wers):
            print(f"| {task} | {100 * wers[task]:.1f} % |")
        for said, heard in misheard[:args.misses]:
            print(f"  x {said!r} heard as {heard!r}")


if __name__ == "__main__":
    main()
