"""`voicelm serve`: a websocket server for streaming conversations (FastAPI + uvicorn).

One `Session` per connection, at `ws://HOST:PORT/ws`; the message protocol is in docs/server.md.
In short: the client sends JSON control messages and binary PCM16 audio frames; the server sends
JSON events, and each audio chunk as a JSON header `{"type": "audio", ...}` immediately followed
by one binary frame of PCM16 samples at the pipeline's rate (22,050 Hz).

Limits (ServerLimits) guard the process: message size, audio length per utterance, text length,
session wall time and turns, concurrent connections. A malformed or oversized message gets an
`{"type": "error"}` frame and the connection stays open; only the session-length and connection
limits close a connection. Binds 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from voicelm.events import AudioChunk, Error, Event

log = logging.getLogger("voicelm.server")

PROTOCOL_VERSION = 1
MIN_INPUT_RATE, MAX_INPUT_RATE = 8_000, 96_000


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_message_bytes: int = 1 << 20  # one websocket message (a binary audio frame or JSON)
    max_utterance_seconds: float = 60.0  # audio of one user turn
    max_text_chars: int = 4_000
    max_session_seconds: float = 3_600.0  # wall time of one connection
    max_turns: int = 500  # turns of one connection
    max_connections: int = 16
    max_new_tokens: int = 2_000  # cap on the per-turn sampling option


class _ClientError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ClientError("bad_message", f"{name} must be an integer, got {value!r}")
    return value


class Connection:
    """The state of one websocket: its session, audio input buffer, running turn and duplex mode."""

    def __init__(self, websocket, pipeline, limits: ServerLimits, system: str | None):
        self.ws = websocket
        self.pipeline = pipeline
        self.limits = limits
        self.session = pipeline.session(system=system, max_input_seconds=limits.max_utterance_seconds,
                                        max_text_chars=limits.max_text_chars)
        self.send_lock = asyncio.Lock()
        self.turn_task: asyncio.Task | None = None
        self.audio: list[np.ndarray] | None = None  # PCM16 -> float32 pieces of the current utterance
        self.audio_rate = 0
        self.audio_samples = 0
        self.turn_options: Any = None
        self.duplex = None
        self.duplex_rate = 0
        self.duplex_task: asyncio.Task | None = None
        self.turns = 0
        self.started = time.monotonic()

    # --- sending ---------------------------------------------------------------------------
    async def send_json(self, message: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(message))

    async def send_event(self, event: Event) -> None:
        if isinstance(event, AudioChunk):
            async with self.send_lock:  # header and samples must stay adjacent
                await self.ws.send_text(json.dumps(event.to_dict()))
                await self.ws.send_bytes(event.pcm16())
        else:
            await self.send_json(event.to_dict())

    async def send_error(self, code: str, message: str) -> None:
        await self.send_json(Error(code, message).to_dict())

    # --- receiving ---------------------------------------------------------------------------
    async def handle(self, message: dict) -> None:
        data = message.get("bytes")
        text = message.get("text")
        size = len(data) if data is not None else len(text.encode()) if text is not None else 0
        if size > self.limits.max_message_bytes:
            if self.audio is not None:
                self.audio = None  # the utterance is incomplete now: drop it rather than answer half
                raise _ClientError("too_large", f"message of {size} bytes exceeds the limit of "
                                   f"{self.limits.max_message_bytes}; the audio input in progress was discarded. "
                                   f"Send audio in smaller frames (e.g. 100 ms each) and start again.")
            raise _ClientError("too_large", f"message of {size} bytes exceeds the limit of "
                               f"{self.limits.max_message_bytes}")
        if data is not None:
            await self.on_audio(data)
        elif text is not None:
            try:
                payload = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _ClientError("bad_json", f"not valid JSON ({exc.msg} at {exc.pos})") from None
            if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
                raise _ClientError("bad_message", 'a control message is a JSON object with a "type" string')
            await self.on_control(payload)

    async def on_audio(self, data: bytes) -> None:
        if len(data) % 2:
            raise _ClientError("bad_audio", f"binary frames are 16-bit PCM: {len(data)} bytes is not a whole "
                               f"number of samples")
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        if self.duplex is not None:
            events = await asyncio.to_thread(self.duplex.feed, samples, self.duplex_rate)
            for event in events:
                await self.send_event(event)
            return
        if self.audio is None:
            raise _ClientError("unexpected_audio", 'audio frame outside an utterance: send {"type": "audio_start", '
                               '"sample_rate": N} first (or {"type": "duplex_start"})')
        self.audio_samples += len(samples)
        if self.audio_samples / self.audio_rate > self.limits.max_utterance_seconds:
            self.audio = None
            raise _ClientError("too_long", f"the utterance exceeds {self.limits.max_utterance_seconds:.0f} s of "
                               f"audio and was discarded; send shorter turns")
        self.audio.append(samples)

    def _options(self, payload: dict):
        options = payload.get("options")
        if options is None:
            return None
        if not isinstance(options, dict):
            raise _ClientError("bad_message", "options must be a JSON object, e.g. {\"temperature\": 0.2}")
        max_new = options.get("max_new_tokens")
        if max_new is not None and _int(max_new, "max_new_tokens") > self.limits.max_new_tokens:
            raise _ClientError("bad_options", f"max_new_tokens {max_new} exceeds the server's limit "
                               f"{self.limits.max_new_tokens}")
        try:
            return self.pipeline.make_options(options, base=self.session.options)
        except ValueError as exc:
            raise _ClientError("bad_options", str(exc)) from None

    def _sample_rate(self, payload: dict) -> int:
        rate = _int(payload.get("sample_rate"), "sample_rate")
        if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
            raise _ClientError("bad_message", f"sample_rate {rate} is outside [{MIN_INPUT_RATE}, {MAX_INPUT_RATE}] Hz")
        return rate

    async def on_control(self, payload: dict) -> None:
        kind = payload["type"]
        if kind == "audio_start":
            self._check_idle()
            self.audio_rate = self._sample_rate(payload)
            self.turn_options = self._options(payload)
            self.audio, self.audio_samples = [], 0
        elif kind == "audio_end":
            if self.audio is None:
                raise _ClientError("unexpected", "audio_end without audio_start")
            audio, self.audio = self.audio, None
            if not audio:
                raise _ClientError("bad_audio", "the utterance has no audio frames")
            options = self._options(payload) or self.turn_options
            self._start_turn(audio=np.concatenate(audio), sample_rate=self.audio_rate, options=options)
        elif kind == "text":
            self._check_idle()
            text = payload.get("text")
            if not isinstance(text, str):
                raise _ClientError("bad_message", 'a text message needs "text": a string')
            self._start_turn(text=text, options=self._options(payload))
        elif kind == "cancel":
            played = payload.get("played_seconds")
            if played is not None:
                if not isinstance(played, (int, float)) or isinstance(played, bool) or played < 0:
                    raise _ClientError("bad_message", "played_seconds must be a number >= 0")
                self.session.interrupt(float(played))
            else:
                self.session.cancel()
        elif kind == "options":
            self.session.options = self._options(payload) or self.session.options
            await self.send_json({"type": "options", "options": dataclasses.asdict(self.session.options)})
        elif kind == "reset":
            self._check_idle()
            self.session.reset()
            await self.send_json({"type": "reset"})
        elif kind == "duplex_start":
            self._check_idle()
            from voicelm.bargein import DuplexConversation

            self.duplex_rate = self._sample_rate(payload)
            self.duplex = await asyncio.to_thread(DuplexConversation, self.session,
                                                  options=self._options(payload),
                                                  barge_in=bool(payload.get("barge_in", True)))
            self.duplex_task = asyncio.create_task(self._pump_duplex())
        elif kind == "duplex_end":
            await self._stop_duplex(answer_pending=True)
        elif kind == "played":
            if self.duplex is None:
                raise _ClientError("unexpected", "played is only meaningful in duplex mode")
            seconds = payload.get("seconds")
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
                raise _ClientError("bad_message", "seconds must be a number >= 0")
            self.duplex.report_played(float(seconds))
        else:
            raise _ClientError("unknown_type", f"unknown message type {kind!r}; see docs/server.md")

    def _check_idle(self) -> None:
        if self.turn_task is not None and not self.turn_task.done():
            raise _ClientError("busy", 'a turn is running: wait for its turn_end or send {"type": "cancel"}')
        if self.duplex is not None:
            raise _ClientError("busy", "duplex mode is on: send duplex_end first")
        if self.turns >= self.limits.max_turns:
            raise _ClientError("session_limit", f"this connection used its {self.limits.max_turns} turns; reconnect")

    def _start_turn(self, **kwargs) -> None:
        try:
            turn = self.session.arespond(**kwargs)
        except ValueError as exc:  # AudioError included: bad input, refused before anything runs
            raise _ClientError("bad_input", str(exc)) from None
        self.turns += 1
        self.turn_task = asyncio.create_task(self._run_turn(turn))

    async def _run_turn(self, turn) -> None:
        try:
            async for event in turn:
                await self.send_event(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection may have gone; nothing else to tell
            log.warning("turn failed: %s", exc)

    async def _pump_duplex(self) -> None:
        """Answer events arrive between audio frames too: forward them as they come."""
        try:
            while self.duplex is not None:
                for event in self.duplex.poll():
                    await self.send_event(event)
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            pass

    async def _stop_duplex(self, answer_pending: bool) -> None:
        duplex, self.duplex = self.duplex, None
        if duplex is None:
            raise _ClientError("unexpected", "duplex_end without duplex_start")
        if self.duplex_task is not None:
            self.duplex_task.cancel()
        if answer_pending:
            events = duplex.end_of_input()
            events += await asyncio.to_thread(duplex.wait)
            for event in events:
                await self.send_event(event)
        else:
            await asyncio.to_thread(duplex.close)

    async def close(self) -> None:
        self.session.cancel()
        if self.duplex is not None:
            await self._stop_duplex(answer_pending=False)
        if self.turn_task is not None:
            self.turn_task.cancel()
            try:
                await self.turn_task
            except (asyncio.CancelledError, Exception):
                pass


def create_app(pipeline, limits: ServerLimits = ServerLimits(), system: str | None = None):
    """The FastAPI app: `GET /` (pipeline info), `GET /health`, websocket `/ws`."""
    app = FastAPI(title="voicelm", version=str(PROTOCOL_VERSION))
    active = {"connections": 0}

    @app.get("/")
    async def info() -> dict:
        return {"protocol": PROTOCOL_VERSION, "model": pipeline.describe(), **pipeline.info(),
                "limits": dataclasses.asdict(limits), "websocket": "/ws"}

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "connections": active["connections"]}

    @app.websocket("/ws")
    async def conversation(websocket: WebSocket) -> None:
        await websocket.accept()
        if active["connections"] >= limits.max_connections:
            await websocket.send_text(json.dumps(Error("server_full", f"the server holds {limits.max_connections} "
                                                       f"conversations already; try again later").to_dict()))
            await websocket.close(code=1013)
            return
        active["connections"] += 1
        connection = Connection(websocket, pipeline, limits, system)
        try:
            await connection.send_json({"type": "ready", "protocol": PROTOCOL_VERSION, "model": pipeline.describe(),
                                        **pipeline.info(), "limits": dataclasses.asdict(limits)})
            while True:
                remaining = limits.max_session_seconds - (time.monotonic() - connection.started)
                if remaining <= 0:
                    await connection.send_error("session_limit", f"the session reached its limit of "
                                                f"{limits.max_session_seconds:.0f} s; reconnect to continue")
                    await websocket.close(code=1008)
                    return
                try:
                    message = await asyncio.wait_for(websocket.receive(), timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    await connection.handle(message)
                except _ClientError as exc:
                    await connection.send_error(exc.code, exc.message)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away (RuntimeError: send after close)
        finally:
            active["connections"] -= 1
            await connection.close()

    return app


def serve(pipeline, host: str = "127.0.0.1", port: int = 8765, limits: ServerLimits = ServerLimits(),
          system: str | None = None) -> None:
    import uvicorn

    # Messages a little over the limit still reach the app, which answers with an error frame;
    # only grossly oversized ones are refused by the websocket layer itself (close code 1009).
    uvicorn.run(create_app(pipeline, limits, system), host=host, port=port, log_level="info",
                ws_max_size=4 * limits.max_message_bytes)


def add_arguments(parser) -> None:
    from voicelm.pipeline import add_pipeline_arguments

    add_pipeline_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--system", default=None, help="system prompt (default: GLM-4-Voice's)")
    defaults = ServerLimits()
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    parser.add_argument("--max-utterance-seconds", type=float, default=defaults.max_utterance_seconds)
    parser.add_argument("--max-session-seconds", type=float, default=defaults.max_session_seconds)
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections)


def main(args) -> int:
    from voicelm.pipeline import PipelineError, open_pipeline

    try:
        pipeline = open_pipeline(args.pipeline, random_tiny=args.random_tiny)
    except PipelineError as exc:
        print(f"voicelm serve: {exc}")
        return 2
    limits = ServerLimits(max_message_bytes=args.max_message_bytes, max_utterance_seconds=args.max_utterance_seconds,
                          max_session_seconds=args.max_session_seconds, max_connections=args.max_connections)
    print(f"voicelm serve: model {pipeline.describe()}")
    print(f"voicelm serve: ws://{args.host}:{args.port}/ws (protocol in docs/server.md)")
    serve(pipeline, args.host, args.port, limits, args.system)
    return 0
