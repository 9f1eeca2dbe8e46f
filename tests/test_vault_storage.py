"""vault_like's physical storage: the compare-and-swap contract on every backend, SQLite's
durability and file modes, S3's conditional writes against moto's real server."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from plugins.vault_like.storage import (
    ANY,
    Conflict,
    Entry,
    MemoryStorage,
    S3Storage,
    SqliteStorage,
    Storage,
    StorageError,
    open_storage,
)
from tests.conftest import ROOT

CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def s3_client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, **CREDS)


@pytest.fixture(scope="module")
def bucket(moto_url: str) -> str:
    s3_client(moto_url).create_bucket(Bucket="vault-storage-test")
    return "vault-storage-test"


@pytest.fixture(params=["memory", "sqlite", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, moto_url: str, bucket: str
) -> AsyncIterator[Storage]:
    backend: Storage
    if request.param == "memory":
        backend = MemoryStorage()
    elif request.param == "sqlite":
        backend = SqliteStorage(tmp_path / "vault.db")
    else:
        backend = S3Storage(s3_client(moto_url), bucket, f"t-{request.node.name}-{time.monotonic_ns()}")
    try:
        yield backend
    finally:
        await backend.close()


# =========================================================================== the contract


async def test_put_get_delete_and_versions(store: Storage) -> None:
    assert await store.get("a/b") is None
    v1 = await store.put("a/b", b"one")
    assert await store.get("a/b") == Entry(b"one", v1)
    v2 = await store.put("a/b", b"two")
    assert v2 != v1
    assert await store.get("a/b") == Entry(b"two", v2)
    await store.delete("a/b")
    assert await store.get("a/b") is None
    await store.delete("a/b")  # a missing key, unconditionally: no error


async def test_conditional_writes(store: Storage) -> None:
    # Threat: two writers that read the same version both "winning" (a lost update).
    v1 = await store.put("k", b"1", expect=None)  # create-only
    with pytest.raises(Conflict):
        await store.put("k", b"x", expect=None)
    v2 = await store.put("k", b"2", expect=v1)  # compare-and-swap
    with pytest.raises(Conflict):
        await store.put("k", b"stale", expect=v1)
    assert await store.get("k") == Entry(b"2", v2)
    with pytest.raises(Conflict):
        await store.delete("k", expect=v1)
    assert (await store.get("k")) is not None
    await store.delete("k", expect=v2)
    assert await store.get("k") is None
    with pytest.raises(Conflict):  # not at that version: it does not exist at all
        await store.delete("k", expect=v2)
    with pytest.raises(Conflict):
        await store.put("k", b"3", expect=v2)
    assert await store.get("k") is None


async def test_keys_by_prefix(store: Storage) -> None:
    for key in ("e/01", "e/02", "e0", "d/01", "core/seal"):
        await store.put(key, b"x")
    assert await store.keys("e/") == ["e/01", "e/02"]
    assert await store.keys("e") == ["e/01", "e/02", "e0"]
    assert await store.keys("zz") == []
    assert await store.keys("") == ["core/seal", "d/01", "e/01", "e/02", "e0"]


async def test_concurrent_create_only_has_one_winner(store: Storage) -> None:
    results = await asyncio.gather(
        *(store.put("race", str(i).encode(), expect=None) for i in range(8)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, str))
    entry = await store.get("race")
    assert entry is not None and entry.version == winners[0]


# =========================================================================== SQLite


async def test_sqlite_file_is_private_wal_and_fsyncs_every_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: other local users reading ciphertext and metadata; a write acknowledged before fsync.
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    path = tmp_path / "state" / "vault.db"
    store = SqliteStorage(path)
    try:
        await store.put("k", b"v")
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        assert any(s.upper().replace(" ", "") == "PRAGMASYNCHRONOUS=FULL" for s in statements), statements
        with sqlite3.connect(path) as check:
            assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


async def test_sqlite_tightens_an_existing_wide_file(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    path.write_bytes(b"")
    path.chmod(0o644)
    store = SqliteStorage(path)
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_sqlite_versions_are_never_reused_after_delete_and_reopen(tmp_path: Path) -> None:
    # Threat: a stale compare-and-swap version matching a re-created key (ABA).
    store = SqliteStorage(tmp_path / "vault.db")
    old = await store.put("k", b"1")
    await store.put("other", b"x")
    await store.delete("other")
    await store.delete("k")
    await store.close()
    store = SqliteStorage(tmp_path / "vault.db")
    try:
        new = await store.put("k", b"2")
        assert int(new) > int(old) + 1
        with pytest.raises(Conflict):
            await store.put("k", b"3", expect=old)
    finally:
        await store.close()


async def test_sqlite_concurrent_writes_share_commits_and_all_land(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "vault.db")
    try:
        versions = await asyncio.gather(*(store.put(f"k{i}", f"v{i}".encode()) for i in range(300)))
        assert len(set(versions)) == 300
        for i in range(300):
            assert await store.get(f"k{i}") == Entry(f"v{i}".encode(), versions[i])
    finally:
        await store.close()


async def test_sqlite_closed_store_raises_storage_error(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "vault.db")
    await store.close()
    with pytest.raises(StorageError, match="closed"):
        await store.get("k")
    with pytest.raises(StorageError, match="closed"):
        await store.put("k", b"v")


async def test_sqlite_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    path.write_bytes(b"this is not an SQLite file at all, just some bytes" * 100)
    with pytest.raises(StorageError, match="cannot open the SQLite store"):
        SqliteStorage(path)


DURABILITY_WRITER = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    sys.path.insert(0, sys.argv[2])
    from plugins.vault_like.storage import SqliteStorage

    def value(i):
        return hashlib.sha256(str(i).encode()).digest() * 64

    async def worker(store, first, step):
        i = first
        while True:
            await store.put(f"k{i}", value(i))
            sys.stdout.write(f"k{i}\\n")  # only after the write was acknowledged
            sys.stdout.flush()
            i += step

    async def main():
        store = SqliteStorage(sys.argv[1])
        await asyncio.gather(*(worker(store, n, 8) for n in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_sqlite_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    """A subprocess writes in a loop (8 concurrent writers, so group commits happen), printing each
    acknowledged key; it is SIGKILLed mid-load. Every acknowledged write must be there, intact.

    Threat: a store that acknowledges writes still in a buffer, losing secrets (or a CAS) on a crash.
    """
    path = tmp_path / "vault.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", DURABILITY_WRITER, str(path), str(ROOT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while len(acked) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.decode().strip())
        proc.kill()  # SIGKILL, mid-load
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(10)
    assert len(acked) >= 400, proc.stderr.read().decode() if proc.stderr else ""
    # Lines acknowledged before the kill but still in the pipe count too; a torn last line does not.
    acked.extend(line.decode() for line in rest.split(b"\n")[:-1])

    async def verify() -> int:
        store = SqliteStorage(path)
        try:
            for key in acked:
                i = int(key[1:])
                entry = await store.get(key)
                assert entry is not None, f"acknowledged {key} was lost"
                assert entry.value == hashlib.sha256(str(i).encode()).digest() * 64, f"{key} is corrupt"
            return len(await store.keys("k"))
        finally:
            await store.close()

    stored = asyncio.run(verify())
    assert stored >= len(acked)
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# =========================================================================== S3


async def test_s3_objects_live_under_the_prefix(moto_url: str, bucket: str) -> None:
    client = s3_client(moto_url)
    store = S3Storage(client, bucket, "replica-set")
    version = await store.put("e/ab", b"blob")
    raw = client.get_object(Bucket=bucket, Key="replica-set/e/ab")
    assert raw["Body"].read() == b"blob" and raw["ETag"] == version
    assert await store.keys("e/") == ["e/ab"]


async def test_s3_failures_are_storage_errors_without_values(moto_url: str) -> None:
    store = S3Storage(s3_client(moto_url), "no-such-bucket-here", "p")
    with pytest.raises(StorageError) as err:
        await store.put("e/ab", b"SECRET-BYTES")
    assert "NoSuchBucket" in str(err.value) and "SECRET" not in str(err.value)
    with pytest.raises(StorageError):
        await store.keys("")


async def test_s3_conditional_put_maps_412_to_conflict(moto_url: str, bucket: str) -> None:
    """Two stores (replicas) over one bucket: IfMatch / IfNoneMatch='*' decide, S3 answers 412."""
    a = S3Storage(s3_client(moto_url), bucket, "cas")
    b = S3Storage(s3_client(moto_url), bucket, "cas")
    v1 = await a.put("counter", b"1", expect=None)
    with pytest.raises(Conflict):
        await b.put("counter", b"1", expect=None)
    v2 = await b.put("counter", b"2", expect=v1)
    with pytest.raises(Conflict):
        await a.put("counter", b"2'", expect=v1)
    assert await a.get("counter") == Entry(b"2", v2)


# =========================================================================== open_storage


def test_open_storage_sqlite_relative_to_the_state_dir(tmp_path: Path) -> None:
    store = open_storage({"storage": "sqlite", "path": "db/vault.db"}, tmp_path, lambda _: None)
    try:
        assert isinstance(store, SqliteStorage) and store.path == tmp_path / "db" / "vault.db"
    finally:
        asyncio.run(store.close())
    default = open_storage({}, tmp_path, lambda _: None)
    try:
        assert isinstance(default, SqliteStorage) and default.path == tmp_path / "vault.db"
    finally:
        asyncio.run(default.close())


def test_open_storage_s3(tmp_path: Path) -> None:
    clients: list[str] = []

    def aws(service: str) -> object:
        clients.append(service)
        return object()

    store = open_storage({"storage": "s3", "path": "s3://bucket/some/prefix"}, tmp_path, aws)
    assert isinstance(store, S3Storage)
    assert (store.bucket, store.prefix, clients) == ("bucket", "some/prefix/", ["s3"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"storage": "s3", "path": "bucket/prefix"}, "s3://bucket/prefix"),
        ({"storage": "s3", "path": "s3:///prefix"}, "needs a bucket"),
        ({"storage": "sqlite", "path": "s3://bucket/x"}, "not an s3:// URL"),
        ({"storage": "etcd"}, "unknown storage"),
    ],
)
def test_open_storage_rejects_bad_config(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_storage(config, tmp_path, lambda _: None)


def test_any_is_a_singleton() -> None:
    assert type(ANY)() is ANY and repr(ANY) == "ANY"


@pytest.fixture(autouse=True)
def _no_leftover_writer_threads() -> Iterator[None]:
    yield
    left = [t for t in threading.enumerate() if t.name == "vault-sqlite-writer"]
    assert not left, "a SQLite writer thread outlived its store (close() must join it)"
