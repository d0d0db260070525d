"""Hostile input at the gateway's own edges (embedded bus): uploads, WebSocket messages and
JSON bodies each get a 4xx or an error event with a reason; nothing answers 5xx and the
session goes on working afterwards."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from gateway.app import Gateway, create_app
from gateway.auth import Auth, parse_api_keys
from tests.support import hostile_inputs as H
from tests.support.bus_io import decode, read_all

KEYS = "acme:acme-secret-key:integrator:1000"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-gateway")
    settings = Settings(bus="embedded", embedded_path=str(tmp / "bus.sqlite"), partitions=2)
    provision_topics(settings, PIPELINE)
    gw = Gateway(settings, Auth("test-secret-of-thirty-two-bytes-at-least",
                                parse_api_keys(KEYS, 20.0)))
    # Server exceptions become 500 responses here, as a real server would send them.
    with TestClient(create_app(gw), raise_server_exceptions=False) as client:
        tok = client.post("/v1/tokens", json={},
                          headers={"Authorization": "Bearer acme-secret-key"}).json()["token"]
        auth = {"Authorization": f"Bearer {tok}"}
        sid = client.post("/v1/sessions", json={}, headers=auth).json()["session_id"]
        yield client, gw, settings, tok, sid


@pytest.mark.parametrize("name,ctype,body,status,words", H.upload_cases(),
                         ids=[c[0] for c in H.upload_cases()])
def test_a_hostile_upload_gets_its_4xx_with_a_reason(env, name, ctype, body, status, words):
    client, _, _, tok, sid = env
    r = client.post(f"/v1/sessions/{sid}/audio", content=body,
                    headers={"Authorization": f"Bearer {tok}", "Content-Type": ctype})
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert words in r.json()["detail"], r.json()


@pytest.mark.parametrize("name,message", H.websocket_messages(),
                         ids=[m[0] for m in H.websocket_messages()])
def test_a_hostile_websocket_message_gets_an_error_and_the_socket_still_works(env, name,
                                                                           message):
    client, gw, settings, tok, sid = env
    before = len(read_all(gw.bus, settings, "reply"))
    with client.websocket_connect(f"/v1/sessions/{sid}/ws?token={tok}") as ws:
        if isinstance(message, bytes):
            ws.send_bytes(message)
        else:
            ws.send_text(message)
        ws.send_text(json.dumps({"type": "speak", "text": f"after {name}"}))
        events = []
        while not any(e.get("type") == "reply" for e in events):
            events.append(json.loads(ws.receive_text()))
    replies = [decode(m, "reply_text").text for m in read_all(gw.bus, settings, "reply")]
    assert replies[before:] == [f"after {name}"]  # the hostile message made no record
    errors = [e for e in events if e.get("type") == "error"]
    if name not in ("json_nan_intensity", "random_bytes_even"):
        assert errors and errors[0]["detail"], events


def test_lone_surrogates_in_json_bodies_get_422_naming_the_field(env):
    client, _, _, tok, sid = env
    r = client.post(f"/v1/sessions/{sid}/speak", content=b'{"text": "\\ud800"}',
                    headers={"Authorization": f"Bearer {tok}",
                             "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "text"


def test_a_json_body_nested_100000_deep_gets_a_4xx(env):
    client, _, _, tok, sid = env
    r = client.post(f"/v1/sessions/{sid}/speak", content=b"[" * 100_000,
                    headers={"Authorization": f"Bearer {tok}",
                             "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["detail"]
