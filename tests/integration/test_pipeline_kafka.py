"""The walking skeleton on the real broker: tts, animate and render each as its own process,
text in, H.264 video and speech out, every record with the headers an auditor needs."""
from __future__ import annotations


import pytest

from backbone.demo import send_session
from backbone.kafka_bus import KafkaBus
from backbone.records import SessionConfig
from backbone.tracing import H_EVENT_TIME, H_MODEL, H_SEQ, H_STAGE, H_TRACEPARENT, trace_id
from replay.reader import read_session, session_audio
from tests.integration.stage_procs import finished_video, text_pipeline

pytestmark = pytest.mark.kafka


def test_text_becomes_video_through_three_stage_processes(kafka_bootstrap, unique_name,
                                                          tmp_path):
    # Offline mode: the utterance is spoken in one go and ends the video (no idle frames).
    settings, procs = text_pipeline(kafka_bootstrap, unique_name, tmp_path)
    try:
        send_session(settings, "kafka-demo", "Hello from three processes on a real broker.",
                     SessionConfig(fps=25, resolution=256))
        bus = KafkaBus(kafka_bootstrap)
        video = finished_video(bus, settings, "kafka-demo")
        assert video and video[-1].is_last, "\n".join(p.log()[-2000:] for p in procs)
        pcm, sr = session_audio(read_session(bus, settings, "kafka-demo", "speech.audio"))
        assert [v.pts for v in video] == list(range(len(video)))  # no gap, no repeat
        assert video[0].keyframe and video[0].width == 256
        assert len(pcm) / sr <= len(video) / 25 <= len(pcm) / sr + 1.0
        rec = read_session(bus, settings, "kafka-demo", "video")[0]
        m = rec.message
        assert m.header(H_STAGE) == b"render" and m.header(H_MODEL)
        assert m.header(H_SEQ) == b"0" and int(m.header(H_EVENT_TIME)) > 0
        first = read_session(bus, settings, "kafka-demo", "speech.phonemes")[0].message
        # One trace from the text request to the video frame.
        assert trace_id(m.header(H_TRACEPARENT).decode()) == \
            trace_id(first.header(H_TRACEPARENT).decode())
    finally:
        for p in procs:
            p.terminate()
