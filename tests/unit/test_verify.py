"""`replay verify` on a real session log (embedded bus): an untouched log verifies, and each
kind of tampering done to the stored log is caught and names the record."""
from __future__ import annotations

import sqlite3

import pytest

from backbone import integrity
from backbone.demo import send_session
from backbone.records import SessionConfig
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import load_stage
from replay.verify import verify_session

SID = "audit-me"


@pytest.fixture
def logged(tmp_path):
    """A session as tts and animate wrote it (offline), plus its audit checkpoints."""
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2,
                        live=False)
    provision_topics(settings, ["tts", "animate"])
    send_session(settings, SID, "Check every link. Then check again.", SessionConfig(fps=25))
    for name in ("tts", "animate"):
        StageRunner(load_stage(name, **({"model": "procedural"} if name == "animate" else {})),
                    settings).run(idle_exit_s=0.3)
    return settings, tmp_path / "bus.sqlite"


def _rows(db, topic):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT part, off FROM records WHERE topic=? AND key=? ORDER BY off",
                       (topic, SID.encode())).fetchall()
    con.close()
    return rows


def _exec(db, sql, *args):
    con = sqlite3.connect(db)
    con.execute(sql, args)
    con.commit()
    con.close()


def test_an_untouched_session_verifies(logged):
    settings, _ = logged
    report = verify_session(settings.open_bus(), settings, SID)
    assert report.ok, report.text()
    assert report.records > 20 and report.chains >= 5 and report.checkpoints >= 2


def test_a_modified_record_is_named(logged):
    settings, db = logged
    part, off = _rows(db, "avatar.speech.audio")[3]
    _exec(db, "UPDATE records SET value = CAST(value || x'00' AS BLOB) WHERE topic=? AND part=? AND off=?",
          "avatar.speech.audio", part, off)
    report = verify_session(settings.open_bus(), settings, SID)
    assert [(f.kind, f.topic, f.offset) for f in report.tampering] == \
        [("modified", "speech.audio", off)]


def test_a_deleted_record_is_named_by_the_one_after_it(logged):
    settings, db = logged
    rows = _rows(db, "avatar.motion")
    part, off = rows[2]
    _exec(db, "DELETE FROM records WHERE topic=? AND part=? AND off=?", "avatar.motion", part, off)
    report = verify_session(settings.open_bus(), settings, SID)
    assert [(f.kind, f.offset) for f in report.tampering] == [("deleted", rows[3][1])]


def test_a_truncated_chain_is_caught_by_the_checkpoint(logged):
    settings, db = logged
    rows = _rows(db, "avatar.motion")
    part, off = rows[-1]
    _exec(db, "DELETE FROM records WHERE topic=? AND part=? AND off=?", "avatar.motion", part, off)
    report = verify_session(settings.open_bus(), settings, SID)
    assert [f.kind for f in report.tampering] == ["deleted"]
    assert report.tampering[0].topic == "motion" and "checkpoint" in report.tampering[0].detail


def test_reordered_records_are_named(logged):
    settings, db = logged
    rows = _rows(db, "avatar.speech.audio")
    (p, a), (_, b) = rows[1], rows[2]
    # Swap two records' positions in the log.
    _exec(db, "UPDATE records SET off = -1 WHERE topic=? AND part=? AND off=?",
          "avatar.speech.audio", p, a)
    _exec(db, "UPDATE records SET off = ? WHERE topic=? AND part=? AND off=?",
          a, "avatar.speech.audio", p, b)
    _exec(db, "UPDATE records SET off = ? WHERE topic=? AND part=? AND off=-1",
          b, "avatar.speech.audio", p)
    report = verify_session(settings.open_bus(), settings, SID)
    assert [f.kind for f in report.tampering] == ["reordered"]
    assert report.tampering[0].offset == a


def test_injected_records_are_named(logged):
    settings, db = logged
    bus = settings.open_bus()
    topic = settings.topic("reply")
    p = bus.producer()
    # A forged link (no key) and a record with no link at all.
    p.produce(topic, SID.encode(), b"\xc3\x01forged", (("stage", b"gateway"), ("seq", b"99"),
              (integrity.H_LINK, b"ab" * 16), (integrity.H_LINK_PREV, b"00" * 16)))
    p.produce(topic, SID.encode(), b"\xc3\x01plain", (("stage", b"gateway"), ("seq", b"100")))
    p.flush()
    report = verify_session(bus, settings, SID)
    assert sorted(f.kind for f in report.tampering) == ["injected", "unchained"]
    assert all(f.topic == "reply" for f in report.tampering)


def test_the_wrong_key_fails_everything(logged):
    settings, _ = logged
    report = verify_session(settings.open_bus(), settings, SID, key=b"\x00" * 32)
    assert not report.ok and report.records == len(report.tampering)
