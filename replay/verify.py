"""`avatar replay verify SESSION`: check a session's integrity links and name every record
that was modified, deleted, reordered or injected after it was written.

Each producer chains its records per (session, topic) (backbone/integrity.py). A record is
authentic when its link is the HMAC of the link it claims to follow and its own stored bytes;
the chain order is what the links say, so the log order, the links and the audit topic's
checkpoints together show what happened to the log.
"""
from __future__ import annotations

import binascii
import hashlib
import hmac
from collections import defaultdict
from itertools import groupby
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

from backbone import integrity
from backbone.bus import Bus, BusAdmin, Message
from backbone.codec import AvroCodec, DecodeError
from backbone.integrity import GENESIS, LINK_BYTES
from backbone.records import IntegrityCheckpoint
from backbone.settings import Settings
from backbone.topics import TOPICS
from backbone.tracing import H_SEQ, H_STAGE

TAMPERING = ("modified", "deleted", "reordered", "injected", "unchained")
# Not tampering, reported so an auditor sees them: a producer restarted its chain (gateway
# restart), or a stage re-emitted a record after a fail-over (same seq, its own link).
NOTICES = ("restarted", "replayed")
UNCHAINED_TOPICS = ("deadletter",)  # dead letters quote other records; they are not chained


@dataclass(frozen=True)
class Finding:
    kind: str
    topic: str
    partition: int
    offset: int
    stage: str
    seq: int
    detail: str

    def line(self) -> str:
        return (f"{self.kind.upper():9} {self.topic}[{self.partition}]@{self.offset} "
                f"stage={self.stage or '?'} seq={self.seq}: {self.detail}")


@dataclass
class VerifyReport:
    session_id: str
    records: int = 0
    chains: int = 0
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.kind in TAMPERING for f in self.findings)

    @property
    def tampering(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in TAMPERING]

    def text(self) -> str:
        head = (f"session {self.session_id}: {self.records} records in {self.chains} chains, "
                f"{self.checkpoints} checkpoints: "
                f"{'INTACT' if self.ok else f'{len(self.tampering)} PROBLEMS'}")
        return "\n".join([head] + [f.line() for f in self.findings])


class _Rec(NamedTuple):  # a tuple: one is made per record, and a tuple is the cheapest
    position: int  # in its chain
    partition: int
    offset: int
    stage: str
    seq: int
    link: bytes | None
    prev: bytes | None
    authentic: bool = False


def read_session_raw(bus: Bus, settings: Settings, session_id: str) -> list[tuple[str, Message]]:
    """Every record of the session on every chained topic, in log order per topic."""
    return list(iter_session_raw(bus, settings, session_id))


def iter_session_raw(bus: Bus, settings: Settings, session_id: str) -> Iterator[tuple[str, Message]]:
    """`read_session_raw` as a stream."""
    admin = bus.admin()
    key = session_id.encode()
    for logical, physical, partition in _chained_partitions(admin, settings, key):
        for m in admin.read(physical, partition):
            if m.key == key:
                yield logical, m


def _chained_partitions(admin: BusAdmin, settings: Settings,
                        key: bytes) -> Iterator[tuple[str, str, int]]:
    existing = admin.list_topics()
    for logical in TOPICS:
        physical = settings.topic(logical)
        if logical in UNCHAINED_TOPICS or physical not in existing:
            continue
        yield logical, physical, admin.partitions_for(key, physical)


# What verification reads of a record: offset, stored value, [stage, seq, link, link_prev].
_Row = tuple[int, "bytes | None", "list[bytes | None]"]
_LINK_HEADERS = (H_STAGE, H_SEQ, integrity.H_LINK, integrity.H_LINK_PREV)


def _session_partitions(bus: Bus, settings: Settings,
                        session_id: str) -> Iterator[tuple[str, int, Iterable[_Row]]]:
    """Per chained topic: its partition and the session's records on it, streamed through
    the embedded bus's keyed read when there is one (no Message per record), otherwise
    through the bus's ordinary partition read."""
    admin = bus.admin()
    key = session_id.encode()
    read_key = getattr(admin, "read_key", None)
    for logical, physical, partition in _chained_partitions(admin, settings, key):
        if read_key is not None:
            yield logical, partition, read_key(physical, partition, key, _LINK_HEADERS)
        else:
            yield logical, partition, (_row(m) for m in admin.read(physical, partition)
                                       if m.key == key)


def _row(m: Message) -> _Row:
    return m.offset, m.value, [m.header(h) for h in _LINK_HEADERS]


def verify_records(session_id: str, records: Iterable[tuple[str, Message]],
                   key: bytes) -> VerifyReport:
    """Verify records already read (topic, message), e.g. from `read_session_raw`."""
    runs = groupby(records, key=lambda tm: (tm[0], tm[1].partition))
    return _verify(session_id, ((topic, partition, (_row(m) for _, m in run))
                                for (topic, partition), run in runs), key)


def _verify(session_id: str, partitions: Iterable[tuple[str, int, Iterable[_Row]]],
            key: bytes) -> VerifyReport:
    report = VerifyReport(session_id)
    codec = AvroCodec()
    chains: dict[tuple[str, str], list[_Rec]] = defaultdict(list)
    checkpoints: list[tuple[_Rec, IntegrityCheckpoint]] = []
    unhex = binascii.unhexlify  # takes the header's bytes as they are (fromhex wants a str)
    sha256 = hashlib.sha256
    hmac_digest = hmac.digest
    stages: dict[bytes | None, str] = {}
    # Per (topic, stage): its chain and the middle of every link's MAC input (see
    # integrity.link); records of one chain come in runs, so the last one is kept at hand.
    mids: dict[tuple[str, str], bytes] = {}
    last: tuple[str, str] | None = None
    chain: list[_Rec] = []
    mid = b""
    count = 0
    for topic, partition, rows in partitions:
        # The hot loop of `replay verify` (every record of a session): four headers per
        # record, two C calls for the hashes, and nothing kept of a record but its place
        # in its chain.
        for offset, value, (raw_stage, raw_seq, a, b) in rows:
            count += 1
            stage = stages.get(raw_stage)
            if stage is None:
                stage = stages[raw_stage] = (raw_stage.decode("utf-8", "replace")
                                             if raw_stage else "")
            try:
                seq = int(raw_seq or b"")
            except ValueError:
                seq = -1
            try:
                got = unhex(a) if a else None
                prev = unhex(b) if b else None
            except ValueError:  # binascii.Error is one
                got = prev = None
            if last != (topic, stage):
                last = (topic, stage)
                chain = chains[last]
                mid = mids.get(last) or mids.setdefault(
                    last, f"\x00{topic}\x00{stage}\x00".encode())
            if got is None or prev is None or len(got) != LINK_BYTES or len(prev) != LINK_BYTES:
                report.findings.append(_finding("unchained", topic, _Rec(
                    len(chain), partition, offset, stage, seq, None, None),
                    "no integrity link: not written by a producer of this system"))
                continue
            # integrity.link, inlined: the same MAC input, from the cached middle.
            authentic = hmac_digest(key, b"".join((prev, mid, b"%d\x00" % seq,
                                                   sha256(value or b"").digest())),
                                    "sha256")[:LINK_BYTES] == got
            rec = _Rec(len(chain), partition, offset, stage, seq, got, prev, authentic)
            chain.append(rec)
            if authentic and topic == "audit":
                try:
                    cp = codec.decode(value, "integrity_checkpoint")
                except DecodeError:
                    continue
                if isinstance(cp, IntegrityCheckpoint):
                    checkpoints.append((rec, cp))
    report.records = count
    report.chains = len(chains)
    produced: dict[tuple[str, str], dict[bytes, _Rec]] = {}
    for (topic, stage), recs in chains.items():
        produced[(topic, stage)] = _check_chain(topic, recs, report)
    for rec, cp in checkpoints:
        report.checkpoints += 1
        for h in cp.heads:
            heads = produced.get((h.topic, cp.stage), {})
            found = heads.get(bytes.fromhex(h.link)) if len(h.link) == 32 else None
            if found is None or found.seq != h.seq:
                report.findings.append(Finding(
                    "deleted", h.topic, -1, -1, cp.stage, h.seq,
                    f"the checkpoint at audit@{rec.offset} lists seq {h.seq} as the "
                    f"{cp.stage} chain's head, and no such record is in the log"))
    report.findings.sort(key=lambda f: (f.kind not in TAMPERING, f.topic, f.offset))
    return report


def _check_chain(topic: str, recs: list[_Rec], report: VerifyReport) -> dict[bytes, _Rec]:
    seen: set[tuple[int, bytes]] = set()
    unique = []
    for r in recs:
        assert r.link is not None
        if (r.seq, r.link) in seen:
            continue  # an at-least-once duplicate: the same record delivered twice
        seen.add((r.seq, r.link))
        unique.append(r)
    produced: dict[bytes, _Rec] = {}
    followed = {r.prev for r in unique if r.authentic}
    for r in unique:
        assert r.link is not None
        if r.authentic:
            produced.setdefault(r.link, r)
        elif r.link in followed:
            # Someone followed this record's link: it was linked, then its bytes changed.
            produced.setdefault(r.link, r)
            report.findings.append(_finding("modified", topic, r, "its stored bytes or "
                                            "headers no longer match its integrity link"))
        else:
            report.findings.append(_finding("injected", topic, r, "its integrity link was "
                                            "not made with this session's key"))
    by_prev: dict[bytes, list[_Rec]] = defaultdict(list)
    for pos, r in enumerate(unique):
        if not r.authentic:
            continue
        assert r.prev is not None
        by_prev[r.prev].append(r)
        if r.prev == GENESIS:
            if pos and any(x.authentic for x in unique[:pos]):
                report.findings.append(_finding("restarted", topic, r, "the producer started "
                                                "this chain again (a restart)"))
            continue
        before = produced.get(r.prev)
        if before is None:
            report.findings.append(_finding("deleted", topic, r, "it follows a record that "
                                            "is not in the log: the record(s) before it "
                                            "were deleted"))
        elif before.offset > r.offset:
            report.findings.append(_finding("reordered", topic, r, "it is stored before the "
                                            f"record it follows (offset {before.offset})"))
    for prev, forks in by_prev.items():
        for r in forks[1:]:
            if any(f.seq == r.seq for f in forks[:1]):
                report.findings.append(_finding("replayed", topic, r, "re-emitted after a "
                                                "fail-over with the same seq"))
    return produced


def _finding(kind: str, topic: str, r: _Rec, detail: str) -> Finding:
    return Finding(kind, topic, r.partition, r.offset, r.stage, r.seq, detail)


def verify_session(bus: Bus, settings: Settings, session_id: str,
                   key: bytes | None = None) -> VerifyReport:
    return _verify(session_id, _session_partitions(bus, settings, session_id),
                   key or integrity.session_key(session_id))
