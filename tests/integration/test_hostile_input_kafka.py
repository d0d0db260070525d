"""Hostile input at every edge, on the real broker with every stage and the gateway as its own
process: fuzzed records on every input topic end as dead letters with a reason while every
stage keeps running and a good session still speaks; hostile uploads, WebSocket messages and
WHEP offers get a 4xx (never a 5xx) and the gateway stays up and small."""
from __future__ import annotations

import dataclasses
import json
import time

import httpx
import pytest

from backbone.codec import AvroCodec
from backbone.kafka_bus import KafkaBus
from backbone.records import DeadLetter, ReplyText, SessionControl
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from backbone.tracing import RecordHeaders, new_traceparent, now_ms
from benchmarks.long_session import rss_mb
from replay.reader import read_session
from tests.integration.stage_procs import GatewayProcess, StageProcess
from tests.support import hostile_inputs as HI
from tests.support import hostile_records as HR
from tests.support.bus_io import send

pytestmark = pytest.mark.kafka

CODEC = AvroCodec()
KEY = "hostile-test-key-0123"
WS_MAX_BYTES = 1 << 20  # `avatar gateway` runs uvicorn with this WebSocket message limit


def _settings(bootstrap: str, prefix: str) -> Settings:
    return Settings(bus="kafka", bootstrap=bootstrap, topic_prefix=f"{prefix}.", partitions=2)


def _produce(producer, settings: Settings, topic: str, key: bytes | None, value: bytes | None,
             headers=()) -> tuple[int, int]:
    got: list[tuple[int, int]] = []
    producer.produce(settings.topic(topic), key, value, headers,
                     lambda err, m: got.append((m.partition, m.offset)))
    assert producer.flush(30) == 0 and got
    return got[0]


def _encoded(value, topic: str, settings: Settings, seq: int, headers=None):
    hdr = headers if headers is not None else RecordHeaders(
        value.session_id, seq, new_traceparent(), now_ms(), "fuzzer", "test",
        value.SCHEMA).encode()
    return CODEC.encode(value, settings.topic(topic)), hdr


def _wait_dead_letters(settings: Settings, expected: set[tuple[str, str, int, int]],
                       timeout_s: float) -> dict[tuple[str, str, int, int], DeadLetter]:
    """Read the dead-letter topic until every (stage, topic, partition, offset) is there."""
    consumer = KafkaBus(settings.bootstrap).consumer(f"dl-reader-{time.time_ns()}")
    consumer.subscribe([settings.topic("deadletter")])
    got: dict[tuple[str, str, int, int], DeadLetter] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not expected <= set(got):
            m = consumer.poll(0.5)
            if m is None:
                continue
            d = CODEC.decode(m.value, "dead_letter")
            got.setdefault((d.stage, d.topic, d.partition, d.offset), d)
    finally:
        consumer.close()
    return got


def test_fuzzed_records_on_every_topic_are_dead_lettered_and_every_stage_keeps_running(
        kafka_bootstrap, unique_name, tmp_path):
    settings = _settings(kafka_bootstrap, unique_name)
    provision_topics(settings, PIPELINE)
    procs = [StageProcess(name, settings, tmp_path, "0",
                          {"AVATAR_MAX_RECORD_BYTES": str(HR.MAX_RECORD_BYTES)})
             for name in PIPELINE]
    bus = KafkaBus(kafka_bootstrap)
    producer = bus.producer()
    try:
        send(bus, settings, "session.control", HR.sample("session.control"), seq=0)
        expected: dict[tuple[str, str, int, int], str] = {}
        readers = HR.stage_inputs()
        for topic in sorted({t for ins in readers.values() for t in ins}):
            for case in HR.byte_cases(topic):
                where = _produce(producer, settings, topic, case.key, case.value, case.headers)
                for stage in HR.readers(topic):
                    expected[(stage, settings.topic(topic), *where)] = case.name
        for seq, (name, topic, value) in enumerate(HR.value_cases(), start=1):
            body, hdr = _encoded(dataclasses.replace(value, session_id=HR.SESSION), topic,
                                 settings, seq)
            where = _produce(producer, settings, topic, HR.SESSION.encode(), body, hdr)
            for stage in HR.readers(topic):
                expected[(stage, settings.topic(topic), *where)] = name
        send(bus, settings, "session.control", SessionControl(HR.SESSION, "END"), seq=100)

        # After the fuzz, a good session; its text comes with headers that are all wrong.
        good = "good-after-fuzz"
        send(bus, settings, "session.control", HR.sample("session.control", good), seq=0)
        body, _ = _encoded(ReplyText(good, "u0", "Hello there, nice to meet you."), "reply",
                           settings, 0)
        _produce(producer, settings, "reply", good.encode(), body, (
            ("seq", b"\xff\xfe"), ("event_time_ms", b"NaN"), ("traceparent", b"\x00" * 300),
            ("stage", "\u00e9".encode("latin-1")), ("link", b"not a link")))

        got = _wait_dead_letters(settings, set(expected), timeout_s=240)
        logs = "\n".join(f"--- {p.name}\n{p.log()[-1500:]}" for p in procs)
        missing = sorted(f"{expected[k]} -> {k[0]} ({k[1]})" for k in set(expected) - set(got))
        assert not missing, f"not dead-lettered: {missing}\n{logs}"
        for where, name in expected.items():
            d = got[where]
            assert d.reason and d.category, (name, d)
        alive = {p.name: p.proc.poll() is None for p in procs}
        assert all(alive.values()), (alive, logs)

        # The good session speaks: tts logs its speech, animate moves the mouth over it and
        # render encodes frames past the speech's start.
        deadline = time.monotonic() + 120
        video = speech = []
        while time.monotonic() < deadline:
            speech = [r.value for r in read_session(bus, settings, good, "speech.audio")]
            video = [r.value for r in read_session(bus, settings, good, "video")]
            if speech and speech[-1].is_last and video and \
                    video[-1].pts / video[-1].fps > speech[-1].start_sample / 22050:
                break
            time.sleep(0.5)
        assert speech and speech[-1].is_last, logs
        assert video and video[-1].pts / video[-1].fps > speech[-1].start_sample / 22050, logs
        assert not [d for d in got.values() if d.session_id == good]
    finally:
        for p in procs:
            p.terminate()


def test_the_gateway_answers_hostile_uploads_sockets_and_offers_with_4xx_and_stays_small(
        kafka_bootstrap, unique_name, tmp_path):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    settings = _settings(kafka_bootstrap, unique_name)
    provision_topics(settings, PIPELINE)
    gateway = GatewayProcess(settings, tmp_path, {
        "AVATAR_API_KEYS": f"acme:{KEY}:integrator:1000",
        "AVATAR_JWT_SECRET": "hostile-test-secret-of-32-bytes-or-more",
        "AVATAR_ICE_LOOPBACK": "1"})
    http = httpx.Client(base_url=gateway.base, timeout=60)
    try:
        tok = http.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {KEY}"}
                        ).json()["token"]
        auth = {"Authorization": f"Bearer {tok}"}
        info = http.post("/v1/sessions", json={"resolution": 256}, headers=auth).json()
        sid = info["session_id"]
        uploads, offers = HI.upload_cases(), HI.sdp_offers()
        statuses: dict[str, list[int]] = {}
        rss: list[float] = []
        for _ in range(3):  # rounds: memory taken by one round must come back for the next
            for name, ctype, body, status, words in uploads:
                r = http.post(f"/v1/sessions/{sid}/audio", content=body,
                              headers=auth | {"Content-Type": ctype})
                statuses.setdefault(name, []).append(r.status_code)
                assert r.status_code == status and words in r.json()["detail"], \
                    (name, r.status_code, r.text[:300])
            for name, body, ctype, status in offers:
                r = http.post(f"/whep/{sid}", content=body,
                              headers={"Authorization": f"Bearer {info['viewer_token']}",
                                       "Content-Type": ctype})
                statuses.setdefault(name, []).append(r.status_code)
                assert r.status_code == status and r.json()["detail"], (name, r.text[:300])
            url = gateway.base.replace("http", "ws", 1) + f"/v1/sessions/{sid}/ws?token={tok}"
            with connect(url, max_size=1 << 22) as ws:
                for name, message in HI.websocket_messages():
                    if len(message) < WS_MAX_BYTES:  # bigger ones: the next socket
                        ws.send(message)
                ws.send(json.dumps({"type": "interrupt"}))
                ws.recv(timeout=30)  # the socket answers (an error event): it is alive
            # A frame over the server's WebSocket limit closes that socket, nothing more.
            with connect(url, max_size=1 << 22) as ws:
                with pytest.raises(ConnectionClosed):
                    ws.send(bytes(20_000_000))
                    ws.recv(timeout=30)
            mb = rss_mb(gateway.proc.pid)
            assert mb is not None
            rss.append(mb)
        assert gateway.proc.poll() is None
        assert http.get("/healthz").status_code == 200
        r = http.post(f"/v1/sessions/{sid}/speak", json={"text": "Still here."}, headers=auth)
        assert r.status_code == 202
        log = gateway.log()
        assert "Traceback" not in log and " 500 " not in log, log[-3000:]
        # Bounded: after the first round (allocator pools, codecs loaded), further rounds of
        # the same abuse add little.
        print("gateway RSS MB per round", [round(x, 1) for x in rss])
        assert rss[-1] - rss[0] < 60, rss
    finally:
        http.close()
        gateway.terminate()


def test_garbage_on_the_topics_the_gateway_streams_does_not_stop_its_streams(
        kafka_bootstrap, unique_name, tmp_path):
    from websockets.sync.client import connect

    from gateway.hub import STREAMED

    settings = _settings(kafka_bootstrap, unique_name)
    provision_topics(settings, PIPELINE)
    gateway = GatewayProcess(settings, tmp_path, {
        "AVATAR_API_KEYS": f"acme:{KEY}:integrator:1000",
        "AVATAR_JWT_SECRET": "hostile-test-secret-of-32-bytes-or-more"})
    producer = KafkaBus(kafka_bootstrap).producer()
    try:
        with httpx.Client(base_url=gateway.base, timeout=60) as http:
            tok = http.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {KEY}"}
                            ).json()["token"]
            sid = http.post("/v1/sessions", json={"resolution": 256},
                            headers={"Authorization": f"Bearer {tok}"}).json()["session_id"]
        url = gateway.base.replace("http", "ws", 1) + f"/v1/sessions/{sid}/ws?token={tok}"
        with connect(url, max_size=1 << 22) as ws:
            time.sleep(1.0)  # the hub tails from the end: let it be there before the garbage
            # Every byte-level case on every topic streamed to viewers and the control topic,
            # keyed to the watched session; then one good record.
            for topic in STREAMED + ("session.control",):
                for case in HR.byte_cases(topic):
                    if case.key is not None and case.name != "key_differs_from_session":
                        _produce(producer, settings, topic, sid.encode(), case.value)
            body, hdr = _encoded(ReplyText(sid, "u9", "After the garbage."), "reply",
                                 settings, 1)
            _produce(producer, settings, "reply", sid.encode(), body, hdr)
            events = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(e.get("type") == "reply"
                                                          for e in events):
                msg = ws.recv(timeout=60)
                if isinstance(msg, str):
                    events.append(json.loads(msg))
        assert [e["text"] for e in events if e.get("type") == "reply"] == ["After the garbage."]
        assert gateway.proc.poll() is None and "Traceback" not in gateway.log()
    finally:
        gateway.terminate()
