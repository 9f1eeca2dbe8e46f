"""vault_like's HTTP layer, in-process: routing, auth, ACL, envelope, errors, sys/*, sealed behaviour.

The sidecar runs with the real plugin (storage, barrier, tokens, ACL, KV v2) on SQLite in a temp
state dir; attested KMS is replaced by :class:`FakeKms` (AES-GCM under a test key, with a switch
that makes it refuse like a key policy pinning another image). The dev world, real attestation and
the ``sidecar dev`` subprocess are in tests/test_vault_devworld.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.vault_http_support import JSON, FakeKms, Starter, Vault, stop, vault_starter


@pytest.fixture
async def start_vault(tmp_path: Path) -> AsyncIterator[Starter]:
    async with vault_starter(tmp_path) as start:
        yield start


@pytest.fixture
async def vault(start_vault: Starter) -> Vault:
    v = await start_vault()
    await v.init()
    return v


# =========================================================================== uninitialised / init


async def test_uninitialised_store_answers_sys_paths_and_refuses_the_rest(start_vault: Starter) -> None:
    v = await start_vault()
    status, body, headers = await v.call("GET", "sys/health", token=None)
    assert status == 501 and body["initialized"] is False and body["sealed"] is True
    assert headers["Content-Type"] == JSON
    status, body, _ = await v.call("GET", "sys/seal-status", token=None)
    assert status == 200
    assert body["type"] == "awskms" and body["initialized"] is False and body["sealed"] is True
    status, body, _ = await v.call("GET", "sys/init", token=None)
    assert (status, body) == (200, {"initialized": False})
    status, body, _ = await v.call("GET", "secret/data/x", token="anything")
    assert (status, body) == (503, {"errors": ["Vault is sealed"]})
    status, ready = await v.ready()
    assert status == 503 and "sidecar vault init" in ready["plugins"]["vault_like"]
    assert v.kms.calls == []  # nothing asked KMS before init


async def test_init_returns_the_root_token_once_and_only_once(start_vault: Starter) -> None:
    # Threat: a second init (by anyone who can reach the port) minting a new root token.
    v = await start_vault()
    token = await v.init()
    assert token.startswith("hvs.") and len(token) > 20
    status, body, _ = await v.call("PUT", "sys/init", {}, token=None)
    assert (status, body) == (400, {"errors": ["Vault is already initialized"]})
    status, body, _ = await v.call("GET", "sys/init", token=None)
    assert body == {"initialized": True}
    status, body, _ = await v.call("GET", "auth/token/lookup-self")
    assert status == 200 and body["data"]["policies"] == ["root"]
    assert (await v.ready())[0] == 200
    # Stored only as a hash: the token's text is nowhere in the state dir (the store or the audit log).
    for file in v.state_dir.rglob("*"):
        if file.is_file():
            assert token.encode() not in file.read_bytes(), file


async def test_init_body_must_be_json(start_vault: Starter) -> None:
    v = await start_vault()
    status, body, _ = await v.call("PUT", "sys/init", raw=b"{nope", token=None)
    assert status == 400 and body["errors"][0].startswith("failed to decode JSON input")
    assert (await v.call("GET", "sys/init", token=None))[1] == {"initialized": False}


async def test_concurrent_inits_make_one_root_token(start_vault: Starter) -> None:
    v = await start_vault()
    results = await asyncio.gather(*(v.call("PUT", "sys/init", {}, token=None) for _ in range(4)))
    assert sorted(r[0] for r in results) == [200, 400, 400, 400]


# =========================================================================== health & friends


async def test_health_codes_and_overrides(vault: Vault) -> None:
    status, body, headers = await vault.call("GET", "sys/health", token=None)
    assert status == 200 and headers["Content-Type"] == JSON
    assert set(body) >= {
        "initialized", "sealed", "standby", "performance_standby", "replication_performance_mode",
        "replication_dr_mode", "server_time_utc", "version", "cluster_name", "cluster_id",
    }  # fmt: skip
    assert body["initialized"] and not body["sealed"] and not body["standby"]
    assert (await vault.call("GET", "sys/health?activecode=203", token=None))[0] == 203
    assert (await vault.call("GET", "sys/health?standbyok=true&sealedcode=200", token=None))[0] == 200
    status, body, _ = await vault.call("GET", "sys/health?activecode=abc", token=None)
    assert (status, body) == (400, {"errors": []})
    assert (await vault.call("GET", "sys/health?standbyok=maybe", token=None))[0] == 400
    async with vault.harness.session.head(vault.harness.url("/v1/sys/health")) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == JSON
    assert (await vault.call("DELETE", "sys/health", token=None))[0] == 405
    # hvac's own calls.
    client = vault.hvac()
    assert await asyncio.to_thread(client.sys.is_initialized) is True
    assert await asyncio.to_thread(client.sys.is_sealed) is False
    assert (await asyncio.to_thread(client.sys.read_health_status, method="GET"))["sealed"] is False
    leader = await asyncio.to_thread(client.sys.read_leader_status)
    assert leader["ha_enabled"] is False


async def test_seal_status_shape(vault: Vault) -> None:
    status, body, _ = await vault.call("GET", "sys/seal-status", token=None)
    assert status == 200
    assert body["type"] == "awskms" and body["sealed"] is False and body["initialized"] is True
    for key in (
        "t",
        "n",
        "progress",
        "nonce",
        "version",
        "build_date",
        "migration",
        "recovery_seal",
        "storage_type",
    ):
        assert key in body
    assert body["storage_type"] == "sqlite"


# =========================================================================== sealed


async def test_a_store_kms_refuses_stays_sealed_and_says_why(start_vault: Starter, tmp_path: Path) -> None:
    # Threat: an enclave image the key policy does not name must not open the store. Here the KMS
    # stand-in refuses as AWS does; the real attested refusal is in test_vault_devworld.py.
    kms = FakeKms()
    first = await start_vault(state=tmp_path / "s", kms=kms)
    await first.init()
    assert (await first.call("POST", "secret/data/k", {"data": {"v": "1"}}))[0] == 200
    await stop(first)

    kms.refuse = True
    second = await start_vault(state=tmp_path / "s", kms=kms)
    status, body, _ = await second.call("GET", "sys/health", token=None)
    assert status == 503 and body["sealed"] is True and body["initialized"] is True
    assert "cluster_id" not in body
    assert (await second.call("GET", "sys/health?sealedcode=299", token=None))[0] == 299
    status, body, _ = await second.call("GET", "sys/seal-status", token=None)
    assert body["sealed"] is True
    status, body, headers = await second.call("GET", "secret/data/k", token=first.token)
    assert (status, body) == (503, {"errors": ["Vault is sealed"]}) and headers["Content-Type"] == JSON
    status, ready = await second.ready()
    assert status == 503
    assert ready["plugins"]["vault_like"] == "sealed: KMS refused (AccessDeniedException)"
    assert (await second.call("PUT", "sys/init", {}, token=None))[1] == {
        "errors": ["Vault is already initialized"]
    }
    assert (await second.call("GET", "sys/leader", token=None))[0] == 503


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (None, "sealed: KMS refused (AccessDeniedException)"),
        (RuntimeError("socket detail that must not reach readiness"), "sealed: unexpected RuntimeError"),
    ],
)
async def test_a_sealed_store_unseals_itself_once_kms_answers(
    start_vault: Starter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception | None,
    reason: str,
) -> None:
    # A KMS outage at boot must not need an operator: the retry loop unseals when KMS is back.
    # Threat (the second case): a KMS client failing in a way nobody listed must neither open the
    # store nor kill the plugin: it stays sealed with the exception's type alone as the reason (its
    # message may carry detail) and keeps retrying.
    import plugins.vault_like.service as service_module

    monkeypatch.setattr(service_module, "RETRY_FIRST", 0.05)
    kms = FakeKms()
    first = await start_vault(state=tmp_path / "s", kms=kms)
    await first.init()
    await stop(first)
    kms.refuse, kms.fail_with = True, failure
    second = await start_vault(state=tmp_path / "s", kms=kms)
    assert (await second.call("GET", "sys/health", token=None))[0] == 503
    status, ready = await second.ready()
    assert status == 503 and ready["plugins"]["vault_like"] == reason
    tried = kms.calls.count("Decrypt")
    for _ in range(100):  # the retry loop survives the same failure again
        if kms.calls.count("Decrypt") > tried:
            break
        await asyncio.sleep(0.05)
    assert kms.calls.count("Decrypt") > tried
    kms.refuse, kms.fail_with = False, None
    for _ in range(200):
        if (await second.call("GET", "sys/health", token=None))[0] == 200:
            break
        await asyncio.sleep(0.05)
    assert (await second.call("GET", "auth/token/lookup-self", token=first.token))[0] == 200
    assert (await second.ready())[0] == 200


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        ({}, ["storage", "audit_log"]),
        ({"audit_log": "/dev/stderr"}, ["storage"]),
        ({"audit_log": ""}, ["storage"]),
    ],
)
async def test_state_that_would_live_in_enclave_memory_is_warned_about(
    start_vault: Starter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    config: dict[str, Any],
    warned: list[str],
) -> None:
    # Threat: an operator ships the demo's SQLite storage into an enclave, whose filesystem is its
    # memory; the store (and every secret in it) would vanish at the first restart without a word.
    from sidecar.attestation.nsm import NsmDevice

    device = NsmDevice(os.devnull)  # stands for /dev/nsm: only its type is looked at here
    try:
        with caplog.at_level(logging.WARNING, logger="plugins.vault_like"):
            vault = await start_vault(state=tmp_path / "s", config=config, nsm=device)
        found = [r for r in caplog.records if r.getMessage() == "vault_state_in_enclave_memory"]
        assert [getattr(r, "sidecar_fields", {}).get("what") for r in found] == [warned]
        assert (await vault.call("GET", "sys/health", token=None))[
            0
        ] == 501  # it still serves: not initialised
    finally:
        device.close()


async def test_no_enclave_memory_warning_outside_an_enclave(
    start_vault: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="plugins.vault_like"):
        await start_vault(state=tmp_path / "s")  # no NSM device: the dev world or a test, a real disk
    assert not [r for r in caplog.records if r.getMessage() == "vault_state_in_enclave_memory"]


# =========================================================================== auth and ACL


async def test_missing_and_unknown_tokens_are_403_never_401(vault: Vault) -> None:
    # hvac's is_authenticated() raises on 401; Vault answers 403 (NOTES.md).
    for token in (None, "hvs.notatoken", "x" * 5000):
        status, body, headers = await vault.call("GET", "secret/data/a", token=token)
        assert (status, body) == (403, {"errors": ["permission denied"]}), token
        assert headers["Content-Type"] == JSON
    assert await asyncio.to_thread(vault.hvac("hvs.bogus").is_authenticated) is False
    assert await asyncio.to_thread(vault.hvac().is_authenticated) is True


async def test_bearer_token_works(vault: Vault) -> None:
    status, _, _ = await vault.call(
        "GET", "auth/token/lookup-self", token=None, headers={"Authorization": f"Bearer {vault.token}"}
    )
    assert status == 200
    status, _, _ = await vault.call(
        "GET", "auth/token/lookup-self", token=None, headers={"Authorization": "Bearer "}
    )
    assert status == 403


async def test_acl_is_checked_before_the_backend(vault: Vault) -> None:
    # Threat: a token reading or writing outside its policy; or learning data from a write it may not do.
    policy = (
        'path "secret/data/app/*" { capabilities = ["read"] }\n'
        'path "secret/metadata/*" { capabilities = ["list"] }'
    )
    assert (await vault.call("PUT", "sys/policy/app-read", {"policy": policy}))[0] == 204
    assert (await vault.call("POST", "secret/data/app/db", {"data": {"password": "pw-1"}}))[0] == 200
    assert (await vault.call("POST", "secret/data/other", {"data": {"password": "pw-2"}}))[0] == 200
    status, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["app-read"]})
    limited = body["auth"]["client_token"]

    status, body, _ = await vault.call("GET", "secret/data/app/db", token=limited)
    assert status == 200 and body["data"]["data"] == {"password": "pw-1"}
    denied = {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}
    assert (await vault.call("GET", "secret/data/other", token=limited))[:2] == (403, denied)
    status, body, _ = await vault.call(
        "POST", "secret/data/app/db", {"data": {"password": "x"}}, token=limited
    )
    assert (status, body) == (403, denied)
    status, body, _ = await vault.call("GET", "secret/data/app/db")
    assert body["data"]["data"] == {"password": "pw-1"}  # the refused write did not happen
    assert (await vault.call("GET", "sys/mounts", token=limited))[0] == 403
    assert (await vault.call("GET", "secret/metadata/?list=true", token=limited))[0] == 200
    # The default policy: a token may look itself up.
    assert (await vault.call("GET", "auth/token/lookup-self", token=limited))[0] == 200


async def test_create_is_distinguished_from_update(vault: Vault) -> None:
    # A policy with `create` only may write new keys, not overwrite existing ones (existence check).
    policy = 'path "secret/data/drop/*" { capabilities = ["create"] }'
    await vault.call("PUT", "sys/policy/drop", {"policy": policy})
    _, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["drop"]})
    token = body["auth"]["client_token"]
    assert (await vault.call("POST", "secret/data/drop/a", {"data": {"k": "1"}}, token=token))[0] == 200
    assert (await vault.call("POST", "secret/data/drop/a", {"data": {"k": "2"}}, token=token))[0] == 403


async def test_num_uses_are_spent_even_on_refused_requests(vault: Vault) -> None:
    # As Vault: a use-limited token is consumed by each request, allowed or not, and dies at zero.
    _, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["default"], "num_uses": 2})
    token = body["auth"]["client_token"]
    assert (await vault.call("GET", "secret/data/x", token=token))[0] == 403  # ACL refuses: a use spent
    assert (await vault.call("GET", "auth/token/lookup-self", token=token))[0] == 200  # the last use
    assert (await vault.call("GET", "auth/token/lookup-self", token=token))[1] == {
        "errors": ["permission denied"]
    }


async def test_rotate_needs_sudo(vault: Vault) -> None:
    # sys/rotate is root-protected in Vault: `update` alone is not enough.
    await vault.call("PUT", "sys/policy/rot", {"policy": 'path "sys/rotate" { capabilities = ["update"] }'})
    await vault.call(
        "PUT", "sys/policy/rot-sudo", {"policy": 'path "sys/rotate" { capabilities = ["update", "sudo"] }'}
    )
    _, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["rot"]})
    plain = body["auth"]["client_token"]
    _, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["rot-sudo"]})
    sudo = body["auth"]["client_token"]
    _, before, _ = await vault.call("GET", "sys/key-status")
    assert (await vault.call("POST", "sys/rotate", token=plain))[0] == 403
    assert (await vault.call("POST", "sys/rotate", token=sudo))[0] == 204
    _, after, _ = await vault.call("GET", "sys/key-status")
    assert after["data"]["term"] == before["data"]["term"] + 1 and after["term"] == after["data"]["term"]
    assert (await vault.call("GET", "secret/data/nothing"))[0] == 404  # still readable after rotation


async def test_capabilities_self(vault: Vault) -> None:
    status, body, _ = await vault.call(
        "POST", "sys/capabilities-self", {"paths": ["secret/data/a", "sys/mounts"]}
    )
    assert status == 200 and body["data"] == {"secret/data/a": ["root"], "sys/mounts": ["root"]}
    assert body["secret/data/a"] == ["root"]  # Vault's legacy top-level copy
    await vault.call(
        "PUT", "sys/policy/r", {"policy": 'path "secret/data/a" { capabilities = ["read", "list"] }'}
    )
    _, created, _ = await vault.call("POST", "auth/token/create", {"policies": ["r"]})
    token = created["auth"]["client_token"]
    status, body, _ = await vault.call(
        "POST", "sys/capabilities-self", {"path": "secret/data/a"}, token=token
    )
    assert status == 200 and sorted(body["data"]["capabilities"]) == ["list", "read"]
    _, body, _ = await vault.call("POST", "sys/capabilities-self", {"paths": ["secret/data/b"]}, token=token)
    assert body["data"]["secret/data/b"] == ["deny"]
    assert (await vault.call("POST", "sys/capabilities-self", {}))[0] == 400


# =========================================================================== envelope and errors


async def test_envelope_shape_and_headers(vault: Vault) -> None:
    status, body, headers = await vault.call("POST", "secret/data/e", {"data": {"k": "v"}})
    assert status == 200 and headers["Content-Type"] == JSON and headers["Cache-Control"] == "no-store"
    assert set(body) == {
        "request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info", "warnings", "auth",
        "mount_type",
    }  # fmt: skip
    assert body["mount_type"] == "kv" and body["lease_id"] == "" and body["wrap_info"] is None
    # Vault's request ids are UUIDs; the sidecar's own id stays in X-Request-Id for its logs.
    assert str(uuid.UUID(body["request_id"])) == body["request_id"] and headers["X-Request-Id"]
    status, body, headers = await vault.call("DELETE", "secret/data/e")
    assert status == 204 and body is None and headers["Content-Type"] == JSON
    # The soft-deleted read: 404 with the metadata in the envelope (hvac raise_on_deleted_version=False).
    status, body, _ = await vault.call("GET", "secret/data/e")
    assert status == 404 and body["data"]["data"] is None and body["data"]["metadata"]["version"] == 1
    client = vault.hvac()
    read = await asyncio.to_thread(
        client.secrets.kv.v2.read_secret_version, path="e", raise_on_deleted_version=False
    )
    assert read["data"]["data"] is None
    status, body, _ = await vault.call("GET", "secret/data/never")
    assert (status, body) == (404, {"errors": []})


async def test_malformed_bodies_are_400_with_vaults_prefix(vault: Vault) -> None:
    cases = [
        b"{not json",
        b"[1, 2]",
        b'"text"',
        b'{"a": NaN}',
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
    ]
    for raw in cases:
        status, body, headers = await vault.call("POST", "secret/data/m", raw=raw)
        assert status == 400, raw[:20]
        assert headers["Content-Type"] == JSON
        assert body["errors"][0].startswith("failed to decode JSON input"), body
    # Nothing was written.
    assert (await vault.call("GET", "secret/data/m"))[0] == 404


async def test_oversized_body_is_413_in_vaults_shape(start_vault: Starter) -> None:
    """Threat: a client exhausting memory with a huge body. It is refused before it is read, and
    clients (hvac, the bao CLI) get Vault's own 413 error whether the size was declared
    (Content-Length: the sidecar refuses it before the handler, shaped by the route's
    ``error_response``) or only discovered while reading (chunked: the handler refuses it)."""
    v = await start_vault(config={"max_request_bytes": 4096})
    await v.init()
    big = json.dumps({"data": {"k": "x" * 10_000}}).encode()
    status, body, headers = await v.call("POST", "secret/data/big", raw=big)
    assert (status, body) == (413, {"errors": ["http: request body too large"]})
    assert headers["Content-Type"] == JSON and headers["X-Request-Id"]

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    async with v.harness.session.post(
        v.harness.url("/v1/secret/data/big"), data=chunks(), headers={"X-Vault-Token": v.token}
    ) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert (resp.status, await resp.json()) == (413, {"errors": ["http: request body too large"]})
    assert (await v.call("GET", "secret/data/big"))[0] == 404


async def test_found_by_review_client_mistakes_are_400s(vault: Vault) -> None:
    # A number too large for a float was stored as infinity and read back as "Infinity" (not JSON).
    status, body, _ = await vault.call("POST", "secret/data/inf", raw=b'{"data": {"n": 1e400}}')
    assert status == 400 and body["errors"][0] == "failed to decode JSON input: number 1e400 is out of range"
    assert (await vault.call("GET", "secret/data/inf"))[0] == 404
    # An integer of more digits than Python converts: the 400 named the interpreter's settings.
    status, body, _ = await vault.call(
        "POST", "secret/data/big-int", raw=b'{"data": {"n": ' + b"9" * 5000 + b"}}"
    )
    assert status == 400
    assert (
        body["errors"][0]
        == "failed to decode JSON input: number " + "9" * 40 + "... is out of range (5000 digits)"
    )
    # "\u00b2".isdigit() is true but int() refuses it: sys/health answered 500.
    for query in ("standbycode=%C2%B2", "activecode=%E2%91%A0", "activecode=%D9%A2%D9%A0%D9%A0"):
        status, _, _ = await vault.call("GET", f"sys/health?{query}", token=None)
        assert status == 400, query
    # A body whose Content-Encoding does not decode is a 400 too (with this listener's parser the
    # bytes arrive undecoded and fail as JSON; where aiohttp decodes, RequestPayloadError is caught).
    status, body, _ = await vault.call(
        "POST", "secret/data/gz", raw=b"\x1f\x8b\x08\x00 not gzip", headers={"Content-Encoding": "gzip"}
    )
    assert status == 400 and body["errors"][0].startswith("failed to "), body


async def test_a_policy_that_sets_an_attribute_twice_is_refused(vault: Vault) -> None:
    """Threat (found by review): python-hcl2 keeps only the last of two ``capabilities`` lines, so
    a ``deny`` followed by a ``read`` in one block granted read (OpenBao merges them: deny wins)."""
    policy = 'path "secret/data/admin" {\n  capabilities = ["deny"]\n  capabilities = ["read"]\n}\n'
    status, body, _ = await vault.call("PUT", "sys/policies/acl/dup", {"policy": policy})
    assert status == 400
    assert body["errors"] == ["failed to parse policy: at line 3: 'capabilities' is set twice in one block"]
    assert (await vault.call("GET", "sys/policies/acl/dup"))[0] == 404


async def test_unmounting_a_kv_mount_deletes_its_secret_values(vault: Vault) -> None:
    """Threat (found by review): version documents are not in directory listings, so removing a
    mount left every secret value in storage (still readable with the root key)."""
    assert (await vault.call("POST", "sys/mounts/gone", {"type": "kv", "options": {"version": "2"}}))[
        0
    ] == 204
    for key in ("a", "dir/b"):
        for value in ("v1", "v2"):
            assert (await vault.call("POST", f"gone/data/{key}", {"data": {"password": value}}))[0] == 200
    mounts = vault.service.state.mounts  # type: ignore[union-attr]
    entry = mounts.entries["gone/"]
    store = mounts.store_for(entry)
    meta = await store.read("meta/dir/b")
    assert meta is not None
    version_ids = [v["id"] for v in meta["versions"].values()]
    assert len(version_ids) == 2 and await store.read(f"ver/dir/b/{version_ids[0]}") is not None
    assert (await vault.call("DELETE", "sys/mounts/gone"))[0] == 204
    for version_id in version_ids:
        assert await store.read(f"ver/dir/b/{version_id}") is None
    assert await store.read("meta/dir/b") is None and await store.list("") == []


async def test_routing_errors(vault: Vault) -> None:
    status, body, _ = await vault.call("GET", "nomount/x")
    assert (status, body) == (404, {"errors": ['no handler for route "nomount/x". route entry not found.']})
    status, body, _ = await vault.call("GET", "sys/nothing-here")
    assert status == 404
    status, body, _ = await vault.call("DELETE", "sys/key-status")
    assert (status, body) == (405, {"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]})
    async with vault.harness.session.head(
        vault.harness.url("/v1/secret/data/x"), headers={"X-Vault-Token": vault.token}
    ) as resp:
        assert resp.status == 405
    status, body, _ = await vault.call("GET", "secret//data/x")
    assert status == 400 and "invalid request path" in body["errors"][0]


async def test_reading_a_kv_folder_is_a_404(vault: Vault) -> None:
    # OpenBao does: a GET of secret/data/dir/ or secret/subkeys/dir/ is a 404, not a 400.
    status, _, _ = await vault.call("POST", "secret/data/dir/k", {"data": {"a": "1"}})
    assert status == 200
    for path in ("secret/data/dir/", "secret/subkeys/dir/", "secret/data/dir/?version=1"):
        status, body, _ = await vault.call("GET", path)
        assert (status, body) == (404, {"errors": []}), path


async def test_a_bug_is_a_500_that_leaks_nothing(
    vault: Vault, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Threat: an exception message that quotes a secret reaching the client or the log.
    from plugins.vault_like.kv import KvV2

    async def broken(self: KvV2, request: Any) -> Any:
        raise RuntimeError("the-secret-value-42")

    monkeypatch.setattr(KvV2, "handle", broken)
    with caplog.at_level(logging.DEBUG):
        status, body, headers = await vault.call("GET", "secret/data/x")
    assert (status, body) == (500, {"errors": ["internal error"]}) and headers["Content-Type"] == JSON
    assert "the-secret-value-42" not in caplog.text
    assert any(getattr(r, "sidecar_fields", {}).get("error") == "RuntimeError" for r in caplog.records)


# =========================================================================== lists


async def test_list_with_get_list_true(vault: Vault) -> None:
    for key in ("a", "b/c"):
        await vault.call("POST", f"secret/data/{key}", {"data": {"k": "v"}})
    status, body, _ = await vault.call("GET", "secret/metadata/?list=true")
    assert status == 200 and body["data"]["keys"] == ["a", "b/"]
    status, body, _ = await vault.call("GET", "secret/metadata?list=true")
    assert status == 200 and body["data"]["keys"] == ["a", "b/"]


async def test_list_method_and_hvac_list_secrets(vault: Vault) -> None:
    await vault.call("POST", "secret/data/l/one", {"data": {"k": "v"}})
    status, body, _ = await vault.call("LIST", "secret/metadata/l")
    assert status == 200 and body["data"]["keys"] == ["one"]
    listed = await asyncio.to_thread(vault.hvac().secrets.kv.v2.list_secrets, path="l")
    assert listed["data"]["keys"] == ["one"]


# =========================================================================== mounts


async def test_mounts_lifecycle_and_ui_mounts(vault: Vault) -> None:
    assert (await vault.call("POST", "sys/mounts/team", {"type": "kv-v2", "description": "team kv"}))[
        0
    ] == 204
    status, body, _ = await vault.call("POST", "sys/mounts/team", {"type": "kv-v2"})
    assert (status, body) == (400, {"errors": ["path is already in use at team/"]})
    status, body, _ = await vault.call("GET", "sys/mounts")
    assert body["data"]["team/"]["type"] == "kv" and body["data"]["team/"]["options"] == {"version": "2"}
    assert body["team/"] == body["data"]["team/"]  # legacy top-level copy, as Vault
    assert body["data"]["secret/"]["options"] == {"version": "2"}
    # What the bao CLI asks before `kv` commands.
    status, body, _ = await vault.call("GET", "sys/internal/ui/mounts/team/some/key")
    assert status == 200 and body["data"]["path"] == "team/" and body["data"]["options"] == {"version": "2"}
    assert body["data"]["type"] == "kv"
    status, body, _ = await vault.call("GET", "sys/internal/ui/mounts/nothing/here")
    assert status == 403 and "preflight capability check returned 403" in body["errors"][0]
    # Data lives and dies with the mount.
    assert (await vault.call("POST", "team/data/k", {"data": {"v": "1"}}))[0] == 200
    assert (await vault.call("DELETE", "sys/mounts/team"))[0] == 204
    assert (await vault.call("GET", "team/data/k"))[0] == 404  # no handler
    await vault.call("POST", "sys/mounts/team", {"type": "kv", "options": {"version": "2"}})
    assert (await vault.call("GET", "team/data/k"))[0] == 404
    assert (await vault.call("GET", "team/metadata/?list=true"))[0] == 404
    # Refusals.
    assert (await vault.call("POST", "sys/mounts/v1", {"type": "kv"}))[0] == 400  # KV v1 is not offered
    assert (await vault.call("POST", "sys/mounts/sys", {"type": "kv-v2"}))[1] == {
        "errors": ['cannot mount "sys/"']
    }
    assert (await vault.call("POST", "sys/mounts/team/sub", {"type": "kv-v2"}))[0] == 400
    assert (await vault.call("POST", "sys/mounts/odd", {"type": "nosuch"}))[1] == {
        "errors": ["plugin not found in the catalog: nosuch"]
    }
    assert (await vault.call("DELETE", "sys/mounts/sys"))[0] == 400
    status, body, _ = await vault.call("GET", "sys/mounts/nothing")
    assert (status, body) == (400, {"errors": ["No secret engine mount at nothing/"]})


async def test_ui_mounts_needs_access_inside_the_mount(vault: Vault) -> None:
    await vault.call(
        "PUT", "sys/policy/p", {"policy": 'path "secret/data/app/*" { capabilities = ["read"] }'}
    )
    _, body, _ = await vault.call("POST", "auth/token/create", {"policies": ["p"]})
    token = body["auth"]["client_token"]
    assert (await vault.call("GET", "sys/internal/ui/mounts/secret/app/x", token=token))[0] == 200
    await vault.call("POST", "sys/mounts/private", {"type": "kv-v2"})
    assert (await vault.call("GET", "sys/internal/ui/mounts/private/x", token=token))[0] == 403
    assert (await vault.call("GET", "sys/internal/ui/mounts/secret/x", token=None))[0] == 403


async def test_tune(vault: Vault) -> None:
    status, body, _ = await vault.call("GET", "sys/mounts/secret/tune")
    assert status == 200 and body["data"]["default_lease_ttl"] == 2764800 and body["max_lease_ttl"] == 2764800
    assert (await vault.call("POST", "sys/mounts/secret/tune", {"max_lease_ttl": "1h", "description": "x"}))[
        0
    ] == 204
    _, body, _ = await vault.call("GET", "sys/mounts/secret/tune")
    assert body["data"]["max_lease_ttl"] == 3600 and body["data"]["description"] == "x"
    assert (await vault.call("POST", "sys/mounts/secret/tune", {"max_lease_ttl": "soon"}))[0] == 400
    assert (await vault.call("POST", "sys/mounts/secret/tune", {"options": {"version": "1"}}))[0] == 400
    assert (await vault.call("GET", "sys/mounts/nothing/tune"))[0] == 400


async def test_hvac_mounts(vault: Vault) -> None:
    client = vault.hvac()
    await asyncio.to_thread(client.sys.enable_secrets_engine, "kv", path="hv", options={"version": "2"})
    mounts = await asyncio.to_thread(client.sys.list_mounted_secrets_engines)
    assert "hv/" in mounts["data"]
    await asyncio.to_thread(
        client.secrets.kv.v2.create_or_update_secret, path="k", secret={"a": "b"}, mount_point="hv"
    )
    read = await asyncio.to_thread(
        client.secrets.kv.v2.read_secret_version, path="k", mount_point="hv", raise_on_deleted_version=True
    )
    assert read["data"]["data"] == {"a": "b"}
    await asyncio.to_thread(client.sys.disable_secrets_engine, path="hv")


# =========================================================================== policies


async def test_policies_both_apis_hcl_and_json(vault: Vault) -> None:
    hcl = 'path "secret/data/x" { capabilities = ["read"] }'
    assert (await vault.call("PUT", "sys/policy/One", {"policy": hcl}))[0] == 204
    status, body, _ = await vault.call("GET", "sys/policy/one")
    assert status == 200 and body["data"] == {"name": "one", "rules": hcl} and body["rules"] == hcl
    as_json = json.dumps({"path": {"secret/*": {"capabilities": ["list"]}}})
    assert (await vault.call("PUT", "sys/policies/acl/two", {"policy": as_json}))[0] == 204
    status, body, _ = await vault.call("GET", "sys/policies/acl/two")
    assert body["data"] == {"name": "two", "policy": as_json} and "policy" not in body
    status, body, _ = await vault.call("GET", "sys/policy")
    assert (
        body["data"]["policies"] == ["default", "one", "two", "root"] and body["keys"] == body["data"]["keys"]
    )
    status, body, _ = await vault.call("GET", "sys/policies/acl?list=true")
    assert body["data"] == {"keys": ["default", "one", "two", "root"]}
    status, body, _ = await vault.call("PUT", "sys/policy/bad", {"policy": "path {"})
    assert status == 400 and body["errors"][0].startswith("failed to parse policy")
    assert (await vault.call("PUT", "sys/policy/root", {"policy": hcl}))[1] == {
        "errors": ['cannot update "root" policy']
    }
    assert (await vault.call("DELETE", "sys/policy/default"))[1] == {
        "errors": ["cannot delete default policy"]
    }
    assert (await vault.call("DELETE", "sys/policies/acl/two"))[0] == 204
    assert (await vault.call("GET", "sys/policies/acl/two"))[:2] == (404, {"errors": []})
    assert (await vault.call("PUT", "sys/policy/empty", {}))[0] == 400
    client = vault.hvac()
    await asyncio.to_thread(client.sys.create_or_update_policy, name="hv", policy=hcl)
    assert await asyncio.to_thread(client.sys.read_policy, name="hv")
    assert "hv" in (await asyncio.to_thread(client.sys.list_policies))["data"]["policies"]


# =========================================================================== a client's bad input


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        # Durations and integers Python cannot or will not convert (OverflowError, ValueError).
        ("POST", "auth/token/create", b'{"ttl": 1' + b"0" * 400 + b"}"),
        ("POST", "auth/token/create", b'{"ttl": "' + b"1" * 5000 + b'"}'),
        ("POST", "auth/token/create", b'{"explicit_max_ttl": "' + b"9" * 400 + b's"}'),
        ("POST", "sys/mounts/huge", '{"type": "kv-v2", "config": {"default_lease_ttl": "\u00b2"}}'.encode()),
        (
            "POST",
            "sys/mounts/huge",
            b'{"type": "kv-v2", "config": {"max_lease_ttl": "' + b"9" * 400 + b's"}}',
        ),
        ("POST", "sys/mounts/secret/tune", b'{"max_lease_ttl": "' + b"9" * 400 + b's"}'),
        # OpenBao takes a negative mount TTL; vault_like refuses it rather than guess what it means.
        ("POST", "sys/mounts/secret/tune", b'{"default_lease_ttl": "-5s"}'),
        ("POST", "secret/data/big", b'{"options": {"cas": "' + b"1" * 5000 + b'"}, "data": {"a": 1}}'),
        ("POST", "secret/delete/big", b'{"versions": "' + b"1" * 5000 + b'"}'),
        ("POST", "secret/metadata/big", b'{"max_versions": "' + b"1" * 5000 + b'"}'),
        # A policy or a body nested deeper than the code that walks it can go.
        ("PUT", "sys/policy/deep", json.dumps({"policy": '{"a":' * 5_000 + "1" + "}" * 5_000}).encode()),
        ("POST", "secret/data/deep", b'{"data": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}"),
    ],
)
async def test_malformed_input_is_a_400_not_a_500(vault: Vault, method: str, path: str, raw: bytes) -> None:
    # Threat: a client turning its own mistake into a 500 and an internal-error log line per request.
    status, body, _ = await vault.call(method, path, raw=raw)
    assert status == 400, body
    assert body["errors"] and "Traceback" not in json.dumps(body)


async def test_a_big_version_query_is_a_400(vault: Vault) -> None:
    await vault.call("POST", "secret/data/q", {"data": {"a": 1}})
    status, _, _ = await vault.call("GET", "secret/data/q?version=" + "1" * 5000)
    assert status == 400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "auth/token/lookup-accessor", {"accessor": "\ud800"}),
        ("POST", "auth/token/revoke-accessor", {"accessor": "\udfff"}),
        ("POST", "auth/token/create", {"policies": ["\ud800"]}),
        ("POST", "secret/metadata/lone", {"custom_metadata": {"\ud800": "x", "k": "\udc00"}}),
        ("POST", "secret/data/lone", {"data": {"\ud800": "\udfff"}}),
    ],
)
async def test_lone_surrogates_are_replaced_as_go_does(
    vault: Vault, method: str, path: str, body: Any
) -> None:
    # Python's json keeps "\ud800" as a code point that cannot be encoded: a storage key or a log
    # line built from it would raise. Go's encoding/json (Vault) reads it as U+FFFD; so do we.
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogates travel as escapes
    status, answer, _ = await vault.call(method, path, raw=raw)
    assert status < 500, answer


async def test_lone_surrogates_read_back_as_the_replacement_character(vault: Vault) -> None:
    raw = json.dumps({"data": {"k\ud800": "v\udfff", "pair": "\U0001f600"}}).encode()
    status, _, _ = await vault.call("POST", "secret/data/fffd", raw=raw)
    assert status == 200
    _, body, _ = await vault.call("GET", "secret/data/fffd")
    assert body["data"]["data"] == {"k\ufffd": "v\ufffd", "pair": "\U0001f600"}


async def test_the_audit_hasher_keeps_no_plaintext_token_or_secret(vault: Vault) -> None:
    # Threat: a memory dump (or a later bug that prints the cache) yielding live tokens and secrets;
    # tokens are stored only as SHA-256, so the audit log must not keep them either.
    status, created, _ = await vault.call("POST", "auth/token/create", {"policies": ["default"]})
    assert status == 200
    child = created["auth"]["client_token"]
    await vault.call("GET", "auth/token/lookup-self", token=child)
    await vault.call("POST", "secret/data/cache", {"data": {"password": "hunter2-cache"}})
    await vault.call("GET", "secret/data/cache")
    audit = vault.service.audit
    assert audit is not None and audit.hasher is not None
    cached = set(audit.hasher._cache)
    assert child not in cached and vault.token not in cached
    assert "hunter2-cache" not in cached


async def _raw_http(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_a_raw_8bit_path_is_a_400_on_the_python_parser_listener(vault: Vault) -> None:
    # The LIST listener runs aiohttp's Python parser, which passes raw bytes in the path through
    # (llhttp refuses them); a storage key built from one cannot be encoded. Not a 500.
    from urllib.parse import urlparse

    port = urlparse(vault.url).port
    assert port is not None
    token = b"X-Vault-Token: " + vault.token.encode() + b"\r\n"
    for request in (
        b"GET /v1/secret/data/a\xff HTTP/1.1\r\nHost: x\r\n" + token + b"Connection: close\r\n\r\n",
        b"PUT /v1/secret/data/\xff\xfe HTTP/1.1\r\nHost: x\r\n"
        + token
        + b"Content-Length: 18\r\nConnection: close\r\n\r\n"
        + b'{"data":{"k":"v"}}',
    ):
        answer = await _raw_http(port, request)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"not valid UTF-8" in answer


async def test_replicas_racing_to_auto_init_both_open(tmp_path: Path) -> None:
    # Two replicas on one store start together with auto_init: one initialises, the other must
    # unseal the store it lost the race for, not stay sealed until restarted.
    async with vault_starter(tmp_path) as start:
        kms = FakeKms()
        state = tmp_path / "state"
        first, second = await asyncio.gather(
            start(state=state, kms=kms, config={"auto_init": True, "audit_log": "a.log"}),
            start(state=state, kms=kms, config={"auto_init": True, "audit_log": "b.log"}),
        )
        assert not first.service.sealed and not second.service.sealed
        token = (state / "vault-root-token").read_text().strip()
        for replica in (first, second):
            status, _, _ = await replica.call("GET", "auth/token/lookup-self", token=token)
            assert status == 200


async def test_auto_init_does_not_initialise_when_the_token_file_cannot_be_written(
    tmp_path: Path,
) -> None:
    # Threat (lock-out): an initialised store whose only root token was never written anywhere.
    async with vault_starter(tmp_path) as start:
        state = tmp_path / "state"
        (state / "vault-root-token").mkdir(parents=True)  # a directory where the file must go
        v = await start(state=state, config={"auto_init": True})
        assert v.service.sealed
        assert "cannot write the root token file" in (v.service.reason or "")
        assert not await v.service.barrier.initialized()  # type: ignore[union-attr]
        assert v.kms.calls == []  # no root key was even generated
