"""The session index (faust-streaming, changelog-backed table) on the real broker: it finds
a session's records on every topic, survives a restart, and replay reads by seeking."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from backbone.demo import send_session
from backbone.kafka_bus import KafkaBus
from backbone.records import SessionConfig
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from replay.index import lookup
from replay.reader import read_session
from tests.integration.stage_procs import ROOT, StageProcess

pytestmark = pytest.mark.kafka


def _index(settings, tmp_path, n):
    env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": settings.bootstrap,
           "AVATAR_TOPIC_PREFIX": settings.topic_prefix,
           "AVATAR_PARTITIONS": str(settings.partitions), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "backbone.cli", "index"], env=env, cwd=ROOT,
                            stdout=open(tmp_path / f"index-{n}.log", "wb"),
                            stderr=subprocess.STDOUT)


def _wait(fn, what, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out: {what}")


def test_the_index_locates_a_sessions_records_and_survives_a_restart(kafka_bootstrap,
                                                                     unique_name, tmp_path):
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=2)
    provision_topics(settings, PIPELINE)
    bus = KafkaBus(kafka_bootstrap)
    index = _index(settings, tmp_path, 1)
    tts = StageProcess("tts", settings, tmp_path, "0", {"AVATAR_LIVE": "0"})
    try:
        send_session(settings, "indexed", "Find me fast.", SessionConfig())
        # The utterance's audio, all of it logged; then the index, caught up with it.
        audio = _wait(lambda: (a := read_session(bus, settings, "indexed", "speech.audio"))
                      and a[-1].value.is_last and a, "the utterance's last audio chunk")
        entry = _wait(lambda: (e := lookup(bus, settings, "indexed"))
                      and e.get("topics", {}).get("speech.audio", {}).get("last")
                      == audio[-1].message.offset and e, "the index entry")
        span = entry["topics"]["speech.audio"]
        assert span["first"] == audio[0].message.offset
        assert span["last"] == audio[-1].message.offset
        assert "tts" in entry["models"] and entry["state"] == "live"
        # Reading by seeking gives the same records as scanning the partition.
        sought = read_session(bus, settings, "indexed", "speech.audio", index=entry)
        assert [r.message.offset for r in sought] == [r.message.offset for r in audio]
        index.terminate()
        index.wait(30)
        index = _index(settings, tmp_path, 2)  # restored from its changelog
        send_session(settings, "indexed", "And again.", SessionConfig())
        control = entry["topics"]["session.control"]
        again = _wait(lambda: (e := lookup(bus, settings, "indexed")) and
                      e["topics"]["session.control"]["last"] > control["last"] and e,
                      "the entry after a restart")
        # The restored table went on from what it knew: the first offsets are the old ones.
        assert again["topics"]["session.control"]["first"] == control["first"]
        assert again["topics"]["speech.audio"]["first"] == span["first"]
    finally:
        index.terminate()
        index.wait(30)
        tts.terminate()
