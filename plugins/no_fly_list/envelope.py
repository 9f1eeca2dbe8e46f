"""The sealed no-fly list: envelope formats, strict parsing, sealing and opening.

An envelope is a KMS-encrypted 32-byte data key plus the list encrypted under that key. Two formats
are read:

``fernet`` (version 1, the original app's)::

    {"data-key-ciphertext-base64": B64(KMS ciphertext blob),
     "aes-ciphertext-base64": FERNET_TOKEN}

  The token is used as is (it is already URL-safe base64), under
  ``Fernet(urlsafe_b64encode(data_key))``. KMS generated the data key without an encryption
  context. Nothing binds the key id, so a swapped data key is only caught by Fernet's HMAC.

``aead`` (version 2, ours; what ``sidecar no-fly seal`` writes)::

    {"format": "enclave-sidecar/no-fly-list", "version": 2, "key_id": KEY,
     "encryption-context": {"purpose": "no-fly-list"}, "sealed-at": MS,
     "data-key-ciphertext-base64": B64, "nonce-base64": B64(12 bytes),
     "ciphertext-base64": B64(AES-256-GCM ciphertext || 16-byte tag)}

  The associated data is :func:`associated_data`: the canonical JSON (sorted keys, no spaces, ASCII)
  of ``{"format", "key_id", "version"}`` and, when present, ``"sealed-at"`` (milliseconds since the
  epoch). A changed key id, format, version or seal time therefore fails authentication, rather
  than being trusted as a label; envelopes sealed before the field existed still open. The data key
  was generated with the encryption context above, and KMS binds it to the key ciphertext, so it
  must be passed to Decrypt (:attr:`Envelope.encryption_context`).

The seal time (``sealed-at``, or for ``fernet`` the timestamp inside the token, which its HMAC
covers) is authentic once the envelope opens (:attr:`Envelope.sealed_at`). A reload refuses an
envelope not sealed after the list in use, so an older genuine envelope put back cannot undo an
update.

:func:`parse_envelope` checks structure only, and needs no key (``sidecar no-fly check-envelope``).
:func:`open_envelope` decrypts with the plaintext data key. Every failure is an :class:`EnvelopeError`
with a specific message that names fields and sizes, never key material, ciphertext or plaintext.
Failed authentication is one message for every cause: an attacker learns nothing by trying.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DATA_KEY_BYTES",
    "ENCRYPTION_CONTEXT",
    "FORMAT",
    "MAX_ENVELOPE_BYTES",
    "NOT_DECRYPTABLE",
    "VERSION",
    "Envelope",
    "EnvelopeError",
    "associated_data",
    "open_envelope",
    "parse_envelope",
    "seal_envelope",
    "seal_fernet_envelope",
]

FORMAT: Final = "enclave-sidecar/no-fly-list"
VERSION: Final = 2  # the original (Fernet) format counts as version 1
FERNET_VERSION: Final = 1
ENCRYPTION_CONTEXT: Final[dict[str, str]] = {"purpose": "no-fly-list"}
DATA_KEY_BYTES: Final = 32  # KMS GenerateDataKey KeySpec AES_256
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
# A 5M-name list is about 90 MB of envelope; this leaves room and still bounds what a tampered
# object can make the enclave allocate.
MAX_ENVELOPE_BYTES: Final = 512 * 1024 * 1024
# KMS CiphertextBlob limits: at most 6144 bytes; a blob that holds a 32-byte key is at least that long.
MIN_KEY_CIPHERTEXT_BYTES: Final = DATA_KEY_BYTES
MAX_KEY_CIPHERTEXT_BYTES: Final = 6144
MAX_KEY_ID_CHARS: Final = 2048  # KMS KeyId's documented maximum
NOT_DECRYPTABLE: Final = "envelope does not decrypt: tampered or sealed under another key"

_V2_FIELDS: Final = (
    "format",
    "version",
    "key_id",
    "encryption-context",
    "data-key-ciphertext-base64",
    "nonce-base64",
    "ciphertext-base64",
)
_V2_OPTIONAL: Final = ("sealed-at",)
_V1_FIELDS: Final = ("data-key-ciphertext-base64", "aes-ciphertext-base64")
MAX_SEALED_AT: Final = 253402300799999  # 9999-12-31T23:59:59.999Z in milliseconds
_KEY_ID = re.compile(r"[\x21-\x7e]+")  # ids, ARNs and aliases are printable ASCII without spaces
_URLSAFE_B64 = re.compile(rb"[A-Za-z0-9_-]*={0,2}")
# Fernet token: version 0x80, 8-byte timestamp, 16-byte IV, AES-CBC blocks (>= 1), 32-byte HMAC.
_FERNET_OVERHEAD: Final = 1 + 8 + 16 + 32


class EnvelopeError(ValueError):
    """The envelope is malformed or does not decrypt. The message is safe to show and to log."""


@dataclass(frozen=True, repr=False)
class Envelope:
    """A parsed envelope. Ciphertext only: safe to keep, log sizes of, or show (see :meth:`describe`)."""

    kind: Literal["fernet", "aead"]
    data_key_ciphertext: bytes
    key_id: str | None  # aead: the KMS key that sealed it, bound as associated data; fernet: None
    version: int  # 1 for fernet, 2 for aead
    nonce: bytes = b""  # aead
    ciphertext: bytes = b""  # aead: ciphertext || tag
    token: bytes = b""  # fernet: the token as written (URL-safe base64 text)
    # Milliseconds since the epoch when it was sealed: aead's "sealed-at" (None in envelopes sealed
    # before the field), fernet's token timestamp. Authentic only once the envelope has opened.
    sealed_at: int | None = None

    @property
    def sealed_by(self) -> int | None:
        """The latest moment (ms) it can have been sealed: fernet's timestamp counts whole seconds."""
        if self.sealed_at is None:
            return None
        return self.sealed_at + (999 if self.kind == "fernet" else 0)

    @property
    def encryption_context(self) -> dict[str, str] | None:
        """The EncryptionContext to pass to KMS Decrypt for the data key (a fresh dict), or None."""
        return dict(ENCRYPTION_CONTEXT) if self.kind == "aead" else None

    def kms_decrypt_params(self, key_id: str) -> dict[str, Any]:
        """Keyword arguments for KMS ``Decrypt`` of the data key with the configured ``key_id``."""
        params: dict[str, Any] = {"CiphertextBlob": self.data_key_ciphertext, "KeyId": key_id}
        if self.encryption_context is not None:
            params["EncryptionContext"] = self.encryption_context
        return params

    @property
    def sealed_bytes(self) -> int:
        """Size of the encrypted list (tag included for aead, the decoded token for fernet)."""
        return len(self.ciphertext) if self.kind == "aead" else _fernet_length(self.token)

    def describe(self) -> dict[str, Any]:
        """What ``check-envelope`` prints: format, version, key id and sizes. No secrets in it."""
        info: dict[str, Any] = {
            "format": FORMAT if self.kind == "aead" else "fernet (original)",
            "version": self.version,
            "key_id": self.key_id,
            "encryption_context": self.encryption_context,
            "data_key_ciphertext_bytes": len(self.data_key_ciphertext),
            "sealed_bytes": self.sealed_bytes,
            "sealed_at": _iso_ms(self.sealed_at) if self.sealed_at is not None else None,
        }
        if self.kind == "aead":
            info["plaintext_bytes"] = len(self.ciphertext) - TAG_BYTES
        else:
            # CBC with PKCS7: the plaintext is 1..16 bytes shorter than the ciphertext.
            body = self.sealed_bytes - _FERNET_OVERHEAD
            info["plaintext_bytes_max"] = body - 1
        return info

    def __repr__(self) -> str:  # sizes only: reprs end up in tracebacks and logs
        return (
            f"Envelope(kind={self.kind!r}, version={self.version}, key_id={self.key_id!r}, "
            f"data_key_ciphertext={len(self.data_key_ciphertext)} bytes, sealed={self.sealed_bytes} bytes)"
        )


def associated_data(key_id: str, version: int = VERSION, sealed_at: int | None = None) -> bytes:
    """The AEAD associated data: canonical JSON of the format, key id, version and (when the envelope
    has one) seal time, as ASCII bytes."""
    header: dict[str, Any] = {"format": FORMAT, "key_id": key_id, "version": version}
    if sealed_at is not None:
        header["sealed-at"] = sealed_at
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# --------------------------------------------------------------------------- parsing


def parse_envelope(data: bytes) -> Envelope:
    """Parse and validate an envelope's structure (either format). Raises :class:`EnvelopeError` only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"envelope is {len(data)} bytes, over the limit of {_mib(MAX_ENVELOPE_BYTES)}")
    if not data:
        raise EnvelopeError("envelope is empty")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"envelope is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise EnvelopeError(f"envelope has the field {_show(exc.args[0])} twice") from None
    except json.JSONDecodeError as exc:
        raise EnvelopeError(
            f"envelope is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, huge integers, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise EnvelopeError(f"envelope is not valid JSON: {reason}") from None
    if not isinstance(document, dict):
        raise EnvelopeError(f"envelope must be a JSON object, got {_json_type(document)}")
    if "format" in document or "version" in document:
        return _parse_aead(document)
    if "aes-ciphertext-base64" in document:
        return _parse_fernet(document)
    raise EnvelopeError(
        "not a no-fly-list envelope: expected the field 'format' (version 2) or 'aes-ciphertext-base64' "
        "(the original format)"
    )


def _parse_aead(document: dict[str, Any]) -> Envelope:
    fmt = document.get("format")
    if fmt is None:
        raise EnvelopeError("envelope has 'version' but no 'format'")
    if fmt != FORMAT:
        raise EnvelopeError(f"unknown envelope format {_show(fmt)} (expected {FORMAT!r})")
    version = document.get("version")
    if version is None:
        raise EnvelopeError("envelope is missing the field 'version'")
    if not isinstance(version, int) or isinstance(version, bool):
        raise EnvelopeError(f"'version' must be an integer, got {_json_type(version)}")
    if version != VERSION:
        raise EnvelopeError(f"unsupported envelope version {version} (this build reads version {VERSION})")
    _check_fields(document, _V2_FIELDS, _V2_OPTIONAL)
    sealed_at = document.get("sealed-at")
    if sealed_at is not None and (
        not isinstance(sealed_at, int) or isinstance(sealed_at, bool) or not 0 < sealed_at <= MAX_SEALED_AT
    ):
        raise EnvelopeError("'sealed-at' must be milliseconds since the epoch (a positive integer)")
    key_id = document["key_id"]
    if not isinstance(key_id, str):
        raise EnvelopeError(f"'key_id' must be a string, got {_json_type(key_id)}")
    if not 0 < len(key_id) <= MAX_KEY_ID_CHARS or not _KEY_ID.fullmatch(key_id):
        raise EnvelopeError(
            f"'key_id' must be 1 to {MAX_KEY_ID_CHARS} printable ASCII characters without spaces"
        )
    context = document["encryption-context"]
    if context != ENCRYPTION_CONTEXT:
        # Version 2 defines exactly one context; anything else was not sealed by this tool.
        raise EnvelopeError(f"'encryption-context' must be {json.dumps(ENCRYPTION_CONTEXT)} in version 2")
    data_key_ciphertext = _key_ciphertext(document)
    nonce = _b64(document, "nonce-base64")
    if len(nonce) != NONCE_BYTES:
        raise EnvelopeError(f"'nonce-base64' is {len(nonce)} bytes, expected {NONCE_BYTES}")
    ciphertext = _b64(document, "ciphertext-base64")
    if len(ciphertext) < TAG_BYTES:
        raise EnvelopeError(
            f"'ciphertext-base64' is {len(ciphertext)} bytes, shorter than the {TAG_BYTES}-byte GCM tag"
        )
    return Envelope(
        "aead", data_key_ciphertext, key_id, VERSION, nonce=nonce, ciphertext=ciphertext, sealed_at=sealed_at
    )


def _parse_fernet(document: dict[str, Any]) -> Envelope:
    _check_fields(document, _V1_FIELDS)
    data_key_ciphertext = _key_ciphertext(document)
    token = document["aes-ciphertext-base64"]
    if not isinstance(token, str):
        raise EnvelopeError(f"'aes-ciphertext-base64' must be a string, got {_json_type(token)}")
    raw = token.encode("ascii", "replace")
    if not raw or len(raw) % 4 or not _URLSAFE_B64.fullmatch(raw):
        raise EnvelopeError("'aes-ciphertext-base64' is not a Fernet token (URL-safe base64 expected)")
    decoded = base64.urlsafe_b64decode(raw)
    body = len(decoded) - _FERNET_OVERHEAD
    if decoded[:1] != b"\x80" or body < 16 or body % 16:
        raise EnvelopeError(
            f"'aes-ciphertext-base64' is not a Fernet token (version byte or length {len(decoded)} wrong)"
        )
    sealed_at = int.from_bytes(decoded[1:9], "big") * 1000  # the token's timestamp, in seconds
    if sealed_at > MAX_SEALED_AT:
        # Fernet's HMAC covers the timestamp but Fernet never checks it without a TTL: a time past
        # year 9999 cannot be shown (describe, reload messages) and would outrank every later list.
        raise EnvelopeError("'aes-ciphertext-base64' is not a Fernet token (its timestamp is after 9999)")
    return Envelope("fernet", data_key_ciphertext, None, FERNET_VERSION, token=raw, sealed_at=sealed_at)


def _check_fields(document: dict[str, Any], fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    for name in fields:
        if name not in document:
            raise EnvelopeError(f"envelope is missing the field {name!r}")
    unknown = sorted(set(document) - set(fields) - set(optional))
    if unknown:
        # Unknown fields are refused: a field this build ignores might be one the sealer meant.
        raise EnvelopeError(f"envelope has an unknown field {_show(unknown[0])}")


def _key_ciphertext(document: dict[str, Any]) -> bytes:
    blob = _b64(document, "data-key-ciphertext-base64")
    if not MIN_KEY_CIPHERTEXT_BYTES <= len(blob) <= MAX_KEY_CIPHERTEXT_BYTES:
        raise EnvelopeError(
            f"'data-key-ciphertext-base64' is {len(blob)} bytes, expected {MIN_KEY_CIPHERTEXT_BYTES} "
            f"to {MAX_KEY_CIPHERTEXT_BYTES} (a KMS ciphertext blob)"
        )
    return blob


def _b64(document: dict[str, Any], name: str) -> bytes:
    value = document[name]
    if not isinstance(value, str):
        raise EnvelopeError(f"{name!r} must be a string, got {_json_type(value)}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise EnvelopeError(f"{name!r} is not valid base64") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicated field is ambiguous (which one did the sealer mean?), so it is refused.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"


def _show(value: Any) -> str:
    """A short, printable rendering of a value from the file, for error messages."""
    text = repr(value) if isinstance(value, str) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mib(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB"


def _fernet_length(token: bytes) -> int:
    return len(token) // 4 * 3 - token[-2:].count(b"=") if token else 0


# --------------------------------------------------------------------------- opening


def open_envelope(env: Envelope, data_key: bytes | bytearray) -> bytearray:
    """Decrypt the list with the plaintext data key. The caller zeroes the returned buffer after use.

    Raises :class:`EnvelopeError` with :data:`NOT_DECRYPTABLE` when authentication fails: a changed
    byte, a changed key id, or a data key that is not the one the envelope was sealed under.
    """
    if len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeError(f"the data key is {len(data_key)} bytes, expected {DATA_KEY_BYTES}")
    if env.kind == "aead":
        return _open_aead(env, bytes(data_key))
    return _open_fernet(env, bytes(data_key))


def _open_aead(env: Envelope, data_key: bytes) -> bytearray:
    assert env.key_id is not None
    body = env.ciphertext[:-TAG_BYTES]
    tag = env.ciphertext[-TAG_BYTES:]
    decryptor = Cipher(algorithms.AES(data_key), modes.GCM(env.nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(associated_data(env.key_id, env.version, env.sealed_at))
    # Decrypt into our own buffer: an immutable bytes plaintext could not be wiped later.
    buffer = bytearray(len(body) + 15)
    written = decryptor.update_into(body, buffer)
    try:
        decryptor.finalize()
    except InvalidTag:
        buffer[:] = bytes(len(buffer))  # released before the tag was checked: wipe it
        raise EnvelopeError(NOT_DECRYPTABLE) from None
    del buffer[written:]
    return buffer


def _open_fernet(env: Envelope, data_key: bytes) -> bytearray:
    try:
        # cryptography's Fernet returns immutable bytes; the legacy format cannot do better.
        plaintext = Fernet(base64.urlsafe_b64encode(data_key)).decrypt(env.token)
    except InvalidToken:
        raise EnvelopeError(NOT_DECRYPTABLE) from None
    buffer = bytearray(plaintext)
    del plaintext
    return buffer


# --------------------------------------------------------------------------- sealing


def seal_envelope(
    payload: bytes, data_key: bytes, data_key_ciphertext: bytes, key_id: str, sealed_at: int | None = None
) -> bytes:
    """The version-2 envelope (JSON bytes) for ``payload`` under ``data_key``, sealed now (or at
    ``sealed_at``, milliseconds since the epoch).

    ``data_key`` and ``data_key_ciphertext`` come from KMS GenerateDataKey (KeySpec AES_256) with
    :data:`ENCRYPTION_CONTEXT`; ``key_id`` names the KMS key (the ARN KMS answered is best).
    The result always passes :func:`parse_envelope`.
    """
    if sealed_at is None:
        sealed_at = time.time_ns() // 1_000_000
    _check_seal_inputs(data_key, data_key_ciphertext)
    if not 0 < len(key_id) <= MAX_KEY_ID_CHARS or not _KEY_ID.fullmatch(key_id):
        raise EnvelopeError(f"key id must be 1 to {MAX_KEY_ID_CHARS} printable ASCII characters")
    nonce = os.urandom(NONCE_BYTES)  # a fresh data key per envelope, so a random nonce never repeats
    aad = associated_data(key_id, VERSION, sealed_at)
    ciphertext = AESGCM(bytes(data_key)).encrypt(nonce, bytes(payload), aad)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "key_id": key_id,
        "encryption-context": ENCRYPTION_CONTEXT,
        "sealed-at": sealed_at,
        "data-key-ciphertext-base64": _b64text(data_key_ciphertext),
        "nonce-base64": _b64text(nonce),
        "ciphertext-base64": _b64text(ciphertext),
    }
    return _finish(document)


def seal_fernet_envelope(payload: bytes, data_key: bytes, data_key_ciphertext: bytes) -> bytes:
    """The original app's envelope (for compatibility tests): a Fernet token under the data key."""
    _check_seal_inputs(data_key, data_key_ciphertext)
    token = Fernet(base64.urlsafe_b64encode(bytes(data_key))).encrypt(bytes(payload))
    document = {
        "data-key-ciphertext-base64": _b64text(data_key_ciphertext),
        "aes-ciphertext-base64": token.decode("ascii"),
    }
    return _finish(document)


def _check_seal_inputs(data_key: bytes, data_key_ciphertext: bytes) -> None:
    if len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeError(f"the data key is {len(data_key)} bytes, expected {DATA_KEY_BYTES}")
    if not MIN_KEY_CIPHERTEXT_BYTES <= len(data_key_ciphertext) <= MAX_KEY_CIPHERTEXT_BYTES:
        raise EnvelopeError(f"the data key ciphertext is {len(data_key_ciphertext)} bytes, not a KMS blob")


def _finish(document: dict[str, Any]) -> bytes:
    out = (json.dumps(document, indent=2) + "\n").encode("ascii")
    if len(out) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            f"the sealed envelope would be {len(out)} bytes, over the limit of {_mib(MAX_ENVELOPE_BYTES)}"
        )
    return out


def _iso_ms(ms: int) -> str:
    seconds, fraction = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:03d}Z"


def _b64text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
