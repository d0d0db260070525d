"""The renderer: blendshape weights and head pose to frames of the default portrait."""
from __future__ import annotations

import numpy as np
import pytest

from backbone.blendshapes import INDEX
from processors.portrait import EYE_LOWER, EYE_UPPER, FACE_OVAL, LIP_OUTER_LOWER, PortraitPack
from processors.render import FaceRenderer

STILL = np.zeros(3, dtype=np.float32)


def weights(**named: float) -> np.ndarray:
    w = np.zeros(52, dtype=np.float32)
    for name, value in named.items():
        w[INDEX[name]] = value
    return w


@pytest.fixture(scope="module")
def renderer() -> FaceRenderer:
    r = FaceRenderer()
    r.start()
    return r


@pytest.fixture(scope="module")
def pack(renderer: FaceRenderer) -> PortraitPack:
    return renderer.pack


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1))


def polygon_mask(points: np.ndarray, size: int) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros((size, size), dtype=bool)
    rr, cc = polygon(points[:, 1], points[:, 0], (size, size))  # type: ignore[no-untyped-call]
    mask[rr, cc] = True
    return mask


def test_neutral_weights_render_the_portrait(renderer: FaceRenderer,
                                             pack: PortraitPack) -> None:
    frame = renderer.render(weights(), STILL)
    assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8
    d = diff(frame, pack.image)
    assert d.mean() < 0.5
    assert np.percentile(d, 99.9) < 12


def test_jaw_open_moves_the_mouth_but_not_the_background(renderer: FaceRenderer,
                                                         pack: PortraitPack) -> None:
    neutral = renderer.render(weights(), STILL)
    frame = renderer.render(weights(jawOpen=1.0), STILL)
    lm = pack.landmarks[:, :2]
    lips = lm[list(LIP_OUTER_LOWER)]
    x0, x1 = int(lips[:, 0].min()), int(lips[:, 0].max())
    y0, y1 = int(lips[:, 1].min()), int(lips[:, 1].max()) + 20
    assert diff(frame, neutral)[y0:y1, x0:x1].mean() > 20
    for corner in (np.s_[:48, :48], np.s_[:48, -48:], np.s_[-48:, :48], np.s_[-48:, -48:]):
        assert diff(frame, neutral)[corner].max() == 0
    oval = lm[list(FACE_OVAL)]
    centre = oval.mean(axis=0)
    far_outside = ~polygon_mask(centre + (oval - centre) * 1.9, 512)
    assert diff(frame, neutral)[far_outside].max() == 0


def test_an_open_jaw_shows_a_dark_mouth_not_stretched_lips(renderer: FaceRenderer,
                                                           pack: PortraitPack) -> None:
    frame = renderer.render(weights(jawOpen=1.0), STILL).astype(np.float64)
    lm = pack.landmarks[:, :2]
    # Halfway between the lips' resting line and the dropped lower lip.
    x = int(round(lm[14, 0]))
    y = int(round(lm[14, 1] + 0.06 * np.linalg.norm(lm[152] - lm[10])))
    patch = frame[y - 2:y + 3, x - 6:x + 7]
    assert patch.mean() < 90


def eye_content(pixels: np.ndarray) -> float:
    """Fraction of pixels that look like an open eye: white of the eye, or iris."""
    value = pixels.max(axis=-1).astype(np.float64)
    saturation = (value - pixels.min(axis=-1)) / np.maximum(value, 1.0)
    white = (saturation < 0.22) & (value > 150)
    iris = value < 100
    return float((white | iris).mean())


@pytest.mark.parametrize("eye", ["Left", "Right"])
def test_a_blink_closes_the_eye_completely(renderer: FaceRenderer, pack: PortraitPack,
                                           eye: str) -> None:
    lm = pack.landmarks[:, :2]
    upper = lm[list(EYE_UPPER[eye])]
    lower = lm[list(EYE_LOWER[eye])]
    # The body of the opening; a closed lid gathers its lashes at the lower edge.
    band = np.concatenate([upper + 0.15 * (lower - upper),
                           (upper + 0.75 * (lower - upper))[::-1]])
    inside = polygon_mask(band, 512)
    open_eye = renderer.render(weights(), STILL)
    closed = renderer.render(weights(**{f"eyeBlink{eye}": 1.0}), STILL)
    assert eye_content(open_eye[inside]) > 0.4
    assert eye_content(closed[inside]) < 0.03
    other = "Right" if eye == "Left" else "Left"
    other_opening = polygon_mask(np.concatenate(
        [lm[list(EYE_UPPER[other])], lm[list(EYE_LOWER[other])][::-1]]), 512)
    assert diff(closed, open_eye)[other_opening].max() < 8


def test_half_a_blink_half_closes_the_eye(renderer: FaceRenderer, pack: PortraitPack) -> None:
    lm = pack.landmarks[:, :2]
    upper = lm[list(EYE_UPPER["Left"])]
    lower = lm[list(EYE_LOWER["Left"])]
    inside = polygon_mask(np.concatenate([upper, lower[::-1]]), 512)
    content = [eye_content(renderer.render(weights(eyeBlinkLeft=w), STILL)[inside])
               for w in (0.0, 0.5, 1.0)]
    assert content[0] > content[1] > content[2]


def test_nan_and_out_of_range_input_does_not_crash(renderer: FaceRenderer) -> None:
    neutral = renderer.render(weights(), STILL)
    nan = renderer.render(np.full(52, np.nan, dtype=np.float32),
                          np.full(3, np.nan, dtype=np.float32))
    np.testing.assert_array_equal(nan, neutral)
    wild = weights(jawOpen=5.0, eyeBlinkLeft=-3.0)
    wild[INDEX["mouthSmileLeft"]] = np.inf
    frame = renderer.render(wild, np.array([np.inf, -9.0, 0.0], dtype=np.float32))
    assert frame.shape == (512, 512, 3)


def test_weights_are_clamped_to_one(renderer: FaceRenderer) -> None:
    np.testing.assert_array_equal(renderer.render(weights(jawOpen=3.0), STILL),
                                  renderer.render(weights(jawOpen=1.0), STILL))


def test_a_batch_renders_the_same_frames_as_one_at_a_time(renderer: FaceRenderer) -> None:
    w = np.stack([weights(jawOpen=0.4), weights(eyeBlinkLeft=1.0), weights(mouthFunnel=0.8)])
    h = np.array([[0.05, 0.0, 0.0], [0.0, -0.05, 0.02], [0.0, 0.0, 0.0]], dtype=np.float32)
    batch = renderer.render_batch(w, h)
    for i in range(3):
        assert diff(batch[i], renderer.render(w[i], h[i])).max() <= 1


def test_a_frame_streamed_is_byte_for_byte_the_frame_rendered_in_any_batch(
        renderer: FaceRenderer) -> None:
    # The stage batches whatever records it has fetched (several sessions); the auditor
    # re-renders one record at a time. Both must draw the very same frame.
    from benchmarks.render import speech_motion

    w, h = speech_motion(200)
    pick = np.array([3, 57, 58, 120, 121, 122, 180, 199])
    w, h = w[pick], h[pick]
    w[1, INDEX["eyeBlinkLeft"]] = w[1, INDEX["eyeBlinkRight"]] = 0.9  # a lid moves in one
    h[4] = (0.12, -0.08, 0.05)  # and one turns far
    together = renderer.render_batch_i420(w, h)
    alone = np.stack([renderer.render_i420(w[i], h[i]) for i in range(len(w))])
    pairs = np.concatenate([renderer.render_batch_i420(w[i:i + 2], h[i:i + 2])
                            for i in range(0, len(w), 2)])
    assert np.array_equal(together, alone)
    assert np.array_equal(pairs, alone)


def test_head_yaw_turns_the_face_and_leaves_the_frame_edge(renderer: FaceRenderer,
                                                           pack: PortraitPack) -> None:
    neutral = renderer.render(weights(), STILL)
    turned = renderer.render(weights(), np.array([0.1, 0.0, 0.0], dtype=np.float32))
    nose = pack.landmarks[4, :2].astype(int)
    assert diff(turned, neutral)[nose[1] - 10:nose[1] + 10, nose[0] - 10:nose[0] + 10].mean() > 5
    assert diff(turned, neutral)[:, :40].max() == 0


def test_the_constructor_does_no_io() -> None:
    renderer = FaceRenderer(pack_path="/nonexistent/pack.npz")
    with pytest.raises(FileNotFoundError):
        renderer.start()
