"""Fan-out of live session records to the gateway's clients (WebSocket, WebRTC, RTMP).

One thread tails the output topics from their end and hands each decoded record to the
subscribers of its session on their event loop; a slow client loses records (counted),
never the gateway's memory or the other clients' streams.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import Counter

from backbone.bus import Bus, BusError
from backbone.codec import AvroCodec, DecodeError
from backbone.records import RecordValue, SessionControl
from backbone.sealing import KeyStore, SealedError, is_sealed, unseal
from backbone.settings import Settings
from backbone.topics import TOPICS
from backbone.tracing import RecordHeaders

log = logging.getLogger("avatar.gateway.hub")

STREAMED = ("video", "speech.audio", "transcript", "reply", "speech.phonemes", "motion")
# ~4 s of 25 fps video plus its audio and events: a client further behind is too slow.
QUEUE_RECORDS = 400

DROPPED = Counter("avatar_gateway_dropped_records_total",
                  "Records not delivered to a client that fell behind", ["topic"])
# Video frames a viewer did not get, by why: "slow_viewer" (its queue was full, so its video
# skips to the next keyframe: a frame without its references would not decode) and
# "duplicate" (a record logged twice, e.g. replayed after a stage crash; never shown twice).
DROPPED_FRAMES = Counter("avatar_gateway_dropped_frames_total",
                         "Video frames not delivered to a viewer", ["reason"])


@dataclass(frozen=True)
class Delivered:
    topic: str
    value: RecordValue
    headers: RecordHeaders
    timestamp_ms: int


class Subscription:
    """Records of one session for one client; `loop` None means a thread reads `blocking`."""

    def __init__(self, session_id: str, loop: asyncio.AbstractEventLoop | None,
                 topics: tuple[str, ...]) -> None:
        self.session_id = session_id
        self.topics = topics
        self.queue: asyncio.Queue[Delivered] = asyncio.Queue(QUEUE_RECORDS)
        self.blocking: queue.Queue[Delivered] = queue.Queue(QUEUE_RECORDS)
        self._loop = loop
        self._skipping = False  # video dropped until the next keyframe (the queue was full)
        # A new (or reconnected) viewer's video starts at a keyframe: before it, nothing
        # would decode.
        self._keyed = False
        self.dropped_frames = 0

    def offer(self, item: Delivered) -> None:
        """From the hub thread: hand over without blocking, dropping when full."""
        if self._loop is None:
            self._put(item, self.blocking.put_nowait, queue.Full)
            return
        self._loop.call_soon_threadsafe(self._put, item, self.queue.put_nowait,
                                        asyncio.QueueFull)

    def _put(self, item: Delivered, put: Callable[[Delivered], None],
             full: type[Exception]) -> None:
        video = item.topic == "video"
        if video and not self._keyed:
            if not getattr(item.value, "keyframe", False):
                return
            self._keyed = True
        if video and self._skipping:
            if not getattr(item.value, "keyframe", False):
                self._drop_frame()
                return
            self._skipping = False
        try:
            put(item)
        except full:
            if video:
                self._skipping = True
                self._drop_frame()
            else:
                DROPPED.labels(item.topic).inc()

    def _drop_frame(self) -> None:
        self.dropped_frames += 1
        DROPPED.labels("video").inc()
        DROPPED_FRAMES.labels("slow_viewer").inc()

    async def get(self, timeout_s: float | None = None) -> Delivered | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class SessionHub:
    def __init__(self, settings: Settings, bus: Bus | None = None) -> None:
        self.settings = settings
        self._bus = bus
        self._codec = AvroCodec(registry_url=settings.schema_registry_url)
        self._subs: dict[str, list[Subscription]] = {}
        # (session, topic, producer) -> last seq handed out: a record logged twice (a stage
        # replaying after a crash) reaches no viewer twice. Kept while a session has viewers.
        self._delivered: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logical = {settings.topic(t): t for t in STREAMED + ("session.control",)}
        self.ready = threading.Event()
        # Every control record of every session, subscribed or not (the gateway's session
        # table follows sessions created through any gateway instance).
        self.on_control: Callable[[SessionControl, RecordHeaders], None] | None = None
        self.keys: KeyStore | None = None  # opens sealed records (AVATAR_SEAL)

    def start(self) -> None:
        bus = self._bus or self.settings.open_bus()
        tail = bus.tail([self.settings.topic(t) for t in STREAMED + ("session.control",)])
        self._thread = threading.Thread(target=self._run, args=(tail,), name="session-hub",
                                        daemon=True)
        self._thread.start()
        self.ready.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def subscribe(self, session_id: str, topics: tuple[str, ...] = STREAMED, *,
                  threaded: bool = False) -> Subscription:
        loop = None if threaded else asyncio.get_running_loop()
        sub = Subscription(session_id, loop, topics)
        with self._lock:
            self._subs.setdefault(session_id, []).append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.session_id, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(sub.session_id, None)
                for k in [k for k in self._delivered if k[0] == sub.session_id]:
                    del self._delivered[k]

    def _open(self, session: str, topic: str, body: bytes | None) -> bytes | None:
        if body is None or not is_sealed(body) or self.keys is None:
            return body
        return unseal(self.keys.key(session), session, topic, body)

    def _control(self, m: Any) -> None:
        if self.on_control is None:
            return
        try:
            session = (m.key or b"").decode("utf-8", "replace")
            value = self._codec.decode(self._open(session, "session.control", m.value),
                                       TOPICS["session.control"].schema)
        except (DecodeError, SealedError):
            return
        if isinstance(value, SessionControl):
            self.on_control(value, RecordHeaders.decode(m))

    def _run(self, tail: Any) -> None:
        try:
            while not self._stop.is_set():
                try:
                    m = tail.poll(0.05)
                except BusError as exc:
                    log.error("hub tail failed", extra={"error": str(exc)})
                    if exc.fatal:
                        return
                    continue
                if m is None or m.key is None:
                    continue
                session = m.key.decode("utf-8", "replace")
                if m.topic == self.settings.topic("session.control"):
                    self._control(m)
                    continue
                with self._lock:
                    subs = list(self._subs.get(session, ()))
                if not subs:
                    continue
                topic = self._logical.get(m.topic, "")
                wanted = [s for s in subs if topic in s.topics]
                if not wanted:
                    continue
                headers = RecordHeaders.decode(m)
                if headers.seq >= 0:
                    key = (session, topic, headers.stage)
                    if headers.seq <= self._delivered.get(key, -1):
                        if topic == "video":
                            DROPPED_FRAMES.labels("duplicate").inc()
                        continue
                    self._delivered[key] = headers.seq
                try:
                    value = self._codec.decode(self._open(session, topic, m.value),
                                               TOPICS[topic].schema)
                except (DecodeError, SealedError):
                    continue  # the stages dead-letter it; a viewer just does not see it
                item = Delivered(topic, value, headers, m.timestamp_ms)
                for s in wanted:
                    s.offer(item)
        finally:
            tail.close()
