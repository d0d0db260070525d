"""The embedded bus keeps Kafka's semantics the runtime relies on: key-hashed partitions,
per-partition order, durable group offsets, and a log that survives reopening."""
import threading

import pytest

from backbone.bus import BusError, murmur2, partition_for
from backbone.embedded import EmbeddedBus


@pytest.fixture
def bus(tmp_path):
    b = EmbeddedBus(tmp_path / "bus.sqlite")
    b.admin().create_topics(["t"], 4)
    return b


def test_murmur2_matches_kafkas_java_partitioner():
    # Values from Kafka's own Utils.murmur2 test vectors (as signed 32-bit ints).
    def signed(x):
        return x - (1 << 32) if x >= 1 << 31 else x
    assert signed(murmur2(b"21")) == -973932308
    assert signed(murmur2(b"foobar")) == -790332482
    assert signed(murmur2(b"a-little-bit-long-string")) == -985981536


def test_same_key_same_partition_in_order(bus):
    p = bus.producer()
    for i in range(20):
        p.produce("t", b"session-1", str(i).encode())
    c = bus.consumer("g")
    c.subscribe(["t"])
    got = [c.poll(1.0) for _ in range(20)]
    assert [m.value for m in got] == [str(i).encode() for i in range(20)]
    assert {m.partition for m in got} == {partition_for(b"session-1", 4)}


def test_committed_offsets_survive_reopening(tmp_path, bus):
    p = bus.producer()
    for i in range(5):
        p.produce("t", b"k", str(i).encode())
    c = bus.consumer("g")
    c.subscribe(["t"])
    first = [c.poll(1.0) for _ in range(3)]
    c.commit([type(c.assignment()[0])(first[-1].topic, first[-1].partition, first[-1].offset + 1)])
    reopened = EmbeddedBus(tmp_path / "bus.sqlite").consumer("g")
    reopened.subscribe(["t"])
    assert reopened.poll(1.0).value == b"3"


def test_unknown_topic_is_refused(bus):
    with pytest.raises(BusError, match="unknown topic"):
        bus.producer().produce("nope", b"k", b"v")


def test_poll_wakes_when_another_thread_produces(bus):
    c = bus.consumer("g")
    c.subscribe(["t"])
    assert c.poll(0.01) is None
    threading.Timer(0.05, lambda: bus.producer().produce("t", b"k", b"late")).start()
    assert c.poll(2.0).value == b"late"


def test_transaction_writes_records_and_offsets_together(bus):
    p = bus.producer(transactional_id="x")
    p.init_transactions()
    c = bus.consumer("g")
    c.subscribe(["t"])
    p.begin_transaction()
    p.produce("t", b"k", b"in-txn")
    from backbone.bus import TopicPartition
    p.send_offsets_to_transaction([TopicPartition("t", 0, 7)], c)
    reader = bus.consumer("other")
    reader.subscribe(["t"])
    assert reader.poll(0.05) is None  # not visible before commit
    p.commit_transaction()
    assert reader.poll(1.0).value == b"in-txn"
    assert c.committed([TopicPartition("t", 0)])[0].offset == 7
