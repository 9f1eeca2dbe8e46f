"""The audit log: one JSON line for each request and one for its response, as Vault's file device.

Every string value in the logged request and response (the token, its accessor, the data written
and read) is replaced by ``hmac-sha256:<hex>``: HMAC-SHA256 under a per-store salt kept in the
barrier, so the log can be searched for a known value (``sys/audit-hash/file`` computes its hash)
without holding any secret itself. Paths, operations, policy names and numbers stay readable, as
in Vault.

The log fails closed: when a request's entry cannot be written the request is refused before it
runs, and when its response entry cannot be written the answer is withheld (the client gets a 500).
Where the lines go (a file, or S3 for an enclave) is the sink's business: :mod:`.audit_sinks`.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from sidecar.logs import iso_ms

if TYPE_CHECKING:
    from plugins.vault_like.audit_sinks import AuditSink
    from plugins.vault_like.barrier import JsonStore

DEVICE: Final = "file"  # the one audit device; its name in sys/audit-hash/NAME, as Vault's default
SALT_PATH: Final = "audit-salt"  # under the core store ("core/")
PREFIX: Final = "hmac-sha256:"
SALT_BYTES: Final = 32
AUTH_CACHE: Final = 1024  # tokens whose auth block is kept rendered
# One encoder for every entry (json.dumps would build a new one per call for these options).
_encode: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


class AuditError(Exception):
    """An entry could not be written. The message names the sink and the error, never a value."""


async def load_salt(core: JsonStore) -> bytes:
    """The store's audit salt, made on first use (a CAS write: two replicas agree on one salt)."""

    def ensure(old: dict[str, Any] | None) -> dict[str, Any]:
        if old is not None and isinstance(old.get("salt"), str):
            return old
        return {"salt": base64.b64encode(secrets.token_bytes(SALT_BYTES)).decode()}

    doc = await core.update(SALT_PATH, ensure)
    assert doc is not None
    return base64.b64decode(doc["salt"])


class Hasher:
    """HMAC-SHA256 of strings under the salt, rendered as Vault renders them."""

    __slots__ = ("_cache", "_mac")

    def __init__(self, salt: bytes) -> None:
        # Keyed once and copied per value: a fresh HMAC costs several times a copy (OpenSSL 3).
        self._mac = HMAC(salt, hashes.SHA256())
        # Policy names, display names and other repeated strings are hashed once.
        self._cache: dict[str, str] = {}

    def digest(self, value: str) -> str:
        """The hash of ``value``, never cached (for tokens: no plaintext token is kept as a key)."""
        mac = self._mac.copy()
        mac.update(value.encode("utf-8", "surrogatepass"))
        return PREFIX + mac.finalize().hex()

    def hash(self, value: str) -> str:
        found = self._cache.get(value)
        if found is not None:
            return found
        digest = self.digest(value)
        if len(value) <= 64 and len(self._cache) < 4096:
            self._cache[value] = digest
        return digest

    def structure(self, value: Any) -> Any:
        """A copy of ``value`` with every string (at any depth; not keys) hashed.

        Never cached: request and response data hold secrets and tokens, and a cache keyed by the
        plaintext would keep them in memory after they are deleted or revoked.
        """
        if isinstance(value, str):
            return self.digest(value)
        if isinstance(value, Mapping):
            return {k: self.structure(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.structure(v) for v in value]
        return value  # numbers, booleans, null


class Block(dict[str, Any]):
    """A part of an entry (``auth``, ``request``): a dict that keeps its JSON once rendered.

    The request and response entries of one call share their ``auth`` and ``request`` parts, and
    a token's ``auth`` part is the same on every call: each is rendered once. Change it only by
    item assignment (which drops the rendering).
    """

    __slots__ = ("_json",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._json: str | None = None

    def __setitem__(self, key: str, value: Any) -> None:
        self._json = None
        super().__setitem__(key, value)

    def json(self) -> str:
        rendered = self._json
        if rendered is None:
            rendered = self._json = _encode(self)
        return rendered


def _json_of(part: Mapping[str, Any]) -> str:
    return part.json() if isinstance(part, Block) else _encode(part)


class AuditLog:
    """The JSON-lines audit log. ``hasher`` is set once the barrier is unsealed (the salt lives there)."""

    def __init__(self, sink: AuditSink, log: logging.Logger) -> None:
        self.sink = sink
        self.log = log
        self.hasher: Hasher | None = None
        # token hash -> (accessor, issue time, its auth block): a token's block never changes.
        self._auth: dict[str, tuple[str, float, Block]] = {}
        self._clock: tuple[int, str] = (0, "")

    async def open(self) -> None:
        """Make the sink ready. Raises :class:`AuditError`."""
        await self.sink.open()

    async def close(self) -> None:
        await self.sink.close()

    def set_salt(self, salt: bytes) -> None:
        self.hasher = Hasher(salt)
        self._auth.clear()

    def hash(self, value: str) -> str:
        """sys/audit-hash: the value is the client's (often a secret), so it is never cached."""
        if self.hasher is None:
            raise AuditError("the audit salt is not loaded (the store is sealed)")
        return self.hasher.digest(value)

    async def write(self, entry: dict[str, Any]) -> None:
        """Append one entry. Raises :class:`AuditError` when it cannot be written in full."""
        await self._append(_encode(entry))

    async def _append(self, text: str) -> None:
        await self.sink.append((text + "\n").encode("utf-8", "surrogatepass"))

    # ------------------------------------------------------------------ entries

    def auth_block(self, token: str | None, entry: Any) -> Block:
        """The ``auth`` block: who made the request (token and accessor hashed). Do not change it:
        a known token's block is shared by all its requests."""
        assert self.hasher is not None
        id_hash = getattr(entry, "id_hash", None) if token else None
        if id_hash is not None:
            # Keyed by the token's SHA-256 (never the token); what the block shows of a token
            # (policies, accessor, TTL, issue time) is fixed when it is created.
            hit = self._auth.get(id_hash)
            if hit is not None and hit[0] == entry.accessor and hit[1] == entry.creation_time:
                return hit[2]
        h = self.hasher.hash
        block = Block(client_token=self.hasher.digest(token) if token else "")
        if entry is not None:
            policies = list(getattr(entry, "policies", []) or [])
            block.update(
                {
                    "accessor": h(entry.accessor),
                    "display_name": getattr(entry, "display_name", ""),
                    "policies": policies,
                    "token_policies": policies,
                    "metadata": getattr(entry, "meta", None) or None,
                    "entity_id": "",
                    "token_type": getattr(entry, "type", "service"),
                    "token_ttl": getattr(entry, "ttl", 0),
                    "token_issue_time": _iso(getattr(entry, "creation_time", 0.0)),
                }
            )
        if id_hash is not None:
            if len(self._auth) >= AUTH_CACHE:
                del self._auth[next(iter(self._auth))]
            self._auth[id_hash] = (entry.accessor, entry.creation_time, block)
        return block

    def request_block(
        self,
        *,
        request_id: str,
        operation: str,
        path: str,
        mount_point: str,
        mount_type: str,
        token: str | None,
        entry: Any,
        data: Mapping[str, Any] | None,
        remote: str | None,
        auth: Mapping[str, Any] | None = None,
    ) -> Block:
        """The ``request`` block. ``auth``: this request's auth block, whose hashes it reuses."""
        assert self.hasher is not None
        h = self.hasher.hash
        if auth is not None and entry is not None and token:
            client_token, accessor = auth["client_token"], auth["accessor"]
        else:
            client_token = self.hasher.digest(token) if token else ""
            accessor = h(entry.accessor) if entry is not None else ""
        return Block(
            id=request_id,
            operation=operation,
            mount_point=mount_point,
            mount_type=mount_type,
            client_token=client_token,
            client_token_accessor=accessor,
            namespace={"id": "root"},
            path=path,
            data=self.hasher.structure(data) if data else None,
            remote_address=remote or "",
        )

    async def log_request(self, auth: Mapping[str, Any], request: Mapping[str, Any], error: str = "") -> None:
        await self._append(
            f'{{"time":"{self._now()}","type":"request","auth":{_json_of(auth)},'
            f'"request":{_json_of(request)},"error":{_encode(error)}}}'
        )

    def _now(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, text = self._clock
        if ms != last_ms:
            text = iso_ms(ms)
            self._clock = (ms, text)
        return text

    async def log_response(
        self,
        auth: Mapping[str, Any],
        request: Mapping[str, Any],
        *,
        status: int,
        data: Any = None,
        response_auth: Mapping[str, Any] | None = None,
        warnings: list[str] | None = None,
        error: str = "",
    ) -> None:
        assert self.hasher is not None
        response: dict[str, Any] = {
            "mount_point": request.get("mount_point", ""),
            "mount_type": request.get("mount_type", ""),
            "status": status,
        }
        if data is not None:
            response["data"] = self.hasher.structure(data)
        if response_auth:
            # As Vault's HashAuth: the token and its accessor are hashed; policies, TTLs and
            # metadata stay readable (they are what an auditor reads the log for).
            hashed = dict(response_auth)
            if isinstance(hashed.get("client_token"), str) and hashed["client_token"]:
                hashed["client_token"] = self.hasher.digest(hashed["client_token"])  # never cached
            if isinstance(hashed.get("accessor"), str) and hashed["accessor"]:
                hashed["accessor"] = self.hasher.hash(hashed["accessor"])
            response["auth"] = hashed
        if warnings:
            response["warnings"] = list(warnings)
        await self._append(
            f'{{"time":"{self._now()}","type":"response","auth":{_json_of(auth)},'
            f'"request":{_json_of(request)},"response":{_encode(response)},"error":{_encode(error)}}}'
        )


def _iso(seconds: float) -> str:
    return iso_ms(int(seconds * 1000)) if seconds else ""
