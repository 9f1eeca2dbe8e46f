"""vault_like: a Vault-compatible secrets store whose storage is sealed by attested KMS.

It serves HashiCorp Vault's HTTP API under ``/v1/`` on its own ingress listener (8200 in the demo),
enough for the real clients (hvac, the ``bao``/``vault`` CLI) to work unchanged: KV v2, token
auth, ACL policies, ``sys/`` (health, seal status, init, mounts, policies...), transit. Every stored
entry is encrypted by the barrier (:mod:`.barrier`); the barrier's root key is sealed by KMS under a
key policy that only this enclave image satisfies (:mod:`.seal`), so the store unseals itself at
start through attestation, and a different image cannot unseal it.

Modules: :mod:`.api` (HTTP), :mod:`.sys_backend` (``sys/`` and the mount table), :mod:`.tokens`
and :mod:`.acl` (auth), :mod:`.kv` and :mod:`.transit` (engines), :mod:`.audit` (the audit log),
:mod:`.service` (lifecycle), :mod:`.cli` (``sidecar vault``), :mod:`.devworld` (``sidecar dev``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from plugins.vault_like.cli import register_commands as register_commands
from plugins.vault_like.devworld import prepare_dev_world as prepare_dev_world
from plugins.vault_like.service import VaultService
from sidecar import Listener, PluginContext, Route, hookimpl
from sidecar.schema import Bool, Int, Map, Str


@hookimpl
def register_config_schema() -> Map:
    return Map(
        fields={
            "storage": Str(choices=["sqlite", "s3"], default="sqlite", doc="where sealed entries live"),
            "path": Str(
                default="vault.db",
                doc="SQLite file (relative to state_dir), or s3://bucket/prefix with storage s3",
            ),
            "key_id": Str(
                default="alias/vault-like",
                min_len=1,
                doc="the KMS key (id, ARN or alias) that seals the root key",
            ),
            "auto_init": Bool(
                default=False,
                doc="initialise an empty store at start and write the root token to "
                "STATE_DIR/vault-root-token (mode 0600); `sidecar dev` turns this on",
            ),
            "audit_log": Str(
                default="vault-audit.log",
                doc="the JSON-lines audit log: a file (relative to state_dir), or s3://BUCKET/PREFIX "
                "for objects that outlive an enclave; an empty string turns auditing off",
            ),
            "max_request_bytes": Int(
                min=1024, max=32 * 1024 * 1024, default=1024 * 1024, doc="largest request body accepted"
            ),
        }
    )


def service_of(context: PluginContext) -> VaultService:
    """The plugin's state for this sidecar (made on first use, kept with the sidecar's services)."""
    return context.state(VaultService)


@hookimpl
def register_routes(listener: Listener, context: PluginContext) -> list[Route]:
    return service_of(context).routes(listener)


@hookimpl
async def lifespan(context: PluginContext) -> AsyncIterator[None]:
    service = service_of(context)
    await service.start()  # never raises for a sealed store: sys/health must still answer
    try:
        yield
    finally:
        await service.stop()


@hookimpl
def readiness(context: PluginContext) -> str | None:
    return service_of(context).readiness()
