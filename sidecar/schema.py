"""A small declarative schema for YAML configuration, with errors that name the key path.

Used for enclaver.yaml, sidecar.yaml and every plugin's own config section. It exists (instead of
JSON Schema) because operators need one-line errors of the form ``egress.alow: unknown key (did you
mean 'allow'?)`` and secrets that never appear in an error message or a dump.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MASK = "********"


class SchemaError(Exception):
    """A value does not match its schema. ``path`` is the dotted key path (``ingress[1].tls``)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class Secret(str):
    """A string that came from a secret reference or a secret field; its repr never shows it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not key.isprintable():  # a key is the author's text: a newline must not start a fake error line
        key = repr(key)
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    """Name a value's type the way a YAML author thinks of it, without echoing secrets."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, Secret):
        return "a secret string"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, bytes | bytearray):
        return "binary data"
    if isinstance(value, Sequence):
        return "a list"
    return type(value).__name__


@dataclass
class Field:
    """Base of every schema node. ``secret`` fields are masked in dumps and never echoed."""

    doc: str = ""
    default: Any = None
    required: bool = False
    secret: bool = False

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def problem(self, path: str, expected: str, value: Any) -> SchemaError:
        if self.secret:
            shown = "a secret value"
        elif not path and isinstance(value, str):
            # A whole document that is one string is most likely the wrong file (a token, a key):
            # never quote it.
            shown = "a string"
        else:
            shown = describe(value)
        return SchemaError(path, f"expected {expected}, got {shown}")


@dataclass
class Str(Field):
    choices: Sequence[str] | None = None
    min_len: int = 0
    max_len: int | None = None
    check_fn: Callable[[str], str | None] | None = None

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise self.problem(path, "a string", value)
        if self.choices is not None and value not in self.choices:
            options = ", ".join(repr(c) for c in self.choices)
            shown = "the value" if self.secret else repr(value)
            raise SchemaError(path, f"{shown} is not one of {options}")
        if len(value) < self.min_len:
            raise SchemaError(path, "must not be empty" if self.min_len == 1 else "is too short")
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaError(path, f"is longer than {self.max_len} characters")
        if self.check_fn is not None and (message := self.check_fn(value)):
            raise SchemaError(path, message)
        return Secret(value) if self.secret else value


@dataclass
class Int(Field):
    min: int | None = None
    max: int | None = None

    def check(self, value: Any, path: str) -> Any:
        # YAML booleans are Python ints; `true` is never a valid number here.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.problem(path, "an integer", value)
        if self.min is not None and value < self.min:
            raise SchemaError(path, f"{_number(value)} is below the minimum of {self.min}")
        if self.max is not None and value > self.max:
            raise SchemaError(path, f"{_number(value)} is above the maximum of {self.max}")
        return value


def _number(value: int) -> str:
    # str() of an int of more than 4300 digits raises ValueError (CVE-2020-10735's limit), and YAML
    # reads 0x... and 0b... literals of any length without it.
    return str(value) if value.bit_length() <= 1000 else f"an integer of {value.bit_length()} bits"


def Port(doc: str = "", **kwargs: Any) -> Int:
    """A TCP port, 1..65535."""
    return Int(doc=doc, min=1, max=65535, **kwargs)


@dataclass
class Float(Field):
    min: float | None = None
    max: float | None = None

    def check(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.problem(path, "a number", value)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            raise SchemaError(path, f"{_number(int(value))} is too large") from None
        # NaN compares false with everything, so it would pass any min and max (`.nan` in YAML).
        if not math.isfinite(number):
            raise SchemaError(path, f"must be a finite number, not {number}")
        shown = _number(value) if isinstance(value, int) else value
        if self.min is not None and number < self.min:
            raise SchemaError(path, f"{shown} is below the minimum of {self.min}")
        if self.max is not None and number > self.max:
            raise SchemaError(path, f"{shown} is above the maximum of {self.max}")
        return number


@dataclass
class Bool(Field):
    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            raise self.problem(path, "true or false", value)
        return value


@dataclass
class List(Field):
    item: Field = field(default_factory=lambda: Str())
    min_len: int = 0
    max_len: int | None = None

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise self.problem(path, "a list", value)
        if len(value) < self.min_len:
            raise SchemaError(path, f"needs at least {self.min_len} item(s)")
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaError(path, f"has more than {self.max_len} items")
        return [self.item.check(v, join(path, i)) for i, v in enumerate(value)]


@dataclass
class Map(Field):
    """A mapping with known keys. Unknown keys are errors, with a suggestion when one is close."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    optional: bool = False  # absent -> None, instead of a mapping of defaults

    def check(self, value: Any, path: str) -> Any:
        if value is None and not self.required:
            value = {}
        if not isinstance(value, Mapping):
            raise self.problem(path, "a mapping", value)
        for key in value:
            if not isinstance(key, str):
                raise SchemaError(path, f"keys must be strings, got {describe(key)}")
            if key not in self.fields:
                raise SchemaError(join(path, key), "unknown key" + suggest(key, self.fields))
        result: dict[str, Any] = {}
        for name, node in self.fields.items():
            if name in value and value[name] is not None:
                result[name] = node.check(value[name], join(path, name))
            elif node.required:
                raise SchemaError(join(path, name), "is required")
            elif isinstance(node, Map) and not node.optional:
                result[name] = node.check({}, join(path, name))
            elif isinstance(node, Dict | Section):
                # Absent or null free-form mappings are empty mappings, never None.
                result[name] = node.check(None, join(path, name))
            else:
                result[name] = node.default
        return result


@dataclass
class Dict(Field):
    """A mapping with free-form string keys whose values all share one schema."""

    value: Field = field(default_factory=lambda: Str())
    key_check: Callable[[str], str | None] | None = None

    def check(self, value: Any, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise self.problem(path, "a mapping", value)
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaError(path, f"keys must be strings, got {describe(key)}")
            if self.key_check is not None and (message := self.key_check(key)):
                raise SchemaError(join(path, key), message)
            result[key] = self.value.check(item, join(path, key))
        return result


@dataclass
class Section(Field):
    """A mapping kept whole, for a section that another schema checks later (a plugin's config)."""

    def check(self, value: Any, path: str) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.problem(path, "a mapping", value)
        return dict(value)


@dataclass
class AnyValue(Field):
    """Anything YAML can express; for plugins that validate a section themselves."""

    def check(self, value: Any, path: str) -> Any:
        return value


def suggest(word: str, options: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def redact(value: Any, node: Field | None = None) -> Any:
    """A copy of validated config with every secret (by schema or by reference) masked."""
    if isinstance(value, Secret) or (node is not None and node.secret and value is not None):
        return MASK
    if isinstance(value, Mapping):
        return {k: redact(v, child_schema(node, k)) for k, v in value.items()}
    if isinstance(value, list):
        item = node.item if isinstance(node, List) else None
        return [redact(v, item) for v in value]
    return value


def child_schema(node: Field | None, key: str) -> Field | None:
    if isinstance(node, Map):
        return node.fields.get(key)
    if isinstance(node, Dict):
        return node.value
    return None
