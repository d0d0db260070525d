"""The local autoscaler behind `avatar up --autoscale`: it scrapes every stage process's
/metrics, and adds or removes `avatar stage NAME` processes of one consumer group on latency.

Three parts, kept apart so the rule can be tested without processes or a broker:
- `window_from_scrapes`: two scrapes of a stage's replicas -> one `StageWindow` (windowed
  p95 from histogram bucket differences, lag, busy time);
- `decide`: a pure function of the window, the policy and what it remembers -> a `Decision`;
- `StageReplicas` / `Autoscaler`: the processes (SIGTERM for a clean scale-in) and the loop.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

from backbone import metrics
from backbone.settings import Settings

log = logging.getLogger("avatar.autoscale")

# The metric names the autoscaler reads, taken from the objects that export them so a rename
# cannot silently blind it.
LATENCY_METRIC = metrics.E2E_LATENCY._name  # originating input -> this stage's output
BUSY_METRIC = metrics.PROCESS_SECONDS._name  # wall time inside stage.process
LAG_METRIC = metrics.CONSUMER_LAG._name

# Where a stage's inputs come from, for blame: when a stage and one of its upstream stages
# both breach, only the upstream one scales (the downstream latency includes its delay).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "asr": (), "dialogue": ("asr",), "tts": ("dialogue",), "align": ("tts",),
    "animate": ("tts", "align"), "render": ("animate",),
}


# ---- policy and the pure decision ------------------------------------------------------

@dataclass(frozen=True)
class ScalePolicy:
    slo_s: float = 0.2  # p95 of the stage's end-to-end latency must stay under this
    breach_windows: int = 3  # consecutive breaching windows before a scale-out (not one spike)
    idle_windows: int = 12  # consecutive idle windows before a scale-in (slower to give back)
    min_replicas: int = 1
    max_replicas: int = 4
    cooldown_s: float = 30.0  # a new process must join, get partitions and drain the backlog
    # Latency over the SLO only counts as load when the stage is busy or behind: adding a
    # process does nothing for latency that is not queueing (a slow upstream, a slow model).
    busy_utilisation: float = 0.7
    lag_floor: int = 10  # records behind that still count as caught up
    # Scale in only if the remaining replicas would be at most this busy.
    idle_utilisation: float = 0.5


@dataclass(frozen=True)
class StageWindow:
    """What one stage did during one window, over all its replicas."""
    stage: str
    replicas: int
    window_s: float
    records: int  # records consumed
    p95_s: float | None  # None: no output with an event time in the window
    busy_s: float  # summed time inside stage.process
    lag: int | None  # records behind, all partitions (None: not reported yet)
    upstream_breaching: bool = False

    @property
    def utilisation(self) -> float:
        """Share of the replicas' wall time spent processing (1.0: saturated)."""
        return self.busy_s / (self.window_s * max(1, self.replicas)) if self.window_s else 0.0


@dataclass(frozen=True)
class ScaleMemory:
    """What `decide` carries from one window to the next, per stage."""
    breaches: int = 0
    lag_rises: int = 0
    idle: int = 0
    last_lag: int | None = None
    last_action_at: float = -math.inf


@dataclass(frozen=True)
class Decision:
    stage: str
    action: str  # "out" | "in" | "hold"
    replicas: int  # after the action
    reason: str
    figures: dict[str, float | int | None] = field(default_factory=dict)


def decide(w: StageWindow, policy: ScalePolicy, memory: ScaleMemory,
           now: float) -> tuple[Decision, ScaleMemory]:
    """The scaling rule for one stage and one window. Pure: same inputs, same answer."""
    over = w.p95_s is not None and w.p95_s > policy.slo_s
    loaded = w.utilisation >= policy.busy_utilisation or (w.lag or 0) > policy.lag_floor
    breach = over and loaded and not w.upstream_breaching
    lag_rise = (w.lag is not None and memory.last_lag is not None and w.lag > memory.last_lag
                and w.lag > policy.lag_floor)
    after_in = w.busy_s / (w.window_s * (w.replicas - 1)) if w.replicas > 1 and w.window_s \
        else math.inf
    idle = (not over and not lag_rise and (w.lag or 0) <= policy.lag_floor
            and after_in <= policy.idle_utilisation)
    mem = ScaleMemory(breaches=memory.breaches + 1 if breach else 0,
                      lag_rises=memory.lag_rises + 1 if lag_rise else 0,
                      idle=memory.idle + 1 if idle else 0,
                      last_lag=w.lag, last_action_at=memory.last_action_at)
    figures: dict[str, float | int | None] = {
        "p95_ms": None if w.p95_s is None else round(w.p95_s * 1000, 1),
        "slo_ms": round(policy.slo_s * 1000, 1), "lag": w.lag, "records": w.records,
        "utilisation": round(w.utilisation, 3), "replicas": w.replicas,
        "breaches": mem.breaches, "lag_rises": mem.lag_rises, "idle_windows": mem.idle}
    if w.upstream_breaching and over:
        figures["upstream_breaching"] = 1

    def hold(reason: str, m: ScaleMemory = mem) -> tuple[Decision, ScaleMemory]:
        return Decision(w.stage, "hold", w.replicas, reason, figures), m

    def act(action: str, reason: str) -> tuple[Decision, ScaleMemory]:
        n = w.replicas + (1 if action == "out" else -1)
        # Counters restart: the next action needs fresh evidence from the new replica count.
        return (Decision(w.stage, action, n, reason, figures),
                ScaleMemory(last_lag=w.lag, last_action_at=now))

    if w.replicas < policy.min_replicas:
        return act("out", f"{w.replicas} replicas, below the minimum {policy.min_replicas}")
    if w.replicas > policy.max_replicas:
        return act("in", f"{w.replicas} replicas, above the maximum {policy.max_replicas}")
    wants_out = mem.breaches >= policy.breach_windows or mem.lag_rises >= policy.breach_windows
    wants_in = mem.idle >= policy.idle_windows and w.replicas > policy.min_replicas
    if not (wants_out or wants_in):
        return hold("within SLO" if not over else "breach not sustained" if breach
                    else "over SLO upstream" if w.upstream_breaching
                    else "over SLO but not loaded")
    if wants_out and w.replicas >= policy.max_replicas:
        return hold(f"sustained breach, already at the maximum {policy.max_replicas}")
    since = now - memory.last_action_at
    if since < policy.cooldown_s:
        return hold(f"cooldown: {since:.1f} s of {policy.cooldown_s:g} s since the last action")
    if wants_out:
        if mem.breaches >= policy.breach_windows:
            return act("out", f"p95 over the SLO for {mem.breaches} windows while loaded")
        return act("out", f"lag grew for {mem.lag_rises} windows")
    return act("in", f"idle for {mem.idle} windows; {w.replicas - 1} replicas would be "
                     f"{after_in:.0%} busy")


# ---- from scrapes to windows ------------------------------------------------------------

@dataclass(frozen=True)
class Scrape:
    """The cumulative figures of one replica's /metrics for one stage."""
    latency_buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count)
    busy_sum: float
    records: float
    lag: dict[tuple[str, str], float]  # (topic, partition) -> records behind


def parse_scrape(text: str, stage: str) -> Scrape:
    buckets: dict[float, float] = {}
    busy = records = 0.0
    lag: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("stage") != stage:
                continue
            if s.name == LATENCY_METRIC + "_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == BUSY_METRIC + "_sum":
                busy += s.value
            elif s.name == BUSY_METRIC + "_count":
                records += s.value
            elif s.name == LAG_METRIC:
                lag[(s.labels.get("topic", ""), s.labels.get("partition", ""))] = s.value
    return Scrape(tuple(sorted(buckets.items())), busy, records, lag)


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """q-quantile of a cumulative histogram, interpolating inside the bucket as Prometheus's
    histogram_quantile does; None for an empty one."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower  # past the last finite bound: that bound is all we know
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def _diff(now: Sequence[tuple[float, float]],
          before: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(before)
    # A restarted replica's counters start again at 0: its whole count is then new.
    return [(le, c - old.get(le, 0.0) if c >= old.get(le, 0.0) else c) for le, c in now]


def window_from_scrapes(stage: str, now: Mapping[str, Scrape], before: Mapping[str, Scrape],
                        window_s: float) -> StageWindow:
    """One window of one stage from two scrapes of each replica (keyed by replica id). A
    replica without an earlier scrape counts from zero (it started inside the window)."""
    empty = Scrape((), 0.0, 0.0, {})
    totals: dict[float, float] = {}
    busy = records = 0.0
    lag_by_partition: dict[tuple[str, str], float] = {}
    for rid, cur in now.items():
        prev = before.get(rid, empty)
        for le, c in _diff(cur.latency_buckets, prev.latency_buckets):
            totals[le] = totals.get(le, 0.0) + c
        busy += cur.busy_sum - prev.busy_sum if cur.busy_sum >= prev.busy_sum else cur.busy_sum
        records += cur.records - prev.records if cur.records >= prev.records else cur.records
        for key, v in cur.lag.items():
            # A replica keeps the last figure of a partition it lost in a rebalance; the
            # owner's is fresher and, being caught up or not, never larger than a stale
            # backlog that it has since worked off.
            lag_by_partition[key] = min(v, lag_by_partition.get(key, math.inf))
    lag = int(sum(lag_by_partition.values())) if lag_by_partition else None
    return StageWindow(stage, len(now), window_s, int(records),
                       quantile(0.95, sorted(totals.items())), busy, lag)


def slo_for(stage: str, settings: Settings) -> float:
    """Seconds: the stage's own SLO from AVATAR_AUTOSCALE_STAGE_SLO_MS, else the one SLO."""
    for item in filter(None, settings.autoscale_stage_slo_ms.split(",")):
        name, _, ms = item.partition("=")
        if name.strip() == stage:
            return float(ms) / 1000
    return settings.autoscale_slo_ms / 1000


def policy_for(stage: str, settings: Settings) -> ScalePolicy:
    return ScalePolicy(slo_s=slo_for(stage, settings),
                       breach_windows=settings.autoscale_breach_windows,
                       idle_windows=settings.autoscale_idle_windows,
                       min_replicas=settings.autoscale_min, max_replicas=settings.autoscale_max,
                       cooldown_s=settings.autoscale_cooldown_s)


# ---- processes ---------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    rid: str  # instance id, e.g. "render-2"
    proc: subprocess.Popen[bytes]
    metrics_url: str
    started_at: float
    stopping_since: float | None = None


class StageReplicas:
    """The `avatar stage NAME` processes of one stage, all in its one consumer group (Kafka
    spreads the partitions over them). Constructor does no I/O; `add()` starts one."""

    def __init__(self, stage: str, env: Mapping[str, str], log_dir: Path,
                 command: Sequence[str] | None = None, stop_timeout_s: float = 30.0) -> None:
        self.stage = stage
        self.env = dict(env)
        self.log_dir = log_dir
        self.command = list(command or [sys.executable, "-m", "backbone.cli", "stage", stage])
        self.stop_timeout_s = stop_timeout_s
        self.live: list[Replica] = []
        self.stopping: list[Replica] = []
        self._next = 0

    def add(self) -> Replica:
        rid = f"{self.stage}-{self._next}"
        self._next += 1
        port = free_port()
        env = {**self.env, "AVATAR_METRICS_PORT": str(port), "AVATAR_METRICS_ADDR": "127.0.0.1",
               "AVATAR_INSTANCE_ID": rid}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{rid}.log", "ab") as logf:  # the child keeps its own handle
            proc = subprocess.Popen(self.command, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        rep = Replica(rid, proc, f"http://127.0.0.1:{port}/metrics", time.monotonic())
        self.live.append(rep)
        return rep

    def remove(self) -> Replica | None:
        """SIGTERM the newest replica: it finishes the record in hand, checkpoints, commits
        and leaves the group, whose partitions then move to the others. Not waited for."""
        if not self.live:
            return None
        rep = self.live.pop()
        rep.stopping_since = time.monotonic()
        if rep.proc.poll() is None:
            rep.proc.send_signal(signal.SIGTERM)
        self.stopping.append(rep)
        return rep

    def reap(self) -> list[Replica]:
        """Forget replicas that exited; kill ones that ignored SIGTERM too long. Returns the
        live replicas that died on their own (crashes)."""
        now = time.monotonic()
        for rep in list(self.stopping):
            if rep.proc.poll() is not None:
                self.stopping.remove(rep)
            elif rep.stopping_since is not None and now - rep.stopping_since > self.stop_timeout_s:
                rep.proc.kill()
        dead = [r for r in self.live if r.proc.poll() is not None]
        for rep in dead:
            self.live.remove(rep)
        return dead

    def stop_all(self, timeout_s: float | None = None) -> None:
        while self.live:
            self.remove()
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.stop_timeout_s)
        for rep in list(self.stopping):
            try:
                rep.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rep.proc.kill()
                rep.proc.wait(5)
        self.stopping.clear()


Fetch = Callable[[str], str]


def http_fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2.0) as r:  # loopback: a slow answer is a stall
        body: bytes = r.read()
    return body.decode("utf-8", "replace")


class Autoscaler:
    """Every window: scrape each stage's replicas, decide, act, log the decision."""

    def __init__(self, pools: Mapping[str, StageReplicas], policies: Mapping[str, ScalePolicy],
                 window_s: float, fetch: Fetch = http_fetch,
                 on_decision: Callable[[Decision], None] | None = None,
                 targets_file: Path | None = None) -> None:
        self.pools = dict(pools)
        self.policies = dict(policies)
        self.window_s = window_s
        self.fetch = fetch
        self.on_decision = on_decision
        self.targets_file = targets_file
        self.memory: dict[str, ScaleMemory] = {s: ScaleMemory() for s in pools}
        self._scrapes: dict[str, dict[str, Scrape]] = {s: {} for s in pools}
        self._scraped_at: float | None = None
        self.windows: dict[str, StageWindow] = {}
        # Per replica: how busy each was in the last window (a session is bound to one
        # partition, so one replica can be saturated while the others idle).
        self.replica_utilisation: dict[str, dict[str, float]] = {}

    def start(self) -> None:
        """The minimum replicas of every stage."""
        for stage, pool in self.pools.items():
            while len(pool.live) < self.policies[stage].min_replicas:
                rep = pool.add()
                log.info("replica started", extra={"stage": stage, "replica": rep.rid,
                                                   "pid": rep.proc.pid, "reason": "minimum"})
        self._write_targets()

    def _scrape(self, stage: str) -> dict[str, Scrape]:
        out = {}
        for rep in self.pools[stage].live:
            try:
                out[rep.rid] = parse_scrape(self.fetch(rep.metrics_url), stage)
            except (OSError, urllib.error.URLError, ValueError):
                continue  # still loading its models, or going away: not in this window
        return out

    def step(self, now: float | None = None) -> list[Decision]:
        """One window: returns every stage's decision (holds included)."""
        now = time.monotonic() if now is None else now
        for stage, pool in self.pools.items():
            for rep in pool.reap():
                log.warning("replica exited", extra={"stage": stage, "replica": rep.rid,
                                                     "returncode": rep.proc.returncode})
        current = {s: self._scrape(s) for s in self.pools}
        elapsed = self.window_s if self._scraped_at is None else now - self._scraped_at
        self._scraped_at = now
        windows = {}
        for stage in self.pools:
            w = window_from_scrapes(stage, current[stage], self._scrapes[stage], elapsed)
            # Replicas not answering yet still count: a scale-out is in flight.
            windows[stage] = dataclasses.replace(w, replicas=len(self.pools[stage].live))
            self.replica_utilisation[stage] = {
                rid: round(window_from_scrapes(stage, {rid: cur}, self._scrapes[stage],
                                               elapsed).utilisation, 3)
                for rid, cur in current[stage].items()}
        self._scrapes = current
        breaching = {s for s, w in windows.items() if w.p95_s is not None
                     and w.p95_s > self.policies[s].slo_s}
        decisions = []
        for stage, w in windows.items():
            w = dataclasses.replace(w, upstream_breaching=any(
                u in breaching for u in UPSTREAM.get(stage, ())))
            self.windows[stage] = w
            d, self.memory[stage] = decide(w, self.policies[stage], self.memory[stage], now)
            self._apply(d)
            decisions.append(d)
        return decisions

    def _apply(self, d: Decision) -> None:
        pool = self.pools[d.stage]
        extra: dict[str, object] = {"stage": d.stage, "action": d.action, "reason": d.reason,
                                    "replicas_after": d.replicas, **d.figures}
        if d.action == "out":
            rep = pool.add()
            extra |= {"replica": rep.rid, "pid": rep.proc.pid}
        elif d.action == "in":
            gone = pool.remove()
            extra |= {"replica": gone.rid if gone else None}
        # Actions and held-back actions at INFO; a plain "within SLO" at DEBUG, or the log
        # would be one line per stage per window for nothing.
        level = logging.INFO if d.action != "hold" or "cooldown" in d.reason \
            or "maximum" in d.reason or "not sustained" in d.reason else logging.DEBUG
        log.log(level, "autoscale decision", extra=extra)
        if d.action != "hold":
            self._write_targets()
        if self.on_decision is not None:
            self.on_decision(d)

    def _write_targets(self) -> None:
        """A Prometheus file_sd list of the live replicas, so a local Prometheus follows them."""
        if self.targets_file is None:
            return
        groups = [{"targets": [r.metrics_url.split("/")[2]],
                   "labels": {"service": stage, "replica": r.rid}}
                  for stage, pool in self.pools.items() for r in pool.live]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        tmp.replace(self.targets_file)

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(self.window_s):
                self.step()
        finally:
            # Every replica gets SIGTERM at once, then all are waited for: stopping the
            # stages one after another would outlast `avatar down`'s patience.
            for pool in self.pools.values():
                while pool.live:
                    pool.remove()
            for pool in self.pools.values():
                pool.stop_all()
            log.info("autoscaler stopped", extra={"stages": list(self.pools)})


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m backbone.autoscale --run-dir DIR`: what `avatar up --autoscale` starts in
    place of one process per stage. SIGTERM stops every replica cleanly, then itself."""
    import argparse

    from backbone import logs
    from backbone.stages import PIPELINE

    p = argparse.ArgumentParser(prog="avatar-autoscale")
    p.add_argument("--run-dir", default="avatar-data/run")
    p.add_argument("--stages", default=",".join(PIPELINE))
    args = p.parse_args(argv)
    logs.configure(os.environ.get("AVATAR_LOG_LEVEL", "INFO"))
    settings = Settings.from_env()
    run_dir = Path(args.run_dir)
    stages = [s for s in args.stages.split(",") if s]
    env = {k: v for k, v in os.environ.items() if k != "AVATAR_METRICS_PORT"}
    pools = {s: StageReplicas(s, env, run_dir) for s in stages}
    scaler = Autoscaler(pools, {s: policy_for(s, settings) for s in stages},
                        settings.autoscale_window_s,
                        targets_file=run_dir / "prometheus-targets.json")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("autoscaler started", extra={"stages": stages, "window_s": settings.autoscale_window_s,
                                          "slo_ms": settings.autoscale_slo_ms,
                                          "min": settings.autoscale_min,
                                          "max": settings.autoscale_max,
                                          "cooldown_s": settings.autoscale_cooldown_s})
    scaler.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
