"""Faults under a live session on the real broker, every stage and the gateway its own
process, measured where a viewer is: the gateway's WebSocket.

- stage kill: two instances of one stage in one consumer group (the other stages one each);
  mid-speech the instance that owns the session's partition is SIGKILLed and the standby
  takes over after the group session timeout. Per killed stage: video frames lost at the
  viewer (frame indices missing between the first and last delivered), duplicates delivered
  (a frame index twice), the largest gap between frames arriving, speech samples missing or
  repeated, and for render whether the standby's first frame is a keyframe and the video log
  holds each (producer, seq) once.
- broker restart: a probe producer writes throughout a clean broker stop and start on the
  same log dir; every record it got a delivery report for must be in the log afterwards
  (`broker_restart_lost`), and the session's frames must flow again.
- gateway restart: the SDK viewer reconnects to the same session; a slow viewer: frames
  dropped for it (counted), the gateway's memory and the other viewer unaffected.
- long session: `benchmarks/long_session.py` (another module) for the memory and lip-sync
  drift figures, short by default (`--long-minutes 30` for the full run).

    python benchmarks/faults.py --json benchmarks/results/faults.json

The tests in tests/integration/test_faults_kafka.py drive the same scenarios and assert the
behaviour; this script reports the numbers (a shared 2-core machine: gaps are noisy).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "faults-bench-key-0123456789"
JWT_SECRET = "faults-bench-secret-of-32-bytes!"
# Fail-over settings for every process: a dead member is noticed after 0.8 s without a
# heartbeat, and the survivor hears of the rebalance within 0.1 s. Measured here: 1000/250
# gave gaps up to 1.93 s (animate), 800/100 up to 1.5 s; heartbeats are cheap requests.
FAILOVER_ENV = {"AVATAR_SESSION_TIMEOUT_MS": "800", "AVATAR_HEARTBEAT_MS": "100",
                "AVATAR_LIVE": "1"}
# The stages each killed stage runs with (and how speech enters): the fewest that put it
# in the path from the integrator to the video.
CHAINS: dict[str, tuple[tuple[str, ...], str]] = {
    "tts": (("tts", "animate", "render"), "speak"),
    "animate": (("tts", "animate", "render"), "speak"),
    "render": (("tts", "animate", "render"), "speak"),
    "dialogue": (("dialogue", "tts", "animate", "render"), "message"),
}
DEFAULT_KILLS = ("tts", "animate", "render", "dialogue")
TEXT = ("Here is a long answer, so that something is being said when a process dies: "
        "the weather will be mild today, with a light breeze from the west, some clouds "
        "in the afternoon, and a clear evening sky over the city and the hills around it.")
RESOLUTION = 512  # the stages warm this size up front; a standby renders it at once
BEFORE_KILL_S = 2.0  # speech heard before the kill
AFTER_KILL_S = 8.0  # watched after it (the takeover, the catch-up, speech going on)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- what a viewer sees ---------------------------------------------------------------


@dataclasses.dataclass
class Frame:
    at: float  # time.monotonic() on arrival
    pts: int
    seq: int
    keyframe: bool
    data: bytes


class WsViewer:
    """A viewer on the session's WebSocket through the Python SDK (reconnecting), in a
    thread: every video frame and audio chunk as it arrives."""

    def __init__(self, client: Any, session_id: str, token: str, *,
                 read_delay_s: float = 0.0) -> None:
        self.client = client
        self.session_id = session_id
        self.token = token
        self.read_delay_s = read_delay_s  # > 0: a slow reader
        self.frames: list[Frame] = []
        self.audio: list[tuple[float, int, int]] = []  # arrival, start sample, samples
        self.reconnects = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ws-viewer", daemon=True)

    def start(self) -> WsViewer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            for event, media in self.client.events(self.session_id, self.token, timeout_s=60,
                                                   reconnect=True):
                now = time.monotonic()
                kind = event.get("type")
                if kind == "video" and media is not None:
                    self.frames.append(Frame(now, int(event["pts"]), int(event["seq"]),
                                             bool(event["keyframe"]), media))
                elif kind == "audio" and media is not None:
                    self.audio.append((now, int(event["start_sample"]), len(media) // 2))
                elif kind == "reconnected":
                    self.reconnects += 1
                if self._stop.is_set():
                    return
                if self.read_delay_s:
                    time.sleep(self.read_delay_s)
        except BaseException as exc:  # reported by whoever reads the figures
            self.error = exc

    def wait(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred():
                return
            if self.error is not None:
                raise AssertionError(f"viewer failed: {self.error!r}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


class SlowReader:
    """A WebSocket viewer that reads its socket at `bytes_per_s` through a small receive
    buffer (the live stream is several times faster): raw socket, no client library that
    would read ahead into its own memory."""

    def __init__(self, base: str, session_id: str, token: str, bytes_per_s: int = 20_000) -> None:
        host, port = base.rsplit("//", 1)[1].split(":")
        self.addr = (host, int(port))
        self.path = f"/v1/sessions/{session_id}/ws?token={token}"
        self.bytes_per_s = bytes_per_s
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-viewer", daemon=True)

    def start(self) -> SlowReader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import base64

        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(self.addr)
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall((f"GET {self.path} HTTP/1.1\r\nHost: {self.addr[0]}:{self.addr[1]}\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          ).encode())
            sock.settimeout(1.0)
            piece = 1024
            while not self._stop.is_set():
                try:
                    got = sock.recv(piece)
                except TimeoutError:
                    continue
                if not got:
                    return
                self.received += len(got)
                time.sleep(piece / self.bytes_per_s)


def frame_figures(frames: list[Frame], t_from: float | None = None,
                  t_to: float | None = None) -> dict[str, Any]:
    """Frames lost (indices missing between the first and last delivered), duplicates
    delivered and the largest gap between arrivals; optionally within [t_from, t_to]."""
    if not frames:
        return {"frames": 0, "frames_lost": None, "duplicates_delivered": None,
                "max_gap_s": None}
    pts = [f.pts for f in frames]
    seen: set[int] = set()
    dups = 0
    for p in pts:
        dups += p in seen
        seen.add(p)
    lost = (max(pts) - min(pts) + 1) - len(seen)
    times = [f.at for f in frames if (t_from is None or f.at >= t_from) and
             (t_to is None or f.at <= t_to)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"frames": len(frames), "frames_lost": lost, "duplicates_delivered": dups,
            "max_gap_s": round(max(gaps), 3) if gaps else None}


def undecodable_frames(frames: list[Frame]) -> int:
    """Access units the viewer could not turn into a picture (a P-frame whose references
    it never got, after a stage's encoder was replaced, would show up here)."""
    import av

    codec = av.CodecContext.create("h264", "r")
    start = next((i for i, f in enumerate(frames) if f.keyframe), None)
    if start is None:
        return len(frames)
    bad = start  # nothing before the first keyframe can be shown
    for f in frames[start:]:
        try:
            got = codec.decode(av.Packet(f.data))
        except av.error.FFmpegError:
            got = []
        bad += 0 if got else 1
    return bad


def audio_figures(audio: list[tuple[float, int, int]]) -> dict[str, int]:
    """Speech samples missing or repeated between the first and last chunk delivered."""
    spans = sorted((s, s + n) for _, s, n in audio if n)
    missing = repeated = 0
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start > end:
            missing += start - end
        elif start < end:
            repeated += end - start
    return {"audio_chunks": len(audio), "audio_samples_missing": missing,
            "audio_samples_repeated": repeated}


# ---- the stack ------------------------------------------------------------------------


class LiveStack:
    """Stage processes (some with standbys) and a gateway on one broker, one topic prefix."""

    def __init__(self, bootstrap: str, log_dir: Path, stages: tuple[str, ...], *,
                 standby: tuple[str, ...] = (), partitions: int = 1,
                 env: dict[str, str] | None = None) -> None:
        from backbone.settings import Settings

        self.settings = Settings(bus="kafka", bootstrap=bootstrap, live=True,
                                 topic_prefix=f"faults-{uuid.uuid4().hex[:8]}.",
                                 partitions=partitions)
        self.log_dir = log_dir
        self.stages = stages
        self.standby = standby
        self.env = {**FAILOVER_ENV, "AVATAR_API_KEYS": f"bench:{KEY}:integrator:1000",
                    "AVATAR_JWT_SECRET": JWT_SECRET, **(env or {})}
        self.procs: list[Any] = []
        self.gateway: Any = None
        self.client: Any = None
        self._admin: Any = None

    def __enter__(self) -> LiveStack:
        from backbone.runtime import provision_topics
        from gateway.client import AvatarClient
        from tests.integration.stage_procs import StageProcess

        provision_topics(self.settings, self.stages)
        try:
            for name in self.stages:
                for i in range(2 if name in self.standby else 1):
                    self.procs.append(StageProcess(name, self.settings, self.log_dir,
                                                   f"{name}-{i}", self.env))
            self.start_gateway()
            self.client = AvatarClient(self.gateway.base, api_key=KEY, timeout_s=30.0)
            self.wait_groups()
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_gateway(self, port: int | None = None, name: str = "gateway") -> None:
        from tests.integration.stage_procs import GatewayProcess

        self.gateway = GatewayProcess(self.settings, self.log_dir, self.env, port=port,
                                      name=name)

    def __exit__(self, *_: Any) -> None:
        for p in self.procs:
            p.terminate()
        if self.gateway is not None:
            try:
                self.gateway.terminate()
            except AssertionError:
                pass
        if self.client is not None:
            self.client.close()

    def members(self, stage: str) -> dict[str, bool]:
        """client id (the instance) -> whether it owns partitions, of a stage's group."""
        from confluent_kafka.admin import AdminClient

        if self._admin is None:  # one client for the stack's life (each new one logs its end)
            self._admin = AdminClient({"bootstrap.servers": self.settings.bootstrap})
        group = self.settings.group(stage)
        desc = self._admin.describe_consumer_groups([group], request_timeout=10)[group].result(20)
        if str(desc.state).rsplit(".", 1)[-1].upper() != "STABLE":
            return {}
        return {m.client_id: bool(m.assignment and m.assignment.topic_partitions)
                for m in desc.members}

    def wait_groups(self, timeout_s: float = 120.0) -> None:
        """Every instance has joined its stage's group and the group is assigned."""
        deadline = time.monotonic() + timeout_s
        for name in self.stages:
            want = 2 if name in self.standby else 1
            while True:
                got = self.members(name)
                if len(got) == want and any(got.values()):
                    break
                dead = [p for p in self.procs if p.proc.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise AssertionError(f"group of {name} not ready ({got}); logs:\n" +
                                         "\n".join(p.log()[-1500:] for p in self.procs))
                time.sleep(0.2)

    def owner(self, stage: str) -> Any:
        """The instance of `stage` that owns the (single) partition the session is on."""
        owners = [cid for cid, owns in self.members(stage).items() if owns]
        assert len(owners) == 1, f"{stage}: owners {owners}"
        return next(p for p in self.procs if p.log_path.stem == f"{stage}-{owners[0]}")

    def new_session(self) -> tuple[str, str]:
        s = self.client.create_session(resolution=RESOLUTION, fps=25)
        return s.session_id, s.viewer_token or ""

    def say(self, session_id: str, how: str, text: str = TEXT) -> None:
        if how == "message":
            self.client.message(session_id, text)
        else:
            self.client.speak(session_id, text)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-2000:]}" for p in self.procs)


# ---- scenarios ------------------------------------------------------------------------


def stage_kill(bootstrap: str, stage: str, log_dir: Path) -> dict[str, Any]:
    """SIGKILL the instance of `stage` that serves a live session mid-speech; what the
    viewer got around it."""
    stages, how = CHAINS[stage]
    with LiveStack(bootstrap, log_dir, stages, standby=(stage,)) as stack:
        sid, token = stack.new_session()
        viewer = WsViewer(stack.client, sid, token).start()
        try:
            viewer.wait(lambda: len(viewer.frames) >= 25, 60, "idle frames at the viewer")
            stack.say(sid, how)
            viewer.wait(lambda: bool(viewer.audio), 60, "speech at the viewer")
            first_audio = viewer.audio[0][0]
            viewer.wait(lambda: time.monotonic() >= first_audio + BEFORE_KILL_S, 30, "speech")
            victim = stack.owner(stage)
            t_kill, killed_at = time.monotonic(), time.time()
            victim.kill()
            viewer.wait(lambda: time.monotonic() >= t_kill + AFTER_KILL_S, AFTER_KILL_S + 5,
                        "the watch after the kill")
            survivor = stack.owner(stage)
        finally:
            viewer.stop()
        frames = list(viewer.frames)
        gaps = [(b.at - a.at, i + 1) for i, (a, b) in enumerate(zip(frames, frames[1:]))
                if b.at > t_kill]
        after_gap = frames[max(gaps)[1]] if gaps else None
        result = {"stage": stage, "killed": victim.log_path.stem, "killed_at": killed_at,
                  "took_over": survivor.log_path.stem,
                  **frame_figures(frames),
                  "max_gap_s": frame_figures(frames, t_kill - 0.5)["max_gap_s"],
                  "max_gap_before_kill_s": frame_figures(frames, None, t_kill)["max_gap_s"],
                  "frames_after_kill": sum(f.at > t_kill for f in frames),
                  "undecodable_frames": undecodable_frames(frames),
                  # A render takeover starts a new encoder: what the viewer gets next must be
                  # its keyframe, or the frames after it decode against the wrong pictures.
                  "keyframe_after_gap": bool(after_gap and after_gap.keyframe),
                  **logged_video(stack.settings, sid),
                  **audio_figures(viewer.audio)}
        result["logs"] = stack.logs() if result["frames_lost"] or \
            result["duplicates_delivered"] else ""
        return result


def logged_video(settings: Any, session_id: str) -> dict[str, int]:
    """What an auditor replays: the session's video records on the log, and how many repeat
    a (producer, seq) or a frame index already logged (a replay after a crash that did not
    continue where the dead instance stopped)."""
    from backbone.kafka_bus import KafkaBus
    from backbone.tracing import RecordHeaders
    from tests.support.bus_io import read_all

    seqs: set[tuple[str, int]] = set()
    dup_seq = n = 0
    for m in read_all(KafkaBus(settings.bootstrap), settings, "video"):
        if m.key != session_id.encode():
            continue
        h = RecordHeaders.decode(m)
        n += 1
        dup_seq += (h.stage, h.seq) in seqs
        seqs.add((h.stage, h.seq))
    return {"logged_video_records": n, "logged_repeated_seqs": dup_seq}


def _probe_topic(bootstrap: str) -> str:
    from backbone.kafka_bus import KafkaBus

    name = f"faults-probe-{uuid.uuid4().hex[:8]}"
    KafkaBus(bootstrap).admin().create_topics([name], 1)
    return name


@dataclasses.dataclass
class Probe:
    """A producer writing numbered records throughout; which ones were acknowledged."""

    bootstrap: str
    topic: str
    acked: set[int] = dataclasses.field(default_factory=set)
    failed: set[int] = dataclasses.field(default_factory=set)
    sent: int = 0

    def run(self, stop: threading.Event, every_s: float = 0.01) -> None:
        from backbone.kafka_bus import KafkaBus

        p = KafkaBus(self.bootstrap, {"delivery.timeout.ms": 120000}).producer()
        while not stop.is_set():
            n = self.sent
            self.sent += 1

            def report(err: Any, _: Any, n: int = n) -> None:
                (self.failed if err is not None else self.acked).add(n)
            p.produce(self.topic, b"probe", str(n).encode(), (), report)
            p.poll(every_s)
        p.flush(120)

    def logged(self) -> set[int]:
        from backbone.kafka_bus import KafkaBus

        return {int(m.value or b"-1") for m in KafkaBus(self.bootstrap).admin().read(self.topic, 0)}


def broker_restart(broker_settings: Any, log_dir: Path, down_s: float = 0.0) -> dict[str, Any]:
    """Stop and start the broker (same log dir) under a live session and a probe producer."""
    from backbone import broker

    bootstrap = broker_settings.bootstrap
    with LiveStack(bootstrap, log_dir, ("tts", "animate", "render")) as stack:
        sid, token = stack.new_session()
        viewer = WsViewer(stack.client, sid, token).start()
        probe = Probe(bootstrap, _probe_topic(bootstrap))
        stop = threading.Event()
        writer = threading.Thread(target=probe.run, args=(stop,), daemon=True)
        try:
            viewer.wait(lambda: len(viewer.frames) >= 25, 60, "frames at the viewer")
            writer.start()
            stack.say(sid, "speak")
            viewer.wait(lambda: bool(viewer.audio), 60, "speech at the viewer")
            t_stop = time.monotonic()
            broker.stop(broker_settings)
            time.sleep(down_s)  # how long the broker stays down is the scenario's input
            broker.start(broker_settings)
            t_up = time.monotonic()
            viewer.wait(lambda: sum(f.at > t_up for f in viewer.frames) >= 50, 120,
                        "frames after the restart")
            stack.say(sid, "speak", "And after the restart, speech goes on.")
            n_audio = len(viewer.audio)
            viewer.wait(lambda: len(viewer.audio) > n_audio, 60, "speech after the restart")
        finally:
            stop.set()
            if writer.is_alive():
                writer.join(150)
            viewer.stop()
        logged = probe.logged()
        frames = list(viewer.frames)
        after = [f for f in frames if f.at > t_up]
        return {"broker_down_s": round(t_up - t_stop, 2), "probe_sent": probe.sent,
                "probe_acked": len(probe.acked), "probe_failed": len(probe.failed),
                "broker_restart_lost": len(probe.acked - logged),
                "frames_after_restart": len(after),
                "first_frame_after_restart_s": round(after[0].at - t_up, 3) if after else None,
                "viewer_reconnects": viewer.reconnects,
                "stages_alive": all(p.proc.poll() is None for p in stack.procs)}


def gateway_restart(bootstrap: str, log_dir: Path) -> dict[str, Any]:
    """SIGKILL the gateway under a viewer and start a new one on the same address: the
    SDK's viewer reconnects to the same session and frames flow again."""
    with LiveStack(bootstrap, log_dir, ("tts", "animate", "render")) as stack:
        sid, token = stack.new_session()
        viewer = WsViewer(stack.client, sid, token).start()
        try:
            viewer.wait(lambda: len(viewer.frames) >= 25, 60, "frames at the viewer")
            port = stack.gateway.port
            t_down = time.monotonic()
            stack.gateway.kill()
            stack.start_gateway(port=port, name="gateway-restarted")
            t_up = time.monotonic()
            viewer.wait(lambda: viewer.reconnects >= 1 and
                        sum(f.at > t_up for f in viewer.frames) >= 25, 60,
                        "frames after the reconnect")
            n_audio = len(viewer.audio)
            stack.say(sid, "speak", "Still here after the gateway restarted.")
            viewer.wait(lambda: len(viewer.audio) > n_audio, 60, "speech after the restart")
        finally:
            viewer.stop()
        after = [f for f in viewer.frames if f.at > t_down]
        return {"gateway_down_s": round(t_up - t_down, 2), "viewer_reconnects": viewer.reconnects,
                # from the kill to the first frame through the new gateway
                "max_gap_s": frame_figures(viewer.frames, t_down - 0.5)["max_gap_s"],
                "frames_after_restart": len(after),
                "audio_after_restart": sum(a[0] > t_up for a in viewer.audio)}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _dropped_frames(base: str, reason: str) -> float:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("avatar_gateway_dropped_frames_total{") and
               f'reason="{reason}"' in line)


def slow_viewer(bootstrap: str, log_dir: Path, bytes_per_s: int = 2000,
                after_drops_s: float = 5.0, timeout_s: float = 120.0) -> dict[str, Any]:
    """Two viewers of one speaking session, one reading its socket far slower than the
    stream: once the socket buffers on the way are full, the gateway drops that viewer's
    frames (counted), its memory stays flat and the other viewer gets every frame."""
    with LiveStack(bootstrap, log_dir, ("tts", "animate", "render")) as stack:
        sid, token = stack.new_session()
        normal = WsViewer(stack.client, sid, token).start()
        slow = SlowReader(stack.gateway.base, sid, token, bytes_per_s)
        rss: list[float] = []
        try:
            normal.wait(lambda: len(normal.frames) >= 25, 60, "frames at the viewer")
            slow.start()
            t0 = time.monotonic()
            said = 0.0
            first_drop = None
            while time.monotonic() < t0 + timeout_s:
                now = time.monotonic()
                if now >= said + 8:  # keep speech (and its traffic) going
                    said = now
                    stack.say(sid, "speak")
                rss.append(_rss_mb(stack.gateway.proc.pid))
                if first_drop is None and _dropped_frames(stack.gateway.base, "slow_viewer"):
                    first_drop = now
                if first_drop is not None and now >= first_drop + after_drops_s:
                    break
                time.sleep(0.5)  # a memory sample every half second
            t1 = time.monotonic()
            dropped = _dropped_frames(stack.gateway.base, "slow_viewer")
        finally:
            slow.stop()
            normal.stop()
        during = [f for f in normal.frames if t0 <= f.at <= t1]
        return {"slow_viewer_bytes_per_s": bytes_per_s, "watched_s": round(t1 - t0, 1),
                "first_drop_after_s": round(first_drop - t0, 1) if first_drop else None,
                "dropped_frames_slow_viewer": dropped, "slow_viewer_bytes": slow.received,
                **{f"normal_viewer_{k}": v for k, v in frame_figures(during).items()},
                "gateway_rss_mb_start": round(rss[0], 1), "gateway_rss_mb_max": round(max(rss), 1),
                "gateway_rss_mb_end": round(rss[-1], 1)}


def _long_session(minutes: float) -> dict[str, Any]:
    try:
        from benchmarks import long_session
    except ImportError:
        return {"long_session": "benchmarks/long_session.py is missing"}
    got = long_session.run(minutes)
    return {k: got.get(k) for k in ("long_session_mem_growth_pct",
                                    "long_session_offset_drift_ms")} | {
        "long_session_minutes": minutes}


@dataclasses.dataclass
class _OwnBroker:
    settings: Any

    @classmethod
    def start(cls, home: Path) -> _OwnBroker:
        from backbone import broker

        s = dataclasses.replace(broker.BrokerSettings.from_env(), home=home,
                                port=_free_port(), controller_port=_free_port())
        broker.start(s)
        return cls(s)

    def stop(self) -> None:
        from backbone import broker

        broker.stop(self.settings)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kills = result["kills"]
    names = [k["stage"] for k in kills]
    gaps = [k["max_gap_s"] or 0.0 for k in kills]
    base = [k["max_gap_before_kill_s"] or 0.0 for k in kills]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], gaps, 0.4, label="largest gap after the kill")
    ax.bar([x + 0.2 for x in xs], base, 0.4, label="largest gap before it")
    ax.axhline(2.0, color="red", linestyle="--", label="target (2 s)")
    for x, k in zip(xs, kills):
        ax.text(x - 0.2, (k["max_gap_s"] or 0) + 0.03,
                f"lost {k['frames_lost']}\ndup {k['duplicates_delivered']}", ha="center",
                fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds between frames at the viewer")
    ax.set_title("SIGKILL of a stage mid-speech: fail-over to a standby "
                 f"(session timeout {FAILOVER_ENV['AVATAR_SESSION_TIMEOUT_MS']} ms)",
                 fontsize=9)
    ax.set_ylim(0, max([2.0, *gaps]) + 0.5)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="benchmarks/results/faults.json")
    p.add_argument("--stages", default=",".join(DEFAULT_KILLS),
                   help=f"stages to kill, of {', '.join(CHAINS)}")
    p.add_argument("--long-minutes", type=float, default=2.0, help="30 for the full run")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="faults-"))
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, shared",
                              "load_avg_1min_before": os.getloadavg()[0],
                              "failover": FAILOVER_ENV}
    own = _OwnBroker.start(tmp / "kafka")
    try:
        kills = []
        for stage in args.stages.split(","):
            d = tmp / stage
            d.mkdir()
            r = stage_kill(own.settings.bootstrap, stage, d)
            r.pop("logs", None)
            print(json.dumps(r), flush=True)
            kills.append(r)
        result["kills"] = kills
        result["frames_lost"] = sum(k["frames_lost"] or 0 for k in kills)
        result["duplicates_delivered"] = sum(k["duplicates_delivered"] or 0 for k in kills)
        result["max_gap_s"] = max((k["max_gap_s"] or 0.0) for k in kills)
        d = tmp / "broker"
        d.mkdir()
        restart = broker_restart(own.settings, d)
        print(json.dumps(restart), flush=True)
        result["broker_restart"] = restart
        result["broker_restart_lost"] = restart["broker_restart_lost"]
        for name, scenario in (("gateway_restart", gateway_restart),
                               ("slow_viewer", slow_viewer)):
            d = tmp / name
            d.mkdir()
            result[name] = scenario(own.settings.bootstrap, d)
            print(json.dumps(result[name]), flush=True)
    finally:
        own.stop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    result |= _long_session(args.long_minutes)
    result["load_avg_1min_after"] = os.getloadavg()[0]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                     indent=2))


if __name__ == "__main__":
    main()
