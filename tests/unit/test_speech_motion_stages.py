"""tts and animate as plain transforms, run by the no-broker harness."""
import numpy as np

from backbone.harness import run_stage
from backbone.records import (MotionFrames, PhonemeSpan, PhonemeSpans, ReplyText,
                              SessionConfig, SessionControl, SpeechChunk)
from processors.animate import AnimateStage
from processors.tts import TtsStage

CREATE = ("session.control", SessionControl("s", "CREATE", SessionConfig(fps=50)))


def test_tts_puts_audio_and_phonemes_on_one_clock():
    res = run_stage(TtsStage(), [CREATE, ("reply", ReplyText("s", "u0", "Hello there.")),
                                 ("reply", ReplyText("s", "u1", "Again."))])
    audio = res.values("speech.audio")
    spans = res.values("speech.phonemes")
    assert len(spans) == 2 and all(isinstance(a, SpeechChunk) for a in audio)
    # Chunks tile the clock with no gap; the second utterance starts where the first ended.
    ends = [a.start_sample + a.n_samples for a in audio]
    assert [a.start_sample for a in audio[1:]] == ends[:-1]
    first_end = max(p.end_sample for p in spans[0].spans)
    assert spans[1].spans[0].start_sample == first_end
    assert sum(a.is_last for a in audio) == 2


def test_tts_rejects_empty_text_and_keeps_going():
    res = run_stage(TtsStage(), [CREATE, ("reply", ReplyText("s", "u0", "   ")),
                                 ("reply", ReplyText("s", "u1", "Still here."))])
    assert len(res.rejected) == 1 and "empty" in res.rejected[0][1]
    assert len(res.values("speech.phonemes")) == 1


def spans_record(spans):
    return ("speech.phonemes", PhonemeSpans("s", "u0", 22050, tuple(
        PhonemeSpan(p, a, b) for p, a, b in spans), True))


def test_animate_covers_the_utterance_at_the_session_fps_without_gaps():
    res = run_stage(AnimateStage(), [CREATE, spans_record(
        [("_", 0, 2205), ("p", 2205, 4410), ("A:", 4410, 11025), ("_", 11025, 13230)])])
    frames = np.concatenate([m.frames for m in res.values("motion")])
    assert frames.tolist() == list(range(len(frames)))
    assert len(frames) >= 0.6 * 50  # 0.6 s of spans at 50 fps, plus the settle tail
    w = np.concatenate([m.weights for m in res.values("motion")])
    assert w.shape[1] == 52 and np.isfinite(w).all()
    assert all(isinstance(m, MotionFrames) and m.fps == 50 for m in res.values("motion"))


def test_animate_rejects_backwards_and_overlapping_spans():
    res = run_stage(AnimateStage(), [CREATE, spans_record([("p", 500, 100)]),
                                     spans_record([("a", 0, 900), ("b", 800, 1200)])])
    assert len(res.rejected) == 2 and res.values("motion") == []
