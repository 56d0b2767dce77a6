"""`voicelm` command line: one table of subcommands, each implemented in its own module.

A command module exports `add_arguments(parser)` and `main(args) -> int | None`; it is imported
only when its command runs, so `voicelm --help` stays fast and one broken part cannot stop the
others from working.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("selftest",): ("voicelm.selftest", "check the install on real audio: synthesize speech, transcribe it with Whisper"),
    ("convert", "whisper-ct2"): ("voicelm.core.whisper_ct2", "convert a CTranslate2 Whisper model into an openai-whisper checkpoint"),
    ("convert", "glm4voice-tokenizer"): ("tokenizer.convert", "convert the official glm-4-voice-tokenizer into a voicelm tokenizer"),
    ("convert", "glm4voice-decoder"): ("decoder.convert", "convert the official glm-4-voice-decoder (flow.pt, hift.pt) into a voicelm decoder"),
    ("convert", "glm4voice-lm"): ("voicelm.lm.convert", "convert the official glm-4-voice-9b (ChatGLM shards) into a voicelm LM"),
    ("lm", "average"): ("voicelm.lm.average", "average LM checkpoints of one geometry and tokenizer (a model soup)"),
    ("lm", "grow"): ("voicelm.lm.grow", "a deeper LM with the same function: inserted layers start silent"),
    ("decoder", "average"): ("decoder.average", "average the flows of decoder checkpoints of one geometry (a model soup)"),
    ("data", "synth"): ("voicelm.data.synth", "render text to speech (espeak-ng, piper) into wavs + a JSONL manifest"),
    ("data", "dialogues"): ("voicelm.data.dialogues", "generate the spoken dialogue corpus of the demo recipe"),
    ("train",): ("voicelm.train.cli", "run a training stage (hydra overrides: solver=tokenizer ...)"),
    ("tokenize",): ("tokenizer.cli", "audio file -> speech token ids (JSON)"),
    ("synthesize",): ("decoder.cli", "speech token ids -> waveform"),
    ("chat",): ("voicelm.chat", "one turn with a pipeline: audio or text in, text and speech out"),
    ("serve",): ("voicelm.server", "websocket server for streaming conversations"),
    ("demo",): ("voicelm.demo", "Gradio voice demo"),
    ("recipe",): ("voicelm.recipe", "train a whole pipeline end to end (voicelm recipe demo)"),
    ("eval",): ("voicelm.evaluate", "score a pipeline on a dialogue manifest"),
}


def _groups() -> dict[str, list[tuple[str, ...]]]:
    groups: dict[str, list[tuple[str, ...]]] = {}
    for words in COMMANDS:
        groups.setdefault(words[0], []).append(words)
    return groups


def _usage() -> str:
    lines = ["usage: voicelm COMMAND [...]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<28} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    groups = _groups()
    if argv[0] not in groups:
        print(f"voicelm: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    words: tuple[str, ...] = (argv[0],)
    if words not in COMMANDS:
        if len(argv) < 2 or (argv[0], argv[1]) not in COMMANDS:
            options = ", ".join(w[1] for w in groups[argv[0]])
            print(f"voicelm {argv[0]}: choose one of: {options}", file=sys.stderr)
            return 2
        words = (argv[0], argv[1])
    module_name, help_text = COMMANDS[words]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog="voicelm " + " ".join(words), description=help_text)
    module.add_arguments(parser)
    return int(module.main(parse_arguments(parser, argv[len(words):])) or 0)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options may stand anywhere among the positionals (`voicelm recipe demo --resume KEY=VALUE`
    as well as `voicelm recipe --resume demo KEY=VALUE`); plain argparse stops a `nargs='*'`
    positional at the first option and refuses what follows it. A parser whose positionals take
    the rest of the line verbatim (`argparse.REMAINDER`, as `voicelm train` for hydra) cannot be
    parsed intermixed, and argparse says so with a TypeError before reading anything."""
    try:
        return parser.parse_intermixed_args(argv)
    except TypeError:
        return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
