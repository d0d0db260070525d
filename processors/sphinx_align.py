"""pocketsphinx phone-level forced alignment: the baseline the align model must beat.

benchmarks/align.py runs it on the same audio, given the text (which align itself never sees),
and maps its ARPAbet phones onto the eSpeak inventory so both are scored alike.

Mapping (ARPAbet -> eSpeak NG en-us mnemonic, stress dropped): vowels to the en-us vowel of the
same keyword (AA->A: "father", AE->a "trap", AH->V "strut", AO->O: "thought", AW->aU, AY->aI,
EH->E, ER->3: "nurse", EY->eI, IH->I, IY->i:, OW->oU, OY->OI, UH->U, UW->u:); consonants one
to one (CH->tS, DH->D, HH->h, JH->dZ, NG->N, SH->S, TH->T, Y->j, ZH->Z, others same letter);
SIL and fillers -> "_". Where eSpeak differs systematically (unstressed AH is eSpeak "@", ER
after a vowel is "3", "r" colouring A@/O@) the scorer's edit-distance alignment pairs them as
substitutions, so timing is still compared phone for phone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from processors.models.align_ctc import SAMPLE_RATE, StreamingResampler

ARPABET_TO_ESPEAK: Final[dict[str, str]] = {
    "AA": "A:", "AE": "a", "AH": "V", "AO": "O:", "AW": "aU", "AY": "aI", "EH": "E",
    "ER": "3:", "EY": "eI", "IH": "I", "IY": "i:", "OW": "oU", "OY": "OI", "UH": "U",
    "UW": "u:", "B": "b", "CH": "tS", "D": "d", "DH": "D", "F": "f", "G": "g", "HH": "h",
    "JH": "dZ", "K": "k", "L": "l", "M": "m", "N": "n", "NG": "N", "P": "p", "R": "r",
    "S": "s", "SH": "S", "T": "t", "TH": "T", "V": "v", "W": "w", "Y": "j", "Z": "z",
    "ZH": "Z", "SIL": "_",
}
FRAME_S: Final = 0.01  # pocketsphinx's frame period
# eSpeak's closures and pauses are digital zeros; pocketsphinx's cepstral mean normalisation
# and noise floor break on them (measured), 3 LSB of noise is inaudible and enough.
DITHER_LSB: Final = 3.0
ALIGN_ATTEMPTS: Final = 3
# Beams far wider than the defaults (1e-48): on unusual eSpeak variants the default search
# loses the forced path in about a quarter of utterances; these recover some (measured).
BEAM: Final = 1e-120
WORD_BEAM: Final = 1e-100


@dataclass(frozen=True)
class SphinxPhone:
    symbol: str  # eSpeak mnemonic, "_" for silence
    start_s: float
    end_s: float


class SphinxAligner:
    """Text + audio -> phone times, through pocketsphinx's bundled en-US model."""

    def __init__(self) -> None:
        self._decoder: object | None = None

    def start(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=SAMPLE_RATE, bestpath=False, loglevel="FATAL",
                                beam=BEAM, pbeam=BEAM, wbeam=WORD_BEAM)

    def words(self, text: str) -> list[str]:
        """The text as dictionary words (lower case, punctuation gone, unknown words dropped)."""
        decoder = self._started()
        out = []
        for word in re.findall(r"[a-z']+", text.lower()):
            if decoder.lookup_word(word) is not None:  # type: ignore[attr-defined]
                out.append(word)
        return out

    def align(self, pcm: npt.NDArray[np.int16], sample_rate: int, text: str,
              seed: int = 0) -> list[SphinxPhone]:
        """Phone times, or [] when pocketsphinx finds no alignment (it sometimes fails on a
        dither pattern and succeeds on another: three patterns are tried)."""
        resampler = StreamingResampler(sample_rate)
        audio = np.concatenate([resampler.push(pcm.astype(np.float32) / 32768.0), resampler.finish()])
        words = self.words(text)
        if not words:
            return []
        for attempt in range(ALIGN_ATTEMPTS):
            noise = np.random.default_rng((seed, attempt)).standard_normal(len(audio)) * DITHER_LSB
            raw = np.clip(np.round(audio * 32768.0 + noise), -32768, 32767).astype("<i2").tobytes()
            try:
                return self._align_raw(raw, words)
            except RuntimeError:
                continue
        return []

    def _align_raw(self, raw: bytes, words: list[str]) -> list[SphinxPhone]:
        d = self._started()
        d.set_align_text(" ".join(words))  # type: ignore[attr-defined]
        for word_pass in (True, False):  # word pass, then the phone pass set_alignment() sets up
            d.start_utt()  # type: ignore[attr-defined]
            d.process_raw(raw, full_utt=True)  # type: ignore[attr-defined]
            d.end_utt()  # type: ignore[attr-defined]
            if word_pass:
                d.set_alignment()  # type: ignore[attr-defined]
        alignment = d.get_alignment()  # type: ignore[attr-defined]
        phones: list[SphinxPhone] = []
        if alignment is None:
            return phones
        for word in alignment:
            for phone in word:
                symbol = ARPABET_TO_ESPEAK.get(phone.name, "_")
                start = phone.start * FRAME_S
                phones.append(SphinxPhone(symbol, start, start + phone.duration * FRAME_S))
        return phones

    def _started(self) -> object:
        if self._decoder is None:
            raise RuntimeError("SphinxAligner.start() has not been called")
        return self._decoder
