"""The neural motion model: phoneme spans -> per-frame viseme features -> a small transformer ->
a few-step DDIM motion diffusion that attends to the previous chunk's frames.

processors/motion_neural.py runs it chunk by chunk for the animate stage; train_motion.py fits
it and eval_motion.py / benchmarks/motion.py measure it. Everything here is torch + numpy.

Motion latent of one frame (LATENT_DIM = 55): the 52 ARKit weights then head yaw, pitch, roll
(radians x HEAD_SCALE). The network works on the *residual* of that latent over the idle face
(procedural breathing, gaze and head sway with no speech), normalised per dimension.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Final, Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from backbone.blendshapes import BLENDSHAPES, HEAD_POSE, INDEX
from processors import visemes
from processors.motion_procedural import EMOTIONS, procedural_motion, viseme_track

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

LATENT_DIM: Final = len(BLENDSHAPES) + len(HEAD_POSE)
# Head angles are a few hundredths of a radian; scaled so they weigh like blendshape weights.
HEAD_SCALE: Final = 10.0
EMOTION_NAMES: Final[tuple[str, ...]] = ("neutral", "happy", "sad", "angry", "surprised")
assert set(EMOTION_NAMES) == set(EMOTIONS), "the model's emotions must be the procedural ones"

# Where each frame looks on the phoneme timeline, relative to its own time. The last offset
# is the model's lookahead: 40 ms keeps chunk latency (lookahead + compute) under 60 ms, so
# the mouth anticipates at most 40 ms (the procedural teacher anticipates 140 ms; the model
# learns the best guess from what it may see). The past reaches 160 ms (carry-over).
FEATURE_OFFSETS_S: Final[tuple[float, ...]] = (-0.16, -0.10, -0.06, -0.03, 0.0, 0.02, 0.04)
LOOKAHEAD_S: Final = FEATURE_OFFSETS_S[-1]
# The features of a frame need the spans that end after this far before it.
LOOKBEHIND_S: Final = -FEATURE_OFFSETS_S[0]
_PER_OFFSET: Final = len(visemes.VISEMES) + 2  # one-hot viseme, dominance, stress gain
FEATURE_DIM: Final = len(FEATURE_OFFSETS_S) * _PER_OFFSET + 1  # + log frame rate
_VISEME_ID: Final = {v: i for i, v in enumerate(visemes.VISEMES)}
_SIL: Final = _VISEME_ID["sil"]
_REFERENCE_FPS: Final = 50.0  # the frame-rate feature is log(fps / this): 0 mid-range
# Blink and its partner are layered procedurally at run time (see motion_neural.py), so the
# model's targets carry only their emotional offset.
BLINK_COLUMNS: Final = (INDEX["eyeBlinkLeft"], INDEX["eyeBlinkRight"])
WIDE_COLUMNS: Final = (INDEX["eyeWideLeft"], INDEX["eyeWideRight"])
# The two sources a checkpoint can come from; the runtime treats them the same.
SOURCES: Final = ("procedural", "livelink")


@dataclass(frozen=True)
class MotionConfig:
    """Shape of the network and its sampler; saved inside every checkpoint."""

    d_model: int = 64
    heads: int = 4
    encoder_layers: int = 1
    denoiser_layers: int = 2
    emotion_dim: int = 16
    # Frames of the previous chunk the denoiser attends to: 12 is 120 ms at 100 fps and
    # 480 ms at 25 fps, enough to carry a movement's velocity across the join.
    context_frames: int = 12
    # The most frames one pass generates: an 80 ms chunk at 100 fps.
    max_chunk_frames: int = 8
    # DDIM steps at inference (deterministic, eta = 0); the issue allows <= 10.
    sample_steps: int = 4
    feature_dim: int = FEATURE_DIM
    latent_dim: int = LATENT_DIM
    feature_offsets_s: tuple[float, ...] = FEATURE_OFFSETS_S
    # Whether the idle face (procedural breathing, gaze, sway) is an input and the base of
    # the residual. A checkpoint trained on real capture may switch it off.
    idle_base: bool = True
    emotions: tuple[str, ...] = EMOTION_NAMES
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes a trainer may attach


# ---------------------------------------------------------------------------------------
# Features: spans -> per-frame viseme sequence
# ---------------------------------------------------------------------------------------

def clean_spans(spans: Sequence[tuple[str, Any, Any]]) -> list[tuple[str, int, int]]:
    """Drop what cannot be placed on the clock (NaN, infinite, empty or backwards spans).

    Unknown symbols are kept: visemes.visemes_of maps them to a plausible class. Overlaps
    are kept too: a time covered twice takes the later-starting span.
    """
    out: list[tuple[str, int, int]] = []
    for span in spans:
        try:
            symbol, start, end = str(span[0]), float(span[1]), float(span[2])
        except (TypeError, ValueError, IndexError):
            continue
        if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
            continue
        out.append((symbol, int(start), int(end)))
    out.sort(key=lambda s: (s[1], s[2], s[0]))
    return out


def frame_features(spans: Sequence[tuple[str, int, int]], sample_rate: int, fps: float,
                   first_frame: int, n: int) -> F32:
    """(n, FEATURE_DIM): for each frame, the viseme at each FEATURE_OFFSETS_S around it.

    A pure function of each frame's time and the spans starting before its lookahead, so a
    frame's features are the same in any chunking. Times covered by no span are "sil".
    """
    t = np.arange(first_frame, first_frame + n, dtype=np.int64).astype(np.float64) / fps
    out = np.zeros((n, FEATURE_DIM), dtype=np.float32)
    out[:, -1] = math.log(fps / _REFERENCE_FPS)
    segs = viseme_track(spans, sample_rate)
    starts = np.array([s.start_s for s in segs], dtype=np.float64)
    ends = np.array([s.end_s for s in segs], dtype=np.float64)
    ids = np.array([_VISEME_ID[s.viseme] for s in segs] + [_SIL], dtype=np.intp)
    dom = np.array([s.dominance for s in segs] + [visemes.VISEME_DOMINANCE["sil"]])
    gain = np.array([s.gain if visemes.is_vowel(s.symbol) else 0.0 for s in segs] + [0.0])
    rows = np.arange(n)
    for k, offset in enumerate(FEATURE_OFFSETS_S):
        tau = t + offset
        # the latest-starting segment at or before tau, if it still covers tau
        j = np.searchsorted(starts, tau, side="right") - 1
        covered = (j >= 0) & (ends[np.maximum(j, 0)] > tau) if len(segs) else np.zeros(n, bool)
        pick = np.where(covered, j, len(segs))
        base = k * _PER_OFFSET
        out[rows, base + ids[pick]] = 1.0
        out[:, base + len(visemes.VISEMES)] = dom[pick]
        out[:, base + len(visemes.VISEMES) + 1] = gain[pick]
    return out


def idle_latent(sample_rate: int, fps: float, first_frame: int, n: int, seed: int) -> tuple[F32, F32]:
    """The idle face with no speech and no blink: breathing, gaze, head sway (n, LATENT_DIM);
    and the blink curve it had (n,), which the runtime layers back on top."""
    weights, head = procedural_motion([], sample_rate, fps, first_frame, n, seed=seed)
    blink = weights[:, BLINK_COLUMNS[0]].copy()  # neutral idle: the column is the blink itself
    weights[:, list(BLINK_COLUMNS)] = 0.0
    return np.concatenate([weights, head * HEAD_SCALE], axis=1).astype(np.float32), blink


def emotion_weights(emotion: str, intensity: float) -> F32:
    """Mixture weights over EMOTION_NAMES: neutral -> emotion by intensity."""
    w = np.zeros(len(EMOTION_NAMES), dtype=np.float32)
    w[0] = 1.0 - intensity
    w[EMOTION_NAMES.index(emotion)] += intensity
    return w


# ---------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------

def _time_embedding(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the noise level in [0, 1] (shape (B,) -> (B, dim))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(1000.0) / half))
    angle = level[:, None] * 1000.0 * freqs[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class CrossFrameBlock(nn.Module):
    """Chunk frames attend to themselves and to the previous chunk's frames (fixed memory)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.d = d
        self.norm_q = nn.LayerNorm(d)
        self.norm_ctx = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)  # one matmul per step; the context uses its k, v rows
        self.out = nn.Linear(d, d)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def memory(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the context frames: computed once per chunk, reused every step."""
        kv = F.linear(self.norm_ctx(ctx), self.qkv.weight[self.d:], self.qkv.bias[self.d:])
        k, v = kv.chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, h: torch.Tensor, mem: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm_q(h)).chunk(3, dim=-1)
        keys = torch.cat([mem[0], self._split(k)], dim=2)
        values = torch.cat([mem[1], self._split(v)], dim=2)
        a = F.scaled_dot_product_attention(self._split(q), keys, values, attn_mask=mask)
        b, _, n, _ = a.shape
        h = h + self.out(a.transpose(1, 2).reshape(b, n, -1))
        out: torch.Tensor = h + self.ff(self.norm_ff(h))
        return out


def causal_mask(n: int, past: int = 0) -> torch.Tensor:
    """(n, past + n) True where a chunk frame may attend: every past frame, chunk frames up
    to itself. Causality keeps what a frame knows independent of where a chunk ends: each
    frame sees phonemes up to its own time + LOOKAHEAD_S, in any chunking."""
    return torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)


class MotionNet(nn.Module):
    """Viseme-to-motion transformer (encoder) + cross-frame denoiser predicting clean latents."""

    def __init__(self, cfg: MotionConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        window = cfg.context_frames + cfg.max_chunk_frames
        self.feature_in = nn.Linear(cfg.feature_dim, d)
        self.position = nn.Parameter(torch.zeros(window, d))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, cfg.heads, 2 * d, dropout=0.0, batch_first=True,
                                       norm_first=True),
            cfg.encoder_layers, enable_nested_tensor=False)
        # Emotion by latent interpolation: a mixture of these rows (neutral -> target).
        self.emotion = nn.Parameter(torch.randn(len(cfg.emotions), cfg.emotion_dim) * 0.1)
        self.emotion_in = nn.Linear(cfg.emotion_dim, d)
        self.idle_in = nn.Linear(cfg.latent_dim, d)
        self.noisy_in = nn.Linear(cfg.latent_dim, d)
        self.context_in = nn.Linear(cfg.latent_dim, d)
        self.missing = nn.Parameter(torch.zeros(d))  # a context slot before the session began
        self.level_in = nn.Linear(d, d)
        self.blocks: list[CrossFrameBlock] = nn.ModuleList(  # type: ignore[assignment]
            CrossFrameBlock(d, cfg.heads) for _ in range(cfg.denoiser_layers))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.latent_dim))
        # eval only: the embedding of each DDIM level, computed once (weights never change)
        self._level_cache: dict[float, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor] = {}  # by chunk length (encoder: negative)

    def _encoder_mask(self, w: int) -> torch.Tensor:
        mask = self._masks.get(-w)
        if mask is None:
            mask = nn.Transformer.generate_square_subsequent_mask(w)
            self._masks[-w] = mask
        return mask

    def _denoiser_mask(self, n: int) -> torch.Tensor:
        mask = self._masks.get(n)
        if mask is None:
            mask = causal_mask(n, self.cfg.context_frames)
            self._masks[n] = mask
        return mask

    def _level(self, level: torch.Tensor) -> torch.Tensor:
        if self.training:
            fresh: torch.Tensor = self.level_in(_time_embedding(level, self.cfg.d_model))
            return fresh
        key = float(level[0])
        cached = self._level_cache.get(key)
        if cached is None or cached.shape[0] != level.shape[0]:
            cached = self.level_in(_time_embedding(level, self.cfg.d_model))
            self._level_cache[key] = cached
        return cached

    def condition(self, features: torch.Tensor, idle: torch.Tensor, emotion_mix: torch.Tensor,
                  context: torch.Tensor, context_valid: torch.Tensor,
                  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Everything that does not change across DDIM steps, computed once per chunk.

        features (B, K+n, F) over context + chunk frames, idle (B, n, L), emotion_mix
        (B, n, E) mixture weights, context (B, K, L) normalised residual latents, context_valid
        (B, K). Returns the chunk frames' conditioning (B, n, d) and each block's memory.
        """
        k = self.cfg.context_frames
        w = features.shape[1]
        enc = self.encoder(self.feature_in(features) + self.position[:w],
                           mask=self._encoder_mask(w), is_causal=True)
        cond = enc[:, k:] + self.emotion_in(emotion_mix @ self.emotion) + self.idle_in(idle)
        ctx = torch.where(context_valid[..., None] > 0, self.context_in(context), self.missing)
        ctx = ctx + enc[:, :k]
        return cond, [block.memory(ctx) for block in self.blocks]

    def denoise(self, noisy: torch.Tensor, level: torch.Tensor, cond: torch.Tensor,
                memory: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Predicted clean latents (B, n, L) from noisy ones at noise level (B,) in [0, 1]."""
        n = noisy.shape[1]
        k = self.cfg.context_frames
        lev = self._level(level)
        h = self.noisy_in(noisy) + cond + lev[:, None, :] + self.position[k:k + n]
        mask = self._denoiser_mask(n)
        for block, mem in zip(self.blocks, memory):
            h = block(h, mem, mask)
        out: torch.Tensor = self.head(h)
        return out


# ---------------------------------------------------------------------------------------
# Diffusion
# ---------------------------------------------------------------------------------------

_COSINE_OFFSET: Final = 0.008  # Nichol & Dhariwal's s: keeps the first steps from being noiseless


def alpha_bar(level: torch.Tensor) -> torch.Tensor:
    """Signal share of the cosine schedule at noise level in [0, 1] (1 = pure noise)."""
    f = torch.cos((level + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    f0 = math.cos(_COSINE_OFFSET / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (f / f0).clamp(1e-5, 1.0)


def ddim_schedule(steps: int) -> list[tuple[float, float, float]]:
    """(noise level, sqrt(alpha_bar), sqrt(alpha_bar of the next level)) per DDIM step."""
    levels = torch.linspace(1.0, 0.0, steps + 1)
    ab = alpha_bar(levels)
    ab[-1] = 1.0  # the last step lands on the clean latent
    return [(float(levels[i]), float(ab[i].sqrt()), float(ab[i + 1].sqrt())) for i in range(steps)]


def ddim_sample(net: MotionNet, cond: torch.Tensor,
                memory: list[tuple[torch.Tensor, torch.Tensor]], noise: torch.Tensor,
                steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from `noise` (B, n, L) in `steps` steps to clean latents."""
    x = noise
    x0 = x
    for level, a, a_next in ddim_schedule(steps):
        x0 = net.denoise(x, torch.full((noise.shape[0],), level), cond, memory)
        if a_next >= 1.0:
            break
        eps = (x - a * x0) / math.sqrt(1.0 - a * a)
        x = a_next * x0 + math.sqrt(1.0 - a_next * a_next) * eps
    return x0


class ChunkSampler(nn.Module):
    """Conditioning + DDIM for one chunk length, as one module so it can be traced."""

    def __init__(self, net: MotionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor, idle: torch.Tensor, emotion_mix: torch.Tensor,
                context: torch.Tensor, context_valid: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cond, memory = self.net.condition(features, idle, emotion_mix, context, context_valid)
        return ddim_sample(self.net, cond, memory, noise, self.net.cfg.sample_steps)


def traced_sampler(net: MotionNet, n: int) -> Callable[..., torch.Tensor]:
    """ChunkSampler traced and frozen for chunks of n frames (batch 1).

    Python dispatch is most of the cost of so small a network: tracing halves a chunk's
    time and computes the same numbers (the same kernels in the same order).
    """
    cfg = net.cfg
    k = cfg.context_frames
    example = (torch.zeros(1, k + n, cfg.feature_dim), torch.zeros(1, n, cfg.latent_dim),
               torch.zeros(1, n, len(cfg.emotions)), torch.zeros(1, k, cfg.latent_dim),
               torch.zeros(1, k), torch.zeros(1, n, cfg.latent_dim))
    with warnings.catch_warnings():
        # the trace specialises on n and the DDIM levels, which is what is wanted here
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                ChunkSampler(net).eval(), example, check_trace=False)
            frozen: Callable[..., torch.Tensor] = torch.jit.freeze(traced)
    return frozen


def noise_generator(seed: int, first_frame: int) -> torch.Generator:
    """The diffusion noise of a chunk: a pure function of (session seed, first frame)."""
    digest = hashlib.blake2b(f"{seed}:{first_frame}".encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

@dataclass
class MotionModel:
    """A loaded checkpoint: network, latent normalisation and where its training data came from."""

    net: MotionNet
    mean: torch.Tensor  # (L,) of the residual latent
    std: torch.Tensor
    source: str
    version: str
    meta: dict[str, Any]

    @property
    def cfg(self) -> MotionConfig:
        return self.net.cfg


def save_checkpoint(path: Path, net: MotionNet, mean: F32, std: F32, source: str,
                    meta: dict[str, Any]) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    cfg = asdict(net.cfg)
    cfg["feature_offsets_s"] = list(net.cfg.feature_offsets_s)
    cfg["emotions"] = list(net.cfg.emotions)
    # Half precision halves the file; weights are cast back to float32 on load.
    state = {k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
    payload = {"format": "avatar-motion-ddim/1", "config": cfg, "state_dict": state,
               "mean": torch.from_numpy(np.asarray(mean, np.float32)),
               "std": torch.from_numpy(np.asarray(std, np.float32)),
               "source": source, "meta": meta,
               "blendshapes": list(BLENDSHAPES), "head_pose": list(HEAD_POSE)}
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())


def load_checkpoint(path: Path) -> MotionModel:
    """Any checkpoint of this format, whatever its source; refuses a different vocabulary."""
    raw = path.read_bytes()
    payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if payload.get("format") != "avatar-motion-ddim/1":
        raise ValueError(f"{path} is not a motion checkpoint (format {payload.get('format')!r})")
    if list(payload["blendshapes"]) != list(BLENDSHAPES) or list(payload["head_pose"]) != list(HEAD_POSE):
        raise ValueError(f"{path} was trained on a different blendshape vocabulary")
    cfg_dict = dict(payload["config"])
    cfg_dict["feature_offsets_s"] = tuple(cfg_dict["feature_offsets_s"])
    cfg_dict["emotions"] = tuple(cfg_dict["emotions"])
    cfg = MotionConfig(**cfg_dict)
    if cfg.feature_offsets_s != FEATURE_OFFSETS_S or cfg.feature_dim != FEATURE_DIM:
        raise ValueError(f"{path} expects other phoneme features than this code computes")
    if cfg.emotions != EMOTION_NAMES:
        raise ValueError(f"{path} knows emotions {cfg.emotions}, this code {EMOTION_NAMES}")
    net = MotionNet(cfg)
    net.load_state_dict({k: v.to(torch.float32) for k, v in payload["state_dict"].items()})
    net.eval()
    source = str(payload["source"])
    if source not in SOURCES:
        raise ValueError(f"{path} has unknown source {source!r}")
    version = "motion-ddim-" + hashlib.sha256(raw).hexdigest()[:10]
    return MotionModel(net, payload["mean"].to(torch.float32), payload["std"].to(torch.float32),
                       source, version, dict(payload.get("meta", {})))
