"""The gateway's REST API and WebSocket on the embedded bus: tokens and scopes, sessions,
speech in, events and media out, and clear 4xx answers to bad requests."""
from __future__ import annotations

import io
import json
import time
import wave

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backbone.records import (MotionFrames, PhonemeSpan, PhonemeSpans, ReplyText, SessionControl,
                              SpeechChunk, VideoChunk)
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from gateway.auth import Auth, parse_api_keys
from gateway.app import Gateway, create_app
from tests.support.bus_io import decode, read_all, send

KEYS = "acme:acme-secret-key:integrator:1000,other:other-secret-key:integrator:1000," \
       "audit:audit-secret-key:auditor,slow:slow-secret-key:integrator:1"


@pytest.fixture
def env(tmp_path):
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2)
    provision_topics(settings, PIPELINE)
    gw = Gateway(settings, Auth("test-secret-of-thirty-two-bytes-at-least", parse_api_keys(KEYS, 20.0)))
    with TestClient(create_app(gw)) as client:
        yield client, gw, settings


def token(client, key="acme-secret-key", **body):
    r = client.post("/v1/tokens", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def auth(tok):
    return {"Authorization": f"Bearer {tok}"}


def new_session(client, tok, **cfg):
    r = client.post("/v1/sessions", json=cfg, headers=auth(tok))
    assert r.status_code == 201, r.text
    return r.json()


def test_a_session_is_created_on_the_bus_with_its_config(env):
    client, gw, settings = env
    info = new_session(client, token(client), voice="en-gb", fps=50, emotion="happy")
    controls = [decode(m, "session_control") for m in read_all(gw.bus, settings, "session.control")]
    assert len(controls) == 1 and controls[0].action == "CREATE"
    assert controls[0].session_id == info["session_id"]
    assert controls[0].config.voice == "en-gb" and controls[0].config.fps == 50
    assert info["viewer_token"] and info["whep_url"].endswith(info["session_id"])


def test_speak_interrupt_emotion_and_end_become_records(env):
    client, gw, settings = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    assert client.post(f"/v1/sessions/{sid}/speak", json={"text": "Hi there."},
                       headers=auth(tok)).status_code == 202
    assert client.post(f"/v1/sessions/{sid}/messages", json={"text": "How are you?"},
                       headers=auth(tok)).status_code == 202
    assert client.post(f"/v1/sessions/{sid}/interrupt", headers=auth(tok)).status_code == 202
    assert client.post(f"/v1/sessions/{sid}/emotion", json={"emotion": "sad", "intensity": 0.5},
                       headers=auth(tok)).status_code == 202
    assert client.delete(f"/v1/sessions/{sid}", headers=auth(tok)).json()["state"] == "ended"
    replies = [decode(m, "reply_text") for m in read_all(gw.bus, settings, "reply")]
    assert [r.text for r in replies] == ["Hi there."]
    assert [decode(m, "transcript").text for m in read_all(gw.bus, settings, "transcript")] == \
        ["How are you?"]
    actions = [decode(m, "session_control").action
               for m in read_all(gw.bus, settings, "session.control")]
    assert actions == ["CREATE", "INTERRUPT", "EMOTION", "END"]
    r = client.post(f"/v1/sessions/{sid}/speak", json={"text": "late"}, headers=auth(tok))
    assert r.status_code == 409 and "ended" in r.json()["detail"]


def _wav(seconds=0.5, sr=16000, channels=1):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        tone = (np.sin(np.arange(int(seconds * sr)) * 0.1) * 8000).astype("<i2")
        w.writeframes(np.repeat(tone, channels).tobytes())
    return buf.getvalue()


def test_own_tts_audio_goes_to_speech_audio_in_100ms_chunks_on_one_clock(env):
    client, gw, settings = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    for _ in range(2):
        r = client.post(f"/v1/sessions/{sid}/audio", content=_wav(0.45, channels=2),
                        headers=auth(tok) | {"Content-Type": "audio/wav"})
        assert r.status_code == 202, r.text
    chunks = [decode(m, "speech_chunk") for m in read_all(gw.bus, settings, "speech.audio")]
    # The first utterance starts at the session's media "now"; the second follows it.
    s0 = chunks[0].start_sample
    assert 0 <= s0 < 16000 * 5
    assert [c.start_sample - s0 for c in chunks] == [0, 1600, 3200, 4800, 6400] + \
        [7200, 8800, 10400, 12000, 13600]
    assert [c.is_last for c in chunks].count(True) == 2
    assert all(c.sample_rate == 16000 for c in chunks)


def test_user_audio_goes_to_audio_in(env):
    client, gw, settings = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    pcm = (np.arange(3200) % 100).astype("<i2").tobytes()
    r = client.post(f"/v1/sessions/{sid}/audio?purpose=user", content=pcm,
                    headers=auth(tok) | {"Content-Type": "audio/pcm;rate=16000"})
    assert r.status_code == 202 and r.json()["detail"]["topic"] == "audio.in"
    chunks = [decode(m, "audio_chunk") for m in read_all(gw.bus, settings, "audio.in")]
    assert b"".join(c.data for c in chunks) == pcm and chunks[-1].final


@pytest.mark.parametrize("content_type,body,status,words", [
    ("text/plain", b"hello", 415, "unsupported content type"),
    ("audio/wav", b"RIFF....WAVEfmt garbage", 400, "not a PCM WAV"),
    ("audio/pcm;rate=16000", b"\x00\x01\x02", 400, "whole number"),
    ("audio/pcm;rate=96000", b"\x00\x00" * 10, 400, "outside"),
    ("audio/ogg", b"OggS" + b"\x00" * 100, 400, "cannot decode"),
    ("audio/wav", b"", 400, "empty"),
])
def test_bad_uploads_get_a_4xx_with_a_reason(env, content_type, body, status, words):
    client, _, _ = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    r = client.post(f"/v1/sessions/{sid}/audio", content=body,
                    headers=auth(tok) | {"Content-Type": content_type})
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_a_huge_upload_is_refused_before_it_is_read(env):
    client, _, _ = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    r = client.post(f"/v1/sessions/{sid}/audio", content=b"\x00" * 10_000_002,
                    headers=auth(tok) | {"Content-Type": "audio/pcm"})
    assert r.status_code == 413


def test_tokens_need_a_known_key_and_an_allowed_scope(env):
    client, _, _ = env
    r = client.post("/v1/tokens", json={}, headers={"Authorization": "Bearer wrong-key-123"})
    assert r.status_code == 401
    r = client.post("/v1/tokens", json={"scope": "auditor"},
                    headers={"Authorization": "Bearer acme-secret-key"})
    assert r.status_code == 403
    assert client.post("/v1/tokens", json={}).status_code == 401


def test_no_token_reaches_another_tenants_session(env):
    client, _, _ = env
    mine = token(client)
    sid = new_session(client, mine)["session_id"]
    theirs = token(client, "other-secret-key")
    for method, path in [("get", f"/v1/sessions/{sid}"), ("post", f"/v1/sessions/{sid}/interrupt"),
                         ("delete", f"/v1/sessions/{sid}")]:
        assert getattr(client, method)(path, headers=auth(theirs)).status_code == 404
    # ... and a viewer token for it cannot be minted with another key.
    r = client.post("/v1/tokens", json={"scope": "viewer", "session_id": sid},
                    headers={"Authorization": "Bearer other-secret-key"})
    assert r.status_code == 404


def test_a_viewer_token_watches_one_session_and_cannot_drive_it(env):
    client, _, _ = env
    tok = token(client)
    a = new_session(client, tok)
    b = new_session(client, tok)
    viewer = a["viewer_token"]
    assert client.get(f"/v1/sessions/{a['session_id']}", headers=auth(viewer)).status_code == 200
    assert client.get(f"/v1/sessions/{b['session_id']}", headers=auth(viewer)).status_code == 404
    r = client.post(f"/v1/sessions/{a['session_id']}/speak", json={"text": "x"},
                    headers=auth(viewer))
    assert r.status_code == 403


def test_forged_and_expired_tokens_are_refused(env):
    client, gw, _ = env
    tok = token(client)
    forged = Auth("another-secret", parse_api_keys(KEYS, 20.0))
    key = forged.api_key("acme-secret-key")
    bad, _ = forged.issue(key, "integrator")
    assert client.post("/v1/sessions", json={}, headers=auth(bad)).status_code == 401
    short, _ = gw.auth.issue(gw.auth.api_key("acme-secret-key"), "integrator", ttl_s=1)
    time.sleep(2.1)
    r = client.post("/v1/sessions", json={}, headers=auth(short))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert client.post("/v1/sessions", json={}, headers=auth(tok[:-2] + "xx")).status_code == 401


def test_each_key_is_rate_limited(env):
    client, _, _ = env
    codes = [client.post("/v1/tokens", json={},
                         headers={"Authorization": "Bearer slow-secret-key"}).status_code
             for _ in range(5)]
    assert codes[0] == 201 and 429 in codes


def test_bad_json_and_out_of_range_fields_get_422_with_the_field(env):
    client, _, _ = env
    tok = token(client)
    r = client.post("/v1/sessions", content=b"{not json", headers=auth(tok) |
                    {"Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/sessions", json={"fps": 1000}, headers=auth(tok))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "fps"
    r = client.post("/v1/sessions", json={"portrait": "nobody"}, headers=auth(tok))
    assert r.status_code == 422 and "unknown portrait" in r.json()["detail"]


def test_the_websocket_streams_the_sessions_events_and_media_and_nothing_else(env):
    client, gw, settings = env
    tok = token(client)
    a = new_session(client, tok)
    b = new_session(client, tok)
    sid = a["session_id"]
    with client.websocket_connect(f"/v1/sessions/{sid}/ws?token={a['viewer_token']}") as ws:
        time.sleep(0.3)  # the hub is tailing; what is produced from now on streams
        bus = gw.bus
        send(bus, settings, "video", VideoChunk(b["session_id"], 256, 256, 25, 0, 0, True,
                                                b"other"), seq=0, stage="render")
        send(bus, settings, "reply", ReplyText(sid, "u0", "Hello."), seq=0, stage="dialogue")
        send(bus, settings, "speech.phonemes", PhonemeSpans(sid, "u0", 22050, (
            PhonemeSpan("h", 0, 100),)), seq=0, stage="tts")
        send(bus, settings, "speech.audio", SpeechChunk(sid, "u0", 22050, 0, b"\x01\x00" * 4),
             seq=0, stage="tts")
        send(bus, settings, "motion", MotionFrames(sid, 25, np.array([0]),
                                                   np.zeros((1, 52), np.float32),
                                                   np.zeros((1, 3), np.float32)), seq=0,
             stage="animate")
        send(bus, settings, "video", VideoChunk(sid, 256, 256, 25, 0, 0, True, b"\x00\x00\x01AU"),
             seq=0, stage="render")
        got = {}
        while len(got) < 5:
            msg = ws.receive()
            if msg.get("text"):
                ev = json.loads(msg["text"])
                got[ev["type"]] = ev
            else:
                raw = msg["bytes"]
                n = int.from_bytes(raw[:4], "big")
                ev = json.loads(raw[4:4 + n])
                got[ev["type"]] = (ev, raw[4 + n:])
        assert got["reply"]["text"] == "Hello."
        assert got["phonemes"]["spans"] == [["h", 0, 100]]
        assert got["motion"]["frames"] == [0] and len(got["motion"]["weights"][0]) == 52
        assert got["audio"][1] == b"\x01\x00" * 4 and got["audio"][0]["sample_rate"] == 22050
        video, data = got["video"]
        assert data == b"\x00\x00\x01AU" and video["keyframe"]  # session b's frame never came
        # A viewer may not send.
        ws.send_text(json.dumps({"type": "speak", "text": "hi"}))
        assert json.loads(ws.receive_text())["type"] == "error"


def test_the_websocket_takes_commands_and_audio_from_the_integrator(env):
    client, gw, settings = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    with client.websocket_connect(f"/v1/sessions/{sid}/ws?token={tok}") as ws:
        ws.send_text(json.dumps({"type": "speak", "text": "From the socket."}))
        ws.send_text(json.dumps({"type": "audio_format", "sample_rate": 48000}))
        ws.send_bytes(b"\x00\x01" * 4800)
        ws.send_text(json.dumps({"type": "audio_end"}))
        ws.send_text("this is not json")
        events = [json.loads(ws.receive_text()) for _ in range(2)]
        # The session's own reply streams back too; the garbage gets an error.
        assert sorted(e["type"] for e in events) == ["error", "reply"]
    assert [decode(m, "reply_text").text for m in read_all(gw.bus, settings, "reply")] == \
        ["From the socket."]
    audio = [decode(m, "audio_chunk") for m in read_all(gw.bus, settings, "audio.in")]
    assert audio[0].sample_rate == 48000 and sum(len(a.data) for a in audio) == 9600
    assert audio[-1].final


def test_a_websocket_without_a_valid_token_is_closed(env):
    client, _, _ = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    from starlette.websockets import WebSocketDisconnect
    with pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect(f"/v1/sessions/{sid}/ws?token=nope") as ws:
            ws.receive_text()
    assert exc.value.code == 4401


def test_a_restarted_gateway_still_knows_every_session_and_its_owner(env):
    client, gw, settings = env
    tok = token(client)
    sid = new_session(client, tok)["session_id"]
    ended = new_session(client, tok)["session_id"]
    client.delete(f"/v1/sessions/{ended}", headers=auth(tok))
    again = Gateway(settings, Auth("test-secret-of-thirty-two-bytes-at-least",
                                   parse_api_keys(KEYS, 20.0)))
    with TestClient(create_app(again)) as other:
        assert other.post(f"/v1/sessions/{sid}/speak", json={"text": "Still here."},
                          headers=auth(tok)).status_code == 202
        assert other.get(f"/v1/sessions/{ended}", headers=auth(tok)).json()["state"] == "ended"
        theirs = token(other, "other-secret-key")
        assert other.get(f"/v1/sessions/{sid}", headers=auth(theirs)).status_code == 404
        # A session created on the first instance from now on is known to the second.
        fresh = new_session(client, tok)["session_id"]
        for _ in range(50):
            if fresh in again.sessions:
                break
            time.sleep(0.05)
        assert other.get(f"/v1/sessions/{fresh}", headers=auth(tok)).status_code == 200
