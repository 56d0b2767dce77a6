"""`solver=tokenizer`: ASR-supervised training of the speech tokenizer.

As GLM-4-Voice trained its tokenizer: audio -> encoder blocks -> pool -> VQ -> remaining
blocks -> Whisper text decoder; loss = cross-entropy on the transcript (Whisper's text
tokenizer, offline) + the VQ commitment loss; the codebook follows the features by EMA.
Evaluation: greedy ASR word error rate through the quantized tokens on the validation split,
the losses, and codebook usage (perplexity, share of codes used, dead codes).
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from voicelm.core.audio import SAMPLE_RATE, AudioError, load_audio
from voicelm.core.checkpoint import config_from_dict
from voicelm.core.manifest import ManifestError, iter_split, read_manifest
from voicelm.core.solver import Solver

from tokenizer.config import TokenizerConfig
from tokenizer.model import SpeechTokenizer
from tokenizer.quantizer import codebook_stats

IGNORE = -100  # cross-entropy ignores prompt and padding positions


def whisper_text_tokenizer(config: TokenizerConfig):
    from whisper.tokenizer import get_tokenizer

    return get_tokenizer(config.multilingual, language=config.language, task="transcribe")


class TranscribedAudio(Dataset):
    """Manifest rows of one split -> (16 kHz samples, Whisper text token ids, text)."""

    def __init__(self, manifest: str | Path, split: str, text_tokenizer, *, max_seconds: float, max_text_tokens: int):
        rows = list(iter_split(read_manifest(manifest), split))
        if not rows:
            raise ManifestError(f"{manifest} has no rows with split={split!r}; add a 'split' field ('train' / 'valid')")
        too_long = [u.audio for u in rows if u.duration > max_seconds]
        if too_long:
            raise ManifestError(f"{len(too_long)} {split} clips are longer than {max_seconds} s (e.g. {too_long[0]}); "
                                f"cut them or raise solver.max_seconds (at most 30)")
        self.rows = rows
        self.text_tokenizer = text_tokenizer
        self.max_seconds = max_seconds
        self.max_text_tokens = max_text_tokens

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        audio = load_audio(row.audio_path, SAMPLE_RATE, max_seconds=self.max_seconds, allow_silent=True)
        text_ids = self.text_tokenizer.encode(" " + row.text.strip())
        if len(text_ids) > self.max_text_tokens:
            raise ManifestError(f"{row.audio}: transcript of {len(text_ids)} tokens exceeds solver.max_text_tokens "
                                f"{self.max_text_tokens}")
        return {"audio": audio, "text_ids": text_ids, "text": row.text}


class Collate:
    """Pad audio (B, N) + lengths; teacher-forcing input/target (B, L) with the Whisper prompt."""

    def __init__(self, prompt: list[int], eot: int):
        self.prompt, self.eot = prompt, eot

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        lengths = torch.tensor([it["audio"].numel() for it in items])
        audio = torch.zeros(len(items), int(lengths.max()))
        for i, it in enumerate(items):
            audio[i, : it["audio"].numel()] = it["audio"]
        sequences = [self.prompt + it["text_ids"] + [self.eot] for it in items]
        width = max(len(s) for s in sequences) - 1
        text_in = torch.full((len(items), width), self.eot, dtype=torch.long)
        target = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for i, seq in enumerate(sequences):
            text_in[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            # Predict the transcript and eot, not the fixed prompt.
            target[i, len(self.prompt) - 1: len(seq) - 1] = torch.tensor(seq[len(self.prompt):])
        return {"audio": audio, "lengths": lengths, "text_in": text_in, "target": target,
                "texts": [it["text"] for it in items]}


def init_from_whisper(model: SpeechTokenizer, whisper_model: nn.Module) -> None:
    """Copy a `whisper.model.Whisper`'s weights into the tokenizer (same parameter names):
    stem + first `pooling_position` blocks, the next `n_post_layer` blocks + ln_post into the
    ASR head, and the text decoder. Shapes must match (e.g. tokenizer=demo with Whisper base)."""
    config = model.config
    enc, dims = whisper_model.encoder, whisper_model.dims
    needed = config.pooling_position + (config.n_post_layer if model.asr_head is not None else 0)
    if (dims.n_mels, dims.n_audio_state, dims.n_audio_head) != (config.n_mels, config.n_audio_state, config.n_audio_head) \
            or dims.n_audio_layer < needed:
        raise ValueError(f"Whisper dims {dims} do not fit the tokenizer geometry (n_mels {config.n_mels}, "
                         f"state {config.n_audio_state}, heads {config.n_audio_head}, {needed} encoder blocks)")
    with torch.no_grad():
        model.encoder.conv1.load_state_dict(enc.conv1.state_dict())
        model.encoder.conv2.load_state_dict(enc.conv2.state_dict())
        model.encoder.positional_embedding.copy_(enc.positional_embedding[: config.n_audio_ctx])
        model.encoder.positional_embedding2.copy_(enc.positional_embedding[: config.n_token_ctx])
        for i, block in enumerate(model.encoder.blocks):
            block.load_state_dict(enc.blocks[i].state_dict())
        if model.asr_head is not None:
            for i, block in enumerate(model.asr_head.blocks):
                block.load_state_dict(enc.blocks[config.pooling_position + i].state_dict())
            model.asr_head.ln_post.load_state_dict(enc.ln_post.state_dict())
            dec_state = {k: v for k, v in whisper_model.decoder.state_dict().items() if k != "mask"}
            positional = dec_state["positional_embedding"][: config.n_text_ctx]
            dec_state["positional_embedding"] = positional
            model.asr_head.decoder.load_state_dict(dec_state)


class TokenizerSolver(Solver):
    @cached_property
    def model_config(self) -> TokenizerConfig:
        values = OmegaConf.to_container(self.cfg.tokenizer, resolve=True) if not isinstance(self.cfg.tokenizer, dict) \
            else dict(self.cfg.tokenizer)
        config = config_from_dict(TokenizerConfig, values, where="tokenizer preset")
        return dataclasses.replace(config, asr_head=True)  # training needs the ASR head

    @cached_property
    def text_tokenizer(self):
        return whisper_text_tokenizer(self.model_config)

    @property
    def prompt(self) -> list[int]:
        return list(self.text_tokenizer.sot_sequence_including_notimestamps)

    def build_model(self) -> nn.Module:
        model = SpeechTokenizer(self.model_config)
        source = self.cfg.solver.get("init_whisper")
        if source:
            from voicelm.core.whisper_weights import load_whisper

            init_from_whisper(model, load_whisper(str(source)))
        if self.cfg.solver.get("freeze_text_decoder", False):
            model.asr_head.decoder.requires_grad_(False)
        return model

    def _dataset(self, split: str) -> TranscribedAudio:
        s = self.cfg.solver
        return TranscribedAudio(s.manifest, split, self.text_tokenizer, max_seconds=float(s.max_seconds),
                                max_text_tokens=int(s.max_text_tokens))

    def build_dataloaders(self):
        s = self.cfg.solver
        collate = Collate(self.prompt, self.text_tokenizer.eot)
        train = self._dataset(s.train_split)
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = torch.utils.data.DistributedSampler(train, shuffle=True)
        train_loader = DataLoader(train, batch_size=int(s.batch_size), shuffle=sampler is None, sampler=sampler,
                                  collate_fn=collate, num_workers=int(s.num_workers), drop_last=len(train) > int(s.batch_size))
        try:
            valid = self._dataset(s.valid_split)
        except ManifestError:
            return train_loader, None
        valid.rows = valid.rows[: int(s.valid_max_utterances)]
        valid_loader = DataLoader(valid, batch_size=int(s.batch_size), shuffle=False, collate_fn=collate,
                                  num_workers=int(s.num_workers))
        return train_loader, valid_loader

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model(batch["audio"], batch["lengths"], batch["text_in"])
        asr_loss = F.cross_entropy(out.asr_logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE)
        stats = codebook_stats(out.code_counts.detach())
        return {
            "loss": asr_loss + out.commit_loss,
            "asr_loss": asr_loss.detach(),
            "commit_loss": out.commit_loss.detach(),
            "perplexity": torch.tensor(stats["perplexity"]),
            "share_used": torch.tensor(stats["share_used"]),
        }

    def evaluate(self, model: nn.Module, valid) -> dict[str, float]:
        if valid is None:
            return {}
        import jiwer

        model = getattr(model, "module", model)
        was_training = model.training
        model.eval()
        totals = {"asr_loss": 0.0, "commit_loss": 0.0}
        counts = torch.zeros(model.codebook_size, dtype=torch.long)
        references, hypotheses, batches = [], [], 0
        try:
            with torch.no_grad():
                for batch in valid:
                    metrics = self.compute_loss(model, batch)
                    totals["asr_loss"] += float(metrics["asr_loss"])
                    totals["commit_loss"] += float(metrics["commit_loss"])
                    tokens = model(batch["audio"], batch["lengths"]).tokens
                    counts += torch.bincount(tokens[tokens >= 0], minlength=model.codebook_size)
                    for ids, text in zip(model.greedy_transcribe(batch["audio"], batch["lengths"], self.prompt,
                                                                 self.text_tokenizer.eot, int(self.cfg.solver.max_text_tokens)),
                                         batch["texts"]):
                        hypotheses.append(normalize_text(self.text_tokenizer.decode(ids)))
                        references.append(normalize_text(text))
                    batches += 1
        finally:
            model.train(was_training)
        stats = codebook_stats(counts, model.quantizer.vq._codebook.cluster_size[0])
        result = {k: v / max(batches, 1) for k, v in totals.items()}
        result["wer"] = float(jiwer.wer(references, [h if h else "<empty>" for h in hypotheses]))
        result.update({f"codes_{k}": v for k, v in stats.items()})
        return result

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model = getattr(model, "module", model)
        dtype = {"float32": None, "float16": torch.float16}[str(self.cfg.solver.get("export_dtype", "float32"))]
        model.save_pretrained(out_dir, dtype=dtype, include_asr_head=bool(self.cfg.solver.get("export_asr_head", False)))


def normalize_text(text: str) -> str:
    """Lower case, letters/digits/apostrophes only, single spaces: the WER compares words."""
    kept = "".join(c if c.isalnum() or c in "' " else " " for c in text.lower())
    return " ".join(kept.split())
