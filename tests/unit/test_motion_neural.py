"""The neural motion model as the animate stage uses it: deterministic, seamless, alive, lips sealed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from backbone.blendshapes import BLENDSHAPES, INDEX
from processors.models.eval_motion import blink_onsets, lips_closed, run_chunked
from processors.motion_neural import NeuralMotion

RATE = 22050
ROOT = Path(__file__).resolve().parents[2]
Span = tuple[str, int, int]
F32 = npt.NDArray[np.float32]


def _spans(phones: list[tuple[str, float]], start_s: float = 0.5) -> list[Span]:
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
])


@pytest.fixture(scope="module")
def model() -> NeuralMotion:
    m = NeuralMotion()
    m.start()
    return m


def _middle_frame(span: Span, fps: float) -> int:
    return int(round((span[1] + span[2]) / 2 / RATE * fps))


def _join_steps(weights: F32, chunk: int) -> tuple[F32, F32]:
    """Frame-to-frame change (mean over blendshapes) at chunk joins and inside chunks."""
    step = np.abs(np.diff(weights.astype(np.float64), axis=0)).mean(axis=1)
    at_join = (np.arange(1, len(weights)) % chunk) == 0
    return step[at_join], step[~at_join]


def test_the_same_records_give_bit_identical_motion() -> None:
    runs = []
    for _ in range(2):
        m = NeuralMotion()
        m.start()
        r = run_chunked(m, SENTENCE, 100.0, 300, 8, seed=11, emotion="happy", intensity=0.6)
        runs.append(r)
    assert runs[0].weights.tobytes() == runs[1].weights.tobytes()
    assert runs[0].head.tobytes() == runs[1].head.tobytes()


def test_a_context_restored_from_json_continues_bit_for_bit(model: NeuralMotion) -> None:
    live: dict[str, Any] | None = None
    restored: dict[str, Any] | None = None
    for first in range(0, 160, 8):
        w1, h1, live = model.generate(SENTENCE, RATE, 100.0, first, 8, seed=2, emotion="sad",
                                      intensity=0.4, context=live)
        w2, h2, restored = model.generate(SENTENCE, RATE, 100.0, first, 8, seed=2, emotion="sad",
                                          intensity=0.4, context=json.loads(json.dumps(restored)))
        assert w1.tobytes() == w2.tobytes() and h1.tobytes() == h2.tobytes()


def test_a_different_seed_gives_different_motion(model: NeuralMotion) -> None:
    a = run_chunked(model, SENTENCE, 25.0, 60, 2, seed=1).weights
    b = run_chunked(model, SENTENCE, 25.0, 60, 2, seed=2).weights
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("chunk", [3, 5, 8])
def test_chunks_join_without_seams(model: NeuralMotion, chunk: int) -> None:
    run = run_chunked(model, SENTENCE, 100.0, 400, chunk, seed=5)
    joins, inside = _join_steps(run.weights, chunk)
    assert joins.mean() <= 1.25 * inside.mean(), "a join moves more than a typical frame"
    assert joins.max() <= 1.25 * inside.max(), "the largest jump is not at a join"
    head_step = np.abs(np.diff(run.head, axis=0))
    assert head_step.max() <= 0.01, "the head never jumps"


def test_the_carried_context_is_what_removes_the_seams(model: NeuralMotion) -> None:
    chunk, weights = 8, []
    for first in range(0, 400, chunk):
        w, _, _ = model.generate(SENTENCE, RATE, 100.0, first, chunk, seed=5, emotion="neutral",
                                 intensity=0.0, context=None)
        weights.append(w)
    joins, inside = _join_steps(np.concatenate(weights), chunk)
    assert joins.mean() >= 2.0 * inside.mean(), "without context every chunk starts afresh"


def test_a_different_chunking_gives_the_same_motion_up_to_sampling(model: NeuralMotion) -> None:
    a = run_chunked(model, SENTENCE, 100.0, 400, 8, seed=5).weights
    b = run_chunked(model, SENTENCE, 100.0, 400, 4, seed=5).weights
    jaw = INDEX["jawOpen"]
    assert np.abs(a[:, jaw] - b[:, jaw]).mean() <= 0.03


def test_phonemes_beyond_the_lookahead_do_not_change_a_chunk(model: NeuralMotion) -> None:
    fps, first, n = 100.0, 40, 8
    t_last = (first + n - 1) / fps
    cut = int((t_last + model.lookahead_s) * RATE)
    early = [s for s in SENTENCE if s[1] <= cut]
    assert len(early) < len(SENTENCE)
    a = model.generate(SENTENCE, RATE, fps, first, n, seed=1, emotion="neutral", intensity=0.0, context=None)
    b = model.generate(early, RATE, fps, first, n, seed=1, emotion="neutral", intensity=0.0, context=None)
    assert a[0].tobytes() == b[0].tobytes()


def test_the_idle_face_blinks_breathes_and_moves(model: NeuralMotion) -> None:
    fps = 25.0
    run = run_chunked(model, [], fps, int(120 * fps), 2, seed=8)
    per_minute = blink_onsets(run.weights) / 2.0
    assert 8.0 <= per_minute <= 21.0
    assert run.weights[:, INDEX["jawOpen"]].max() < 0.1, "the mouth stays near closed"
    assert np.ptp(run.weights[:, INDEX["jawOpen"]]) > 0.005, "breathing"
    assert np.ptp(run.head, axis=0).min() > 0.005, "the head moves on every axis"
    # never frozen: every second of silence shows some movement of the face or head
    motion = np.abs(np.diff(run.weights, axis=0)).sum(axis=1) + np.abs(np.diff(run.head, axis=0)).sum(axis=1)
    per_second = motion[: len(motion) // 25 * 25].reshape(-1, 25).max(axis=1)
    assert per_second.min() > 1e-3


def test_blinks_last_100_to_400_ms(model: NeuralMotion) -> None:
    fps = 100.0
    run = run_chunked(model, [], fps, int(40 * fps), 8, seed=6)
    moving = run.weights[:, INDEX["eyeBlinkLeft"]] > 0.05
    edges = np.flatnonzero(np.diff(moving.astype(np.int8)))
    if moving[0]:
        edges = edges[1:]
    durations = np.diff(edges)[::2] / fps
    assert len(durations) >= 5
    assert durations.min() >= 0.1 and durations.max() <= 0.4


@pytest.mark.parametrize("fps", [25.0, 60.0, 100.0])
def test_bilabials_close_the_lips_at_the_middle_frame_of_their_span(model: NeuralMotion, fps: float) -> None:
    for symbol in ("p", "b", "m"):
        spans = _spans([("'a", 150), (symbol, 70), ("'a", 150)])
        frame = _middle_frame(spans[1], fps)
        w = run_chunked(model, spans, fps, frame + 1, max(1, round(0.08 * fps)), seed=4).weights
        assert lips_closed(w[frame]), (symbol, fps)


def test_the_network_itself_shuts_the_jaw_on_bilabials_and_opens_it_on_vowels() -> None:
    free = NeuralMotion(constrain_lips=False)
    free.start()
    fps = 100.0
    spans = _spans([("_", 200), ("'a", 180), ("p", 90), ("'a", 180), ("m", 90), ("'A:", 220), ("_", 300)])
    w = run_chunked(free, spans, fps, int(1.6 * fps), 8, seed=4).weights
    jaw = w[:, INDEX["jawOpen"]]
    vowels = [jaw[_middle_frame(s, fps)] for s in spans if "a" in s[0].lower()]
    closures = [jaw[_middle_frame(s, fps)] for s in spans if s[0] in ("p", "m")]
    assert min(vowels) >= 0.3
    assert max(closures) <= 0.5 * min(vowels)


def test_unknown_symbols_gaps_overlaps_and_nan_still_animate(model: NeuralMotion) -> None:
    nan: Any = float("nan")
    bad: list[Any] = [
        ("QQ", int(0.3 * RATE), int(0.45 * RATE)),  # unknown consonant
        ("'@@@", int(0.45 * RATE), int(0.6 * RATE)),  # unknown vowel-ish
        ("p", int(0.9 * RATE), int(1.0 * RATE)),  # after a gap
        ("'a", int(0.95 * RATE), int(1.2 * RATE)),  # overlapping the p
        ("m", int(1.5 * RATE), int(1.4 * RATE)),  # backwards
        ("a", nan, int(1.6 * RATE)),  # NaN start
        ("", int(1.6 * RATE), int(1.7 * RATE)),  # empty symbol
    ]
    run = run_chunked(model, bad, 100.0, 220, 8, seed=3)
    assert np.isfinite(run.weights).all() and np.isfinite(run.head).all()
    assert run.weights.min() >= 0.0 and run.weights.max() <= 1.0
    mouth = [INDEX[n] for n in BLENDSHAPES if n.startswith(("jaw", "mouth"))]
    assert np.abs(np.diff(run.weights[:, mouth], axis=0)).max() <= 0.3, "motion stays continuous"
    assert run.weights[int(0.55 * 100), INDEX["jawOpen"]] > run.weights[10, INDEX["jawOpen"]], \
        "an unknown vowel still opens the mouth"


def test_an_emotion_change_mid_session_blends_without_a_jump(model: NeuralMotion) -> None:
    fps = 100.0
    run = run_chunked(model, SENTENCE, fps, 300, 8, seed=7, emotion_at={0: ("neutral", 0.0), 96: ("happy", 1.0)})
    smile = run.weights[:, INDEX["mouthSmileLeft"]]
    assert smile[:90].mean() < 0.15
    assert smile[150:].mean() >= smile[:90].mean() + 0.2, "the new emotion shows"
    assert np.abs(np.diff(smile)).max() <= 0.06, "no jump at the change"
    assert smile[100] < smile[140], "it ramps in over a few hundred ms"


def test_intensity_interpolates_the_expression(model: NeuralMotion) -> None:
    levels = []
    for intensity in (0.0, 0.5, 1.0):
        w = run_chunked(model, [], 25.0, 60, 2, seed=1, emotion="surprised", intensity=intensity).weights
        levels.append(float(w[30:, INDEX["browOuterUpLeft"]].mean()))
    assert levels[0] + 0.1 < levels[1] < levels[2] - 0.1


def test_outputs_have_the_contract_shapes_types_and_ranges(model: NeuralMotion) -> None:
    w, h, ctx = model.generate(SENTENCE, RATE, 30.0, 0, 3, seed=0, emotion="angry", intensity=1.0, context=None)
    assert w.shape == (3, 52) and w.dtype == np.float32 and h.shape == (3, 3) and h.dtype == np.float32
    assert 0.0 <= w.min() and w.max() <= 1.0 and np.abs(h).max() < 0.5
    json.dumps(ctx)
    assert model.model_version.startswith("motion-ddim-") and 0 < model.lookahead_s <= 0.04
    w0, h0, ctx0 = model.generate(SENTENCE, RATE, 30.0, 3, 0, seed=0, emotion="angry", intensity=1.0, context=ctx)
    assert w0.shape == (0, 52) and h0.shape == (0, 3) and ctx0["next_frame"] == 3


def test_bad_arguments_are_value_errors_and_bad_intensity_is_clamped(model: NeuralMotion) -> None:
    with pytest.raises(ValueError):
        model.generate([], RATE, 25.0, 0, 2, seed=0, emotion="bored", intensity=0.5, context=None)
    with pytest.raises(ValueError):
        model.generate([], RATE, 0.0, 0, 2, seed=0, emotion="happy", intensity=0.5, context=None)
    w, _, _ = model.generate([], RATE, 25.0, 0, 2, seed=0, emotion="happy", intensity=math.nan,
                             context={"garbage": True})
    assert np.isfinite(w).all()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "processors.models.train_motion", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_the_training_script_runs_three_steps_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    done = _run("--steps", "3", "--clips", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    m = NeuralMotion(out)
    m.start()
    assert m.model.source == "procedural" and m.model.meta["steps"] == 3
    w, _, _ = m.generate(SENTENCE, RATE, 25.0, 0, 2, seed=0, emotion="neutral", intensity=0.0, context=None)
    assert w.shape == (2, 52)


def _write_take(directory: Path) -> tuple[F32, F32]:
    from processors.models.livelink import write_csv

    n = 90
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.0, 1.0, (n, 52)).astype(np.float32)
    head = rng.uniform(-0.1, 0.1, (n, 3)).astype(np.float32)
    write_csv(directory / "take1.csv", weights, head, capture_fps=60.0, start_s=3723.5)
    (directory / "take1.phonemes.tsv").write_text("_\t0.0\t0.2\nh\t0.2\t0.3\n'e\t0.3\t0.5\nl\t0.5\t0.6\noU\t0.6\t0.9\n")
    return weights, head


def test_the_livelink_loader_parses_a_generated_csv(tmp_path: Path) -> None:
    from processors.models.livelink import load_dir

    weights, head = _write_take(tmp_path)
    header = (tmp_path / "take1.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["Timecode", "BlendShapeCount", "EyeBlinkLeft"] and "TongueOut" in header
    (take,) = load_dir(tmp_path)
    assert take.fps == 60.0 and take.weights.shape == (90, 52) and take.head.shape == (90, 3)
    # timecodes carry a thousandth of a frame, so resampling may move a value by ~1e-3
    np.testing.assert_allclose(take.weights, weights, atol=2e-3)
    np.testing.assert_allclose(take.head, head, atol=2e-3)
    assert take.spans[2] == ("'e", int(round(0.3 * RATE)), int(round(0.5 * RATE)))


def test_the_training_script_accepts_livelink_captures(tmp_path: Path) -> None:
    _write_take(tmp_path)
    out = tmp_path / "captured.pt"
    done = _run("--steps", "3", "--livelink", str(tmp_path), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    m = NeuralMotion(out)
    m.start()
    assert m.model.source == "livelink" and not m.model.cfg.idle_base
    w, _, _ = m.generate([], RATE, 25.0, 0, 4, seed=0, emotion="neutral", intensity=0.0, context=None)
    assert np.isfinite(w).all()
