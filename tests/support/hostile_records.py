"""Hostile records for every input topic: broken bytes, wrong schemas, lying lengths, missing
keys and valid Avro carrying impossible values. Shared by the unit (embedded bus) and the
real-broker hostile-input tests; each case says which dead-letter categories it may get."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from backbone.codec import AvroCodec
from backbone.records import (AudioChunk, MotionFrames, PhonemeSpan, PhonemeSpans, RecordValue,
                              ReplyText, SessionConfig, SessionControl, SpeechChunk, Transcript,
                              VideoChunk)
from backbone.stages import STAGES, load_stage

CODEC = AvroCodec()
SESSION = "fuzz-1"
BYTE_CATEGORIES = {"undecodable", "schema_mismatch", "invalid", "oversized"}
# Oversized cases are this much over the limit the stages under test run with.
MAX_RECORD_BYTES = 200_000


def stage_inputs() -> dict[str, tuple[str, ...]]:
    """Each registered stage's input topics (class attributes: no model is loaded)."""
    import importlib

    out = {}
    for name, target in STAGES.items():
        module, cls = target.split(":")
        out[name] = tuple(getattr(importlib.import_module(module), cls).inputs)
    return out


def sample(topic: str, session: str = SESSION) -> RecordValue:
    """A valid record for `topic`."""
    sr = 22050
    tone = (np.sin(np.arange(sr // 10) * 0.2) * 8000).astype("<i2").tobytes()
    return {
        "session.control": SessionControl(session, "CREATE", SessionConfig(fps=25, resolution=256)),
        "audio.in": AudioChunk(session, 16000, 0, tone[:3200]),
        "transcript": Transcript(session, "hello there"),
        "reply": ReplyText(session, "u0", "Hello there."),
        "speech.audio": SpeechChunk(session, "u0", sr, 0, tone),
        "speech.phonemes": PhonemeSpans(session, "u0", sr, (PhonemeSpan("h", 0, 1000),
                                                            PhonemeSpan("@", 1000, 3000))),
        "motion": MotionFrames(session, 25, np.arange(2), np.zeros((2, 52), np.float32),
                               np.zeros((2, 3), np.float32)),
        "video": VideoChunk(session, 256, 256, 25, 0, 0, True, b"\x00\x00\x01\x65"),
    }[topic]


def _wrong(topic: str) -> RecordValue:
    if topic in ("motion", "video"):
        return Transcript(SESSION, f"not {topic}")
    return VideoChunk(SESSION, 256, 256, 25, 0, 0, True, b"\x00\x00\x01\x65")


@dataclass(frozen=True)
class Hostile:
    name: str
    topic: str
    key: bytes | None
    value: bytes | None
    categories: frozenset[str]  # dead-letter categories this case may get
    headers: tuple[tuple[str, bytes], ...] = ()


def _varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def byte_cases(topic: str, seed: int = 9) -> list[Hostile]:
    """Broken bytes and envelopes: every one must be dead-lettered by every reader of `topic`."""
    rng = random.Random(f"{seed}-{topic}")
    good = CODEC.encode(sample(topic))
    head, body = good[:10], good[10:]
    flipped = bytearray(good)
    flipped[2 + rng.randrange(8)] ^= 1 << rng.randrange(8)  # one bit of the schema fingerprint
    noise = bytes([0xFF]) + bytes(rng.randrange(256) for _ in range(299))
    key = SESSION.encode()
    u, s = frozenset({"undecodable"}), frozenset({"schema_mismatch"})
    return [
        Hostile("truncated", topic, key, head + body[:len(body) // 2], u),
        Hostile("fingerprint_bit_flip", topic, key, bytes(flipped), s),
        Hostile("random_bytes", topic, key, noise, u),
        Hostile("wrong_schema", topic, key, CODEC.encode(_wrong(topic)), s),
        # The first field (session_id) claims 2^50 bytes: nothing may try to allocate it.
        Hostile("huge_length", topic, key, head + _varint(2 ** 50) + body[1:], u),
        Hostile("trailing_garbage", topic, key, good + b"\x00junk", u),
        Hostile("empty", topic, key, b"", u),
        Hostile("tombstone", topic, key, None, u),
        Hostile("no_session_key", topic, None, good, frozenset({"invalid"})),
        Hostile("key_differs_from_session", topic, b"someone-else", good,
                frozenset({"invalid"})),
        Hostile("oversized", topic, key, head + bytes(MAX_RECORD_BYTES + 1000),
                frozenset({"oversized"})),
    ]


def value_cases() -> list[tuple[str, str, RecordValue]]:
    """(name, topic, record): valid Avro carrying values no stage can use. The stage that
    uses the topic's data must dead-letter each (any category, with a reason)."""
    s, sr = SESSION, 22050
    z52, z3 = np.zeros((1, 52), np.float32), np.zeros((1, 3), np.float32)
    nan52 = np.full((1, 52), np.nan, np.float32)
    pcm = (np.arange(2205) % 200 * 40).astype("<i2").tobytes()
    return [
        ("control_fps_zero", "session.control",
         SessionControl(s, "CREATE", SessionConfig(fps=0, resolution=256))),
        ("control_huge_resolution", "session.control",
         SessionControl(s, "CREATE", SessionConfig(fps=25, resolution=1 << 20))),
        ("control_nan_intensity", "session.control",
         SessionControl(s, "EMOTION", emotion="happy", intensity=float("nan"))),
        ("audio_in_rate_zero", "audio.in", AudioChunk(s, 0, 0, pcm)),
        ("audio_in_odd_bytes", "audio.in", AudioChunk(s, 16000, 0, b"\x01\x02\x03")),
        ("speech_rate_zero", "speech.audio", SpeechChunk(s, "x0", 0, 0, pcm)),
        ("speech_far_future", "speech.audio", SpeechChunk(s, "x1", sr, 2 ** 62, pcm)),
        ("speech_negative_start", "speech.audio", SpeechChunk(s, "x2", sr, -sr, pcm)),
        ("phonemes_rate_zero", "speech.phonemes",
         PhonemeSpans(s, "x3", 0, (PhonemeSpan("a", 0, 100),))),
        ("phonemes_far_future", "speech.phonemes",
         PhonemeSpans(s, "x4", sr, (PhonemeSpan("a", 2 ** 62, 2 ** 62 + 100),))),
        ("phonemes_end_before_start", "speech.phonemes",
         PhonemeSpans(s, "x5", sr, (PhonemeSpan("a", 5000, 100),))),
        ("motion_nan", "motion", MotionFrames(s, 25, np.array([3]), nan52, z3)),
        ("motion_far_frame", "motion", MotionFrames(s, 25, np.array([2 ** 40]), z52, z3)),
        ("motion_fps_zero", "motion", MotionFrames(s, 0, np.array([4]), z52, z3)),
        ("transcript_nan_confidence", "transcript",
         Transcript(s, "hi", True, 0, 0, float("nan"))),
        ("reply_blank", "reply", ReplyText(s, "x6", "   ")),
    ]


def readers(topic: str) -> list[str]:
    return [name for name, ins in stage_inputs().items() if topic in ins]


def load(name: str) -> object:
    return load_stage(name)
