"""Contact sheet of the default portrait: every viseme's mouth shape, a blink and every
emotion at full intensity, rendered at 512 px by the render stage's renderer, labelled.

It is the quick visual check of the viseme table (processors/visemes.py), the emotion
offsets (processors/motion_procedural.py) and the portrait's fields, side by side.

    python benchmarks/contact_sheet.py [-o docs/contact_sheet.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone.blendshapes import INDEX  # noqa: E402
from processors.motion_procedural import EMOTION_HEAD_RAD, EMOTIONS  # noqa: E402
from processors.render import FaceRenderer  # noqa: E402
from processors.visemes import VISEMES, target_vector  # noqa: E402

SIZE = 512
COLUMNS = 6


def poses() -> list[tuple[str, NDArray[np.float32], NDArray[np.float32]]]:
    """(label, 52 weights, head pose) of each tile."""
    still = np.zeros(3, np.float32)
    out = [(f"viseme {v}", target_vector(v).astype(np.float32), still) for v in VISEMES]
    blink = np.zeros(52, np.float32)
    blink[INDEX["eyeBlinkLeft"]] = blink[INDEX["eyeBlinkRight"]] = 1.0
    out.append(("blink", blink, still))
    for emotion, offsets in EMOTIONS.items():
        # The procedural model's own offsets at intensity 1 over an idle (all-zero) frame,
        # the way procedural_motion adds them, head tilt included.
        w = np.zeros(52, np.float32)
        for name, value in offsets.items():
            w[INDEX[name]] += value
        head = np.asarray(EMOTION_HEAD_RAD[emotion], np.float32)
        out.append((f"{emotion} (1.0)", np.clip(w, 0, 1), head))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=str(ROOT / "docs" / "contact_sheet.png"))
    p.add_argument("--pack", default=None, help="a portrait pack file (default: the shipped one)")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    renderer = FaceRenderer(size=SIZE, pack_path=args.pack)
    renderer.start()
    lm = renderer.pack.landmarks[:, :2]
    # Face box: the landmarks' extent plus a margin; mouth box: the lips plus a margin.
    fx0, fy0 = np.maximum(lm.min(axis=0) - 12, 0).astype(int)
    fx1, fy1 = np.minimum(lm.max(axis=0) + 12, SIZE).astype(int)
    mouth = lm[[61, 291, 0, 17]]
    cx, cy = mouth.mean(axis=0)
    half_w = (mouth[:, 0].max() - mouth[:, 0].min()) * 0.85
    mx0, mx1 = int(cx - half_w), int(cx + half_w)
    my0, my1 = int(cy - half_w * 0.6), int(cy + half_w * 0.6)

    tiles = poses()
    rows = -(-len(tiles) // COLUMNS)
    fig, axes = plt.subplots(rows * 2, COLUMNS, figsize=(COLUMNS * 3.0, rows * 4.6),
                             gridspec_kw={"height_ratios": [3.0, 1.3] * rows})
    for ax in axes.flat:
        ax.axis("off")
    for i, (label, w, head) in enumerate(tiles):
        frame = renderer.render(w, head)
        r, c = divmod(i, COLUMNS)
        axes[2 * r, c].imshow(frame[fy0:fy1, fx0:fx1])
        axes[2 * r, c].set_title(label, fontsize=11)
        axes[2 * r + 1, c].imshow(frame[my0:my1, mx0:mx1], interpolation="lanczos")
    fig.suptitle("default portrait at 512 px: visemes (target weights), blink, emotions "
                 "(procedural offsets at intensity 1); below each, the mouth enlarged",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
