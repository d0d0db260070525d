"""The local autoscaler on the real broker: a stage that one process cannot keep up with
breaches its latency SLO, the autoscaler adds a process to the stage's consumer group, Kafka
moves partitions to it and the stage's p95 comes back under the SLO.

The stage under load waits 30 ms per record the way a stage calling a remote model (an LLM
for dialogue) does, so a second process doubles its capacity however busy this shared
machine's two cores are; the scaling path (scrape, decide, start `avatar stage`, rebalance,
drain) is the real one."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

import pytest

from backbone.autoscale import Autoscaler, Decision, ScalePolicy, StageReplicas, StageWindow
from backbone.kafka_bus import KafkaBus
from backbone.records import ReplyText, Transcript
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stage import BaseStage, Inbound, Outbound, SessionState
from tests.integration.stage_procs import ROOT
from tests.support.bus_io import send

pytestmark = pytest.mark.kafka

SERVICE_S = 0.030  # per record: one process serves ~33 records/s
LOAD_PER_S = 50  # more than one process serves, less than two
SLO_S = 0.2
WINDOW_S = 2.0


class SlowReplyStage(BaseStage):
    """transcript -> reply after a fixed wait (a remote model's answer time)."""
    name = "slowreply"
    inputs = ("transcript",)

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        time.sleep(SERVICE_S)
        assert isinstance(record.value, Transcript)
        yield Outbound("reply", ReplyText(record.session_id, f"u{record.seq}", record.value.text))


def _sessions_on_every_partition(bus: KafkaBus, settings: Settings, per_partition: int) -> list[str]:
    admin = bus.admin()
    topic = settings.topic("transcript")
    by_partition: dict[int, list[str]] = {p: [] for p in range(settings.partitions)}
    i = 0
    while any(len(v) < per_partition for v in by_partition.values()):
        sid = f"load-{i}"
        got = by_partition[admin.partitions_for(sid.encode(), topic)]
        if len(got) < per_partition:
            got.append(sid)
        i += 1
    return [s for v in by_partition.values() for s in v]


def _load(bus: KafkaBus, settings: Settings, sessions: list[str], rate: float,
          stop: threading.Event) -> None:
    """`rate` transcripts per second, round-robin over the sessions, on a fixed schedule."""
    t0 = time.monotonic()
    n = 0
    while not stop.is_set():
        delay = t0 + n / rate - time.monotonic()
        if delay > 0 and stop.wait(delay):
            break
        sid = sessions[n % len(sessions)]
        send(bus, settings, "transcript", Transcript(sid, f"line {n}"), seq=n // len(sessions),
             stage="gateway")
        n += 1


def test_scale_out_brings_a_stages_p95_back_under_its_slo(kafka_bootstrap: str, unique_name: str,
                                                          tmp_path: Path) -> None:
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=4)
    provision_topics(settings, [SlowReplyStage.name])
    bus = KafkaBus(kafka_bootstrap)
    env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": kafka_bootstrap,
           "AVATAR_TOPIC_PREFIX": settings.topic_prefix, "AVATAR_PARTITIONS": "4",
           "PYTHONPATH": str(ROOT)}
    pool = StageReplicas(SlowReplyStage.name, env, tmp_path,
                         command=[sys.executable, "-m", "backbone.cli", "stage",
                                  f"{__name__}:SlowReplyStage"])
    policy = ScalePolicy(slo_s=SLO_S, breach_windows=2, idle_windows=1000, min_replicas=1,
                         max_replicas=3, cooldown_s=10.0)
    history: list[tuple[float, Decision, StageWindow]] = []
    scaler = Autoscaler({SlowReplyStage.name: pool}, {SlowReplyStage.name: policy}, WINDOW_S)
    sessions = _sessions_on_every_partition(bus, settings, per_partition=2)
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(bus, settings, sessions, 2.0, stop), daemon=True)
    try:
        scaler.start()
        loader.start()  # a trickle first: the one process is up and within the SLO
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(WINDOW_S)
            scaler.step()
            w = scaler.windows[SlowReplyStage.name]
            if w.records and w.p95_s is not None and w.p95_s <= SLO_S:
                break
        else:
            pytest.fail(f"the first process never served a record: {pool.live[0].rid} log: "
                        f"{(tmp_path / 'slowreply-0.log').read_text()[-2000:]}")
        stop.set()
        loader.join(10)
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(bus, settings, sessions, LOAD_PER_S, stop),
                                  daemon=True)
        step_at = time.monotonic()
        loader.start()
        recovered_at = None
        deadline = step_at + 100
        while time.monotonic() < deadline:
            time.sleep(WINDOW_S)
            for d in scaler.step():
                history.append((time.monotonic() - step_at, d, scaler.windows[d.stage]))
            scaled = any(d.action == "out" for _, d, _ in history)
            w = scaler.windows[SlowReplyStage.name]
            if scaled and w.records and w.p95_s is not None and w.p95_s <= SLO_S \
                    and (w.lag or 0) <= policy.lag_floor:
                recovered_at = time.monotonic() - step_at
                break
        table = "\n".join(f"{t:5.1f}s {d.action:4} replicas={d.replicas} p95={w.p95_s} "
                          f"lag={w.lag} records={w.records} util={w.utilisation:.2f} {d.reason}"
                          for t, d, w in history)
        print(table)
        outs = [(t, d) for t, d, _ in history if d.action == "out"]
        assert outs, f"no scale-out under a load one process cannot serve:\n{table}"
        # The scale-out was earned: windows before it breached the SLO under load.
        before = [w for t, _, w in history if t <= outs[0][0]]
        assert sum(1 for w in before if w.p95_s is not None and w.p95_s > SLO_S) \
            >= policy.breach_windows, table
        assert recovered_at is not None, f"p95 never came back under the SLO:\n{table}"
        assert len(pool.live) >= 2
        print(f"scale-out at {outs[0][0]:.1f} s after the load step; p95 back under "
              f"{SLO_S * 1000:g} ms at {recovered_at:.1f} s with {len(pool.live)} processes")
    finally:
        stop.set()
        loader.join(10)
        pool.stop_all(30)
    # Every replica left cleanly on SIGTERM (checkpointed and committed).
    for rid in ("slowreply-0", "slowreply-1"):
        assert '"stage stopped"' in (tmp_path / f"{rid}.log").read_text(), rid
