"""Bus benchmark: latency of one hop through a no-op stage run by our runtime, against a bare
confluent-kafka relay doing the same hop on the same broker, plus throughput.

Topology for both: source producer -> topic A -> relay process -> topic B -> sink consumer.
`hop_*` uses `avatar stage benchmarks.bus:RelayStage` (full runtime: Avro decode/encode,
dedupe, headers, state checkpoints, commits); `raw_*` uses a 20-line poll/produce loop with
the same client settings. `single_trip_*` is produce -> consume on one topic, no relay.

    python benchmarks/bus.py --json benchmarks/results/bus.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone import broker  # noqa: E402
from backbone.codec import AvroCodec  # noqa: E402
from backbone.kafka_bus import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS  # noqa: E402
from backbone.records import Transcript  # noqa: E402
from backbone.runtime import provision_topics  # noqa: E402
from backbone.settings import Settings  # noqa: E402
from backbone.stage import BaseStage, Inbound, Outbound, SessionState  # noqa: E402
from backbone.tracing import RecordHeaders, new_traceparent  # noqa: E402


_SEQ = itertools.count()


class RelayStage(BaseStage):
    """The no-op stage: passes each record on unchanged."""

    name = "relay"
    model_version = "noop"
    inputs = ("bench.in",)
    extra_topics = {"bench.in": "transcript", "bench.out": "transcript"}

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        return [Outbound("bench.out", record.value)]


def raw_relay(bootstrap: str, src: str, dst: str, group: str) -> None:
    """The baseline: consume, produce, commit asynchronously now and then. No decoding."""
    from confluent_kafka import Consumer, Producer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  **{k: v for k, v in CONSUMER_DEFAULTS.items() if k != "statistics.interval.ms"}})
    p = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    c.subscribe([src])
    last_commit = time.monotonic()
    while True:
        m = c.poll(0.05)
        if m is not None and m.error() is None:
            p.produce(dst, key=m.key(), value=m.value(), headers=m.headers())
        p.poll(0)
        if time.monotonic() - last_commit > 0.1:
            c.commit(asynchronous=True)
            last_commit = time.monotonic()


def create_topics(bootstrap: str, names: list[str]) -> None:
    from backbone.kafka_bus import KafkaBus
    KafkaBus(bootstrap).admin().create_topics(names, 4)


def measure(bootstrap: str, src: str, dst: str, n: int, rate: float | None,
            sessions: int = 8) -> tuple[list[float], float]:
    """Send n records (paced at `rate`/s, or as fast as possible) and time each at the sink.
    Returns per-record latencies in ms and the sink throughput in records/s."""
    from confluent_kafka import Consumer, Producer

    codec = AvroCodec()
    tag = uuid.uuid4().hex[:8]  # earlier runs' records on the same topics are ignored
    sink = Consumer({"bootstrap.servers": bootstrap, "group.id": f"sink-{uuid.uuid4().hex[:6]}",
                     **{k: v for k, v in CONSUMER_DEFAULTS.items()
                        if k != "statistics.interval.ms"}})
    sink.subscribe([dst])
    # Wait for the sink's assignment before sending, so no latency includes a rebalance.
    while not sink.assignment():
        sink.poll(0.1)
    latencies: list[float] = []
    received: list[float] = []
    done = threading.Event()

    def drain() -> None:
        while len(latencies) < n and not done.is_set():
            m = sink.poll(0.05)
            if m is None or m.error() is not None:
                continue
            now = time.time_ns()
            text = codec.decode(m.value(), "transcript").text
            if not text.startswith(tag):
                continue
            sent = int(text[len(tag) + 1:])
            latencies.append((now - sent) / 1e6)
            received.append(time.perf_counter())
        done.set()

    t = threading.Thread(target=drain)
    t.start()
    p = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
    # A new idempotent producer first fetches metadata and a producer id (~0.4 s): do that
    # before the clock starts, with a record the sink ignores.
    for k in range(sessions):
        p.produce(src, key=f"s{k}".encode(),
                  value=codec.encode(Transcript(f"s{k}", "warm-up"), src))
    p.flush(30)
    period = 1.0 / rate if rate else 0.0
    t0 = time.perf_counter()
    for i in range(n):
        sid = f"s{i % sessions}"
        value = codec.encode(Transcript(sid, f"{tag}:{time.time_ns()}"), src)
        # seq must grow across runs: the runtime drops a (session, producer, seq) it has seen.
        headers = RecordHeaders(sid, next(_SEQ), new_traceparent(), int(time.time() * 1000),
                                "bench", "0", "transcript").encode()
        p.produce(src, key=sid.encode(), value=value, headers=list(headers))
        p.poll(0)
        if period:
            wait = t0 + (i + 1) * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
    p.flush(30)
    done.wait(120)
    done.set()
    t.join()
    sink.close()
    span = (received[-1] - received[0]) if len(received) > 1 else float("nan")
    return latencies, (len(received) - 1) / span if span else float("nan")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/results/bus.json")
    ap.add_argument("--png", default="")
    ap.add_argument("-n", type=int, default=3000, help="records per latency run")
    ap.add_argument("--rate", type=float, default=250.0, help="records/s in latency runs")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--throughput-n", type=int, default=20000)
    ap.add_argument("--raw-relay", nargs=4, metavar=("BOOTSTRAP", "SRC", "DST", "GROUP"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_relay:
        raw_relay(*args.raw_relay)
        return 0

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP") or broker.start(broker.BrokerSettings.from_env())
    run = uuid.uuid4().hex[:6]
    settings = Settings(bus="kafka", bootstrap=bootstrap, topic_prefix=f"bench{run}.",
                        partitions=4)
    provision_topics(settings, ["relay"])
    src, dst = settings.topic("bench.in"), settings.topic("bench.out")
    raw_src, raw_dst = settings.topic("raw.in"), settings.topic("raw.out")
    single = settings.topic("single")
    create_topics(bootstrap, [src, dst, raw_src, raw_dst, single])

    env = {**os.environ, "PYTHONPATH": str(ROOT), "AVATAR_BUS": "kafka",
           "KAFKA_BOOTSTRAP": bootstrap, "AVATAR_TOPIC_PREFIX": settings.topic_prefix,
           "AVATAR_PARTITIONS": "4", "AVATAR_LOG_LEVEL": "WARNING"}
    stage = subprocess.Popen([sys.executable, "-m", "backbone.cli", "stage",
                              "benchmarks.bus:RelayStage"], env=env, cwd=ROOT)
    raw = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--raw-relay",
                            bootstrap, raw_src, raw_dst, f"raw-{run}"], env=env, cwd=ROOT)
    try:
        # Warm-up: group joins and first fetches are not what we measure.
        measure(bootstrap, src, dst, 200, 200.0)
        measure(bootstrap, raw_src, raw_dst, 200, 200.0)
        measure(bootstrap, single, single, 200, 200.0)
        # Interleaved rounds, so a noisy moment on a shared 2-core machine hits all three.
        hop, raw_lat, single_lat = [], [], []
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            hop += measure(bootstrap, src, dst, per_round, args.rate)[0]
            raw_lat += measure(bootstrap, raw_src, raw_dst, per_round, args.rate)[0]
            single_lat += measure(bootstrap, single, single, per_round, args.rate)[0]
        _, hop_tput = measure(bootstrap, src, dst, args.throughput_n, None)
        _, raw_tput = measure(bootstrap, raw_src, raw_dst, args.throughput_n, None)
    finally:
        for proc in (stage, raw):
            proc.terminate()
            proc.wait(30)

    result = {
        "hop_p50_ms": round(pct(hop, 50), 3), "hop_p99_ms": round(pct(hop, 99), 3),
        "raw_p50_ms": round(pct(raw_lat, 50), 3), "raw_p99_ms": round(pct(raw_lat, 99), 3),
        "single_trip_p50_ms": round(pct(single_lat, 50), 3),
        "single_trip_p99_ms": round(pct(single_lat, 99), 3),
        "hop_over_raw_p99": round(pct(hop, 99) / pct(raw_lat, 99), 3),
        "records_per_s": round(hop_tput, 1), "raw_records_per_s": round(raw_tput, 1),
        "n": len(hop), "rounds": args.rounds, "rate_per_s": args.rate, "partitions": 4, "cores": os.cpu_count(),
        "definition": "hop = source -> A -> relay process -> B -> sink, same for raw; "
                      "records_per_s = sink throughput through the runtime relay, unpaced",
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    png = Path(args.png) if args.png else out.with_suffix(".png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for xs, label in ((hop, "runtime relay (hop)"), (raw_lat, "bare confluent-kafka relay"),
                      (single_lat, "single produce->consume")):
        s = np.sort(np.array(xs))
        ax.plot(s, np.arange(1, len(s) + 1) / len(s), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("CDF")
    ax.set_title(f"Kafka hop latency, {args.rate:.0f} records/s, {os.cpu_count()} cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
