"""The stage runtime: consume, decode, dedupe, `stage.process`, encode, produce, checkpoint.

It owns everything a stage must not: the bus, commits, per-session state changelog, dead
letters, headers, metrics and shutdown. At-least-once by default (offsets are committed only
after the outputs and the state they imply are acknowledged; replays are dropped downstream
by (session, producer, seq)); exactly-once through Kafka transactions when configured.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from backbone import metrics
from backbone.bus import Bus, BusAdmin, BusConsumer, BusError, BusProducer, Message, TopicPartition
from backbone.codec import AvroCodec, DecodeError
from backbone import integrity, sealing
from backbone.integrity import GENESIS
from backbone.plausibility import implausible
from backbone.records import ChainHead, DeadLetter, IntegrityCheckpoint, RecordValue, SessionControl
from backbone.settings import Settings
from backbone.stage import BatchStage, Inbound, Outbound, RecordRejected, SessionState, Stage
from backbone.topics import TOPICS, state_topic
from backbone.tracing import RecordHeaders, child_traceparent, new_traceparent, now_ms

log = logging.getLogger("avatar.runtime")


# Chain heads are checkpointed at most this often per session (and when it ends): what a
# deletion from a chain's end can hide is at most this much of the session.
AUDIT_INTERVAL_MS = 2000


class StageFailed(RuntimeError):
    """The runtime can no longer work (a delivery failed, a fatal bus error): the process
    must exit without committing, so a restart replays from the last checkpoint."""


@dataclass
class _Admitted:
    """A record that passed the runtime's checks, on its way through the stage."""

    msg: Message
    hdr: RecordHeaders
    session: str
    state: SessionState
    tp_key: str
    dedupe_key: str
    inbound: Inbound


@dataclass
class _Checkpoint:
    epoch: int
    offsets: dict[tuple[str, int], int]
    snapshots: dict[str, tuple[int, bytes]]  # session -> (partition, snapshot json)
    phase: str = "outputs"  # outputs -> state -> done
    started: float = field(default_factory=time.perf_counter)


class StageRunner:
    """Runs one stage on one bus. Constructor does no I/O; call `start()` then `run()`."""

    def __init__(self, stage: Stage, settings: Settings, bus: Bus | None = None,
                 codec: AvroCodec | None = None) -> None:
        self.stage = stage
        self.settings = settings
        self._bus = bus
        self._codec = codec
        self.name = stage.name
        extra: dict[str, str] = dict(getattr(stage, "extra_topics", {}))
        self._schemas = {t: spec.schema for t, spec in TOPICS.items()} | extra
        unknown = [t for t in stage.inputs if t not in self._schemas]
        if unknown:
            raise ValueError(f"stage {stage.name} reads unknown topics {unknown}")
        self._physical = {t: settings.topic(t) for t in self._schemas}
        self._logical = {p: t for t, p in self._physical.items()}
        self._state_topic = settings.topic(state_topic(stage.name))
        self._dlq_topic = settings.topic("deadletter")
        self.states: dict[str, SessionState] = {}
        self._session_partition: dict[str, int] = {}
        self._restored: set[int] = set()
        self._dirty: set[str] = set()
        self._next_offsets: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._epoch = 0
        self._outstanding: dict[int, int] = defaultdict(int)
        self._snap_outstanding = 0
        self._pending: _Checkpoint | None = None
        self._last_checkpoint = time.monotonic()
        self._failure: BaseException | None = None
        self._in_txn = False
        self._started = False
        self._lag_due = 0.0
        self.processed = 0
        self._budget: int | None = None  # records left under run(max_records=...)
        # Live stages with a clock (tts pacing, animate idle frames) get `tick` calls.
        self._ticks = settings.live and callable(getattr(stage, "tick", None))
        if hasattr(stage, "live"):
            stage.live = settings.live
        self._tick_due = 0.0
        self._chains = integrity.Chains()
        self._seal = sealing.enabled()
        self._keys: sealing.KeyStore | None = None
        self._unaudited: set[str] = set()  # sessions with outputs after their last checkpoint
        self._audit_due = 0.0

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def keys(self) -> sealing.KeyStore:
        if self._keys is None:
            self._keys = sealing.KeyStore(self.settings, self.bus)
        return self._keys

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            self._bus = self.settings.open_bus()
        return self._bus

    def start(self) -> None:
        if self._started:
            return
        self._codec = self._codec or AvroCodec(registry_url=self.settings.schema_registry_url)
        self.stage.start()
        # Unique per process across machines and containers: transactional ids must not clash.
        instance = self.settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.group = self.settings.group(self.name)
        txn_id = f"{self.group}-{instance}" if self.settings.exactly_once else None
        self.producer: BusProducer = self.bus.producer(transactional_id=txn_id)
        if self.settings.exactly_once:
            self.producer.init_transactions()
        self.admin: BusAdmin = self.bus.admin()
        if self.bus.name == "kafka":
            self.consumer: BusConsumer = self.bus.consumer(  # type: ignore[call-arg]
                self.group, read_committed=self.settings.exactly_once, stats_cb=self._on_stats,
                client_id=instance, session_timeout_ms=self.settings.session_timeout_ms,
                heartbeat_ms=self.settings.heartbeat_ms)
        else:
            self.consumer = self.bus.consumer(self.group)
        self.consumer.subscribe([self._physical[t] for t in self.stage.inputs],
                                on_assign=self._on_assign, on_revoke=self._on_revoke)
        metrics.serve(self.settings.metrics_port, self.settings.metrics_addr)
        self._started = True
        log.info("stage started", extra={"stage": self.name, "bus": self.bus.name,
                                         "inputs": list(self.stage.inputs)})

    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None,
            max_records: int | None = None) -> None:
        """Process until `stop` is set, nothing arrived for `idle_exit_s`, or `max_records`
        were handled; then checkpoint and close."""
        self.start()
        stop = stop or threading.Event()
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                handled = self.step(0.05)
                now = time.monotonic()
                if handled or (idle_exit_s is not None and not self.consumer.assignment()):
                    # Idle time counts only once partitions are assigned: a Kafka group
                    # join can take seconds, and nothing can arrive before it.
                    last_record = now
                elif idle_exit_s is not None and now - last_record >= idle_exit_s \
                        and self._pending is None:
                    break
                if max_records is not None and self.processed >= max_records:
                    break
                self._budget = None if max_records is None else max_records - self.processed
        finally:
            self.close()

    def step(self, timeout_s: float) -> bool:
        """Handle at most one record; drive delivery reports and checkpoints."""
        if self._failure is not None:
            raise StageFailed(str(self._failure)) from self._failure
        if self._ticks:
            timeout_s = max(0.0, min(timeout_s, self._tick_due - time.monotonic()))
        msg = self.consumer.poll(timeout_s)
        if msg is not None:
            self._handle_polled(msg)
        elif self._ticks and time.monotonic() >= self._tick_due:
            # Only when caught up: a stage catching up on a backlog must see the records
            # before its clock moves on without them (idle frames past unread speech).
            self._tick()
        self.producer.poll(0)
        if self._unaudited and time.monotonic() >= self._audit_due:
            self._audit_all()
        self._drive_checkpoint()
        if self.bus.name != "kafka" and time.monotonic() >= self._lag_due:
            self._embedded_lag()
        return msg is not None

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            if self._failure is None:
                self._audit_all()
                self.checkpoint_now()
        finally:
            try:
                self.consumer.close()
            finally:
                self.producer.close()
                self.stage.stop()
        log.info("stage stopped", extra={"stage": self.name, "processed": self.processed})

    # ---- records -----------------------------------------------------------------------

    def _handle_polled(self, msg: Message) -> None:
        """A polled record, and with a stage that takes batches (``batch_max`` > 1), the
        records already fetched behind it, up to that many: one call for all of them (the
        render stage warps every session's frames together). A control record ends a batch
        and is handled on its own, after it."""
        limit = int(getattr(self.stage, "batch_max", 1))
        if self._budget is not None:
            limit = min(limit, max(self._budget, 1))
        if limit <= 1 or self._is_control(msg):
            self._handle(msg)
            return
        batch = [msg]
        control: Message | None = None
        while len(batch) < limit:
            more = self.consumer.poll(0)
            if more is None:
                break
            if self._is_control(more):
                control = more
                break
            batch.append(more)
        self._handle_batch(batch)
        if control is not None:
            self._handle(control)

    def _is_control(self, msg: Message) -> bool:
        return self._logical.get(msg.topic, msg.topic) == "session.control"

    def _handle(self, msg: Message, ahead: bool = False) -> None:
        """Apply one record. `ahead`: a control record read before the consumer reached it
        (it must not move the partition's commit position past other sessions' records)."""
        admitted = self._admit(msg, ahead)
        if admitted is not None:
            self._run_one(admitted)

    def _handle_batch(self, msgs: list[Message]) -> None:
        admitted = [a for a in (self._admit(m) for m in msgs) if a is not None]
        if len(admitted) <= 1:
            for a in admitted:
                self._run_one(a)
            return
        t0 = time.perf_counter()
        stage = self.stage
        assert isinstance(stage, BatchStage)
        try:
            results = stage.process_batch([(a.inbound, a.state) for a in admitted])
        except StageFailed:
            raise
        except Exception:
            # A batch that fails as a whole: each record on its own, so only a bad one
            # is dead-lettered.
            for a in admitted:
                self._run_one(a)
            return
        each = (time.perf_counter() - t0) / len(admitted)
        for a, result in zip(admitted, results):
            if isinstance(result, RecordRejected):
                self._dead_letter(a.msg, a.hdr, result.category, str(result))
            else:
                for out in result:
                    self._emit(out, a.session, a.state, a.inbound)
            metrics.PROCESS_SECONDS.labels(self.name).observe(each)
            self._finish(a)

    def _admit(self, msg: Message, ahead: bool = False) -> _Admitted | None:
        """Decode and check one record; None when it was dead-lettered or a duplicate."""
        logical = self._logical.get(msg.topic, msg.topic)
        if not ahead:
            metrics.RECORDS_IN.labels(self.name, logical).inc()
            self.processed += 1
            self._next_offsets[(msg.topic, msg.partition)] = msg.offset + 1
        hdr = RecordHeaders.decode(msg)
        session = (msg.key or b"").decode("utf-8", "replace")
        if msg.value is not None and len(msg.value) > self.settings.max_record_bytes:
            self._dead_letter(msg, hdr, "oversized", f"{len(msg.value)} bytes exceeds the "
                              f"{self.settings.max_record_bytes}-byte limit")
            return None
        if not session:
            self._dead_letter(msg, hdr, "invalid", "record has no session key")
            return None
        body = msg.value
        if sealing.is_sealed(body):
            assert body is not None
            try:
                body = sealing.unseal(self.keys.key(session), session, logical, body)
            except sealing.SealedError as exc:
                self._dead_letter(msg, hdr, "sealed", str(exc))
                return None
        try:
            assert self._codec is not None
            value = self._codec.decode(body, self._schemas[logical])
        except DecodeError as exc:
            self._dead_letter(msg, hdr, exc.category, exc.reason)
            return None
        if getattr(value, "session_id", session) != session:
            self._dead_letter(msg, hdr, "invalid", f"key {session!r} differs from the record's "
                              f"session_id {getattr(value, 'session_id', '')!r}")
            return None
        why = implausible(value)  # valid Avro, impossible values (NaN, a rate of zero)
        if why is not None:
            self._dead_letter(msg, hdr, "invalid", why)
            return None
        state = self._state_for(session, msg.partition)
        tp_key = f"{logical}:{msg.partition}"
        if state.applied.get(tp_key, -1) >= msg.offset:
            metrics.DUPLICATES.labels(self.name, logical).inc()
            return None
        dedupe_key = f"{logical}|{hdr.stage}"
        if hdr.seq >= 0 and hdr.seq <= state.last_seq.get(dedupe_key, -1):
            metrics.DUPLICATES.labels(self.name, logical).inc()
            state.applied[tp_key] = msg.offset
            self._dirty.add(session)
            return None
        is_control = isinstance(value, SessionControl)
        if is_control:
            state.controls_read = True
        elif not state.controls_read and "session.control" in self.stage.inputs:
            state.controls_read = True
            self._read_controls_ahead(session, state)
        if state.ended and not is_control:
            self._dead_letter(msg, hdr, "unknown_session", f"session {session} has ended")
            self._mark_applied(state, tp_key, msg, dedupe_key, hdr)
            return None
        inbound = Inbound(logical, session, value, hdr.seq, hdr.event_time_ms or msg.timestamp_ms,
                          hdr.traceparent, hdr.stage, hdr.model_version, msg.offset)
        return _Admitted(msg, hdr, session, state, tp_key, dedupe_key, inbound)

    def _run_one(self, a: _Admitted) -> None:
        msg, hdr, session, state, inbound = a.msg, a.hdr, a.session, a.state, a.inbound
        t0 = time.perf_counter()
        try:
            # Each output is produced as soon as the stage yields it, so a generator stage
            # (a streamed LLM reply) hands its first sentence on before it has the last.
            for out in self.stage.process(inbound, state):
                self._emit(out, session, state, inbound)
        except StageFailed:
            raise
        except RecordRejected as exc:
            self._dead_letter(msg, hdr, exc.category, str(exc))
        except Exception as exc:  # a stage bug must not kill the session: dead-letter it
            log.error("stage error", extra={"stage": self.name, "session": session,
                                            "error": traceback.format_exc(limit=5)})
            self._dead_letter(msg, hdr, "stage_error", f"{type(exc).__name__}: {exc}")
        metrics.PROCESS_SECONDS.labels(self.name).observe(time.perf_counter() - t0)
        self._finish(a)

    def _finish(self, a: _Admitted) -> None:
        value = a.inbound.value
        if isinstance(value, SessionControl) and value.action == "END":
            a.state.ended = True
            self._audit(a.session, a.state, a.inbound)  # the final heads of an ended session
        self._mark_applied(a.state, a.tp_key, a.msg, a.dedupe_key, a.hdr)

    def _tick(self) -> None:
        self._tick_due = time.monotonic() + self.settings.tick_ms / 1000
        wall = now_ms()
        tick = getattr(self.stage, "tick")
        for session, state in list(self.states.items()):
            if state.ended:
                continue
            cause = Inbound("tick", session, SessionControl(session, "CREATE"), -1, 0)
            try:
                outputs = tick(state, wall)
                if not outputs:
                    continue
                for out in outputs:
                    self._emit(out, session, state, cause)
            except StageFailed:
                raise
            except Exception:  # one session's clock must not stop the others
                log.error("stage tick error", extra={"stage": self.name, "session": session,
                                                     "error": traceback.format_exc(limit=5)})
                metrics.TICK_ERRORS.labels(self.name).inc()
            self._dirty.add(session)

    def _read_controls_ahead(self, session: str, state: SessionState) -> None:
        """Data for a session arrived before any of its control records: apply the control
        records already on the log first (a CREATE carries the config the data needs). They
        are skipped as already applied when the consumer reaches them."""
        topic = self._physical["session.control"]
        try:
            partition = self.admin.partitions_for(session.encode(), topic)
            start = self._next_offsets.get((topic, partition))
            if start is None:
                got = self.consumer.committed([TopicPartition(topic, partition)])
                start = max(0, got[0].offset) if got else 0
            ahead = [m for m in self.admin.read(topic, partition, start)
                     if m.key == session.encode()]
        except BusError as exc:
            log.warning("control records not read ahead", extra={
                "stage": self.name, "session": session, "error": str(exc)})
            return
        for m in ahead:
            self._handle(m, ahead=True)

    def _mark_applied(self, state: SessionState, tp_key: str, msg: Message, dedupe_key: str,
                      hdr: RecordHeaders) -> None:
        state.applied[tp_key] = msg.offset
        if hdr.seq >= 0:
            state.last_seq[dedupe_key] = hdr.seq
        self._dirty.add(state.session_id)

    def _emit(self, out: Outbound, session: str, state: SessionState, cause: Inbound) -> None:
        topic = self._physical.get(out.topic)
        if topic is None:
            raise StageFailed(f"stage {self.name} emitted to unknown topic {out.topic!r}")
        seq = state.next_seq.get(out.topic, 0)
        state.next_seq[out.topic] = seq + 1
        # A stage may name the output's own origin (a paced chunk is due at its own time).
        event_time = out.event_time_ms if out.event_time_ms is not None else cause.event_time_ms
        parent = out.traceparent or cause.traceparent
        headers = RecordHeaders(
            session, seq, child_traceparent(parent) if parent else new_traceparent(),
            event_time, self.name, self.stage.model_version, out.value.SCHEMA).encode()
        assert self._codec is not None
        payload = self._codec.encode(out.value, topic)
        if self._seal and TOPICS[out.topic].sealed:
            payload = sealing.seal(self.keys.key(session, create=True) or b"", session,
                                   out.topic, payload)
        prev = bytes.fromhex(state.chains[out.topic]) if out.topic in state.chains else GENESIS
        new_link, link_headers = integrity.headers(self._chains.key(session), prev, out.topic,
                                                   self.name, seq, payload)
        state.chains[out.topic] = new_link.hex()
        self._produce(topic, session.encode(), payload, headers + link_headers)
        metrics.RECORDS_OUT.labels(self.name, out.topic).inc()
        if out.topic != "audit":
            self._unaudited.add(session)
            if now_ms() - state.audited_ms >= AUDIT_INTERVAL_MS:
                self._audit(session, state, cause)
        if event_time:
            metrics.E2E_LATENCY.labels(self.name).observe(
                max(0.0, (now_ms() - event_time) / 1000.0))

    def _audit(self, session: str, state: SessionState, cause: Inbound) -> None:
        """Checkpoint this session's chain heads on the audit topic (itself chained): a
        verifier then notices records deleted from the end of a chain."""
        state.audited_ms = now_ms()
        self._unaudited.discard(session)
        heads = tuple(ChainHead(t, state.next_seq.get(t, 0) - 1, h)
                      for t, h in sorted(state.chains.items()) if t != "audit")
        if heads:
            self._emit(Outbound("audit", IntegrityCheckpoint(session, self.name, heads,
                                                             state.audited_ms)),
                       session, state, cause)

    def _audit_all(self) -> None:
        """Checkpoint the chain heads of every session written to since its last one (on a
        quiet stream, and before the process stops)."""
        self._audit_due = time.monotonic() + AUDIT_INTERVAL_MS / 1000
        for session in list(self._unaudited):
            state = self.states.get(session)
            if state is None:
                self._unaudited.discard(session)
                continue
            self._audit(session, state, Inbound("audit", session, SessionControl(session, "END")))

    def _produce(self, topic: str, key: bytes | None, value: bytes,
                 headers: tuple[tuple[str, bytes], ...]) -> None:
        self._begin_txn()
        epoch = self._epoch
        self._outstanding[epoch] += 1

        logical = self._logical.get(topic, topic)

        def delivered(err: Exception | None, msg: Message | None) -> None:
            self._outstanding[epoch] -= 1
            if err is not None and self._failure is None:
                self._failure = err
            elif msg is not None and key:
                st = self.states.get(key.decode("utf-8", "replace"))
                if st is not None and msg.offset > st.logged.get(logical, -1):
                    st.logged[logical] = msg.offset  # checkpointed with the next snapshot
        self.producer.produce(topic, key, value, headers, delivered)

    def _dead_letter(self, msg: Message, hdr: RecordHeaders, category: str, reason: str) -> None:
        metrics.DEAD_LETTERS.labels(self.name, category).inc()
        log.warning("dead letter", extra={"stage": self.name, "session": hdr.session,
                                          "category": category, "reason": reason,
                                          "topic": msg.topic, "offset": msg.offset})
        limit = self.settings.max_record_bytes
        value = msg.value if msg.value is None or len(msg.value) <= limit else msg.value[:limit]
        dl = DeadLetter(hdr.session or None, self.name, category, reason, msg.topic,
                        msg.partition, msg.offset, msg.key, value, dict(msg.headers),
                        msg.timestamp_ms)
        assert self._codec is not None
        headers = RecordHeaders(hdr.session, -1, hdr.traceparent or new_traceparent(),
                                hdr.event_time_ms, self.name, self.stage.model_version,
                                DeadLetter.SCHEMA).encode()
        self._produce(self._dlq_topic, msg.key, self._codec.encode(dl, self._dlq_topic), headers)

    # ---- per-session state -------------------------------------------------------------

    def _state_for(self, session: str, partition: int) -> SessionState:
        st = self.states.get(session)
        if st is None:
            st = SessionState(session)
            self.states[session] = st
            self._session_partition[session] = partition
            metrics.SESSIONS.labels(self.name).set(len(self.states))
        return st

    def _on_assign(self, parts: Sequence[TopicPartition]) -> None:
        t0 = time.perf_counter()
        wanted = {tp.partition for tp in parts}
        for p in sorted(wanted - self._restored):
            self._restore_partition(p)
        self._restored |= wanted
        # Part of every fail-over's gap: worth seeing in the log next to the takeover.
        log.info("partitions assigned", extra={"stage": self.name, "partitions": sorted(wanted),
                                               "restore_s": round(time.perf_counter() - t0, 3)})

    def _restore_partition(self, partition: int) -> None:
        restored: list[str] = []
        latest: dict[str, bytes | None] = {}
        try:
            for m in self.admin.read(self._state_topic, partition):
                latest[(m.key or b"").decode()] = m.value
        except BusError as exc:
            raise StageFailed(f"cannot restore state partition {partition}: {exc}") from exc
        for session, raw in latest.items():
            if raw is None:
                continue
            if sealing.is_sealed(raw):
                try:
                    raw = sealing.unseal(self.keys.key(session), session, "state", raw)
                except sealing.SealedError:
                    continue  # an erased session has no state to come back to
            self.states[session] = SessionState.restore(json.loads(raw))
            self._session_partition[session] = partition
            restored.append(session)
            metrics.RESTORED.labels(self.name).inc()
        if callable(getattr(self.stage, "resume", None)):
            self._recover([s for s in restored if not self.states[s].ended])
        metrics.SESSIONS.labels(self.name).set(len(self.states))

    def _recover(self, sessions: list[str]) -> None:
        """After a crash the dead instance may have logged outputs past its last checkpoint.
        A stage that cannot reproduce them by replaying its inputs (a ResumableStage) is told
        the last of them and continues after them; their seqs and chain links continue too,
        so a viewer sees neither a repeat nor a hole."""
        # (logical output topic, its partition) -> first offset to look at: one read each,
        # however many sessions the partition holds.
        starts: dict[tuple[str, int], int] = {}
        try:
            for sid in sessions:
                st = self.states[sid]
                for topic, offset in st.logged.items():
                    if topic in st.next_seq and topic in self._physical:
                        at = (topic, self.admin.partitions_for(sid.encode(),
                                                               self._physical[topic]))
                        starts[at] = min(starts.get(at, offset), offset)
        except BusError as exc:
            raise StageFailed(f"cannot look up output partitions to recover: {exc}") from exc
        keys = {s.encode(): s for s in sessions}
        found: dict[tuple[str, str], tuple[int, Message]] = {}
        for (topic, out_partition), start in starts.items():
            try:
                for m in self.admin.read(self._physical[topic], out_partition, start):
                    owner = keys.get(m.key or b"")
                    if owner is None:
                        continue
                    hdr = RecordHeaders.decode(m)
                    if hdr.stage != self.name or hdr.seq < self.states[owner].next_seq[topic]:
                        continue
                    if hdr.seq > found.get((owner, topic), (-1, m))[0]:
                        found[(owner, topic)] = (hdr.seq, m)
            except BusError as exc:
                raise StageFailed(f"cannot read {topic}[{out_partition}] to recover: "
                                  f"{exc}") from exc
        logged: dict[str, dict[str, RecordValue]] = {}
        for (sid, topic), (seq, m) in found.items():
            st = self.states[sid]
            st.next_seq[topic] = seq + 1
            st.logged[topic] = m.offset
            links = integrity.read_links(m)
            if links is not None:
                st.chains[topic] = links[0].hex()
            self._dirty.add(sid)
            body = m.value
            try:
                if sealing.is_sealed(body):
                    assert body is not None
                    body = sealing.unseal(self.keys.key(sid), sid, topic, body)
                assert self._codec is not None
                logged.setdefault(sid, {})[topic] = self._codec.decode(body, self._schemas[topic])
            except (sealing.SealedError, DecodeError):
                continue  # numbering still continues after it
        resume = getattr(self.stage, "resume")
        for sid, values in logged.items():
            resume(self.states[sid], values)
            metrics.RECOVERED.labels(self.name).inc()
            log.info("resumed after a predecessor's outputs", extra={
                "stage": self.name, "session": sid, "topics": sorted(values)})

    def _on_revoke(self, parts: Sequence[TopicPartition]) -> None:
        if self._failure is None:
            self._audit_all()
            self.checkpoint_now()
        gone = {tp.partition for tp in parts}
        for session in [s for s, p in self._session_partition.items() if p in gone]:
            self.states.pop(session, None)
            self._session_partition.pop(session, None)
            self._dirty.discard(session)
        self._restored -= gone
        for key in [k for k in self._next_offsets if k[1] in gone]:
            self._next_offsets.pop(key)
        metrics.SESSIONS.labels(self.name).set(len(self.states))

    # ---- checkpoints -------------------------------------------------------------------

    def _snapshots(self) -> dict[str, tuple[int, bytes]]:
        snaps = {}
        for session in self._dirty:
            st = self.states.get(session)
            if st is not None:
                raw = json.dumps(st.snapshot(), separators=(",", ":")).encode()
                if self._seal:  # state holds session content too (queued text, history)
                    raw = sealing.seal(self.keys.key(session, create=True) or b"", session,
                                       "state", raw)
                snaps[session] = (self._session_partition[session], raw)
        self._dirty.clear()
        return snaps

    def _produce_snapshot(self, session: str, partition: int, raw: bytes) -> None:
        self._snap_outstanding += 1

        def delivered(err: Exception | None, _: Message | None) -> None:
            self._snap_outstanding -= 1
            if err is not None and self._failure is None:
                self._failure = err
        self.producer.produce(self._state_topic, session.encode(), raw,
                              (("stage", self.name.encode()),), delivered)

    def _progress(self) -> bool:
        return bool(self._dirty) or self._next_offsets != self._committed

    def _drive_checkpoint(self) -> None:
        if self.settings.exactly_once:
            if self._in_txn and time.monotonic() - self._last_checkpoint >= \
                    self.settings.checkpoint_interval_ms / 1000:
                self.checkpoint_now()
            return
        now = time.monotonic()
        if self._pending is None:
            if now - self._last_checkpoint < self.settings.checkpoint_interval_ms / 1000 \
                    or not self._progress():
                return
            self._pending = _Checkpoint(self._epoch, dict(self._next_offsets), self._snapshots())
            self._epoch += 1
        ck = self._pending
        if ck.phase == "outputs":
            if any(n > 0 for e, n in self._outstanding.items() if e <= ck.epoch):
                return
            for e in [e for e in self._outstanding if e <= ck.epoch]:
                del self._outstanding[e]
            for session, (partition, raw) in ck.snapshots.items():
                self._produce_snapshot(session, partition, raw)
            ck.phase = "state"
        if ck.phase == "state":
            if self._snap_outstanding > 0:
                return
            # Asynchronous: a lost commit only means a longer (deduplicated) replay, and a
            # synchronous round trip here would stall every record behind it.
            self._commit(ck.offsets, asynchronous=True)
            metrics.CHECKPOINT_SECONDS.labels(self.name).observe(time.perf_counter() - ck.started)
            self._pending = None
            self._last_checkpoint = now

    def _commit(self, offsets: dict[tuple[str, int], int], asynchronous: bool = False) -> None:
        todo = {k: v for k, v in offsets.items() if self._committed.get(k) != v}
        if todo:
            try:
                self.consumer.commit([TopicPartition(t, p, o) for (t, p), o in todo.items()],
                                     asynchronous=asynchronous)
            except BusError as exc:
                if exc.fatal:
                    raise
                # Lost group membership (broker restart, rebalance): the offsets stay
                # uncommitted, the records replay to the next owner and are deduplicated.
                log.warning("commit failed", extra={"stage": self.name, "error": str(exc)})
                return
            self._committed.update(todo)

    def checkpoint_now(self) -> None:
        """Blocking checkpoint: used on revoke, shutdown and in exactly-once mode."""
        t0 = time.perf_counter()
        if self.settings.exactly_once:
            self._begin_txn()
            for session, (partition, raw) in self._snapshots().items():
                self._produce_snapshot(session, partition, raw)
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._next_offsets.items()]
            if offsets:
                self.producer.send_offsets_to_transaction(offsets, self.consumer)
            self.producer.commit_transaction()
            self._in_txn = False
            self._outstanding.clear()
            self._snap_outstanding = 0
            self._committed = dict(self._next_offsets)
        else:
            if self.producer.flush(30.0) > 0:
                raise StageFailed("outputs not acknowledged within 30 s")
            self.producer.poll(0)
            if self._failure is not None:
                raise StageFailed(str(self._failure)) from self._failure
            self._outstanding.clear()
            for session, (partition, raw) in self._snapshots().items():
                self._produce_snapshot(session, partition, raw)
            if self.producer.flush(30.0) > 0 or self._failure is not None:
                raise StageFailed(f"state not acknowledged: {self._failure}")
            self._commit(dict(self._next_offsets))
        self._pending = None
        self._last_checkpoint = time.monotonic()
        metrics.CHECKPOINT_SECONDS.labels(self.name).observe(time.perf_counter() - t0)

    def _begin_txn(self) -> None:
        if self.settings.exactly_once and not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True

    # ---- lag ---------------------------------------------------------------------------

    def _on_stats(self, raw: str) -> None:
        try:
            stats: dict[str, Any] = json.loads(raw)
            for topic, t in stats.get("topics", {}).items():
                for pid, p in t.get("partitions", {}).items():
                    lag = p.get("consumer_lag", -1)
                    if int(pid) >= 0 and lag >= 0:
                        metrics.CONSUMER_LAG.labels(self.name, self._logical.get(topic, topic),
                                                    pid).set(lag)
        except (ValueError, AttributeError):
            pass

    def _embedded_lag(self) -> None:
        self._lag_due = time.monotonic() + 2.0
        for tp in self.consumer.assignment():
            hi = self.admin.watermarks(tp.topic, tp.partition)[1]
            metrics.CONSUMER_LAG.labels(self.name, self._logical.get(tp.topic, tp.topic),
                                        str(tp.partition)).set(max(0, hi - tp.offset))


def _retention_overrides() -> dict[str, int]:
    """AVATAR_RETENTION_DAYS="video=7,audio.in=1": per-topic retention at creation."""
    out = {}
    for item in filter(None, os.environ.get("AVATAR_RETENTION_DAYS", "").split(",")):
        topic, _, days = item.partition("=")
        if topic.strip() not in TOPICS:
            raise ValueError(f"AVATAR_RETENTION_DAYS names unknown topic {topic.strip()!r}")
        out[topic.strip()] = int(float(days) * 24 * 3600 * 1000)
    return out


def provision_topics(settings: Settings, stages: Sequence[str], bus: Bus | None = None) -> list[str]:
    """Create every data topic plus the state changelog of each named stage (idempotent)."""
    bus = bus or settings.open_bus()
    admin = bus.admin()
    configs: dict[str, dict[str, str]] = {}
    names = []
    retention = _retention_overrides()
    for spec in TOPICS.values():
        name = settings.topic(spec.name)
        names.append(name)
        keep = retention.get(spec.name, spec.retention_ms)
        configs[name] = {"retention.ms": str(keep), "cleanup.policy": "delete"}
    keys = settings.topic(sealing.KEYS_TOPIC)
    names.append(keys)
    configs[keys] = dict(sealing.KEYS_TOPIC_CONFIG)
    for stage in stages:
        name = settings.topic(state_topic(stage))
        names.append(name)
        # Compacted: only the latest snapshot per session is needed to restore.
        configs[name] = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    admin.create_topics(names, settings.partitions, configs)
    return names
