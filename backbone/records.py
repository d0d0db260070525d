"""What flows on the bus: one small dataclass per Avro record type in `schemas/`.

Stages see these, never bytes; `backbone.codec` turns them into Avro and back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from backbone.blendshapes import BLENDSHAPES, HEAD_POSE

ControlAction = str  # "CREATE" | "INTERRUPT" | "EMOTION" | "END"
CONTROL_ACTIONS = ("CREATE", "INTERRUPT", "EMOTION", "END")
EMOTIONS = ("neutral", "happy", "sad", "angry", "surprised")


@dataclass(frozen=True)
class SessionConfig:
    portrait: str = "astronaut"
    voice: str = "en-us"
    language: str = "en"
    rate_wpm: int = 175
    pitch: int = 50
    fps: int = 25
    resolution: int = 512
    emotion: str = "neutral"
    intensity: float = 0.0
    dialogue: str = "echo"
    seed: int = 0
    consent: Mapping[str, str] = field(default_factory=dict)
    owner: str = ""  # the API key *name* that created the session (who may drive it)

    def to_avro(self) -> dict[str, Any]:
        return {
            "portrait": self.portrait, "voice": self.voice, "language": self.language,
            "rate_wpm": self.rate_wpm, "pitch": self.pitch, "fps": self.fps,
            "resolution": self.resolution, "emotion": self.emotion,
            "intensity": self.intensity, "dialogue": self.dialogue, "seed": self.seed,
            "consent": dict(self.consent), "owner": self.owner,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> SessionConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class SessionControl:
    SCHEMA: ClassVar[str] = "session_control"
    session_id: str
    action: ControlAction
    config: SessionConfig | None = None
    emotion: str | None = None
    intensity: float | None = None

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "action": self.action,
            "config": None if self.config is None else self.config.to_avro(),
            "emotion": self.emotion, "intensity": self.intensity,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> SessionControl:
        cfg = d.get("config")
        return cls(d["session_id"], d["action"],
                   None if cfg is None else SessionConfig.from_avro(cfg),
                   d.get("emotion"), d.get("intensity"))


@dataclass(frozen=True)
class AudioChunk:
    SCHEMA: ClassVar[str] = "audio_chunk"
    session_id: str
    sample_rate: int
    start_sample: int
    data: bytes
    channels: int = 1
    encoding: str = "PCM_S16LE"
    final: bool = False

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "sample_rate": self.sample_rate,
            "channels": self.channels, "encoding": self.encoding,
            "start_sample": self.start_sample, "data": self.data, "final": self.final,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> AudioChunk:
        return cls(d["session_id"], d["sample_rate"], d["start_sample"], d["data"],
                   d["channels"], d["encoding"], d["final"])


@dataclass(frozen=True)
class Transcript:
    SCHEMA: ClassVar[str] = "transcript"
    session_id: str
    text: str
    is_final: bool = True
    start_ms: int = 0
    end_ms: int = 0
    confidence: float = 1.0
    source: str = "text"

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "text": self.text, "is_final": self.is_final,
            "start_ms": self.start_ms, "end_ms": self.end_ms,
            "confidence": self.confidence, "source": self.source,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Transcript:
        return cls(d["session_id"], d["text"], d["is_final"], d["start_ms"], d["end_ms"],
                   d["confidence"], d["source"])


@dataclass(frozen=True)
class ReplyText:
    SCHEMA: ClassVar[str] = "reply_text"
    session_id: str
    utterance_id: str
    text: str
    chunk_index: int = 0
    is_last: bool = True

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "utterance_id": self.utterance_id,
            "chunk_index": self.chunk_index, "text": self.text, "is_last": self.is_last,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> ReplyText:
        return cls(d["session_id"], d["utterance_id"], d["text"], d["chunk_index"], d["is_last"])


@dataclass(frozen=True)
class SpeechChunk:
    SCHEMA: ClassVar[str] = "speech_chunk"
    session_id: str
    utterance_id: str
    sample_rate: int
    start_sample: int
    pcm: bytes  # mono s16le
    is_last: bool = False

    @property
    def n_samples(self) -> int:
        return len(self.pcm) // 2

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "utterance_id": self.utterance_id,
            "sample_rate": self.sample_rate, "start_sample": self.start_sample,
            "pcm": self.pcm, "is_last": self.is_last,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> SpeechChunk:
        return cls(d["session_id"], d["utterance_id"], d["sample_rate"], d["start_sample"],
                   d["pcm"], d["is_last"])


@dataclass(frozen=True)
class PhonemeSpan:
    phoneme: str
    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class PhonemeSpans:
    SCHEMA: ClassVar[str] = "phoneme_spans"
    session_id: str
    utterance_id: str
    sample_rate: int
    spans: tuple[PhonemeSpan, ...]
    is_last: bool = False
    source: str = "tts"
    cut_sample: int = -1  # an interrupt stopped speech here; later spans were never heard
    # The last span is still being spoken (its end is provisional); the next record of the
    # utterance repeats it from the same start with its final end.
    last_open: bool = False

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "utterance_id": self.utterance_id,
            "sample_rate": self.sample_rate,
            "spans": [{"phoneme": s.phoneme, "start_sample": s.start_sample,
                       "end_sample": s.end_sample} for s in self.spans],
            "is_last": self.is_last, "source": self.source, "cut_sample": self.cut_sample,
            "last_open": self.last_open,
        }

    @property
    def final_spans(self) -> tuple[PhonemeSpan, ...]:
        """The spans whose timing will not change (all but an open last one)."""
        return self.spans[:-1] if self.last_open else self.spans

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> PhonemeSpans:
        spans = tuple(PhonemeSpan(s["phoneme"], s["start_sample"], s["end_sample"])
                      for s in d["spans"])
        return cls(d["session_id"], d["utterance_id"], d["sample_rate"], spans,
                   d["is_last"], d["source"], d.get("cut_sample", -1),
                   d.get("last_open", False))


@dataclass(frozen=True, eq=False)
class MotionFrames:
    """`weights` is (n, 52) float32 in BLENDSHAPES order; `head` is (n, 3) yaw/pitch/roll."""

    SCHEMA: ClassVar[str] = "motion_frames"
    session_id: str
    fps: int
    frames: np.ndarray  # (n,) int64 frame indices on the session clock
    weights: np.ndarray
    head: np.ndarray
    utterance_id: str = ""
    is_last: bool = False

    def to_avro(self) -> dict[str, Any]:
        frames = []
        w = self.weights.astype(np.float32).tolist()
        h = self.head.astype(np.float32).tolist()
        for k, idx in enumerate(self.frames.tolist()):
            frames.append({
                "frame": idx,
                "blendshapes": dict(zip(BLENDSHAPES, w[k])),
                "head": dict(zip(HEAD_POSE, h[k])),
            })
        return {"session_id": self.session_id, "utterance_id": self.utterance_id,
                "fps": self.fps, "frames": frames, "is_last": self.is_last}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> MotionFrames:
        fr = d["frames"]
        idx = np.array([f["frame"] for f in fr], dtype=np.int64)
        w = np.array([[f["blendshapes"][n] for n in BLENDSHAPES] for f in fr],
                     dtype=np.float32).reshape(len(fr), len(BLENDSHAPES))
        h = np.array([[f["head"][n] for n in HEAD_POSE] for f in fr],
                     dtype=np.float32).reshape(len(fr), 3)
        return cls(d["session_id"], d["fps"], idx, w, h, d["utterance_id"], d["is_last"])


@dataclass(frozen=True)
class VideoChunk:
    SCHEMA: ClassVar[str] = "video_chunk"
    session_id: str
    width: int
    height: int
    fps: int
    pts: int
    dts: int
    keyframe: bool
    data: bytes
    codec: str = "h264"
    extradata: bytes | None = None
    is_last: bool = False

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "codec": self.codec, "width": self.width,
            "height": self.height, "fps": self.fps, "pts": self.pts, "dts": self.dts,
            "keyframe": self.keyframe, "data": self.data, "extradata": self.extradata,
            "is_last": self.is_last,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> VideoChunk:
        return cls(d["session_id"], d["width"], d["height"], d["fps"], d["pts"], d["dts"],
                   d["keyframe"], d["data"], d["codec"], d["extradata"], d["is_last"])


@dataclass(frozen=True)
class DeadLetter:
    SCHEMA: ClassVar[str] = "dead_letter"
    session_id: str | None
    stage: str
    category: str
    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, bytes]
    timestamp_ms: int

    def to_avro(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "stage": self.stage, "category": self.category,
            "reason": self.reason, "topic": self.topic, "partition": self.partition,
            "offset": self.offset, "key": self.key, "value": self.value,
            "headers": dict(self.headers), "timestamp_ms": self.timestamp_ms,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> DeadLetter:
        return cls(d["session_id"], d["stage"], d["category"], d["reason"], d["topic"],
                   d["partition"], d["offset"], d["key"], d["value"], d["headers"],
                   d["timestamp_ms"])


@dataclass(frozen=True)
class ChainHead:
    topic: str
    seq: int
    link: str  # hex


@dataclass(frozen=True)
class IntegrityCheckpoint:
    """A producer's chain heads for one session (see backbone/integrity.py)."""

    SCHEMA: ClassVar[str] = "integrity_checkpoint"
    session_id: str
    stage: str
    heads: tuple[ChainHead, ...]
    time_ms: int
    note: str = ""  # an audit event in words (an erasure), else empty

    def to_avro(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "stage": self.stage, "time_ms": self.time_ms,
                "heads": [{"topic": h.topic, "seq": h.seq, "link": h.link} for h in self.heads],
                "note": self.note}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> IntegrityCheckpoint:
        return cls(d["session_id"], d["stage"],
                   tuple(ChainHead(h["topic"], h["seq"], h["link"]) for h in d["heads"]),
                   d["time_ms"], d.get("note", ""))


RecordValue = (SessionControl | AudioChunk | Transcript | ReplyText | SpeechChunk
               | PhonemeSpans | MotionFrames | VideoChunk | DeadLetter | IntegrityCheckpoint)

RECORD_TYPES: dict[str, type[Any]] = {
    c.SCHEMA: c for c in (SessionControl, AudioChunk, Transcript, ReplyText, SpeechChunk,
                          PhonemeSpans, MotionFrames, VideoChunk, DeadLetter,
                          IntegrityCheckpoint)
}
