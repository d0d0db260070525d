"""Crypto-shredding on the embedded bus: with AVATAR_SEAL=1 a session's records are stored
sealed with its own key; erasing the key leaves them in the log, verifiable, unreadable, and
says so in the audit trail."""
from __future__ import annotations

import sqlite3

import pytest

from backbone.demo import send_session
from backbone.records import SessionConfig
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import load_stage
from replay.erase import erase_session
from replay.export import ExportError, export_session
from replay.reader import read_session
from replay.verify import verify_session

SID = "forget-me"
SECRET_TEXT = "My account number is nine nine one."


@pytest.fixture
def sealed(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_SEAL", "1")
    monkeypatch.setenv("AVATAR_DATA_MASTER_KEY", "test master key for sealing")
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2,
                        live=False)
    provision_topics(settings, ["tts", "animate"])
    send_session(settings, SID, SECRET_TEXT, SessionConfig())
    for name in ("tts", "animate"):
        kw = {"model": "procedural"} if name == "animate" else {}
        StageRunner(load_stage(name, **kw), settings).run(idle_exit_s=0.3)
    return settings, tmp_path / "bus.sqlite"


def _stored(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT topic, value FROM records WHERE key=?", (SID.encode(),)).fetchall()
    con.close()
    return rows


def test_stage_outputs_and_state_are_stored_sealed_and_read_back(sealed):
    settings, db = sealed
    # Everything but the key itself and the audit chain heads (no content, kept readable).
    rows = [(t, v) for t, v in _stored(db) if not t.endswith(("keys", "audit"))]
    assert rows and all(v is None or v[:3] == b"\xa7S1" for t, v in rows), \
        {t for t, v in rows if v and v[:3] != b"\xa7S1"}
    assert not any(v and b"account number" in v for _, v in rows)  # no plaintext anywhere
    replies = read_session(settings.open_bus(), settings, SID, "reply")
    assert replies[0].value.text == SECRET_TEXT
    assert len(read_session(settings.open_bus(), settings, SID, "speech.audio")) > 5


def test_erasing_the_key_makes_the_session_unreadable_but_verifiable(sealed):
    settings, db = sealed
    bus = settings.open_bus()
    print(erase_session(bus, settings, SID, by="the data protection officer"))
    assert not [t for t, _ in _stored(db) if t.endswith("keys")]  # the key itself is gone
    with pytest.raises(Exception, match="erased"):
        read_session(settings.open_bus(), settings, SID, "reply")
    with pytest.raises(ExportError, match="erased"):
        export_session(settings.open_bus(), settings, SID, db.parent / "x")
    report = verify_session(bus, settings, SID)
    assert report.ok, report.text()  # links cover the stored (sealed) bytes
    audit = read_session(bus, settings, SID, "audit")  # chain heads and the erasure stay
    notes = [r.value.note for r in audit if r.value is not None and r.value.note]
    assert notes and "data protection officer" in notes[0]
