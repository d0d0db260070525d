"""Replay tools on the real broker: a session made by three stage processes verifies intact
and exports an MP4 of the streamed access units; a record injected on the broker is named."""
from __future__ import annotations

import json

import pytest

from backbone import integrity
from backbone.demo import send_session
from backbone.kafka_bus import KafkaBus
from backbone.records import SessionConfig
from replay.export import export_session
from replay.verify import verify_session
from tests.integration.stage_procs import finished_video, text_pipeline

pytestmark = pytest.mark.kafka


def test_a_kafka_session_verifies_exports_and_shows_tampering(kafka_bootstrap, unique_name,
                                                              tmp_path):
    settings, procs = text_pipeline(kafka_bootstrap, unique_name, tmp_path)
    bus = KafkaBus(kafka_bootstrap)
    sid = "kafka-audit"
    try:
        send_session(settings, sid, "An auditor will read this later.",
                     SessionConfig(fps=25, resolution=256))
        video = finished_video(bus, settings, sid)
        assert video and video[-1].is_last
    finally:
        for p in procs:
            p.terminate()  # SIGTERM: each stage checkpoints its chain heads first
    report = verify_session(bus, settings, sid)
    assert report.ok and report.checkpoints >= 3, report.text()
    done = export_session(bus, settings, sid, tmp_path / "export")
    assert done.verified and done.frames == len(video)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["integrity"]["intact"]
    # Someone with write access to the broker adds a reply the avatar never got.
    p = bus.producer()
    p.produce(settings.topic("reply"), sid.encode(), b"\xc3\x01 not ours",
              (("stage", b"dialogue"), ("seq", b"7"), (integrity.H_LINK, b"cd" * 16),
               (integrity.H_LINK_PREV, b"00" * 16)))
    assert p.flush(10) == 0
    after = verify_session(bus, settings, sid)
    assert [(f.kind, f.topic) for f in after.tampering] == [("injected", "reply")]
