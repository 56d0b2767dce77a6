"""The JSONL manifest every training stage reads.

One utterance per line:
    {"audio": "wavs/000001.wav", "text": "seven plus five", "speaker": "espeak:en-us+m3",
     "duration": 1.82, "sample_rate": 16000, ...extra fields...}
`audio` is relative to the manifest's directory (or absolute). Extra fields (e.g. `split`,
`engine`, `dialogue_id`, `turn`, `role`) are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from voicelm.core.checkpoint import atomic_write_file

REQUIRED_FIELDS = ("audio", "text", "speaker", "duration")


class ManifestError(ValueError):
    pass


@dataclasses.dataclass
class Utterance:
    audio: str
    text: str
    speaker: str
    duration: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    root: Path | None = None  # directory that relative audio paths are relative to

    @property
    def audio_path(self) -> Path:
        path = Path(self.audio)
        return path if path.is_absolute() or self.root is None else self.root / path

    def to_json(self) -> dict[str, Any]:
        return {"audio": self.audio, "text": self.text, "speaker": self.speaker,
                "duration": round(float(self.duration), 4), **self.extra}


def iter_jsonl(path: str | os.PathLike, *, error: type[Exception] = ManifestError,
               hint: str = "make one with `voicelm data synth`") -> Iterator[tuple[str, Any]]:
    """(where, row) for every non-blank line of a JSONL file; `where` is "path:line" for messages."""
    path = Path(path)
    if not path.exists():
        raise error(f"manifest not found: {path} ({hint})")
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON ({exc})") from None


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    path = Path(path)
    items = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: each line must be a JSON object")
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ManifestError(f"{where}: missing fields {missing}; each line needs {list(REQUIRED_FIELDS)}")
        extra = {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}
        items.append(Utterance(row["audio"], row["text"], row["speaker"], float(row["duration"]), extra, path.parent))
    return items


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance | dict]) -> Path:
    """Write a manifest atomically; audio paths are stored as given."""
    lines = []
    for u in utterances:
        row = u.to_json() if isinstance(u, Utterance) else dict(u)
        lines.append(json.dumps(row, ensure_ascii=False))
    return atomic_write_file(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + ("\n" if lines else "")))


def iter_split(utterances: Iterable[Utterance], split: str | None) -> Iterator[Utterance]:
    """Utterances of one split (`extra["split"]`); all of them when `split` is None."""
    for u in utterances:
        if split is None or u.extra.get("split", "train") == split:
            yield u
