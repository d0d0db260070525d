"""The align stage's phoneme model: speech audio at any sample rate -> eSpeak-mnemonic spans.

processors/align.py streams an integrator's speech.audio through `StreamingAligner`; the spans
it returns feed animate exactly like the tts stage's own, on the caller's sample clock.

How it works: 16 kHz log-mel frames (10 ms hop) -> four "valid" 1-D convolutions whose right
context adds up to LOOKAHEAD_FRAMES -> a causal GRU -> two heads: per-frame phoneme posteriors
(trained with cross-entropy on eSpeak's exact frame labels: this is what gives the timing) and
a CTC head (blank + the same phonemes: a sequence-level loss that sharpens phoneme identity).
Spans come from the frame posteriors by a fixed-lag Viterbi pass with a switch penalty, which
smooths flicker without a full-utterance lattice. Because every convolution is "valid" and the
edges are padded with a silence frame, streaming gives exactly the offline result.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from processors.visemes import PHONEME_VISEMES, base_symbol

SAMPLE_RATE: Final = 16_000  # the model's rate: speech has little above 8 kHz that lips need
HOP: Final = 160  # 10 ms frames: the timing resolution the labels have
WIN: Final = 400  # 25 ms analysis window, the usual speech trade-off of time vs frequency
N_FFT: Final = 512
N_MELS: Final = 40
FMIN_HZ: Final = 20.0
FMAX_HZ: Final = 7600.0  # just below Nyquist at 16 kHz
# Frame t stands for [t*HOP, (t+1)*HOP); its window is centred on the middle of that interval.
WIN_OFFSET: Final = WIN // 2 - HOP // 2  # samples of the window before the frame starts (120)
POWER_FLOOR: Final = 1e-10  # log floor: digital silence, and the value edges are padded with
PAD_VALUE: Final = math.log(POWER_FLOOR)

# (kernel, right context) of each convolution; right contexts add up to the model lookahead.
CONV_LAYERS: Final = ((5, 2), (3, 1), (3, 1), (3, 0))
LOOKAHEAD_FRAMES: Final = sum(right for _, right in CONV_LAYERS)  # 4 frames = 40 ms
LEFT_FRAMES: Final = sum(k - 1 - right for k, right in CONV_LAYERS)
# Frames the Viterbi pass waits before committing a frame's label (30 ms): enough to see
# that a new phoneme has really begun.
DECODE_LAG_FRAMES: Final = 3
# Audio needed past a span's end before it is final: the lookahead frames, the decode lag,
# and the window of the newest frame reaching WIN - WIN_OFFSET past its start (87.5 ms).
# Resampling other rates adds RESAMPLE_ZEROS taps of the input (0.5 ms; 1 ms at 8 kHz).
LOOKAHEAD_S: Final = ((LOOKAHEAD_FRAMES + DECODE_LAG_FRAMES) * HOP + WIN - WIN_OFFSET) / SAMPLE_RATE
# An open span (the phoneme being spoken) can reach the newest decoded frame: no decode lag.
OPEN_LOOKAHEAD_S: Final = LOOKAHEAD_S - DECODE_LAG_FRAMES * HOP / SAMPLE_RATE
# Log-probability cost of changing phoneme between frames: suppresses one-frame flickers
# between similar vowels; tuned on held-out voices (see eval_align.py).
SWITCH_PENALTY: Final = 6.0
DEAD_PATH: Final = -1e9  # the score of a path that contradicts a committed label

PAUSE: Final = "_"
# The inventory: every eSpeak English mnemonic (stress marks stripped) that visemes.py knows,
# so whatever we emit animates. Index 0 of the CTC head is the blank.
PHONEMES: Final[tuple[str, ...]] = tuple(sorted(PHONEME_VISEMES))
INDEX: Final[dict[str, int]] = {p: i for i, p in enumerate(PHONEMES)}
# eSpeak mnemonics from English voices that visemes.py does not list and that dropping the
# trailing decoration (see to_inventory) would map badly: the nearest listed sound.
ALIASES: Final[dict[str, str]] = {"IR": "I", "VR": "V", "@r": "3", "3:r": "3:"}

RESAMPLE_ZEROS: Final = 8  # sinc zero crossings each side: ~70 dB stop band, 0.5 ms at 16 kHz
KAISER_BETA: Final = 8.0
MAX_TABLE_ENTRIES: Final = 1_000_000  # 4 MB of float32 kernel table at most; odd rates compute
MAX_SAMPLE_RATE: Final = 384_000
MIN_SAMPLE_RATE: Final = 4_000  # below this there is no speech band left to hear phonemes in


def to_inventory(symbol: str) -> str:
    """An eSpeak mnemonic (stress marks allowed) -> the inventory symbol training uses."""
    base = base_symbol(symbol)
    if base in INDEX:
        return base
    alias = ALIASES.get(base)
    if alias is not None and alias in INDEX:
        return alias
    # Unknown decorations (#, [, 2 ...) refine a base sound: drop them from the end.
    for cut in range(len(base) - 1, 0, -1):
        if base[:cut] in INDEX:
            return base[:cut]
    return PAUSE


def mel_filterbank() -> npt.NDArray[np.float32]:
    """(N_FFT//2+1, N_MELS) triangular filters on the HTK mel scale."""
    def mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    edges_mel = np.linspace(mel(np.array(FMIN_HZ)), mel(np.array(FMAX_HZ)), N_MELS + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    bank = np.zeros((N_FFT // 2 + 1, N_MELS), dtype=np.float64)
    for m in range(N_MELS):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - lo) / (mid - lo)
        falling = (hi - freqs) / (hi - mid)
        bank[:, m] = np.clip(np.minimum(rising, falling), 0.0, None)
    return bank.astype(np.float32)


_MEL: Final = mel_filterbank()
_WINDOW: Final = np.hanning(WIN + 2)[1:-1].astype(np.float32)


def n_frames(n_samples_16k: int) -> int:
    """Frames that cover n samples at 16 kHz (the last one may be partial)."""
    return -(-n_samples_16k // HOP)


def log_mel(padded: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.float32]:
    """`count` log-mel frames from 16 kHz audio in [-1, 1] that starts WIN_OFFSET samples
    before frame 0 (frame t reads padded[t*HOP : t*HOP + WIN])."""
    if count <= 0:
        return np.zeros((0, N_MELS), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(padded[:(count - 1) * HOP + WIN], WIN)[::HOP]
    spectrum = np.fft.rfft(frames * _WINDOW, n=N_FFT, axis=1)
    power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
    out: npt.NDArray[np.float32] = np.log(np.maximum(power @ _MEL, POWER_FLOOR)).astype(np.float32)
    return out


def features(audio_16k: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Offline log-mel of a whole utterance, n_frames(len) frames: what streaming computes."""
    count = n_frames(len(audio_16k))
    need = (count - 1) * HOP + WIN
    padded = np.zeros(max(need, WIN_OFFSET + len(audio_16k)), dtype=np.float32)
    padded[WIN_OFFSET:WIN_OFFSET + len(audio_16k)] = audio_16k
    return log_mel(padded, count)


class AlignNet(nn.Module):
    """Log-mel frames -> (frame logits over PHONEMES, CTC logits over blank + PHONEMES)."""

    mel_mean: torch.Tensor
    mel_std: torch.Tensor

    def __init__(self, channels: int = 192, hidden: int = 256) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = hidden
        # Per-band mean and spread of training log-mels, set once before training: a fixed
        # affine map, so frames are normalised the same way offline and streaming.
        self.register_buffer("mel_mean", torch.zeros(N_MELS))
        self.register_buffer("mel_std", torch.ones(N_MELS))
        layers = []
        width = N_MELS
        for kernel, _ in CONV_LAYERS:
            layers.append(nn.Conv1d(width, channels, kernel))
            width = channels
        self.convs = nn.ModuleList(layers)
        # Per-frame layer norms (no statistics across time, so streaming stays exact): they
        # make the small net train several times faster than plain residual ReLUs.
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in CONV_LAYERS)
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.frame_head = nn.Linear(hidden, len(PHONEMES))
        self.ctc_head = nn.Linear(hidden, len(PHONEMES) + 1)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, T + LEFT_FRAMES + LOOKAHEAD_FRAMES, N_MELS) padded -> (B, T, channels)."""
        x = ((mel - self.mel_mean) / self.mel_std).transpose(1, 2)
        for i, ((kernel, right), conv, norm) in enumerate(zip(CONV_LAYERS, self.convs, self.norms)):
            y = torch.relu(norm(conv(x).transpose(1, 2)).transpose(1, 2))
            if i > 0:  # residual: the input frames aligned with each output frame
                left = kernel - 1 - right
                x = y + x[:, :, left:x.shape[2] - right]
            else:
                x = y
        return x.transpose(1, 2)

    def forward(self, mel: torch.Tensor, hidden: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, hidden_out = self.gru(self.encode(mel), hidden)
        return self.frame_head(out), self.ctc_head(out), hidden_out


def pad_frames(mel: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Add the silence frames an utterance's edges are padded with (as streaming does)."""
    left = np.full((LEFT_FRAMES, N_MELS), PAD_VALUE, dtype=np.float32)
    right = np.full((LOOKAHEAD_FRAMES, N_MELS), PAD_VALUE, dtype=np.float32)
    return np.concatenate([left, mel, right])


def save_checkpoint(model: AlignNet, path: Path, meta: dict[str, Any]) -> None:
    """fp16 weights (half the size; the posteriors do not change measurably)."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "channels": model.channels, "hidden": model.hidden,
                "phonemes": list(PHONEMES), "meta": meta}, path)


def load_checkpoint(path: Path) -> tuple[AlignNet, str]:
    """The model in eval mode and its version, "align-ctc-<first 8 hex of the file's sha256>"."""
    raw = path.read_bytes()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if tuple(ckpt["phonemes"]) != PHONEMES:
        raise ValueError(f"{path} was trained on another phoneme inventory")
    model = AlignNet(int(ckpt["channels"]), int(ckpt["hidden"]))
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v)
                           for k, v in ckpt["state_dict"].items()})
    model.eval()
    return model, f"align-ctc-{hashlib.sha256(raw).hexdigest()[:8]}"


DEFAULT_CHECKPOINT: Final = Path(__file__).with_name("align_ctc.pt")


class StreamingResampler:
    """Any rate -> 16 kHz, chunk by chunk, with a windowed-sinc kernel.

    Output sample n sits at input time n * ratio; it is produced once the input reaches
    RESAMPLE_ZEROS kernel lobes past it (under 1 ms), so resampling adds almost no lookahead.
    """

    def __init__(self, in_rate: int) -> None:
        self.step = Fraction(in_rate, SAMPLE_RATE)  # input samples per output sample
        self.cutoff = min(1.0, SAMPLE_RATE / in_rate)  # of the input Nyquist
        self.half = int(math.ceil(RESAMPLE_ZEROS / self.cutoff))  # taps each side, input samples
        self.identity = in_rate == SAMPLE_RATE
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_start = 0  # input index of buffer[0]
        self.received = 0
        self.next_out = 0
        # Common rates have few phases (22.05 kHz: 320): their kernels are computed once.
        phases = self.step.denominator
        self.table = (self._kernel(np.arange(phases) / phases).astype(np.float32)
                      if not self.identity and phases * 2 * self.half <= MAX_TABLE_ENTRIES else None)

    def _kernel(self, frac: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Kaiser-windowed sinc weights of the taps around input positions base + frac."""
        taps = np.arange(-self.half + 1, self.half + 1, dtype=np.float64)
        dist = taps[None, :] - frac[:, None]
        window = np.i0(KAISER_BETA * np.sqrt(np.clip(1.0 - (dist / (self.half + 1)) ** 2, 0.0, 1.0)))
        kernel: npt.NDArray[np.float64] = (self.cutoff * np.sinc(self.cutoff * dist) * window
                                           / np.i0(KAISER_BETA))
        return kernel

    def _produce(self, limit_out: int) -> npt.NDArray[np.float32]:
        if limit_out <= self.next_out:
            return np.zeros(0, dtype=np.float32)
        n = np.arange(self.next_out, limit_out, dtype=np.int64)
        pos_num = n * self.step.numerator  # exact input position * denominator
        base = pos_num // self.step.denominator
        phase = pos_num - base * self.step.denominator
        if self.table is not None:
            kernel = self.table[phase]
        else:
            kernel = self._kernel(phase / self.step.denominator)
        taps = np.arange(-self.half + 1, self.half + 1, dtype=np.int64)
        idx = base[:, None] + taps[None, :]
        local = idx - self.buffer_start
        padded = np.concatenate([self.buffer, np.zeros(self.half + 1, dtype=np.float32)])
        valid = (local >= 0) & (local < len(self.buffer))
        values = np.where(valid, padded[np.clip(local, 0, len(padded) - 1)], 0.0)
        out: npt.NDArray[np.float32] = np.einsum("ij,ij->i", values.astype(np.float32),
                                                 kernel.astype(np.float32))
        self.next_out = limit_out
        keep_from = int((self.next_out * self.step.numerator) // self.step.denominator) - self.half
        drop = max(0, keep_from - self.buffer_start)
        if drop:
            self.buffer = self.buffer[drop:]
            self.buffer_start += drop
        return out

    def push(self, audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.identity:
            self.received += len(audio)
            return audio.astype(np.float32)
        self.buffer = np.concatenate([self.buffer, audio.astype(np.float32)])
        self.received += len(audio)
        # Output n needs input up to floor(n * step) + half.
        ready = self.received - self.half  # highest base index whose kernel is complete + 1
        limit = (max(ready, 0) * self.step.denominator + self.step.numerator - 1) // self.step.numerator
        return self._produce(int(limit))

    def finish(self) -> npt.NDArray[np.float32]:
        """The rest: every output sample whose time falls inside the input received."""
        total = (self.received * self.step.denominator + self.step.numerator - 1) // self.step.numerator
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        return self._produce(int(total))


@dataclass(frozen=True)
class AlignedSpan:
    """A phoneme in the caller's samples: input rate, absolute clock."""

    symbol: str
    start_sample: int
    end_sample: int


class FixedLagViterbi:
    """Frame log-posteriors -> committed labels, DECODE_LAG_FRAMES behind the newest frame.

    States are phonemes; staying costs nothing, switching costs SWITCH_PENALTY. A frame's
    label is read off the best path ending `lag` frames later (fixed-lag smoothing).
    """

    def __init__(self, n_states: int, lag: int = DECODE_LAG_FRAMES,
                 penalty: float = SWITCH_PENALTY) -> None:
        self.lag = lag
        self.penalty = penalty
        self.delta = np.zeros(n_states, dtype=np.float64)
        self.started = False
        # Per pending frame: (was-a-switch mask over states, best previous state).
        self.back: list[tuple[npt.NDArray[np.bool_], int]] = []
        self.committed = 0  # frames whose label is out

    def _advance(self, logp: npt.NDArray[np.float32]) -> None:
        if not self.started:
            self.delta = logp.astype(np.float64)
            self.back.append((np.zeros(len(logp), dtype=bool), -1))
            self.started = True
            return
        best_prev = int(np.argmax(self.delta))
        switch_score = self.delta[best_prev] - self.penalty
        switched = switch_score > self.delta
        self.delta = np.where(switched, switch_score, self.delta) + logp
        self.delta -= self.delta.max()
        self.back.append((switched, best_prev))

    def _trace(self, frames: int) -> list[int]:
        """Labels of the `frames` oldest pending frames along the best path now."""
        state = int(np.argmax(self.delta))
        path = [state]
        for switched, prev in reversed(self.back[1:]):
            state = prev if switched[state] else state
            path.append(state)
        path.reverse()
        return path[:frames]

    def _keep_paths_through(self, label: int) -> None:
        """Drop every live path whose oldest pending frame is not `label`: later commits then
        extend this one, so the committed labels form one path rather than a patchwork of
        best paths (which flickers between similar phonemes)."""
        ancestors = np.arange(len(self.delta))
        for switched, prev in reversed(self.back[1:]):
            ancestors = np.where(switched[ancestors], prev, ancestors)
        self.delta[ancestors != label] = DEAD_PATH

    def push(self, logp: npt.NDArray[np.float32]) -> list[int]:
        out: list[int] = []
        for row in logp:
            self._advance(row)
            if len(self.back) > self.lag:
                label = self._trace(1)[0]
                self._keep_paths_through(label)
                out.append(label)
                self.back.pop(0)
                self.committed += 1
        return out

    def pending(self) -> list[int]:
        """The labels of the frames not yet committed, along the best path so far: a guess
        that a later frame can still revise."""
        return self._trace(len(self.back)) if self.back else []

    def finish(self) -> list[int]:
        out = self._trace(len(self.back)) if self.back else []
        self.committed += len(out)
        self.back.clear()
        return out


class StreamingAligner:
    """One utterance's audio, pushed in chunks of any size, -> final phoneme spans.

    `origin` is the caller's absolute sample of the first pushed sample. A span is returned
    once the phoneme after it has been committed, i.e. at most LOOKAHEAD_S (+ <1 ms of
    resampling) of audio after its end; `finish()` returns the rest.
    """

    def __init__(self, model: AlignNet, sample_rate: int, origin: int = 0,
                 penalty: float = SWITCH_PENALTY) -> None:
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample rate {sample_rate} outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
        self.model = model
        self.sample_rate = sample_rate
        self.origin = origin
        self.resampler = StreamingResampler(sample_rate)
        # 16 kHz audio, starting WIN_OFFSET samples of silence before frame 0.
        self.audio = np.zeros(WIN_OFFSET, dtype=np.float32)
        self.audio_start = 0  # 16 kHz index (in the padded stream) of audio[0]
        self.samples_16k = 0
        self.next_mel = 0
        self.mel_context = np.full((LEFT_FRAMES, N_MELS), PAD_VALUE, dtype=np.float32)
        self.hidden: torch.Tensor | None = None
        self.viterbi = FixedLagViterbi(len(PHONEMES), DECODE_LAG_FRAMES, penalty)
        self.run_label = -1
        self.run_start = 0
        self.frames_out = 0
        self.done = False

    def _to_input(self, frame: int) -> int:
        return self.origin + int(round(frame * HOP * self.sample_rate / SAMPLE_RATE))

    def _mel(self, final: bool) -> npt.NDArray[np.float32]:
        padded_len = self.audio_start + len(self.audio)
        if final:
            # The last frames reach past the audio: zeros, as features() pads offline.
            count = n_frames(self.samples_16k) - self.next_mel
            extra = (self.next_mel + count - 1) * HOP + WIN - padded_len
            if count > 0 and extra > 0:
                self.audio = np.concatenate([self.audio, np.zeros(extra, dtype=np.float32)])
        else:
            count = max(0, (padded_len - WIN) // HOP + 1 - self.next_mel)
        if count <= 0:
            return np.zeros((0, N_MELS), dtype=np.float32)
        offset = self.next_mel * HOP - self.audio_start
        mel = log_mel(self.audio[offset:], count)
        self.next_mel += count
        drop = self.next_mel * HOP - self.audio_start
        self.audio = self.audio[drop:]
        self.audio_start += drop
        return mel

    def _frames(self, mel: npt.NDArray[np.float32], final: bool) -> npt.NDArray[np.float32]:
        """New log-mel frames -> frame log-posteriors for every frame now computable."""
        parts = [self.mel_context, mel]
        if final:
            parts.append(np.full((LOOKAHEAD_FRAMES, N_MELS), PAD_VALUE, dtype=np.float32))
        window = np.concatenate(parts)
        span = LEFT_FRAMES + LOOKAHEAD_FRAMES
        if len(window) <= span:
            self.mel_context = window
            return np.zeros((0, len(PHONEMES)), dtype=np.float32)
        with torch.inference_mode():
            logits, _, self.hidden = self.model(torch.from_numpy(window)[None], self.hidden)
            logp = torch.log_softmax(logits[0], dim=-1).numpy()
        self.mel_context = window[-span:]
        return logp

    def _spans(self, labels: list[int]) -> list[AlignedSpan]:
        out: list[AlignedSpan] = []
        for label in labels:
            if label != self.run_label:
                if self.run_label >= 0 and self.frames_out > self.run_start:
                    out.append(AlignedSpan(PHONEMES[self.run_label], self._to_input(self.run_start),
                                           self._to_input(self.frames_out)))
                self.run_label = label
                self.run_start = self.frames_out
            self.frames_out += 1
        return out

    def push(self, pcm: npt.NDArray[np.int16] | npt.NDArray[np.float32]) -> list[AlignedSpan]:
        if self.done:
            raise RuntimeError("push after finish")
        audio = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        resampled = self.resampler.push(audio)
        return self._consume(resampled, final=False)

    def _consume(self, resampled: npt.NDArray[np.float32], final: bool) -> list[AlignedSpan]:
        self.samples_16k += len(resampled)
        self.audio = np.concatenate([self.audio, resampled])
        mel = self._mel(final)
        logp = self._frames(mel, final)
        labels = self.viterbi.push(logp)
        if final:
            labels += self.viterbi.finish()
        return self._spans(labels)

    def open_span(self) -> AlignedSpan | None:
        """The phoneme being spoken now, from its start to the last frame the best path so
        far gives it, so a caller can show it early: the lips then follow about
        OPEN_LOOKAHEAD_S behind the audio rather than a phoneme later. Its start and symbol
        are final; its end may still move, by at most DECODE_LAG_FRAMES back."""
        if self.done or self.run_label < 0 or self.frames_out <= self.run_start:
            return None
        end = self.frames_out
        for label in self.viterbi.pending():
            if label != self.run_label:
                break
            end += 1
        return AlignedSpan(PHONEMES[self.run_label], self._to_input(self.run_start),
                           self._to_input(end))

    def finish(self) -> list[AlignedSpan]:
        """Flush the utterance: every remaining span, the last one ending at the audio's end."""
        if self.done:
            return []
        out = self._consume(self.resampler.finish(), final=True)
        self.done = True
        if self.run_label >= 0 and self.frames_out > self.run_start:
            end = self.origin + self.resampler.received
            out.append(AlignedSpan(PHONEMES[self.run_label], self._to_input(self.run_start),
                                   max(end, self._to_input(self.run_start) + 1)))
        return out


def align_offline(model: AlignNet, pcm: npt.NDArray[np.int16], sample_rate: int,
                  origin: int = 0) -> list[AlignedSpan]:
    """A whole utterance in one push: the same spans streaming gives."""
    aligner = StreamingAligner(model, sample_rate, origin)
    return aligner.push(pcm) + aligner.finish()
