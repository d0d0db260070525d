"""The demo's WAV reader: every PCM width and channel count in, mono s16le out; clear errors."""
import wave

import numpy as np
import pytest

from backbone.demo import read_wav


def _write(path, samples, width, channels, sr=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(samples.tobytes())


def _tone(n=1600):
    return (np.sin(np.arange(n) * 2 * np.pi * 440 / 16000) * 20000).astype(np.int16)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_pcm_width_reads_as_the_same_16_bit_signal(tmp_path, width):
    x = _tone().astype(np.int32)
    if width == 1:
        raw = ((x >> 8) + 128).astype(np.uint8)
    elif width == 2:
        raw = x.astype("<i2")
    elif width == 3:
        v = (x << 8).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        raw = np.ascontiguousarray(v)
    else:
        raw = (x << 16).astype("<i4")
    _write(tmp_path / "a.wav", raw, width, 1)
    pcm, sr = read_wav(tmp_path / "a.wav")
    got = np.frombuffer(pcm, "<i2").astype(int)
    assert sr == 16000 and len(got) == len(x)
    assert np.abs(got - x).max() <= (256 if width == 1 else 1)


def test_stereo_is_mixed_down(tmp_path):
    x = _tone()
    _write(tmp_path / "s.wav", np.stack([x, np.zeros_like(x)], 1), 2, 2)
    got = np.frombuffer(read_wav(tmp_path / "s.wav")[0], "<i2")
    assert np.abs(got.astype(int) - x // 2).max() <= 1


def test_a_non_wav_file_gets_a_clear_error(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(tmp_path / "x.wav")


def test_an_odd_sample_rate_is_refused(tmp_path):
    _write(tmp_path / "r.wav", _tone(), 2, 1, sr=96000)
    with pytest.raises(ValueError, match="96000"):
        read_wav(tmp_path / "r.wav")
