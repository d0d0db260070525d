"""Neural motion for the animate stage: phoneme spans -> ARKit weights + head pose, chunk by chunk.

The animate stage calls NeuralMotion.generate per motion record (40-80 ms) and keeps the
returned JSON context in its per-session state, so the next chunk continues without a seam.

Layers, in order: the network (processors/models/motion_model.py) samples articulation,
expression and head motion over the idle face (procedural breathing, gaze, sway); a
constraint layer seals the lips on p/b/m (and tucks them on f/v) whatever the network made;
a two-pole low-pass smooths the latents; blinks are layered procedurally (deterministic from
seed and time: a human blink rate needs seconds of memory, which 40-80 ms chunks with a
short context cannot carry).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Final, Sequence

import numpy as np
import numpy.typing as npt
import torch

from backbone.blendshapes import BLENDSHAPES, HEAD_POSE, INDEX
from processors import visemes
from processors.models.motion_model import (
    EMOTION_NAMES, HEAD_SCALE, LOOKAHEAD_S, LOOKBEHIND_S, MotionModel, clean_spans, emotion_weights,
    frame_features, idle_latent, load_checkpoint, noise_generator, traced_sampler)
from processors.motion_procedural import blink_curve, enforce_critical, viseme_track

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

DEFAULT_CHECKPOINT: Final = Path(__file__).with_name("models") / "motion.pt"
CHECKPOINT_ENV: Final = "AVATAR_MOTION_CHECKPOINT"
CONTEXT_FORMAT: Final = 1
# One network pass covers at most 80 ms (the stage's record length); a longer request is
# generated as consecutive 80 ms passes, exactly as if the stage had asked chunk by chunk.
PASS_S: Final = 0.08
# Latent smoothing: two cascaded one-pole low-passes (critically damped) on the network's
# residual. Two poles keep velocity continuous, so they cut frame-to-frame acceleration
# (jitter) far more than one pole of the same lag. The mouth needs timing: 2 x 16 ms leaves
# it ~20 ms behind the phonemes (benchmark: jaw_lag_ms, press_lag_ms; the lip-sync budget
# is 30 ms) and about as smooth as the procedural model, which anticipates by 140 ms where
# this one may see 40 ms. Expression, gaze residual and head need no timing: smoothed
# harder. At 25 fps (40 ms frames) both act less.
SMOOTH_TAU_S: Final = 0.016
EXPRESSION_TAU_S: Final = 0.06
# Emotion changes approach the new mixture exponentially: 95 % after 3 tau = 300 ms.
EMOTION_TAU_S: Final = 0.1
# Lip constraint (why: the network's closure is learned, so it is near but not always at
# the sealed shape; benchmark: bilabial_closure_unconstrained). Applied before the smoothing
# so its ramps are rounded too. The closing ramp equals the lookahead, so a frame only
# ramps towards a bilabial it is allowed to see.
CLOSE_RAMP_S: Final = LOOKAHEAD_S
MAX_HALF_FRAME_S: Final = 0.02  # a hold widens to half a frame so one frame always lands in it
# per latent dimension: the mouth (all jaw/mouth/tongue shapes) fast, the rest slow
_SMOOTH_TAU: Final = np.array(
    [SMOOTH_TAU_S if name.startswith(("jaw", "mouth", "tongue")) else EXPRESSION_TAU_S
     for name in BLENDSHAPES] + [EXPRESSION_TAU_S] * len(HEAD_POSE))
IDLE_BLOCK_FRAMES: Final = 64  # idle face computed 0.64-2.6 s at a time
IDLE_CACHE_BLOCKS: Final = 256  # ~14 KB each: a few MB for many sessions at once
HEAD_LIMIT_RAD: Final = 0.5  # a safety clamp: no sampled head pose may exceed ~30 degrees


class NeuralMotion:
    """Runtime wrapper: deterministic chunked sampling with a JSON context between calls."""

    def __init__(self, checkpoint: Path | None = None, *, constrain_lips: bool = True) -> None:
        self._path = checkpoint
        self._model: MotionModel | None = None
        self._samplers: dict[int, Callable[..., torch.Tensor]] = {}
        self._idle_cache: OrderedDict[tuple[int, float, int, int], tuple[F32, F32]] = OrderedDict()
        self.constrain_lips = constrain_lips
        self.model_version = "motion-ddim-unloaded"
        self.lookahead_s: float = LOOKAHEAD_S

    def start(self) -> None:
        path = self._path or Path(os.environ.get(CHECKPOINT_ENV, "") or DEFAULT_CHECKPOINT)
        # Bit-identical replays need the same reduction order on every run: one thread.
        torch.set_num_threads(1)
        self._model = load_checkpoint(path)
        self.model_version = self._model.version
        self._samplers = {}

    @property
    def model(self) -> MotionModel:
        if self._model is None:
            raise RuntimeError("NeuralMotion.start() has not been called")
        return self._model

    def generate(self, spans: Sequence[tuple[str, int, int]], sample_rate: int, fps: float,
                 first_frame: int, n: int, *, seed: int, emotion: str, intensity: float,
                 context: dict[str, Any] | None) -> tuple[F32, F32, dict[str, Any]]:
        """weights (n, 52) float32 in [0, 1], head (n, 3) float32 radians, new JSON context.

        Frame k is at k / fps on the spans' sample clock. Spans may be empty (idle), contain
        unknown symbols, gaps, overlaps, backwards or NaN entries (dropped); only spans that
        start before the last frame + lookahead_s are used, so output never depends on
        phonemes beyond the lookahead.
        """
        if sample_rate <= 0 or not fps > 0 or not math.isfinite(fps):
            raise ValueError(f"sample_rate and fps must be positive, got {sample_rate} and {fps}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if emotion not in EMOTION_NAMES:
            raise ValueError(f"unknown emotion {emotion!r}; one of {list(EMOTION_NAMES)}")
        intensity = min(max(float(intensity), 0.0), 1.0) if math.isfinite(intensity) else 0.0
        state = self._restore(context, fps, first_frame)
        target_mix = emotion_weights(emotion, intensity).astype(np.float64)
        good = clean_spans(spans)
        per_pass = max(1, min(self.model.cfg.max_chunk_frames, round(PASS_S * fps)))
        weights = np.zeros((n, len(BLENDSHAPES)), np.float32)
        head = np.zeros((n, len(HEAD_POSE)), np.float32)
        for a in range(0, n, per_pass):
            b = min(a + per_pass, n)
            w, h = self._pass(good, sample_rate, fps, first_frame + a, b - a, seed, target_mix, state)
            weights[a:b], head[a:b] = w, h
        return weights, head, self._save(state, fps, first_frame + n)

    # -- one network pass ------------------------------------------------------------------

    def _pass(self, spans: list[tuple[str, int, int]], sr: int, fps: float, first: int, n: int,
              seed: int, target_mix: F64, state: dict[str, Any]) -> tuple[F32, F32]:
        model = self.model
        cfg = model.cfg
        k = cfg.context_frames
        t_last = (first + n - 1) / fps
        horizon = (t_last + LOOKAHEAD_S) * sr
        past = ((first - k) / fps - LOOKBEHIND_S - 0.5) * sr
        visible = [s for s in spans if s[1] <= horizon and s[2] >= past]
        feats = frame_features(visible, sr, fps, first - k, k + n)
        t = np.arange(first, first + n, dtype=np.int64).astype(np.float64) / fps
        blink: F64
        if cfg.idle_base:
            idle, blink32 = self._idle(sr, fps, first, n, seed)
            blink = blink32.astype(np.float64)
        else:
            idle, blink = np.zeros((n, cfg.latent_dim), np.float32), blink_curve(t, seed, fps)
        # emotion: each frame moves a fixed share of the way to the target mixture
        decay = math.exp(-1.0 / (fps * EMOTION_TAU_S))
        mix = np.zeros((n, len(EMOTION_NAMES)), np.float64)
        current: F64 = state["emotion"]
        for i in range(n):
            current = target_mix + (current - target_mix) * decay
            mix[i] = current
        state["emotion"] = current
        ctx: F32 = state["latents"]
        valid: F32 = state["valid"]
        noise = torch.randn((1, n, cfg.latent_dim), generator=noise_generator(seed, first))
        sampler = self._samplers.get(n)
        if sampler is None:
            # traced on first use of a chunk length (~0.1-0.3 s); a session uses one or two
            sampler = self._samplers[n] = traced_sampler(model.net, n)
        with torch.inference_mode():
            x0 = sampler(
                torch.from_numpy(feats[None]), torch.from_numpy(idle[None]),
                torch.from_numpy(mix[None].astype(np.float32)),
                torch.from_numpy(ctx[None]), torch.from_numpy(valid[None]), noise)[0].numpy()
        mean, std = model.mean.numpy(), model.std.numpy()
        residual = (x0 * std + mean).astype(np.float64)
        nb = len(BLENDSHAPES)
        if self.constrain_lips:
            # before the smoothing, so the filter rounds the closure's ramps (the holds
            # are long enough for the smoothed lips to seal: the p/b/m tests check it)
            raw = idle[:, :nb].astype(np.float64) + residual[:, :nb]
            enforce_lip_closures(raw, t, visible, sr, fps)
            residual[:, :nb] = raw - idle[:, :nb]
        # latent smoothing, continuing from the previous chunk's filter state
        alpha = 1.0 - np.exp(-1.0 / (fps * _SMOOTH_TAU))
        if valid[-1] > 0:
            inner: F64 = state["filter"]
            outer = ctx[-1].astype(np.float64) * std + mean
        else:
            inner, outer = residual[0].copy(), residual[0].copy()
        for i in range(n):
            inner = inner + alpha * (residual[i] - inner)
            outer = outer + alpha * (inner - outer)
            residual[i] = outer
        state["filter"] = inner
        normalised = ((residual - mean) / std).astype(np.float32)
        state["latents"] = np.concatenate([ctx, normalised])[-k:]
        state["valid"] = np.concatenate([valid, np.ones(n, np.float32)])[-k:]

        latent = idle.astype(np.float64) + residual
        weights = latent[:, :len(BLENDSHAPES)]
        head = np.clip(latent[:, len(BLENDSHAPES):] / HEAD_SCALE, -HEAD_LIMIT_RAD, HEAD_LIMIT_RAD)
        for side in ("Left", "Right"):
            col = INDEX[f"eyeBlink{side}"]
            weights[:, col] = np.maximum(weights[:, col], blink)
            weights[:, INDEX[f"eyeWide{side}"]] *= 1.0 - blink
        np.clip(weights, 0.0, 1.0, out=weights)
        return weights.astype(np.float32), head.astype(np.float32)

    def _idle(self, sr: int, fps: float, first: int, n: int, seed: int) -> tuple[F32, F32]:
        """The idle face for frames [first, first + n), computed a block of frames at a time.

        The procedural idle face is a pure function of (seed, frame), the same bits in any
        chunking, so a cached block gives exactly what a per-chunk call would, for a
        fraction of the cost (it is a fifth of a 2-frame chunk's time otherwise).
        """
        parts, blinks = [], []
        frame = first
        while frame < first + n:
            block = frame // IDLE_BLOCK_FRAMES
            key = (seed, fps, sr, block)
            cached = self._idle_cache.get(key)
            if cached is None:
                cached = idle_latent(sr, fps, block * IDLE_BLOCK_FRAMES, IDLE_BLOCK_FRAMES, seed)
                self._idle_cache[key] = cached
                if len(self._idle_cache) > IDLE_CACHE_BLOCKS:
                    self._idle_cache.popitem(last=False)
            else:
                self._idle_cache.move_to_end(key)
            a = frame - block * IDLE_BLOCK_FRAMES
            b = min(IDLE_BLOCK_FRAMES, first + n - block * IDLE_BLOCK_FRAMES)
            parts.append(cached[0][a:b])
            blinks.append(cached[1][a:b])
            frame = (block + 1) * IDLE_BLOCK_FRAMES
        return np.concatenate(parts), np.concatenate(blinks)

    # -- context -----------------------------------------------------------------------------

    def _restore(self, context: dict[str, Any] | None, fps: float, first_frame: int) -> dict[str, Any]:
        """The previous chunk's state, or a fresh one. Context from another frame rate, another
        model or a non-adjacent frame range keeps only its emotion (a smooth blend still)."""
        cfg = self.model.cfg
        k, dim = cfg.context_frames, cfg.latent_dim
        state: dict[str, Any] = {
            "latents": np.zeros((k, dim), np.float32), "valid": np.zeros(k, np.float32),
            "emotion": emotion_weights("neutral", 0.0).astype(np.float64),
            "filter": np.zeros(dim, np.float64)}
        if not context:
            return state
        try:
            mix = np.asarray(context["emotion"], dtype=np.float64)
            if mix.shape == (len(EMOTION_NAMES),) and np.all(np.isfinite(mix)):
                state["emotion"] = mix
            if (context.get("format") == CONTEXT_FORMAT and context.get("model") == self.model_version
                    and float(context["fps"]) == fps and int(context["next_frame"]) == first_frame):
                latents = np.asarray(context["latents"], dtype=np.float32).reshape(k, dim)
                valid = np.asarray(context["valid"], dtype=np.float32).reshape(k)
                inner = np.asarray(context["filter"], dtype=np.float64).reshape(dim)
                if np.all(np.isfinite(latents)) and np.all(np.isfinite(inner)):
                    state["latents"], state["valid"], state["filter"] = latents, valid, inner
        except (KeyError, TypeError, ValueError):
            pass  # an unreadable context is a fresh start, never a crash
        return state

    def _save(self, state: dict[str, Any], fps: float, next_frame: int) -> dict[str, Any]:
        # Python floats of float32/float64 values survive a JSON round trip exactly.
        return {"format": CONTEXT_FORMAT, "model": self.model_version, "fps": float(fps),
                "next_frame": int(next_frame),
                "latents": [float(x) for x in state["latents"].ravel()],
                "valid": [float(x) for x in state["valid"]],
                "filter": [float(x) for x in state["filter"]],
                "emotion": [float(x) for x in state["emotion"]]}


def enforce_lip_closures(weights: F64, t: F64, spans: Sequence[tuple[str, int, int]],
                         sample_rate: int, fps: float) -> None:
    """Blend the lip/jaw columns towards the sealed (p/b/m) or tucked (f/v) shape in place.

    The documented constraint layer on top of the network: the procedural model's, held
    from the span's start to its burst, ramped in over no more than the model's lookahead.
    """
    enforce_critical(weights, t, viseme_track(spans, sample_rate), fps,
                     close_ramp_s=CLOSE_RAMP_S, max_half_frame_s=MAX_HALF_FRAME_S)
