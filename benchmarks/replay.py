"""Replay benchmark: export and verification of a 10-minute session, and every tampering
case caught.

The session is written the way the stages write it (same topics, headers, integrity links,
audit checkpoints) on the embedded bus: 25 fps H.264 at 512 px (real encoder output, the
GOPs cycled), 100 ms speech chunks, 80 ms motion records, phonemes and control. Then:
- export_s_per_10min: `replay export` (MP4 as streamed + captions + manifest + report);
- verify_records_per_s: `replay verify` over every record of the session at rest (median
  of --runs; verify_records_per_s_wal: once before the WAL is folded in), with the cost
  of reading the same records as bus Messages measured in the same runs (ratio);
- tamper_cases / tamper_detected: a modified, deleted, reordered, injected, unchained and
  truncated record, each on a fresh copy of the log, each must be caught and named;
- rerender_s_per_min: `replay rerender` (animate + render again, compared frame by frame)
  of a real offline session, in seconds per minute of session.

    python benchmarks/replay.py --json benchmarks/results/replay.json [--minutes 10] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SID = "ten-minutes"
FPS = 25
SR = 22050


def _write_session(settings: Any, minutes: float) -> int:
    from backbone import integrity
    from backbone.codec import AvroCodec
    from backbone.records import (ChainHead, IntegrityCheckpoint, MotionFrames, PhonemeSpan,
                                  PhonemeSpans, ReplyText, SessionConfig, SessionControl,
                                  SpeechChunk, VideoChunk)
    from backbone.tracing import RecordHeaders, new_traceparent
    from processors.encode import H264Encoder

    bus = settings.open_bus()
    codec = AvroCodec()
    chains = integrity.Chains()
    producer = bus.producer(transactional_id="bench")
    seqs: dict[tuple[str, str], int] = {}
    t0 = int(time.time() * 1000)
    count = 0

    def put(topic: str, stage: str, value: Any) -> None:
        nonlocal count
        seq = seqs.get((topic, stage), 0)
        seqs[(topic, stage)] = seq + 1
        physical = settings.topic(topic)
        payload = codec.encode(value, physical)
        hdr = RecordHeaders(SID, seq, new_traceparent(), t0, stage, f"{stage}-bench",
                            value.SCHEMA).encode()
        hdr += chains.next(SID, f"{topic}", stage, seq, payload)
        producer.produce(physical, SID.encode(), payload, hdr)
        count += 1

    producer.begin_transaction()  # one SQLite transaction per batch: writing is not timed
    put("session.control", "gateway", SessionControl(SID, "CREATE", SessionConfig(
        fps=FPS, consent={"recording": "granted"})))
    enc = H264Encoder(512, 512, FPS, keyframe_interval=50)
    enc.start()
    yy, xx = np.mgrid[0:512, 0:512]
    gop: list[Any] = []
    for i in range(250):
        img = np.stack([(xx + 3 * i) % 256, (yy + i) % 256, (xx ^ yy) % 256], -1).astype(np.uint8)
        gop += enc.encode(img, i)
    frames = int(minutes * 60 * FPS)
    rng = np.random.default_rng(1)
    tone = (np.sin(np.arange(SR // 10) * 0.05) * 8000).astype("<i2").tobytes()
    spoken = 0
    for f in range(frames):
        p = gop[f % len(gop)]
        put("video", "render", VideoChunk(SID, 512, 512, FPS, f, f, p.keyframe, p.data))
        if f % 2 == 0:
            put("motion", "animate", MotionFrames(
                SID, FPS, np.array([f, f + 1]), rng.random((2, 52), dtype=np.float32),
                rng.random((2, 3), dtype=np.float32) * 0.1, "u"))
        if f % 25 == 0:
            second = f // 25
            put("speech.phonemes", "tts", PhonemeSpans(SID, f"u{second}", SR, tuple(
                PhonemeSpan("a", second * SR + k * 2205, second * SR + (k + 1) * 2205)
                for k in range(10))))
            if second % 10 == 0:
                put("reply", "dialogue", ReplyText(SID, f"u{second}", "Ten more seconds."))
        while spoken < (f + 1) * 10 // FPS:  # 100 ms chunks keep pace with the frames
            put("speech.audio", "tts", SpeechChunk(SID, f"u{spoken // 10}", SR,
                                                  spoken * SR // 10, tone))
            spoken += 1
        if f % 5000 == 4999:
            producer.commit_transaction()
            producer.begin_transaction()
    for stage in ("render", "animate", "tts", "gateway", "dialogue"):
        heads = tuple(ChainHead(t, seq, link.hex()) for (sid, t, st), (seq, link)
                      in sorted(chains.heads.items()) if st == stage and t != "audit")
        if heads:
            put("audit", stage, IntegrityCheckpoint(SID, stage, heads, t0))
    producer.commit_transaction()
    return count


def _tamper(db: Path, case: str, prefix: str) -> tuple[str, int]:
    """Apply one tampering to the log; returns the topic and offset it should be named at."""
    con = sqlite3.connect(db)
    topic = prefix + ("motion" if case in ("deleted", "truncated") else "speech.audio")
    rows = con.execute("SELECT part, off FROM records WHERE topic=? AND key=? ORDER BY off",
                       (topic, SID.encode())).fetchall()
    part, off = rows[len(rows) // 2]
    if case == "modified":
        con.execute("UPDATE records SET value = CAST(value || x'00' AS BLOB) WHERE topic=? "
                    "AND part=? AND off=?", (topic, part, off))
    elif case == "deleted":
        con.execute("DELETE FROM records WHERE topic=? AND part=? AND off=?", (topic, part, off))
        off = rows[len(rows) // 2 + 1][1]  # named by the record that follows the gap
    elif case == "truncated":
        part, off = rows[-1]
        con.execute("DELETE FROM records WHERE topic=? AND part=? AND off=?", (topic, part, off))
        off = -1  # named by the checkpoint
    elif case == "reordered":
        nxt = rows[len(rows) // 2 + 1][1]
        con.execute("UPDATE records SET off=-5 WHERE topic=? AND part=? AND off=?", (topic, part, off))
        con.execute("UPDATE records SET off=? WHERE topic=? AND part=? AND off=?", (off, topic, part, nxt))
        con.execute("UPDATE records SET off=? WHERE topic=? AND part=? AND off=-5", (nxt, topic, part))
    elif case in ("injected", "unchained"):
        last = con.execute("SELECT MAX(off), headers FROM records WHERE topic=? AND part=?",
                           (topic, part)).fetchone()
        headers = json.loads(last[1])
        if case == "injected":
            # A link of the right shape that nobody with the key made (headers are hex).
            headers = [[k, ("ab" * 16).encode().hex() if k == "link" else v]
                       for k, v in headers]
        else:
            headers = [[k, v] for k, v in headers if k not in ("link", "link_prev")]
        off = last[0] + 1
        con.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?)",
                    (topic, part, off, SID.encode(), b"\xc3\x01 forged", json.dumps(headers),
                     int(time.time() * 1000)))
    con.commit()
    con.close()
    return topic[len(prefix):], off


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="benchmarks/results/replay.json")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3, help="verify runs (median reported)")
    p.add_argument("--rerender-s", type=float, default=30.0,
                   help="seconds of speech in the re-render session (0: skip)")
    args = p.parse_args()

    from backbone.runtime import provision_topics
    from backbone.settings import Settings
    from backbone.stages import PIPELINE
    from replay.export import export_session
    from replay.verify import read_session_raw, verify_session

    tmp = Path(tempfile.mkdtemp(prefix="replay-bench-"))
    db = tmp / "bus.sqlite"
    settings = Settings(bus="embedded", embedded_path=str(db), partitions=2)
    provision_topics(settings, PIPELINE)
    t = time.perf_counter()
    records = _write_session(settings, args.minutes)
    write_s = time.perf_counter() - t
    bus = settings.open_bus()
    result: dict[str, Any] = {"load_avg_1min_before": os.getloadavg()[0],
                              "session_minutes": args.minutes, "records": records,
                              "write_s": round(write_s, 2)}

    # Once as the writer left the log (its last transactions still in SQLite's WAL, which
    # reads must look up page by page), then at rest: an auditor verifies past sessions,
    # and SQLite folds the WAL into the file when the last writer closes.
    t = time.perf_counter()
    report = verify_session(bus, settings, SID)
    result["verify_records_per_s_wal"] = report.records / (time.perf_counter() - t)
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    # Several runs, the median reported: the machine is shared and one run can be unlucky.
    read_runs, verify_runs = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        raw = read_session_raw(bus, settings, SID)
        read_runs.append(time.perf_counter() - t)
        n = len(raw)
        del raw
        t = time.perf_counter()
        report = verify_session(bus, settings, SID)
        verify_runs.append(time.perf_counter() - t)
        assert report.ok and report.records == n, report.text()
    read_s, verify_s = statistics.median(read_runs), statistics.median(verify_runs)
    result["verify_records_per_s"] = n / verify_s
    result["verify_records_per_s_best"] = n / min(verify_runs)
    result["verify_runs_s"] = [round(x, 3) for x in verify_runs]
    # Reading every record as bus Messages (what export and the generic path do); verify
    # reads only what a link needs, so it can be faster than this.
    result["read_only_records_per_s"] = n / read_s
    result["verify_vs_read_ratio"] = read_s / verify_s

    t = time.perf_counter()
    done = export_session(bus, settings, SID, tmp / "export")
    export_s = time.perf_counter() - t
    result["export_s"] = export_s
    result["export_s_per_10min"] = export_s * 10 / args.minutes
    result["export_frames"] = done.frames
    result["export_mp4_mb"] = (tmp / "export" / "session.mp4").stat().st_size / 1e6

    con = sqlite3.connect(db)  # fold the WAL into the file, so each copy holds everything
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    cases = ["modified", "deleted", "reordered", "injected", "unchained", "truncated"]
    outcomes = {}
    for case in cases:
        copy = tmp / f"{case}.sqlite"
        shutil.copy(db, copy)
        topic, off = _tamper(copy, case, settings.topic_prefix)
        s2 = Settings(bus="embedded", embedded_path=str(copy), partitions=2)
        found = verify_session(s2.open_bus(), s2, SID).tampering
        kind = "deleted" if case == "truncated" else case
        named = any(f.kind == kind and f.topic == topic and (off < 0 or f.offset == off)
                    for f in found)
        outcomes[case] = {"detected": bool(found), "named": named,
                          "findings": [f.line() for f in found][:3]}
    if args.rerender_s > 0:
        result.update(_rerender(tmp, args.rerender_s))
    result["tamper_cases"] = len(cases)
    result["tamper_detected"] = sum(o["detected"] and o["named"] for o in outcomes.values())
    result["tamper"] = outcomes
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "tamper"}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


def _rerender(tmp: Path, speech_s: float) -> dict[str, Any]:
    """`replay rerender` of a real offline session (tts, neural animate, render at 512 px
    on the embedded bus, as `avatar demo` makes it): seconds per minute of session."""
    from backbone.demo import send_session
    from backbone.records import SessionConfig
    from backbone.runtime import StageRunner, provision_topics
    from backbone.settings import Settings
    from backbone.stages import load_stage
    from replay.rerender import rerender_session

    settings = Settings(bus="embedded", embedded_path=str(tmp / "rerender.sqlite"),
                        partitions=2, live=False)
    provision_topics(settings, ["tts", "animate", "render"])
    sentence = "An auditor can make every frame of this session again. "
    text = sentence * max(1, round(speech_s / 3.2))  # ~3.2 s of speech per sentence
    send_session(settings, "rerender-bench", text, SessionConfig(fps=25, resolution=512))
    t = time.perf_counter()
    for name in ("tts", "animate", "render"):
        StageRunner(load_stage(name), settings).run(idle_exit_s=0.5)
    made_s = time.perf_counter() - t
    report = rerender_session(settings.open_bus(), settings, "rerender-bench")
    return {"rerender_session_s": round(report.media_s, 2),
            "rerender_s": round(report.elapsed_s, 2),
            "rerender_s_per_min": report.elapsed_s * 60 / report.media_s,
            "rerender_identical": report.identical,
            "rerender_frames": report.video_frames,
            "pipeline_s_same_session": round(made_s, 2)}


def _plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.bar(["verify", "read as Messages"], [result["verify_records_per_s"],
                                     result["read_only_records_per_s"]])
    a1.axhline(50000, color="red", ls="--", lw=1, label="target 50k/s")
    a1.set_ylabel("records / s")
    a1.legend(loc="lower right")
    a1.set_title(f"{result['records']} records, {result['session_minutes']:g} min")
    cases = list(result["tamper"])
    a2.bar(cases, [1 if result["tamper"][c]["named"] else 0 for c in cases],
           color=["#157a4a" if result["tamper"][c]["named"] else "#b3261e" for c in cases])
    a2.set_ylim(0, 1.2)
    rerender = (f"; rerender {result['rerender_s_per_min']:.1f} s / min"
                if "rerender_s_per_min" in result else "")
    a2.set_title(f"tampering caught and named: {result['tamper_detected']}/{result['tamper_cases']}"
                 f"\nexport {result['export_s_per_10min']:.1f} s / 10 min{rerender}")
    a2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
