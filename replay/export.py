"""`avatar replay export SESSION -o DIR`: what an auditor takes away from a session's log.

- session.mp4: the video access units exactly as streamed (muxed, never re-encoded) and
  the speech, on the session media clock;
- captions.vtt: what the user said or typed and what the avatar replied, timed;
- manifest.json: config and consent, model versions per stage, the timeline, per-stage
  latencies, the integrity verification and a sha256 of every file;
- report.html: one self-contained page (thumbnails inline) with all of the above.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backbone.bus import Bus
from backbone.records import (PhonemeSpans, ReplyText, SessionControl, SpeechChunk, Transcript,
                              VideoChunk)
from backbone.sealing import SealedError
from backbone.settings import Settings
from replay.reader import LoggedRecord, read_session, session_audio, session_video
from replay.verify import verify_session

THUMBNAILS = 6  # keyframes shown in the report


class ExportError(RuntimeError):
    """The session cannot be exported; the message says what is missing."""


@dataclass
class Exported:
    directory: Path
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    frames: int = 0
    audio_s: float = 0.0
    verified: bool = False
    missing: list[str] = field(default_factory=list)


def export_session(bus: Bus, settings: Settings, session_id: str, out: Path,
                   index: dict[str, Any] | None = None) -> Exported:
    """`index`: the session's entry in the session index, to seek instead of scanning."""
    t0 = time.perf_counter()
    try:
        return _export(bus, settings, session_id, out, t0, index)
    except SealedError as exc:
        raise ExportError(str(exc)) from None


def _export(bus: Bus, settings: Settings, session_id: str, out: Path, t0: float,
            index: dict[str, Any] | None) -> Exported:
    from processors.encode import EncodedPacket, write_mp4

    # Motion and audit records are only counted and timed here: decoding 52 named floats
    # per frame for ten minutes would cost more than the rest of the export.
    logged = {t: read_session(bus, settings, session_id, t, decode=t not in ("motion", "audit"),
                              index=index)
              for t in ("session.control", "transcript", "reply", "speech.audio",
                        "speech.phonemes", "motion", "video", "audit")}
    if not any(logged.values()):
        raise ExportError(f"no records of session {session_id!r} on {settings.bus} "
                          f"(topics {settings.topic_prefix}*): unknown or expired session")
    out.mkdir(parents=True, exist_ok=True)
    result = Exported(out)
    control = [r for r in logged["session.control"] if isinstance(r.value, SessionControl)]
    create = next((r for r in control if r.value.action == "CREATE"), None)  # type: ignore[union-attr]
    if create is None:
        result.missing.append("session.control CREATE (config, consent, clock origin): "
                              "expired or never written")
    t0_ms = create.headers.event_time_ms if create else min(
        r.headers.event_time_ms for rs in logged.values() for r in rs)
    video = session_video(logged["video"])
    pcm, sr = session_audio(logged["speech.audio"])
    result.audio_s = len(pcm) / sr if len(pcm) else 0.0
    if video:
        first_key = next((i for i, v in enumerate(video) if v.keyframe), None)
        if first_key is None:
            result.missing.append("video keyframe: no picture can be decoded")
        else:
            if first_key:
                result.missing.append(f"{first_key} video frames before the first keyframe "
                                      "(expired from the log)")
            video = video[first_key:]
            packets = [EncodedPacket(v.pts, v.dts, v.keyframe, v.data) for v in video]
            write_mp4(out / "session.mp4", packets, video[0].width, video[0].height,
                      video[0].fps, pcm if len(pcm) else None, sr, video[0].extradata)
            result.frames = len(video)
    else:
        result.missing.append("video: no frames in the log")
    (out / "captions.vtt").write_text(_captions(logged, t0_ms))
    report = verify_session(bus, settings, session_id)
    result.verified = report.ok
    manifest = _manifest(session_id, logged, create, t0_ms, video, result, report.text())
    manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "report.html").write_text(_html(manifest, _thumbnails(video), report.text(),
                                           (out / "captions.vtt").read_text()))
    for name in ("session.mp4", "captions.vtt", "manifest.json", "report.html"):
        if (out / name).exists():
            result.files[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in result.files.items()))
    return result


def _vtt_time(ms: float) -> str:
    ms = max(0, int(ms))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def _captions(logged: dict[str, list[LoggedRecord]], t0_ms: int) -> str:
    cues: list[tuple[float, float, str]] = []
    for r in logged["transcript"]:
        v = r.value
        if isinstance(v, Transcript) and v.is_final:
            # asr times are on the audio clock; typed text has only its arrival time.
            start = float(v.start_ms if v.source != "text" else r.headers.event_time_ms - t0_ms)
            end = float(v.end_ms if v.source != "text" else start + 2000)
            cues.append((start, max(end, start + 500), f"<v User>{v.text}"))
    spoken: dict[str, list[int]] = defaultdict(list)
    sr = 22050
    for r in logged["speech.audio"]:
        if isinstance(r.value, SpeechChunk):
            sr = r.value.sample_rate
            spoken[r.value.utterance_id] += [r.value.start_sample,
                                             r.value.start_sample + r.value.n_samples]
    for r in logged["reply"]:
        v = r.value
        if isinstance(v, ReplyText):
            uid = v.utterance_id if not v.chunk_index else f"{v.utterance_id}.{v.chunk_index}"
            span = spoken.get(uid)
            start = min(span) * 1000 / sr if span else r.headers.event_time_ms - t0_ms
            end = max(span) * 1000 / sr if span else start + 2000
            cues.append((start, end, f"<v Avatar>{v.text}"))
    cues.sort()
    lines = ["WEBVTT", ""]
    for i, (a, b, text) in enumerate(cues, 1):
        lines += [str(i), f"{_vtt_time(a)} --> {_vtt_time(b)}", text.replace("-->", "->"), ""]
    return "\n".join(lines)


def _manifest(session_id: str, logged: dict[str, list[LoggedRecord]],
              create: LoggedRecord | None, t0_ms: int, video: list[VideoChunk],
              result: Exported, verify_text: str) -> dict[str, Any]:
    models: dict[str, set[str]] = defaultdict(set)
    latency: dict[str, list[int]] = defaultdict(list)
    timeline = []
    for topic, records in logged.items():
        for r in records:
            if r.headers.stage:
                models[r.headers.stage].add(r.headers.model_version)
            # Log time minus the originating input's time: how long after the request this
            # record existed (paced records are due later, and say so in their event time).
            if topic != "audit" and r.headers.event_time_ms > 0:
                latency[r.headers.stage or "?"].append(
                    r.message.timestamp_ms - r.headers.event_time_ms)
        if records:
            timeline.append({"topic": topic, "records": len(records),
                             "first_ms": min(r.message.timestamp_ms for r in records) - t0_ms,
                             "last_ms": max(r.message.timestamp_ms for r in records) - t0_ms})
    cfg = create.value.config if create and isinstance(create.value, SessionControl) else None
    phonemes = sum(len(r.value.final_spans) for r in logged["speech.phonemes"]
                   if isinstance(r.value, PhonemeSpans))
    return {
        "session_id": session_id,
        "created_ms": t0_ms,
        "config": cfg.to_avro() if cfg else None,
        "consent": dict(cfg.consent) if cfg else None,
        "model_versions": {s: sorted(v) for s, v in sorted(models.items())},
        "timeline": timeline,
        "latency_ms": {s: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                           "records": len(v)} for s, v in sorted(latency.items()) if v},
        "video": {"frames": len(video), "fps": video[0].fps if video else None,
                  "size": [video[0].width, video[0].height] if video else None,
                  "reencoded": False},
        "speech_seconds": round(result.audio_s, 3),
        "phonemes": phonemes,
        "integrity": {"intact": result.verified, "report": verify_text.splitlines()},
        "missing": result.missing,
    }


def _thumbnails(video: list[VideoChunk]) -> list[tuple[float, str]]:
    import av

    keys = [i for i, v in enumerate(video) if v.keyframe]
    picks = set(keys[:: max(1, len(keys) // THUMBNAILS)][:THUMBNAILS])
    if not picks:
        return []
    out = []
    for i in sorted(picks):
        v = video[i]
        # A keyframe decodes on its own (IDR with its SPS/PPS): no need to decode the rest.
        codec = av.CodecContext.create("h264", "r")
        for frame in list(codec.decode(av.Packet(v.data))) + list(codec.decode(None)):
            buf = io.BytesIO()
            frame.to_image().resize((160, 160)).save(buf, format="PNG")  # type: ignore[no-untyped-call]
            out.append((v.pts / v.fps, base64.b64encode(buf.getvalue()).decode()))
    return out


def _html(manifest: dict[str, Any], thumbs: list[tuple[float, str]], verify_text: str,
          captions: str) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(t['topic'])}</td><td>{t['records']}</td>"
                   f"<td>{t['first_ms'] / 1000:.2f}</td><td>{t['last_ms'] / 1000:.2f}</td></tr>"
                   for t in manifest["timeline"])
    lat = "".join(f"<tr><td>{esc(s)}</td><td>{v['p50']:.0f}</td><td>{v['p95']:.0f}</td>"
                  f"<td>{esc(', '.join(manifest['model_versions'].get(s, [])))}</td></tr>"
                  for s, v in manifest["latency_ms"].items())
    imgs = "".join(f"<figure><img src='data:image/png;base64,{b}' alt='frame at {t:.1f} s'>"
                   f"<figcaption>{t:.1f} s</figcaption></figure>" for t, b in thumbs)
    status = "intact" if manifest["integrity"]["intact"] else "TAMPERING FOUND"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Session {esc(manifest['session_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#1d2330}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccd;padding:3px 8px;text-align:left}}
figure{{display:inline-block;margin:4px}}pre{{background:#f4f5f8;padding:8px;overflow:auto}}
.ok{{color:#157a4a}}.bad{{color:#b3261e}}</style></head><body>
<h1>Session {esc(manifest['session_id'])}</h1>
<p>Integrity: <b class="{'ok' if manifest['integrity']['intact'] else 'bad'}">{status}</b> ·
{manifest['video']['frames']} frames · {manifest['speech_seconds']} s of speech ·
video as streamed (not re-encoded)</p>
<h2>Frames</h2>{imgs or '<p>no decodable frames</p>'}
<h2>Timeline</h2><table><tr><th>topic</th><th>records</th><th>first (s)</th><th>last (s)</th></tr>
{rows}</table>
<h2>Stages</h2><table><tr><th>stage</th><th>p50 ms</th><th>p95 ms</th><th>model versions</th></tr>
{lat}</table>
<h2>Config and consent</h2><pre>{esc(json.dumps(manifest['config'], indent=2))}</pre>
<h2>Captions</h2><pre>{esc(captions)}</pre>
<h2>Verification</h2><pre>{esc(verify_text)}</pre>
<h2>Missing</h2><pre>{esc(chr(10).join(manifest['missing']) or 'nothing')}</pre>
</body></html>
"""
