"""The topic map: what each topic carries, how it is partitioned and how long it is kept.

Every topic is keyed by session id; `avatar topics create` provisions them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DAY_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schema: str  # file stem in schemas/
    retention_ms: int
    doc: str
    compacted: bool = False
    # Payloads are encrypted with the session's data key when sealing is on (AVATAR_SEAL).
    sealed: bool = True


TOPICS: Final[dict[str, TopicSpec]] = {t.name: t for t in (
    TopicSpec("session.control", "session_control", 30 * DAY_MS,
              "create (with config), interrupt, emotion, end"),
    TopicSpec("audio.in", "audio_chunk", 7 * DAY_MS, "user audio for asr"),
    TopicSpec("transcript", "transcript", 30 * DAY_MS, "what the user said or typed"),
    TopicSpec("reply", "reply_text", 30 * DAY_MS, "text the avatar will speak"),
    TopicSpec("speech.audio", "speech_chunk", 30 * DAY_MS,
              "speech PCM on the session media clock"),
    TopicSpec("speech.phonemes", "phoneme_spans", 30 * DAY_MS,
              "phoneme spans on the session media clock"),
    TopicSpec("motion", "motion_frames", 30 * DAY_MS, "52 ARKit blendshapes + head pose per frame"),
    TopicSpec("video", "video_chunk", 30 * DAY_MS, "encoded video access units as streamed"),
    TopicSpec("deadletter", "dead_letter", 30 * DAY_MS,
              "records a stage could not use, with reason and original bytes"),
    # Never sealed: the chain heads must stay readable after a session's key is erased.
    TopicSpec("audit", "integrity_checkpoint", 365 * DAY_MS,
              "each producer's integrity chain heads per session, for replay verify",
              sealed=False),
)}


def state_topic(stage: str) -> str:
    """Compacted changelog of one stage's per-session state (restored on rebalance)."""
    return f"state.{stage}"
