"""With a schema registry configured, records use the Confluent wire format (magic 0 +
schema id) and decode through the registry; tested against a local registry stand-in that
speaks the two REST calls we use."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from backbone.codec import AvroCodec, DecodeError
from backbone.records import Transcript


class Registry(BaseHTTPRequestHandler):
    schemas: dict[int, str] = {}

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # /subjects/{subject}/versions
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        for sid, text in self.schemas.items():
            if text == body["schema"]:
                return self._reply(200, {"id": sid})
        sid = len(self.schemas) + 1
        self.schemas[sid] = body["schema"]
        self._reply(200, {"id": sid})

    def do_GET(self) -> None:  # /schemas/ids/{id}
        sid = int(self.path.rsplit("/", 1)[1])
        if sid not in self.schemas:
            return self._reply(404, {"error_code": 40403, "message": "Schema not found"})
        self._reply(200, {"schema": self.schemas[sid]})


@pytest.fixture
def registry_url():
    server = HTTPServer(("127.0.0.1", 0), Registry)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_confluent_wire_format_round_trip(registry_url):
    writer = AvroCodec(registry_url=registry_url)
    data = writer.encode(Transcript("s", "hi"), "avatar.transcript")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") >= 1
    reader = AvroCodec(registry_url=registry_url)  # a fresh process: learns the id remotely
    assert reader.decode(data, "transcript") == Transcript("s", "hi")


def test_unknown_schema_id_is_a_schema_mismatch(registry_url):
    with pytest.raises(DecodeError) as e:
        AvroCodec(registry_url=registry_url).decode(b"\x00\x00\x00\x03\xe7abc", "transcript")
    assert e.value.category == "schema_mismatch"
