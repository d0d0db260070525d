"""One frozen settings object per process, read from the environment.

Every field names its env variable; the CLI and tests build it with `Settings.from_env()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from backbone.bus import Bus


def _env(name: str, default: Any, cast: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return cast(raw)


# field name -> (env name, cast)
ENV_NAMES: dict[str, tuple[str, type]] = {
    "bus": ("AVATAR_BUS", str),
    "bootstrap": ("KAFKA_BOOTSTRAP", str),
    "embedded_path": ("AVATAR_EMBEDDED_PATH", str),
    "topic_prefix": ("AVATAR_TOPIC_PREFIX", str),
    "partitions": ("AVATAR_PARTITIONS", int),
    "schema_registry_url": ("AVATAR_SCHEMA_REGISTRY_URL", str),
    "exactly_once": ("AVATAR_EXACTLY_ONCE", bool),
    "metrics_port": ("AVATAR_METRICS_PORT", int),
    "metrics_addr": ("AVATAR_METRICS_ADDR", str),
    "checkpoint_interval_ms": ("AVATAR_CHECKPOINT_INTERVAL_MS", int),
    "max_record_bytes": ("AVATAR_MAX_RECORD_BYTES", int),
    "instance_id": ("AVATAR_INSTANCE_ID", str),
    "group_prefix": ("AVATAR_GROUP_PREFIX", str),
    "live": ("AVATAR_LIVE", bool),
    "tick_ms": ("AVATAR_TICK_MS", int),
    "session_timeout_ms": ("AVATAR_SESSION_TIMEOUT_MS", int),
    "heartbeat_ms": ("AVATAR_HEARTBEAT_MS", int),
    "autoscale": ("AVATAR_AUTOSCALE", bool),
    "autoscale_slo_ms": ("AVATAR_AUTOSCALE_SLO_MS", float),
    "autoscale_stage_slo_ms": ("AVATAR_AUTOSCALE_STAGE_SLO_MS", str),
    "autoscale_window_s": ("AVATAR_AUTOSCALE_WINDOW_S", float),
    "autoscale_breach_windows": ("AVATAR_AUTOSCALE_BREACH_WINDOWS", int),
    "autoscale_idle_windows": ("AVATAR_AUTOSCALE_IDLE_WINDOWS", int),
    "autoscale_min": ("AVATAR_AUTOSCALE_MIN", int),
    "autoscale_max": ("AVATAR_AUTOSCALE_MAX", int),
    "autoscale_cooldown_s": ("AVATAR_AUTOSCALE_COOLDOWN_S", float),
}


@dataclass(frozen=True)
class Settings:
    bus: str = "embedded"  # "embedded" (SQLite, one machine) or "kafka"
    bootstrap: str = "127.0.0.1:19092"
    embedded_path: str = "avatar-data/bus.sqlite"
    topic_prefix: str = "avatar."  # lets tests and tenants isolate their topics
    # 12 partitions: enough consumers per stage to scale out on a few machines, and few
    # enough that a single broker restores state quickly.
    partitions: int = 12
    schema_registry_url: str = ""  # set -> Confluent wire format; empty -> single-object
    exactly_once: bool = False  # Kafka transactions instead of at-least-once + dedupe
    metrics_port: int = 0  # 0: no /metrics server in this process
    # Loopback by default; containers set 0.0.0.0 so Prometheus can scrape them.
    metrics_addr: str = "127.0.0.1"
    # Offsets and state are checkpointed this often; a crash replays at most this much
    # (deduplicated downstream), and each checkpoint costs one producer flush.
    checkpoint_interval_ms: int = 100
    # 1 MB: the largest legitimate record is an H.264 keyframe at 768 px (~100 KB) or a
    # second of 48 kHz PCM (96 KB); anything far bigger is a mistake or an attack.
    max_record_bytes: int = 1_000_000
    instance_id: str = ""
    group_prefix: str = "avatar-"
    # Live: speech is paced in real time and idle faces keep moving (stage clocks tick).
    # Off for offline runs (the demo to an MP4, re-rendering), where records are processed
    # as fast as possible and gaps between utterances are filled from the media clock.
    live: bool = True
    # 20 ms: half a 40 ms motion chunk, so paced output is at most that late.
    tick_ms: int = 20
    # Fail-over: a killed stage instance holds its partitions until the group coordinator
    # misses its heartbeats this long; a standby then takes over. 6 s is the lowest a stock
    # broker accepts (group.min.session.timeout.ms); with a broker that allows less (ours
    # allows 500 ms), 800/100 keeps a crash's visible gap under 2 s (benchmarks/faults.py).
    session_timeout_ms: int = 6000
    heartbeat_ms: int = 1000
    # Local autoscaler (`avatar up --autoscale`, backbone/autoscale.py).
    autoscale: bool = False
    # The product's audio-to-avatar budget; every stage's end-to-end p95 must fit in it.
    autoscale_slo_ms: float = 200.0
    autoscale_stage_slo_ms: str = ""  # per-stage overrides: "dialogue=1500,render=150"
    # 5 s: long enough for a p95 over tens of records per stage, short enough to react
    # within a few seconds of the 200 ms budget being lost.
    autoscale_window_s: float = 5.0
    autoscale_breach_windows: int = 3  # sustained, not one spike
    autoscale_idle_windows: int = 12  # give back capacity slower than it is taken
    autoscale_min: int = 1
    # Processes per stage; more than the topic partitions would sit idle in the group.
    autoscale_max: int = 4
    # A new process needs ~5-10 s to load models and join the group, then drains the backlog.
    autoscale_cooldown_s: float = 30.0

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            env, cast = ENV_NAMES[f.name]
            values[f.name] = _env(env, f.default, cast)
        values.update(overrides)
        return cls(**values)

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    def group(self, stage: str) -> str:
        return f"{self.group_prefix}{self.topic_prefix}{stage}"

    def open_bus(self) -> Bus:
        if self.bus == "kafka":
            from backbone.kafka_bus import KafkaBus
            return KafkaBus(self.bootstrap)
        if self.bus == "embedded":
            from backbone.embedded import EmbeddedBus
            return EmbeddedBus(Path(self.embedded_path))
        raise ValueError(f"AVATAR_BUS must be 'embedded' or 'kafka', not {self.bus!r}")
