"""Running stages as real OS processes on the real broker, and collecting their output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from backbone.bus import Message
from backbone.kafka_bus import KafkaBus
from backbone.settings import Settings
from backbone.tracing import RecordHeaders

ROOT = Path(__file__).resolve().parents[2]


class StageProcess:
    """`avatar stage NAME` in its own process (SIGKILL-able), logs captured to a file."""

    def __init__(self, name: str, settings: Settings, log_dir: Path, instance: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{instance}.log"
        env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": settings.bootstrap,
               "AVATAR_TOPIC_PREFIX": settings.topic_prefix,
               "AVATAR_PARTITIONS": str(settings.partitions),
               "AVATAR_INSTANCE_ID": instance, "PYTHONPATH": str(ROOT),
               **(extra_env or {})}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "backbone.cli", "stage", name],
                                     env=env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def collect(settings: Settings, topic: str, expect: int, timeout_s: float = 60.0,
            until: "None | callable" = None) -> list[Message]:
    """Read `topic` from the start with a fresh group until `expect` distinct
    (session, producer, seq) records arrived, or time is up. Returns every raw message."""
    bus = KafkaBus(settings.bootstrap)
    c = bus.consumer(f"collector-{uuid.uuid4().hex[:8]}", read_committed=True)
    c.subscribe([settings.topic(topic)])
    got: list[Message] = []
    distinct: set[tuple[bytes | None, str, int]] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(distinct) < expect:
            m = c.poll(0.2)
            if m is None:
                continue
            got.append(m)
            h = RecordHeaders.decode(m)
            distinct.add((m.key, h.stage, h.seq))
    finally:
        c.close()
    return got


def dedupe(messages: list[Message]) -> Iterator[Message]:
    """What a downstream consumer keeps: the first of each (session, producer, seq)."""
    seen: set[tuple[bytes | None, str, int]] = set()
    for m in messages:
        h = RecordHeaders.decode(m)
        k = (m.key, h.stage, h.seq)
        if k not in seen:
            seen.add(k)
            yield m


class GatewayProcess:
    """`avatar gateway` on a free loopback port, on the settings' broker; waits until healthy."""

    def __init__(self, settings: Settings, log_dir: Path, extra_env: dict[str, str],
                 timeout_s: float = 60.0, port: int | None = None, name: str = "gateway") -> None:
        import httpx

        from tests.support.ports import free_port

        port = port or free_port()  # a restarted gateway takes its predecessor's port
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": settings.bootstrap,
               "AVATAR_TOPIC_PREFIX": settings.topic_prefix,
               "AVATAR_PARTITIONS": str(settings.partitions), "PYTHONPATH": str(ROOT),
               **extra_env}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "backbone.cli", "gateway", "--port",
                                      str(port)], env=env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.terminate()
        raise AssertionError(f"the gateway did not answer: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL (a crash): nothing is flushed or closed cleanly."""
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout_s: float = 20.0) -> None:
        """SIGTERM; a gateway that does not stop in time is killed and the test fails."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the gateway did not stop within {timeout_s:g} s of SIGTERM")
        finally:
            self._log.close()


def finished_video(bus: KafkaBus, settings: Settings, session_id: str,
                   timeout_s: float = 120.0) -> list[Any]:
    """The session's video once its last frame is logged (or what there is at the timeout)."""
    from replay.reader import read_session, session_video

    deadline = time.monotonic() + timeout_s
    video: list[Any] = []
    while time.monotonic() < deadline:
        video = session_video(read_session(bus, settings, session_id, "video"))
        if video and video[-1].is_last:
            break
        time.sleep(0.5)
    return video


def text_pipeline(bootstrap: str, unique_name: str, tmp_path: Path,
                  live: bool = False) -> tuple[Settings, list[StageProcess]]:
    """Topics of its own on the broker, and tts, animate and render as processes on them
    (offline: an utterance is spoken in one go; live: paced, with idle frames)."""
    from backbone.runtime import provision_topics
    from backbone.stages import PIPELINE

    settings = Settings(bus="kafka", bootstrap=bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=2)
    provision_topics(settings, PIPELINE)
    procs = [StageProcess(n, settings, tmp_path, "0", {"AVATAR_LIVE": "1" if live else "0"})
             for n in ("tts", "animate", "render")]
    return settings, procs
