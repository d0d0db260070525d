"""asr as a plain transform on synthesized speech: endpointing, partial-then-final, the
session clock, any rate and channel count, and bad audio rejected.

pocketsphinx recognises eSpeak's voice poorly, so most tests assert on utterance structure
and timing, not words; the one word test uses a word it is seen to get right.
"""
from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY
from scipy.signal import resample_poly

from backbone.harness import run_stage
from backbone.records import AudioChunk, SessionControl, Transcript
from processors import asr
from processors.asr import AsrSettings, AsrStage, Resampler
from processors.espeak import SILENCE_AMPLITUDE, EspeakSynth

SR = 22050  # eSpeak's native rate
CHUNK_S = 0.1  # the gateway's audio.in chunk length
# Endpointer decisions lag by its 0.3 s window at 30 ms frames; a span edge within this of
# the true speech edge is right.
EDGE_TOLERANCE_MS = 350


@pytest.fixture(scope="module")
def synth() -> EspeakSynth:
    engine = EspeakSynth()
    engine.start()
    return engine


@pytest.fixture(scope="module")
def stage() -> AsrStage:
    s = AsrStage(AsrSettings(max_decoders=2))
    s.start()  # ~0.3 s of model loading, once for the module
    return s


def speech(synth: EspeakSynth, text: str) -> np.ndarray:
    return synth.synthesize(text).pcm.astype(np.float64)


def silence(seconds: float, rate: int = SR) -> np.ndarray:
    return np.zeros(int(seconds * rate))


def dithered(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A few LSB of noise, as any microphone has: eSpeak's digital silence is unnatural."""
    noise = np.random.default_rng(seed).normal(0, 3, x.shape)
    return np.clip(np.rint(x + noise), -32768, 32767).astype("<i2")


def voiced_span_ms(x: np.ndarray, offset_s: float, rate: int = SR) -> tuple[float, float]:
    """Where sound really is in `x` (placed at offset_s on the session clock)."""
    loud = np.flatnonzero(np.abs(x) > SILENCE_AMPLITUDE)
    return ((offset_s + loud[0] / rate) * 1000, (offset_s + loud[-1] / rate) * 1000)


def chunks(pcm: np.ndarray, rate: int = SR, channels: int = 1, sid: str = "s",
           start_sample: int = 0, final: bool = True) -> list[tuple[str, AudioChunk]]:
    """Split interleaved int16 samples into 100 ms audio.in records."""
    frames = pcm.reshape(-1, channels)
    step = int(rate * CHUNK_S)
    out = []
    for i in range(0, len(frames), step):
        part = frames[i:i + step]
        out.append(("audio.in", AudioChunk(sid, rate, start_sample + i, part.tobytes(),
                                           channels, "PCM_S16LE",
                                           final and i + step >= len(frames))))
    return out


def transcripts(res) -> list[Transcript]:
    return [v for v in res.values("transcript") if isinstance(v, Transcript)]


def finals(res) -> list[Transcript]:
    return [t for t in transcripts(res) if t.is_final]


def test_speech_gives_partials_then_one_final_over_the_spoken_span(stage, synth):
    words = speech(synth, "Hello, how are you doing this fine morning?")
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.5), words,
                                                           silence(1.0)]))), start=False)
    out = transcripts(res)
    assert [t.is_final for t in out][-1] and sum(t.is_final for t in out) == 1
    partials, final = out[:-1], out[-1]
    assert partials and all(p.text for p in partials) and final.text
    start, end = voiced_span_ms(words, 0.5)
    assert abs(final.start_ms - start) <= EDGE_TOLERANCE_MS
    assert abs(final.end_ms - end) <= EDGE_TOLERANCE_MS
    assert all(p.start_ms == final.start_ms for p in partials)
    ends = [p.end_ms for p in partials]
    assert ends == sorted(ends) and ends[-1] <= final.end_ms
    assert final.source == "asr" and 0.0 <= final.confidence <= 1.0
    assert res.states["s"].data == {"utterances": 1}  # only small JSON in checkpointed state


def test_partials_come_at_most_every_300_ms_of_speech(stage, synth):
    words = speech(synth, "Hello, how are you doing this fine morning? I hope you slept well.")
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.3), words,
                                                           silence(1.0)]))), start=False)
    ends = [t.end_ms for t in transcripts(res) if not t.is_final]
    assert len(ends) >= 2 and all(b - a >= asr.PARTIAL_EVERY_MS for a, b in zip(ends, ends[1:]))


def test_two_utterances_a_second_apart_give_two_finals_in_order(stage, synth):
    a, b = speech(synth, "Good morning to you."), speech(synth, "See you tomorrow then.")
    audio = np.concatenate([silence(0.3), a, silence(1.0), b, silence(1.0)])
    res = run_stage(stage, chunks(dithered(audio)), start=False)
    first, second = finals(res)
    assert first.text and second.text
    assert first.end_ms < second.start_ms
    b_start, _ = voiced_span_ms(b, 0.3 + (len(a) / SR) + 1.0)
    assert abs(second.start_ms - b_start) <= EDGE_TOLERANCE_MS


def test_silence_yields_nothing(stage):
    res = run_stage(stage, chunks(dithered(silence(3.0))), start=False)
    assert res.outputs == [] and res.rejected == []


def test_a_simple_word_is_recognised(stage, synth):
    # "yes" is one of the few eSpeak words pocketsphinx's en-us model gets right.
    audio = np.concatenate([silence(0.5), speech(synth, "yes"), silence(1.0)])
    assert [t.text for t in finals(run_stage(stage, chunks(dithered(audio)), start=False))] \
        == ["yes"]


def test_times_are_on_the_session_audio_clock(stage, synth):
    words = speech(synth, "Good morning to you.")
    offset_s = 42.0  # the session has been streaming for 42 s before this
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.3), words, silence(1.0)])),
                                  start_sample=int(offset_s * SR)), start=False)
    (final,) = finals(res)
    start, _ = voiced_span_ms(words, offset_s + 0.3)
    assert abs(final.start_ms - start) <= EDGE_TOLERANCE_MS


def test_a_final_chunk_flushes_speech_that_has_not_ended(stage, synth):
    words = speech(synth, "Good morning to you, and how are you")
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.3), words]))), start=False)
    (final,) = finals(res)
    assert final.text and final.end_ms <= (0.3 + len(words) / SR) * 1000 + 1


def test_end_control_flushes_the_open_utterance(stage, synth):
    words = speech(synth, "Good morning to you, and how are you")
    audio = chunks(dithered(np.concatenate([silence(0.3), words])), final=False)
    res = run_stage(stage, audio + [("session.control", SessionControl("s", "END"))],
                    start=False)
    assert len(finals(res)) == 1


def test_8_khz_mono_is_understood_on_the_same_clock(stage, synth):
    words = speech(synth, "Good morning to you.")
    audio = resample_poly(np.concatenate([silence(0.3), words, silence(1.0)]), 320, 882)
    res = run_stage(stage, chunks(dithered(audio), rate=8000), start=False)
    (final,) = finals(res)
    start, end = voiced_span_ms(words, 0.3)
    assert final.text and abs(final.start_ms - start) <= EDGE_TOLERANCE_MS
    assert abs(final.end_ms - end) <= EDGE_TOLERANCE_MS


def test_48_khz_stereo_is_downmixed_and_understood(stage, synth):
    words = speech(synth, "Good morning to you.")
    mono = resample_poly(np.concatenate([silence(0.3), words, silence(1.0)]), 320, 147)
    stereo = np.stack([mono, 0.5 * mono], axis=1).reshape(-1)  # interleaved L R
    res = run_stage(stage, chunks(dithered(stereo), rate=48000, channels=2), start=False)
    (final,) = finals(res)
    start, _ = voiced_span_ms(words, 0.3)
    assert final.text and abs(final.start_ms - start) <= EDGE_TOLERANCE_MS


def test_clipped_speech_is_still_endpointed(stage, synth):
    # 4x gain on eSpeak's 0.78 full-scale peaks: every loud stretch saturates.
    loud = np.clip(speech(synth, "Good morning to you.") * 4, -32768, 32767)
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.3), loud, silence(1.0)]))),
                    start=False)
    (final,) = finals(res)
    start, end = voiced_span_ms(loud, 0.3)
    assert abs(final.start_ms - start) <= EDGE_TOLERANCE_MS
    assert abs(final.end_ms - end) <= EDGE_TOLERANCE_MS


def test_square_wave_clipping_does_not_break_the_stage(stage, synth):
    crushed = np.clip(speech(synth, "Good morning to you.") * 40, -32768, 32767)
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.3), crushed,
                                                           silence(1.0)]))), start=False)
    assert res.rejected == [] and len(finals(res)) <= 1
    # The stage still hears the next, clean utterance of another session.
    words = speech(synth, "Good morning to you.")
    clean = chunks(dithered(np.concatenate([silence(0.3), words, silence(1.0)])), sid="t")
    assert len(finals(run_stage(stage, clean, start=False))) == 1


def test_an_utterance_that_never_ends_is_cut_into_contiguous_finals(stage, synth, monkeypatch):
    monkeypatch.setattr(asr, "MAX_UTTERANCE_MS", 1_000)
    words = speech(synth, "Good morning to you, and how are you doing on this fine morning")
    res = run_stage(stage, chunks(dithered(np.concatenate([silence(0.3), words, silence(1.0)]))),
                    start=False)
    spans = [(t.start_ms, t.end_ms) for t in finals(res)]
    assert len(spans) >= 2
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap


def test_a_skipped_stretch_of_start_samples_keeps_the_clock(stage, synth):
    words = dithered(np.concatenate([silence(0.3), speech(synth, "Good morning to you."),
                                     silence(1.0)]))
    lead = chunks(dithered(silence(1.0)), final=False)
    # The client sent nothing for 0.5 s (start_sample jumps), then the speech.
    rest = chunks(words, start_sample=int(1.5 * SR))
    (final,) = finals(run_stage(stage, lead + rest, start=False))
    start, _ = voiced_span_ms(words.astype(np.float64), 1.5)  # dither stays below the bar
    assert abs(final.start_ms - start) <= EDGE_TOLERANCE_MS


def _skipped(reason: str) -> float:
    return REGISTRY.get_sample_value("avatar_asr_utterances_skipped_total",
                                     {"reason": reason}) or 0.0


def test_with_every_decoder_busy_a_new_utterance_is_skipped_and_counted(synth):
    one = AsrStage(AsrSettings(max_decoders=1))
    one.start()
    words = speech(synth, "Good morning to you, and how are you")
    # Session a is mid-utterance (no endpoint, no final chunk) when b starts speaking.
    a = chunks(dithered(np.concatenate([silence(0.3), words])), sid="a", final=False)
    b = chunks(dithered(np.concatenate([silence(0.3), words, silence(1.0)]), seed=1), sid="b")
    before = _skipped("no_decoder")
    res = run_stage(one, a + b, start=False)
    assert finals(res) == [] and _skipped("no_decoder") == before + 1


def test_an_abandoned_utterance_gives_its_decoder_back(synth, monkeypatch):
    monkeypatch.setattr(asr, "LEASE_IDLE_S", 0.0)  # any other speaker counts as idle
    one = AsrStage(AsrSettings(max_decoders=1))
    one.start()
    words = speech(synth, "Good morning to you, and how are you")
    a = chunks(dithered(np.concatenate([silence(0.3), words])), sid="a", final=False)
    b = chunks(dithered(np.concatenate([silence(0.3), words, silence(1.0)]), seed=1), sid="b")
    res = run_stage(one, a + b, start=False)
    assert [t.session_id for t in finals(res)] == ["b"]


@pytest.mark.parametrize("chunk, says", [
    (AudioChunk("s", 16000, 0, b"\0" * 320, 1, "OPUS"), "OPUS"),
    (AudioChunk("s", 16000, 0, b"\0" * 321), "321 bytes"),
    (AudioChunk("s", 16000, 0, b"\0" * 322, 2), "322 bytes"),
    (AudioChunk("s", 0, 0, b"\0" * 320), "sample_rate 0"),
    (AudioChunk("s", 1_000_000, 0, b"\0" * 320), "sample_rate 1000000"),
    (AudioChunk("s", 16000, 0, b"\0" * 320, 0), "channels 0"),
    (AudioChunk("s", 16000, -5, b"\0" * 320), "start_sample -5"),
])
def test_bad_audio_is_rejected_with_a_reason_and_the_session_goes_on(stage, chunk, says):
    good = ("audio.in", AudioChunk("s", 16000, 0, dithered(silence(0.2, 16000)).tobytes()))
    res = run_stage(stage, [("audio.in", chunk), good], start=False)
    assert len(res.rejected) == 1 and says in res.rejected[0][1]


def test_resampler_keeps_a_tone_and_is_the_same_in_chunks(stage):
    for rate in (8000, 44100, 48000):
        t = np.arange(rate) / rate
        x = 10000 * np.sin(2 * np.pi * 440 * t)
        whole = Resampler(rate).process(x, final=True)
        r = Resampler(rate)
        parts = [r.process(x[i:i + 777], final=i + 777 >= rate) for i in range(0, rate, 777)]
        assert np.array_equal(np.concatenate(parts), whole) and len(whole) == 16000
        ref = 10000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
        assert np.abs(whole[200:-200] - ref[200:-200]).max() < 5  # < 5 LSB of 16 bits


def test_resampler_removes_what_16_khz_cannot_carry():
    x = 10000 * np.sin(2 * np.pi * 10000 * np.arange(48000) / 48000)  # would alias to 6 kHz
    y = Resampler(48000).process(x, final=True)
    assert np.sqrt(np.mean(y[200:-200] ** 2)) < 10000 * 1e-3
