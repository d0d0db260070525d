"""RTMP push to a real nginx-rtmp server on loopback: the broadcast holds the logged H.264
(not re-encoded) and the speech as AAC, checked with ffprobe."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port

from tests.support.media import feed_session
from tests.unit.test_whep import KEY, _session, served  # noqa: F401  (the gateway fixture)

NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


@pytest.fixture
def nginx_rtmp(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists() and NGINX_MODULE.exists(), \
        "nginx with the RTMP module is required (Debian: nginx-light libnginx-mod-rtmp)"
    port = free_port()
    rec = tmp_path / "rec"
    rec.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
load_module {NGINX_MODULE};
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
  server {{
    listen 127.0.0.1:{port};
    application live {{ live on; record all; record_path {rec}; record_unique off; }}
  }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    try:
        yield f"rtmp://127.0.0.1:{port}/live/avatar", rec / "avatar.flv"
    finally:
        proc.terminate()
        proc.wait(10)


def _probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_packets",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_rtmp_push_broadcasts_the_logged_video_and_the_speech(served, nginx_rtmp):
    base, gw, settings = served
    url, recording = nginx_rtmp
    tok, info = _session(base)
    sid = info["session_id"]
    hdr = {"Authorization": f"Bearer {tok}"}
    r = httpx.post(f"{base}/v1/sessions/{sid}/rtmp", json={"url": url}, headers=hdr)
    assert r.status_code == 201, r.text
    push_id = r.json()["push_id"]
    time.sleep(0.3)
    sent = feed_session(gw.bus, settings, sid, seconds=3.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/v1/sessions/{sid}/rtmp/{push_id}", headers=hdr).json()
        if status["frames_sent"] >= len(sent) - 1:
            break
        time.sleep(0.2)
    stop = httpx.delete(f"{base}/v1/sessions/{sid}/rtmp/{push_id}", headers=hdr).json()
    assert stop["error"] is None and stop["frames_sent"] >= len(sent) - 1, stop
    time.sleep(0.5)  # nginx closes the recording
    probe = _probe(recording)
    kinds = {s["codec_type"]: s for s in probe["streams"]}
    assert kinds["video"]["codec_name"] == "h264" and kinds["video"]["width"] == 256
    assert kinds["audio"]["codec_name"] == "aac"
    video_packets = [p for p in probe["packets"] if p["codec_type"] == "video"]
    assert len(video_packets) == stop["frames_sent"]
    # Not re-encoded: FLV stores each access unit with 4-byte length prefixes instead of
    # start codes, so sizes match ours up to the start-code bytes of each NAL unit.
    ours = [len(au) for au in sent[:len(video_packets)]]
    theirs = [int(p["size"]) for p in video_packets]
    assert all(abs(a - b) <= 16 for a, b in zip(ours[1:], theirs[1:])), (ours[:5], theirs[:5])
    # And it plays: ffmpeg decodes every frame without complaint.
    decoded = subprocess.run(["ffmpeg", "-v", "error", "-i", str(recording), "-f", "null", "-"],
                             capture_output=True, text=True)
    assert decoded.returncode == 0 and not decoded.stderr.strip(), decoded.stderr[-2000:]
    audio_packets = [p for p in probe["packets"] if p["codec_type"] == "audio"]
    audio_s = sum(float(p.get("duration_time", 0)) for p in audio_packets)
    assert 2.0 <= audio_s <= 3.5, audio_s


def test_a_push_url_that_is_not_rtmp_is_refused(served):
    base, _, _ = served
    tok, info = _session(base)
    r = httpx.post(f"{base}/v1/sessions/{info['session_id']}/rtmp",
                   json={"url": "file:///etc/passwd"}, headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 422
