"""Audio an integrator uploads (WAV, raw PCM or Opus) -> mono s16le PCM for the bus.

Everything hostile stops here with a 4xx reason: unknown types, broken or lying headers,
audio that decodes to more than the limit (a compressed bomb), absurd rates.
"""
from __future__ import annotations

import io

import numpy as np

from backbone.demo import read_wav

MAX_UPLOAD_BYTES = 10_000_000  # ~100 s of 48 kHz PCM; longer audio streams over the WebSocket
MAX_DECODED_S = 120.0  # what a 10 MB Opus file could claim to hold is bounded here
RATE_RANGE = (8000, 48000)
# Compressed upload types -> the one FFmpeg demuxer each may use.
CONTAINERS = {"audio/ogg": "ogg", "audio/opus": "ogg", "audio/webm": "matroska"}


class UploadError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _params(content_type: str) -> tuple[str, dict[str, str]]:
    kind, *rest = [p.strip() for p in content_type.split(";")]
    params = {}
    for p in rest:
        k, _, v = p.partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    return kind.lower(), params


def decode_upload(body: bytes, content_type: str) -> tuple[bytes, int]:
    if len(body) > MAX_UPLOAD_BYTES:
        raise UploadError(413, f"upload of {len(body)} bytes exceeds {MAX_UPLOAD_BYTES}")
    if not body:
        raise UploadError(400, "empty upload")
    kind, params = _params(content_type or "")
    if kind in ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"):
        _check_wav_sizes(body)
        try:
            pcm, sr = read_wav(body, "the WAV upload")
        except ValueError as exc:
            raise UploadError(400, str(exc)) from exc
        except Exception as exc:  # the stdlib wave module raises more than wave.Error
            raise UploadError(400, "the WAV upload is not a PCM WAV file "
                                   f"({type(exc).__name__})") from None
    elif kind in ("audio/l16", "audio/pcm"):
        try:
            sr = int(params.get("rate", "16000"))
            channels = int(params.get("channels", "1"))
        except ValueError:
            raise UploadError(400, "rate and channels must be integers") from None
        if not 1 <= channels <= 8:
            raise UploadError(400, f"channels={channels} is outside 1..8")
        if len(body) % (2 * channels):
            raise UploadError(400, f"{len(body)} bytes is not a whole number of "
                                   f"{channels}-channel 16-bit samples")
        # RFC 2586 L16 is big-endian; "audio/pcm" here means little-endian, as browsers send.
        dtype = ">i2" if kind == "audio/l16" else "<i2"
        x = np.frombuffer(body, dtype).astype(np.int32).reshape(-1, channels).mean(axis=1)
        pcm = x.astype("<i2").tobytes()
    elif kind in CONTAINERS:
        pcm, sr = _decode_compressed(body, CONTAINERS[kind])
    else:
        raise UploadError(415, f"unsupported content type {kind!r}: send audio/wav, "
                               "audio/pcm;rate=N, audio/L16;rate=N or audio/ogg (Opus)")
    if not RATE_RANGE[0] <= sr <= RATE_RANGE[1]:
        raise UploadError(400, f"sample rate {sr} Hz is outside {RATE_RANGE[0]}..{RATE_RANGE[1]}")
    if len(pcm) // 2 > MAX_DECODED_S * sr:
        raise UploadError(413, f"audio longer than {MAX_DECODED_S:g} s; stream it instead")
    return pcm, sr


def _check_wav_sizes(body: bytes) -> None:
    """Every RIFF chunk must fit in the upload: a header claiming gigabytes that never came
    is a lie (or a truncated file), refused before anything trusts it."""
    if body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        return  # read_wav says what is wrong
    pos = 12
    while pos + 8 <= len(body):
        chunk, size = body[pos:pos + 4], int.from_bytes(body[pos + 4:pos + 8], "little")
        if pos + 8 + size > len(body):
            name = chunk.decode("latin-1").strip() or "?"
            raise UploadError(400, f"the WAV upload is not a PCM WAV file: its {name!r} chunk "
                                   f"claims {size} bytes but only {len(body) - pos - 8} follow")
        if chunk == b"data":
            return
        pos += 8 + size + (size & 1)  # chunks are padded to an even length


def _decode_compressed(body: bytes, container_format: str) -> tuple[bytes, int]:
    import av

    out: list[np.ndarray] = []
    total = 0
    try:
        # The demuxer is named, never probed: probing would let any of FFmpeg's formats in
        # (playlists that open other URLs, video containers) under an audio content type.
        with av.open(io.BytesIO(body), mode="r", format=container_format) as container:
            streams = container.streams.audio
            if not streams:
                raise UploadError(400, "the upload holds no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
            for frame in container.decode(streams[0]):
                for r in resampler.resample(frame):
                    a = r.to_ndarray().reshape(-1)
                    total += len(a)
                    if total > MAX_DECODED_S * 48000:
                        raise UploadError(413, f"audio longer than {MAX_DECODED_S:g} s")
                    out.append(a)
    except UploadError:
        raise
    except Exception as exc:  # PyAV raises many kinds for corrupt input
        raise UploadError(400, f"cannot decode the audio: {type(exc).__name__}") from None
    if not out:
        raise UploadError(400, "the upload decodes to no audio")
    return np.concatenate(out).astype("<i2").tobytes(), 48000
