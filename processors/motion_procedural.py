"""Procedural articulation: phoneme spans to ARKit blendshape weights and head pose per frame.

The animate stage's baseline motion model, and the teacher the neural motion model trains
on: viseme shapes blended by coarticulation, lip closures enforced, idle life and emotion.

Every frame is a pure function of (its time, the spans near it, seed, emotion), with random
choices drawn from a counter-based hash, so frames computed in any chunking are bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from backbone.blendshapes import BLENDSHAPES, HEAD_POSE, INDEX
from processors import visemes

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

# Coarticulation: a sound's shape starts forming before it (anticipation, longer: lip
# rounding is seen up to ~150 ms ahead) and lingers after it (carry-over).
ANTICIPATION_S: Final = 0.14
CARRYOVER_S: Final = 0.10
# Where the sounds' dominances sum to less than this, the remainder goes to the relaxed
# face: speech onsets and ends then follow the smooth dominance bumps into idle.
FULL_DOMINANCE: Final = 1.0
GLIDE_SPLIT: Final = 0.6  # share of a diphthong's span held by its nucleus
GLIDE_OFFSET_DOMINANCE: Final = 0.7  # an off-glide is reduced relative to its nucleus
VOWEL_STRESS_GAIN: Final[Mapping[int, float]] = MappingProxyType({2: 1.1, 1: 1.0, 0: 0.85})

# Lip-critical visemes must reach their shape whatever their neighbours do (a /p/ between
# two open vowels would otherwise only half close): value = how fully they are enforced.
CRITICAL_STRENGTH: Final[Mapping[str, float]] = MappingProxyType({"PP": 1.0, "FF": 0.8})
CLOSE_RAMP_S: Final = 0.06
OPEN_RAMP_S: Final = 0.05
# A stop span ends with its burst; the lips part at the burst, slightly before the end.
STOP_RELEASE_S: Final = 0.02
MAX_HALF_FRAME_S: Final = 0.05  # bound on widening a hold so one frame always lands in it
_STOP_BASES: Final = frozenset({"p", "b"})
# Only the shape of the lips, jaw and tongue is enforced; smiles and frowns stay.
_ARTICULATION: Final = tuple(
    name for name in BLENDSHAPES
    if name.startswith(("jaw", "mouth", "tongue"))
    and not name.startswith(("mouthSmile", "mouthFrown", "mouthDimple", "mouthLeft", "mouthRight"))
)
_ARTICULATION_INDEX: Final = np.array([INDEX[name] for name in _ARTICULATION], dtype=np.intp)

# Emphasis: a primary-stressed vowel brings a small head dip and brow raise around its onset.
NOD_RAD: Final = 0.015
NOD_DELAY_S: Final = 0.05
NOD_HALF_WIDTH_S: Final = 0.15
NOD_BROW_INNER: Final = 0.12
NOD_BROW_OUTER: Final = 0.08

# How far from a frame a span can still move it; callers must pass every span that starts
# before (last frame time + LOOKAHEAD_S) and ends after (first frame time - LOOKBEHIND_S).
LOOKAHEAD_S: Final = 0.3
LOOKBEHIND_S: Final = 0.3
assert ANTICIPATION_S <= LOOKAHEAD_S and CLOSE_RAMP_S + MAX_HALF_FRAME_S <= LOOKAHEAD_S
assert NOD_HALF_WIDTH_S - NOD_DELAY_S <= LOOKAHEAD_S
assert max(CARRYOVER_S, OPEN_RAMP_S + MAX_HALF_FRAME_S, NOD_DELAY_S + NOD_HALF_WIDTH_S) <= LOOKBEHIND_S

# Blinks: 15/min on average (people blink 10-20 times a minute in conversation), one per
# 4 s slot at a random place in it, a tenth of them doubled.
BLINK_INTERVAL_S: Final = 4.0
BLINK_JITTER: Final = 0.4  # fraction of the slot either side of its centre
BLINK_DURATION_S: Final = (0.15, 0.28)
BLINK_CLOSING_SHARE: Final = 0.35  # lids close faster than they open
BLINK_HOLD_S: Final = (0.04, 0.1)  # shut at least one frame period, within these bounds
DOUBLE_BLINK_P: Final = 0.1
DOUBLE_BLINK_GAP_S: Final = 0.08

BREATH_PERIOD_S: Final = 4.0  # 15 breaths/min at rest
BREATH_INHALE_SHARE: Final = 0.4
BREATH_JAW: Final = 0.02
BREATH_PITCH_RAD: Final = -0.01  # the head lifts a little on each inhalation

SWAY_RAD: Final = (0.035, 0.025, 0.015)  # yaw, pitch, roll amplitudes of idle head drift
SWAY_KNOT_S: Final = (2.3, 1.9, 2.9)  # different spacings so the axes do not move in step
SPEECH_SWAY_GAIN: Final = 0.5  # talking heads move more

GAZE_SLOT_S: Final = 1.7  # mean time between small saccades
SACCADE_S: Final = 0.05
GAZE_AMPLITUDE: Final = (0.25, 0.15)  # horizontal, vertical eyeLook weights

EMOTIONS: Final[Mapping[str, Mapping[str, float]]] = MappingProxyType({
    "neutral": MappingProxyType({}),
    "happy": MappingProxyType({
        "mouthSmileLeft": 0.55, "mouthSmileRight": 0.55, "cheekSquintLeft": 0.35,
        "cheekSquintRight": 0.35, "eyeSquintLeft": 0.2, "eyeSquintRight": 0.2,
        "mouthDimpleLeft": 0.1, "mouthDimpleRight": 0.1,
    }),
    "sad": MappingProxyType({
        "browInnerUp": 0.55, "mouthFrownLeft": 0.45, "mouthFrownRight": 0.45,
        "mouthShrugLower": 0.15, "eyeBlinkLeft": 0.15, "eyeBlinkRight": 0.15,
    }),
    "angry": MappingProxyType({
        "browDownLeft": 0.7, "browDownRight": 0.7, "noseSneerLeft": 0.35, "noseSneerRight": 0.35,
        "eyeSquintLeft": 0.35, "eyeSquintRight": 0.35, "mouthPressLeft": 0.25,
        "mouthPressRight": 0.25, "mouthFrownLeft": 0.15, "mouthFrownRight": 0.15,
        "jawForward": 0.1,
    }),
    "surprised": MappingProxyType({
        "browInnerUp": 0.7, "browOuterUpLeft": 0.7, "browOuterUpRight": 0.7,
        "eyeWideLeft": 0.6, "eyeWideRight": 0.6, "jawOpen": 0.12,
    }),
})
# Positive pitch is chin down (ARKit face axes: x to the viewer's right, y up, z to the viewer).
EMOTION_HEAD_RAD: Final[Mapping[str, tuple[float, float, float]]] = MappingProxyType({
    "neutral": (0.0, 0.0, 0.0), "happy": (0.0, -0.02, 0.0), "sad": (0.0, 0.08, 0.0),
    "angry": (0.0, 0.04, 0.0), "surprised": (0.0, -0.05, 0.0),
})

# Streams of the counter-based hash: one per kind of random choice.
_BLINK_TIME, _BLINK_LENGTH, _BLINK_DOUBLE = 1, 2, 3
_SWAY = (10, 11, 12)
_GAZE_X, _GAZE_Y, _BREATH_PHASE = 20, 21, 30
_MASK64: Final = (1 << 64) - 1


@dataclass(frozen=True)
class VisemeSegment:
    """A stretch of time (seconds on the media clock) articulated towards one viseme."""

    viseme: str
    start_s: float
    end_s: float
    symbol: str
    dominance: float
    gain: float
    part: int = 0  # 1 for the second shape of a glide


def viseme_track(spans: Sequence[tuple[str, int, int]], sample_rate: int) -> list[VisemeSegment]:
    """Phoneme spans (symbol, start sample, end sample) to viseme segments, in time order.

    A glide (diphthong, r-coloured vowel) becomes two segments; empty spans are skipped.
    """
    out: list[VisemeSegment] = []
    for symbol, start, end in sorted(spans, key=lambda span: (span[1], span[2], span[0])):
        if end <= start:
            continue
        a = start / sample_rate
        b = end / sample_rate
        shapes = visemes.visemes_of(symbol)
        gain = VOWEL_STRESS_GAIN[visemes.stress_of(symbol)] if visemes.is_vowel(symbol) else 1.0
        bounds = [a, b] if len(shapes) == 1 else [a, a + GLIDE_SPLIT * (b - a), b]
        for part, (shape, s, e) in enumerate(zip(shapes, bounds[:-1], bounds[1:])):
            dominance = visemes.dominance_of(symbol, shape) * (GLIDE_OFFSET_DOMINANCE if part else 1.0)
            out.append(VisemeSegment(shape, s, e, symbol, dominance, gain, part))
    return out


def procedural_motion(
    spans: Sequence[tuple[str, int, int]],
    sample_rate: int,
    fps: float,
    first_frame: int,
    n_frames: int,
    seed: int,
    emotion: str = "neutral",
    intensity: float = 0.0,
) -> tuple[F32, F32]:
    """Blendshape weights (n_frames, 52) in [0, 1] and head pose (n_frames, 3) in radians.

    Frame k is at k / fps seconds; spans are in samples of the same clock. The result for a
    frame depends only on that frame, so any chunking of a frame range gives the same bits,
    provided each call gets the spans within LOOKBEHIND_S / LOOKAHEAD_S of its frames.
    """
    if sample_rate <= 0 or fps <= 0:
        raise ValueError(f"sample_rate and fps must be positive, got {sample_rate} and {fps}")
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; one of {sorted(EMOTIONS)}")
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")
    t = np.arange(first_frame, first_frame + n_frames, dtype=np.int64).astype(np.float64) / fps
    if n_frames == 0:
        return np.zeros((0, len(BLENDSHAPES)), np.float32), np.zeros((0, len(HEAD_POSE)), np.float32)

    lo_sample = (t[0] - LOOKBEHIND_S) * sample_rate
    hi_sample = (t[-1] + LOOKAHEAD_S) * sample_rate
    near = [span for span in spans if span[2] >= lo_sample and span[1] <= hi_sample]
    segments = viseme_track(near, sample_rate)

    weights, activity = _articulation(t, segments)
    nod = _emphasis(t, segments)
    breath = _breath(t, seed)
    idle = 1.0 - activity

    weights[:, INDEX["jawOpen"]] += BREATH_JAW * breath * idle
    weights[:, INDEX["browInnerUp"]] += NOD_BROW_INNER * nod
    weights[:, INDEX["browOuterUpLeft"]] += NOD_BROW_OUTER * nod
    weights[:, INDEX["browOuterUpRight"]] += NOD_BROW_OUTER * nod
    for name, offset in EMOTIONS[emotion].items():
        weights[:, INDEX[name]] += intensity * offset
    enforce_critical(weights, t, segments, fps)
    _add_gaze(weights, t, seed, idle)
    blink = blink_curve(t, seed, fps)
    for side in ("Left", "Right"):
        column = INDEX[f"eyeBlink{side}"]
        weights[:, column] = np.maximum(weights[:, column], blink)
        weights[:, INDEX[f"eyeWide{side}"]] *= 1.0 - blink
    np.clip(weights, 0.0, 1.0, out=weights)

    head = np.zeros((n_frames, len(HEAD_POSE)), dtype=np.float64)
    sway_gain = 1.0 + SPEECH_SWAY_GAIN * activity
    for axis in range(len(HEAD_POSE)):
        head[:, axis] = SWAY_RAD[axis] * sway_gain * _smooth_noise(t, seed, _SWAY[axis], SWAY_KNOT_S[axis])
        head[:, axis] += intensity * EMOTION_HEAD_RAD[emotion][axis]
    head[:, HEAD_POSE.index("pitch")] += NOD_RAD * nod + BREATH_PITCH_RAD * breath
    return weights.astype(np.float32), head.astype(np.float32)


def _bump(u: F64) -> F64:
    """1 at 0, falling smoothly (zero slope at both ends) to exactly 0 from 1 on."""
    v = np.minimum(np.abs(u), 1.0)
    w = 1.0 - v * v
    return w * w


def _smoothstep(x: F64) -> F64:
    c = np.clip(x, 0.0, 1.0)
    return c * c * (3.0 - 2.0 * c)


def _frame_range(t: F64, start_s: float, end_s: float) -> tuple[int, int]:
    return int(np.searchsorted(t, start_s, "left")), int(np.searchsorted(t, end_s, "right"))


def _articulation(t: F64, segments: list[VisemeSegment]) -> tuple[F64, F64]:
    """Dominance-weighted blend of viseme targets, and the share of it that is speech.

    Each segment weighs its dominance inside its span and a bump decaying to zero over the
    anticipation / carry-over time outside it; the rest pose (all zeros) takes whatever
    the segments leave below FULL_DOMINANCE. Accumulation runs in segment order and a
    segment adds exact zeros where it has no reach, so results do not depend on chunking.
    """
    n = len(t)
    total = np.zeros((n, len(BLENDSHAPES)), dtype=np.float64)
    dominance = np.zeros(n, dtype=np.float64)
    speech = np.zeros(n, dtype=np.float64)
    for seg in segments:
        lo, hi = _frame_range(t, seg.start_s - ANTICIPATION_S, seg.end_s + CARRYOVER_S)
        if lo >= hi:
            continue
        tt = t[lo:hi]
        before = np.maximum(seg.start_s - tt, 0.0) / ANTICIPATION_S
        after = np.maximum(tt - seg.end_s, 0.0) / CARRYOVER_S
        d = seg.dominance * _bump(before + after)
        total[lo:hi] += d[:, None] * (visemes.target_vector(seg.viseme) * seg.gain)[None, :]
        dominance[lo:hi] += d
        if seg.viseme != "sil":
            speech[lo:hi] += d
    norm = np.maximum(dominance, FULL_DOMINANCE)
    return total / norm[:, None], speech / norm


def _emphasis(t: F64, segments: list[VisemeSegment]) -> F64:
    nod = np.zeros(len(t), dtype=np.float64)
    for seg in segments:
        if seg.part != 0 or visemes.stress_of(seg.symbol) != 2:
            continue
        centre = seg.start_s + NOD_DELAY_S
        lo, hi = _frame_range(t, centre - NOD_HALF_WIDTH_S, centre + NOD_HALF_WIDTH_S)
        if lo < hi:
            nod[lo:hi] = np.maximum(nod[lo:hi], _bump((t[lo:hi] - centre) / NOD_HALF_WIDTH_S))
    return nod


def _hold_window(seg: VisemeSegment, fps: float, max_half_frame_s: float) -> tuple[float, float]:
    """When a lip-critical shape is fully held: a stop's closure up to its burst, else all of it.

    Widened to half a frame period either side of the span's middle, so that the frame
    nearest the middle always shows the closed lips, at any frame rate.
    """
    start, end = seg.start_s, seg.end_s
    middle = 0.5 * (start + end)
    if visemes.base_symbol(seg.symbol) in _STOP_BASES:
        end = max(middle, end - STOP_RELEASE_S)
    half_frame = min(0.5 / fps, max_half_frame_s)
    return min(start, middle - half_frame), max(end, middle + half_frame)


def enforce_critical(weights: F64, t: F64, segments: Sequence[VisemeSegment], fps: float, *,
                     close_ramp_s: float = CLOSE_RAMP_S,
                     max_half_frame_s: float = MAX_HALF_FRAME_S) -> None:
    """Blend the lip/jaw columns in place towards the sealed (p/b/m) or tucked (f/v) shape,
    held over each such segment and ramped in over `close_ramp_s` before it. The neural
    model uses it too, with a ramp no longer than its lookahead."""
    columns = _ARTICULATION_INDEX
    for seg in segments:
        strength = CRITICAL_STRENGTH.get(seg.viseme)
        if strength is None:
            continue
        h0, h1 = _hold_window(seg, fps, max_half_frame_s)
        lo, hi = _frame_range(t, h0 - close_ramp_s, h1 + OPEN_RAMP_S)
        if lo >= hi:
            continue
        tt = t[lo:hi]
        rise = _smoothstep((tt - (h0 - close_ramp_s)) / close_ramp_s)
        fall = 1.0 - _smoothstep((tt - h1) / OPEN_RAMP_S)
        envelope = strength * np.minimum(rise, fall)
        target = visemes.target_vector(seg.viseme)[columns]
        block = weights[lo:hi][:, columns]
        weights[lo:hi, columns] = block + envelope[:, None] * (target[None, :] - block)


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, stream: int, index: npt.NDArray[np.int64]) -> F64:
    """Counter-based random numbers in [0, 1): a pure function of (seed, stream, index)."""
    key = np.uint64(_splitmix(_splitmix(seed & _MASK64) ^ stream))
    x = index.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03) + key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smooth_noise(t: F64, seed: int, stream: int, knot_s: float) -> F64:
    """Catmull-Rom through random knots in [-1, 1] every knot_s seconds: smooth drift."""
    x = t / knot_s
    cell = np.floor(x)
    f = x - cell
    i = cell.astype(np.int64)
    p0, p1, p2, p3 = (2.0 * _uniform(seed, stream, i + k) - 1.0 for k in (-1, 0, 1, 2))
    return 0.5 * (
        2.0 * p1
        + (p2 - p0) * f
        + (2.0 * p0 - 5.0 * p1 + 4.0 * p2 - p3) * f * f
        + (3.0 * p1 - p0 - 3.0 * p2 + p3) * f * f * f
    )


def _breath(t: F64, seed: int) -> F64:
    """0 (exhaled) to 1 (inhaled): a quicker rise, a slower fall, period BREATH_PERIOD_S."""
    phase0 = float(_uniform(seed, _BREATH_PHASE, np.zeros(1, dtype=np.int64))[0])
    x = t / BREATH_PERIOD_S + phase0
    p = x - np.floor(x)
    rise = _smoothstep(p / BREATH_INHALE_SHARE)
    fall = 1.0 - _smoothstep((p - BREATH_INHALE_SHARE) / (1.0 - BREATH_INHALE_SHARE))
    return np.where(p < BREATH_INHALE_SHARE, rise, fall)


def _blink_shape(since: F64, duration: F64, hold: float) -> F64:
    moving = duration - hold
    closing = BLINK_CLOSING_SHARE * moving
    opening = moving - closing
    rise = _smoothstep(since / closing)
    fall = 1.0 - _smoothstep((since - closing - hold) / opening)
    shape = np.minimum(rise, fall)
    return np.where((since > 0.0) & (since < duration), shape, 0.0)


def blink_curve(t: F64, seed: int, fps: float) -> F64:
    """Eyelid closure in [0, 1] at times t (both eyes blink together)."""
    hold = min(max(BLINK_HOLD_S[0], 1.05 / fps), BLINK_HOLD_S[1])
    slot = np.floor(t / BLINK_INTERVAL_S).astype(np.int64)
    out = np.zeros(len(t), dtype=np.float64)
    # A blink, doubled or not, starts at most 0.9 slot and ends at most 0.64 s later, so
    # only the blinks of a frame's own slot and of the slot before can reach it.
    for k in (slot - 1, slot):
        jitter = 2.0 * _uniform(seed, _BLINK_TIME, k) - 1.0
        onset = (k.astype(np.float64) + 0.5 + BLINK_JITTER * jitter) * BLINK_INTERVAL_S
        lo, hi = BLINK_DURATION_S
        duration = lo + (hi - lo) * _uniform(seed, _BLINK_LENGTH, k)
        out = np.maximum(out, _blink_shape(t - onset, duration, hold))
        doubled = _uniform(seed, _BLINK_DOUBLE, k) < DOUBLE_BLINK_P
        second = _blink_shape(t - (onset + duration + DOUBLE_BLINK_GAP_S), duration, hold)
        out = np.maximum(out, np.where(doubled, second, 0.0))
    return out


def _add_gaze(weights: F64, t: F64, seed: int, idle: F64) -> None:
    """Small saccades between random gaze targets; a speaker looks at the listener more."""
    slot = np.floor(t / GAZE_SLOT_S).astype(np.int64)
    step = _smoothstep((t - slot.astype(np.float64) * GAZE_SLOT_S) / SACCADE_S)
    scale = 0.5 + 0.5 * idle
    gaze = []
    for stream, amplitude in ((_GAZE_X, GAZE_AMPLITUDE[0]), (_GAZE_Y, GAZE_AMPLITUDE[1])):
        before = 2.0 * _uniform(seed, stream, slot - 1) - 1.0
        now = 2.0 * _uniform(seed, stream, slot) - 1.0
        gaze.append(amplitude * scale * (before + (now - before) * step))
    x, y = gaze
    left, right = np.maximum(x, 0.0), np.maximum(-x, 0.0)
    up, down = np.maximum(y, 0.0), np.maximum(-y, 0.0)
    for name, value in (
        ("eyeLookOutLeft", left), ("eyeLookInRight", left), ("eyeLookInLeft", right),
        ("eyeLookOutRight", right), ("eyeLookUpLeft", up), ("eyeLookUpRight", up),
        ("eyeLookDownLeft", down), ("eyeLookDownRight", down),
    ):
        weights[:, INDEX[name]] += value
