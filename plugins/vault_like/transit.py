"""The transit secrets engine (encryption as a service), the ``aes256-gcm96`` subset of Vault's.

Paths relative to the mount: ``keys/NAME`` (POST create, GET read, DELETE refused as by default in
Vault), ``keys/`` LIST, ``keys/NAME/rotate``, ``encrypt/NAME``, ``decrypt/NAME``. Ciphertexts are
Vault's: ``vault:v<N>:`` + base64(12-byte nonce | AES-256-GCM ciphertext and tag), so data
encrypted here decrypts with the same key material in Vault and the other way round.

Key material lives in the mount's barrier store (``policy/NAME``), so it is encrypted at rest under
the barrier keyring like every other entry. Key bytes never appear in responses or logs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import time
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.logs import event

from .kv import Doc, JsonStoreLike
from .logical import LogicalRequest, LogicalResponse, VaultError

log = logging.getLogger(__name__)

KEY_TYPE: Final = "aes256-gcm96"
NONCE_BYTES: Final = 12
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")  # no "/" so keys/NAME/rotate stays unambiguous
_CIPHERTEXT = re.compile(r"vault:v([^:]*):(.*)", re.DOTALL)
_VERSION: Final = re.compile(r"[0-9]{1,9}")  # ASCII digits, at most a billion versions
_UNSUPPORTED_PATH = "1 error occurred:\n\t* unsupported path\n\n"
_UNSUPPORTED_OP = "1 error occurred:\n\t* unsupported operation\n\n"


def _new_policy(name: str, now: int) -> Doc:
    return {
        "name": name,
        "type": KEY_TYPE,
        "latest": 1,
        "min_decryption_version": 1,
        "keys": {"1": {"key": base64.b64encode(AESGCM.generate_key(256)).decode(), "time": now}},
    }


def _describe(policy: Doc) -> Doc:
    """Vault's ``keys/NAME`` read body (key material omitted, as Vault does)."""
    return {
        "allow_plaintext_backup": False,
        "auto_rotate_period": 0,
        "deletion_allowed": False,
        "derived": False,
        "exportable": False,
        "imported_key": False,
        "keys": {n: entry["time"] for n, entry in policy["keys"].items()},
        "latest_version": policy["latest"],
        "min_available_version": 0,
        "min_decryption_version": policy["min_decryption_version"],
        "min_encryption_version": 0,
        "name": policy["name"],
        "soft_deleted": False,
        "supports_decryption": True,
        "supports_derivation": True,
        "supports_encryption": True,
        "supports_signing": False,
        "type": policy["type"],
    }


# Options this engine does not implement: a request that sets one is refused, never served as if it
# had not (a "derived" key made underived would lose the per-context key separation it asked for).
_UNSUPPORTED_KEY_OPTIONS: Final = ("derived", "convergent_encryption", "exportable", "allow_plaintext_backup")
_UNSUPPORTED_DATA_OPTIONS: Final = ("context", "nonce", "batch_input")


def _refuse_unsupported(body: Doc, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, False, "", [], "false"):
            raise VaultError(400, f"{name!r} is not supported by this transit engine")


def _associated_data(body: Doc) -> bytes | None:
    """aes256-gcm96's optional associated data (base64), authenticated with the ciphertext as in Vault."""
    value = body.get("associated_data")
    if value in (None, ""):
        return None
    return _b64decode(value, "failed to base64-decode associated data")


def _key_version(value: Any) -> int:
    """``key_version`` as a number or a decimal string (the CLI sends strings); 0 means the latest."""
    if value in (None, ""):
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise VaultError(400, "invalid key_version")
    return value


def _b64decode(text: Any, error: str) -> bytes:
    if not isinstance(text, str):
        raise VaultError(400, error)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(400, error) from None


class Transit:
    """One transit mount over its barrier store view."""

    type = "transit"

    def __init__(self, store: JsonStoreLike, mount_path: str) -> None:
        self.store = store
        self.mount_path = mount_path

    async def existence(self, request: LogicalRequest) -> bool | None:
        """``keys/NAME`` and ``encrypt/NAME`` (which creates a missing key) exist iff the key does."""
        section, _, name = request.path.partition("/")
        if section in ("keys", "encrypt") and _NAME.fullmatch(name):
            return await self.store.read("policy/" + name) is not None
        return None

    async def handle(self, request: LogicalRequest) -> LogicalResponse:
        op = request.operation
        parts = request.path.split("/")
        if parts[0] == "keys" and (len(parts) == 1 or parts[1:] == [""]):
            if op != "list":
                raise VaultError(405, _UNSUPPORTED_OP)
            names = await self.store.list("policy/")
            if not names:
                raise VaultError(404)
            return LogicalResponse(data={"keys": names})
        if len(parts) < 2 or not _NAME.fullmatch(parts[1]):
            raise VaultError(404, _UNSUPPORTED_PATH)
        name = parts[1]
        if parts[0] == "keys" and len(parts) == 2:
            if op == "read":
                policy = await self.store.read("policy/" + name)
                if policy is None:
                    raise VaultError(404)
                return LogicalResponse(data=_describe(policy))
            if op in ("create", "update"):
                return await self._create(name, request.data)
            if op == "delete":
                raise VaultError(400, f"error deleting policy {name}: deletion is not allowed for this key")
            raise VaultError(405, _UNSUPPORTED_OP)
        if parts[0] == "keys" and parts[2:] == ["rotate"]:
            if op not in ("create", "update"):
                raise VaultError(405, _UNSUPPORTED_OP)
            return await self._rotate(name)
        if len(parts) == 2 and parts[0] in ("encrypt", "decrypt"):
            if op not in ("create", "update"):
                raise VaultError(405, _UNSUPPORTED_OP)
            if parts[0] == "encrypt":
                return await self._encrypt(name, request.data)
            return await self._decrypt(name, request.data)
        raise VaultError(404, _UNSUPPORTED_PATH)

    async def _create(self, name: str, body: Doc) -> LogicalResponse:
        key_type = body.get("type") or KEY_TYPE
        if key_type != KEY_TYPE:
            raise VaultError(400, f"unknown key type {key_type}")
        _refuse_unsupported(body, _UNSUPPORTED_KEY_OPTIONS)
        policy = await self._get_or_create(name)
        return LogicalResponse(data=_describe(policy))

    async def _get_or_create(self, name: str) -> Doc:
        policy = await self.store.read("policy/" + name)
        if policy is not None:
            return policy
        created = await self.store.update(
            "policy/" + name, lambda old: old if old is not None else _new_policy(name, int(time.time()))
        )
        assert created is not None
        event(log, logging.INFO, "vault_transit_key_created", mount=self.mount_path, key=name)
        return created

    async def _rotate(self, name: str) -> LogicalResponse:
        if await self.store.read("policy/" + name) is None:
            raise VaultError(400, "key not found")

        def rotate(old: Doc | None) -> Doc:
            if old is None:
                raise VaultError(400, "key not found")
            latest = old["latest"] + 1
            keys = dict(old["keys"])
            keys[str(latest)] = {
                "key": base64.b64encode(AESGCM.generate_key(256)).decode(),
                "time": int(time.time()),
            }
            return {**old, "keys": keys, "latest": latest}

        policy = await self.store.update("policy/" + name, rotate)
        assert policy is not None
        event(
            log,
            logging.INFO,
            "vault_transit_key_rotated",
            mount=self.mount_path,
            key=name,
            version=policy["latest"],
        )
        return LogicalResponse(data=_describe(policy))

    async def _encrypt(self, name: str, body: Doc) -> LogicalResponse:
        if "plaintext" not in body:
            raise VaultError(400, "missing plaintext to encrypt")
        plaintext = _b64decode(body["plaintext"], "illegal base64 data at input byte 0")
        _refuse_unsupported(body, _UNSUPPORTED_DATA_OPTIONS)
        aad = _associated_data(body)
        policy = await self._get_or_create(name)  # Vault's upsert: encrypt creates a missing key
        version = _key_version(body.get("key_version"))
        if version == 0:
            version = policy["latest"]
        if version > policy["latest"]:
            raise VaultError(400, "requested version for encryption is higher than the latest key version")
        if version < policy["min_decryption_version"]:
            raise VaultError(
                400, "requested version for encryption is less than the minimum encryption key version"
            )
        key = base64.b64decode(policy["keys"][str(version)]["key"])
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
        ciphertext = f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode()
        return LogicalResponse(data={"ciphertext": ciphertext, "key_version": version})

    async def _decrypt(self, name: str, body: Doc) -> LogicalResponse:
        text = body.get("ciphertext")
        if not text:
            raise VaultError(400, "missing ciphertext to decrypt")
        if not isinstance(text, str):
            raise VaultError(400, "invalid ciphertext: no prefix")
        _refuse_unsupported(body, _UNSUPPORTED_DATA_OPTIONS)
        aad = _associated_data(body)
        policy = await self.store.read("policy/" + name)
        if policy is None:
            raise VaultError(400, "encryption key not found")
        match = _CIPHERTEXT.fullmatch(text)
        if match is None:
            raise VaultError(400, "invalid ciphertext: no prefix")
        if not _VERSION.fullmatch(match.group(1)):  # not isdigit(): "²" and Arabic-Indic digits pass that
            raise VaultError(400, "invalid ciphertext: version number could not be decoded")
        version = int(match.group(1))
        if version > policy["latest"]:
            raise VaultError(400, "invalid ciphertext: version is too new")
        if version < policy["min_decryption_version"] or str(version) not in policy["keys"]:
            raise VaultError(400, "ciphertext or signature version is disallowed by policy (too old)")
        raw = _b64decode(match.group(2), "invalid ciphertext: could not decode base64")
        if len(raw) < NONCE_BYTES + 16:
            raise VaultError(400, "invalid ciphertext length")
        key = base64.b64decode(policy["keys"][str(version)]["key"])
        try:
            plaintext = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
        except InvalidTag:
            raise VaultError(400, "cipher: message authentication failed") from None
        return LogicalResponse(data={"plaintext": base64.b64encode(plaintext).decode()})
