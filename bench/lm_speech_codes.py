"""How well does the LM predict the speech codes of an answer when it is given the true ones so far?

    .venv/bin/python bench/lm_speech_codes.py --lm models/demo/voicelm [--recipe-dir runs/recipe-demo] \
        [--split heldout] [--count 200] [--threads 2]

Every dialogue of the split (`tokens/dialogues.jsonl` of a recipe run: the user's recorded codes,
piper's codes for the answers) is built as the `dialogue` training sample and run through the LM
once, teacher-forced. For every answer position the table gives the top-1 agreement with the
recorded code and the mean negative log-likelihood, by the answer's place in the dialogue (first
answer or a later one) and its task, plus the top-1 agreement on the answer's text tokens.

This separates what the LM *knows* from what happens when it speaks freely: `voicelm eval` runs
it greedy on its own earlier output. Session 25 used it: teacher-forced, follow-ups' speech codes
score as well as first answers' (68.7 % against 69.5 % for arithmetic), while their free-running
speech loses 16 % of its words against 5 %: the loss is in free running, not in what was learnt
(`docs/recipe.md`, "Session 25"). Takes under a minute for 200 dialogues on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import torch


def speech_code_table(lm, dialogues, tasks_by_id: dict[str, list[str]]) -> dict[str, list[float]]:
    """{"first arithmetic": [speech right, speech total, speech nll sum, text right, text total], ...}"""
    from voicelm.lm.data import DataOptions, SampleBuilder

    vocab = lm.vocab
    builder = SampleBuilder(vocab, lm.text_tokenizer, DataOptions(max_length=lm.max_context, tasks=("dialogue",)))
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0, 0, 0])
    with torch.no_grad():
        for sample in builder.build(dialogues)["dialogue"]:
            ids = torch.tensor([sample.input_ids])
            logits = lm.model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(sample.labels[1:])
            nll = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            right = logits.argmax(-1) == labels
            # a dialogue too long for the context loses its oldest exchanges: its answers are the last ones
            tasks = tasks_by_id[sample.source]
            answer = len(tasks) - sum(1 for token in sample.input_ids if token == vocab.assistant_id) - 1
            for pos in range(len(labels)):
                if sample.input_ids[pos] == vocab.assistant_id:
                    answer += 1
                label = int(labels[pos])
                if label < 0:
                    continue
                row = table[f"{'first' if answer == 0 else 'later'} {tasks[answer]}"]
                if vocab.is_speech(label):
                    row[0] += int(right[pos]); row[1] += 1; row[2] += float(nll[pos])
                elif vocab.is_text(label):
                    row[3] += int(right[pos]); row[4] += 1
    return dict(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=Path("models/demo/voicelm"), help="an LM part directory")
    parser.add_argument("--recipe-dir", type=Path, default=Path("runs/recipe-demo"))
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--count", type=int, default=200, help="at most this many dialogues of the split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from voicelm.lm.data import read_dialogues
    from voicelm.lm.model import VoiceLM

    manifest = args.recipe_dir / "tokens" / "dialogues.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: run the recipe's tokenize stage first "
                         f"(voicelm recipe --stages tokenizer,tokenize demo take.tokenizer=DEFAULT)")
    dialogues = read_dialogues(manifest, split=args.split)[: args.count]
    if not dialogues:
        raise SystemExit(f"{manifest} has no dialogues of split {args.split!r}")
    tasks_by_id = {}
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            tasks_by_id[row["id"]] = [turn.get("task", "?") for turn in row["turns"] if turn["role"] == "assistant"]
    start = time.perf_counter()
    lm = VoiceLM.from_pretrained(args.lm, device="cpu", dtype=torch.float32)
    table = speech_code_table(lm, dialogues, tasks_by_id)
    print(f"teacher-forced answers of {len(dialogues)} {args.split} dialogues, LM {args.lm}")
    print("| answer | speech codes | top-1 | mean NLL | text tokens | text top-1 |")
    print("|---|---|---|---|---|---|")
    for key in sorted(table):
        s_right, s_total, s_nll, t_right, t_total = table[key]
        print(f"| {key} | {s_total} | {100 * s_right / max(s_total, 1):.1f} % | {s_nll / max(s_total, 1):.3f} | "
              f"{t_total} | {100 * t_right / max(t_total, 1):.1f} % |")
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
