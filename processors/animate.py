"""animate stage: phoneme spans -> motion frames (52 ARKit blendshapes + head pose) at the
session frame rate, on the session media clock, in short chunks.

The motion (the neural model by default, or the procedural model it was trained on) is
deterministic for a session seed, so a replay reproduces it bit for bit. Live,
the stage's clock keeps an idle face moving (blinks, breath, gaze) between utterances.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import numpy as np
import numpy.typing as npt

from backbone.records import EMOTIONS, MotionFrames, PhonemeSpans, SessionControl
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control, session_config)
from backbone.tracing import new_traceparent, now_ms
from processors.motion_procedural import LOOKAHEAD_S, procedural_motion
from processors.tts import PHONEME_LEAD_S

F32 = npt.NDArray[np.float32]

CHUNK_S = 0.08  # motion records of 80 ms: 2 frames at 25 fps, 8 at 100 fps
TAIL_S = 0.4  # offline, after the last phoneme: let the mouth settle back to rest
KEEP_SPANS_S = 1.0  # spans kept in state for coarticulation across utterance boundaries
# Live idle frames trail the media clock by this much, so speech that tts (or the gateway)
# places "now" lands after the last idle frame: a hop takes a few ms, a tick 20 ms.
IDLE_LAG_S = 0.04
# Speech whose next phonemes have not come for this long is over (a tts instance died
# mid-utterance): the face goes idle rather than freezing.
STALE_SPEECH_S = 2.0
# After an outage longer than this, idle frames resume at the clock instead of back-filling
# (shorter stalls, e.g. a busy machine, are caught up so the video has no hole).
MAX_CATCH_UP_S = 5.0
EMOTION_RAMP_S = 0.3  # an emotion change blends over this long; a step reads as a glitch


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


def _cut(spans: list[tuple[str, int, int]], at: int) -> list[tuple[str, int, int]]:
    """Spans as heard when speech stopped at sample `at`."""
    return [(p, a, min(b, at)) for p, a, b in spans if a < at]


MODELS = ("neural", "procedural")


class AnimateStage(BaseStage):
    name = "animate"
    model_version = "procedural-1"
    inputs = ("session.control", "speech.phonemes")
    live = False  # set by the runtime from Settings.live
    lookahead_s = LOOKAHEAD_S  # phonemes needed past a frame before it can be final

    def __init__(self, model: str | None = None) -> None:
        self.clock: Callable[[], int] = now_ms  # wall clock in ms; tests substitute their own
        # AVATAR_MOTION_MODEL: "neural" (the trained viseme-to-motion diffusion, default) or
        # "procedural" (the articulation model it was trained on).
        self.model = model or os.environ.get("AVATAR_MOTION_MODEL", "neural")
        if self.model not in MODELS:
            raise ValueError(f"motion model must be one of {MODELS}, not {self.model!r}")
        self.neural: Any = None

    def start(self) -> None:
        if self.model == "neural":
            from processors.motion_neural import NeuralMotion

            self.neural = NeuralMotion()
            self.neural.start()
            self.model_version = self.neural.model_version
            self.lookahead_s = float(self.neural.lookahead_s)
            # The sampler is traced once per pass length (0.1-0.3 s each): do it now for the
            # default 25 fps (passes of 1-2 frames), not while a viewer waits on frames.
            for n in (1, 2):
                self.neural.generate([], 22050, 25.0, 0, n, seed=0, emotion="neutral",
                                     intensity=0.0, context=None)

    # ---- records ---------------------------------------------------------------------

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            self._control(value, record, state)
            return []
        if not isinstance(value, PhonemeSpans):
            raise RecordRejected(f"animate cannot use a {type(value).__name__}")
        if value.sample_rate <= 0:
            raise RecordRejected(f"sample rate {value.sample_rate} is not positive")
        new = _valid_spans(value)
        sr = value.sample_rate
        state.data.setdefault("t0_ms", record.event_time_ms)
        if state.data.get("sr", sr) != sr:
            state.data["spans"] = []  # a new clock rate: old spans are on another scale
        state.data["sr"] = sr
        spans = [tuple(s) for s in state.data.get("spans", [])]
        if new:
            if spans and new[0][1] < spans[-1][2]:
                spans = _cut(spans, new[0][1])  # a later utterance re-times what overlaps
            spans += new
        if value.cut_sample >= 0:
            spans = _cut(spans, value.cut_sample)
        if not spans:
            return []
        last_end = value.cut_sample if value.cut_sample >= 0 else spans[-1][2]
        state.data["spans"] = [list(s) for s in spans]
        fps = session_config(state).fps
        ended = value.is_last or value.cut_sample >= 0
        if ended:
            # Offline the utterance settles here; live the clock's idle frames do it.
            horizon_s = last_end / sr + (0.0 if self.live else TAIL_S)
            state.data.pop("speaking_ms", None)
        else:
            horizon_s = last_end / sr - self.lookahead_s
            if record.producer_stage == "tts":
                # tts has sent every phoneme starting before (audio sent + PHONEME_LEAD_S);
                # frames stop at the audio sent, so an interrupt there never leaves the
                # lips mouthing words nobody hears.
                horizon_s = min(horizon_s, spans[-1][1] / sr - PHONEME_LEAD_S)
            state.data["speaking_ms"] = self.clock()
        out = self._frames_until(state, int(np.ceil(horizon_s * fps)), value.utterance_id,
                                 value.is_last)
        # Only spans near frames still to come matter (coarticulation across utterances).
        keep_from = (int(state.data.get("next_frame", 0)) / fps - KEEP_SPANS_S) * sr
        state.data["spans"] = [s for s in state.data["spans"] if s[2] >= keep_from]
        return out

    def tick(self, state: SessionState, now: int) -> Iterable[Outbound]:
        if "t0_ms" not in state.data:
            return []
        speaking = state.data.get("speaking_ms")
        if speaking is not None and now - int(speaking) < STALE_SPEECH_S * 1000:
            return []
        fps = session_config(state).fps
        target = int(((now - int(state.data["t0_ms"])) / 1000 - IDLE_LAG_S) * fps)
        next_frame = int(state.data.get("next_frame", 0))
        if target <= next_frame:
            return []  # idle frames go out one by one: a viewer waits for none of them
        if target - next_frame > MAX_CATCH_UP_S * fps:
            state.data["next_frame"] = target - int(MAX_CATCH_UP_S * fps)
        # One trace per tick, shared by all its records: `replay rerender` tells the ticks
        # apart by it and makes each tick's frames in one call again, as here.
        return self._frames_until(state, target, "idle", False, new_traceparent())

    def resume(self, state: SessionState, logged: dict[str, Any]) -> None:
        """After a fail-over: go on after the last motion frame the dead instance logged
        (idle frames depend on when its clock ticked, so a replay would cut them otherwise)."""
        last = logged.get("motion")
        if isinstance(last, MotionFrames) and len(last.frames):
            state.data["next_frame"] = max(int(state.data.get("next_frame", 0)),
                                           int(last.frames[-1]) + 1)

    def _control(self, value: SessionControl, record: Inbound, state: SessionState) -> None:
        if value.action == "EMOTION":
            if value.emotion is not None and value.emotion not in EMOTIONS:
                raise RecordRejected(f"unknown emotion {value.emotion!r}; known: "
                                     f"{', '.join(EMOTIONS)}")
            if value.intensity is not None and not 0.0 <= value.intensity <= 1.0:
                raise RecordRejected(f"emotion intensity {value.intensity} is outside 0..1")
            before = session_config(state)
            state.data["ramp"] = [before.emotion, before.intensity,
                                  int(state.data.get("next_frame", 0))]
        remember_control(value, state)
        if value.action == "CREATE":
            state.data.setdefault("t0_ms", record.event_time_ms)

    # ---- frames ----------------------------------------------------------------------

    def _motion(self, state: SessionState, first: int, n: int) -> tuple[F32, F32]:
        cfg = session_config(state)
        sr = int(state.data.get("sr", 22050))
        spans = [tuple(s) for s in state.data.get("spans", [])]
        fps = float(cfg.fps)
        if self.neural is not None:
            # The model blends emotion changes itself; its context (the last frames it
            # made) lives in the checkpointed state, so a replay continues bit for bit.
            w, h, ctx = self.neural.generate(spans, sr, fps, first, n, seed=cfg.seed,
                                             emotion=cfg.emotion, intensity=cfg.intensity,
                                             context=state.data.get("motion_ctx"))
            state.data["motion_ctx"] = ctx
            state.data.pop("ramp", None)
            return np.asarray(w, np.float32), np.asarray(h, np.float32)
        weights, head = procedural_motion(spans, sr, fps, first, n, seed=cfg.seed,
                                          emotion=cfg.emotion, intensity=cfg.intensity)
        ramp: list[Any] | None = state.data.get("ramp")
        if ramp is not None:
            length = max(1, round(EMOTION_RAMP_S * fps))
            if first >= int(ramp[2]) + length:
                state.data.pop("ramp", None)
            else:
                old_w, old_h = procedural_motion(spans, sr, fps, first, n, seed=cfg.seed,
                                                 emotion=str(ramp[0]), intensity=float(ramp[1]))
                u = np.clip((np.arange(first, first + n) - int(ramp[2])) / length, 0.0, 1.0)
                a = (u * u * (3 - 2 * u))[:, None]  # smoothstep: no kink at either end
                weights = (old_w + (weights - old_w) * a).astype(np.float32)
                head = (old_h + (head - old_h) * a).astype(np.float32)
        return weights.astype(np.float32), head.astype(np.float32)

    def _frames_until(self, state: SessionState, end_frame: int, utterance_id: str,
                      is_last: bool, traceparent: str = "") -> list[Outbound]:
        next_frame = int(state.data.get("next_frame", 0))
        if end_frame <= next_frame:
            return []
        fps = session_config(state).fps
        n = end_frame - next_frame
        weights, head = self._motion(state, next_frame, n)
        state.data["next_frame"] = end_frame
        per_chunk = max(1, round(CHUNK_S * fps))
        out = []
        for a in range(0, n, per_chunk):
            b = min(a + per_chunk, n)
            out.append(Outbound("motion", MotionFrames(
                state.session_id, fps, np.arange(next_frame + a, next_frame + b, dtype=np.int64),
                weights[a:b], head[a:b], utterance_id, is_last=is_last and b == n),
                traceparent=traceparent))
        return out
