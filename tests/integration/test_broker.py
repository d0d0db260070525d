"""The real broker: answers, round-trips records, keeps acknowledged data across restarts."""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from backbone import broker

pytestmark = pytest.mark.kafka


def _create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce with acks=all and fail unless every record was acknowledged."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, key=str(i).encode(), on_delivery=on_delivery)
    assert producer.flush(30) == 0, "records still unacknowledged after 30 s"
    assert not errors, errors


def _consume(bootstrap: str, topic: str, group: str, count: int, timeout_s: float = 30.0) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # librdkafka defaults (1 s backoff, 100k prefetch) can stall a test consumer
            "fetch.queue.backoff.ms": 10,
            "queued.min.messages": 1000,
        }
    )
    got: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            assert err is None, err
            value = msg.value()
            assert isinstance(value, bytes)
            got.append(value)
    finally:
        consumer.close()
    return got


def test_broker_answers(kafka_bootstrap: str) -> None:
    meta = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert meta.brokers, "no broker in metadata"
    assert meta.cluster_id


def test_status_of_own_broker(
    broker_settings: broker.BrokerSettings | None, kafka_bootstrap: str
) -> None:
    if broker_settings is None:
        pytest.fail("KAFKA_BOOTSTRAP points at an external broker; this test inspects its own: unset it")
    st = broker.status(broker_settings)
    assert st.running and st.answering and st.pid is not None
    assert st.bootstrap == kafka_bootstrap
    assert broker.start(broker_settings, timeout_s=5) == kafka_bootstrap  # idempotent, immediate


def test_produce_consume_roundtrip(kafka_bootstrap: str, unique_name: str) -> None:
    topic = f"{unique_name}-t"
    _create_topic(kafka_bootstrap, topic, partitions=2)
    values = [f"record-{i}".encode() for i in range(50)]
    _produce(kafka_bootstrap, topic, values)
    got = _consume(kafka_bootstrap, topic, f"{unique_name}-g", len(values))
    assert sorted(got) == sorted(values)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_acknowledged_data_survives_broker_restart(
    broker_settings: broker.BrokerSettings | None, kafka_bootstrap: str, unique_name: str, how: str
) -> None:
    if broker_settings is None:
        pytest.fail("KAFKA_BOOTSTRAP points at an external broker; this test restarts its own: unset it")
    halt: Callable[[broker.BrokerSettings], bool] = broker.stop if how == "stop" else broker.kill
    topic = f"{unique_name}-t"
    _create_topic(kafka_bootstrap, topic)
    values = [f"before-{how}-{i}".encode() for i in range(20)]
    _produce(kafka_bootstrap, topic, values)
    pid_before = broker.status(broker_settings).pid

    try:
        assert halt(broker_settings) is True
        st = broker.status(broker_settings)
        assert not st.running and not st.answering
        assert halt(broker_settings) is False  # idempotent
    finally:
        assert broker.start(broker_settings) == kafka_bootstrap

    assert broker.status(broker_settings).pid != pid_before
    got = _consume(kafka_bootstrap, topic, f"{unique_name}-g", len(values))
    assert got == values  # one partition: same order
    _produce(kafka_bootstrap, topic, [b"after"])  # and it still takes writes
