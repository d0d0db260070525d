"""align stage and its phoneme model: speech audio without phonemes -> spans on the caller's clock."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import signal

from backbone.harness import run_stage
from backbone.records import PhonemeSpans, SessionConfig, SessionControl, SpeechChunk
from backbone.stage import Inbound, SessionState
from processors import visemes
from processors.align import AlignStage
from processors.espeak import EspeakSynth
from processors.models import align_ctc as ac
from processors.models import eval_align as ev

ROOT = Path(__file__).resolve().parents[2]
CREATE = ("session.control", SessionControl("s", "CREATE", SessionConfig()))
# A held-out voice (never trained on) reading held-out words (train_align.HELD_OUT_WORDS).
VOICE = "en-us+f4"
TEXT = "The hungry penguin will explain a quiet garden story to my father."


@pytest.fixture(scope="module")
def speech():
    synth = EspeakSynth()
    synth.start()
    syn = synth.synthesize(TEXT, voice=VOICE, rate_wpm=170, pitch=55)
    return syn, ev.with_dither(syn.pcm, 0)


@pytest.fixture(scope="module")
def stage():
    s = AlignStage()
    s.start()
    return s


def chunks(pcm, sample_rate, start, step, uid="u0"):
    """The audio as SpeechChunk records of `step` samples from `start` on the session clock."""
    out = []
    for i in range(0, len(pcm), step):
        part = pcm[i:i + step]
        out.append(("speech.audio", SpeechChunk("s", uid, sample_rate, start + i,
                                                part.astype("<i2").tobytes(),
                                                is_last=i + step >= len(pcm))))
    return out


def all_spans(result):
    return [s for rec in result.values("speech.phonemes") for s in rec.final_spans]


def onset_score(spans, syn, sample_rate, start):
    predicted = [ev.Timed(s.phoneme, (s.start_sample - start) / sample_rate) for s in spans]
    return ev.score(ev.reference_of(syn), predicted)


def test_stage_turns_an_unseen_voice_into_spans_near_espeaks_onsets(stage, speech):
    syn, pcm = speech
    res = run_stage(stage, [CREATE] + chunks(pcm, syn.sample_rate, 0, 2205), start=False)
    score = onset_score(all_spans(res), syn, syn.sample_rate, 0)
    errors = np.array(score.onset_errors_ms)
    # Most reference phonemes are found, and most of those start within 30 ms of eSpeak's.
    assert len(errors) >= 0.8 * score.reference_phonemes
    assert np.mean(errors <= 30) >= 0.8
    assert score.phoneme_error_rate < 0.5
    assert all(rec.source == "align" for rec in res.values("speech.phonemes"))


def test_audio_from_the_tts_stage_is_ignored(stage, speech):
    syn, pcm = speech
    state = SessionState("s")
    chunk = SpeechChunk("s", "u0", syn.sample_rate, 0, pcm.astype("<i2").tobytes(), True)
    from_tts = Inbound("speech.audio", "s", chunk, producer_stage="tts")
    from_gateway = Inbound("speech.audio", "s", chunk, producer_stage="gateway")
    assert list(stage.process(from_tts, state)) == []
    assert len(list(stage.process(from_gateway, state))) == 1


def test_small_chunks_give_exactly_the_spans_of_one_big_chunk(stage, speech):
    syn, pcm = speech
    whole = run_stage(stage, chunks(pcm, syn.sample_rate, 5000, len(pcm)), start=False)
    small = run_stage(stage, chunks(pcm, syn.sample_rate, 5000, 37), start=False)
    assert all_spans(small) == all_spans(whole)
    assert len(small.values("speech.phonemes")) > 10  # it really streamed


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_any_input_sample_rate_gives_spans_on_the_callers_clock(stage, speech, rate):
    syn, pcm = speech
    g = np.gcd(rate, syn.sample_rate)
    audio = signal.resample_poly(pcm.astype(np.float64), rate // g, syn.sample_rate // g)
    resampled = np.clip(np.round(audio), -32768, 32767).astype(np.int16)
    start = 3 * rate  # the utterance begins 3 s into the session
    res = run_stage(stage, chunks(resampled, rate, start, rate // 10), start=False)
    spans = all_spans(res)
    assert all(rec.sample_rate == rate for rec in res.values("speech.phonemes"))
    assert spans[0].start_sample == start and spans[-1].end_sample == start + len(resampled)
    errors = np.array(onset_score(spans, syn, rate, start).onset_errors_ms)
    assert np.mean(errors <= 30) >= 0.7


def test_spans_tile_the_utterance_with_symbols_animate_knows(stage, speech):
    syn, pcm = speech
    spans = all_spans(run_stage(stage, chunks(pcm, syn.sample_rate, 0, 1000), start=False))
    assert all(visemes.is_known(s.phoneme) for s in spans)
    assert all(s.end_sample > s.start_sample for s in spans)
    assert [s.start_sample for s in spans[1:]] == [s.end_sample for s in spans[:-1]]


def test_the_phoneme_being_spoken_streams_as_an_open_span_that_closes_in_place(stage, speech):
    syn, pcm = speech
    sr = syn.sample_rate
    step = sr // 25  # 40 ms messages, as an integrator streams
    result = run_stage(stage, chunks(pcm, sr, 0, step), start=False)
    records = result.values("speech.phonemes")
    assert sum(r.last_open for r in records) > len(records) // 2
    finals = {s.start_sample: s for s in all_spans(result)}
    for rec, sent in zip(records, range(step, len(pcm) + step, step)):
        if not rec.last_open:
            continue
        shown = rec.spans[-1]
        # The lips can follow the audio one lookahead behind, not one phoneme behind...
        assert min(sent, len(pcm)) - shown.end_sample <= (ac.LOOKAHEAD_S + 0.001) * sr
        # ...and the open span comes back from the same start, at most the decode lag shorter.
        assert finals[shown.start_sample].phoneme == shown.phoneme
        lag = ac.DECODE_LAG_FRAMES * ac.HOP * sr / ac.SAMPLE_RATE
        assert finals[shown.start_sample].end_sample >= shown.end_sample - lag - 1
    ahead = [min(sent, len(pcm)) - r.spans[-1].end_sample
             for r, sent in zip(records, range(step, len(pcm) + step, step)) if r.last_open]
    assert np.median(ahead) <= (ac.OPEN_LOOKAHEAD_S + 0.04) * sr


def test_silent_and_clipped_audio_still_give_valid_spans(stage, speech):
    syn, pcm = speech
    silent = np.zeros(syn.sample_rate, dtype=np.int16)
    clipped = np.clip(pcm.astype(np.int32) * 20, -32768, 32767).astype(np.int16)
    quiet = run_stage(stage, chunks(silent, syn.sample_rate, 0, 2205), start=False)
    assert {s.phoneme for s in all_spans(quiet)} == {"_"}
    loud = run_stage(stage, chunks(clipped, syn.sample_rate, 0, 2205), start=False)
    spans = all_spans(loud)
    assert all(visemes.is_known(s.phoneme) for s in spans)
    assert len([s for s in spans if s.phoneme != "_"]) >= 10  # clipped speech is still speech


def test_bad_records_are_rejected_and_the_session_goes_on(stage, speech):
    syn, pcm = speech
    sr = syn.sample_rate
    good = pcm[:sr // 10].astype("<i2").tobytes()
    res = run_stage(stage, [
        ("speech.audio", SpeechChunk("s", "bad", sr, 0, good[:-1])),  # odd byte count
        ("speech.audio", SpeechChunk("s", "bad", 0, 0, good)),  # no sample rate
        ("speech.audio", SpeechChunk("s", "bad", sr, 0, b"")),  # empty, not the last
        ("speech.audio", SpeechChunk("s", "u1", sr, 10_000, good)),
        ("speech.audio", SpeechChunk("s", "u1", sr, 0, good)),  # goes back in time
        ("speech.audio", SpeechChunk("s", "u1", 16000, 12_205, good)),  # rate changes
    ] + chunks(pcm, sr, 12_205, 2205, uid="u1"), start=False)
    assert len(res.rejected) == 5
    spans = all_spans(res)
    assert spans[0].start_sample == 10_000 and spans[-1].end_sample == 12_205 + len(pcm)
    assert res.values("speech.phonemes")[-1].is_last


def test_a_span_is_final_within_100_ms_of_audio_after_its_end(speech):
    syn, pcm = speech
    model, _ = ac.load_checkpoint(ac.DEFAULT_CHECKPOINT)
    aligner = ac.StreamingAligner(model, syn.sample_rate)
    step = syn.sample_rate // 100  # push 10 ms at a time, note how much audio each span needed
    late = []
    for i in range(0, len(pcm), step):
        received = min(i + step, len(pcm))
        for span in aligner.push(pcm[i:i + step]):
            late.append(received - span.end_sample)
    assert len(late) >= 20
    assert max(late) <= 0.1 * syn.sample_rate
    assert ac.LOOKAHEAD_S <= 0.1


def test_a_new_utterance_closes_the_one_left_open(stage, speech):
    syn, pcm = speech
    first = chunks(pcm, syn.sample_rate, 0, 2205, uid="u0")[:-1]  # its last chunk never comes
    second = chunks(pcm, syn.sample_rate, len(pcm), 2205, uid="u1")
    res = run_stage(stage, first + second, start=False)
    closing = [r for r in res.values("speech.phonemes") if r.is_last]
    assert [r.utterance_id for r in closing] == ["u0", "u1"]
    assert isinstance(closing[0], PhonemeSpans)


def test_training_runs_three_steps_and_writes_a_checkpoint_the_stage_loads(tmp_path):
    out = tmp_path / "align.pt"
    subprocess.run([sys.executable, "-m", "processors.models.train_align", "--steps", "3",
                    "--batch", "2", "--out", str(out)], cwd=ROOT, check=True, timeout=120,
                   capture_output=True)
    stage = AlignStage(checkpoint=out)
    stage.start()
    assert stage.model_version.startswith("align-ctc-")
    assert out.stat().st_size < 5_000_000
