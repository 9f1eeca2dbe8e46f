"""Token auth (Vault's ``auth/token/*``) and the ACL policy store.

Tokens are ``hvs.`` + 24 random URL-safe characters (144 bits). Only their SHA-256 is stored, so a
copy of the (already encrypted) storage does not yield usable tokens; the root token too, whose
plaintext ``create_root`` returns exactly once. A high-entropy random secret needs no salt or slow
hash: SHA-256 is preimage-resistant and brute force over 2**144 is out of reach.

Storage layout (inside the :class:`JsonStore` given, which encrypts values and hides key names):

* ``id/<sha256 hex>``: the token entry;
* ``accessor/<accessor>``: ``{"id_hash": ...}``, for lookup/revoke by accessor;
* ``parent/<parent accessor>/<child accessor>``: the child index, so revoking a token revokes
  its whole subtree (``create-orphan`` children have no parent and survive).

Behaviour and response shapes follow Vault/OpenBao (compared against a real ``bao`` server):
default TTL 768h (Vault's system default and max), ``explicit_max_ttl`` caps renewals, a child's
policies must be a subset of its parent's unless the parent is root or has ``sudo`` on the create
path, a restricted-use token cannot create children, the last use of a token revokes it.
Deliberate difference: a child's TTL is capped at its parent's remaining TTL (Vault lets the child
carry a longer TTL but its expiration manager revokes the child when the parent expires; there is
no expiration manager here, so the cap gives the same lifetime without one).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final, Literal, Protocol

from sidecar.logs import event

from .acl import ACL, DEFAULT_POLICY, Policy, PolicyError, parse_policy
from .durations import MAX_SECONDS, duration_seconds, format_duration
from .logical import LogicalRequest, LogicalResponse, Operation, VaultError, permission_denied

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "hvs."  # noqa: S105 - a format prefix, not a secret
DEFAULT_TTL: Final = 768 * 3600  # Vault's default_lease_ttl and max_lease_ttl (32 days)
MAX_TTL: Final = 768 * 3600
MAX_TOKEN_LENGTH: Final = 512  # longer presented tokens are refused before hashing
_ACCESSOR_ALPHABET: Final = string.ascii_letters + string.digits
_DISPLAY_SANITIZE: Final = re.compile(r"[^a-zA-Z0-9-]")
_POLICY_NAME: Final = re.compile(r"^[^/\x00-\x1f\x7f]{1,128}$")
_ACL_CACHE_SIZE: Final = 256


class JsonStoreLike(Protocol):
    """The part of :class:`barrier.JsonStore` used here (tests use an in-memory fake)."""

    async def read(self, path: str) -> dict[str, Any] | None: ...
    async def write(self, path: str, data: dict[str, Any]) -> None: ...
    async def delete(self, path: str) -> None: ...
    async def list(self, path: str = "") -> list[str]: ...
    async def update(
        self, path: str, fn: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> dict[str, Any] | None: ...


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(18)


def _new_accessor() -> str:
    return "".join(secrets.choice(_ACCESSOR_ALPHABET) for _ in range(24))


def _iso(ts: float) -> str:
    """RFC 3339 in UTC with fractional seconds, trailing zeros trimmed (Go's RFC3339Nano)."""
    text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


# ---------------------------------------------------------------------------------------------
# Durations and field coercion, as Vault's framework does for these fields.


def parse_duration(value: Any, field_name: str) -> int:
    """Vault's ParseDurationSecond: seconds as a number or digit string, ``Nd``, or a Go duration."""
    try:
        return _parse_duration(value, field_name)
    except (OverflowError, ValueError):  # 10**400, a NaN: a client's mistake, not a crash
        raise VaultError(400, f'invalid value for "{field_name}": out of range') from None


def _parse_duration(value: Any, field_name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise VaultError(400, f'invalid value for "{field_name}"')
    if isinstance(value, str):
        try:
            seconds = duration_seconds(value)
        except ValueError as exc:  # Go's own message: time: invalid duration "bogus"
            raise VaultError(400, str(exc)) from None
    elif isinstance(value, int | float):
        seconds = int(value)
    else:
        raise VaultError(400, f'invalid value for "{field_name}"')
    if abs(seconds) > MAX_SECONDS:
        raise VaultError(400, f'invalid value for "{field_name}": out of range')
    return seconds


def _field_error(name: str, kind: str) -> VaultError:
    return VaultError(
        400, f'Field validation failed: error converting input for field "{name}": not a valid {kind}'
    )


def _as_bool(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "t", "f"):
        return value.lower() in ("true", "1", "t")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _field_error(name, "bool")


def _as_int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if value is None:
        return 0
    if isinstance(value, bool):
        raise _field_error(name, "int")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        return int(value.strip())
    raise _field_error(name, "int")


def _as_str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _field_error(name, "string")
    return value


def _sanitize_policies(raw: Any) -> list[str]:
    """Vault's SanitizePolicies: trim, lowercase, drop empties, dedupe, sort."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]  # OpenBao takes a JSON string as one policy name (no comma split)
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise _field_error("policies", "list of strings")
    names = {p.strip().lower() for p in raw if p.strip()}
    for n in names:
        if not _POLICY_NAME.match(n):
            raise VaultError(400, "invalid policy name")
    return sorted(names)


def _meta(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _field_error("meta", "map of strings")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise _field_error("meta", "map of strings")
        out[str(k)] = v if isinstance(v, str) else str(v)
    return out


# ---------------------------------------------------------------------------------------------
# Token entries


@dataclass
class TokenEntry:
    id_hash: str
    accessor: str
    policies: list[str]
    parent: str | None  # the parent's accessor; None for orphans and the root token
    ttl: int  # creation TTL in seconds (0: never expires)
    expire_time: float | None
    creation_time: float
    num_uses: int  # 0: unlimited; -1: the last use is in progress (the token is already revoked)
    orphan: bool
    display_name: str
    meta: dict[str, str]
    renewable: bool
    explicit_max_ttl: int
    type: Literal["service"] = "service"
    path: str = "auth/token/create"
    # The plaintext, only in memory for the request that presented it (lookup-self shows it).
    id: str = field(default="", repr=False, compare=False)

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["id"]
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], token: str = "") -> TokenEntry:
        return cls(
            id_hash=str(doc["id_hash"]),
            accessor=str(doc["accessor"]),
            policies=[str(p) for p in doc["policies"]],
            parent=doc.get("parent"),
            ttl=int(doc["ttl"]),
            expire_time=None if doc.get("expire_time") is None else float(doc["expire_time"]),
            creation_time=float(doc["creation_time"]),
            num_uses=int(doc["num_uses"]),
            orphan=bool(doc["orphan"]),
            display_name=str(doc["display_name"]),
            meta={str(k): str(v) for k, v in (doc.get("meta") or {}).items()},
            renewable=bool(doc["renewable"]),
            explicit_max_ttl=int(doc["explicit_max_ttl"]),
            path=str(doc.get("path", "auth/token/create")),
            id=token,
        )

    def clone(self, token: str = "") -> TokenEntry:
        """A copy whose scalar fields can change independently (lists and dicts are never mutated)."""
        copy = object.__new__(TokenEntry)
        copy.__dict__.update(self.__dict__)
        copy.id = token
        return copy

    @property
    def is_root(self) -> bool:
        return "root" in self.policies

    def expired(self, now: float) -> bool:
        return self.expire_time is not None and now >= self.expire_time


def _entry_from_doc(doc: dict[str, Any]) -> TokenEntry:
    return TokenEntry.from_doc(doc)


def _policy_text(doc: dict[str, Any]) -> str:
    return str(doc["policy"])


def _unsupported_path() -> VaultError:
    return VaultError(404, "1 error occurred:\n\t* unsupported path\n\n")


def _unsupported_operation() -> VaultError:
    return VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")


_WRITE: Final = frozenset({"create", "update"})
_READ_OR_WRITE: Final = frozenset({"read", "create", "update"})
# path -> operations it serves (POST arrives as create or update depending on existence).
_ROUTES: Final[dict[str, frozenset[str]]] = {
    "create": _WRITE,
    "create-orphan": _WRITE,
    "lookup-self": _READ_OR_WRITE,
    "lookup": _READ_OR_WRITE,
    "lookup-accessor": _WRITE,
    "renew-self": _WRITE,
    "renew": _WRITE,
    "revoke": _WRITE,
    "revoke-self": _WRITE,
    "revoke-accessor": _WRITE,
}
_CREATE_FIELDS: Final = frozenset(
    {
        "policies",
        "meta",
        "no_parent",
        "no_default_policy",
        "renewable",
        "ttl",
        "explicit_max_ttl",
        "display_name",
        "num_uses",
        "type",
        "id",
        "period",
        "role_name",
        "entity_alias",
        "lease",
    }
)
_MOUNT: Final = "auth/token/"


class TokenStore:
    """Service tokens: create, look up, use, renew, revoke; and the ``auth/token/*`` API."""

    type = "token"

    def __init__(
        self, store: JsonStoreLike, policy_store: PolicyStore, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._policies = policy_store
        self._clock = clock
        self._acls: OrderedDict[tuple[tuple[str, str], ...], ACL] = OrderedDict()

    # -- storage -------------------------------------------------------------------------------

    async def _save_new(self, entry: TokenEntry) -> None:
        # Indexes first: a crash leaves at worst an index pointing at nothing, never a live token
        # its parent's revocation cannot reach.
        if entry.parent is not None:
            await self._store.write(f"parent/{entry.parent}/{entry.accessor}", {})
        await self._store.write(f"accessor/{entry.accessor}", {"id_hash": entry.id_hash})
        await self._store.write(f"id/{entry.id_hash}", entry.to_doc())

    async def _by_hash(self, id_hash: str, token: str = "") -> TokenEntry | None:
        read_as = getattr(self._store, "read_as", None)
        if read_as is not None:
            # The real store decodes each stored version of the entry once (exclusive storage) and
            # every write, use or revocation replaces it; callers get their own copy to change.
            template: TokenEntry | None = await read_as(f"id/{id_hash}", _entry_from_doc)
            if template is None:
                return None
            entry = template.clone(token)
        else:
            doc = await self._store.read(f"id/{id_hash}")
            if doc is None:
                return None
            entry = TokenEntry.from_doc(doc, token)
        # The key already binds the hash; compare anyway, in constant time, as defence in depth.
        if not hmac.compare_digest(entry.id_hash, id_hash):
            return None
        return entry

    async def _by_accessor(self, accessor: str) -> TokenEntry | None:
        if not accessor or "/" in accessor or len(accessor) > 128:
            return None
        doc = await self._store.read(f"accessor/{accessor}")
        if doc is None or not isinstance(doc.get("id_hash"), str):
            return None
        entry = await self._by_hash(doc["id_hash"])
        if entry is None or not hmac.compare_digest(entry.accessor, accessor):
            return None
        if entry.expired(self._clock()):
            await self.revoke(entry)
            return None
        return entry

    # -- public API ----------------------------------------------------------------------------

    async def create_root(self) -> str:
        """Create a root token; its plaintext is returned once and stored nowhere."""
        token = _new_token()
        entry = TokenEntry(
            id_hash=hash_token(token),
            accessor=_new_accessor(),
            policies=["root"],
            parent=None,
            ttl=0,
            expire_time=None,
            creation_time=self._clock(),
            num_uses=0,
            orphan=True,
            display_name="root",
            meta={},
            renewable=False,
            explicit_max_ttl=0,
            path="auth/token/root",
            id=token,
        )
        await self._save_new(entry)
        event(log, logging.INFO, "vault_root_token_created")
        return token

    async def lookup(self, token: str) -> TokenEntry | None:
        """The live entry for ``token`` (with its plaintext in ``.id``), or None if unknown/expired."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        entry = await self._by_hash(hash_token(token), token)
        if entry is None:
            return None
        if entry.expired(self._clock()):
            await self.revoke(entry)  # lazily clean up, with its subtree
            return None
        return entry

    async def use(self, entry: TokenEntry) -> None:
        """Consume one use of a use-limited token; the last use revokes it (``num_uses`` becomes -1).

        Raises 403 if the token was revoked or used up concurrently: the CAS update guarantees
        that N uses are granted at most N times, even across replicas.
        """
        if entry.num_uses == 0:
            return
        if entry.num_uses < 0:
            raise permission_denied()
        result: dict[str, int] = {}

        def consume(doc: dict[str, Any] | None) -> dict[str, Any] | None:
            if doc is None or int(doc.get("num_uses", 0)) <= 0:
                raise permission_denied()
            left = int(doc["num_uses"]) - 1
            result["left"] = left
            if left == 0:
                return None  # deleting the entry makes the token unusable at once
            return {**doc, "num_uses": left}

        await self._store.update(f"id/{entry.id_hash}", consume)
        left = result["left"]
        if left == 0:
            entry.num_uses = -1
            await self.revoke(entry)  # the entry is gone already; drop its indexes
        else:
            entry.num_uses = left

    async def revoke(self, entry: TokenEntry) -> int:
        """Revoke ``entry`` and its whole subtree of children. Returns how many tokens went.

        Iterative (a long parent chain cannot exhaust the stack), deepest first like Vault. After
        the ids are gone the child indexes are swept again: a child being created concurrently
        wrote its index before checking that its parent still exists, so one side always sees
        the other and no child outlives its revoked parent.
        """
        total = 0
        pending = [entry]
        while pending:
            order = await self._subtree(pending)
            for node in reversed(order):
                await self._store.delete(f"id/{node.id_hash}")
                await self._store.delete(f"accessor/{node.accessor}")
                if node.parent is not None:
                    await self._store.delete(f"parent/{node.parent}/{node.accessor}")
            total += len(order)
            pending = []
            for node in order:
                pending.extend(await self._children(node, unlink=True))
        return total

    async def _subtree(self, roots: list[TokenEntry]) -> list[TokenEntry]:
        order = list(roots)
        seen = {e.accessor for e in order}
        i = 0
        while i < len(order):
            for child in await self._children(order[i], unlink=False):
                if child.accessor not in seen:  # a corrupt cycle must not loop forever
                    seen.add(child.accessor)
                    order.append(child)
            i += 1
        return order

    async def _children(self, node: TokenEntry, *, unlink: bool) -> list[TokenEntry]:
        out: list[TokenEntry] = []
        for accessor in await self._store.list(f"parent/{node.accessor}/"):
            accessor = accessor.rstrip("/")
            child = await self._child(accessor)
            if child is None or unlink:
                await self._store.delete(f"parent/{node.accessor}/{accessor}")
            if child is not None:
                out.append(child)
        return out

    async def _child(self, accessor: str) -> TokenEntry | None:
        if not accessor or "/" in accessor:
            return None
        doc = await self._store.read(f"accessor/{accessor}")
        if doc is None or not isinstance(doc.get("id_hash"), str):
            return None
        return await self._by_hash(doc["id_hash"])

    async def acl_for(self, entry: TokenEntry) -> ACL:
        """The compiled ACL of the token's policies (missing policies grant nothing)."""
        policies: list[Policy] = []
        for name in entry.policies:
            policy = await self._policies.get(name)
            if policy is not None:
                policies.append(policy)
        key = tuple((p.name, p.raw) for p in policies)
        acl = self._acls.get(key)
        if acl is None:
            acl = ACL(policies)
            self._acls[key] = acl
            if len(self._acls) > _ACL_CACHE_SIZE:
                self._acls.popitem(last=False)
        else:
            self._acls.move_to_end(key)
        return acl

    async def existence(self, request: LogicalRequest) -> bool | None:
        return None  # Vault's token endpoints have no existence check: writes are "update"

    # -- the HTTP API --------------------------------------------------------------------------

    async def handle(self, request: LogicalRequest) -> LogicalResponse:
        path = request.path  # as checked by the ACL: "lookup-self/" is not "lookup-self"
        allowed = _ROUTES.get(path)
        if allowed is None:
            raise _unsupported_path()
        if request.operation not in allowed:
            raise _unsupported_operation()
        caller = request.token
        if not isinstance(caller, TokenEntry):
            raise permission_denied()
        if path in ("create", "create-orphan"):
            return await self._create(request, caller, orphan_path=path == "create-orphan")
        if path == "lookup-self":
            return LogicalResponse(data=self._lookup_data(caller, show_id=True))
        if path == "lookup":
            token = _as_str(request.data, "token")
            if token == "":
                return LogicalResponse(data=self._lookup_data(caller, show_id=True))
            target = await self.lookup(token)
            if target is None:
                raise VaultError(403, "bad token")
            return LogicalResponse(data=self._lookup_data(target, show_id=True))
        if path == "lookup-accessor":
            accessor = _as_str(request.data, "accessor")
            if accessor == "":
                raise VaultError(400, "1 error occurred:\n\t* missing accessor\n\n")
            target = await self._by_accessor(accessor)
            if target is None:
                raise VaultError(400, "1 error occurred:\n\t* invalid accessor\n\n")
            return LogicalResponse(data=self._lookup_data(target, show_id=False))
        if path in ("renew-self", "renew"):
            if path == "renew":
                token = _as_str(request.data, "token")
                if token == "":
                    raise VaultError(400, "missing token ID")
                target = await self.lookup(token)
                if target is None:
                    raise VaultError(400, "token not found")
            else:
                target = caller
            return await self._renew(target, request.data)
        if path == "revoke":
            token = _as_str(request.data, "token")
            if token == "":
                raise VaultError(400, "missing token ID")
            target = await self.lookup(token)
            if target is not None:
                n = await self.revoke(target)
                event(log, logging.INFO, "vault_token_revoked", tokens=n)
            return LogicalResponse()
        if path == "revoke-self":
            n = await self.revoke(caller)
            event(log, logging.INFO, "vault_token_revoked", tokens=n)
            return LogicalResponse()
        # revoke-accessor
        accessor = _as_str(request.data, "accessor")
        if accessor == "":
            raise VaultError(400, "1 error occurred:\n\t* missing accessor\n\n")
        target = await self._by_accessor(accessor)
        if target is None:
            return LogicalResponse(warnings=["No token found with this accessor"])
        n = await self.revoke(target)
        event(log, logging.INFO, "vault_token_revoked", tokens=n)
        return LogicalResponse()

    def _lookup_data(self, entry: TokenEntry, *, show_id: bool) -> dict[str, Any]:
        now = self._clock()
        ttl = 0 if entry.expire_time is None else max(0, int(entry.expire_time - now))
        return {
            "accessor": entry.accessor,
            "creation_time": int(entry.creation_time),
            "creation_ttl": entry.ttl,
            "display_name": entry.display_name,
            "entity_id": "",
            "expire_time": None if entry.expire_time is None else _iso(entry.expire_time),
            "explicit_max_ttl": entry.explicit_max_ttl,
            "id": entry.id if show_id else "",
            "issue_time": _iso(entry.creation_time),
            "meta": dict(entry.meta) or None,
            "num_uses": entry.num_uses,
            "orphan": entry.parent is None,
            "path": entry.path,
            "policies": list(entry.policies),
            "renewable": entry.renewable,
            "ttl": ttl,
            "type": entry.type,
        }

    @staticmethod
    def _auth(entry: TokenEntry, token: str, lease_duration: int) -> dict[str, Any]:
        return {
            "client_token": token,
            "accessor": entry.accessor,
            "policies": list(entry.policies),
            "token_policies": list(entry.policies),
            "metadata": dict(entry.meta) or None,
            "lease_duration": lease_duration,
            "renewable": entry.renewable,
            "entity_id": "",
            "token_type": entry.type,
            "orphan": entry.parent is None,
            "mfa_requirement": None,
            "num_uses": entry.num_uses,
        }

    def _parent_remaining(self, parent: TokenEntry, now: float) -> int | None:
        if parent.expire_time is None:
            return None
        return max(0, int(parent.expire_time - now))

    async def _create(
        self, request: LogicalRequest, parent: TokenEntry, *, orphan_path: bool
    ) -> LogicalResponse:
        data = request.data
        warnings: list[str] = []
        now = self._clock()
        acl = await self.acl_for(parent)
        is_root = parent.is_root
        is_sudo = is_root or acl.has_sudo(_MOUNT + request.path.strip("/"), request.operation)

        if parent.num_uses == -1:
            raise VaultError(400, "parent token lookup failed: no parent found")
        if parent.num_uses > 0:
            raise VaultError(400, "restricted use token cannot generate child tokens")

        unknown = sorted(k for k in data if k not in _CREATE_FIELDS)
        if unknown:
            warnings.append(f"Endpoint ignored these unrecognized parameters: [{' '.join(unknown)}]")

        if data.get("id") not in (None, ""):
            if not is_sudo:
                raise VaultError(400, "root or sudo privileges required to specify token id")
            raise VaultError(400, "custom token ids are not supported")
        if parse_duration(data.get("period") or 0, "period") > 0:  # the bao CLI sends "0s"
            if not is_sudo:
                raise VaultError(400, "root or sudo privileges required to create periodic token")
            raise VaultError(400, "periodic tokens are not supported")
        token_type = _as_str(data, "type") or "service"
        if token_type not in ("service", "default"):
            raise VaultError(400, f"token type {token_type!r} is not supported")
        for unsupported in ("role_name", "entity_alias"):
            if data.get(unsupported) not in (None, ""):
                raise VaultError(400, f'"{unsupported}" is not supported')

        num_uses = _as_int(data, "num_uses")
        if num_uses < 0:
            raise VaultError(400, "number of uses cannot be negative")

        orphan = orphan_path
        if _as_bool(data, "no_parent", False) and not orphan_path:
            if not is_sudo:
                raise VaultError(400, "root or sudo privileges required to create orphan token")
            orphan = True

        no_default = _as_bool(data, "no_default_policy", False)
        requested = _sanitize_policies(data.get("policies"))
        if not requested:
            policies = [p for p in parent.policies if not (no_default and p == "default")]
        else:
            if "root" in requested and not is_root:
                raise VaultError(400, "root tokens may not be created without parent token being root")
            if no_default:
                requested = [p for p in requested if p != "default"]
            if not is_sudo and not set(requested) <= set(parent.policies):
                raise VaultError(400, "child policies must be subset of parent")
            policies = requested
            if not no_default and (is_sudo or "default" in parent.policies):
                policies = sorted({*policies, "default"})
        if "root" in policies:
            policies = ["root"]  # root subsumes everything, as in Vault
        for name in policies:
            if name not in ("root", "default") and await self._policies.get(name) is None:
                warnings.append(f'Policy "{name}" does not exist')

        meta = _meta(data.get("meta"))
        display = _as_str(data, "display_name")
        if len(display) > 256:
            raise VaultError(400, "display_name is too long")
        if display:
            display_name = _DISPLAY_SANITIZE.sub("-", "token-" + display).removesuffix("-")
        else:
            display_name = "token"
        renewable = _as_bool(data, "renewable", True)

        ttl_raw = data.get("ttl", data.get("lease"))
        ttl = parse_duration(ttl_raw, "ttl") if ttl_raw is not None else 0
        if ttl < 0:
            raise VaultError(400, "ttl must be positive")
        explicit_max = parse_duration(data.get("explicit_max_ttl"), "explicit_max_ttl")
        if explicit_max < 0:
            raise VaultError(400, "explicit_max_ttl must be positive")

        if ttl == 0 and "root" not in policies:
            ttl = DEFAULT_TTL
        elif ttl == 0 and explicit_max:
            ttl = explicit_max  # a root token with an explicit max lives that long, not for ever (as Vault)
        max_ttl = MAX_TTL
        if explicit_max and explicit_max < max_ttl:
            max_ttl = explicit_max
        if ttl > max_ttl:
            warnings.append(
                f'TTL of "{format_duration(ttl)}" exceeded the effective max_ttl of '
                f'"{format_duration(max_ttl)}"; TTL value is capped accordingly'
            )
            ttl = max_ttl
        if not orphan:
            remaining = self._parent_remaining(parent, now)
            if remaining is not None and (ttl == 0 or ttl > remaining):
                if remaining <= 0:
                    raise permission_denied()
                warnings.append(
                    f'TTL of "{format_duration(ttl)}" exceeded the parent token\'s remaining TTL of '
                    f'"{format_duration(remaining)}"; TTL value is capped accordingly'
                )
                ttl = remaining
        if ttl == 0:
            if parent.expire_time is not None:
                raise VaultError(400, "expiring root tokens cannot create non-expiring root tokens")
            renewable = False

        token = _new_token()
        entry = TokenEntry(
            id_hash=hash_token(token),
            accessor=_new_accessor(),
            policies=policies,
            parent=None if orphan else parent.accessor,
            ttl=ttl,
            expire_time=None if ttl == 0 else now + ttl,
            creation_time=now,
            num_uses=num_uses,
            orphan=orphan,
            display_name=display_name,
            meta=meta,
            renewable=renewable,
            explicit_max_ttl=explicit_max,
            path=_MOUNT + request.path.strip("/"),
        )
        await self._save_new(entry)
        if entry.parent is not None and await self._store.read(f"id/{parent.id_hash}") is None:
            await self.revoke(entry)  # the parent was revoked meanwhile (see revoke)
            raise permission_denied()
        event(log, logging.INFO, "vault_token_created", orphan=orphan, policies=len(policies), ttl=ttl)
        return LogicalResponse(auth=self._auth(entry, token, ttl), warnings=warnings or None)

    async def _renew(self, target: TokenEntry, data: Mapping[str, Any]) -> LogicalResponse:
        if not target.renewable or target.expire_time is None:
            raise VaultError(400, "lease is not renewable")
        increment = parse_duration(data.get("increment"), "increment")
        if increment < 0:
            raise VaultError(400, "increment must be positive")
        now = self._clock()
        # Without an increment a token renews by its own creation TTL, as in Vault (a 1h token
        # stays a 1h token, not 768h).
        wanted = increment or target.ttl or DEFAULT_TTL
        max_total = MAX_TTL
        if target.explicit_max_ttl and target.explicit_max_ttl < max_total:
            max_total = target.explicit_max_ttl
        limit = max(0, int(target.creation_time + max_total - now))
        warnings: list[str] = []
        if wanted > limit:
            if increment:
                warnings.append(
                    f'TTL of "{format_duration(increment)}" exceeded the effective max_ttl of '
                    f'"{format_duration(limit)}"; TTL value is capped accordingly'
                )
            wanted = limit
        if target.parent is not None:
            parent = await self._child(target.parent)
            if parent is None:
                # The parent is gone: its revocation should have taken this token along.
                await self.revoke(target)
                raise VaultError(400, "token not found")
            remaining = self._parent_remaining(parent, now)
            if remaining is not None and wanted > remaining:
                wanted = remaining
        if wanted <= 0:
            raise VaultError(400, "lease is not renewable")  # past its max: nothing to extend
        new_expire = now + wanted

        def extend(doc: dict[str, Any] | None) -> dict[str, Any] | None:
            if doc is None:
                raise VaultError(400, "token not found")
            return {**doc, "expire_time": new_expire}

        await self._store.update(f"id/{target.id_hash}", extend)
        target.expire_time = new_expire
        return LogicalResponse(auth=self._auth(target, target.id, wanted), warnings=warnings or None)


# ---------------------------------------------------------------------------------------------
# Policies


@lru_cache(maxsize=512)
def _parse_cached(name: str, text: str) -> Policy:
    # Parsing HCL costs milliseconds; a policy's text changes rarely, so parse each text once.
    return parse_policy(name, text)


_ROOT_POLICY: Final = Policy(name="root", raw="", rules=())


def normalize_policy_name(name: str) -> str:
    """Vault lowercases policy names; names are storage keys, so no slashes or control chars."""
    norm = name.strip().lower()
    if not _POLICY_NAME.match(norm):
        raise VaultError(400, "invalid policy name")
    return norm


class PolicyStore:
    """ACL policies by name. ``root`` is built in and immutable; ``default`` always exists."""

    def __init__(self, store: JsonStoreLike, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def get(self, name: str) -> Policy | None:
        try:
            norm = normalize_policy_name(name)
        except VaultError:
            return None
        if norm == "root":
            return _ROOT_POLICY
        # Every request's ACL check reads its token's policies: the real store decodes each stored
        # version once, so a replica still sees another's policy change (S3 never caches).
        read_as = getattr(self._store, "read_as", None)
        if read_as is not None:
            text: str | None = await read_as(norm, _policy_text)
        else:
            doc = await self._store.read(norm)
            text = None if doc is None else str(doc["policy"])
        if text is None:
            return _parse_cached("default", DEFAULT_POLICY) if norm == "default" else None
        try:
            return _parse_cached(norm, text)
        except PolicyError:
            # Stored policies were validated on write; one that no longer parses grants nothing.
            event(log, logging.ERROR, "vault_policy_unparseable", policy=norm)
            return None

    async def info(self, name: str) -> dict[str, Any] | None:
        """``{"name", "policy", "modified"}`` for sys/policy responses, or None."""
        norm = normalize_policy_name(name)
        if norm == "root":
            return {"name": "root", "policy": "", "modified": None}
        doc = await self._store.read(norm)
        if doc is None:
            if norm == "default":
                return {"name": "default", "policy": DEFAULT_POLICY, "modified": None}
            return None
        return {"name": norm, "policy": str(doc["policy"]), "modified": doc.get("modified")}

    async def put(self, name: str, text: str) -> Policy:
        norm = normalize_policy_name(name)
        if norm == "root":
            raise VaultError(400, 'cannot update "root" policy')
        if not text.strip():
            raise VaultError(400, "'policy' parameter not supplied or empty")
        try:
            policy = _parse_cached(norm, text)
        except PolicyError as e:
            raise VaultError(400, f"failed to parse policy: {e}") from None
        await self._store.write(norm, {"name": norm, "policy": text, "modified": _iso(self._clock())})
        event(log, logging.INFO, "vault_policy_written", policy=norm)
        return policy

    async def delete(self, name: str) -> None:
        norm = normalize_policy_name(name)
        if norm == "root":
            raise VaultError(400, 'cannot delete "root" policy')
        if norm == "default":
            raise VaultError(400, "cannot delete default policy")
        await self._store.delete(norm)
        event(log, logging.INFO, "vault_policy_deleted", policy=norm)

    async def list(self) -> list[str]:
        """Vault's order: every ACL policy sorted, ``default`` included, then ``root`` last."""
        names = {n for n in await self._store.list() if not n.endswith("/")}
        names.add("default")
        return [*sorted(names), "root"]


__all__ = [
    "DEFAULT_TTL",
    "MAX_TTL",
    "Operation",
    "PolicyStore",
    "TokenEntry",
    "TokenStore",
    "format_duration",
    "hash_token",
    "normalize_policy_name",
    "parse_duration",
]
