"""``sidecar dev``: the KMS key that seals the store, and initialisation on first start.

:func:`prepare_dev_world` does what an operator does in AWS before the enclave first starts: it
makes the key named by ``key_id`` (an ``alias/...``; default ``alias/vault-like``) with a key
policy that pins this sidecar's measured PCR0, and it turns on ``auto_init``, so the store
initialises itself at start and writes the root token to ``STATE_DIR/vault-root-token`` (0600).

The dev world's KMS (moto) lives in memory and is new at every ``sidecar dev`` start, but the store
in STATE_DIR persists: sealed under a key that no longer exists, it could never open again. So the
dev world's key is kept as AWS keeps it: its id and key material are saved in
``STATE_DIR/devworld-vault-kms-key.json`` (0600; dev only, as the dev PKI's root key in the same
directory) and put back into moto under the same id at the next start, with a policy pinning the
*current* PCR0 (as an operator updates the policy for a new image). A key that exists already (an
operator's, or one a test made first) is left alone. The buckets that ``storage: s3``'s ``path``
and an ``s3://`` ``audit_log`` name are created too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import ClientError

from sidecar import hookimpl
from sidecar.logs import event

if TYPE_CHECKING:
    from sidecar.context import PluginContext
    from sidecar.devworld.world import DevWorld

__all__ = ["KEY_FILE", "ensure_key", "prepare_dev_world"]

KEY_FILE: Final = "devworld-vault-kms-key.json"


@hookimpl
def prepare_dev_world(world: DevWorld, context: PluginContext) -> None:
    from plugins.vault_like import service_of

    key_id: str = context.config.get("key_id") or "alias/vault-like"
    with _botocore_quiet():
        arn = ensure_key(world, key_id, context.state_dir / KEY_FILE, context)
        for bucket in s3_buckets(context.config):
            world.ensure_bucket(bucket)
    service_of(context).auto_init = True
    event(context.log, logging.INFO, "vault_dev_key_ready", key=arn, alias=key_id)


def s3_buckets(config: dict[str, Any]) -> list[str]:
    """The buckets the settings name: S3 storage's ``path`` and an S3 ``audit_log``.

    A malformed URL is left to start-up, which says what is wrong with it.
    """
    urls = [config.get("audit_log") or ""]
    if config.get("storage") == "s3":
        urls.append(config.get("path") or "")
    buckets = (url[len("s3://") :].partition("/")[0] for url in urls if url.startswith("s3://"))
    return sorted({bucket for bucket in buckets if bucket})


@contextlib.contextmanager
def _botocore_quiet() -> Iterator[None]:
    """botocore at DEBUG logs response bodies; nothing here must depend on who configured logging."""
    botocore = logging.getLogger("botocore")
    level = botocore.level
    if botocore.getEffectiveLevel() < logging.INFO:
        botocore.setLevel(logging.INFO)
    try:
        yield
    finally:
        botocore.setLevel(level)


def ensure_key(world: DevWorld, key_id: str, saved: Path, context: PluginContext | None = None) -> str:
    """The key's ARN: an existing key, the key saved by an earlier run, or a new one (pinned to PCR0)."""
    kms = world.admin("kms")
    try:
        return str(kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NotFoundException":
            raise
    if not key_id.startswith("alias/"):
        raise ValueError(
            f"key_id {key_id!r} does not exist in the dev world; use an alias/NAME so it can be created"
        )
    record = _read_record(saved)
    if record is not None and record.get("alias") == key_id and _restore(world, record):
        if context is not None:
            event(context.log, logging.INFO, "vault_dev_key_restored", key=record["key_id"], alias=key_id)
        return str(kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])
    new_id = world.create_key(world.pcr0.hex(), key_id)
    material = _material(new_id)
    if material is not None:
        _write_record(
            saved, {"alias": key_id, "key_id": new_id, "key_material": base64.b64encode(material).decode()}
        )
    return str(kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])


def _moto_key(key_id: str) -> tuple[Any, Any] | None:
    """(backend, key) of moto's in-process KMS, or None (the dev world runs moto in this process)."""
    try:
        from moto.kms.models import kms_backends
    except ImportError:  # pragma: no cover - moto is part of the dev extra
        return None
    for account in list(kms_backends.keys()):
        for region in list(kms_backends[account].keys()):
            backend = kms_backends[account][region]
            key = backend.keys.get(key_id)
            if key is not None:
                return backend, key
    return None


def _material(key_id: str) -> bytes | None:
    found = _moto_key(key_id)
    if found is None:
        return None
    material = getattr(found[1], "key_material", None)
    return bytes(material) if isinstance(material, bytes | bytearray) else None


def _restore(world: DevWorld, record: dict[str, Any]) -> bool:
    """Put a saved key back into moto under its old id, pinned to the current PCR0. False if unable."""
    try:
        old_id = str(record["key_id"])
        material = base64.b64decode(str(record["key_material"]), validate=True)
    except (KeyError, ValueError):
        return False
    if _moto_key(old_id) is not None:
        return True
    new_id = world.create_key(world.pcr0.hex())  # made through the API: policy, ARN, account, region
    found = _moto_key(new_id)
    if found is None:
        return False
    backend, key = found
    backend.keys.pop(new_id)
    key.id = old_id
    key.arn = str(key.arn).replace(new_id, old_id)
    key.key_material = material
    backend.keys[old_id] = key
    kms = world.admin("kms")
    try:
        kms.create_alias(AliasName=record["alias"], TargetKeyId=old_id)
    except kms.exceptions.AlreadyExistsException:
        kms.update_alias(AliasName=record["alias"], TargetKeyId=old_id)
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    from plugins.vault_like.service import write_private

    write_private(path, json.dumps(record))
