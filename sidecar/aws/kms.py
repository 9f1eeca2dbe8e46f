"""Attested KMS: every call that returns secret material carries ``Recipient``, and answers come back sealed.

For Decrypt, GenerateDataKey, GenerateDataKeyPair, GenerateRandom and DeriveSharedSecret, KMS accepts
``Recipient = {AttestationDocument, KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256}``. It checks the
document's signature and evaluates the key policy's ``kms:RecipientAttestation:*`` conditions
against its measurements. It then answers with ``CiphertextForRecipient``: the plaintext wrapped in CMS
EnvelopedData for the document's ``public_key``, which is our :class:`~sidecar.recipient.RecipientKey`.
The plaintext field of the answer is absent or empty.

:class:`AttestedKms` wraps an ordinary boto3 KMS client, so request signing, serialisation, retries
and endpoints stay botocore's. It adds a fresh attestation document to each attested call and
unwraps ``CiphertextForRecipient``. Its two steps are public (:meth:`AttestedKms.recipient` and
:meth:`AttestedKms.unseal`), so that the KMS proxy, which already holds the app's request as KMS
JSON, can send it itself and still apply exactly these rules.

It fails closed: an answer without ``CiphertextForRecipient`` is an :class:`AttestedKmsError`,
even when it carries a usable ``Plaintext``. A KMS (or a stand-in like bare moto) that ignored
``Recipient`` never got to check the measurements, so its plaintext proves nothing about this
enclave and must not be used. KMS's own errors (botocore ``ClientError``:
AccessDeniedException when the measurements do not match, throttling after botocore's retries) pass
through unchanged, so callers see KMS's error code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from botocore import xform_name

from sidecar.aws.cms import CmsError, decrypt_enveloped_data
from sidecar.recipient import RecipientKey

__all__ = ["ATTESTED_OPERATIONS", "RECIPIENT_ALGORITHM", "AttestedKms", "AttestedKmsError"]

RECIPIENT_ALGORITHM: Final = "RSAES_OAEP_SHA_256"  # the only KeyEncryptionAlgorithm KMS accepts
# Operation -> the plaintext field of its answer that CiphertextForRecipient replaces.
ATTESTED_OPERATIONS: Final[dict[str, str]] = {
    "Decrypt": "Plaintext",
    "GenerateDataKey": "Plaintext",
    "GenerateDataKeyPair": "PrivateKeyPlaintext",
    "GenerateRandom": "Plaintext",
    "DeriveSharedSecret": "SharedSecret",
}
CIPHERTEXT_FOR_RECIPIENT: Final = "CiphertextForRecipient"


class AttestedKmsError(Exception):
    """An attested call failed on our side: no document, an unsealed answer, or undecryptable CMS."""


class AttestedKms:
    """A boto3 KMS client whose secret-returning calls are attested and answered for our key only.

    ``attest`` is the NSM's (or emulator's) ``attestation`` method: keyword arguments ``nonce``,
    ``user_data`` and ``public_key``, returning the COSE document bytes. It is called once per
    attested call: documents are cheap, and a fresh one never trips a verifier's age limit.
    """

    def __init__(self, client: Any, attest: Callable[..., bytes], recipient: RecipientKey) -> None:
        self.client = client
        self._attest = attest
        self._recipient = recipient
        # botocore's own name mapping ("GenerateDataKeyPair" -> "generate_data_key_pair"); the
        # reverse of what the client exposes is exact where xform_name would only be a guess.
        mapping: dict[str, str] = dict(getattr(client.meta, "method_to_api_mapping", {}))
        self._methods = {api: method for method, api in mapping.items()}

    def _method(self, operation: str) -> Callable[..., dict[str, Any]]:
        name = self._methods.get(operation) or xform_name(operation)
        method = getattr(self.client, name, None)
        if method is None:
            raise ValueError(f"the KMS client has no operation {operation!r}")
        return method  # type: ignore[no-any-return]

    def recipient(self) -> dict[str, Any]:
        """The ``Recipient`` parameter for one attested call: a fresh document for our key.

        Blocking (an NSM ioctl, or signing in the emulator). The document is made anew for every
        call rather than cached: it carries the PCRs at the time it is made, and an app may extend
        a PCR (>= 16) precisely to lose access to a key; a cached document would outlive that.
        """
        try:
            # user_data binds the key as the sidecar's own attestation endpoint does (SHA-256 of it),
            # so a verifier that checks the binding accepts these documents too.
            document = self._attest(
                nonce=None, user_data=self._recipient.spki_sha256, public_key=self._recipient.spki_der
            )
        except Exception as exc:  # the NSM is gone or refused: nothing secret may be asked for
            raise AttestedKmsError(f"cannot get an attestation document: {exc}") from exc
        return {"AttestationDocument": document, "KeyEncryptionAlgorithm": RECIPIENT_ALGORITHM}

    def unseal(self, operation: str, response: dict[str, Any]) -> dict[str, Any]:
        """Replace ``CiphertextForRecipient`` (bytes) in KMS's answer by the plaintext field it seals.

        ``response`` is changed in place and returned: ``CiphertextForRecipient`` is removed, and the
        operation's plaintext field (``Plaintext``...) is set to the decrypted bytes. Raises
        :class:`AttestedKmsError` when the answer is not sealed, or not sealed for our key.
        """
        field = ATTESTED_OPERATIONS[operation]
        sealed = response.pop(CIPHERTEXT_FOR_RECIPIENT, None)
        if not sealed:
            # Threat: a KMS (or a stand-in) that ignored Recipient. Its plaintext was released
            # without checking our measurements, so using it would hide a broken trust chain.
            present = "a plaintext field" if response.get(field) else "no plaintext either"
            raise AttestedKmsError(
                f"KMS answered {operation} without CiphertextForRecipient ({present}): it ignored the "
                "attestation document, so the answer is refused"
            )
        try:
            response[field] = decrypt_enveloped_data(bytes(sealed), self._recipient)
        except CmsError as exc:
            raise AttestedKmsError(f"{operation}: CiphertextForRecipient does not decrypt: {exc}") from exc
        return response

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """Call ``operation`` (KMS's API name). Attested operations are sealed and unwrapped."""
        method = self._method(operation)
        if operation not in ATTESTED_OPERATIONS:
            return method(**params)
        if "Recipient" in params:
            # The recipient must be our key: a caller-chosen one would send the secret elsewhere.
            raise ValueError("Recipient is set by AttestedKms; do not pass it")
        return self.unseal(operation, method(**params, Recipient=self.recipient()))

    def decrypt(self, **params: Any) -> dict[str, Any]:
        return self.call("Decrypt", params)

    def generate_data_key(self, **params: Any) -> dict[str, Any]:
        return self.call("GenerateDataKey", params)

    def generate_data_key_pair(self, **params: Any) -> dict[str, Any]:
        return self.call("GenerateDataKeyPair", params)

    def generate_random(self, **params: Any) -> dict[str, Any]:
        return self.call("GenerateRandom", params)

    def derive_shared_secret(self, **params: Any) -> dict[str, Any]:
        return self.call("DeriveSharedSecret", params)
