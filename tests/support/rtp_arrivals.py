"""When an aiortc viewer really has each frame: the arrival time of its RTP packets.

aiortc's receive buffer hands a frame on only when a packet of the *next* frame arrives (it
splits frames by timestamp change, not by the marker bit), so a frame leaves `recv()` one
frame period late: 40 ms for video at 25 fps, 20 ms for Opus audio. A browser completes a
video frame on its marker bit and decodes each audio packet as it comes. Measuring latency
or A/V sync at `recv()` time would charge that hold to the stream; these stamps do not.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class RtpArrivals:
    """Wall time (s) each frame was complete at the viewer, by (kind, RTP timestamp)."""

    def __init__(self) -> None:
        self.video: dict[int, float] = {}
        self.audio: dict[int, float] = {}
        # aiortc numbers decoded frames from the first frame it hands on (pts = RTP
        # timestamp - that frame's timestamp); the tables keep raw RTP timestamps.
        self.origins: dict[str, int] = {}

    def of(self, kind: str, frame: Any) -> float:
        """The completion time of a decoded frame; the time now if the frame was never seen
        as packets (it should always have been)."""
        table = self.video if kind == "video" else self.audio
        origin = self.origins.get(kind)
        if frame.pts is None or origin is None:
            return time.time()
        return table.get(int(frame.pts) + origin, time.time())


@contextlib.contextmanager
def rtp_arrivals() -> Iterator[RtpArrivals]:
    """Within the block, every aiortc receiver stamps packet arrivals and keeps no audio
    prefetch (a browser adapts its buffer to the network; on loopback that is near zero)."""
    import aiortc.rtcrtpreceiver as receiver

    stamps = RtpArrivals()
    base = receiver.JitterBuffer

    class Stamped(base):  # type: ignore[misc, valid-type]
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
            super().__init__(capacity, 0, is_video)
            self._table = stamps.video if is_video else stamps.audio

        def add(self, packet: Any) -> Any:
            # A video frame is complete with its marker packet; an Opus frame is one packet.
            if packet.marker or not self._is_video:
                self._table.setdefault(packet.timestamp, time.time())
            pli, frame = super().add(packet)
            if frame is not None:
                stamps.origins.setdefault("video" if self._is_video else "audio", frame.timestamp)
            return pli, frame

    receiver.JitterBuffer = Stamped
    try:
        yield stamps
    finally:
        receiver.JitterBuffer = base
