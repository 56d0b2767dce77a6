"""Training stage `solver=lm`: the voice LM on interleaved dialogue sequences (+ ASR/TTS samples).

Settings (`conf/solver/lm.yaml`): data (`train_manifest`, `valid_manifest` or `valid_split`,
`text_manifest` for text-only dialogues),
`text_tokenizer` (a file; none = train a BPE of `lm.text_vocab_size` on the training text),
`init_from` (a voicelm checkpoint to fine-tune: its geometry, vocabulary and tokenizer win over
`cfg.lm`), `mix` (task weights, of voicelm.lm.data.TASKS), `respoken_max`, `max_length`,
`text_input_ratio`, `eval_generate`, `self_feed`, `self_feed_scope`, `self_feed_temperature`,
`self_feed_styled`, `lr_scale_layers` and `layers_lr_scale`.

Loss: next-token cross-entropy on the assistant answers and their stop token only; `text_loss`
and `speech_loss` split it by the target's kind (text + stop tokens vs speech tokens).
`self_feed` (scheduled sampling, default 0): in training, a share of the answers' input speech
tokens is replaced by the model's own top-1 speech code for that position from a teacher-forced,
no-grad pass over the same batch; the labels stay the recorded codes. The model then learns to
go on speaking the text after a code of its own went astray, as it must when it speaks freely.
`self_fed` logs the share of answer speech inputs that changed. `self_feed_scope: last` feeds only
the answer after a sequence's last `<|assistant|>` (the one being spoken; the history's answers
keep their recorded codes, which style requests copy); `all` feeds every answer.
`self_feed_styled: false` leaves unfed the sequences whose last answer is spoken in a style
("slow", ...; `LMSample.styled`): a styled answer re-times codes it reads from its input.
`self_feed_temperature` > 0 samples the fed code from the model's speech distribution at that
temperature instead of taking its top-1, so that inputs change also where the top-1 is right.
`lr_scale_layers` (decoder layer indices, e.g. the ones `voicelm lm grow` inserted) are trained at
`layers_lr_scale` x `solver.lr`, the rest of the model at `solver.lr`, on one schedule.
Validation adds greedy, layout-enforced generation on the first `eval_generate` validation
dialogues: `answer_text_accuracy` (exact text of the last answer) and `speech_token_accuracy`
(position-wise match of its speech codes).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from voicelm.core.checkpoint import config_from_dict
from voicelm.core.solver import Solver
from voicelm.lm.data import (IGNORE_INDEX, TASKS, DataOptions, Dialogue, MixtureBatches, SampleBuilder, fixed_batches,
                             read_dialogues)
from voicelm.lm.generate import SamplingOptions, VoiceLMGen
from voicelm.lm.model import VoiceLM, VoiceLMConfig, build_glm
from voicelm.lm.prompt import (ASSISTANT_TAG, SYSTEM_ASR, SYSTEM_SPEECH_INPUT, SYSTEM_TEXT_INPUT, SYSTEM_TEXT_ONLY,
                               SYSTEM_TTS,
                               AssistantTurn, PromptError, UserTurn, build_prompt)
from voicelm.lm.text_tokenizer import TextTokenizer, train_text_tokenizer

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _plain(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class LMSolver(Solver):
    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.settings = _plain(cfg.solver)
        required = [k for k in ("train_manifest",) if not self.settings.get(k)]
        if required:
            raise ValueError(f"solver=lm needs {required}: solver.train_manifest=<dialogues.jsonl> (the dialogue "
                             f"manifest of docs/lm.md)")
        self.self_feed = self._number("self_feed")
        if not 0.0 <= self.self_feed <= 1.0:
            raise ValueError(f"solver.self_feed={self.settings.get('self_feed')} must be a share in [0, 1] (the "
                             f"answer speech inputs replaced by the model's own codes; 0 = off)")
        self.self_feed_scope = str(self.settings.get("self_feed_scope", "all") or "all")
        if self.self_feed_scope not in ("all", "last"):
            raise ValueError(f"solver.self_feed_scope={self.self_feed_scope!r} must be 'all' (every answer's "
                             f"speech) or 'last' (only the answer after the last <|assistant|>)")
        self.self_feed_temperature = self._number("self_feed_temperature")
        if not self.self_feed_temperature >= 0.0:
            raise ValueError(f"solver.self_feed_temperature={self.settings.get('self_feed_temperature')} must be "
                             f"a number >= 0 (0 = the model's top-1 code; > 0 = sample at that temperature)")
        self.self_feed_styled = self.settings.get("self_feed_styled", True)
        if not isinstance(self.self_feed_styled, bool):
            raise ValueError(f"solver.self_feed_styled={self.self_feed_styled!r} must be true (feed every sequence) "
                             f"or false (leave sequences whose last answer is spoken in a style unfed)")
        layers = self.settings.get("lr_scale_layers") or []
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in layers):
            raise ValueError(f"solver.lr_scale_layers={layers!r} must be a list of decoder layer indices, e.g. "
                             f"solver.lr_scale_layers=[2,5,8,11] (what `voicelm lm grow` printed)")
        self.lr_scale_layers = sorted(set(layers))
        self.layers_lr_scale = self._number("layers_lr_scale") if "layers_lr_scale" in self.settings else 1.0
        if not self.layers_lr_scale > 0:
            raise ValueError(f"solver.layers_lr_scale={self.settings.get('layers_lr_scale')} must be a number > 0 "
                             f"(the lr of solver.lr_scale_layers relative to solver.lr)")
        self._prepared = False

    def optimizer_groups(self, model: nn.Module) -> dict[str, Any]:
        """One AdamW; with `lr_scale_layers`, those decoder layers form a torch parameter group at
        `layers_lr_scale` x the lr."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.lr_scale_layers:
            return {"main": [p for _, p in trainable]}
        depth = self.lm_config.num_layers
        outside = [i for i in self.lr_scale_layers if i >= depth]
        if outside:
            raise ValueError(f"solver.lr_scale_layers has {outside}, but the model has {depth} decoder layers "
                             f"(0..{depth - 1})")
        chosen = set(self.lr_scale_layers)

        def layer_of(name: str) -> int | None:
            found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            return int(found.group(1)) if found else None

        scaled = [p for n, p in trainable if layer_of(n) in chosen]
        rest = [p for n, p in trainable if layer_of(n) not in chosen]
        return {"main": {"params": [{"params": rest}, {"params": scaled, "lr_scale": self.layers_lr_scale}]}}

    def _number(self, key: str) -> float:
        """A numeric setting (unset or null = 0); NaN when it is not a number, so the caller's range
        check gives the clear error."""
        try:
            return float(self.settings.get(key, 0.0) or 0.0)
        except (TypeError, ValueError):
            return math.nan

    # --- shared set-up (tokenizer and geometry are needed by both model and data) --------------
    def _prepare(self) -> None:
        if self._prepared:
            return
        s = self.settings
        dialogues = read_dialogues(s["train_manifest"])
        valid_path = s.get("valid_manifest")
        valid_split = s.get("valid_split", "valid")
        if valid_path:
            self.train_dialogues = [d for d in dialogues if d.split != valid_split] if valid_path == s["train_manifest"] else dialogues
            self.valid_dialogues = read_dialogues(valid_path, split=valid_split if valid_path == s["train_manifest"] else None)
        else:
            self.train_dialogues = [d for d in dialogues if d.split != valid_split]
            self.valid_dialogues = [d for d in dialogues if d.split == valid_split]
        if not self.train_dialogues:
            raise ValueError(f"{s['train_manifest']} has no training dialogues (all are split={valid_split!r})")
        # Text-only dialogues for the "text" task (none: the text of the training dialogues).
        self.text_dialogues = None
        if s.get("text_manifest"):
            self.text_dialogues = [d for d in read_dialogues(s["text_manifest"]) if d.split != valid_split]
            if not self.text_dialogues:
                raise ValueError(f"solver.text_manifest {s['text_manifest']} has no training dialogues")

        self.init_lm: VoiceLM | None = None
        if s.get("init_from"):
            self.init_lm = VoiceLM.from_pretrained(s["init_from"], dtype=torch.float32)
            self.lm_config = self.init_lm.config
            self.tokenizer = self.init_lm.text_tokenizer
            log.info("fine-tuning from %s (its geometry and tokenizer replace cfg.lm)", s["init_from"])
        else:
            lm_values = _plain(self.cfg.lm)
            if s.get("text_tokenizer"):
                self.tokenizer = TextTokenizer.load(s["text_tokenizer"])
            else:
                texts = [t.text for d in self.train_dialogues + (self.text_dialogues or []) for t in d.turns if t.text]
                texts += [d.system for d in self.train_dialogues if d.system]
                texts += [SYSTEM_SPEECH_INPUT, SYSTEM_TEXT_INPUT, SYSTEM_TEXT_ONLY, SYSTEM_ASR, SYSTEM_TTS, ASSISTANT_TAG]
                self.tokenizer = train_text_tokenizer(texts, int(lm_values.get("text_vocab_size", 1024)))
            # The LM's text range is exactly the tokenizer's size (a BPE may stop short of the target).
            lm_values["text_vocab_size"] = self.tokenizer.vocab_size
            self.lm_config = config_from_dict(VoiceLMConfig, lm_values, where="cfg.lm")
        self.vocab = self.lm_config.vocab
        max_length = s.get("max_length") or self.lm_config.max_position_embeddings
        if max_length > self.lm_config.max_position_embeddings:
            raise ValueError(f"solver.max_length {max_length} exceeds the model's context "
                             f"{self.lm_config.max_position_embeddings} (lm.max_position_embeddings)")
        self.data_options = DataOptions(
            max_length=int(max_length), text_tokens=int(s.get("text_tokens", 13)),
            speech_tokens=int(s.get("speech_tokens", 26)), text_input_ratio=float(s.get("text_input_ratio", 0.0)),
            tasks=tuple(t for t in TASKS if float(_plain(s.get("mix")).get(t, 1.0 if t == "dialogue" else 0.0)) > 0),
            seed=int(s.get("seed", 0)),
            respoken_max=int(s["respoken_max"]) if s.get("respoken_max") else None)
        self._prepared = True

    # --- Solver interface -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        self._prepare()
        if self.init_lm is not None:
            model = self.init_lm.model
        else:
            model = build_glm(self.lm_config, seed=int(self.settings.get("seed", 0)))
        return model.train()

    def build_dataloaders(self) -> tuple[Iterable, Iterable | None]:
        self._prepare()
        s = self.settings
        builder = SampleBuilder(self.vocab, self.tokenizer, self.data_options)
        samples = builder.build(self.train_dialogues, self.text_dialogues)
        self.train_stats = builder.stats
        log.info("LM training samples: %s", builder.stats.report())
        batch_size = int(s.get("batch_size", 16))
        weights = _plain(s.get("mix")) or {"dialogue": 1.0}
        total = sum(len(v) for v in samples.values())
        per_epoch = int(s.get("batches_per_epoch") or max(1, math.ceil(total / batch_size)))
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        train = MixtureBatches(samples, weights, batch_size, self.vocab.pad_id, per_epoch,
                               seed=int(s.get("seed", 0)), rank=rank, group=int(s.get("length_group", 1) or 1),
                               batch_tokens=int(s["batch_tokens"]) if s.get("batch_tokens") else None)
        valid = None
        if self.valid_dialogues:
            valid_builder = SampleBuilder(self.vocab, self.tokenizer,
                                          DataOptions(**{**self.data_options.__dict__, "tasks": ("dialogue",),
                                                         "text_input_ratio": 0.0}))
            valid_samples = valid_builder.build(self.valid_dialogues)["dialogue"]
            if valid_samples:
                valid = fixed_batches(valid_samples, batch_size, self.vocab.pad_id)
        return train, valid

    def compute_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        fed = None
        if self.self_feed > 0 and model.training and torch.is_grad_enabled():
            styled = batch["styled"].to(device) if not self.self_feed_styled else None
            ids, fed = self.self_fed_inputs(model, ids, labels, attention_mask, styled)
        out = model(input_ids=ids, attention_mask=attention_mask)
        logits = out.logits[:, :-1].float()          # (B, T-1, V): position t predicts t+1
        target = labels[:, 1:]                       # (B, T-1)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="none").view_as(target)
        has_loss = target != IGNORE_INDEX
        is_speech = has_loss & (target >= self.vocab.speech_offset)
        is_text = has_loss & ~is_speech

        def mean_over(mask: torch.Tensor) -> torch.Tensor:
            return (per_token * mask).sum() / mask.sum().clamp(min=1)

        loss = mean_over(has_loss)
        with torch.no_grad():
            correct = (logits.argmax(-1) == target) & has_loss
            accuracy = correct.sum() / has_loss.sum().clamp(min=1)
        metrics = {"loss": loss, "text_loss": mean_over(is_text).detach(), "speech_loss": mean_over(is_speech).detach(),
                   "token_accuracy": accuracy}
        if fed is not None:
            metrics["self_fed"] = fed
        return metrics

    def self_fed_inputs(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                        attention_mask: torch.Tensor,
                        keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`ids` with a `self_feed` share of its answer speech tokens (speech positions with a
        label; with `self_feed_scope: last`, only those after the row's last `<|assistant|>`;
        none in the rows where `keep` (B,) is true)
        replaced by the model's own speech code there, teacher-forced: its top-1, or a sample at
        `self_feed_temperature`; and the share of those inputs that changed. Each position is
        picked independently; the labels are untouched, so the loss still asks for the recorded
        codes after the model's own."""
        lo = self.vocab.speech_offset
        hi = lo + self.vocab.speech_vocab_size
        answer_speech = (labels[:, 1:] >= lo) & (labels[:, 1:] < hi)   # position t+1 is predicted at t
        if self.self_feed_scope == "last":
            place = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            last = torch.where(ids == self.vocab.assistant_id, place, -1).max(dim=1, keepdim=True).values
            answer_speech &= place[:, 1:] > last
        if keep is not None:
            answer_speech &= ~keep.view(-1, 1)
        if not bool(answer_speech.any()):
            return ids, torch.zeros(())
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1, lo:hi].float()
            if self.self_feed_temperature > 0:
                probs = torch.softmax(logits / self.self_feed_temperature, dim=-1)
                own = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1]) + lo
            else:
                own = logits.argmax(-1) + lo
        pick = answer_speech & (torch.rand(own.shape, device=own.device) < self.self_feed)
        fed = ids.clone()
        fed[:, 1:] = torch.where(pick, own, ids[:, 1:])
        changed = (fed[:, 1:] != ids[:, 1:]).sum() / answer_speech.sum()
        return fed, changed.float()

    def evaluate(self, model: nn.Module, valid: Iterable | None) -> dict[str, float]:
        metrics = super().evaluate(model, valid)
        n = int(self.settings.get("eval_generate", 0) or 0)
        if n > 0 and self.valid_dialogues:
            metrics.update(self.generation_metrics(_unwrap(model), self.valid_dialogues[:n]))
        return metrics

    def generation_metrics(self, model: nn.Module, dialogues: list[Dialogue]) -> dict[str, float]:
        """Greedy enforced generation of each dialogue's last answer, given the gold history."""
        was_training = model.training
        model.eval()
        lm = VoiceLM(self.lm_config, model, self.tokenizer)
        text_hits, speech_hits, speech_total, count = 0, 0, 0, 0
        options = SamplingOptions(temperature=0.0, max_new_tokens=int(self.settings.get("eval_max_new_tokens", 512)),
                                  text_tokens=self.data_options.text_tokens, speech_tokens=self.data_options.speech_tokens)
        try:
            for d in dialogues:
                turns = d.turns if len(d.turns) % 2 == 0 else d.turns[:-1]
                if not turns or turns[-1].tokens is None:
                    continue
                history: list = []
                try:
                    for user, assistant in zip(turns[0:-2:2], turns[1:-2:2]):
                        history.append(UserTurn(speech=user.tokens) if user.tokens is not None else UserTurn(text=user.text))
                        history.append(AssistantTurn.from_parts(self.vocab, self.tokenizer.encode(assistant.text),
                                                                assistant.tokens, options.text_tokens, options.speech_tokens))
                    user, answer = turns[-2], turns[-1]
                    prompt = build_prompt(self.vocab, self.tokenizer, history,
                                          user_text=None if user.tokens is not None else user.text,
                                          user_speech=user.tokens, system=d.system if d.system is not None else "auto")
                except PromptError:
                    # An earlier answer whose speech is too short for its text cannot be laid out;
                    # the dataset builder skips (and counts) such dialogues, so evaluation does too.
                    continue
                if len(prompt) >= lm.max_context:
                    continue
                gen = VoiceLMGen(lm, prompt, options)
                gen.run()
                text_hits += int(gen.text().strip() == answer.text.strip())
                produced = gen.speech_indices
                speech_hits += sum(int(a == b) for a, b in zip(produced, answer.tokens))
                speech_total += len(answer.tokens)
                count += 1
        finally:
            model.train(was_training)
        if count == 0:
            return {}
        return {"answer_text_accuracy": text_hits / count, "speech_token_accuracy": speech_hits / max(speech_total, 1)}

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """FSDP shards each decoder layer on its own (one layer's full weights at a time)."""
        return list(model.model.layers)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        self._prepare()
        dtype = EXPORT_DTYPES[str(self.settings.get("export_dtype", "float32"))]
        VoiceLM(self.lm_config, _unwrap(model), self.tokenizer).save_pretrained(out_dir, dtype=dtype)
