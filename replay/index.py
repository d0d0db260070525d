"""The session index: a faust-streaming app keeping, per session, where its records are
(partition and offset range per topic), its state and the model versions that made it.

The table is changelog-backed (a compacted Kafka topic), so it survives restarts and any
reader can load it: `replay` seeks straight to a session's first offset instead of scanning
a topic from the start. Run it with `avatar index` next to the stages (Kafka only: faust
speaks Kafka, not the embedded bus).
"""
from __future__ import annotations

import json
from typing import Any

from backbone.bus import Bus
from backbone.settings import Settings
from backbone.topics import TOPICS

INDEXED = tuple(t for t in TOPICS if t != "deadletter")
APP_ID = "session-index"
TABLE = "sessions"


def changelog_topic(settings: Settings) -> str:
    """The table's changelog, named the way faust names it: `<app id>-<table>-changelog`."""
    return f"{settings.topic_prefix}{APP_ID}-{TABLE}-changelog"


def make_app(settings: Settings) -> Any:
    import faust

    app = faust.App(f"{settings.topic_prefix}{APP_ID}", broker=f"kafka://{settings.bootstrap}",
                    store="memory://", topic_partitions=settings.partitions,
                    topic_replication_factor=1, value_serializer="raw",
                    key_serializer="raw", web_enabled=False, autodiscover=False,
                    consumer_auto_offset_reset="earliest")
    table = app.Table(TABLE, default=None, partitions=settings.partitions,
                      key_type=str, value_type=str)
    topics = app.topic(*[settings.topic(t) for t in INDEXED], key_type=bytes,
                       value_type=bytes)
    logical = {settings.topic(t): t for t in INDEXED}

    @app.agent(topics)
    async def index(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            session = (msg.key or b"").decode("utf-8", "replace")
            if not session:
                continue
            entry = json.loads(table.get(session) or "{}")
            topic = logical.get(msg.topic, msg.topic)
            span = entry.setdefault("topics", {}).setdefault(
                topic, {"partition": msg.partition, "first": msg.offset, "last": msg.offset,
                        "records": 0})
            span["first"] = min(span["first"], msg.offset)
            span["last"] = max(span["last"], msg.offset)
            span["records"] += 1  # a replay after a restart may count a record twice
            headers = dict(msg.headers or ())
            stage = headers.get("stage", b"").decode()
            model = headers.get("model_version", b"").decode()
            if stage and model:
                versions = entry.setdefault("models", {}).setdefault(stage, [])
                if model not in versions:
                    versions.append(model)
            if topic == "session.control":
                entry["state"] = "ended" if _action(msg.value) == "END" else entry.get(
                    "state", "live")
            table[session] = json.dumps(entry)

    return app


def _action(value: bytes | None) -> str:
    from backbone.codec import AvroCodec

    try:
        return str(AvroCodec().decode(value, "session_control").action)  # type: ignore[union-attr]
    except Exception:
        return ""


def lookup(bus: Bus, settings: Settings, session_id: str) -> dict[str, Any] | None:
    """The index entry of a session, read from the table's changelog (latest value)."""
    admin = bus.admin()
    topic = changelog_topic(settings)
    if topic not in admin.list_topics():
        return None
    key = session_id.encode()
    found: dict[str, Any] | None = None
    for p in range(admin.list_topics()[topic]):
        for m in admin.read(topic, p):
            if _key(m.key) == session_id and m.value:
                found = json.loads(_value(m.value))
    return found


def _key(raw: bytes | None) -> str:
    # faust's raw serializer stores str keys as their UTF-8 bytes.
    return (raw or b"").decode("utf-8", "replace").strip('"')


def _value(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return json.loads(text) if text.startswith('"') else text
