"""eSpeak NG speech synthesis with exact phoneme timing, through libespeak-ng over ctypes.

The tts stage turns reply text into speech.audio and speech.phonemes with this; the sample
positions it reports are the session media clock that motion frames and video follow.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

# Values of speak_lib.h, the library's stable C API.
_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
# Without PHONEME_EVENTS the library reports words only; DONT_EXIT stops it calling exit()
# on a bad data path, which would take the whole stage process down.
_INITIALIZE_PHONEME_EVENTS: Final = 0x0001
_INITIALIZE_DONT_EXIT: Final = 0x8000
_EVENT_LIST_TERMINATED: Final = 0
_EVENT_PHONEME: Final = 7
_POS_CHARACTER: Final = 1
_CHARS_UTF8: Final = 1
_PARAM_RATE: Final = 1
_PARAM_PITCH: Final = 3
_EE_OK: Final = 0
# 0 asks for the library's default callback buffer (60 ms of audio per callback measured).
_BUFFER_MS: Final = 0

RATE_RANGE_WPM: Final = (80, 450)  # the limits espeak_SetParameter clamps rate to
PITCH_RANGE: Final = (0, 100)
# One call holds the process-wide library lock for its whole synthesis (~1 ms per second
# of speech) and keeps all of its audio in memory: 100k characters is ~100 minutes, ~250 MB.
MAX_TEXT_CHARS: Final = 100_000

PAUSE: Final = "_"
# eSpeak places the silent closure of a stop at the end of the *preceding* phoneme and
# reports the stop at its burst; a stop span here covers closure + burst, the convention of
# phonetic labelling (and of forced aligners), so the lips can be shut during the silence.
STOPS: Final = frozenset({"p", "b", "t", "d", "k", "g", "tS", "dZ", "t2", "t#", "?"})
# eSpeak's closures are digital silence; 64 (-54 dBFS) still counts the last decaying
# samples of a vowel as its own.
SILENCE_AMPLITUDE: Final = 64
MIN_CLOSURE_S: Final = 0.005  # shorter silences are waveform zero crossings, not closures
MAX_CLOSURE_S: Final = 0.15  # longer silences before a stop are pauses, not closures
PAUSE_CLOSURE_S: Final = 0.06  # a stop after a pause: a typical closure taken from the pause
MIN_KEEP_S: Final = 0.01  # what a preceding phoneme keeps when it is entirely silent


class SpeechError(ValueError):
    """The request cannot be spoken: empty text, unknown voice, parameter out of range."""


@dataclass(frozen=True)
class PhonemeEvent:
    """One phoneme (eSpeak mnemonic, stress marks kept) or a pause "_", in output samples."""

    symbol: str
    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class Synthesis:
    pcm: npt.NDArray[np.int16]
    sample_rate: int
    phonemes: tuple[PhonemeEvent, ...]

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class _Capture:
    """What one synthesis call receives through the callback."""

    def __init__(self) -> None:
        self.chunks: list[npt.NDArray[np.int16]] = []
        self.phonemes: list[tuple[int, str]] = []


class _Engine:
    """The loaded library: process-wide state, only touched while holding _LOCK."""

    def __init__(self, lib: ctypes.CDLL, sample_rate: int, data_path: Path) -> None:
        self.lib = lib
        self.sample_rate = sample_rate
        self.data_path = data_path
        self.capture: _Capture | None = None
        self.current_voice: str | None = None
        # Keys are lower-case language codes; values the voice identifier to select.
        self.voices = _usable_voices(lib, data_path)
        variants_dir = data_path / "voices" / "!v"
        self.variants = frozenset(p.name for p in variants_dir.iterdir()) if variants_dir.is_dir() else frozenset()
        # ctypes frees a callback object that Python no longer references, so it lives here.
        self.callback = _SynthCallback(self._on_audio)
        lib.espeak_SetSynthCallback(self.callback)

    def _on_audio(self, wav: ctypes._Pointer[ctypes.c_short], n_samples: int,
                  events: ctypes._Pointer[_Event]) -> int:
        capture = self.capture
        if capture is None:
            return 1  # nobody is listening: abort rather than drop audio silently
        if n_samples > 0 and wav:
            raw = ctypes.string_at(wav, n_samples * 2)
            capture.chunks.append(np.frombuffer(raw, dtype=np.int16).copy())
        if events:
            i = 0
            while events[i].type != _EVENT_LIST_TERMINATED:
                event = events[i]
                if event.type == _EVENT_PHONEME:
                    symbol = event.id.string.decode("ascii", errors="replace")
                    capture.phonemes.append((int(event.sample), symbol))
                i += 1
        return 0


_LOCK: Final = threading.Lock()
_engine: _Engine | None = None


def _declare_signatures(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p


def _voice_languages(voice: _Voice) -> list[tuple[int, str]]:
    """Decode the (priority byte, NUL-terminated code) list that ends with a zero byte."""
    out: list[tuple[int, str]] = []
    address = voice.languages
    if not address:
        return out
    while True:
        priority = ctypes.c_ubyte.from_address(address).value
        if priority == 0:
            return out
        code = ctypes.string_at(address + 1)
        out.append((priority, code.decode("ascii", errors="replace")))
        address += len(code) + 2


def _dictionary_of(voice_file: Path, first_language: str) -> str:
    """The dictionary a voice loads: its `dictionary` line, else its language before '-'."""
    try:
        for line in voice_file.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "dictionary":
                return words[1]
    except OSError:
        pass
    return first_language.split("-")[0]


def _usable_voices(lib: ctypes.CDLL, data_path: Path) -> dict[str, str]:
    """Language code -> voice identifier, for voices whose dictionary is actually shipped.

    The bundled data lists a few voices (fo, kaa, xex) without their dictionary; selecting
    one only prints to stderr and then speaks with the previous voice's rules.
    """
    best: dict[str, tuple[int, str]] = {}
    table = lib.espeak_ListVoices(None)
    i = 0
    while table[i]:
        voice = table[i].contents
        i += 1
        languages = _voice_languages(voice)
        if not languages or not voice.identifier:
            continue
        identifier = voice.identifier.decode("ascii", errors="replace")
        dictionary = _dictionary_of(data_path / "lang" / identifier, languages[0][1])
        if not (data_path / f"{dictionary}_dict").is_file():
            continue
        for priority, code in languages:
            key = code.lower()
            if key not in best or priority < best[key][0]:
                best[key] = (priority, identifier)
    return {code: identifier for code, (_, identifier) in best.items()}


def _load_engine() -> _Engine:
    import espeakng_loader  # imported here so that importing this module does no I/O

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    _declare_signatures(lib)
    data_path = Path(espeakng_loader.get_data_path())
    sample_rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, str(data_path).encode(),
        _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
    )
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with data at {data_path}")
    return _Engine(lib, sample_rate, data_path)


def _is_pause(symbol: str) -> bool:
    return symbol.startswith("_")


def _base(symbol: str) -> str:
    return symbol.lstrip("',")


def phoneme_spans(raw: list[tuple[int, str]], pcm: npt.NDArray[np.int16],
                  sample_rate: int) -> tuple[PhonemeEvent, ...]:
    """Turn eSpeak's phoneme events (sample, mnemonic) into spans tiling the whole audio.

    Each phoneme ends where the next begins; uncovered audio and eSpeak's pause phonemes
    become "_"; voiceless-stop closures move from the preceding phoneme to the stop
    (see STOPS); empty spans are dropped and neighbouring pauses merged.
    """
    n = len(pcm)
    if n == 0:
        return ()
    events = sorted((min(max(sample, 0), n), symbol) for sample, symbol in raw)
    spans: list[tuple[str, int, int]] = []
    cursor = 0
    for i, (start, symbol) in enumerate(events):
        end = events[i + 1][0] if i + 1 < len(events) else n
        if start > cursor:
            spans.append((PAUSE, cursor, start))
        spans.append((PAUSE if _is_pause(symbol) else symbol, start, end))
        cursor = max(cursor, end)
    if cursor < n:
        spans.append((PAUSE, cursor, n))
    nonempty = [span for span in spans if span[2] > span[1]]
    moved = _move_closures(nonempty, pcm, sample_rate)
    merged: list[tuple[str, int, int]] = []
    for symbol, start, end in moved:
        if end <= start:
            continue
        if merged and symbol == PAUSE and merged[-1][0] == PAUSE:
            merged[-1] = (PAUSE, merged[-1][1], end)
        else:
            merged.append((symbol, start, end))
    return tuple(PhonemeEvent(symbol, start, end) for symbol, start, end in merged)


def _move_closures(spans: list[tuple[str, int, int]], pcm: npt.NDArray[np.int16],
                   sample_rate: int) -> list[tuple[str, int, int]]:
    out = list(spans)
    loud = np.abs(pcm.astype(np.int32)) > SILENCE_AMPLITUDE
    for i in range(1, len(out)):
        symbol, start, end = out[i]
        if _base(symbol) not in STOPS:
            continue
        previous, p_start, _ = out[i - 1]
        if previous == PAUSE:
            limit = min(start - p_start, int(PAUSE_CLOSURE_S * sample_rate))
        else:
            keep = int(MIN_KEEP_S * sample_rate)
            limit = min(start - p_start - keep, int(MAX_CLOSURE_S * sample_rate))
        if limit <= 0:
            continue
        window = loud[start - limit:start]
        last_loud = np.flatnonzero(window)
        silent = limit if len(last_loud) == 0 else limit - int(last_loud[-1]) - 1
        if silent < MIN_CLOSURE_S * sample_rate:
            continue
        new_start = start - silent
        out[i - 1] = (previous, p_start, new_start)
        out[i] = (symbol, new_start, end)
    return out


class EspeakSynth:
    """Text to 16-bit mono speech plus the phoneme spans eSpeak NG used to make it.

    Output is not bit-reproducible: the library carries hidden state from one call to the
    next (the same text twice differs by up to ~1% in length), so replay uses logged audio.
    """

    def __init__(self) -> None:
        self._engine: _Engine | None = None

    def start(self) -> None:
        global _engine
        with _LOCK:
            if _engine is None:
                _engine = _load_engine()
            self._engine = _engine

    @property
    def sample_rate(self) -> int:
        return self._started().sample_rate

    def version(self) -> str:
        """The library's version, e.g. "1.52.0": the tts stage's model version."""
        raw = self._started().lib.espeak_Info(None)
        return raw.decode("ascii", errors="replace") if raw else "unknown"

    def voices(self) -> list[str]:
        """Language codes accepted as `voice` (optionally with "+variant", e.g. "en-us+f3")."""
        return sorted(self._started().voices)

    def check_voice(self, voice: str, rate_wpm: int = 175, pitch: int = 50) -> str:
        """The library's voice selector for these settings; SpeechError if any is unusable."""
        if not RATE_RANGE_WPM[0] <= rate_wpm <= RATE_RANGE_WPM[1]:
            raise SpeechError(f"rate_wpm={rate_wpm} is outside {RATE_RANGE_WPM[0]}..{RATE_RANGE_WPM[1]}")
        if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            raise SpeechError(f"pitch={pitch} is outside {PITCH_RANGE[0]}..{PITCH_RANGE[1]}")
        return self._selector(self._started(), voice)

    def synthesize(self, text: str, voice: str = "en-us", rate_wpm: int = 175,
                   pitch: int = 50) -> Synthesis:
        engine = self._started()
        cleaned = text.replace("\x00", " ").strip()
        if not cleaned:
            raise SpeechError("text is empty: nothing to speak")
        if len(cleaned) > MAX_TEXT_CHARS:
            raise SpeechError(f"text has {len(cleaned)} characters; split it below {MAX_TEXT_CHARS}")
        selector = self.check_voice(voice, rate_wpm, pitch)
        encoded = cleaned.encode("utf-8") + b"\x00"
        with _LOCK:
            if engine.current_voice != selector:
                if engine.lib.espeak_SetVoiceByName(selector.encode()) != _EE_OK:
                    raise SpeechError(f"eSpeak NG could not load voice {voice!r}")
                engine.current_voice = selector
            # Set on every call: another caller may have changed them, and a voice change
            # may reset them.
            engine.lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)
            engine.lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
            capture = _Capture()
            engine.capture = capture
            try:
                status = engine.lib.espeak_Synth(
                    encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
                )
            finally:
                engine.capture = None
        if status != _EE_OK:
            raise SpeechError(f"eSpeak NG failed to synthesise (status {status})")
        pcm = np.concatenate(capture.chunks) if capture.chunks else np.zeros(0, dtype=np.int16)
        spans = phoneme_spans(capture.phonemes, pcm, engine.sample_rate)
        return Synthesis(pcm=pcm, sample_rate=engine.sample_rate, phonemes=spans)

    def _started(self) -> _Engine:
        if self._engine is None:
            raise RuntimeError("EspeakSynth.start() has not been called")
        return self._engine

    @staticmethod
    def _selector(engine: _Engine, voice: str) -> str:
        language, _, variant = voice.strip().partition("+")
        identifier = engine.voices.get(language.lower())
        if identifier is None:
            raise SpeechError(f"unknown voice {voice!r}; voices() lists the {len(engine.voices)} known ones")
        if not variant:
            return identifier
        if variant not in engine.variants:
            raise SpeechError(f"unknown voice variant {variant!r} in {voice!r}")
        return f"{identifier}+{variant}"
