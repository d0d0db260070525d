"""A stage whose outputs a replay would not reproduce (an encoder, a clock) resumes after
what its crashed predecessor logged past the last checkpoint: nothing logged twice, nothing
skipped, numbering and chain links continuing (the runtime on the embedded bus)."""
from __future__ import annotations

import pytest

from backbone import integrity
from backbone.codec import AvroCodec
from backbone.integrity import read_links
from backbone.records import ReplyText, Transcript
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stage import BaseStage, Outbound
from backbone.tracing import RecordHeaders
from tests.support.bus_io import decode, read_all, send


class _Indexed(BaseStage):
    """Each input names a frame index; a frame is made once, in order (like render)."""

    name = "dialogue"
    inputs = ("transcript",)

    def __init__(self) -> None:
        self.resumed: list[dict] = []

    def process(self, record, state):
        index = int(record.value.text)
        if index < state.data.get("next", 0):
            return []  # made already
        state.data["next"] = index + 1
        return [Outbound("reply", ReplyText(record.session_id, str(index), "frame"))]

    def resume(self, state, logged):
        self.resumed.append(logged)
        state.data["next"] = int(logged["reply"].utterance_id) + 1


@pytest.fixture
def settings(tmp_path):
    s = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2,
                 checkpoint_interval_ms=10)
    provision_topics(s, ["dialogue"])
    return s


def test_a_successor_continues_after_what_a_crashed_instance_logged(settings):
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "0"), seq=0)
    StageRunner(_Indexed(), settings).run(idle_exit_s=0.2)  # checkpointed at the end
    # The next instance made frame 1 and logged it, then died before its checkpoint: its
    # input is still uncommitted and its state still says "next 1".
    links = read_links(read_all(bus, settings, "reply")[0])
    body = AvroCodec().encode(ReplyText("s1", "1", "frame"), settings.topic("reply"))
    link, link_headers = integrity.headers(integrity.Chains().key("s1"), links[0], "reply",
                                           "dialogue", 1, body)
    hdr = RecordHeaders("s1", 1, "", 0, "dialogue", "0", "reply_text").encode()
    p = bus.producer()
    p.produce(settings.topic("reply"), b"s1", body, hdr + link_headers)
    p.flush(5)
    send(bus, settings, "transcript", Transcript("s1", "1"), seq=1)
    send(bus, settings, "transcript", Transcript("s1", "2"), seq=2)
    stage = _Indexed()
    StageRunner(stage, settings).run(idle_exit_s=0.2)
    out = read_all(bus, settings, "reply")
    assert [decode(m, "reply_text").utterance_id for m in out] == ["0", "1", "2"]
    assert [RecordHeaders.decode(m).seq for m in out] == [0, 1, 2]
    assert read_links(out[2])[1] == link  # the chain goes on from the dead instance's record
    assert [v["reply"].utterance_id for v in stage.resumed] == ["1"]


def test_a_clean_handover_resumes_nothing(settings):
    bus = settings.open_bus()
    send(bus, settings, "transcript", Transcript("s1", "0"), seq=0)
    StageRunner(_Indexed(), settings).run(idle_exit_s=0.2)
    send(bus, settings, "transcript", Transcript("s1", "1"), seq=1)
    stage = _Indexed()
    StageRunner(stage, settings).run(idle_exit_s=0.2)
    assert stage.resumed == []
    assert [decode(m, "reply_text").utterance_id
            for m in read_all(bus, settings, "reply")] == ["0", "1"]
