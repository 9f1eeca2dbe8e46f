"""Assertions shared by the compatibility tests: what a Vault client relies on in every response."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import requests

from .servers import VaultServer

# The response envelope every Vault logical response carries (Vault's logical.HTTPResponse).
ENVELOPE = frozenset(
    {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth"}
)
# Vault >= 1.12 adds "mount_type"; OpenBao 2.x does not send it. The issue requires it of vault_like.
ENVELOPE_OPTIONAL = frozenset({"mount_type"})

# KV v2 version metadata, as in a write answer and in data/P's "metadata".
VERSION_METADATA = frozenset({"created_time", "custom_metadata", "deletion_time", "destroyed", "version"})
# KV v2 key metadata (metadata/P). OpenBao added metadata CAS; Vault has no such fields.
KEY_METADATA = frozenset(
    {
        "cas_required", "created_time", "current_version", "custom_metadata", "delete_version_after",
        "max_versions", "oldest_version", "updated_time", "versions",
    }
)  # fmt: skip
KEY_METADATA_OPENBAO = frozenset({"current_metadata_version", "metadata_cas_required"})
KV_CONFIG = frozenset({"cas_required", "delete_version_after", "max_versions"})
KV_CONFIG_OPENBAO = frozenset({"metadata_cas_required"})
VERSION_ENTRY = frozenset({"created_time", "deletion_time", "destroyed"})

# auth/token/create's "auth" block and lookup's "data" (Vault's token store).
TOKEN_AUTH = frozenset(
    {
        "client_token", "accessor", "policies", "token_policies", "metadata", "lease_duration",
        "renewable", "entity_id", "token_type", "orphan", "mfa_requirement", "num_uses",
    }
)  # fmt: skip
TOKEN_LOOKUP = frozenset(
    {
        "accessor", "creation_time", "creation_ttl", "display_name", "entity_id", "expire_time",
        "explicit_max_ttl", "id", "issue_time", "meta", "num_uses", "orphan", "path", "policies",
        "renewable", "ttl", "type",
    }
)  # fmt: skip


def keys_between(
    found: Iterable[str], required: frozenset[str], optional: frozenset[str] = frozenset()
) -> None:
    """Every ``required`` key present, nothing beyond ``required | optional``."""
    keys = set(found)
    assert required <= keys, f"missing keys: {sorted(required - keys)}"
    assert keys <= required | optional, f"unexpected keys: {sorted(keys - required - optional)}"


def json_body(reply: requests.Response, status: int) -> Any:
    """The reply's JSON after checking its status and that Content-Type is exactly application/json.

    hvac parses an error body only when the Content-Type is exactly ``application/json`` (a charset
    suffix makes ``e.errors`` None and breaks ``raise_on_deleted_version=False``).
    """
    assert reply.status_code == status, f"{reply.status_code} != {status}: {reply.text[:500]}"
    assert reply.headers.get("Content-Type") == "application/json", reply.headers.get("Content-Type")
    return reply.json()


def envelope(reply: requests.Response, status: int = 200, legacy: bool = False) -> dict[str, Any]:
    """Check Vault's response envelope and return it.

    ``legacy``: some older sys/ endpoints (sys/policy/NAME, sys/capabilities-self, sys/mounts) also
    copy every key of "data" to the top level; only "data" is compared there.
    """
    body = json_body(reply, status)
    assert isinstance(body, dict)
    if legacy:
        assert isinstance(body.get("data"), dict), body
        keys_between(set(body) - set(body["data"]), ENVELOPE, ENVELOPE_OPTIONAL)
    else:
        keys_between(body, ENVELOPE, ENVELOPE_OPTIONAL)
    request_id = body["request_id"]
    assert isinstance(request_id, str) and request_id, f"empty request_id: {body}"
    # Vault's request ids are UUIDs (its audit entries carry the same id).
    assert is_uuid(request_id), f"request_id {request_id!r} is not a UUID"
    assert body["lease_id"] == "" and body["lease_duration"] == 0 and body["renewable"] is False
    assert body["wrap_info"] is None
    return body


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def data_of(reply: requests.Response, status: int = 200, legacy: bool = False) -> Any:
    return envelope(reply, status, legacy)["data"]


def errors(reply: requests.Response, status: int) -> list[str]:
    """Vault's error body: exactly ``{"errors": [str, ...]}``; the list."""
    body = json_body(reply, status)
    assert isinstance(body, dict) and set(body) == {"errors"}, body
    assert isinstance(body["errors"], list) and all(isinstance(e, str) for e in body["errors"]), body
    return list(body["errors"])


def denied(reply: requests.Response) -> None:
    """403 permission denied, never 401 (hvac's is_authenticated() raises on 401)."""
    found = errors(reply, 403)
    assert any("permission denied" in e for e in found), found


def no_content(reply: requests.Response) -> None:
    assert reply.status_code == 204, f"{reply.status_code}: {reply.text[:500]}"
    assert reply.content == b""


def enable_kv2(server: VaultServer, path: str) -> None:
    no_content(server.request("POST", f"sys/mounts/{path}", {"type": "kv", "options": {"version": "2"}}))
