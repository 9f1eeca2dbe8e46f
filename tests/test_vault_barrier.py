"""vault_like's encryption barrier and JsonStore: sealing, tamper detection, rotation, directory
indexes, caching, and two replicas over one S3 bucket (moto's real server)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from plugins.vault_like import barrier as barrier_module
from plugins.vault_like.barrier import Barrier, BarrierError, Doc, JsonStore, SealedError
from plugins.vault_like.logical import VaultError
from plugins.vault_like.storage import (
    ANY,
    Conflict,
    Entry,
    MemoryStorage,
    S3Storage,
    SqliteStorage,
    StorageError,
    _Any,
)

ROOT_KEY = bytes(range(32))
SEAL = {"type": "awskms", "key_id": "test", "ciphertext": "eA==", "encryption_context": {}}
PHYSICAL = re.compile(r"^(core/seal|core/keyring|[ed]/[0-9a-f]{64})$")


class SharedMemory(MemoryStorage):
    """Memory storage that says others write it too (no cache), and yields on every call, so
    concurrent tasks interleave as replicas over S3 would. Counts reads."""

    exclusive = False

    def __init__(self, data: MemoryStorage | None = None, seed: int = 0) -> None:
        super().__init__()
        if data is not None:
            self._data = data._data  # share the dict and the version counter: two "replicas"
            self._versions = data._versions
        self.reads = 0
        self._random = random.Random(seed)

    async def _pause(self) -> None:
        for _ in range(self._random.randrange(3)):
            await asyncio.sleep(0)

    async def get(self, key: str) -> Entry | None:
        self.reads += 1
        await self._pause()
        return await super().get(key)

    async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
        await self._pause()
        return await super().put(key, value, expect)

    async def delete(self, key: str, expect: str | _Any = ANY) -> None:
        await self._pause()
        await super().delete(key, expect)


async def open_barrier(storage: Any = None) -> Barrier:
    barrier = Barrier(storage if storage is not None else MemoryStorage())
    await barrier.initialize(ROOT_KEY, SEAL)
    return barrier


# =========================================================================== seal state


async def test_initialize_then_unseal_from_another_instance() -> None:
    storage = MemoryStorage()
    first = Barrier(storage)
    assert first.sealed and not await first.initialized()
    assert await first.read_seal_config() is None
    await first.initialize(ROOT_KEY, SEAL)
    assert not first.sealed and await first.initialized()
    await first.put("secret/a", b"value")
    second = Barrier(storage)
    assert second.sealed and await second.read_seal_config() == SEAL
    await second.unseal(ROOT_KEY)
    doc = await second.get("secret/a")
    assert doc is not None and doc.value == b"value"
    first_doc = await first.get("secret/a")
    assert isinstance(doc, Doc) and first_doc is not None and doc.version == first_doc.version


async def test_initialize_twice_is_a_conflict() -> None:
    # Threat: a second `init` (or a racing replica) replacing the keyring and orphaning every entry.
    storage = MemoryStorage()
    await open_barrier(storage)
    keyring = await storage.get("core/keyring")
    with pytest.raises(Conflict):
        await Barrier(storage).initialize(bytes(32), SEAL)
    assert await storage.get("core/keyring") == keyring


async def test_sealed_barrier_refuses_every_data_access() -> None:
    # Threat: reading or writing around the seal (e.g. after a KMS refusal at start-up).
    barrier = await open_barrier()
    await barrier.put("secret/a", b"v")
    barrier.seal()
    assert barrier.sealed
    for call in (
        barrier.get("secret/a"),
        barrier.put("secret/a", b"w"),
        barrier.delete("secret/a"),
        barrier.list("secret/"),
        barrier.rotate(),
        JsonStore(barrier, "secret/").read("a"),
    ):
        with pytest.raises(SealedError, match="Vault is sealed"):
            await call
    with pytest.raises(SealedError):
        barrier.key_status()
    await barrier.unseal(ROOT_KEY)
    assert (await barrier.get("secret/a")) is not None


async def test_wrong_root_key_does_not_unseal() -> None:
    # Threat: a guessed or substituted root key opening the store.
    storage = MemoryStorage()
    await open_barrier(storage)
    barrier = Barrier(storage)
    with pytest.raises(BarrierError, match="root key does not open the keyring"):
        await barrier.unseal(bytes(32))
    assert barrier.sealed
    with pytest.raises(BarrierError, match="32 bytes"):
        await barrier.unseal(b"short")
    with pytest.raises(BarrierError, match="no keyring"):
        await Barrier(MemoryStorage()).unseal(ROOT_KEY)


async def test_tampered_keyring_does_not_unseal() -> None:
    # Before the first rotation the keyring lives in core/seal; after it, in core/keyring.
    storage = MemoryStorage()
    await open_barrier(storage)
    seal = await storage.get("core/seal")
    assert seal is not None
    doc = json.loads(seal.value)
    blob = base64.b64decode(doc["keyring"])
    doc["keyring"] = base64.b64encode(blob[:-1] + bytes([blob[-1] ^ 1])).decode()
    await storage.put("core/seal", json.dumps(doc).encode())
    with pytest.raises(BarrierError, match="does not open the keyring"):
        await Barrier(storage).unseal(ROOT_KEY)

    storage = MemoryStorage()
    await (await open_barrier(storage)).rotate()
    entry = await storage.get("core/keyring")
    assert entry is not None
    await storage.put("core/keyring", entry.value[:-1] + bytes([entry.value[-1] ^ 1]))
    with pytest.raises(BarrierError, match="does not open the keyring"):
        await Barrier(storage).unseal(ROOT_KEY)


@pytest.mark.parametrize("failing_write", [1, 2])
async def test_a_crash_during_init_leaves_the_store_uninitialised_not_broken(failing_write: int) -> None:
    # Threat (availability): init used to write core/seal, then core/keyring; a crash or a failed
    # write between the two left a seal config with no keyring, which no init or unseal could fix.
    # Now init is one create-only write: whichever write fails, it happened whole or not at all.
    class FailingStorage(MemoryStorage):
        writes = 0

        async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
            self.writes += key.startswith("core/")  # init's writes
            if key.startswith("core/") and self.writes == failing_write:
                raise StorageError("disk I/O error")
            return await super().put(key, value, expect)

    storage = FailingStorage()
    barrier = Barrier(storage)
    try:
        await barrier.initialize(ROOT_KEY, SEAL)
    except StorageError:
        assert not await barrier.initialized()
        await barrier.initialize(ROOT_KEY, SEAL)
    await barrier.put("secret/k", b"v1")
    again = Barrier(storage)
    assert await again.initialized()
    await again.unseal(ROOT_KEY)
    found = await again.get("secret/k")
    assert found is not None and found.value == b"v1"


# =========================================================================== tamper detection


async def test_swapped_entries_fail_to_decrypt() -> None:
    """Threat: someone with write access to storage swapping two entries' blobs, e.g. giving the
    admin's policy the content of their own. The logical path is the AAD, so a moved blob fails."""
    storage = MemoryStorage()
    writer = await open_barrier(storage)
    await writer.put("sys/policy/admin", b'{"policy": "admin"}')
    await writer.put("sys/policy/mine", b'{"policy": "mine"}')
    keyring = writer._keyring
    assert keyring is not None
    key_a, key_b = (
        writer._entry_key(keyring, "sys/policy/admin"),
        writer._entry_key(keyring, "sys/policy/mine"),
    )
    a, b = await storage.get(key_a), await storage.get(key_b)
    assert a is not None and b is not None
    await storage.put(key_a, b.value)
    await storage.put(key_b, a.value)
    reader = Barrier(storage)
    await reader.unseal(ROOT_KEY)
    for path in ("sys/policy/admin", "sys/policy/mine"):
        with pytest.raises(BarrierError, match="does not decrypt") as err:
            await reader.get(path)
        assert "policy" not in str(err.value)  # names neither path nor value


async def test_flipped_or_truncated_blobs_fail() -> None:
    storage = MemoryStorage()
    writer = await open_barrier(storage)
    await writer.put("a/b", b"value")
    assert writer._keyring is not None
    key = writer._entry_key(writer._keyring, "a/b")
    blob = (await storage.get(key)).value  # type: ignore[union-attr]
    for bad in (blob[:10], blob[:-1] + bytes([blob[-1] ^ 1]), blob[:20] + bytes([blob[20] ^ 1]) + blob[21:]):
        await storage.put(key, bad)
        reader = Barrier(storage)
        await reader.unseal(ROOT_KEY)
        with pytest.raises(BarrierError):
            await reader.get("a/b")


async def test_directory_index_cannot_be_swapped_for_an_entry() -> None:
    storage = MemoryStorage()
    writer = await open_barrier(storage)
    await writer.put("a/b", b'["x"]')
    kr = writer._keyring
    assert kr is not None
    entry = await storage.get(writer._entry_key(kr, "a/b"))
    assert entry is not None
    await storage.put(writer._dir_key(kr, "a/"), entry.value)
    reader = Barrier(storage)
    await reader.unseal(ROOT_KEY)
    with pytest.raises(BarrierError):
        await reader.list("a/")


# =========================================================================== rotation


async def test_rotate_adds_a_term_and_old_entries_stay_readable() -> None:
    storage = MemoryStorage()
    barrier = await open_barrier(storage)
    assert barrier.key_status()["term"] == 1
    await barrier.put("old/entry", b"from term 1")
    answer = await barrier.rotate()
    assert answer["term"] == 2 and answer["install_time"].endswith("Z")
    assert barrier.key_status() == answer
    await barrier.put("new/entry", b"from term 2")
    kr = barrier._keyring
    assert kr is not None
    terms = {
        path: int.from_bytes((await storage.get(barrier._entry_key(kr, path))).value[:4], "big")  # type: ignore[union-attr]
        for path in ("old/entry", "new/entry")
    }
    assert terms == {"old/entry": 1, "new/entry": 2}
    fresh = Barrier(storage)  # no cache: really decrypts both terms
    await fresh.unseal(ROOT_KEY)
    assert (await fresh.get("old/entry")).value == b"from term 1"  # type: ignore[union-attr]
    assert (await fresh.get("new/entry")).value == b"from term 2"  # type: ignore[union-attr]
    assert fresh.key_status()["term"] == 2


async def test_a_replica_reads_entries_written_after_another_rotated() -> None:
    shared = MemoryStorage()
    a = await open_barrier(SharedMemory(shared))
    b = Barrier(SharedMemory(shared))
    await b.unseal(ROOT_KEY)
    await a.rotate()
    await a.put("x/y", b"term 2 entry")
    assert (await b.get("x/y")).value == b"term 2 entry"  # type: ignore[union-attr]
    assert b.key_status()["term"] == 2
    assert (await b.rotate())["term"] == 3  # b rotates from the current keyring, not its stale one
    assert (await a.get("x/y")) is not None
    await b.put("x/z", b"term 3 entry")
    assert (await a.get("x/z")).value == b"term 3 entry"  # type: ignore[union-attr]


async def test_a_rotation_reaches_the_writes_of_every_replica() -> None:
    # Threat: keys rotated after a suspected exposure, while another replica on the same bucket
    # keeps encrypting new secrets under the old term for as long as it runs. Writers on shared
    # storage reload the keyring at least every `keyring_refresh` seconds (5 by default).
    shared = MemoryStorage()
    a = await open_barrier(SharedMemory(shared))
    b = Barrier(SharedMemory(shared), keyring_refresh=0.2)
    await b.unseal(ROOT_KEY)
    await b.put("x/before", b"v")
    await a.rotate()
    await asyncio.sleep(0.25)
    await b.put("x/after", b"v")
    raw = {key: entry.value for key, entry in shared._data.items() if key.startswith("e/")}
    terms = sorted(int.from_bytes(blob[:4], "big") for blob in raw.values())
    assert terms == [1, 2]  # "x/before" under term 1, "x/after" under the rotated term
    assert b.key_status()["term"] == 2


async def test_a_stale_keyring_never_replaces_a_newer_one() -> None:
    # A reload that raced a rotation in this process must not take the keyring back a term.
    shared = MemoryStorage()
    a = await open_barrier(SharedMemory(shared))
    stale = await a._load_keyring(a._root)  # type: ignore[arg-type]
    await a.rotate()
    a._set_keyring(a._root, stale)  # type: ignore[arg-type]
    assert a.key_status()["term"] == 2


async def test_a_write_in_flight_at_seal_leaves_nothing_readable() -> None:
    # Threat: plaintext served by a sealed barrier. A write that completes after seal() puts its
    # entry in the cache; reads must still refuse until the store is unsealed again.
    class SlowStorage(MemoryStorage):
        gate: asyncio.Event | None = None

        async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
            if self.gate is not None and key.startswith("e/"):
                await self.gate.wait()
            return await super().put(key, value, expect)

    storage = SlowStorage()
    barrier = await open_barrier(storage)
    storage.gate = asyncio.Event()
    write = asyncio.create_task(barrier.put("secret/late", b"plaintext", indexed=False))
    await asyncio.sleep(0)
    barrier.seal()
    storage.gate.set()
    await write
    with pytest.raises(SealedError):
        await barrier.get("secret/late")
    with pytest.raises(SealedError):
        await barrier.list("secret/")


# =========================================================================== directory indexes


async def test_list_is_one_read_and_storage_sees_no_path_names() -> None:
    storage = SharedMemory()
    barrier = await open_barrier(storage)
    for path in ("secret/app/db", "secret/app/api", "secret/web/tls/cert", "secret/top", "other/x"):
        await barrier.put(path, b"v")
    assert await barrier.list("") == ["other/", "secret/"]
    before = storage.reads
    assert await barrier.list("secret/") == ["app/", "top", "web/"]
    assert storage.reads == before + 1
    assert await barrier.list("secret/web/") == ["tls/"]
    assert await barrier.list("secret/nothing/") == []
    await barrier.delete("secret/web/tls/cert")
    assert await barrier.list("secret/") == ["app/", "top"]
    assert await barrier.list("secret/web/") == []
    await barrier.delete("secret/app/db")
    assert await barrier.list("secret/app/") == ["api"]
    for key in await storage.keys(""):
        assert PHYSICAL.match(key), key


@pytest.mark.parametrize("bad", ["", "/abs", "dir/", "a//b", "nul\x00"])
async def test_bad_paths_are_400_without_echo(bad: str) -> None:
    barrier = await open_barrier()
    with pytest.raises(VaultError) as err:
        await barrier.put(bad, b"v")
    assert err.value.status == 400 and err.value.errors == ["invalid path"]
    with pytest.raises(VaultError):
        await barrier.list("no-slash")


async def churn_and_check(seed: int, replicas: int) -> list[str]:
    """Random concurrent puts and deletes over a small tree from ``replicas`` barriers on one
    storage that yields at random points; returns the directories whose listing is wrong."""
    storage: MemoryStorage = SharedMemory(seed=seed) if replicas > 1 else MemoryStorage()
    barriers = [await open_barrier(storage)]
    for n in range(1, replicas):  # shared storage: replicas, each with its own locks
        replica = Barrier(SharedMemory(storage, seed=seed + 1000 * n))
        await replica.unseal(ROOT_KEY)
        barriers.append(replica)
    paths = [f"s/{a}/{b}" for a in "ab" for b in ("x", "y", "z/q")]
    rng = random.Random(seed)

    async def churn(n: int) -> None:
        barrier = barriers[n % len(barriers)]
        for _ in range(30):
            path = rng.choice(paths)
            if rng.random() < 0.5:
                await barrier.put(path, b"v")
            else:
                await barrier.delete(path)

    await asyncio.gather(*(churn(n) for n in range(6)))
    check = Barrier(storage)  # a fresh reader: no cache
    await check.unseal(ROOT_KEY)
    expected: dict[str, set[str]] = {}
    for path in paths:
        if await check.get(path) is None:
            continue
        parts = path.split("/")
        for depth in range(len(parts)):
            directory = "/".join(parts[:depth]) + ("/" if depth else "")
            expected.setdefault(directory, set()).add(parts[depth] + ("/" if depth < len(parts) - 1 else ""))
    return [
        d
        for d in ["", "s/", "s/a/", "s/b/", "s/a/z/", "s/b/z/"]
        if await check.list(d) != sorted(expected.get(d, set()))
    ]


async def test_concurrent_puts_and_deletes_leave_exact_listings() -> None:
    """Threat: a listing that shows a deleted secret's name, or hides a written one, after a race:
    within one process (SQLite), and between two S3 replicas whose locks know nothing of each other.
    The seeds are fixed; without the forced index write on shared storage, several of them fail."""
    assert await churn_and_check(seed=1, replicas=1) == []
    for seed in range(40):
        assert await churn_and_check(seed, replicas=2) == [], f"seed {seed}"


async def test_sqlite_raw_file_holds_neither_value_nor_key_name(tmp_path: Path) -> None:
    """Threat: reading secrets off the disk (a snapshot of the volume, the parent instance).
    The raw database and its WAL must hold neither a secret's value nor its key name."""
    path = tmp_path / "vault.db"
    storage = SqliteStorage(path)
    barrier = await open_barrier(storage)
    store = JsonStore(barrier, "logical/0b5a1c/")
    value = "s3cr3t-Value-9f8e7d6c5b4a"
    name = "zanzibar-payroll-credentials"
    await store.write(f"data/{name}", {"password": value})
    await store.write(f"data/{name}/nested", {"x": value})
    assert await store.list("data/") == [name, f"{name}/"]

    def scan() -> None:
        for file in (path, Path(f"{path}-wal")):
            if not file.exists():
                continue
            raw = file.read_bytes()
            for needle in (value, name, "logical/0b5a1c", "password"):
                for form in (needle.encode(), needle.encode("utf-16-le")):
                    assert form not in raw, f"{needle!r} found in {file.name}"

    assert Path(f"{path}-wal").stat().st_size > 0  # the scan below really sees the WAL
    scan()
    await storage.close()
    scan()
    # and the plaintext is really there behind the barrier (the scan is not vacuous)
    reopened = SqliteStorage(path)
    try:
        again = Barrier(reopened)
        await again.unseal(ROOT_KEY)
        assert await JsonStore(again, "logical/0b5a1c/").read(f"data/{name}") == {"password": value}
    finally:
        await reopened.close()


# =========================================================================== cache


async def test_sqlite_cache_follows_writes_and_deletes(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "vault.db")
    try:
        barrier = await open_barrier(storage)
        store = JsonStore(barrier, "kv/")
        assert await store.read("a") is None
        await store.write("a", {"n": 1})
        assert await store.read("a") == {"n": 1}
        await store.write("a", {"n": 2})
        assert await store.read("a") == {"n": 2}
        doc = await barrier.get("kv/a")
        raw = await storage.get(barrier._entry_key(barrier._keyring, "kv/a"))  # type: ignore[arg-type]
        assert doc is not None and raw is not None and doc.version == raw.version
        await store.delete("a")
        assert await store.read("a") is None
        # A read served from cache is a copy the caller may change freely.
        await store.write("b", {"list": [1]})
        (await store.read("b"))["list"].append(2)  # type: ignore[index]
        assert await store.read("b") == {"list": [1]}
    finally:
        await storage.close()


async def test_the_entry_cache_is_bounded_in_bytes_and_takes_decoded_forms_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: a token that may write secrets fills the count-bounded cache (4096 entries) with
    # megabyte values, plus their decoded copies: gigabytes of the enclave's memory.
    monkeypatch.setattr(barrier_module, "_CACHE_BYTES", 1024 * 1024)
    monkeypatch.setattr(barrier_module, "_CACHE_ENTRY_BYTES", 256 * 1024)
    storage = SqliteStorage(tmp_path / "vault.db")
    try:
        barrier = await open_barrier(storage)
        store = JsonStore(barrier, "kv/")
        value = "v" * (barrier_module._CACHE_BYTES // 40)
        for i in range(100):
            await store.write(f"k{i}", {"data": value})
            assert await store.read_shared(f"k{i}") == {"data": value}
        cached = [doc for doc in barrier._entries.values() if doc is not None]
        assert 30 <= len(cached) <= 40
        assert barrier._entry_bytes == sum(len(doc.value) for doc in cached) <= barrier_module._CACHE_BYTES
        assert set(barrier._decoded) <= set(barrier._entries)
        huge = "h" * barrier_module._CACHE_ENTRY_BYTES
        await store.write("huge", {"data": huge})
        assert "kv/huge" not in barrier._entries  # never cached, nor its decoded form
        assert await store.read_shared("huge") == {"data": huge}
        assert "kv/huge" not in barrier._decoded
        assert await store.read("k99") == {"data": value}  # the cache still serves the rest
    finally:
        await storage.close()


# =========================================================================== JsonStore


async def test_json_store_views_and_updates() -> None:
    barrier = await open_barrier()
    store = JsonStore(barrier, "logical/m1/")
    meta = store.view("metadata")
    await meta.write("app/db", {"versions": 1})
    assert await store.read("metadata/app/db") == {"versions": 1}
    assert await store.list() == ["metadata/"]
    assert await meta.list("app") == ["db"]

    def bump(old: dict[str, Any] | None) -> dict[str, Any]:
        return {"n": (old or {"n": 0})["n"] + 1}

    assert await store.update("counter", bump) == {"n": 1}
    assert await store.update("counter", bump) == {"n": 2}

    def refuse(old: dict[str, Any] | None) -> dict[str, Any]:
        raise VaultError(400, "check-and-set parameter did not match the current version")

    with pytest.raises(VaultError):
        await store.update("counter", refuse)
    assert await store.read("counter") == {"n": 2}
    assert await store.update("counter", lambda old: None) is None
    assert await store.read("counter") is None
    assert await store.update("never", lambda old: None) is None
    with pytest.raises(ValueError):
        JsonStore(barrier, "no-slash")


async def test_non_object_document_is_a_barrier_error() -> None:
    barrier = await open_barrier()
    await barrier.put("kv/list", b"[1, 2]")
    await barrier.put("kv/junk", b"\xff not json")
    store = JsonStore(barrier, "kv/")
    with pytest.raises(BarrierError, match="not a JSON object"):
        await store.read("list")
    with pytest.raises(BarrierError, match="not JSON"):
        await store.read("junk")


async def test_concurrent_updates_on_one_barrier_never_lose_one() -> None:
    barrier = await open_barrier(SharedMemory(seed=3))
    store = JsonStore(barrier, "c/")
    calls = 0

    def bump(old: dict[str, Any] | None) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"n": (old or {"n": 0})["n"] + 1}

    await asyncio.gather(*(store.update("n", bump) for _ in range(30)))
    assert await store.read("n") == {"n": 30}
    # In one process the writers queue on the document's lock instead of racing: no retries, so
    # 50 writers to one key cannot run out of them (the replica race is tested on shared storage).
    assert calls == 30


# =========================================================================== two replicas on S3

CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


@pytest.fixture
async def replicas(moto_url: str) -> AsyncIterator[tuple[JsonStore, JsonStore, S3Storage]]:
    client = boto3.client("s3", endpoint_url=moto_url, **CREDS)
    bucket = f"vault-replicas-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    first = S3Storage(client, bucket, "store")
    a = await open_barrier(first)
    b = Barrier(S3Storage(boto3.client("s3", endpoint_url=moto_url, **CREDS), bucket, "store"))
    await b.unseal(ROOT_KEY)
    yield JsonStore(a, "logical/kv/"), JsonStore(b, "logical/kv/"), first


async def test_s3_replicas_see_each_others_writes(replicas: tuple[JsonStore, JsonStore, S3Storage]) -> None:
    a, b, storage = replicas
    await a.write("app/db", {"password": "from-a"})
    assert await b.read("app/db") == {"password": "from-a"}
    await b.write("app/db", {"password": "from-b"})
    assert await a.read("app/db") == {"password": "from-b"}  # no stale cache on S3
    await b.write("app/api", {"k": 1})
    assert await a.list("app/") == ["api", "db"]
    await a.delete("app/db")
    assert await b.read("app/db") is None
    assert await b.list("app/") == ["api"]
    for key in await storage.keys(""):
        assert PHYSICAL.match(key), key


@pytest.mark.slow
async def test_s3_concurrent_cas_from_two_replicas_never_both_win(
    replicas: tuple[JsonStore, JsonStore, S3Storage],
) -> None:
    """Threat: two replicas each accepting a check-and-set write against the same version (a lost
    update: both clients told "written", one write silently gone). Every successful update must
    count: the final counter equals the number of updates that returned."""
    a, b, _ = replicas
    seen: list[int] = []

    def bump(old: dict[str, Any] | None) -> dict[str, Any]:
        return {"n": (old or {"n": 0})["n"] + 1}

    async def run(store: JsonStore) -> None:
        for _ in range(6):
            new = await store.update("counter", bump)
            assert new is not None
            seen.append(new["n"])

    await asyncio.gather(run(a), run(b), run(a), run(b))
    final = await a.read("counter")
    assert final == {"n": len(seen)} == {"n": 24}
    assert sorted(seen) == list(range(1, 25))  # no two updates produced the same value


async def test_s3_raw_objects_hold_no_plaintext(
    replicas: tuple[JsonStore, JsonStore, S3Storage], moto_url: str
) -> None:
    a, _, storage = replicas
    await a.write("data/zanzibar-payroll", {"password": "s3cr3t-Value-9f8e7d"})
    for key in await storage.keys(""):
        body = (await storage.get(key)).value  # type: ignore[union-attr]
        assert b"s3cr3t" not in body and b"zanzibar" not in body


def test_seal_config_is_plain_json_by_design() -> None:
    """core/seal is not barrier-encrypted (it opens the barrier); it holds only KMS-wrapped material."""
    storage = MemoryStorage()
    asyncio.run(open_barrier(storage))
    raw = asyncio.run(storage.get("core/seal"))
    assert raw is not None
    doc = json.loads(raw.value)
    wrapped = base64.b64decode(doc.pop("keyring"))  # wrapped by the root key: no key in the clear
    assert doc == SEAL
    assert b'"terms"' not in wrapped and b"path_key" not in wrapped
