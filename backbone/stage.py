"""What a stage is: a plain transform `process(record, state) -> records` that never touches
the bus. `backbone.runtime` runs it on Kafka or the embedded bus; `backbone.harness` in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from backbone.records import RecordValue, SessionConfig, SessionControl


class RecordRejected(ValueError):
    """Raised by a stage for input it cannot use; the runtime dead-letters the record with
    this message as the reason and the session goes on."""

    def __init__(self, reason: str, category: str = "invalid") -> None:
        super().__init__(reason)
        self.category = category


@dataclass(frozen=True)
class Inbound:
    """One decoded record as a stage sees it."""

    topic: str  # logical topic name, e.g. "speech.phonemes"
    session_id: str
    value: RecordValue
    seq: int = -1
    event_time_ms: int = 0  # wall time of the originating input (end-to-end latency)
    traceparent: str = ""
    producer_stage: str = ""
    model_version: str = ""
    offset: int = -1


@dataclass(frozen=True)
class Outbound:
    """A record a stage emits; the runtime keys it by session and adds the headers."""

    topic: str
    value: RecordValue
    # Defaults come from the record that caused it; a paced output (an audio chunk due
    # later) names its own event time so latency measures how late it is against schedule.
    event_time_ms: int | None = None
    traceparent: str = ""


@dataclass
class SessionState:
    """Per-session state. `data` must stay JSON-serialisable: it is checkpointed to the
    stage's compacted changelog and restored on whichever instance gets the partition next.
    `scratch` is process-local (encoders, caches) and is rebuilt after a fail-over."""

    session_id: str
    data: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    # Runtime bookkeeping, checkpointed with `data`.
    last_seq: dict[str, int] = field(default_factory=dict)  # "topic|producer" -> seq applied
    next_seq: dict[str, int] = field(default_factory=dict)  # output topic -> next seq
    applied: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> offset applied
    ended: bool = False
    # The session's control records were looked for before its first data record (a CREATE
    # on its own partition can be fetched after the data that follows it).
    controls_read: bool = False
    chains: dict[str, str] = field(default_factory=dict)  # output topic -> last link (hex)
    audited_ms: int = 0  # when this session's chain heads were last checkpointed
    # Output topic -> offset of its last record known delivered: where a successor looks
    # for what this instance wrote after its last checkpoint (see StageRunner._recover).
    logged: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "data": self.data, "last_seq": self.last_seq,
                "next_seq": self.next_seq, "applied": self.applied, "ended": self.ended,
                "controls_read": self.controls_read, "chains": self.chains,
                "audited_ms": self.audited_ms, "logged": self.logged}

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> SessionState:
        return cls(snap["session_id"], dict(snap["data"]), {}, dict(snap["last_seq"]),
                   dict(snap["next_seq"]), dict(snap["applied"]), bool(snap["ended"]),
                   bool(snap.get("controls_read", False)), dict(snap.get("chains", {})),
                   int(snap.get("audited_ms", 0)), dict(snap.get("logged", {})))


class Stage(Protocol):
    name: str  # also names the consumer group and the state changelog
    model_version: str
    inputs: tuple[str, ...]  # logical topics consumed

    def start(self) -> None:
        """Load models and open files (constructors do no I/O)."""
        ...

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]: ...

    def stop(self) -> None: ...


@runtime_checkable
class BatchStage(Stage, Protocol):
    """A stage that gains from seeing several records at once (the render stage warps the
    frames of every session in one call). The runtime hands it up to ``batch_max`` records
    already fetched, never a control record among others; per record, in order, the
    outputs or the RecordRejected that `process` would have raised."""

    batch_max: int

    def process_batch(self, items: Sequence[tuple[Inbound, SessionState]]) -> list[
            list[Outbound] | RecordRejected]: ...


class ClockedStage(Stage, Protocol):
    """A stage with a clock: the runtime also calls `tick(state, now_ms)` for every live
    session about every `Settings.tick_ms` while it is caught up on its inputs (live mode
    only), e.g. to pace speech in real time or to keep an idle face moving. The runtime sets
    `live` from `Settings.live`; off, the stage works offline (no pacing, no ticks)."""

    live: bool

    def tick(self, state: SessionState, now_ms: int) -> Iterable[Outbound]: ...


class ResumableStage(Stage, Protocol):
    """A stage whose outputs depend on wall time or on state it cannot checkpoint (an
    encoder), so replaying its inputs after a crash would not reproduce what it already
    wrote. After a fail-over the runtime finds the last record of each output topic that the
    dead instance logged for a session beyond its last checkpoint and calls `resume` with
    them (logical topic -> value) before any replayed input: the stage continues after them
    (e.g. at the next frame index) and the runtime numbers its outputs after theirs."""

    def resume(self, state: SessionState, logged: dict[str, RecordValue]) -> None: ...


class BaseStage:
    """Convenience base: no-op start/stop; subclasses set the class attributes."""

    name = "stage"
    model_version = "0"
    inputs: tuple[str, ...] = ()
    # Extra topics this stage reads or writes beyond backbone.topics.TOPICS: name -> schema.
    extra_topics: dict[str, str] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        raise NotImplementedError


def session_config(state: SessionState) -> SessionConfig:
    raw = state.data.get("config")
    return SessionConfig.from_avro(raw) if raw else SessionConfig()


def remember_control(value: SessionControl, state: SessionState) -> None:
    """Keep the session config and live emotion in state (shared by tts, animate, render)."""
    if value.action == "CREATE" and value.config is not None:
        state.data["config"] = value.config.to_avro()
    elif value.action == "EMOTION":
        cfg = session_config(state).to_avro()
        if value.emotion is not None:
            cfg["emotion"] = value.emotion
        if value.intensity is not None:
            cfg["intensity"] = float(value.intensity)
        state.data["config"] = cfg
