"""Sentences out of text that may still be arriving: dialogue cuts an LLM's stream into
sentences for tts as each completes, and tts cuts any reply into sentences it speaks one by one.
"""
from __future__ import annotations

import re
from typing import Final

# A sentence ends at . ! ? (or a run of them, or an ellipsis), optionally closed by quotes or
# brackets, when whitespace follows: "3.14" and "example.com" stay whole.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)")
# Words whose trailing period is not a sentence end (lower-cased, without the period).
ABBREVIATIONS: Final = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "approx",
    "no", "inc", "ltd", "co", "corp", "dept", "fig", "mt", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec"})
# Markdown emphasis and headings would otherwise be read out as symbols.
_MARKUP = re.compile(r"[*#`]+")


class SentenceSplitter:
    """Cuts streamed text into speakable sentences: at . ! ? and newlines, not after an
    abbreviation or an initial, and at a clause boundary once a sentence runs too long."""

    def __init__(self, max_chars: int) -> None:
        self._buf = ""
        self._max = max_chars

    def feed(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            cut = self._next_cut()
            if cut is None:
                break
            piece, self._buf = self._buf[:cut], self._buf[cut:]
            out.extend(self._clean(piece))
        return out

    def flush(self) -> list[str]:
        piece, self._buf = self._buf, ""
        return self._clean(piece)

    def _next_cut(self) -> int | None:
        buf = self._buf
        cut = self._sentence_end(buf)
        if cut is not None and cut <= self._max:
            return cut
        if len(buf) > self._max:
            # Too long without an end: break after the last clause mark or space in range.
            window = buf[:self._max]
            for marks in (",;:\u2014", " "):
                at = max(window.rfind(c) for c in marks)
                if at > self._max // 4:
                    return at + 1
            return self._max
        return None

    def _sentence_end(self, buf: str) -> int | None:
        newline = buf.find("\n")
        for m in _SENTENCE_END.finditer(buf):
            if 0 <= newline < m.end():
                break
            if not self._is_abbreviation(buf, m.start()):
                return m.end()
        return newline + 1 if newline >= 0 else None

    @staticmethod
    def _is_abbreviation(buf: str, dot: int) -> bool:
        if buf[dot] != ".":
            return False
        word = re.search(r"[\w.]*$", buf[:dot])
        token = word.group(0).lower() if word else ""
        if not token:
            return False
        # "J. R. R. Tolkien", "U.S. economy": a single letter before the period.
        last = token.rsplit(".", 1)[-1]
        return token in ABBREVIATIONS or (len(last) == 1 and last.isalpha())

    @staticmethod
    def _clean(piece: str) -> list[str]:
        text = " ".join(_MARKUP.sub("", piece).split())
        # A piece of bare punctuation ("...", "-") has nothing to say.
        return [text] if any(c.isalnum() for c in text) else []


def split_sentences(text: str, max_chars: int) -> list[str]:
    """All the sentences of a complete text, none longer than `max_chars`."""
    splitter = SentenceSplitter(max_chars)
    return splitter.feed(text) + splitter.flush()
