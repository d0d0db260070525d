"""The bus seen by the runtime: a topic/partition/offset log with producers, group consumers
and an admin. Two implementations: `backbone.kafka` (real broker) and `backbone.embedded` (SQLite).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

Headers = tuple[tuple[str, bytes], ...]


class BusError(RuntimeError):
    """A bus failure; `retriable` says whether trying again can help, `fatal` that the
    client is unusable. Anything unclassified is treated as fatal."""

    def __init__(self, message: str, *, retriable: bool = False, fatal: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.fatal = fatal


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class TopicPartition:
    topic: str
    partition: int
    offset: int = -1  # next offset to read when committing, as Kafka does


DeliveryCallback = Callable[[Exception | None, Message | None], None]
AssignCallback = Callable[[Sequence[TopicPartition]], None]


class BusProducer(Protocol):
    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: Headers = (), on_delivery: DeliveryCallback | None = None) -> None: ...
    def poll(self, timeout_s: float = 0.0) -> int: ...
    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for every produced record to be acknowledged; returns how many are still
        pending (0 when all were delivered)."""
        ...
    # Transactions (exactly-once). Implementations without them raise BusError.
    def init_transactions(self, timeout_s: float = 30.0) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(self, offsets: Sequence[TopicPartition],
                                    consumer: BusConsumer) -> None: ...
    def commit_transaction(self, timeout_s: float = 30.0) -> None: ...
    def abort_transaction(self, timeout_s: float = 30.0) -> None: ...
    def close(self) -> None: ...


class BusConsumer(Protocol):
    def subscribe(self, topics: Sequence[str], on_assign: AssignCallback | None = None,
                  on_revoke: AssignCallback | None = None) -> None: ...
    def poll(self, timeout_s: float) -> Message | None: ...
    def commit(self, offsets: Sequence[TopicPartition], asynchronous: bool = False) -> None: ...
    def committed(self, partitions: Sequence[TopicPartition]) -> list[TopicPartition]: ...
    def assignment(self) -> list[TopicPartition]: ...
    def close(self) -> None: ...


class BusAdmin(Protocol):
    def create_topics(self, names: Sequence[str], partitions: int,
                      configs: dict[str, dict[str, str]] | None = None) -> None: ...
    def list_topics(self) -> dict[str, int]: ...
    def watermarks(self, topic: str, partition: int) -> tuple[int, int]: ...
    def read(self, topic: str, partition: int, start: int = 0,
             end: int | None = None, timeout_s: float = 10.0) -> Iterator[Message]:
        """Records of one partition from `start` up to (not including) `end`, or up to the
        high watermark seen when the call began."""
        ...
    def partitions_for(self, key: bytes, topic: str) -> int: ...
    def close(self) -> None: ...


class BusTail(Protocol):
    """Follows topics from their current end, outside any consumer group and committing
    nothing: what a gateway streaming live sessions to viewers needs."""

    def poll(self, timeout_s: float) -> Message | None: ...
    def close(self) -> None: ...


class Bus(Protocol):
    name: str

    def producer(self, *, transactional_id: str | None = None) -> BusProducer: ...
    def consumer(self, group: str, *, read_committed: bool = False) -> BusConsumer: ...
    def admin(self) -> BusAdmin: ...
    def tail(self, topics: Sequence[str]) -> BusTail: ...


def murmur2(data: bytes) -> int:
    """Kafka's default key hash (Java client and librdkafka's murmur2 partitioner), so a
    session lands on the same partition number whichever client or bus wrote it."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = data[4 * n4:]
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions
