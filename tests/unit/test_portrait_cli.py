"""`avatar portrait add/list`: a photo becomes a named portrait the render stage can use."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backbone.blendshapes import INDEX
from backbone.cli import main
from backbone.harness import run_stage
from backbone.records import MotionFrames, SessionConfig, SessionControl, VideoChunk
from processors.render import RenderStage


@pytest.fixture
def portrait_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "portraits"
    monkeypatch.setenv("AVATAR_PORTRAIT_DIR", str(d))
    return d


def save_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def test_an_added_photo_becomes_a_portrait_the_render_stage_uses(
        tmp_path: Path, portrait_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from skimage.data import astronaut

    photo = np.ascontiguousarray(np.fliplr(astronaut()))  # type: ignore[no-untyped-call]
    png = save_png(tmp_path / "mirrored.png", photo)
    assert main(["portrait", "add", str(png), "--name", "mirror"]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == portrait_dir / "mirror.npz" and Path(printed).is_file()

    assert main(["portrait", "list"]) == 0
    names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["astronaut", "mirror"]

    n = 3
    w = np.zeros((n, 52), np.float32)
    w[:, INDEX["jawOpen"]] = 0.5
    cfg = SessionConfig(portrait="mirror", resolution=256)
    result = run_stage(RenderStage(), [
        ("session.control", SessionControl("s1", "CREATE", cfg)),
        ("motion", MotionFrames("s1", 25, np.arange(n, dtype=np.int64), w,
                                np.zeros((n, 3), np.float32))),
    ], start=False)
    assert not result.rejected
    video = result.values("video")
    assert [v.pts for v in video if isinstance(v, VideoChunk)] == [0, 1, 2]


def test_a_photo_without_a_face_fails_with_one_clear_line(
        tmp_path: Path, portrait_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = save_png(tmp_path / "grey.png", np.full((256, 256, 3), 128, np.uint8))
    assert main(["portrait", "add", str(png)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no face found" in err and "grey.png" in err
    assert not portrait_dir.exists() or not any(portrait_dir.iterdir())


def test_a_file_that_is_not_an_image_fails_with_one_clear_line(
        tmp_path: Path, portrait_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "notes.png"
    junk.write_text("not a picture")
    assert main(["portrait", "add", str(junk)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read" in err


def test_a_bad_portrait_name_is_refused(tmp_path: Path, portrait_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    png = save_png(tmp_path / "grey.png", np.full((64, 64, 3), 128, np.uint8))
    assert main(["portrait", "add", str(png), "--name", "../evil"]) == 1
    assert "portrait name" in capsys.readouterr().err
