"""`avatar replay rerender` on the real broker: a session made offline by three stage
processes (tts, animate with the neural motion model, render) re-renders bit for bit in the
replaying process, through the same CLI an auditor runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from backbone.demo import send_session
from backbone.kafka_bus import KafkaBus
from backbone.records import SessionConfig
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from tests.integration.stage_procs import ROOT, finished_video, text_pipeline

pytestmark = pytest.mark.kafka


def test_a_kafka_session_made_by_stage_processes_re_renders_bit_exact(kafka_bootstrap,
                                                                      unique_name, tmp_path):
    settings, procs = text_pipeline(kafka_bootstrap, unique_name, tmp_path)
    bus = KafkaBus(kafka_bootstrap)
    sid = "kafka-rerender"
    try:
        send_session(settings, sid, "Made once on the broker, and made again.",
                     SessionConfig(fps=25, resolution=256, seed=3))
        video = finished_video(bus, settings, sid)
        assert video and video[-1].is_last, [p.log()[-2000:] for p in procs]
    finally:
        for p in procs:
            p.terminate()
    env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": kafka_bootstrap,
           "AVATAR_TOPIC_PREFIX": settings.topic_prefix, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "rerender.json"
    done = subprocess.run([sys.executable, "-m", "backbone.cli", "replay", "rerender", sid,
                           "--json", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["identical"] and result["mode"] == "offline"
    assert result["models"]["animate"].startswith("motion-ddim")  # the neural model
    assert result["video"]["frames"] == result["video"]["identical"] == len(video)
    assert result["motion"]["frames"] == result["motion"]["identical"] >= len(video)


def test_rerender_of_an_unknown_session_on_kafka_exits_2(kafka_bootstrap, unique_name):
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap,
                        topic_prefix=f"{unique_name}.", partitions=2)
    provision_topics(settings, PIPELINE)
    env = {**os.environ, "AVATAR_BUS": "kafka", "KAFKA_BOOTSTRAP": kafka_bootstrap,
           "AVATAR_TOPIC_PREFIX": settings.topic_prefix, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "backbone.cli", "replay", "rerender",
                           "never-was"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "never-was" in done.stderr and "unknown session" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_live_kafka_session_re_renders_with_its_clock_replayed(kafka_bootstrap, unique_name,
                                                                 tmp_path):
    """Live stages (AVATAR_LIVE=1): animate's wall-clock ticks make idle frames around the
    speech; the re-render replays those ticks from the logged idle frames."""
    from replay.reader import read_session
    from replay.rerender import rerender_session

    settings, procs = text_pipeline(kafka_bootstrap, unique_name, tmp_path, live=True)
    bus = KafkaBus(kafka_bootstrap)
    sid = "kafka-live-rerender"
    try:
        send_session(settings, sid, "Spoken live, then quiet for a moment.",
                     SessionConfig(fps=25, resolution=256))
        # Bounded wait (120 s) for the utterance's last frame and a second of idle after it.
        spoken_end = None
        for _ in range(240):
            video = [r.value for r in read_session(bus, settings, sid, "video")]
            ends = [v.pts for v in video if v.is_last]
            spoken_end = ends[0] if ends else None
            if spoken_end is not None and max(v.pts for v in video) >= spoken_end + 25:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"utterance end {spoken_end}; {[p.log()[-1500:] for p in procs]}")
    finally:
        for p in procs:
            p.terminate()
    report = rerender_session(bus, settings, sid)
    assert report.mode == "live"
    assert report.identical, report.text()
    assert report.motion_identical == report.motion_frames > spoken_end
