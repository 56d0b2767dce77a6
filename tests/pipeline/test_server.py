"""`voicelm serve`: a websocket client streams a wav and gets text + audio; bad messages get error
frames and the server keeps serving other clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from voicelm.server import ServerLimits, create_app

websockets_sync = pytest.importorskip("websockets.sync.client")

LIMITS = ServerLimits(max_message_bytes=64_000, max_utterance_seconds=10.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny):
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(create_app(tiny, LIMITS), host="127.0.0.1", port=port, log_level="warning",
                            ws_max_size=4 * LIMITS.max_message_bytes)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"ws://127.0.0.1:{port}/ws"
    srv.should_exit = True
    thread.join(timeout=10)


def receive_turn(ws, timeout: float = 180.0) -> tuple[list[dict], bytes]:
    """Messages up to turn_end; audio headers are checked against the binary frame after them."""
    messages, audio = [], bytearray()
    while True:
        raw = ws.recv(timeout=timeout)
        assert isinstance(raw, str), "a binary frame must follow an audio header"
        msg = json.loads(raw)
        messages.append(msg)
        if msg["type"] == "audio":
            data = ws.recv(timeout=timeout)
            assert isinstance(data, bytes) and len(data) == 2 * msg["num_samples"]
            audio += data
        if msg["type"] in ("turn_end",):
            return messages, bytes(audio)


def recv_json(ws) -> dict:
    return json.loads(ws.recv(timeout=120))


def test_streamed_wav_gets_text_and_audio(server, speech_16k):
    with websockets_sync.connect(server) as ws:
        ready = recv_json(ws)
        assert ready["type"] == "ready" and ready["sample_rate"] == 22050 and "RANDOM" in ready["model"]
        pcm = (speech_16k * 32767).astype("<i2").tobytes()
        ws.send(json.dumps({"type": "audio_start", "sample_rate": 16000, "options": {"max_new_tokens": 40}}))
        for start in range(0, len(pcm), 3200):  # 100 ms frames
            ws.send(pcm[start:start + 3200])
        ws.send(json.dumps({"type": "audio_end"}))
        messages, audio = receive_turn(ws)
        kinds = [m["type"] for m in messages]
        assert "speech_tokens" in kinds and "audio" in kinds and kinds[-1] == "turn_end"
        end = messages[-1]
        assert end["reason"] == "max_tokens" and "tokenize" in end["timings"]
        samples = np.frombuffer(audio, dtype="<i2")
        assert len(samples) == pytest.approx(end["audio_seconds"] * 22050, abs=1)
        assert samples.std() > 0
        # a text turn on the same connection sees the history
        ws.send(json.dumps({"type": "text", "text": "and again?", "options": {"max_new_tokens": 30}}))
        messages, _ = receive_turn(ws)
        assert messages[-1]["history_turns"] == 2


def test_bad_messages_get_error_frames_and_other_clients_are_served(server):
    with websockets_sync.connect(server) as bad, websockets_sync.connect(server) as good:
        assert recv_json(bad)["type"] == "ready" and recv_json(good)["type"] == "ready"
        bad.send("{not json")
        error = recv_json(bad)
        assert error["type"] == "error" and error["code"] == "bad_json"
        bad.send(json.dumps({"type": "fly"}))
        assert recv_json(bad)["code"] == "unknown_type"
        bad.send(b"\x00\x01")  # audio without audio_start
        assert recv_json(bad)["code"] == "unexpected_audio"
        bad.send(json.dumps({"type": "text", "text": "hi", "options": {"temperature": -1}}))
        assert recv_json(bad)["code"] == "bad_options"
        # oversized upload: one frame over the limit; the utterance is discarded, the connection lives
        bad.send(json.dumps({"type": "audio_start", "sample_rate": 16000}))
        bad.send(b"\x00" * (LIMITS.max_message_bytes + 2))
        error = recv_json(bad)
        assert error["code"] == "too_large" and "discarded" in error["message"]
        bad.send(json.dumps({"type": "audio_end"}))
        assert recv_json(bad)["code"] == "unexpected"
        # the other client is served meanwhile, and so is the bad one afterwards
        for ws in (good, bad):
            ws.send(json.dumps({"type": "text", "text": "hello", "options": {"max_new_tokens": 20}}))
            messages, audio = receive_turn(ws)
            assert messages[-1]["type"] == "turn_end" and messages[-1]["reason"] == "max_tokens"
            assert len(audio) > 0


def test_cancel_message_ends_the_turn(server):
    with websockets_sync.connect(server) as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "text", "text": "talk", "options": {"max_new_tokens": 2000}}))
        first = recv_json(ws)
        assert first["type"] in ("text", "speech_tokens")
        ws.send(json.dumps({"type": "cancel"}))
        messages, _ = receive_turn(ws)
        assert messages[-1]["reason"] == "cancelled"
