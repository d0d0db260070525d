"""A local stand-in for OpenAI-compatible and Anthropic streaming endpoints.

The dialogue tests (unit and on the real broker) point the stage at it and tell it how to
misbehave: stall, fail with 500, send garbage, close mid-stream, or reject a wrong key.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The server shuts itself down after this long even if a test forgets to: no stray threads.
MAX_LIFETIME_S = 120.0
MAX_BODY_BYTES = 1_000_000  # a request body larger than this is a test bug


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Behaviour:
    """What the next requests get. `mode`: ok | stall | status | garbage | close_mid."""

    deltas: list[str] = field(default_factory=lambda: ["Hello", " there. How", " are you? "
                                                       "I am fine", "."])
    mode: str = "ok"
    status: int = 500
    stall_s: float = 5.0  # how long `stall` waits before answering (or until shutdown)
    key: str = ""  # when set, a request without exactly this key gets 401
    delay_s: float = 0.0  # pause between events, to make streaming observable


class FakeLLM:
    """`with FakeLLM() as llm:` serves on 127.0.0.1:`llm.port` until the block ends."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.seen: list[Seen] = []
        self._stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # a client that stops reading does not pin a thread forever

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        # A short poll lets close() return in tens of milliseconds, not the default 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)
        self._timer = threading.Timer(MAX_LIFETIME_S, self.close)
        self._timer.daemon = True

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._stopping.is_set():
            self._stopping.set()
            self._timer.cancel()
            self._server.shutdown()
            self._server.server_close()

    # --- the two wire formats ---------------------------------------------------------

    @staticmethod
    def _openai_events(deltas: list[str]) -> list[bytes]:
        first = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        out = [b"data: " + json.dumps(first).encode() + b"\n\n"]
        for d in deltas:
            chunk = {"choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]}
            out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        out.append(b"data: " + json.dumps(end).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out

    @staticmethod
    def _anthropic_events(deltas: list[str]) -> list[bytes]:
        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        out = [event("message_start", {"message": {"id": "msg_1", "role": "assistant",
                                                   "content": []}}),
               event("content_block_start", {"index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
               event("ping", {})]
        for d in deltas:
            out.append(event("content_block_delta", {"index": 0, "delta": {
                "type": "text_delta", "text": d}}))
        out += [event("content_block_stop", {"index": 0}),
                event("message_delta", {"delta": {"stop_reason": "end_turn"}}),
                event("message_stop", {})]
        return out

    # --- one request --------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        length = min(int(h.headers.get("content-length", "0")), MAX_BODY_BYTES)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = {}
        self.seen.append(Seen(h.path, {k.lower(): v for k, v in h.headers.items()}, body))
        anthropic = h.path.endswith("/v1/messages")
        if b.key:
            given = (h.headers.get("x-api-key", "") if anthropic
                     else h.headers.get("authorization", "").removeprefix("Bearer "))
            if given != b.key:  # echoing the key back, as some real servers do
                self._plain(h, 401, json.dumps({"error": {
                    "message": f"Incorrect API key provided: {given}"}}).encode())
                return
        if b.mode == "stall":
            self._stopping.wait(b.stall_s)
        if b.mode == "status":
            self._plain(h, b.status, b'{"error": {"message": "server on fire"}}')
            return
        events = (self._anthropic_events(b.deltas) if anthropic
                  else self._openai_events(b.deltas))
        if b.mode == "garbage":
            events = [events[0], b"data: {this is not json\n\n"] + events[1:]
        if b.mode == "close_mid":
            events = events[:len(events) // 2]
        try:
            h.send_response(200)
            h.send_header("content-type", "text/event-stream")
            h.send_header("cache-control", "no-cache")
            h.send_header("connection", "close")  # the body ends when the socket closes
            h.end_headers()
            for e in events:
                h.wfile.write(e)
                h.wfile.flush()
                if b.delay_s:
                    time.sleep(b.delay_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, cancel, max length): fine
        h.close_connection = True

    @staticmethod
    def _plain(h: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
