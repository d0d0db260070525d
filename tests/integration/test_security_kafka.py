"""Secrets stay secret on a real run: a session (our TTS, an OpenAI-compatible LLM and a
failing Anthropic one, sealing on) through stage processes and the gateway on the real broker,
then every line those processes logged and every record on every topic of the run (raw and
unsealed) is searched for the API keys, the JWT secret, the integrity and sealing master keys,
the LLM keys, each session's derived keys and the tokens issued."""
from __future__ import annotations

import hashlib
import secrets
import time

import httpx
import pytest

from backbone import integrity, sealing
from backbone.kafka_bus import KafkaBus
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from replay.reader import read_session
from tests.integration.stage_procs import GatewayProcess, StageProcess
from tests.support.fake_llm import Behaviour, FakeLLM

pytestmark = pytest.mark.kafka


def _wait_for(fn, timeout_s: float, what: str, logs) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


def test_no_secret_appears_in_any_log_line_or_any_record(kafka_bootstrap, unique_name, tmp_path,
                                                         monkeypatch):
    api_key, audit_key = f"key-{secrets.token_hex(12)}", f"audit-{secrets.token_hex(12)}"
    jwt_secret = secrets.token_urlsafe(32)
    integrity_key = secrets.token_hex(32)
    data_master = secrets.token_urlsafe(32)
    openai_key, anthropic_key = f"sk-{secrets.token_hex(16)}", f"ant-{secrets.token_hex(16)}"
    # This process reads the log back, so it needs the sealing and integrity masters too.
    monkeypatch.setenv("AVATAR_SEAL", "1")
    monkeypatch.setenv("AVATAR_DATA_MASTER_KEY", data_master)
    monkeypatch.setenv("AVATAR_INTEGRITY_KEY", integrity_key)
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=2)
    provision_topics(settings, PIPELINE)
    llm = FakeLLM(Behaviour(key=openai_key, deltas=["Fine, thank you."]))  # bound, not serving
    env = {"AVATAR_SEAL": "1", "AVATAR_DATA_MASTER_KEY": data_master,
           "AVATAR_INTEGRITY_KEY": integrity_key, "AVATAR_LOG_LEVEL": "DEBUG",
           "AVATAR_OPENAI_BASE_URL": llm.openai_url, "AVATAR_OPENAI_API_KEY": openai_key,
           "AVATAR_ANTHROPIC_BASE_URL": llm.anthropic_url,
           "AVATAR_ANTHROPIC_API_KEY": anthropic_key, "AVATAR_DIALOGUE_TIMEOUT_S": "10",
           "AVATAR_API_KEYS": f"acme:{api_key}:integrator:1000,acme:{audit_key}:auditor:1000",
           "AVATAR_JWT_SECRET": jwt_secret}
    procs = [StageProcess(n, settings, tmp_path, "0", env)
             for n in ("dialogue", "tts", "animate", "render")]
    gateway = GatewayProcess(settings, tmp_path, env, timeout_s=180)
    bus = KafkaBus(kafka_bootstrap)
    tokens: list[str] = []

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-1500:]}" for p in procs)

    try:
        with llm, httpx.Client(base_url=gateway.base, timeout=60) as http:
            r = http.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {api_key}"})
            tok = r.json()["token"]
            auth = {"Authorization": f"Bearer {tok}"}
            a = http.post("/v1/sessions", json={"dialogue": "openai", "resolution": 256},
                          headers=auth).json()
            b = http.post("/v1/sessions", json={"dialogue": "anthropic", "resolution": 256},
                          headers=auth).json()
            tokens += [tok, a["viewer_token"], b["viewer_token"]]
            # Refusals and a WebSocket carrying its token in the URL, for the logs to hold.
            assert http.post("/v1/tokens", json={}, headers={
                "Authorization": f"Bearer {api_key}x"}).status_code == 401
            assert http.get(f"/v1/sessions/{b['session_id']}", headers={
                "Authorization": f"Bearer {a['viewer_token']}"}).status_code == 404
            ws_url = gateway.base.replace("http", "ws", 1) + \
                f"/v1/sessions/{a['session_id']}/ws?token={a['viewer_token']}"
            from websockets.sync.client import connect
            with connect(ws_url, max_size=1 << 22) as ws:
                for sid in (a["session_id"], b["session_id"]):
                    assert http.post(f"/v1/sessions/{sid}/messages", json={"text": "How are you?"},
                                     headers=auth).status_code == 202
                assert http.post(f"/v1/sessions/{a['session_id']}/speak",
                                 json={"text": "Hello there."}, headers=auth).status_code == 202
                ws.recv(timeout=120)
            auditor = http.post("/v1/tokens", json={"scope": "auditor"}, headers={
                "Authorization": f"Bearer {audit_key}"}).json()["token"]
            tokens.append(auditor)
            # Both answers are spoken: the model's (its key accepted) and the fallback (the
            # other vendor's key refused by the fake server).
            for sid in (a["session_id"], b["session_id"]):
                _wait_for(lambda: [r for r in read_session(bus, settings, sid, "speech.audio")
                                   if r.value.is_last], 180, f"speech of {sid}", logs)
            replies = {sid: [r.value.text for r in read_session(bus, settings, sid, "reply")]
                       for sid in (a["session_id"], b["session_id"])}
            assert "Fine, thank you." in replies[a["session_id"]], replies
            assert replies[b["session_id"]] and "Fine, thank you." not in \
                replies[b["session_id"]], replies
            assert any(s.headers.get("authorization") == f"Bearer {openai_key}"
                       for s in llm.seen)  # the key was really used
            for sid in (a["session_id"], b["session_id"]):
                http.delete(f"/v1/sessions/{sid}", headers=auth)
            sessions = [a["session_id"], b["session_id"]]
    finally:
        for p in procs:
            p.terminate()
        gateway.terminate()

    keys = sealing.KeyStore(settings, bus)
    master = bytes.fromhex(integrity_key)
    derived: dict[str, bytes] = {"data master (derived)": hashlib.sha256(
        b"avatar-data-master|" + data_master.encode()).digest(), "integrity master": master}
    for sid in sessions:
        data_key = keys.key(sid)
        assert data_key, f"no data key for {sid}: sealing was not on"
        derived[f"data key of {sid}"] = data_key
        derived[f"integrity key of {sid}"] = integrity.session_key(sid, master)
    texts = {"API key": api_key, "auditor API key": audit_key, "JWT secret": jwt_secret,
             "integrity master": integrity_key, "data master": data_master,
             "OpenAI key": openai_key, "Anthropic key": anthropic_key} | \
        {f"token {i}": t for i, t in enumerate(tokens)}
    needles = {name: value.encode() for name, value in texts.items()} | derived | \
        {f"{name} (hex)": value.hex().encode() for name, value in derived.items()}

    # Every log line of every process.
    for path in [p.log_path for p in procs] + [gateway.log_path]:
        text = path.read_bytes()
        assert text, f"{path.name} is empty: nothing was checked"
        found = [name for name, needle in needles.items() if needle in text]
        assert not found, f"{path.name} holds {found}"

    # Every record on every topic of the run, raw and (where sealed) opened.
    admin = bus.admin()
    scanned = 0
    for topic, partitions in admin.list_topics().items():
        if not topic.startswith(settings.topic_prefix):
            continue
        logical = topic[len(settings.topic_prefix):]
        for partition in range(partitions):
            for m in admin.read(topic, partition):
                scanned += 1
                blobs = [m.key or b"", m.value or b""] + [v or b"" for _, v in m.headers]
                sid = (m.key or b"").decode("utf-8", "replace")
                if sealing.is_sealed(m.value) and sid in sessions:
                    kind = "state" if logical.startswith("state.") else logical
                    blobs.append(sealing.unseal(keys.key(sid), sid, kind, m.value or b""))
                found = [name for name, needle in needles.items()
                         if any(needle in blob for blob in blobs)]
                assert not found, f"{topic}[{partition}]@{m.offset} holds {found}"
    assert scanned > 100, scanned
