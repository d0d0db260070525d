"""`avatar demo` end to end on the embedded bus: a playable MP4 whose mouth moves with the
speech it carries."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from processors.portrait import default_pack

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Peter picked a peck of peppers. Then he went home, happy."


@pytest.fixture(scope="module")
def demo_mp4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo.mp4"
    data = out.parent / "data"
    subprocess.run([sys.executable, "-m", "backbone.cli", "--log-level", "WARNING", "demo",
                    "--text", TEXT, "-o", str(out), "--data-dir", str(data)],
                   cwd=ROOT, check=True, timeout=300)
    return out


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, int, int]:
    with av.open(str(path)) as c:
        fps = int(c.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        sr = c.streams.audio[0].sample_rate
        audio = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])
    return frames, audio, sr, fps


def test_demo_writes_h264_video_with_the_speech_as_audio(demo_mp4):
    frames, audio, sr, fps = decode(demo_mp4)
    with av.open(str(demo_mp4)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"
    assert frames[0].shape == (512, 512, 3)
    speech_s = len(audio) / sr
    assert 2.0 < speech_s < 8.0
    # Video covers the speech plus the short settle after it, not much more or less.
    assert speech_s <= len(frames) / fps <= speech_s + 1.0
    assert np.sqrt(np.mean(audio ** 2)) > 0.01  # real speech, not silence


def test_mouth_opens_and_closes_in_time_with_the_speech(demo_mp4):
    frames, audio, sr, fps = decode(demo_mp4)
    lm = default_pack(512).landmarks
    cx, cy = (lm[13][:2] + lm[14][:2]) / 2  # between the inner lips
    x0, x1, y0, y1 = int(cx - 20), int(cx + 20), int(cy - 8), int(cy + 14)
    openness = np.array([255 - f[y0:y1, x0:x1].mean() for f in frames])
    per_frame = sr / fps
    energy = np.array([np.sqrt(np.mean(audio[int(i * per_frame):int((i + 1) * per_frame)] ** 2))
                       if int(i * per_frame) < len(audio) else 0.0 for i in range(len(frames))])
    assert openness.max() - openness.min() > 25  # the mouth visibly moves
    # ...and with the sound, not at random: compare syllable-rate envelopes (200 ms).
    k = np.ones(5) / 5
    r = np.corrcoef(np.convolve(openness, k, "same"), np.convolve(energy, k, "same"))[0, 1]
    assert r > 0.4


def test_demo_animates_a_wav_file_through_align(tmp_path):
    import wave

    from processors.espeak import EspeakSynth

    synth = EspeakSynth()
    synth.start()
    said = synth.synthesize("Maybe my mother made more pie.", voice="en-gb-x-rp+m3")
    wav = tmp_path / "own.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(said.sample_rate)
        w.writeframes(said.pcm.tobytes())
    out = tmp_path / "own.mp4"
    subprocess.run([sys.executable, "-m", "backbone.cli", "--log-level", "WARNING", "demo",
                    "--audio", str(wav), "-o", str(out), "--data-dir", str(tmp_path / "d")],
                   cwd=ROOT, check=True, timeout=300)
    frames, audio, sr, fps = decode(out)
    assert abs(len(audio) / sr - said.duration_s) < 0.1  # the file's own speech, intact
    assert len(frames) / fps >= said.duration_s
    lm = default_pack(512).landmarks
    cx, cy = (lm[13][:2] + lm[14][:2]) / 2
    mouth = np.array([f[int(cy - 8):int(cy + 14), int(cx - 20):int(cx + 20)].mean()
                      for f in frames])
    assert np.ptp(mouth) > 15  # the lips move to it


def test_demo_refuses_a_file_that_is_not_wav(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"not audio")
    r = subprocess.run([sys.executable, "-m", "backbone.cli", "demo", "--audio", str(bad),
                        "-o", str(tmp_path / "x.mp4"), "--data-dir", str(tmp_path / "d")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a PCM WAV" in r.stderr
