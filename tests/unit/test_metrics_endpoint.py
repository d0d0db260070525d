"""A stage process serves Prometheus metrics that count what it did."""
import socket

import httpx

from backbone.records import Transcript
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from processors.dialogue import DialogueStage
from tests.support.bus_io import send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_reports_records_latency_and_dead_letters(tmp_path):
    port = free_port()
    settings = Settings(embedded_path=str(tmp_path / "bus.sqlite"), partitions=2,
                        metrics_port=port, topic_prefix="metrics.")
    provision_topics(settings, ["dialogue"])
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "hello"), seq=0)
    bus.producer().produce(settings.topic("transcript"), b"s1", b"junk", ())
    StageRunner(DialogueStage(), settings).run(idle_exit_s=0.2)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    lines = text.splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('avatar_stage_records_out_total{stage="dialogue",topic="reply"}') >= 1
    assert value('avatar_stage_dead_letters_total{category="undecodable",stage="dialogue"}') >= 1
    assert value('avatar_stage_e2e_latency_seconds_count{stage="dialogue"}') >= 1
    assert "avatar_stage_consumer_lag" in text
