"""Avro encoding of every record on the bus.

Single-object encoding (0xC3 0x01 + CRC-64-AVRO fingerprint) by default; the Confluent wire
format (0x00 + schema id) when a schema registry URL is configured. Decoding accepts any
released writer schema of the expected type and resolves it to the current reader schema.
"""
from __future__ import annotations

import io
import json
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from backbone.records import RECORD_TYPES, RecordValue

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "schemas"
SINGLE_OBJECT_MAGIC: Final = b"\xc3\x01"
CONFLUENT_MAGIC: Final = b"\x00"


class DecodeError(ValueError):
    """A payload that cannot become a record; `category` names why (dead-letter field)."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


@dataclass(frozen=True)
class SchemaVersion:
    schema_name: str  # file stem, e.g. "speech_chunk"
    version: str  # "current" or "v1", "v2", ...
    parsed: Any
    canonical: str
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO


def _load(path: Path, stem: str, version: str) -> SchemaVersion:
    raw = json.loads(path.read_text())
    parsed = fastavro.parse_schema(raw, _write_hint=False)
    canonical = to_parsing_canonical_form(raw)
    fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")
    return SchemaVersion(stem, version, parsed, canonical, fp)


class SchemaSet:
    """The current schema of every record type plus every released version."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.current: dict[str, SchemaVersion] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for path in sorted(schema_dir.glob("*.avsc")):
            sv = _load(path, path.stem, "current")
            self.current[path.stem] = sv
            self.by_fingerprint[sv.fingerprint] = sv
        for path in sorted((schema_dir / "released").glob("*.avsc")):
            stem, version = path.stem.rsplit(".", 1)
            sv = _load(path, stem, version)
            self.by_fingerprint.setdefault(sv.fingerprint, sv)


_DEFAULT_SET: SchemaSet | None = None
_DEFAULT_LOCK = threading.Lock()


def default_schemas() -> SchemaSet:
    global _DEFAULT_SET
    with _DEFAULT_LOCK:
        if _DEFAULT_SET is None:
            _DEFAULT_SET = SchemaSet()
        return _DEFAULT_SET


class SchemaRegistryClient:
    """Just enough of the Confluent Schema Registry REST API: register and fetch by id."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, str] = {}
        self._lock = threading.Lock()

    def register(self, subject: str, canonical: str) -> int:
        import httpx

        with self._lock:
            if (subject, canonical) in self._ids:
                return self._ids[(subject, canonical)]
        r = httpx.post(f"{self.url}/subjects/{subject}/versions",
                       json={"schema": canonical}, timeout=self.timeout_s,
                       headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
        r.raise_for_status()
        sid = int(r.json()["id"])
        with self._lock:
            self._ids[(subject, canonical)] = sid
            self._schemas[sid] = canonical
        return sid

    def schema(self, schema_id: int) -> str:
        import httpx

        with self._lock:
            if schema_id in self._schemas:
                return self._schemas[schema_id]
        r = httpx.get(f"{self.url}/schemas/ids/{schema_id}", timeout=self.timeout_s)
        if r.status_code == 404:
            raise DecodeError("schema_mismatch", f"schema id {schema_id} unknown to the registry")
        r.raise_for_status()
        text = str(r.json()["schema"])
        with self._lock:
            self._schemas[schema_id] = text
        return text


class AvroCodec:
    """Encodes record dataclasses to bytes and back. Thread-safe; no I/O until first use."""

    def __init__(self, schemas: SchemaSet | None = None, registry_url: str = "") -> None:
        self.schemas = schemas or default_schemas()
        self.registry = SchemaRegistryClient(registry_url) if registry_url else None
        self._registry_parsed: dict[int, SchemaVersion] = {}

    def encode(self, value: RecordValue, topic: str = "") -> bytes:
        sv = self.schemas.current[value.SCHEMA]
        buf = io.BytesIO()
        if self.registry is not None:
            sid = self.registry.register(f"{topic}-value", sv.canonical)
            buf.write(CONFLUENT_MAGIC + struct.pack(">I", sid))
        else:
            buf.write(SINGLE_OBJECT_MAGIC + sv.fingerprint)
        fastavro.schemaless_writer(buf, sv.parsed, value.to_avro())
        return buf.getvalue()

    def decode(self, data: bytes | None, expected: str) -> RecordValue:
        """Decode `data`, which must be of schema `expected` (a file stem) in some version."""
        if not data:
            raise DecodeError("undecodable", "empty payload")
        reader = self.schemas.current.get(expected)
        if reader is None:
            raise DecodeError("schema_mismatch", f"no schema named {expected!r}")
        if data[:2] == SINGLE_OBJECT_MAGIC and len(data) >= 10:
            writer = self.schemas.by_fingerprint.get(data[2:10])
            if writer is None:
                raise DecodeError("schema_mismatch",
                                  f"unknown schema fingerprint {data[2:10].hex()}")
            body = data[10:]
        elif data[:1] == CONFLUENT_MAGIC and len(data) >= 5:
            writer = self._registry_writer(struct.unpack(">I", data[1:5])[0])
            body = data[5:]
        else:
            raise DecodeError("undecodable", "payload has neither single-object nor "
                                             "Confluent wire-format magic bytes")
        if writer.schema_name != expected:
            raise DecodeError("schema_mismatch", f"record is a {writer.schema_name} "
                                                 f"({writer.version}), expected {expected}")
        try:
            stream = io.BytesIO(body)
            datum = fastavro.schemaless_reader(stream, writer.parsed, reader.parsed)
            if stream.tell() != len(body):
                raise DecodeError("undecodable",
                                  f"{len(body) - stream.tell()} trailing bytes after the record")
        except DecodeError:
            raise
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError("undecodable", f"avro decode failed: {type(exc).__name__}: {exc}")
        try:
            return RECORD_TYPES[expected].from_avro(datum)  # type: ignore[no-any-return]
        except Exception as exc:
            raise DecodeError("invalid", f"record does not fit {expected}: {exc}")

    def _registry_writer(self, schema_id: int) -> SchemaVersion:
        if self.registry is None:
            raise DecodeError("schema_mismatch",
                              "Confluent wire format but no schema registry configured")
        if schema_id not in self._registry_parsed:
            text = self.registry.schema(schema_id)
            raw = json.loads(text)
            canonical = to_parsing_canonical_form(raw)
            fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")
            known = self.schemas.by_fingerprint.get(fp)
            if known is None:
                raise DecodeError("schema_mismatch", f"registry schema {schema_id} is not a "
                                                     "known version of any record type")
            self._registry_parsed[schema_id] = known
        return self._registry_parsed[schema_id]
