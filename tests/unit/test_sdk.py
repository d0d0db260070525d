"""The Python SDK against a served gateway, the way the README's example uses it."""
from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.client import AvatarClient, AvatarError
from tests.support.media import feed_session
from tests.unit.test_whep import KEY, served  # noqa: F401  (the gateway fixture)


def test_the_sdk_creates_a_session_speaks_and_streams_events(served):
    base, gw, settings = served
    client = AvatarClient(base, api_key=KEY)
    session = client.create_session(voice="en-us", emotion="happy", resolution=256)
    assert session.state == "live" and session.config["emotion"] == "happy"
    assert client.speak(session.session_id, "Hello from Python!")["accepted"] == "speak"
    threading.Timer(0.5, feed_session, args=(gw.bus, settings, session.session_id, 0.5)).start()
    kinds = set()
    for event, media in client.events(session.session_id, timeout_s=5):
        kinds.add(event["type"])
        if {"video", "audio"} <= kinds:
            break
    assert {"video", "audio"} <= kinds
    assert client.end(session.session_id).state == "ended"
    with pytest.raises(AvatarError) as err:
        client.speak(session.session_id, "too late")
    assert err.value.status == 409


def test_the_sdk_watches_over_webrtc(served):
    base, gw, settings = served
    client = AvatarClient(base, api_key=KEY)
    session = client.create_session(resolution=256)

    async def watch():
        viewer = await client.watch(session.session_id, token=session.viewer_token)
        feeder = threading.Thread(target=feed_session,
                                  args=(gw.bus, settings, session.session_id, 2.0))
        feeder.start()
        frame = await asyncio.wait_for(viewer.video.get(), 15)
        await viewer.close()
        feeder.join()
        return frame

    frame = asyncio.run(watch())
    assert (frame.width, frame.height) == (256, 256)


def test_a_wrong_key_is_a_clear_error(served):
    base, _, _ = served
    with pytest.raises(AvatarError) as err:
        AvatarClient(base, api_key="not-a-real-key").create_session()
    assert err.value.status == 401 and "unknown API key" in err.value.detail
