"""Where do two or more `voicelm eval` reports of the same dialogues differ?

    .venv/bin/python bench/compare_reports.py BASE/report.json CAND/report.json [MORE/report.json ...]

For each report: held-out accuracy and the spoken WER against the model's own text (the eval's
own `normalized_wer`, so "all" equals the report's figure), by the answer's place in its dialogue
(the first exchange or a later one) and its task. Then, for each candidate, the same WER on only
the answers whose text equals the base report's, next to the base's WER on those answers: two LMs
that say different things are otherwise compared on different sentences.

Sessions 19-26 compared LM candidates this way (`docs/recipe.md`); a point of spoken WER between
two single draws is within the flow's noise (session 23), less so on the matched rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GROUPS = ("all", "first", "later", "first/arithmetic", "first/repeat", "later/follow_up", "later/style")


def load_rows(path: Path) -> dict[tuple[str, int], dict]:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"cannot read {path} as a report.json of `voicelm eval`: {err}")
    if "dialogues" not in report:
        raise SystemExit(f"{path} is not a `voicelm eval` report.json (no 'dialogues'): pass the report of an eval")
    return {(e["dialogue"], e["exchange"]): e for d in report["dialogues"] for e in d["exchanges"]}


def labels(paths: list[Path]) -> dict[Path, str]:
    """Each report's name in the tables: its folder, with as many parent folders as it takes to
    tell the reports apart (runs/x/cand-a/eval-42 and runs/x/cand-b/eval-42 -> cand-a/eval-42, ...)."""
    depth = 1
    while True:
        names = {path: "/".join(path.resolve().parent.parts[-depth:]) for path in paths}
        if len(set(names.values())) == len(paths) or depth >= max(len(p.resolve().parent.parts) for p in paths):
            return names
        depth += 1


def in_group(row: dict, group: str) -> bool:
    if group == "all":
        return True
    place, _, task = group.partition("/")
    return ("first" if row["exchange"] == 0 else "later") == place and (not task or row["task"] == task)


def spoken_wer(rows: list[dict]) -> float | None:
    from voicelm.core.whisper_weights import normalized_wer

    rows = [r for r in rows if r.get("spoken_transcript") is not None]
    if not rows:
        return None
    return 100 * float(normalized_wer([r["text"] for r in rows], [r["spoken_transcript"] for r in rows]))


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files; the first is the base")
    args = parser.parse_args(argv)
    if len(args.reports) < 2:
        parser.error("give at least two report.json files: the base, then one or more candidates")
    tables = {path: load_rows(path) for path in args.reports}
    base_path = args.reports[0]
    base = tables[base_path]
    name = labels(args.reports)
    for path, rows in tables.items():
        if set(rows) != set(base):
            raise SystemExit(f"{path} and {base_path} score different exchanges: compare reports of the same "
                             f"manifest, split and --limit")

    print("| report | held-out right | " + " | ".join(f"{g} (n)" for g in GROUPS) + " |")
    print("|---|---|" + "---|" * len(GROUPS))
    for path, rows in tables.items():
        held = [r for r in rows.values() if r.get("heldout")]
        cells = []
        for group in GROUPS:
            members = [r for r in rows.values() if in_group(r, group)]
            cells.append(f"{fmt(spoken_wer(members))} ({len(members)})")
        right = sum(bool(r.get("correct")) for r in held)
        print(f"| {name[path]} | {right}/{len(held)} | " + " | ".join(cells) + " |")

    print("\nSpoken WER on the answers whose text equals the base's (base -> candidate):")
    print("| candidate | " + " | ".join(f"{g} (n)" for g in GROUPS) + " |")
    print("|---|" + "---|" * len(GROUPS))
    for path in args.reports[1:]:
        rows = tables[path]
        same = [k for k in rows if rows[k]["text"] == base[k]["text"]]
        cells = []
        for group in GROUPS:
            keys = [k for k in same if in_group(rows[k], group)]
            cells.append(f"{fmt(spoken_wer([base[k] for k in keys]))} -> {fmt(spoken_wer([rows[k] for k in keys]))} "
                         f"({len(keys)})")
        print(f"| {name[path]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
