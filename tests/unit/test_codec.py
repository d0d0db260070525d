"""The Avro codec: round trips, both wire formats' framing, and clear errors on bad bytes."""
import numpy as np
import pytest

from backbone.blendshapes import BLENDSHAPES
from backbone.codec import AvroCodec, DecodeError, default_schemas
from backbone.records import (MotionFrames, PhonemeSpan, PhonemeSpans, SessionConfig,
                              SessionControl, SpeechChunk, VideoChunk)


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def test_motion_frames_round_trip_keeps_every_blendshape(codec):
    w = np.random.default_rng(1).random((4, 52), dtype=np.float32)
    m = MotionFrames("s1", 25, np.arange(10, 14), w, np.full((4, 3), 0.1, np.float32))
    back = codec.decode(codec.encode(m), "motion_frames")
    assert np.array_equal(back.weights, w)
    assert back.frames.tolist() == [10, 11, 12, 13]


def test_motion_schema_names_the_52_arkit_blendshapes():
    schema = default_schemas().current["motion_frames"].parsed
    frame = schema["fields"][3]["type"]["items"]
    shapes = next(f for f in frame["fields"] if f["name"] == "blendshapes")["type"]
    assert tuple(f["name"] for f in shapes["fields"]) == BLENDSHAPES


def test_single_object_encoding_starts_with_magic_and_fingerprint(codec):
    data = codec.encode(SpeechChunk("s", "u", 22050, 0, b"\x00\x01"))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == default_schemas().current["speech_chunk"].fingerprint


def test_nested_records_round_trip(codec):
    c = SessionControl("s", "CREATE", SessionConfig(voice="en-gb", fps=50, consent={"a": "b"}))
    assert codec.decode(codec.encode(c), "session_control") == c
    p = PhonemeSpans("s", "u", 22050, (PhonemeSpan("p", 0, 100), PhonemeSpan("a", 100, 900)))
    assert codec.decode(codec.encode(p), "phoneme_spans") == p


def test_wrong_record_type_is_a_schema_mismatch(codec):
    data = codec.encode(VideoChunk("s", 8, 8, 25, 0, 0, True, b"x"))
    with pytest.raises(DecodeError) as e:
        codec.decode(data, "speech_chunk")
    assert e.value.category == "schema_mismatch"


@pytest.mark.parametrize("payload", [b"", b"hello", b"\xc3\x01" + b"\x00" * 8 + b"abc",
                                     b"\x00\x00\x00\x00\x07abc"])
def test_garbage_is_refused_with_a_category(codec, payload):
    with pytest.raises(DecodeError) as e:
        codec.decode(payload, "speech_chunk")
    assert e.value.category in ("undecodable", "schema_mismatch")


def test_truncated_record_is_undecodable(codec):
    data = codec.encode(SpeechChunk("s", "u", 22050, 0, b"\x00" * 64))
    with pytest.raises(DecodeError) as e:
        codec.decode(data[:-10], "speech_chunk")
    assert e.value.category == "undecodable"
