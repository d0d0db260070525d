"""Property-based run over the published OpenAPI document (schemathesis): whatever the
generated request, the gateway answers it without a 5xx."""
from __future__ import annotations

import hypothesis
import pytest
import schemathesis

from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from gateway.app import Gateway, create_app
from gateway.auth import Auth, parse_api_keys


def _app(tmp):
    settings = Settings(bus="embedded", embedded_path=str(tmp / "bus.sqlite"), partitions=2)
    provision_topics(settings, PIPELINE)
    gw = Gateway(settings, Auth("schema-test-secret-of-thirty-two-bytes",
                                parse_api_keys("fuzz:fuzz-secret-key:integrator:100000", 1e5)))
    gw.start()
    return gw, create_app(gw)


import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

@schemathesis.serializer("audio/wav", "audio/pcm", "audio/L16", "audio/ogg", "application/sdp")
def _audio_bytes(ctx, value):
    """Generated bodies go out as they are: random bytes under an audio or SDP type."""
    return value if isinstance(value, bytes) else str(value).encode()


_TMP = Path(tempfile.mkdtemp(prefix="gw-schema-"))
GW, APP = _app(_TMP)
TOKEN, _ = GW.auth.issue(GW.auth.api_key("fuzz-secret-key"), "integrator", ttl_s=3600)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
def _own_session() -> str:
    from fastapi.testclient import TestClient

    r = TestClient(APP).post("/v1/sessions", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


SESSION = _own_session()


@schema.parametrize()
@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@pytest.mark.parametrize("who", ["token", "own-session", "anonymous"])
def test_no_request_makes_the_gateway_fail(case, who):
    headers = {"Authorization": f"Bearer {TOKEN}"} if who != "anonymous" else {}
    if who == "own-session" and case.path_parameters and "session_id" in case.path_parameters:
        # Reach the handlers behind the session lookup, not just its 404.
        case.path_parameters["session_id"] = SESSION
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
