"""vault_like's audit log: one request and one response entry per call, values HMAC'd, fail closed."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from plugins.vault_like.audit import AuditError, AuditLog, Hasher
from plugins.vault_like.audit_sinks import FileSink
from tests.vault_http_support import Starter, Vault, vault_starter


@pytest.fixture
async def start_vault(tmp_path: Path) -> AsyncIterator[Starter]:
    async with vault_starter(tmp_path) as start:
        yield start


@pytest.fixture
async def vault(start_vault: Starter) -> Vault:
    v = await start_vault()
    await v.init()
    return v


def entries(vault: Vault) -> list[dict[str, Any]]:
    path = vault.state_dir / "vault-audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hasher_is_vaults_hmac_sha256() -> None:
    salt = b"s" * 32
    hasher = Hasher(salt)
    expected = "hmac-sha256:" + hmac.new(salt, b"value", hashlib.sha256).hexdigest()
    assert hasher.hash("value") == expected
    assert hasher.structure({"a": ["x", 1, True, None, {"b": "y"}]}) == {
        "a": [hasher.hash("x"), 1, True, None, {"b": hasher.hash("y")}]
    }


async def test_each_call_writes_a_request_and_a_response_entry_with_values_hashed(vault: Vault) -> None:
    # Threat: the audit log becoming a second copy of every secret and token.
    secret = "correct-horse-battery-staple"
    status, body, _ = await vault.call("POST", "secret/data/app/db", {"data": {"password": secret}})
    assert status == 200
    status, _, _ = await vault.call("GET", "secret/data/app/db")
    assert status == 200
    log = entries(vault)
    text = (vault.state_dir / "vault-audit.log").read_text()
    assert secret not in text and vault.token not in text
    write = [e for e in log if e["request"]["id"] == body["request_id"]]
    assert [e["type"] for e in write] == ["request", "response"]
    request = write[0]["request"]
    assert request["operation"] == "create" and request["path"] == "secret/data/app/db"
    assert request["mount_point"] == "secret/" and request["mount_type"] == "kv"
    assert request["client_token"].startswith("hmac-sha256:")
    assert write[0]["auth"]["policies"] == ["root"]
    # sys/audit-hash recomputes the logged hash from the value.
    status, body, _ = await vault.call("POST", "sys/audit-hash/file", {"input": secret})
    assert status == 200 and body["data"]["hash"] == body["hash"]
    assert request["data"]["data"]["password"] == body["data"]["hash"]
    read = entries(vault)[len(log) - 2 :]
    assert (
        read[1]["type"] == "response"
        and read[1]["response"]["data"]["data"]["password"] == body["data"]["hash"]
    )
    status, body, _ = await vault.call("POST", "sys/audit-hash/nope", {"input": "x"})
    assert (status, body) == (400, {"errors": ['unknown audit backend "nope/"']})


async def test_refused_requests_are_audited_with_their_error(vault: Vault) -> None:
    await vault.call("GET", "secret/data/x", token="hvs.wrong")
    last = entries(vault)[-2:]
    assert [e["type"] for e in last] == ["request", "response"]
    assert last[1]["error"] == "permission denied" and last[1]["response"]["status"] == 403
    assert "hvs.wrong" not in json.dumps(last)


async def test_token_creation_response_hashes_the_new_token(vault: Vault) -> None:
    _, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["default"]})
    created = body["auth"]["client_token"]
    text = (vault.state_dir / "vault-audit.log").read_text()
    assert created not in text and body["auth"]["accessor"] not in text
    response = entries(vault)[-1]["response"]
    assert response["auth"]["client_token"].startswith("hmac-sha256:")
    assert response["auth"]["policies"] == ["default"]  # readable, as in Vault


async def test_the_audit_log_is_private(vault: Vault) -> None:
    mode = stat.S_IMODE((vault.state_dir / "vault-audit.log").stat().st_mode)
    assert mode == 0o600


async def test_an_unwritable_audit_log_refuses_the_request_before_it_runs(vault: Vault) -> None:
    # Fail closed: a request that cannot be audited must not happen.
    audit = vault.service.audit
    assert audit is not None and isinstance(audit.sink, FileSink)
    await audit.close()
    audit.sink.path = Path("/dev/full")  # every write fails with ENOSPC
    await audit.open()
    status, body, headers = await vault.call("POST", "secret/data/unaudited", {"data": {"k": "v"}})
    assert (status, body) == (500, {"errors": ["audit log unavailable"]})
    assert headers["Content-Type"] == "application/json"
    await audit.close()
    audit.sink.path = vault.state_dir / "vault-audit.log"
    await audit.open()
    assert (await vault.call("GET", "secret/data/unaudited"))[0] == 404  # the write never ran
    # Unauthenticated health checks do not depend on the audit log.
    assert (await vault.call("GET", "sys/health", token=None))[0] == 200


async def test_an_unwritable_response_entry_withholds_the_answer(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The secret must not leave without its response entry.
    await vault.call("POST", "secret/data/held", {"data": {"k": "held-value"}})

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise AuditError("disk gone")

    monkeypatch.setattr(AuditLog, "log_response", broken)
    status, body, _ = await vault.call("GET", "secret/data/held")
    assert (status, body) == (500, {"errors": ["audit log unavailable"]})


async def test_an_audit_log_that_cannot_open_keeps_the_store_sealed(
    start_vault: Starter, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    v = await start_vault(config={"audit_log": str(blocker / "audit.log")})
    status, body, _ = await v.call("GET", "sys/health", token=None)
    assert status in (501, 503) and body["sealed"] is True
    _, ready = await v.ready()
    assert "cannot open the audit log" in ready["plugins"]["vault_like"]


async def test_auditing_can_be_turned_off(start_vault: Starter) -> None:
    v = await start_vault(config={"audit_log": ""})
    await v.init()
    assert (await v.call("POST", "secret/data/k", {"data": {"a": "b"}}))[0] == 200
    assert not (v.state_dir / "vault-audit.log").exists()
    assert (await v.call("POST", "sys/audit-hash/file", {"input": "x"}))[0] == 400


async def test_a_request_that_fails_inside_still_gets_its_response_entry(vault: Vault) -> None:
    """Threat (found by review): a storage error half-way through a write answered 500 with no
    response entry, so the trail showed a request that may have changed data and no outcome."""
    from plugins.vault_like.storage import StorageError

    storage = vault.service.storage
    assert storage is not None
    real_put = storage.put
    calls: list[str] = []

    async def flaky_put(key: str, value: bytes, *args: Any, **kwargs: Any) -> str:
        calls.append(key)
        if len(calls) == 2:  # the first write lands, the second fails
            raise StorageError("transient failure")
        return await real_put(key, value, *args, **kwargs)

    storage.put = flaky_put  # type: ignore[method-assign]
    try:
        status, body, _ = await vault.call("POST", "secret/data/half", {"data": {"pw": "two"}})
    finally:
        storage.put = real_put  # type: ignore[method-assign]
    assert (status, body) == (500, {"errors": ["internal error"]})
    last = entries(vault)[-2:]
    assert [e["type"] for e in last] == ["request", "response"]
    assert last[0]["request"]["id"] == last[1]["request"]["id"]
    assert last[1]["response"]["status"] == 500 and last[1]["error"] == "internal error"
