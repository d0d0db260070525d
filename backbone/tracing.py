"""The headers every record carries, and W3C trace context propagation between stages."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from backbone.bus import Headers, Message

H_SESSION = "session"
H_SEQ = "seq"
H_TRACEPARENT = "traceparent"
H_EVENT_TIME = "event_time_ms"
H_STAGE = "stage"
H_MODEL = "model_version"
H_SCHEMA = "schema"

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_traceparent(trace_id: str | None = None) -> str:
    trace = trace_id or os.urandom(16).hex()
    return f"00-{trace}-{os.urandom(8).hex()}-01"


def child_traceparent(parent: str) -> str:
    """Same trace, new span: each hop is a span of the originating request's trace."""
    m = _TRACEPARENT.match(parent)
    return new_traceparent(m.group(1) if m else None)


def trace_id(traceparent: str) -> str:
    m = _TRACEPARENT.match(traceparent)
    return m.group(1) if m else ""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RecordHeaders:
    session: str
    seq: int
    traceparent: str
    event_time_ms: int
    stage: str
    model_version: str
    schema: str = ""

    def encode(self) -> Headers:
        return ((H_SESSION, self.session.encode()), (H_SEQ, str(self.seq).encode()),
                (H_TRACEPARENT, self.traceparent.encode()),
                (H_EVENT_TIME, str(self.event_time_ms).encode()),
                (H_STAGE, self.stage.encode()), (H_MODEL, self.model_version.encode()),
                (H_SCHEMA, self.schema.encode()))

    @classmethod
    def decode(cls, msg: Message) -> RecordHeaders:
        """Lenient: records from outside the system may lack headers; missing seq is -1."""
        def text(name: str) -> str:
            v = msg.header(name)
            return v.decode("utf-8", "replace") if v else ""

        def number(name: str, default: int) -> int:
            try:
                return int(text(name))
            except ValueError:
                return default

        session = text(H_SESSION) or (msg.key or b"").decode("utf-8", "replace")
        return cls(session, number(H_SEQ, -1), text(H_TRACEPARENT),
                   number(H_EVENT_TIME, msg.timestamp_ms), text(H_STAGE), text(H_MODEL),
                   text(H_SCHEMA))
