"""The egress allow/deny policy: which hosts and ports the enclave may connect to.

Rules come from ``egress.allow`` and ``egress.deny`` in enclaver.yaml and mean what they mean to
Enclaver, so an existing manifest keeps its meaning:

* a rule is an IP address (``169.254.169.254``), a CIDR (``10.0.0.0/8``, ``2001:db8::/32``) or a
  domain pattern (``kms.*.amazonaws.com``);
* domain patterns match label by label from the right, ignoring case. ``*`` matches exactly one
  label and ``**`` one or more labels, so ``*.example.com`` matches ``a.example.com`` but not
  ``example.com`` or ``a.b.example.com``, and ``**.example.com`` matches both of the last two but
  still not ``example.com``. There are no partial-label globs: ``foo*.com`` is a rule error;
* IP targets are matched against IP/CIDR rules only, names against domain patterns only;
* the decision is *allowed by some allow rule and denied by no deny rule*. No rule: denied.

Stricter than Enclaver, each on purpose:

* ``**`` must be the leftmost label. (Enclaver stops comparing at ``**``, so there ``a.**.com``
  silently means ``**.com``; here it is an error.)
* A trailing dot is dropped (``example.com.`` is ``example.com``), in rules and targets.
* Names are IDNA-normalised before matching (UTS #46 mapping, then IDNA 2008 A-labels via the
  ``idna`` package, which aiohttp already requires): ``bücher.example`` and
  ``xn--bcher-kva.example`` are the same name; full-width letters and dots (U+3002, U+FF0E, U+FF61) map
  to ASCII; a look-alike such as a Cyrillic U+0430 for the 'a' of ``amazonaws`` becomes an ``xn--`` label
  and matches nothing written in ASCII. Invalid IDNA is refused. Invisible format characters
  (zero-width space, soft hyphen, bidi controls) are refused rather than silently dropped.
* Every spelling of an IPv4 address that ``inet_aton(3)`` accepts (what libc and so the parent's
  resolver would connect to) is an IP, not a name: ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and
  ``127.1`` are all 127.0.0.1 as targets. In rules only dotted-quad is accepted, so a rule can
  never be misread. A name whose last label is all digits (``1.2.3.4.5``) is refused.
* An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is the IPv4 address it is: IPv4 rules allow
  it (``::/0`` does not) and deny rules in either family deny it. A rule written in mapped form
  (``::ffff:10.0.0.0/104``) is the IPv4 network (``10.0.0.0/8``). For deny rules, the IPv4 address
  embedded in an IPv4-compatible (``::10.0.0.1``), NAT64 (``64:ff9b::/96``) or 6to4
  (``2002::/16``) address is checked as well.
* A rule may restrict the port: ``kms.*.amazonaws.com:443``, ``10.0.0.0/8:5432``,
  ``169.254.169.254:80``. IPv6 addresses and CIDRs take the port after brackets:
  ``[2001:db8::/32]:443`` or ``[2001:db8::1]:443``; a bare IPv6 rule (``2001:db8::/32``) has no
  port (``::1:443`` is the address ``::1:443``). A rule without a port matches every port.
  When the target's port is unknown (``check(host)``), an allow rule with a port does not match
  and a deny rule with a port does (fail closed).
* After DNS resolution, :meth:`EgressPolicy.check_addresses` re-checks every resolved address
  against the IP/CIDR deny rules, so a name cannot launder a denied address.
* Hosts are refused (denied) when empty, over 253 characters or with a label over 63, or when
  they contain whitespace, control characters, ``@``, ``/``, ``\\``, ``%`` (percent-encoding or an
  IPv6 zone) or other characters that have no place in a host name.

Matching is precompiled: exact names are one dict lookup, wildcard patterns are reversed label
tuples, CIDRs are (network, mask) integers. :meth:`EgressPolicy.check` does no I/O.
"""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import urlsplit

import idna

if TYPE_CHECKING:
    from sidecar.config import Manifest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NAME = 253  # RFC 1035: 255 octets on the wire, 253 characters in text form without the root dot
MAX_LABEL = 63
MAX_INPUT = 1024  # refuse before doing any Unicode work on something absurd
SCHEME_PORTS: Final = {"http": 80, "https": 443}

_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdef")
# Letters, digits, hyphen, plus underscore: real hostnames (e.g. some internal services) use it,
# and since matching is exact it widens nothing.
_LABEL_CHARS = _LOWER | _DIGITS | frozenset("-_")
# Everything a host, IPv6 literal or rule may contain; anything else gets a specific message.
_HOST_CHARS = _LABEL_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ.:[]*/")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_SPECIAL_CHARS: Final = {
    "@": "'@' is not allowed (user@host userinfo is not part of a host)",
    "/": "'/' is not allowed in a host (a URL path or a CIDR is not a host)",
    "\\": "'\\' is not allowed in a host",
    "%": "'%' is not allowed (percent-encoding and IPv6 zone ids are not accepted)",
}


class PolicyError(ValueError):
    """A bad rule or target. The message says what is wrong and why, on one line."""


# --------------------------------------------------------------------------- host normalisation


def _char_problem(text: str, *, wildcards: bool, cidr: bool = False) -> str | None:
    """Why ``text`` cannot be a host (or a rule when ``wildcards``), or None when every char may be."""
    if text.isascii() and set(text) <= _HOST_CHARS:
        if "*" in text and not wildcards:
            return "'*' is a wildcard; a target must be a concrete host name"
        if "/" in text and not cidr:
            return _SPECIAL_CHARS["/"]
        return None
    for ch in text:
        if ch in _HOST_CHARS:
            if ch == "*" and not wildcards:
                return "'*' is a wildcard; a target must be a concrete host name"
            if ch == "/" and not cidr:
                return _SPECIAL_CHARS["/"]
            continue
        if ch.isspace():
            return f"whitespace (U+{ord(ch):04X}) is not allowed in a host"
        category = unicodedata.category(ch)
        if category == "Cc":
            return f"control character U+{ord(ch):04X} is not allowed in a host"
        if category == "Cf":
            return f"invisible format character U+{ord(ch):04X} is not allowed in a host"
        if ch in _SPECIAL_CHARS:
            return _SPECIAL_CHARS[ch]
        if ch.isascii():
            return f"character {ch!r} is not allowed in a host name"
    return None


def _map(text: str, *, wildcards: bool) -> str:
    """Check characters and apply the UTS #46 mapping (case folding, full-width forms and dots)."""
    if not text:
        raise PolicyError("empty host")
    if len(text) > MAX_INPUT:
        raise PolicyError(f"host is {len(text)} characters long; a name's limit is {MAX_NAME}")
    problem = _char_problem(text, wildcards=wildcards)
    if problem:
        raise PolicyError(problem)
    if text.isascii():
        return text.lower()
    try:
        mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise PolicyError(f"invalid international name: {exc}") from None
    # Full-width forms map to ASCII punctuation (U+FF20 to '@', U+FF0F to '/'): check again.
    problem = _char_problem(mapped, wildcards=wildcards)
    if problem:
        raise PolicyError(f"{problem} (after Unicode normalisation)")
    return mapped


def _is_numeric_label(label: str) -> bool:
    """A label inet_aton would read as a number: decimal, octal (leading 0) or 0x-hex."""
    if label[:2] == "0x":
        return all(c in _HEX for c in label[2:])
    return all(c in _DIGITS for c in label)


def _a_label(label: str) -> str:
    """Validate one lower-case label and return its ASCII (A-label) form."""
    if label.isascii():
        if not set(label) <= _LABEL_CHARS:
            bad = next(c for c in label if c not in _LABEL_CHARS)
            raise PolicyError(f"label {label!r}: character {bad!r} is not allowed in a host name")
        if label[0] == "-" or label[-1] == "-":
            raise PolicyError(f"label {label!r} starts or ends with '-'")
        if label.startswith("xn--"):
            # A punycode label must decode, and be the canonical encoding of what it decodes to,
            # so two spellings of one name cannot exist.
            try:
                canonical = idna.alabel(idna.ulabel(label)).decode("ascii")
            except (idna.IDNAError, UnicodeError) as exc:
                raise PolicyError(f"label {label!r} is not valid IDNA punycode: {exc}") from None
            if canonical != label:
                raise PolicyError(f"label {label!r} is not canonical IDNA (expected {canonical!r})")
    else:
        try:
            label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise PolicyError(f"label {label!r} is not a valid international name: {exc}") from None
    if len(label) > MAX_LABEL:
        raise PolicyError(
            f"label {label[:20]!r}... is {len(label)} characters long; the limit is {MAX_LABEL}"
        )
    return label


def _parse_host(text: str, *, rule: bool = False) -> IPAddress | tuple[str, ...]:
    """A host (or a rule's host part): an IP address, or the name's A-labels left to right.

    Raises PolicyError with the reason. With ``rule``, ``*`` and a leftmost ``**`` are accepted
    as labels and IPv4 must be written as a dotted quad.
    """
    mapped = _map(text, wildcards=rule)
    if mapped[0] == "[":
        if mapped[-1] != "]":
            raise PolicyError("'[' without a closing ']'")
        return _ipv6(mapped[1:-1])
    if ":" in mapped or "[" in mapped or "]" in mapped:
        return _ipv6(mapped)
    if mapped[-1] == "." and len(mapped) > 1:
        mapped = mapped[:-1]  # the root label: example.com. is example.com
    labels = mapped.split(".")
    if all(labels) and all(_is_numeric_label(label) for label in labels):
        return _ipv4(mapped, rule=rule)
    if labels[-1] and all(c in _DIGITS for c in labels[-1]):
        raise PolicyError(
            f"the last label {labels[-1]!r} is all digits: neither a host name nor a dotted-quad IPv4 address"
        )
    out: list[str] = []
    for i, label in enumerate(labels):
        if not label:
            hint = " (to match every subdomain write '**.example.com')" if rule and i == 0 else ""
            raise PolicyError(f"empty label in {mapped!r}{hint}")
        if "*" in label:
            if label not in ("*", "**"):
                raise PolicyError(
                    f"label {label!r} mixes '*' with other characters: '*' (one label) and '**' "
                    "(one or more labels) must be whole labels"
                )
            if label == "**" and i != 0:
                raise PolicyError("'**' must be the leftmost label (like '**.example.com')")
            out.append(label)
            continue
        out.append(_a_label(label))
    length = sum(map(len, out)) + len(out) - 1
    if length > MAX_NAME:
        raise PolicyError(f"name is {length} characters long; the limit is {MAX_NAME}")
    return tuple(out)


def _ip(text: str) -> IPAddress:
    """A strict IPv4 or IPv6 address (zone ids allowed: resolvers return them). Raises ValueError.

    inet_pton is the strict C parser (dotted quad without leading zeros, RFC 4291 text); trying it
    first skips ipaddress's slower string parsing on the hot path.
    """
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError):
        return ipaddress.ip_address(text)
    return ipaddress.IPv6Address(packed) if family == socket.AF_INET6 else ipaddress.IPv4Address(packed)


def _ipv6(text: str) -> ipaddress.IPv6Address:
    try:
        address = _ip(text)
        if isinstance(address, ipaddress.IPv6Address) and not address.scope_id:
            return address
        raise ValueError(text)
    except ValueError:
        raise PolicyError(
            f"{text!r} is not an IPv6 address (':' only appears in IPv6 addresses; "
            "give a port separately or as [addr]:port)"
        ) from None


def _ipv4(text: str, *, rule: bool) -> ipaddress.IPv4Address:
    try:
        address = _ip(text)
        if isinstance(address, ipaddress.IPv4Address):
            return address
    except ValueError:
        pass
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):
        raise PolicyError(f"{text!r} looks like an IPv4 address but is not a valid one") from None
    address = ipaddress.IPv4Address(packed)
    if rule:
        raise PolicyError(
            f"{text!r} is a non-standard IPv4 spelling (inet_aton reads it as {address}); write {address}"
        )
    return address


def normalize_host(host: str) -> str:
    """The canonical form of a target host: lower-case A-label name, or an IP address.

    Connect to this form, not the raw text: it is the name the policy checked. Raises PolicyError.
    """
    parsed = _parse_host(host)
    return _show_ip(parsed) if isinstance(parsed, IPAddress) else ".".join(parsed)


def _show_ip(address: IPAddress) -> str:
    """Canonical text; an IPv4-mapped address keeps its dotted quad (::ffff:10.0.0.1)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return address.compressed


def _display(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


# --------------------------------------------------------------------------- rules


def _port(text: str, where: str) -> int:
    if not text:
        raise PolicyError(f"empty port after ':' in {where!r}")
    if not text.isascii() or not text.isdigit() or (text[0] == "0" and text != "0"):
        raise PolicyError(f"port {text!r} must be a decimal number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise PolicyError(f"port {port} is out of range (1 to 65535)")
    return port


def _network(text: str) -> IPNetwork:
    """A CIDR rule. Host bits may be set (10.0.0.1/8 is 10.0.0.0/8), as Enclaver accepts it."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise PolicyError(f"{text!r} is not a valid CIDR: {exc}") from None
    return _unmap_network(net)


def _unmap_network(net: IPNetwork) -> IPNetwork:
    # A rule written as IPv4-mapped IPv6 means the IPv4 network (targets are unmapped too).
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


@dataclass(frozen=True)
class Rule:
    """One parsed rule: an IP network, or a domain pattern (labels left to right), and a port."""

    text: str
    network: IPNetwork | None = None
    labels: tuple[str, ...] = ()
    port: int | None = None

    @property
    def kind(self) -> Literal["ip", "name"]:
        return "ip" if self.network is not None else "name"

    @property
    def pattern(self) -> str:
        """The normalised rule without its port: ``10.0.0.0/8``, ``xn--bcher-kva.example``."""
        if self.network is not None:
            net = self.network
            return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return ".".join(self.labels)

    def __str__(self) -> str:
        return self.text

    def port_matches(self, port: int | None, *, deny: bool) -> bool:
        if self.port is None:
            return True
        if port is None:
            return deny  # unknown port: a port-restricted deny still applies, an allow does not
        return self.port == port

    def matches_name(self, labels: Sequence[str]) -> bool:
        """``labels`` left to right, already normalised."""
        pattern = self.labels
        count = len(pattern)
        if not count:
            return False
        if pattern[0] == "**":
            if len(labels) < count:
                return False
            first = 1
        elif len(labels) != count:
            return False
        else:
            first = 0
        offset = len(labels) - count  # '**' absorbs the extra labels on the left
        for i in range(count - 1, first - 1, -1):  # from the right: mismatches are found early
            p = pattern[i]
            if p != "*" and p != labels[offset + i]:
                return False
        return True


def parse_rule(text: str) -> Rule:
    """Parse one allow/deny rule. Raises PolicyError naming the problem.

    ``HOST``, ``HOST:PORT``, ``A.B.C.D[/N][:PORT]``, ``IPV6[/N]`` or ``[IPV6[/N]][:PORT]``, where
    HOST is a name or a domain pattern with ``*``/``**`` labels.
    """
    if not isinstance(text, str):
        raise PolicyError(f"a rule must be a string, not {type(text).__name__}")
    if not text.strip():
        raise PolicyError("empty rule")
    if text.strip() != text:
        raise PolicyError("rule has surrounding whitespace")
    if "://" in text:
        raise PolicyError("a rule is a host, IP or CIDR, not a URL (write only the host, e.g. example.com)")
    problem = _char_problem(text, wildcards=True, cidr=True)
    if problem:
        raise PolicyError(problem)
    port: int | None = None
    host = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise PolicyError("'[' without a closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if rest[0] != ":":
                raise PolicyError(f"unexpected {rest!r} after ']' (expected :PORT)")
            port = _port(rest[1:], text)
        if ":" not in host:
            raise PolicyError(
                f"brackets are only for IPv6 addresses; write {host}" + (f":{port}" if port else "")
            )
        return Rule(text, network=_network(host), port=port)
    colons = text.count(":")
    if colons == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    elif colons > 1:
        try:
            return Rule(text, network=_network(text))
        except PolicyError as exc:
            raise PolicyError(f"{exc} (an IPv6 rule with a port is written [2001:db8::/32]:443)") from None
    if not host:
        raise PolicyError("empty host before ':'")
    if "/" in host:
        # CIDRs are plain ASCII; full-width digits and the like are no part of a network rule.
        address = host.split("/", 1)[0]
        if ":" not in address and not set(address) <= _DIGITS | {"."}:
            raise PolicyError(f"'/' is only allowed in a CIDR such as 10.0.0.0/8, and {host!r} is not one")
        return Rule(text, network=_network(host), port=port)
    parsed = _parse_host(host, rule=True)
    if isinstance(parsed, IPAddress):
        return Rule(text, network=_unmap_network(ipaddress.ip_network(parsed)), port=port)
    return Rule(text, labels=parsed, port=port)


# --------------------------------------------------------------------------- targets


def parse_target(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``, bare ``v6``, or an http(s) URL.

    Returns the normalised host (see :func:`normalize_host`) and the port (None when not given;
    a URL's scheme supplies its default port). Raises PolicyError.
    """
    if not text or not text.strip():
        raise PolicyError("empty target")
    if text.strip() != text:
        raise PolicyError("target has surrounding whitespace")
    for ch in text:
        # urlsplit silently deletes tabs and newlines; refuse them (and their kin) before it can.
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
            raise PolicyError(f"target contains whitespace or an invisible character (U+{ord(ch):04X})")
    if "://" in text:
        return _parse_url(text)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise PolicyError("'[' without a closing ']'")
        rest = text[end + 1 :]
        if rest and rest[0] != ":":
            raise PolicyError(f"unexpected {rest!r} after ']' (expected :PORT)")
        return normalize_host(text[: end + 1]), _port(rest[1:], text) if rest else None
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not host:
            raise PolicyError("empty host before ':'")
        return normalize_host(host), _port(port_text, text)
    return normalize_host(text), None


def _parse_url(text: str) -> tuple[str, int | None]:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise PolicyError(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEME_PORTS:
        raise PolicyError(f"unsupported URL scheme {scheme!r}: use http or https, or give host:port")
    if "@" in parts.netloc:
        # userinfo is how "https://allowed.example@evil.example/" fools a reader; refuse it outright.
        raise PolicyError("URL has user info ('user@'); give the URL without it")
    host = parts.hostname
    if not host:
        raise PolicyError("URL has no host")
    if port == 0:
        raise PolicyError("port 0 is out of range (1 to 65535)")
    return normalize_host(f"[{host}]" if ":" in host else host), port or SCHEME_PORTS[scheme]


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """The outcome of a check. ``rule`` is the rule text that decided, None for default deny."""

    allowed: bool
    rule: str | None
    reason: str  # "allowed by allow rule 'X'", "denied by deny rule 'Y'", "denied: no allow rule matches"
    host: str = ""  # the normalised host that was checked ("" when the host itself was bad)
    port: int | None = None
    because: str = ""  # the reason without its verdict: "by allow rule 'X'", "no allow rule matches"

    def __bool__(self) -> bool:
        return self.allowed

    def summary(self, target: str | None = None) -> str:
        """One line for people: ``allowed: kms.us-east-1.amazonaws.com:443 by allow rule '...'``."""
        verdict = "allowed" if self.allowed else "denied"
        shown = target if target is not None else _display(self.host, self.port) if self.host else "?"
        # A Decision built by hand may lack ``because``: recover it from the reason.
        because = self.because or self.reason.removeprefix(verdict).removeprefix(":").strip()
        sep = " " if because.startswith("by ") else ": "
        return f"{verdict}: {shown}{sep}{because}"


def _decision(allowed: bool, rule: Rule | None, because: str, host: str, port: int | None) -> Decision:
    verdict = "allowed" if allowed else "denied"
    sep = " " if because.startswith("by ") else ": "
    return Decision(
        allowed=allowed,
        rule=rule.text if rule else None,
        reason=f"{verdict}{sep}{because}",
        host=host,
        port=port,
        because=because,
    )


_NetEntry = tuple[int, int, int, Rule]  # network as int, mask as int, rule index, rule


class _RuleSet:
    """One side (allow or deny), precompiled. Lookups return the earliest matching rule."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self.exact: dict[tuple[str, ...], list[tuple[int, Rule]]] = {}
        self.wild: list[tuple[int, Rule]] = []
        self.nets: dict[int, list[_NetEntry]] = {4: [], 6: []}
        for index, rule in enumerate(self.rules):
            if rule.network is not None:
                net = rule.network
                self.nets[net.version].append((int(net.network_address), int(net.netmask), index, rule))
            elif "*" in rule.labels or "**" in rule.labels:
                self.wild.append((index, rule))
            else:
                self.exact.setdefault(rule.labels, []).append((index, rule))

    def match_name(
        self, labels: tuple[str, ...], port: int | None, *, deny: bool
    ) -> tuple[Rule | None, Rule | None]:
        """(first rule matching host and port, first rule matching the host only)."""
        best: tuple[int, Rule] | None = None
        near: tuple[int, Rule] | None = None
        candidates = self.exact.get(labels, [])
        for index, rule in candidates:
            if rule.port_matches(port, deny=deny):
                best = (index, rule)
                break
            near = near or (index, rule)
        for index, rule in self.wild:
            if best is not None and index > best[0]:
                break
            if rule.matches_name(labels):
                if rule.port_matches(port, deny=deny):
                    best = (index, rule)
                    break
                if near is None or index < near[0]:
                    near = (index, rule)
        return (best[1] if best else None), (near[1] if near else None)

    def match_ip(
        self, address: IPAddress, port: int | None, *, deny: bool
    ) -> tuple[Rule | None, Rule | None]:
        value = int(address)
        near: Rule | None = None
        for network, mask, _, rule in self.nets[address.version]:
            if value & mask == network:
                if rule.port_matches(port, deny=deny):
                    return rule, near
                near = near or rule
        return None, near


def _unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address is; any other address without its zone id."""
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or ipaddress.IPv6Address(int(address))
    return address


_LOOPBACK_VIEWS: Final = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def _deny_views(address: IPAddress) -> list[IPAddress]:
    """Every address a packet to ``address`` may be delivered to, for deny rules.

    The address as an IPv4 address when it is IPv4-mapped; the IPv6 address itself; the IPv4
    address embedded in a NAT64 (64:ff9b::/96), 6to4 or IPv4-compatible address; and loopback for
    the unspecified address (Linux delivers a connection to 0.0.0.0 or :: to 127.0.0.1 or ::1, so a
    rule denying loopback must deny them too).
    """
    primary = _unmapped(address)
    views: list[IPAddress] = [primary]
    if primary.is_unspecified:
        views.extend(_LOOPBACK_VIEWS)
    if isinstance(address, ipaddress.IPv6Address):
        bare = ipaddress.IPv6Address(int(address))  # without a zone id
        if primary != bare:
            views.append(bare)
        if primary == bare:
            if bare in _NAT64 or (bare in _COMPAT and int(bare) > 1):
                views.append(ipaddress.IPv4Address(int(bare) & 0xFFFFFFFF))
            if bare.sixtofour is not None:
                views.append(bare.sixtofour)
    return views


class EgressPolicy:
    """Allow/deny rules, precompiled. ``check`` is pure and O(rules); build once, share freely."""

    CACHE_SIZE = 4096

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self.allow_rules = self._parse_all(allow, "allow")
        self.deny_rules = self._parse_all(deny, "deny")
        self._allow = _RuleSet(self.allow_rules)
        self._deny = _RuleSet(self.deny_rules)
        # Decisions are pure functions of (host, port) and the immutable rules, so repeated
        # targets (the common case for a proxy) cost one dict lookup. Bounded: cleared when full.
        self._cache: dict[tuple[str, int | None], Decision] = {}

    @staticmethod
    def _parse_all(texts: Sequence[str], side: str) -> tuple[Rule, ...]:
        if isinstance(texts, str):
            raise PolicyError(f"{side}: expected a list of rules, got a string")
        rules = []
        for index, text in enumerate(texts):
            try:
                rules.append(parse_rule(text))
            except PolicyError as exc:
                raise PolicyError(f"{side}[{index}] {text!r}: {exc}") from None
        return tuple(rules)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> EgressPolicy:
        return cls(manifest.egress.allow, manifest.egress.deny)

    def __repr__(self) -> str:
        allow, deny = [r.text for r in self.allow_rules], [r.text for r in self.deny_rules]
        return f"EgressPolicy(allow={allow}, deny={deny})"

    def check(self, host: str, port: int | None = None) -> Decision:
        """Decide for ``host`` (a name, an IP, or ``[IPv6]``) and ``port``. Never raises: a bad host
        or port is a deny whose reason says what is wrong."""
        if not isinstance(host, str):
            return _decision(False, None, f"bad host: expected a string, got {type(host).__name__}", "", port)
        if port is not None and (type(port) is not int or not 1 <= port <= 65535):
            return _decision(False, None, f"bad port {port!r}: must be from 1 to 65535", "", None)
        key = (host, port)
        decision = self._cache.get(key)
        if decision is None:
            decision = self._decide(host, port)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def _decide(self, host: str, port: int | None) -> Decision:
        try:
            parsed = _parse_host(host)
        except PolicyError as exc:
            return _decision(False, None, f"bad host: {exc}", "", port)
        if isinstance(parsed, IPAddress):
            return self._check_ip(parsed, port)
        name = ".".join(parsed)
        rule, _ = self._deny.match_name(parsed, port, deny=True)
        if rule is not None:
            return _decision(False, rule, f"by deny rule {rule.text!r}", name, port)
        rule, near = self._allow.match_name(parsed, port, deny=False)
        if rule is not None:
            return _decision(True, rule, f"by allow rule {rule.text!r}", name, port)
        return _decision(False, None, _no_allow(near, port), name, port)

    def _check_ip(self, address: IPAddress, port: int | None) -> Decision:
        shown = _show_ip(address)
        primary = _unmapped(address)
        rule, view = self._denied_ip(address, port)
        if rule is not None:
            via = "" if view in (primary, address) else f" (it delivers to {view})"
            return _decision(False, rule, f"by deny rule {rule.text!r}{via}", shown, port)
        rule, near = self._allow.match_ip(primary, port, deny=False)
        if rule is not None:
            return _decision(True, rule, f"by allow rule {rule.text!r}", shown, port)
        return _decision(False, None, _no_allow(near, port), shown, port)

    def _denied_ip(self, address: IPAddress, port: int | None) -> tuple[Rule | None, IPAddress]:
        """The first deny rule matching any address the packet may end up at."""
        for view in _deny_views(address):
            rule, _ = self._deny.match_ip(view, port, deny=True)
            if rule is not None:
                return rule, view
        return None, address

    def named_allow_rule(self, name: str, port: int | None) -> Rule | None:
        """The first allow rule that is exactly ``name`` (no wildcard) and permits ``port``."""
        for _, rule in self._allow.exact.get((name,), []):
            if rule.port_matches(port, deny=False):
                return rule
        return None

    def check_addresses(self, host: str, port: int | None, addresses: Sequence[str]) -> Decision:
        """Check ``host``, then every address it resolved to against the IP/CIDR deny rules.

        Any denied address denies the connection (the resolver may hand out any of them), and so
        does an empty or unparseable address list: fail closed.
        """
        decision = self.check(host, port)
        if not decision.allowed:
            return decision
        if isinstance(addresses, str) or not addresses:
            return _decision(False, None, "no resolved addresses to check", decision.host, port)
        for text in addresses:
            try:
                address = _ip(text)
            except (ValueError, TypeError):
                return _decision(
                    False, None, f"resolved address {text!r} is not an IP address", decision.host, port
                )
            rule, _ = self._denied_ip(address, port)
            if rule is not None:
                because = f"resolves to {_unmapped(address)}, denied by deny rule {rule.text!r}"
                return _decision(False, rule, because, decision.host, port)
        return decision


def only_a_named_rule_allows(policy: EgressPolicy, decision: Decision, name: str, why: str) -> Decision:
    """``decision`` (made by ``policy``), unless no allow rule that is exactly ``name`` permits it.

    For the special name ``host`` (the parent's own loopback) a wildcard such as ``**`` or ``*:443``
    must not open the parent's local services by accident: only ``allow: [host]`` (or ``host:PORT``)
    does. Both the enclave's proxy and the parent's re-check apply this.
    """
    if not decision.allowed or decision.host != name:
        return decision
    # Not just the deciding rule: it is the earliest match, so a wildcard listed first hides a named
    # rule after it (allow: ['**', 'host:22']). No deny rule matched already. When the deciding rule
    # is the named one, this finds that rule and makes the same decision.
    rule = policy.named_allow_rule(name, decision.port)
    if rule is not None:
        return _decision(True, rule, f"by allow rule {rule.text!r}", name, decision.port)
    return _decision(
        False, None, f"{why}; only an allow rule naming {name!r} permits it", name, decision.port
    )


def _no_allow(near: Rule | None, port: int | None) -> str:
    if near is None:
        return "no allow rule matches"
    if port is None:
        return f"no allow rule matches (allow rule {near.text!r} needs port {near.port}; give host:port)"
    return f"no allow rule matches port {port} (allow rule {near.text!r} is for port {near.port})"
