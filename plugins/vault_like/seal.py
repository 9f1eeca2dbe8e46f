"""The root key, sealed by attested KMS: only this measured enclave image can unseal the store.

At initialisation, :func:`init_root_key` asks KMS for a data key (GenerateDataKey, AES_256) through
:class:`~sidecar.aws.kms.AttestedKms`: the request carries an attestation document, KMS evaluates
the key policy's ``kms:RecipientAttestation:*`` conditions (PCR0: the enclave image), and answers
the plaintext sealed to this enclave's recipient key. The wrapped copy (``CiphertextBlob``) goes into
the seal config, stored in the clear at ``core/seal``; the plaintext is the barrier's root key.

At every start, :func:`unseal_root_key` decrypts the wrapped copy the same way. An enclave built
from another image measures another PCR0, KMS refuses it (AccessDeniedException), and the store
stays sealed: that is auto-unseal by attestation.

Both calls block (botocore, and the NSM or its emulator), so they run in a worker thread.
:class:`UnsealError` messages are public (the readiness reason): they name KMS's error code, never
key material.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from sidecar.aws.kms import AttestedKms, AttestedKmsError

__all__ = ["ENCRYPTION_CONTEXT", "ROOT_KEY_BYTES", "UnsealError", "init_root_key", "unseal_root_key"]

ENCRYPTION_CONTEXT: Final[dict[str, str]] = {"purpose": "vault-like-root-key"}
ROOT_KEY_BYTES: Final = 32
SEAL_TYPE: Final = "awskms"


class UnsealError(Exception):
    """The root key could not be obtained. The message is public (the readiness reason), e.g.
    "KMS refused (AccessDeniedException)"."""


def _kms_failure(exc: Exception) -> UnsealError:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "") or "unknown error")
        return UnsealError(f"KMS refused ({code})")
    if isinstance(exc, AttestedKmsError):
        # Its detail may describe the NSM or the CMS structure; the public reason stays generic.
        return UnsealError("attested KMS failed (the answer was not sealed to this enclave)")
    return UnsealError(f"KMS unreachable ({type(exc).__name__})")


async def init_root_key(kms: AttestedKms, key_id: str) -> tuple[bytes, dict[str, Any]]:
    """A fresh root key from attested GenerateDataKey, and the seal config to store at ``core/seal``."""
    try:
        answer = await asyncio.to_thread(
            kms.generate_data_key,
            KeyId=key_id,
            KeySpec="AES_256",
            EncryptionContext=dict(ENCRYPTION_CONTEXT),
        )
    except (ClientError, BotoCoreError, AttestedKmsError) as exc:
        raise _kms_failure(exc) from exc
    plaintext = bytes(answer.get("Plaintext") or b"")
    blob = answer.get("CiphertextBlob")
    if len(plaintext) != ROOT_KEY_BYTES or not blob:
        raise UnsealError("KMS answered GenerateDataKey without a 256-bit key")
    seal_config = {
        "type": SEAL_TYPE,
        # KMS answers the key's ARN: the seal names the exact key even when configured by alias.
        "key_id": str(answer.get("KeyId") or key_id),
        "ciphertext": base64.b64encode(bytes(blob)).decode(),
        "encryption_context": dict(ENCRYPTION_CONTEXT),
    }
    return plaintext, seal_config


async def unseal_root_key(kms: AttestedKms, seal_config: dict[str, Any]) -> bytes:
    """The root key from the seal config, through attested Decrypt (``Recipient``)."""
    if not isinstance(seal_config, dict) or seal_config.get("type") != SEAL_TYPE:
        raise UnsealError("the seal config is not an awskms seal")
    key_id = seal_config.get("key_id")
    context = seal_config.get("encryption_context", ENCRYPTION_CONTEXT)
    try:
        blob = base64.b64decode(str(seal_config.get("ciphertext", "")), validate=True)
    except (binascii.Error, ValueError):
        blob = b""
    if not blob or not isinstance(key_id, str) or not key_id or not isinstance(context, dict):
        raise UnsealError("the seal config is malformed")
    try:
        answer = await asyncio.to_thread(
            kms.decrypt, CiphertextBlob=blob, KeyId=key_id, EncryptionContext=context
        )
    except (ClientError, BotoCoreError, AttestedKmsError) as exc:
        raise _kms_failure(exc) from exc
    plaintext = bytes(answer.get("Plaintext") or b"")
    if len(plaintext) != ROOT_KEY_BYTES:
        raise UnsealError("KMS answered Decrypt without a 256-bit key")
    return plaintext
