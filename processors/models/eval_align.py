"""Scores phoneme alignments against eSpeak NG's exact phoneme times, on held-out data.

Shared by benchmarks/align.py (ours vs the pocketsphinx baseline) and by hand while tuning:
    python -m processors.models.eval_align --checkpoint processors/models/align_ctc.pt -n 40
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Sequence

import numpy as np
import numpy.typing as npt
import torch

from processors.espeak import EspeakSynth, Synthesis
from processors.visemes import PHONEME_VISEMES
from processors.models import align_ctc as ac
from processors.models import train_align as ta

# Seeds far from training's (0..99): the held-out sentences are new even in their function words.
EVAL_SEED: Final = 7_777
# Pairs the edit-distance alignment with a tiny time term, so that among equally cheap
# alignments the one pairing nearby phonemes wins (1 s of distance costs 0.01 of an edit).
TIME_TIE_BREAK_PER_S: Final = 0.01


@dataclass(frozen=True)
class Timed:
    symbol: str
    onset_s: float


@dataclass
class Score:
    onset_errors_ms: list[float] = field(default_factory=list)
    edits: int = 0
    reference_phonemes: int = 0

    def add(self, other: Score) -> None:
        self.onset_errors_ms += other.onset_errors_ms
        self.edits += other.edits
        self.reference_phonemes += other.reference_phonemes

    @property
    def phoneme_error_rate(self) -> float:
        return self.edits / max(1, self.reference_phonemes)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.onset_errors_ms, q)) if self.onset_errors_ms else float("nan")


def phonemes_only(spans: Sequence[Timed]) -> list[Timed]:
    """Pauses are left out of both scores: where a pause sits is not a phoneme's identity,
    and the utterance-initial pause has a trivial onset of 0."""
    return [s for s in spans if s.symbol != ac.PAUSE]


def score(reference: Sequence[Timed], predicted: Sequence[Timed]) -> Score:
    """Edit-distance alignment of the symbol sequences; each reference phoneme paired with a
    predicted one (same symbol or a substitution) contributes |onset difference|; the edit
    count (substitutions + insertions + deletions) over the reference length is the PER."""
    ref, hyp = phonemes_only(reference), phonemes_only(predicted)
    n, m = len(ref), len(hyp)
    cost = np.zeros((n + 1, m + 1))
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pair = (ref[i - 1].symbol != hyp[j - 1].symbol) + TIME_TIE_BREAK_PER_S * abs(
                ref[i - 1].onset_s - hyp[j - 1].onset_s)
            cost[i, j] = min(cost[i - 1, j - 1] + pair, cost[i - 1, j] + 1, cost[i, j - 1] + 1)
    errors: list[float] = []
    edits = 0
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            pair = (ref[i - 1].symbol != hyp[j - 1].symbol) + TIME_TIE_BREAK_PER_S * abs(
                ref[i - 1].onset_s - hyp[j - 1].onset_s)
            if np.isclose(cost[i, j], cost[i - 1, j - 1] + pair):
                errors.append(abs(ref[i - 1].onset_s - hyp[j - 1].onset_s) * 1000)
                edits += int(ref[i - 1].symbol != hyp[j - 1].symbol)
                i, j = i - 1, j - 1
                continue
        if i > 0 and (j == 0 or np.isclose(cost[i, j], cost[i - 1, j] + 1)):
            edits += 1
            i -= 1
        else:
            edits += 1
            j -= 1
    return Score(errors[::-1], edits, n)


def reference_of(syn: Synthesis) -> list[Timed]:
    return [Timed(ac.to_inventory(p.symbol), p.start_sample / syn.sample_rate) for p in syn.phonemes]


@dataclass(frozen=True)
class Utterance:
    voice: str
    text: str
    synthesis: Synthesis


def held_out_utterances(synth: EspeakSynth, n: int, seed: int = EVAL_SEED) -> list[Utterance]:
    """Held-out voices (cycled) reading sentences of held-out content words."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        voice = ta.EVAL_VOICES[i % len(ta.EVAL_VOICES)]
        text = ta.make_text(rng, ta.HELD_OUT_WORDS)
        syn = synth.synthesize(text, voice=voice, rate_wpm=int(rng.integers(140, 231)),
                               pitch=int(rng.integers(25, 76)))
        out.append(Utterance(voice, text, syn))
    return out


def as_visemes(spans: Sequence[Timed]) -> list[Timed]:
    """Each phoneme as its (first) viseme: the level at which animate uses the symbols, where
    near-identical dialect vowels (e.g. "0" vs "A:") stop counting as errors."""
    return [Timed(PHONEME_VISEMES[s.symbol][0], s.onset_s) if s.symbol in PHONEME_VISEMES
            else s for s in spans]


def with_noise(pcm: npt.NDArray[np.int16], seed: int, snr_db: float) -> npt.NDArray[np.int16]:
    """White noise at `snr_db` below the utterance's mean power: a plain microphone line."""
    x = pcm.astype(np.float64)
    power = float(np.mean(x ** 2))
    noise = np.random.default_rng(seed).standard_normal(len(x)) * np.sqrt(power / 10 ** (snr_db / 10))
    out: npt.NDArray[np.int16] = np.clip(np.round(x + noise), -32768, 32767).astype(np.int16)
    return out


def with_dither(pcm: npt.NDArray[np.int16], seed: int, lsb: float = 3.0) -> npt.NDArray[np.int16]:
    """eSpeak's digital silence with a few LSB of noise, as any real recording has."""
    noise = np.random.default_rng(seed).standard_normal(len(pcm)) * lsb
    return np.clip(np.round(pcm.astype(np.float64) + noise), -32768, 32767).astype(np.int16)


def run_model(model: ac.AlignNet, pcm: npt.NDArray[np.int16], sample_rate: int,
              chunk_s: float = 0.1, penalty: float = ac.SWITCH_PENALTY) -> list[ac.AlignedSpan]:
    """Stream the audio through the aligner in chunk_s pieces, as the stage does."""
    aligner = ac.StreamingAligner(model, sample_rate, penalty=penalty)
    step = max(1, int(sample_rate * chunk_s))
    spans: list[ac.AlignedSpan] = []
    for i in range(0, len(pcm), step):
        spans += aligner.push(pcm[i:i + step])
    return spans + aligner.finish()


def evaluate_model(model: ac.AlignNet, utterances: Sequence[Utterance],
                   chunk_s: float = 0.1, penalty: float = ac.SWITCH_PENALTY,
                   snr_db: float | None = None, visemes: Score | None = None
                   ) -> tuple[Score, float]:
    """(score, real-time factor) over the utterances, dithered like the baseline (or with
    white noise at snr_db). The factor is this thread's CPU time per second of audio: one
    core's cost, whatever else runs. `visemes`, if given, collects the viseme-level score."""
    total = Score()
    compute_s = 0.0
    audio_s = 0.0
    for k, utt in enumerate(utterances):
        pcm = with_dither(utt.synthesis.pcm, k) if snr_db is None else with_noise(
            utt.synthesis.pcm, k, snr_db)
        t0 = time.thread_time()
        spans = run_model(model, pcm, utt.synthesis.sample_rate, chunk_s, penalty)
        compute_s += time.thread_time() - t0
        audio_s += utt.synthesis.duration_s
        predicted = [Timed(s.symbol, s.start_sample / utt.synthesis.sample_rate) for s in spans]
        total.add(score(reference_of(utt.synthesis), predicted))
        if visemes is not None:  # the same alignment scored at the viseme level
            visemes.add(score(as_visemes(reference_of(utt.synthesis)), as_visemes(predicted)))
    return total, compute_s / max(audio_s, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ac.DEFAULT_CHECKPOINT)
    ap.add_argument("-n", type=int, default=40, help="held-out utterances")
    ap.add_argument("--penalties", type=float, nargs="*", default=[ac.SWITCH_PENALTY])
    args = ap.parse_args()
    torch.set_num_threads(1)
    synth = EspeakSynth()
    synth.start()
    model, version = ac.load_checkpoint(args.checkpoint)
    utterances = held_out_utterances(synth, args.n)
    for penalty in args.penalties:
        result, rtf = evaluate_model(model, utterances, penalty=penalty)
        print(f"{version} penalty {penalty}: onset median {result.percentile_ms(50):.1f} ms, "
              f"p90 {result.percentile_ms(90):.1f} ms, PER {result.phoneme_error_rate:.3f}, "
              f"rtf {rtf:.4f}")


if __name__ == "__main__":
    main()
