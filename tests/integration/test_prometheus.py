"""A real Prometheus (Debian package) scrapes a live stack on the real broker — three stage
processes and the gateway — and answers the operator's questions: p95 end-to-end latency,
dropped frames, stream uptime and stage lag."""
from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from tests.integration.stage_procs import GatewayProcess, StageProcess
from tests.support.ports import free_port

pytestmark = pytest.mark.kafka

KEY = "prometheus-test-key-0123"


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_the_stack_and_answers_operator_queries(kafka_bootstrap, unique_name,
                                                                   tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is required (Debian: prometheus)"
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=2)
    provision_topics(settings, PIPELINE)
    ports = {name: free_port() for name in ("tts", "animate", "render")}
    procs = [StageProcess(n, settings, tmp_path, "0", {"AVATAR_METRICS_PORT": str(p)})
             for n, p in ports.items()]
    gateway = GatewayProcess(settings, tmp_path, {
        "AVATAR_API_KEYS": f"ops:{KEY}:integrator",
        "AVATAR_JWT_SECRET": "prometheus-test-secret-of-32-bytes"})
    gw_port, prom_port = gateway.base.rsplit(":", 1)[1], free_port()
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports.values())
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: avatar-stages
    static_configs: [{{targets: [{targets}]}}]
  - job_name: avatar-gateway
    static_configs: [{{targets: ['127.0.0.1:{gw_port}']}}]
""")
    prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=open(tmp_path / "prometheus.log", "wb"),
                            stderr=subprocess.STDOUT)
    base, prom_url = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{prom_port}"
    try:
        token = httpx.post(f"{base}/v1/tokens", json={},
                           headers={"Authorization": f"Bearer {KEY}"}).json()["token"]
        hdr = {"Authorization": f"Bearer {token}"}
        sid = httpx.post(f"{base}/v1/sessions", json={"resolution": 256},
                         headers=hdr).json()["session_id"]
        time.sleep(6)  # the stages join their groups
        httpx.post(f"{base}/v1/sessions/{sid}/speak", json={"text": "Metrics, please."},
                   headers=hdr).raise_for_status()

        def answered(expr: str) -> list[dict]:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = _query(prom_url, expr)
                if got:
                    return got
                time.sleep(1)
            raise AssertionError(f"no answer to {expr}\n" + "\n".join(
                p.log()[-800:] for p in procs))

        up = answered('up{job="avatar-stages"} == 1')
        assert len(up) == 3
        p95 = answered('histogram_quantile(0.95, sum by (le) '
                       '(rate(avatar_stage_e2e_latency_seconds_bucket{stage="render"}[1m]))) > 0')
        assert 0 < float(p95[0]["value"][1]) < 5.0
        frames = answered('sum(avatar_stage_records_out_total{stage="render",topic="video"}) > 0')
        assert float(frames[0]["value"][1]) > 0
        # Dropped (replaced) frames: a series appears with the first one; none here.
        dropped = answered("sum(avatar_render_replaced_frames_total) or vector(0)")
        assert float(dropped[0]["value"][1]) == 0.0
        lag = answered("max(avatar_stage_consumer_lag)")
        assert float(lag[0]["value"][1]) >= 0
        uptime = answered('time() - process_start_time_seconds{job="avatar-stages"}')
        assert all(float(r["value"][1]) > 5 for r in uptime)
        gw = answered('sum(avatar_gateway_requests_total{route="/v1/sessions/{session_id}/speak"})')
        assert float(gw[0]["value"][1]) >= 1
    finally:
        prom.terminate()
        for p in procs:
            p.terminate()
        prom.wait(20)
        gateway.terminate()
