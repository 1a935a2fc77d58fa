"""Showing researcher-written text (plan source, class names) to a node's admin as it is.

A plan is approved by reading it, so what the admin sees must be what runs: control characters
(ESC starts terminal escape sequences) and Unicode format characters (U+202E and the other
bidirectional overrides reorder what follows: "Trojan Source", CVE-2021-42574) are shown as
visible markers such as ⟨U+202E⟩, in the CLI and in the web console alike.
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape

_KEEP = frozenset("\n\t")
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})  # controls, format (bidi, zero-width), separators


def _shown(char: str) -> str:
    if char.isprintable() or char in _KEEP or unicodedata.category(char) not in _HIDDEN_CATEGORIES:
        return char
    return f"⟨U+{ord(char):04X}⟩"


def visible(text: str | None) -> str:
    """`text` with every control, bidi/format and separator character (but newline and tab)
    replaced by a visible ⟨U+XXXX⟩ marker."""
    text = text or ""
    if text.isascii() and all(c.isprintable() or c in _KEEP for c in text):
        return text
    return "".join(map(_shown, text))


def for_rich(text: str | None) -> str:
    """`visible(text)` with rich markup escaped, for console.print and table cells."""
    return escape(visible(text))
