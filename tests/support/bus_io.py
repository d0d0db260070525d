"""Producing and reading records in tests, on either bus, the way the gateway would."""
from __future__ import annotations

from backbone.bus import Bus, Message
from backbone.codec import AvroCodec
from backbone.records import RecordValue
from backbone.settings import Settings
from backbone.tracing import RecordHeaders, new_traceparent, now_ms

CODEC = AvroCodec()


def send(bus: Bus, settings: Settings, topic: str, value: RecordValue, seq: int,
         stage: str = "test", event_time_ms: int | None = None) -> None:
    p = getattr(bus, "_test_producer", None)
    if p is None:  # one producer per bus: a new idempotent producer costs a PID round trip
        p = bus.producer()
        bus._test_producer = p  # type: ignore[attr-defined]
    physical = settings.topic(topic)
    headers = RecordHeaders(value.session_id, seq, new_traceparent(),  # type: ignore[union-attr]
                            event_time_ms or now_ms(), stage, "test", value.SCHEMA).encode()
    p.produce(physical, value.session_id.encode(), CODEC.encode(value, physical),  # type: ignore[union-attr]
              headers)
    assert p.flush(10) == 0


def read_all(bus: Bus, settings: Settings, topic: str) -> list[Message]:
    admin = bus.admin()
    physical = settings.topic(topic)
    out: list[Message] = []
    for p in range(admin.list_topics()[physical]):
        out.extend(admin.read(physical, p))
    return out


def decode(msg: Message, schema: str) -> RecordValue:
    return CODEC.decode(msg.value, schema)
