"""Live sessions without a broker: tts paces speech on the media clock and stops at an
interrupt; animate keeps an idle face moving, honours the cut and blends emotion changes."""
import numpy as np
import pytest

from backbone.blendshapes import INDEX
from backbone.harness import run_stage, tick_stage
from backbone.records import (MotionFrames, PhonemeSpan, PhonemeSpans, ReplyText, SessionConfig,
                              SessionControl, SpeechChunk)
from processors.animate import IDLE_LAG_S, AnimateStage
from processors.sentences import split_sentences
from processors.tts import CHUNK_S, LEAD_S, MAX_SENTENCE_CHARS, PHONEME_LEAD_S, TtsStage

T0 = 1_000_000  # the session's creation, in ms of the fake wall clock
SR = 22050
LONG = ("The quick brown fox jumps over the lazy dog while the band plays on. "
        "Then everyone goes home and sleeps until morning.")


class Clock:
    def __init__(self, t: int = T0) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def live_tts(clock):
    tts = TtsStage()
    tts.live = True
    tts.clock = clock
    return tts


def create(fps=25, **kw):
    return ("session.control", SessionControl("s", "CREATE", SessionConfig(fps=fps, **kw)))


def audio_of(outputs):
    return [o.value for o in outputs if isinstance(o.value, SpeechChunk)]


def phonemes_of(outputs):
    return [o.value for o in outputs if isinstance(o.value, PhonemeSpans)]


def test_live_tts_sends_only_the_lead_at_once_then_paces_with_the_clock():
    clock = Clock()
    tts = live_tts(clock)
    res = run_stage(tts, [create(), ("reply", ReplyText("s", "u0", LONG))], clock=clock)
    first = audio_of(res.outputs)
    sent_s = sum(a.n_samples for a in first) / SR
    assert first and first[0].start_sample == 0
    assert sent_s <= LEAD_S + 1e-9  # nothing beyond the lead before its time
    clock.t += 1000
    more = audio_of(tick_stage(tts, res.states, clock.t))
    sent_s += sum(a.n_samples for a in more) / SR
    assert 1.0 + LEAD_S - CHUNK_S <= sent_s <= 1.0 + LEAD_S + 1e-9
    # Chunks tile the clock: each starts where the previous ended.
    chunks = first + more
    assert [c.start_sample for c in chunks[1:]] == [c.start_sample + c.n_samples for c in chunks[:-1]]
    clock.t += 20_000
    rest = audio_of(tick_stage(tts, res.states, clock.t))
    assert rest[-1].is_last and not any(c.is_last for c in chunks)
    assert tick_stage(tts, res.states, clock.t + 1000) == []


def test_phonemes_run_ahead_of_audio_and_cover_it():
    clock = Clock()
    tts = live_tts(clock)
    res = run_stage(tts, [create(), ("reply", ReplyText("s", "u0", LONG))], clock=clock)
    audio_end = max(a.start_sample + a.n_samples for a in audio_of(res.outputs))
    spans = [s for p in phonemes_of(res.outputs) for s in p.spans]
    assert spans[-1].start_sample >= audio_end  # lookahead for the animate stage
    assert not any(p.is_last for p in phonemes_of(res.outputs))


def test_interrupt_stops_speech_at_the_next_chunk_boundary():
    clock = Clock()
    tts = live_tts(clock)
    res = run_stage(tts, [create(), ("reply", ReplyText("s", "u0", LONG))], clock=clock)
    clock.t += 500
    tick_stage(tts, res.states, clock.t)
    sent = res.states["s"].data["cur"]["sent"]
    stop = run_stage(tts, [("session.control", SessionControl("s", "INTERRUPT"))],
                     res.states, start=False, clock=clock)
    final_audio = audio_of(stop.outputs)
    final_ph = phonemes_of(stop.outputs)
    assert len(final_audio) == 1 and final_audio[0].is_last and final_audio[0].n_samples == 0
    assert final_audio[0].start_sample == sent
    assert len(final_ph) == 1 and final_ph[0].is_last and final_ph[0].cut_sample == sent
    clock.t += 10_000
    assert tick_stage(tts, res.states, clock.t) == []
    # A late sentence of the interrupted reply is dropped; a new reply is spoken after the cut.
    late = run_stage(tts, [("reply", ReplyText("s", "u0", "More of it.", 1, True)),
                           ("reply", ReplyText("s", "u1", "New answer."))],
                     res.states, start=False, clock=clock)
    audio = audio_of(late.outputs)
    assert audio and {a.utterance_id for a in audio} == {"u1"}
    assert audio[0].start_sample >= sent


def test_streamed_reply_sentences_are_contiguous_and_end_once():
    res = run_stage(TtsStage(), [create(),
                                 ("reply", ReplyText("s", "u0", "First part.", 0, False)),
                                 ("reply", ReplyText("s", "u0", "Second part.", 1, True))])
    audio = audio_of(res.outputs)
    assert [a.start_sample for a in audio[1:]] == [a.start_sample + a.n_samples for a in audio[:-1]]
    assert [a.is_last for a in audio].count(True) == 1 and audio[-1].is_last
    assert [p.is_last for p in phonemes_of(res.outputs)] == [False, True]


def test_a_long_reply_is_split_into_sentences_below_the_limit():
    parts = split_sentences("Hi. " + "word " * 200 + "end!  Next one?\nLast", MAX_SENTENCE_CHARS)
    assert parts[0] == "Hi." and parts[-2:] == ["Next one?", "Last"]
    assert all(len(p) <= 240 for p in parts)
    assert " ".join(parts).split() == ("Hi. " + "word " * 200 + "end! Next one? Last").split()


def test_unknown_voice_is_rejected_on_arrival():
    res = run_stage(TtsStage(), [create(voice="xx-nope"), ("reply", ReplyText("s", "u0", "Hi."))])
    assert len(res.rejected) == 1 and "unknown voice" in res.rejected[0][1]


# ---- animate ----------------------------------------------------------------------------

def live_animate(clock, model=None):
    anim = AnimateStage(model)
    anim.live = True
    anim.clock = clock
    return anim


def frames_of(outputs):
    return [o.value for o in outputs if isinstance(o.value, MotionFrames)]


def stack(frames):
    idx = np.concatenate([f.frames for f in frames])
    return idx, np.concatenate([f.weights for f in frames]), np.concatenate([f.head for f in frames])


@pytest.mark.parametrize("model", ["neural", "procedural"])
def test_an_idle_live_face_keeps_moving_and_blinks(model):
    clock = Clock()
    anim = live_animate(clock, model)
    res = run_stage(anim, [create()], clock=clock)
    frames = []
    for _ in range(200):  # 20 s in 100 ms ticks
        clock.t += 100
        frames += frames_of(tick_stage(anim, res.states, clock.t))
    idx, w, head = stack(frames)
    assert list(idx) == list(range(len(idx)))  # no gaps, no repeats
    assert len(idx) == int((20.0 - IDLE_LAG_S) * 25)
    blink = w[:, INDEX["eyeBlinkLeft"]]
    assert (np.diff((blink > 0.5).astype(int)) == 1).sum() >= 2  # a few blinks in 20 s
    assert np.ptp(head[:, 0]) > 0.005  # the head sways
    assert w[:, INDEX["jawOpen"]].max() < 0.15  # but the mouth stays shut


def spans_record(spans, is_last=False, cut=-1, uid="u0"):
    return ("speech.phonemes", PhonemeSpans("s", uid, SR, tuple(
        PhonemeSpan(p, a, b) for p, a, b in spans), is_last, cut_sample=cut))


def syllables(start_s, n):
    out, t = [], int(start_s * SR)
    for _ in range(n):
        out += [("m", t, t + 2000), ("a:", t + 2000, t + 6000)]
        t += 6000
    return out


def test_live_animate_holds_back_frames_until_phonemes_cover_the_lookahead():
    clock = Clock()
    anim = live_animate(clock)
    spans = syllables(0.5, 10)  # 0.5 s .. 3.2 s
    res = run_stage(anim, [create(), spans_record(spans)], clock=clock)
    idx, _, _ = stack(frames_of(res.outputs))
    last_end_s = spans[-1][2] / SR
    assert idx[-1] / 25 <= last_end_s - anim.lookahead_s + 1 / 25
    # While speech is in flight the clock adds no idle frames over it.
    clock.t += 1000
    assert tick_stage(anim, res.states, clock.t) == []


def test_a_cut_utterance_closes_the_mouth_where_speech_stopped():
    clock = Clock()
    anim = live_animate(clock)
    cut = syllables(0.2, 20)[7][1]  # inside the 4th syllable, on an "a:" onset
    # tts sends phonemes PHONEME_LEAD_S ahead of the audio it has sent.
    spans = [s for s in syllables(0.2, 20) if s[1] < cut + PHONEME_LEAD_S * SR]
    res = run_stage(anim, [create(), spans_record(spans), spans_record([], True, cut)],
                    clock=clock, producer="tts")
    frames = frames_of(res.outputs)
    idx, w, _ = stack(frames)
    assert idx[-1] + 1 == int(np.ceil(cut / SR * 25))  # frames end at the cut
    clock.t += int(cut / SR * 1000) + 1500
    idle = frames_of(tick_stage(anim, res.states, clock.t))
    i2, w2, _ = stack(idle)
    assert i2[0] == idx[-1] + 1
    assert w2[:, INDEX["jawOpen"]].max() < 0.15  # no mouthing of the unspoken syllables


@pytest.mark.parametrize("model", ["neural", "procedural"])
def test_an_emotion_change_blends_in_without_a_jump(model):
    base = run_stage(AnimateStage(model), [create(fps=50),
                                           spans_record(syllables(0.1, 4), True)])
    change = ("session.control", SessionControl("s", "EMOTION", emotion="happy", intensity=1.0))
    res = run_stage(AnimateStage(model), [create(fps=50), spans_record(syllables(0.1, 4), True),
                                     change, spans_record(syllables(2.0, 4), True, uid="u1")])
    _, w, _ = stack(frames_of(res.outputs))
    _, w0, _ = stack(frames_of(base.outputs))
    smile = w[:, INDEX["mouthSmileLeft"]]
    n0 = len(w0)
    assert smile[-20:].mean() > smile[:n0].mean() + 0.2  # the new emotion shows
    step = np.abs(np.diff(smile[n0 - 2:n0 + 20])).max()
    assert step < 0.1  # and arrives over several frames, not in one


def test_unknown_emotion_is_rejected_and_the_old_one_kept():
    res = run_stage(AnimateStage(), [
        create(), ("session.control", SessionControl("s", "EMOTION", emotion="smug"))])
    assert len(res.rejected) == 1 and "unknown emotion" in res.rejected[0][1]
    assert res.states["s"].data["config"]["emotion"] == "neutral"


@pytest.mark.parametrize("fps", [25, 100])
def test_offline_animate_still_covers_the_utterance_with_a_tail(fps):
    res = run_stage(AnimateStage(), [create(fps=fps), spans_record(syllables(0.0, 3), True)])
    idx, _, _ = stack(frames_of(res.outputs))
    assert list(idx) == list(range(len(idx)))
    assert len(idx) == int(np.ceil((18000 / SR + 0.4) * fps))


def _spoken_s(config_kw):
    res = run_stage(TtsStage(), [create(**config_kw),
                                 ("reply", ReplyText("s", "u0", "Seven slow sentences."))])
    return sum(a.n_samples for a in audio_of(res.outputs)) / SR


def test_voice_rate_and_pitch_follow_the_session_config():
    assert _spoken_s({"rate_wpm": 300}) < 0.75 * _spoken_s({"rate_wpm": 130})
    def spoken(pitch):
        return run_stage(TtsStage(), [create(pitch=pitch, rate_wpm=80),
                                      ("reply", ReplyText("s", "u0", "Ah."))])

    def f0(res):
        """Median over the vowel of YIN's deepest normalised-difference dip (55-400 Hz)."""
        pcm = np.frombuffer(b"".join(a.pcm for a in audio_of(res.outputs)), "<i2").astype(float)
        lags = np.arange(1, 400)
        est = []
        for at in range(len(pcm) // 4, 3 * len(pcm) // 4 - 1400, 300):
            w = pcm[at:at + 1400]
            d = np.array([np.sum((w[:-400] - w[k:k - 400]) ** 2) for k in lags])
            cmnd = d * lags / np.maximum(np.cumsum(d), 1e-9)
            est.append(SR / lags[54 + np.argmin(cmnd[54:])])
        return float(np.median(est))

    # Median of three: a single estimate of a falling-intonation vowel can slip.
    low, high = (float(np.median([f0(spoken(p)) for _ in range(3)])) for p in (10, 90))
    assert high > 1.5 * low


def test_another_language_voice_speaks_with_its_own_phonemes():
    de = run_stage(TtsStage(), [create(voice="de"), ("reply", ReplyText("s", "u0", "Ich möchte."))])
    symbols = {s.phoneme.lstrip("',") for p in phonemes_of(de.outputs) for s in p.spans}
    assert "C" in symbols  # the German ich-laut, which English has not


@pytest.mark.parametrize("model", ["neural", "procedural"])
def test_a_long_utterance_moves_the_mouth_from_its_first_phoneme(model):
    spans = syllables(0.0, 12)  # 3.3 s in one record: older spans must not be dropped early
    res = run_stage(AnimateStage(model), [create(), spans_record(spans, True)])
    _, w, _ = stack(frames_of(res.outputs))
    assert w[:10, INDEX["jawOpen"]].max() > 0.2  # within the first 0.4 s
