"""Who may see what, beyond tests/unit/test_gateway.py and test_whep.py: a viewer's token
opens only its own session's WebSocket, expired or forged tokens open nothing (REST,
WebSocket, WHEP), replay is for the session owner's auditors, and API keys and tokens are
not interchangeable."""
from __future__ import annotations

import time

import jwt
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from gateway.app import Gateway, create_app
from gateway.auth import ISSUER, Auth, parse_api_keys

SECRET = "security-test-secret-of-32-bytes-at-least"
KEYS = "acme:acme-secret-key:integrator:1000,acme:acme-audit-key:auditor:1000," \
       "other:other-audit-key:auditor:1000"
OFFER = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"


@pytest.fixture
def env(tmp_path):
    settings = Settings(bus="embedded", embedded_path=str(tmp_path / "bus.sqlite"), partitions=2)
    provision_topics(settings, PIPELINE)
    gw = Gateway(settings, Auth(SECRET, parse_api_keys(KEYS, 20.0)))
    with TestClient(create_app(gw)) as client:
        yield client


def _token(client, key="acme-secret-key", **body) -> str:
    r = client.post("/v1/tokens", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def _session(client, tok) -> dict:
    r = client.post("/v1/sessions", json={}, headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _signed(**claims) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "acme", "scope": "viewer", "iat": now, "exp": now + 60,
               "jti": "t"} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET,
                      algorithm="HS256")


def _ws_close_code(client, sid: str, token: str) -> int:
    with pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect(f"/v1/sessions/{sid}/ws?token={token}") as ws:
            ws.receive_text()
    return exc.value.code


def test_a_viewer_token_for_one_session_cannot_open_anothers_websocket(env):
    tok = _token(env)
    a, b = _session(env, tok), _session(env, tok)
    assert _ws_close_code(env, b["session_id"], a["viewer_token"]) == 4403


def test_an_expired_token_opens_neither_the_websocket_nor_whep(env):
    tok = _token(env)
    a = _session(env, tok)
    sid = a["session_id"]
    expired = _signed(sid=sid, iat=int(time.time()) - 120, exp=int(time.time()) - 60)
    assert _ws_close_code(env, sid, expired) == 4401
    r = env.post(f"/whep/{sid}", content=OFFER, headers={"Authorization": f"Bearer {expired}",
                                                         "Content-Type": "application/sdp"})
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_a_token_signed_with_another_secret_opens_no_websocket(env):
    tok = _token(env)
    sid = _session(env, tok)["session_id"]
    forged = jwt.encode({"iss": ISSUER, "sub": "acme", "scope": "viewer", "sid": sid,
                         "iat": int(time.time()), "exp": int(time.time()) + 60},
                        "a-guessed-secret-of-32-bytes-or-more!", algorithm="HS256")
    assert _ws_close_code(env, sid, forged) == 4401


@pytest.mark.parametrize("case", ["alg_none", "no_exp", "wrong_issuer", "unknown_scope"])
def test_unsigned_incomplete_or_foreign_tokens_are_refused(env, case):
    tok = _token(env)
    sid = _session(env, tok)["session_id"]
    now = int(time.time())
    bad = {
        "alg_none": jwt.encode({"iss": ISSUER, "sub": "acme", "scope": "integrator",
                                "iat": now, "exp": now + 60}, None, algorithm="none"),
        "no_exp": _signed(scope="integrator", exp=None),
        "wrong_issuer": _signed(scope="integrator", iss="someone-else"),
        "unknown_scope": _signed(scope="admin"),
    }[case]
    r = env.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {bad}"})
    assert r.status_code in (401, 403) and r.json()["detail"], r.text


def test_replay_is_only_for_auditors_of_the_sessions_owner(env):
    tok = _token(env)
    sid = _session(env, tok)["session_id"]
    path = f"/v1/sessions/{sid}/replay/whep"
    sdp = {"Content-Type": "application/sdp"}
    r = env.post(path, content=OFFER, headers=sdp | {"Authorization": f"Bearer {tok}"})
    assert r.status_code == 403  # the integrator that drives it may not replay it
    theirs = _token(env, "other-audit-key", scope="auditor")
    r = env.post(path, content=OFFER, headers=sdp | {"Authorization": f"Bearer {theirs}"})
    assert r.status_code == 404  # another tenant's auditor does not learn it exists
    ours = _token(env, "acme-audit-key", scope="auditor")
    r = env.post(path, content="hello", headers=sdp | {"Authorization": f"Bearer {ours}"})
    assert r.status_code == 400  # past authorisation: only the offer itself is wrong


def test_api_keys_and_tokens_are_not_interchangeable(env):
    tok = _token(env)
    r = env.post("/v1/sessions", json={}, headers={"Authorization": "Bearer acme-secret-key"})
    assert r.status_code == 401
    r = env.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 401 and r.json()["detail"] == "unknown API key"


def test_a_viewer_token_cannot_create_sessions_or_mint_tokens(env):
    viewer = _session(env, _token(env))["viewer_token"]
    r = env.post("/v1/sessions", json={}, headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 403
    r = env.post("/v1/tokens", json={"scope": "integrator"},
                 headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 401


def test_no_token_lives_longer_than_an_hour(env):
    r = env.post("/v1/tokens", json={"ttl_s": 7200},
                 headers={"Authorization": "Bearer acme-secret-key"})
    assert r.status_code == 422
    claims = jwt.decode(_token(env, ttl_s=3600), SECRET, algorithms=["HS256"], issuer=ISSUER)
    assert claims["exp"] - claims["iat"] <= 3600


def test_refusals_never_echo_the_key_or_token_presented(env):
    key = "acme-secret-key-but-wrong"
    r = env.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and key not in r.text
    bad = _signed(scope="admin")
    r = env.get("/v1/sessions/x", headers={"Authorization": f"Bearer {bad}"})
    assert bad not in r.text and bad[:20] not in r.text
