"""`avatar demo`: one session end to end on a bus (embedded by default), written to an MP4.

The stages run as they do in production (the runtime, the same topics); here one after the
other in this process, each until its input is drained.
"""
from __future__ import annotations

import time
from typing import Sequence
import uuid
from pathlib import Path

from backbone import integrity, sealing
from backbone.codec import AvroCodec
from backbone.records import RecordValue, ReplyText, SessionConfig, SessionControl, SpeechChunk
from backbone.runtime import StageRunner, provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE, load_stage
from backbone.tracing import RecordHeaders, new_traceparent, now_ms


def _send(settings: Settings, session_id: str, records: Sequence[tuple[str, RecordValue]]) -> None:
    """Produce `records` as the gateway would: headers, integrity links, sealing, one
    sequence per topic, all acknowledged before returning."""
    bus = settings.open_bus()
    codec = AvroCodec(registry_url=settings.schema_registry_url)
    producer = bus.producer()
    chains = integrity.Chains()
    keys = sealing.KeyStore(settings, bus) if sealing.enabled() else None
    trace = new_traceparent()
    t = now_ms()
    seqs: dict[str, int] = {}
    for topic, value in records:
        physical = settings.topic(topic)
        seq = seqs.get(topic, 0)
        seqs[topic] = seq + 1
        headers = RecordHeaders(session_id, seq, trace, t, "gateway", "demo",
                                value.SCHEMA).encode()
        payload = codec.encode(value, physical)
        if keys is not None:
            payload = sealing.seal(keys.key(session_id, create=True) or b"", session_id,
                                   topic, payload)
        headers += chains.next(session_id, topic, "gateway", seq, payload)
        producer.produce(physical, session_id.encode(), payload, headers)
    if producer.flush(30) != 0:
        raise RuntimeError("the bus did not acknowledge the session's records")


def send_session(settings: Settings, session_id: str, text: str, config: SessionConfig) -> None:
    """What the gateway does for 'create a session, then speak this text'."""
    _send(settings, session_id, [("session.control", SessionControl(session_id, "CREATE", config)),
                                 ("reply", ReplyText(session_id, "u0", text, 0, True))])


def read_wav(source: Path | bytes, name: str = "") -> tuple[bytes, int]:
    """Mono s16le PCM and its sample rate from a PCM WAV file or its bytes (8/16/24/32-bit,
    any channel count). ValueError names what is wrong."""
    import io
    import wave

    import numpy as np

    path = name or (str(source) if isinstance(source, Path) else "the upload")
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                       "rb") as w:
            width, channels, sr = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path} is not a PCM WAV file: {exc}") from exc
    if not 8000 <= sr <= 48000:
        raise ValueError(f"{path}: sample rate {sr} Hz is outside 8000..48000")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.int32) - 128) << 8
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.int32)
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 16  # sign-extend, keep 16
    elif width == 4:
        x = (np.frombuffer(raw, "<i4") >> 16).astype(np.int32)
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported")
    if len(x) % channels:
        raise ValueError(f"{path}: truncated ({len(x)} samples for {channels} channels)")
    mono = x.reshape(-1, channels).mean(axis=1)
    if len(mono) == 0:
        raise ValueError(f"{path} holds no audio")
    return np.clip(mono, -32768, 32767).astype("<i2").tobytes(), sr


def send_audio_session(settings: Settings, session_id: str, pcm: bytes, sample_rate: int,
                       config: SessionConfig) -> None:
    """What the gateway does for 'animate my own TTS audio': speech chunks, no phonemes."""
    step = sample_rate // 10 * 2  # 100 ms chunks, as tts sends them
    records: list[tuple[str, RecordValue]] = [
        ("session.control", SessionControl(session_id, "CREATE", config))]
    n_chunks = -(-len(pcm) // step)
    for i in range(n_chunks):
        records.append(("speech.audio", SpeechChunk(
            session_id, "a0", sample_rate, i * step // 2, pcm[i * step:(i + 1) * step],
            is_last=i == n_chunks - 1)))
    _send(settings, session_id, records)


def run_demo(text: str, output: Path, bus: str = "embedded", data_dir: Path = Path("avatar-data"),
             fps: int = 25, resolution: int = 512, voice: str = "en-us",
             session_id: str | None = None, audio: Path | None = None) -> Path:
    """Text (spoken by tts) or a WAV file (phonemes found by align) -> an MP4."""
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
    if audio is not None:
        pcm_in, sr_in = read_wav(audio)
        send_audio_session(settings, session_id, pcm_in, sr_in, config)
        stages: tuple[str, ...] = ("align", "animate", "render")
    else:
        send_session(settings, session_id, text, config)
        stages = ("tts", "animate", "render")
    t0 = time.perf_counter()
    for name in stages:
        StageRunner(load_stage(name), settings).run(idle_exit_s=0.5)
    elapsed = time.perf_counter() - t0
    handle = settings.open_bus()
    speech = read_session(handle, settings, session_id, "speech.audio")
    video = session_video(read_session(handle, settings, session_id, "video"))
    if not video:
        raise RuntimeError(f"session {session_id} produced no video (see the dead-letter topic)")
    pcm, sr = session_audio(speech)
    packets = [EncodedPacket(v.pts, v.dts, v.keyframe, v.data) for v in video]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(output, packets, video[0].width, video[0].height, video[0].fps, pcm, sr,
              video[0].extradata)
    print(f"session {session_id}: {len(video)} frames, {len(pcm) / sr:.2f} s of speech, "
          f"pipeline {elapsed:.2f} s")
    return output
