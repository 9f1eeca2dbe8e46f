"""vault_like token auth (auth/token/*) and the policy store, on an in-memory JsonStore fake."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from vault_auth_support import bao_call, bao_dev_server
from vault_fakes import FakeJsonStore

from plugins.vault_like.logical import LogicalRequest, LogicalResponse, Operation, VaultError
from plugins.vault_like.tokens import (
    DEFAULT_TTL,
    PolicyStore,
    TokenEntry,
    TokenStore,
    format_duration,
    hash_token,
    parse_duration,
)

AUTH_KEYS = {
    "client_token",
    "accessor",
    "policies",
    "token_policies",
    "metadata",
    "lease_duration",
    "renewable",
    "entity_id",
    "token_type",
    "orphan",
    "mfa_requirement",
    "num_uses",
}
LOOKUP_KEYS = {
    "accessor",
    "creation_time",
    "creation_ttl",
    "display_name",
    "entity_id",
    "expire_time",
    "explicit_max_ttl",
    "id",
    "issue_time",
    "meta",
    "num_uses",
    "orphan",
    "path",
    "policies",
    "renewable",
    "ttl",
    "type",
}
CREATOR = 'path "auth/token/*" { capabilities = ["create", "read", "update", "delete", "list"] }'
SUDO_CREATOR = 'path "auth/token/*" { capabilities = ["create", "read", "update", "delete", "list", "sudo"] }'


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self) -> None:
        self.raw = FakeJsonStore(yield_always=True)
        self.clock = Clock()
        self.policies = PolicyStore(self.raw.view("policy/"), clock=self.clock)
        self.tokens = TokenStore(self.raw.view("token/"), self.policies, clock=self.clock)

    async def call(
        self, caller: str, path: str, data: dict[str, Any] | None = None, op: Operation = "update"
    ) -> LogicalResponse:
        """What the HTTP layer does: look the token up, consume a use, hand the request over."""
        entry = await self.tokens.lookup(caller)
        if entry is None:
            raise VaultError(403, "permission denied")
        await self.tokens.use(entry)
        req = LogicalRequest(operation=op, path=path, data=data or {}, mount_path="auth/token/", token=entry)
        return await self.tokens.handle(req)

    async def create(self, caller: str, **data: Any) -> tuple[str, dict[str, Any]]:
        resp = await self.call(caller, "create", data)
        assert resp.auth is not None
        return resp.auth["client_token"], resp.auth


@pytest.fixture
async def world() -> World:
    w = World()
    await w.policies.put("creator", CREATOR)
    await w.policies.put("sudo-creator", SUDO_CREATOR)
    await w.policies.put("app", 'path "secret/*" { capabilities = ["read"] }')
    await w.policies.put("other", 'path "other/*" { capabilities = ["read"] }')
    return w


# ---------------------------------------------------------------------------------------------
# Root token and storage


async def test_root_token_is_shown_once_and_stored_only_as_a_hash(world: World) -> None:
    """Threat: a copy of the store (or a backup) yields a usable root token."""
    root = await world.tokens.create_root()
    assert root.startswith("hvs.") and len(root) == 28
    dump = world.raw.dump()
    assert root not in dump and root[4:] not in dump
    assert hash_token(root) in dump
    entry = await world.tokens.lookup(root)
    assert entry is not None and entry.policies == ["root"] and entry.id == root
    assert (await world.tokens.acl_for(entry)).root


async def test_unknown_or_malformed_tokens_are_rejected(world: World) -> None:
    await world.tokens.create_root()
    for bad in ["", "hvs.nope", "x" * 10_000, "root"]:
        assert await world.tokens.lookup(bad) is None


async def test_lookup_self_shape_matches_vault(world: World) -> None:
    root = await world.tokens.create_root()
    resp = await world.call(root, "lookup-self", op="read")
    assert resp.data is not None and set(resp.data) == LOOKUP_KEYS
    assert resp.data["id"] == root
    assert resp.data["policies"] == ["root"]
    assert resp.data["expire_time"] is None and resp.data["ttl"] == 0
    assert resp.data["orphan"] is True and resp.data["meta"] is None
    assert resp.data["path"] == "auth/token/root" and resp.data["type"] == "service"


# ---------------------------------------------------------------------------------------------
# Create


async def test_create_auth_block_matches_vault(world: World) -> None:
    root = await world.tokens.create_root()
    resp = await world.call(
        root, "create", {"policies": ["app", "zz", "Default"], "ttl": "1h", "meta": {"a": "b"}, "num_uses": 3}
    )
    assert resp.data is None and resp.auth is not None
    auth = resp.auth
    assert set(auth) == AUTH_KEYS
    assert auth["policies"] == auth["token_policies"] == ["app", "default", "zz"]
    assert auth["lease_duration"] == 3600 and auth["renewable"] is True
    assert auth["metadata"] == {"a": "b"} and auth["num_uses"] == 3
    assert auth["orphan"] is False and auth["token_type"] == "service"
    assert auth["entity_id"] == "" and auth["mfa_requirement"] is None
    assert resp.warnings == ['Policy "zz" does not exist']


async def test_create_defaults(world: World) -> None:
    root = await world.tokens.create_root()
    _, auth = await world.create(root, policies=["app"])
    assert auth["lease_duration"] == DEFAULT_TTL == 2764800
    assert auth["metadata"] is None
    # no policies: the parent's (a root child is a non-expiring root token)
    _, auth = await world.create(root)
    assert auth["policies"] == ["root"] and auth["lease_duration"] == 0 and auth["renewable"] is False


async def test_display_name_is_prefixed_and_sanitised(world: World) -> None:
    root = await world.tokens.create_root()
    token, _ = await world.create(root, policies=["app"], display_name="My App!")
    resp = await world.call(token, "lookup-self", op="read")
    assert resp.data is not None and resp.data["display_name"] == "token-My-App"


async def test_child_policies_must_be_a_subset_of_the_parents(world: World) -> None:
    """Threat: privilege escalation by minting a child token with policies the parent lacks."""
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["creator", "app"])
    with pytest.raises(VaultError) as err:
        await world.create(parent, policies=["other"])
    assert err.value.status == 400 and err.value.errors == ["child policies must be subset of parent"]
    _, auth = await world.create(parent, policies=["app"])
    assert auth["policies"] == ["app", "default"]
    # no policies given: inherit the parent's
    _, auth = await world.create(parent)
    assert auth["policies"] == ["app", "creator", "default"]


async def test_root_policy_needs_a_root_parent(world: World) -> None:
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["sudo-creator"])
    with pytest.raises(VaultError, match="root tokens may not be created without parent token being root"):
        await world.create(parent, policies=["root"])


async def test_sudo_parent_may_assign_any_policy(world: World) -> None:
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["sudo-creator"])
    _, auth = await world.create(parent, policies=["other"])
    assert auth["policies"] == ["default", "other"]


async def test_default_is_added_only_if_the_parent_has_it(world: World) -> None:
    root = await world.tokens.create_root()
    parent, auth = await world.create(root, policies=["creator", "app"], no_default_policy=True)
    assert auth["policies"] == ["app", "creator"]
    _, auth = await world.create(parent, policies=["app"])
    assert auth["policies"] == ["app"]
    with pytest.raises(VaultError, match="subset"):
        await world.create(parent, policies=["app", "default"])


async def test_orphans_need_sudo_unless_via_create_orphan(world: World) -> None:
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["creator"])
    with pytest.raises(VaultError, match="root or sudo privileges required to create orphan token"):
        await world.create(parent, no_parent=True)
    resp = await world.call(parent, "create-orphan", {})
    assert resp.auth is not None and resp.auth["orphan"] is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_uses": -1}, "number of uses cannot be negative"),
        ({"ttl": "bogus"}, 'time: invalid duration "bogus"'),
        ({"ttl": "-5s"}, "ttl must be positive"),
        ({"renewable": "maybe"}, "renewable"),
        ({"num_uses": "x"}, "num_uses"),
        ({"policies": [1]}, "policies"),
        ({"meta": {"a": {"b": 1}}}, "meta"),
        ({"id": "custom"}, "root or sudo privileges required to specify token id"),
        ({"period": "1h"}, "root or sudo privileges required to create periodic token"),
        ({"type": "batch"}, "not supported"),
    ],
)
async def test_bad_create_parameters_are_400(world: World, data: dict[str, Any], message: str) -> None:
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["creator"])
    with pytest.raises(VaultError) as err:
        await world.call(parent, "create", data)
    assert err.value.status == 400 and message in err.value.errors[0]


async def test_unknown_create_parameters_are_warned_about(world: World) -> None:
    root = await world.tokens.create_root()
    resp = await world.call(root, "create", {"policies": ["app"], "zzz": 1, "aaa": 2})
    assert resp.warnings == ["Endpoint ignored these unrecognized parameters: [aaa zzz]"]


# ---------------------------------------------------------------------------------------------
# TTLs


async def test_explicit_max_ttl_caps_ttl_with_vaults_warning(world: World) -> None:
    root = await world.tokens.create_root()
    resp = await world.call(root, "create", {"policies": ["app"], "ttl": "2h", "explicit_max_ttl": "1h"})
    assert resp.auth is not None and resp.auth["lease_duration"] == 3600
    assert resp.warnings == [
        'TTL of "2h" exceeded the effective max_ttl of "1h"; TTL value is capped accordingly'
    ]


async def test_child_ttl_is_capped_by_the_parents_remaining_ttl(world: World) -> None:
    """Threat: a short-lived credential minting a long-lived one that outlives it."""
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["creator", "app"], ttl="1h")
    world.clock.now += 600
    _, auth = await world.create(parent, policies=["app"], ttl="5h")
    assert auth["lease_duration"] == 3000
    # an orphan is not bound to its creator
    resp = await world.call(parent, "create-orphan", {"policies": ["app"], "ttl": "5h"})
    assert resp.auth is not None and resp.auth["lease_duration"] == 5 * 3600


async def test_expired_tokens_are_gone(world: World) -> None:
    root = await world.tokens.create_root()
    token, _ = await world.create(root, policies=["app"], ttl="10m")
    world.clock.now += 599
    assert await world.tokens.lookup(token) is not None
    world.clock.now += 1
    assert await world.tokens.lookup(token) is None
    assert hash_token(token) not in world.raw.dump()  # cleaned up lazily


async def test_lookup_reports_remaining_ttl(world: World) -> None:
    root = await world.tokens.create_root()
    token, auth = await world.create(root, policies=["app"], ttl="1h")
    world.clock.now += 5
    resp = await world.call(root, "lookup", {"token": token})
    assert resp.data is not None
    assert resp.data["ttl"] == 3595 and resp.data["creation_ttl"] == 3600
    assert resp.data["id"] == token and resp.data["accessor"] == auth["accessor"]
    assert resp.data["expire_time"].endswith("Z") and resp.data["issue_time"].endswith("Z")


async def test_renew(world: World) -> None:
    root = await world.tokens.create_root()
    token, _ = await world.create(root, policies=["app"], ttl="10m", explicit_max_ttl="15m")
    world.clock.now += 60
    resp = await world.call(token, "renew-self", {"increment": "5m"})
    assert resp.auth is not None and resp.auth["lease_duration"] == 300 and resp.auth["client_token"] == token
    resp = await world.call(token, "renew-self", {"increment": "1h"})
    assert resp.auth is not None and resp.auth["lease_duration"] == 840  # 15m from creation
    assert resp.warnings == [
        'TTL of "1h" exceeded the effective max_ttl of "14m"; TTL value is capped accordingly'
    ]
    resp = await world.call(root, "renew", {"token": token, "increment": 60})
    assert resp.auth is not None and resp.auth["lease_duration"] == 60
    world.clock.now += 61
    assert await world.tokens.lookup(token) is None


async def test_renew_errors(world: World) -> None:
    root = await world.tokens.create_root()
    with pytest.raises(VaultError, match="lease is not renewable"):
        await world.call(root, "renew-self", {})
    fixed, _ = await world.create(root, policies=["app"], renewable=False)
    with pytest.raises(VaultError, match="lease is not renewable"):
        await world.call(fixed, "renew-self", {})
    with pytest.raises(VaultError, match="missing token ID"):
        await world.call(root, "renew", {})
    with pytest.raises(VaultError, match="token not found"):
        await world.call(root, "renew", {"token": "hvs.nope"})


# ---------------------------------------------------------------------------------------------
# Uses


async def test_num_uses_are_consumed_and_the_last_use_revokes(world: World) -> None:
    root = await world.tokens.create_root()
    token, _ = await world.create(root, policies=["app"], num_uses=2)
    resp = await world.call(token, "lookup-self", op="read")
    assert resp.data is not None and resp.data["num_uses"] == 1
    resp = await world.call(token, "lookup-self", op="read")
    assert resp.data is not None and resp.data["num_uses"] == -1  # as Vault shows the last use
    assert await world.tokens.lookup(token) is None


async def test_concurrent_uses_never_exceed_num_uses(world: World) -> None:
    """Threat: racing requests each spending the same last use (N uses granted more than N times)."""
    root = await world.tokens.create_root()
    token, _ = await world.create(root, policies=["app"], num_uses=3)
    entries = [await world.tokens.lookup(token) for _ in range(10)]

    async def spend(entry: TokenEntry | None) -> bool:
        assert entry is not None
        try:
            await world.tokens.use(entry)
            return True
        except VaultError as e:
            assert e.status == 403
            return False

    results = await asyncio.gather(*(spend(e) for e in entries))
    assert sum(results) == 3
    assert await world.tokens.lookup(token) is None


async def test_restricted_use_tokens_cannot_create_children(world: World) -> None:
    root = await world.tokens.create_root()
    two, _ = await world.create(root, policies=["creator"], num_uses=2)
    with pytest.raises(VaultError, match="restricted use token cannot generate child tokens"):
        await world.create(two)
    with pytest.raises(VaultError, match="parent token lookup failed: no parent found"):
        await world.create(two)  # its last use


# ---------------------------------------------------------------------------------------------
# Revocation


async def test_revoke_takes_the_subtree_but_not_orphans(world: World) -> None:
    """Threat: a revoked credential living on through the children it minted."""
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["sudo-creator"])
    child, _ = await world.create(parent)
    grandchild, _ = await world.create(child)
    orphan = (await world.call(parent, "create-orphan", {})).auth
    assert orphan is not None
    resp = await world.call(root, "revoke", {"token": parent})
    assert resp.data is None and resp.auth is None and resp.warnings is None
    for t in (parent, child, grandchild):
        assert await world.tokens.lookup(t) is None
    assert await world.tokens.lookup(orphan["client_token"]) is not None
    # nothing of the revoked tokens is left behind in storage
    dump = world.raw.dump()
    for t in (parent, child, grandchild):
        assert hash_token(t) not in dump


async def test_deep_chains_revoke_without_recursion(world: World) -> None:
    root = await world.tokens.create_root()
    top, _ = await world.create(root, policies=["creator"])
    token = top
    for _ in range(60):
        token, _ = await world.create(token)
    assert await world.tokens.revoke(await _entry(world, top)) == 61
    assert await world.tokens.lookup(token) is None


async def _entry(world: World, token: str) -> TokenEntry:
    entry = await world.tokens.lookup(token)
    assert entry is not None
    return entry


async def test_revoke_self_and_by_accessor(world: World) -> None:
    root = await world.tokens.create_root()
    a, _ = await world.create(root, policies=["app"])
    await world.call(a, "revoke-self", {})
    assert await world.tokens.lookup(a) is None
    b, auth = await world.create(root, policies=["app"])
    looked = await world.call(root, "lookup-accessor", {"accessor": auth["accessor"]})
    assert looked.data is not None and looked.data["id"] == ""  # the accessor never reveals the token
    assert set(looked.data) == LOOKUP_KEYS
    await world.call(root, "revoke-accessor", {"accessor": auth["accessor"]})
    assert await world.tokens.lookup(b) is None
    resp = await world.call(root, "revoke-accessor", {"accessor": auth["accessor"]})
    assert resp.warnings == ["No token found with this accessor"]


async def test_revoke_of_unknown_token_is_silent(world: World) -> None:
    root = await world.tokens.create_root()
    resp = await world.call(root, "revoke", {"token": "hvs.unknown"})
    assert resp.data is None and resp.warnings is None


async def test_child_created_while_parent_is_revoked_does_not_survive(world: World) -> None:
    """Threat: a create racing its parent's revocation leaves a live child of a dead parent."""
    root = await world.tokens.create_root()
    parent, _ = await world.create(root, policies=["creator"])
    entry = await _entry(world, parent)
    req = LogicalRequest(operation="update", path="create", data={}, token=entry)
    results = await asyncio.gather(
        *(world.tokens.handle(req) for _ in range(5)), world.tokens.revoke(entry), return_exceptions=True
    )
    for r in results[:5]:
        if isinstance(r, LogicalResponse):
            assert r.auth is not None
            assert await world.tokens.lookup(r.auth["client_token"]) is None
        else:
            assert isinstance(r, VaultError) and r.status == 403


# ---------------------------------------------------------------------------------------------
# API errors


async def test_api_errors(world: World) -> None:
    root = await world.tokens.create_root()
    with pytest.raises(VaultError) as err:
        await world.call(root, "nope", {})
    assert err.value.status == 404
    with pytest.raises(VaultError) as err:
        await world.call(root, "create", op="read")
    assert err.value.status == 405
    with pytest.raises(VaultError) as err:
        await world.call(root, "lookup", {"token": "hvs.nope"})
    assert (err.value.status, err.value.errors) == (403, ["bad token"])
    with pytest.raises(VaultError) as err:
        await world.call(root, "lookup-accessor", {"accessor": "nope"})
    assert err.value.status == 400 and "invalid accessor" in err.value.errors[0]
    with pytest.raises(VaultError) as err:
        await world.call(root, "revoke", {})
    assert err.value.errors == ["missing token ID"]
    # no caller at all
    with pytest.raises(VaultError) as err:
        await world.tokens.handle(LogicalRequest(operation="read", path="lookup-self"))
    assert err.value.status == 403


async def test_tokens_never_reach_the_logs(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    root = await world.tokens.create_root()
    child, _ = await world.create(root, policies=["app"])
    await world.call(root, "revoke", {"token": child})
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert root not in text and child not in text
    assert "vault_token_created" in text


# ---------------------------------------------------------------------------------------------
# Policies


async def test_policy_store(world: World) -> None:
    p = world.policies
    assert await p.list() == ["app", "creator", "default", "other", "sudo-creator", "root"]
    await p.put("MyPolicy", 'path "x" { capabilities = ["read"] }')
    assert "mypolicy" in await p.list()
    got = await p.get("MYPOLICY")
    assert got is not None and got.name == "mypolicy"
    with pytest.raises(VaultError) as err:
        await p.put("bad", 'path "x" { capabilities = ["nope"] }')
    assert err.value.errors == ['failed to parse policy: path "x": invalid capability "nope"']
    with pytest.raises(VaultError, match='cannot update "root" policy'):
        await p.put("root", 'path "x" { capabilities = ["read"] }')
    with pytest.raises(VaultError, match='cannot delete "root" policy'):
        await p.delete("root")
    with pytest.raises(VaultError, match="cannot delete default policy"):
        await p.delete("default")
    with pytest.raises(VaultError, match="invalid policy name"):
        await p.put("a/b", 'path "x" {}')
    await p.delete("mypolicy")
    assert await p.get("mypolicy") is None


async def test_default_policy_exists_and_can_be_updated(world: World) -> None:
    default = await world.policies.get("default")
    assert default is not None and any(r.path == "auth/token/lookup-self" for r in default.rules)
    await world.policies.put("default", 'path "auth/token/lookup-self" { capabilities = ["deny"] }')
    default = await world.policies.get("default")
    assert default is not None and len(default.rules) == 1


async def test_acl_follows_policy_updates(world: World) -> None:
    """Threat: a cached ACL still granting what an updated policy took away."""
    root = await world.tokens.create_root()
    token, _ = await world.create(root, policies=["app"])
    entry = await _entry(world, token)
    acl1 = await world.tokens.acl_for(entry)
    assert acl1.allowed("secret/x", "read")
    assert await world.tokens.acl_for(entry) is acl1  # cached while unchanged
    await world.policies.put("app", 'path "secret/*" { capabilities = ["list"] }')
    acl2 = await world.tokens.acl_for(entry)
    assert not acl2.allowed("secret/x", "read") and acl2.allowed("secret/x", "list")
    await world.policies.delete("app")
    assert not (await world.tokens.acl_for(entry)).allowed("secret/x", "list")


# ---------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90),
        ("90", 90),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("2d", 172800),
        ("", 0),
        ("500ms", 0),
    ],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value, "ttl") == seconds


@pytest.mark.parametrize("value", ["1x", "h", "1h2", True, [1], "1e9999h"])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(VaultError):
        parse_duration(value, "ttl")


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 45, 900, 3600, 5400, 3661)] == [
        "0s",
        "45s",
        "15m",
        "1h",
        "1h30m",
        "1h1m1s",
    ]


# ---------------------------------------------------------------------------------------------
# Shapes compared with a real OpenBao


@pytest.mark.slow
async def test_shapes_match_openbao(world: World, tmp_path: Path) -> None:
    """The auth block and lookup data carry exactly the keys (and JSON types) a real server sends."""
    root = await world.tokens.create_root()
    ours_create = await world.call(root, "create", {"policies": ["app"], "ttl": "1h", "meta": {"a": "b"}})
    assert ours_create.auth is not None
    ours_lookup = await world.call(root, "lookup", {"token": ours_create.auth["client_token"]})
    with bao_dev_server(tmp_path) as url:
        bao_call(
            url, "root", "PUT", "sys/policy/app", {"policy": 'path "secret/*" { capabilities = ["read"] }'}
        )
        _, created = bao_call(
            url, "root", "POST", "auth/token/create", {"policies": ["app"], "ttl": "1h", "meta": {"a": "b"}}
        )
        _, looked = bao_call(
            url, "root", "POST", "auth/token/lookup", {"token": created["auth"]["client_token"]}
        )
        _, root_self = bao_call(url, "root", "GET", "auth/token/lookup-self")

    def types(d: dict[str, Any]) -> dict[str, str]:
        return {k: type(v).__name__ for k, v in d.items()}

    assert types(ours_create.auth) == types(created["auth"])
    assert ours_lookup.data is not None
    assert types(ours_lookup.data) == types(looked["data"])
    for key in ("policies", "lease_duration", "renewable", "metadata", "orphan", "num_uses"):
        assert ours_create.auth[key] == created["auth"][key], key
    for key in (
        "creation_ttl",
        "display_name",
        "meta",
        "policies",
        "path",
        "type",
        "orphan",
        "explicit_max_ttl",
    ):
        assert ours_lookup.data[key] == looked["data"][key], key
    ours_root = await world.call(root, "lookup-self", op="read")
    assert ours_root.data is not None and types(ours_root.data) == types(root_self["data"])


# ---------------------------------------------------------------------------------------------
# On the real encrypted JsonStore (helper A's barrier) rather than the fake


async def test_on_the_real_barrier_store() -> None:
    """The same flows on barrier.JsonStore: its update() is what makes num_uses race-safe."""
    import os

    from plugins.vault_like.barrier import Barrier, JsonStore
    from plugins.vault_like.storage import MemoryStorage

    barrier = Barrier(MemoryStorage())
    key = os.urandom(32)
    await barrier.initialize(key, {"type": "test"})
    if barrier.sealed:
        await barrier.unseal(key)
    store = JsonStore(barrier, "sys/")
    policies = PolicyStore(store.view("policy"))
    tokens = TokenStore(store.view("token"), policies)
    await policies.put("creator", CREATOR)
    root = await tokens.create_root()
    root_entry = await tokens.lookup(root)
    assert root_entry is not None
    req = LogicalRequest(operation="update", path="create", data={"policies": ["creator"]}, token=root_entry)
    created = (await tokens.handle(req)).auth
    assert created is not None
    parent = await tokens.lookup(created["client_token"])
    assert parent is not None
    req = LogicalRequest(operation="update", path="create", data={"num_uses": 0}, token=parent)
    child = (await tokens.handle(req)).auth
    assert child is not None
    limited = (
        await tokens.handle(
            LogicalRequest(operation="update", path="create", data={"num_uses": 3}, token=root_entry)
        )
    ).auth
    assert limited is not None
    entries = [await tokens.lookup(limited["client_token"]) for _ in range(8)]

    async def spend(entry: TokenEntry | None) -> bool:
        assert entry is not None
        try:
            await tokens.use(entry)
            return True
        except VaultError:
            return False

    assert sum(await asyncio.gather(*(spend(e) for e in entries))) == 3
    assert await policies.list() == ["creator", "default", "root"]
    assert await tokens.revoke(parent) == 2
    assert await tokens.lookup(child["client_token"]) is None
    assert await tokens.lookup(root) is not None


async def test_found_by_review_renewal_and_explicit_max_follow_vault(world: World) -> None:
    """Threat: a 1h token renewed without an increment came back as a 768h one (any holder could
    stretch its own token 32 days), and a root token with explicit_max_ttl 1h never expired."""
    root = await world.tokens.create_root()
    token, auth = await world.create(root, policies=["app"], ttl="1h")
    assert auth["lease_duration"] == 3600
    renewed = await world.call(token, "renew-self", {})
    assert renewed.auth is not None and renewed.auth["lease_duration"] == 3600  # its own TTL again
    _, auth = await world.create(root, explicit_max_ttl="1h")
    assert auth["policies"] == ["root"] and auth["lease_duration"] == 3600
