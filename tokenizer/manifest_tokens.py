"""Add speech tokens to a manifest: every row gets a `tokens` field (list of ids at 12.5 Hz).

The decoder and LM training stages read speech tokens from that field.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from voicelm.core.audio import SAMPLE_RATE, AudioError, load_audio
from voicelm.core.manifest import read_manifest, write_manifest

from tokenizer.model import SpeechTokenizer


def tokenize_manifest(tokenizer: SpeechTokenizer, manifest_in: str | os.PathLike, manifest_out: str | os.PathLike,
                      *, batch_size: int = 16, progress: bool = False) -> Path:
    """Read `manifest_in`, tokenize every row's audio, write `manifest_out` (atomically) with a
    `tokens` field added; relative audio paths are rewritten relative to the output's folder."""
    manifest_in, manifest_out = Path(manifest_in), Path(manifest_out)
    rows = read_manifest(manifest_in)
    out_rows: list[dict | None] = [None] * len(rows)
    out_dir = manifest_out.resolve().parent
    # Batches of similar durations pad little; the tokenizer is causal, so a clip's tokens do not
    # depend on what it is batched with, and the output keeps the manifest's order.
    order = sorted(range(len(rows)), key=lambda i: rows[i].duration)
    for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="tokenize", unit="batch"):
        picked = order[start:start + batch_size]
        group = [rows[i] for i in picked]
        clips = []
        for row in group:
            try:
                clips.append(load_audio(row.audio_path, SAMPLE_RATE, max_seconds=None, allow_silent=True))
            except AudioError as exc:
                raise AudioError(f"{manifest_in}: row for {row.audio!r}: {exc}") from None
        tokens, lengths = tokenizer.encode_batch(clips, SAMPLE_RATE, batch_size=batch_size, max_seconds=None,
                                                 allow_silent=True)
        for index, row, ids, n in zip(picked, group, tokens, lengths.tolist()):
            data = row.to_json()
            data["audio"] = os.path.relpath(row.audio_path.resolve(), out_dir) if not Path(row.audio).is_absolute() \
                else row.audio
            data["tokens"] = ids[:n].tolist()
            out_rows[index] = data
    return write_manifest(manifest_out, out_rows)
