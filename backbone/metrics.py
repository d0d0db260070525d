"""Prometheus metrics of a stage process, served on /metrics when a port is configured."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Buckets from 0.5 ms: a no-op hop is ~1 ms, a render frame ~5 ms, the SLO is 200 ms.
_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

RECORDS_IN = Counter("avatar_stage_records_in_total", "Records consumed", ["stage", "topic"])
RECORDS_OUT = Counter("avatar_stage_records_out_total", "Records produced", ["stage", "topic"])
DUPLICATES = Counter("avatar_stage_duplicates_total",
                     "Records skipped as already applied (same session, producer and seq)",
                     ["stage", "topic"])
DEAD_LETTERS = Counter("avatar_stage_dead_letters_total", "Records sent to the dead-letter topic",
                       ["stage", "category"])
PROCESS_SECONDS = Histogram("avatar_stage_process_seconds", "Time in stage.process per record",
                            ["stage"], buckets=_FAST)
E2E_LATENCY = Histogram("avatar_stage_e2e_latency_seconds",
                        "Originating input event time to this stage's output", ["stage"],
                        buckets=_FAST)
CHECKPOINT_SECONDS = Histogram("avatar_stage_checkpoint_seconds",
                               "Checkpoint (outputs acknowledged, state written, offsets "
                               "committed) duration", ["stage"], buckets=_FAST)
CONSUMER_LAG = Gauge("avatar_stage_consumer_lag", "Records behind the partition end",
                     ["stage", "topic", "partition"])
SESSIONS = Gauge("avatar_stage_sessions", "Sessions with state in this process", ["stage"])
RESTORED = Counter("avatar_stage_state_restored_total",
                   "Session states restored from the changelog after an assignment", ["stage"])
RECOVERED = Counter("avatar_stage_resumed_sessions_total",
                    "Sessions continued after outputs a crashed instance logged past its last "
                    "checkpoint", ["stage"])

TICK_ERRORS = Counter("avatar_stage_tick_errors_total",
                      "Errors raised by a stage's clock tick (the session goes on)", ["stage"])

_started: set[int] = set()


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Start the /metrics endpoint once per port (port 0 disables it)."""
    if port and port not in _started:
        start_http_server(port, addr=addr)
        _started.add(port)
