"""Run any stage with no bus at all: feed records, get outputs and dead letters back.

    outputs = run_stage(MyStage(), [("reply", ReplyText(...))])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from backbone.records import RecordValue
from backbone.stage import ClockedStage, Inbound, Outbound, RecordRejected, SessionState, Stage
from backbone.tracing import now_ms


@dataclass
class HarnessResult:
    outputs: list[Outbound] = field(default_factory=list)
    rejected: list[tuple[Inbound, str]] = field(default_factory=list)  # (record, reason)
    states: dict[str, SessionState] = field(default_factory=dict)

    def values(self, topic: str) -> list[RecordValue]:
        return [o.value for o in self.outputs if o.topic == topic]


def run_stage(stage: Stage, records: Iterable[tuple[str, RecordValue]],
              states: dict[str, SessionState] | None = None, *,
              start: bool = True, clock: Callable[[], int] = now_ms,
              producer: str = "") -> HarnessResult:
    """Process (topic, value) pairs in order, as the runtime would for one partition.
    `clock` gives each record's event time (ms); `producer` its producing stage."""
    if start:
        stage.start()
    result = HarnessResult(states=states if states is not None else {})
    for seq, (topic, value) in enumerate(records):
        session = getattr(value, "session_id", "")
        state = result.states.setdefault(session, SessionState(session))
        inbound = Inbound(topic, session, value, seq, clock(), producer_stage=producer)
        try:
            result.outputs.extend(stage.process(inbound, state))
        except RecordRejected as exc:
            result.rejected.append((inbound, str(exc)))
        if getattr(value, "action", None) == "END":
            state.ended = True
    return result


def tick_stage(stage: ClockedStage, states: dict[str, SessionState], now: int) -> list[Outbound]:
    """One clock tick for every live session, as the runtime does between records."""
    out: list[Outbound] = []
    for state in states.values():
        if not state.ended:
            out.extend(stage.tick(state, now))
    return out
