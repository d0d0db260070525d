"""tts benchmark: how soon the first speech chunk leaves after reply text arrives.

Two paths, both live (speech paced on the media clock, as in production):
- stage: `TtsStage.process` on a reply, until it hands back its first speech.audio chunk;
- bus: a reply produced on the embedded bus -> the runtime -> the first speech.audio record
  readable on the bus (decode, dedupe, synthesis, encode, produce, no broker).
The floor in the same run is eSpeak NG synthesising the reply's first sentence alone.

    python benchmarks/tts.py --json benchmarks/results/tts.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPLIES = {
    "short": "Hello there!",
    "sentence": "The quick brown fox jumps over the lazy dog while the band plays on.",
    "paragraph": " ".join([
        "Thanks for waiting, I have looked at your account.",
        "Your last payment arrived on Monday and everything is in order.",
        "If you want, I can also set up a reminder for next month, or send you a summary "
        "by email, whichever you prefer.",
        "Is there anything else I can help you with today?"] * 4),
}
ROUNDS = 40


def _stage_first_chunk(text: str) -> tuple[list[float], list[float]]:
    from backbone.records import ReplyText, SessionConfig, SessionControl
    from backbone.stage import Inbound, SessionState
    from processors.sentences import split_sentences
    from processors.tts import MAX_SENTENCE_CHARS, TtsStage

    tts = TtsStage()
    tts.live = True
    tts.start()
    first_ms, floor_ms = [], []
    first_sentence = split_sentences(text, MAX_SENTENCE_CHARS)[0]
    for i in range(ROUNDS + 3):
        state = SessionState(f"s{i}")
        now = int(time.time() * 1000)
        tts.process(Inbound("session.control", state.session_id, SessionControl(
            state.session_id, "CREATE", SessionConfig()), event_time_ms=now), state)
        rec = Inbound("reply", state.session_id, ReplyText(state.session_id, "u0", text),
                      event_time_ms=now)
        t0 = time.perf_counter()
        out = tts.process(rec, state)
        first = next(o for o in out if o.topic == "speech.audio")
        dt = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        tts.synth.synthesize(first_sentence)
        if i >= 3:  # the first calls warm the library's voice and caches
            first_ms.append(dt)
            floor_ms.append((time.perf_counter() - t1) * 1000)
    return first_ms, floor_ms


def _bus_first_chunk(text: str, rounds: int) -> list[float]:
    """Reply produced -> first speech.audio record on the embedded bus, via the runtime."""
    from backbone.records import ReplyText, SessionConfig, SessionControl
    from backbone.runtime import StageRunner, provision_topics
    from backbone.settings import Settings
    from processors.tts import TtsStage
    from tests.support.bus_io import read_all, send

    out: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(bus="embedded", embedded_path=str(Path(tmp) / "bus.sqlite"),
                            partitions=1, live=True)
        provision_topics(settings, ["tts"])
        bus = settings.open_bus()
        stop = threading.Event()
        runner = StageRunner(TtsStage(), settings)
        worker = threading.Thread(target=runner.run, args=(stop,), daemon=True)
        worker.start()
        try:
            for i in range(rounds):
                sid = f"b{i}"
                send(bus, settings, "session.control",
                     SessionControl(sid, "CREATE", SessionConfig()), seq=0)
                before = len(read_all(bus, settings, "speech.audio"))
                t0 = time.perf_counter()
                send(bus, settings, "reply", ReplyText(sid, "u0", text), seq=0)
                deadline = t0 + 5
                while time.perf_counter() < deadline:
                    if len(read_all(bus, settings, "speech.audio")) > before:
                        break
                    time.sleep(0.0005)
                out.append((time.perf_counter() - t0) * 1000)
                send(bus, settings, "session.control", SessionControl(sid, "END"), seq=1)
        finally:
            stop.set()
            worker.join(10)
    return out[2:]  # the first rounds include the group's start-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="benchmarks/results/tts.json")
    args = p.parse_args()
    import torch  # noqa: F401  (imported by other stages; keep the process comparable)

    result: dict[str, Any] = {"load_avg_1min_before": os.getloadavg()[0], "rounds": ROUNDS}
    per_reply: dict[str, Any] = {}
    for name, text in REPLIES.items():
        first, floor = _stage_first_chunk(text)
        bus = _bus_first_chunk(text, 22)
        per_reply[name] = {
            "chars": len(text),
            "stage_first_chunk_ms_p50": float(np.median(first)),
            "stage_first_chunk_ms_p95": float(np.percentile(first, 95)),
            "espeak_first_sentence_ms_p50": float(np.median(floor)),
            "bus_first_chunk_ms_p50": float(np.median(bus)),
            "bus_first_chunk_ms_p95": float(np.percentile(bus, 95)),
        }
        print(name, {k: round(v, 2) for k, v in per_reply[name].items()}, file=sys.stderr)
    result["replies"] = per_reply
    worst = max(per_reply.values(), key=lambda r: r["bus_first_chunk_ms_p95"])
    # The headline: the slowest reply kind, reply record in -> first audio record out.
    result["first_chunk_ms"] = worst["bus_first_chunk_ms_p95"]
    result["first_chunk_ms_stage_p95"] = max(r["stage_first_chunk_ms_p95"]
                                             for r in per_reply.values())
    # Our overhead against synthesis alone (stage p50 / eSpeak p50 on the same sentence).
    result["stage_vs_espeak_ratio"] = max(
        r["stage_first_chunk_ms_p50"] / max(r["espeak_first_sentence_ms_p50"], 1e-6)
        for r in per_reply.values())
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(per_reply, path.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "replies"}, indent=2))


def _plot(per_reply: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_reply)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, label) in enumerate([("espeak_first_sentence_ms_p50", "eSpeak NG first sentence (floor)"),
                                      ("stage_first_chunk_ms_p50", "tts stage, first chunk"),
                                      ("bus_first_chunk_ms_p50", "reply record -> chunk on bus")]):
        ax.bar(x + (i - 1) * 0.27, [per_reply[n][key] for n in names], 0.27, label=label)
    ax.axhline(40, color="red", ls="--", lw=1, label="target 40 ms")
    ax.set_xticks(x, [f"{n}\n({per_reply[n]['chars']} chars)" for n in names])
    ax.set_ylabel("ms (median)")
    ax.set_title("Time to the first speech chunk (live mode)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
