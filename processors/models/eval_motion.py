"""Metrics of the neural motion model, shared by benchmarks/motion.py and training checks.

Runs NeuralMotion the way the animate stage does (chunk by chunk, context carried) over an
eSpeak timeline with pauses, and scores smoothness, lip closures, blinks, seams and speed.

    python -m processors.models.eval_motion [--checkpoint processors/models/motion.pt]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Sequence

import numpy as np
import numpy.typing as npt

from backbone.blendshapes import INDEX
from processors import visemes

F32 = npt.NDArray[np.float32]
Span = tuple[str, int, int]

SAMPLE_RATE: Final = 22050
# Lips count as closed when the jaw is nearly shut and the lips pressed: the procedural
# model's own test thresholds, so both models are held to the same bar.
CLOSED_JAW_MAX: Final = 0.08
CLOSED_PRESS_MIN: Final = 0.4
BLINK_CLOSED: Final = 0.5  # a blink is counted when the lids pass half closed
BILABIALS: Final = frozenset({"p", "b", "m"})
# A fixed script for every evaluation: bilabials, rounded vowels, open vowels, questions.
SCRIPT: Final = (
    "Peter picked a peck of pickled peppers.",
    "Would you bring me a bowl of warm soup, please?",
    "My mother bought a beautiful blue umbrella in Boston.",
    "Hmm, maybe we should move the meeting to Monday morning.",
    "Oh wow, that is absolutely amazing!",
)
PAUSE_S: Final = (0.6, 1.5, 0.4, 2.0, 0.8)  # listening between sentences


def script_timeline(rate_wpm: int = 175, voice: str = "en-us") -> tuple[list[Span], float]:
    """The SCRIPT spoken by eSpeak NG with pauses: spans and total length in seconds."""
    from processors.espeak import EspeakSynth

    synth = EspeakSynth()
    synth.start()
    spans: list[Span] = []
    t = 0.5
    for text, pause in zip(SCRIPT, PAUSE_S):
        syn = synth.synthesize(text, voice=voice, rate_wpm=rate_wpm)
        offset = int(t * SAMPLE_RATE)
        spans += [(p.symbol, p.start_sample + offset, p.end_sample + offset) for p in syn.phonemes]
        t += syn.duration_s + pause
    return spans, t


def jitter(weights: F32) -> float:
    """Mean absolute second difference over frames and blendshapes (lower is smoother)."""
    if len(weights) < 3:
        return 0.0
    w = weights.astype(np.float64)
    return float(np.abs(w[2:] - 2.0 * w[1:-1] + w[:-2]).mean())


def lips_closed(row: F32) -> bool:
    press = 0.5 * (row[INDEX["mouthPressLeft"]] + row[INDEX["mouthPressRight"]])
    return bool(row[INDEX["jawOpen"]] <= CLOSED_JAW_MAX and press >= CLOSED_PRESS_MIN)


def bilabial_closure(weights: F32, spans: Sequence[Span], fps: float, first_frame: int = 0,
                     sample_rate: int = SAMPLE_RATE) -> float:
    """Share of p/b/m spans whose middle frame shows closed lips (spans outside are skipped)."""
    hits, total = 0, 0
    for symbol, start, end in spans:
        if visemes.base_symbol(symbol) not in BILABIALS:
            continue
        frame = int(round((start + end) / 2 / sample_rate * fps)) - first_frame
        if 0 <= frame < len(weights):
            total += 1
            hits += lips_closed(weights[frame])
    return hits / total if total else float("nan")


def blink_onsets(weights: F32) -> int:
    closed = weights[:, INDEX["eyeBlinkLeft"]] > BLINK_CLOSED
    return int(np.count_nonzero(closed[1:] & ~closed[:-1]))


def blink_durations_s(weights: F32, fps: float, moving: float = 0.02) -> list[float]:
    """Lengths of the eyelid excursions above `moving` (blink start to reopened)."""
    above = weights[:, INDEX["eyeBlinkLeft"]] > moving
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))
    if above[0]:
        edges = edges[1:]
    return [float(d) / fps for d in np.diff(edges)[::2]]


def phoneme_target(spans: Sequence[Span], fps: float, n: int, shape: str) -> npt.NDArray[np.float64]:
    """Each frame's viseme target for one blendshape, with no coarticulation: the audio's timing."""
    out = np.zeros(n, dtype=np.float64)
    for symbol, start, end in spans:
        a = int(np.ceil(start / SAMPLE_RATE * fps))
        b = int(np.ceil(end / SAMPLE_RATE * fps))
        out[max(a, 0):max(min(b, n), 0)] = visemes.target_vector(visemes.viseme_of(symbol))[INDEX[shape]]
    return out


def lag_ms(curve: F32, spans: Sequence[Span], fps: float, shape: str, max_ms: float = 150.0) -> float:
    """How far a blendshape curve trails the phonemes' own timing (cross-correlation peak;
    negative: it moves ahead of the sound, as coarticulation does), at frame resolution."""
    target = phoneme_target(spans, fps, len(curve), shape)
    a = curve.astype(np.float64) - curve.mean()
    b = target - target.mean()
    reach = int(max_ms / 1000.0 * fps)
    best, best_lag = -np.inf, 0
    for lag in range(-reach, reach + 1):
        score = float(np.dot(a[reach + lag:len(a) - reach + lag], b[reach:len(b) - reach]))
        if score > best:
            best, best_lag = score, lag
    return 1000.0 * best_lag / fps


@dataclass
class Run:
    weights: F32
    head: F32
    chunk_ms: list[float]  # wall-clock time of each call
    chunk_cpu_ms: list[float]  # this thread's CPU time of each call (immune to a busy machine)
    joins: list[int]  # frame indices where a new call began (after the first)


def run_chunked(model: Any, spans: Sequence[Span], fps: float, n: int, chunk: int, *,
                seed: int = 3, emotion: str = "neutral", intensity: float = 0.0,
                first_frame: int = 0, emotion_at: dict[int, tuple[str, float]] | None = None) -> Run:
    """Calls model.generate over [first_frame, first_frame + n) in `chunk`-frame calls."""
    weights, heads, times, cpu, joins = [], [], [], [], []
    ctx: dict[str, Any] | None = None
    for a in range(first_frame, first_frame + n, chunk):
        b = min(a + chunk, first_frame + n)
        if emotion_at and a in emotion_at:
            emotion, intensity = emotion_at[a]
        t0, c0 = time.perf_counter(), time.thread_time()
        w, h, ctx = model.generate(spans, SAMPLE_RATE, fps, a, b - a, seed=seed, emotion=emotion,
                                   intensity=intensity, context=ctx)
        times.append(1000.0 * (time.perf_counter() - t0))
        cpu.append(1000.0 * (time.thread_time() - c0))
        weights.append(w)
        heads.append(h)
        if a > first_frame:
            joins.append(a - first_frame)
    return Run(np.concatenate(weights), np.concatenate(heads), times, cpu, joins)


def seam_ratio(weights: F32, joins: Sequence[int]) -> float:
    """Mean frame-to-frame change at chunk joins over the mean change inside chunks (~1: no seam)."""
    step = np.abs(np.diff(weights.astype(np.float64), axis=0)).mean(axis=1)
    at_join = np.zeros(len(step), dtype=bool)
    at_join[np.asarray(joins, dtype=np.intp) - 1] = True
    return float(step[at_join].mean() / max(step[~at_join].mean(), 1e-9))


def evaluate(checkpoint: Path | None = None, fps: float = 100.0, seed: int = 3) -> dict[str, Any]:
    """Quality figures on the SCRIPT timeline (no timing figures: see benchmarks/motion.py)."""
    from processors.motion_neural import NeuralMotion
    from processors.motion_procedural import procedural_motion

    spans, seconds = script_timeline()
    n = int(seconds * fps)
    chunk = max(1, round(0.08 * fps))
    out: dict[str, Any] = {"fps": fps, "frames": n}
    for constrained in (True, False):
        model = NeuralMotion(checkpoint, constrain_lips=constrained)
        model.start()
        run = run_chunked(model, spans, fps, n, chunk, seed=seed)
        key = "" if constrained else "_unconstrained"
        out[f"bilabial_closure{key}"] = bilabial_closure(run.weights, spans, fps)
        if constrained:
            out["model_version"] = model.model_version
            out["jitter"] = jitter(run.weights)
            out["seam_ratio"] = seam_ratio(run.weights, run.joins)
            out["jaw_lag_ms"] = lag_ms(run.weights[:, INDEX["jawOpen"]], spans, fps, "jawOpen")
            out["press_lag_ms"] = lag_ms(run.weights[:, INDEX["mouthPressLeft"]], spans, fps, "mouthPressLeft")
    proc_w, _ = procedural_motion(spans, SAMPLE_RATE, fps, 0, n, seed=seed)
    out["jaw_lag_ms_procedural"] = lag_ms(proc_w[:, INDEX["jawOpen"]], spans, fps, "jawOpen")
    out["jitter_procedural"] = jitter(proc_w)
    out["bilabial_closure_procedural"] = bilabial_closure(proc_w, spans, fps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--fps", type=float, default=100.0)
    args = p.parse_args()
    print(json.dumps(evaluate(args.checkpoint, args.fps), indent=2))


if __name__ == "__main__":
    main()
