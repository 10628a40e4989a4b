"""Outside text made safe to show: terminal escapes removed or escaped, long values cut.

Paths, manifest values and server answers reach the terminal in error lines and logs. An escape
sequence in them could clear, recolour or retitle the user's terminal, a NUL or a lone surrogate
can break the line (or the print itself), and a 20 MB value would become a 20 MB line. Every
message that echoes such a value goes through `shown`; text that is used, not only shown (a VLM
answer), goes through `printable`.
"""

from __future__ import annotations

import os
import re
import unicodedata

from hidream_edit.errors import UserError

SHOWN_CHARS = 256
"""Longest value echoed in a message; longer ones are cut and their length is said."""
LINE_CHARS = 2000
"""Longest error line a command line prints: the last guard for values a message did not pass through `shown`."""

_TERMINAL_ESCAPE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|[ -/]*[0-~])?"
    r"|\x9b[0-?]*[ -/]*[@-~]"
)
_INVISIBLE_FORMATTING = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """`text` without terminal escape sequences and control characters (newlines and tabs kept).

    Server text reaches the terminal in messages and logs; an ANSI sequence in it could recolour,
    retitle or rewrite what the user sees.
    """
    text = _TERMINAL_ESCAPE.sub("", text)
    return "".join(
        char
        for char in text
        if char in "\n\t" or (unicodedata.category(char) != "Cc" and char not in _INVISIBLE_FORMATTING)
    )


def one_line(text: str) -> str:
    """Collapse whitespace and drop control characters so messages and snippets stay on one line."""
    return " ".join(printable(text).split())


def _visible(char: str) -> bool:
    category = unicodedata.category(char)
    return not category.startswith("C") and category not in ("Zl", "Zp")


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`str(value)` for a message: control, format and surrogate characters escaped as `\\x1b`, then
    cut to `limit` characters with the full length said.

    Escaping (rather than dropping) shows the user what is really in a file name.
    """
    text = str(value)
    cut = len(text) > limit
    head = text[:limit] if cut else text
    escaped = "".join(char if _visible(char) else char.encode("unicode_escape").decode("ascii") for char in head)
    return f"{escaped}... ({len(text)} characters)" if cut else escaped


def check_path_text(what: str, text: str) -> None:
    """A UserError if `text` cannot name a file: a NUL character, or a lone surrogate that stands for no byte.

    Such names otherwise surface as a ValueError or UnicodeEncodeError from the first file operation.
    An undecodable byte of a real file name (Python's surrogate escape, as in sys.argv) is fine.
    """
    if "\0" in text:
        raise UserError(f"{what} '{shown(text)}' contains a NUL character, which no file name can hold")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{what} '{shown(text)}' is not valid Unicode text (a lone surrogate at character {exc.start + 1})"
        ) from None
