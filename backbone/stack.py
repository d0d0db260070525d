"""`avatar up` / `avatar down`: the real broker, its topics and every stage as its own
process on this machine, with their pids and logs under one run directory."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from backbone import broker
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE

METRICS_BASE_PORT = 9101  # stage i serves /metrics on 9101 + i


def _stage_env(bootstrap: str) -> dict[str, str]:
    """What every stage process of the local stack runs with. Our broker accepts short group
    sessions, so a crashed process's partitions move within about a second (the settings'
    defaults suit a stock broker, which refuses sessions under 6 s)."""
    return {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": bootstrap,
            "AVATAR_SESSION_TIMEOUT_MS": os.environ.get("AVATAR_SESSION_TIMEOUT_MS", "800"),
            "AVATAR_HEARTBEAT_MS": os.environ.get("AVATAR_HEARTBEAT_MS", "100")}


def up(run_dir: Path, foreground: bool = False) -> dict[str, int]:
    run_dir.mkdir(parents=True, exist_ok=True)
    bs = broker.BrokerSettings.from_env()
    bootstrap = broker.start(bs)
    settings = Settings.from_env(bus="kafka", bootstrap=bootstrap)
    provision_topics(settings, PIPELINE)
    pids: dict[str, int] = {}
    if settings.autoscale:
        pids["autoscale"] = _autoscaler(run_dir, bootstrap, settings)
    for i, name in enumerate(() if settings.autoscale else PIPELINE):
        env = {**_stage_env(bootstrap), "AVATAR_METRICS_PORT": str(METRICS_BASE_PORT + i),
               "AVATAR_INSTANCE_ID": f"{name}-0"}
        logf = open(run_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "backbone.cli", "stage", name], env=env,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        pids[name] = proc.pid
        print(f"{name}: pid {proc.pid}, metrics http://127.0.0.1:{METRICS_BASE_PORT + i}/metrics")
    env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": bootstrap}
    index = subprocess.Popen([sys.executable, "-m", "backbone.cli", "index"], env=env,
                             stdout=open(run_dir / "index.log", "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    pids["index"] = index.pid
    print(f"index: pid {index.pid} (session index for replay)")
    pids["gateway"], url = _gateway(run_dir, bootstrap)
    (run_dir / "pids.json").write_text(json.dumps(pids))
    print(f"broker {bootstrap}; logs in {run_dir}; stop with `avatar down`")
    print(f"demo page: {url}")
    if foreground:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            down(run_dir)
    return pids


def _autoscaler(run_dir: Path, bootstrap: str, settings: Settings) -> int:
    """One process owns the stage processes: it starts `autoscale_min` of each and adds or
    removes them on latency (backbone/autoscale.py); SIGTERM to it stops them all cleanly."""
    env = _stage_env(bootstrap)
    proc = subprocess.Popen([sys.executable, "-m", "backbone.autoscale", "--run-dir",
                             str(run_dir)], env=env, stdout=open(run_dir / "autoscale.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    print(f"autoscale: pid {proc.pid}, stages {settings.autoscale_min}-{settings.autoscale_max} "
          f"processes each on p95 <= {settings.autoscale_slo_ms:g} ms; decisions in "
          f"{run_dir / 'autoscale.log'}, metrics targets in {run_dir / 'prometheus-targets.json'}")
    return proc.pid


def _gateway(run_dir: Path, bootstrap: str) -> tuple[int, str]:
    """The gateway with a demo key (the page's own token) unless keys are configured."""
    secrets_file = run_dir / "gateway.secrets.json"
    if secrets_file.exists():
        secret = json.loads(secrets_file.read_text())
    else:
        secret = {"jwt": secrets.token_urlsafe(32), "demo_key": secrets.token_urlsafe(24)}
        secrets_file.write_text(json.dumps(secret))
        secrets_file.chmod(0o600)
    demo_key = os.environ.get("AVATAR_DEMO_KEY") or secret["demo_key"]
    keys = os.environ.get("AVATAR_API_KEYS") or f"demo:{demo_key}:integrator+auditor"
    host = os.environ.get("AVATAR_GATEWAY_HOST", "127.0.0.1")
    port = os.environ.get("AVATAR_GATEWAY_PORT", "8080")
    env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": bootstrap,
           "AVATAR_API_KEYS": keys, "AVATAR_DEMO_KEY": demo_key,
           "AVATAR_JWT_SECRET": os.environ.get("AVATAR_JWT_SECRET") or secret["jwt"],
           "AVATAR_ICE_LOOPBACK": os.environ.get("AVATAR_ICE_LOOPBACK", "1" if host == "127.0.0.1"
                                                 else "0")}
    logf = open(run_dir / "gateway.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "backbone.cli", "gateway", "--host", host,
                             "--port", port], env=env, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    print(f"gateway: pid {proc.pid}, metrics http://{host}:{port}/metrics")
    return proc.pid, f"http://{host}:{port}/"


def down(run_dir: Path, stop_broker: bool = True, timeout_s: float = 20.0) -> None:
    pid_file = run_dir / "pids.json"
    pids: dict[str, int] = json.loads(pid_file.read_text()) if pid_file.exists() else {}
    for name, pid in pids.items():
        try:
            os.kill(pid, signal.SIGTERM)  # stages checkpoint and commit on SIGTERM
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    for name, pid in pids.items():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"{name}: stopped")
    pid_file.unlink(missing_ok=True)
    if stop_broker:
        stopped = broker.stop(broker.BrokerSettings.from_env())
        print("broker: stopped" if stopped else "broker: was not running (AVATAR_KAFKA_HOME?)")
