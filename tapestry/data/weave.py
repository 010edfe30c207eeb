"""Weave image slots into a caption at the phrases that name them (Inset's images-in-sentences).

    weave("The red car passes the old tree.", {"car": "the red car", "tree": "the old tree"})
    -> "The <img:car/> red car passes the <img:tree/> old tree."

The slot goes where the noun phrase starts, after a leading article or possessive, as in
"A [img1] robot holds a [img2] vase". Phrases are matched case-insensitively on word boundaries,
each at its first occurrence not inside an earlier match. A phrase that is missing raises
ValueError naming it, worded so it can be sent back to a model as a repair request.
"""

from __future__ import annotations

import re

LEADING_WORDS = ("a", "an", "the", "this", "that", "these", "those", "its", "his", "her", "their", "our", "my", "your")


def weave(text: str, phrases: dict[str, str]) -> str:
    taken: list[tuple[int, int]] = []
    inserts: list[tuple[int, str]] = []
    for name, phrase in phrases.items():
        phrase = phrase.strip()
        if not phrase:
            raise ValueError(f"the phrase for {name!r} is empty")
        pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
        match = next((m for m in pattern.finditer(text)
                      if not any(m.start() < end and start < m.end() for start, end in taken)), None)
        if match is None:
            raise ValueError(f"the phrase {phrase!r} for {name!r} does not appear word for word in the text")
        taken.append((match.start(), match.end()))
        at = match.start()
        first, _, rest = match.group(0).partition(" ")
        if rest and first.lower() in LEADING_WORDS:
            at += len(first) + 1
        inserts.append((at, f"<img:{name}/> "))
    for at, slot in sorted(inserts, reverse=True):
        text = text[:at] + slot + text[at:]
    return text
