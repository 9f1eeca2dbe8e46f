"""The sidecar's recipient key: an RSA-2048 key pair generated in memory at every start-up.

Its public half (SubjectPublicKeyInfo DER) goes into attestation documents as ``public_key``, so KMS
can encrypt its answers to it (``Recipient``), and a remote verifier can bind what it encrypts to this
enclave. The private half never leaves the process and is never written anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


@dataclass(frozen=True)
class RecipientKey:
    private_key: rsa.RSAPrivateKey = field(repr=False)
    spki_der: bytes

    @classmethod
    def generate(cls) -> RecipientKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(key, spki)

    @property
    def spki_sha256(self) -> bytes:
        """SHA-256 of the SPKI DER: the recipient id KMS uses, and the user_data we attest."""
        return hashlib.sha256(self.spki_der).digest()

    def decrypt_oaep_sha256(self, ciphertext: bytes) -> bytes:
        """RSAES-OAEP with SHA-256 and MGF1-SHA-256, empty label (KMS's RSAES_OAEP_SHA_256)."""
        return self.private_key.decrypt(
            ciphertext,
            padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
        )
