"""tts stage: reply text -> speech audio chunks + phoneme spans on one session media clock.

eSpeak NG's phoneme events give each phoneme's exact sample position, so lips and audio
share a time base by construction.
"""
from __future__ import annotations

from typing import Iterable

from backbone.records import PhonemeSpan, PhonemeSpans, ReplyText, SessionControl, SpeechChunk
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control, session_config)
from processors.espeak import EspeakSynth, SpeechError

CHUNK_S = 0.1  # 100 ms audio records: small enough to stream, few enough to log cheaply
MAX_TEXT_CHARS = 20_000


class TtsStage(BaseStage):
    name = "tts"
    inputs = ("session.control", "reply")

    def __init__(self) -> None:
        self.synth = EspeakSynth()
        self.model_version = "espeak-ng"

    def start(self) -> None:
        self.synth.start()
        self.model_version = f"espeak-ng-{self.synth.version()}"

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            remember_control(value, state)
            if "t0_ms" not in state.data:
                state.data["t0_ms"] = record.event_time_ms
            return []
        if not isinstance(value, ReplyText):
            raise RecordRejected(f"tts cannot use a {type(value).__name__}")
        text = value.text.strip()
        if not text:
            raise RecordRejected("empty reply text")
        if len(text) > MAX_TEXT_CHARS:
            raise RecordRejected(f"reply of {len(text)} characters exceeds {MAX_TEXT_CHARS}")
        cfg = session_config(state)
        try:
            synth = self.synth.synthesize(text, voice=cfg.voice, rate_wpm=cfg.rate_wpm,
                                          pitch=cfg.pitch)
        except SpeechError as exc:
            raise RecordRejected(str(exc)) from exc
        sr = synth.sample_rate
        # Place the utterance on the session clock: after what was already said, and not
        # before the moment it was asked for (event times are logged, so this replays).
        t0 = int(state.data.setdefault("t0_ms", record.event_time_ms))
        asked = max(0, (record.event_time_ms - t0) * sr // 1000)
        start = max(int(state.data.get("clock", 0)), asked)
        pcm = synth.pcm.astype("<i2").tobytes()
        state.data["clock"] = start + len(synth.pcm)
        spans = tuple(PhonemeSpan(p.symbol, start + p.start_sample, start + p.end_sample)
                      for p in synth.phonemes)
        sid, uid = value.session_id, value.utterance_id
        if value.chunk_index:
            uid = f"{uid}.{value.chunk_index}"
        out = [Outbound("speech.phonemes", PhonemeSpans(sid, uid, sr, spans, value.is_last))]
        step = max(1, int(sr * CHUNK_S)) * 2
        n_chunks = max(1, -(-len(pcm) // step))
        for i in range(n_chunks):
            out.append(Outbound("speech.audio", SpeechChunk(
                sid, uid, sr, start + i * step // 2, pcm[i * step:(i + 1) * step],
                is_last=value.is_last and i == n_chunks - 1)))
        return out
