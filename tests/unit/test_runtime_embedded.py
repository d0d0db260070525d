"""The stage runtime on the embedded bus: outputs with headers, dead letters, dedupe, and
state that survives a restart."""
from dataclasses import replace

import pytest

from backbone.records import ReplyText, SessionConfig, SessionControl, Transcript
from backbone.stage import BaseStage, Outbound
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.tracing import H_EVENT_TIME, H_SEQ, H_STAGE, H_TRACEPARENT, trace_id
from processors.dialogue import DialogueStage
from tests.support.bus_io import decode, read_all, send


@pytest.fixture
def settings(tmp_path):
    s = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=3,
                 checkpoint_interval_ms=10)
    provision_topics(s, ["dialogue"])
    return s


def run(settings, **kw):
    r = StageRunner(DialogueStage(), settings)
    r.run(idle_exit_s=0.2, **kw)
    return r


def test_each_transcript_becomes_a_reply_with_headers(settings):
    bus = settings.open_bus()
    for i, text in enumerate(["hello", "how are you"]):
        send(bus, settings, "transcript", Transcript("s1", text), seq=i, event_time_ms=1234)
    run(settings)
    out = read_all(bus, settings, "reply")
    assert [decode(m, "reply_text").text for m in out] == ["hello", "how are you"]
    assert [m.header(H_SEQ) for m in out] == [b"0", b"1"]
    assert all(m.header(H_STAGE) == b"dialogue" and m.header(H_EVENT_TIME) == b"1234"
               for m in out)
    assert all(trace_id(m.header(H_TRACEPARENT).decode()) for m in out)


def test_garbage_goes_to_dead_letters_and_the_session_goes_on(settings):
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "before"), seq=0)
    bus.producer().produce(settings.topic("transcript"), b"s1", b"garbage", ())
    send(bus, settings, "transcript", Transcript("s1", "after"), seq=1)
    run(settings)
    assert [decode(m, "reply_text").text for m in read_all(bus, settings, "reply")] == \
        ["before", "after"]
    dead = [decode(m, "dead_letter") for m in read_all(bus, settings, "deadletter")]
    assert len(dead) == 1 and dead[0].value == b"garbage"
    assert dead[0].category == "undecodable" and dead[0].stage == "dialogue"


def test_a_replayed_seq_is_dropped(settings):
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "once"), seq=0)
    send(bus, settings, "transcript", Transcript("s1", "once"), seq=0)  # a producer retry
    run(settings)
    assert len(read_all(bus, settings, "reply")) == 1


def test_state_and_offsets_survive_a_restart(settings):
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "one"), seq=0)
    run(settings)
    send(bus, settings, "transcript", Transcript("s1", "two"), seq=1)
    run(settings)  # a new process: restores state, resumes after the committed offset
    out = [decode(m, "reply_text") for m in read_all(bus, settings, "reply")]
    assert [r.text for r in out] == ["one", "two"]
    assert [r.utterance_id for r in out] == ["u0", "u1"]  # the counter came back from state


def test_oversized_record_is_dead_lettered(settings):
    small = Settings(**{**settings.__dict__, "max_record_bytes": 100})
    bus = small.open_bus()
    send(bus, small, "transcript", Transcript("s1", "x" * 500), seq=0)
    run(small)
    dead = [decode(m, "dead_letter") for m in read_all(bus, small, "deadletter")]
    assert [d.category for d in dead] == ["oversized"]


def test_records_after_session_end_are_dead_lettered(settings):
    from backbone.records import SessionControl
    bus = settings.open_bus()
    send(bus, settings, "session.control", SessionControl("s1", "END"), seq=0)
    send(bus, settings, "transcript", Transcript("s1", "too late"), seq=0)
    run(settings)
    assert read_all(bus, settings, "reply") == []
    dead = [decode(m, "dead_letter") for m in read_all(bus, settings, "deadletter")]
    assert [d.category for d in dead] == ["unknown_session"]


def test_a_record_of_the_wrong_type_is_a_schema_mismatch(settings):
    from backbone.records import ReplyText
    from tests.support.bus_io import CODEC
    bus = settings.open_bus()
    wrong = CODEC.encode(ReplyText("s1", "u", "I am a reply, not a transcript"))
    bus.producer().produce(settings.topic("transcript"), b"s1", wrong, ())
    send(bus, settings, "transcript", Transcript("s1", "fine"), seq=0)
    run(settings)
    assert [decode(m, "reply_text").text for m in read_all(bus, settings, "reply")] == ["fine"]
    dead = [decode(m, "dead_letter") for m in read_all(bus, settings, "deadletter")]
    assert [d.category for d in dead] == ["schema_mismatch"]


class _Streaming(BaseStage):
    """Yields a reply, then looks at the bus before yielding the next one."""

    def __init__(self, settings):
        self.name, self.inputs = "dialogue", ("transcript",)
        self.settings = settings
        self.seen_before_second: list[int] = []

    def process(self, record, state):
        if not isinstance(record.value, Transcript):
            return
        yield Outbound("reply", ReplyText(record.session_id, "u0", "first", 0, False))
        bus = self.settings.open_bus()
        self.seen_before_second.append(len(read_all(bus, self.settings, "reply")))
        yield Outbound("reply", ReplyText(record.session_id, "u0", "second", 1, True))


def test_a_generator_stage_hands_on_each_output_as_it_is_yielded(settings):
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "hi"), seq=0)
    stage = _Streaming(settings)
    StageRunner(stage, settings).run(idle_exit_s=0.2)
    assert stage.seen_before_second == [1]
    assert [decode(m, "reply_text").text for m in read_all(bus, settings, "reply")] == \
        ["first", "second"]


class _Ticking(BaseStage):
    name = "dialogue"
    inputs = ("session.control", "transcript")
    live = False

    def __init__(self):
        self.ticks: list[tuple[str, int]] = []

    def process(self, record, state):
        return []

    def tick(self, state, now):
        self.ticks.append((state.session_id, now))
        if len(self.ticks) == 1:
            return [Outbound("reply", ReplyText(state.session_id, "idle", "tick", 0, True))]
        return []


@pytest.mark.parametrize("live", [True, False])
def test_a_clocked_stage_ticks_only_when_live(settings, live):
    settings = replace(settings, live=live, tick_ms=10)
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "hi"), seq=0)
    stage = _Ticking()
    StageRunner(stage, settings).run(idle_exit_s=0.3)
    assert stage.live is live
    if live:
        assert len(stage.ticks) >= 5 and {s for s, _ in stage.ticks} == {"s1"}
        assert [decode(m, "reply_text").text for m in read_all(bus, settings, "reply")] == ["tick"]
    else:
        assert stage.ticks == [] and read_all(bus, settings, "reply") == []


class _ConfigSeen(BaseStage):
    name = "dialogue"
    inputs = ("session.control", "transcript")

    def __init__(self):
        self.seen: list[int] = []
        self.controls = 0

    def process(self, record, state):
        from backbone.stage import remember_control, session_config
        if isinstance(record.value, SessionControl):
            self.controls += 1
            remember_control(record.value, state)
        else:
            self.seen.append(session_config(state).fps)
        return []


def test_a_create_fetched_after_its_sessions_data_is_applied_first(settings):
    bus = settings.open_bus()
    # The data is on the log before the CREATE is read: the consumer meets it first.
    send(bus, settings, "transcript", Transcript("s1", "hi"), seq=0)
    send(bus, settings, "session.control",
         SessionControl("s1", "CREATE", SessionConfig(fps=50)), seq=0)
    send(bus, settings, "transcript", Transcript("s1", "again"), seq=1)
    stage = _ConfigSeen()
    StageRunner(stage, settings).run(idle_exit_s=0.2)
    assert stage.seen == [50, 50]
    assert stage.controls == 1  # read ahead once, skipped when the consumer got to it
