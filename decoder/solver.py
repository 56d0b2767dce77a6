"""`FlowSolver` (solver=decoder): train the flow model on one voice, export a decoder part.

Data: a JSONL manifest (voicelm.core.manifest) whose rows carry `tokens` (speech token ids of the
row's audio, from `voicelm tokenize --manifest`) and `audio` (the voice to learn, any rate: it is
resampled to 22,050 Hz). Mel targets come from decoder/mel.py and are computed once per row
(kept in memory, and on disk under `mel_cache_dir` when set, keyed by path, size and mtime).

A training example is a random crop of `segment_tokens` tokens that starts on an encoder block
boundary, with its mel frames [F(a), F(b)). The flow model draws, per batch, block-causal (the
streaming mask) or full encoder attention (`streaming_mask_prob`), the CosyVoice 2 recipe.

Export: a `decoder` part = this flow model + a vocoder: the HiFT from `vocoder_dir` (a vocoder
part directory, or a vocoder run directory with export/) when given, else the Griffin-Lim
fallback (labelled as such in config.json: vocoder_type "griffinlim").
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from decoder.flow import FlowConfig, FlowModel, frames_for_tokens
from decoder.mel import MelConfig, mel_spectrogram
from decoder.model import SpeechDecoder
from voicelm.core.audio import DECODER_SAMPLE_RATE, load_audio
from voicelm.core.checkpoint import CheckpointError, atomic_write_file, config_from_dict, load_state_strict
from voicelm.core.manifest import ManifestError, iter_split, read_manifest
from voicelm.core.solver import Solver

log = logging.getLogger(__name__)
MAX_FRAME_MISMATCH = 14  # frames (~2 tokens) of disagreement between tokens and audio length tolerated


def _cfg_get(node: Any, key: str, default: Any = None) -> Any:
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


class MelCache:
    """Mel of an audio file, computed once (memory, plus an optional directory of .pt files)."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory else None
        self.memory: dict[str, torch.Tensor] = {}

    def _key(self, path: Path) -> str:
        stat = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()

    def get(self, path: Path) -> torch.Tensor:
        key = self._key(path)
        if key not in self.memory:
            self.memory[key] = cached_tensor(self.directory, key,
                                             lambda: mel_spectrogram(load_audio(path, DECODER_SAMPLE_RATE)))
        return self.memory[key]


def cached_tensor(directory: Path | None, key: str, compute) -> torch.Tensor:
    """`directory/<key>.pt` if it exists, else `compute()`, saved there atomically (no directory:
    just computed)."""
    cached = directory / f"{key}.pt" if directory else None
    if cached is not None and cached.exists():
        return torch.load(cached, weights_only=True)
    value = compute()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(cached, lambda tmp: torch.save(value, tmp))
    return value


class FlowExamples:
    """Rows (tokens, mel) of one split; yields random block-aligned crops in batches."""

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, segment_tokens: int,
                 block_size: int, shuffle: bool, prefix_prob: float = 0.0):
        if not rows:
            raise ManifestError("no usable rows (each needs `tokens` and readable `audio`)")
        self.rows, self.batch_size, self.segment_tokens = rows, batch_size, segment_tokens
        self.block_size, self.shuffle, self.prefix_prob = block_size, shuffle, prefix_prob

    def __len__(self) -> int:
        return max(1, len(self.rows) // self.batch_size) if self.shuffle else -(-len(self.rows) // self.batch_size)

    def _crop(self, tokens: torch.Tensor, mel: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        # Prefixes are whole blocks, at most a crop long and shorter than the row.
        prefix_blocks = min(len(tokens) - 1, self.segment_tokens) // self.block_size
        if self.shuffle and prefix_blocks >= 1 and rng.random() < self.prefix_prob:
            # A short prefix: what the streaming decoder's first chunk decodes alone (a few blocks
            # from the utterance start, nothing after them), which normal crops never show.
            start, end = 0, rng.randint(1, prefix_blocks) * self.block_size
        elif len(tokens) <= self.segment_tokens or not self.shuffle:
            start, end = 0, min(len(tokens), self.segment_tokens)
        else:
            blocks = (len(tokens) - self.segment_tokens) // self.block_size
            start = rng.randint(0, blocks) * self.block_size
            end = start + self.segment_tokens
        # The crop must own the frames [F(start), F(end)) of the utterance; relative to the crop's
        # own start they are F(end) - F(start) frames, which may differ from F(end - start) by one.
        frames = mel[:, frames_for_tokens(start):frames_for_tokens(end)]
        needed = frames_for_tokens(end - start)
        if frames.shape[1] < needed:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, needed - frames.shape[1])], dim=1)
        return tokens[start:end], frames[:, :needed]

    def __iter__(self):
        rng = random.Random(random.getrandbits(32)) if self.shuffle else random.Random(0)
        order = list(range(len(self.rows)))
        if self.shuffle:
            rng.shuffle(order)
        for i in range(len(self)):
            picked = order[i * self.batch_size:(i + 1) * self.batch_size]
            crops = [self._crop(*self.rows[j], rng) for j in picked]
            lengths = torch.tensor([len(t) for t, _ in crops])
            tokens = torch.zeros(len(crops), int(lengths.max()), dtype=torch.long)
            mel = torch.full((len(crops), 80, frames_for_tokens(int(lengths.max()))), MelConfig().log_floor).log()
            for row, (t, m) in enumerate(crops):
                tokens[row, :len(t)] = t
                mel[row, :, :m.shape[1]] = m
            yield {"tokens": tokens, "lengths": lengths, "mel": mel}


class FlowSolver(Solver):
    """solver=decoder: see the module docstring and conf/solver/decoder.yaml."""

    def flow_config(self) -> FlowConfig:
        preset = self.cfg.get("decoder") if hasattr(self.cfg, "get") else None
        if preset is None:
            raise CheckpointError("the composed config has no `decoder` preset (add decoder=tiny|demo|glm4voice)")
        values = OmegaConf.to_container(preset, resolve=True) if OmegaConf.is_config(preset) else dict(preset)
        return config_from_dict(FlowConfig, values, where="decoder preset")

    def build_model(self) -> nn.Module:
        model = FlowModel(self.flow_config())
        init_from = _cfg_get(self.cfg.solver, "init_from")
        if init_from is not None:
            _init_flow_from(model, Path(init_from))
        return model

    def _load_rows(self, manifest: str | Path, split: str | None, limit: int | None = None) -> list:
        solver = self.cfg.solver
        config = self.flow_config()
        cache = getattr(self, "_mel_cache", None) or MelCache(_cfg_get(solver, "mel_cache_dir"))
        self._mel_cache = cache
        rows = []
        for utterance in iter_split(read_manifest(manifest), split):
            tokens = utterance.extra.get("tokens")
            if tokens is None:
                raise ManifestError(
                    f"{manifest}: row {utterance.audio} has no `tokens`; add them with `voicelm tokenize --manifest`")
            tokens = torch.tensor(tokens, dtype=torch.long)
            if len(tokens) == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
                raise ManifestError(f"{manifest}: row {utterance.audio} has token ids outside [0, {config.vocab_size})"
                                    f" or none at all: tokenizer and decoder vocabularies must agree")
            mel = cache.get(utterance.audio_path)
            mismatch = frames_for_tokens(len(tokens)) - mel.shape[1]
            if abs(mismatch) > MAX_FRAME_MISMATCH:
                log.warning("skipping %s: %d tokens need %d mel frames, the audio has %d (tokens from other audio?)",
                            utterance.audio, len(tokens), frames_for_tokens(len(tokens)), mel.shape[1])
                continue
            rows.append((tokens, mel))
            if limit is not None and len(rows) >= limit:
                break
        return rows

    def build_dataloaders(self):
        solver = self.cfg.solver
        config = self.flow_config()
        batch_size = int(_cfg_get(solver, "batch_size", 8))
        segment = int(_cfg_get(solver, "segment_tokens", 100))
        if segment % config.block_size:
            raise ValueError(f"solver.segment_tokens ({segment}) must be a multiple of the block size {config.block_size}")
        manifest = _cfg_get(solver, "train_manifest")
        if manifest is None or str(manifest) == "???":
            raise ManifestError("solver.train_manifest is required (a JSONL manifest with `tokens` and `audio`)")
        train_rows = self._load_rows(manifest, _cfg_get(solver, "train_split", "train"))
        valid_manifest = _cfg_get(solver, "valid_manifest")
        valid_split = _cfg_get(solver, "valid_split", None if valid_manifest else "valid")
        limit = int(_cfg_get(solver, "valid_limit", 16))
        valid_rows = self._load_rows(valid_manifest or manifest, valid_split, limit)
        prefix_prob = float(_cfg_get(solver, "prefix_prob", 0.0))
        if not 0.0 <= prefix_prob <= 1.0:
            raise ValueError(f"solver.prefix_prob ({prefix_prob}) must be a probability in [0, 1]")
        train = FlowExamples(train_rows, batch_size, segment, config.block_size, shuffle=True, prefix_prob=prefix_prob)
        valid = FlowExamples(valid_rows, batch_size, segment, config.block_size, shuffle=False) if valid_rows else None
        return train, valid

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        prior_weight = float(_cfg_get(self.cfg.solver, "prior_weight", 0.0))
        return model(batch["tokens"].to(device), batch["lengths"].to(device), batch["mel"].to(device),
                     prior_weight=prior_weight, parts=True)

    def evaluate(self, model: nn.Module, valid) -> dict[str, float]:
        """Flow-matching loss on validation crops, with fixed seeds and the streaming (block-causal) mask."""
        if valid is None:
            return {}
        state = torch.random.get_rng_state(), random.getstate()
        torch.manual_seed(0)
        random.seed(0)
        flow = prior = 0.0
        count = 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                for batch in valid:
                    parts = model(batch["tokens"].to(device), batch["lengths"].to(device), batch["mel"].to(device),
                                  block_causal=True, parts=True)
                    flow += float(parts["flow"])
                    prior += float(parts["prior"])
                    count += 1
        finally:
            torch.random.set_rng_state(state[0])
            random.setstate(state[1])
            model.train(was_training)
        # "loss" is the flow-matching loss alone, comparable between runs with and without the prior loss.
        return {"loss": flow / max(count, 1), "prior": prior / max(count, 1)}

    def _vocoder(self) -> nn.Module:
        directory = _cfg_get(self.cfg.solver, "vocoder_dir")
        if directory is None:
            from decoder.griffinlim import GriffinLimVocoder

            log.warning("no solver.vocoder_dir: the exported decoder uses the Griffin-Lim FALLBACK vocoder "
                        "(train one with solver=vocoder and pass solver.vocoder_dir=<its run or export dir>)")
            return GriffinLimVocoder()
        from decoder.hift import HiFTGenerator

        directory = Path(directory)
        if not (directory / "config.json").exists() and (directory / "export" / "config.json").exists():
            directory = directory / "export"  # a vocoder run directory
        return HiFTGenerator.from_pretrained(directory)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        flow = model.module if hasattr(model, "module") else model
        decoder = SpeechDecoder(flow.config, self._vocoder())
        decoder.flow.load_state_dict(flow.state_dict())
        dtype = {"float32": None, "float16": torch.float16}[str(_cfg_get(self.cfg.solver, "export_dtype", "float32"))]
        decoder.save_pretrained(out_dir, dtype=dtype)


def _init_flow_from(model: FlowModel, path: Path) -> None:
    """Start from trained flow weights (a fine-tune, e.g. to a new attention window): a decoder part
    directory (its `flow.*` tensors; the vocoder is not trained here) or a training checkpoint
    directory (`runs/decoder/checkpoints/last`). The tensors must fit the `decoder` preset's geometry;
    settings without weights (sampling, attention_window) come from the preset."""
    from safetensors.torch import load_file

    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"solver.init_from={path}: no model.safetensors there; give a decoder part directory "
                                f"or a training checkpoint directory, e.g. runs/decoder/checkpoints/last")
    state = load_file(str(weights))
    if (path / "config.json").exists():  # a decoder part: flow.* and vocoder.* tensors
        state = {k.removeprefix("flow."): v for k, v in state.items() if k.startswith("flow.")}
    load_state_strict(model, state, where=f"solver.init_from={path} (is the `decoder` preset its geometry?)")
    log.info("decoder: flow initialised from %s", path)
