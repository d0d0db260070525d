"""`replay export` of a session rendered through tts, animate and render on the embedded
bus: the MP4 holds the streamed access units byte for byte, and captions, manifest and report
describe the session."""
from __future__ import annotations

import hashlib
import json
import subprocess

import av
import pytest

from backbone.demo import send_session
from backbone.records import SessionConfig
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import load_stage
from processors.encode import split_annexb
from replay.export import ExportError, export_session
from replay.reader import read_session, session_video

SID = "export-me"
TEXT = "Everything I say is on the record."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    settings = Settings(bus="embedded", embedded_path=str(tmp / "bus.sqlite"), partitions=2,
                        live=False)
    provision_topics(settings, ["tts", "animate", "render"])
    send_session(settings, SID, TEXT, SessionConfig(fps=25, resolution=256,
                                                    consent={"recording": "granted"}))
    for name in ("tts", "animate", "render"):
        kw = {"model": "procedural"} if name == "animate" else {}
        StageRunner(load_stage(name, **kw), settings).run(idle_exit_s=0.3)
    bus = settings.open_bus()
    done = export_session(bus, settings, SID, tmp / "out")
    return settings, bus, done


def test_the_mp4_holds_the_streamed_access_units_byte_for_byte(exported):
    settings, bus, done = exported
    logged = session_video(read_session(bus, settings, SID, "video"))
    with av.open(str(done.directory / "session.mp4")) as mp4:
        stream = mp4.streams.video[0]
        units = []
        for packet in mp4.demux(stream):
            data = bytes(packet)
            if not data:
                continue
            nals, i = [], 0
            while i < len(data):  # MP4 stores each NAL unit behind a 4-byte length
                n = int.from_bytes(data[i:i + 4], "big")
                nals.append(data[i + 4:i + 4 + n])
                i += 4 + n
            units.append(nals)
    assert len(units) == len(logged) == done.frames > 25
    assert all(u == split_annexb(v.data) for u, v in zip(units, logged))
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json",
         str(done.directory / "session.mp4")], capture_output=True, text=True, check=True).stdout)
    assert sorted(s["codec_name"] for s in probe["streams"]) == ["aac", "h264"]


def test_captions_manifest_and_report_describe_the_session(exported):
    _, _, done = exported
    vtt = (done.directory / "captions.vtt").read_text()
    assert vtt.startswith("WEBVTT") and f"<v Avatar>{TEXT}" in vtt and " --> " in vtt
    manifest = json.loads((done.directory / "manifest.json").read_text())
    assert manifest["integrity"]["intact"] and done.verified
    assert manifest["consent"] == {"recording": "granted"}
    assert {"tts", "animate", "render"} <= set(manifest["model_versions"])
    assert manifest["video"]["frames"] == done.frames and not manifest["video"]["reencoded"]
    html = (done.directory / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 and "intact" in html
    sums = dict(line.split("  ")[::-1] for line in
                (done.directory / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.sha256((done.directory / name).read_bytes()).hexdigest() == digest


def test_an_unknown_session_is_a_clear_error(exported, tmp_path):
    settings, bus, _ = exported
    with pytest.raises(ExportError, match="unknown or expired"):
        export_session(bus, settings, "never-was", tmp_path / "x")
