"""Portrait packs: building from a photo, the shipped default, save/load."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.data import astronaut as _astronaut
from skimage.transform import rescale

from processors.portrait import (DEFAULT_PACK_PATH, FIELD_NAMES, PortraitError, PortraitPack,
                                 build_pack, default_pack, load_pack)

REQUIRED = (
    "jawOpen", "mouthClose", "mouthPressLeft", "mouthPressRight", "mouthFunnel", "mouthPucker",
    "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthUpperUpLeft", "mouthUpperUpRight", "mouthLowerDownLeft",
    "mouthLowerDownRight", "eyeBlinkLeft", "eyeBlinkRight", "browInnerUp", "browDownLeft",
    "browDownRight", "browOuterUpLeft", "browOuterUpRight", "cheekSquintLeft",
    "cheekSquintRight", "eyeWideLeft", "eyeWideRight", "yaw", "pitch", "roll",
)


def astronaut() -> np.ndarray:
    return np.asarray(_astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def pack() -> PortraitPack:
    return default_pack()


def test_default_pack_has_a_full_resolution_field_per_driven_blendshape(
        pack: PortraitPack) -> None:
    assert pack.image.shape == (512, 512, 3)
    assert pack.landmarks.shape == (478, 3)
    for name in REQUIRED:
        field = pack.dense_field(name)
        assert field.shape == (512, 512, 2) and field.dtype == np.float32
        assert np.abs(field).max() > 1e-3, f"{name} moves nothing"


def test_the_shipped_pack_file_stays_small() -> None:
    assert DEFAULT_PACK_PATH.stat().st_size < 3_000_000


def test_fields_are_zero_at_the_image_border(pack: PortraitPack) -> None:
    for name in FIELD_NAMES:
        field = pack.dense_field(name)
        border = np.concatenate([field[0], field[-1], field[:, 0], field[:, -1]])
        assert np.abs(border).max() < 1e-6, name


def test_a_pack_survives_save_and_load(pack: PortraitPack, tmp_path: Path) -> None:
    path = tmp_path / "copy.npz"
    pack.save(path)
    again = load_pack(path)
    assert again.field_names == pack.field_names
    np.testing.assert_array_equal(again.image, pack.image)
    np.testing.assert_allclose(again.fields, pack.fields, atol=1e-4)
    np.testing.assert_allclose(again.dense_field("jawOpen"), pack.dense_field("jawOpen"),
                               atol=1e-4)


def test_a_pack_resizes_to_another_output_size(pack: PortraitPack) -> None:
    small = pack.resized(256)
    assert small.image.shape == (256, 256, 3)
    assert small.dense_field("eyeBlinkLeft").shape == (256, 256, 2)


@pytest.mark.parametrize("image", [
    np.full((320, 320, 3), 128, dtype=np.uint8),
    (np.random.default_rng(0).random((320, 320, 3)) * 255).astype(np.uint8),
], ids=["flat", "noise"])
def test_a_photo_without_a_face_is_refused(image: np.ndarray) -> None:
    with pytest.raises(PortraitError, match="no face"):
        build_pack(image)


def test_a_photo_with_two_faces_is_refused() -> None:
    face = astronaut()[40:230, 130:320]
    with pytest.raises(PortraitError, match="2 faces"):
        build_pack(np.ascontiguousarray(np.concatenate([face, face], axis=1)))


def test_a_face_too_small_to_animate_is_refused() -> None:
    small = (rescale(astronaut(), 0.6, channel_axis=2) * 255).astype(np.uint8)
    with pytest.raises(PortraitError, match="px across"):
        build_pack(small)
