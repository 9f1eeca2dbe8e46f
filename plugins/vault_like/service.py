"""The running store: storage, barrier, seal state, the unsealed stores, the audit log.

One :class:`VaultService` per plugin context. Its lifespan start-up never fails the plugin: a store
that cannot be unsealed (KMS refuses this enclave image, KMS unreachable, storage down) stays
sealed, ``/enclave/ready`` says why, ``sys/health`` answers 503 and ``sys/seal-status`` answers, and
a background task keeps retrying (with backoff) so a transient KMS outage heals by itself. A store
that is not initialised waits for ``PUT sys/init`` (``sidecar vault init``), or initialises itself
at start when ``auto_init`` is on (``sidecar dev`` turns it on) and writes the root token to
``STATE_DIR/vault-root-token`` (mode 0600), logging the path only.

Initialisation: attested GenerateDataKey makes the root key (:mod:`.seal`), the barrier writes the
seal config and a fresh keyring, then the default policy, the ``secret/`` KV v2 mount, the cluster
identity and the audit salt are made, and the root token is created (stored only as a hash). The
steps after the barrier's are idempotent and re-checked at every unseal, so a crash between them
leaves a store that completes itself at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from plugins.vault_like.audit import AuditError, AuditLog, load_salt
from plugins.vault_like.audit_sinks import open_audit_sink
from plugins.vault_like.logical import VaultError
from plugins.vault_like.sys_backend import CLUSTER_KEY, MountTable, SysBackend
from sidecar import __version__
from sidecar.context import PluginContext, ServiceNotConfigured
from sidecar.files import write_atomically
from sidecar.logs import event
from sidecar.routes import Listener, Route

if TYPE_CHECKING:
    from plugins.vault_like.acl import ACL, Policy
    from plugins.vault_like.api import VaultApi
    from plugins.vault_like.barrier import Barrier, JsonStore
    from plugins.vault_like.storage import Storage
    from plugins.vault_like.tokens import PolicyStore, TokenEntry, TokenStore

ROOT_TOKEN_FILE: Final = "vault-root-token"  # noqa: S105 - a file name
BUILD_DATE: Final = "2026-11-01T00:00:00Z"
RETRY_FIRST: Final = 5.0  # seconds before the first unseal retry; doubles up to RETRY_MAX
RETRY_MAX: Final = 120.0
SHARED_REFRESH: Final = 5.0  # seconds between mount-table re-reads with shared (S3) storage


@dataclass
class Unsealed:
    """What exists only while the barrier is open."""

    core: JsonStore
    mounts: MountTable
    policies: PolicyStore
    tokens: TokenStore


class VaultService:
    """The plugin's state for one sidecar."""

    def __init__(self, context: PluginContext) -> None:
        config = context.config
        self.context = context
        self.log = context.log
        self.key_id: str = config.get("key_id") or "alias/vault-like"
        self.auto_init: bool = bool(config.get("auto_init", False))
        self.storage_type: str = config.get("storage") or "sqlite"
        self.audit_log: str = config.get("audit_log", "vault-audit.log")
        self.audit: AuditLog | None = None  # made at start (an S3 sink needs the AWS clients)
        self.max_request_bytes: int = int(config.get("max_request_bytes") or 1024 * 1024)
        self.version = __version__
        self.build_date = BUILD_DATE
        self.storage: Storage | None = None
        self.barrier: Barrier | None = None
        self.initialized = False
        self.state: Unsealed | None = None
        self.cluster: dict[str, str] = {}
        self.reason: str | None = "starting"  # why it is not ready (public), None when unsealed
        self.sys = SysBackend(self)
        self._api: VaultApi | None = None
        self._init_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ wiring

    @property
    def api(self) -> VaultApi:
        if self._api is None:
            from plugins.vault_like.api import VaultApi

            self._api = VaultApi(self)
        return self._api

    def routes(self, listener: Listener) -> list[Route]:
        if listener.audience != "ingress":
            return []
        return self.api.routes()

    @property
    def sealed(self) -> bool:
        return self.state is None

    def unsealed(self) -> Unsealed:
        state = self.state
        if state is None:
            raise VaultError(503, "Vault is sealed")
        return state

    @property
    def mounts(self) -> MountTable:
        return self.unsealed().mounts

    @property
    def policies(self) -> PolicyStore:
        return self.unsealed().policies

    async def acl_for(self, entry: TokenEntry | None) -> ACL:
        if entry is None:
            from plugins.vault_like.acl import ACL

            return ACL([])
        return await self.unsealed().tokens.acl_for(entry)

    async def policies_of(self, entry: TokenEntry | None) -> list[Policy]:
        if entry is None:
            return []
        store = self.unsealed().policies
        found = [await store.get(name) for name in entry.policies]
        return [p for p in found if p is not None]

    async def rotate(self) -> None:
        assert self.barrier is not None
        self.unsealed()
        result = await self.barrier.rotate()
        event(self.log, logging.INFO, "vault_keyring_rotated", term=result.get("term"))

    def key_status(self) -> dict[str, Any]:
        assert self.barrier is not None
        self.unsealed()
        status = dict(self.barrier.key_status())
        status.setdefault("encryptions", 0)
        return status

    def readiness(self) -> str | None:
        return self.reason

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open storage and try to unseal (or auto-initialise). Never raises for a sealed store."""
        from plugins.vault_like.barrier import Barrier
        from plugins.vault_like.storage import open_storage

        if self.audit_log:
            try:
                sink = open_audit_sink(self.audit_log, self.context.state_dir, self.context.aws, self.log)
                audit = AuditLog(sink, self.log)
                await audit.open()
            except (AuditError, ValueError, ServiceNotConfigured) as exc:
                # Fail closed: without its audit log the store serves nothing but sys/health & co.
                reason = str(exc) if isinstance(exc, AuditError) else f"audit log unavailable: {exc}"
                self._sealed_because(reason)
                return
            self.audit = audit
        try:
            self.storage = open_storage(self.context.config, self.context.state_dir, self.context.aws)
        except (ValueError, ServiceNotConfigured, OSError) as exc:
            self._sealed_because(f"storage unavailable: {exc}")
            return
        self.barrier = Barrier(self.storage)
        if in_memory := self._enclave_memory_only():
            event(
                self.log,
                logging.WARNING,
                "vault_state_in_enclave_memory",
                what=in_memory,
                hint="an enclave's filesystem is its memory and goes when the enclave stops: use "
                "storage: s3 for the store; the audit log grows in memory (docs/deploying.md)",
            )
        if not await self._attempt_unseal():
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._retry(), name="vault_like unseal")
            )
        if self.storage_type == "s3":
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._refresh(), name="vault_like mounts")
            )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.state = None
        if self.barrier is not None:
            self.barrier.seal()
        if self.storage is not None:
            with contextlib.suppress(Exception):
                await self.storage.close()
        if self.audit is not None:
            await self.audit.close()

    def _sealed_because(self, reason: str) -> None:
        self.reason = reason
        event(self.log, logging.ERROR, "vault_sealed", reason=reason)

    async def _try_unseal(self) -> bool:
        """One attempt: unseal, or auto-initialise. True when the store is open or waits for init."""
        from plugins.vault_like.barrier import BarrierError
        from plugins.vault_like.seal import UnsealError, unseal_root_key
        from plugins.vault_like.storage import StorageError

        assert self.barrier is not None
        try:
            self.initialized = await self.barrier.initialized()
            if not self.initialized:
                if not self.auto_init:
                    self.reason = "not initialised: run `sidecar vault init`"
                    event(self.log, logging.INFO, "vault_uninitialised", hint="sidecar vault init")
                    return False  # keep checking: another replica on shared storage may initialise it
                if await self._auto_init():
                    return True
                # Another replica initialised it first: unseal it like any initialised store.
            seal_config = await self.barrier.read_seal_config()
            root_key = await unseal_root_key(self.context.kms, seal_config or {})
            try:
                await self.barrier.unseal(root_key)
            finally:
                del root_key
            await self._open()
        except UnsealError as exc:
            self._sealed_because(f"sealed: {exc}")
            return False
        except ServiceNotConfigured:
            self._sealed_because("sealed: attested KMS is not available in this sidecar")
            return False
        except BarrierError as exc:
            self._sealed_because(f"sealed: {exc}")
            return False
        except StorageError as exc:
            self._sealed_because(f"sealed: storage failed: {exc}")
            return False
        except VaultError as exc:
            self._sealed_because(f"sealed: {exc}")
            return False
        return True

    def _enclave_memory_only(self) -> list[str]:
        """What this store keeps on a filesystem that is only memory: inside a Nitro Enclave (the
        real NSM device), SQLite storage and an audit file are lost when the enclave stops."""
        from sidecar.attestation.nsm import NsmDevice

        if not isinstance(self.context.services.nsm, NsmDevice):
            return []  # the dev world or a test: the state directory is a real disk
        kept = ["storage"] if self.storage_type == "sqlite" else []
        if self.audit is not None and self.audit.sink.in_enclave_memory:
            kept.append("audit_log")
        return kept

    async def _attempt_unseal(self) -> bool:
        """:meth:`_try_unseal`, where a failure nobody foresaw leaves the store sealed, not crashed.

        Fail closed either way; sealed with a reason, the plugin stays up, says why on readiness and
        retries, where an exception would fail its start (or end the retry loop) for good.
        """
        try:
            return await self._try_unseal()
        except Exception as exc:  # the type only: a message might carry KMS or storage detail
            self._sealed_because(f"sealed: unexpected {type(exc).__name__}")
            return False

    async def _retry(self) -> None:
        delay = RETRY_FIRST
        while self.state is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            if self.state is None and not self._init_lock.locked():
                await self._attempt_unseal()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(SHARED_REFRESH)
            state = self.state
            if state is not None:
                with contextlib.suppress(Exception):
                    await state.mounts.load()

    async def _auto_init(self) -> bool:
        """Initialise and write the root token file. False: another replica initialised it first."""
        path = self.context.state_dir / ROOT_TOKEN_FILE
        # The token exists only in this call: check the file can be written before the store is
        # initialised, or a full disk would leave an initialised store whose root token nobody has.
        # A probe file, not the token file itself: a replica sharing this directory may have
        # just written the token there.
        cannot = f"cannot write the root token file {path}"
        if path.exists() and not path.is_file():
            raise VaultError(500, f"{cannot}: it exists and is not a regular file")
        probe = path.with_name(f".{path.name}.probe")
        try:
            write_private(probe, "x" * 128)
            probe.unlink()
        except OSError as exc:
            raise VaultError(500, f"{cannot}: {exc.strerror or exc}") from None
        try:
            token = await self.initialize()
        except VaultError as exc:
            if exc.status == 400:  # another replica won the race
                return False
            raise
        write_private(path, token + "\n")
        del token
        event(self.log, logging.INFO, "vault_root_token_written", path=str(path))
        return True

    async def _open(self, fresh: bool = False) -> None:
        """The barrier is unsealed: build the stores, make sure init's later steps happened."""
        from plugins.vault_like.barrier import JsonStore
        from plugins.vault_like.tokens import PolicyStore, TokenStore

        assert self.barrier is not None
        core = JsonStore(self.barrier, "core/")
        policies = PolicyStore(JsonStore(self.barrier, "sys/policy/"))
        tokens = TokenStore(JsonStore(self.barrier, "sys/token/"), policies)
        mounts = MountTable(self.barrier, core)
        if fresh:
            await mounts.load()
            if "secret/" not in mounts.entries:
                await mounts.mount("secret/", "kv", {"version": "2"}, "key/value secret storage", {})
        else:
            await mounts.load()

        def ensure_cluster(old: dict[str, Any] | None) -> dict[str, Any]:
            if old:
                return old
            return {"cluster_name": f"vault-cluster-{secrets.token_hex(4)}", "cluster_id": str(uuid.uuid4())}

        self.cluster = await core.update(CLUSTER_KEY, ensure_cluster) or {}
        if self.audit is not None:
            self.audit.set_salt(await load_salt(core))
        self.state = Unsealed(core, mounts, policies, tokens)
        self.initialized = True
        self.reason = None
        event(self.log, logging.INFO, "vault_unsealed", storage=self.storage_type, mounts=len(mounts.entries))

    async def initialize(self) -> str:
        """Initialise the store: returns the root token (shown once). VaultError 400 if already done."""
        from plugins.vault_like.seal import UnsealError, init_root_key
        from plugins.vault_like.storage import Conflict

        if self.barrier is None:
            raise VaultError(503, "Vault is sealed")
        async with self._init_lock:
            if await self.barrier.initialized():
                self.initialized = True
                raise VaultError(400, "Vault is already initialized")
            try:
                kms = self.context.kms
            except ServiceNotConfigured:
                raise VaultError(500, "cannot initialize: attested KMS is not available") from None
            try:
                root_key, seal_config = await init_root_key(kms, self.key_id)
            except UnsealError as exc:
                event(self.log, logging.ERROR, "vault_init_failed", reason=str(exc))
                raise VaultError(500, f"cannot initialize: {exc}") from None
            try:
                await self.barrier.initialize(root_key, seal_config)
            except Conflict:
                self.initialized = True
                raise VaultError(400, "Vault is already initialized") from None
            finally:
                del root_key
            self.initialized = True
            await self._open(fresh=True)
            token = await self.unsealed().tokens.create_root()
            event(self.log, logging.INFO, "vault_initialized", key=seal_config.get("key_id", ""))
            return token


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 from the start (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text.encode("utf-8"))
