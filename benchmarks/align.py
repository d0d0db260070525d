"""align benchmark: phoneme onset error and phoneme error rate of the align model against
eSpeak NG's exact phoneme times, beside the pocketsphinx forced-alignment baseline (which is
given the text; the model is not), on held-out voices and sentences, one core.

The audio is what the align stage sees from an integrator's TTS: clean 22.05 kHz eSpeak speech
with 3 LSB of dither, streamed in 100 ms chunks. Pauses are not scored (see eval_align).
Real-time factors are CPU time of the one thread doing the work, per second of audio.

    python benchmarks/align.py --json benchmarks/results/align.json [-n 48]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"onset_median_ms": 20.0, "onset_p90_ms": 50.0, "rtf": 0.05}
NOISY_SNR_DB = 15.0


def plot(path: Path, result: dict[str, Any], ours: list[float], baseline: list[float],
         example: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.6]})
    for errors, label in ((ours, f"align model ({result['model_version']})"),
                          (baseline, "pocketsphinx forced alignment (knows the text)")):
        x = np.sort(errors)
        a.plot(x, np.arange(1, len(x) + 1) / max(1, len(x)), label=label)
    a.axvline(TARGETS["onset_median_ms"], color="grey", ls=":", lw=1)
    a.axvline(TARGETS["onset_p90_ms"], color="grey", ls="--", lw=1)
    a.set_xlim(0, 120)
    a.set_xlabel("|onset error| vs eSpeak NG (ms)")
    a.set_ylabel("fraction of phonemes")
    a.set_title(f"{result['n_utterances']} held-out utterances, {result['audio_s']:.0f} s")
    a.legend(loc="lower right", fontsize=8)
    a.grid(alpha=0.3)
    rows = (("eSpeak", example["truth"]), ("align", example["ours"]),
            ("sphinx", example["baseline"]))
    for y, (_, spans) in enumerate(rows):
        for symbol, start, end in spans:
            if end > example["until_s"]:
                continue
            b.barh(y, end - start, left=start, height=0.8, edgecolor="k", lw=0.4,
                   color="#dddddd" if symbol == "_" else "#9ecae1")
            b.text((start + end) / 2, y, symbol, ha="center", va="center", fontsize=6)
    b.set_yticks(range(len(rows)), [r[0] for r in rows])
    b.invert_yaxis()
    b.set_xlim(0, example["until_s"])
    b.set_xlabel("time (s)")
    b.set_title(f"{example['voice']}: \"{example['text'][:60]}\"", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/results/align.json")
    ap.add_argument("-n", type=int, default=48, help="held-out utterances")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--chunk-s", type=float, default=0.1, help="streaming chunk size")
    args = ap.parse_args()

    import torch

    from processors.espeak import EspeakSynth
    from processors.models import align_ctc as ac
    from processors.models import eval_align as ev
    from processors.models import train_align as ta
    from processors.sphinx_align import SphinxAligner

    torch.set_num_threads(1)
    checkpoint = Path(args.checkpoint) if args.checkpoint else ac.DEFAULT_CHECKPOINT
    synth = EspeakSynth()
    synth.start()
    model, version = ac.load_checkpoint(checkpoint)
    sphinx = SphinxAligner()
    sphinx.start()
    utterances = ev.held_out_utterances(synth, args.n)
    ours_visemes = ev.Score()
    ours, rtf = ev.evaluate_model(model, utterances, args.chunk_s, visemes=ours_visemes)
    noisy, _ = ev.evaluate_model(model, utterances, args.chunk_s, snr_db=NOISY_SNR_DB)

    baseline = ev.Score()
    baseline_noisy = ev.Score()
    sphinx_s = 0.0
    failures = 0
    for k, utt in enumerate(utterances):
        pcm = ev.with_dither(utt.synthesis.pcm, k)
        t0 = time.thread_time()
        phones = sphinx.align(pcm, utt.synthesis.sample_rate, utt.text, seed=k)
        sphinx_s += time.thread_time() - t0
        if not phones:
            failures += 1  # scored as all phonemes deleted; adds no onset errors
        baseline.add(ev.score(ev.reference_of(utt.synthesis),
                              [ev.Timed(p.symbol, p.start_s) for p in phones]))
        noisy_phones = sphinx.align(ev.with_noise(utt.synthesis.pcm, k, NOISY_SNR_DB),
                                    utt.synthesis.sample_rate, utt.text, seed=k)
        baseline_noisy.add(ev.score(ev.reference_of(utt.synthesis),
                                    [ev.Timed(p.symbol, p.start_s) for p in noisy_phones]))
    audio_s = sum(u.synthesis.duration_s for u in utterances)

    result: dict[str, Any] = {
        "onset_median_ms": round(ours.percentile_ms(50), 2),
        "onset_p90_ms": round(ours.percentile_ms(90), 2),
        "phoneme_error_rate": round(ours.phoneme_error_rate, 4),
        "rtf": round(rtf, 4),
        "baseline_onset_median_ms": round(baseline.percentile_ms(50), 2),
        "baseline_onset_p90_ms": round(baseline.percentile_ms(90), 2),
        # Against eSpeak's finer inventory through the ARPAbet mapping: not comparable to ours.
        "baseline_phoneme_error_rate_mapped": round(baseline.phoneme_error_rate, 4),
        "baseline_rtf": round(sphinx_s / audio_s, 4),
        "baseline_failed_utterances": failures,
        # Animation uses visemes: near-identical dialect vowels stop counting as errors there.
        "viseme_error_rate": round(ours_visemes.phoneme_error_rate, 4),
        # The same utterances under white noise at NOISY_SNR_DB (a plain microphone line).
        "noisy_snr_db": NOISY_SNR_DB,
        "noisy_onset_median_ms": round(noisy.percentile_ms(50), 2),
        "noisy_onset_p90_ms": round(noisy.percentile_ms(90), 2),
        "noisy_phoneme_error_rate": round(noisy.phoneme_error_rate, 4),
        "baseline_noisy_onset_median_ms": round(baseline_noisy.percentile_ms(50), 2),
        "baseline_noisy_onset_p90_ms": round(baseline_noisy.percentile_ms(90), 2),
        "n_utterances": len(utterances),
        "n_phonemes": ours.reference_phonemes,
        "audio_s": round(audio_s, 1),
        "voices": list(ta.EVAL_VOICES),
        "chunk_s": args.chunk_s,
        "model_version": version,
        "checkpoint_bytes": checkpoint.stat().st_size,
        "lookahead_ms": round(ac.LOOKAHEAD_S * 1000, 1),
        "threads": torch.get_num_threads(),
    }
    result["targets_met"] = {
        "onset_median_ms": result["onset_median_ms"] <= TARGETS["onset_median_ms"],
        "onset_p90_ms": result["onset_p90_ms"] <= TARGETS["onset_p90_ms"],
        "rtf": result["rtf"] <= TARGETS["rtf"],
        "beats_baseline": result["onset_median_ms"] < result["baseline_onset_median_ms"]
                          and result["onset_p90_ms"] < result["baseline_onset_p90_ms"],
    }

    first = utterances[0]
    sr = first.synthesis.sample_rate
    spans = ev.run_model(model, ev.with_dither(first.synthesis.pcm, 0), sr, args.chunk_s)
    phones = sphinx.align(ev.with_dither(first.synthesis.pcm, 0), sr, first.text)
    example = {
        "voice": first.voice, "text": first.text, "until_s": min(2.0, first.synthesis.duration_s),
        "truth": [(ac.to_inventory(p.symbol), p.start_sample / sr, p.end_sample / sr)
                  for p in first.synthesis.phonemes],
        "ours": [(s.symbol, s.start_sample / sr, s.end_sample / sr) for s in spans],
        "baseline": [(p.symbol, p.start_s, p.end_s) for p in phones],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(out.with_suffix(".png"), result, ours.onset_errors_ms, baseline.onset_errors_ms, example)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
