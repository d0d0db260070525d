"""The stage runtime on a real Kafka broker, with stages as separate processes: order per
session, fail-over after SIGKILL, dead letters, and a broker restart mid-session."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from backbone import broker
from backbone.kafka_bus import KafkaBus
from backbone.records import Transcript
from backbone.runtime import provision_topics
from backbone.settings import Settings
from tests.integration.stage_procs import StageProcess, collect, dedupe
from tests.support.bus_io import CODEC, send

pytestmark = pytest.mark.kafka


@pytest.fixture
def settings(kafka_bootstrap: str, unique_name: str) -> Settings:
    s = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                 partitions=4, checkpoint_interval_ms=50)
    provision_topics(s, ["dialogue"])
    return s


def texts_by_session(messages) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for m in messages:
        out[m.key.decode()].append(CODEC.decode(m.value, "reply_text").text)
    return out


def produce_transcripts(settings: Settings, sessions: int, per_session: int,
                        pause_s: float = 0.0, start: int = 0) -> dict[str, list[str]]:
    bus = KafkaBus(settings.bootstrap)
    expected: dict[str, list[str]] = defaultdict(list)
    for j in range(start, start + per_session):
        for i in range(sessions):
            sid = f"session-{i}"
            text = f"{sid} line {j}"
            send(bus, settings, "transcript", Transcript(sid, text), seq=j)
            expected[sid].append(text)
        if pause_s:
            time.sleep(pause_s)
    return expected


def wait_for_members(settings: Settings, n: int, timeout_s: float = 30) -> list[int]:
    """Partitions owned by each member of the stage's group, once n members hold some."""
    admin = KafkaBus(settings.bootstrap).admin().client
    group = settings.group("dialogue")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
        except Exception:  # the coordinator of a fresh broker may still be loading
            time.sleep(0.5)
            continue
        counts = [len(m.assignment.topic_partitions) for m in desc.members]
        if len(counts) == n and all(counts) and str(desc.state).endswith("STABLE"):
            return counts
        time.sleep(0.2)
    raise AssertionError(f"group {group} never had {n} active members")


def test_two_instances_keep_per_session_order(settings, tmp_path):
    procs = [StageProcess("dialogue", settings, tmp_path, f"i{k}") for k in range(2)]
    try:
        wait_for_members(settings, 2)
        expected = produce_transcripts(settings, sessions=12, per_session=25)
        out = collect(settings, "reply", expect=12 * 25)
        assert texts_by_session(dedupe(out)) == expected
    finally:
        for p in procs:
            p.terminate()


def test_sigkilled_instance_is_replaced_and_nothing_is_lost_or_doubled(settings, tmp_path):
    procs = [StageProcess("dialogue", settings, tmp_path, f"i{k}") for k in range(2)]
    try:
        wait_for_members(settings, 2)
        sender = threading.Thread(target=lambda: expected.update(
            produce_transcripts(settings, sessions=8, per_session=60, pause_s=0.05)))
        expected: dict[str, list[str]] = {}
        sender.start()
        time.sleep(1.0)
        procs[0].kill()  # mid-session, without any chance to commit
        sender.join()
        out = collect(settings, "reply", expect=8 * 60, timeout_s=90)
        kept = list(dedupe(out))
        assert texts_by_session(kept) == expected  # every record once, in order
        assert len(kept) == 8 * 60
        # The utterance counter lives in per-session state: it moved with the partitions.
        ids = defaultdict(list)
        for m in kept:
            ids[m.key].append(CODEC.decode(m.value, "reply_text").utterance_id)
        assert all(v == [f"u{i}" for i in range(60)] for v in ids.values())
    finally:
        for p in procs:
            p.terminate()


def test_malformed_record_is_dead_lettered_and_session_continues(settings, tmp_path):
    proc = StageProcess("dialogue", settings, tmp_path, "i0")
    try:
        bus = KafkaBus(settings.bootstrap)
        send(bus, settings, "transcript", Transcript("s1", "first"), seq=0)
        p = bus.producer()
        p.produce(settings.topic("transcript"), b"s1", b"not avro at all", ())
        p.flush(10)
        send(bus, settings, "transcript", Transcript("s1", "second"), seq=1)
        replies = collect(settings, "reply", expect=2)
        assert texts_by_session(replies) == {"s1": ["first", "second"]}
        dead = collect(settings, "deadletter", expect=1)
        letter = CODEC.decode(dead[0].value, "dead_letter")
        assert letter.value == b"not avro at all"
        assert letter.category == "undecodable" and letter.reason
        assert letter.topic == settings.topic("transcript")
    finally:
        proc.terminate()


def test_broker_restart_mid_session_loses_nothing_acknowledged(settings, broker_settings,
                                                               tmp_path):
    if broker_settings is None:
        pytest.fail("this test restarts the broker: run it without an external KAFKA_BOOTSTRAP")
    proc = StageProcess("dialogue", settings, tmp_path, "i0")
    try:
        first = produce_transcripts(settings, sessions=3, per_session=10)
        collect(settings, "reply", expect=30)
        broker.stop(broker_settings)
        broker.start(broker_settings)
        second = produce_transcripts(settings, sessions=3, per_session=10, start=10)
        out = collect(settings, "reply", expect=60, timeout_s=120)
        expected = {k: first[k] + second[k] for k in first}
        assert texts_by_session(dedupe(out)) == expected
        assert proc.proc.poll() is None, "the stage survived the broker restart"
    finally:
        proc.terminate()


def test_exactly_once_mode_delivers_no_duplicate_even_after_sigkill(settings, tmp_path):
    eos = {"AVATAR_EXACTLY_ONCE": "1"}
    procs = [StageProcess("dialogue", settings, tmp_path, f"i{k}", eos) for k in range(2)]
    try:
        wait_for_members(settings, 2)
        expected: dict[str, list[str]] = {}
        sender = threading.Thread(target=lambda: expected.update(
            produce_transcripts(settings, sessions=6, per_session=40, pause_s=0.05)))
        sender.start()
        time.sleep(1.0)
        procs[0].kill()
        sender.join()
        out = collect(settings, "reply", expect=6 * 40, timeout_s=120)
        # read_committed, no dedupe: transactions alone keep each reply exactly once.
        assert texts_by_session(out) == expected
        assert len(out) == 6 * 40
    finally:
        for p in procs:
            p.terminate()


def test_sigterm_commits_what_was_processed_and_exits_cleanly(settings, tmp_path):
    proc = StageProcess("dialogue", settings, tmp_path, "i0")
    expected = produce_transcripts(settings, sessions=4, per_session=10)
    collect(settings, "reply", expect=40)
    assert proc.terminate() == 0
    # A successor starts exactly where the first one stopped: it re-emits nothing.
    successor = StageProcess("dialogue", settings, tmp_path, "i1")
    try:
        more = produce_transcripts(settings, sessions=4, per_session=1, start=10)
        out = collect(settings, "reply", expect=44)
        assert len(out) == 44  # raw count, before any dedupe
        assert texts_by_session(out) == {k: expected[k] + more[k] for k in expected}
    finally:
        successor.terminate()
