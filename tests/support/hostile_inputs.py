"""Hostile inputs at the gateway's edges: uploads (bombs, lying headers, wrong codecs and
types), WebSocket messages and WHEP offers. Each upload case names the status it must get."""
from __future__ import annotations

import io
import struct
import zipfile

import numpy as np


def _wav_header(fmt_tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16,
                data_size: int | None = None, data: bytes = b"\x00\x01" * 100,
                fmt_size: int = 16) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", fmt_size) + fmt + b"data" + \
        struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _encoded(fmt: str, codec: str, seconds: float, rate: int = 48000) -> bytes:
    """Silence encoded with PyAV: compresses to almost nothing, decodes to `seconds`."""
    import av

    buf = io.BytesIO()
    step = 960 if codec == "libopus" else 1152
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        for i in range(0, int(seconds * rate), step):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, step), np.int16), format="s16",
                                               layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("speech.wav", _wav_header(data=bytes(50_000_000)))
    return buf.getvalue()


def upload_cases() -> list[tuple[str, str, bytes, int, str]]:
    """(name, content type, body, status, words in the reason)."""
    gzip_bomb = __import__("gzip").compress(_wav_header(data=bytes(50_000_000)))
    return [
        ("wav_header_claims_4_gb", "audio/wav", _wav_header(data_size=0xFFFFFFF0), 400,
         "claims 4294967280 bytes"),
        ("wav_fmt_chunk_claims_4_gb", "audio/wav",
         b"RIFF\x24\x00\x00\x00WAVEfmt \xf0\xff\xff\xff" + b"\x01\x00" * 8, 400, "claims"),
        ("wav_mp3_codec", "audio/wav", _wav_header(fmt_tag=0x55), 400, "not a PCM WAV"),
        ("wav_float_codec", "audio/wav", _wav_header(fmt_tag=3, bits=32), 400, "not a PCM WAV"),
        ("wav_rate_zero", "audio/wav", _wav_header(rate=0), 400, "sample rate 0"),
        ("wav_65535_channels", "audio/wav", _wav_header(channels=65535, bits=8), 400,
         "no audio"),
        ("zip_bomb_as_zip", "application/zip", _zip_bomb(), 415, "unsupported content type"),
        ("zip_bomb_as_wav", "audio/wav", _zip_bomb(), 400, "not a PCM WAV"),
        ("zip_bomb_as_ogg", "audio/ogg", _zip_bomb(), 400, "cannot decode"),
        ("gzip_bomb_as_wav", "audio/wav", gzip_bomb, 400, "not a PCM WAV"),
        ("opus_ten_minutes_of_silence", "audio/ogg", _encoded("ogg", "libopus", 600), 413,
         "longer than 120 s"),
        ("mp3_sent_as_ogg", "audio/ogg", _encoded("mp3", "libmp3lame", 1.0, 44100), 400,
         "cannot decode"),
        ("playlist_sent_as_ogg", "audio/ogg",
         b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n", 400, "cannot decode"),
        ("opus_garbage", "audio/opus", b"OggS" + bytes(range(256)) * 40, 400, "cannot decode"),
        ("random_bytes_as_opus", "audio/ogg", np.random.default_rng(3).bytes(50_000), 400,
         "cannot decode"),
        ("text_plain", "text/plain", b"hello", 415, "unsupported content type"),
        ("no_content_type", "", b"\x00" * 100, 415, "unsupported content type"),
        ("multipart", "multipart/form-data; boundary=x", b"--x\r\n\r\n--x--", 415,
         "unsupported content type"),
        ("pcm_rate_not_a_number", "audio/pcm;rate=nan", b"\x00" * 100, 400, "integers"),
        ("pcm_rate_absurd", "audio/pcm;rate=1000000000", b"\x00" * 100, 400, "outside"),
        ("pcm_zero_channels", "audio/pcm;rate=16000;channels=0", b"\x00" * 100, 400, "outside"),
    ]


def websocket_messages() -> list[tuple[str, str | bytes]]:
    """Messages an integrator's socket may send that no command can come from."""
    rng = np.random.default_rng(5)
    return [
        ("odd_length_bytes", b"\x01\x02\x03"),
        ("five_megabytes", bytes(5_000_000)),
        ("random_text", rng.bytes(3000).decode("latin-1")),
        ("not_json", "{this is not json"),
        ("json_nested_60000_deep", "[" * 60_000),
        ("json_objects_20000_deep", '{"a":' * 20_000 + "1" + "}" * 20_000),
        ("json_5000_digit_number", '{"type": "speak", "text": "x", "n": ' + "9" * 5000 + "}"),
        ("json_lone_surrogate", '{"type": "speak", "text": "\\ud800"}'),
        ("json_nan_intensity", '{"type": "emotion", "emotion": "happy", "intensity": NaN}'),
        ("json_wrong_types", '{"type": ["speak"], "text": 5}'),
        ("json_array", "[1, 2, 3]"),
        ("text_over_64_kb", "x" * 70_000),
    ]


def sdp_offers() -> list[tuple[str, bytes, str, int]]:
    """(name, body, content type, status) for WHEP."""
    m_lines = "".join(f"m=video {9 + i} UDP/TLS/RTP/SAVPF 96\r\na=mid:{i}\r\n" for i in range(300))
    return [
        ("not_sdp", b"hello", "application/sdp", 400),
        ("no_media", b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "application/sdp",
         400),
        ("video_line_only", b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "application/sdp", 400),
        ("three_hundred_m_lines", ("v=0\r\n" + m_lines).encode(), "application/sdp", 400),
        ("binary", bytes(range(256)) * 10, "application/sdp", 400),
        ("over_64_kb", b"v=0\r\n" + b"a=x\r\n" * 20_000, "application/sdp", 413),
        ("wrong_type", b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "text/plain", 415),
    ]
