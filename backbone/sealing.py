"""Per-session data keys, so one session can be erased from an immutable log (crypto-shredding).

With AVATAR_SEAL=1 every record body is sealed (AES-256-GCM) with its session's own random
data key; the key, wrapped with AVATAR_DATA_MASTER_KEY, lives on the compacted `keys` topic.
`avatar replay erase SESSION` deletes that key: the session's records stay in the log (and
their integrity links still verify, since links cover the stored bytes) but nobody can read
them again. On Kafka the wrapped key disappears when the compacted topic is cleaned (the
topic is set to clean within minutes); a deployment with a KMS keeps the keys there instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backbone.bus import Bus
from backbone.settings import Settings

log = logging.getLogger("avatar.sealing")

MAGIC: Final = b"\xa7S1"  # not a valid start of Avro single-object (C3 01) or Confluent (00)
NONCE: Final = 12
KEYS_TOPIC: Final = "keys"
SEAL_ENV: Final = "AVATAR_SEAL"
MASTER_ENV: Final = "AVATAR_DATA_MASTER_KEY"
DEV_MASTER: Final = b"avatar-backbone development data master key"
# The keys topic: compacted, cleaned quickly, so an erased key's last copy goes soon.
KEYS_TOPIC_CONFIG: Final = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.01",
                            "segment.ms": "60000", "delete.retention.ms": "60000"}


class SealedError(RuntimeError):
    """A sealed record cannot be opened: its session's key was erased, or it was altered."""


def enabled() -> bool:
    return os.environ.get(SEAL_ENV, "").lower() in ("1", "true", "yes", "on")


def is_sealed(data: bytes | None) -> bool:
    return bool(data) and data[:3] == MAGIC  # type: ignore[index]


def _master() -> bytes:
    raw = os.environ.get(MASTER_ENV, "").encode() or DEV_MASTER
    return hashlib.sha256(b"avatar-data-master|" + raw).digest()


class KeyStore:
    """Data keys of the sessions this process touches, from and to the `keys` topic."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self._cache: dict[str, bytes | None] = {}
        self._wrap = AESGCM(_master())
        self._lock = threading.Lock()
        self.topic = settings.topic(KEYS_TOPIC)

    def _read(self, session_id: str) -> bytes | None:
        admin = self.bus.admin()
        key = session_id.encode()
        partition = admin.partitions_for(key, self.topic)
        latest: bytes | None = None
        for m in admin.read(self.topic, partition):
            if m.key == key:
                latest = m.value  # None: a tombstone, the key was erased
        if latest is None:
            return None
        return self._wrap.decrypt(latest[:NONCE], latest[NONCE:], key)

    def key(self, session_id: str, create: bool = False) -> bytes | None:
        with self._lock:
            if session_id in self._cache and (self._cache[session_id] or not create):
                return self._cache[session_id]
            found = self._read(session_id)
            if found is None and create:
                found = os.urandom(32)
                nonce = os.urandom(NONCE)
                wrapped = nonce + self._wrap.encrypt(nonce, found, session_id.encode())
                producer = self.bus.producer()
                producer.produce(self.topic, session_id.encode(), wrapped)
                if producer.flush(30) != 0:
                    raise SealedError(f"the key of session {session_id} was not stored")
            self._cache[session_id] = found
            return found

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._cache.pop(session_id, None)

    def erase(self, session_id: str) -> None:
        """Delete the session's key: a tombstone on Kafka (gone at the next compaction), the
        rows themselves on the embedded bus."""
        producer = self.bus.producer()
        producer.produce(self.topic, session_id.encode(), None)
        if producer.flush(30) != 0:
            raise SealedError(f"the erasure of session {session_id} was not acknowledged")
        purge = getattr(self.bus, "purge_key", None)
        if callable(purge):
            purge(self.topic, session_id.encode())
        self.forget(session_id)


def seal(key: bytes, session_id: str, topic: str, body: bytes) -> bytes:
    nonce = os.urandom(NONCE)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, body, f"{session_id}|{topic}".encode())


def unseal(key: bytes | None, session_id: str, topic: str, data: bytes) -> bytes:
    if key is None:
        raise SealedError(f"session {session_id} was erased: its data key is gone")
    try:
        return AESGCM(key).decrypt(data[3:3 + NONCE], data[3 + NONCE:],
                                   f"{session_id}|{topic}".encode())
    except Exception as exc:
        raise SealedError(f"a sealed record of session {session_id} on {topic} does not open "
                          f"({type(exc).__name__})") from None
