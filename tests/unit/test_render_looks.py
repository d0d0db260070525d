"""What the rendered face shows: each viseme's mouth, emotions' features, and the I420 fast
path the render stage uses matching the RGB reference."""
from __future__ import annotations

import av
import numpy as np
import pytest
from av.video.reformatter import VideoReformatter

from backbone.blendshapes import INDEX
from processors.portrait import (EYE_LOWER, EYE_UPPER, LIP_INNER_LOWER, LIP_INNER_UPPER,
                                 PortraitPack)
from processors.render import FaceRenderer
from processors.visemes import target_vector

STILL = np.zeros(3, dtype=np.float32)


@pytest.fixture(scope="module")
def renderer() -> FaceRenderer:
    r = FaceRenderer()
    r.start()
    return r


@pytest.fixture(scope="module")
def pack(renderer: FaceRenderer) -> PortraitPack:
    return renderer.pack


def viseme(renderer: FaceRenderer, name: str) -> np.ndarray:
    return renderer.render(target_vector(name).astype(np.float32), STILL).astype(np.float64)


def weights(**named: float) -> np.ndarray:
    w = np.zeros(52, dtype=np.float32)
    for name, value in named.items():
        w[INDEX[name]] = value
    return w


def teeth(rgb: np.ndarray) -> np.ndarray:
    """Bright, nearly grey pixels (lips, even pressed pale, are far more saturated)."""
    value = rgb.max(axis=-1)
    saturation = (value - rgb.min(axis=-1)) / np.maximum(value, 1.0)
    return np.asarray((value > 170) & (saturation < 0.15))


def opening(rgb: np.ndarray) -> np.ndarray:
    """Teeth or the dark cavity: whatever is not lip or skin between the lips."""
    return teeth(rgb) | (rgb.max(axis=-1) < 80)


def mouth_box(pack: PortraitPack, pad: int = 12) -> tuple[slice, slice]:
    lm = pack.landmarks[:, :2]
    lips = lm[list(LIP_INNER_UPPER) + list(LIP_INNER_LOWER)]
    x0, y0 = lips.min(axis=0).astype(int) - pad
    x1, y1 = lips.max(axis=0).astype(int) + pad
    return slice(y0, y1), slice(x0, x1)


def open_width(frame: np.ndarray, pack: PortraitPack) -> int:
    """How many columns of the mouth box show any teeth or cavity."""
    rows, cols = mouth_box(pack)
    return int(opening(frame[rows, cols]).any(axis=0).sum())


def test_the_rounded_visemes_draw_the_mouth_narrower_than_rest(renderer: FaceRenderer,
                                                                pack: PortraitPack) -> None:
    rest = open_width(viseme(renderer, "sil"), pack)
    for name, most in (("U", 0.8), ("W", 0.7), ("CH", 0.85), ("RR", 0.85)):
        assert open_width(viseme(renderer, name), pack) < most * rest, name


def test_ff_tucks_the_lower_lip_up_over_the_upper_teeth(renderer: FaceRenderer,
                                                        pack: PortraitPack) -> None:
    lm = pack.landmarks[:, :2]
    x = int(round(lm[14, 0]))
    top, bottom = int(round(lm[13, 1])), int(round(lm[14, 1]))
    # The lower half of the teeth the photo shows between the lips, mid-mouth.
    band = np.s_[bottom - (bottom - top) // 2:bottom, x - 8:x + 9]
    assert teeth(viseme(renderer, "sil")[band]).mean() > 0.7
    ff = viseme(renderer, "FF")
    assert teeth(ff[band]).mean() < 0.1
    # ...while the upper teeth still show above the lip (the upper lip lifts a little).
    column = teeth(ff[top - 6:bottom, x - 8:x + 9]).mean(axis=1)
    assert (column > 0.5).sum() >= 2


def tongue(rgb: np.ndarray) -> np.ndarray:
    """Lit, strongly red pixels: redder than lips (green ~0.75 of red), brighter than the
    cavity's rim."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.asarray((r > 125) & (g < 0.62 * r) & (b < 0.62 * r))


def test_th_shows_the_tongue_tip_between_the_teeth(renderer: FaceRenderer,
                                                   pack: PortraitPack) -> None:
    rows, _ = mouth_box(pack, pad=2)
    x = int(round(pack.landmarks[14, 0]))
    middle = slice(x - 15, x + 16)  # the middle of the mouth (the corners are shadowed)
    assert tongue(viseme(renderer, "sil")[rows, middle]).sum() < 5
    assert tongue(viseme(renderer, "TH")[rows, middle]).sum() > 60


def test_bilabials_seal_the_lips(renderer: FaceRenderer, pack: PortraitPack) -> None:
    rows, cols = mouth_box(pack, pad=0)
    assert opening(viseme(renderer, "sil")[rows, cols]).mean() > 0.12
    # What is left is the photo's shadowed mouth corners.
    assert opening(viseme(renderer, "PP")[rows, cols]).mean() < 0.04


@pytest.mark.parametrize("name", ["aa", "O", "E"])
def test_open_vowels_show_the_upper_teeth_and_a_dark_mouth(renderer: FaceRenderer,
                                                           pack: PortraitPack,
                                                           name: str) -> None:
    rows, cols = mouth_box(pack, pad=30)
    frame = viseme(renderer, name)[rows, cols]
    assert teeth(frame).sum() > 200
    assert (frame.max(axis=-1) < 80).sum() > 50


def test_a_frown_turns_the_corners_of_a_smiling_photo_down(renderer: FaceRenderer,
                                                           pack: PortraitPack) -> None:
    rest = viseme(renderer, "sil")
    frown = renderer.render(weights(mouthFrownLeft=1.0, mouthFrownRight=1.0),
                            STILL).astype(np.float64)
    rows, cols = mouth_box(pack, pad=0)

    def corner_drop(frame: np.ndarray) -> float:
        """Lowest row of the opening at the outer fifths minus at the middle fifth."""
        o = opening(frame[rows, cols])
        w = o.shape[1]
        ys = [np.nonzero(o[:, a:b].any(axis=1))[0] for a, b in
              ((0, w // 5), (2 * w // 5, 3 * w // 5), (4 * w // 5, w))]
        if any(len(y) == 0 for y in ys):
            return 0.0
        return float(np.mean([ys[0].mean(), ys[2].mean()]) - ys[1].mean())

    # A smile's corners sit above the middle; a frown brings them level or below.
    assert corner_drop(rest) < -4
    assert corner_drop(frown) > corner_drop(rest) + 4


def eye_content(pixels: np.ndarray) -> float:
    value = pixels.max(axis=-1).astype(np.float64)
    saturation = (value - pixels.min(axis=-1)) / np.maximum(value, 1.0)
    return float(((saturation < 0.22) & (value > 150) | (value < 100)).mean())


def test_wide_eyes_show_more_eye_above_the_resting_upper_lid(renderer: FaceRenderer,
                                                             pack: PortraitPack) -> None:
    lm = pack.landmarks[:, :2]
    for eye in ("Left", "Right"):
        upper = lm[list(EYE_UPPER[eye])[2:-2]]
        height = float((lm[list(EYE_LOWER[eye])] - lm[list(EYE_UPPER[eye])])[:, 1].max())
        x0, x1 = int(upper[:, 0].min()), int(upper[:, 0].max())
        y1 = int(upper[:, 1].min()) + 1
        band = np.s_[y1 - int(0.25 * height) - 1:y1, x0:x1]
        rest = renderer.render(weights(), STILL)
        wide = renderer.render(weights(eyeWideLeft=1.0, eyeWideRight=1.0), STILL)
        assert eye_content(wide[band]) > eye_content(rest[band]) + 0.1, eye_content


def test_the_i420_fast_path_matches_the_rgb_reference(renderer: FaceRenderer) -> None:
    w = np.stack([weights(jawOpen=0.5, mouthFunnel=0.3), weights(eyeBlinkLeft=0.6),
                  target_vector("TH").astype(np.float32)])
    h = np.array([[0.04, -0.02, 0.01], [0.0, 0.03, 0.0], [-0.03, 0.0, 0.0]], np.float32)
    rgb = renderer.render_batch(w, h)
    i420 = renderer.render_batch_i420(w, h)
    s = renderer.size
    assert i420.shape == (3, s * 3 // 2, s)
    convert = VideoReformatter()
    for frame, planes in zip(rgb, i420):
        ref = convert.reformat(av.VideoFrame.from_ndarray(frame, format="rgb24"),
                               format="yuv420p").to_ndarray()
        d = np.abs(ref.astype(np.int16) - planes.astype(np.int16))
        # Luma: the same pixels, rounding apart (the tongue's shading differs a little).
        assert np.percentile(d[:s], 99.99) <= 1 and d[:s].max() <= 4
        assert d[s:].mean() < 0.5 and np.percentile(d[s:], 99.9) <= 8  # chroma: 2x2 sites


def test_the_still_portrait_in_i420_is_what_neutral_renders(renderer: FaceRenderer) -> None:
    neutral = renderer.render_i420(weights(), STILL)
    d = np.abs(neutral.astype(np.int16) - renderer.portrait_i420.astype(np.int16))
    assert d.mean() < 0.3


def test_leaving_still_pixels_alone_changes_nothing_visible(
        renderer: FaceRenderer, monkeypatch: pytest.MonkeyPatch) -> None:
    import processors.render as render_module
    from benchmarks.render import speech_motion

    w, h = speech_motion(120)
    frames = np.arange(0, 120, 9)
    fast = renderer.render_batch_i420(w[frames], h[frames])
    monkeypatch.setattr(render_module, "STILL_PX", 0.0)  # warp the whole ROI every frame
    everywhere = FaceRenderer()
    everywhere.start()
    full = everywhere.render_batch_i420(w[frames], h[frames])
    d = np.abs(fast.astype(np.int16) - full.astype(np.int16))
    assert d.max() <= 3 and d.mean() < 0.01
