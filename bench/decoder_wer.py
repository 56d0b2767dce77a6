"""Where does the decoder lose words? Whisper word error of one recipe run's assistant speech
through each half of the decoder, side by side, on the stored tokens of held-out answers.

    .venv/bin/python bench/decoder_wer.py --pipeline runs/recipe-demo/shipped-candidate/demo-v3 \
        --recipe-dir runs/recipe-demo [--count 16] [--flow CKPT] [--vocoder CKPT] [--steps 10] [--cfg 0.7] \
        [--noise-scale 0.5] [--noise-seed 42] [--left-context 69] [--holdback 24] [--crossfade 24] [--first-chunk 10] [--chunk-tokens 20,40] \
        [--rows streamed,flow-hift] [--prompt "ten plus eighteen is twenty eight."] [--long]

Rows (each scored with `normalized_wer` against the reference answer text, Whisper base judge):
  piper audio            the recorded assistant audio itself: the judge's own floor
  HiFT(true mel)         the pipeline's vocoder on the mel of that audio (copy synthesis)
  Griffin-Lim(true mel)  the same mel through Griffin-Lim: what the mel itself still says
  flow -> HiFT           the pipeline's decoder on the answer's stored speech tokens
  flow -> Griffin-Lim    the flow's mel through Griffin-Lim: the flow alone, without HiFT
  streamed, as the pipeline  the tokens through the pipeline's StreamingDecoder, pushed 26 at a
                         time as the LM emits them (first chunk after 10): what a session plays
The flow rows also print the mean L1 distance of the sampled mel to the true mel.

`--rows` picks rows by short name (piper, hift-true, gl-true, flow-hift, flow-gl, streamed) to
sweep one setting quickly; the default is every row.

`--prompt TEXT` gives the offline flow rows a voice prompt: the first training answer recorded
with exactly that text (normal style), its stored tokens and its true mel (the streamed row takes
no prompt).

These rows decode piper's stored tokens. To score a decoder on the LM's own speech tokens (what the
eval's spoken WER measures), replay an eval report instead: `voicelm eval CAND MANIFEST
--lm-answers-from runs/.../report.json` (docs/evaluation.md).

`--flow` / `--vocoder` load weights from a training checkpoint (`runs/decoder/checkpoints/last/
model.safetensors`, `runs/vocoder/checkpoints/last/model.safetensors`) into the pipeline's
decoder, to compare checkpoints while they train.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROWS = {"piper": "piper audio", "hift-true": "HiFT(true mel)", "gl-true": "Griffin-Lim(true mel)",
        "flow-hift": "flow -> HiFT", "flow-gl": "flow -> Griffin-Lim", "streamed": "streamed, as the pipeline"}


def _load_weights(decoder, flow: Path | None, vocoder: Path | None) -> None:
    from safetensors.torch import load_file

    if flow is not None:
        state = {k.removeprefix("flow."): v for k, v in load_file(str(flow)).items() if not k.startswith("vocoder.")}
        decoder.flow.load_state_dict(state)
    if vocoder is not None:
        state = load_file(str(vocoder))
        state = {k.removeprefix("generator."): v for k, v in state.items() if not k.startswith("discriminator.")}
        decoder.vocoder.load_state_dict({k.removeprefix("vocoder."): v for k, v in state.items()})


def _held_out_answers(recipe_dir: Path, count: int, long_only: bool = False) -> list[tuple[str, Path, list[int]]]:
    """(reference text, audio path, stored tokens) of the first assistant turn of each of the first
    `count` held-out dialogues; with `long_only`, of the first `count` held-out assistant turns whose
    text has more than 8 words, from any turn (the eval's "long" answers: three-digit follow-ups)."""
    from voicelm.evaluate import LONG_ANSWER_WORDS

    tokens = {}
    for line in (recipe_dir / "tokens" / "assistant.jsonl").read_text().splitlines():
        row = json.loads(line)
        tokens[Path(row["audio"]).name] = row["tokens"]
    answers = []
    for line in (recipe_dir / "data" / "dialogues.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] != "heldout":
            continue
        for turn in row["turns"]:
            if turn["role"] != "assistant" or Path(turn["audio"]).name not in tokens:
                continue
            if long_only and len(turn["text"].split()) <= LONG_ANSWER_WORDS:
                continue
            answers.append((turn["text"], recipe_dir / "data" / turn["audio"], tokens[Path(turn["audio"]).name]))
            if not long_only or len(answers) == count:
                break
        if len(answers) == count:
            break
    if not answers:
        raise SystemExit(f"no held-out assistant turns with stored tokens under {recipe_dir} (run its tokenize stage)")
    return answers


def _prompt(recipe_dir: Path, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mel) of the first training answer recorded with exactly `text`: a voice prompt for
    the flow. Tokens past the mel's frames (the tokenizer pads the audio) are dropped."""
    from decoder.flow import frames_for_tokens
    from decoder.mel import mel_spectrogram
    from voicelm.core.audio import DECODER_SAMPLE_RATE, load_audio

    for line in (recipe_dir / "tokens" / "assistant.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["text"] == text and row.get("split") == "train" and row.get("style", "normal") == "normal":
            audio = (recipe_dir / "tokens" / row["audio"]).resolve()
            mel = mel_spectrogram(load_audio(audio, DECODER_SAMPLE_RATE, max_seconds=None).reshape(-1))
            tokens = list(row["tokens"])
            while tokens and frames_for_tokens(len(tokens)) > mel.shape[-1]:
                tokens.pop()
            return torch.tensor(tokens), mel
    raise SystemExit(f"--prompt: no training answer of {recipe_dir}/tokens/assistant.jsonl has the text {text!r} "
                     f"in the normal style; copy an answer's text from that file")


def _streamed(decoder, tokens: list[int], **stream_options) -> torch.Tensor:
    """The waveform a session plays for these speech tokens: the pipeline's chunking (unless
    overridden), 26 tokens per push (the LM's speech run), offline-equal noise."""
    from decoder.streaming import StreamingDecoder

    stream = StreamingDecoder(decoder, **stream_options)
    chunks = []
    for i in range(0, len(tokens), 26):
        chunks += stream.push(tokens[i:i + 26])
    chunks += stream.finish()
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--recipe-dir", type=Path, default=Path("runs/recipe-demo"))
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--long", action="store_true",
                        help="score the held-out answers of more than 8 words (from any turn) instead of first answers")
    parser.add_argument("--flow", type=Path, help="flow weights from a decoder training checkpoint")
    parser.add_argument("--vocoder", type=Path, help="HiFT weights from a vocoder training checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the decoder's)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="flow rows: the recorded training answer with this text as voice prompt")
    parser.add_argument("--cfg", type=float, default=None, help="guidance weight (default: the decoder's)")
    parser.add_argument("--noise-scale", type=float, default=None, help="starting-noise scale (default: the decoder's)")
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="starting-noise seed (default: the decoder's): another draw of the same decoder")
    parser.add_argument("--attention-window", type=int, default=None,
                        help="the flow estimator's attention reach in frames (default: the decoder's)")
    parser.add_argument("--left-context", type=int, default=None,
                        help="streamed row: pinned left-context frames (default: StreamingDecoder's)")
    parser.add_argument("--holdback", type=int, default=None,
                        help="streamed row: held-back frames per join (default: StreamingDecoder's)")
    parser.add_argument("--crossfade", type=int, default=None,
                        help="streamed row: recomputed held-back frames blended with their first version "
                             "(default: StreamingDecoder's)")
    parser.add_argument("--first-chunk", type=int, default=None,
                        help="streamed row: tokens of the first chunk (default: the pipeline's)")
    parser.add_argument("--chunk-tokens", default=None,
                        help="streamed row: comma-separated sizes of the later chunks (default: the pipeline's)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to compute, of {','.join(ROWS)} (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in rows if name not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: unknown row(s) {unknown or args.rows!r}; choose from {','.join(ROWS)}")
    torch.set_num_threads(args.threads)

    from decoder.griffinlim import GriffinLimVocoder
    from decoder.mel import mel_spectrogram
    from voicelm.core.audio import DECODER_SAMPLE_RATE, load_audio
    from voicelm.core.whisper_weights import load_whisper, normalized_wer, transcribe
    from voicelm.pipeline import load_pipeline

    pipeline = load_pipeline(args.pipeline)
    decoder = pipeline.decoder.float().eval()
    _load_weights(decoder, args.flow, args.vocoder)
    if args.cfg is not None:
        decoder.flow.config.inference_cfg_rate = args.cfg
    if args.noise_scale is not None:
        decoder.flow.config.noise_scale = args.noise_scale
    if args.attention_window is not None:
        decoder.flow.config.attention_window = args.attention_window
    if args.noise_seed is not None:
        decoder.flow.config.noise_seed = args.noise_seed
    griffin_lim = GriffinLimVocoder()
    judge = load_whisper("base")
    rate = DECODER_SAMPLE_RATE
    chunk_tokens = tuple(int(n) for n in args.chunk_tokens.split(",")) if args.chunk_tokens else None
    stream_options = {key: value for key, value in (("left_context_frames", args.left_context),
                                                    ("holdback_frames", args.holdback),
                                                    ("crossfade_frames", args.crossfade),
                                                    ("first_chunk_tokens", args.first_chunk),
                                                    ("chunk_tokens", chunk_tokens)) if value is not None}
    pipeline_chunking = {"first_chunk_tokens": pipeline.first_chunk_tokens, "chunk_tokens": pipeline.chunk_tokens}
    answers = _held_out_answers(args.recipe_dir, args.count, long_only=args.long)
    prompt_tokens, prompt_mel = _prompt(args.recipe_dir, args.prompt) if args.prompt else (None, None)
    heard: dict[str, list[str]] = {row: [] for row in rows}
    mel_l1: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        for text, audio, tokens in answers:
            wav = load_audio(audio, rate, max_seconds=None).reshape(-1)
            true_mel = mel_spectrogram(wav)
            if {"flow-hift", "flow-gl"} & set(rows):
                mel = decoder.decode_mel(torch.tensor(tokens), n_timesteps=args.steps,
                                         prompt_tokens=prompt_tokens, prompt_mel=prompt_mel)
                frames = min(mel.shape[-1], true_mel.shape[-1])
                mel_l1.append(float((mel[:, :frames] - true_mel[:, :frames]).abs().mean()))
            makers = {
                "piper": lambda: wav,
                "hift-true": lambda: decoder.vocode(true_mel),
                "gl-true": lambda: griffin_lim.inference(true_mel[None])[0][0],
                "flow-hift": lambda: decoder.vocode(mel),
                "flow-gl": lambda: griffin_lim.inference(mel[None])[0][0],
                "streamed": lambda: _streamed(decoder, tokens, **{**pipeline_chunking, **stream_options}),
            }
            for row in rows:
                heard[row].append(transcribe(judge, makers[row]().float().numpy(), rate))
            print(f"{text} | " + " | ".join(heard[row][-1] for row in rows), flush=True)
    references = [text for text, _, _ in answers]
    print(f"\n{len(answers)} held-out answers of {args.recipe_dir}; pipeline {args.pipeline}"
          f"{'; flow ' + str(args.flow) if args.flow else ''}{'; vocoder ' + str(args.vocoder) if args.vocoder else ''}; "
          f"{args.steps or decoder.flow.config.n_timesteps} Euler steps, guidance {decoder.flow.config.inference_cfg_rate}, "
          f"noise scale {decoder.flow.config.noise_scale} (seed {decoder.flow.config.noise_seed}), prompt {args.prompt!r}, attention window {decoder.flow.config.attention_window}; stream {stream_options or 'defaults'}; "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s")
    print("| path | Whisper base WER |\n|---|---|")
    for row in rows:
        print(f"| {ROWS[row]} | {100 * normalized_wer(references, heard[row]):.1f} % |")
    if mel_l1:
        print(f"mean L1 of the flow's mel to the true mel: {np.mean(mel_l1):.3f}")


if __name__ == "__main__":
    main()
