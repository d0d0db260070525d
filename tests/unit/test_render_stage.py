"""The render stage: motion records in, H.264 video records out, one bad frame never ends a
session (run with the no-bus harness)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import pytest
from prometheus_client import REGISTRY

from backbone.blendshapes import INDEX
from backbone.harness import HarnessResult, run_stage
from backbone.records import MotionFrames, SessionConfig, SessionControl, VideoChunk
from processors.encode import H264Encoder
from processors.render import FaceRenderer, RenderStage

SESSION = "s-render"


@pytest.fixture(scope="module")
def stage() -> RenderStage:
    s = RenderStage()
    s.start()
    return s


@pytest.fixture(autouse=True)
def empty_portrait_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Whatever portraits the developer added locally must not change what these tests see.
    monkeypatch.setenv("AVATAR_PORTRAIT_DIR", str(tmp_path / "portraits"))
    yield tmp_path / "portraits"


def create(resolution: int = 512, portrait: str = "astronaut",
           session: str = SESSION) -> tuple[str, SessionControl]:
    cfg = SessionConfig(portrait=portrait, resolution=resolution)
    return ("session.control", SessionControl(session, "CREATE", cfg))


def motion(first: int, n: int, *, fps: int = 25, weights: np.ndarray | None = None,
           head: np.ndarray | None = None, is_last: bool = False,
           session: str = SESSION) -> tuple[str, MotionFrames]:
    w = np.zeros((n, 52), np.float32) if weights is None else weights
    if weights is None:
        # A little jaw movement so consecutive frames differ, as in speech.
        w[:, INDEX["jawOpen"]] = np.linspace(0.0, 0.4, n, dtype=np.float32)
    h = np.zeros((n, 3), np.float32) if head is None else head
    frames = np.arange(first, first + n, dtype=np.int64)
    return ("motion", MotionFrames(session, fps, frames, w, h, "u1", is_last))


def chunks(result: HarnessResult) -> list[VideoChunk]:
    out = [v for v in result.values("video") if isinstance(v, VideoChunk)]
    assert len(out) == len(result.values("video"))
    return out


def decode(packets: list[VideoChunk]) -> list[np.ndarray]:
    """Decode the packets from the first one, as a viewer joining at the start would."""
    ctx = av.CodecContext.create("h264", "r")
    frames = []
    for p in packets:
        for f in ctx.decode(av.Packet(p.data)):
            frames.append(f.to_ndarray(format="rgb24"))
    for f in ctx.decode(None):
        frames.append(f.to_ndarray(format="rgb24"))
    return frames


def counter(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_pts_are_consecutive_and_the_first_packet_is_a_keyframe(stage: RenderStage) -> None:
    result = run_stage(stage, [create(), motion(0, 2), motion(2, 2), motion(4, 2, is_last=True)],
                       start=False)
    video = chunks(result)
    assert [v.pts for v in video] == list(range(6))
    assert video[0].keyframe and video[0].extradata
    assert not any(v.keyframe for v in video[1:])
    assert [v.is_last for v in video] == [False] * 5 + [True]
    assert len(decode(video)) == 6


@pytest.mark.parametrize("resolution", [256, 512, 768])
def test_the_session_resolution_is_honoured(stage: RenderStage, resolution: int) -> None:
    result = run_stage(stage, [create(resolution), motion(0, 2)], start=False)
    video = chunks(result)
    assert {(v.width, v.height) for v in video} == {(resolution, resolution)}
    assert decode(video)[0].shape == (resolution, resolution, 3)


def test_a_replayed_motion_record_is_skipped_without_duplicate_pts(stage: RenderStage) -> None:
    result = run_stage(stage, [create(), motion(0, 4), motion(0, 4), motion(2, 4)], start=False)
    assert [v.pts for v in chunks(result)] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 7.0, -3.0])
def test_bad_latents_are_clamped_and_counted(stage: RenderStage, bad: float) -> None:
    w = np.zeros((2, 52), np.float32)
    w[0, INDEX["jawOpen"]] = bad
    w[1, INDEX["eyeBlinkLeft"]] = bad
    head = np.array([[bad, 0, 0], [0, 0, 0]], np.float32)
    before = counter("avatar_render_repaired_latents_total")
    result = run_stage(stage, [create(), motion(0, 2, weights=w, head=head)], start=False)
    assert [v.pts for v in chunks(result)] == [0, 1]
    assert not result.rejected
    assert counter("avatar_render_repaired_latents_total") - before == 2
    assert len(decode(chunks(result))) == 2


def test_a_renderer_failure_holds_the_previous_frame_and_the_stream_goes_on(
        stage: RenderStage, monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = stage.renderer("astronaut", 512)
    state: dict[str, Any] = {}
    first = run_stage(stage, [create(), motion(0, 2)], state, start=False)
    batch = FaceRenderer.render_batch_i420  # the real one, under the broken instance attribute
    calls = {"render": 0}

    def broken_batch(*_: Any) -> np.ndarray:
        raise RuntimeError("chunk exploded")

    def flaky_render(w: np.ndarray, h: np.ndarray) -> np.ndarray:
        calls["render"] += 1
        if calls["render"] == 1:
            raise RuntimeError("frame exploded")
        frame: np.ndarray = batch(renderer, w[None], h[None])[0]
        return frame

    monkeypatch.setattr(renderer, "render_batch_i420", broken_batch)
    monkeypatch.setattr(renderer, "render_i420", flaky_render)
    before = counter("avatar_render_replaced_frames_total", {"reason": "RuntimeError"})
    second = run_stage(stage, [motion(2, 3)], state, start=False)
    monkeypatch.undo()
    third = run_stage(stage, [motion(5, 2)], state, start=False)

    video = chunks(first) + chunks(second) + chunks(third)
    assert [v.pts for v in video] == list(range(7))
    assert counter("avatar_render_replaced_frames_total", {"reason": "RuntimeError"}) \
        - before == 1
    frames = decode(video)
    assert len(frames) == 7
    # Frame 2 failed: it shows frame 1 again (up to coding noise), not a jump.
    held = np.abs(frames[2].astype(int) - frames[1].astype(int)).mean()
    moved = np.abs(frames[3].astype(int) - frames[1].astype(int)).mean()
    assert held < moved


def test_a_failure_on_the_first_frame_shows_the_still_portrait(
        stage: RenderStage, monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = stage.renderer("astronaut", 512)

    def broken(*_: Any) -> np.ndarray:
        raise RuntimeError("nothing renders")

    monkeypatch.setattr(renderer, "render_batch_i420", broken)
    monkeypatch.setattr(renderer, "render_i420", broken)
    result = run_stage(stage, [create(), motion(0, 2)], start=False)
    assert [v.pts for v in chunks(result)] == [0, 1]
    assert not result.rejected


def test_an_encoder_failure_restarts_on_a_keyframe_and_the_session_continues(
        stage: RenderStage, monkeypatch: pytest.MonkeyPatch) -> None:
    encode = H264Encoder.encode_i420
    calls = {"n": 0}

    def flaky(self: H264Encoder, frame: np.ndarray, pts: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # the fourth frame, pts 3
            raise RuntimeError("encoder exploded")
        return encode(self, frame, pts)

    monkeypatch.setattr(H264Encoder, "encode_i420", flaky)
    before = counter("avatar_render_encoder_restarts_total")
    result = run_stage(stage, [create(), motion(0, 2), motion(2, 2), motion(4, 2)], start=False)
    video = chunks(result)
    assert [v.pts for v in video] == list(range(6))
    assert [v.pts for v in video if v.keyframe] == [0, 3]
    assert video[3].extradata  # a viewer can start from the restart alone
    assert counter("avatar_render_encoder_restarts_total") - before == 1
    assert len(decode(video[3:])) == 3
    assert len(decode(video)) == 6


def test_an_unknown_portrait_is_dead_lettered(stage: RenderStage) -> None:
    result = run_stage(stage, [create(portrait="nobody"), motion(0, 2)], start=False)
    assert not result.outputs
    [(record, reason)] = result.rejected
    assert record.topic == "motion"
    assert "unknown portrait 'nobody'" in reason


@pytest.mark.parametrize("name", ["../astronaut", "a/b", ""])
def test_a_portrait_name_cannot_reach_outside_the_portrait_dir(stage: RenderStage,
                                                               name: str) -> None:
    result = run_stage(stage, [create(portrait=name), motion(0, 2)], start=False)
    assert len(result.rejected) == 1 and not result.outputs


@pytest.mark.parametrize("fps", [0, -5, 121, 1000])
def test_fps_out_of_range_is_rejected(stage: RenderStage, fps: int) -> None:
    result = run_stage(stage, [create(), motion(0, 2, fps=fps)], start=False)
    assert not result.outputs
    assert "fps" in result.rejected[0][1]


def test_motion_with_mismatched_shapes_is_rejected(stage: RenderStage) -> None:
    result = run_stage(stage, [create(), motion(0, 2, weights=np.zeros((2, 40), np.float32))],
                       start=False)
    assert not result.outputs
    assert "shapes" in result.rejected[0][1]


def test_sessions_have_their_own_encoders_and_clocks(stage: RenderStage) -> None:
    result = run_stage(stage, [create(session="a"), create(session="b", resolution=256),
                               motion(0, 2, session="a"), motion(0, 2, session="b"),
                               motion(2, 2, session="a")], start=False)
    video = chunks(result)
    a = [v for v in video if v.session_id == "a"]
    b = [v for v in video if v.session_id == "b"]
    assert [v.pts for v in a] == [0, 1, 2, 3] and [v.pts for v in b] == [0, 1]
    assert a[0].keyframe and b[0].keyframe and b[0].width == 256


def inbound(item: tuple[str, Any], seq: int) -> Any:
    from backbone.stage import Inbound

    topic, value = item
    return Inbound(topic, value.session_id, value, seq, 0)


def test_a_batch_of_several_sessions_renders_the_same_video_as_one_record_at_a_time(
        stage: RenderStage) -> None:
    from backbone.stage import SessionState

    sessions = ("a", "b", "c")
    states = {s: SessionState(s) for s in sessions}
    one_by_one: dict[str, SessionState] = {}
    setup = [create(session=s, resolution=256 if s == "c" else 512) for s in sessions]
    run_stage(stage, setup, one_by_one, start=False)
    for i, item in enumerate(setup):
        stage.process(inbound(item, i), states[item[1].session_id])
    records = [motion(0, 2, session="a"), motion(0, 2, session="b"), motion(0, 2, session="c"),
               motion(2, 2, session="a"), motion(1, 3, session="b")]  # b overlaps: replay
    batched = stage.process_batch([(inbound(r, i), states[r[1].session_id])
                                   for i, r in enumerate(records)])
    single = run_stage(stage, records, one_by_one, start=False)
    got = [v for out in batched for o in out for v in [o.value]]  # type: ignore[union-attr]
    want = single.values("video")
    assert [(v.session_id, v.pts) for v in got] == [(v.session_id, v.pts) for v in want]
    assert [(v.session_id, v.pts) for v in got if v.session_id == "b"] == [
        ("b", 0), ("b", 1), ("b", 2), ("b", 3)]
    for g, w in zip(got, want):
        assert g.data == w.data  # the same frames, encoded the same way


def test_a_bad_record_in_a_batch_is_rejected_alone(stage: RenderStage) -> None:
    from backbone.stage import RecordRejected, SessionState

    state = SessionState(SESSION)
    stage.process(inbound(create(), 0), state)
    items = [(inbound(motion(0, 2), 1), state),
             (inbound(motion(2, 2, fps=500), 2), state),
             (inbound(motion(2, 2), 3), state)]
    first, bad, third = stage.process_batch(items)
    assert isinstance(bad, RecordRejected) and "fps" in str(bad)
    assert isinstance(first, list) and isinstance(third, list)
    assert [o.value.pts for o in first + third] == [0, 1, 2, 3]  # type: ignore[union-attr]
