"""`avatar demo`: one session end to end on a bus (embedded by default), written to an MP4.

The stages run as they do in production (the runtime, the same topics); here one after the
other in this process, each until its input is drained.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

from backbone.codec import AvroCodec
from backbone.records import ReplyText, SessionConfig, SessionControl
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE, load_stage
from backbone.tracing import RecordHeaders, new_traceparent, now_ms


def send_session(settings: Settings, session_id: str, text: str, config: SessionConfig) -> None:
    """What the gateway does for 'create a session, then speak this text'."""
    bus = settings.open_bus()
    codec = AvroCodec(registry_url=settings.schema_registry_url)
    producer = bus.producer()
    trace = new_traceparent()
    t = now_ms()
    first: list[tuple[str, SessionControl | ReplyText]] = [
        ("session.control", SessionControl(session_id, "CREATE", config)),
        ("reply", ReplyText(session_id, "u0", text, 0, True)),
    ]
    for seq, (topic, value) in enumerate(first):
        physical = settings.topic(topic)
        headers = RecordHeaders(session_id, seq if topic == "session.control" else 0, trace, t,
                                "gateway", "demo", value.SCHEMA).encode()
        producer.produce(physical, session_id.encode(), codec.encode(value, physical), headers)
    if producer.flush(30) != 0:
        raise RuntimeError("the bus did not acknowledge the session's first records")


def run_demo(text: str, output: Path, bus: str = "embedded", data_dir: Path = Path("avatar-data"),
             fps: int = 25, resolution: int = 512, voice: str = "en-us",
             session_id: str | None = None) -> Path:
    from processors.encode import EncodedPacket, write_mp4
    from replay.reader import read_session, session_audio, session_video

    # Offline: no real-time pacing; the stages run one after another as fast as they can.
    overrides: dict[str, object] = {"bus": bus, "live": False}
    if bus == "embedded":
        overrides["embedded_path"] = str(data_dir / "bus.sqlite")
    settings = Settings.from_env(**overrides)
    provision_topics(settings, PIPELINE)
    session_id = session_id or f"demo-{uuid.uuid4().hex[:12]}"
    config = SessionConfig(voice=voice, fps=fps, resolution=resolution)
    send_session(settings, session_id, text, config)
    t0 = time.perf_counter()
    for name in ("tts", "animate", "render"):
        StageRunner(load_stage(name), settings).run(idle_exit_s=0.5)
    elapsed = time.perf_counter() - t0
    handle = settings.open_bus()
    audio = read_session(handle, settings, session_id, "speech.audio")
    video = session_video(read_session(handle, settings, session_id, "video"))
    if not video:
        raise RuntimeError(f"session {session_id} produced no video (see the dead-letter topic)")
    pcm, sr = session_audio(audio)
    packets = [EncodedPacket(v.pts, v.dts, v.keyframe, v.data) for v in video]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(output, packets, video[0].width, video[0].height, video[0].fps, pcm, sr,
              video[0].extradata)
    print(f"session {session_id}: {len(video)} frames, {len(pcm) / sr:.2f} s of speech, "
          f"pipeline {elapsed:.2f} s")
    return output
