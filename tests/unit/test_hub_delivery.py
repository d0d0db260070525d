"""What the gateway's hub hands a viewer when the log repeats itself (a stage replaying
after a crash) or the viewer falls behind: never a frame twice, and when frames must go,
the viewer's video skips to the next keyframe (a frame without its references would not
decode), counted."""
from __future__ import annotations

import queue
import time

import pytest

from backbone.records import VideoChunk
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from backbone.tracing import RecordHeaders
from gateway.hub import DROPPED_FRAMES, QUEUE_RECORDS, Delivered, SessionHub, Subscription
from tests.support.bus_io import send


def _frame(pts: int, keyframe: bool) -> Delivered:
    value = VideoChunk("s", 256, 256, 25, pts, pts, keyframe, b"au")
    return Delivered("video", value, RecordHeaders("s", pts, "", 0, "render", "1", "video_chunk"),
                     0)


def _pts(sub: Subscription) -> list[int]:
    out = []
    while True:
        try:
            out.append(sub.blocking.get_nowait().value.pts)  # type: ignore[union-attr]
        except queue.Empty:
            return out


def test_a_new_viewers_video_starts_at_a_keyframe():
    sub = Subscription("s", None, ("video",))
    for pts, key in ((7, False), (8, False), (9, True), (10, False)):
        sub.offer(_frame(pts, key))
    assert _pts(sub) == [9, 10]
    assert sub.dropped_frames == 0  # not a slow viewer: it had not started yet


def test_a_full_viewer_queue_drops_video_until_the_next_keyframe():
    sub = Subscription("s", None, ("video",))
    for pts in range(QUEUE_RECORDS):
        sub.offer(_frame(pts, pts == 0))
    before = DROPPED_FRAMES.labels("slow_viewer")._value.get()
    sub.offer(_frame(QUEUE_RECORDS, False))  # no room
    for _ in range(10):
        sub.blocking.get_nowait()  # the viewer catches up a little
    sub.offer(_frame(QUEUE_RECORDS + 1, False))  # room, but its reference was dropped
    sub.offer(_frame(QUEUE_RECORDS + 2, True))
    sub.offer(_frame(QUEUE_RECORDS + 3, False))
    got = _pts(sub)
    assert got[-3:] == [QUEUE_RECORDS - 1, QUEUE_RECORDS + 2, QUEUE_RECORDS + 3]
    assert sub.dropped_frames == 2
    assert DROPPED_FRAMES.labels("slow_viewer")._value.get() == before + 2


@pytest.fixture
def hub(tmp_path):
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2)
    provision_topics(settings, PIPELINE)
    h = SessionHub(settings)
    h.start()
    yield h, settings
    h.stop()


def test_a_record_logged_twice_reaches_a_viewer_once(hub):
    h, settings = hub
    sub = h.subscribe("s", threaded=True)
    bus = h._bus or settings.open_bus()
    # A replay of seqs 0 and 1, then a last record: once it is in, everything before it is.
    for seq, pts in ((0, 0), (1, 1), (1, 1), (0, 0), (2, 2), (3, 3)):
        send(bus, settings, "video", VideoChunk("s", 256, 256, 25, pts, pts, pts == 0, b"au"),
             seq=seq, stage="render")
    got: list[int] = []
    deadline = time.monotonic() + 10
    while 3 not in got and time.monotonic() < deadline:
        try:
            got.append(sub.blocking.get(timeout=0.2).value.pts)  # type: ignore[union-attr]
        except queue.Empty:
            pass
    assert got == [0, 1, 2, 3]
