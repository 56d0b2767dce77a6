"""The demo recipe's orchestration, run end to end with the `smoke` preset (tiny models, few steps).

One smoke run is shared by the tests of this module: it is started with `--stages data,tokenizer`
(a run stopped after the tokenizer stage), then resumed with a plain run that must complete the
remaining stages without redoing the first two, then started once more (everything skipped).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from voicelm.recipe import (SOLVER_OF, STAGES, TRAIN_STAGES, Recipe, RecipeError, load_recipe_config, run_recipe,
                            select_stages)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "smoke"
    first = run_recipe("smoke", [f"out_dir={out}"], stages="data,tokenizer")
    marker_times = {s: (out / "stages" / f"{s}.done.json").stat().st_mtime_ns for s in ("data", "tokenizer")}
    second = run_recipe("smoke", [f"out_dir={out}"])
    start = time.perf_counter()
    third = run_recipe("smoke", [f"out_dir={out}"])
    rerun_seconds = time.perf_counter() - start
    return {"out": out, "first": first, "second": second, "third": third, "rerun_seconds": rerun_seconds,
            "marker_times": marker_times}


def test_stopped_after_tokenizer_then_resumed_completes(smoke):
    first, second, out = smoke["first"], smoke["second"], smoke["out"]
    assert set(first["stages"]) == {"data", "tokenizer"}
    assert all(first["stages"][s]["state"] == "done" for s in ("data", "tokenizer"))
    for stage in ("data", "tokenizer"):  # not redone by the resumed run
        assert second["stages"][stage]["skipped_last_run"] is True
        assert (out / "stages" / f"{stage}.done.json").stat().st_mtime_ns == smoke["marker_times"][stage]
    for stage in STAGES[2:]:
        assert second["stages"][stage]["skipped_last_run"] is False


def test_every_stage_done_with_wall_times(smoke):
    out = smoke["out"]
    status = json.loads((out / "status.json").read_text())
    for stage in STAGES:
        entry = status["stages"][stage]
        if stage == "eval" and entry["state"] == "skipped":
            continue  # voicelm.evaluate not in this checkout yet: reported, never marked done
        assert entry["state"] == "done", (stage, entry)
        assert entry["wall_seconds"] > 0
        marker = json.loads((out / "stages" / f"{stage}.done.json").read_text())
        assert marker["outputs"] and marker["stage"] == stage
    assert (out / "recipe.log").read_text().count("stage lm: done in") == 1
    rows = [json.loads(line) for line in (out / "tokens" / "dialogues.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(t["tokens"], list) and t["tokens"] for r in rows for t in r["turns"])
    assert all((out / "tokens" / t["audio"]).exists() for r in rows for t in r["turns"])
    # The LM trains on the spoken corpus plus the voiced stage's dialogues, repeat drills and number
    # drills, every turn tokenized.
    lm_rows = [json.loads(line) for line in (out / "tokens" / "lm_dialogues.jsonl").read_text().splitlines()]
    assert lm_rows[:len(rows)] == rows and len(lm_rows) == len(rows) + 3 + 2 + 2
    assert all(r["id"].startswith("voiced-") and r["split"] == "train" for r in lm_rows[len(rows):-4])
    assert all(r["id"].startswith("drill-") and r["split"] == "train" for r in lm_rows[-4:-2])
    assert all(r["id"].startswith("ndrill-") and r["split"] == "train" for r in lm_rows[-2:])
    assert all(r["turns"][0]["text"].endswith(r["turns"][1]["text"]) for r in lm_rows[-4:])  # "...: the W1 W2."
    assert all(t["tokens"] and (out / "tokens" / t["audio"]).exists() for r in lm_rows for t in r["turns"])
    assert "lm_dialogues.jsonl" in (out / "runs" / "lm" / "config.yaml").read_text()
    # Its text task reads the text dialogues, then the chains of follow-ups.
    text_rows = [json.loads(line) for line in (out / "data" / "text_dialogues.jsonl").read_text().splitlines()]
    assert len(text_rows) == 20 + 2 and all(r["id"].startswith("text-fdrill-") for r in text_rows[-2:])
    assert f"text_manifest: {out / 'data' / 'text_dialogues.jsonl'}" in (out / "runs" / "lm" / "config.yaml").read_text()
    # The flow trained on the spoken corpus's assistant turns plus the voiced stage's answers (voiced.decoder).
    assistant = (out / "tokens" / "assistant.jsonl").read_text().splitlines()
    answers = [json.loads(line) for line in (out / "tokens" / "decoder_answers.jsonl").read_text().splitlines()]
    voiced = [json.loads(line) for name in ("voiced", "drills", "number_drills")
              for line in (out / "tokens" / name / "assistant.jsonl").read_text().splitlines()]
    assert answers[:len(assistant)] == [json.loads(line) for line in assistant]
    assert len(voiced) >= 2 and len(answers) == len(assistant) + len(voiced)
    assert [r["tokens"] for r in answers[len(assistant):]] == [r["tokens"] for r in voiced]
    assert all((out / "tokens" / r["audio"]).is_file() for r in answers)
    assert f"train_manifest: {out / 'tokens' / 'decoder_answers.jsonl'}" in (out / "runs" / "decoder" / "config.yaml").read_text()
    # The vocoder was fine-tuned on the trained flow's mels of the assistant turns, from the vocoder run.
    ft = (out / "runs" / "vocoder_ft" / "config.yaml").read_text()
    assert f"input_flow: {out / 'runs' / 'decoder' / 'export'}" in ft
    assert f"init_from: {out / 'runs' / 'vocoder' / 'checkpoints' / 'last'}" in ft
    assert any((out / "cache" / "flow-mel").glob("*.pt"))


def test_rerun_skips_every_stage(smoke):
    third = smoke["third"]
    for stage in STAGES:
        entry = third["stages"][stage]
        if entry["state"] != "skipped":
            assert entry["skipped_last_run"] is True, stage
    assert smoke["rerun_seconds"] < 20


def test_pipeline_loads_and_answers_with_text_and_audio(smoke):
    import voicelm
    from voicelm.events import AudioChunk, TextDelta, TurnEnd

    pipeline_dir = smoke["out"] / "pipeline"
    info = json.loads((pipeline_dir / "pipeline.json").read_text())
    assert info["recipe"] == "smoke" and info["dtype"] == "float16" and info["vocoder_dtype"] == "float32"
    assert not (pipeline_dir / "tokenizer" / "model.safetensors").read_bytes().count(b"asr_head.")
    pipeline = voicelm.load_pipeline(pipeline_dir)
    assert not pipeline.decoder.is_fallback_vocoder  # the trained HiFT, not Griffin-Lim
    from safetensors.torch import load_file
    tuned = load_file(str(smoke["out"] / "runs" / "vocoder_ft" / "export" / "model.safetensors"))
    shipped = load_file(str(pipeline_dir / "decoder" / "model.safetensors"))
    assert all(torch.equal(shipped[f"vocoder.{k}"], v) for k, v in tuned.items())  # the fine-tuned one, float32
    assert {v.dtype for k, v in shipped.items() if k.startswith("flow.") and v.is_floating_point()} == {torch.float16}
    session = pipeline.session(seed=0, options={"temperature": 0.0})
    events = list(session.respond(text="what is seven plus five?", options={"max_new_tokens": 60}))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    audio = [e for e in events if isinstance(e, AudioChunk)]
    assert text.strip()
    assert audio and sum(len(a.samples) for a in audio) > 0 and audio[0].sample_rate == 22050
    assert isinstance(events[-1], TurnEnd)


def test_vocoder_ft_off_ships_the_vocoder_stages_hift(smoke, tmp_path):
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "copy"
    shutil.copytree(smoke["out"], out, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    args = [f"out_dir={out}", "train.vocoder_ft=null"]
    status = run_recipe("smoke", args, stages="vocoder_ft,export")
    assert status["stages"]["vocoder_ft"]["state"] == "skipped" and status["stages"]["export"]["state"] == "done"
    plain = load_file(str(out / "runs" / "vocoder" / "export" / "model.safetensors"))
    shipped = load_file(str(out / "pipeline" / "decoder" / "model.safetensors"))
    assert all(torch.equal(shipped[f"vocoder.{k}"], v) for k, v in plain.items())  # float32
    with pytest.raises(RecipeError, match="train.vocoder_ft is null"):
        load_recipe_config("smoke", ["train.vocoder_ft=null", "vocoder_ft:solver.steps=3"])


def test_decoder_sampling_settings_are_written_into_the_shipped_flow(smoke, tmp_path):
    import shutil

    from decoder import SpeechDecoder
    from voicelm.pipeline import load_pipeline

    out = tmp_path / "copy"
    shutil.copytree(smoke["out"], out, ignore=shutil.ignore_patterns("cache", "tensorboard", "eval"))
    trained = SpeechDecoder.from_pretrained(smoke["out"] / "runs" / "decoder" / "export").flow.config
    # the smoke preset's own setting (noise_scale 0.5) was written into the pipeline it shipped
    assert load_pipeline(smoke["out"] / "pipeline").decoder.flow.config.noise_scale == 0.5
    args = [f"out_dir={out}", "pipeline.decoder_inference.noise_scale=0.6", "pipeline.decoder_inference.n_timesteps=3"]
    status = run_recipe("smoke", args, stages="export")
    assert status["stages"]["export"]["state"] == "done" and not status["stages"]["export"]["skipped_last_run"]
    shipped = load_pipeline(out / "pipeline").decoder.flow.config
    for part in ("tokenizer", "voicelm"):  # re-exported unchanged: kept byte for byte (no git churn)
        weights = f"pipeline/{part}/model.safetensors"
        assert (out / weights).read_bytes() == (smoke["out"] / weights).read_bytes()
    assert (shipped.noise_scale, shipped.n_timesteps) == (0.6, 3)
    assert shipped.inference_cfg_rate == trained.inference_cfg_rate and trained.noise_scale == 1.0
    # vocoder_ft's input mels are sampled that way too: the smoke preset's settings reached its
    # solver, and its settings (what a done marker is checked against) include them
    vocoder_ft = OmegaConf.load(smoke["out"] / "runs" / "vocoder_ft" / "config.yaml")
    assert OmegaConf.to_container(vocoder_ft.solver.input_flow_sampling) == {"noise_scale": 0.5}
    plain, cooler = load_recipe_config("smoke", [f"out_dir={out}"]), load_recipe_config("smoke", args)
    assert Recipe(plain).settings_hash("vocoder_ft") != Recipe(cooler).settings_hash("vocoder_ft")
    assert Recipe(plain).settings_hash("lm") == Recipe(cooler).settings_hash("lm")
    with pytest.raises(RecipeError, match=r"pipeline.decoder_inference: noise_scale must be a number > 0 \(got 0\)"):
        load_recipe_config("smoke", ["pipeline.decoder_inference.noise_scale=0"])
    with pytest.raises(RecipeError, match="pipeline.decoder_inference: temperature is not a flow sampling setting"):
        load_recipe_config("smoke", ["pipeline.decoder_inference.temperature=0.5"])


def test_stages_taken_from_a_pipeline_reexport_it_and_vocoder_ft_trains_from_its_hift(smoke, tmp_path):
    """A fresh machine continuing a shipped pipeline: its data and tokens are there, the training
    stages take their parts from the pipeline (no training) and vocoder_ft fine-tunes its HiFT."""
    import shutil

    from safetensors.torch import load_file

    from voicelm.core.checkpoint import same_safetensors

    shipped = smoke["out"] / "pipeline"
    out = tmp_path / "continued"
    shutil.copytree(smoke["out"], out, ignore=shutil.ignore_patterns("runs", "cache", "pipeline", "eval"))
    for stage in (*TRAIN_STAGES, "export", "eval"):
        (out / "stages" / f"{stage}.done.json").unlink()
    take = [f"take.{stage}={shipped}" for stage in ("tokenizer", "decoder", "vocoder", "lm")]
    status = run_recipe("smoke", [f"out_dir={out}", *take], stages="tokenizer,decoder,vocoder,vocoder_ft,lm,export")
    assert all(status["stages"][s]["state"] == "done" for s in (*TRAIN_STAGES, "export"))
    for stage in ("tokenizer", "decoder", "vocoder", "lm"):  # taken: an export, no training run
        assert (out / "runs" / stage / "export" / "config.json").is_file()
        assert not (out / "runs" / stage / "checkpoints").exists()
    assert (out / "runs" / "vocoder_ft" / "checkpoints").is_dir()
    log = (out / "recipe.log").read_text()
    assert "generator initialised from" in log and "the discriminator starts fresh" in log
    for part in ("tokenizer", "voicelm"):  # taken and exported again: the same tensors and metadata
        weights = f"{part}/model.safetensors"
        assert same_safetensors(out / "pipeline" / weights, shipped / weights)
    before, after = (load_file(str(p / "decoder" / "model.safetensors")) for p in (shipped, out / "pipeline"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("flow."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vocoder."))
    # taking instead of training is a change of settings that a done marker is checked against
    plain = load_recipe_config("smoke", [f"out_dir={out}"])
    assert Recipe(plain).settings_hash("lm") != Recipe(load_recipe_config("smoke", [f"out_dir={out}", *take])).settings_hash("lm")


def test_bad_take_arguments_are_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"take.lmm: not a training stage; take one of \['tokenizer'"):
        load_recipe_config("smoke", ["take.lmm=DEFAULT"])
    with pytest.raises(RecipeError, match=rf"take.lm={tmp_path}: no voicelm/ part \(config.json\) in {tmp_path}"):
        load_recipe_config("smoke", [f"take.lm={tmp_path}"])
    assert Recipe(load_recipe_config("smoke", ["take.decoder=DEFAULT"])).taken("decoder").name == "demo"


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="known presets"):
        load_recipe_config("nope")
    with pytest.raises(RecipeError, match="no key 'data.trian'"):
        load_recipe_config("smoke", ["data.trian=3"])
    with pytest.raises(RecipeError, match="STAGE:KEY=VALUE"):
        load_recipe_config("smoke", ["lmm:solver.steps=3"])
    with pytest.raises(RecipeError, match="data.train"):
        load_recipe_config("smoke", ["data.train=0", "data.heldout=0"])
    with pytest.raises(RecipeError, match="pipeline.dtype"):
        load_recipe_config("smoke", ["pipeline.dtype=int3"])
    with pytest.raises(RecipeError, match=r"pipeline.vocoder_dtype must be one of .*got 'bf16'"):
        load_recipe_config("smoke", ["pipeline.vocoder_dtype=bf16"])
    assert load_recipe_config("smoke", ["pipeline.vocoder_dtype=null"])["pipeline"]["vocoder_dtype"] is None
    with pytest.raises(RecipeError, match=r"voiced.min_answer_words must be an integer >= 0 \(got -2\)"):
        load_recipe_config("smoke", ["voiced.min_answer_words=-2"])
    with pytest.raises(RecipeError, match=r"voiced.repeat_drills must be an integer >= 0 \(got 'many'\)"):
        load_recipe_config("smoke", ["voiced.repeat_drills=many"])
    with pytest.raises(RecipeError, match=r"voiced.number_drills must be an integer >= 0 \(got -1\)"):
        load_recipe_config("smoke", ["voiced.number_drills=-1"])
    with pytest.raises(RecipeError, match=r"voiced.decoder must be true or false \(got 'yes please'\)"):
        load_recipe_config("smoke", ["voiced.decoder='yes please'"])
    with pytest.raises(RecipeError, match=r"data.answer_order must be one of \['asked', 'small_first'\] \(got 'sorted'\)"):
        load_recipe_config("smoke", ["data.answer_order=sorted"])
    assert load_recipe_config("demo", ["data.answer_order=small_first"])["data"]["answer_order"] == "small_first"
    with pytest.raises(RecipeError, match="unknown stage"):
        select_stages("data,tokeniser", None)
    with pytest.raises(RecipeError, match="unknown stage"):
        select_stages(None, "training")
    assert select_stages(None, "lm") == ["lm", "export", "eval"]
    cfg = load_recipe_config("smoke", ["lm:solver.steps=7", f"out_dir={tmp_path}"])
    assert cfg["train"]["lm"][-1] == "solver.steps=7" and cfg["pipeline"]["dir"] == f"{tmp_path}/pipeline"


def test_later_stage_without_its_inputs_says_what_to_run(tmp_path):
    with pytest.raises(RecipeError, match="'data' has not finished.*--from data"):
        run_recipe("smoke", [f"out_dir={tmp_path}"], stages="tokenizer")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["stages"]["tokenizer"]["state"] == "failed"
    assert not (tmp_path / "stages" / "tokenizer.done.json").exists()


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(RecipeError, match="espeak-ng"):
        run_recipe("smoke", [f"out_dir={tmp_path / 'r'}"], stages="data")
    assert not (tmp_path / "r" / "data" / "dialogues.jsonl").exists()


def test_demo_preset_composes_every_training_stage():
    from voicelm.train import compose_config

    cfg = load_recipe_config("demo")
    assert cfg["pipeline"]["dtype"] == "float16"
    assert "solver.init_whisper=base" in cfg["train"]["tokenizer"]
    for stage in TRAIN_STAGES:
        solver = SOLVER_OF.get(stage, stage)
        composed = compose_config([f"solver={solver}", *cfg["train"][stage]])
        assert composed.solver.name == solver


def test_two_recipe_processes_keep_each_others_status(tmp_path):
    """`--stages lm` and `--stages decoder,vocoder` may run side by side on a multi-core machine:
    neither may erase the stage entries the other wrote to status.json."""
    from voicelm.recipe import Recipe

    cfg = load_recipe_config("smoke", [f"out_dir={tmp_path}"])
    a, b = Recipe(cfg), Recipe(cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    status_a, status_b = a.read_status(), b.read_status()  # both read before either writes
    a._touched, b._touched = {"lm"}, {"decoder"}
    status_a["stages"]["lm"] = {"state": "running", "wall_seconds": 5.0, "runs": 0}
    status_b["stages"]["decoder"] = {"state": "done", "wall_seconds": 7.0, "runs": 1}
    a.write_status(status_a)
    b.write_status(status_b)
    status_a["stages"]["lm"] = {"state": "done", "wall_seconds": 9.0, "runs": 1}
    a.write_status(status_a)
    on_disk = json.loads((tmp_path / "status.json").read_text())
    assert on_disk["stages"]["lm"]["state"] == "done"
    assert on_disk["stages"]["decoder"]["wall_seconds"] == 7.0
    assert on_disk["total_wall_seconds"] == 16.0


def test_sigterm_marks_the_running_stage_interrupted(tmp_path, monkeypatch):
    """A recipe in the background (nohup, a job scheduler) is stopped with SIGTERM: the running
    stage must be recorded as interrupted, with its time, so that the same command resumes."""
    import os
    import signal

    from voicelm.recipe import Recipe, _interrupt_on_signals

    def stage_data(self):
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the stage")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _interrupt_on_signals()
        monkeypatch.setattr(Recipe, "stage_data", stage_data)
        with pytest.raises(KeyboardInterrupt):
            run_recipe("smoke", [f"out_dir={tmp_path}"], stages="data")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    entry = json.loads((tmp_path / "status.json").read_text())["stages"]["data"]
    assert entry["state"] == "interrupted" and entry["wall_seconds"] >= 0.3
    assert not (tmp_path / "stages" / "data.done.json").exists()


def test_resume_continues_the_named_stages_instead_of_starting_over(tmp_path, monkeypatch):
    """`--stages lm --resume` is how one stage of a run split over processes continues after a kill:
    a done stage stays done, an unfinished training run resumes (resume=true), never starts over."""
    from voicelm.recipe import Recipe

    calls = []

    def stage_data(self):
        calls.append(self.fresh)
        return []

    monkeypatch.setattr(Recipe, "stage_data", stage_data)
    out = [f"out_dir={tmp_path}"]
    run_recipe("smoke", out, stages="data", resume=True)  # not done yet: runs, continuing any checkpoint
    run_recipe("smoke", out, stages="data", resume=True)  # done: skipped
    run_recipe("smoke", out, stages="data")  # named without --resume: from scratch
    assert calls == [False, True]


def test_a_done_training_stage_with_raised_steps_continues_and_a_done_data_stage_does_not_rerun(tmp_path, monkeypatch):
    """Raising `STAGE:solver.steps` after a stage finished continues its run from the last
    checkpoint (the harness's resume=true); changed data settings never silently re-render."""
    from voicelm.recipe import Recipe

    calls = []
    monkeypatch.setattr(Recipe, "stage_data", lambda self: calls.append(("data", self.fresh)) or [])
    monkeypatch.setattr(Recipe, "stage_vocoder", lambda self: calls.append(("vocoder", self.fresh)) or [])
    out = [f"out_dir={tmp_path}"]
    run_recipe("smoke", out, stages="data,vocoder", resume=True)
    run_recipe("smoke", out, stages="data,vocoder", resume=True)  # same settings: both skipped
    run_recipe("smoke", [*out, "data.train=7", "vocoder:solver.steps=999"], stages="data,vocoder", resume=True)
    assert calls == [("data", False), ("vocoder", False), ("vocoder", False)]


def test_command_line_takes_options_after_the_preset_and_between_overrides():
    # the docs write both orders; plain argparse refused options after the first override
    import argparse

    from voicelm import recipe
    from voicelm.cli import parse_arguments
    from voicelm.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="voicelm recipe")
    recipe.add_arguments(parser)
    for argv in (["demo", "--resume", "--stages", "voiced", "voiced.jobs=1", "threads=1"],
                 ["demo", "voiced.jobs=1", "--stages", "voiced", "threads=1", "--resume"],
                 ["--resume", "--stages", "voiced", "demo", "voiced.jobs=1", "threads=1"]):
        args = parse_arguments(parser, argv)
        assert (args.preset, args.overrides, args.stages, args.resume) == \
            ("demo", ["voiced.jobs=1", "threads=1"], "voiced", True), argv
    with pytest.raises(SystemExit):  # an unknown option is still refused
        parse_arguments(parser, ["demo", "--restart"])
    # a command whose positionals are hydra's verbatim remainder keeps plain parsing
    parser = argparse.ArgumentParser(prog="voicelm train")
    train_cli.add_arguments(parser)
    assert parse_arguments(parser, ["solver=lm", "lm=demo"]).overrides == ["solver=lm", "lm=demo"]
