"""The runtime hands a batching stage the records already fetched, several sessions at
once (the render stage warps them together); what comes out is what one-at-a-time makes."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from backbone.blendshapes import INDEX
from backbone.records import MotionFrames, SessionConfig, SessionControl, VideoChunk
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from processors.render import RenderStage
from tests.support.bus_io import decode, read_all, send

SESSIONS = ("a", "b", "c")


class CountingRender(RenderStage):
    """The render stage, noting how many records each call got."""

    def __init__(self, batch_max: int) -> None:
        super().__init__()
        self.batch_max = batch_max
        self.calls: list[int] = []

    def process(self, record: Any, state: Any) -> Any:
        self.calls.append(1)
        return super().process(record, state)

    def process_batch(self, items: Any) -> Any:
        self.calls.append(len(items))
        return super().process_batch(items)


def motion(session: str, first: int, n: int) -> MotionFrames:
    w = np.zeros((n, 52), np.float32)
    w[:, INDEX["jawOpen"]] = np.linspace(0.1, 0.5, n, dtype=np.float32)
    head = np.zeros((n, 3), np.float32)
    return MotionFrames(session, 25, np.arange(first, first + n, dtype=np.int64), w, head, "u1",
                        False)


def run(tmp_path: Any, name: str, batch_max: int, bad: bool = False) -> tuple[
        CountingRender, dict[str, list[VideoChunk]], list[Any]]:
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / f"{name}.sqlite"),
                        partitions=3, checkpoint_interval_ms=10)
    provision_topics(settings, ["render"])
    bus = settings.open_bus()
    seq = 0
    for s in SESSIONS:
        send(bus, settings, "session.control",
             SessionControl(s, "CREATE", SessionConfig(resolution=256)), seq=seq)
        seq += 1
    for first in (0, 2, 4):
        for s in SESSIONS:
            record = motion(s, first, 2)
            if bad and s == "b" and first == 2:
                record = MotionFrames(s, 500, record.frames, record.weights, record.head, "u1",
                                      False)  # an impossible fps: dead-lettered
            send(bus, settings, "motion", record, seq=seq)
            seq += 1
    stage = CountingRender(batch_max)
    StageRunner(stage, settings, bus).run(idle_exit_s=0.3)
    video: dict[str, list[VideoChunk]] = {s: [] for s in SESSIONS}
    for m in read_all(bus, settings, "video"):
        v = decode(m, "video_chunk")
        assert isinstance(v, VideoChunk)
        video[v.session_id].append(v)
    dead = [decode(m, "dead_letter") for m in read_all(bus, settings, "deadletter")]
    return stage, video, dead


@pytest.mark.timeout(120)
def test_records_of_several_sessions_are_rendered_in_one_call(tmp_path: Any) -> None:
    batched, video, dead = run(tmp_path, "batched", batch_max=8)
    single, want, _ = run(tmp_path, "single", batch_max=1)
    assert max(batched.calls) > 1, batched.calls  # some call took several records
    assert max(single.calls) == 1
    assert not dead
    for s in SESSIONS:
        assert [v.pts for v in video[s]] == list(range(6))
        assert [v.data for v in video[s]] == [v.data for v in want[s]]


@pytest.mark.timeout(120)
def test_a_bad_record_in_a_batch_is_dead_lettered_alone(tmp_path: Any) -> None:
    stage, video, dead = run(tmp_path, "bad", batch_max=8, bad=True)
    assert max(stage.calls) > 1
    assert len(dead) == 1 and "fps" in dead[0].reason
    assert [v.pts for v in video["a"]] == list(range(6))
    assert [v.pts for v in video["b"]] == [0, 1, 4, 5]  # its frames 2 and 3 never came
