"""`avatar replay erase SESSION`: crypto-shred one session and say so in the audit trail.

The session's records stay in the immutable log, sealed with a data key that no longer
exists (backbone/sealing.py); an audit record, chained like every other, says when and at
whose request the key was erased, so the log explains its own unreadable part.
"""
from __future__ import annotations

import time

from backbone import integrity
from backbone.bus import Bus
from backbone.codec import AvroCodec
from backbone.records import IntegrityCheckpoint
from backbone.sealing import KeyStore
from backbone.settings import Settings
from backbone.tracing import RecordHeaders, new_traceparent, now_ms


def erase_session(bus: Bus, settings: Settings, session_id: str, by: str) -> str:
    KeyStore(settings, bus).erase(session_id)
    note = f"data key erased at the request of {by}: the session's records can no longer be read"
    record = IntegrityCheckpoint(session_id, "erasure", (), now_ms(), note)
    topic = settings.topic("audit")
    payload = AvroCodec(registry_url=settings.schema_registry_url).encode(record, topic)
    seq = time.time_ns() // 1000
    headers = RecordHeaders(session_id, seq, new_traceparent(), now_ms(), "erasure", "replay",
                            record.SCHEMA).encode()
    headers += integrity.Chains().next(session_id, "audit", "erasure", seq, payload)
    producer = bus.producer()
    producer.produce(topic, session_id.encode(), payload, headers)
    if producer.flush(30) != 0:
        raise RuntimeError("the erasure record was not acknowledged; run the command again")
    return f"session {session_id}: {note}"
