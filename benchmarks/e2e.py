"""End-to-end latency and lip-sync at a WebRTC viewer, every stage its own process on the
real broker.

A broker (temp home), the stages tts, align, animate, render and the gateway run as
processes; this process is the integrator and the viewer (aiortc over WHEP on loopback).
- text_to_frame: POST /speak -> the first frame at the viewer whose mouth has moved.
- audio_to_frame: the integrator streams its own speech over the WebSocket in real time
  (40 ms chunks, each sent when its last sample exists; phonemes found by align): every
  speech chunk as logged on arrival -> the viewer receiving the first frame at its media
  time (each viewer frame is matched to its logged access unit by its decoded pixels).
- text_to_frame: POST /speak -> the viewer receiving the frame of the first phoneme.
- av_offset: the lag that best aligns the mouth's movement with the speech envelope
  (cross-correlation over each utterance, median), at the viewer minus the same measure on
  the logged media in media time: what delivery did to the sync the pipeline wrote. The
  raw viewer and log lags are in the JSON too (the mouth leads the sound by design: lips
  open before a vowel is loud).
Mouth movement is read from pixels: the mean brightness of the inner-mouth box (from the
portrait's landmarks) against its idle level. The viewer is aiortc without audio prefetch
(a browser adapts its buffer to the network; on loopback that is near zero), and a frame's
arrival is when its RTP packets were in: aiortc itself hands a frame on only once the next
one starts, a hold no browser has (tests/support/rtp_arrivals.py).

    python benchmarks/e2e.py --json benchmarks/results/e2e.json
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "e2e-bench-key-0123456789"
CHUNK_MS = 40  # the integrator streams its speech in 40 ms messages, each sent once recorded
SENTENCES = ["Hello there, nice to meet you.", "Maybe we could meet on Monday.",
             "Please bring the map and the big box.", "My mother made a warm apple pie.",
             "Bob put the paper back on the pile.", "We might miss the morning bus."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Arrivals:
    video: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)  # t, mouth, h
    prints: list[bytes] = dataclasses.field(default_factory=list)  # pixel digest per frame
    audio: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # t, rms


def _digest(gray: np.ndarray) -> bytes:
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(gray).tobytes(), digest_size=12).digest()


def _mouth_box(size: int) -> tuple[slice, slice]:
    from processors.portrait import default_pack

    pack = default_pack()
    lm = pack.landmarks[:, :2] * (size / pack.image.shape[0])
    top, bottom, left, right = lm[13], lm[14], lm[78], lm[308]  # inner lips, inner corners
    cy, cx = (top[1] + bottom[1]) / 2, (left[0] + right[0]) / 2
    half_w = max(6, int((right[0] - left[0]) * 0.35))
    return slice(int(cy - 6), int(cy + 10)), slice(int(cx - half_w), int(cx + half_w))


async def _view(base: str, sid: str, token: str, box: tuple[slice, slice], out: Arrivals,
                stop: asyncio.Event) -> None:
    from tests.support.rtp_arrivals import rtp_arrivals

    with rtp_arrivals() as stamps:
        await _watch(base, sid, token, box, out, stop, stamps)


async def _watch(base: str, sid: str, token: str, box: tuple[slice, slice], out: Arrivals,
                 stop: asyncio.Event, stamps: Any) -> None:
    import httpx
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")

    async def pump(track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return
            t = stamps.of(track.kind, frame)  # when its packets were in, not aiortc's hold
            if track.kind == "video":
                gray = frame.to_ndarray(format="gray")
                out.video.append((t, float(gray[box].mean()), frame.height))
                out.prints.append(_digest(gray))
            else:
                a = frame.to_ndarray().astype(np.float32)
                out.audio.append((t, float(np.sqrt((a * a).mean()))))

    tasks: list[asyncio.Task[None]] = []
    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(pump(track))))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.post(f"/whep/{sid}", content=pc.localDescription.sdp,
                            headers={"Authorization": f"Bearer {token}",
                                     "Content-Type": "application/sdp"})
        r.raise_for_status()
        await pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))
        await stop.wait()
        await http.delete(r.headers["location"], headers={"Authorization": f"Bearer {token}"})
    for t in tasks:
        t.cancel()
    await pc.close()


def _stream_speech(base: str, sid: str, token: str, pcm: np.ndarray, sr: int) -> float:
    """Send one utterance in real time over the WebSocket; returns the send time of the
    chunk holding its first non-silent sample."""
    from websockets.sync.client import connect

    url = base.replace("http", "ws", 1) + f"/v1/sessions/{sid}/ws?token={token}"
    step = sr * CHUNK_MS // 1000
    onset = int(np.argmax(np.abs(pcm) > 500))
    sent_at = 0.0
    with connect(url) as ws:
        ws.send(json.dumps({"type": "audio_format", "sample_rate": sr, "purpose": "speech"}))
        t0 = time.perf_counter()
        for k in range(0, len(pcm), step):
            delay = t0 + (k + step) / sr - time.perf_counter()  # a chunk exists once recorded
            if delay > 0:
                time.sleep(delay)
            ws.send(pcm[k:k + step].astype("<i2").tobytes())
            if k <= onset < k + step:
                sent_at = time.time()
        ws.send(json.dumps({"type": "audio_end"}))
    return sent_at


def _onsets(series: list[tuple[float, float]], after: float, until: float,
            threshold: float) -> float | None:
    for t, v in series:
        if after <= t <= until and v > threshold:
            return t
    return None


XCORR_HZ = 100  # both signals on a 10 ms grid
MAX_LAG_S = 0.3


def _lag_ms(mouth: list[tuple[float, float]], audio: list[tuple[float, float]], start: float,
            end: float) -> float | None:
    """Lag (ms) that best aligns mouth movement after the speech envelope: positive when
    the mouth moves after the sound."""
    grid = np.arange(start, end, 1 / XCORR_HZ)
    if len(grid) < 50 or len(mouth) < 10 or len(audio) < 10:
        return None
    m = np.interp(grid, [t for t, _ in mouth], [v for _, v in mouth])
    a = np.interp(grid, [t for t, _ in audio], [v for _, v in audio])
    m, a = m - m.mean(), a - a.mean()
    if m.std() < 1e-6 or a.std() < 1e-6:
        return None
    lags = range(-int(MAX_LAG_S * XCORR_HZ), int(MAX_LAG_S * XCORR_HZ) + 1)
    scores = [float(np.dot(m[max(0, k):len(m) + min(0, k)], a[max(0, -k):len(a) - max(0, k)]))
              for k in lags]
    return float(list(lags)[int(np.argmax(scores))] * 1000 / XCORR_HZ)


def _mouth_series(video: list[tuple[float, float, int]]) -> tuple[list[tuple[float, float]], float]:
    """Distance of the mouth box brightness from its idle level, and the detection threshold."""
    levels = np.array([m for _, m, _ in video])
    idle = float(np.median(levels))
    spread = float(np.median(np.abs(levels - idle))) + 0.5
    return [(t, abs(m - idle)) for t, m, _ in video], max(4.0, 6 * spread)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="benchmarks/results/e2e.json")
    p.add_argument("--utterances", type=int, default=8, help="per path (text, audio)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--fps", type=int, default=25)
    args = p.parse_args()

    from backbone import broker
    from backbone.runtime import provision_topics
    from backbone.settings import Settings
    from backbone.stages import PIPELINE
    from gateway.client import AvatarClient
    from processors.espeak import EspeakSynth

    tmp = Path(tempfile.mkdtemp(prefix="e2e-"))
    bs = dataclasses.replace(broker.BrokerSettings.from_env(), home=tmp / "kafka",
                             port=_free_port(), controller_port=_free_port())
    bootstrap = broker.start(bs)
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"load_avg_1min_before": os.getloadavg()[0],
                              "resolution": args.resolution, "fps": args.fps}
    try:
        settings = Settings(bus="kafka", bootstrap=bootstrap, topic_prefix="e2e.", partitions=2)
        stages = tuple(dict.fromkeys(PIPELINE + ("align",)))
        provision_topics(settings, stages)
        port = _free_port()
        env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": bootstrap,
               "AVATAR_TOPIC_PREFIX": "e2e.", "AVATAR_PARTITIONS": "2", "PYTHONPATH": str(ROOT),
               "AVATAR_API_KEYS": f"bench:{KEY}:integrator:1000",
               "AVATAR_JWT_SECRET": "e2e-bench-secret-of-32-bytes-or-more",
               "AVATAR_ICE_LOOPBACK": "1"}
        for name in ("tts", "align", "animate", "render"):
            procs.append(subprocess.Popen([sys.executable, "-m", "backbone.cli", "stage", name],
                                          env=env, cwd=ROOT, stdout=open(tmp / f"{name}.log", "wb"),
                                          stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([sys.executable, "-m", "backbone.cli", "gateway", "--port",
                                       str(port)], env=env, cwd=ROOT,
                                      stdout=open(tmp / "gateway.log", "wb"),
                                      stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        client = _wait_for_gateway(base)
        session = client.create_session(resolution=args.resolution, fps=args.fps)
        sid, token = session.session_id, client.token
        time.sleep(8.0)  # stage groups join; the idle face starts streaming
        arrivals = Arrivals()
        box = _mouth_box(args.resolution)
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        viewer = threading.Thread(target=loop.run_until_complete,
                                  args=(_view(base, sid, session.viewer_token or token, box,
                                              arrivals, stop),), daemon=True)
        viewer.start()
        time.sleep(4.0)  # idle frames give the mouth's resting level

        text_marks, audio_marks = [], []
        for i in range(args.utterances):
            t = time.time()
            client.speak(sid, SENTENCES[i % len(SENTENCES)])
            text_marks.append(t)
            time.sleep(4.0)
        synth = EspeakSynth()
        synth.start()
        for i in range(args.utterances):
            # "Your own TTS": a voice tts does not use, phonemes found by align.
            s = synth.synthesize(SENTENCES[i % len(SENTENCES)], voice="en-gb+f3", rate_wpm=170)
            audio_marks.append(_stream_speech(base, sid, token, s.pcm, s.sample_rate))
            time.sleep(2.0)
        time.sleep(1.0)
        result["gateway_metrics"] = _gateway_histograms(base)
        loop.call_soon_threadsafe(stop.set)
        viewer.join(15)
        result |= _figures(arrivals, text_marks, audio_marks)
        result |= _logged_offset(settings, sid, args.fps, box)
        result |= _exact(settings, sid, args.fps, arrivals, text_marks)
        if result["av_offset_viewer_ms"] is not None and result["av_offset_log_ms"] is not None:
            result["lipsync_shift_ms"] = (result["av_offset_viewer_ms"]
                                          - result["av_offset_log_ms"])
        result["frames_at_viewer"] = len(arrivals.video)
        result["viewer_fps"] = _fps(arrivals.video)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop(bs)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    series = result.pop("_series")
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, series, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


def _wait_for_gateway(base: str) -> Any:
    import httpx

    from gateway.client import AvatarClient

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return AvatarClient(base, api_key=KEY)
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("the gateway did not start")


def _gateway_histograms(base: str) -> dict[str, Any]:
    """The gateway's own view: how early frames reached it, and the playout delay it chose."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=5).text
    out: dict[str, Any] = {}
    for name in ("avatar_gateway_playout_delay_seconds", "avatar_gateway_frame_arrival_slack_seconds"):
        rows = [ln for ln in text.splitlines() if ln.startswith(name + "_bucket")]
        out[name] = {ln.split('le="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1]) for ln in rows}
    return out


def _fps(video: list[tuple[float, float, int]]) -> float:
    if len(video) < 2:
        return 0.0
    return (len(video) - 1) / (video[-1][0] - video[0][0])


def _figures(arr: Arrivals, text_marks: list[float], audio_marks: list[float]) -> dict[str, Any]:
    mouth, thr = _mouth_series(arr.video)
    audio = arr.audio
    text_lat, audio_lat, offsets = [], [], []
    for marks, out in ((text_marks, text_lat), (audio_marks, audio_lat)):
        for t in marks:
            m = _onsets(mouth, t, t + 3.0, thr)
            if m is not None:
                out.append((m - t) * 1000)
            a = _onsets(audio, t, t + 3.0, 300.0)
            if a is not None:
                lag = _lag_ms(mouth, audio, a - 0.5, a + 2.5)
                if lag is not None:
                    offsets.append(lag)

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {
        "onset_audio_to_mouth_p50_ms": pct(audio_lat, 50),
        "onset_audio_to_mouth_p95_ms": pct(audio_lat, 95),
        "onset_text_to_mouth_p50_ms": pct(text_lat, 50),
        "onset_text_to_mouth_p95_ms": pct(text_lat, 95),
        "av_offset_viewer_ms": float(np.median(offsets)) if offsets else None,
        "av_offsets_viewer_ms": offsets, "audio_to_frame_ms": audio_lat, "text_to_frame_ms": text_lat,
        "utterances_detected": {"text": len(text_lat), "audio": len(audio_lat),
                                "of": len(text_marks)},
        "mouth_threshold": thr,
        "_series": {"mouth": mouth, "audio": audio, "text": text_marks, "speech": audio_marks},
    }


def _exact(settings: Any, sid: str, fps: int, arr: Arrivals,
           text_marks: list[float]) -> dict[str, Any]:
    """Latency and sync from the log itself: each frame at the viewer is matched to its logged
    access unit (decoded pixels), so its media time is known exactly; a speech chunk's
    media time and arrival are in its record. No mouth-movement threshold is involved."""
    import av

    from backbone.kafka_bus import KafkaBus
    from backbone.records import PhonemeSpans, SpeechChunk
    from replay.reader import read_session, session_audio, session_video

    bus = KafkaBus(settings.bootstrap)
    video = session_video(read_session(bus, settings, sid, "video"))
    codec = av.CodecContext.create("h264", "r")
    # H.264 decoding is exact: the viewer's decoder (started at a keyframe) and this one
    # give the same pixels for the same access unit, so a hash identifies each frame.
    by_hash: dict[bytes, list[int]] = {}
    logged = 0
    for v in video:
        for frame in codec.decode(av.Packet(v.data)):
            by_hash.setdefault(_digest(frame.to_ndarray(format="gray")), []).append(v.pts)
            logged += 1
    shown: dict[int, float] = {}
    last = -1
    for (t, _, _), digest in zip(arr.video, arr.prints):
        candidates = [p for p in by_hash.get(digest, []) if p > last]
        if candidates:
            last = candidates[0]
            shown.setdefault(last, t)
    offsets_v = [t - pts / fps for pts, t in shown.items()]
    # Every speech chunk from the gateway (the integrator's own audio): logged when it came
    # in -> the first frame showing its start.
    chunk_lat = []
    for r in read_session(bus, settings, sid, "speech.audio"):
        c = r.value
        if isinstance(c, SpeechChunk) and r.headers.stage == "gateway" and c.n_samples:
            pts = int(np.ceil(c.start_sample / c.sample_rate * fps))
            if pts in shown:
                chunk_lat.append((shown[pts] - r.message.timestamp_ms / 1000) * 1000)
    # Each speak request -> the first frame of its speech (its first phoneme after a pause).
    text_lat = []
    spans = [(r.message.timestamp_ms / 1000, s) for r in read_session(
        bus, settings, sid, "speech.phonemes") if isinstance(r.value, PhonemeSpans)
        and r.headers.stage == "tts" for s in r.value.spans if s.phoneme != "_"][:]
    for t in text_marks:
        first = next((s for ts, s in spans if ts >= t), None)
        if first is not None:
            pts = int(np.ceil(first.start_sample / 22050 * fps))
            if pts in shown:
                text_lat.append((shown[pts] - t) * 1000)
    # Audio at the viewer against the logged speech, by envelope, utterance by utterance
    # (the playout delay adapts, so offsets are compared within one utterance's window).
    pcm, sr = session_audio(read_session(bus, settings, sid, "speech.audio"))
    hop = sr // 100
    env = np.abs(pcm.astype(np.float32))
    media_env = np.array([float(env[i:i + hop].mean()) * 1.25
                          for i in range(0, len(env) - hop, hop)])
    ta = np.array([t for t, _ in arr.audio])
    va = np.array([v for _, v in arr.audio])
    av_offsets = []
    loud = np.flatnonzero(media_env > 300)
    starts = [int(loud[0])] + [int(b) for a, b in zip(loud[:-1], loud[1:]) if b - a > 50] \
        if len(loud) else []
    for k0 in starts:  # each utterance: 3 s of media from its onset
        grid = np.arange(k0, min(len(media_env), k0 + 300)) * hop / sr  # hop is not 10 ms at 22.05 kHz
        local = [(t - pts / fps) for pts, t in shown.items() if grid[0] <= pts / fps <= grid[-1]]
        if len(grid) < 50 or len(local) < 10 or len(ta) < 10:
            continue
        off_v = float(np.median(local))
        m = media_env[k0:k0 + len(grid)]
        best, best_score = None, -1e18
        for lag_ms in range(-300, 301, 5):
            a = np.interp(grid + off_v + lag_ms / 1000, ta, va, left=0, right=0)
            score = float(np.dot(m - m.mean(), a - a.mean()))
            if score > best_score:
                best, best_score = lag_ms, score
        if best is not None:
            av_offsets.append(-float(best))  # positive: video later than audio

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    out: dict[str, Any] = {
        "frames_matched": len(shown), "frames_logged": logged,
        "audio_to_frame_p50_ms": pct(chunk_lat, 50), "audio_to_frame_p95_ms": pct(chunk_lat, 95),
        "audio_to_frame_p99_ms": pct(chunk_lat, 99), "audio_chunks_timed": len(chunk_lat),
        "text_to_frame_p50_ms": pct(text_lat, 50), "text_to_frame_p95_ms": pct(text_lat, 95),
        "video_offset_ms": float(np.median(offsets_v)) * 1000 if offsets_v else None,
        "audio_to_frame_chunks_ms": chunk_lat, "text_to_frame_exact_ms": text_lat,
    }
    if av_offsets:
        out["av_offset_ms"] = float(np.median(av_offsets))
        out["av_offsets_ms"] = av_offsets
    return out


def _logged_offset(settings: Any, sid: str, fps: int, box: tuple[slice, slice]) -> dict[str, Any]:
    """The same onset detector on the log itself, in media time (no transport)."""
    import av

    from backbone.kafka_bus import KafkaBus
    from replay.reader import read_session, session_audio, session_video

    bus = KafkaBus(settings.bootstrap)
    pcm, sr = session_audio(read_session(bus, settings, sid, "speech.audio"))
    video = session_video(read_session(bus, settings, sid, "video"))
    codec = av.CodecContext.create("h264", "r")
    levels = []
    for v in video:
        for frame in codec.decode(av.Packet(v.data)):
            levels.append((v.pts / fps, float(frame.to_ndarray(format="gray")[box].mean())))
    mouth, thr = _mouth_series([(t, m, 0) for t, m in levels])
    env = np.abs(pcm.astype(np.float32))
    hop = sr // 100
    rms = [(i / sr, float(env[i:i + hop].mean()) * 1.25) for i in range(0, len(env) - hop, hop)]
    # Utterance onsets in media time: audio rising after at least 0.5 s of silence.
    offsets, quiet_since = [], 0.0
    for t, v in rms:
        if v <= 300:
            continue
        if t - quiet_since >= 0.5:
            lag = _lag_ms(mouth, rms, t - 0.5, t + 2.5)
            if lag is not None:
                offsets.append(lag)
        quiet_since = t
    return {"av_offset_log_ms": float(np.median(offsets)) if offsets else None,
            "av_offsets_log_ms": offsets}


def _plot(result: dict[str, Any], series: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6))
    for key, label in (("text_to_frame_exact_ms", "text -> its first frame"),
                       ("audio_to_frame_chunks_ms", "audio chunk -> its frame"),
                       ("text_to_frame_ms", "text -> mouth visibly moves"),
                       ("audio_to_frame_ms", "speech onset -> mouth visibly moves")):
        xs = sorted(result.get(key) or [])
        if xs:
            a1.plot(xs, np.linspace(0, 1, len(xs)), marker="o", label=label)
    a1.axvline(200, color="red", ls="--", lw=1, label="200 ms target")
    a1.set_xlabel("ms at the WebRTC viewer")
    a1.set_ylabel("CDF")
    a1.legend()
    mouth = series["mouth"]
    if mouth:
        t0 = mouth[0][0]
        a2.plot([t - t0 for t, _ in mouth], [v for _, v in mouth], lw=0.8, label="mouth change")
        audio = series["audio"]
        a2.plot([t - t0 for t, _ in audio], [v / 200 for _, v in audio], lw=0.5, alpha=0.6,
                label="audio RMS / 200")
        for t in series["text"]:
            a2.axvline(t - t0, color="green", lw=0.8)
        for t in series["speech"]:
            a2.axvline(t - t0, color="purple", lw=0.8)
        a2.set_xlabel("s (green: speak requests, purple: streamed speech onsets)")
        a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
