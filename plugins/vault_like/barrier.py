"""The encryption barrier: everything vault_like stores passes through here, encrypted.

Physical layout (what :mod:`.storage` sees):

- ``core/seal``: the seal config (the KMS-wrapped root key, its key id and encryption context), JSON,
  and the first keyring (``"keyring"``, wrapped as below), so init is a single create-only write.
  Not encrypted by the barrier: it is what opens the barrier, and it holds nothing usable without KMS.
- ``core/keyring``: the keyring, AES-256-GCM under the root key, AAD ``b"core/keyring"``; written by
  the first ``sys/rotate`` and read in preference to the one in ``core/seal`` from then on.
- ``e/<hex>``: one logical entry; ``<hex>`` = HMAC-SHA256(path_key, logical path), so storage never
  sees a path name either.
- ``d/<hex>``: a directory index: the encrypted, sorted list of a logical directory's children
  (``"bar"``, ``"baz/"``), so ``list`` is one read and needs no listing of storage keys.

An encrypted blob is ``term (4 bytes, big-endian) | nonce (12, random) | AES-256-GCM ciphertext+tag``
with the logical path as associated data: a blob moved to another path (two entries swapped by
someone with write access to storage) does not decrypt there, it fails with :class:`BarrierError`.

The keyring holds one key per term; :meth:`Barrier.rotate` adds a term, new writes use it and older
entries stay readable with theirs. The path key never rotates (it names the entries).

Directory indexes are kept up to date by put/delete with compare-and-swap writes. After changing an
entry, the writer *syncs* its directory: under the directory's lock it checks whether the child
exists now and makes the index say so (and the parent's, when the directory appeared or vanished).
The last sync always sees the final state, so concurrent puts and deletes cannot leave a stale
listing. With shared storage (S3, several replicas) every sync writes the index, even unchanged, and
empty indexes stay as tombstones: a replica whose check raced another's change then fails its
compare-and-swap and checks again.

With storage only this process writes (SQLite), decrypted entries and directory indexes are cached,
keyed by logical path and updated on every write; never with S3, where other replicas write too.
Decoded forms of cached entries (JSON documents, token entries, policy texts) are cached alongside,
valid only while their entry is the cached one. Concurrent read-modify-writes of one document are
applied together and written once (:meth:`Barrier.update`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC

from plugins.vault_like.logical import VaultError
from plugins.vault_like.storage import ANY, Conflict, Storage, StorageError, _Any

__all__ = ["Barrier", "BarrierError", "Doc", "JsonStore", "SealedError"]

SEAL_KEY: Final = "core/seal"
KEYRING_KEY: Final = "core/keyring"
KEYRING_REFRESH_SECONDS: Final = 5.0  # shared storage: how stale a writer's keyring may be
SEAL_KEYRING_FIELD: Final = "keyring"  # in core/seal: the keyring until the first rotation
KEYRING_AAD: Final = b"core/keyring"
_TERM: Final = 4
_NONCE: Final = 12
_TAG: Final = 16
_RETRIES: Final = 50
_CACHE_SIZE: Final = 4096
# The entry cache is also bounded in bytes: 4096 entries of a megabyte each (a KV version can be that
# large) would hold gigabytes of an enclave's memory, their decoded forms as much again.
_CACHE_BYTES: Final = 64 * 1024 * 1024
_CACHE_ENTRY_BYTES: Final = 1024 * 1024  # larger entries are never cached
_LOCKS: Final = 64
_MISS: Final[Any] = object()
_T = TypeVar("_T")


class SealedError(Exception):
    """Data access while the barrier is sealed."""

    def __init__(self, message: str = "Vault is sealed") -> None:
        super().__init__(message)


class BarrierError(Exception):
    """An entry or the keyring does not decrypt (tampered, swapped, corrupt, or the wrong root key).

    The message is safe to log and show: it names neither a value nor a path.
    """


class _UnknownTerm(Exception):
    """A blob names a term this process's keyring lacks (another replica rotated)."""


@dataclass(frozen=True, slots=True)
class Doc:
    value: bytes
    version: str


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_path(path: str) -> None:
    # Callers build paths from client input; a bad one is a client mistake (400), never echoed.
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or path.endswith("/")
        or "//" in path
        or "\x00" in path
    ):
        raise VaultError(400, "invalid path")


def _check_dir(prefix: str) -> None:
    if not isinstance(prefix, str) or (prefix and not prefix.endswith("/")) or "//" in prefix:
        raise VaultError(400, "invalid path")
    if prefix.startswith("/") or "\x00" in prefix:
        raise VaultError(400, "invalid path")


def _split(path: str) -> tuple[str, str]:
    """``"a/b/c"`` -> ``("a/b/", "c")``; ``"a/b/"`` -> ``("a/", "b/")``; ``"a"`` -> ``("", "a")``."""
    cut = path.rfind("/", 0, len(path) - 1) + 1
    return path[:cut], path[cut:]


@dataclass(frozen=True, slots=True)
class _Keyring:
    raw: dict[int, bytes]
    ciphers: dict[int, AESGCM]
    active: int
    path_key: bytes
    install_times: dict[int, str]
    version: str | None  # of core/keyring in storage; None: still the one inside core/seal
    # HMAC-SHA256 keyed with path_key, copied per name: OpenSSL 3 makes a fresh HMAC cost ~4x a copy.
    namer: HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "namer", HMAC(self.path_key, hashes.SHA256()))

    def name(self, data: bytes) -> str:
        h = self.namer.copy()
        h.update(data)
        return h.finalize().hex()

    def encode(self) -> bytes:
        return json.dumps(
            {
                "terms": {str(t): base64.b64encode(k).decode() for t, k in self.raw.items()},
                "active": self.active,
                "path_key": base64.b64encode(self.path_key).decode(),
                "install_times": {str(t): v for t, v in self.install_times.items()},
            }
        ).encode()

    @staticmethod
    def decode(data: bytes, version: str | None) -> _Keyring:
        try:
            doc = json.loads(data)
            raw = {int(t): base64.b64decode(k, validate=True) for t, k in doc["terms"].items()}
            active = int(doc["active"])
            path_key = base64.b64decode(doc["path_key"], validate=True)
            times = {int(t): str(v) for t, v in doc.get("install_times", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise BarrierError("the keyring is malformed") from exc
        if active not in raw or len(path_key) != 32 or any(len(k) != 32 for k in raw.values()):
            raise BarrierError("the keyring is malformed")
        ciphers = {t: AESGCM(k) for t, k in raw.items()}
        return _Keyring(raw, ciphers, active, path_key, times, version)


def _seal_keyring(root: AESGCM, keyring: _Keyring) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + root.encrypt(nonce, keyring.encode(), KEYRING_AAD)


class Barrier:
    """Encrypts every entry under the keyring, which the root key opens. Sealed until :meth:`unseal`."""

    def __init__(self, storage: Storage, *, keyring_refresh: float = KEYRING_REFRESH_SECONDS) -> None:
        self._storage = storage
        self._exclusive = bool(getattr(storage, "exclusive", False))
        self._root: AESGCM | None = None
        self._keyring: _Keyring | None = None
        # Shared storage: another replica may rotate. Writers reload the keyring this often, so a
        # rotation (e.g. after a suspected key exposure) reaches every replica's writes in time.
        self._keyring_refresh = keyring_refresh
        self._keyring_loaded = 0.0
        self._locks = [asyncio.Lock() for _ in range(_LOCKS)]
        # Separate stripes for JsonStore.update, which takes a directory lock inside its own.
        self._update_locks = [asyncio.Lock() for _ in range(_LOCKS)]
        # Caches (exclusive storage only): logical path -> Doc or None; dir -> (children, version).
        self._entries: dict[str, Doc | None] = {}
        self._entry_bytes = 0  # the sum of the cached entries' sizes
        self._dirs: dict[str, tuple[tuple[str, ...], str | None]] = {}
        self._generation = 0  # bumped by every write, so a read that raced one is not cached
        # Exclusive storage only: a decoded form of a cached entry, valid while that very Doc object
        # is the cached one (every write replaces it), so it can never outlive the entry it came from.
        # Keyed by path, so that an entry leaving the cache takes its decoded forms along.
        self._decoded: dict[str, tuple[Doc, dict[Callable[[Doc], Any], Any]]] = {}
        # Storage names of logical paths (HMACs under the path key, which never rotates).
        self._names: dict[str, str] = {}
        # Read-modify-writes of one document waiting for its lock: run together, one write for all.
        self._queued: dict[str, builtins.list[_Update]] = {}
        self._pending: dict[str, dict[str, str]] = {}  # directory -> {name: child path} awaiting a sync

    # ------------------------------------------------------------------ seal state

    @property
    def sealed(self) -> bool:
        return self._keyring is None

    @property
    def storage(self) -> Storage:
        return self._storage

    async def initialized(self) -> bool:
        return await self._storage.get(SEAL_KEY) is not None

    async def read_seal_config(self) -> dict[str, Any] | None:
        """The seal config as given to :meth:`initialize` (the keyring kept with it is not part)."""
        doc = await self._read_seal_entry()
        if doc is not None:
            doc.pop(SEAL_KEYRING_FIELD, None)
        return doc

    async def _read_seal_entry(self) -> dict[str, Any] | None:
        entry = await self._storage.get(SEAL_KEY)
        if entry is None:
            return None
        try:
            config = json.loads(entry.value)
        except ValueError as exc:
            raise BarrierError("the seal config is not JSON") from exc
        if not isinstance(config, dict):
            raise BarrierError("the seal config is not a JSON object")
        return config

    async def initialize(self, root_key: bytes, seal_config: dict[str, Any]) -> None:
        """Write the seal config with a fresh keyring in it; the barrier is unsealed afterwards.

        One create-only write: of two initialisers racing, exactly one wins and the other gets
        :class:`Conflict`; and a crash can leave the store either uninitialised or whole, never
        with a seal config whose keyring was lost. The first ``sys/rotate`` moves the keyring out
        to ``core/keyring`` (create-only as well), which takes precedence from then on.
        """
        root = self._root_cipher(root_key)
        key = os.urandom(32)
        keyring = _Keyring({1: key}, {1: AESGCM(key)}, 1, os.urandom(32), {1: _now()}, None)
        wrapped = base64.b64encode(_seal_keyring(root, keyring)).decode()
        doc = {**seal_config, SEAL_KEYRING_FIELD: wrapped}
        await self._storage.put(SEAL_KEY, json.dumps(doc).encode(), expect=None)
        self._set_keyring(root, keyring)

    async def unseal(self, root_key: bytes) -> None:
        root = self._root_cipher(root_key)
        self._set_keyring(root, await self._load_keyring(root))

    def seal(self) -> None:
        self._root = None
        self._keyring = None
        self._entries.clear()
        self._entry_bytes = 0
        self._dirs.clear()
        self._decoded.clear()
        self._names.clear()

    async def rotate(self) -> dict[str, Any]:
        """Add a keyring term and make it the active one. Entries under older terms stay readable."""
        root, keyring = self._require()
        for _ in range(_RETRIES):
            term = max(keyring.raw) + 1
            key = os.urandom(32)
            new = _Keyring(
                {**keyring.raw, term: key},
                {**keyring.ciphers, term: AESGCM(key)},
                term,
                keyring.path_key,
                {**keyring.install_times, term: _now()},
                "",
            )
            try:
                version = await self._storage.put(
                    KEYRING_KEY, _seal_keyring(root, new), expect=keyring.version
                )
            except Conflict:  # another replica rotated: start from its keyring
                keyring = await self._load_keyring(root)
                self._set_keyring(root, keyring)
                continue
            self._set_keyring(
                root, _Keyring(new.raw, new.ciphers, term, new.path_key, new.install_times, version)
            )
            return {"term": term, "install_time": new.install_times[term]}
        raise Conflict("the keyring kept changing during rotation")

    def key_status(self) -> dict[str, Any]:
        _, keyring = self._require()
        return {"term": keyring.active, "install_time": keyring.install_times.get(keyring.active, "")}

    def _root_cipher(self, root_key: bytes) -> AESGCM:
        if not isinstance(root_key, bytes | bytearray) or len(root_key) != 32:
            raise BarrierError("the root key must be 32 bytes")
        return AESGCM(bytes(root_key))

    async def _load_keyring(self, root: AESGCM) -> _Keyring:
        entry = await self._storage.get(KEYRING_KEY)
        version: str | None = None
        if entry is not None:
            blob, version = entry.value, entry.version
        else:  # never rotated: the keyring written at init, inside the seal config
            blob = await self._initial_keyring()
        try:
            plain = root.decrypt(blob[:_NONCE], blob[_NONCE:], KEYRING_AAD)
        except (InvalidTag, ValueError) as exc:
            raise BarrierError(
                "the root key does not open the keyring (wrong key, or a tampered keyring)"
            ) from exc
        return _Keyring.decode(plain, version)

    async def _initial_keyring(self) -> bytes:
        doc = await self._read_seal_entry()
        wrapped = doc.get(SEAL_KEYRING_FIELD) if doc is not None else None
        if not isinstance(wrapped, str):
            raise BarrierError("the store has no keyring: it is not initialised")
        try:
            return base64.b64decode(wrapped, validate=True)
        except (binascii.Error, ValueError):
            raise BarrierError("the keyring is malformed") from None

    def _set_keyring(self, root: AESGCM, keyring: _Keyring) -> None:
        current = self._keyring
        if current is not None and root is self._root and keyring.active < current.active:
            return  # a reload that raced a rotation here: terms only grow, keep the newer keyring
        self._root = root
        self._keyring = keyring
        self._keyring_loaded = time.monotonic()

    async def _keyring_for_writing(self) -> _Keyring:
        """The keyring to encrypt with: on shared storage, reloaded when older than the refresh
        interval (a read finds a newer term by itself; a write would not)."""
        root, keyring = self._require()
        if not self._exclusive and time.monotonic() - self._keyring_loaded >= self._keyring_refresh:
            self._set_keyring(root, await self._load_keyring(root))
            _, keyring = self._require()
        return keyring

    def _require(self) -> tuple[AESGCM, _Keyring]:
        if self._keyring is None or self._root is None:
            raise SealedError()
        return self._root, self._keyring

    # ------------------------------------------------------------------ crypto and naming

    def _entry_key(self, keyring: _Keyring, path: str) -> str:
        name = self._names.get(path)
        if name is None:
            name = "e/" + keyring.name(b"e:" + path.encode())
            self._remember(self._names, path, name)
        return name

    def _dir_key(self, keyring: _Keyring, directory: str) -> str:
        return "d/" + keyring.name(b"d:" + directory.encode())

    @staticmethod
    def _dir_aad(directory: str) -> bytes:
        return b"\x00dir:" + directory.encode()  # a NUL never occurs in a logical path: no collision

    @staticmethod
    def _encrypt(keyring: _Keyring, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        term = keyring.active
        return term.to_bytes(_TERM, "big") + nonce + keyring.ciphers[term].encrypt(nonce, plaintext, aad)

    @staticmethod
    def _decrypt(keyring: _Keyring, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < _TERM + _NONCE + _TAG:
            raise BarrierError("an entry is truncated or corrupt")
        cipher = keyring.ciphers.get(int.from_bytes(blob[:_TERM], "big"))
        if cipher is None:
            raise _UnknownTerm()
        try:
            return cipher.decrypt(blob[_TERM : _TERM + _NONCE], blob[_TERM + _NONCE :], aad)
        except InvalidTag:
            raise BarrierError(
                "an entry does not decrypt: tampered, moved from another path, or corrupt"
            ) from None

    async def _open(self, blob: bytes, aad: bytes) -> bytes:
        root, keyring = self._require()
        try:
            return self._decrypt(keyring, blob, aad)
        except _UnknownTerm:
            pass
        # Another replica rotated since we loaded the keyring: reload it once.
        keyring = await self._load_keyring(root)
        self._set_keyring(root, keyring)
        try:
            return self._decrypt(keyring, blob, aad)
        except _UnknownTerm:
            raise BarrierError("an entry names a key term the keyring does not have") from None

    # ------------------------------------------------------------------ cached reads

    def _remember(self, cache: dict[Any, Any], key: Any, value: Any) -> None:
        if key not in cache and len(cache) >= _CACHE_SIZE:
            del cache[next(iter(cache))]  # oldest first; a small cache, not an LRU
        cache[key] = value

    def _cache_entry(self, path: str, doc: Doc | None) -> None:
        """Cache ``doc`` as the entry at ``path``, within the cache's count and byte bounds."""
        self._forget_entry(path)
        size = 0 if doc is None else len(doc.value)
        if size > _CACHE_ENTRY_BYTES:
            return
        entries = self._entries
        while entries and (len(entries) >= _CACHE_SIZE or self._entry_bytes + size > _CACHE_BYTES):
            self._forget_entry(next(iter(entries)))  # oldest first; a small cache, not an LRU
        entries[path] = doc
        self._entry_bytes += size

    def _forget_entry(self, path: str) -> None:
        old = self._entries.pop(path, _MISS)
        if old is not _MISS and old is not None:
            self._entry_bytes -= len(old.value)
        self._decoded.pop(path, None)

    async def _read_entry(self, path: str) -> Doc | None:
        _, keyring = self._require()  # first: a write in flight at seal() may have refilled a cache
        if self._exclusive:
            hit = self._entries.get(path, _MISS)
            if hit is not _MISS:
                return hit  # type: ignore[no-any-return]
        generation = self._generation
        raw = await self._storage.get(self._entry_key(keyring, path))
        doc = None if raw is None else Doc(await self._open(raw.value, path.encode()), raw.version)
        if self._exclusive and generation == self._generation:
            self._cache_entry(path, doc)
        return doc

    async def _read_dir(self, directory: str) -> tuple[tuple[str, ...], str | None]:
        _, keyring = self._require()  # first, as in _read_entry
        if self._exclusive:
            hit = self._dirs.get(directory)
            if hit is not None:
                return hit
        generation = self._generation
        raw = await self._storage.get(self._dir_key(keyring, directory))
        if raw is None:
            result: tuple[tuple[str, ...], str | None] = ((), None)
        else:
            plain = await self._open(raw.value, self._dir_aad(directory))
            try:
                children = json.loads(plain)
            except ValueError as exc:
                raise BarrierError("a directory index is corrupt") from exc
            if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
                raise BarrierError("a directory index is corrupt")
            result = (tuple(children), raw.version)
        if self._exclusive and generation == self._generation:
            self._remember(self._dirs, directory, result)
        return result

    # ------------------------------------------------------------------ entries

    async def get(self, path: str) -> Doc | None:
        _check_path(path)
        return await self._read_entry(path)

    def decoded(self, path: str, doc: Doc, decode: Callable[[Doc], _T]) -> _T:
        """``decode(doc)``, computed once per cached entry (exclusive storage) and shared after that.

        The result is handed to every later reader of the same entry version: callers must treat it
        as immutable. With shared storage (S3) nothing is cached and every call decodes afresh.
        """
        if not self._exclusive:
            return decode(doc)
        hit = self._decoded.get(path)
        if hit is not None and hit[0] is doc:
            found = hit[1].get(decode, _MISS)
            if found is not _MISS:
                return found  # type: ignore[no-any-return]
        value = decode(doc)
        if self._entries.get(path) is doc:  # only what the entry cache holds (not a raced read)
            if hit is None or hit[0] is not doc:
                hit = self._decoded[path] = (doc, {})
            hit[1][decode] = value
        return value

    async def put(
        self, path: str, value: bytes, expect: str | _Any | None = ANY, *, indexed: bool = True
    ) -> str:
        """Write an entry. ``indexed=False``: the entry never appears in its directory's listing
        (saves a directory write per new entry, for documents only ever found by their name)."""
        _check_path(path)
        keyring = await self._keyring_for_writing()
        blob = self._encrypt(keyring, bytes(value), path.encode())
        try:
            version = await self._storage.put(self._entry_key(keyring, path), blob, expect)
        except BaseException:
            self._forget_entry(path)  # state unknown (or someone else's): read it fresh next time
            self._generation += 1
            raise
        self._generation += 1
        if self._exclusive:
            self._cache_entry(path, Doc(bytes(value), version))
        # A write that may have created the entry must touch the index when others write too (S3).
        if indexed:
            await self._sync_up(path)
        return version

    async def delete(self, path: str, expect: str | _Any = ANY) -> None:
        _check_path(path)
        _, keyring = self._require()
        try:
            await self._storage.delete(self._entry_key(keyring, path), expect)
        except BaseException:
            self._forget_entry(path)
            self._generation += 1
            raise
        self._generation += 1
        if self._exclusive:
            self._cache_entry(path, None)
        await self._sync_up(path)

    async def list(self, prefix: str) -> list[str]:
        """The children of directory ``prefix`` ("" or ending in "/"), sorted; directories end in "/"."""
        _check_dir(prefix)
        children, _ = await self._read_dir(prefix)
        return list(children)

    async def update(
        self,
        path: str,
        fn: Callable[[Any], Any],
        decode: Callable[[Doc], Any],
        encode: Callable[[Any], bytes],
    ) -> Any:
        """Optimistic read-modify-write of one entry (see :meth:`JsonStore.update`).

        Updates of one path queue on its lock; whoever gets the lock applies every queued ``fn`` in
        arrival order, each to the previous one's result, and writes the outcome once (one fsync for
        a burst of writers to one key). Each caller gets its own outcome: its ``fn``'s result, or
        the exception its ``fn`` raised (which leaves the document as the previous ``fn`` left it).
        Nobody's result is acknowledged before the combined write succeeded; on a lost
        compare-and-swap the whole batch is re-applied to the winner's document.
        """
        _check_path(path)
        mine = _Update(fn, asyncio.get_running_loop().create_future())
        self._queued.setdefault(path, []).append(mine)
        try:
            await self.update_lock(path).acquire()
        except asyncio.CancelledError:
            queued = self._queued.get(path)
            if queued is not None and mine in queued:  # not applied: a cancelled caller writes nothing
                queued.remove(mine)
            raise
        try:
            if not mine.future.done():
                batch = self._queued.pop(path, [])
                if mine not in batch:  # cannot happen: ours is queued until someone resolves it
                    batch.append(mine)
                try:
                    await self._apply_updates(path, batch, decode, encode)
                except BaseException as exc:
                    for update in batch:
                        if update is mine or update.future.done():
                            continue  # ours: raised below
                        if isinstance(exc, asyncio.CancelledError):
                            self._queued.setdefault(path, []).insert(0, update)  # theirs, not failed
                        elif isinstance(exc, Exception):
                            update.future.set_exception(exc)
                        else:
                            update.future.cancel()
                    raise
        finally:
            self.update_lock(path).release()
        return mine.future.result()

    async def _apply_updates(
        self,
        path: str,
        batch: builtins.list[_Update],
        decode: Callable[[Doc], Any],
        encode: Callable[[Any], bytes],
    ) -> None:
        for _ in range(_RETRIES):
            doc = await self.get(path)
            current = None if doc is None else decode(doc)
            outcomes: list[tuple[bool, Any]] = []
            changed = False
            for update in batch:
                try:
                    new = update.fn(current)
                except Exception as exc:  # this caller's abort (CAS mismatch, ...): not the others'
                    outcomes.append((False, exc))
                    continue
                outcomes.append((True, new))
                current, changed = new, True
            try:
                if changed and current is None:
                    if doc is not None:
                        await self.delete(path, expect=doc.version)
                elif changed:
                    await self.put(path, encode(current), expect=None if doc is None else doc.version)
            except Conflict:
                continue
            for update, (ok, outcome) in zip(batch, outcomes, strict=True):
                if update.future.done():
                    continue
                if ok:
                    update.future.set_result(outcome)
                else:
                    update.future.set_exception(outcome)
            return
        raise Conflict("too many concurrent updates of one document")

    # ------------------------------------------------------------------ directory indexes

    def _lock(self, directory: str) -> asyncio.Lock:
        return self._locks[hash(directory) % _LOCKS]

    def update_lock(self, path: str) -> asyncio.Lock:
        """Serialises read-modify-writes of one document within this process.

        Without it, 50 writers to one key race on the optimistic CAS and some run out of retries;
        with it they queue, and the CAS still decides between replicas sharing one bucket.
        """
        return self._update_locks[hash(path) % _LOCKS]

    async def _exists(self, child: str) -> bool:
        if child.endswith("/"):
            return bool((await self._read_dir(child))[0])
        return await self._read_entry(child) is not None

    async def _write_dir(self, directory: str, children: tuple[str, ...], expect: str | None) -> None:
        keyring = await self._keyring_for_writing()
        key = self._dir_key(keyring, directory)
        try:
            if children or not self._exclusive:
                # Shared storage keeps an empty index as a tombstone: deleting it would leave nothing
                # for a concurrent writer's compare-and-swap to fail on.
                blob = self._encrypt(keyring, json.dumps(children).encode(), self._dir_aad(directory))
                version: str | None = await self._storage.put(key, blob, expect)
            else:
                await self._storage.delete(key, ANY if expect is None else expect)
                version = None
        except BaseException:
            self._dirs.pop(directory, None)
            self._generation += 1
            raise
        self._generation += 1
        if self._exclusive:
            self._remember(self._dirs, directory, (children, version))

    async def _sync_up(self, child: str) -> None:
        """After ``child`` (an entry) was written or deleted: make the indexes upwards say so."""
        while True:
            directory, name = _split(child)
            if not await self._sync(directory, name, child) or not directory:
                return
            child = directory  # the directory appeared or vanished: its parent must say so too

    async def _sync(self, directory: str, name: str, child: str) -> bool:
        """Make ``directory``'s index list ``name`` exactly when ``child`` exists.

        Syncs of one directory run one at a time (its lock), and the existence check happens under
        the lock, after the caller's own change: so the last sync sees the final state. Waiting
        syncs are coalesced: whoever gets the lock does every pending name in one write (one fsync
        for a burst of new keys in one directory); the others find theirs done. Returns True when
        the index went from empty to non-empty or back (the caller then syncs the parent).
        """
        pending = self._pending.setdefault(directory, {})
        pending[name] = child
        async with self._lock(directory):
            batch = self._pending.get(directory)
            if not batch or name not in batch:
                return False  # a sync that started after our change did ours; it handles the parent
            del self._pending[directory]
            try:
                return await self._apply(directory, batch)
            except BaseException:
                for other, path in batch.items():  # hand the batch back to whoever comes next
                    self._pending.setdefault(directory, {}).setdefault(other, path)
                raise

    async def _apply(self, directory: str, batch: dict[str, str]) -> bool:
        # Shared storage: always write, so a concurrent sync elsewhere that checked before our
        # change fails its compare-and-swap and checks again.
        force = not self._exclusive
        for _ in range(_RETRIES):
            children, version = await self._read_dir(directory)
            current = set(children)
            for name, child in batch.items():
                if await self._exists(child):
                    current.add(name)
                else:
                    current.discard(name)
            new = tuple(sorted(current))
            if new == children and not force:
                return False
            try:
                await self._write_dir(directory, new, version)
            except Conflict:
                continue
            return bool(children) != bool(new)
        # Not Conflict: the entry itself was written, and JsonStore.update must not apply fn twice.
        raise StorageError("a directory index kept changing")


@dataclass(eq=False, slots=True)
class _Update:
    fn: Callable[[Any], Any]
    future: asyncio.Future[Any]


class JsonStore:
    """JSON documents under a logical prefix (``"logical/<mount uuid>/"``): what backends use."""

    __slots__ = ("barrier", "prefix")

    def __init__(self, barrier: Barrier, prefix: str) -> None:
        if prefix and not prefix.endswith("/"):
            raise ValueError("a JsonStore prefix ends with '/'")
        self.barrier = barrier
        self.prefix = prefix

    def view(self, sub: str) -> JsonStore:
        return JsonStore(self.barrier, self.prefix + (sub if not sub or sub.endswith("/") else sub + "/"))

    @staticmethod
    def _decode(doc: Doc) -> dict[str, Any]:
        try:
            data = json.loads(doc.value)
        except ValueError as exc:
            raise BarrierError("a stored document is not JSON") from exc
        if not isinstance(data, dict):
            raise BarrierError("a stored document is not a JSON object")
        return data

    @staticmethod
    def _encode(data: dict[str, Any]) -> bytes:
        return json.dumps(data, separators=(",", ":")).encode()

    async def read(self, path: str) -> dict[str, Any] | None:
        doc = await self.barrier.get(self.prefix + path)
        return None if doc is None else self._decode(doc)

    async def read_shared(self, path: str) -> dict[str, Any] | None:
        """Like :meth:`read`, but the document may be shared with other readers: never mutate it.

        With exclusive storage each stored version is decoded once; the next write replaces it.
        """
        full = self.prefix + path
        doc = await self.barrier.get(full)
        return None if doc is None else self.barrier.decoded(full, doc, self._decode)

    async def read_as(self, path: str, convert: Callable[[dict[str, Any]], _T]) -> _T | None:
        """``convert(document)``, computed once per stored version (exclusive storage); shared, so
        ``convert`` should build something immutable (or that callers copy before changing)."""
        full = self.prefix + path
        doc = await self.barrier.get(full)
        if doc is None:
            return None
        return self.barrier.decoded(full, doc, _Converter.of(convert))

    async def write(self, path: str, data: dict[str, Any], *, indexed: bool = True) -> None:
        """Write a document; ``indexed=False`` keeps it out of :meth:`list` (one write fewer)."""
        await self.barrier.put(self.prefix + path, self._encode(data), indexed=indexed)

    async def delete(self, path: str) -> None:
        await self.barrier.delete(self.prefix + path)

    async def list(self, path: str = "") -> list[str]:
        if path and not path.endswith("/"):
            path += "/"
        return await self.barrier.list(self.prefix + path)

    async def update(
        self, path: str, fn: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Optimistic read-modify-write: ``fn(old) -> new`` (None deletes), retried on a lost race.

        ``fn`` may run more than once and may raise to abort (nothing is written then). Of two writers
        (tasks, or replicas on one bucket) that read the same version, exactly one wins; the other
        re-reads and calls ``fn`` again with the winner's document.

        Concurrent updates of one document in this process are applied together, in order, and
        written once (:meth:`Barrier.update`): ``fn`` may receive the document another caller's
        ``fn`` just returned, so it must not mutate its argument (build a new document).
        """
        result: dict[str, Any] | None = await self.barrier.update(
            self.prefix + path, fn, self._decode, self._encode
        )
        return result


class _Converter:
    """A decode function (Doc -> value) per convert function (dict -> value), made once each, so
    the barrier's decoded cache keys stay stable (a new closure per call would never hit)."""

    _made: ClassVar[dict[Callable[[dict[str, Any]], Any], Callable[[Doc], Any]]] = {}

    @classmethod
    def of(cls, convert: Callable[[dict[str, Any]], _T]) -> Callable[[Doc], _T]:
        made = cls._made.get(convert)
        if made is None:

            def made(doc: Doc) -> Any:
                return convert(JsonStore._decode(doc))

            if len(cls._made) < 64:  # meant for module-level functions; a stream of closures is not kept
                cls._made[convert] = made
        return made
