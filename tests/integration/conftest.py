"""Integration fixtures: one real Kafka broker per test session.

With KAFKA_BOOTSTRAP set, tests use that broker; otherwise backbone.broker starts one in a
fresh temp home on free loopback ports (never the dev broker's 19092/19093) and stops it at
the end. A broker that cannot start is a test error, never a skip.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from collections.abc import Iterator

import pytest

from backbone import broker


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open together, so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerSettings | None]:
    """The settings of the session's own broker (running), or None if KAFKA_BOOTSTRAP is external.

    Tests may stop()/kill()/start() it; it is started again (if needed) and finally stopped here.
    """
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield None
        return
    port, controller_port = _free_ports(2)
    settings = dataclasses.replace(
        broker.BrokerSettings.from_env(),
        home=tmp_path_factory.mktemp("kafka-home"),
        port=port,
        controller_port=controller_port,
    )
    try:
        broker.start(settings)  # BrokerError propagates: the dependent tests error out
        yield settings
    finally:
        broker.stop(settings)


@pytest.fixture(scope="session")
def kafka_bootstrap(broker_settings: broker.BrokerSettings | None) -> str:
    """bootstrap.servers for the session's broker: $KAFKA_BOOTSTRAP or the one started here."""
    if broker_settings is None:
        return os.environ["KAFKA_BOOTSTRAP"]
    return broker.start(broker_settings)  # already running: returns at once


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A prefix unique to this test run, for topic names and group ids ([a-zA-Z0-9._-] only)."""
    stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name).strip("-")[:60]
    return f"{stem}-{uuid.uuid4().hex[:8]}"
