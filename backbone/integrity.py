"""Tamper evidence: every record a stage or the gateway writes carries an HMAC link chained
over its session, topic, producer, sequence number and stored bytes.

Header `link` = HMAC(session key, `link_prev` | topic | stage | seq | sha256(payload)), 16
bytes hex, and `link_prev` names the link it follows, so `replay verify` can tell a modified
record (its link no longer matches its bytes) from a deleted one (a later record follows a
link that is not in the log), a reordered one and an injected one (a link nobody with the key
made). The session key is derived from one master key, so an auditor can be given the key of
one session without the others'.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import Final

from backbone.bus import Message

log = logging.getLogger("avatar.integrity")

H_LINK: Final = "link"
H_LINK_PREV: Final = "link_prev"
LINK_BYTES: Final = 16  # 128-bit tags: forging one by chance is out of reach
GENESIS: Final = bytes(LINK_BYTES)  # the link before a chain's first record
MASTER_ENV: Final = "AVATAR_INTEGRITY_KEY"
# Used when AVATAR_INTEGRITY_KEY is unset, so development logs are still chained; a
# deployment sets its own key (and keeps it away from whoever can write the log).
DEV_MASTER: Final = b"avatar-backbone development integrity key"
_warned = False


def master_key() -> bytes:
    global _warned
    raw = os.environ.get(MASTER_ENV, "")
    if not raw:
        if not _warned:
            log.warning("AVATAR_INTEGRITY_KEY is not set: records are chained with the "
                        "public development key")
            _warned = True
        return DEV_MASTER
    try:
        return bytes.fromhex(raw) if len(raw) % 2 == 0 and len(raw) >= 32 else raw.encode()
    except ValueError:
        return raw.encode()


def session_key(session_id: str, master: bytes | None = None) -> bytes:
    return hmac.new(master or master_key(), b"avatar-integrity|" + session_id.encode(),
                    hashlib.sha256).digest()


def link(key: bytes, prev: bytes, topic: str, stage: str, seq: int,
         payload: bytes | None) -> bytes:
    return link_of_digest(key, prev, topic, stage, seq, hashlib.sha256(payload or b"").digest())


def link_of_digest(key: bytes, prev: bytes, topic: str, stage: str, seq: int,
                   payload_sha256: bytes) -> bytes:
    """`link` from the payload's sha256 (a verifier may hash payloads elsewhere). One-shot
    `hmac.digest` over the concatenation: the same MAC as feeding the parts in turn, without
    building an HMAC object per record (verification runs this for every record)."""
    msg = b"".join((prev, f"\x00{topic}\x00{stage}\x00{seq}\x00".encode(), payload_sha256))
    return hmac.digest(key, msg, "sha256")[:LINK_BYTES]


def headers(key: bytes, prev: bytes, topic: str, stage: str, seq: int,
            payload: bytes | None) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    """The new link and the two headers that carry it."""
    new = link(key, prev, topic, stage, seq, payload)
    return new, ((H_LINK, new.hex().encode()), (H_LINK_PREV, prev.hex().encode()))


def read_links(msg: Message) -> tuple[bytes, bytes] | None:
    """(link, link_prev) of a record, or None if it carries none (or malformed ones)."""
    a, b = msg.header(H_LINK), msg.header(H_LINK_PREV)
    if not a or not b:
        return None
    try:
        got, prev = bytes.fromhex(a.decode()), bytes.fromhex(b.decode())
    except ValueError:
        return None
    if len(got) != LINK_BYTES or len(prev) != LINK_BYTES:
        return None
    return got, prev


class Chains:
    """Session keys, and the chain heads of a producer that keeps them in memory (the
    gateway, the demo); stages keep theirs in checkpointed session state instead."""

    def __init__(self, master: bytes | None = None) -> None:
        self.master = master
        self._keys: dict[str, bytes] = {}
        # (session, topic, producer) -> (seq, link) of the last record written
        self.heads: dict[tuple[str, str, str], tuple[int, bytes]] = {}

    def next(self, session_id: str, topic: str, stage: str, seq: int,
             payload: bytes | None) -> tuple[tuple[str, bytes], ...]:
        """Headers chaining this record after the previous one on (session, topic, stage)."""
        prev = self.heads.get((session_id, topic, stage), (-1, GENESIS))[1]
        new, hdrs = headers(self.key(session_id), prev, topic, stage, seq, payload)
        self.heads[(session_id, topic, stage)] = (seq, new)
        return hdrs

    def key(self, session_id: str) -> bytes:
        k = self._keys.get(session_id)
        if k is None:
            if len(self._keys) > 10_000:
                self._keys.clear()  # derived keys are cheap to make again
            k = self._keys[session_id] = session_key(session_id, self.master)
        return k
