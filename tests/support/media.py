"""Logging what tts and render would log for a session, without running them: real H.264
of a moving picture and a 440 Hz tone on the session clock."""
from __future__ import annotations

import numpy as np

from backbone.bus import Bus
from backbone.records import SpeechChunk, VideoChunk
from backbone.settings import Settings
from processors.encode import H264Encoder
from tests.support.bus_io import send


def feed_session(bus: Bus, settings: Settings, sid: str, seconds: float = 3.0, fps: int = 25,
                 size: int = 256) -> list[bytes]:
    """Produce `seconds` of video and speech for `sid`; returns the access units sent."""
    enc = H264Encoder(size, size, fps, keyframe_interval=fps)
    enc.start()
    yy, xx = np.mgrid[0:size, 0:size]
    sent = []
    for i in range(int(seconds * fps)):
        img = np.stack([(xx + 4 * i) % 256, yy % 256, (xx + yy) // 2 % 256], -1).astype(np.uint8)
        for p in enc.encode(img, i):
            send(bus, settings, "video", VideoChunk(sid, size, size, fps, p.pts, p.dts,
                                                    p.keyframe, p.data), seq=i, stage="render")
            sent.append(p.data)
    sr = 22050
    tone = (np.sin(np.arange(int(seconds * sr)) * 2 * np.pi * 440 / sr) * 12000).astype("<i2")
    step = sr // 10
    for k in range(0, len(tone), step):
        send(bus, settings, "speech.audio", SpeechChunk(sid, "u0", sr, k,
                                                        tone[k:k + step].tobytes()),
             seq=k // step, stage="tts")
    return sent
