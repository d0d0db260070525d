"""RGB frames to H.264 access units (PyAV / libx264), and MP4 export of logged packets.

Runs in the render+encode process: the renderer's frames go in, ``EncodedPacket``s go to the
video topic. Replay and export read them back and mux them with ``write_mp4``, unchanged.

Bitstream format: **Annex B**. Every H.264 packet is one access unit whose NAL units start
with ``00 00 00 01`` / ``00 00 01`` start codes, and every keyframe is an IDR that carries
its SPS and PPS in-band, so any keyframe can start a decoder (a WebRTC viewer joining late, a
replay from the middle, a restarted encoder). This is what aiortc sends as-is over RTP; MP4
and FLV muxers repack it to length-prefixed NAL units without touching a single NAL unit.
"""
from __future__ import annotations

import fractions
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Sequence

import av
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter
from numpy.typing import NDArray

X264_CRF: Final = 23  # x264's default quality; ~12 KB/frame on a 512 px face
VPX_BITRATE: Final = 1_500_000  # libvpx needs a target; ~7.5 KB/frame at 25 fps
AAC_BITRATE: Final = 96_000  # plenty for mono speech
START_CODE: Final = b"\x00\x00\x00\x01"

NAL_SPS: Final = 7
NAL_PPS: Final = 8


@dataclass(frozen=True)
class EncodedPacket:
    """One encoded frame. ``pts``/``dts`` count frames (time base 1/fps); H.264 is Annex B."""

    pts: int
    dts: int
    keyframe: bool
    data: bytes


def _codec_name(codec: str) -> str:
    names = {"h264": "libx264", "libx264": "libx264", "vp8": "libvpx", "libvpx": "libvpx"}
    if codec not in names:
        raise ValueError(f"codec must be one of {sorted(names)}, not {codec!r}")
    return names[codec]


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte string, without their start codes."""
    units: list[bytes] = []
    i, n = 0, len(data)
    start = -1
    while i + 3 <= n:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            if start >= 0:
                units.append(data[start:i].rstrip(b"\x00"))
            i += 3
            start = i
        else:
            i += 1
    if start >= 0:
        units.append(data[start:])
    return [u for u in units if u]


def annexb_to_avcc(data: bytes) -> bytes:
    """Annex B to 4-byte length-prefixed NAL units (MP4/FLV sample format)."""
    return b"".join(len(u).to_bytes(4, "big") + u for u in split_annexb(data))


def parameter_sets(data: bytes) -> bytes | None:
    """The SPS and PPS NAL units of an access unit, as Annex B, or None if it has none."""
    units = [u for u in split_annexb(data) if u[0] & 0x1F in (NAL_SPS, NAL_PPS)]
    if not any(u[0] & 0x1F == NAL_SPS for u in units):
        return None
    return b"".join(START_CODE + u for u in units)


class H264Encoder:
    """Encodes RGB frames of a fixed size. One per session; not thread-safe.

    The constructor only records settings; :meth:`start` opens the codec. Low-latency
    settings: no B-frames (``dts == pts``), one frame in, one packet out, one thread (a
    core per session scales better than several cores per session), a keyframe every
    ``keyframe_interval`` frames and on :meth:`force_keyframe`.
    """

    def __init__(self, width: int, height: int, fps: int, keyframe_interval: int = 50,
                 preset: str = "ultrafast", tune: str = "zerolatency",
                 codec: str = "h264") -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"frame size must be positive and even, got {width}x{height}")
        if fps <= 0 or keyframe_interval <= 0:
            raise ValueError("fps and keyframe_interval must be positive")
        self.width = width
        self.height = height
        self.fps = fps
        self.keyframe_interval = keyframe_interval
        self.preset = preset
        self.tune = tune
        self.codec = _codec_name(codec)
        self._ctx: av.VideoCodecContext | None = None
        self._force = False
        self._extradata: bytes | None = None
        # Kept for the encoder's life: ``VideoFrame.reformat`` builds a new swscale context
        # per call, which costs more than the RGB -> YUV conversion itself (~1.3 ms at 512).
        self._reformatter = VideoReformatter()
        self._i420: av.VideoFrame | None = None
        self._i420_planes: list[NDArray[np.uint8]] = []

    @property
    def extradata(self) -> bytes | None:
        """The latest SPS+PPS (Annex B) seen in a keyframe; None before one, and for VP8."""
        return self._extradata

    def start(self) -> None:
        if self._ctx is not None:
            return
        ctx = av.CodecContext.create(self.codec, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width = self.width
        ctx.height = self.height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = fractions.Fraction(1, self.fps)
        ctx.framerate = fractions.Fraction(self.fps, 1)
        ctx.gop_size = self.keyframe_interval
        ctx.max_b_frames = 0
        ctx.thread_count = 1
        if self.codec == "libx264":
            ki = self.keyframe_interval
            ctx.options = {
                "preset": self.preset,
                "tune": self.tune,
                "crf": str(X264_CRF),
                "forced-idr": "1",  # a forced keyframe must be an IDR to restart decoders
                # Fixed GOP (no scene cuts): keyframes at predictable frames, and SPS/PPS
                # repeated in each so every keyframe stands alone.
                "x264-params": f"keyint={ki}:min-keyint={ki}:scenecut=0:repeat-headers=1",
            }
        else:
            ctx.bit_rate = VPX_BITRATE
            ctx.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                           "error-resilient": "1"}
        ctx.open()
        self._ctx = ctx

    def force_keyframe(self) -> None:
        """Make the next encoded frame a keyframe (an IDR for H.264), e.g. after a restart."""
        self._force = True

    def encode(self, frame_rgb: NDArray[np.uint8], pts: int) -> list[EncodedPacket]:
        """Encode one (height, width, 3) uint8 RGB frame shown at frame ``pts``."""
        ctx = self._require()
        if frame_rgb.shape != (self.height, self.width, 3) or frame_rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({self.height}, {self.width}, 3), got "
                             f"{frame_rgb.dtype} {frame_rgb.shape}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        frame = self._reformatter.reformat(frame, format="yuv420p")
        return self._send(ctx, frame, pts)

    def encode_i420(self, frame_i420: NDArray[np.uint8], pts: int) -> list[EncodedPacket]:
        """Encode one I420 frame ((height * 3 // 2, width) uint8: the Y plane, then U, then
        V, BT.601 limited range) shown at frame ``pts``. No colour conversion: the planes are
        copied into a frame the encoder keeps for its life (the codec copies them again
        into its own picture during the call, so the frame is free for the next one)."""
        ctx = self._require()
        h, w = self.height, self.width
        if frame_i420.shape != (h * 3 // 2, w) or frame_i420.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({h * 3 // 2}, {w}) I420, got "
                             f"{frame_i420.dtype} {frame_i420.shape}")
        if self._i420 is None:
            self._i420 = av.VideoFrame(w, h, "yuv420p")
            self._i420_planes = [
                np.frombuffer(memoryview(p), dtype=np.uint8).reshape(
                    p.height, p.line_size)[:, :p.width]
                for p in self._i420.planes]
        flat = frame_i420.reshape(-1)
        q = (h // 2) * (w // 2)
        ys, us, vs = self._i420_planes
        np.copyto(ys, flat[:h * w].reshape(h, w))
        np.copyto(us, flat[h * w:h * w + q].reshape(h // 2, w // 2))
        np.copyto(vs, flat[h * w + q:].reshape(h // 2, w // 2))
        self._i420.pict_type = PictureType.NONE
        return self._send(ctx, self._i420, pts)

    def _send(self, ctx: av.VideoCodecContext, frame: av.VideoFrame,
              pts: int) -> list[EncodedPacket]:
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, self.fps)
        if self._force:
            frame.pict_type = PictureType.I
            self._force = False
        return self._collect(ctx.encode(frame))

    def flush(self) -> list[EncodedPacket]:
        """Drain the encoder (end of stream). The encoder cannot be used afterwards."""
        ctx = self._require()
        packets = self._collect(ctx.encode(None))
        self._ctx = None
        return packets

    def _require(self) -> av.VideoCodecContext:
        if self._ctx is None:
            raise RuntimeError("H264Encoder.start() has not been called (or it was flushed)")
        return self._ctx

    def _collect(self, packets: list[av.Packet]) -> list[EncodedPacket]:  # type: ignore[type-arg]
        out = []
        for p in packets:
            data = bytes(p)
            if p.pts is None:
                raise RuntimeError("encoder returned a packet without pts")
            dts = p.dts if p.dts is not None else p.pts
            if p.is_keyframe and self.codec == "libx264":
                found = parameter_sets(data)
                if found is not None:
                    self._extradata = found
            out.append(EncodedPacket(pts=int(p.pts), dts=int(dts), keyframe=bool(p.is_keyframe),
                                     data=data))
        return out


def write_mp4(path: str | Path, packets: Sequence[EncodedPacket], width: int, height: int,
              fps: int, pcm: NDArray[np.int16] | None, sample_rate: int,
              extradata: bytes | None) -> None:
    """Mux Annex B H.264 packets as they are (no re-encode) plus mono int16 PCM as AAC.

    The first packet must be a keyframe. Its in-band SPS/PPS become the MP4's codec
    configuration; if it has none, ``extradata`` (Annex B SPS+PPS, as
    :attr:`H264Encoder.extradata`) is put in front of it. The MP4 muxer only swaps start
    codes for length prefixes: every NAL unit is stored byte for byte.
    """
    if not packets:
        raise ValueError("no video packets to write")
    first = packets[0]
    if not first.keyframe:
        raise ValueError("the first video packet must be a keyframe")
    if not split_annexb(first.data):
        raise ValueError("packets are not Annex B H.264 (MP4 export supports H.264 only)")
    head = first.data
    if parameter_sets(head) is None:
        if extradata is None:
            raise ValueError("the first keyframe carries no SPS/PPS and no extradata was given")
        head = extradata + head
    time_base = fractions.Fraction(1, fps)
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_mux_stream("h264", rate=fps, width=width, height=height)
        audio = None
        if pcm is not None:
            audio = container.add_stream("aac", rate=sample_rate)
            assert isinstance(audio, av.AudioStream)
            audio.codec_context.layout = "mono"
            audio.codec_context.bit_rate = AAC_BITRATE
            # FFmpeg's default "twoloop" AAC search is 2x slower for no audible gain on
            # speech; an export of ten minutes spends most of its time here.
            audio.codec_context.options = {"aac_coder": "fast"}
        for i, pkt in enumerate(packets):
            avp = av.Packet(head if i == 0 else pkt.data)
            avp.stream = video
            avp.time_base = time_base
            avp.pts = pkt.pts
            avp.dts = pkt.dts
            avp.duration = 1
            avp.is_keyframe = pkt.keyframe
            container.mux(avp)
        if audio is not None and pcm is not None:
            samples = np.asarray(pcm, dtype=np.int16).reshape(-1)
            chunk = 1024  # one AAC frame per encode call
            for start in range(0, len(samples), chunk):
                part = samples[start:start + chunk]
                frame = av.AudioFrame.from_ndarray(part[None, :], format="s16", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = fractions.Fraction(1, sample_rate)
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
