"""The dev world's attesting KMS front: moto's KMS, plus what AWS KMS does with ``Recipient``.

moto keeps the keys and does Encrypt, Decrypt, GenerateDataKey and GenerateRandom, but it ignores
``Recipient``: it returns ``Plaintext`` to anyone. This aiohttp server speaks the KMS JSON 1.1
protocol (``POST /``, ``X-Amz-Target: TrentService.<Op>``) in front of a moto server. For a request
that carries ``Recipient`` it does what AWS KMS does:

1. ``KeyEncryptionAlgorithm`` must be ``RSAES_OAEP_SHA_256``. The attestation document must verify
   against the dev root (signature, chain, validity and timestamp at the front's clock) and must hold
   an RSA ``public_key``. Otherwise: 400 ``ValidationException``. AWS does not document the exact
   code it returns for a bad document; ValidationException is its generic "bad input".
2. The key's policy (moto's GetKeyPolicy, the key resolved with DescribeKey so aliases work) must
   allow ``kms:<Op>`` for the document's measurements; see :func:`evaluate_policy`. Otherwise: 400
   ``AccessDeniedException``. For Decrypt without ``KeyId`` the key is only known from the ciphertext,
   so moto decrypts first and the policy of the key named in its answer is checked before anything
   is returned.
3. The request goes to moto without ``Recipient``. The plaintext field of the answer (``Plaintext``,
   or ``PrivateKeyPlaintext`` for GenerateDataKeyPair) is replaced by ``CiphertextForRecipient``:
   CMS EnvelopedData for the document's ``public_key``, exactly as KMS builds it.

GenerateRandom has no key, so no key policy. In AWS, IAM policies govern it, and the dev world has
no IAM. A verified document is all it needs here.

What moto 5.2 lacks: GenerateDataKeyPair is done here. The front generates the pair, and moto's
Encrypt under the requested key makes ``PrivateKeyCiphertextBlob``, which moto's Decrypt opens.
DeriveSharedSecret needs KEY_AGREEMENT keys, which moto does not have. The front answers it with
``UnsupportedOperationException`` rather than moto's HTML 500, which botocore would retry.

Everything else, and every request without ``Recipient``, is forwarded unchanged: body, status,
``Content-Type``, ``x-amzn-RequestId`` and ``x-amzn-ErrorType``. moto's own errors pass through the same
way. Requests are not re-signed. moto does not check signatures. It reads the account and region
from the original ``Authorization`` header, which is forwarded as is, so the front's own calls
(DescribeKey, GetKeyPolicy, Encrypt) reach the same account and region as the client's request.

Not modelled: principals (the dev world has no identities, so ``Principal`` is not checked), IAM
policies, grants, and policy evaluation for requests *without* ``Recipient``. Like bare moto, the
front then lets everything through.

For tests, ``fail_next`` holds ``(status, error code)`` pairs. Each of the next requests pops one and
gets that error, so retries can be shown. ``requests`` records the operations received, in order
(the last :data:`REQUEST_HISTORY`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict

from sidecar.attestation.document import AttestationDocument
from sidecar.attestation.verify import verify_document
from sidecar.aws.cms import CmsError, encrypt_for_recipient
from sidecar.aws.kms import ATTESTED_OPERATIONS, CIPHERTEXT_FOR_RECIPIENT, RECIPIENT_ALGORITHM
from sidecar.logs import event

__all__ = ["AttestingKmsFront", "Decision", "attestation_context", "evaluate_policy"]

log = logging.getLogger("sidecar.devworld.kms")

TARGET_PREFIX: Final = "TrentService."
JSON_CONTENT_TYPE: Final = "application/x-amz-json-1.1"
CONDITION_PREFIX: Final = "kms:recipientattestation:"
# moto 5.2 does not implement these; a clear KMS error beats its HTML 500, which clients retry.
UNSUPPORTED: Final = frozenset({"DeriveSharedSecret"})
# Operations that name their key in ``KeyId`` and must have one (Decrypt may leave it out).
KEY_REQUIRED: Final = frozenset({"GenerateDataKey", "GenerateDataKeyPair", "DeriveSharedSecret"})
REQUEST_HISTORY: Final = 1024
_HOP_BY_HOP: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)
_PASSED_HEADERS: Final = ("Content-Type", "x-amzn-RequestId", "x-amzn-ErrorType")
_ACCESS_KEY: Final = re.compile(r"Credential=([^/,\s]+)/")
_KEY_ARN: Final = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[\w-]+")
_KEY_PAIR_SPECS: Final[dict[str, Callable[[], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]]] = {
    "RSA_2048": lambda: rsa.generate_private_key(65537, 2048),
    "RSA_3072": lambda: rsa.generate_private_key(65537, 3072),
    "RSA_4096": lambda: rsa.generate_private_key(65537, 4096),
    "ECC_NIST_P256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ECC_NIST_P384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ECC_NIST_P521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ECC_SECG_P256K1": lambda: ec.generate_private_key(ec.SECP256K1()),
}


# --- key policy evaluation ----------------------------------------------------------------------


class Decision(Enum):
    ALLOW = "allow"
    EXPLICIT_DENY = "explicit deny"
    IMPLICIT_DENY = "no statement allows"


def attestation_context(document: AttestationDocument) -> dict[str, str]:
    """The ``kms:RecipientAttestation:*`` condition keys of a document, lower-cased names, hex values.

    ImageSha384 is PCR0, the enclave image's measurement. Values are lower-case hex, as AWS gives them,
    so StringEquals against upper-case hex fails and StringEqualsIgnoreCase passes.
    """
    context = {f"{CONDITION_PREFIX}pcr{index}": value.hex() for index, value in document.pcrs.items()}
    if 0 in document.pcrs:
        context[f"{CONDITION_PREFIX}imagesha384"] = document.pcrs[0].hex()
    return context


def _strings(value: Any) -> list[str] | None:
    """A policy element that may be one string or a list of strings; None if it is anything else."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _action_matches(pattern: str, action: str) -> bool:
    # IAM action patterns: case-insensitive, ``*`` and ``?`` wildcards, nothing else special.
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, action, re.IGNORECASE) is not None


def _conditions_hold(conditions: Any, context: Mapping[str, str]) -> bool | None:
    """True or False when every condition could be evaluated; None when one could not.

    Supported: StringEquals (case-sensitive) and StringEqualsIgnoreCase over RecipientAttestation keys.
    Conditions in a block are ANDed, and the values listed for one key are ORed, as in IAM. A
    RecipientAttestation key the document lacks (a PCR it does not report) is false.
    """
    if conditions is None:
        return True
    if not isinstance(conditions, dict):
        return None
    for operator, tests in conditions.items():
        if operator not in ("StringEquals", "StringEqualsIgnoreCase") or not isinstance(tests, dict):
            return None
        for key, wanted in tests.items():
            values = _strings(wanted)
            name = key.lower()
            if values is None or not name.startswith(CONDITION_PREFIX):
                return None  # another condition key (kms:CallerAccount, ...): the dev world has no value
            actual = context.get(name)
            if actual is None:
                return False
            if operator == "StringEquals":
                matched = actual in values
            else:
                matched = actual.lower() in {value.lower() for value in values}
            if not matched:
                return False
    return True


def evaluate_policy(policy: Any, action: str, context: Mapping[str, str]) -> Decision:
    """Evaluate a key policy for ``action`` (``kms:Decrypt``) and a document's condition keys.

    IAM's order: an applicable Deny wins, then any applicable Allow, else deny. ``Principal`` and
    ``Resource`` are not checked (no identities here; a key policy's Resource is the key itself). Where
    a statement cannot be evaluated (an unsupported operator or key, NotAction, a malformed element),
    the front fails closed. Such an Allow does not apply, and such a Deny does.
    """
    statements = policy.get("Statement") if isinstance(policy, dict) else None
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list):
        return Decision.IMPLICIT_DENY
    allowed = False
    for statement in statements:
        if not isinstance(statement, dict):
            continue
        deny = statement.get("Effect") == "Deny"
        if not deny and statement.get("Effect") != "Allow":
            continue
        actions = _strings(statement.get("Action"))
        if actions is None or any(k in statement for k in ("NotAction", "NotPrincipal", "NotResource")):
            holds: bool | None = None
        elif not any(_action_matches(pattern, action) for pattern in actions):
            continue
        else:
            holds = _conditions_hold(statement.get("Condition"), context)
        if deny and holds is not False:
            return Decision.EXPLICIT_DENY
        if not deny and holds is True:
            allowed = True
    return Decision.ALLOW if allowed else Decision.IMPLICIT_DENY


# --- the server ---------------------------------------------------------------------------------


class _KmsError(Exception):
    """Answer the client with a KMS-shaped JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Answer:
    """What moto said, kept whole so that it can be passed through unchanged."""

    status: int
    body: bytes
    headers: dict[str, str]


class _Passthrough(Exception):
    """moto refused a call the front made; the client gets moto's answer as it is."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(f"upstream answered {answer.status}")
        self.answer = answer


def _error(status: int, code: str, message: str) -> web.Response:
    body = json.dumps({"__type": code, "message": message}).encode()
    headers = {"Content-Type": JSON_CONTENT_TYPE, "x-amzn-RequestId": str(uuid.uuid4())}
    return web.Response(status=status, body=body, headers=headers)


def _relay(answer: _Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AttestingKmsFront:
    """KMS JSON protocol in front of moto, honouring ``Recipient`` as AWS KMS does.

    ``upstream`` is moto's base URL; ``dev_root`` the root attestation documents must chain to;
    ``clock`` gives the verification time (aware UTC; now by default).
    """

    def __init__(
        self,
        upstream: str,
        dev_root: x509.Certificate,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/") + "/"
        self.dev_root = dev_root
        self._clock = clock or (lambda: datetime.now(UTC))
        self.fail_next: list[tuple[int, str]] = []
        # Bounded: ``sidecar dev`` runs for hours, and only the last few matter to a test.
        self.requests: deque[str] = deque(maxlen=REQUEST_HISTORY)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._handle)
        app.cleanup_ctx.append(self._client_session)
        return app

    async def _client_session(self, _app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()  # the port is taken, say: close the app's client session too
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- upstream -------------------------------------------------------------------------------

    async def _send(self, headers: Mapping[str, str], body: bytes) -> _Answer:
        assert self._session is not None, "the front's app is not running"
        try:
            async with self._session.post(self.upstream, data=body, headers=headers) as response:
                data = await response.read()
                kept = {name: response.headers[name] for name in _PASSED_HEADERS if name in response.headers}
                return _Answer(response.status, data, kept)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A 500 KMSInternalException is what clients already retry.
            raise _KmsError(
                500, "KMSInternalException", f"the dev world's moto is unreachable: {exc}"
            ) from exc

    async def _call(
        self, headers: Mapping[str, str], operation: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        """One KMS call to moto on the client's behalf; a refusal is passed to the client as it is."""
        own = CIMultiDict(headers)  # replaces the client's values whatever their case
        own["X-Amz-Target"] = TARGET_PREFIX + operation
        own["Content-Type"] = JSON_CONTENT_TYPE
        answer = await self._send(own, json.dumps(params).encode())
        if answer.status != 200:
            raise _Passthrough(answer)
        result = _json_object(answer.body)
        if result is None:
            raise _KmsError(500, "KMSInternalException", f"moto's {operation} answer is not a JSON object")
        return result

    # --- requests -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        target = request.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(TARGET_PREFIX) if target.startswith(TARGET_PREFIX) else ""
        self.requests.append(operation or target)
        if self.fail_next:
            status, code = self.fail_next.pop(0)
            return _error(status, code, f"injected by the dev world's KMS front (HTTP {status})")
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        payload = _json_object(body)
        try:
            if operation in UNSUPPORTED:
                raise _KmsError(
                    400,
                    "UnsupportedOperationException",
                    f"{operation} is not supported by the dev world's KMS (moto has no key agreement keys)",
                )
            if payload is not None and "Recipient" in payload:
                return await self._attested(operation, headers, payload)
            if operation == "GenerateDataKeyPair" and payload is not None:
                return self._reply(await self._generate_data_key_pair(headers, payload))
            return _relay(await self._send(headers, body))
        except _KmsError as exc:
            return _error(exc.status, exc.code, exc.message)
        except _Passthrough as exc:
            return _relay(exc.answer)

    @staticmethod
    def _reply(answer: dict[str, Any]) -> web.Response:
        headers = {"Content-Type": JSON_CONTENT_TYPE, "x-amzn-RequestId": str(uuid.uuid4())}
        return web.Response(status=200, body=json.dumps(answer).encode(), headers=headers)

    def _verify(self, recipient: Any) -> tuple[AttestationDocument, bytes]:
        """The verified document and its RSA public key (SPKI DER), or a ValidationException."""
        if not isinstance(recipient, dict):
            raise _KmsError(400, "ValidationException", "Recipient must be an object")
        algorithm = recipient.get("KeyEncryptionAlgorithm")
        if algorithm != RECIPIENT_ALGORITHM:
            raise _KmsError(
                400,
                "ValidationException",
                f"1 validation error detected: Value '{algorithm}' at 'recipient.keyEncryptionAlgorithm' "
                f"failed to satisfy constraint: Member must satisfy enum value set: [{RECIPIENT_ALGORITHM}]",
            )
        encoded = recipient.get("AttestationDocument")
        try:
            if not isinstance(encoded, str):
                raise ValueError("not a string")
            raw = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise _KmsError(
                400, "ValidationException", f"Invalid attestation document: not base64: {exc}"
            ) from exc
        result = verify_document(raw, root=self.dev_root, at=self._clock())
        # Threat: a document from another root, expired, or edited after signing (a forged PCR0).
        if not result.ok or result.document is None:
            raise _KmsError(400, "ValidationException", f"Invalid attestation document: {result.failure}")
        document = result.document
        public_key = document.public_key
        if not public_key:
            raise _KmsError(
                400,
                "ValidationException",
                "Invalid attestation document: no public_key to encrypt the answer to",
            )
        try:
            loaded = serialization.load_der_public_key(public_key)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            loaded = None
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise _KmsError(
                400,
                "ValidationException",
                "Invalid attestation document: public_key is not an RSA SubjectPublicKeyInfo (DER)",
            )
        return document, public_key

    async def _resolve(self, headers: Mapping[str, str], key_ref: str) -> tuple[str, str]:
        """The ARN and id of the key ``key_ref`` (id, ARN or alias) names, from moto's DescribeKey."""
        described = await self._call(headers, "DescribeKey", {"KeyId": key_ref})
        metadata = described.get("KeyMetadata") or {}
        arn, key_id = metadata.get("Arn"), metadata.get("KeyId")
        if not isinstance(arn, str) or not isinstance(key_id, str):
            raise _KmsError(500, "KMSInternalException", "moto's DescribeKey answer has no key id")
        return arn, key_id

    async def _authorize(
        self,
        operation: str,
        headers: Mapping[str, str],
        key_ref: str,
        document: AttestationDocument,
        *,
        resolved: bool = False,
    ) -> str:
        """Check the key policy of ``key_ref`` (id, ARN or alias) for this document; return the key ARN.

        ``resolved``: ``key_ref`` is the key ARN moto itself named (Decrypt's answer), so GetKeyPolicy
        takes it as it is and the DescribeKey round trip that resolves aliases is skipped.
        """
        if resolved and _KEY_ARN.fullmatch(key_ref):
            arn = key_id = key_ref
        else:
            arn, key_id = await self._resolve(headers, key_ref)
        answer = await self._call(headers, "GetKeyPolicy", {"KeyId": key_id, "PolicyName": "default"})
        try:
            policy = json.loads(answer.get("Policy") or "")
        except ValueError:
            policy = None  # an unreadable policy allows nothing
        action = f"kms:{operation}"
        decision = evaluate_policy(policy, action, attestation_context(document))
        if decision is not Decision.ALLOW:
            match = _ACCESS_KEY.search(headers.get("Authorization", ""))
            user = f"access key {match.group(1)}" if match else "an anonymous caller"
            why = (
                "with an explicit deny in a resource-based policy"
                if decision is Decision.EXPLICIT_DENY
                else "because no resource-based policy allows the " + action + " action"
            )
            event(
                log, logging.INFO, "kms_front_denied", operation=operation, key=arn, decision=decision.value
            )
            # Threat: an enclave image other than the one the key is pinned to asking for its secrets.
            raise _KmsError(
                400,
                "AccessDeniedException",
                f"User: {user} is not authorized to perform: {action} on resource: {arn} {why}",
            )
        return arn

    async def _attested(
        self, operation: str, headers: Mapping[str, str], payload: dict[str, Any]
    ) -> web.Response:
        field = ATTESTED_OPERATIONS.get(operation)
        if field is None:
            raise _KmsError(400, "ValidationException", f"{operation or 'this operation'} takes no Recipient")
        document, public_key = self._verify(payload.pop("Recipient"))
        key_ref = payload.get("KeyId")
        if operation in KEY_REQUIRED and not isinstance(key_ref, str):
            raise _KmsError(400, "ValidationException", f"{operation} needs a KeyId")
        checked: str | None = None
        if isinstance(key_ref, str):
            # Check before moto does anything, whenever the request names its key.
            checked = await self._authorize(operation, headers, key_ref, document)
        if operation == "GenerateDataKeyPair":
            answer = await self._generate_data_key_pair(headers, payload)
        else:
            answer = await self._call(headers, operation, payload)
        if operation == "Decrypt":
            # The key that actually decrypted is the one whose policy counts (the blob names it).
            used = answer.get("KeyId")
            if not isinstance(used, str):
                raise _KmsError(500, "KMSInternalException", "moto's Decrypt answer does not name its key")
            if used != checked:
                await self._authorize(operation, headers, used, document, resolved=True)
        plaintext = answer.pop(field, None)
        if not isinstance(plaintext, str):
            raise _KmsError(500, "KMSInternalException", f"moto's {operation} answer has no {field}")
        try:
            sealed = encrypt_for_recipient(base64.b64decode(plaintext), public_key)
        except CmsError as exc:
            raise _KmsError(400, "ValidationException", f"Invalid attestation document: {exc}") from exc
        answer[CIPHERTEXT_FOR_RECIPIENT] = _b64(sealed)
        event(log, logging.DEBUG, "kms_front_attested", operation=operation, module_id=document.module_id)
        return self._reply(answer)

    async def _generate_data_key_pair(
        self, headers: Mapping[str, str], payload: dict[str, Any]
    ) -> dict[str, Any]:
        """GenerateDataKeyPair, which moto lacks: a fresh pair, the private half encrypted by moto."""
        spec = payload.get("KeyPairSpec")
        make = _KEY_PAIR_SPECS.get(spec) if isinstance(spec, str) else None
        if make is None:
            raise _KmsError(
                400,
                "ValidationException",
                f"1 validation error detected: Value '{spec}' at 'keyPairSpec' failed to satisfy constraint: "
                f"Member must satisfy enum value set: [{', '.join(_KEY_PAIR_SPECS)}]",
            )
        if not isinstance(payload.get("KeyId"), str):
            raise _KmsError(400, "ValidationException", "GenerateDataKeyPair needs a KeyId")
        key = await asyncio.to_thread(make)  # RSA generation takes long enough to stall the loop
        private_der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        params: dict[str, Any] = {"KeyId": payload["KeyId"], "Plaintext": _b64(private_der)}
        if "EncryptionContext" in payload:
            params["EncryptionContext"] = payload["EncryptionContext"]
        encrypted = await self._call(headers, "Encrypt", params)
        return {
            "KeyId": encrypted.get("KeyId"),
            "KeyPairSpec": spec,
            "PrivateKeyCiphertextBlob": encrypted.get("CiphertextBlob"),
            "PrivateKeyPlaintext": _b64(private_der),
            "PublicKey": _b64(public_der),
        }
