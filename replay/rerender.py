"""`avatar replay rerender SESSION`: run animate and render again from a session's logged
inputs and compare, frame by frame, with the motion and video that were logged.

It reads the session's log like the other replay tools (replay/reader.py: at-least-once
replays dropped, sealed records opened with the session's data key), then checks each step
on its own: animate fed the logged control and phoneme records must make the logged motion
(weights and head pose bit for bit), and render fed the logged control and motion records
must make the logged H.264 access units byte for byte (where they differ, both streams are
decoded and the largest pixel difference is reported). Checking render from the *logged*
motion keeps the two findings apart: a motion difference does not hide whether the video is
the renderer's exact output of what was on the motion topic. When the motion is identical
the two checks together are the full chain, phonemes to pixels.

Offline sessions (`avatar demo`, AVATAR_LIVE=0) are deterministic. A live animate stage also
makes idle frames on its wall clock (`tick(state, now_ms)`); those ticks are replayed from the
logged idle motion records (a tick's records share one trace; its last frame gives the clock
reading that made it), each where the motion log has it among the speech's records, and
inputs that made no motion are placed among the ticks by their log timestamps. The speech
audio is read for the session's length only: animate works from the phonemes (align's, for
an integrator's own audio, are logged too), so nothing is re-synthesized.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from backbone.blendshapes import BLENDSHAPES, HEAD_POSE
from backbone.bus import Bus, BusError
from backbone.codec import AvroCodec
from backbone.harness import run_stage, tick_stage
from backbone.records import MotionFrames, PhonemeSpans, SessionControl, SpeechChunk, VideoChunk
from backbone.sealing import SealedError
from backbone.settings import Settings
from backbone.stage import Outbound, SessionState
from backbone.tracing import trace_id
from replay.reader import LoggedRecord, read_session

# Logs from before animate gave each tick one trace: idle records one tick wrote are
# written within a millisecond or two, ticks come every AVATAR_TICK_MS (20 ms), so records
# further apart are taken for separate ticks.
SAME_TICK_MS = 5
TEXT_LINES = 40  # differences listed in the human report; --json holds them all


class RerenderError(RuntimeError):
    """The session cannot be re-rendered; the message names what is missing."""


@dataclass(frozen=True)
class FrameDifference:
    topic: str  # "motion" or "video"
    frame: int  # frame index on the session clock (video pts)
    media_s: float  # the frame's session media time
    what: str
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.topic:6} frame {self.frame:6d} @ {self.media_s:8.3f} s: {self.what}"


@dataclass
class RerenderReport:
    session_id: str
    mode: str = "offline"  # how animate ran: "offline" or "live" (idle ticks replayed)
    motion_model: str = ""
    render_model: str = ""
    motion_frames: int = 0  # logged motion frames compared
    video_frames: int = 0  # logged video frames compared
    motion_identical: int = 0
    video_identical: int = 0
    media_s: float = 0.0  # session length on the media clock
    elapsed_s: float = 0.0
    differences: list[FrameDifference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    def text(self) -> str:
        verdict = "IDENTICAL" if self.identical else f"{len(self.differences)} DIFFERENCES"
        lines = [
            f"session {self.session_id}: re-rendered {self.media_s:.2f} s ({self.mode}) in "
            f"{self.elapsed_s:.2f} s: {verdict}",
            f"  motion ({self.motion_model}): {self.motion_identical}/{self.motion_frames} "
            "frames bit-exact",
            f"  video ({self.render_model}): {self.video_identical}/{self.video_frames} "
            "access units byte-identical",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [d.line() for d in self.differences[:TEXT_LINES]]
        if len(self.differences) > TEXT_LINES:
            lines.append(f"... and {len(self.differences) - TEXT_LINES} more (see --json)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session_id, "identical": self.identical, "mode": self.mode,
            "models": {"animate": self.motion_model, "render": self.render_model},
            "motion": {"frames": self.motion_frames, "identical": self.motion_identical},
            "video": {"frames": self.video_frames, "identical": self.video_identical},
            "media_s": self.media_s, "elapsed_s": self.elapsed_s, "notes": self.notes,
            "differences": [{"topic": d.topic, "frame": d.frame, "media_s": d.media_s,
                             "what": d.what, **d.detail} for d in self.differences],
        }

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")


@dataclass
class _Logged:
    control: list[LoggedRecord]
    phonemes: list[LoggedRecord]
    motion: list[LoggedRecord]
    video: list[LoggedRecord]
    audio: list[LoggedRecord]


def rerender_session(bus: Bus, settings: Settings, session_id: str,
                     index: dict[str, Any] | None = None, mode: str = "auto") -> RerenderReport:
    """Re-run animate and render over one session's log. `mode`: "offline", "live" or
    "auto" (live when the log holds idle frames made by the live stage's clock)."""
    t0 = time.perf_counter()
    logged = _read(bus, settings, session_id, index)
    report = RerenderReport(session_id)
    motion_frames = _logged_motion_frames(logged.motion)
    fps = _as_motion(logged.motion[0]).fps
    live = mode == "live" or (mode == "auto" and any(
        _as_motion(r).utterance_id == "idle" for r in logged.motion))
    report.mode = "live" if live else "offline"
    report.motion_model = logged.motion[0].headers.model_version
    report.render_model = logged.video[0].headers.model_version
    remade_motion = _animate(logged, live, report)
    _compare_motion(motion_frames, remade_motion, fps, report)
    remade_video = _render(logged, report)
    _compare_video(logged.video, remade_video, report)
    chunks = [r.value for r in logged.audio if isinstance(r.value, SpeechChunk)]
    audio_s = max((c.start_sample + c.n_samples) / c.sample_rate for c in chunks) if chunks else 0
    report.media_s = max(audio_s, (max(motion_frames) + 1) / fps if motion_frames else 0.0)
    if not chunks:
        report.notes.append("no speech audio on the log (expired?); it is not an input of "
                            "animate or render, so the comparison stands")
    report.elapsed_s = time.perf_counter() - t0
    return report


# ---- reading ---------------------------------------------------------------------------


def _read(bus: Bus, settings: Settings, session_id: str,
          index: dict[str, Any] | None) -> _Logged:
    codec = AvroCodec(registry_url=settings.schema_registry_url)
    got: dict[str, list[LoggedRecord]] = {}
    for topic in ("session.control", "speech.phonemes", "motion", "video", "speech.audio"):
        try:
            got[topic] = read_session(bus, settings, session_id, topic, codec, index=index)
        except SealedError as exc:
            raise RerenderError(str(exc)) from None
        except BusError as exc:
            raise RerenderError(f"cannot read topic {settings.topic(topic)}: {exc}") from None
    if not any(got.values()):
        raise RerenderError(f"no records of session {session_id!r} on the {settings.bus} bus "
                            f"(topics {settings.topic_prefix}*): unknown session")
    missing = [t for t in ("session.control", "speech.phonemes", "motion", "video")
               if not got[t]]
    if missing:
        raise RerenderError(f"session {session_id} has no records on {', '.join(missing)} "
                            "(expired, erased or never written): nothing to re-render from "
                            "or compare with")
    if not any(isinstance(r.value, SessionControl) and r.value.action == "CREATE"
               for r in got["session.control"]):
        raise RerenderError(f"session {session_id} has no CREATE record on session.control: "
                            "its config (fps, portrait, seed) is unknown")
    return _Logged(got["session.control"], got["speech.phonemes"], got["motion"],
                   got["video"], got["speech.audio"])


def _as_motion(r: LoggedRecord) -> MotionFrames:
    assert isinstance(r.value, MotionFrames)
    return r.value


def _logged_motion_frames(records: list[LoggedRecord]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Frame index -> (weights, head) as logged; a frame logged twice keeps its first."""
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for r in records:
        m = _as_motion(r)
        for k, f in enumerate(m.frames.tolist()):
            frames.setdefault(int(f), (np.asarray(m.weights[k], np.float32),
                                       np.asarray(m.head[k], np.float32)))
    return frames


# ---- animate ---------------------------------------------------------------------------


def _animate_stage(logged: _Logged, live: bool) -> Any:
    from processors.animate import AnimateStage

    version = logged.motion[0].headers.model_version
    stage = AnimateStage(model="procedural" if version.startswith("procedural") else "neural")
    stage.start()
    if stage.model_version != version:
        raise RerenderError(f"the motion was made by animate model {version!r}; this "
                            f"installation has {stage.model_version!r}, so it cannot be "
                            "re-made bit for bit")
    stage.live = live
    return stage


def _inputs(logged: _Logged) -> list[LoggedRecord]:
    """animate's inputs in the order it read them: the CREATE first, then by log time."""
    controls = sorted(logged.control, key=lambda r: r.message.timestamp_ms)
    return controls[:1] + sorted(controls[1:] + logged.phonemes,
                                 key=lambda r: r.message.timestamp_ms)


def _ticks(logged: _Logged) -> list[tuple[int, int, int]]:
    """The live clock ticks that made frames, from the idle records they wrote."""
    from processors.animate import CHUNK_S, MAX_CATCH_UP_S

    # Which idle records one tick wrote: animate gives all records of a tick one trace.
    # Logs written before it did are grouped by what a tick looks like instead: its records
    # are contiguous, all but the last full, written within a few ms, and a tick after an
    # outage (a gap in the frames) made exactly MAX_CATCH_UP_S of frames.
    idle = [trace_id(r.headers.traceparent) for r in logged.motion
            if _as_motion(r).utterance_id == "idle"]
    traced = any(a == b != "" for a, b in zip(idle, idle[1:]))
    # (timestamp of the tick's first record, its end frame, speech records logged before it)
    ticks: list[tuple[int, int, int]] = []
    last_trace, last_ts, last_full, last_end, start = "", -10**9, False, 0, 0
    speech = 0
    for r in logged.motion:
        m = _as_motion(r)
        if not len(m.frames):
            continue
        first, end = int(m.frames[0]), int(m.frames[-1]) + 1
        if m.utterance_id != "idle":
            last_full, last_trace, last_end = False, "", end
            speech += 1
            continue
        trace = trace_id(r.headers.traceparent)
        catch_up = round(MAX_CATCH_UP_S * m.fps)
        if traced:
            same = bool(ticks) and first == ticks[-1][1] and trace == last_trace
        else:
            same = bool(ticks) and first == ticks[-1][1] and last_full and (
                r.message.timestamp_ms - last_ts <= SAME_TICK_MS
                or (start > 0 and end - start <= catch_up))
        if same:
            ticks[-1] = (ticks[-1][0], end, ticks[-1][2])
        else:
            ticks.append((r.message.timestamp_ms, end, speech))
            start = first if first > last_end else 0  # a gap: the clock jumped ahead
        last_trace, last_ts, last_end = trace, r.message.timestamp_ms, end
        last_full = len(m.frames) == max(1, round(CHUNK_S * m.fps))
    return ticks


def _animate(logged: _Logged, live: bool,
             report: RerenderReport) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Offline: the inputs in order. Live: each tick goes where its idle records are on the
    motion log. An input goes before a tick when the log holds its motion before the tick's,
    or, when it made no motion, when it was written before the tick ran; an input written
    before the tick whose motion is logged after it (the tick ran while the input was in
    flight) is tried and rolled back, then applied after the tick."""
    stage = _animate_stage(logged, live)
    states: dict[str, SessionState] = {}
    now = {"ms": 0}
    stage.clock = lambda: now["ms"]
    outputs: list[Outbound] = []
    inputs = _inputs(logged)

    def apply(r: LoggedRecord) -> list[Outbound]:
        now["ms"] = r.message.timestamp_ms
        return _feed(stage, r, states)

    i = 0
    if live:
        ticks = _ticks(logged)
        spoken = 0  # motion records the inputs made so far
        for ts, end, before in ticks:
            while i < len(inputs):
                r = inputs[i]
                if spoken < before:
                    made = apply(r)
                elif r.message.timestamp_ms <= ts:
                    saved = copy.deepcopy(states)
                    made = apply(r)
                    if any(o.topic == "motion" for o in made):
                        states.clear()
                        states.update(saved)
                        break
                else:
                    break
                outputs += made
                spoken += sum(o.topic == "motion" for o in made)
                i += 1
            outputs += _tick(stage, states, end, now, report)
        report.notes.append(f"live session: {len(ticks)} clock ticks that made idle frames "
                            "replayed where the motion log has them")
    for r in inputs[i:]:
        outputs += apply(r)
    stage.stop()
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for out in outputs:
        if out.topic == "motion" and isinstance(out.value, MotionFrames):
            m = out.value
            for k, f in enumerate(m.frames.tolist()):
                # Re-encoded as the runtime would: float32 on the wire.
                frames.setdefault(int(f), (np.asarray(m.weights[k], np.float32),
                                           np.asarray(m.head[k], np.float32)))
    return frames


def _tick(stage: Any, states: dict[str, SessionState], end: int, now: dict[str, int],
          report: RerenderReport) -> list[Outbound]:
    """Tick animate's clock at the wall time that makes its idle frames end at `end`."""
    from processors.animate import IDLE_LAG_S

    state = states.get(report.session_id)
    if state is None or "t0_ms" not in state.data:
        report.notes.append(f"an idle tick up to frame {end} came before the session "
                            "started on the replayed clock")
        return []
    # The log shows this tick made frames, which it does only once speech is over or
    # stale; the replayed wall clock is not the original one, so say so explicitly.
    state.data.pop("speaking_ms", None)
    fps = int(state.data.get("config", {}).get("fps", 25))
    t0 = int(state.data["t0_ms"])
    tick_ms = t0 + int(np.floor((end / fps + IDLE_LAG_S) * 1000))
    for candidate in range(tick_ms - 2, tick_ms + 1000 // fps + 3):
        if int(((candidate - t0) / 1000 - IDLE_LAG_S) * fps) == end:
            tick_ms = candidate
            break
    now["ms"] = tick_ms
    return tick_stage(stage, states, tick_ms)


def _feed(stage: Any, r: LoggedRecord, states: dict[str, SessionState]) -> list[Outbound]:
    """One logged record through the stage harness, as the runtime handed it on: its
    event time and producing stage from the record's own headers."""
    assert r.value is not None
    event_time = r.headers.event_time_ms or r.message.timestamp_ms
    return run_stage(stage, [(_logical(r), r.value)], states, start=False,
                     clock=lambda: event_time, producer=r.headers.stage).outputs


def _logical(r: LoggedRecord) -> str:
    return {SessionControl: "session.control", PhonemeSpans: "speech.phonemes",
            MotionFrames: "motion"}[type(r.value)]


def _compare_motion(logged: dict[int, tuple[np.ndarray, np.ndarray]],
                    remade: dict[int, tuple[np.ndarray, np.ndarray]], fps: int,
                    report: RerenderReport) -> None:
    report.motion_frames = len(logged)
    for f in sorted(set(logged) | set(remade)):
        t = f / fps
        if f not in remade:
            report.differences.append(FrameDifference(
                "motion", f, t, "logged, but the re-render made no such frame"))
            continue
        if f not in logged:
            report.differences.append(FrameDifference(
                "motion", f, t, "made by the re-render, but not on the log"))
            continue
        (lw, lh), (rw, rh) = logged[f], remade[f]
        if lw.tobytes() == rw.tobytes() and lh.tobytes() == rh.tobytes():
            report.motion_identical += 1
            continue
        dw = np.abs(lw.astype(np.float64) - rw)
        dh = np.abs(lh.astype(np.float64) - rh)
        worst = int(np.argmax(dw))
        names = [BLENDSHAPES[i] for i in np.flatnonzero(lw.view(np.uint32) != rw.view(np.uint32))]
        head = [HEAD_POSE[i] for i in np.flatnonzero(lh.view(np.uint32) != rh.view(np.uint32))]
        what = (f"{len(names)} blendshape weights differ (max |d| {dw.max():.3g} on "
                f"{BLENDSHAPES[worst]})" if names else "blendshapes identical")
        if head:
            what += f"; head pose differs on {', '.join(head)} (max |d| {dh.max():.3g} rad)"
        report.differences.append(FrameDifference("motion", f, t, what, {
            "blendshapes": names, "head": head, "max_weight_diff": float(dw.max()),
            "max_head_diff": float(dh.max())}))


# ---- render ----------------------------------------------------------------------------


def _render(logged: _Logged, report: RerenderReport) -> dict[int, VideoChunk]:
    """Render and encode the logged motion again. Where the log shows a keyframe off the
    encoder's fixed GOP (a render restart: new process or replaced encoder), the re-render
    starts a new encoder there too, as the stage did."""
    from processors.render import KEYFRAME_INTERVAL_S, RenderStage

    stage = RenderStage()
    stage.start()
    version = logged.video[0].headers.model_version
    if stage.model_version != version:
        raise RerenderError(f"the video was made by render {version!r}; this installation "
                            f"has {stage.model_version!r}")
    keyframes = {r.value.pts for r in logged.video
                 if isinstance(r.value, VideoChunk) and r.value.keyframe}
    controls = sorted(logged.control, key=lambda r: r.message.timestamp_ms)
    inputs = controls[:1] + sorted(controls[1:] + logged.motion,
                                   key=lambda r: (r.message.timestamp_ms,
                                                  not isinstance(r.value, SessionControl)))
    states: dict[str, SessionState] = {}
    made: dict[int, VideoChunk] = {}
    encoder, encoded = None, 0
    restarts = []
    for r in inputs:
        state = states.get(report.session_id)
        if isinstance(r.value, MotionFrames) and state is not None and len(r.value.frames):
            first = int(r.value.frames[0])
            enc = state.scratch.get("encoder")
            interval = max(1, int(KEYFRAME_INTERVAL_S * r.value.fps))
            if enc is not None and first in keyframes and encoded % interval != 0 \
                    and first >= int(state.data.get("next_pts", 0)):
                state.scratch.pop("encoder")
                restarts.append(first)
        outputs = _feed(stage, r, states)
        state = states.get(report.session_id)
        enc = state.scratch.get("encoder") if state is not None else None
        if enc is not encoder:
            encoder, encoded = enc, 0
        for out in outputs:
            if isinstance(out.value, VideoChunk):
                made.setdefault(out.value.pts, out.value)
                encoded += 1
    stage.stop()
    if restarts:
        report.notes.append(f"the log shows the encoder restarted at frame(s) "
                            f"{', '.join(map(str, restarts[:10]))}; the re-render restarted "
                            "it there too")
    return made


def _compare_video(records: list[LoggedRecord], made: dict[int, VideoChunk],
                   report: RerenderReport) -> None:
    logged: dict[int, VideoChunk] = {}
    for r in records:
        if isinstance(r.value, VideoChunk):
            logged.setdefault(r.value.pts, r.value)
    report.video_frames = len(logged)
    fps = next(iter(logged.values())).fps
    differing = []
    last = max(logged)
    unrendered = sorted(p for p in made if p > last)
    if unrendered:
        # Logged motion past the last logged video: the render stage stopped before it (a
        # live session cut off), so no picture was ever delivered for these frames.
        report.notes.append(f"frames {unrendered[0]}..{unrendered[-1]} have logged motion but "
                            "no logged video (render stopped before them); not compared")
    for pts in sorted(set(logged) | set(made) - set(unrendered)):
        a, b = logged.get(pts), made.get(pts)
        if a is None:
            report.differences.append(FrameDifference(
                "video", pts, pts / fps, "made by the re-render, but not on the log"))
        elif b is None:
            report.differences.append(FrameDifference(
                "video", pts, pts / fps, "logged, but the re-render made no such frame"))
        elif a.data == b.data and a.keyframe == b.keyframe:
            report.video_identical += 1
        else:
            differing.append(pts)
    if not differing:
        return
    # Frames depend on the ones before them (P-frames): decode both streams whole.
    pixels_logged = _decode([logged[p] for p in sorted(logged)])
    pixels_made = _decode([made[p] for p in sorted(made)])
    for pts in differing:
        a, b = logged[pts], made[pts]
        what = f"access unit differs ({len(a.data)} bytes logged, {len(b.data)} re-rendered"
        if a.keyframe != b.keyframe:
            what += f"; keyframe logged={a.keyframe} re-rendered={b.keyframe}"
        detail: dict[str, Any] = {"logged_bytes": len(a.data), "rerendered_bytes": len(b.data),
                                  "logged_keyframe": a.keyframe, "rerendered_keyframe": b.keyframe}
        pa, pb = pixels_logged.get(pts), pixels_made.get(pts)
        if pa is not None and pb is not None and pa.shape == pb.shape:
            diff = int(np.abs(pa.astype(np.int16) - pb).max())
            detail["max_pixel_diff"] = diff
            what += f"); decoded, max pixel difference {diff}"
        else:
            what += "); a decoded picture is missing, pixels not compared"
        report.differences.append(FrameDifference("video", pts, pts / fps, what, detail))


def _decode(chunks: Iterable[VideoChunk]) -> dict[int, np.ndarray]:
    """pts -> decoded I420 picture (Y, U and V planes stacked as the encoder takes them)."""
    import av

    ctx = av.CodecContext.create("h264", "r")
    out: dict[int, np.ndarray] = {}
    for c in chunks:
        pkt = av.Packet(c.data)
        pkt.pts = c.pts
        try:
            for frame in ctx.decode(pkt):
                if frame.pts is not None:
                    out[int(frame.pts)] = frame.to_ndarray(format="yuv420p")
        except av.error.FFmpegError:
            continue  # an undecodable unit: that frame is reported without pixels
    return out
