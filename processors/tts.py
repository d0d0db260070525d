"""tts stage: reply text -> speech audio chunks + phoneme spans on one session media clock.

eSpeak NG's phoneme events give each phoneme's exact sample position, so lips and audio
share a time base by construction. Live, speech is paced: audio leaves a little ahead of
real time, so an interrupt stops it at the next chunk boundary and the log holds only
what was actually said. Offline (the demo, tests), a reply is spoken in one go.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

from backbone.records import PhonemeSpan, PhonemeSpans, ReplyText, SessionControl, SpeechChunk
from backbone.stage import (BaseStage, Inbound, Outbound, RecordRejected, SessionState,
                            remember_control, session_config)
from backbone.tracing import now_ms
from processors.espeak import EspeakSynth, SpeechError, Synthesis
from processors.sentences import split_sentences

log = logging.getLogger("avatar.tts")

CHUNK_S = 0.1  # 100 ms audio records: small enough to stream, few enough to log cheaply
MAX_TEXT_CHARS = 20_000
# Audio leaves this far ahead of the media clock: enough to ride out a scheduling hiccup
# downstream, and the most speech an interrupt can still let through.
LEAD_S = 0.3
# Phonemes leave this far ahead of their audio, so the animate stage has the lookahead its
# coarticulation needs (the procedural model looks 0.3 s ahead) without waiting on audio.
PHONEME_LEAD_S = 0.3
# Sentences are synthesised one at a time: the first chunk of a long reply does not wait
# for the whole reply. Longer sentences are cut at a clause or word boundary.
MAX_SENTENCE_CHARS = 240
MAX_QUEUED_SENTENCES = 500  # ~10 minutes of speech; more is a runaway reply
KEEP_INTERRUPTED = 16  # interrupted reply ids remembered, to drop their late chunks

class TtsStage(BaseStage):
    name = "tts"
    inputs = ("session.control", "reply")
    live = False  # set by the runtime from Settings.live

    def __init__(self) -> None:
        self.synth = EspeakSynth()
        self.model_version = "espeak-ng"
        self.clock: Callable[[], int] = now_ms  # wall clock in ms; tests substitute their own

    def start(self) -> None:
        self.synth.start()
        self.model_version = f"espeak-ng-{self.synth.version()}"

    # ---- records ---------------------------------------------------------------------

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            return self._control(value, record, state)
        if not isinstance(value, ReplyText):
            raise RecordRejected(f"tts cannot use a {type(value).__name__}")
        text = value.text.strip()
        if not text:
            raise RecordRejected("empty reply text")
        if len(text) > MAX_TEXT_CHARS:
            raise RecordRejected(f"reply of {len(text)} characters exceeds {MAX_TEXT_CHARS}")
        cfg = session_config(state)
        try:
            self.synth.check_voice(cfg.voice, cfg.rate_wpm, cfg.pitch)
        except SpeechError as exc:
            raise RecordRejected(str(exc)) from exc
        state.data.setdefault("t0_ms", record.event_time_ms)
        if value.utterance_id in state.data.get("interrupted", []):
            log.info("dropping a chunk of an interrupted reply",
                     extra={"session": value.session_id, "utterance": value.utterance_id})
            return []
        queue: list[dict[str, Any]] = state.data.setdefault("queue", [])
        sentences = split_sentences(text, MAX_SENTENCE_CHARS)
        if len(queue) + len(sentences) > MAX_QUEUED_SENTENCES:
            raise RecordRejected(f"{len(queue)} sentences already queued; the reply would "
                                 f"exceed {MAX_QUEUED_SENTENCES}", "overloaded")
        uid = value.utterance_id
        if value.chunk_index:
            uid = f"{uid}.{value.chunk_index}"
        # Offline, an utterance goes where it was asked for (event times are logged, so this
        # replays); live, where the clock is now (a late LLM sentence is not in the past).
        asked_ms = record.event_time_ms if not self.live else self.clock()
        for i, sentence in enumerate(sentences):
            queue.append({"reply": value.utterance_id, "uid": uid, "text": sentence,
                          "final": value.is_last and i == len(sentences) - 1,
                          "last_of_chunk": i == len(sentences) - 1,
                          "asked_ms": asked_ms, "trace": record.traceparent})
        return list(self._advance(state, self.clock(), first=True))

    def tick(self, state: SessionState, now: int) -> Iterable[Outbound]:
        if not state.data.get("cur") and not state.data.get("queue"):
            return []
        return list(self._advance(state, now, first=False))

    def _control(self, value: SessionControl, record: Inbound,
                 state: SessionState) -> list[Outbound]:
        remember_control(value, state)
        if value.action == "CREATE":
            state.data.setdefault("t0_ms", record.event_time_ms)
        if value.action in ("INTERRUPT", "END"):
            return self._interrupt(state)
        return []

    # ---- speech on the media clock ----------------------------------------------------

    def _interrupt(self, state: SessionState) -> list[Outbound]:
        """Stop at the next chunk boundary: what was sent plays out, the rest never exists."""
        cur = state.data.pop("cur", None)
        queue = state.data.pop("queue", [])
        dropped = {q["reply"] for q in queue} | ({cur["reply"]} if cur else set())
        if dropped:
            kept = [r for r in state.data.get("interrupted", []) if r not in dropped]
            state.data["interrupted"] = (kept + sorted(dropped))[-KEEP_INTERRUPTED:]
        if cur is None:
            return []
        state.scratch.pop("synth", None)
        cut = cur["start"] + cur["sent"]
        state.data["clock"] = cut
        sid, sr = state.session_id, int(cur["sr"])
        return [Outbound("speech.audio", SpeechChunk(sid, cur["uid"], sr, cut, b"", True)),
                Outbound("speech.phonemes", PhonemeSpans(sid, cur["uid"], sr, (), True,
                                                         cut_sample=cut))]

    def _synthesis(self, state: SessionState, cur: dict[str, Any]) -> Synthesis:
        key = (cur["uid"], cur["start"])
        cached = state.scratch.get("synth")
        if cached is not None and cached[0] == key:
            syn: Synthesis = cached[1]
            return syn
        # After a fail-over the scratch is empty: synthesise the sentence again.
        cfg = session_config(state)
        syn = self.synth.synthesize(cur["text"], voice=cfg.voice, rate_wpm=cfg.rate_wpm,
                                    pitch=cfg.pitch)
        state.scratch["synth"] = (key, syn)
        return syn

    def _begin_next(self, state: SessionState, now: int) -> dict[str, Any] | None:
        queue: list[dict[str, Any]] = state.data.get("queue", [])
        while queue:
            item = queue.pop(0)
            cfg = session_config(state)
            try:
                syn = self.synth.synthesize(item["text"], voice=cfg.voice,
                                            rate_wpm=cfg.rate_wpm, pitch=cfg.pitch)
            except SpeechError as exc:  # checked on arrival; a voice change can still fail
                log.warning("sentence not spoken", extra={"session": state.session_id,
                                                          "error": str(exc)})
                continue
            sr = syn.sample_rate
            t0 = int(state.data.get("t0_ms", item["asked_ms"]))
            asked = max(0, (int(item["asked_ms"]) - t0) * sr // 1000)
            start = max(int(state.data.get("clock", 0)), asked)
            cur = dict(item, start=start, sent=0, ph=0, sr=sr, n=len(syn.pcm))
            state.data["clock"] = start + len(syn.pcm)
            state.data["cur"] = cur
            state.scratch["synth"] = ((cur["uid"], start), syn)
            return cur
        return None

    def _advance(self, state: SessionState, now: int, first: bool) -> Iterator[Outbound]:
        """Emit whatever audio and phonemes are due; start the next sentence when one ends."""
        sid = state.session_id
        while True:
            cur = state.data.get("cur") or self._begin_next(state, now)
            if cur is None:
                return
            syn = self._synthesis(state, cur)
            sr, n, start = int(cur["sr"]), int(cur["n"]), int(cur["start"])
            step = max(1, int(sr * CHUNK_S))
            if self.live:
                media = (now - int(state.data.get("t0_ms", now))) * sr // 1000
                due = min(n, max(0, media + int(LEAD_S * sr) - start))
            else:
                due = n
            t0 = int(state.data.get("t0_ms", now))
            sent = int(cur["sent"])
            while sent < n and (sent + step <= due or due >= n):
                # Chunks sent on arrival keep the reply's origin time; paced ones are due at
                # their own time, so latency downstream measures lateness against schedule.
                timing: dict[str, Any] = {} if first else {
                    "event_time_ms": t0 + (start + sent) * 1000 // sr - int(LEAD_S * 1000),
                    "traceparent": cur["trace"]}
                end = min(n, sent + step)
                ph_end = n if due >= n else end + int(PHONEME_LEAD_S * sr)
                spans = syn.phonemes
                new = []
                i = int(cur["ph"])
                while i < len(spans) and spans[i].start_sample < ph_end:
                    p = spans[i]
                    new.append(PhonemeSpan(p.symbol, start + p.start_sample, start + p.end_sample))
                    i += 1
                cur["ph"] = i
                # A segment ends when nothing contiguous follows: the lips close and idle.
                # Said once the rest of the sentence is certain to be sent (due >= n), so
                # an interrupt can never follow it.
                segment_end = due >= n and (bool(cur["final"]) or
                                            (self.live and not state.data.get("queue")))
                if new or (segment_end and not cur.get("marked")):
                    cur["marked"] = segment_end
                    yield Outbound("speech.phonemes", PhonemeSpans(
                        sid, cur["uid"], sr, tuple(new), segment_end), **timing)
                segment_end = segment_end and end >= n
                pcm = syn.pcm[sent:end].astype("<i2").tobytes()
                yield Outbound("speech.audio", SpeechChunk(
                    sid, cur["uid"], sr, start + sent, pcm, is_last=segment_end), **timing)
                sent = end
                cur["sent"] = sent
            if sent < n:
                return
            state.data["cur"] = None
            state.scratch.pop("synth", None)
