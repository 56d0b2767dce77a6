"""`voicelm eval PIPELINE MANIFEST`: score any pipeline on a spoken dialogue manifest.

The manifest is the `dialogues.jsonl` that `voicelm data dialogues` writes (turns carry `text`,
`audio`; assistant turns also `answer`, `task`, `heldout`). Each dialogue of the chosen split
runs through a fresh `Session` of the pipeline, turn by turn, fed the user turn's audio, with
(nearly) greedy sampling and a fixed seed, through the public API only. Measured:

- answer accuracy from the text stream (`answer_correct`), per task and overall, held-out
  exchanges apart from the context turns around them;
- Whisper word error of the spoken answer against the model's own text and against the
  reference assistant text;
- tokenizer round trip (audio -> pipeline tokenizer -> pipeline decoder -> Whisper) word error
  on the user speech and on the assistant (piper) speech;
- first-audio latency P50/P90 (`TurnEnd.timings["first_audio"]`: end of user audio to the first
  audio chunk) and the real-time factor (compute seconds / seconds of audio produced).

`report.json` (every number and one row per exchange) and `report.md` (a short table) are
written under the output directory, each atomically. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from voicelm.core.checkpoint import atomic_write_file
from voicelm.core.textnorm import spoken_words

REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
DIALOGUES_NAME = "dialogues.jsonl"  # what `voicelm data dialogues` writes (voicelm.data.dialogues)
JUDGES = ("base", "tiny.en")  # the Whisper models that exist offline (docs/whisper.md)
DEFAULT_MAX_NEW_TOKENS = 600  # ~200 text + ~400 speech tokens (32 s of speech): far above any answer of the domain
DEFAULT_TEMPERATURE = 0.0  # greedy: the score should not depend on luck


class EvaluationError(ValueError):
    """Input the evaluation cannot use (manifest, split, options); the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Scoring text: pure functions

def normalize_answer_words(text: str) -> list[str]:
    """Words of `text` for answer matching (`voicelm.core.textnorm.spoken_words`): lower case,
    punctuation gone, every number (words or digits, up to 999) as digits. Punctuation separates
    numbers, so a count "one, two, three" stays three numbers while "twenty one" is one."""
    return spoken_words(text)


def _same_kind(word: str, other: str) -> bool:
    """Would `word` continue an answer ending (or starting) with `other`? A number next to a
    number, or a single letter next to a spelled letter."""
    if other.isdigit():
        return word.isdigit()
    return len(other) == 1 and len(word) == 1 and word.isalpha()


def _occurrences(words: Sequence[str], part: Sequence[str]) -> list[int]:
    n = len(part)
    return [i for i in range(len(words) - n + 1) if list(words[i:i + n]) == list(part)]


def answer_correct(answer: str, text: str, *, reference: str | None = None) -> bool:
    """Does the model's `text` give the reference `answer`?

    Both sides go through `normalize_answer_words`; the answer must appear as a whole run of
    words, not extended by another number (or spelled letter) on either side ("1 2 3" does not
    answer "count from two to three", "twelve" does not answer with "120"). With the reference
    assistant text, the word just before the answer there ("is" in "seven plus five is twelve",
    "spelled" in "cat is spelled c, a, t") must also precede it in `text`: an answer that merely
    repeats an operand of the question ("five minus zero is seven" for "five") is wrong.
    """
    wanted = normalize_answer_words(answer)
    if not wanted:
        raise ValueError(f"answer {answer!r} has no words to look for")
    words = normalize_answer_words(text)
    anchor = None
    if reference is not None:
        ref_words = normalize_answer_words(reference)
        found = _occurrences(ref_words, wanted)
        if found and found[-1] > 0:  # the answer closes every template of the domain
            anchor = ref_words[found[-1] - 1]
    for start in _occurrences(words, wanted):
        end = start + len(wanted)
        if anchor is not None:
            if start == 0 or words[start - 1] != anchor:
                continue
        elif start > 0 and _same_kind(words[start - 1], wanted[0]):
            continue
        if end < len(words) and _same_kind(words[end], wanted[-1]):
            continue
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The manifest

@dataclasses.dataclass(frozen=True)
class EvalExchange:
    index: int  # 0-based exchange number in its dialogue
    user_text: str
    user_audio: Path
    assistant_text: str
    assistant_audio: Path | None
    answer: str
    task: str
    heldout: bool


@dataclasses.dataclass(frozen=True)
class EvalDialogue:
    id: str
    split: str
    speaker: str | None
    exchanges: tuple[EvalExchange, ...]


def _file_or_dir(given: str | os.PathLike, name: str, what: str, hint: str) -> Path:
    """`given`, or `given/name` when it is a directory; a clear error if that file does not exist."""
    path = Path(given)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise EvaluationError(f"{what} {path} not found: {hint}")
    return path


def _manifest_path(manifest: str | os.PathLike) -> Path:
    return _file_or_dir(manifest, DIALOGUES_NAME, "dialogue manifest",
                        f"pass the {DIALOGUES_NAME} written by `voicelm data dialogues --out DIR` (or that directory)")


def _parse_dialogue(row: Any, root: Path, where: str) -> EvalDialogue:
    if not isinstance(row, dict) or not isinstance(row.get("turns"), list) or not row["turns"]:
        raise EvaluationError(f"{where}: expected a dialogue object with a non-empty 'turns' list")
    turns = row["turns"]
    if len(turns) % 2 or any(t.get("role") != ("user", "assistant")[k % 2] if isinstance(t, dict) else True
                             for k, t in enumerate(turns)):
        raise EvaluationError(f"{where}: turns must alternate user, assistant (each a JSON object), "
                              f"starting with the user")
    exchanges = []
    for k in range(0, len(turns), 2):
        user, assistant = turns[k], turns[k + 1]
        missing = [f"user.{key}" for key in ("text", "audio") if not isinstance(user.get(key), str)]
        missing += [f"assistant.{key}" for key in ("text", "answer", "task")
                    if not isinstance(assistant.get(key), str)]
        if missing:
            raise EvaluationError(f"{where}, exchange {k // 2}: missing {missing}; a scoring manifest comes from "
                                  f"`voicelm data dialogues` (assistant turns carry 'answer' and 'task')")
        if not normalize_answer_words(assistant["answer"]):
            raise EvaluationError(f"{where}, exchange {k // 2}: the answer {assistant['answer']!r} has no words")
        exchanges.append(EvalExchange(
            index=k // 2, user_text=user["text"], user_audio=root / user["audio"],
            assistant_text=assistant["text"],
            assistant_audio=root / assistant["audio"] if isinstance(assistant.get("audio"), str) else None,
            answer=assistant["answer"], task=assistant["task"], heldout=bool(assistant.get("heldout", False))))
    return EvalDialogue(id=str(row.get("id", where)), split=str(row.get("split", "")),
                        speaker=row.get("speaker"), exchanges=tuple(exchanges))


def read_dialogues(manifest: str | os.PathLike, split: str = "heldout", limit: int | None = None) -> list[EvalDialogue]:
    """The dialogues of `split` (the first `limit` of them), with every audio file checked to exist."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be at least 1 (or None for all), got {limit}")
    path = _manifest_path(manifest)
    dialogues, splits = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}:{number} is not JSON ({exc})") from None
        dialogue = _parse_dialogue(row, path.parent, f"{path}:{number}")
        splits[dialogue.split] = splits.get(dialogue.split, 0) + 1
        if dialogue.split == split and (limit is None or len(dialogues) < limit):
            dialogues.append(dialogue)
    if not dialogues:
        have = ", ".join(f"{name!r}: {count}" for name, count in sorted(splits.items())) or "none at all"
        raise EvaluationError(f"{path} has no dialogues of split {split!r} (dialogues per split: {have}); "
                              f"choose another --split")
    missing = [str(p) for d in dialogues for e in d.exchanges for p in (e.user_audio, e.assistant_audio)
               if p is not None and not p.is_file()]
    if missing:
        raise EvaluationError(f"{len(missing)} audio file(s) of the manifest are missing, e.g. {missing[:3]}; "
                              f"regenerate the corpus (voicelm data dialogues)")
    return dialogues


# ---------------------------------------------------------------------------------------------
# Running and summarising

def _wer_or_none(references: list[str], hypotheses: list[str]) -> float | None:
    """Corpus word error (Whisper's normalizer, jiwer); None when nothing can be scored."""
    from voicelm.core.whisper_weights import normalized_wer

    if not references:
        return None
    try:
        return float(normalized_wer(references, hypotheses))
    except ValueError:  # every reference empty after normalization
        return None


def _transcribe(judge, samples: np.ndarray, sample_rate: int) -> str:
    from voicelm.core.audio import AudioError
    from voicelm.core.whisper_weights import transcribe

    if samples.size == 0:
        return ""
    try:
        return transcribe(judge, samples, sample_rate)
    except AudioError:  # silent output: nothing to hear
        return ""


def _run_exchange(session, exchange: EvalExchange, options: dict) -> dict[str, Any]:
    from voicelm.core.audio import SAMPLE_RATE, load_audio
    from voicelm.events import AudioChunk, Error, SpeechTokens, TextDelta, TurnEnd

    wav = load_audio(exchange.user_audio, SAMPLE_RATE)
    text, codes, chunks, errors, end = [], [], [], [], None
    for event in session.respond(audio=wav.numpy(), sample_rate=SAMPLE_RATE, options=options):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, SpeechTokens):
            codes.extend(int(c) for c in event.tokens)
        elif isinstance(event, AudioChunk):
            chunks.append(event.samples)
        elif isinstance(event, Error):
            errors.append(f"{event.code}: {event.message}")
        elif isinstance(event, TurnEnd):
            end = event
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return {"text": "".join(text), "speech_codes": codes, "audio": audio, "end": end, "errors": errors,
            "user_seconds": wav.numel() / SAMPLE_RATE}


_RECORDED_KEYS = ("text", "speech_codes", "errors", "user_seconds", "reason", "num_text_tokens")


def _replay_exchange(pipeline, recorded: dict) -> dict[str, Any]:
    """Speak an answer recorded in an earlier report again: its speech codes through this pipeline's
    decoder exactly as a session streams them (one code per push, then the end). The text and the
    rest of the row stay the recorded ones; nothing here is timed."""
    from voicelm.session import _as_samples

    codes = list(recorded["speech_codes"])  # checked by read_recorded_answers
    stream = pipeline.new_audio_stream()
    chunks = [chunk for code in codes for chunk in stream.push([code])] + list(stream.finish())
    audio = np.concatenate([_as_samples(c) for c in chunks]) if chunks else np.zeros(0, np.float32)
    return {"text": recorded["text"], "speech_codes": codes, "audio": audio, "errors": list(recorded["errors"]),
            "user_seconds": recorded["user_seconds"], "reason": recorded["reason"],
            "num_text_tokens": recorded["num_text_tokens"]}


def read_recorded_answers(report_path: str | os.PathLike, dialogues: Sequence["EvalDialogue"]) -> dict:
    """The LM's answers of an earlier report (`report.json`, or its directory), keyed by (dialogue id,
    exchange index), checked to cover every exchange of `dialogues` with the same user words."""
    path = _file_or_dir(report_path, REPORT_JSON, "earlier report",
                        f"pass the {REPORT_JSON} (or the directory) that `voicelm eval` wrote")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        rows = {(d["id"], r["exchange"]): r for d in report["dialogues"] for r in d["exchanges"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{path} is not a report of `voicelm eval` ({type(exc).__name__}: {exc})") from None
    for dialogue in dialogues:
        for exchange in dialogue.exchanges:
            row = rows.get((dialogue.id, exchange.index))
            if row is None or row.get("user_text") != exchange.user_text:
                raise EvaluationError(f"{path} has no answer to exchange {exchange.index} of dialogue {dialogue.id} "
                                      f"({exchange.user_text!r}): it scored another manifest, split or --limit; "
                                      f"replay a report of the same dialogues")
            if "speech_codes" not in row:
                raise EvaluationError(f"{path} holds no speech codes (written before voicelm recorded them): "
                                      f"run `voicelm eval` again without --lm-answers-from to record them")
            codes = row["speech_codes"]
            missing = [key for key in _RECORDED_KEYS if key not in row]
            if missing or not isinstance(codes, list) or not all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in codes):
                raise EvaluationError(f"{path}, dialogue {dialogue.id} exchange {exchange.index}: not a row of "
                                      f"`voicelm eval` (missing {missing} or speech_codes not a list of codes >= 0)")
    return rows


def _check_codebook(recorded: dict, codebook: int, source) -> None:
    """Recorded codes must exist in this decoder's codebook (another tokenizer's codes would not)."""
    top = max((max(row["speech_codes"], default=-1) for row in recorded.values()), default=-1)
    if top >= codebook:
        raise EvaluationError(f"{source} has speech code {top}, but this pipeline's codebook has {codebook} codes: "
                              f"its answers came from a pipeline with another speech tokenizer; replay them "
                              f"through a decoder of the same codebook")


def _round_trip(pipeline, judge, wav) -> tuple[str, int]:
    """16 kHz audio -> pipeline tokenizer -> pipeline decoder -> Whisper transcript (and token count)."""
    from voicelm.core.audio import SAMPLE_RATE

    tokens = pipeline.tokenizer.encode(wav, SAMPLE_RATE)
    if tokens.numel() == 0:
        return "", 0
    decoded = pipeline.decoder.decode(tokens).detach().cpu().numpy()
    return _transcribe(judge, decoded, pipeline.sample_rate), int(tokens.numel())


LM_HEARING_MAX_TOKENS = 100  # a transcript of one user turn (the demo's longest: ~25 text tokens)


def _lm_hears(pipeline, wav, max_new_tokens: int) -> str:
    """What the pipeline's LM transcribes of one user clip on its own: the recipe's `asr` task
    (system SYSTEM_ASR, the clip's speech tokens, greedy, text only). Told apart from the answers,
    it shows whether a wrong answer was misheard or misanswered."""
    from voicelm.core.audio import SAMPLE_RATE
    from voicelm.lm.generate import GenerationError, SamplingOptions, VoiceLMGen
    from voicelm.lm.prompt import SYSTEM_ASR, build_prompt

    tokens = pipeline.tokenizer.encode(wav, SAMPLE_RATE).reshape(-1).tolist()
    if not tokens:
        return ""
    ids = build_prompt(pipeline.vocab, pipeline.lm.text_tokenizer, user_speech=tokens, system=SYSTEM_ASR)
    try:
        generation = VoiceLMGen(pipeline.lm, ids, SamplingOptions(temperature=0.0, enforce_interleave=False,
                                                                  max_new_tokens=max_new_tokens, seed=0))
    except GenerationError:  # a clip longer than the context: nothing heard
        return ""
    generation.run()
    return generation.text().strip()


TEXT_ANSWER_MAX_TOKENS = 100  # a text answer of the demo (the longest, a three-digit follow-up: ~30 tokens)


def _text_answer(pipeline, history: list, user_text: str, max_new_tokens: int) -> tuple[str, Any]:
    """The LM's answer to `user_text` given as text, in text only (system SYSTEM_TEXT_ONLY, the
    recipe's `text` task, greedy), after `history` (earlier text turns and the LM's own text answers).
    Returns the answer text and the AssistantTurn to append to the history."""
    from voicelm.lm.generate import GenerationError, SamplingOptions, VoiceLMGen
    from voicelm.lm.prompt import SYSTEM_TEXT_ONLY, AssistantTurn, build_prompt

    ids = build_prompt(pipeline.vocab, pipeline.lm.text_tokenizer, history, user_text=user_text,
                       system=SYSTEM_TEXT_ONLY)
    try:
        generation = VoiceLMGen(pipeline.lm, ids, SamplingOptions(temperature=0.0, enforce_interleave=False,
                                                                  max_new_tokens=max_new_tokens, seed=0))
    except GenerationError:  # a history longer than the context: no answer
        return "", AssistantTurn([])
    generation.run()
    return generation.text().strip(), AssistantTurn(list(generation.text_ids))


def _text_mode(rows: list[dict]) -> dict[str, Any] | None:
    """Answer accuracy with every user turn given as its text (`text_answers`): what the LM knows
    when hearing is taken out of the question."""
    answered = [r for r in rows if r.get("text_mode_answer") is not None]
    if not answered:
        return None
    def scored(selected: list[dict]) -> dict[str, Any]:
        return _accuracy([{"task": r["task"], "correct": r["text_mode_correct"]} for r in selected])

    return {"heldout": scored([r for r in answered if r["heldout"]]), "all": scored(answered)}


def _lm_hearing(rows: list[dict]) -> dict[str, Any] | None:
    """WER and exact transcripts of the LM's own transcription of the user turns (`lm_hearing`)."""
    heard = [r for r in rows if r.get("lm_transcript") is not None]
    if not heard:
        return None

    def part(selected: list[dict]) -> dict[str, Any]:
        exact = sum(_wer_or_none([r["user_text"]], [r["lm_transcript"]]) == 0.0 for r in selected)
        return {"exact": exact, "turns": len(selected),
                "wer": _wer_or_none([r["user_text"] for r in selected], [r["lm_transcript"] for r in selected])}

    held = [r for r in heard if r["heldout"]]
    return {"all": part(heard), "heldout": part(held),
            "heldout_by_task": {task: part([r for r in held if r["task"] == task])
                                for task in sorted({r["task"] for r in held})}}


def _accuracy(rows: list[dict]) -> dict[str, Any]:
    def count(selected: list[dict]) -> dict[str, Any]:
        correct = sum(r["correct"] for r in selected)
        return {"correct": correct, "total": len(selected),
                "accuracy": correct / len(selected) if selected else None}

    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    return {**count(rows), "by_task": {task: count(sel) for task, sel in sorted(by_task.items())}}


LONG_ANSWER_WORDS = 8  # answers whose reference has more words are "long" (three-digit follow-ups)


def _style_copies(rows: list[dict]) -> dict[str, Any]:
    """Held-out style turns ("say it slowly") whose previous exchange was answered right, and how
    many of them say that answer's words again: copying the context, not answering anew."""
    copies = total = 0
    previous: dict[Any, dict] = {}
    for r in rows:  # in dialogue order
        key = r.get("dialogue")
        before = previous.get(key) if key is not None else None
        if (r["task"] == "style" and r["heldout"] and before is not None and before["correct"]
                and before.get("exchange") == r.get("exchange", 0) - 1):
            total += 1
            copies += normalize_answer_words(r["text"]) == normalize_answer_words(before["text"])
        previous[key] = r
    return {"copies": copies, "after_right_answer": total, "rate": copies / total if total else None}


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _round_trip_wer(rows: list[dict], key: str) -> float | None:
    """WER of the round-trip transcripts `key` against the reference assistant text."""
    kept = [r for r in rows if r["round_trip"].get(key) is not None]
    return _wer_or_none([r["reference"] for r in kept], [r["round_trip"][key] for r in kept])


def summarize(rows: list[dict]) -> dict[str, Any]:
    """The report's numbers from the per-exchange rows (pure: tests call it on hand-made rows)."""
    first_audio = [r["timings"]["first_audio"] for r in rows if "first_audio" in r["timings"]]
    first_text = [r["timings"]["first_text"] for r in rows if "first_text" in r["timings"]]
    timed = [r for r in rows if "total" in r["timings"]]  # replayed answers (lm_answers_from) are not timed
    audio_seconds = sum(r["audio_seconds"] for r in timed)
    compute = {key: sum(r["timings"].get(key, 0.0) for r in timed) for key in ("total", "lm", "decoder")}
    with_round_trip = [r for r in rows if r.get("round_trip") is not None]
    long_rows = [r for r in rows if len(r["reference"].split()) > LONG_ANSWER_WORDS]
    other_rows = [r for r in rows if len(r["reference"].split()) <= LONG_ANSWER_WORDS]
    return {
        "accuracy": {
            "heldout": _accuracy([r for r in rows if r["heldout"]]),
            "context": _accuracy([r for r in rows if not r["heldout"]]),
            "all": _accuracy(rows),
        },
        "wer": {
            "spoken_vs_text": _wer_or_none([r["text"] for r in rows], [r["spoken_transcript"] for r in rows]),
            "spoken_vs_reference": _wer_or_none([r["reference"] for r in rows],
                                                [r["spoken_transcript"] for r in rows]),
            # against the own text, split by the reference's length: long answers are the hard part
            "spoken_vs_text_long": _wer_or_none([r["text"] for r in long_rows], [r["spoken_transcript"] for r in long_rows]),
            "spoken_vs_text_other": _wer_or_none([r["text"] for r in other_rows],
                                                 [r["spoken_transcript"] for r in other_rows]),
            "long_answers": len(long_rows),
        },
        "style_copies": _style_copies(rows),
        "round_trip_wer": {
            "user": _wer_or_none([r["user_text"] for r in with_round_trip],
                                 [r["round_trip"]["user_transcript"] for r in with_round_trip]),
            "assistant": _round_trip_wer(with_round_trip, "assistant_transcript"),
            # the judge on the original assistant audio: what the round trip is measured against
            "assistant_source": _round_trip_wer(with_round_trip, "assistant_source_transcript"),
        },
        "latency": {
            "first_audio_p50": _percentile(first_audio, 50), "first_audio_p90": _percentile(first_audio, 90),
            "first_text_p50": _percentile(first_text, 50), "turns_with_audio": len(first_audio),
            "turns": len(rows),
        },
        "rtf": {
            "total": compute["total"] / audio_seconds if audio_seconds > 0 else None,
            "lm": compute["lm"] / audio_seconds if audio_seconds > 0 else None,
            "decoder": compute["decoder"] / audio_seconds if audio_seconds > 0 else None,
            "compute_seconds": compute["total"], "audio_seconds": audio_seconds,
        },
        "errors": sum(len(r["errors"]) for r in rows),
        "judge_loops": _judge_loops(rows),
        "lm_hearing": _lm_hearing(rows),
        "text_mode": _text_mode(rows),
    }


def _judge_loops(rows: list[dict]) -> int:
    """Transcripts the judge left as a decoding loop even after its fallbacks
    (`whisper_weights.transcribe`); each can add hundreds of inserted words to a WER."""
    from voicelm.core.whisper_weights import is_repetitive

    texts = [r["spoken_transcript"] for r in rows]
    for r in rows:
        if r.get("round_trip"):
            texts += [r["round_trip"].get(key) or "" for key in
                      ("user_transcript", "assistant_transcript", "assistant_source_transcript")]
    return sum(is_repetitive(t) for t in texts)


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _fmt_acc(entry: dict) -> str:
    return "n/a (0 exchanges)" if not entry["total"] else \
        f"{_fmt_pct(entry['accuracy'])} ({entry['correct']}/{entry['total']})"


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{1000 * value:.0f} ms"


def render_markdown(report: dict) -> str:
    """The short table of `report.md` (and of the command's output)."""
    acc, wer, rt, lat, rtf = (report["accuracy"], report["wer"], report["round_trip_wer"], report["latency"],
                              report["rtf"])
    lines = [
        f"# Evaluation of {report['pipeline']['name']}",
        "",
        f"{report['num_dialogues']} dialogues ({report['num_exchanges']} exchanges) of split "
        f"`{report['split']}` from `{report['manifest']}`; judge Whisper {report['judge']}; "
        f"temperature {report['sampling']['temperature']}, seed {report['sampling']['seed']}"
        + (f", decoder noise seed {report['sampling']['decoder_noise_seed']}"
           if report["sampling"].get("decoder_noise_seed") is not None else "") + "."
        + (f" The LM's answers are replayed from `{report['lm_answers_from']}` (text and speech codes as "
           f"recorded there; spoken by this pipeline's decoder; not timed)." if report.get("lm_answers_from") else ""),
        "",
        "| metric | value |",
        "|---|---|",
        f"| answer accuracy, held-out exchanges | {_fmt_acc(acc['heldout'])} |",
        f"| answer accuracy, context turns | {_fmt_acc(acc['context'])} |",
        f"| answer accuracy, all | {_fmt_acc(acc['all'])} |",
        f"| WER spoken answer vs own text | {_fmt_pct(wer['spoken_vs_text'])} |",
        f"| WER spoken answer vs own text, answers over {LONG_ANSWER_WORDS} words ({wer.get('long_answers', 0)}) / "
        f"the others | {_fmt_pct(wer.get('spoken_vs_text_long'))} / {_fmt_pct(wer.get('spoken_vs_text_other'))} |",
        f"| WER spoken answer vs reference | {_fmt_pct(wer['spoken_vs_reference'])} |",
        f"| tokenizer round trip WER, user speech | {_fmt_pct(rt['user'])} |",
        f"| tokenizer round trip WER, assistant speech | {_fmt_pct(rt['assistant'])} |",
        f"| judge's WER on the original assistant speech (floor) | {_fmt_pct(rt.get('assistant_source'))} |",
        f"| first-audio latency P50 / P90 | {_fmt_ms(lat['first_audio_p50'])} / {_fmt_ms(lat['first_audio_p90'])} |",
        "| real-time factor (compute / audio) | " +
        ("n/a (no timed audio)" if rtf["total"] is None else f"{rtf['total']:.2f} (LM {rtf['lm']:.2f}, decoder "
                                                       f"{rtf['decoder']:.2f})") + " |",
    ]
    copies = report.get("style_copies")
    if copies and copies["after_right_answer"]:
        lines.append(f"| held-out style turns after a right answer that repeat it | "
                     f"{copies['copies']}/{copies['after_right_answer']} |")
    hearing = report.get("lm_hearing")
    if hearing:
        held = hearing["heldout"]
        lines.append(f"| the LM's own transcript of the user turns (asr task), exact / WER, held-out | "
                     f"{held['exact']}/{held['turns']} / {_fmt_pct(held['wer'])} |")
    text_mode = report.get("text_mode")
    if text_mode:
        lines.append(f"| answer accuracy with the user turns given as text (text task), held-out | "
                     f"{_fmt_acc(text_mode['heldout'])} |")
    if report["errors"]:
        lines.append(f"| turns that ended in an error | {report['errors']} |")
    if report.get("judge_loops"):
        lines.append(f"| judge transcripts still looping after its fallbacks (check them in report.json) | "
                     f"{report['judge_loops']} |")
    tasks = acc["all"]["by_task"]
    if tasks:
        lines += ["", "| task | held-out | all |", "|---|---|---|"]
        for task, entry in tasks.items():
            held = acc["heldout"]["by_task"].get(task)
            lines.append(f"| {task} | {_fmt_acc(held) if held else '-'} | {_fmt_acc(entry)} |")
    return "\n".join(lines) + "\n"


def _check_judge(judge: str) -> None:
    if judge not in JUDGES:
        raise EvaluationError(f"judge must be one of {list(JUDGES)} (the Whisper models available offline), "
                              f"got {judge!r}")


def evaluate_pipeline(
    pipeline_dir,
    dialogues_manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "heldout",
    limit: int | None = None,
    judge: str = "base",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    round_trip: bool = True,
    warmup: bool = True,
    progress: Callable[[str], None] | None = None,
    decoder_noise_seed: int | None = None,
    lm_answers_from: str | os.PathLike | None = None,
    lm_hearing: bool = False,
    text_answers: bool = False,
) -> dict:
    """Score a pipeline (a directory, or an already loaded `Pipeline`) on the dialogues of `split`
    in `dialogues_manifest`; write `report.json` and `report.md` under `out_dir`; return the report.

    Every input is checked before any model is loaded. `warmup` runs one unscored turn first, so
    one-time costs (lazy initialisation, first-call allocations) stay out of the latency figures.
    `progress`, if given, is called with one line per dialogue. `decoder_noise_seed` replaces the
    flow's starting-noise seed (default: the pipeline's own): the same model's speech under another
    draw, which shows how much of a WER difference between two decoders is the draw.

    `lm_answers_from` (an earlier `report.json` of the same dialogues, or its directory) replays the
    LM's answers recorded there instead of running the LM: the same text and speech codes, spoken by
    this pipeline's decoder as a session streams them. It scores a decoder (or a decoder noise seed)
    on exactly the speech tokens another run produced, without the LM's share of the time (about a
    third of a turn's compute on the demo); latency and the real-time factor are not measured then.

    `lm_hearing` also has the LM transcribe each user turn on its own (the recipe's `asr` task, greedy;
    `_lm_hears`): each row's `lm_transcript` and the report's `lm_hearing` (exact transcripts and WER,
    by task for the held-out turns) tell a misheard question from a misanswered one. It means
    something only for an LM trained on that task (the recipe's; not official GLM-4-Voice weights).

    `text_answers` also has the LM answer every dialogue with its user turns given as their text, in
    text only (the recipe's `text` task, greedy; its own text answers are the history): each row's
    `text_mode_answer` and `text_mode_correct`, the report's `text_mode` accuracy. Against the spoken
    accuracy it shows how much of what the LM knows it loses by listening. Like `lm_hearing`, it
    needs an LM trained on that task.
    """
    from voicelm.core.audio import SAMPLE_RATE, AudioError, load_audio
    from voicelm.lm.prompt import UserTurn
    from voicelm.pipeline import Pipeline, load_pipeline

    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluationError(f"output directory {out_dir} is a file; pass a directory for the report")
    if max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= temperature:
        raise EvaluationError(f"temperature must be >= 0, got {temperature}")
    _check_judge(judge)
    if decoder_noise_seed is not None and (isinstance(decoder_noise_seed, bool) or not isinstance(decoder_noise_seed, int)
                                           or decoder_noise_seed < 0):
        raise EvaluationError(f"decoder_noise_seed must be an integer >= 0 (or None for the pipeline's own), "
                              f"got {decoder_noise_seed!r}")
    dialogues = read_dialogues(dialogues_manifest, split, limit)
    recorded = read_recorded_answers(lm_answers_from, dialogues) if lm_answers_from is not None else None
    pipeline = pipeline_dir if isinstance(pipeline_dir, Pipeline) else load_pipeline(pipeline_dir)
    if recorded is not None:
        _check_codebook(recorded, pipeline.vocab.speech_vocab_size, lm_answers_from)
    from decoder.flow import with_sampling

    flow = pipeline.decoder.flow
    own_config = flow.config  # a Pipeline passed in gets its own seed back afterwards
    if decoder_noise_seed is not None:
        flow.config = with_sampling(own_config, {"noise_seed": decoder_noise_seed})
    try:
        from voicelm.core.whisper_weights import load_whisper

        judge_model = load_whisper(judge)
        options = {"temperature": float(temperature), "max_new_tokens": int(max_new_tokens)}

        if warmup and recorded is None:
            _run_exchange(pipeline.session(options=options, seed=seed), dialogues[0].exchanges[0], options)
            if round_trip:
                _round_trip(pipeline, judge_model, load_audio(dialogues[0].exchanges[0].user_audio, SAMPLE_RATE))

        report_dialogues, rows = [], []
        for number, dialogue in enumerate(dialogues, start=1):
            session = pipeline.session(options=options, seed=seed)
            dialogue_rows = []
            text_history: list = []
            for exchange in dialogue.exchanges:
                if recorded is not None:
                    turn = _replay_exchange(pipeline, recorded[(dialogue.id, exchange.index)])
                else:
                    try:
                        turn = _run_exchange(session, exchange, options)
                    except (AudioError, ValueError) as exc:  # a clip the session refuses: scored wrong, reported
                        turn = {"text": "", "speech_codes": [], "audio": np.zeros(0, np.float32), "end": None,
                                "user_seconds": 0.0, "errors": [f"bad_input: {exc}"]}
                end = turn.get("end")
                spoken = _transcribe(judge_model, turn["audio"], pipeline.sample_rate)
                row = {
                    "dialogue": dialogue.id, "exchange": exchange.index, "task": exchange.task,
                    "heldout": exchange.heldout, "user_text": exchange.user_text, "reference": exchange.assistant_text,
                    "answer": exchange.answer, "text": turn["text"],
                    "correct": answer_correct(exchange.answer, turn["text"], reference=exchange.assistant_text),
                    "spoken_transcript": spoken,
                    "reason": end.reason if end else turn.get("reason"),
                    "timings": dict(end.timings) if end else {},
                    "audio_seconds": len(turn["audio"]) / pipeline.sample_rate,
                    "num_text_tokens": end.num_text_tokens if end else turn.get("num_text_tokens", 0),
                    "num_speech_tokens": len(turn["speech_codes"]),
                    "speech_codes": turn["speech_codes"],
                    "user_seconds": turn["user_seconds"], "errors": turn["errors"], "round_trip": None,
                    "lm_transcript": (_lm_hears(pipeline, load_audio(exchange.user_audio, SAMPLE_RATE),
                                                                min(max_new_tokens, LM_HEARING_MAX_TOKENS))
                                      if lm_hearing else None),
                    "text_mode_answer": None, "text_mode_correct": None,
                }
                if text_answers:
                    answer_text, answered = _text_answer(pipeline, text_history, exchange.user_text,
                                                         min(max_new_tokens, TEXT_ANSWER_MAX_TOKENS))
                    text_history += [UserTurn(text=exchange.user_text), answered]
                    row["text_mode_answer"] = answer_text
                    row["text_mode_correct"] = answer_correct(exchange.answer, answer_text,
                                                              reference=exchange.assistant_text)
                if round_trip:
                    user_transcript, user_tokens = _round_trip(pipeline, judge_model,
                                                               load_audio(exchange.user_audio, SAMPLE_RATE))
                    assistant_transcript = source_transcript = None
                    if exchange.assistant_audio is not None:
                        assistant = load_audio(exchange.assistant_audio, SAMPLE_RATE)
                        assistant_transcript, _ = _round_trip(pipeline, judge_model, assistant)
                        # the judge on the recording itself: the floor of the round-trip figure
                        source_transcript = _transcribe(judge_model, assistant.reshape(-1).numpy(), SAMPLE_RATE)
                    row["round_trip"] = {"user_transcript": user_transcript, "user_tokens": user_tokens,
                                         "assistant_transcript": assistant_transcript,
                                         "assistant_source_transcript": source_transcript}
                dialogue_rows.append(row)
            rows.extend(dialogue_rows)
            report_dialogues.append({"id": dialogue.id, "split": dialogue.split, "speaker": dialogue.speaker,
                                     "exchanges": dialogue_rows})
            if progress is not None:
                right = sum(r["correct"] for r in dialogue_rows)
                progress(f"[{number}/{len(dialogues)}] {dialogue.id}: {right}/{len(dialogue_rows)} answers right")

        info = pipeline.info()
        report = {
            "version": REPORT_VERSION,
            "pipeline": {"name": info["name"], "directory": info["directory"], "description": info["description"],
                         "random_weights": info["random_weights"]},
            "manifest": str(_manifest_path(dialogues_manifest)),
            "split": split, "limit": limit, "judge": judge, "round_trip": round_trip, "warmup": warmup,
            "sampling": {**options, "seed": seed, "decoder_noise_seed": int(pipeline.decoder.flow.config.noise_seed)},
            "lm_answers_from": str(Path(lm_answers_from)) if lm_answers_from is not None else None,
            "num_dialogues": len(dialogues), "num_exchanges": len(rows),
            **summarize(rows),
            "wall_seconds": time.perf_counter() - start,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "python": platform.python_version()},
            "dialogues": report_dialogues,
        }
        write_report(report, out_dir)
        return report
    finally:
        flow.config = own_config


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """`report.json` and `report.md` under `out_dir`, each written atomically (complete or absent)."""
    out_dir = Path(out_dir)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"  # NaN is not JSON: numbers are None instead
    table = render_markdown(report)
    json_path = atomic_write_file(out_dir / REPORT_JSON, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    md_path = atomic_write_file(out_dir / REPORT_MD, lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", type=Path, help="pipeline directory (tokenizer/, voicelm/, decoder/)")
    parser.add_argument("manifest", type=Path, help=f"{DIALOGUES_NAME} of `voicelm data dialogues` (or its directory)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: eval/<pipeline name>-<split>)")
    parser.add_argument("--split", default="heldout", help="dialogues of this split (default: heldout)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N dialogues of the split")
    parser.add_argument("--judge", choices=JUDGES, default="base", help="Whisper model that transcribes (default base)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoder-noise-seed", type=int, default=None,
                        help="the flow's starting-noise seed (default: the pipeline's own); another seed is "
                             "another draw of the same speech, to tell a real WER difference from the draw")
    parser.add_argument("--lm-answers-from", type=Path, default=None, metavar="REPORT",
                        help="replay the LM's answers (text and speech codes) recorded in an earlier report.json "
                             "of the same dialogues instead of running the LM: scores this pipeline's decoder on "
                             "exactly those speech tokens, about twice as fast; no latency figures")
    parser.add_argument("--no-round-trip", action="store_true", help="skip the tokenizer round trip (faster)")
    parser.add_argument("--lm-hearing", action="store_true",
                        help="also have the LM transcribe each user turn on its own (its asr task): misheard or "
                             "misanswered")
    parser.add_argument("--text-answers", action="store_true",
                        help="also have the LM answer each dialogue with the user turns given as text, in text "
                             "only (its text task): what it knows without listening")
    parser.add_argument("--no-warmup", action="store_true", help="do not run an unscored warm-up turn first")


def main(args: argparse.Namespace) -> int:
    from voicelm.core.audio import AudioError
    from voicelm.core.checkpoint import CheckpointError
    from voicelm.core.whisper_weights import WhisperWeightsError

    out = args.out if args.out is not None else Path("eval") / f"{Path(args.pipeline).resolve().name}-{args.split}"
    try:
        report = evaluate_pipeline(
            args.pipeline, args.manifest, out, split=args.split, limit=args.limit, judge=args.judge,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
            round_trip=not args.no_round_trip, warmup=not args.no_warmup, decoder_noise_seed=args.decoder_noise_seed,
            lm_answers_from=args.lm_answers_from, lm_hearing=args.lm_hearing,
            text_answers=args.text_answers, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (EvaluationError, CheckpointError, AudioError, WhisperWeightsError) as exc:
        print(f"voicelm eval: {exc}", file=sys.stderr)
        return 1
    print(render_markdown(report))
    print(f"wrote {out / REPORT_JSON} and {out / REPORT_MD} in {report['wall_seconds']:.0f} s")
    return 0
