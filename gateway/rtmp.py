"""RTMP push of one live session to a broadcast ingest (YouTube, Twitch, nginx-rtmp...).

The logged H.264 access units are muxed into FLV as they are (no re-encode); the speech is
laid on the session media clock, silence in between, and encoded to AAC. One thread per
push: FLV over the network is blocking I/O.
"""
import fractions
import logging
import queue
import threading
import uuid

import av
import numpy as np
from prometheus_client import Counter

from backbone.records import SpeechChunk, VideoChunk
from gateway.hub import SessionHub, Subscription
from processors.encode import AAC_BITRATE, parameter_sets

log = logging.getLogger("avatar.gateway.rtmp")

SCHEMES = ("rtmp://", "rtmps://")
AAC_FRAME = 1024
RECONNECTS = 3  # a dropped ingest connection is retried this often, 2 s apart
MAX_PUSHES = 20  # per gateway: each holds an AAC encoder and a network connection

PUSH_ERRORS = Counter("avatar_gateway_rtmp_errors_total", "RTMP push failures (reconnected)")


class RtmpPush(threading.Thread):
    def __init__(self, hub: SessionHub, session_id: str, url: str) -> None:
        super().__init__(name=f"rtmp-{session_id[:12]}", daemon=True)
        if not url.startswith(SCHEMES) or len(url) > 1024:
            raise ValueError("the push URL must be rtmp:// or rtmps:// (at most 1024 chars)")
        self.push_id = uuid.uuid4().hex[:16]
        self.hub = hub
        self.session_id = session_id
        self.url = url
        self.stop_event = threading.Event()
        self.frames_sent = 0
        self.error: str | None = None
        self._sub: Subscription = hub.subscribe(session_id, ("video", "speech.audio"),
                                                threaded=True)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)

    def run(self) -> None:
        try:
            for attempt in range(RECONNECTS + 1):
                try:
                    self._push()
                    return
                except (av.error.FFmpegError, OSError) as exc:
                    PUSH_ERRORS.inc()
                    self.error = f"{type(exc).__name__}: {exc}"
                    log.warning("rtmp push failed", extra={"session": self.session_id,
                                                           "error": self.error})
                    if self.stop_event.wait(2.0):
                        return
        finally:
            self.hub.unsubscribe(self._sub)

    def _push(self) -> None:
        container = None
        pending: dict[int, np.ndarray] = {}
        audio_next = 0  # next sample of the session clock to encode
        sr = 0
        video = audio = None
        first_pts = 0
        try:
            while not self.stop_event.is_set():
                try:
                    item = self._sub.blocking.get(timeout=0.2)
                except queue.Empty:
                    continue
                v = item.value
                if isinstance(v, SpeechChunk) and v.n_samples:
                    pending[v.start_sample] = np.frombuffer(v.pcm, "<i2")
                    sr = sr or v.sample_rate
                    continue
                if not isinstance(v, VideoChunk) or v.codec != "h264":
                    continue
                if container is None:
                    params = parameter_sets(v.data) if v.keyframe else None
                    if params is None:
                        continue  # a broadcast starts at a keyframe with its SPS/PPS
                    container = av.open(self.url, mode="w", format="flv")
                    video = container.add_mux_stream("h264", rate=v.fps, width=v.width,
                                                     height=v.height)
                    sr = sr or 22050
                    audio = container.add_stream("aac", rate=sr)
                    assert isinstance(audio, av.AudioStream)
                    audio.codec_context.layout = "mono"
                    audio.codec_context.bit_rate = AAC_BITRATE
                    first_pts = v.pts
                    audio_next = int(v.pts / v.fps * sr)
                assert video is not None and audio is not None
                packet = av.Packet(v.data)
                packet.stream = video
                packet.time_base = fractions.Fraction(1, v.fps)
                packet.pts = packet.dts = v.pts - first_pts
                packet.is_keyframe = v.keyframe
                container.mux(packet)
                self.frames_sent += 1
                # Audio up to the end of this frame, on the same clock.
                until = int((v.pts + 1) / v.fps * sr)
                while audio_next + AAC_FRAME <= until:
                    block = np.zeros(AAC_FRAME, np.int16)
                    for at in list(pending):
                        pcm = pending[at]
                        lo, hi = max(at, audio_next), min(at + len(pcm), audio_next + AAC_FRAME)
                        if lo < hi:
                            block[lo - audio_next:hi - audio_next] = pcm[lo - at:hi - at]
                        if at + len(pcm) <= audio_next + AAC_FRAME:
                            del pending[at]
                    frame = av.AudioFrame.from_ndarray(block[None, :], format="s16",
                                                       layout="mono")
                    frame.sample_rate = sr
                    frame.pts = audio_next - int(first_pts / v.fps * sr)
                    frame.time_base = fractions.Fraction(1, sr)
                    container.mux(audio.encode(frame))
                    audio_next += AAC_FRAME
        finally:
            if container is not None:
                try:
                    if audio is not None:
                        container.mux(audio.encode(None))
                finally:
                    container.close()
