"""Phonemes to visemes, and each viseme's mouth shape as ARKit blendshape weights.

The animate stage reads speech.phonemes (eSpeak NG mnemonics, or the aligner's, which use the
same inventory) through this table before the motion model blends the shapes over time.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Final, Mapping

import numpy as np
import numpy.typing as npt

from backbone.blendshapes import BLENDSHAPES, INDEX

VISEMES: Final[tuple[str, ...]] = (
    "sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "RR", "aa", "E", "I", "O", "U", "W",
)
VOWEL_VISEMES: Final = frozenset({"aa", "E", "I", "O", "U"})


def _both(stem: str, weight: float) -> dict[str, float]:
    return {f"{stem}Left": weight, f"{stem}Right": weight}


def _shape(*parts: dict[str, float], **single: float) -> Mapping[str, float]:
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part)
    merged.update(single)
    unknown = set(merged) - set(INDEX)
    if unknown:
        raise ValueError(f"not ARKit blendshapes: {sorted(unknown)}")
    return MappingProxyType(merged)


# ARKit semantics: jawOpen drops the jaw and parts the lips with it; mouthClose is added on
# top of jawOpen to bring the lips back together, so a sealed mouth with the jaw nearly shut
# is jawOpen ~0 plus mouthPress / mouthRoll, not mouthClose alone.
VISEME_TARGETS: Final[Mapping[str, Mapping[str, float]]] = MappingProxyType({
    "sil": _shape(),
    "PP": _shape(_both("mouthPress", 0.55), jawOpen=0.02, mouthClose=0.02,
                 mouthRollLower=0.25, mouthRollUpper=0.15),
    # lower lip tucked under the upper teeth, upper lip lifted to show them
    "FF": _shape(_both("mouthUpperUp", 0.3), _both("mouthStretch", 0.05), jawOpen=0.05,
                 mouthRollLower=0.85),
    # the tongue tip shows between the teeth
    "TH": _shape(_both("mouthUpperUp", 0.1), _both("mouthLowerDown", 0.15), jawOpen=0.18,
                 tongueOut=0.7),
    "DD": _shape(_both("mouthStretch", 0.12), _both("mouthLowerDown", 0.1),
                 _both("mouthUpperUp", 0.05), jawOpen=0.16),
    "kk": _shape(_both("mouthStretch", 0.1), _both("mouthLowerDown", 0.05), jawOpen=0.2),
    # protruded, flared lips with the teeth nearly together
    "CH": _shape(_both("mouthUpperUp", 0.15), _both("mouthLowerDown", 0.15), jawOpen=0.08,
                 mouthFunnel=0.6, mouthPucker=0.35, mouthShrugUpper=0.15),
    "SS": _shape(_both("mouthStretch", 0.3), _both("mouthSmile", 0.12), _both("mouthUpperUp", 0.1),
                 _both("mouthLowerDown", 0.1), jawOpen=0.05),
    "RR": _shape(_both("mouthUpperUp", 0.05), jawOpen=0.12, mouthFunnel=0.45, mouthPucker=0.45),
    "aa": _shape(_both("mouthLowerDown", 0.25), _both("mouthUpperUp", 0.1), _both("mouthStretch", 0.05),
                 jawOpen=0.62),
    "E": _shape(_both("mouthStretch", 0.25), _both("mouthSmile", 0.12), _both("mouthLowerDown", 0.2),
                _both("mouthUpperUp", 0.1), jawOpen=0.38),
    "I": _shape(_both("mouthStretch", 0.35), _both("mouthSmile", 0.25), _both("mouthUpperUp", 0.1),
                _both("mouthLowerDown", 0.1), jawOpen=0.2),
    "O": _shape(_both("mouthLowerDown", 0.1), jawOpen=0.45, mouthFunnel=0.5, mouthPucker=0.2),
    # rounded and protruded: corners drawn in to a small "oo" opening (W tighter than U)
    "U": _shape(jawOpen=0.16, mouthPucker=0.65, mouthFunnel=0.45),
    "W": _shape(jawOpen=0.06, mouthPucker=0.9, mouthFunnel=0.35),
})

# How strongly a viseme imposes its shape on its neighbours (coarticulation dominance):
# lip and teeth gestures are visible and must be reached; velars and pauses borrow the
# shape around them.
VISEME_DOMINANCE: Final[Mapping[str, float]] = MappingProxyType({
    "sil": 0.6, "PP": 1.0, "FF": 1.0, "TH": 0.8, "DD": 0.5, "kk": 0.3, "CH": 0.9, "SS": 0.7,
    "RR": 0.7, "aa": 1.0, "E": 0.9, "I": 0.9, "O": 1.0, "U": 1.0, "W": 1.0,
})
# Phonemes with no mouth gesture of their own: the glottal sounds take their neighbours' shape.
WEAK_PHONEMES: Final = frozenset({"h", "?"})
WEAK_DOMINANCE: Final = 0.1

# eSpeak NG en-us mnemonics without stress marks (all seen in the 126k words of cmudict).
# Two visemes mean a glide through the span (diphthongs, r-coloured vowels, syllabic l).
PHONEME_VISEMES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "_": ("sil",),
    "p": ("PP",), "b": ("PP",), "m": ("PP",),
    "f": ("FF",), "v": ("FF",),
    "T": ("TH",), "D": ("TH",),
    "t": ("DD",), "d": ("DD",), "n": ("DD",), "l": ("DD",), "t#": ("DD",), "t2": ("DD",),
    "d#": ("DD",), "n-": ("DD",), "l#": ("DD",), "l/": ("DD",),
    "k": ("kk",), "g": ("kk",), "N": ("kk",), "x": ("kk",), "h": ("kk",), "?": ("kk",),
    "tS": ("CH",), "dZ": ("CH",), "S": ("CH",), "Z": ("CH",),
    "s": ("SS",), "z": ("SS",),
    "r": ("RR",), "r-": ("RR",), "3": ("RR",), "3:": ("RR",),
    "w": ("W",), "j": ("I",), ";": ("I",),
    # en-us "0" is the unrounded open vowel of "lot", "V" the vowel of "strut"
    "a": ("aa",), "aa": ("aa",), "A:": ("aa",), "A~": ("aa",), "0": ("aa",), "V": ("aa",),
    "a#": ("E",), "E": ("E",), "e": ("E",), "@": ("E",), "@2": ("E",), "@5": ("E",), "@-": ("E",),
    "i": ("I",), "i:": ("I",), "I": ("I",), "I#": ("I",), "I2": ("I",),
    "O": ("O",), "O:": ("O",), "O2": ("O",), "O~": ("O",), "o": ("O",),
    "U": ("U",), "u:": ("W",),
    "aI": ("aa", "I"), "aU": ("aa", "U"), "eI": ("E", "I"), "oU": ("O", "U"), "OI": ("O", "I"),
    "A@": ("aa", "RR"), "O@": ("O", "RR"), "o@": ("O", "RR"), "e@": ("E", "RR"),
    "i@": ("I", "E"), "i@3": ("I", "RR"), "U@": ("U", "RR"), "aI@": ("aa", "I"),
    "aI3": ("aa", "RR"), "aU@": ("aa", "RR"), "@L": ("E", "DD"),
})

_STRESS_MARKS: Final = "',"
_VOWEL_LETTERS: Final = frozenset("aeiouyAEIOUVY03@")


def base_symbol(symbol: str) -> str:
    """The mnemonic without eSpeak's stress marks (' primary, , secondary)."""
    if symbol.startswith("_"):
        return "_"
    return symbol.lstrip(_STRESS_MARKS)


def is_known(symbol: str) -> bool:
    return base_symbol(symbol) in PHONEME_VISEMES


def visemes_of(symbol: str) -> tuple[str, ...]:
    """One viseme, or two for a glide; unknown symbols get a plausible class, never an error.

    The fallback matters for other voices and for the aligner's output: an unknown vowel
    opens the mouth to mid height, an unknown consonant holds a neutral near-closed shape.
    """
    base = base_symbol(symbol)
    found = PHONEME_VISEMES.get(base)
    if found is not None:
        return found
    if base and base[0] in _VOWEL_LETTERS:
        return ("E",)
    return ("DD",)


def is_vowel(symbol: str) -> bool:
    base = base_symbol(symbol)
    return bool(base) and base[0] in _VOWEL_LETTERS


def viseme_of(symbol: str) -> str:
    return visemes_of(symbol)[0]


def stress_of(symbol: str) -> int:
    """2 primary, 1 secondary, 0 unmarked."""
    if symbol.startswith("'"):
        return 2
    if symbol.startswith(","):
        return 1
    return 0


def dominance_of(symbol: str, viseme: str) -> float:
    if base_symbol(symbol) in WEAK_PHONEMES:
        return WEAK_DOMINANCE
    return VISEME_DOMINANCE[viseme]


def _vector(shape: Mapping[str, float]) -> npt.NDArray[np.float64]:
    out = np.zeros(len(BLENDSHAPES), dtype=np.float64)
    for name, weight in shape.items():
        out[INDEX[name]] = weight
    out.flags.writeable = False
    return out


_TARGET_VECTORS: Final = {viseme: _vector(shape) for viseme, shape in VISEME_TARGETS.items()}


def target_vector(viseme: str) -> npt.NDArray[np.float64]:
    """The viseme's 52 weights in BLENDSHAPES order (read-only)."""
    return _TARGET_VECTORS[viseme]
