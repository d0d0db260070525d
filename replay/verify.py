"""`avatar replay verify SESSION`: check a session's integrity links and name every record
that was modified, deleted, reordered or injected after it was written.

Each producer chains its records per (session, topic) (backbone/integrity.py). A record is
authentic when its link is the HMAC of the link it claims to follow and its own stored bytes;
the chain order is what the links say, so the log order, the links and the audit topic's
checkpoints together show what happened to the log.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from backbone import integrity
from backbone.bus import Bus, Message
from backbone.codec import AvroCodec, DecodeError
from backbone.integrity import GENESIS
from backbone.records import IntegrityCheckpoint
from backbone.settings import Settings
from backbone.topics import TOPICS
from backbone.tracing import RecordHeaders

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


@dataclass
class _Rec:
    index: int
    msg: Message
    stage: str
    seq: int
    link: bytes | None
    prev: bytes | None
    authentic: bool = False


def read_session_raw(bus: Bus, settings: Settings, session_id: str) -> list[tuple[str, Message]]:
    """Every record of the session on every chained topic, in log order per topic."""
    admin = bus.admin()
    key = session_id.encode()
    out = []
    existing = admin.list_topics()
    for logical in TOPICS:
        physical = settings.topic(logical)
        if logical in UNCHAINED_TOPICS or physical not in existing:
            continue
        partition = admin.partitions_for(key, physical)
        out += [(logical, m) for m in admin.read(physical, partition) if m.key == key]
    return out


def verify_records(session_id: str, records: list[tuple[str, Message]],
                   key: bytes) -> VerifyReport:
    report = VerifyReport(session_id)
    codec = AvroCodec()
    chains: dict[tuple[str, str], list[_Rec]] = defaultdict(list)
    checkpoints: list[tuple[_Rec, IntegrityCheckpoint]] = []
    for topic, m in records:
        report.records += 1
        hdr = RecordHeaders.decode(m)
        links = integrity.read_links(m)
        rec = _Rec(len(chains[(topic, hdr.stage)]), m, hdr.stage, hdr.seq,
                   links[0] if links else None, links[1] if links else None)
        if links is None:
            report.findings.append(_finding("unchained", topic, rec,
                                            "no integrity link: not written by a producer "
                                            "of this system"))
            continue
        rec.authentic = integrity.link(key, links[1], topic, hdr.stage, hdr.seq,
                                       m.value) == links[0]
        chains[(topic, hdr.stage)].append(rec)
        if topic == "audit" and rec.authentic:
            try:
                cp = codec.decode(m.value, "integrity_checkpoint")
            except DecodeError:
                continue
            if isinstance(cp, IntegrityCheckpoint):
                checkpoints.append((rec, cp))
    report.chains = len(chains)
    produced: dict[tuple[str, str], dict[bytes, _Rec]] = {}
    for (topic, stage), recs in chains.items():
        produced[(topic, stage)] = _check_chain(topic, recs, report)
    for rec, cp in checkpoints:
        report.checkpoints += 1
        for h in cp.heads:
            chain = produced.get((h.topic, cp.stage), {})
            got = chain.get(bytes.fromhex(h.link)) if len(h.link) == 32 else None
            if got is None or got.seq != h.seq:
                report.findings.append(Finding(
                    "deleted", h.topic, -1, -1, cp.stage, h.seq,
                    f"the checkpoint at audit@{rec.msg.offset} lists seq {h.seq} as the "
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
        elif before.msg.offset > r.msg.offset:
            report.findings.append(_finding("reordered", topic, r, "it is stored before the "
                                            f"record it follows (offset {before.msg.offset})"))
    for prev, forks in by_prev.items():
        for r in forks[1:]:
            if any(f.seq == r.seq for f in forks[:1]):
                report.findings.append(_finding("replayed", topic, r, "re-emitted after a "
                                                "fail-over with the same seq"))
    return produced


def _finding(kind: str, topic: str, r: _Rec, detail: str) -> Finding:
    return Finding(kind, topic, r.msg.partition, r.msg.offset, r.stage, r.seq, detail)


def verify_session(bus: Bus, settings: Settings, session_id: str,
                   key: bytes | None = None) -> VerifyReport:
    records = read_session_raw(bus, settings, session_id)
    return verify_records(session_id, records, key or integrity.session_key(session_id))
