"""Reads one session's records back from the log, in order, with at-least-once replays
removed: the building block of export, verification and the demo's MP4."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from backbone.bus import Bus, Message
from backbone.codec import AvroCodec, DecodeError
from backbone.records import RecordValue, SpeechChunk, VideoChunk
from backbone.sealing import KeyStore, SealedError, is_sealed, unseal
from backbone.settings import Settings
from backbone.topics import TOPICS
from backbone.tracing import RecordHeaders


@dataclass(frozen=True)
class LoggedRecord:
    message: Message
    headers: RecordHeaders
    value: RecordValue | None  # None when read with decode=False


def session_span(index: dict[str, Any] | None, topic: str) -> tuple[int, int] | None:
    """(first offset, end offset) of a session's records on `topic` from the session index
    (replay/index.py), or None: then the session's partition is read from its start."""
    span = (index or {}).get("topics", {}).get(topic)
    return (int(span["first"]), int(span["last"]) + 1) if span else None


def read_session(bus: Bus, settings: Settings, session_id: str, topic: str,
                 codec: AvroCodec | None = None, decode: bool = True,
                 index: dict[str, Any] | None = None) -> list[LoggedRecord]:
    """Every record of `session_id` on logical `topic`, in log order, each (producer, seq)
    once. Undecodable records are skipped here; they are already in the dead-letter topic.
    `decode=False` leaves values undecoded (None): counting and timing need only headers."""
    codec = codec or AvroCodec(registry_url=settings.schema_registry_url)
    admin = bus.admin()
    physical = settings.topic(topic)
    key = session_id.encode()
    partition = admin.partitions_for(key, physical)
    seen: set[tuple[str, int]] = set()
    out = []
    keys: KeyStore | None = None
    erased = False
    span = session_span(index, topic)
    for msg in admin.read(physical, partition, *(span or (0,))):
        if msg.key != key:
            continue
        hdr = RecordHeaders.decode(msg)
        if hdr.seq >= 0:
            if (hdr.stage, hdr.seq) in seen:
                continue
            seen.add((hdr.stage, hdr.seq))
        if not decode:
            out.append(LoggedRecord(msg, hdr, None))
            continue
        body = msg.value
        if is_sealed(body):
            keys = keys or KeyStore(settings, bus)
            try:
                body = unseal(keys.key(session_id), session_id, topic, body or b"")
            except SealedError:
                erased = True
                continue
        try:
            value = codec.decode(body, TOPICS[topic].schema)
        except DecodeError:
            continue
        out.append(LoggedRecord(msg, hdr, value))
    if erased and not out:
        raise SealedError(f"session {session_id} was erased: its records on {topic} are "
                          "sealed with a data key that no longer exists")
    return out


def session_audio(records: list[LoggedRecord]) -> tuple[np.ndarray, int]:
    """Speech chunks laid on the session clock; silence where nothing was said."""
    chunks = [r.value for r in records if isinstance(r.value, SpeechChunk)]
    if not chunks:
        return np.zeros(0, dtype=np.int16), 22050
    sr = chunks[0].sample_rate
    end = max(c.start_sample + c.n_samples for c in chunks)
    pcm = np.zeros(end, dtype=np.int16)
    for c in chunks:
        pcm[c.start_sample:c.start_sample + c.n_samples] = np.frombuffer(c.pcm, dtype="<i2")
    return pcm, sr


def session_video(records: list[LoggedRecord]) -> list[VideoChunk]:
    """Video access units in decode order, one per pts (a replayed frame keeps the first)."""
    by_pts: dict[int, VideoChunk] = {}
    for r in records:
        if isinstance(r.value, VideoChunk) and r.value.pts not in by_pts:
            by_pts[r.value.pts] = r.value
    return [by_pts[k] for k in sorted(by_pts)]
