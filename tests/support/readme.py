"""The README's code examples, so tests run them exactly as written (URLs and keys swapped)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def example(heading: str, language: str) -> str:
    """The first ```language block after the line `heading`."""
    text = README.read_text()
    at = text.index(heading)
    m = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, at)
    assert m is not None, f"no {language} block after {heading!r}"
    return m.group(1)
