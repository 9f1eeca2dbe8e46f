"""Durations as Vault writes and reads them: Go's ``time.ParseDuration`` and ``Duration.String()``.

One parser for every engine (KV's ``delete_version_after``, token TTLs, mount tunings), so a
duration a client sends means the same thing on every path, with Go's own error messages.
"""

from __future__ import annotations

import re
from typing import Final


def go_duration(seconds: int) -> str:
    """Whole seconds as Go's ``time.Duration.String()``: ``0s``, ``1m30s``, ``1h0m0s``, ``-1s``."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def go_quote(text: str) -> str:
    """Go's ``%q``: a double-quoted string with unprintable characters escaped."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def format_duration(seconds: int) -> str:
    """As Vault writes a TTL in its warnings: zero units left out, 3600 -> "1h", 5430 -> "1h30m30s".

    Not :func:`go_duration`: OpenBao's "TTL of ... exceeded" warnings use this shorter form.
    """
    if seconds <= 0:
        return "0s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return out


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?")
_DURATION_UNIT = re.compile(r"[^0-9.]*")
# An int64 as text: 19 digits at most; longer is out of range.
INTEGER: Final = re.compile(r"[+-]?[0-9]{1,19}")
INT64_MAX: Final = 2**63 - 1
# The longest duration in whole seconds: Go's time.Duration holds 2**63-1 ns (about 292 years).
MAX_SECONDS: Final = INT64_MAX // 1_000_000_000


def parse_go_duration(text: str) -> int:
    """Go's ``time.ParseDuration`` (``1h30m``, ``1.5h``, ``-2s``, ``500ms``) in nanoseconds.

    Raises ValueError with Go's message.
    """
    quoted = go_quote(text)
    rest = text
    negative = False
    if rest[:1] in ("+", "-"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0
    while rest:
        number = _DURATION_PART.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, fraction = number.group(1), number.group(2) or ""
        if not whole and not fraction:
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[number.end() :]
        unit_match = _DURATION_UNIT.match(rest)
        unit = unit_match.group(0) if unit_match else ""
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        rest = rest[len(unit) :]
        scale = _DURATION_UNITS[unit]
        total += int(whole or "0") * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
        if total > INT64_MAX:
            raise ValueError(f"time: invalid duration {quoted}")
    return -total if negative else total


def duration_seconds(text: str) -> int:
    """Vault's ParseDurationSecond for text: ``""`` (0), ``"90"``, ``"2d"`` or a Go duration.

    In whole seconds, truncated toward zero like Go. Raises ValueError with Go's message.
    """
    if text == "":
        return 0
    if INTEGER.fullmatch(text):
        return int(text)
    if text.endswith("d") and INTEGER.fullmatch(text[:-1]):
        return int(text[:-1]) * 86400
    ns = parse_go_duration(text)
    return -(-ns // 1_000_000_000) if ns < 0 else ns // 1_000_000_000  # truncate toward zero, like Go
