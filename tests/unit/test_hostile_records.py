"""Hostile records into every stage through the real runtime on the embedded bus: broken
bytes, wrong schemas, lying lengths, missing keys and impossible values each become a dead
letter with a reason, and the stage goes on serving a good session."""
from __future__ import annotations

import dataclasses

import pytest

from backbone.codec import AvroCodec
from backbone.records import DeadLetter, ReplyText, SessionConfig, SessionControl
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE, load_stage
from backbone.topics import TOPICS
from tests.support import hostile_records as H
from tests.support.bus_io import read_all, send

CODEC = AvroCodec()


@pytest.fixture
def settings(tmp_path):
    s = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2,
                 checkpoint_interval_ms=10, live=False, max_record_bytes=H.MAX_RECORD_BYTES)
    provision_topics(s, PIPELINE)
    return s


def _dead_letters(bus, settings) -> list[DeadLetter]:
    return [CODEC.decode(m.value, "dead_letter") for m in read_all(bus, settings, "deadletter")]


def _produce_raw(bus, settings, case: H.Hostile) -> tuple[int, int]:
    """Produce one hostile case; returns its partition and offset."""
    p = bus.producer()
    got: list[tuple[int, int]] = []
    p.produce(settings.topic(case.topic), case.key, case.value, case.headers,
              lambda err, m: got.append((m.partition, m.offset) if m is not None else (-1, -1)))
    assert p.flush(10) == 0
    return got[0]


def _run(stage_name: str, settings: Settings) -> StageRunner:
    runner = StageRunner(load_stage(stage_name), settings)
    runner.run(idle_exit_s=0.5)
    return runner


@pytest.mark.parametrize("stage_name", PIPELINE)
def test_broken_bytes_on_every_input_become_dead_letters_with_a_reason(stage_name, settings):
    bus = settings.open_bus()
    send(bus, settings, "session.control", H.sample("session.control"), seq=0)
    expected = {}
    for topic in load_stage(stage_name).inputs:
        for case in H.byte_cases(topic):
            expected[(settings.topic(topic), *_produce_raw(bus, settings, case))] = case
    _run(stage_name, settings)
    got = {(d.topic, d.partition, d.offset): d for d in _dead_letters(bus, settings)}
    for where, case in expected.items():
        d = got.get(where)
        assert d is not None, f"{case.name} on {case.topic} was not dead-lettered"
        assert d.stage == stage_name and d.reason, (case.name, d)
        assert d.category in case.categories, (case.name, d.category, d.reason)
        if case.value is not None and len(case.value) <= settings.max_record_bytes:
            assert d.value == case.value  # the original bytes, for whoever investigates


def _value_cases_for(stage_name: str):
    ins = load_stage(stage_name).inputs
    return [c for c in H.value_cases() if c[1] in ins]


@pytest.mark.parametrize("stage_name", PIPELINE)
def test_impossible_values_become_dead_letters_and_a_good_session_is_not_refused(
        stage_name, settings):
    bus = settings.open_bus()
    cases = _value_cases_for(stage_name)
    offsets = {}
    for i, (name, topic, value) in enumerate(cases):
        sid = f"bad-{name}"
        value = dataclasses.replace(value, session_id=sid)
        if topic != "session.control":
            send(bus, settings, "session.control", H.sample("session.control", sid), seq=0)
        before = len(read_all(bus, settings, topic))
        send(bus, settings, topic, value, seq=1)
        offsets[name] = (topic, sid)
        assert len(read_all(bus, settings, topic)) == before + 1
    good = "good-1"
    send(bus, settings, "session.control", H.sample("session.control", good), seq=0)
    for topic in load_stage(stage_name).inputs:
        if topic != "session.control":
            send(bus, settings, topic, H.sample(topic, good), seq=1)
    runner = _run(stage_name, settings)
    dead = _dead_letters(bus, settings)
    silent = [name for name, (topic, sid) in offsets.items()
              if not [d for d in dead if d.session_id == sid and d.reason
                      and d.topic == settings.topic(topic)]]
    assert not silent, f"{stage_name} took these silently: {silent}"
    assert not [d for d in dead if d.session_id == good], "the good session was refused"
    assert runner.processed > 0
