"""KMS ``CiphertextForRecipient``: CMS EnvelopedData (RFC 5652) to and from the sidecar's recipient key.

When a KMS request carries ``Recipient`` (an attestation document whose ``public_key`` is our
:class:`~sidecar.recipient.RecipientKey`), KMS answers with the plaintext wrapped for that key:

- ``ContentInfo`` of type envelopedData, BER with indefinite lengths, EnvelopedData version 2;
- exactly one ``KeyTransRecipientInfo`` (version 2) whose rid is ``[0] subjectKeyIdentifier`` =
  SHA-256 of the recipient's SubjectPublicKeyInfo DER;
- a fresh 32-byte content key wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label);
- the content under AES-256-CBC with PKCS#7 padding, the encrypted content either a primitive
  ``[0] IMPLICIT`` string or constructed, indefinite-length OCTET STRING chunks.

``cryptography``'s own PKCS7 decryption cannot read this (it accepts only PKCS#1 v1.5 key transport and
strict DER), so ``asn1crypto`` parses the BER and ``cryptography``'s primitives decrypt. Anything other
than the shape above is refused with a specific :class:`CmsError`; no other exception escapes for any
input bytes. asn1crypto refuses one legal-but-unused BER form, constructed *definite*-length OCTET
STRINGs (KMS and ``openssl cms -stream`` both use indefinite lengths); that surfaces as "not BER/DER".

Limitation: this gives confidentiality, not integrity or authenticity. CBC is malleable: a tampered
ciphertext or IV decrypts to "bad padding" or to different plaintext, and nothing here can tell. And
anyone holding our (attested, hence public) key can make a CMS we decrypt. Both come from elsewhere:
the answer arrives inside KMS's TLS session, which terminates in the enclave, so the untrusted parent
and its vsock proxy can neither alter it nor substitute their own; the OAEP-wrapped content key is
fresh per answer. Do not treat a successful decryption as proof of origin for data from any other
channel. (The one message for every OAEP failure is kept anyway, so no decryption oracle exists.)

:func:`encrypt_for_recipient` is the inverse, producing exactly what KMS produces (byte-identical
algorithm identifiers); the dev world's attesting KMS front uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, core
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sidecar.recipient import RecipientKey

__all__ = [
    "MAX_CMS_BYTES",
    "CmsError",
    "EnvelopedData",
    "decrypt_enveloped_data",
    "encrypt_for_recipient",
    "parse_enveloped_data",
]

# KMS plaintexts are at most 4 KiB; 1 MiB is far above any real answer and bounds parsing work.
MAX_CMS_BYTES = 1 << 20
_AES_BLOCK = 16
_CONTENT_KEY_BYTES = 32  # AES-256
# Our recipient key is RSA-2048. A smaller one is too weak to wrap a data key, and below 784 bits
# OAEP-SHA-256 cannot hold 32 bytes at all (cryptography then raises a bare ValueError).
_MIN_RECIPIENT_BITS = 2048
_ENVELOPED_DATA_VERSION = 2  # RFC 5652 6.1: 2 because the recipient uses subjectKeyIdentifier
_KTRI_VERSION = 2  # RFC 5652 6.2.1: 2 for a subjectKeyIdentifier rid
_OAEP_FAILED = "encrypted key did not decrypt"  # one message for every OAEP failure: no oracle detail
# KMS's key encryption AlgorithmIdentifier: RSAES-OAEP, explicit SHA-256 and MGF1-SHA-256, the default
# pSourceFunc (empty label) omitted. Built once: asn1crypto takes ~7 ms to build it from dicts, and
# loading the DER again per message costs microseconds.
_KMS_KEY_ENCRYPTION_ALGORITHM = cms.KeyEncryptionAlgorithm(
    {
        "algorithm": "rsaes_oaep",
        "parameters": algos.RSAESOAEPParams(
            {
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            }
        ),
    }
).dump()


class CmsError(Exception):
    """The CMS is malformed, not what KMS sends, not for this key, or does not decrypt."""


@dataclass(frozen=True)
class EnvelopedData:
    """The fields of a checked EnvelopedData. Algorithm names are asn1crypto's (``"sha256"``...)."""

    version: int
    recipient_key_id: bytes  # the subjectKeyIdentifier: SHA-256 of the recipient's SPKI DER
    encrypted_key: bytes
    oaep_hash: str
    mgf1_hash: str
    content_algorithm: str
    iv: bytes
    encrypted_content: bytes  # chunks of a constructed OCTET STRING already joined


def _one_line(exc: BaseException) -> str:
    # asn1crypto's messages span lines ("... while parsing X"); keep them readable in one log line.
    return " ".join(str(exc).split()) or type(exc).__name__


def _load(data: bytes) -> Any:
    """Parse ``data`` fully as a ContentInfo holding envelopedData, or raise CmsError."""
    try:
        info = cms.ContentInfo.load(data, strict=True)  # strict: trailing bytes are an error
        content_type = info["content_type"]
        is_enveloped = content_type.native == "enveloped_data"
        dotted = content_type.dotted
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, KeyError... for bad bytes
        raise CmsError(f"not BER/DER: {_one_line(exc)}") from exc
    # Checked before the full parse: the content's ASN.1 spec depends on the content type.
    if not is_enveloped:
        raise CmsError(f"content type is {dotted}, expected envelopedData")
    try:
        # asn1crypto parses lazily; force every level now so its errors surface here, wrapped.
        info.native  # noqa: B018
    except Exception as exc:
        raise CmsError(f"not BER/DER: {_one_line(exc)}") from exc
    return info["content"]


def _oaep_params(key_encryption_algorithm: Any) -> tuple[str, str]:
    """Check RSAES-OAEP with SHA-256, MGF1-SHA-256 and an empty label; return the hash names."""
    algorithm = key_encryption_algorithm["algorithm"].native
    if algorithm != "rsaes_oaep":
        raise CmsError(f"key encryption algorithm {algorithm}, expected RSAES-OAEP")
    params = key_encryption_algorithm["parameters"]
    if isinstance(params, core.Void):
        params = algos.RSAESOAEPParams({})  # absent parameters mean RFC 4055's defaults: all SHA-1
    oaep_hash = str(params["hash_algorithm"]["algorithm"].native)
    if oaep_hash != "sha256":
        raise CmsError(f"OAEP hash must be SHA-256, got {oaep_hash}")
    mask_gen = params["mask_gen_algorithm"]
    if mask_gen["algorithm"].native != "mgf1":
        raise CmsError(f"mask generation function {mask_gen['algorithm'].native}, expected MGF1")
    mgf1_digest = mask_gen["parameters"]
    mgf1_hash = "absent" if isinstance(mgf1_digest, core.Void) else str(mgf1_digest["algorithm"].native)
    if mgf1_hash != "sha256":
        raise CmsError(f"MGF1 hash must be SHA-256, got {mgf1_hash}")
    p_source = params["p_source_algorithm"]
    if p_source["algorithm"].native != "p_specified" or p_source["parameters"].native != b"":
        raise CmsError("OAEP label must be empty")  # KMS uses none; decryption assumes none
    return oaep_hash, mgf1_hash


def _check(enveloped: Any) -> EnvelopedData:
    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1:
        raise CmsError(f"expected exactly one recipient, got {len(recipients)}")
    recipient = recipients[0]
    if recipient.name != "ktri":
        raise CmsError(f"recipient is not KeyTransRecipientInfo ({recipient.name})")
    ktri = recipient.chosen
    rid = ktri["rid"]
    # Recipient checks come before the versions: the versions follow from the recipient kind
    # (RFC 5652 6.1), and "wrong recipient id kind" is the more telling error for issuerAndSerialNumber.
    if rid.name != "subject_key_identifier":
        raise CmsError(f"recipient id is not subjectKeyIdentifier ({rid.name})")
    version = int(enveloped["version"])
    if version != _ENVELOPED_DATA_VERSION:
        raise CmsError(f"EnvelopedData version {version}, expected {_ENVELOPED_DATA_VERSION}")
    ktri_version = int(ktri["version"])
    if ktri_version != _KTRI_VERSION:
        raise CmsError(f"KeyTransRecipientInfo version {ktri_version}, expected {_KTRI_VERSION}")
    oaep_hash, mgf1_hash = _oaep_params(ktri["key_encryption_algorithm"])

    content_info = enveloped["encrypted_content_info"]
    inner_type = content_info["content_type"]
    if inner_type.native != "data":
        raise CmsError(f"encrypted content type is {inner_type.dotted}, expected data")
    content_algorithm = content_info["content_encryption_algorithm"]
    content_algorithm_name = str(content_algorithm["algorithm"].native)
    if content_algorithm_name != "aes256_cbc":
        raise CmsError(f"content encryption algorithm {content_algorithm_name}, expected AES-256-CBC")
    iv = content_algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != _AES_BLOCK:
        got = f"{len(iv)} bytes" if isinstance(iv, bytes) else "absent"
        raise CmsError(f"IV must be 16 bytes, got {got}")
    # asn1crypto joins the chunks of a constructed, indefinite-length OCTET STRING in .native.
    content = content_info["encrypted_content"].native
    if content is None:
        raise CmsError("missing encrypted content")
    if not content:
        raise CmsError("missing encrypted content (empty)")
    if len(content) % _AES_BLOCK:
        raise CmsError(f"content length is not a multiple of 16 ({len(content)} bytes)")
    return EnvelopedData(
        version=version,
        recipient_key_id=bytes(rid.chosen.native),
        encrypted_key=bytes(ktri["encrypted_key"].native),
        oaep_hash=oaep_hash,
        mgf1_hash=mgf1_hash,
        content_algorithm=content_algorithm_name,
        iv=bytes(iv),
        encrypted_content=bytes(content),
    )


def parse_enveloped_data(data: bytes) -> EnvelopedData:
    """Parse and check KMS's ``CiphertextForRecipient`` without decrypting it. Raises CmsError only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CmsError(f"CMS must be bytes, got {type(data).__name__}")
    # Size first: bounds every later step, including asn1crypto's parsing.
    if len(data) > MAX_CMS_BYTES:
        raise CmsError(f"CMS is {len(data)} bytes, limit is {MAX_CMS_BYTES}")
    enveloped = _load(bytes(data))
    try:
        return _check(enveloped)
    except CmsError:
        raise
    except Exception as exc:  # the tree is fully parsed, but keep the "only CmsError" promise regardless
        raise CmsError(f"malformed EnvelopedData: {_one_line(exc)}") from exc


def decrypt_enveloped_data(data: bytes, recipient: RecipientKey) -> bytes:
    """Decrypt KMS's ``CiphertextForRecipient`` with our recipient key. Raises CmsError only.

    See the module docstring: CBC gives no integrity, so tampering shows up as "bad padding" at best.
    """
    enveloped = parse_enveloped_data(data)
    # Not secret, but compare_digest costs nothing and keeps timing flat.
    if not hmac.compare_digest(enveloped.recipient_key_id, recipient.spki_sha256):
        raise CmsError("recipient id does not match this key")
    try:
        content_key = recipient.decrypt_oaep_sha256(enveloped.encrypted_key)
    except Exception:
        # One message, no chained cause: distinguishable OAEP failures are a decryption oracle (Manger).
        raise CmsError(_OAEP_FAILED) from None
    if len(content_key) != _CONTENT_KEY_BYTES:
        raise CmsError(f"content key is {len(content_key)} bytes, expected {_CONTENT_KEY_BYTES}")
    try:
        decryptor = Cipher(algorithms.AES(content_key), modes.CBC(enveloped.iv)).decryptor()
        padded = decryptor.update(enveloped.encrypted_content) + decryptor.finalize()
    except Exception as exc:  # unreachable after the checks above; keeps the "only CmsError" promise
        raise CmsError(f"content did not decrypt: {_one_line(exc)}") from exc
    unpadder = sym_padding.PKCS7(_AES_BLOCK * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CmsError("bad padding") from None


def encrypt_for_recipient(plaintext: bytes, spki_der: bytes) -> bytes:
    """Wrap ``plaintext`` for the RSA key in ``spki_der`` exactly as KMS does (DER, a valid BER subset)."""
    try:
        public_key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CmsError(f"recipient key is not a DER SubjectPublicKeyInfo: {_one_line(exc)}") from exc
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise CmsError(f"recipient key is {type(public_key).__name__}, expected RSA")
    if public_key.key_size < _MIN_RECIPIENT_BITS:
        raise CmsError(
            f"recipient key is RSA-{public_key.key_size}, at least {_MIN_RECIPIENT_BITS} bits needed"
        )

    content_key = os.urandom(_CONTENT_KEY_BYTES)  # fresh per message, as KMS does
    iv = os.urandom(_AES_BLOCK)
    padder = sym_padding.PKCS7(_AES_BLOCK * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    encrypted_content = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = public_key.encrypt(
        content_key,
        asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )

    recipient = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                name="subject_key_identifier", value=hashlib.sha256(spki_der).digest()
            ),
            # A fresh object per message (asn1crypto objects are mutable), byte-identical to KMS's.
            "key_encryption_algorithm": cms.KeyEncryptionAlgorithm.load(_KMS_KEY_ENCRYPTION_ALGORITHM),
            "encrypted_key": encrypted_key,
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v2",
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=recipient)],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
                "encrypted_content": encrypted_content,
            },
        }
    )
    out: bytes = cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()
    if len(out) > MAX_CMS_BYTES:  # never produce what parse_enveloped_data would refuse
        raise CmsError(f"plaintext too large: CMS would be {len(out)} bytes, limit is {MAX_CMS_BYTES}")
    return out
