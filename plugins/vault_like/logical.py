"""The types every part of vault_like shares: a logical request, its response, and the error.

The HTTP layer (:mod:`.api`) turns an HTTP request into a :class:`LogicalRequest` (path relative to
the mount, Vault's operation name, the JSON body or query), checks the token's ACL, and hands it to
the mount's backend (KV v2, transit, sys, token auth). The backend answers a :class:`LogicalResponse`
or raises :class:`VaultError`; the HTTP layer renders either in Vault's envelope.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# Vault's operation names. ``create`` and ``update`` are both writes: ``create`` when the target
# does not exist yet (the backend's existence check decides), which ACLs may grant separately.
Operation = Literal["read", "create", "update", "patch", "delete", "list"]


class VaultError(Exception):
    """A request failed. Rendered as ``{"errors": errors}`` (plus ``data`` when given) with ``status``.

    Messages are shown to the client, so they never contain secrets or tokens.
    ``data`` is for the KV v2 soft-deleted read, where Vault answers 404 *with* the metadata body.
    """

    def __init__(self, status: int, *errors: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(errors[0] if errors else f"HTTP {status}")
        self.status = status
        self.errors = list(errors)
        self.data = data


def permission_denied() -> VaultError:
    """Vault's exact text; always 403, never 401 (hvac raises on 401, NOTES.md)."""
    return VaultError(403, "1 error occurred:\n\t* permission denied\n\n")


@dataclass
class LogicalRequest:
    operation: Operation
    path: str  # relative to the mount: "data/foo/bar" for /v1/secret/data/foo/bar
    data: dict[str, Any] = field(default_factory=dict)  # JSON body (writes) or query parameters (reads)
    query: Mapping[str, str] = field(default_factory=dict)
    mount_path: str = ""  # "secret/"
    request_id: str = ""
    token: Any = None  # tokens.TokenEntry of the caller (None on unauthenticated sys paths)
    content_type: str = ""  # the request's Content-Type (PATCH requires merge-patch)


@dataclass
class LogicalResponse:
    """What a backend answers. ``data is None`` and no warnings/auth renders as 204 No Content."""

    data: dict[str, Any] | None = None
    warnings: list[str] | None = None
    auth: dict[str, Any] | None = None
    status: int | None = None  # override (sys/health's 503/429/...); default 200 or 204
    raw: bytes | None = None  # a raw body (sys/health answers its own JSON, not the envelope)
    lease_duration: int = 0
    renewable: bool = False


class Backend(Protocol):
    """A mounted secrets engine (KV v2, transit). One instance per mount."""

    type: str  # "kv", "transit"

    async def existence(self, request: LogicalRequest) -> bool | None:
        """Whether the write target exists (create vs update for the ACL); None: no check (update)."""
        ...

    async def handle(self, request: LogicalRequest) -> LogicalResponse:
        """Serve one request. Raise VaultError for client errors (400/404/405...)."""
        ...
