"""animate stage: phoneme spans -> motion frames (52 ARKit blendshapes + head pose) at the
session frame rate, on the session media clock, in short chunks.

The motion is deterministic for a session seed, so a replay reproduces it bit for bit.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from backbone.records import MotionFrames, PhonemeSpans, SessionControl
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control, session_config)
from processors.motion_procedural import procedural_motion

CHUNK_S = 0.08  # motion records of 80 ms: 2 frames at 25 fps, 8 at 100 fps
TAIL_S = 0.4  # after the last phoneme, let the mouth settle back to rest
KEEP_SPANS_S = 1.0  # spans kept in state for coarticulation across utterance boundaries


def _valid_spans(value: PhonemeSpans) -> list[tuple[str, int, int]]:
    spans = []
    last_end = -1
    for s in value.spans:
        if s.end_sample <= s.start_sample:
            raise RecordRejected(f"phoneme {s.phoneme!r} has an empty or backwards span "
                                 f"[{s.start_sample}, {s.end_sample})")
        if s.start_sample < last_end:
            raise RecordRejected(f"phoneme {s.phoneme!r} at {s.start_sample} overlaps the "
                                 f"previous span ending at {last_end}")
        spans.append((s.phoneme, s.start_sample, s.end_sample))
        last_end = s.end_sample
    return spans


class AnimateStage(BaseStage):
    name = "animate"
    model_version = "procedural-1"
    inputs = ("session.control", "speech.phonemes")

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            remember_control(value, state)
            return []
        if not isinstance(value, PhonemeSpans):
            raise RecordRejected(f"animate cannot use a {type(value).__name__}")
        if value.sample_rate <= 0:
            raise RecordRejected(f"sample rate {value.sample_rate} is not positive")
        new = _valid_spans(value)
        if not new:
            return []
        cfg = session_config(state)
        sr = value.sample_rate
        kept: list[Any] = [s for s in state.data.get("spans", [])
                           if s[2] >= new[0][1] - KEEP_SPANS_S * sr]
        spans = [tuple(s) for s in kept] + new
        state.data["spans"] = [list(s) for s in spans]
        fps = cfg.fps
        next_frame = int(state.data.get("next_frame", 0))
        end_frame = int(np.ceil((new[-1][2] / sr + TAIL_S) * fps))
        if end_frame <= next_frame:
            return []
        weights, head = procedural_motion(spans, sr, float(fps), next_frame,
                                          end_frame - next_frame, seed=cfg.seed,
                                          emotion=cfg.emotion, intensity=cfg.intensity)
        state.data["next_frame"] = end_frame
        per_chunk = max(1, round(CHUNK_S * fps))
        out = []
        for a in range(0, end_frame - next_frame, per_chunk):
            b = min(a + per_chunk, end_frame - next_frame)
            out.append(Outbound("motion", MotionFrames(
                value.session_id, fps, np.arange(next_frame + a, next_frame + b, dtype=np.int64),
                weights[a:b], head[a:b], value.utterance_id,
                is_last=value.is_last and b == end_frame - next_frame)))
        return out
