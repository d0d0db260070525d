"""asr stage: user audio (audio.in) -> transcripts, the first hop of a spoken conversation.

pocketsphinx's voice-activity endpointer finds each utterance; its decoder emits partial
hypotheses while the user speaks and one final transcript at the endpoint, on the session's
audio clock, for dialogue to answer.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from math import gcd
from typing import Any, Final, Iterable, Mapping

import numpy as np
import numpy.typing as npt
from pocketsphinx import Decoder, Endpointer
from prometheus_client import Counter

from backbone.records import AudioChunk, SessionControl, Transcript
from backbone.stage import BaseStage, Inbound, Outbound, RecordRejected, SessionState

log = logging.getLogger("avatar.asr")

SKIPPED = Counter("avatar_asr_utterances_skipped_total",
                  "Utterances heard but not decoded (every decoder of the pool was busy)",
                  ["reason"])

DECODER_RATE: Final = 16_000  # the shipped en-us acoustic model is trained on 16 kHz audio
MIN_RATE: Final = 8_000  # telephone audio; below it speech is not intelligible
MAX_RATE: Final = 48_000  # the highest rate browsers and sound cards capture at
MAX_CHANNELS: Final = 8  # 7.1 capture; more is a mistake
ENCODING: Final = "PCM_S16LE"  # the gateway decodes WAV/Opus to this before audio.in
# Partials at most every 300 ms of speech: live enough for captions, and each costs a
# best-path search and a record.
PARTIAL_EVERY_MS: Final = 300
# An utterance the endpointer never closes (a noisy line, a stuck mic) is cut here, so a
# final still arrives and the decoder's search stays bounded.
MAX_UTTERANCE_MS: Final = 30_000
# A session that stops sending audio mid-utterance (a dropped client) would hold its decoder
# for good; once every decoder is leased, one idle this long (wall clock) is taken back.
LEASE_IDLE_S: Final = 10.0
# A gap in start_sample up to this long is silence the client skipped; longer, and the
# stream is treated as a new one (the current utterance is finalised first).
MAX_GAP_MS: Final = 2_000
# pocketsphinx computes a hypothesis's posterior only at the end of an utterance; a partial
# claims nothing.
PARTIAL_CONFIDENCE: Final = 0.0
# Resampler: windowed-sinc half-width in zero crossings of the low-pass; 16 keeps aliasing
# and passband ripple below what the 16-bit output can represent.
SINC_ZERO_CROSSINGS: Final = 16
KAISER_BETA: Final = 8.6  # ~ -90 dB side lobes
ROLLOFF: Final = 0.94  # cut-off as a fraction of the lower Nyquist: a narrow transition band
RESAMPLE_BLOCK: Final = 4_096  # outputs per vectorised step: bounds the (n, taps) temporaries
# Filter phases precomputed up to this many (every common rate needs <= 320: 44.1k -> 160);
# an odd rate such as 47999 Hz has 16000 phases and computes its weights per block instead.
MAX_PHASE_TABLE: Final = 4_096


@dataclass(frozen=True)
class AsrSettings:
    """Knobs of the asr process, each from the environment."""

    # Each decoder holds ~90 MB of model and search; one is needed per session *while it
    # speaks*, so 4 serves 4 simultaneous speakers per process (scale out beyond that).
    max_decoders: int = 4  # AVATAR_ASR_MAX_DECODERS
    # pocketsphinx VAD aggressiveness 0 (loose) .. 3 (strict): loose catches quiet speech.
    vad_mode: int = 0  # AVATAR_ASR_VAD_MODE
    model_dir: str = ""  # AVATAR_ASR_MODEL_DIR: empty = the en-us model in the wheel

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AsrSettings:
        env = os.environ if environ is None else environ
        return cls(max_decoders=int(env.get("AVATAR_ASR_MAX_DECODERS") or cls.max_decoders),
                   vad_mode=int(env.get("AVATAR_ASR_VAD_MODE") or cls.vad_mode),
                   model_dir=env.get("AVATAR_ASR_MODEL_DIR", ""))


class Resampler:
    """Streaming band-limited resampler for any integer rate pair (windowed sinc, Kaiser).

    Output sample n sits exactly at input time n * rate_in / rate_out (zero-phase), so a
    chunked stream and the whole signal give the same samples and timestamps stay exact.
    """

    def __init__(self, rate_in: int, rate_out: int = DECODER_RATE) -> None:
        g = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        # Cut-off in cycles per input sample: the lower of the two Nyquist rates.
        self._fc = 0.5 * min(1.0, rate_out / rate_in) * ROLLOFF
        self._half = int(np.ceil(SINC_ZERO_CROSSINGS / (2 * self._fc)))
        # Input history; index 0 is global input sample `_buf_start` (negative: zeros
        # before the stream began, so the first outputs see a full kernel).
        self._buf = np.zeros(self._half + 1)
        self._buf_start = -(self._half + 1)
        self._n_in = 0  # input samples received
        self._n_out = 0  # next output sample to produce
        self._taps = np.arange(-self._half, self._half + 1)
        self._table = (self._weights(np.arange(self.up) / self.up)
                       if self.up <= MAX_PHASE_TABLE else None)

    def _weights(self, frac: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Kernel weights, one row per output whose time is `frac` past an input sample."""
        d = frac[:, None] - self._taps[None, :]  # distance of each tap from the output time
        w: npt.NDArray[np.float64] = 2 * self._fc * np.sinc(2 * self._fc * d)
        w *= np.i0(KAISER_BETA * np.sqrt(np.clip(1 - (d / (self._half + 1)) ** 2, 0, 1)))
        w /= w.sum(axis=1, keepdims=True)  # unit gain at DC whatever the phase
        return w

    def process(self, x: npt.NDArray[np.float64], final: bool = False) -> npt.NDArray[np.float64]:
        if self.up == self.down:
            self._n_in += len(x)
            return x
        self._buf = np.concatenate([self._buf, x])
        self._n_in += len(x)
        end = self._buf_start + len(self._buf)  # one past the last real input sample
        if final:
            self._buf = np.concatenate([self._buf, np.zeros(self._half + 1)])
            # Every output whose time falls within the input: ceil(n_in * up / down).
            n_hi = -(-self._n_in * self.up // self.down)
        else:
            # Outputs whose kernel's right tail is already here.
            n_hi = ((end - self._half - 1) * self.up + self.up - 1) // self.down + 1
        pieces = []
        for n0 in range(self._n_out, n_hi, RESAMPLE_BLOCK):
            ns = np.arange(n0, min(n_hi, n0 + RESAMPLE_BLOCK), dtype=np.int64)
            whole = ns * self.down // self.up
            phase = ns * self.down % self.up  # exact integers: no drift over hours of audio
            w = self._table[phase] if self._table is not None else self._weights(phase / self.up)
            idx = whole[:, None] + self._taps[None, :] - self._buf_start
            pieces.append(np.einsum("ij,ij->i", self._buf[idx], w))
        self._n_out = max(self._n_out, n_hi)
        # Keep only what the next outputs can still reach.
        keep_from = self._n_out * self.down // self.up - self._half - 1
        drop = max(0, keep_from - self._buf_start)
        self._buf = self._buf[drop:]
        self._buf_start += drop
        return np.concatenate(pieces) if pieces else np.zeros(0)


def to_mono(chunk: AudioChunk) -> npt.NDArray[np.float64]:
    """Validate and decode one chunk to mono float samples (int16 scale)."""
    if chunk.encoding != ENCODING:
        raise RecordRejected(f"asr takes {ENCODING} audio, not {chunk.encoding!r} (the gateway "
                             "decodes WAV/Opus before audio.in)")
    if not MIN_RATE <= chunk.sample_rate <= MAX_RATE:
        raise RecordRejected(f"sample_rate {chunk.sample_rate} is outside "
                             f"{MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= chunk.channels <= MAX_CHANNELS:
        raise RecordRejected(f"channels {chunk.channels} is outside 1-{MAX_CHANNELS}")
    if chunk.start_sample < 0:
        raise RecordRejected(f"start_sample {chunk.start_sample} is negative")
    frame = 2 * chunk.channels
    if len(chunk.data) % frame:
        raise RecordRejected(f"{len(chunk.data)} bytes is not a whole number of "
                             f"{chunk.channels}-channel 16-bit frames")
    pcm = np.frombuffer(chunk.data, dtype="<i2").astype(np.float64)
    mono: npt.NDArray[np.float64] = pcm.reshape(-1, chunk.channels).mean(axis=1)
    return mono


@dataclass
class _Stream:
    """One session's live audio stream (process-local: lives in state.scratch)."""

    sample_rate: int
    origin_ms: float  # session-clock time of the first sample fed to the endpointer
    next_sample: int  # start_sample expected of the next chunk (input rate)
    resampler: Resampler
    endpointer: Any
    pending: bytes = b""  # 16 kHz PCM short of one endpointer frame
    decoder: Any = None  # leased from the stage's pool while an utterance is open
    utt_start_ms: float = 0.0
    fed: int = 0  # 16 kHz samples given to the decoder this utterance
    since_partial: int = 0
    last_partial: str = ""
    continuing: bool = False  # the previous utterance was cut at MAX_UTTERANCE_MS
    overloaded: bool = False  # no decoder was free when this utterance began
    last_active: float = 0.0  # time.monotonic() of the last speech fed
    out: list[Outbound] = field(default_factory=list)


class AsrStage(BaseStage):
    """Speech to text per session. Decoders are expensive (~90 MB, 0.3 s to load), so the
    stage keeps a pool and a session holds one only while an utterance is open.

    State: `state.scratch` holds the stream (resampler, endpointer, open utterance) and is
    process-local: after a fail-over the next chunk starts a new stream on its own
    start_sample, and an utterance that was open is lost (its speech so far is not
    re-decoded). `state.data` keeps only the count of final transcripts.
    """

    name = "asr"
    inputs = ("session.control", "audio.in")

    def __init__(self, settings: AsrSettings | None = None) -> None:
        self._given = settings
        self.settings = settings or AsrSettings()
        self.model_version = "pocketsphinx"
        self._free: list[Any] = []
        self._leased: dict[int, _Stream] = {}  # id(decoder) -> the stream holding it
        self._created = 0

    def start(self) -> None:
        self.settings = self._given or AsrSettings.from_env()
        self._free = [self._new_decoder()]  # load (and check) the model now, not mid-speech
        self._created = 1
        try:
            self.model_version = f"pocketsphinx-{version('pocketsphinx')}-en-us"
        except PackageNotFoundError:  # a vendored build has no metadata; it still runs
            self.model_version = "pocketsphinx-en-us"

    def stop(self) -> None:
        self._free.clear()

    def _new_decoder(self) -> Any:
        kwargs: dict[str, Any] = {"loglevel": "FATAL", "dither": True}
        if self.settings.model_dir:
            kwargs["hmm"] = self.settings.model_dir
        return Decoder(**kwargs)

    def _lease(self, s: _Stream, sid: str) -> Any:
        decoder = None
        if self._free:
            decoder = self._free.pop()
        elif self._created < self.settings.max_decoders:
            self._created += 1
            decoder = self._new_decoder()
        else:
            now = time.monotonic()
            idle = [t for t in self._leased.values() if now - t.last_active > LEASE_IDLE_S]
            if idle:
                # The abandoned utterance is dropped; the rest of it, should its audio
                # resume, is skipped like an overloaded one.
                victim = min(idle, key=lambda t: t.last_active)
                decoder, victim.decoder, victim.overloaded = victim.decoder, None, True
                decoder.end_utt()
                self._leased.pop(id(decoder))
                SKIPPED.labels("reclaimed").inc()
                log.warning("asr took back an idle decoder", extra={"session": sid})
        if decoder is not None:
            self._leased[id(decoder)] = s
        return decoder

    def process(self, record: Inbound, state: SessionState) -> Iterable[Outbound]:
        value = record.value
        if isinstance(value, SessionControl):
            if value.action == "END":
                return self._close(state)
            return []
        if not isinstance(value, AudioChunk):
            raise RecordRejected(f"asr cannot use a {type(value).__name__}")
        mono = to_mono(value)
        heard_to = value.start_sample + len(mono)
        stream: _Stream | None = state.scratch.get("stream")
        out: list[Outbound] = []
        if stream is not None and value.sample_rate != stream.sample_rate:
            out += self._close(state)  # a new capture: finish the old stream first
            stream = None
        if stream is not None:
            gap = value.start_sample - stream.next_sample
            if gap * 1000 > MAX_GAP_MS * value.sample_rate:
                out += self._close(state)
                stream = None
            elif gap > 0:  # skipped silence: keep the clock by feeding it as silence
                mono = np.concatenate([np.zeros(gap), mono])
            elif gap < 0:  # overlap with what was already heard (a resend): drop it
                mono = mono[-gap:]
        if stream is None:
            stream = self._open(value)
            state.scratch["stream"] = stream
        stream.next_sample = max(stream.next_sample, heard_to)
        pcm16 = stream.resampler.process(mono, final=value.final)
        self._feed(stream, pcm16, value.session_id, final=value.final)
        if value.final:
            state.scratch.pop("stream", None)
        out += stream.out
        stream.out = []
        n_final = sum(1 for o in out if isinstance(o.value, Transcript) and o.value.is_final)
        if n_final:
            state.data["utterances"] = int(state.data.get("utterances", 0)) + n_final
        return out

    def _open(self, chunk: AudioChunk) -> _Stream:
        return _Stream(sample_rate=chunk.sample_rate,
                       origin_ms=chunk.start_sample * 1000 / chunk.sample_rate,
                       next_sample=chunk.start_sample, resampler=Resampler(chunk.sample_rate),
                       endpointer=Endpointer(vad_mode=self.settings.vad_mode,
                                             sample_rate=DECODER_RATE))

    def _close(self, state: SessionState) -> list[Outbound]:
        """Flush the session's stream (END, a new capture, a long gap): the open utterance
        gets its final transcript."""
        stream: _Stream | None = state.scratch.pop("stream", None)
        if stream is None:
            return []
        self._feed(stream, stream.resampler.process(np.zeros(0), final=True),
                   state.session_id, final=True)
        out, stream.out = stream.out, []
        return out

    def _feed(self, s: _Stream, pcm16: npt.NDArray[np.float64], sid: str, final: bool) -> None:
        # Clipping: a resampled full-scale signal can overshoot int16; saturate, as a
        # converter would, rather than wrap around.
        data = s.pending + np.clip(np.rint(pcm16), -32768, 32767).astype("<i2").tobytes()
        ep = s.endpointer
        step = ep.frame_bytes
        n_whole = len(data) // step * step
        frames = [data[i:i + step] for i in range(0, n_whole, step)]
        s.pending = data[n_whole:]
        for frame in frames:
            self._on_speech(s, ep.process(frame), sid)
        if final:
            # end_stream also hands over the speech still held in its decision window; it
            # fails on an empty buffer, so one silent sample (62 us) stands in.
            self._on_speech(s, ep.end_stream(s.pending or b"\0\0"), sid)
            s.pending = b""
            if s.decoder is not None or s.overloaded:
                self._finish(s, sid)

    def _on_speech(self, s: _Stream, speech: bytes | None, sid: str) -> None:
        if speech is None:
            return
        ep = s.endpointer
        s.last_active = time.monotonic()
        if s.decoder is None and not s.overloaded:
            s.decoder = self._lease(s, sid)
            if s.decoder is None:
                s.overloaded = True
                SKIPPED.labels("no_decoder").inc()
                log.warning("asr overloaded: no free decoder; utterance skipped",
                            extra={"session": sid, "max_decoders": self.settings.max_decoders})
            else:
                s.decoder.start_utt()
            if not s.continuing:
                s.utt_start_ms = s.origin_ms + ep.speech_start * 1000
            s.continuing = False
            s.fed = s.since_partial = 0
            s.last_partial = ""
        if s.decoder is not None:
            s.decoder.process_raw(speech, False, False)
        n = len(speech) // 2
        s.fed += n
        s.since_partial += n
        ms_fed = s.fed / (DECODER_RATE / 1000)
        if not ep.in_speech:
            self._finish(s, sid)
        elif ms_fed >= MAX_UTTERANCE_MS:
            self._finish(s, sid)
            s.continuing = True  # the next speech frame opens the rest of this utterance
            s.utt_start_ms += ms_fed
        elif s.decoder is not None and s.since_partial * 1000 >= PARTIAL_EVERY_MS * DECODER_RATE:
            s.since_partial = 0
            hyp = s.decoder.hyp()
            text = hyp.hypstr.strip() if hyp is not None else ""
            if text and text != s.last_partial:
                s.last_partial = text
                s.out.append(Outbound("transcript", Transcript(
                    sid, text, False, round(s.utt_start_ms), round(s.utt_start_ms + ms_fed),
                    PARTIAL_CONFIDENCE, "asr")))

    def _finish(self, s: _Stream, sid: str) -> None:
        """Close the open utterance. The endpointer hands over speech frames contiguously
        from speech_start, so the utterance ends where the frames fed to the decoder end."""
        decoder, s.decoder = s.decoder, None
        s.overloaded = False
        end_ms = s.utt_start_ms + s.fed / (DECODER_RATE / 1000)
        if decoder is None:
            return
        # On distorted audio (heavy clipping) the search can lose every path before the end
        # of the utterance and return nothing although partials were sent: the running best
        # path, else the last partial the user saw, is then the answer, with no confidence
        # claimed (a caption must not be left hanging without its final).
        running = decoder.hyp()
        decoder.end_utt()
        hyp = decoder.hyp()
        self._leased.pop(id(decoder), None)
        self._free.append(decoder)
        text, confidence = "", 0.0
        if hyp is not None and hyp.hypstr.strip():
            text, confidence = hyp.hypstr.strip(), _confidence(hyp)
        elif running is not None and running.hypstr.strip():
            text = running.hypstr.strip()
        else:
            text = s.last_partial
        # Noise the endpointer took for speech may decode to nothing: then no transcript
        # at all (dialogue would reject an empty one).
        if text:
            s.out.append(Outbound("transcript", Transcript(
                sid, text, True, round(s.utt_start_ms), round(end_ms), confidence, "asr")))


def _confidence(hyp: Any) -> float:
    """pocketsphinx's posterior probability of the hypothesis, clamped to [0, 1]."""
    return float(min(1.0, max(0.0, float(getattr(hyp, "prob", 0.0)))))

