"""`voicelm demo` / `python demo_app.py`: the Gradio voice demo, over the public session API only.

    voicelm demo [--pipeline DIR | --random-tiny] [--host 127.0.0.1] [--port 7860]

- Microphone (streaming; browsers send 48 kHz, resampled here): silero-vad decides when you
  stopped talking and the answer starts; talking over the answer interrupts it (barge-in), and
  only the part you heard stays in the conversation. Or type in the text box.
- The answer's text streams into the chat; its audio plays while it is generated (chunks go to
  the browser and are scheduled back to back with the Web Audio API, so no ffmpeg is needed).
- Controls: temperature, top-p, max new tokens; Clear; the per-stage latency of the last turn.
- Loads the shipped default pipeline (`voicelm.DEFAULT_PIPELINE`, models/demo) unless given
  `--pipeline DIR`; `--random-tiny` runs a tiny random pipeline (labelled as random). The page
  always says which model is loaded.

CI mode: when the environment variable CI is "true", the demo starts, checks that it serves
(HTTP GET of its page on 127.0.0.1 returns 200, and a text turn through the session API yields
text and audio), prints "voicelm demo: CI check passed ..." and exits 0 instead of serving
forever. Without a trained default pipeline (and no --pipeline), the CI check runs on the tiny
random pipeline and says so.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
import urllib.request

import numpy as np

from voicelm.events import AudioChunk, BargeIn, Error, TextDelta, TurnEnd, UserSpeechEnd, UserSpeechStart

DEFAULT_PORT = 7860

# Browser side of the audio stream: chunks arrive as JSON in a hidden textbox and are scheduled
# back to back on one AudioContext; a "stop" message (barge-in, new turn) silences what is queued.
PLAYER_JS = """
<script>
window.voicelmPlayer = (function () {
  let ctx = null, nextTime = 0, sources = [], lastSeq = -1, played = 0;
  function context() {
    if (!ctx) { ctx = new (window.AudioContext || window.webkitAudioContext)(); }
    if (ctx.state === "suspended") { ctx.resume(); }
    return ctx;
  }
  function stop() {
    for (const s of sources) { try { s.stop(); } catch (e) {} }
    sources = []; nextTime = 0;
  }
  function push(value) {
    if (!value) { return; }
    let msg; try { msg = JSON.parse(value); } catch (e) { return; }
    if (msg.stop) { stop(); }
    for (const chunk of (msg.chunks || [])) {
      if (chunk.seq <= lastSeq && !msg.stop) { continue; }
      lastSeq = chunk.seq;
      const bytes = Uint8Array.from(atob(chunk.pcm), c => c.charCodeAt(0));
      const pcm = new Int16Array(bytes.buffer);
      const ac = context();
      const buffer = ac.createBuffer(1, pcm.length, chunk.sr);
      const data = buffer.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) { data[i] = pcm[i] / 32768; }
      const src = ac.createBufferSource();
      src.buffer = buffer; src.connect(ac.destination);
      nextTime = Math.max(nextTime, ac.currentTime + 0.05);
      src.start(nextTime); nextTime += buffer.duration; played += pcm.length;
      sources.push(src);
      document.body.dataset.voicelmSamplesQueued = String(played);
    }
  }
  return { push: push, stop: stop };
})();
</script>
"""
CSS = ".voicelm-hidden { display: none !important; }"


class DemoConversation:
    """Per browser tab: a session and, while the microphone streams, its duplex turn taker."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.session = pipeline.session()
        self.duplex = None
        self.seq = 0
        self.turn_audio: list[np.ndarray] = []
        self.lock = threading.Lock()

    def audio_message(self, chunks: list[AudioChunk], stop: bool = False) -> str:
        items = []
        for chunk in chunks:
            self.seq += 1
            items.append({"seq": self.seq, "sr": chunk.sample_rate,
                          "pcm": base64.b64encode(chunk.pcm16()).decode("ascii")})
        return json.dumps({"stop": stop, "chunks": items})


def _options(temperature, top_p, max_tokens) -> dict:
    return {"temperature": float(temperature), "top_p": max(float(top_p), 0.01), "max_new_tokens": int(max_tokens)}


def _latency_view(end: TurnEnd) -> dict:
    view = {stage: round(seconds * 1000.0, 1) for stage, seconds in end.timings.items()}
    view["reason"] = end.reason
    view["audio_seconds"] = round(end.audio_seconds, 2)
    return view


def _apply(events, chat: list, conv: DemoConversation, latency):
    """Fold events into the chat messages; returns (audio message or None, latency, final wav or None)."""
    chunks, stop, final = [], False, None
    for event in events:
        if isinstance(event, UserSpeechStart):
            chat.append({"role": "user", "content": "🎤 …"})
        elif isinstance(event, UserSpeechEnd):
            for message in reversed(chat):
                if message["role"] == "user":
                    message["content"] = f"🎤 ({event.speech_seconds:.1f} s of speech)"
                    break
            chat.append({"role": "assistant", "content": ""})
            conv.turn_audio = []
        elif isinstance(event, BargeIn):
            stop, chunks = True, []
            for message in reversed(chat):
                if message["role"] == "assistant":
                    message["content"] += f" [interrupted after {event.played_seconds:.1f} s]"
                    break
        elif isinstance(event, TextDelta):
            if not chat or chat[-1]["role"] != "assistant":
                chat.append({"role": "assistant", "content": ""})
            chat[-1]["content"] += event.text
        elif isinstance(event, AudioChunk):
            chunks.append(event)
            conv.turn_audio.append(event.samples)
        elif isinstance(event, Error):
            chat.append({"role": "assistant", "content": f"⚠ {event.message}"})
        elif isinstance(event, TurnEnd):
            latency = _latency_view(event)
            if conv.turn_audio:
                final = (conv.pipeline.sample_rate, (np.concatenate(conv.turn_audio) * 32767).astype(np.int16))
    audio = conv.audio_message(chunks, stop) if (chunks or stop) else None
    return audio, latency, final


def build_app(pipeline):
    """The Gradio Blocks app for `pipeline`. Launch with `launch_app()` (it adds the player script)."""
    import gradio as gr

    with gr.Blocks(title="voicelm voice demo") as app:
        gr.Markdown(f"## voicelm voice demo\n**Model loaded:** {pipeline.describe()}")
        conv_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Conversation", height=380, elem_id="chat")
                with gr.Row():
                    text = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=4,
                                      elem_id="text-in")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", elem_id="mic",
                               label="Talk: the answer starts when you pause; talk over it to interrupt")
                answer = gr.Audio(label="Last answer (replay)", interactive=False, elem_id="answer-audio")
                pipe = gr.Textbox(elem_id="audio-pipe", elem_classes=["voicelm-hidden"], show_label=False)
            with gr.Column(scale=1):
                temperature = gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="top-p")
                max_tokens = gr.Slider(20, 2000, value=600, step=10, label="max new tokens")
                clear = gr.Button("Clear conversation", elem_id="clear")
                latency = gr.JSON(label="Last turn: latency per stage (ms)", elem_id="latency")

        def conversation(conv):
            return conv if conv is not None else DemoConversation(pipeline)

        def on_text(message, history, temperature, top_p, max_tokens, conv):
            conv = conversation(conv)
            history = list(history or [])
            if not message or not message.strip():
                yield "", history, gr.skip(), gr.skip(), gr.skip(), conv
                return
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            conv.turn_audio = []
            yield "", history, conv.audio_message([], stop=True), gr.skip(), gr.skip(), conv
            try:
                turn = conv.session.respond(text=message, options=_options(temperature, top_p, max_tokens))
            except ValueError as exc:
                history[-1]["content"] = f"⚠ {exc}"
                yield "", history, gr.skip(), gr.skip(), gr.skip(), conv
                return
            last, pending, current = time.monotonic(), [], None
            for event in turn:
                pending.append(event)
                if isinstance(event, (AudioChunk, TurnEnd)) or time.monotonic() - last > 0.1:
                    audio, current, final = _apply(pending, history, conv, current)
                    pending, last = [], time.monotonic()
                    yield ("", history, audio if audio else gr.skip(), final if final else gr.skip(),
                           current if current else gr.skip(), conv)

        def on_mic(chunk, history, temperature, top_p, max_tokens, conv):
            conv = conversation(conv)
            history = list(history or [])
            if chunk is None:
                return history, gr.skip(), gr.skip(), gr.skip(), conv
            rate, samples = chunk
            with conv.lock:
                if conv.duplex is None:
                    from voicelm.bargein import DuplexConversation

                    conv.duplex = DuplexConversation(conv.session)
                conv.duplex.options = _options(temperature, top_p, max_tokens)
                events = conv.duplex.feed(np.asarray(samples), int(rate))
            audio, current, final = _apply(events, history, conv, None)
            return (history, audio if audio else gr.skip(), final if final else gr.skip(),
                    current if current else gr.skip(), conv)

        def on_mic_stop(history, conv):
            """Microphone off: answer what was said, and stream the rest of the answer."""
            conv = conversation(conv)
            history = list(history or [])
            duplex = conv.duplex
            if duplex is None:
                yield history, gr.skip(), gr.skip(), gr.skip(), conv
                return
            with conv.lock:
                events = duplex.end_of_input()
            current = None
            while True:
                audio, current, final = _apply(events, history, conv, current)
                yield (history, audio if audio else gr.skip(), final if final else gr.skip(),
                       current if current else gr.skip(), conv)
                if not duplex.generating:
                    audio, current, final = _apply(duplex.poll(), history, conv, current)
                    yield (history, audio if audio else gr.skip(), final if final else gr.skip(),
                           current if current else gr.skip(), conv)
                    break
                time.sleep(0.1)
                events = duplex.poll()
            with conv.lock:
                conv.duplex = None

        def on_clear(conv):
            if conv is not None:
                if conv.duplex is not None:
                    conv.duplex.close()
                    conv.duplex = None
                conv.session.cancel()
                deadline = time.monotonic() + 10
                while conv.session.busy and time.monotonic() < deadline:
                    time.sleep(0.01)
                conv.session.reset()
            return [], conv.audio_message([], stop=True) if conv else "", None, None, conv

        controls = [temperature, top_p, max_tokens]
        text_outputs = [text, chat, pipe, answer, latency, conv_state]
        text.submit(on_text, [text, chat, *controls, conv_state], text_outputs)
        send.click(on_text, [text, chat, *controls, conv_state], text_outputs)
        mic_outputs = [chat, pipe, answer, latency, conv_state]
        mic.stream(on_mic, [mic, chat, *controls, conv_state], mic_outputs, stream_every=0.2,
                   time_limit=600, concurrency_limit=None)
        mic.stop_recording(on_mic_stop, [chat, conv_state], mic_outputs)
        clear.click(on_clear, [conv_state], [chat, pipe, answer, latency, conv_state])
        # Every new value of the hidden textbox is handed to the browser's audio player.
        pipe.change(None, [pipe], None, js="(value) => { window.voicelmPlayer && window.voicelmPlayer.push(value); }")
    return app


def launch_app(app, host: str = "127.0.0.1", port: int = DEFAULT_PORT, block: bool = True):
    return app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, head=PLAYER_JS, css=CSS, prevent_thread_lock=not block,
        show_error=True, inbrowser=False)


def ci_check(app, pipeline, host: str, port: int) -> int:
    """Start, check the page and one text turn, stop: the CI smoke test of the demo."""
    launch_app(app, host, port, block=False)
    try:
        check_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        with urllib.request.urlopen(f"http://{check_host}:{port}/", timeout=60) as response:
            status = response.status
        if status != 200:
            print(f"voicelm demo: CI check FAILED: GET / returned {status}")
            return 1
        question = "what is seven plus five?"
        events = list(pipeline.session(seed=0).respond(text=question, options={"max_new_tokens": 400}))
        end = events[-1]
        audio = sum(len(e.samples) for e in events if isinstance(e, AudioChunk))
        if not isinstance(end, TurnEnd) or end.reason == "error" or not end.text or audio == 0:
            print(f"voicelm demo: CI check FAILED: the text turn gave {end!r} and {audio} audio samples")
            return 1
        # A trained model must also be right (a random one only has to stream text and audio).
        if not pipeline.random_weights and "twelve" not in end.text.lower():
            print(f"voicelm demo: CI check FAILED: asked {question!r}, the model answered {end.text!r}")
            return 1
        print(f"voicelm demo: CI check passed: page served on {check_host}:{port} (HTTP 200); asked {question!r}, "
              f"it answered {end.text!r} with {audio / pipeline.sample_rate:.2f} s of audio "
              f"(model: {pipeline.describe()})")
        return 0
    finally:
        app.close()


def add_arguments(parser) -> None:
    from voicelm.pipeline import add_pipeline_arguments

    add_pipeline_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)


def main(args) -> int:
    from voicelm import DEFAULT_PIPELINE
    from voicelm.pipeline import PipelineError, open_pipeline

    ci = os.environ.get("CI", "").lower() == "true"
    random_tiny = args.random_tiny
    if ci and args.pipeline is None and not random_tiny and not (DEFAULT_PIPELINE / "voicelm").exists():
        print(f"voicelm demo: no trained default pipeline at {DEFAULT_PIPELINE}; the CI check runs on a tiny "
              f"pipeline with RANDOM weights")
        random_tiny = True
    try:
        pipeline = open_pipeline(args.pipeline, random_tiny=random_tiny)
    except PipelineError as exc:
        print(f"voicelm demo: {exc}", file=sys.stderr)
        return 2
    print(f"voicelm demo: model {pipeline.describe()}")
    app = build_app(pipeline)
    if ci:
        return ci_check(app, pipeline, args.host, args.port)
    print(f"voicelm demo: open http://{args.host}:{args.port}/ in a browser")
    launch_app(app, args.host, args.port, block=True)
    return 0
