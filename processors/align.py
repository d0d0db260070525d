"""align stage: speech audio that came without phonemes (an integrator's own TTS or voice)
-> speech.phonemes on the same session sample clock, so animate can move the lips to it.

Audio from our own tts stage is skipped: tts already publishes eSpeak's exact phonemes.
Spans stream out as they become final (at most ~90 ms of audio after they end); the phoneme
being spoken streams too, as an open span whose end grows, so lips need not wait for its end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Final, Iterable

import numpy as np
import torch

from backbone.records import PhonemeSpan, PhonemeSpans, SessionControl, SpeechChunk
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control)
from processors.models.align_ctc import (DEFAULT_CHECKPOINT, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,
                                         AlignedSpan, AlignNet, StreamingAligner, load_checkpoint)

SOURCE: Final = "align"  # PhonemeSpans.source: tells animate (and replay) who timed these
# A hole in the clock inside one utterance (a dropped record upstream) is filled with
# silence so later spans stay on the clock; a longer one means the clock is wrong.
MAX_GAP_S: Final = 2.0
# One record of more than this is not a stream chunk; refusing it bounds memory and latency.
MAX_CHUNK_S: Final = 30.0


class AlignStage(BaseStage):
    name = "align"
    inputs = ("session.control", "speech.audio")

    def __init__(self, checkpoint: Path = DEFAULT_CHECKPOINT) -> None:
        self.checkpoint = checkpoint
        self.model: AlignNet | None = None
        self.model_version = "align-ctc"

    def start(self) -> None:
        # One thread: the stage runs beside others on few cores, and results then reproduce.
        torch.set_num_threads(1)
        self.model, self.model_version = load_checkpoint(self.checkpoint)

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            remember_control(value, state)
            if value.action in ("END", "INTERRUPT"):
                return self._close(state)
            return []
        if not isinstance(value, SpeechChunk):
            raise RecordRejected(f"align cannot use a {type(value).__name__}")
        if record.producer_stage == "tts":
            return []  # tts wrote exact phonemes for its own audio already
        self._check(value)
        out: list[Outbound] = []
        aligner: StreamingAligner | None = state.scratch.get("aligner")
        current = state.data.get("utterance")
        if current is not None and current != value.utterance_id:
            out += self._close(state)  # a new utterance ends the one its last chunk never did
            aligner = None
        if aligner is not None and state.data.get("sample_rate") != value.sample_rate:
            raise RecordRejected(f"sample rate changed mid-utterance: {state.data['sample_rate']} "
                                 f"-> {value.sample_rate}")
        pcm = np.frombuffer(value.pcm, dtype="<i2").astype(np.int16)
        spans: list[AlignedSpan] = []
        if aligner is None:
            # New utterance, or this process lost the model state (fail-over): start here.
            aligner = StreamingAligner(self._model(), value.sample_rate, value.start_sample)
            state.scratch["aligner"] = aligner
            state.data.update(utterance=value.utterance_id, sample_rate=value.sample_rate)
        else:
            expected = int(state.data["next_sample"])
            gap = value.start_sample - expected
            if gap < 0:
                raise RecordRejected(f"chunk starts at {value.start_sample}, before the "
                                     f"{expected} already aligned")
            if gap > MAX_GAP_S * value.sample_rate:
                raise RecordRejected(f"chunk leaves a {gap / value.sample_rate:.1f} s hole in "
                                     f"the utterance's clock")
            if gap:
                spans += aligner.push(np.zeros(gap, dtype=np.int16))
        spans += aligner.push(pcm)
        state.data["next_sample"] = value.start_sample + len(pcm)
        open_span = None
        if value.is_last:
            spans += aligner.finish()
            self._forget(state)
        else:
            open_span = aligner.open_span()
            sent = state.scratch.get("open_sent")
            if open_span is not None and not spans and sent == open_span:
                open_span = None  # nothing new to say
            state.scratch["open_sent"] = open_span
        if spans or value.is_last or open_span is not None:
            out.append(self._record(value.session_id, value.utterance_id, value.sample_rate,
                                    spans + ([open_span] if open_span else []), value.is_last,
                                    open_span is not None))
        return out

    @staticmethod
    def _check(value: SpeechChunk) -> None:
        if not MIN_SAMPLE_RATE <= value.sample_rate <= MAX_SAMPLE_RATE:
            raise RecordRejected(f"sample rate {value.sample_rate} is outside "
                                 f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
        if len(value.pcm) % 2:
            raise RecordRejected(f"odd pcm length {len(value.pcm)}: not 16-bit samples")
        if not value.pcm and not value.is_last:
            raise RecordRejected("empty audio chunk that does not end its utterance")
        if len(value.pcm) // 2 > MAX_CHUNK_S * value.sample_rate:
            raise RecordRejected(f"chunk of {len(value.pcm) // 2 / value.sample_rate:.0f} s "
                                 f"exceeds {MAX_CHUNK_S:.0f} s")
        if value.start_sample < 0:
            raise RecordRejected(f"negative start_sample {value.start_sample}")

    def _close(self, state: SessionState) -> list[Outbound]:
        """Flush an utterance that ended without its is_last chunk."""
        aligner: StreamingAligner | None = state.scratch.get("aligner")
        utterance = state.data.get("utterance")
        rate = state.data.get("sample_rate")
        self._forget(state)
        if aligner is None or utterance is None or rate is None:
            return []
        return [self._record(state.session_id, str(utterance), int(rate), aligner.finish(), True)]

    @staticmethod
    def _forget(state: SessionState) -> None:
        state.scratch.pop("aligner", None)
        state.scratch.pop("open_sent", None)
        for key in ("utterance", "sample_rate", "next_sample"):
            state.data.pop(key, None)

    @staticmethod
    def _record(session_id: str, utterance_id: str, sample_rate: int,
                spans: list[AlignedSpan], is_last: bool, last_open: bool = False) -> Outbound:
        return Outbound("speech.phonemes", PhonemeSpans(
            session_id, utterance_id, sample_rate,
            tuple(PhonemeSpan(s.symbol, s.start_sample, s.end_sample) for s in spans),
            is_last, source=SOURCE, last_open=last_open))

    def _model(self) -> AlignNet:
        if self.model is None:
            raise RuntimeError("AlignStage.start() has not been called")
        return self.model
