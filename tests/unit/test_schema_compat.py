"""Schema evolution guard: every released schema version must stay readable by the current
schema (backward compatibility), so an old session in the log replays after an upgrade.
Releasing a version = copying schemas/X.avsc to schemas/released/X.vN.avsc."""
import io
import json
from pathlib import Path

import fastavro
import pytest
from fastavro.utils import generate_many

from backbone.codec import SCHEMA_DIR, default_schemas
from backbone.records import RECORD_TYPES

RELEASED = sorted((SCHEMA_DIR / "released").glob("*.avsc"))


def test_every_record_type_has_a_schema_and_a_released_version():
    current = {p.stem for p in SCHEMA_DIR.glob("*.avsc")}
    released = {p.stem.rsplit(".", 1)[0] for p in RELEASED}
    assert current == set(RECORD_TYPES) == released


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: p.stem)
def test_current_schema_reads_data_written_with_released_version(path: Path):
    stem = path.stem.rsplit(".", 1)[0]
    writer = fastavro.parse_schema(json.loads(path.read_text()))
    reader = default_schemas().current[stem].parsed
    for datum in generate_many(writer, 20):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, datum)
        buf.seek(0)
        fastavro.schemaless_reader(buf, writer, reader)  # raises on incompatibility


def test_a_new_field_without_default_is_caught():
    """The guard itself works: adding a required field breaks reading old data."""
    path = SCHEMA_DIR / "released" / "transcript.v1.avsc"
    raw = json.loads(path.read_text())
    writer = fastavro.parse_schema(raw)
    broken = dict(raw, fields=raw["fields"] + [{"name": "new_required", "type": "string"}])
    reader = fastavro.parse_schema(broken)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, next(iter(generate_many(writer, 1))))
    buf.seek(0)
    with pytest.raises(Exception):
        fastavro.schemaless_reader(buf, writer, reader)
