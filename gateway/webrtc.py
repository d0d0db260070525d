"""WebRTC out (and microphone in) for one session, negotiated through WHEP.

Video: the H.264 access units of the video topic go out as they are, never re-encoded.
Audio: the speech chunks, resampled to 48 kHz, encoded to Opus by aiortc. Both are released
on one schedule derived from the session media clock (wall = t0 + media time + playout
delay), so lips and voice stay together at the viewer by construction.
"""
import asyncio
import fractions
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import (MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender,
                    RTCSessionDescription)
from aiortc.mediastreams import MediaStreamError
from prometheus_client import Counter, Histogram

from backbone.records import SpeechChunk, VideoChunk
from gateway.hub import SessionHub, Subscription

log = logging.getLogger("avatar.gateway.webrtc")

AUDIO_RATE = 48000
AUDIO_FRAME = 960  # 20 ms at 48 kHz: Opus's frame
VIDEO_CLOCK = 90000
# Media time t is shown at t0 + t + delay. The delay adapts per viewer, like a jitter
# buffer: it is what the last frames needed to be on time (their 95th percentile over about
# two seconds) plus a margin, so voice and lips stay together when the pipeline is slow and
# latency falls again when it is fast. PLAYOUT_DELAY_S is where it starts.
PLAYOUT_DELAY_S = float(os.environ.get("AVATAR_PLAYOUT_DELAY_S", "0.1"))
MIN_DELAY_S = 0.03
MAX_DELAY_S = 1.0
DELAY_MARGIN_S = 0.015  # above the 95th percentile of what frames needed
DELAY_WINDOW = 50  # frames (2 s at 25 fps) the percentile is taken over
MAX_PEERS = 200  # per gateway; each peer costs an Opus encoder and two bus subscriptions

PLAYOUT_DELAY = Histogram("avatar_gateway_playout_delay_seconds",
                          "Adaptive playout delay of WebRTC viewers, per video frame",
                          buckets=(0.03, 0.05, 0.07, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0))
LATE_FRAMES = Counter("avatar_gateway_late_frames_total",
                      "Frames that reached the gateway after their playout time", ["kind"])
FRAME_LATENESS = Histogram("avatar_gateway_frame_arrival_slack_seconds",
                           "Playout time minus arrival time of a frame at the gateway",
                           ["kind"], buckets=(-0.2, -0.1, -0.05, -0.02, 0, 0.02, 0.05, 0.1,
                                              0.2, 0.5, 1.0))


class WhepError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class MediaClock:
    """When media time is shown to one viewer: origin (wall time, s, of media time 0 in the
    session) + media time + an adaptive playout delay shared by its audio and video."""

    origin_s: float | None = None
    delay_s: float = PLAYOUT_DELAY_S
    needed: deque[float] = field(default_factory=lambda: deque(maxlen=DELAY_WINDOW))

    def anchor(self, media_s: float) -> None:
        if self.origin_s is None:  # a session from another gateway: start from what arrives
            self.origin_s = time.time() - media_s

    def due(self, media_s: float) -> float:
        assert self.origin_s is not None
        return self.origin_s + media_s + self.delay_s

    def observe(self, slack_s: float) -> None:
        """A video frame arrived `slack_s` before its time (negative: after)."""
        self.needed.append(self.delay_s - slack_s)  # the delay that would have been enough
        want = float(np.percentile(self.needed, 95)) + DELAY_MARGIN_S
        self.delay_s = min(MAX_DELAY_S, max(MIN_DELAY_S, want))
        PLAYOUT_DELAY.observe(self.delay_s)


class LoggedVideoTrack(MediaStreamTrack):
    """The session's encoded video, passed through (aiortc packetizes an av.Packet as is)."""

    kind = "video"

    def __init__(self, sub: Subscription, clock: MediaClock) -> None:
        super().__init__()
        self.sub = sub
        self.clock = clock
        self._started = False

    async def recv(self) -> av.Packet:  # type: ignore[type-arg]
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            item = await self.sub.get(1.0)
            if item is None or not isinstance(item.value, VideoChunk):
                continue
            v = item.value
            if not self._started and not v.keyframe:
                continue  # a decoder can only start at a keyframe
            self._started = True
            media_s = v.pts / v.fps
            self.clock.anchor(media_s)
            slack = self.clock.due(media_s) - time.time()
            FRAME_LATENESS.labels("video").observe(slack)
            self.clock.observe(slack)
            if slack > 0:
                await asyncio.sleep(min(slack, 5.0))
            else:
                LATE_FRAMES.labels("video").inc()
            packet = av.Packet(v.data)
            packet.pts = v.pts * VIDEO_CLOCK // v.fps
            packet.dts = packet.pts
            packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            return packet


class SpeechAudioTrack(MediaStreamTrack):
    """20 ms frames on the media clock: speech where the log has it, silence elsewhere."""

    kind = "audio"

    def __init__(self, sub: Subscription, clock: MediaClock) -> None:
        super().__init__()
        self.sub = sub
        self.clock = clock
        self._next: int | None = None  # next 48 kHz sample index to send
        self._pending: dict[int, np.ndarray] = {}  # 48 kHz start index -> samples
        self._carry: dict[str, tuple[int, float]] = {}  # utterance -> (last src index, value)
        self._silent = 0  # pts of silence sent before the session clock was known

    def _take(self) -> None:
        while True:
            try:
                item = self.sub.queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if isinstance(item.value, SpeechChunk) and item.value.n_samples:
                self._place(item.value)

    def _place(self, c: SpeechChunk) -> None:
        src = np.frombuffer(c.pcm, "<i2").astype(np.float32)
        ratio = AUDIO_RATE / c.sample_rate
        first = int(np.ceil(c.start_sample * ratio))
        last = int(np.ceil((c.start_sample + len(src)) * ratio))
        if last <= first:
            return
        # Linear interpolation on the absolute clock; the previous chunk's last sample
        # bridges the seam, so chunk boundaries do not click.
        xs = np.arange(c.start_sample, c.start_sample + len(src), dtype=np.float64)
        carry = self._carry.get(c.utterance_id)
        if carry is not None and carry[0] == c.start_sample - 1:
            xs = np.concatenate([[carry[0]], xs])
            src = np.concatenate([[carry[1]], src])
        self._carry = {c.utterance_id: (c.start_sample + c.n_samples - 1, float(src[-1]))}
        out = np.interp(np.arange(first, last) / ratio, xs, src)
        self._pending[first] = out.astype(np.int16)
        if self.clock.origin_s is None:
            self.clock.anchor(c.start_sample / c.sample_rate)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._take()
        if self.clock.origin_s is None:
            # No session clock yet: silence at the wall rate until speech or video anchors it.
            await asyncio.sleep(AUDIO_FRAME / AUDIO_RATE)
            self._silent += AUDIO_FRAME
            return self._frame(np.zeros(AUDIO_FRAME, np.int16), self._silent - AUDIO_FRAME)
        if self._next is None:
            media_now = time.time() - self.clock.origin_s - self.clock.delay_s
            self._next = max(0, int(media_now * AUDIO_RATE) // AUDIO_FRAME * AUDIO_FRAME)
        start = self._next
        wait = self.clock.due(start / AUDIO_RATE) - time.time()
        if wait > 0:
            await asyncio.sleep(min(wait, 1.0))
        self._take()
        samples = np.zeros(AUDIO_FRAME, np.int16)
        for at in list(self._pending):
            block = self._pending[at]
            lo, hi = max(at, start), min(at + len(block), start + AUDIO_FRAME)
            if lo < hi:
                samples[lo - start:hi - start] = block[lo - at:hi - at]
            if at + len(block) <= start + AUDIO_FRAME:
                del self._pending[at]  # fully played (or too late to play)
        self._next = start + AUDIO_FRAME
        return self._frame(samples, start)

    @staticmethod
    def _frame(samples: np.ndarray, pts: int) -> av.AudioFrame:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        return frame


@dataclass
class Peer:
    resource: str
    session_id: str
    pc: RTCPeerConnection
    subs: list[Subscription] = field(default_factory=list)
    mic_task: "asyncio.Task[None] | None" = None
    feeder: Any = None  # a past session's log reader (a thread with a stop event)


def loopback_only() -> None:
    """Offer only 127.0.0.1 host candidates (tests, a single-machine demo): aioice skips
    loopback by default."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class WhepServer:
    """WHEP (draft-ietf-wish-whep): POST an SDP offer, get the answer and a resource URL;
    DELETE the resource to stop. ICE candidates travel in the SDP (no trickle)."""

    def __init__(self, hub: SessionHub) -> None:
        self.hub = hub
        self.peers: dict[str, Peer] = {}

    async def offer(self, session_id: str, sdp: str, origin_s: float | None,
                    mic: Any = None, replay: Any = None) -> tuple[str, str]:
        """Negotiate a viewer of the live session, or with `replay` (a callable that feeds
        the video and audio subscriptions from the log) of a past one at its own pace."""
        if len(self.peers) >= MAX_PEERS:
            raise WhepError(503, "this gateway serves its maximum number of viewers")
        if "v=0" not in sdp or "m=" not in sdp:
            raise WhepError(400, "the body is not an SDP offer")
        lines = sdp.replace("\r\n", "\n").split("\n")
        kinds = {ln[2:].split(" ", 1)[0] for ln in lines if ln.startswith("m=")}
        if not kinds & {"audio", "video"}:
            raise WhepError(400, "the offer asks for neither audio nor video")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        resource = uuid.uuid4().hex
        peer = Peer(resource, session_id, pc)
        clock = MediaClock(origin_s)
        try:
            # Transceivers exist before the offer is applied: aiortc settles the codecs
            # while applying it, and only H.264 lets the logged stream pass unchanged.
            def subscription(topic: str) -> Subscription:
                if replay is None:
                    return self.hub.subscribe(session_id, (topic,))
                return Subscription(session_id, asyncio.get_running_loop(), (topic,))

            if "video" in kinds:
                sub = subscription("video")
                peer.subs.append(sub)
                t = pc.addTransceiver(LoggedVideoTrack(sub, clock), direction="sendonly")
                h264 = [c for c in RTCRtpSender.getCapabilities("video").codecs
                        if c.mimeType.lower() == "video/h264"]
                t.setCodecPreferences(h264)
            if "audio" in kinds:
                sub = subscription("speech.audio")
                peer.subs.append(sub)
                pc.addTransceiver(SpeechAudioTrack(sub, clock),
                                  direction="sendrecv" if mic is not None else "sendonly")
                if mic is not None:
                    incoming: asyncio.Future[MediaStreamTrack] = \
                        asyncio.get_running_loop().create_future()

                    @pc.on("track")
                    def _on_track(track: MediaStreamTrack) -> None:
                        if track.kind == "audio" and not incoming.done():
                            incoming.set_result(track)

                    peer.mic_task = asyncio.ensure_future(self._microphone(incoming, mic))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            if replay is not None:
                peer.feeder = replay(peer.subs, clock)
        except WhepError:
            await self._close(peer)
            raise
        except Exception as exc:  # aiortc raises many kinds for a malformed offer
            await self._close(peer)
            raise WhepError(400, f"cannot negotiate this offer: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from None
        self.peers[resource] = peer

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close(resource)

        return resource, pc.localDescription.sdp

    async def _microphone(self, incoming: "asyncio.Future[MediaStreamTrack]", sink: Any) -> None:
        """The viewer's microphone -> 16 kHz PCM -> `sink(pcm, rate)` (the audio.in topic)."""
        track = await incoming
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        buf: list[bytes] = []
        try:
            while True:
                frame = await track.recv()
                for r in resampler.resample(frame):  # type: ignore[arg-type]
                    buf.append(r.to_ndarray().astype("<i2").tobytes())
                if sum(map(len, buf)) >= 3200:  # 100 ms
                    sink(b"".join(buf), 16000)
                    buf = []
        except MediaStreamError:
            return

    async def close(self, resource: str) -> bool:
        peer = self.peers.pop(resource, None)
        if peer is None:
            return False
        await self._close(peer)
        return True

    async def _close(self, peer: Peer) -> None:
        for sub in peer.subs:
            self.hub.unsubscribe(sub)
        if peer.feeder is not None:
            peer.feeder.set()
        if peer.mic_task is not None:
            peer.mic_task.cancel()
        await peer.pc.close()

    async def close_all(self) -> None:
        for resource in list(self.peers):
            await self.close(resource)


def log_feeder(records: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """Returns `feed(subs, clock)`: a thread pushing a past session's video and speech records
    (in media-time order) into the viewer's subscriptions, waiting whenever they are full, so
    the tracks' own clock sets the original pace. `records()` yields Delivered items."""
    import threading

    def feed(subs: list[Subscription], clock: MediaClock) -> threading.Event:
        stop = threading.Event()
        by_topic = {s.topics[0]: s for s in subs}
        clock.origin_s = None  # anchored by the first record, shown after the playout delay

        def run() -> None:
            for item in records():
                sub = by_topic.get(item.topic)
                if sub is None:
                    continue
                while not stop.is_set():
                    fut = asyncio.run_coroutine_threadsafe(sub.queue.put(item), loop)
                    try:
                        fut.result(1.0)
                        break
                    except TimeoutError:
                        fut.cancel()
                if stop.is_set():
                    return

        threading.Thread(target=run, name="replay-feeder", daemon=True).start()
        return stop

    return feed
