"""The embedded bus: a durable single-machine log in one SQLite file, with Kafka's
topic / key-hashed partition / offset / group-offset semantics as the runtime uses them.

It is the default for `avatar demo` and unit tests. It is NOT a distributed broker: one
consumer per group gets every partition, and durability is SQLite's (WAL, crash-safe for
process crashes).
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

from backbone.bus import (AssignCallback, BusConsumer, BusError, DeliveryCallback, Headers,
                          Message, TopicPartition, partition_for)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL,
                                   config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS records (topic TEXT NOT NULL, part INTEGER NOT NULL,
    off INTEGER NOT NULL, key BLOB, value BLOB, headers TEXT NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (topic, part, off)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL,
    part INTEGER NOT NULL, off INTEGER NOT NULL, PRIMARY KEY (grp, topic, part)) WITHOUT ROWID;
"""
# A poll with nothing new re-reads the file this often when another process is writing;
# in-process writers wake readers at once through a condition variable.
POLL_INTERVAL_S = 0.005
FETCH_ROWS = 500  # rows read per partition per fetch: bounds memory like max.partition.fetch.bytes
# Rows an admin read (replay, restore) takes from its one statement at a time: small batches
# of a single query cost half of what paging with a new query per 500 rows did (measured).
READ_ROWS = 64
# Admin reads map the file instead of copying each page through SQLite's page cache: a
# replay reads every byte of a session (video is ~12 KB a frame), and this halves the cost
# of a row (measured 4.3 -> 2.3 us). Address space only; the OS page cache backs it.
READ_MMAP_BYTES = 1 << 30

_conditions: dict[str, threading.Condition] = {}
_conditions_lock = threading.Lock()


def _condition(path: str) -> threading.Condition:
    with _conditions_lock:
        return _conditions.setdefault(path, threading.Condition())


def _encode_headers(headers: Headers) -> str:
    return json.dumps([[k, v.hex()] for k, v in headers])


def _decode_headers(text: str) -> Headers:
    # A list comprehension, not a generator: replay reads every header of a session.
    return tuple([(k, bytes.fromhex(v)) for k, v in json.loads(text)])


class EmbeddedBus:
    name = "embedded"

    def __init__(self, path: str | Path) -> None:
        self.path = str(Path(path).expanduser())
        self._local = threading.local()
        # Partition counts never change once a topic exists; cached so a produce is one
        # write instead of a read and a write.
        self._partitions: dict[str, int] = {}

    def connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._local.conn = conn
        return conn

    def notify(self) -> None:
        cond = _condition(self.path)
        with cond:
            cond.notify_all()

    def wait(self, timeout_s: float) -> None:
        cond = _condition(self.path)
        with cond:
            cond.wait(min(timeout_s, POLL_INTERVAL_S) if timeout_s > 0 else 0)

    def partitions(self, topic: str) -> int:
        if topic in self._partitions:
            return self._partitions[topic]
        row = self.connect().execute("SELECT partitions FROM topics WHERE name=?",
                                     (topic,)).fetchone()
        if row is None:
            raise BusError(f"unknown topic {topic!r} (topics are provisioned, not auto-created)",
                           retriable=False, fatal=False)
        self._partitions[topic] = int(row[0])
        return self._partitions[topic]

    def append(self, conn: sqlite3.Connection, topic: str, key: bytes | None,
               value: bytes | None, headers: Headers) -> Message:
        n = self.partitions(topic)
        part = partition_for(key, n) if key is not None else int(time.time_ns() % n)
        (off,) = conn.execute("SELECT COALESCE(MAX(off) + 1, 0) FROM records "
                              "WHERE topic=? AND part=?", (topic, part)).fetchone()
        ts = int(time.time() * 1000)
        conn.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?)",
                     (topic, part, off, key, value, _encode_headers(headers), ts))
        return Message(topic, part, int(off), key, value, headers, ts)

    def producer(self, *, transactional_id: str | None = None) -> EmbeddedProducer:
        return EmbeddedProducer(self, transactional_id)

    def consumer(self, group: str, *, read_committed: bool = False) -> EmbeddedConsumer:
        # Every write is already atomic and visible only when committed, so read_committed
        # needs nothing extra here.
        return EmbeddedConsumer(self, group)

    def admin(self) -> EmbeddedAdmin:
        return EmbeddedAdmin(self)

    def purge_key(self, topic: str, key: bytes) -> None:
        """Delete every record of `key` on `topic` from the file (crypto-shredding a session's
        data key: unlike Kafka's compaction, nothing lingers)."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM records WHERE topic=? AND key=?", (topic, key))
        conn.execute("COMMIT")

    def tail(self, topics: Sequence[str]) -> EmbeddedTail:
        return EmbeddedTail(self, topics)


class EmbeddedProducer:
    def __init__(self, bus: EmbeddedBus, transactional_id: str | None) -> None:
        self.bus = bus
        self.transactional_id = transactional_id
        self._callbacks: deque[tuple[DeliveryCallback, Exception | None, Message | None]] = deque()
        self._txn: list[tuple[str, bytes | None, bytes | None, Headers,
                              DeliveryCallback | None]] | None = None
        self._txn_offsets: list[tuple[str, TopicPartition]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: Headers = (), on_delivery: DeliveryCallback | None = None) -> None:
        if self._txn is not None:
            self._txn.append((topic, key, value, headers, on_delivery))
            return
        conn = self.bus.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            msg = self.bus.append(conn, topic, key, value, headers)
            conn.execute("COMMIT")
        except BusError:
            conn.execute("ROLLBACK")
            raise
        self.bus.notify()
        if on_delivery is not None:
            self._callbacks.append((on_delivery, None, msg))

    def poll(self, timeout_s: float = 0.0) -> int:
        n = 0
        while self._callbacks:
            cb, err, msg = self._callbacks.popleft()
            cb(err, msg)
            n += 1
        return n

    def flush(self, timeout_s: float = 30.0) -> int:
        self.poll()
        return 0

    def init_transactions(self, timeout_s: float = 30.0) -> None:
        if self.transactional_id is None:
            raise BusError("producer has no transactional id")

    def begin_transaction(self) -> None:
        self._txn = []
        self._txn_offsets = []

    def send_offsets_to_transaction(self, offsets: Sequence[TopicPartition],
                                    consumer: BusConsumer) -> None:
        group = getattr(consumer, "group", None)
        if group is None:
            raise BusError("consumer is not an embedded consumer")
        self._txn_offsets.extend((group, tp) for tp in offsets)

    def commit_transaction(self, timeout_s: float = 30.0) -> None:
        if self._txn is None:
            raise BusError("no transaction in progress")
        conn = self.bus.connect()
        conn.execute("BEGIN IMMEDIATE")
        delivered = []
        try:
            for topic, key, value, headers, cb in self._txn:
                delivered.append((cb, self.bus.append(conn, topic, key, value, headers)))
            for group, tp in self._txn_offsets:
                conn.execute("INSERT OR REPLACE INTO group_offsets VALUES (?,?,?,?)",
                             (group, tp.topic, tp.partition, tp.offset))
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        finally:
            self._txn = None
            self._txn_offsets = []
        self.bus.notify()
        for cb, msg in delivered:
            if cb is not None:
                self._callbacks.append((cb, None, msg))

    def abort_transaction(self, timeout_s: float = 30.0) -> None:
        self._txn = None
        self._txn_offsets = []

    def close(self) -> None:
        self.flush()


class EmbeddedConsumer:
    def __init__(self, bus: EmbeddedBus, group: str) -> None:
        self.bus = bus
        self.group = group
        self._topics: list[str] = []
        self._positions: dict[tuple[str, int], int] = {}
        self._buffer: deque[Message] = deque()
        self._on_assign: AssignCallback | None = None
        self._on_revoke: AssignCallback | None = None
        self._assigned = False
        self._closed = False

    def subscribe(self, topics: Sequence[str], on_assign: AssignCallback | None = None,
                  on_revoke: AssignCallback | None = None) -> None:
        self._topics = list(topics)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._assigned = False

    def _assign(self) -> None:
        conn = self.bus.connect()
        tps = []
        for topic in self._topics:
            for p in range(self.bus.partitions(topic)):
                row = conn.execute("SELECT off FROM group_offsets WHERE grp=? AND topic=? "
                                   "AND part=?", (self.group, topic, p)).fetchone()
                self._positions[(topic, p)] = int(row[0]) if row else 0
                tps.append(TopicPartition(topic, p, self._positions[(topic, p)]))
        self._assigned = True
        if self._on_assign is not None:
            self._on_assign(tps)

    def _fetch(self) -> None:
        conn = self.bus.connect()
        batch: list[Message] = []
        for (topic, p), pos in self._positions.items():
            rows = conn.execute("SELECT off, key, value, headers, ts FROM records WHERE topic=? "
                                "AND part=? AND off>=? ORDER BY off LIMIT ?",
                                (topic, p, pos, FETCH_ROWS)).fetchall()
            for off, key, value, headers, ts in rows:
                batch.append(Message(topic, p, int(off), key, value, _decode_headers(headers),
                                     int(ts)))
            if rows:
                self._positions[(topic, p)] = int(rows[-1][0]) + 1
        # Interleave partitions by write time, as a broker would serve them.
        batch.sort(key=lambda m: m.timestamp_ms)
        self._buffer.extend(batch)

    def poll(self, timeout_s: float) -> Message | None:
        if self._closed:
            raise BusError("consumer is closed")
        if not self._assigned:
            self._assign()
        deadline = time.monotonic() + timeout_s
        while not self._buffer:
            self._fetch()
            if self._buffer:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.bus.wait(left)
        return self._buffer.popleft()

    def commit(self, offsets: Sequence[TopicPartition], asynchronous: bool = False) -> None:
        conn = self.bus.connect()
        conn.execute("BEGIN IMMEDIATE")
        for tp in offsets:
            conn.execute("INSERT OR REPLACE INTO group_offsets VALUES (?,?,?,?)",
                         (self.group, tp.topic, tp.partition, tp.offset))
        conn.execute("COMMIT")

    def committed(self, partitions: Sequence[TopicPartition]) -> list[TopicPartition]:
        conn = self.bus.connect()
        out = []
        for tp in partitions:
            row = conn.execute("SELECT off FROM group_offsets WHERE grp=? AND topic=? AND part=?",
                               (self.group, tp.topic, tp.partition)).fetchone()
            out.append(TopicPartition(tp.topic, tp.partition, int(row[0]) if row else -1))
        return out

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self._positions.items()]

    def close(self) -> None:
        if self._assigned and self._on_revoke is not None:
            self._on_revoke(self.assignment())
        self._closed = True


class EmbeddedTail(EmbeddedConsumer):
    """Follows `topics` from their current end, with no group and no commits."""

    def __init__(self, bus: EmbeddedBus, topics: Sequence[str]) -> None:
        super().__init__(bus, group="")
        self._topics = list(topics)
        self._assign()  # the end is "now", not the first poll

    def _assign(self) -> None:
        admin = EmbeddedAdmin(self.bus)
        for topic in self._topics:
            for p in range(self.bus.partitions(topic)):
                self._positions[(topic, p)] = admin.watermarks(topic, p)[1]
        self._assigned = True


class EmbeddedAdmin:
    def __init__(self, bus: EmbeddedBus) -> None:
        self.bus = bus

    def create_topics(self, names: Sequence[str], partitions: int,
                      configs: dict[str, dict[str, str]] | None = None) -> None:
        conn = self.bus.connect()
        for name in names:
            conn.execute("INSERT OR IGNORE INTO topics VALUES (?,?,?)",
                         (name, partitions, json.dumps((configs or {}).get(name, {}))))

    def list_topics(self) -> dict[str, int]:
        rows = self.bus.connect().execute("SELECT name, partitions FROM topics").fetchall()
        return {str(n): int(p) for n, p in rows}

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        row = self.bus.connect().execute(
            "SELECT MIN(off), MAX(off) FROM records WHERE topic=? AND part=?",
            (topic, partition)).fetchone()
        if row[0] is None:
            return 0, 0
        return int(row[0]), int(row[1]) + 1

    def _reading(self) -> sqlite3.Connection:
        conn = self.bus.connect()
        if not getattr(self.bus._local, "mapped", False):
            conn.execute(f"PRAGMA mmap_size={READ_MMAP_BYTES}")
            self.bus._local.mapped = True
        return conn

    def read(self, topic: str, partition: int, start: int = 0, end: int | None = None,
             timeout_s: float = 10.0) -> Iterator[Message]:
        if end is None:
            end = self.watermarks(topic, partition)[1]
        cursor = self._reading().execute(
            "SELECT off, key, value, headers, ts FROM records WHERE topic=? AND part=? "
            "AND off>=? AND off<? ORDER BY off", (topic, partition, start, end))
        while rows := cursor.fetchmany(READ_ROWS):
            for off, key, value, headers, ts in rows:
                yield Message(topic, partition, int(off), key, value, _decode_headers(headers),
                              int(ts))

    def read_key(self, topic: str, partition: int, key: bytes,
                 headers: Sequence[str]) -> Iterator[tuple[int, bytes | None,
                                                         list[bytes | None]]]:
        """(offset, value, the named headers or None) of one key's records, in order: what
        a tool scanning a whole session (replay verify) needs, with the key filtered in
        SQLite and no Message or full header tuple built per record."""
        end = self.watermarks(topic, partition)[1]
        conn = self._reading()
        fromhex = bytes.fromhex
        # The named pairs found straight in the stored JSON (as _encode_headers writes it:
        # a quote inside a name is escaped, so a match is always a whole [name, hex] pair);
        # a record stored any other way is parsed as JSON.
        find = re.compile(r'\["(' + "|".join(re.escape(h) for h in headers)
                          + r')", "([0-9a-f]*)"\]').findall
        wanted = len(headers)
        cursor = conn.execute("SELECT off, value, headers FROM records WHERE topic=? AND "
                              "part=? AND key=? AND off<? ORDER BY off",
                              (topic, partition, key, end))
        while rows := cursor.fetchmany(READ_ROWS):
            for off, value, text in rows:
                found = find(text)
                if len(found) != wanted:
                    found = [(k, v) for k, v in json.loads(text) if k in headers]
                named = dict(reversed(found))  # the first of a repeated header wins
                yield off, value, [None if (v := named.get(h)) is None else fromhex(v)
                                   for h in headers]

    def partitions_for(self, key: bytes, topic: str) -> int:
        return partition_for(key, self.bus.partitions(topic))

    def close(self) -> None:
        pass
