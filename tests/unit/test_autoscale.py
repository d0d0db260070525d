"""The autoscaler's rule (backbone.autoscale.decide) and its reading of /metrics, without
processes or a broker: sustained breaches scale out, one spike does not, idle scales in,
bounds and cooldown hold."""
from __future__ import annotations

import dataclasses
import sys

from prometheus_client import CollectorRegistry, Histogram, Counter, Gauge, generate_latest

from backbone import metrics
from backbone.autoscale import (Autoscaler, ScaleMemory, ScalePolicy, StageReplicas,
                                StageWindow, decide, parse_scrape, quantile, slo_for,
                                window_from_scrapes)
from backbone.settings import Settings

POLICY = ScalePolicy(slo_s=0.2, breach_windows=3, idle_windows=4, min_replicas=1,
                     max_replicas=3, cooldown_s=30.0)


def window(p95_ms: float | None, replicas: int = 1, utilisation: float = 0.9,
           lag: int | None = 0, **kw: object) -> StageWindow:
    return StageWindow("render", replicas, 5.0, 100, None if p95_ms is None else p95_ms / 1000,
                       utilisation * 5.0 * replicas, lag, **kw)  # type: ignore[arg-type]


def run(windows: list[StageWindow], policy: ScalePolicy = POLICY, start: float = 100.0,
        memory: ScaleMemory | None = None) -> list[str]:
    """Feeds the windows 5 s apart, applying each decision's replica count to the next."""
    mem = memory or ScaleMemory()
    actions, replicas = [], windows[0].replicas
    for i, w in enumerate(windows):
        busy = w.utilisation * w.window_s * replicas
        d, mem = decide(dataclasses.replace(w, replicas=replicas, busy_s=busy), policy, mem,
                        start + 5.0 * i)
        actions.append(d.action)
        replicas = d.replicas
    return actions


def test_a_sustained_breach_under_load_adds_a_process() -> None:
    assert run([window(350)] * 3) == ["hold", "hold", "out"]


def test_one_spike_does_not_scale() -> None:
    assert run([window(350), window(80), window(350), window(80), window(350)]) == ["hold"] * 5


def test_latency_over_the_slo_without_load_does_not_scale() -> None:
    # Slow but neither busy nor behind: another process would not make it faster.
    assert run([window(350, utilisation=0.2, lag=0)] * 5) == ["hold"] * 5


def test_a_growing_backlog_scales_out_even_under_the_slo() -> None:
    lags = [20, 60, 120, 200]
    assert run([window(150, lag=n, utilisation=0.5) for n in lags]) == \
        ["hold", "hold", "hold", "out"]


def test_an_upstream_breach_is_not_blamed_on_this_stage() -> None:
    assert run([window(350, upstream_breaching=True)] * 5) == ["hold"] * 5


def test_idle_replicas_are_removed_after_enough_idle_windows() -> None:
    assert run([window(40, replicas=3, utilisation=0.1)] * 4) == ["hold"] * 3 + ["in"]


def test_a_busy_pair_is_not_halved() -> None:
    # Two replicas each 60 % busy: one would be 120 % busy, so neither goes.
    assert run([window(40, replicas=2, utilisation=0.6)] * 10) == ["hold"] * 10


def test_never_above_the_maximum() -> None:
    d, _ = decide(window(500, replicas=3), POLICY, ScaleMemory(breaches=10), 1000.0)
    assert (d.action, d.replicas) == ("hold", 3)
    assert "maximum" in d.reason


def test_never_below_the_minimum() -> None:
    d, _ = decide(window(None, replicas=1, utilisation=0.0), POLICY, ScaleMemory(idle=100),
                  1000.0)
    assert (d.action, d.replicas) == ("hold", 1)


def test_a_missing_replica_is_replaced_up_to_the_minimum() -> None:
    d, _ = decide(window(None, replicas=0, utilisation=0.0), POLICY, ScaleMemory(), 1000.0)
    assert (d.action, d.replicas) == ("out", 1)


def test_cooldown_holds_the_next_action_back() -> None:
    first = ScaleMemory(last_action_at=100.0)
    d, mem = decide(window(350), POLICY, dataclasses.replace(first, breaches=5), 110.0)
    assert d.action == "hold" and "cooldown" in d.reason
    d, _ = decide(window(350), POLICY, mem, 131.0)
    assert d.action == "out"


def test_an_action_restarts_the_evidence() -> None:
    actions = run([window(350)] * 3 + [window(350)] * 2,
                  dataclasses.replace(POLICY, cooldown_s=0.0))
    assert actions == ["hold", "hold", "out", "hold", "hold"]


def test_every_decision_names_its_figures() -> None:
    d, _ = decide(window(350, lag=42), POLICY, ScaleMemory(breaches=2), 1000.0)
    assert d.action == "out" and "3 windows" in d.reason
    assert d.figures["p95_ms"] == 350.0 and d.figures["slo_ms"] == 200.0
    assert d.figures["lag"] == 42 and d.figures["replicas"] == 1


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (float("inf"), 100.0)]
    assert abs(quantile(0.95, buckets) - 0.35) < 1e-9  # type: ignore[operator]
    assert quantile(0.5, buckets) == 0.1
    assert quantile(0.95, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def _exposition(latencies: list[float], busy: list[float], lag: dict[str, int]) -> str:
    """/metrics text with the runtime's own metric names (read from backbone.metrics)."""
    reg = CollectorRegistry()
    e2e = Histogram(metrics.E2E_LATENCY._name, "x", ["stage"], buckets=metrics._FAST,
                    registry=reg)
    proc = Histogram(metrics.PROCESS_SECONDS._name, "x", ["stage"], buckets=metrics._FAST,
                     registry=reg)
    g = Gauge(metrics.CONSUMER_LAG._name, "x", ["stage", "topic", "partition"], registry=reg)
    other = Counter("avatar_unrelated_total", "x", ["stage"], registry=reg)
    other.labels("render").inc()
    for v in latencies:
        e2e.labels("render").observe(v)
    e2e.labels("animate").observe(9.0)  # another stage's figures in the same process
    for v in busy:
        proc.labels("render").observe(v)
    for p, n in lag.items():
        g.labels("render", "motion", p).set(n)
    return generate_latest(reg).decode()


def test_a_window_is_the_difference_between_two_scrapes() -> None:
    before = {"render-0": parse_scrape(_exposition([0.01] * 100, [0.01] * 100, {"0": 5}),
                                       "render")}
    now = {"render-0": parse_scrape(_exposition([0.01] * 100 + [0.3] * 20, [0.01] * 100
                                                + [0.2] * 20, {"0": 50}), "render"),
           # started inside the window: all of its counts are new
           "render-1": parse_scrape(_exposition([0.3] * 5, [0.2] * 5, {"1": 7}), "render")}
    w = window_from_scrapes("render", now, before, 5.0)
    assert w.records == 25 and w.replicas == 2
    assert 0.2 < w.p95_s <= 0.5  # type: ignore[operator]  # only the slow records are new
    assert abs(w.busy_s - 25 * 0.2) < 1e-6
    assert w.lag == 57


def test_a_partition_reported_by_two_replicas_counts_once() -> None:
    old_owner = parse_scrape(_exposition([], [], {"0": 400}), "render")
    new_owner = parse_scrape(_exposition([], [], {"0": 3}), "render")
    w = window_from_scrapes("render", {"a": old_owner, "b": new_owner}, {}, 5.0)
    assert w.lag == 3


def test_per_stage_slos_override_the_one_slo() -> None:
    s = Settings(autoscale_slo_ms=200, autoscale_stage_slo_ms="dialogue=1500, render=120")
    assert slo_for("dialogue", s) == 1.5 and slo_for("render", s) == 0.12
    assert slo_for("animate", s) == 0.2


def test_the_loop_acts_on_its_decisions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Autoscaler.step with a scripted /metrics: three slow windows start a second process
    (a harmless sleeper standing in for `avatar stage`), the targets file lists both."""
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    pool = StageReplicas("render", {}, tmp_path, command=cmd, stop_timeout_s=5)
    texts: list[str] = []
    count = {"n": 0}

    def fetch(url: str) -> str:
        return texts[-1]

    scaler = Autoscaler({"render": pool}, {"render": dataclasses.replace(POLICY, cooldown_s=0)},
                        5.0, fetch=fetch, targets_file=tmp_path / "targets.json")
    try:
        scaler.start()
        assert len(pool.live) == 1
        actions = []
        for i in range(3):
            count["n"] += 20
            # 20 slow records per window, each 0.24 s of a 5 s window: busy and late.
            texts.append(_exposition([0.4] * count["n"], [0.24] * count["n"], {"0": 0}))
            actions += [d.action for d in scaler.step(now=100.0 + 5 * i)]
        assert actions == ["hold", "hold", "out"]
        assert len(pool.live) == 2
        assert (tmp_path / "targets.json").read_text().count("render-") == 2
    finally:
        pool.stop_all(5)
    assert all(r.proc.poll() is not None for r in pool.stopping + pool.live)
