"""H.264 encoding of rendered frames and MP4 export of the logged packets."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from processors.encode import (EncodedPacket, H264Encoder, annexb_to_avcc, split_annexb,
                               write_mp4)

SIZE = 128
FPS = 25


def frames(n: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for i in range(n):
        img = np.stack([(xx * 2 + i * 3) % 256, (yy * 2) % 256, np.full_like(xx, 90)], axis=-1)
        img[40 + i % 30:60 + i % 30, 50:70] = 255
        out.append(img.astype(np.uint8))
    return out


def encode_all(n: int, codec: str = "h264", force_at: int | None = None) -> tuple[
        list[EncodedPacket], H264Encoder]:
    enc = H264Encoder(SIZE, SIZE, FPS, keyframe_interval=50, codec=codec)
    enc.start()
    packets: list[EncodedPacket] = []
    for i, frame in enumerate(frames(n)):
        if i == force_at:
            enc.force_keyframe()
        packets += enc.encode(frame, i)
    packets += enc.flush()
    return packets, enc


def decode(packets: list[EncodedPacket], codec: str = "h264") -> list[np.ndarray]:
    ctx = av.CodecContext.create(codec, "r")
    assert isinstance(ctx, av.VideoCodecContext)
    out = []
    for p in packets:
        for frame in ctx.decode(av.Packet(p.data)):
            out.append(frame.to_ndarray(format="rgb24"))
    for frame in ctx.decode(None):
        out.append(frame.to_ndarray(format="rgb24"))
    return out


def test_every_frame_comes_back_at_full_size() -> None:
    packets, _ = encode_all(30)
    decoded = decode(packets)
    assert len(decoded) == 30
    assert all(f.shape == (SIZE, SIZE, 3) for f in decoded)


def test_pts_count_frames_and_dts_equals_pts() -> None:
    packets, _ = encode_all(10)
    assert [p.pts for p in packets] == list(range(10))
    assert all(p.dts == p.pts for p in packets)


def test_keyframes_are_idr_with_their_own_parameter_sets() -> None:
    packets, enc = encode_all(60)
    assert [p.pts for p in packets if p.keyframe] == [0, 50]
    for p in packets:
        if p.keyframe:
            kinds = {unit[0] & 0x1F for unit in split_annexb(p.data)}
            assert {7, 8, 5} <= kinds  # SPS, PPS, IDR slice
    assert enc.extradata is not None and split_annexb(enc.extradata)[0][0] & 0x1F == 7


def test_force_keyframe_makes_the_next_frame_an_idr() -> None:
    packets, _ = encode_all(20, force_at=7)
    assert [p.pts for p in packets if p.keyframe] == [0, 7]
    assert len(decode(packets[7:])) == 13  # a decoder can start there


def test_vp8_is_available_as_an_option() -> None:
    packets, enc = encode_all(10, codec="vp8")
    assert packets[0].keyframe and enc.extradata is None
    assert len(decode(packets, "vp8")) == 10


def test_write_mp4_muxes_the_packets_unchanged_with_aac_audio(tmp_path: Path) -> None:
    packets, enc = encode_all(50)
    rate = 16000
    t = np.arange(2 * rate) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)
    path = tmp_path / "session.mp4"
    write_mp4(path, packets, SIZE, SIZE, FPS, pcm, rate, enc.extradata)
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        stored = [bytes(p) for p in container.demux(video) if p.size]
        # MP4 stores length-prefixed NAL units; each one is byte-for-byte ours.
        assert stored == [annexb_to_avcc(p.data) for p in packets]
        assert video.duration is not None and video.time_base is not None
        assert audio.duration is not None and audio.time_base is not None
        video_s = float(video.duration * video.time_base)
        audio_s = float(audio.duration * audio.time_base)
        assert video_s == pytest.approx(2.0, abs=0.05)
        assert audio_s == pytest.approx(video_s, abs=0.1)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 50
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
        assert samples == pytest.approx(len(pcm), abs=2048)


def test_write_mp4_refuses_to_start_on_a_non_keyframe(tmp_path: Path) -> None:
    packets, enc = encode_all(5)
    with pytest.raises(ValueError, match="keyframe"):
        write_mp4(tmp_path / "x.mp4", packets[1:], SIZE, SIZE, FPS, None, 16000, enc.extradata)


def to_i420(rgb: np.ndarray) -> np.ndarray:
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p").to_ndarray()


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_i420_frames_encode_without_conversion_and_decode_to_the_same_pictures(
        codec: str) -> None:
    enc = H264Encoder(SIZE, SIZE, FPS, keyframe_interval=50, codec=codec)
    enc.start()
    source = frames(12)
    packets: list[EncodedPacket] = []
    for i, rgb in enumerate(source):
        # The frame buffer is reused on purpose: the encoder must not keep a view of it.
        buffer = to_i420(rgb)
        packets += enc.encode_i420(buffer, i)
        buffer[:] = 0
    packets += enc.flush()
    assert [p.pts for p in packets] == list(range(12))
    decoded = decode(packets, codec)
    assert len(decoded) == 12
    for got, want in zip(decoded, source):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 8


def test_an_i420_frame_of_the_wrong_size_is_refused() -> None:
    enc = H264Encoder(SIZE, SIZE, FPS)
    enc.start()
    with pytest.raises(ValueError, match="I420"):
        enc.encode_i420(np.zeros((SIZE, SIZE), np.uint8), 0)
