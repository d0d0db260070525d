"""The spoken front of the pipeline on the real broker: asr and dialogue as their own
processes, user audio in, transcripts and streamed replies out (from echo, and from an
OpenAI-compatible endpoint served by a fake in this test process)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from backbone.kafka_bus import KafkaBus
from backbone.records import (AudioChunk, ReplyText, SessionConfig, SessionControl,
                              Transcript)
from backbone.runtime import provision_topics
from backbone.settings import Settings
from processors.espeak import EspeakSynth
from replay.reader import read_session
from tests.integration.stage_procs import StageProcess
from tests.support.bus_io import send
from tests.support.fake_llm import Behaviour, FakeLLM

pytestmark = pytest.mark.kafka

KEY = "sk-integration-secret-42"


def _wait_for(fn, timeout_s: float, what: str, logs=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


def _dialogue_states(bus: KafkaBus, settings: Settings, sid: str) -> list[dict]:
    """The dialogue stage's checkpoints of one session, as written to its changelog."""
    admin = bus.admin()
    physical = settings.topic("state.dialogue")
    key = sid.encode()
    return [json.loads(m.value) for m in admin.read(physical, admin.partitions_for(key, physical))
            if m.key == key and m.value]


def _settings(kafka_bootstrap: str, unique_name: str) -> Settings:
    s = Settings(bus="kafka", bootstrap=kafka_bootstrap, topic_prefix=f"{unique_name}.",
                 partitions=2)
    provision_topics(s, ["asr", "dialogue"])
    return s


def _two_utterances() -> tuple[np.ndarray, int]:
    synth = EspeakSynth()
    synth.start()
    sr = 22050
    a = synth.synthesize("Good morning to you.").pcm.astype(np.float64)
    b = synth.synthesize("yes").pcm.astype(np.float64)
    x = np.concatenate([np.zeros(sr // 2), a, np.zeros(sr), b, np.zeros(sr)])
    x += np.random.default_rng(0).normal(0, 3, len(x))  # a microphone's few LSB of noise
    return np.clip(np.rint(x), -32768, 32767).astype("<i2"), sr


def test_spoken_audio_becomes_transcripts_and_echoed_replies(kafka_bootstrap, unique_name,
                                                             tmp_path):
    settings = _settings(kafka_bootstrap, unique_name)
    procs = [StageProcess(n, settings, tmp_path, "0") for n in ("asr", "dialogue")]
    bus = KafkaBus(kafka_bootstrap)
    sid = "spoken-1"
    logs = lambda: "\n".join(p.log()[-2000:] for p in procs)  # noqa: E731
    try:
        send(bus, settings, "session.control", SessionControl(sid, "CREATE", SessionConfig()),
             seq=0, stage="gateway")
        pcm, sr = _two_utterances()
        step = sr // 10  # 100 ms records, as the gateway sends them
        for k, i in enumerate(range(0, len(pcm), step)):
            send(bus, settings, "audio.in", AudioChunk(
                sid, sr, i, pcm[i:i + step].tobytes(), final=i + step >= len(pcm)),
                seq=k, stage="gateway")
        replies = _wait_for(
            lambda: (r := [x.value for x in read_session(bus, settings, sid, "reply")])
            and len(r) >= 2 and r, 120, "two replies", logs)
        said = [x.value for x in read_session(bus, settings, sid, "transcript")]
        finals = [t for t in said if isinstance(t, Transcript) and t.is_final]
        assert len(finals) == 2, (said, logs())
        assert finals[0].end_ms < finals[1].start_ms and finals[0].start_ms >= 400
        assert any(not t.is_final for t in said)  # partials came while speaking
        assert all(isinstance(r, ReplyText) for r in replies)
        assert [(r.utterance_id, r.text, r.is_last) for r in replies] == \
            [("u0", finals[0].text, True), ("u1", finals[1].text, True)]
    finally:
        for p in procs:
            p.terminate()


def test_openai_adapter_streams_sentence_chunks_from_a_stage_process(kafka_bootstrap,
                                                                     unique_name, tmp_path):
    settings = _settings(kafka_bootstrap, unique_name)
    behaviour = Behaviour(key=KEY, delay_s=0.1,
                          deltas=["Hello from", " the model. It streams", " in pieces! ",
                                  "And it ends here."])
    with FakeLLM(behaviour) as llm:
        proc = StageProcess("dialogue", settings, tmp_path, "0", {
            "AVATAR_OPENAI_BASE_URL": llm.openai_url, "AVATAR_OPENAI_API_KEY": KEY,
            "AVATAR_OPENAI_MODEL": "fake-gpt", "AVATAR_DIALOGUE_TIMEOUT_S": "5"})
        bus = KafkaBus(kafka_bootstrap)
        sid = "llm-1"
        try:
            send(bus, settings, "session.control",
                 SessionControl(sid, "CREATE", SessionConfig(dialogue="openai")), seq=0,
                 stage="gateway")
            # Topics are consumed independently: a transcript sent at once could be read
            # before the CREATE that names the adapter, so wait for the stage to hold it.
            _wait_for(lambda: any(st["data"].get("adapter") == "openai"
                                  for st in _dialogue_states(bus, settings, sid)),
                      90, "the CREATE to be checkpointed", proc.log)
            send(bus, settings, "transcript", Transcript(sid, "Say something."), seq=0,
                 stage="gateway")
            records = _wait_for(
                lambda: (r := read_session(bus, settings, sid, "reply"))
                and r[-1].value.is_last and r, 90, "the last reply chunk", proc.log)
            replies = [r.value for r in records]
            assert [r.text for r in replies] == ["Hello from the model.", "It streams in pieces!",
                                                 "And it ends here."]
            assert [r.chunk_index for r in replies] == [0, 1, 2]
            assert [r.is_last for r in replies] == [False, False, True]
            # Produced as streamed: the first sentence left while the model (100 ms between
            # events) was still writing the rest, not together with the last one.
            stamps = [r.message.timestamp_ms for r in records]
            assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 120
            assert llm.seen[0].body["model"] == "fake-gpt"
            assert llm.seen[0].headers["authorization"] == f"Bearer {KEY}"
        finally:
            proc.terminate()
        assert KEY not in proc.log()
        assert KEY not in json.dumps(_dialogue_states(bus, settings, sid))
