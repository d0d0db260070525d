"""Your own TTS audio on the real broker: speech chunks from the 'gateway' go through the
align stage process (phonemes found by the CTC model) and the animate stage process."""
from __future__ import annotations

import time

import numpy as np
import pytest

from backbone.demo import send_audio_session
from backbone.kafka_bus import KafkaBus
from backbone.records import SessionConfig
from backbone.runtime import provision_topics
from backbone.settings import Settings
from backbone.stages import PIPELINE
from processors.espeak import EspeakSynth
from replay.reader import read_session
from tests.integration.stage_procs import StageProcess

pytestmark = pytest.mark.kafka


def test_integrator_audio_is_aligned_and_animated(kafka_bootstrap, unique_name, tmp_path):
    settings = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                        partitions=2)
    provision_topics(settings, PIPELINE)
    synth = EspeakSynth()
    synth.start()
    said = synth.synthesize("Please bring the map and the big box to my office.",
                            voice="en-gb+f3", rate_wpm=165)
    pcm = said.pcm.astype("<i2").tobytes()
    procs = [StageProcess(n, settings, tmp_path, "0", {"AVATAR_LIVE": "0"})
             for n in ("align", "animate")]
    bus = KafkaBus(kafka_bootstrap)
    try:
        send_audio_session(settings, "own-voice", pcm, said.sample_rate, SessionConfig(fps=25))
        deadline = time.monotonic() + 90
        spans = []
        while time.monotonic() < deadline:
            recs = [r.value for r in read_session(bus, settings, "own-voice", "speech.phonemes")]
            if recs and recs[-1].is_last:
                spans = [s for r in recs for s in r.spans]
                break
            time.sleep(0.5)
        assert spans, "\n".join(p.log()[-1500:] for p in procs)
        assert {r.source for r in recs} == {"align"}
        # Onsets close to eSpeak's exact ones (the model never heard this voice in training).
        truth = [p.start_sample for p in said.phonemes if p.symbol != "_"]
        found = [s.start_sample for s in spans if s.phoneme != "_"]
        errors = [min(abs(t - f) for f in found) / said.sample_rate * 1000 for t in truth]
        assert np.median(errors) < 30, np.median(errors)
        deadline = time.monotonic() + 60
        frames: list[int] = []
        while time.monotonic() < deadline:
            frames = [int(f) for r in read_session(bus, settings, "own-voice", "motion")
                      for f in r.value.frames]
            if frames and frames[-1] / 25 >= len(said.pcm) / said.sample_rate:
                break
            time.sleep(0.5)
        assert frames == list(range(len(frames)))
        assert frames[-1] / 25 >= len(said.pcm) / said.sample_rate
    finally:
        for p in procs:
            p.terminate()
