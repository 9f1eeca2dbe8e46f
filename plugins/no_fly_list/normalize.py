"""How a passenger name is matched against the list: one function, used for the list and the query.

The rule (the README repeats it for operators):

1. Remove every whitespace character and every invisible character: whatever ``str.isspace``
   accepts (Unicode ``White_Space`` plus the ASCII separators U+001C..U+001F), every format
   character (category ``Cf``: zero-width space/joiners U+200B..U+200D, word joiner U+2060, BOM
   U+FEFF, soft hyphen U+00AD, bidi controls, ...), and the other default-ignorable code points
   (variation selectors, U+034F, Hangul fillers, ...).
2. Apply Unicode NFKC, then full case folding (``str.casefold``), then NFKC again.
3. Remove whitespace and invisible characters again (NFKC turns some characters, such as U+00A8
   DIAERESIS, into a space plus a combining mark).
4. Repeat until nothing changes (one round is almost always enough; the check is cheap), so the
   result is a fixed point: ``normalize(normalize(x)) == normalize(x)`` for every string.

For ASCII this is exactly the original app's rule, "remove all whitespace, then lowercase", and it
takes a fast path that computes just that: ``"".join(name.split()).lower()``.

Consequences worth knowing:

- ``Big Bird``, ``bigbird``, `` BIG  bird ``, ``Big Bird`` in full-width letters (U+FF22 U+FF49 ...)
  and ``big`` + U+200B ZERO WIDTH SPACE + ``bird`` all give ``bigbird``.
- Case folding is Unicode's language-neutral folding. ``İ`` (U+0130, capital I with dot above)
  folds to ``i`` + U+0307 (combining dot above), so ``BİG BIRD`` gives ``bi̇gbird``: it matches a
  list entry written ``BİG BIRD`` or ``bi̇g bird`` (however it is encoded, precomposed or not), but
  not ``bigbird``. Dotless i (U+0131) stays itself. Accents are kept: ``Zoë`` does not match ``zoe``.
  Folding accents or Turkish casing would be a matching policy of its own; this rule does not guess.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

MAX_NAME_CHARS: Final = 256
MAX_ROUNDS: Final = 4

# Format characters (Cf) and the other Default_Ignorable_Code_Point ranges of Unicode 15.1, listed
# (rather than asking unicodedata per character) so that stripping stays in C; tests check the list
# against the running unicodedata. Whitespace is every str.isspace() character: str.split() drops
# exactly those. The supplementary-plane ranges make a pattern several times slower, so a name is
# only searched with them when it has a supplementary-plane character at all (nearly none do).
_INVISIBLE_BMP: Final = (
    "\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160\u17b4\u17b5"
    "\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
)
_INVISIBLE_ASTRAL: Final = (
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)
# Finds what str.split() leaves to strip: a BMP invisible, or any supplementary-plane character.
_NEEDS_STRIP: Final = re.compile(f"[{_INVISIBLE_BMP}\U00010000-\U0010ffff]").search
_STRIP: Final = re.compile(f"[\\s{_INVISIBLE_BMP}{_INVISIBLE_ASTRAL}]+")
_nfkc = unicodedata.normalize
_is_nfkc = unicodedata.is_normalized


def _strip(text: str) -> str:
    """``text`` without whitespace and invisible characters."""
    text = "".join(text.split())
    if _NEEDS_STRIP(text) is not None:
        text = _STRIP.sub("", text)
    return text


def normalize(name: str) -> str:
    """The matching key of ``name`` (see the module docstring for the rule)."""
    if name.isascii():
        return "".join(name.split()).lower()
    return _normalize_unicode(name)


def _normalize_unicode(name: str) -> str:
    text = name
    for _ in range(MAX_ROUNDS):
        text = _strip(_nfkc("NFKC", _nfkc("NFKC", _strip(text)).casefold()))
        # Stripped, NFKC and fold-stable: another round would change nothing.
        if _is_nfkc("NFKC", text) and text.casefold() == text:
            break
    return text
