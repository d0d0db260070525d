"""A live session on the real broker, each stage its own process: speech is paced on the
media clock, an interrupt stops it at a chunk boundary, and the face goes on idling."""
from __future__ import annotations

import time

import pytest

from backbone.kafka_bus import KafkaBus
from backbone.records import ReplyText, SessionConfig, SessionControl
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from processors.tts import CHUNK_S, LEAD_S
from replay.reader import read_session, session_video
from tests.integration.stage_procs import StageProcess
from tests.support.bus_io import send

pytestmark = pytest.mark.kafka

LONG = ("This is a long answer that the user will not let me finish, because it goes on "
        "and on about the weather, the traffic, and the price of coffee in the city.")


def _wait_for(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_interrupt_cuts_paced_speech_and_the_face_goes_idle(kafka_bootstrap, unique_name,
                                                            tmp_path):
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap,
                        topic_prefix=f"{unique_name}.", partitions=2)
    provision_topics(settings, PIPELINE)
    procs = [StageProcess(n, settings, tmp_path, "0") for n in ("tts", "animate", "render")]
    bus = KafkaBus(kafka_bootstrap)
    sid = "live-1"
    try:
        # One warm producer for everything the "gateway" sends, so the interrupt's send
        # time is not a new producer's start-up.
        send(bus, settings, "session.control",
             SessionControl(sid, "CREATE", SessionConfig(fps=25, resolution=256)), seq=0,
             stage="gateway")
        send(bus, settings, "reply", ReplyText(sid, "u0", LONG), seq=0, stage="gateway")
        first = _wait_for(lambda: read_session(bus, settings, sid, "speech.audio"), 90,
                          "the first speech chunk")
        first_at = first[0].message.timestamp_ms
        time.sleep(1.5)
        send(bus, settings, "session.control", SessionControl(sid, "INTERRUPT"), seq=1,
             stage="gateway")
        asked = read_session(bus, settings, sid, "session.control")[-1].message.timestamp_ms
        # The face keeps moving after the cut: motion frames past the cut keep coming.
        time.sleep(3.0)
        audio_recs = read_session(bus, settings, sid, "speech.audio")
        audio = [r.value for r in audio_recs]
        timing = [(r.message.timestamp_ms - first_at, r.value.start_sample / r.value.sample_rate)
                  for r in audio_recs]
        phonemes = [r.value for r in read_session(bus, settings, sid, "speech.phonemes")]
        motion = [r.value for r in read_session(bus, settings, sid, "motion")]
        logs = "\n".join(p.log()[-1500:] for p in procs)

        last = audio[-1]
        assert last.is_last and last.n_samples == 0, logs
        assert sum(a.is_last for a in audio) == 1
        said_s = sum(a.n_samples for a in audio) / last.sample_rate
        print("interrupt handled after", timing[-1][0] - (asked - first_at), "ms; said", said_s)
        # Paced: no more than the lead (and a chunk in flight) beyond what time allowed and
        # a busy machine's delay in acting on the interrupt.
        assert said_s <= (asked - first_at) / 1000 + LEAD_S + CHUNK_S + 0.3, (said_s, timing)
        assert said_s < 5.0  # the whole reply is ~9 s
        cut = phonemes[-1].cut_sample
        assert cut == last.start_sample and phonemes[-1].is_last

        frames = [int(f) for m in motion for f in m.frames]
        assert frames == list(range(len(frames))), [(m.utterance_id, int(m.frames[0]), len(m.frames)) for m in motion][20:40]  # one clock, no gap, no repeat
        cut_frame = cut / last.sample_rate * 25
        assert frames[-1] > cut_frame + 25, "no idle frames after the cut"
        video = _wait_for(lambda: [v for v in session_video(read_session(bus, settings, sid,
                                                                         "video"))
                                   if v.pts > cut_frame + 25], 30, "idle video after the cut")
        assert video
    finally:
        for p in procs:
            p.terminate()
