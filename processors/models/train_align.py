"""Trains the align stage's phoneme model (align_ctc.py) on eSpeak NG speech made on the fly.

Data: random English sentences read by many eSpeak voices and variants at random rates and
pitches, degraded (noise, reverberation, a trip through another sample rate, gain, clipping);
eSpeak's exact phoneme times are the frame labels. Held-out voices and words are kept out.

The shipped checkpoint (one core, shared with other jobs, ~70 minutes in all):
    python -m processors.models.train_align --minutes 40 --steps 3000 --out /tmp/a.pt
    python -m processors.models.train_align --minutes 28 --steps 3000 --lr 1.5e-3 --seed 1 \
        --init /tmp/a.pt --out processors/models/align_ctc.pt
(820 + 1074 steps of 12 utterances, ~4.4 s each.) Then: python benchmarks/align.py
"""
from __future__ import annotations

import argparse
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from scipy import signal  # installed with scikit-image; training only, never at run time

from processors.espeak import EspeakSynth, Synthesis
from processors.models import align_ctc as ac

# Words every sentence needs; shared by training and evaluation sentences.
FUNCTION_WORDS: Final = tuple("""
the a an and or but if of to in on at by for with from as is are was were be been has have had
do does did will would can could should may might must not no so than then that this these those
there here what which who whom whose when where why how all any each every some many much more
most few other such only own same too very just also again still even ever never always often
i you he she it we they me him her us them my your his its our their mine yours up down out off
over under about into through after before between while because until since
""".split())

# Content words: a crc32 split puts about one in six into HELD_OUT_WORDS, never trained on.
CONTENT_WORDS: Final = tuple("""
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy music market sense
nation plan college interest death experience effect class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son view
relationship town road arm difference value building action model season society tax director
position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data
picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair window
evidence population site choice blood spring island garden bridge river mountain ocean forest
village kitchen bottle pocket jacket shadow thunder whisper marble pepper cabbage lemon violin
trumpet ladder needle zipper puzzle rabbit monkey tiger zebra giraffe penguin dolphin spider
butterfly pumpkin cherry orange banana potato tomato cheese butter bread coffee sugar salt
chocolate breakfast dinner supper lunch yellow purple silver golden frozen quiet gentle brave
clever happy angry hungry thirsty sleepy lazy busy noisy shiny smooth rough heavy empty
beautiful strange simple careful famous ancient modern narrow wide deep shallow sharp bitter
sweet sour fresh rotten bright dark warm cold hot cool wet dry soft hard loud slow fast early
late young old new big small tall short long strong weak rich poor clean dirty
run walk jump swim climb throw catch carry bring take give make build break fix open close push
pull read write draw paint sing dance laugh cry smile shout whisper listen watch look find lose
keep hold lift drop fill pour cut cook bake wash dry brush sweep fold sew knit measure count
explain describe imagine remember forget believe decide choose allow prevent protect destroy
discover invent explore travel visit arrive leave return borrow lend spend save earn pay
purchase deliver receive answer question wonder worry hope wish enjoy prefer recognize
thousand hundred seven eleven twelve thirty forty fifty ninety million billion zero dozen
quickly slowly quietly loudly gently suddenly finally usually rarely nearly hardly
yesterday tomorrow tonight today somewhere nowhere everywhere together alone outside inside
shampoo measure vision beige treasure pleasure garage genre massage casual usual leisure
judge bridge badge church cheap chin shoe shine sugar ocean machine thick thin think thought
throw three father mother brother weather feather leather smooth breathe although either
orange oyster boy toy noise voice coin join choice point royal loyal
cow now how loud cloud mouth south house flower tower power shower
high fly sky tie buy guy eye right night light bite kite white
go no so slow snow know show throw boat coat goat note vote
day say way pay play stay may rain train brain chain pain plain
tea sea key free tree three green seen clean mean dream cream
too blue true shoe new few view food mood room school tool pool
bird word third heard learn turn burn world worth earth
car far star park dark hard farm arm art part heart
door floor four more shore store core pour
hair care fair pair chair stair bear wear
here near dear clear fear year beer
sure pure cure tour poor
""".split())
HELD_OUT_WORDS: Final = tuple(sorted({w for w in CONTENT_WORDS if zlib.crc32(w.encode()) % 6 == 0}))
TRAIN_WORDS: Final = tuple(sorted(set(CONTENT_WORDS) - set(HELD_OUT_WORDS)))

ENGLISH_VOICES: Final = ("en", "en-029", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
                         "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc")
# Whole voices and variants never used in training: evaluation speakers.
HELD_OUT_LANGUAGES: Final = frozenset({"en-gb-scotland"})
HELD_OUT_VARIANTS: Final = frozenset({"f4", "m6", "klatt3", "belinda", "edward", "Andy"})
EVAL_VOICES: Final = ("en-gb-scotland", "en-us+f4", "en-gb-x-rp+m6", "en-us-nyc+klatt3",
                      "en+belinda", "en-029+edward", "en-us+Andy", "en-gb-scotland+f4")
# eSpeak variants that make speech unintelligible noise rather than a voice.
UNUSABLE_VARIANTS: Final = frozenset({"whisper", "whisperf"})

RATE_WPM: Final = (120, 300)
PITCH: Final = (10, 90)
ESPEAK_RATE: Final = 22050
# Rates a call may have gone through before it reached us (telephone to studio).
TRIP_RATES: Final = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
SNR_DB: Final = (5.0, 45.0)
MAX_LEAD_S: Final = 0.4  # random silence before speech, so onsets are not at a fixed place


def training_voices(variants: frozenset[str]) -> list[str]:
    usable = sorted(variants - HELD_OUT_VARIANTS - UNUSABLE_VARIANTS)
    langs = [v for v in ENGLISH_VOICES if v not in HELD_OUT_LANGUAGES]
    return langs + [f"{lang}+{var}" for lang in langs for var in usable]


def make_sentence(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    """4-14 words, about a third function words, with a few commas and an end mark."""
    n = int(rng.integers(4, 15))
    out: list[str] = []
    for i in range(n):
        pool = FUNCTION_WORDS if rng.random() < 0.35 else words
        word = str(pool[int(rng.integers(len(pool)))])
        if i < n - 1 and rng.random() < 0.08:
            word += ","
        out.append(word)
    out[0] = out[0].capitalize()
    return " ".join(out) + str(rng.choice([".", ".", ".", "?", "!"]))


def make_text(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return " ".join(make_sentence(rng, words) for _ in range(int(rng.integers(1, 3))))


def synthesize(synth: EspeakSynth, rng: np.random.Generator, voices: list[str],
               words: tuple[str, ...]) -> Synthesis:
    voice = voices[int(rng.integers(len(voices)))]
    return synth.synthesize(make_text(rng, words), voice=voice,
                            rate_wpm=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                            pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)))


def _colored_noise(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    white = rng.standard_normal(n)
    exponent = float(rng.choice([0.0, 0.5, 1.0, 2.0]))  # white, pink, 1/f, brown
    if exponent == 0.0:
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    shaped: npt.NDArray[np.float64] = np.fft.irfft(spectrum / f ** (exponent / 2), n)
    return shaped


def _impulse_response(rng: np.random.Generator, rate: int) -> npt.NDArray[np.float64]:
    """A synthetic room: direct path, then exponentially decaying noise (RT60 0.1-0.7 s)."""
    rt60 = float(rng.uniform(0.1, 0.7))
    n = int(rate * rt60)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    predelay = int(rate * rng.uniform(0.002, 0.02))
    ir = np.zeros(n + predelay)
    ir[0] = 1.0
    ir[predelay:] += tail * float(rng.uniform(0.05, 0.4))
    return ir


# Probabilities of each degradation: about a quarter of examples stay nearly clean, because
# an integrator's TTS (the main client) is clean, and a small net learns faster from them.
P_REVERB: Final = 0.25
P_NOISE: Final = 0.6
P_CLIP: Final = 0.1


def degrade(audio: npt.NDArray[np.float64], rng: np.random.Generator,
            clean: bool = False) -> npt.NDArray[np.float32]:
    """22.05 kHz float speech -> 16 kHz float32 as a microphone, line or codec might give it
    (`clean`: only the resampling and int16 rounding, as a TTS voice arrives)."""
    x = audio
    if clean:
        g = math.gcd(ac.SAMPLE_RATE, ESPEAK_RATE)
        x = signal.resample_poly(x, ac.SAMPLE_RATE // g, ESPEAK_RATE // g)
        x = x + rng.standard_normal(len(x)) * 3.0 / 32768
        pcm = np.clip(np.round(x * 32767), -32768, 32767)
        out: npt.NDArray[np.float32] = (pcm / 32768.0).astype(np.float32)
        return out
    if rng.random() < P_REVERB:
        x = signal.fftconvolve(x, _impulse_response(rng, ESPEAK_RATE))[:len(x)]
    trip = int(rng.choice(TRIP_RATES))
    g = math.gcd(trip, ESPEAK_RATE)
    x = signal.resample_poly(x, trip // g, ESPEAK_RATE // g)
    g = math.gcd(ac.SAMPLE_RATE, trip)
    x = signal.resample_poly(x, ac.SAMPLE_RATE // g, trip // g)
    power = float(np.mean(x ** 2)) + 1e-12
    if rng.random() < P_NOISE:
        noise = _colored_noise(rng, len(x))
        snr = float(rng.uniform(*SNR_DB))
        x = x + noise * math.sqrt(power / (np.mean(noise ** 2) + 1e-12) / 10 ** (snr / 10))
    peak = float(np.max(np.abs(x))) + 1e-9
    x = x / peak * 10 ** (float(rng.uniform(-35, 0)) / 20)
    if rng.random() < P_CLIP:
        x = np.clip(x * 10 ** (float(rng.uniform(3, 20)) / 20), -1.0, 1.0)
    # What the stage actually gets: int16, with its rounding (and a little dither on silence).
    x = x + rng.standard_normal(len(x)) * float(rng.uniform(0.0, 3.0)) / 32768
    pcm = np.clip(np.round(x * 32767), -32768, 32767)
    out = (pcm / 32768.0).astype(np.float32)
    return out


@dataclass
class Example:
    mel: npt.NDArray[np.float32]  # (T, N_MELS), unpadded
    labels: npt.NDArray[np.int64]  # (T,) inventory indices
    sequence: list[int]  # phoneme indices, repeats collapsed (CTC target)


def frame_labels(syn: Synthesis, lead: int, n: int) -> npt.NDArray[np.int64]:
    """Each 10 ms frame's label: the phoneme covering its centre (lead = samples of silence
    added in front, at 22.05 kHz)."""
    frames = ac.n_frames(n)
    centres = (np.arange(frames) * ac.HOP + ac.HOP // 2) * (ESPEAK_RATE / ac.SAMPLE_RATE) - lead
    starts = np.array([p.start_sample for p in syn.phonemes])
    symbols = np.array([ac.INDEX[ac.to_inventory(p.symbol)] for p in syn.phonemes])
    which = np.clip(np.searchsorted(starts, centres, side="right") - 1, 0, len(starts) - 1)
    labels = symbols[which]
    labels[(centres < 0) | (centres >= syn.phonemes[-1].end_sample)] = ac.INDEX[ac.PAUSE]
    return labels.astype(np.int64)


def make_example(synth: EspeakSynth, rng: np.random.Generator, voices: list[str],
                 words: tuple[str, ...], clean: bool = False) -> Example:
    syn = synthesize(synth, rng, voices, words)
    lead = int(rng.uniform(0, MAX_LEAD_S) * ESPEAK_RATE)
    tail = int(rng.uniform(0, 0.2) * ESPEAK_RATE)
    audio = np.concatenate([np.zeros(lead), syn.pcm / 32768.0, np.zeros(tail)])
    x = degrade(audio, rng, clean)
    labels = frame_labels(syn, lead, len(x))
    mel = ac.features(x)
    sequence = [int(s) for i, s in enumerate(labels) if i == 0 or s != labels[i - 1]]
    return Example(mel, labels, sequence)


def collate(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    longest = max(len(e.labels) for e in batch)
    width = ac.LEFT_FRAMES + longest + ac.LOOKAHEAD_FRAMES
    mel = np.full((len(batch), width, ac.N_MELS), ac.PAD_VALUE, dtype=np.float32)
    labels = np.full((len(batch), longest), -100, dtype=np.int64)
    for i, e in enumerate(batch):
        mel[i, ac.LEFT_FRAMES:ac.LEFT_FRAMES + len(e.labels)] = e.mel
        labels[i, :len(e.labels)] = e.labels
    targets = torch.tensor([s + 1 for e in batch for s in e.sequence], dtype=torch.long)
    return (torch.from_numpy(mel), torch.from_numpy(labels),
            torch.tensor([len(e.labels) for e in batch]), targets,
            torch.tensor([len(e.sequence) for e in batch]))


CTC_WEIGHT: Final = 0.3  # the frame loss sets the timing; CTC only helps identity
LABEL_SMOOTHING: Final = 0.05  # boundaries frames are ambiguous by up to half a frame


def losses(model: ac.AlignNet, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    mel, labels, lengths, targets, target_lengths = batch
    frame_logits, ctc_logits, _ = model(mel)
    ce = torch.nn.functional.cross_entropy(frame_logits.reshape(-1, frame_logits.shape[-1]),
                                           labels.reshape(-1), ignore_index=-100,
                                           label_smoothing=LABEL_SMOOTHING)
    logp = torch.log_softmax(ctc_logits, dim=-1).transpose(0, 1)
    ctc = torch.nn.functional.ctc_loss(logp, targets, lengths, target_lengths,
                                       zero_infinity=True)
    mask = labels != -100
    accuracy = float((frame_logits.argmax(-1)[mask] == labels[mask]).float().mean())
    return ce, ctc, accuracy


def train(steps: int, out: Path, seed: int, batch_size: int, minutes: float,
          init: Path | None = None, peak_lr: float = 3e-3, log_every: int = 50) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    synth = EspeakSynth()
    synth.start()
    from processors import espeak
    assert espeak._engine is not None
    voices = training_voices(espeak._engine.variants)
    held_rng = np.random.default_rng(10_000 + seed)
    # Progress is watched on clean held-out speech: what the benchmark scores.
    held = collate([make_example(synth, held_rng, list(EVAL_VOICES), HELD_OUT_WORDS, clean=True)
                    for _ in range(min(16, 2 * batch_size))])
    model = ac.AlignNet()
    if init is not None:
        model, _ = ac.load_checkpoint(init)
    else:
        sample = np.concatenate([make_example(synth, rng, voices, TRAIN_WORDS).mel
                                 for _ in range(min(24, 4 * batch_size))])
        model.mel_mean.copy_(torch.from_numpy(sample.mean(axis=0)))
        model.mel_std.copy_(torch.from_numpy(sample.std(axis=0) + 1e-3))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=1e-2)
    t0 = time.monotonic()
    warmup = max(1, min(100, steps // 10))
    print(f"voices={len(voices)} params={sum(p.numel() for p in model.parameters())}", flush=True)
    step = 0
    for step in range(1, steps + 1):
        elapsed = (time.monotonic() - t0) / 60
        progress = max(step / steps, elapsed / minutes if minutes > 0 else 0.0)
        if progress >= 1.0 and step > 1:
            break
        lr = peak_lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate([make_example(synth, rng, voices, TRAIN_WORDS) for _ in range(batch_size)])
        ce, ctc, acc = losses(model, batch)
        loss = ce + CTC_WEIGHT * ctc
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step % log_every == 0 or step == 1:
            model.eval()
            with torch.no_grad():
                h_ce, h_ctc, h_acc = losses(model, held)
            model.train()
            print(f"step {step} {elapsed:.1f}min lr {lr:.2e} ce {ce.item():.3f} ctc {ctc.item():.3f} "
                  f"acc {acc:.3f} | held ce {float(h_ce):.3f} ctc {float(h_ctc):.3f} acc {h_acc:.3f}",
                  flush=True)
        if step % (log_every * 10) == 0:
            model.eval()
            ac.save_checkpoint(model, out, {"steps": step, "seed": seed})
            model.train()
    model.eval()
    ac.save_checkpoint(model, out, {"steps": step, "seed": seed,
                                    "minutes": round((time.monotonic() - t0) / 60, 1)})
    print(f"saved {out} after {step} steps, {(time.monotonic() - t0) / 60:.1f} min", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=0.0, help="stop (and anneal) by this wall time")
    ap.add_argument("--out", type=Path, default=ac.DEFAULT_CHECKPOINT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint")
    args = ap.parse_args()
    train(args.steps, args.out, args.seed, args.batch, args.minutes, args.init, args.lr,
          log_every=1 if args.steps < 50 else 50)


if __name__ == "__main__":
    main()
