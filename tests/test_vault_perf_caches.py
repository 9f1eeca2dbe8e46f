"""The read/write fast paths of vault_like: decoded-document caches, grouped updates, unlisted version
documents, the audit log's rendered blocks. Each cache is a chance to serve something stale or to
hand one caller's mutable object to another; these tests pin that it never does."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from plugins.vault_like.api import uuid4_strings
from plugins.vault_like.audit import AuditLog
from plugins.vault_like.audit_sinks import FileSink
from plugins.vault_like.barrier import Barrier, JsonStore
from plugins.vault_like.kv import KvV2
from plugins.vault_like.logical import LogicalRequest, VaultError
from plugins.vault_like.storage import MemoryStorage
from plugins.vault_like.tokens import PolicyStore, TokenStore

ROOT_KEY = bytes(range(32))


class SharedMemory(MemoryStorage):
    """Storage other replicas write too (like S3): the barrier must cache nothing."""

    exclusive = False


class CountingMemory(MemoryStorage):
    """Exclusive storage that counts physical writes, which take a loop turn (as a commit would)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    async def put(self, key: str, value: bytes, expect: Any = None) -> str:
        self.puts += 1
        await asyncio.sleep(0)
        return await super().put(key, value, expect)


async def open_barrier(storage: MemoryStorage) -> Barrier:
    barrier = Barrier(storage)
    if await barrier.initialized():
        await barrier.unseal(ROOT_KEY)
    else:
        await barrier.initialize(ROOT_KEY, {"type": "test"})
    return barrier


# ---------------------------------------------------------------------------------------------
# JsonStore.read_shared / read_as


async def test_shared_reads_decode_once_and_follow_every_change() -> None:
    """Threat: a cached decoded document outlives a write, delete or rotation (stale secret)."""
    barrier = await open_barrier(MemoryStorage())
    store = JsonStore(barrier, "kv/")
    await store.write("a", {"n": 1})
    first = await store.read_shared("a")
    assert first == {"n": 1}
    assert await store.read_shared("a") is first  # decoded once
    assert await store.read("a") is not first  # plain reads still get their own copy

    await store.write("a", {"n": 2})
    assert await store.read_shared("a") == {"n": 2}
    await store.update("a", lambda old: {"n": (old or {})["n"] + 1})
    assert await store.read_shared("a") == {"n": 3}
    await barrier.rotate()
    assert await store.read_shared("a") == {"n": 3}
    await store.write("a", {"n": 4})  # under the new term
    assert await store.read_shared("a") == {"n": 4}
    await store.delete("a")
    assert await store.read_shared("a") is None
    assert await store.read_as("a", dict) is None


async def test_sealing_forgets_decoded_documents() -> None:
    barrier = await open_barrier(MemoryStorage())
    store = JsonStore(barrier, "kv/")
    await store.write("a", {"n": 1})
    await store.read_shared("a")
    barrier.seal()
    with pytest.raises(Exception, match="sealed"):
        await store.read_shared("a")
    await barrier.unseal(ROOT_KEY)
    assert await store.read_shared("a") == {"n": 1}


async def test_shared_storage_never_caches_decoded_documents() -> None:
    """Threat: a replica over S3 serving its own stale copy after another replica wrote."""
    data = SharedMemory()
    one = JsonStore(await open_barrier(data), "kv/")
    other_storage = SharedMemory()
    other_storage._data = data._data  # the same objects: a second replica on one bucket
    other_storage._versions = data._versions
    two = JsonStore(await open_barrier(other_storage), "kv/")
    await one.write("a", {"n": 1})
    seen = await two.read_shared("a")
    assert seen == {"n": 1}
    assert await two.read_shared("a") is not seen  # decoded afresh every time
    await one.write("a", {"n": 2})
    assert await two.read_shared("a") == {"n": 2}
    assert await two.read_as("a", lambda d: d["n"]) == 2


async def test_a_raced_read_is_not_cached() -> None:
    """A read that started before a write must not install its (older) document in the cache."""
    barrier = await open_barrier(MemoryStorage())
    store = JsonStore(barrier, "kv/")
    await store.write("a", {"n": 1})
    old = await barrier.get("kv/a")
    assert old is not None
    await store.write("a", {"n": 2})
    # Decoding the old Doc (as a reader holding it would) does not make it the cached answer.
    assert barrier.decoded("kv/a", old, JsonStore._decode) == {"n": 1}
    assert await store.read_shared("a") == {"n": 2}


# ---------------------------------------------------------------------------------------------
# Grouped updates


async def test_concurrent_updates_of_one_document_share_writes_and_lose_nothing() -> None:
    """Threat: grouping updates loses one (lost update) or acknowledges one before its write."""
    storage = CountingMemory()
    barrier = await open_barrier(storage)
    store = JsonStore(barrier, "kv/")
    await store.write("counter", {"n": 0})
    storage.puts = 0

    async def bump(i: int) -> dict[str, Any] | None:
        def fn(old: dict[str, Any] | None) -> dict[str, Any]:
            assert old is not None
            return {"n": old["n"] + 1, "last": i}

        return await store.update("counter", fn)

    results = await asyncio.gather(*(bump(i) for i in range(50)))
    assert (await store.read("counter") or {})["n"] == 50
    assert sorted(r["n"] for r in results if r) == list(range(1, 51))  # each saw its own outcome
    assert storage.puts < 50  # grouped: fewer physical writes than updates


async def test_one_callers_abort_does_not_abort_the_others() -> None:
    barrier = await open_barrier(MemoryStorage())
    store = JsonStore(barrier, "kv/")
    await store.write("doc", {"n": 0})

    async def update(i: int) -> Any:
        def fn(old: dict[str, Any] | None) -> dict[str, Any]:
            assert old is not None
            if i % 3 == 0:
                raise VaultError(400, f"refused {i}")
            return {"n": old["n"] + 1}

        return await store.update("doc", fn)

    outcomes = await asyncio.gather(*(update(i) for i in range(12)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, VaultError)]
    assert len(refused) == 4
    assert {str(e) for e in refused} == {f"refused {i}" for i in (0, 3, 6, 9)}
    assert (await store.read("doc") or {})["n"] == 8


async def test_a_cancelled_waiting_update_is_not_applied() -> None:
    """A caller cancelled while queued got no answer: its change must not land behind its back."""
    barrier = await open_barrier(MemoryStorage())
    store = JsonStore(barrier, "kv/")
    await store.write("doc", {"n": 0})
    lock = barrier.update_lock("kv/doc")
    await lock.acquire()  # hold the document's queue

    def add(old: dict[str, Any] | None) -> dict[str, Any]:
        assert old is not None
        return {"n": old["n"] + 1}

    cancelled = asyncio.ensure_future(store.update("doc", add))
    kept = asyncio.ensure_future(store.update("doc", add))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    lock.release()
    assert await kept == {"n": 1}
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await store.read("doc") == {"n": 1}


async def test_grouped_updates_on_shared_storage_still_decide_by_compare_and_swap() -> None:
    """Two replicas: concurrent CAS-checked writes; exactly one of those that read version 0 wins."""
    data = SharedMemory()
    stores = []
    for _ in range(2):
        storage = SharedMemory()
        storage._data, storage._versions = data._data, data._versions
        stores.append(JsonStore(await open_barrier(storage), "kv/"))
    await stores[0].write("doc", {"v": 0})

    async def cas(store: JsonStore, who: int) -> bool:
        def fn(old: dict[str, Any] | None) -> dict[str, Any]:
            if old is None or old["v"] != 0:
                raise VaultError(400, "check-and-set parameter did not match the current version")
            return {"v": 1, "who": who}

        try:
            await store.update("doc", fn)
        except VaultError:
            return False
        return True

    wins = await asyncio.gather(*(cas(stores[i % 2], i) for i in range(10)))
    assert sum(wins) == 1


# ---------------------------------------------------------------------------------------------
# KV on the real store


async def call(kv: KvV2, operation: str, path: str, data: dict[str, Any] | None = None) -> Any:
    try:
        response = await kv.handle(LogicalRequest(operation=operation, path=path, data=data or {}))  # type: ignore[arg-type]
    except VaultError as exc:
        return exc.status, exc.data
    return 200, response.data


async def test_kv_reads_never_stale_and_versions_stay_unlisted() -> None:
    """Threat: the cached read path serving an old version after a write, delete or destroy."""
    storage = CountingMemory()
    barrier = await open_barrier(storage)
    mount = JsonStore(barrier, "logical/m/")
    kv = KvV2(mount, "secret/")
    for i in range(3):
        assert (await call(kv, "create", "data/k", {"data": {"i": i}}))[0] == 200
        status, body = await call(kv, "read", "data/k")
        assert status == 200 and body["data"] == {"i": i}
        # The response is the caller's own (the secret inside it is shared and read-only: the HTTP
        # layer only renders and hashes it).
        body["data"] = {"i": "replaced by a caller"}
    assert (await call(kv, "read", "data/k"))[1]["data"] == {"i": 2}
    # Version documents are found through the metadata, and kept out of the directory index.
    assert await mount.list("ver/") == []
    assert await mount.list("meta/") == ["k"]
    await call(kv, "update", "delete/k", {"versions": [3]})
    status, body = await call(kv, "read", "data/k")
    assert status == 404 and body["data"] is None
    await call(kv, "update", "undelete/k", {"versions": [3]})
    assert (await call(kv, "read", "data/k"))[1]["data"] == {"i": 2}
    await call(kv, "update", "destroy/k", {"versions": [3]})
    status, body = await call(kv, "read", "data/k")
    assert status == 404 and body["metadata"]["destroyed"] is True
    await call(kv, "delete", "metadata/k")
    assert (await call(kv, "read", "data/k"))[0] == 404
    # Every version document went with the key (none is orphaned by leaving the index).
    remaining = [k for k in await mount.list("") if k not in ("meta/",)]
    assert remaining == []


async def test_a_new_version_of_an_existing_key_writes_no_directory_index() -> None:
    storage = CountingMemory()
    kv = KvV2(JsonStore(await open_barrier(storage), "logical/m/"), "secret/")
    await call(kv, "create", "data/k", {"data": {"i": 0}})
    storage.puts = 0
    await call(kv, "update", "data/k", {"data": {"i": 1}})
    assert storage.puts == 2  # the version document and the metadata, nothing else


# ---------------------------------------------------------------------------------------------
# Tokens and policies on the real store


async def tokens_on(storage: MemoryStorage, clock: Any = None) -> tuple[TokenStore, PolicyStore]:
    store = JsonStore(await open_barrier(storage), "sys/")
    policies = PolicyStore(store.view("policy"))
    kwargs = {"clock": clock} if clock else {}
    return TokenStore(store.view("token"), policies, **kwargs), policies


async def create(tokens: TokenStore, parent: Any, **data: Any) -> str:
    req = LogicalRequest(operation="update", path="create", data=data, token=parent)
    auth = (await tokens.handle(req)).auth
    assert auth is not None
    return str(auth["client_token"])


async def test_cached_token_entries_follow_uses_renewals_and_revocation() -> None:
    """Threat: a cached token entry lets a used-up, revoked or expired token in."""
    now = [1_000_000.0]
    tokens, _ = await tokens_on(MemoryStorage(), clock=lambda: now[0])
    root = await tokens.lookup(await tokens.create_root())
    assert root is not None

    limited = await create(tokens, root, num_uses=2, policies=["default"])
    for left in (1, 0):
        entry = await tokens.lookup(limited)
        assert entry is not None
        await tokens.use(entry)
        assert entry.num_uses == (left or -1)
    assert await tokens.lookup(limited) is None  # used up

    short = await create(tokens, root, ttl="60s", policies=["default"])
    entry = await tokens.lookup(short)
    assert entry is not None and entry.id == short
    entry.num_uses = 99  # a caller's change to its copy...
    entry.expire_time = None
    again = await tokens.lookup(short)
    assert again is not None and again.num_uses == 0 and again.expire_time is not None  # ...stays its own
    renewed = LogicalRequest(operation="update", path="renew-self", data={"increment": "600s"}, token=again)
    await tokens.handle(renewed)
    now[0] += 300  # past the first TTL, within the renewal
    assert await tokens.lookup(short) is not None
    now[0] += 600
    assert await tokens.lookup(short) is None  # expired

    doomed = await create(tokens, root, policies=["default"])
    assert await tokens.lookup(doomed) is not None
    target = await tokens.lookup(doomed)
    assert target is not None
    await tokens.revoke(target)
    assert await tokens.lookup(doomed) is None


async def test_policy_changes_apply_to_the_next_request() -> None:
    """Threat: a cached ACL keeps granting what an updated or deleted policy no longer grants."""
    tokens, policies = await tokens_on(MemoryStorage())
    root = await tokens.lookup(await tokens.create_root())
    await policies.put("app", 'path "secret/data/a" { capabilities = ["read"] }')
    token = await create(tokens, root, policies=["app"])
    entry = await tokens.lookup(token)
    assert entry is not None
    assert (await tokens.acl_for(entry)).allowed("secret/data/a", "read")
    await policies.put("app", 'path "secret/data/b" { capabilities = ["read"] }')
    acl = await tokens.acl_for(entry)
    assert not acl.allowed("secret/data/a", "read") and acl.allowed("secret/data/b", "read")
    await policies.delete("app")
    assert not (await tokens.acl_for(entry)).allowed("secret/data/b", "read")


# ---------------------------------------------------------------------------------------------
# Audit entries


async def test_audit_blocks_are_rendered_once_and_entries_keep_their_shape(tmp_path: Path) -> None:
    """Threat: a reused rendering carrying another request's fields, or a plaintext token kept."""
    tokens, _ = await tokens_on(MemoryStorage())
    token = await tokens.create_root()
    entry = await tokens.lookup(token)
    assert entry is not None
    audit = AuditLog(FileSink(tmp_path / "audit.log", logging.getLogger("test")), logging.getLogger("test"))
    await audit.open()
    audit.set_salt(os.urandom(32))
    auth = audit.auth_block(token, entry)
    assert audit.auth_block(token, await tokens.lookup(token)) is auth  # one per token
    assert audit.hasher is not None
    assert token not in audit.hasher._cache  # no plaintext token kept as a cache key
    assert auth["client_token"] == audit.hasher.digest(token)

    blocks = []
    for i, operation in enumerate(("update", "read")):
        request = audit.request_block(
            request_id=f"id-{i}",
            operation=operation,
            path=f"secret/data/k{i}",
            mount_point="secret/",
            mount_type="kv",
            token=token,
            entry=entry,
            data={"data": {"password": "p"}} if operation == "update" else None,
            remote="127.0.0.1",
            auth=auth,
        )
        await audit.log_request(auth, request)  # renders the request block...
        request["operation"] = "create" if operation == "update" else operation  # ...a change drops it
        await audit.log_response(auth, request, status=200, data={"v": "secret"})
        blocks.append(request)
    await audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(e["type"], e["request"]["id"]) for e in lines] == [
        ("request", "id-0"),
        ("response", "id-0"),
        ("request", "id-1"),
        ("response", "id-1"),
    ]
    assert lines[0]["request"]["operation"] == "update" and lines[1]["request"]["operation"] == "create"
    assert list(lines[0]) == ["time", "type", "auth", "request", "error"]
    assert list(lines[1]) == ["time", "type", "auth", "request", "response", "error"]
    text = (tmp_path / "audit.log").read_text()
    assert token not in text and '"p"' not in text and 'secret"' not in text.replace('"secret/', "")
    assert lines[1]["response"]["data"]["v"] == audit.hash("secret")
    token_hash = audit.hasher.digest(token)
    assert lines[0]["request"]["client_token"] == lines[0]["auth"]["client_token"] == token_hash


def test_request_ids_are_random_v4_uuids() -> None:
    ids = uuid4_strings(batch=8)
    seen = [next(ids) for _ in range(40)]  # crosses batch boundaries
    assert len(set(seen)) == 40
    for text in seen:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
