"""`solver=vocoder`: GAN training of the HiFT vocoder on a manifest's audio.

Data: random segments of `segment_frames` mel frames (x 256 samples) of every utterance,
resampled to 22,050 Hz, with their mel (`decoder.mel`) and an F0 target (`decoder.f0`).
One step alternates (HiFi-GAN recipe, LSGAN losses):
  1. discriminator: multi-period + multi-resolution STFT, real vs generated (detached);
  2. generator: adversarial + feature matching x 2 + mel L1 x 45;
  3. F0 predictor: squared error to the F0 target (in units of 100 Hz), with its own optimizer
     and learning rate (`f0_lr`): the source path is not differentiated (as in the official
     model), so nothing else shapes the predictor, and at the generator's learning rate it
     needs tens of thousands of steps to reach speech F0 values.
For the first `disc_start_step` steps the discriminator does not train and the generator
learns from the mel loss alone: a quick start on a CPU, where the adversarial terms only pay
off once the mel is roughly right.
Export writes the generator alone as a `vocoder` part checkpoint.

Fine-tuning on the flow's mels (`input_flow`): at inference the vocoder hears the flow model's
sampled mel, not the true one. With `input_flow` = a decoder part directory, the generator's
input (and the F0 predictor's) is the mel that flow samples from each row's stored `tokens`
(offline, its fixed noise), while every target (audio, mel, F0) stays the true recording: the
vocoder learns to turn the flow's smoothed mels into the real voice. The sampled mels are
computed once per row and kept under `flow_mel_cache_dir` (keyed by the flow's weights, config,
sampling settings and the tokens). `input_flow_sampling` samples them with other settings than
the decoder part's own (`{noise_scale: 0.5}`): the ones the shipped pipeline uses, so HiFT learns
the mels it will hear. `init_from` starts from a trained vocoder: a vocoder part directory
(generator only) or a training checkpoint directory (`runs/vocoder/checkpoints/last`: generator +
discriminator).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from decoder.discriminators import (
    DiscriminatorConfig,
    VocoderDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from decoder.f0 import estimate_f0
from decoder.hift import HiFTConfig, HiFTGenerator
from decoder.mel import MelConfig, mel_spectrogram
from voicelm.core.audio import DECODER_SAMPLE_RATE, load_audio
from voicelm.core.checkpoint import config_from_dict, load_state_strict
from voicelm.core.manifest import ManifestError, iter_split, read_manifest
from voicelm.core.solver import Solver

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LossWeights:
    mel: float = 45.0
    feature_matching: float = 2.0
    adversarial: float = 1.0


class VocoderGAN(nn.Module):
    """Generator + discriminator in one module, so one `model(batch, mode=...)` call computes a
    half-step's losses (and a DDP wrapper sees every parameter it has to synchronise)."""

    def __init__(self, generator: HiFTGenerator, discriminator: VocoderDiscriminator, weights: LossWeights):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.weights = weights
        self.mel_config = MelConfig()

    def reconstruction_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.generator.forward_full(_generator_input(batch))
        mel_fake = mel_spectrogram(out.wav, self.mel_config)  # (B, 80, F)
        mel_l1 = F.l1_loss(mel_fake, batch["mel"])
        f0_l1 = F.l1_loss(out.f0, batch["f0"])
        return {"wav": out.wav, "mel_l1": mel_l1, "f0_l1": f0_l1}

    def forward(self, batch: Mapping[str, torch.Tensor], mode: str = "generator", adversarial: bool = True) -> dict[str, torch.Tensor]:
        real = batch["wav"]
        if mode == "discriminator":
            with torch.no_grad():
                fake = self.generator(_generator_input(batch))
            real_logits, _ = self.discriminator(real)
            fake_logits, _ = self.discriminator(fake.detach())
            loss = discriminator_loss(real_logits, fake_logits)
            return {"loss": loss, "d_loss": loss.detach()}
        if mode == "f0":
            predicted = self.generator.f0_predictor(_generator_input(batch))
            # Squared error in units of 100 Hz: with L1 (sign-only gradients) and ~70% unvoiced
            # (0 Hz) frames, the predictor collapsed to 0 Hz everywhere in our piper runs.
            loss = F.mse_loss(predicted / 100.0, batch["f0"] / 100.0)
            return {"loss": loss, "f0_l1": F.l1_loss(predicted, batch["f0"]).detach()}
        if mode != "generator":
            raise ValueError(f"mode must be 'generator', 'discriminator' or 'f0', got {mode!r}")
        recon = self.reconstruction_losses(batch)
        w = self.weights
        loss = w.mel * recon["mel_l1"]
        metrics = {"mel_l1": recon["mel_l1"].detach()}
        if adversarial:
            _, real_features = self.discriminator(real)
            fake_logits, fake_features = self.discriminator(recon["wav"])
            adv = generator_adversarial_loss(fake_logits)
            fm = feature_matching_loss(real_features, fake_features)
            loss = loss + w.adversarial * adv + w.feature_matching * fm
            metrics.update(g_adv=adv.detach(), feature_matching=fm.detach())
        return {"loss": loss, "g_loss": loss.detach(), **metrics}


def _generator_input(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The mel the generator hears: the flow's (when fine-tuning on it), else the true mel."""
    return batch["input_mel"] if "input_mel" in batch else batch["mel"]


# --- data ----------------------------------------------------------------------------------

class FlowMels:
    """The mel a decoder's flow model samples from stored speech tokens (offline, its fixed noise),
    computed once per (flow weights and config, tokens), kept as .pt files under `cache_dir` when
    given. The config is part of the key: its sampling settings (steps, guidance, noise_scale)
    change the mel as much as the weights do. The decoder's HiFT is not: a pipeline whose vocoder
    was replaced (a fine-tuned HiFT shipped) is served the mels cached for its predecessor."""

    def __init__(self, decoder_dir: str | Path, cache_dir: str | Path | None, sampling: dict | None = None):
        from decoder.cli import resolve_checkpoint
        from decoder.flow import with_sampling
        from decoder.model import SpeechDecoder

        directory = resolve_checkpoint(str(decoder_dir))
        self.decoder = SpeechDecoder.from_pretrained(directory).float().eval()
        sampling = dict(sampling or {})
        try:
            self.decoder.flow.config = with_sampling(self.decoder.flow.config, sampling)
        except ValueError as exc:
            raise ValueError(f"solver.input_flow_sampling: {exc}") from None
        flow = self.decoder.flow
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(flow.config), sort_keys=True).encode())
        for name, tensor in sorted(flow.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
        self.flow_id = digest.hexdigest()[:16]
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.vocab_size = self.decoder.flow.config.vocab_size

    def get(self, tokens: list[int]) -> torch.Tensor:
        from decoder.solver import cached_tensor

        key = hashlib.sha1(f"{self.flow_id}|{','.join(map(str, tokens))}".encode()).hexdigest()
        with torch.no_grad():
            return cached_tensor(self.cache_dir, key, lambda: self.decoder.decode_mel(tokens).float().cpu())


def _fit_frames(mel: torch.Tensor, frames: int) -> torch.Tensor:
    """mel (80, F) cut or padded (last frame repeated) to `frames` frames."""
    if mel.shape[-1] >= frames:
        return mel[:, :frames]
    return torch.cat([mel, mel[:, -1:].expand(-1, frames - mel.shape[-1])], dim=-1)


class SegmentDataset(Dataset):
    """Utterances held in memory at 22,050 Hz with their F0; item i = one segment of utterance i.

    Training crops start at a random multiple of the hop, drawn from (seed, epoch, index) so a
    resumed run sees the same crops; validation crops are fixed (the start of each utterance).
    """

    def __init__(self, paths: list[Path], segment_frames: int, *, random_crop: bool, seed: int = 0,
                 input_mels: list[torch.Tensor] | None = None):
        if not paths:
            raise ValueError("no audio to train the vocoder on: the manifest (or split) is empty")
        if input_mels is not None and len(input_mels) != len(paths):
            raise ValueError(f"{len(input_mels)} input mels for {len(paths)} utterances")
        self.hop = MelConfig().hop_length
        self.segment_frames = segment_frames
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.wavs: list[torch.Tensor] = []
        self.f0s: list[torch.Tensor] = []
        for path in paths:
            wav = load_audio(path, DECODER_SAMPLE_RATE, max_seconds=None)
            frames = max(wav.shape[-1] // self.hop, 1)
            wav = F.pad(wav, (0, frames * self.hop - wav.shape[-1]))  # whole frames only
            self.wavs.append(wav)
            self.f0s.append(estimate_f0(wav))  # (frames,)
        # Generator inputs other than the true mel (the flow's), fitted to each utterance's frames.
        self.input_mels = None if input_mels is None else [
            _fit_frames(mel, wav.shape[-1] // self.hop) for mel, wav in zip(input_mels, self.wavs)]

    def __len__(self) -> int:
        return len(self.wavs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        wav, f0 = self.wavs[index], self.f0s[index]
        frames = wav.shape[-1] // self.hop
        spare = frames - self.segment_frames
        start = 0
        if spare > 0 and self.random_crop:
            start = int(np.random.default_rng([self.seed, self.epoch, index]).integers(0, spare + 1))
        segment = wav[start * self.hop:(start + self.segment_frames) * self.hop]
        segment_f0 = f0[start:start + self.segment_frames]
        if spare < 0:  # a short utterance: pad with silence (unvoiced)
            segment = F.pad(segment, (0, self.segment_frames * self.hop - segment.shape[-1]))
            segment_f0 = F.pad(segment_f0, (0, self.segment_frames - segment_f0.shape[-1]))
        item = {"wav": segment, "mel": mel_spectrogram(segment), "f0": segment_f0}
        if self.input_mels is not None:
            given = self.input_mels[index][:, start:start + self.segment_frames]
            # frames past the utterance (the silence padding) get the true mel of that silence
            item["input_mel"] = torch.cat([given, item["mel"][:, given.shape[-1]:]], dim=-1)
        return item


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with (seed, epoch) and tells the dataset the epoch (for its crops)."""

    def __init__(self, dataset: SegmentDataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.dataset)


# --- the solver ----------------------------------------------------------------------------

def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


class VocoderSolver(Solver):
    """GAN training of HiFT; see the module docstring. Settings: conf/solver/vocoder.yaml."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        solver = cfg.solver if hasattr(cfg, "solver") else cfg["solver"]
        self.settings = solver
        vocoder_preset = _container(_get(cfg, "vocoder"))
        if not vocoder_preset:
            raise ValueError("the config has no `vocoder` preset: add vocoder=tiny|demo|glm4voice")
        self.generator_config = config_from_dict(HiFTConfig, vocoder_preset, where="cfg.vocoder")
        self.discriminator_config = config_from_dict(
            DiscriminatorConfig, _container(_get(solver, "discriminator", {})), where="cfg.solver.discriminator"
        )
        self.weights = LossWeights(
            mel=float(_get(solver, "mel_loss_weight", 45.0)),
            feature_matching=float(_get(solver, "feature_matching_weight", 2.0)),
            adversarial=float(_get(solver, "adversarial_weight", 1.0)),
        )
        self.f0_lr = float(_get(solver, "f0_lr", 2e-3))
        self.segment_frames = int(_get(solver, "segment_frames", 32))
        if self.segment_frames < 4:
            raise ValueError(f"solver.segment_frames must be >= 4 mel frames, got {self.segment_frames}")
        self.batch_size = int(_get(solver, "batch_size", 8))
        self.disc_start_step = int(_get(solver, "disc_start_step", 0))
        self.seed = int(_get(cfg, "seed", 0))
        self.flow_mels: FlowMels | None = None

    # --- Solver interface ---------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if self.generator_config.sampling_rate != DECODER_SAMPLE_RATE or self.generator_config.hop_length != MelConfig().hop_length:
            raise ValueError(
                f"the vocoder must run at {DECODER_SAMPLE_RATE} Hz with hop {MelConfig().hop_length} to match "
                f"decoder.mel; the preset gives {self.generator_config.sampling_rate} Hz, hop {self.generator_config.hop_length}"
            )
        gan = VocoderGAN(HiFTGenerator(self.generator_config), VocoderDiscriminator(self.discriminator_config), self.weights)
        init_from = _get(self.settings, "init_from")
        if init_from is not None:
            _init_from(gan, Path(init_from))
        return gan

    def _utterances(self, manifest: Any, split: str | None,
                    limit: int | None = None) -> tuple[list[Path], list[torch.Tensor] | None]:
        """Audio paths of a manifest split (the first `limit`), with the flow's mels of their
        tokens when `input_flow` is set."""
        rows = list(iter_split(read_manifest(manifest), split))[:limit]
        if self.flow_mels is None:
            return [u.audio_path for u in rows], None
        paths, mels = [], []
        for u in rows:
            tokens = u.extra.get("tokens")
            if not tokens:
                raise ManifestError(f"{manifest}: row {u.audio} has no `tokens`, which solver.input_flow needs "
                                    f"(the flow samples its mel from them); add them with `voicelm tokenize --manifest`")
            if min(tokens) < 0 or max(tokens) >= self.flow_mels.vocab_size:
                raise ManifestError(f"{manifest}: row {u.audio} has token ids outside [0, {self.flow_mels.vocab_size}) "
                                    f"of the flow in solver.input_flow: tokenizer and decoder vocabularies must agree")
            paths.append(u.audio_path)
            mels.append(self.flow_mels.get(tokens))
        log.info("vocoder: the flow's mels of %d utterances of %s ready", len(rows), manifest)
        return paths, mels

    def build_dataloaders(self) -> tuple[Iterable, Iterable | None]:
        train_manifest = _get(self.settings, "train_manifest")
        if train_manifest is None:
            raise ValueError("solver.train_manifest is required: a JSONL manifest of the voice to train on "
                             "(make one with `voicelm data synth`)")
        # Rows without a `split` field count as train (voicelm.core.manifest.iter_split).
        input_flow = _get(self.settings, "input_flow")
        sampling = _container(_get(self.settings, "input_flow_sampling"))
        self.flow_mels = None if input_flow is None else FlowMels(input_flow, _get(self.settings, "flow_mel_cache_dir"),
                                                                  sampling)
        train_paths, train_mels = self._utterances(train_manifest, _get(self.settings, "train_split", "train"))
        train = SegmentDataset(train_paths, self.segment_frames, random_crop=True, seed=self.seed, input_mels=train_mels)
        workers = int(_get(self.settings, "num_workers", 0))
        train_loader = DataLoader(train, batch_size=self.batch_size, sampler=EpochShuffleSampler(train, self.seed),
                                  num_workers=workers, drop_last=len(train) >= self.batch_size)
        valid_manifest = _get(self.settings, "valid_manifest")
        if valid_manifest is None:
            valid_manifest, valid_split = train_manifest, _get(self.settings, "valid_split", "valid")
        else:
            valid_split = _get(self.settings, "valid_split")
        limit = int(_get(self.settings, "valid_limit", 16))
        valid_paths, valid_mels = self._utterances(valid_manifest, valid_split, limit)
        if not valid_paths:
            return train_loader, None
        valid_frames = int(_get(self.settings, "valid_segment_frames", 4 * self.segment_frames))
        valid = SegmentDataset(valid_paths, valid_frames, random_crop=False, input_mels=valid_mels)
        return train_loader, DataLoader(valid, batch_size=self.batch_size, shuffle=False)

    def optimizer_groups(self, model: nn.Module) -> dict[str, Any]:
        gan = _unwrap(model)
        f0_params = list(gan.generator.f0_predictor.parameters())
        f0_ids = {id(p) for p in f0_params}
        return {
            "generator": [p for p in gan.generator.parameters() if id(p) not in f0_ids],
            "f0_predictor": {"params": f0_params, "lr": self.f0_lr},
            "discriminator": list(gan.discriminator.parameters()),
        }

    def compute_loss(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        """Reconstruction metrics only (used for validation): mel L1 and F0 L1."""
        recon = _unwrap(model).reconstruction_losses(batch)
        return {"loss": recon["mel_l1"], "mel_l1": recon["mel_l1"], "f0_l1": recon["f0_l1"]}

    def evaluate(self, model: nn.Module, valid: Iterable | None) -> dict[str, float]:
        gan = _unwrap(model)
        was_training = gan.training
        gan.eval()  # deterministic excitation: comparable numbers from one evaluation to the next
        try:
            return super().evaluate(model, valid)
        finally:
            gan.train(was_training)

    def train_step(self, model: nn.Module, batch: Any, optimizers: Mapping[str, torch.optim.Optimizer],
                   backward_and_step) -> Mapping[str, torch.Tensor]:
        gan = _unwrap(model)
        wrapped = model is not gan  # under DDP every parameter must keep requires_grad
        # Steps taken so far, read from the generator optimizer's state so that a resumed run
        # (whose optimizer state the harness restores) knows where the GAN phase starts.
        adversarial = _steps_taken(optimizers["generator"]) >= self.disc_start_step
        metrics: dict[str, torch.Tensor] = {}
        if adversarial:
            _clear_grads(gan.discriminator)
            d_out = model(batch, mode="discriminator")
            backward_and_step(d_out["loss"], "discriminator")
            metrics["d_loss"] = d_out["d_loss"]
        _clear_grads(gan.generator)
        if not wrapped:
            gan.discriminator.requires_grad_(False)  # the generator step needs no D gradients
        try:
            g_out = model(batch, mode="generator", adversarial=adversarial)
            backward_and_step(g_out["loss"], "generator")
        finally:
            if not wrapped:
                gan.discriminator.requires_grad_(True)
        _clear_grads(gan.discriminator)
        # Its own forward and backward (cheap: a conv stack at the mel rate), so that each
        # forward has exactly one backward, as DDP requires.
        f0_out = model(batch, mode="f0")
        backward_and_step(f0_out["loss"], "f0_predictor")
        metrics["f0_l1"] = f0_out["f0_l1"]
        metrics.update({k: v for k, v in g_out.items() if k != "loss"})
        metrics["loss"] = g_out["loss"].detach()
        return metrics

    def export(self, model: nn.Module, out_dir: Path) -> None:
        _unwrap(model).generator.save_pretrained(out_dir)


def _init_from(gan: VocoderGAN, path: Path) -> None:
    """Start from a trained vocoder: a part directory (generator) or a training checkpoint directory
    (generator + discriminator). Its geometry must be the preset's."""
    from safetensors.torch import load_file

    if (path / "config.json").exists():
        trained = HiFTGenerator.from_pretrained(path)
        if dataclasses.asdict(trained.config) != dataclasses.asdict(gan.generator.config):
            raise ValueError(f"solver.init_from={path} is a vocoder of another geometry than the `vocoder` preset; "
                             f"choose the preset it was trained with")
        gan.generator.load_state_dict(trained.state_dict())
        log.info("vocoder: generator initialised from %s (the discriminator starts fresh)", path)
    elif (path / "model.safetensors").exists():
        load_state_strict(gan, load_file(str(path / "model.safetensors")), where=str(path))
        log.info("vocoder: generator and discriminator initialised from %s", path)
    else:
        raise FileNotFoundError(f"solver.init_from={path}: neither a vocoder part directory (config.json) nor a "
                                f"training checkpoint directory (model.safetensors), e.g. runs/vocoder/checkpoints/last")


def _unwrap(model: nn.Module) -> VocoderGAN:
    inner = getattr(model, "module", model)  # a DDP wrapper keeps the model in .module
    if not isinstance(inner, VocoderGAN):
        raise TypeError(f"VocoderSolver expects the model it built (VocoderGAN), got {type(inner).__name__}")
    return inner


def _steps_taken(optimizer: torch.optim.Optimizer) -> int:
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                return int(state["step"])
    return 0


def _clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None
