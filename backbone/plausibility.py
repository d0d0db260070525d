"""Values no record can carry, checked by the runtime right after decoding (before a stage
sees the record): a record that fails is dead-lettered as `invalid` with the reason.

Avro guarantees types, not sense: a producer on the bus (not only our gateway, which
validates its own input) can write NaN blendshapes, a sample rate of zero or a media position
a million years ahead, and a stage would render garbage or hold state for it forever.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Final

import numpy as np

from backbone.records import (AudioChunk, MotionFrames, PhonemeSpans, RecordValue, SessionControl,
                              SpeechChunk, VideoChunk)

# A session's media clock never reaches a day: a position beyond it is corrupt or hostile.
MAX_MEDIA_S: Final = 24 * 3600
RATE_RANGE: Final = (1000, 192_000)  # Hz: telephony up to studio audio
FPS_RANGE: Final = (1, 1000)
MAX_RESOLUTION: Final = 4096


def _non_finite(value: Any, where: str) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return where
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            bad = _non_finite(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
            if bad:
                return bad
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            bad = _non_finite(item, f"{where}[{i}]")
            if bad:
                return bad
    return None


def _position(start: int, rate: int, what: str) -> str | None:
    if start < 0:
        return f"{what} {start} is before the session started"
    if start / rate > MAX_MEDIA_S:
        return f"{what} {start} is {start / rate / 3600:.0f} h into the session (limit 24 h)"
    return None


def _rate(rate: int) -> str | None:
    lo, hi = RATE_RANGE
    return None if lo <= rate <= hi else f"sample_rate {rate} outside {lo}..{hi}"


def implausible(value: RecordValue) -> str | None:
    """Why `value` cannot be real, or None."""
    bad = _non_finite(value, "")
    if bad:
        return f"non-finite number in {bad}"
    if isinstance(value, (SpeechChunk, AudioChunk)):
        return _rate(value.sample_rate) or _position(value.start_sample, value.sample_rate,
                                                     "start_sample")
    if isinstance(value, PhonemeSpans):
        if _rate(value.sample_rate):
            return _rate(value.sample_rate)
        for s in value.spans:
            why = _position(s.start_sample, value.sample_rate, f"span {s.phoneme!r} start")
            if why:
                return why
            if s.end_sample < s.start_sample:
                return f"span {s.phoneme!r} ends ({s.end_sample}) before it starts ({s.start_sample})"
        return None
    if isinstance(value, (MotionFrames, VideoChunk)):
        lo, hi = FPS_RANGE
        if not lo <= value.fps <= hi:
            return f"fps {value.fps} outside {lo}..{hi}"
        frames = value.frames.tolist() if isinstance(value, MotionFrames) else [value.pts]
        for f in frames:
            why = _position(int(f), value.fps, "frame")
            if why:
                return why
        return None
    if isinstance(value, SessionControl) and value.config is not None:
        cfg = value.config
        lo, hi = FPS_RANGE
        if not lo <= cfg.fps <= hi:
            return f"config fps {cfg.fps} outside {lo}..{hi}"
        if not 1 <= cfg.resolution <= MAX_RESOLUTION:
            return f"config resolution {cfg.resolution} outside 1..{MAX_RESOLUTION}"
    return None
