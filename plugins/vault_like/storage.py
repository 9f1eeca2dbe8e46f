"""Physical storage for vault_like: opaque keys to opaque bytes, with optimistic concurrency.

Storage only ever sees what the barrier (:mod:`.barrier`) gives it: HMAC'd key names and
AES-GCM ciphertext. Every backend offers the same small contract (:class:`Storage`): get, put
(unconditional, create-only, or compare-and-swap on a version), delete, prefix listing.

- :class:`SqliteStorage` (default): one file, WAL mode, ``synchronous=FULL``, so an acknowledged
  write has been fsync'd and survives a kill -9 or a crash. All writes run on one writer thread that
  commits them in groups (a burst of concurrent writes shares one fsync; each is still acknowledged
  only after its commit). Reads run on the event loop on their own connection: WAL readers never
  wait for the writer, and a point lookup costs microseconds, less than a thread hop.
- :class:`S3Storage`: for several replicas over one bucket. Conditional PutObject/DeleteObject
  (``If-Match`` / ``If-None-Match: *``) give compare-and-swap; the ETag is the version.
- :class:`MemoryStorage`: for tests.

Errors are :class:`Conflict` (a conditional write lost) and :class:`StorageError` (the backend
failed); neither message ever contains a value, and keys are HMACs, so both are safe to log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from botocore.exceptions import BotoCoreError, ClientError

__all__ = [
    "ANY",
    "Conflict",
    "Entry",
    "MemoryStorage",
    "S3Storage",
    "SqliteStorage",
    "Storage",
    "StorageError",
    "open_storage",
]


class _Any:
    """The type of :data:`ANY`: "write whatever is there" (no precondition)."""

    _instance: _Any | None = None

    def __new__(cls) -> _Any:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"


ANY: Final = _Any()


class Conflict(Exception):
    """A conditional write or delete lost: the key was not at the expected version (or existed)."""


class StorageError(Exception):
    """The backend failed. The message names the operation and the cause, never a value."""


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    version: str  # opaque: SQLite's integer as a string, S3's ETag


class Storage(Protocol):
    # Implementations may also set ``exclusive = True`` when this process is the only one that can
    # write the store (SQLite, memory): the barrier then caches decrypted entries. Never S3, where
    # other replicas write too. (Not a protocol member, so small fakes need not declare it.)

    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
        """Write ``value``; ``expect`` ANY: unconditional, None: must not exist, "v": must be at v.

        Returns the new version. Raises :class:`Conflict` when the precondition fails.
        """
        ...

    async def delete(self, key: str, expect: str | _Any = ANY) -> None:
        """Delete ``key``. Missing key: no error when unconditional, :class:`Conflict` when ``expect`` is a
        version (it is not at that version)."""
        ...

    async def keys(self, prefix: str) -> list[str]: ...

    async def close(self) -> None: ...


def _check_expect(current: str | None, expect: str | _Any | None) -> None:
    if expect is ANY:
        return
    if expect is None:
        if current is not None:
            raise Conflict("the key exists")
    elif current != expect:
        raise Conflict("the key is not at the expected version")


# =========================================================================== memory


class MemoryStorage:
    """A dict, for tests. Versions are a global counter, so a deleted and re-created key never reuses one."""

    exclusive = True

    def __init__(self) -> None:
        self._data: dict[str, Entry] = {}
        self._versions = itertools.count(1)

    async def get(self, key: str) -> Entry | None:
        return self._data.get(key)

    async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
        current = self._data.get(key)
        _check_expect(current.version if current else None, expect)
        version = str(next(self._versions))
        self._data[key] = Entry(bytes(value), version)
        return version

    async def delete(self, key: str, expect: str | _Any = ANY) -> None:
        current = self._data.get(key)
        if current is None:
            if expect is not ANY:
                raise Conflict("the key does not exist")
            return
        _check_expect(current.version, expect)
        del self._data[key]

    async def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self._data if k.startswith(prefix))

    async def close(self) -> None:
        return None


# =========================================================================== sqlite

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)",
    # The version counter: global and persisted, so a deleted then re-created key never gets a version
    # a stale compare-and-swap could still hold.
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_MAX_BATCH: Final = 256


@dataclass(slots=True)
class _Write:
    """One queued write: ``kind`` "put" or "delete", and where to send its outcome."""

    kind: str
    key: str
    value: bytes
    expect: str | _Any | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[str]


def _resolve(outcomes: list[tuple[asyncio.Future[str], str | BaseException]]) -> None:
    """On the loop: hand each waiting write its version or its error (unless it was cancelled)."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _prefix_bounds(prefix: str) -> tuple[str, str | None]:
    """[low, high) of the keys starting with ``prefix`` (BINARY collation: UTF-8 = code point order)."""
    if not prefix:
        return "", None
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SqliteStorage:
    """SQLite in WAL mode with ``synchronous=FULL``; the file (and its -wal/-shm) are mode 0600."""

    exclusive = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Create the file 0600 before SQLite opens it: SQLite gives -wal and -shm the database's mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file made with a wider mode is tightened, not trusted
        finally:
            os.close(fd)
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._closed = False
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name="vault-sqlite-writer", daemon=True
        )
        self._writer.start()
        failure = ready.get()
        if failure is not None:
            raise StorageError(f"cannot open the SQLite store: {failure}") from failure
        try:
            # Reads happen on the event loop; autocommit, so each SELECT sees the latest commit.
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._reader.execute("PRAGMA busy_timeout = 5000")
            self._reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            self._queue.put(None)
            raise StorageError(f"cannot open the SQLite store: {exc}") from exc

    # ------------------------------------------------------------------ reads (event loop)

    async def get(self, key: str) -> Entry | None:
        if self._closed:
            raise StorageError("the SQLite store is closed")
        try:
            row = self._reader.execute("SELECT value, version FROM kv WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite read failed: {exc}") from exc
        if row is None:
            return None
        return Entry(row[0], str(row[1]))

    async def keys(self, prefix: str) -> list[str]:
        if self._closed:
            raise StorageError("the SQLite store is closed")
        low, high = _prefix_bounds(prefix)
        try:
            if high is None:
                rows = self._reader.execute("SELECT key FROM kv WHERE key >= ? ORDER BY key", (low,))
            else:
                rows = self._reader.execute(
                    "SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key", (low, high)
                )
            return [row[0] for row in rows]
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite read failed: {exc}") from exc

    # ------------------------------------------------------------------ writes (writer thread)

    async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
        return await self._submit("put", key, bytes(value), expect)

    async def delete(self, key: str, expect: str | _Any = ANY) -> None:
        await self._submit("delete", key, b"", expect)

    async def _submit(self, kind: str, key: str, value: bytes, expect: str | _Any | None) -> str:
        if self._closed:
            raise StorageError("the SQLite store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._queue.put(_Write(kind, key, value, expect, loop, future))
        return await future

    def _write_loop(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"SQLite refused WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 5000")
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute(
                "SELECT max(coalesce((SELECT max(version) FROM kv), 0),"
                " coalesce((SELECT value FROM meta WHERE name = 'seq'), 0))"
            ).fetchone()
            seq = int(row[0])
        except (sqlite3.Error, StorageError) as exc:
            ready.put(exc)
            return
        ready.put(None)
        stop = False
        try:
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                # Group commit: whatever queued up while the last fsync ran shares the next one.
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                seq = self._commit(conn, batch, seq)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Write], seq: int) -> int:
        outcomes: list[str | BaseException] = []
        start = seq
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                row = conn.execute("SELECT version FROM kv WHERE key = ?", (write.key,)).fetchone()
                current = None if row is None else str(row[0])
                try:
                    if write.kind == "put":
                        _check_expect(current, write.expect)
                        seq += 1
                        conn.execute(
                            "INSERT INTO kv (key, value, version) VALUES (?, ?, ?) ON CONFLICT(key) "
                            "DO UPDATE SET value = excluded.value, version = excluded.version",
                            (write.key, write.value, seq),
                        )
                        outcomes.append(str(seq))
                    else:
                        if current is None:
                            if write.expect is not ANY:
                                raise Conflict("the key does not exist")
                        else:
                            _check_expect(current, write.expect)
                            conn.execute("DELETE FROM kv WHERE key = ?", (write.key,))
                        outcomes.append("")
                except Conflict as exc:
                    outcomes.append(exc)
            if seq != start:
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('seq', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    (seq,),
                )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StorageError(f"SQLite write failed: {exc}")
            outcomes = [error] * len(batch)
            seq = start
        # Acknowledge only now, after COMMIT returned: the WAL has been fsync'd (synchronous=FULL).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[str], str | BaseException]]] = {}
        for write, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(write.loop, []).append((write.future, outcome))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, items)
        return seq

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)  # after every write already queued
        await asyncio.to_thread(self._writer.join)
        self._reader.close()


# =========================================================================== S3

_CONFLICT_CODES: Final = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage:
    """One object per key under ``s3://bucket/prefix``; the ETag is the version.

    Conditional writes (``If-Match``, ``If-None-Match: *``) make compare-and-swap safe across replicas.
    boto3 blocks, so every call runs in a worker thread. No caching: other replicas write too.
    """

    exclusive = False

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def _error(self, operation: str, exc: Exception) -> StorageError:
        detail = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
        return StorageError(f"S3 {operation} on bucket {self.bucket} failed ({detail})")

    async def get(self, key: str) -> Entry | None:
        def call() -> Entry | None:
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
                body = answer["Body"]
                try:
                    return Entry(body.read(), str(answer["ETag"]))
                finally:
                    body.close()
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise self._error("GetObject", exc) from exc
            except BotoCoreError as exc:
                raise self._error("GetObject", exc) from exc

        return await asyncio.to_thread(call)

    async def put(self, key: str, value: bytes, expect: str | _Any | None = ANY) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + key, "Body": bytes(value)}
        if expect is None:
            params["IfNoneMatch"] = "*"
        elif isinstance(expect, str):
            params["IfMatch"] = expect

        def call() -> str:
            try:
                return str(self.client.put_object(**params)["ETag"])
            except ClientError as exc:
                code = _code(exc)
                if code in _CONFLICT_CODES:
                    raise Conflict("the object changed (precondition failed)") from None
                if code in _MISSING_CODES and "IfMatch" in params:
                    raise Conflict("the object does not exist") from None
                raise self._error("PutObject", exc) from exc
            except BotoCoreError as exc:
                raise self._error("PutObject", exc) from exc

        return await asyncio.to_thread(call)

    async def delete(self, key: str, expect: str | _Any = ANY) -> None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + key}
        if isinstance(expect, str):
            params["IfMatch"] = expect

        def call() -> None:
            try:
                self.client.delete_object(**params)
            except ClientError as exc:
                code = _code(exc)
                if code in _CONFLICT_CODES or (code in _MISSING_CODES and "IfMatch" in params):
                    raise Conflict("the object changed (precondition failed)") from None
                if code in _MISSING_CODES:
                    return
                raise self._error("DeleteObject", exc) from exc
            except BotoCoreError as exc:
                raise self._error("DeleteObject", exc) from exc

        await asyncio.to_thread(call)

    async def keys(self, prefix: str) -> list[str]:
        def call() -> list[str]:
            found: list[str] = []
            try:
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix + prefix
                )
                for page in pages:
                    found.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
            except (ClientError, BotoCoreError) as exc:
                raise self._error("ListObjectsV2", exc) from exc
            return sorted(found)

        return await asyncio.to_thread(call)

    async def close(self) -> None:
        return None


# =========================================================================== factory


def open_storage(config: dict[str, Any], state_dir: Path, aws: Callable[[str], Any]) -> Storage:
    """The configured storage: ``storage`` "sqlite" (default) or "s3"; ``path`` a file or s3://bucket/prefix.

    A relative SQLite path is under ``state_dir`` (default ``vault.db``). ``aws(service)`` returns a
    boto3 client (the sidecar's client factory), used for S3 only.
    """
    kind = config.get("storage") or "sqlite"
    path = config.get("path") or ""
    if kind == "sqlite":
        if path.startswith("s3://"):
            raise ValueError("vault_like: storage sqlite needs a file path, not an s3:// URL")
        file = Path(path or "vault.db")
        return SqliteStorage(file if file.is_absolute() else state_dir / file)
    if kind == "s3":
        if not path.startswith("s3://"):
            raise ValueError("vault_like: storage s3 needs path s3://bucket/prefix")
        bucket, _, prefix = path[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError("vault_like: storage s3 needs a bucket in path s3://bucket/prefix")
        return S3Storage(aws("s3"), bucket, prefix)
    raise ValueError(f"vault_like: unknown storage {kind!r} (sqlite or s3)")
