"""Trains the neural motion model (motion_model.py) and writes its checkpoint.

Data: generated sentences spoken by eSpeak NG (real phoneme timings, varied voices and rates)
with idle stretches between utterances, turned into targets by the procedural articulation
model plus stochastic natural variation; or, with --livelink DIR, Live Link Face captures.

    python -m processors.models.train_motion --steps 30000 --out processors/models/motion.pt

The shipped checkpoint is that command (seed 0, 300 clips of 14 s, ~250k frames): 22 min on
one shared core. eSpeak NG is not bit-reproducible, so a rerun gives close, not equal, weights.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch

from backbone.blendshapes import BLENDSHAPES, INDEX
from processors import motion_procedural as procedural
from processors.models.motion_model import (
    BLINK_COLUMNS, EMOTION_NAMES, HEAD_SCALE, LATENT_DIM, LOOKAHEAD_S, WIDE_COLUMNS, MotionConfig, MotionNet,
    alpha_bar, frame_features, idle_latent, save_checkpoint)
from processors.motion_procedural import EMOTIONS

F32 = npt.NDArray[np.float32]
SAMPLE_RATE: Final = 22050  # eSpeak NG's output rate: the spans' clock
# Frame rates sessions use, weighted towards the two the product talks about (25 and 100).
FPS_CHOICES: Final = (25.0, 30.0, 50.0, 60.0, 100.0)
FPS_WEIGHTS: Final = (0.3, 0.1, 0.15, 0.1, 0.35)
VOICES: Final = ("en-us", "en-gb", "en-us-nyc", "en-029", "en-gb-scotland", "en-gb-x-rp")
RATE_WPM: Final = (130, 260)
CLIP_S: Final = 14.0
IDLE_GAP_S: Final = (0.2, 4.0)  # silence between utterances: listening / thinking
IDLE_CLIP_P: Final = 0.1  # some clips are silence only: the idle face must be learned too
EMOTION_SEGMENT_S: Final = (2.0, 7.0)  # an emotion holds for a while, then changes
EMOTION_RAMP_S: Final = (0.15, 0.5)
# Natural variation on top of the procedural teacher (what the diffusion learns to sample).
MICRO_RATE_PER_S: Final = 0.3  # brief involuntary expressions, ~one every 3 s
MICRO_DURATION_S: Final = (0.25, 1.0)
MICRO_AMPLITUDE: Final = (0.05, 0.25)
MICRO_EXPRESSIONS: Final = (
    {"browInnerUp": 1.0}, {"browOuterUpLeft": 1.0, "browOuterUpRight": 0.8},
    {"browDownLeft": 0.8, "browDownRight": 0.8}, {"mouthSmileLeft": 1.0, "cheekSquintLeft": 0.5},
    {"mouthSmileRight": 1.0, "cheekSquintRight": 0.5}, {"noseSneerLeft": 0.7, "noseSneerRight": 0.7},
    {"mouthPressLeft": 0.6, "mouthPressRight": 0.6}, {"eyeSquintLeft": 0.7, "eyeSquintRight": 0.7},
    {"mouthDimpleLeft": 0.8, "mouthDimpleRight": 0.8}, {"mouthShrugLower": 0.8, "mouthFrownLeft": 0.3,
                                                         "mouthFrownRight": 0.3},
)
HEAD_VARIATION_RAD: Final = 0.012  # an extra drift beyond the procedural sway
HEAD_VARIATION_KNOT_S: Final = 0.8
CONTEXT_NOISE: Final = 0.1
FRESH_SESSION_P: Final = 0.15  # windows trained with no context at all (a session's start)
SMOOTHNESS_WEIGHT: Final = 1.0  # against the x0 loss; higher trades accuracy for smoothness  # the model's own past is never exact: train it to cope

# A small English vocabulary, rich in bilabials and rounded vowels; sentences are drawn from
# templates so the phoneme statistics are those of running speech.
SUBJECTS: Final = ("I", "you", "we", "they", "my brother", "the people", "Mary", "Bob", "our team",
                   "the manager", "my mother", "the baby", "Paul", "a woman", "the police")
VERBS: Final = ("bought", "booked", "made", "moved", "opened", "played", "pushed", "missed",
                "found", "wanted", "brought", "painted", "mapped", "borrowed", "remembered",
                "picked", "watched", "shipped", "could see", "will build", "might buy", "loved")
OBJECTS: Final = ("a map", "the bike", "some bread", "my phone", "a blue umbrella", "the purple box",
                  "two tickets", "the money", "a puppy", "the old piano", "fresh apples",
                  "a boat", "the menu", "some paper", "the football", "my shoes", "the window")
PLACES: Final = ("in Boston", "at the market", "by the pool", "on Monday", "before breakfast",
                 "near the bridge", "in the morning", "at home", "over there", "after lunch",
                 "in the park", "at the museum", "this summer", "every week")
OPENERS: Final = ("Well,", "So,", "Hmm,", "Oh,", "Maybe", "Perhaps", "By the way,", "Look,",
                  "Honestly,", "Okay,", "")
QUESTIONS: Final = ("What time is it?", "Why would you do that?", "How about a movie?",
                    "Could you pass the pepper?", "Are you happy?", "Who brought the balloons?",
                    "Do you remember me?", "Where is the bathroom?", "Is it possible?")
EXTRAS: Final = ("Thank you very much.", "Please be patient.", "Peter piped a simple tune.",
                 "Bubbles popped by the bay.", "My mom makes marvellous muffins.",
                 "Good morning, how may I help you?", "That is absolutely wonderful!",
                 "Numbers: one, two, three, four, five.", "The weather is beautiful today.",
                 "Unbelievable!", "I'm sorry to hear that.", "Maybe, maybe not.")


def sentence(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.15:
        return str(rng.choice(QUESTIONS))
    if kind < 0.3:
        return str(rng.choice(EXTRAS))
    words = [str(rng.choice(OPENERS)), str(rng.choice(SUBJECTS)), str(rng.choice(VERBS)),
             str(rng.choice(OBJECTS))]
    if rng.random() < 0.6:
        words.append(str(rng.choice(PLACES)))
    if rng.random() < 0.3:
        words += ["and", str(rng.choice(VERBS)), str(rng.choice(OBJECTS))]
    text = " ".join(w for w in words if w)
    return text[0].upper() + text[1:] + str(rng.choice([".", ".", "!", "?"]))


@dataclass
class Clip:
    """One stretch of session: model inputs and targets, frame-aligned."""

    features: F32  # (T, FEATURE_DIM)
    idle: F32  # (T, L) model input (zeros when the source has no idle base)
    residual: F32  # (T, L) target latent minus the idle base
    emotion_mix: F32  # (T, 5)


def speech_timeline(synth: object, rng: np.random.Generator, seconds: float) -> list[tuple[str, int, int]]:
    """Utterances with idle gaps, on one sample clock."""
    from processors.espeak import EspeakSynth

    assert isinstance(synth, EspeakSynth)
    spans: list[tuple[str, int, int]] = []
    if rng.random() < IDLE_CLIP_P:
        return spans
    t = float(rng.uniform(0.0, 2.0))
    while t < seconds:
        voice = str(rng.choice(VOICES))
        rate = int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1))
        syn = synth.synthesize(sentence(rng), voice=voice, rate_wpm=rate)
        offset = int(t * SAMPLE_RATE)
        for p in syn.phonemes:
            spans.append((p.symbol, p.start_sample + offset, p.end_sample + offset))
        t += syn.duration_s + float(rng.uniform(*IDLE_GAP_S))
    return spans


def emotion_schedule(rng: np.random.Generator, n: int, fps: float) -> F32:
    """(n, 5) mixture weights: held emotions at random intensities, ramped between."""
    out = np.zeros((n, len(EMOTION_NAMES)), dtype=np.float32)
    t = np.arange(n) / fps
    current = np.zeros(len(EMOTION_NAMES), dtype=np.float64)
    current[0] = 1.0
    start = 0.0
    while n and start <= t[-1]:
        target = np.zeros(len(EMOTION_NAMES))
        k = int(rng.integers(len(EMOTION_NAMES)))
        intensity = float(rng.uniform(0.0, 1.0)) if k else 0.0
        target[0] = 1.0 - intensity
        target[k] += intensity
        ramp = float(rng.uniform(*EMOTION_RAMP_S))
        hold = float(rng.uniform(*EMOTION_SEGMENT_S))
        sel = (t >= start) & (t < start + hold)
        u = np.clip((t[sel] - start) / ramp, 0.0, 1.0)[:, None]
        out[sel] = (current[None, :] * (1.0 - u) + target[None, :] * u).astype(np.float32)
        current = target
        start += hold
    return out


@contextmanager
def retimed_teacher() -> Iterator[None]:
    """The procedural teacher, anticipating no further than the model may look ahead.

    The procedural model shapes the mouth up to 140 ms before a sound; the model sees 40 ms.
    Trained on the original, the network learns that any silence may be 100 ms before
    unseen speech and its diffusion samples phantom mouth openings in idle stretches (seen:
    the jaw drifting to 0.3-0.5 over two minutes of silence). Targets must be a function of
    what the model can see plus genuine variation, so the anticipations are shortened here.
    """
    names = ("ANTICIPATION_S", "CLOSE_RAMP_S", "NOD_HALF_WIDTH_S")
    saved = {name: getattr(procedural, name) for name in names}
    # setattr: these are the module's Final constants, swapped only while targets are made
    setattr(procedural, "ANTICIPATION_S", LOOKAHEAD_S)
    setattr(procedural, "CLOSE_RAMP_S", LOOKAHEAD_S)
    # the emphasis nod is centred NOD_DELAY_S after a vowel's onset: begin it 40 ms before
    setattr(procedural, "NOD_HALF_WIDTH_S", procedural.NOD_DELAY_S + LOOKAHEAD_S)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(procedural, name, value)


def teacher(spans: Sequence[tuple[str, int, int]], fps: float, n: int, seed: int,
            mix: F32) -> F32:
    """Procedural target latents (n, L) under a per-frame emotion mixture, without blinks.

    The procedural model adds an emotion linearly (before clipping), so the mix of its
    full-intensity outputs is the target of the mixed emotion.
    """
    with retimed_teacher():
        return _teacher(spans, fps, n, seed, mix)


def _teacher(spans: Sequence[tuple[str, int, int]], fps: float, n: int, seed: int,
             mix: F32) -> F32:
    total = np.zeros((n, LATENT_DIM), dtype=np.float64)
    for k, name in enumerate(EMOTION_NAMES):
        if not mix[:, k].any():
            continue
        w, h = procedural.procedural_motion(spans, SAMPLE_RATE, fps, 0, n, seed=seed, emotion=name,
                                 intensity=1.0 if k else 0.0)
        w = w.astype(np.float64)
        # Blinks are layered at run time: keep only the emotion's own lid offsets.
        offsets = EMOTIONS[name] if k else {}
        for col in BLINK_COLUMNS + WIDE_COLUMNS:
            w[:, col] = offsets.get(BLENDSHAPES[col], 0.0)
        total += mix[:, k:k + 1] * np.concatenate([w, h * HEAD_SCALE], axis=1)
    return total.astype(np.float32)


def natural_variation(rng: np.random.Generator, n: int, fps: float) -> F32:
    """Micro-expressions and extra head drift: what the procedural model lacks."""
    out = np.zeros((n, LATENT_DIM), dtype=np.float32)
    t = np.arange(n) / fps
    dur_s = n / fps
    for _ in range(int(rng.poisson(MICRO_RATE_PER_S * dur_s))):
        centre = float(rng.uniform(0.0, dur_s))
        half = 0.5 * float(rng.uniform(*MICRO_DURATION_S))
        amp = float(rng.uniform(*MICRO_AMPLITUDE))
        shape = MICRO_EXPRESSIONS[int(rng.integers(len(MICRO_EXPRESSIONS)))]
        u = np.clip(np.abs(t - centre) / half, 0.0, 1.0)
        bump = (1.0 - u * u) ** 2
        for name, w in shape.items():
            out[:, INDEX[name]] += (amp * w * bump).astype(np.float32)
    knots_t = np.arange(-1, dur_s / HEAD_VARIATION_KNOT_S + 2) * HEAD_VARIATION_KNOT_S
    for axis in range(3):
        knots = rng.uniform(-1.0, 1.0, len(knots_t)) * HEAD_VARIATION_RAD * HEAD_SCALE
        # cosine interpolation: smooth (zero slope at each knot) and cheap
        x = (t - knots_t[0]) / HEAD_VARIATION_KNOT_S
        i = np.floor(x).astype(int)
        f = (1 - np.cos(np.pi * (x - i))) / 2
        out[:, len(BLENDSHAPES) + axis] = (knots[i] * (1 - f) + knots[i + 1] * f).astype(np.float32)
    return out


def procedural_clip(synth: object, rng: np.random.Generator) -> Clip:
    fps = float(rng.choice(FPS_CHOICES, p=FPS_WEIGHTS))
    seed = int(rng.integers(0, 2**31))
    spans = speech_timeline(synth, rng, CLIP_S)
    n = int(CLIP_S * fps)
    mix = emotion_schedule(rng, n, fps)
    target = teacher(spans, fps, n, seed, mix) + natural_variation(rng, n, fps)
    target[:, :len(BLENDSHAPES)] = np.clip(target[:, :len(BLENDSHAPES)], 0.0, 1.0)
    idle, _ = idle_latent(SAMPLE_RATE, fps, 0, n, seed)
    return Clip(frame_features(spans, SAMPLE_RATE, fps, 0, n), idle, target - idle, mix)


def livelink_clips(directory: Path) -> list[Clip]:
    """Real capture: no idle base (the person's own gaze and sway are in the target), neutral."""
    from processors.models.livelink import load_dir

    clips = []
    for take in load_dir(directory):
        n = len(take.weights)
        target = np.concatenate([take.weights, take.head * HEAD_SCALE], axis=1).astype(np.float32)
        mix = np.zeros((n, len(EMOTION_NAMES)), dtype=np.float32)
        mix[:, 0] = 1.0
        feats = frame_features(take.spans, take.sample_rate, take.fps, 0, n)
        clips.append(Clip(feats, np.zeros_like(target), target, mix))
    return clips


class Batches:
    """Random (context, chunk) windows from all clips, one chunk length per batch."""

    def __init__(self, clips: list[Clip], cfg: MotionConfig, mean: F32, std: F32,
                 rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        self.features = np.concatenate([c.features for c in clips])
        self.idle = np.concatenate([c.idle for c in clips])
        self.residual = (np.concatenate([c.residual for c in clips]) - mean) / std
        self.mix = np.concatenate([c.emotion_mix for c in clips])
        lengths = np.array([len(c.features) for c in clips])
        self.clip_start = np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        self.clip_end = np.repeat(np.cumsum(lengths), lengths)

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        k, m = self.cfg.context_frames, self.cfg.max_chunk_frames
        n = int(self.rng.integers(1, m + 1))
        # chunk starts anywhere a whole chunk fits in its clip
        idx = self.rng.integers(0, len(self.features), size=batch * 2)
        idx = idx[idx + n <= self.clip_end[idx]][:batch]
        rel = np.arange(-k, n)
        rows = idx[:, None] + rel[None, :]
        valid = rows >= self.clip_start[idx][:, None]
        rows = np.where(valid, rows, self.clip_start[idx][:, None])
        ctx_valid = valid[:, :k].astype(np.float32)
        # a fresh session has no context at all: teach that too
        fresh = self.rng.random(len(idx)) < FRESH_SESSION_P
        ctx_valid[fresh] = 0.0
        ctx = self.residual[rows[:, :k]] + CONTEXT_NOISE * self.rng.standard_normal(
            (len(idx), k, LATENT_DIM)).astype(np.float32)
        chunk = rows[:, k:]
        feats = self.features[rows]
        # context frames' features are unknown for frames before the clip: silence
        return {
            "features": torch.from_numpy(np.where(valid[..., None], feats, self._silence(feats))),
            "idle": torch.from_numpy(self.idle[chunk]),
            "mix": torch.from_numpy(self.mix[chunk]),
            "context": torch.from_numpy(ctx * ctx_valid[..., None]),
            "context_valid": torch.from_numpy(ctx_valid),
            "target": torch.from_numpy(self.residual[chunk]),
        }

    @staticmethod
    def _silence(feats: F32) -> F32:
        from processors.models.motion_model import frame_features as ff

        sil = ff([], SAMPLE_RATE, 50.0, 0, 1)[0]
        out = np.broadcast_to(sil, feats.shape).copy()
        out[..., -1] = feats[..., -1]  # keep the frame-rate feature
        return out


def train(clips: list[Clip], steps: int, seed: int, source: str, out: Path,
          batch: int = 64, lr: float = 2e-3, log_every: int = 100,
          cfg: MotionConfig | None = None, save_every: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    cfg = cfg or MotionConfig(idle_base=source == "procedural")
    all_res = np.concatenate([c.residual for c in clips])
    mean = all_res.mean(axis=0).astype(np.float32)
    # a floor keeps never-moving dimensions from blowing up their normalised noise
    std = np.maximum(all_res.std(axis=0), 0.02).astype(np.float32)
    data = Batches(clips, cfg, mean, std, rng)
    net = MotionNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, min(200, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    t0 = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        b = data.sample(batch)
        target = b["target"]
        level = torch.rand(target.shape[0])
        ab = alpha_bar(level)[:, None, None]
        noise = torch.randn_like(target)
        noisy = ab.sqrt() * target + (1 - ab).sqrt() * noise
        cond, mem = net.condition(b["features"], b["idle"], b["mix"], b["context"], b["context_valid"])
        pred = net.denoise(noisy, level, cond, mem)
        # x0-prediction, weighted towards low noise (where the last DDIM steps land) but
        # never zero at pure noise (the first step is a plain regression on the inputs)
        weight = 1.0 + ab.squeeze(-1)
        loss = (weight * (pred - target).pow(2).mean(-1)).mean()
        # Smoothness, across the join too: the error's second difference over [the last two
        # context frames (taken as exact), the chunk]. With 40 ms of lookahead the model cannot
        # anticipate as early as its teacher; this makes it pay for catching up abruptly, so
        # its errors come out as a little lag rather than as jitter.
        err = pred - target
        joined = (b["context_valid"][:, -2:].sum(dim=1) == 2).float()[:, None, None]
        err = torch.cat([err.new_zeros(err.shape[0], 2, err.shape[2]), err], dim=1)
        d2 = err[:, 2:] - 2 * err[:, 1:-1] + err[:, :-2]
        first_two = torch.ones_like(d2)
        first_two[:, :2] = joined.expand(-1, min(2, d2.shape[1]), d2.shape[2])
        loss = loss + SMOOTHNESS_WEIGHT * (first_two * d2.pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            print(json.dumps({"step": step, "loss": running / min(log_every, step) if step % log_every == 0
                              else running / (step % log_every), "elapsed_s": round(time.perf_counter() - t0, 1)}),
                  flush=True)
            running = 0.0
        if save_every and step % save_every == 0 and step < steps:
            net.eval()
            save_checkpoint(out.with_suffix(f".step{step}.pt"), net, mean, std, source,
                            _meta(step, seed, time.perf_counter() - t0, clips, net))
            net.train()
    net.eval()
    meta = _meta(steps, seed, time.perf_counter() - t0, clips, net)
    save_checkpoint(out, net, mean, std, source, meta)
    return meta


def _meta(steps: int, seed: int, elapsed: float, clips: list[Clip], net: MotionNet) -> dict[str, float]:
    return {"steps": steps, "seed": seed, "train_seconds": round(elapsed, 1),
            "frames": int(sum(len(c.features) for c in clips)), "clips": len(clips),
            "params": int(sum(p.numel() for p in net.parameters()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("motion.pt"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=300, help="procedural clips of %g s each" % CLIP_S)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--save-every", type=int, default=0, help="also write <out>.step<N>.pt")
    p.add_argument("--livelink", type=Path, default=None,
                   help="train on Live Link Face CSV takes (+ .phonemes.tsv) in this directory")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.livelink is not None:
        clips = livelink_clips(args.livelink)
        source = "livelink"
    else:
        from processors.espeak import EspeakSynth

        synth = EspeakSynth()
        synth.start()
        rng = np.random.default_rng(args.seed)
        clips = [procedural_clip(synth, rng) for _ in range(args.clips)]
        source = "procedural"
    print(json.dumps({"data_seconds": round(time.perf_counter() - t0, 1), "clips": len(clips),
                      "frames": int(sum(len(c.features) for c in clips))}), flush=True)
    meta = train(clips, args.steps, args.seed, source, args.out, batch=args.batch, lr=args.lr,
                 save_every=args.save_every)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, **meta}), flush=True)


if __name__ == "__main__":
    main()
