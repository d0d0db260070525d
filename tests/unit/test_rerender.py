"""`avatar replay rerender` on the embedded bus: a session made by tts, animate and render
re-renders bit for bit; a changed log or a changed render setting is named frame by frame;
what cannot be re-rendered is a clear error (exit 2)."""
from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from backbone import integrity
from backbone.blendshapes import INDEX
from backbone.cli import main
from backbone.codec import AvroCodec
from backbone.demo import send_session
from backbone.records import ReplyText, SessionConfig, SessionControl
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import load_stage
from backbone.tracing import RecordHeaders, new_traceparent, now_ms
from replay.erase import erase_session
from replay.reader import read_session
from replay.rerender import RerenderError, rerender_session

SID = "rerender-me"
TEXT = "Every frame of this can be made again."


def _make_session(settings: Settings, sid: str = SID) -> None:
    provision_topics(settings, ["tts", "animate", "render"])
    send_session(settings, sid, TEXT, SessionConfig(fps=25, resolution=256, seed=7))
    for name in ("tts", "animate", "render"):
        kw = {"model": "procedural"} if name == "animate" else {}
        StageRunner(load_stage(name, **kw), settings).run(idle_exit_s=0.3)


@pytest.fixture(scope="module")
def session_db(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerender")
    settings = Settings(bus="embedded", embedded_path=str(tmp / "bus.sqlite"), partitions=2,
                        live=False)
    _make_session(settings)
    con = sqlite3.connect(tmp / "bus.sqlite")  # fold the WAL in, so a file copy is whole
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return tmp / "bus.sqlite"


@pytest.fixture
def copy(session_db, tmp_path, monkeypatch):
    """A private copy of the session's log, and the env that points the CLI at it."""
    db = tmp_path / "bus.sqlite"
    shutil.copy(session_db, db)
    monkeypatch.setenv("AVATAR_BUS", "embedded")
    monkeypatch.setenv("AVATAR_EMBEDDED_PATH", str(db))
    monkeypatch.delenv("AVATAR_TOPIC_PREFIX", raising=False)
    return db, Settings.from_env()


def test_a_demo_session_re_renders_bit_exact(copy, tmp_path, capsys):
    out = tmp_path / "rerender.json"
    assert main(["replay", "rerender", SID, "--json", str(out)]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["identical"] and result["mode"] == "offline" and not result["differences"]
    assert result["motion"]["frames"] == result["motion"]["identical"] > 25
    assert result["video"]["frames"] == result["video"]["identical"] > 25


def test_a_tampered_motion_record_is_named_by_frame(copy, tmp_path, capsys):
    db, settings = copy
    codec = AvroCodec()
    topic = settings.topic("motion")
    con = sqlite3.connect(db)
    rows = con.execute("SELECT part, off, value FROM records WHERE topic=? AND key=? ORDER BY off",
                       (topic, SID.encode())).fetchall()
    part, off, raw = rows[len(rows) // 2]
    motion = codec.decode(raw, "motion_frames")
    weights = np.array(motion.weights, np.float32)
    jaw = INDEX["jawOpen"]
    weights[:, jaw] = np.where(weights[:, jaw] > 0.5, weights[:, jaw] - 0.25,
                               weights[:, jaw] + 0.25)
    forged = replace(motion, weights=weights)
    con.execute("UPDATE records SET value=? WHERE topic=? AND part=? AND off=?",
                (codec.encode(forged, topic), topic, part, off))
    con.commit()
    con.close()
    out = tmp_path / "rerender.json"
    assert main(["replay", "rerender", SID, "--json", str(out)]) == 1
    text = capsys.readouterr().out
    frames = [int(f) for f in motion.frames]
    assert f"motion frame {frames[0]:6d}" in text
    diffs = json.loads(out.read_text())["differences"]
    assert sorted(d["frame"] for d in diffs if d["topic"] == "motion") == frames
    assert all(d["blendshapes"] == ["jawOpen"] for d in diffs if d["topic"] == "motion")
    # The video was rendered from the original motion: it differs from a render of the
    # forged record from that frame on (later frames are predicted from it).
    video = sorted(d["frame"] for d in diffs if d["topic"] == "video")
    assert video and video[0] == frames[0]
    assert all(d["max_pixel_diff"] > 0 for d in diffs if d["topic"] == "video")


def test_a_changed_encoder_setting_is_named_by_frame(copy, monkeypatch):
    _, settings = copy
    monkeypatch.setattr("processors.encode.X264_CRF", 35)  # coarser than what was streamed
    report = rerender_session(settings.open_bus(), settings, SID)
    assert not report.identical
    assert report.motion_identical == report.motion_frames  # animate is not affected
    video = [d for d in report.differences if d.topic == "video"]
    assert len(video) == report.video_frames - report.video_identical > 0
    assert video[0].frame == 0 and video[0].media_s == 0.0
    assert all(d.detail["max_pixel_diff"] > 0 for d in video)


def test_an_unknown_session_exits_2_naming_it(copy, tmp_path, capsys):
    out = tmp_path / "rerender.json"
    assert main(["replay", "rerender", "nobody-here", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nobody-here" in err and "unknown session" in err and "Traceback" not in err
    assert "unknown session" in json.loads(out.read_text())["error"]


def test_a_session_without_video_exits_2_naming_the_topic(copy):
    db, settings = copy
    con = sqlite3.connect(db)
    con.execute("DELETE FROM records WHERE topic=?", (settings.topic("video"),))
    con.commit()
    con.close()
    with pytest.raises(RerenderError, match="no records on video"):
        rerender_session(settings.open_bus(), settings, SID)


def test_a_sealed_session_re_renders_and_an_erased_one_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AVATAR_SEAL", "1")
    monkeypatch.setenv("AVATAR_DATA_MASTER_KEY", "test master key for sealing")
    monkeypatch.setenv("AVATAR_BUS", "embedded")
    monkeypatch.setenv("AVATAR_EMBEDDED_PATH", str(tmp_path / "bus.sqlite"))
    settings = Settings.from_env(live=False)
    _make_session(settings, "sealed-one")
    assert main(["replay", "rerender", "sealed-one"]) == 0
    erase_session(settings.open_bus(), settings, "sealed-one", by="test")
    capsys.readouterr()
    assert main(["replay", "rerender", "sealed-one"]) == 2
    assert "erased" in capsys.readouterr().err


@contextmanager
def _live_stages(settings: Settings) -> Iterator[threading.Event]:
    """tts, animate (procedural) and render running live in threads until the block ends."""
    provision_topics(settings, ["tts", "animate", "render"])
    stop = threading.Event()
    runners = [StageRunner(load_stage(n, **({"model": "procedural"} if n == "animate" else {})),
                           settings) for n in ("tts", "animate", "render")]
    for r in runners:
        # Loaded one after another here: CPython 3.11 can fail compiling in several threads
        # at once ("AST constructor recursion depth mismatch"), e.g. two np.load headers.
        r.start()
    threads = [threading.Thread(target=r.run, args=(stop,)) for r in runners]
    for t in threads:
        t.start()
    try:
        yield stop
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def _await(stop: threading.Event, what: str, ready: Callable[[], bool]) -> None:
    """Poll the log (bounded: 120 s, the machine is shared) until `ready()`."""
    for _ in range(2400):
        if ready():
            return
        stop.wait(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_a_live_session_re_renders_with_its_idle_ticks_replayed(tmp_path):
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"),
                        partitions=2, live=True)
    with _live_stages(settings) as stop:
        send_session(settings, "live-one", "Live words, then a pause.",
                     SessionConfig(fps=25, resolution=256))

        def spoken_then_a_second_of_idle() -> bool:
            video = [r.value for r in read_session(settings.open_bus(), settings, "live-one",
                                                   "video")]
            ends = [v.pts for v in video if v.is_last]
            return bool(ends) and video[-1].pts >= ends[0] + 25

        _await(stop, "the speech and a second of idle face", spoken_then_a_second_of_idle)
    motion = read_session(settings.open_bus(), settings, "live-one", "motion")
    assert any(r.value.utterance_id == "idle" for r in motion)  # the clock made frames
    report = rerender_session(settings.open_bus(), settings, "live-one")
    assert report.mode == "live"
    assert report.identical, report.text()
    assert report.motion_identical == report.motion_frames > 50



class _Gateway:
    """Writes control records as the gateway does: one chain and one seq run per topic."""

    def __init__(self, settings: Settings, sid: str) -> None:
        self.settings, self.sid = settings, sid
        self.producer = settings.open_bus().producer()
        self.chains = integrity.Chains()
        self.seqs: dict[str, int] = {}

    def send(self, topic: str, value: Any) -> None:
        seq = self.seqs[topic] = self.seqs.get(topic, -1) + 1
        payload = AvroCodec().encode(value, self.settings.topic(topic))
        headers = RecordHeaders(self.sid, seq, new_traceparent(), now_ms(), "gateway", "test",
                                value.SCHEMA).encode()
        headers += self.chains.next(self.sid, topic, "gateway", seq, payload)
        self.producer.produce(self.settings.topic(topic), self.sid.encode(), payload, headers)
        assert self.producer.flush(10) == 0


def test_a_live_session_with_an_emotion_change_and_an_interrupt_re_renders(tmp_path):
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"),
                        partitions=2, live=True)
    sid = "live-two"
    bus = settings.open_bus()

    def logged(topic: str) -> list:
        return [r.value for r in read_session(bus, settings, sid, topic)]

    gateway = _Gateway(settings, sid)
    with _live_stages(settings) as stop:
        gateway.send("session.control", SessionControl(sid, "CREATE", SessionConfig(
            fps=25, resolution=256)))
        gateway.send("reply", ReplyText(sid, "u0", "This long sentence is cut off before it "
                                        "ends, because somebody interrupts the avatar in the "
                                        "middle of it.", 0, True))
        _await(stop, "speech motion", lambda: any(m.utterance_id == "u0"
                                                  for m in logged("motion")))
        gateway.send("session.control", SessionControl(sid, "EMOTION", None, "happy", 0.8))
        spoken = len(logged("motion"))
        _await(stop, "motion after the emotion change", lambda: len(logged("motion")) > spoken + 5)
        gateway.send("session.control", SessionControl(sid, "INTERRUPT"))
        _await(stop, "the cut", lambda: any(p.cut_sample >= 0 for p in logged("speech.phonemes")))
        cut_at = max(m.frames[-1] for m in logged("motion"))
        _await(stop, "idle frames after the cut",
               lambda: any(v.pts >= cut_at + 25 for v in logged("video")))
    report = rerender_session(bus, settings, sid)
    assert report.mode == "live"
    assert report.identical, report.text()
    assert report.motion_identical == report.motion_frames > cut_at
    assert any(c.value.action == "EMOTION"
               for c in read_session(bus, settings, sid, "session.control"))
