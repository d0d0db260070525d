"""eSpeak NG through its C library: audio, exact phoneme spans, errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from processors.espeak import (
    MAX_TEXT_CHARS,
    PAUSE,
    SILENCE_AMPLITUDE,
    EspeakSynth,
    PhonemeEvent,
    SpeechError,
    Synthesis,
    phoneme_spans,
)


@pytest.fixture(scope="module")
def synth() -> EspeakSynth:
    engine = EspeakSynth()
    engine.start()
    return engine


def _ms(synthesis: Synthesis, ms: float) -> int:
    return int(synthesis.sample_rate * ms / 1000)


def _assert_tiles_audio(synthesis: Synthesis) -> None:
    spans = synthesis.phonemes
    assert spans[0].start_sample == 0
    assert spans[-1].end_sample == len(synthesis.pcm)
    for before, after in zip(spans, spans[1:]):
        assert before.end_sample == after.start_sample
    assert all(span.end_sample > span.start_sample for span in spans)


def test_using_the_synth_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        EspeakSynth().synthesize("hello")


def test_synthesis_returns_mono_int16_speech(synth: EspeakSynth) -> None:
    out = synth.synthesize("Hello world.")
    assert out.pcm.dtype == np.int16 and out.pcm.ndim == 1
    assert out.sample_rate == 22050
    assert 0.5 < out.duration_s < 3.0
    assert np.abs(out.pcm.astype(np.int32)).max() > 1000


def test_phoneme_spans_tile_the_audio_in_time_order(synth: EspeakSynth) -> None:
    _assert_tiles_audio(synth.synthesize("Hello world. How are you today?"))


def test_pauses_are_one_underscore_span_never_two_in_a_row(synth: EspeakSynth) -> None:
    symbols = [span.symbol for span in synth.synthesize("Yes. No, maybe; well... fine!").phonemes]
    assert PAUSE in symbols
    assert not any(s.startswith("_") and s != PAUSE for s in symbols)
    assert all(not (a == PAUSE and b == PAUSE) for a, b in zip(symbols, symbols[1:]))


def test_first_audible_sample_is_where_the_first_spoken_phoneme_starts(synth: EspeakSynth) -> None:
    out = synth.synthesize("Hello there.")
    first_spoken = next(span for span in out.phonemes if span.symbol != PAUSE)
    first_audible = int(np.flatnonzero(np.abs(out.pcm.astype(np.int32)) > SILENCE_AMPLITUDE)[0])
    assert first_spoken.symbol == "h"
    assert abs(first_audible - first_spoken.start_sample) <= _ms(out, 3)


def test_pop_has_bilabial_spans_of_silent_closure_then_burst(synth: EspeakSynth) -> None:
    out = synth.synthesize("a pop")
    loud = np.abs(out.pcm.astype(np.int32))
    stops = [span for span in out.phonemes if span.symbol == "p"]
    assert len(stops) == 2
    for stop in stops:
        closure = loud[stop.start_sample:stop.start_sample + _ms(out, 10)]
        assert closure.max() <= SILENCE_AMPLITUDE, "a stop span starts with its silent closure"
        assert loud[stop.start_sample:stop.end_sample].max() > 300, "and contains its burst"
        vowel_end = loud[stop.start_sample - _ms(out, 3):stop.start_sample]
        assert vowel_end.max() > SILENCE_AMPLITUDE, "the closure starts where the sound stops"


def test_empty_text_is_a_speech_error(synth: EspeakSynth) -> None:
    for text in ("", "   \n\t"):
        with pytest.raises(SpeechError, match="empty"):
            synth.synthesize(text)


def test_unknown_voice_is_a_speech_error(synth: EspeakSynth) -> None:
    with pytest.raises(SpeechError, match="unknown voice"):
        synth.synthesize("hello", voice="xx-nowhere")


def test_unknown_voice_variant_is_a_speech_error(synth: EspeakSynth) -> None:
    with pytest.raises(SpeechError, match="variant"):
        synth.synthesize("hello", voice="en-us+nobody")


def test_rate_and_pitch_outside_espeak_ranges_are_speech_errors(synth: EspeakSynth) -> None:
    with pytest.raises(SpeechError, match="rate"):
        synth.synthesize("hello", rate_wpm=20)
    with pytest.raises(SpeechError, match="pitch"):
        synth.synthesize("hello", pitch=101)


def test_version_names_the_library_release(synth: EspeakSynth) -> None:
    assert synth.version()[:1].isdigit()


def test_speech_error_is_a_value_error() -> None:
    assert issubclass(SpeechError, ValueError)


def test_every_listed_voice_speaks(synth: EspeakSynth) -> None:
    voices = synth.voices()
    assert {"en-us", "en-gb", "de", "fr-fr"} <= set(voices)
    for voice in voices:
        assert len(synth.synthesize("One two three.", voice=voice).pcm) > 0, voice


def test_voices_leave_out_those_whose_dictionary_is_not_shipped(synth: EspeakSynth) -> None:
    assert "fo" not in synth.voices()


def test_voice_names_are_case_insensitive_and_take_a_variant(synth: EspeakSynth) -> None:
    assert len(synth.synthesize("Hello.", voice="EN-US").pcm) > 0
    assert len(synth.synthesize("Hello.", voice="en-us+f3").pcm) > 0


def test_faster_rate_gives_shorter_speech(synth: EspeakSynth) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert synth.synthesize(text, rate_wpm=300).duration_s < 0.75 * synth.synthesize(text).duration_s


def test_long_text_is_spoken_whole(synth: EspeakSynth) -> None:
    text = " ".join(f"Sentence number {i} is spoken here." for i in range(200))
    out = synth.synthesize(text)
    assert out.duration_s > 200
    _assert_tiles_audio(out)
    assert sum(1 for span in out.phonemes if span.symbol == "s") >= 400


def test_text_over_the_length_limit_is_a_speech_error(synth: EspeakSynth) -> None:
    with pytest.raises(SpeechError, match="characters"):
        synth.synthesize("a" * (MAX_TEXT_CHARS + 1))


def test_threads_can_synthesise_at_once(synth: EspeakSynth) -> None:
    texts = ["Good morning to you.", "Peter Piper picked a peck.", "What a lovely day it is!"]
    expected = {text: synth.synthesize(text) for text in texts}
    results: list[tuple[str, Synthesis]] = []
    guard = threading.Lock()

    def speak(text: str) -> None:
        for _ in range(5):
            out = synth.synthesize(text)
            with guard:
                results.append((text, out))

    threads = [threading.Thread(target=speak, args=(text,)) for text in texts * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 30
    for text, out in results:
        _assert_tiles_audio(out)
        # eSpeak keeps hidden state between calls: the same text differs by up to ~1%
        assert abs(out.duration_s - expected[text].duration_s) < 0.02 * expected[text].duration_s
        assert [s.symbol for s in out.phonemes] == [s.symbol for s in expected[text].phonemes]


def test_gaps_and_espeak_pauses_become_underscore_spans() -> None:
    pcm = np.full(300, 1000, dtype=np.int16)
    spans = phoneme_spans([(100, "h"), (200, "_:"), (250, "_")], pcm, 22050)
    assert spans == (PhonemeEvent("_", 0, 100), PhonemeEvent("h", 100, 200), PhonemeEvent("_", 200, 300))


def test_a_stop_takes_the_silent_tail_of_the_phoneme_before_it() -> None:
    pcm = np.full(2000, 3000, dtype=np.int16)
    pcm[1000:1500] = 0  # the closure eSpeak leaves inside the vowel before the burst at 1500
    spans = phoneme_spans([(0, "'a"), (1500, "p"), (1800, "a")], pcm, 22050)
    assert spans == (PhonemeEvent("'a", 0, 1000), PhonemeEvent("p", 1000, 1800), PhonemeEvent("a", 1800, 2000))


def test_empty_events_are_dropped() -> None:
    pcm = np.full(300, 1000, dtype=np.int16)
    spans = phoneme_spans([(0, "l"), (100, "l"), (100, "s")], pcm, 22050)
    assert spans == (PhonemeEvent("l", 0, 100), PhonemeEvent("s", 100, 300))
