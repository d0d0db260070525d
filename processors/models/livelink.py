"""Live Link Face CSV recordings (+ a phoneme alignment of their audio) as motion training clips.

The alternative data source of train_motion.py (`--livelink DIR`): real capture instead of the
procedural teacher. Nothing here runs in the live pipeline.

Format, as Epic's Live Link Face iOS app exports a take (one CSV per take, one row per frame):

    Timecode,BlendShapeCount,EyeBlinkLeft,EyeLookDownLeft,...,TongueOut,HeadYaw,HeadPitch,
    HeadRoll,LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll

- Timecode: HH:MM:SS:FF.fff, FF the frame number at the capture rate (60 fps by default on
  the app) and .fff a sub-frame fraction; the loader needs that rate (`capture_fps`).
- BlendShapeCount: 61 (52 blendshapes + 9 rotations); ignored.
- the 52 ARKit names with a capital first letter, each a weight in [0, 1]; columns are read
  by name, so their order does not matter.
- HeadYaw/HeadPitch/HeadRoll: head rotation in radians (`head_unit` converts otherwise);
  the eye rotations are not used (gaze is in the eyeLook* weights).

Beside each `take.csv` sits `take.phonemes.tsv`: one line per phoneme, `symbol<TAB>start_s
<TAB>end_s`, eSpeak NG mnemonics (the aligner of this project writes them), seconds from the
first row of the CSV. Rows are resampled onto a uniform clock at `capture_fps`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from backbone.blendshapes import BLENDSHAPES, HEAD_POSE

F32 = npt.NDArray[np.float32]

DEFAULT_CAPTURE_FPS: Final = 60.0  # Live Link Face's default recording rate
SAMPLE_RATE: Final = 22050  # the clock the spans are expressed in (the tts stage's rate)
HEAD_COLUMNS: Final = ("HeadYaw", "HeadPitch", "HeadRoll")
PHONEME_SUFFIX: Final = ".phonemes.tsv"


def livelink_name(name: str) -> str:
    """ARKit name -> Live Link Face column (eyeBlinkLeft -> EyeBlinkLeft)."""
    return name[0].upper() + name[1:]


@dataclass(frozen=True)
class CaptureClip:
    """One take on a uniform frame clock, ready for training."""

    name: str
    fps: float
    weights: F32  # (n, 52) in BLENDSHAPES order
    head: F32  # (n, 3) yaw, pitch, roll in radians
    spans: list[tuple[str, int, int]]  # phonemes in samples of SAMPLE_RATE, frame 0 = sample 0
    sample_rate: int = SAMPLE_RATE


def parse_timecode(text: str, capture_fps: float) -> float:
    """HH:MM:SS:FF(.fff) -> seconds."""
    parts = text.strip().split(":")
    if len(parts) != 4:
        raise ValueError(f"timecode {text!r} is not HH:MM:SS:FF.fff")
    h, m, s = (int(p) for p in parts[:3])
    frame = float(parts[3])
    return h * 3600.0 + m * 60.0 + s + frame / capture_fps


def read_csv(path: Path, capture_fps: float = DEFAULT_CAPTURE_FPS,
             head_unit: float = 1.0) -> tuple[F32, F32, F32]:
    """Times (s from the first row), weights (n, 52) and head (n, 3, radians) of one take."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    col = {name: i for i, name in enumerate(header)}
    wanted = [livelink_name(n) for n in BLENDSHAPES] + list(HEAD_COLUMNS)
    missing = [w for w in ["Timecode"] + wanted if w not in col]
    if missing:
        raise ValueError(f"{path} lacks columns {missing[:5]}{'...' if len(missing) > 5 else ''}")
    times: list[float] = []
    values: list[list[float]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        try:
            times.append(parse_timecode(row[col["Timecode"]], capture_fps))
            values.append([float(row[col[w]]) for w in wanted])
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}:{line}: {e}") from e
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if len(t) < 2 or not np.all(np.isfinite(v)):
        raise ValueError(f"{path}: needs at least two rows of finite values")
    order = np.argsort(t, kind="stable")
    t, v = t[order] - t[order][0], v[order]
    weights = np.clip(v[:, :len(BLENDSHAPES)], 0.0, 1.0)
    head = v[:, len(BLENDSHAPES):] * head_unit
    return t.astype(np.float32), weights.astype(np.float32), head.astype(np.float32)


def read_phonemes(path: Path) -> list[tuple[str, float, float]]:
    out: list[tuple[str, float, float]] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        symbol, start, end = line.split("\t")[:3]
        out.append((symbol.strip(), float(start), float(end)))
    return out


def load_take(csv_path: Path, capture_fps: float = DEFAULT_CAPTURE_FPS,
              head_unit: float = 1.0) -> CaptureClip:
    """A take resampled to a uniform clock (dropped or jittered rows are interpolated)."""
    t, weights, head = read_csv(csv_path, capture_fps, head_unit)
    n = int(np.floor(float(t[-1]) * capture_fps)) + 1
    grid = np.arange(n, dtype=np.float64) / capture_fps
    w = np.stack([np.interp(grid, t, weights[:, j]) for j in range(weights.shape[1])], axis=1)
    h = np.stack([np.interp(grid, t, head[:, j]) for j in range(head.shape[1])], axis=1)
    phon_path = csv_path.with_name(csv_path.stem + PHONEME_SUFFIX)
    if not phon_path.exists():
        raise ValueError(f"{csv_path} has no phoneme alignment {phon_path.name}")
    spans = [(s, int(round(a * SAMPLE_RATE)), int(round(b * SAMPLE_RATE)))
             for s, a, b in read_phonemes(phon_path) if b > a]
    return CaptureClip(csv_path.stem, capture_fps, w.astype(np.float32), h.astype(np.float32), spans)


def load_dir(directory: Path, capture_fps: float = DEFAULT_CAPTURE_FPS,
             head_unit: float = 1.0) -> list[CaptureClip]:
    """Every take (`*.csv` with its `.phonemes.tsv`) in a directory, sorted by name."""
    paths = sorted(directory.glob("*.csv"))
    if not paths:
        raise ValueError(f"no Live Link Face CSV files in {directory}")
    return [load_take(p, capture_fps, head_unit) for p in paths]


def write_csv(path: Path, weights: F32, head: F32, capture_fps: float = DEFAULT_CAPTURE_FPS,
              start_s: float = 0.0) -> None:
    """Writes a take in the app's layout (tests and tooling: motion out to Unreal/Blender)."""
    header = (["Timecode", "BlendShapeCount"] + [livelink_name(n) for n in BLENDSHAPES]
              + list(HEAD_COLUMNS)
              + [f"{side}Eye{axis}" for side in ("Left", "Right") for axis in ("Yaw", "Pitch", "Roll")])
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for i in range(len(weights)):
            t = start_s + i / capture_fps
            whole = int(t)
            frame = (t - whole) * capture_fps
            tc = f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}:{frame:06.3f}"
            out.writerow([tc, len(BLENDSHAPES) + 9] + [f"{x:.6f}" for x in weights[i]]
                         + [f"{x:.6f}" for x in head[i]] + ["0.0"] * 6)
