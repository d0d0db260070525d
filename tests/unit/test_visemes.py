"""Phoneme to viseme mapping and the viseme mouth shapes."""
from __future__ import annotations

import numpy as np
import pytest

from backbone.blendshapes import BLENDSHAPES, INDEX
from processors.espeak import EspeakSynth
from processors.visemes import (
    PHONEME_VISEMES,
    VISEME_DOMINANCE,
    VISEME_TARGETS,
    VISEMES,
    base_symbol,
    is_known,
    target_vector,
    viseme_of,
    visemes_of,
)

# Chosen to reach every English vowel, consonant, syllabic and r-coloured sound, plus
# numbers, abbreviations and loan words that eSpeak spells out.
ENGLISH = (
    "Peter Piper picked a peck of pickled peppers. Would you, though?",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore, measure for measure.",
    "Thank you for the thoughtful gift; I'll treasure it always.",
    "How now brown cow, the boy enjoys a noisy toy.",
    "Our hour of power starts here, near the pure, cure fire tower.",
    "Judge Church chose cheap jam and the button, bottle and little cotton kitten.",
    "Bach wrote a fugue; the croissant, the genre and the aaliyah song followed.",
    "It was 7:45 on 12/03/2024 when Dr. Smith paid $1,234.56 for 3 GB of RAM.",
    "Father bought a hot dog, caught a taxi, and thought about the north and the force.",
    "Hmm, uh-huh, oh! Wow. Yeah, yes, nope, okay.",
    "Vivid violet vines wave in the warm wind while the whale wails.",
    "Abbotstown, achenbach, acreage, aberrational, alternator and Denoting.",
    "Square chairs, fair hair, where the bear was rare; tour the moor.",
)


def test_every_symbol_espeak_speaks_for_english_maps_to_a_known_viseme() -> None:
    synth = EspeakSynth()
    synth.start()
    seen = {span.symbol for text in ENGLISH for span in synth.synthesize(text).phonemes}
    unknown = sorted(symbol for symbol in seen if not is_known(symbol))
    assert unknown == []
    assert len(seen) > 60


def test_every_mapped_viseme_has_a_target_and_a_dominance() -> None:
    used = {viseme for shapes in PHONEME_VISEMES.values() for viseme in shapes}
    assert used == set(VISEMES)
    assert set(VISEME_TARGETS) == set(VISEMES) == set(VISEME_DOMINANCE)


def test_stress_marks_do_not_change_the_viseme() -> None:
    for plain in ("a", "E", "oU", "aI", "i:"):
        assert visemes_of(f"'{plain}") == visemes_of(f",{plain}") == visemes_of(plain)
    assert base_symbol("'oU") == "oU"


def test_all_pause_symbols_are_silence() -> None:
    for pause in ("_", "_:", "_!", "_|"):
        assert viseme_of(pause) == "sil"


@pytest.mark.parametrize(("symbols", "viseme"), [
    (("p", "b", "m"), "PP"), (("f", "v"), "FF"), (("T", "D"), "TH"), (("t", "d", "n", "l"), "DD"),
    (("k", "g", "N"), "kk"), (("tS", "dZ", "S", "Z"), "CH"), (("s", "z"), "SS"), (("r",), "RR"),
    (("w", "u:"), "W"), (("A:", "a"), "aa"), (("i:", "I"), "I"), (("O:",), "O"), (("U",), "U"),
])
def test_phoneme_classes(symbols: tuple[str, ...], viseme: str) -> None:
    for symbol in symbols:
        assert viseme_of(symbol) == viseme, symbol


def test_diphthongs_glide_between_two_shapes() -> None:
    assert visemes_of("aI") == ("aa", "I")
    assert visemes_of("'oU") == ("O", "U")


def test_unknown_symbols_fall_back_without_error() -> None:
    assert not is_known("Y:")
    assert viseme_of("Y:") == "E"  # an unknown vowel opens the mouth to mid height
    assert viseme_of("q") == "DD"  # an unknown consonant holds a neutral shape


def test_targets_are_arkit_weights_in_unit_range() -> None:
    for shape in VISEME_TARGETS.values():
        assert set(shape) <= set(BLENDSHAPES)
        assert all(0.0 <= weight <= 1.0 for weight in shape.values())


def test_target_vector_follows_blendshape_order() -> None:
    vector = target_vector("aa")
    assert vector.shape == (52,)
    assert vector[INDEX["jawOpen"]] == VISEME_TARGETS["aa"]["jawOpen"]
    assert not vector.flags.writeable


def test_bilabials_seal_the_lips_with_the_jaw_nearly_shut() -> None:
    shape = VISEME_TARGETS["PP"]
    assert shape["jawOpen"] <= 0.05
    assert shape["mouthPressLeft"] >= 0.4 and shape["mouthPressRight"] >= 0.4


def test_labiodentals_put_the_lower_lip_under_the_upper_teeth() -> None:
    shape = VISEME_TARGETS["FF"]
    assert shape["mouthRollLower"] >= 0.4
    assert shape["mouthUpperUpLeft"] > 0.1 and shape["mouthUpperUpRight"] > 0.1
    assert shape["jawOpen"] <= 0.15


def test_rounded_sounds_pucker_and_funnel() -> None:
    for viseme in ("W", "U", "O", "CH"):
        shape = VISEME_TARGETS[viseme]
        assert shape.get("mouthPucker", 0.0) + shape.get("mouthFunnel", 0.0) >= 0.5, viseme
    assert VISEME_TARGETS["W"]["mouthPucker"] >= 0.6


def test_open_vowels_drop_the_jaw_furthest() -> None:
    jaw = {viseme: VISEME_TARGETS[viseme].get("jawOpen", 0.0) for viseme in VISEMES}
    assert 0.5 <= jaw["aa"] <= 0.7
    assert jaw["aa"] == max(jaw.values())


def test_silence_is_the_relaxed_neutral_face() -> None:
    assert np.all(target_vector("sil") == 0.0)
