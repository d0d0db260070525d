"""The procedural articulation model: lip shapes, coarticulation, idle life, chunk invariance."""
from __future__ import annotations

import random

import numpy as np
import numpy.typing as npt
import pytest

from backbone.blendshapes import INDEX
from processors.motion_procedural import (
    EMOTIONS,
    LOOKAHEAD_S,
    LOOKBEHIND_S,
    procedural_motion,
    viseme_track,
)

RATE = 22050
Span = tuple[str, int, int]


def _spans(phones: list[tuple[str, float]], start_s: float = 1.0) -> list[Span]:
    """(symbol, duration in ms) in a row, starting at start_s on the media clock."""
    out: list[Span] = []
    t = int(start_s * RATE)
    for symbol, ms in phones:
        end = t + int(ms * RATE / 1000)
        out.append((symbol, t, end))
        t = end
    return out


# "Peter Piper picked a peck of pickled peppers. Would you, though?" as eSpeak NG spoke it.
SENTENCE = _spans([
    ("p", 82), ("'i:", 99), ("t#", 41), ("3", 74), ("p", 82), ("'aI", 127), ("p", 72), ("3", 76),
    ("p", 82), ("'I", 86), ("k", 84), ("t", 89), ("a#", 60), ("p", 82), ("'E", 110), ("k", 85),
    ("V", 67), ("v", 71), ("p", 82), ("'I", 90), ("k", 85), ("@L", 84), ("d", 84), ("p", 84),
    ("'E", 152), ("p", 72), ("3", 102), ("z", 86), ("_", 301), ("w", 122), ("'U", 87), ("d", 75),
    ("j", 64), ("u:", 73), ("_", 162), ("D", 87), ("'oU", 272), ("_", 7),
], start_s=0.5)


def _frames(spans: list[Span], fps: float, start_s: float, end_s: float) -> tuple[
        npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    first = int(np.ceil(start_s * fps))
    n = int(np.floor(end_s * fps)) - first + 1
    weights, head = procedural_motion(spans, RATE, fps, first, n, seed=3)
    return weights, head, np.arange(first, first + n) / fps


def _middle_frame(span: Span, fps: float) -> int:
    return int(round((span[1] + span[2]) / 2 / RATE * fps))


def _at(spans: list[Span], frame: int, fps: float, emotion: str = "neutral",
        intensity: float = 0.0) -> npt.NDArray[np.float32]:
    weights, _ = procedural_motion(spans, RATE, fps, frame, 1, seed=3, emotion=emotion, intensity=intensity)
    row: npt.NDArray[np.float32] = weights[0]
    return row


def test_output_is_52_weights_and_3_head_angles_per_frame() -> None:
    weights, head = procedural_motion(SENTENCE, RATE, 25.0, 0, 130, seed=1)
    assert weights.shape == (130, 52) and weights.dtype == np.float32
    assert head.shape == (130, 3) and head.dtype == np.float32


def test_an_empty_frame_range_gives_empty_arrays() -> None:
    weights, head = procedural_motion(SENTENCE, RATE, 25.0, 10, 0, seed=1)
    assert weights.shape == (0, 52) and head.shape == (0, 3)


@pytest.mark.parametrize("emotion", sorted(EMOTIONS))
def test_weights_stay_in_unit_range_without_nan(emotion: str) -> None:
    weights, head = procedural_motion(SENTENCE, RATE, 100.0, 0, 600, seed=5, emotion=emotion, intensity=1.0)
    assert np.isfinite(weights).all() and np.isfinite(head).all()
    assert weights.min() >= 0.0 and weights.max() <= 1.0
    assert np.abs(head).max() < 0.3


@pytest.mark.parametrize("fps", [25.0, 30.0, 60.0, 100.0])
def test_bilabials_close_the_lips_at_the_middle_frame_of_their_span(fps: float) -> None:
    for symbol in ("p", "b", "m"):
        spans = _spans([("'a", 150), (symbol, 70), ("'a", 150)])
        shape = _at(spans, _middle_frame(spans[1], fps), fps)
        assert shape[INDEX["jawOpen"]] <= 0.08, (symbol, fps)
        assert shape[INDEX["mouthPressLeft"]] >= 0.4 and shape[INDEX["mouthPressRight"]] >= 0.4


def test_every_bilabial_of_a_real_sentence_closes_at_25_fps() -> None:
    for span in SENTENCE:
        if span[0] == "p":
            shape = _at(SENTENCE, _middle_frame(span, 25.0), 25.0)
            assert shape[INDEX["jawOpen"]] <= 0.08 and shape[INDEX["mouthPressLeft"]] >= 0.4


def test_a_bilabial_shorter_than_a_frame_still_shows_closed_lips() -> None:
    spans = _spans([("'a", 150), ("b", 20), ("'a", 150)])
    assert _at(spans, _middle_frame(spans[1], 25.0), 25.0)[INDEX["jawOpen"]] <= 0.08


def test_the_lips_open_between_bilabials() -> None:
    spans = _spans([("p", 80), ("'a", 180), ("p", 80)])
    assert _at(spans, _middle_frame(spans[1], 100.0), 100.0)[INDEX["jawOpen"]] >= 0.4


def test_labiodentals_tuck_the_lower_lip() -> None:
    spans = _spans([("'a", 150), ("f", 100), ("'a", 150)])
    shape = _at(spans, _middle_frame(spans[1], 25.0), 25.0)
    assert shape[INDEX["mouthRollLower"]] >= 0.4 and shape[INDEX["jawOpen"]] <= 0.2


def test_an_open_vowel_drops_the_jaw() -> None:
    spans = _spans([("_", 300), ("'A:", 250), ("_", 300)])
    assert _at(spans, _middle_frame(spans[1], 25.0), 25.0)[INDEX["jawOpen"]] >= 0.5


def test_a_rounded_vowel_puckers_the_lips() -> None:
    spans = _spans([("_", 300), ("u:", 200), ("_", 300)])
    assert _at(spans, _middle_frame(spans[1], 25.0), 25.0)[INDEX["mouthPucker"]] >= 0.5


def test_neighbours_shape_each_other() -> None:
    rounded = _spans([("'u:", 150), ("t", 60), ("'u:", 150)])
    spread = _spans([("'i:", 150), ("t", 60), ("'i:", 150)])
    pucker = INDEX["mouthPucker"]
    frame = _middle_frame(rounded[1], 100.0)
    assert _at(rounded, frame, 100.0)[pucker] > _at(spread, frame, 100.0)[pucker] + 0.2


def test_the_mouth_moves_before_the_sound_but_not_beyond_the_lookahead() -> None:
    spans = _spans([("_", 1000), ("'a", 200), ("_", 1000)], start_s=0.0)
    onset_s = spans[1][1] / RATE
    weights, _, times = _frames(spans, 100.0, 0.0, 2.0)
    jaw = weights[:, INDEX["jawOpen"]]
    early = (times > onset_s - 0.05) & (times < onset_s)
    quiet = times < onset_s - LOOKAHEAD_S
    assert jaw[early].max() > jaw[quiet].max() + 0.1


@pytest.mark.parametrize("fps", [25.0, 29.97, 100.0])
def test_one_call_equals_any_chunking_bit_for_bit(fps: float) -> None:
    total = int(5.2 * fps)
    whole_w, whole_h = procedural_motion(SENTENCE, RATE, fps, 0, total, seed=11, emotion="happy", intensity=0.6)
    rng = random.Random(0)
    parts_w, parts_h, frame = [], [], 0
    while frame < total:
        n = min(rng.choice([1, 2, 3, 4, 7, 13, 40]), total - frame)
        w, h = procedural_motion(SENTENCE, RATE, fps, frame, n, seed=11, emotion="happy", intensity=0.6)
        parts_w.append(w)
        parts_h.append(h)
        frame += n
    assert np.array_equal(np.concatenate(parts_w), whole_w)
    assert np.array_equal(np.concatenate(parts_h), whole_h)


def test_chunks_need_only_the_spans_within_lookbehind_and_lookahead() -> None:
    fps, total, chunk = 25.0, 120, 4
    whole_w, whole_h = procedural_motion(SENTENCE, RATE, fps, 0, total, seed=2)
    for first in range(0, total, chunk):
        lo = (first / fps - LOOKBEHIND_S) * RATE
        hi = ((first + chunk - 1) / fps + LOOKAHEAD_S) * RATE
        known = [span for span in SENTENCE if span[2] >= lo and span[1] <= hi]
        w, h = procedural_motion(known, RATE, fps, first, chunk, seed=2)
        assert np.array_equal(w, whole_w[first:first + chunk]), first
        assert np.array_equal(h, whole_h[first:first + chunk]), first


def test_span_order_does_not_matter() -> None:
    shuffled = list(SENTENCE)
    random.Random(1).shuffle(shuffled)
    a = procedural_motion(SENTENCE, RATE, 25.0, 0, 120, seed=4)
    b = procedural_motion(shuffled, RATE, 25.0, 0, 120, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _blink_onsets(blink: npt.NDArray[np.float32]) -> int:
    closed = blink > 0.5
    return int(np.count_nonzero(closed[1:] & ~closed[:-1]))


@pytest.mark.parametrize("seed", [0, 1, 2, 12345])
def test_idle_blinks_at_a_human_rate_over_five_minutes_of_silence(seed: int) -> None:
    fps = 25.0
    weights, _ = procedural_motion([], RATE, fps, 0, int(300 * fps), seed=seed)
    per_minute = _blink_onsets(weights[:, INDEX["eyeBlinkLeft"]]) / 5.0
    assert 8.0 <= per_minute <= 21.0


def test_blinks_close_both_eyes_fully_at_25_fps() -> None:
    weights, _ = procedural_motion([], RATE, 25.0, 0, 1500, seed=9)
    left, right = weights[:, INDEX["eyeBlinkLeft"]], weights[:, INDEX["eyeBlinkRight"]]
    assert np.array_equal(left, right)
    peaks = [left[i] for i in range(1, len(left) - 1) if left[i] > 0.5 and left[i] >= left[i - 1] and left[i] >= left[i + 1]]
    assert peaks and min(peaks) >= 0.99


def test_blinks_last_100_to_300_ms() -> None:
    fps = 1000.0
    weights, _ = procedural_motion([], RATE, fps, 0, 60_000, seed=6)
    moving = weights[:, INDEX["eyeBlinkLeft"]] > 0.02
    edges = np.flatnonzero(np.diff(moving.astype(np.int8)))
    durations = np.diff(edges)[::2] / fps
    assert len(durations) >= 10
    assert durations.min() >= 0.1 and durations.max() <= 0.3


def test_different_seeds_blink_at_different_times() -> None:
    a, _ = procedural_motion([], RATE, 25.0, 0, 1500, seed=1)
    b, _ = procedural_motion([], RATE, 25.0, 0, 1500, seed=2)
    assert not np.array_equal(a[:, INDEX["eyeBlinkLeft"]], b[:, INDEX["eyeBlinkLeft"]])


def test_silence_keeps_the_mouth_closed_but_the_face_alive() -> None:
    weights, head = procedural_motion([], RATE, 25.0, 0, 500, seed=8)
    assert weights[:, INDEX["jawOpen"]].max() < 0.05
    assert np.ptp(weights[:, INDEX["jawOpen"]]) > 0.005, "breathing"
    assert np.ptp(head, axis=0).min() > 0.005, "head sway on every axis"
    gaze = weights[:, [INDEX["eyeLookOutLeft"], INDEX["eyeLookInLeft"]]].sum(axis=1)
    assert np.ptp(gaze) > 0.05, "the eyes look around"


def test_motion_is_continuous_at_100_fps() -> None:
    weights, head = procedural_motion(SENTENCE, RATE, 100.0, 0, 600, seed=3, emotion="surprised", intensity=0.5)
    step = np.abs(np.diff(weights, axis=0))
    mouth = [i for name, i in INDEX.items() if name.startswith(("jaw", "mouth", "tongue"))]
    assert step[:, mouth].max() <= 0.25, "lips and jaw take at least 40 ms to cross their range"
    assert step.max() <= 0.4, "even a blink takes more than two frames to close"
    assert np.abs(np.diff(head, axis=0)).max() <= 0.01


def test_emotion_adds_its_expression_in_proportion_to_intensity() -> None:
    smile = INDEX["mouthSmileLeft"]
    neutral = _at([], 10, 25.0)
    half = _at([], 10, 25.0, emotion="happy", intensity=0.5)
    full = _at([], 10, 25.0, emotion="happy", intensity=1.0)
    assert neutral[smile] == 0.0 and 0.2 <= half[smile] < full[smile]
    assert np.array_equal(_at([], 10, 25.0, emotion="angry", intensity=0.0), neutral)


def test_emotion_does_not_stop_the_lips_closing() -> None:
    spans = _spans([("'a", 150), ("p", 70), ("'a", 150)])
    for emotion in EMOTIONS:
        shape = _at(spans, _middle_frame(spans[1], 25.0), 25.0, emotion=emotion, intensity=1.0)
        assert shape[INDEX["jawOpen"]] <= 0.08, emotion


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="emotion"):
        procedural_motion([], RATE, 25.0, 0, 1, seed=0, emotion="bored")
    with pytest.raises(ValueError, match="intensity"):
        procedural_motion([], RATE, 25.0, 0, 1, seed=0, emotion="happy", intensity=1.5)
    with pytest.raises(ValueError, match="fps"):
        procedural_motion([], RATE, 0.0, 0, 1, seed=0)


def test_unknown_phoneme_symbols_still_animate() -> None:
    spans = _spans([("_", 300), ("Y:", 200), ("_", 300)])
    assert _at(spans, _middle_frame(spans[1], 25.0), 25.0)[INDEX["jawOpen"]] > 0.2


def test_diphthongs_become_two_viseme_segments() -> None:
    track = viseme_track([("'aI", 0, 2205)], RATE)
    assert [segment.viseme for segment in track] == ["aa", "I"]
    assert track[0].start_s == 0.0 and track[-1].end_s == pytest.approx(0.1)
