"""`voicelm recipe demo|smoke`: train a whole pipeline end to end, stage by stage, resumably.

Stages, in order (each reads what the earlier ones wrote under `out_dir`):

    data       voicelm.data.dialogues.build_corpus -> data/{dialogues,user,assistant,speech}.jsonl + wavs/
    tokenizer  solver=tokenizer on every utterance (user + assistant)     -> runs/tokenizer/export
    tokenize   tokens for both manifests and every dialogue turn           -> tokens/*.jsonl
    voiced     `voiced.dialogues` more training dialogues for the LM, rendered (new user voices, each
               distinct answer once) and tokenized                         -> data/voiced/, tokens/voiced/,
               `voiced.repeat_drills` repeat-after-me drills of random word pairs -> data/drills/,
               tokens/drills/, and `voiced.number_drills` of random numbers -> data/number_drills/,
               tokens/number_drills/; tokens/lm_dialogues.jsonl (spoken corpus + all; skipped when all are 0)
    decoder    solver=decoder (flow) on the assistant voice                -> runs/decoder/export
               (with `voiced.decoder: true`, on the voiced stage's answers too: tokens/decoder_answers.jsonl)
    vocoder    solver=vocoder (HiFT) on the assistant voice                -> runs/vocoder/export
    vocoder_ft solver=vocoder again, from that vocoder, on the mels the trained flow samples from the
               assistant turns' tokens (targets: the true audio)          -> runs/vocoder_ft/export
    lm         solver=lm on the tokenized dialogues                        -> runs/lm/export
    export     the pipeline directory (tokenizer without ASR head, LM, flow + HiFT; cfg.pipeline.dtype,
               the HiFT in cfg.pipeline.vocoder_dtype when set)
    eval       voicelm.evaluate.evaluate_pipeline on the held-out dialogues -> eval/report.{json,md}

`take.STAGE=PIPELINE` (a pipeline directory, or DEFAULT for the shipped one) makes a training stage
take its part from that pipeline instead of training it (the tokenizer, the flow, the HiFT for
vocoder and vocoder_ft, the LM): on a fresh machine, continue the shipped model with data,
tokenize and, say, an lm stage fine-tuned from it (`lm:solver.init_from=models/demo/voicelm`).

A finished stage writes `stages/<stage>.done.json` (atomically, last) listing its outputs; a
rerun skips it. A training stage killed midway resumes from its run's last checkpoint (the
harness's `resume=true`). `recipe.log` and `status.json` (per-stage wall time) live in `out_dir`.

The preset is `conf/recipe/<name>.yaml`; `KEY=VALUE` arguments override it (OmegaConf dot
syntax, e.g. `out_dir=/tmp/r data.train=100`), and `STAGE:OVERRIDE` arguments append a hydra
override to one training stage (e.g. `lm:solver.steps=50`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from voicelm.core.checkpoint import atomic_write_dir, atomic_write_file, same_safetensors
from voicelm.core.paths import CONF_DIR

log = logging.getLogger("voicelm.recipe")

STAGES = ("data", "tokenizer", "tokenize", "voiced", "decoder", "vocoder", "vocoder_ft", "lm", "export", "eval")
TRAIN_STAGES = ("tokenizer", "decoder", "vocoder", "vocoder_ft", "lm")
SOLVER_OF = {"vocoder_ft": "vocoder"}  # training stages whose solver has another name
OPTIONAL_STAGES = ("vocoder_ft",)  # `train.<stage>: null` turns them off
RECIPE_CONF_DIR = CONF_DIR / "recipe"
EXPORT_DTYPES = ("float32", "float16")
OPEN_MAPPINGS = ("pipeline.decoder_inference", "take")  # overrides may add keys to these (checked in _validate)
LM_DIALOGUES_NAME = "lm_dialogues.jsonl"  # tokens/: what the lm stage trains on when the voiced stage adds any
# the voiced stage's drill corpora: data/NAME and tokens/NAME <- (the voiced.KEY count, their `plan_drills` kind)
DRILL_CORPORA = {"drills": ("repeat_drills", "words"), "number_drills": ("number_drills", "numbers")}
TAKE_PARTS = {"tokenizer": "tokenizer", "decoder": "decoder", "vocoder": "decoder", "vocoder_ft": "decoder",
              "lm": "voicelm"}  # `take.STAGE`: the pipeline part directory that stage takes its weights from


class RecipeError(RuntimeError):
    """A recipe that cannot run; the message says what is wrong and what to do."""


# --- configuration --------------------------------------------------------------------------

def known_presets() -> list[str]:
    return sorted(p.stem for p in RECIPE_CONF_DIR.glob("*.yaml"))


def load_recipe_config(preset: str, overrides: list[str] = ()):
    """The preset's YAML with `KEY=VALUE` and `STAGE:OVERRIDE` arguments applied, resolved."""
    from omegaconf import OmegaConf

    path = RECIPE_CONF_DIR / f"{preset}.yaml"
    if not path.exists():
        raise RecipeError(f"no recipe preset {preset!r} (no {path}); known presets: {known_presets()}")
    cfg = OmegaConf.load(path)
    dotlist, stage_extra = [], {}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in TRAIN_STAGES or "=" not in rest:
                raise RecipeError(f"cannot read override {item!r}: STAGE:KEY=VALUE needs STAGE in "
                                  f"{list(TRAIN_STAGES)} (e.g. lm:solver.steps=50)")
            stage_extra.setdefault(head, []).append(rest)
        elif "=" in item:
            dotlist.append(item)
        else:
            raise RecipeError(f"cannot read override {item!r}: use KEY=VALUE for the recipe (e.g. data.train=100) "
                              f"or STAGE:KEY=VALUE for one training stage (e.g. lm:solver.steps=50)")
    for item in dotlist:
        key = item.split("=", 1)[0]
        # keys of an open mapping (pipeline.decoder_inference) are checked by name in _validate
        open_mapping = key.rsplit(".", 1)[0] in OPEN_MAPPINGS
        if not open_mapping and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise RecipeError(f"override {item!r}: the recipe has no key {key!r} (see {path})")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    for stage, extra in stage_extra.items():
        if cfg.train.get(stage) is None:
            raise RecipeError(f"{stage}:... overrides given, but train.{stage} is null in {path} (the stage is off); "
                              f"give the stage a list of overrides there to turn it on")
        cfg.train[stage] = list(cfg.train[stage]) + extra
    container = OmegaConf.to_container(cfg, resolve=True)
    _validate(container, path)
    return container


def _validate(cfg: dict, path: Path) -> None:
    problems = []
    for key in ("name", "out_dir", "seed", "data", "train", "pipeline", "eval", "tokenize"):
        if key not in cfg or cfg[key] is None:
            problems.append(f"missing key {key!r}")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    data = cfg["data"]
    if not all(isinstance(data.get(k), int) and data[k] >= 0 for k in ("train", "heldout")) or \
            data["train"] + data["heldout"] == 0:
        problems.append(f"data.train and data.heldout must be integers >= 0, not both 0 (got {data})")
    voiced = cfg.get("voiced") or {}
    if not isinstance(voiced, dict) or not isinstance(voiced.get("dialogues", 0), int) or voiced.get("dialogues", 0) < 0:
        problems.append(f"voiced.dialogues must be an integer >= 0 (got {voiced!r})")
    else:
        for key in ("min_answer_words", "repeat_drills", "number_drills"):
            if not isinstance(voiced.get(key, 0), int) or voiced.get(key, 0) < 0:
                problems.append(f"voiced.{key} must be an integer >= 0 (got {voiced.get(key)!r})")
        if not isinstance(voiced.get("decoder", False), bool):
            problems.append(f"voiced.decoder must be true or false (got {voiced.get('decoder')!r})")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        problems.append(f"threads must be null or an integer >= 1 (got {threads!r})")
    if not isinstance(data.get("jobs", 1), int) or data.get("jobs", 1) < 1:
        problems.append(f"data.jobs must be an integer >= 1 (got {data.get('jobs')!r})")
    from voicelm.data.dialogue_text import ANSWER_ORDERS

    if data.get("answer_order", "asked") not in ANSWER_ORDERS:
        problems.append(f"data.answer_order must be one of {list(ANSWER_ORDERS)} (got {data.get('answer_order')!r})")
    for stage in TRAIN_STAGES:
        overrides = cfg["train"].get(stage)
        if stage in OPTIONAL_STAGES and overrides is None:
            continue
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            problems.append(f"train.{stage} must be a list of hydra overrides KEY=VALUE (got {overrides!r})")
    take = cfg.get("take") or {}
    if not isinstance(take, dict):
        problems.append(f"take must be a mapping of training stage -> pipeline directory (got {take!r})")
        take = {}
    for stage, where in take.items():
        if where is None:
            continue
        if stage not in TRAIN_STAGES:
            problems.append(f"take.{stage}: not a training stage; take one of {list(TRAIN_STAGES)}")
            continue
        pipeline = resolve_pipeline_path(str(where))
        if not (pipeline / TAKE_PARTS[stage] / "config.json").is_file():
            problems.append(f"take.{stage}={where}: no {TAKE_PARTS[stage]}/ part (config.json) in {pipeline}; "
                            f"give a pipeline directory such as models/demo, or DEFAULT")
    if cfg["pipeline"].get("dtype") not in EXPORT_DTYPES:
        problems.append(f"pipeline.dtype must be one of {EXPORT_DTYPES} (got {cfg['pipeline'].get('dtype')!r})")
    if cfg["pipeline"].get("vocoder_dtype") not in (None, *EXPORT_DTYPES):
        problems.append(f"pipeline.vocoder_dtype must be one of {EXPORT_DTYPES}, or null for pipeline.dtype "
                        f"(got {cfg['pipeline'].get('vocoder_dtype')!r})")
    if not cfg["pipeline"].get("dir"):
        problems.append("pipeline.dir is required (where the pipeline directory goes)")
    # sampling settings the export writes into the shipped flow (chosen after training, e.g. with
    # bench/decoder_wer.py), and vocoder_ft samples its input mels with
    from decoder.flow import FlowConfig, with_sampling

    try:
        with_sampling(FlowConfig(), cfg["pipeline"].get("decoder_inference") or {})
    except ValueError as exc:
        problems.append(f"pipeline.decoder_inference: {exc}")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))


def select_stages(stages: str | None, from_stage: str | None) -> list[str]:
    if stages and from_stage:
        raise RecipeError("give --stages or --from, not both")
    if from_stage:
        if from_stage not in STAGES:
            raise RecipeError(f"--from {from_stage!r}: unknown stage; stages are {list(STAGES)}")
        return list(STAGES[STAGES.index(from_stage):])
    if stages:
        chosen = [s.strip() for s in stages.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in STAGES]
        if unknown or not chosen:
            raise RecipeError(f"--stages {stages!r}: unknown stage(s) {unknown}; stages are {list(STAGES)}")
        return [s for s in STAGES if s in chosen]
    return list(STAGES)


# --- the run --------------------------------------------------------------------------------

class Recipe:
    """Runs the stages of one recipe config in `cfg["out_dir"]`."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.out = Path(cfg["out_dir"]).resolve()
        self.data_dir = self.out / "data"
        self.tokens_dir = self.out / "tokens"
        self.runs_dir = self.out / "runs"
        self.stage_dir = self.out / "stages"
        self.pipeline_dir = pipeline_dir(cfg)
        self.eval_dir = self.out / "eval"
        self._touched: set[str] = set()  # stages this run has started: the entries it owns in status.json

    # --- bookkeeping ---
    def marker(self, stage: str) -> Path:
        return self.stage_dir / f"{stage}.done.json"

    def stage_settings(self, stage: str) -> dict:
        """What a stage's result depends on in the config (a change is reported when it is skipped)."""
        c = self.cfg
        voiced = dict(c.get("voiced") or {})
        decoder_voiced = bool(voiced.pop("decoder", False))  # the decoder stage's setting, not the voiced stage's
        section = {"data": c["data"], "tokenize": c["tokenize"], "voiced": voiced,
                   "export": c["pipeline"], "eval": c["eval"],
                   **{name: c["train"].get(name) for name in TRAIN_STAGES}}[stage]
        if stage == "decoder" and decoder_voiced:
            section = {"train": section, "voiced_answers": True}
        taken = self.taken(stage)
        if taken is not None:  # its weights come from a pipeline, not from training
            return {"seed": c["seed"], "settings": {"take": str(taken)}}
        if stage == "vocoder_ft" and c["pipeline"].get("decoder_inference"):
            # its input mels are sampled the way the shipped flow samples
            section = {"train": section, "input_flow_sampling": c["pipeline"]["decoder_inference"]}
        return {"seed": c["seed"], "settings": section}

    def settings_hash(self, stage: str) -> str:
        blob = json.dumps(self.stage_settings(stage), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def is_done(self, stage: str) -> dict | None:
        path = self.marker(stage)
        if not path.exists():
            return None
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is damaged; running stage %s again", path, stage)
            return None
        missing = [p for p in info.get("outputs", []) if not Path(p).exists()]
        if missing:
            log.warning("stage %s was done but its outputs %s are gone; running it again", stage, missing)
            return None
        return info

    def read_status(self) -> dict:
        path = self.out / "status.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is damaged; starting a new one", path)
        return {"recipe": self.cfg["name"], "out_dir": str(self.out), "stages": {}}

    def write_status(self, status: dict) -> None:
        """Write this run's stage entries into status.json, keeping the entries another recipe process
        (e.g. `--stages lm` next to `--stages decoder,vocoder`) wrote meanwhile; a lock file serialises writers."""
        import fcntl

        with open(self.out / ".status.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = self.read_status()
            for stage in self._touched:
                merged["stages"][stage] = status["stages"][stage]
            for key, value in status.items():
                if key != "stages":
                    merged[key] = value
            merged["total_wall_seconds"] = round(sum(e.get("wall_seconds", 0.0) for e in merged["stages"].values()), 1)
            text = json.dumps(merged, indent=2) + "\n"
            atomic_write_file(self.out / "status.json", lambda tmp: Path(tmp).write_text(text))
        status["stages"].update(merged["stages"])
        status["total_wall_seconds"] = merged["total_wall_seconds"]

    # --- driver ---
    def run(self, stages: list[str], *, force: bool = False) -> dict:
        """Run `stages` in order. Without `force`, done stages are skipped and unfinished training
        runs resume; with `force` every chosen stage runs again from scratch."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out / "recipe.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(handler)
        # recipe.log records every stage's progress even when the caller's logging is quieter.
        loggers = [logging.getLogger(name) for name in ("voicelm", "tokenizer", "decoder")]
        saved = [lg.level for lg in loggers]
        for lg in loggers:
            if lg.getEffectiveLevel() > logging.INFO:
                lg.setLevel(logging.INFO)
        try:
            return self._run(stages, force)
        finally:
            for lg, level in zip(loggers, saved):
                lg.setLevel(level)
            root.removeHandler(handler)
            handler.close()

    def _run(self, stages: list[str], force: bool) -> dict:
        if self.cfg.get("threads"):
            import torch

            torch.set_num_threads(int(self.cfg["threads"]))
        atomic_write_file(self.out / "recipe_config.json",
                          lambda tmp: Path(tmp).write_text(json.dumps(self.cfg, indent=2) + "\n"))
        status = self.read_status()
        log.info("recipe %s in %s: stages %s", self.cfg["name"], self.out, ", ".join(stages))
        self._touched = set()
        for stage in stages:
            self._touched.add(stage)
            entry = status["stages"].setdefault(stage, {"state": "pending", "wall_seconds": 0.0, "runs": 0})
            done = None if force else self.is_done(stage)
            if done is not None and done.get("settings") != self.settings_hash(stage):
                if stage in TRAIN_STAGES:
                    # e.g. STAGE:solver.steps raised: the run's last checkpoint continues on the new config
                    log.info("stage %s: done with other settings than the current config; continuing its training "
                             "run from the last checkpoint (retrain from scratch with --from %s)", stage, stage)
                    done = None
                else:
                    log.warning("stage %s: done with other settings than the current config; skipped anyway "
                                "(rerun it with --from %s)", stage, stage)
            if done is not None:
                log.info("stage %s: done already (%s), skipped", stage, self.marker(stage))
                entry["state"] = "done"
                entry["skipped_last_run"] = True
                self.write_status(status)
                continue
            self.marker(stage).unlink(missing_ok=True)
            entry.update(state="running", skipped_last_run=False, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.write_status(status)
            log.info("stage %s: starting", stage)
            start = time.perf_counter()
            try:
                self.fresh = force
                taken = self.taken(stage)  # only training stages can be taken (_validate)
                outputs = [self._take(stage, taken)] if taken is not None else getattr(self, f"stage_{stage}")()
            except BaseException as exc:
                elapsed = time.perf_counter() - start
                entry["wall_seconds"] = round(entry["wall_seconds"] + elapsed, 1)
                entry["runs"] += 1
                entry["state"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                entry["error"] = f"{type(exc).__name__}: {exc}"
                self.write_status(status)
                log.error("stage %s %s after %.1f s: %s", stage, entry["state"], elapsed, entry["error"],
                          exc_info=not isinstance(exc, (RecipeError, KeyboardInterrupt)))
                raise
            elapsed = time.perf_counter() - start
            entry["wall_seconds"] = round(entry["wall_seconds"] + elapsed, 1)
            entry["last_run_seconds"] = round(elapsed, 1)
            entry["runs"] += 1
            entry.pop("error", None)
            if outputs is None:  # the stage could not run and said why (eval without its module)
                entry["state"] = "skipped"
                self.write_status(status)
                continue
            info = {"stage": stage, "outputs": [str(p) for p in outputs], "settings": self.settings_hash(stage),
                    "wall_seconds": round(elapsed, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_file(self.marker(stage), lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
            entry["state"] = "done"
            entry["finished"] = info["finished"]
            self.write_status(status)
            log.info("stage %s: done in %.1f s", stage, elapsed)
        self.write_status(status)
        return status

    def enabled(self, stage: str) -> bool:
        return stage not in OPTIONAL_STAGES or self.cfg["train"].get(stage) is not None or self.taken(stage) is not None

    def taken(self, stage: str) -> Path | None:
        """The pipeline directory `take.<stage>` names (the stage takes its part from it), or None."""
        where = (self.cfg.get("take") or {}).get(stage)
        return None if where is None else resolve_pipeline_path(str(where))

    def _take(self, stage: str, pipeline: Path) -> Path:
        """The training stage's export, taken from `pipeline`'s part instead of trained: float32,
        in the layout the stage's own training run exports (a kill leaves no half-written export)."""
        import torch

        part = pipeline / TAKE_PARTS[stage]
        export = self.runs_dir / stage / "export"
        with atomic_write_dir(export) as tmp:
            if stage == "tokenizer":
                from tokenizer import SpeechTokenizer

                SpeechTokenizer.from_pretrained(part).float().save_pretrained(tmp)
            elif stage == "lm":
                from voicelm.lm.model import VoiceLM

                VoiceLM.from_pretrained(part, dtype=torch.float32).save_pretrained(tmp)
            else:
                from decoder.model import SpeechDecoder

                decoder = SpeechDecoder.from_pretrained(part).float()
                if stage == "decoder":
                    decoder.save_pretrained(tmp)
                elif decoder.is_fallback_vocoder:
                    raise RecipeError(f"take.{stage}={pipeline}: its decoder has no trained HiFT (Griffin-Lim "
                                      f"fallback), so there is no vocoder to take; train the {stage} stage instead")
                else:
                    decoder.vocoder.save_pretrained(tmp)
        log.info("stage %s: taken from %s (no training): %s", stage, part, export)
        return export

    def require(self, stage: str) -> dict:
        info = self.is_done(stage)
        if info is None:
            raise RecipeError(f"stage {stage!r} has not finished in {self.out}: run it first "
                              f"(voicelm recipe {self.cfg['name']} --from {stage} out_dir={self.out})")
        return info

    # --- stages ---
    def stage_data(self) -> list[Path]:
        check_data_tools()
        from voicelm.data.dialogues import build_corpus
        from voicelm.core.manifest import read_manifest, write_manifest

        d = self.cfg["data"]
        dialogues = build_corpus(self.data_dir, train=d["train"], heldout=d["heldout"], seed=self.cfg["seed"],
                                 jobs=d.get("jobs", 1), progress=sys.stderr.isatty(), answer_order=self._answer_order())
        user, assistant = self.data_dir / "user.jsonl", self.data_dir / "assistant.jsonl"
        # The tokenizer hears both sides: user voices (espeak, piper) and the assistant's voice,
        # whose tokens train the decoder and the LM's answers.
        speech = write_manifest(self.data_dir / "speech.jsonl", read_manifest(user) + read_manifest(assistant))
        return [dialogues, user, assistant, speech, *self._text_data()]

    def _text_data(self) -> list[Path]:
        """`data.text` text-only training dialogues (no audio) for the LM's "text" task, then
        `data.follow_up_drills` chains of follow-ups in the same file."""
        from voicelm.data.dialogues import TEXT_DIALOGUES_NAME, write_text_dialogues

        count = int(self.cfg["data"].get("text") or 0)
        if count <= 0:
            return []
        return [write_text_dialogues(self.data_dir / TEXT_DIALOGUES_NAME, count, self.cfg["seed"],
                                     follow_up_drills=int(self.cfg["data"].get("follow_up_drills") or 0),
                                     answer_order=self._answer_order())]

    def _answer_order(self) -> str:
        """data.answer_order: how every generated answer restates a sum or product."""
        return str(self.cfg["data"].get("answer_order") or "asked")

    def _train(self, stage: str, extra: list[str]) -> Path:
        from voicelm.train import compose_config, train

        run_dir = self.runs_dir / stage
        resume = "false" if getattr(self, "fresh", False) else "true"  # --stages/--from: retrain from scratch
        overrides = [f"solver={SOLVER_OF.get(stage, stage)}", f"run_dir={run_dir}", f"seed={self.cfg['seed']}", f"resume={resume}",
                     *extra, *self.cfg["train"][stage]]
        log.info("stage %s: voicelm train %s", stage, " ".join(overrides))
        result = train(compose_config(overrides))
        export = Path(result.export_dir)
        if not (export / "config.json").exists():
            raise RecipeError(f"stage {stage}: the training run finished without an export in {export}")
        if result.resumed_from:
            log.info("stage %s: resumed from step %s", stage, result.resumed_from)
        log.info("stage %s: step %s, valid %s", stage, result.step, result.valid_metrics)
        return export

    def stage_tokenizer(self) -> list[Path]:
        self.require("data")
        speech = self.data_dir / "speech.jsonl"
        return [self._train("tokenizer", [f"solver.manifest={speech}", "solver.train_split=train",
                                          "solver.valid_split=heldout"])]

    def stage_tokenize(self) -> list[Path]:
        self.require("data")
        self.require("tokenizer")
        return self._tokenize_corpus(self.data_dir, self.tokens_dir)

    def _tokenize_corpus(self, data_dir: Path, tokens_dir: Path) -> list[Path]:
        """Tokens for `data_dir`'s user.jsonl and assistant.jsonl, and its dialogues.jsonl with every
        turn's tokens filled in, under `tokens_dir` (audio paths relative to it)."""
        from tokenizer import SpeechTokenizer, tokenize_manifest
        from voicelm.core.manifest import iter_jsonl

        tok = SpeechTokenizer.from_pretrained(self.runs_dir / "tokenizer" / "export")
        batch = int(self.cfg["tokenize"].get("batch_size", 16))
        progress = sys.stderr.isatty()
        outputs = []
        for name in ("user.jsonl", "assistant.jsonl"):
            log.info("tokenize: %s", data_dir / name)
            outputs.append(tokenize_manifest(tok, data_dir / name, tokens_dir / name, batch_size=batch,
                                             progress=progress))
        tokens = {}
        for path in outputs:
            for _, row in iter_jsonl(path):
                tokens[os.path.normpath(tokens_dir / row["audio"])] = row["tokens"]
        lines = []
        for where, dialogue in iter_jsonl(data_dir / "dialogues.jsonl"):
            for turn in dialogue["turns"]:
                audio = os.path.normpath(data_dir / turn["audio"])
                if audio not in tokens:
                    raise RecipeError(f"{where}: turn audio {turn['audio']} is in neither user.jsonl nor "
                                      f"assistant.jsonl; rerun the stage that wrote {data_dir}")
                turn["tokens"] = tokens[audio]
                turn["audio"] = os.path.relpath(audio, tokens_dir)
            lines.append(json.dumps(dialogue, ensure_ascii=False) + "\n")
        dialogues = atomic_write_file(tokens_dir / "dialogues.jsonl",
                                      lambda tmp: Path(tmp).write_text("".join(lines)))
        return [*outputs, dialogues]

    def _voiced_count(self) -> int:
        return int((self.cfg.get("voiced") or {}).get("dialogues") or 0)

    def _drill_counts(self) -> dict[str, int]:
        """Drill corpora of the voiced stage: directory name under data/ and tokens/ -> how many drills."""
        voiced = self.cfg.get("voiced") or {}
        return {name: int(voiced.get(key) or 0) for name, (key, _) in DRILL_CORPORA.items()}

    def _drill_count(self) -> int:
        return sum(self._drill_counts().values())

    def stage_voiced(self) -> list[Path]:
        count, drills = self._voiced_count(), self._drill_count()
        if count <= 0 and drills <= 0:
            log.info("stage voiced: voiced.dialogues, voiced.repeat_drills and voiced.number_drills are 0; the LM "
                     "trains on the spoken corpus alone")
            return []
        self.require("tokenize")
        check_data_tools()
        from voicelm.core.manifest import iter_jsonl
        from voicelm.data.dialogues import build_drill_corpus, build_voiced_corpus

        voiced, seed = self.cfg["voiced"], self.cfg["seed"]
        jobs = int(voiced.get("jobs", self.cfg["data"].get("jobs", 1)))
        progress = sys.stderr.isatty()
        # Each corpus is rendered once: a rerun with the same plan keeps the audio already there.
        corpora = []
        if count > 0:
            build_voiced_corpus(self.data_dir / "voiced", count=count, skip=self.cfg["data"]["train"], seed=seed,
                                jobs=jobs, min_answer_words=int(voiced.get("min_answer_words", 0)),
                                progress=progress, answer_order=self._answer_order())
            corpora.append("voiced")
        for name, drill_count in self._drill_counts().items():
            if drill_count > 0:
                build_drill_corpus(self.data_dir / name, count=drill_count, seed=seed, jobs=jobs, progress=progress,
                                   kind=DRILL_CORPORA[name][1])
                corpora.append(name)
        # One LM manifest: the spoken corpus (its held-out split validates the LM) + the voiced dialogues
        # and drills, their audio paths made relative to tokens/.
        outputs = []
        lines = [line + "\n" for line in (self.tokens_dir / "dialogues.jsonl").read_text().splitlines()]
        for name in corpora:
            tokens_dir = self.tokens_dir / name
            outputs += self._tokenize_corpus(self.data_dir / name, tokens_dir)
            for _, dialogue in iter_jsonl(outputs[-1]):
                for turn in dialogue["turns"]:
                    turn["audio"] = os.path.relpath(os.path.normpath(tokens_dir / turn["audio"]), self.tokens_dir)
                lines.append(json.dumps(dialogue, ensure_ascii=False) + "\n")
        merged = atomic_write_file(self.tokens_dir / LM_DIALOGUES_NAME, lambda tmp: Path(tmp).write_text("".join(lines)))
        return [*outputs, merged]

    def stage_decoder(self) -> list[Path]:
        self.require("tokenize")
        manifest = self.tokens_dir / "assistant.jsonl"
        outputs = []
        if (self.cfg.get("voiced") or {}).get("decoder", False):
            manifest = self._decoder_answers()
            outputs.append(manifest)
        # The vocoder is trained after the flow model; the export stage joins them, so the flow
        # run's own export uses the labelled Griffin-Lim fallback.
        return [*outputs, self._train("decoder", [f"solver.train_manifest={manifest}", "solver.valid_split=heldout",
                                                  f"solver.mel_cache_dir={self.out / 'cache' / 'mel'}"])]

    def _decoder_answers(self) -> Path:
        """tokens/decoder_answers.jsonl: the spoken corpus's assistant turns (its held-out split validates
        the flow) + the voiced stage's distinct answers (voiced dialogues and drills; many long ones,
        which the spoken corpus has few of), audio paths relative to tokens/."""
        from voicelm.core.manifest import iter_jsonl

        self.require("voiced")
        lines = [line + "\n" for line in (self.tokens_dir / "assistant.jsonl").read_text().splitlines()]
        added = 0
        for name in ("voiced", *DRILL_CORPORA):
            answers = self.tokens_dir / name / "assistant.jsonl"
            if not answers.is_file():  # that corpus is off (count 0)
                continue
            for _, row in iter_jsonl(answers):
                row["audio"] = os.path.relpath(os.path.normpath(answers.parent / row["audio"]), self.tokens_dir)
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                added += 1
        log.info("stage decoder: %d assistant answers of the spoken corpus + %d of the voiced stage",
                 len(lines) - added, added)
        return atomic_write_file(self.tokens_dir / "decoder_answers.jsonl",
                                 lambda tmp: Path(tmp).write_text("".join(lines)))

    def stage_vocoder(self) -> list[Path]:
        self.require("data")
        manifest = self.data_dir / "assistant.jsonl"
        return [self._train("vocoder", [f"solver.train_manifest={manifest}", "solver.valid_split=heldout"])]

    def stage_vocoder_ft(self) -> list[Path]:
        # At inference HiFT hears the flow's sampled mels, not true ones: fine-tune it on those
        # (decoder/vocoder_solver.py), starting from the vocoder stage's generator and discriminator.
        if not self.enabled("vocoder_ft"):
            log.info("stage vocoder_ft: off (train.vocoder_ft is null); the export ships the vocoder stage's HiFT")
            return None
        self.require("decoder")
        self.require("vocoder")
        # The vocoder run's generator + discriminator; a taken vocoder has only its generator (the
        # discriminator then starts fresh)
        start = self.runs_dir / "vocoder" / "checkpoints" / "last"
        if not (start / "model.safetensors").is_file():
            start = self.runs_dir / "vocoder" / "export"
        return [self._train("vocoder_ft", [
            f"solver.train_manifest={self.tokens_dir / 'assistant.jsonl'}", "solver.valid_split=heldout",
            f"solver.init_from={start}",
            f"solver.input_flow={self.runs_dir / 'decoder' / 'export'}",
            f"solver.flow_mel_cache_dir={self.out / 'cache' / 'flow-mel'}",
            # the mels inference will feed it: sampled with the shipped flow's settings. One override
            # per key: the solver's default is an empty mapping, which hydra will not merge keys into
            *(f"++solver.input_flow_sampling.{k}={v}"
              for k, v in (self.cfg["pipeline"].get("decoder_inference") or {}).items())])]

    def stage_lm(self) -> list[Path]:
        self.require("tokenize")
        from voicelm.data.dialogues import TEXT_DIALOGUES_NAME

        manifest = self.tokens_dir / "dialogues.jsonl"
        if self._voiced_count() > 0 or self._drill_count() > 0:
            self.require("voiced")
            manifest = self.tokens_dir / LM_DIALOGUES_NAME
        extra = [f"solver.train_manifest={manifest}", "solver.valid_split=heldout"]
        if int(self.cfg["data"].get("text") or 0) > 0:
            extra.append(f"solver.text_manifest={self.data_dir / TEXT_DIALOGUES_NAME}")
        return [self._train("lm", extra)]

    def stage_export(self) -> list[Path]:
        for stage in TRAIN_STAGES:
            if self.enabled(stage):
                self.require(stage)
        import torch
        from decoder.flow import with_sampling
        from decoder.hift import HiFTGenerator
        from decoder.model import SpeechDecoder
        from tokenizer import SpeechTokenizer
        from voicelm.lm.model import VoiceLM
        from voicelm.pipeline import PIPELINE_FILE, load_pipeline

        dtypes = {"float32": torch.float32, "float16": torch.float16}
        dtype_name = self.cfg["pipeline"]["dtype"]
        vocoder_dtype_name = self.cfg["pipeline"].get("vocoder_dtype") or dtype_name
        tok = SpeechTokenizer.from_pretrained(self.runs_dir / "tokenizer" / "export")
        lm = VoiceLM.from_pretrained(self.runs_dir / "lm" / "export", dtype=torch.float32)
        flow_part = SpeechDecoder.from_pretrained(self.runs_dir / "decoder" / "export")
        vocoder = HiFTGenerator.from_pretrained(
            self.runs_dir / ("vocoder_ft" if self.enabled("vocoder_ft") else "vocoder") / "export")
        sampling = dict(self.cfg["pipeline"].get("decoder_inference") or {})
        decoder = SpeechDecoder(with_sampling(flow_part.flow.config, sampling), vocoder)
        decoder.flow.load_state_dict(flow_part.flow.state_dict())
        info = {"name": self.cfg["pipeline"].get("name") or f"recipe-{self.cfg['name']}",
                "description": self.cfg["pipeline"].get("description", ""), "random_weights": False,
                "recipe": self.cfg["name"], "dtype": dtype_name, "vocoder_dtype": vocoder_dtype_name}
        # One atomic directory: a kill leaves the previous pipeline (or none), never a mixture.
        with atomic_write_dir(self.pipeline_dir) as tmp:
            tok.save_pretrained(tmp / "tokenizer", dtype=dtypes[dtype_name], include_asr_head=False)
            lm.save_pretrained(tmp / "voicelm", dtype=dtypes[dtype_name])
            decoder.save_pretrained(tmp / "decoder", dtype=dtypes[dtype_name],
                                    vocoder_dtype=dtypes[vocoder_dtype_name])
            (tmp / PIPELINE_FILE).write_text(json.dumps(info, indent=2) + "\n")
            load_pipeline(tmp)  # the contracts (vocab, rates) are checked before anything is published
            for new in tmp.rglob("*.safetensors"):  # unchanged weights stay byte for byte (git history)
                old = self.pipeline_dir / new.relative_to(tmp)
                if old.is_file() and same_safetensors(old, new):
                    shutil.copyfile(old, new)
        size = sum(p.stat().st_size for p in self.pipeline_dir.rglob("*") if p.is_file())
        log.info("stage export: %s (%.1f MB, %s; vocoder %s)", self.pipeline_dir, size / 1e6, dtype_name,
                 vocoder_dtype_name)
        return [self.pipeline_dir]

    def stage_eval(self) -> list[Path] | None:
        self.require("export")
        if importlib.util.find_spec("voicelm.evaluate") is None:
            log.warning("stage eval: voicelm.evaluate is not installed in this checkout; skipped (not marked "
                        "done, so the next run tries again)")
            return None
        from voicelm.evaluate import evaluate_pipeline

        e = dict(self.cfg["eval"])
        split, limit = e.pop("split", "heldout"), e.pop("limit", None)
        unknown = sorted(set(e) - set(inspect.signature(evaluate_pipeline).parameters))
        if unknown:
            raise RecipeError(f"eval: unknown option(s) {unknown} for voicelm.evaluate.evaluate_pipeline")
        with atomic_write_dir(self.eval_dir) as tmp:
            report = evaluate_pipeline(self.pipeline_dir, self.data_dir / "dialogues.jsonl", tmp, split=split,
                                       limit=limit, progress=lambda line: log.info("stage eval: %s", line), **e)
        log.info("stage eval: %s", json.dumps(report, default=str)[:2000])
        return [self.eval_dir]


def pipeline_dir(cfg: dict) -> Path:
    """`pipeline.dir`, where DEFAULT means the shipped default (voicelm.DEFAULT_PIPELINE)."""
    return resolve_pipeline_path(str(cfg["pipeline"]["dir"]))


def resolve_pipeline_path(value: str) -> Path:
    """A pipeline directory named in the recipe config; DEFAULT = voicelm.DEFAULT_PIPELINE."""
    from voicelm.core.paths import DEFAULT_PIPELINE

    return DEFAULT_PIPELINE if value == "DEFAULT" else Path(value).resolve()


def check_data_tools() -> None:
    """The data stage renders speech with espeak-ng + sox and piper: say which is missing."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if importlib.util.find_spec("piper") is None:
        missing.append("piper-tts (python package `piper`)")
    if missing:
        raise RecipeError(f"the data stage needs {', '.join(missing)}: install them (see setup.sh and "
                          f"docs/data.md; on Debian/Ubuntu: apt-get install espeak-ng sox), or copy an existing "
                          f"corpus into out_dir/data and run --from tokenizer")


def run_recipe(preset: str, overrides: list[str] = (), *, stages: str | None = None,
               from_stage: str | None = None, resume: bool = False) -> dict:
    """Python entry point: load the preset, apply overrides, run the chosen stages; returns status.json's dict.

    Naming stages (`stages`, `from_stage`) means "run these again": they rerun from scratch even if
    done, unless `resume`, which keeps done stages and continues unfinished training runs from their
    last checkpoint (how one stage of a run split over several processes is continued)."""
    cfg = load_recipe_config(preset, list(overrides))
    chosen = select_stages(stages, from_stage)
    return Recipe(cfg).run(chosen, force=(from_stage is not None or stages is not None) and not resume)


# --- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help=f"conf/recipe/<preset>.yaml: demo (the full CPU recipe, hours) or smoke "
                                       f"(every stage in ~2-3 min)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="KEY=VALUE (recipe keys: out_dir=..., data.train=...) or STAGE:KEY=VALUE "
                             "(a hydra override for one training stage, e.g. lm:solver.steps=50)")
    parser.add_argument("--stages", help=f"comma-separated stages to (re)run, of {','.join(STAGES)}")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every later one")
    parser.add_argument("--resume", action="store_true",
                        help="with --stages/--from: skip the chosen stages that are done and continue unfinished "
                             "training runs from their last checkpoint, instead of starting them over")


def _interrupt_on_signals() -> None:
    """SIGTERM (and SIGINT, which a shell ignores in background jobs) stop the recipe like Ctrl-C:
    the running stage is marked `interrupted` with its wall time, and the same command resumes."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(args: argparse.Namespace) -> int:
    _interrupt_on_signals()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("voicelm").setLevel(logging.INFO)
    try:
        status = run_recipe(args.preset, args.overrides, stages=args.stages, from_stage=args.from_stage,
                            resume=args.resume)
    except RecipeError as exc:
        print(f"voicelm recipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same command" if args.resume or not (args.stages or args.from_stage) else "it with --resume"
        print(f"voicelm recipe: interrupted; run {again} to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # a stage failed: status.json and recipe.log say which
        print(f"voicelm recipe: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({name: {k: e.get(k) for k in ("state", "wall_seconds")} for name, e in status["stages"].items()},
                     indent=2))
    print(f"total wall time: {status.get('total_wall_seconds', 0.0):.0f} s")
    return 0
