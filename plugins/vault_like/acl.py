"""Vault ACL policies: parsing (HCL via python-hcl2, or JSON) and Vault's path matching.

A policy is a list of ``path "PATTERN" { capabilities = [...] }`` rules. A pattern is an exact
path, a prefix glob (a trailing ``*``), or has ``+`` segment wildcards (one whole segment each).
:class:`ACL` compiles the rules of a token's policies exactly as Vault's ``NewACL`` does (rules
with the same pattern are merged: capabilities unioned, ``deny`` anywhere wins) and answers with
Vault's matching order: an exact rule wins; otherwise among the longest prefix glob and every
matching ``+`` pattern the highest priority wins (later first wildcard, then not a glob, then
fewer ``+``, then longer, then lexically larger). The chosen rule alone decides: capabilities of
rules that were not chosen never add up.

Options that *restrict* a rule (allowed/denied/required parameters, wrapping TTLs, MFA, control
groups...) are refused at parse time instead of being ignored: ignoring a restriction would grant
more than the policy author wrote (fail closed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import hcl2
import lark
from hcl2.utils import SerializationOptions

from .logical import Operation

# Capability bits, as Vault's cap2Int.
_BITS: Final[dict[str, int]] = {
    "deny": 1,
    "create": 2,
    "read": 4,
    "update": 8,
    "delete": 16,
    "list": 32,
    "sudo": 64,
    "patch": 128,
}
CAPABILITIES: Final = frozenset(_BITS)
_DENY: Final = _BITS["deny"]
_SUDO: Final = _BITS["sudo"]
# The order Vault's Capabilities() lists them in (sys/capabilities-self sorts them anyway).
_REPORT_ORDER: Final = ("sudo", "read", "list", "update", "delete", "create", "patch")

# Old-style `policy = "..."` shorthands, as Vault maps them.
_OLD_STYLE: Final[dict[str, tuple[str, ...]]] = {
    "deny": ("deny",),
    "read": ("read", "list"),
    "write": ("create", "read", "update", "delete", "list"),
    "sudo": ("create", "read", "update", "delete", "list", "sudo"),
}
_PATH_KEYS: Final = frozenset({"comment", "policy", "capabilities"})
# Keys Vault accepts that restrict what a rule grants; this store does not enforce them, so a
# policy using them is refused rather than silently granting more than written.
_UNSUPPORTED_KEYS: Final = frozenset(
    {
        "allowed_parameters",
        "denied_parameters",
        "required_parameters",
        "min_wrapping_ttl",
        "max_wrapping_ttl",
        "mfa_methods",
        "pagination_limit",
        "expiration",
        "list_scan_response_keys_filter_path",
        "control_group",
    }
)
_TOP_KEYS: Final = frozenset({"name", "path"})
MAX_POLICY_BYTES: Final = 256 * 1024

_HCL_OPTIONS: Final = SerializationOptions(
    with_comments=False, explicit_blocks=True, preserve_heredocs=False, strip_string_quotes=False
)


class PolicyError(Exception):
    """A policy failed to parse or validate. The message names the problem (and the line if known)."""


@dataclass(frozen=True)
class PathRule:
    """One ``path`` stanza. ``path`` is the pattern as written, less a leading ``/``."""

    path: str
    capabilities: frozenset[str]

    @property
    def templated(self) -> bool:
        # Identity templates ({{identity.entity.id}}) need an entity; tokens here have none, so
        # Vault's behaviour for a token without an entity applies: the rule is skipped.
        return "{{" in self.path

    @property
    def segment_wildcards(self) -> bool:
        p = self.path
        return p == "+" or "/+" in p or p.startswith("+/")

    @property
    def bits(self) -> int:
        return _bits(self.capabilities)


@dataclass(frozen=True)
class Policy:
    name: str
    raw: str
    rules: tuple[PathRule, ...]


def _bits(caps: Iterable[str]) -> int:
    out = 0
    for c in caps:
        out |= _BITS[c]
    return out


# ---------------------------------------------------------------------------------------------
# Parsing


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise PolicyError(f"duplicate key {k!r}")
        out[k] = v
    return out


class _Values:
    """Turns parsed values into Python strings. HCL keeps string quotes; JSON does not."""

    def __init__(self, hcl: bool) -> None:
        self.hcl = hcl

    def string(self, value: Any, what: str) -> str:
        if not self.hcl:
            if not isinstance(value, str):
                raise PolicyError(f"{what} must be a string")
            return value
        if not (isinstance(value, str) and len(value) >= 2 and value[0] == '"' and value[-1] == '"'):
            # A bare word in HCL2 is a variable reference, not a string.
            raise PolicyError(f"{what} must be a quoted string")
        return _hcl_unquote(value, what)

    def label(self, value: str) -> str:
        if self.hcl and value.startswith('"'):
            return _hcl_unquote(value, "path")
        return value

    def string_list(self, value: Any, what: str) -> list[str]:
        if not isinstance(value, list):
            raise PolicyError(f"{what} must be a list of strings")
        return [self.string(v, what) for v in value]


def _hcl_unquote(token: str, what: str) -> str:
    # HCL2 keeps `${...}` / `%{...}` as templates. Vault's HCL1 took them literally; rather than
    # guess which the author meant, refuse them.
    body = token[1:-1]
    if "${" in body or "%{" in body:
        raise PolicyError(f"{what}: template expressions are not supported")
    try:
        # HCL string escapes (\n \t \" \\ \uXXXX) are JSON's.
        value = json.loads(token)
    except ValueError as e:
        raise PolicyError(f"{what}: invalid string escape") from e
    if not isinstance(value, str):  # pragma: no cover - a quoted token always decodes to str
        raise PolicyError(f"{what} must be a string")
    return value


def _parse_hcl(text: str) -> dict[str, Any]:
    try:
        tree = hcl2.parses_to_tree(text)
    except Exception as e:  # lark and hcl2 raise many types; all mean "not valid HCL"
        raise PolicyError(_describe_hcl_error(e)) from None
    _refuse_repeated_attributes(tree)
    try:
        doc = hcl2.serialize(hcl2.transform(tree), serialization_options=_HCL_OPTIONS)
    except Exception as e:
        raise PolicyError(_describe_hcl_error(e)) from None
    if not isinstance(doc, dict):
        raise PolicyError("does not contain a root object")
    return doc


def _refuse_repeated_attributes(tree: lark.Tree[Any]) -> None:
    """Refuse an attribute set twice in one block (``capabilities`` twice in one ``path``).

    python-hcl2 keeps only the last value, so ``capabilities = ["deny"]`` followed by
    ``capabilities = ["read"]`` would silently lose the deny (OpenBao merges the two). A policy that
    says one thing twice is refused, so nothing in it is ever dropped: fail closed.
    """
    for body in tree.find_data("body"):
        seen: set[str] = set()
        for child in body.children:
            if not isinstance(child, lark.Tree) or child.data != "attribute" or not child.children:
                continue
            name_node = child.children[0]
            name = (
                "".join(str(t) for t in name_node.scan_values(lambda _: True))
                if isinstance(name_node, lark.Tree)
                else str(name_node)
            )
            if name in seen:
                line = getattr(child.meta, "line", None) if not child.meta.empty else None
                where = f"at line {line}: " if line else ""
                raise PolicyError(f"{where}{name!r} is set twice in one block")
            seen.add(name)


def _describe_hcl_error(e: Exception) -> str:
    """A short message for the client: lark's own text lists every expected token."""
    line, column = getattr(e, "line", None), getattr(e, "column", None)
    where = f"at line {line}, column {column}: " if isinstance(line, int) and line > 0 else ""
    token = getattr(e, "token", None)
    char = getattr(e, "char", None)
    if token is not None:
        kind = getattr(token, "type", "")
        what = "unexpected end of input" if kind == "$END" else f"unexpected {str(token)[:40]!r}"
    elif isinstance(char, str):
        what = f"unexpected character {char!r}"
    else:
        what = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return f"{where}{what}"


def _hcl_path_items(doc: Mapping[str, Any], values: _Values) -> list[tuple[str, dict[str, Any]]]:
    raw = doc.get("path", [])
    if not isinstance(raw, list):
        raise PolicyError('"path" must be a block: path "PATTERN" { ... }')
    items: list[tuple[str, dict[str, Any]]] = []
    for block in raw:
        if not isinstance(block, dict) or block.get("__is_block__") is True:
            raise PolicyError('"path" block needs exactly one label: path "PATTERN" { ... }')
        if len(block) != 1:
            raise PolicyError('"path" block needs exactly one label')
        ((label, body),) = block.items()
        if not isinstance(body, dict) or body.get("__is_block__") is not True:
            raise PolicyError('"path" block needs exactly one label: path "PATTERN" { ... }')
        body = {k: v for k, v in body.items() if k != "__is_block__"}
        items.append((values.label(label), body))
    return items


def _json_path_items(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    raw = doc.get("path", {})
    groups = raw if isinstance(raw, list) else [raw]
    items: list[tuple[str, dict[str, Any]]] = []
    for group in groups:
        if not isinstance(group, dict):
            raise PolicyError('"path" must be an object of PATTERN: {...}')
        for label, body in group.items():
            if not isinstance(body, dict):
                raise PolicyError(f"path {label!r}: must be an object")
            items.append((label, body))
    return items


def _parse_rule(pattern: str, body: Mapping[str, Any], values: _Values) -> PathRule:
    q = json.dumps(pattern)  # Vault quotes the pattern like Go's %q
    for key in body:
        if key in _UNSUPPORTED_KEYS:
            raise PolicyError(f"path {q}: {key!r} is not supported by this store")
        if key not in _PATH_KEYS:
            raise PolicyError(f"path {q}: invalid key {json.dumps(key)}")
    path = pattern[1:] if pattern.startswith("/") else pattern
    if "+*" in path:
        raise PolicyError(f"path {json.dumps(path)}: invalid use of wildcards ('+*' is forbidden)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise PolicyError(f"path {q}: control characters are not allowed")
    if "comment" in body:
        values.string(body["comment"], f"path {q}: comment")
    caps: list[str] = []
    if "capabilities" in body:
        caps = values.string_list(body["capabilities"], f"path {q}: capabilities")
    if "policy" in body:
        old = values.string(body["policy"], f"path {q}: policy")
        if old not in _OLD_STYLE:
            raise PolicyError(f"path {q}: invalid policy {json.dumps(old)}")
        caps = ["deny"] if old == "deny" else caps + list(_OLD_STYLE[old])
    for cap in caps:
        if cap not in CAPABILITIES:
            raise PolicyError(f"path {q}: invalid capability {json.dumps(cap)}")
    # deny is exclusive: a rule that denies grants nothing else.
    final = frozenset({"deny"}) if "deny" in caps else frozenset(caps)
    return PathRule(path=path, capabilities=final)


def parse_policy(name: str, text: str) -> Policy:
    """Parse a Vault ACL policy written in HCL or JSON; raise :class:`PolicyError` if invalid."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is larger than {MAX_POLICY_BYTES} bytes")
    if "\x00" in text:
        raise PolicyError("policy contains a NUL character")
    is_json = text.lstrip().startswith("{")
    doc: Any
    if is_json:
        try:
            doc = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except PolicyError:
            raise
        except RecursionError:  # a policy nested thousands of levels deep
            raise PolicyError("invalid JSON: nested too deeply") from None
        except ValueError as e:
            raise PolicyError(
                f"invalid JSON at line {getattr(e, 'lineno', '?')}: {getattr(e, 'msg', e)}"
            ) from None
        if not isinstance(doc, dict):
            raise PolicyError("does not contain a root object")
    else:
        doc = _parse_hcl(text)
    for key in doc:
        if key not in _TOP_KEYS:
            raise PolicyError(f"invalid key {json.dumps(key)}")
    values = _Values(hcl=not is_json)
    if "name" in doc:
        values.string(doc["name"], "name")
    items = _json_path_items(doc) if is_json else _hcl_path_items(doc, values)
    rules = tuple(_parse_rule(pattern, body, values) for pattern, body in items)
    return Policy(name=name, raw=text, rules=rules)


# ---------------------------------------------------------------------------------------------
# Matching


def _blen(s: str) -> int:
    # Vault compares Go byte lengths/offsets; use UTF-8 lengths so priorities agree exactly.
    return len(s.encode("utf-8", "surrogatepass"))


def _merge(table: dict[str, int], key: str, bits: int) -> None:
    """Vault's NewACL merge: an existing deny stays; a new deny replaces; else union."""
    existing = table.get(key)
    if existing is None:
        table[key] = bits
    elif existing & _DENY:
        return
    elif bits & _DENY:
        table[key] = _DENY
    else:
        table[key] = existing | bits


_Priority = tuple[int, bool, int, int, bytes]


class ACL:
    """The compiled rules of a set of policies. ``root`` in the set grants everything."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.root = any(p.name == "root" for p in policies)
        self._exact: dict[str, int] = {}
        self._prefix: dict[str, int] = {}
        self._segment: dict[str, int] = {}  # full pattern (a trailing "*" kept) -> bits
        for policy in policies:
            for rule in policy.rules:
                if rule.templated:
                    continue
                if rule.segment_wildcards:
                    _merge(self._segment, rule.path, rule.bits)
                elif rule.path.endswith("*"):
                    _merge(self._prefix, rule.path[:-1], rule.bits)
                else:
                    _merge(self._exact, rule.path, rule.bits)
        # Longest prefix first, for the longest-prefix lookup.
        self._prefix_order = sorted(self._prefix, key=len, reverse=True)
        self._segment_parsed = [self._describe(p) for p in self._segment]

    @staticmethod
    def _describe(full: str) -> tuple[str, bool, list[str], int]:
        is_prefix = full.endswith("*")
        pattern = full[:-1] if is_prefix else full
        return full, is_prefix, pattern.split("/"), full.encode("utf-8", "surrogatepass").find(b"+")

    def _longest_prefix(self, path: str) -> str | None:
        for prefix in self._prefix_order:
            if path.startswith(prefix):
                return prefix
        return None

    def _non_exact(self, path: str) -> int | None:
        """Vault's CheckAllowedFromNonExactPaths: the best glob/``+`` rule matching ``path``."""
        best: tuple[_Priority, int] | None = None
        prefix = self._longest_prefix(path)
        if prefix is not None:
            if not self._segment:
                return self._prefix[prefix]
            best = ((_blen(prefix), False, 0, _blen(prefix), prefix.encode()), self._prefix[prefix])
        if not self._segment:
            return None
        parts = path.split("/")
        for full, is_prefix, acl_parts, first_wc in self._segment_parsed:
            if len(parts) < len(acl_parts):
                continue
            # Threat: a `+` rule must not grant a deeper path ("a/+" must not match "a/b/c"):
            # without a trailing glob the segment counts must be equal.
            if not is_prefix and len(acl_parts) != len(parts):
                continue
            wildcards = 0
            last = len(acl_parts) - 1
            matched = True
            for i, acl_part in enumerate(acl_parts):
                if acl_part == "+":
                    wildcards += 1
                elif acl_part == parts[i] or (is_prefix and i == last and parts[i].startswith(acl_part)):
                    pass  # a literal segment, or the glob's last partial segment
                else:
                    matched = False
                    break
            if not matched:
                continue
            wc_path = full[:-1] if is_prefix else full
            prio: _Priority = (first_wc, not is_prefix, -wildcards, _blen(wc_path), wc_path.encode())
            if best is None or prio > best[0]:
                best = (prio, self._segment[full])
        return None if best is None else best[1]

    def _lookup(self, path: str, operation: str) -> int | None:
        path = path.lstrip("/")
        bits = self._exact.get(path)
        if bits is not None:
            return bits
        if operation == "list":
            # A list of "dir/" is granted by an exact rule on "dir".
            bits = self._exact.get(path.removesuffix("/"))
            if bits is not None:
                return bits
        bits = self._non_exact(path)
        if bits is None and operation == "list" and path.endswith("/"):
            # As OpenBao 2.7: when no glob or "+" rule matches "dir/", the rules matching "dir" decide
            # ("secret/metadata/+" grants the list of "secret/metadata/app/"). A rule that matches
            # "dir/" itself (a deny included) is never overridden by this fallback.
            bits = self._non_exact(path[:-1])
        return bits

    def capabilities(self, path: str) -> set[str]:
        """What this ACL grants on ``path`` (sys/capabilities-self); ``{"deny"}`` if nothing."""
        if self.root:
            return {"root"}
        # Evaluated as a list (so "dir/" finds an exact rule on "dir"), as Vault does; checked
        # against a real OpenBao in the tests.
        bits = self._lookup(path, "list") or 0
        caps = {c for c in _REPORT_ORDER if bits & _BITS[c]}
        if bits & _DENY or not caps:
            return {"deny"}
        return caps

    def allowed(self, path: str, operation: Operation, sudo: bool = False) -> bool:
        """Whether ``operation`` on ``path`` is granted; ``sudo``: the path also requires sudo."""
        if self.root:
            return True
        bits = self._lookup(path, operation)
        if bits is None or bits & _DENY:
            return False
        if sudo and not bits & _SUDO:
            return False
        need = _BITS.get(operation)
        return need is not None and bool(bits & need)

    def has_sudo(self, path: str, operation: Operation = "update") -> bool:
        """Root, or the rule chosen for ``path`` grants ``sudo`` (Vault's RootPrivs)."""
        if self.root:
            return True
        bits = self._lookup(path, operation)
        return bits is not None and not bits & _DENY and bool(bits & _SUDO)


# Vault's (OpenBao 2.x) built-in default policy, verbatim. Its identity-templated rules are
# skipped for tokens without an entity, as Vault skips them.
DEFAULT_POLICY: Final = """
# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own entity by id or name
path "identity/entity/id/{{identity.entity.id}}" {
  capabilities = ["read"]
}
path "identity/entity/name/{{identity.entity.name}}" {
  capabilities = ["read"]
}


# Allow a token to look up its resultant ACL from all policies. This is useful
# for UIs. It is an internal path because the format may change at any time
# based on how the internal ACL features and capabilities change.
path "sys/internal/ui/resultant-acl" {
    capabilities = ["read"]
}

# Allow a token to renew a lease via lease_id in the request body; old path for
# old clients, new path for newer
path "sys/leases/renew" {
    capabilities = ["update"]
}

# Allow looking up lease properties. This requires knowing the lease ID ahead
# of time and does not divulge any sensitive information.
path "sys/leases/lookup" {
    capabilities = ["update"]
}

# Allow a token to manage its own cubbyhole
path "cubbyhole/*" {
    capabilities = ["create", "read", "update", "delete", "list"]
}

# Allow a token to wrap arbitrary values in a response-wrapping token
path "sys/wrapping/wrap" {
    capabilities = ["update"]
}

# Allow a token to look up the creation time and TTL of a given
# response-wrapping token
path "sys/wrapping/lookup" {
    capabilities = ["update"]
}

# Allow a token to unwrap a response-wrapping token. This is a convenience to
# avoid client token swapping since this is also part of the response wrapping
# policy.
path "sys/wrapping/unwrap" {
    capabilities = ["update"]
}

# Allow general purpose tools
path "sys/tools/hash" {
    capabilities = ["update"]
}
path "sys/tools/hash/*" {
    capabilities = ["update"]
}

# Allow a token to make requests to the Authorization Endpoint for OIDC providers.
path "identity/oidc/provider/+/authorize" {
    capabilities = ["read", "update"]
}
"""
