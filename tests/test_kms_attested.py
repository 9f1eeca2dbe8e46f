"""Attested KMS end to end: boto3 -> the attesting KMS front -> moto, with emulated attestation.

The parts are real: moto's threaded server keeps the keys, and the front runs on an ephemeral port
in its own event-loop thread (boto3 is synchronous). botocore signs and serialises the real
``Recipient`` field, an NsmEmulator on a dev PKI makes the documents, and AttestedKms unwraps the
CMS answers. Retry tests set botocore's backoff delay to zero; everything else is as shipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import boto3
import cbor2
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.retries.standard import ExponentialBackoff
from cryptography.hazmat.primitives import serialization

from sidecar.attestation.emulator import DevPki, NsmEmulator
from sidecar.attestation.policy import key_policy
from sidecar.aws.kms import ATTESTED_OPERATIONS, RECIPIENT_ALGORITHM, AttestedKms, AttestedKmsError
from sidecar.devworld.kms_front import AttestingKmsFront, Decision, evaluate_policy
from sidecar.recipient import RecipientKey

T = TypeVar("T")
REGION = "us-east-1"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
PCRS = {
    0: hashlib.sha384(b"enclave image").digest(),
    1: hashlib.sha384(b"kernel").digest(),
    2: hashlib.sha384(b"application").digest(),
}
PCR0 = PCRS[0].hex()
OTHER_PCR0 = hashlib.sha384(b"another image").hexdigest()
# botocore's retries: ``max_attempts`` counts retries after the first try; ``total_max_attempts`` all tries.
NO_RETRY = Config(retries={"mode": "standard", "total_max_attempts": 1})


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread: the front serves while the test thread blocks in boto3."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kms-front", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki.load_or_create(tmp_path_factory.mktemp("dev-pki"))


@pytest.fixture(scope="module")
def nsm(pki: DevPki) -> NsmEmulator:
    return NsmEmulator(pki, pcrs=PCRS, module_id="i-kms-test-enc")


@pytest.fixture(scope="module")
def recipient() -> RecipientKey:
    return RecipientKey.generate()


@pytest.fixture(scope="module")
def start_front(
    loop: asyncio.AbstractEventLoop, moto_url: str, pki: DevPki
) -> Iterator[Callable[..., AttestingKmsFront]]:
    started: list[AttestingKmsFront] = []

    def start(**kwargs: Any) -> AttestingKmsFront:
        front = AttestingKmsFront(moto_url, pki.root, **kwargs)
        run(loop, front.start())
        started.append(front)
        return front

    yield start
    for front in started:
        run(loop, front.stop())


@pytest.fixture(scope="module")
def shared_front(start_front: Callable[..., AttestingKmsFront]) -> AttestingKmsFront:
    return start_front()


@pytest.fixture
def front(shared_front: AttestingKmsFront) -> Iterator[AttestingKmsFront]:
    shared_front.requests.clear()
    shared_front.fail_next.clear()
    yield shared_front
    shared_front.fail_next.clear()


def client(url: str, config: Config = NO_RETRY) -> Any:
    return boto3.client("kms", endpoint_url=url, region_name=REGION, config=config, **CREDS)


@pytest.fixture(scope="module")
def admin(moto_url: str) -> Any:
    """Straight to moto, for setting keys up."""
    return client(moto_url)


@pytest.fixture
def kms(front: AttestingKmsFront) -> Any:
    return client(front.url)


@pytest.fixture
def attested(kms: Any, nsm: NsmEmulator, recipient: RecipientKey) -> AttestedKms:
    return AttestedKms(kms, nsm.attestation, recipient)


def make_key(admin: Any, policy: dict[str, Any]) -> str:
    key_id: str = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    return key_id


@pytest.fixture(scope="module")
def pinned_key(admin: Any) -> str:
    return make_key(admin, key_policy(PCR0))


@pytest.fixture(scope="module")
def foreign_key(admin: Any) -> str:
    return make_key(admin, key_policy(OTHER_PCR0))


def policy(operator: str, conditions: dict[str, str], actions: list[str] | None = None) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": actions or ["kms:Decrypt", "kms:GenerateDataKey"],
                "Resource": "*",
                "Condition": {operator: conditions},
            }
        ],
    }


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    code: str = exc.value.response["Error"]["Code"]
    return code


# --- the attested operations --------------------------------------------------------------------


def test_encrypt_then_attested_decrypt(kms: Any, attested: AttestedKms, admin: Any, pinned_key: str) -> None:
    blob = kms.encrypt(KeyId=pinned_key, Plaintext=b"the no-fly list key")["CiphertextBlob"]
    answer = attested.decrypt(CiphertextBlob=blob)
    assert answer["Plaintext"] == b"the no-fly list key"
    assert "CiphertextForRecipient" not in answer
    assert answer["KeyId"].endswith(pinned_key)
    # Named through an alias too: the front resolves it before reading the policy.
    admin.create_alias(AliasName="alias/attested-test", TargetKeyId=pinned_key)
    assert (
        attested.decrypt(CiphertextBlob=blob, KeyId="alias/attested-test")["Plaintext"]
        == b"the no-fly list key"
    )


def test_generate_data_key_then_decrypt_it(attested: AttestedKms, pinned_key: str) -> None:
    data_key = attested.generate_data_key(KeyId=pinned_key, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    again = attested.decrypt(CiphertextBlob=data_key["CiphertextBlob"])
    assert again["Plaintext"] == data_key["Plaintext"]


def test_generate_random(attested: AttestedKms) -> None:
    first = attested.generate_random(NumberOfBytes=32)["Plaintext"]
    second = attested.generate_random(NumberOfBytes=32)["Plaintext"]
    assert len(first) == len(second) == 32
    assert first != second


def test_generate_data_key_pair(attested: AttestedKms, admin: Any) -> None:
    # moto lacks GenerateDataKeyPair; the front makes the pair and moto encrypts the private half.
    key = make_key(admin, policy("StringEquals", {"kms:RecipientAttestation:PCR0": PCR0}, ["kms:*"]))
    pair = attested.generate_data_key_pair(KeyId=key, KeyPairSpec="ECC_NIST_P256")
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], password=None)
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_der == pair["PublicKey"]
    assert pair["KeyPairSpec"] == "ECC_NIST_P256"
    # The blob is the private key under the KMS key, as AWS's is.
    assert (
        attested.decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"])["Plaintext"]
        == (pair["PrivateKeyPlaintext"])
    )


def test_derive_shared_secret_is_a_clear_error(attested: AttestedKms, front: AttestingKmsFront) -> None:
    # moto 5.2 has no key agreement keys; the front says so once instead of a retried HTML 500.
    with pytest.raises(ClientError) as exc:
        attested.derive_shared_secret(KeyId="alias/none", KeyAgreementAlgorithm="ECDH", PublicKey=b"\x04")
    assert error_code(exc) == "UnsupportedOperationException"
    assert "DeriveSharedSecret" in str(exc.value)
    assert list(front.requests) == ["DeriveSharedSecret"]


def test_answer_on_the_wire_has_no_plaintext(kms: Any, attested: AttestedKms, pinned_key: str) -> None:
    # Threat: the secret in clear on the wire (the parent instance sees all enclave traffic).
    bodies: list[bytes] = []
    kms.meta.events.register(
        "before-parse.kms.*", lambda response_dict, **_: bodies.append(response_dict["body"])
    )
    blob = kms.encrypt(KeyId=pinned_key, Plaintext=b"wire check")["CiphertextBlob"]
    attested.decrypt(CiphertextBlob=blob)
    attested.generate_data_key(KeyId=pinned_key, NumberOfBytes=16)
    attested.generate_random(NumberOfBytes=8)
    encrypt, *sealed = (json.loads(body) for body in bodies)
    assert "CiphertextBlob" in encrypt
    assert len(sealed) == 3
    for body in sealed:
        assert "CiphertextForRecipient" in body
        assert "Plaintext" not in body
        assert b"wire check" not in json.dumps(body).encode()


def test_requests_without_recipient_pass_through(kms: Any, pinned_key: str, front: AttestingKmsFront) -> None:
    data_key = kms.generate_data_key(KeyId=pinned_key, NumberOfBytes=16)
    assert len(data_key["Plaintext"]) == 16
    with pytest.raises(ClientError) as exc:
        kms.describe_key(KeyId="alias/does-not-exist")
    assert error_code(exc) == "NotFoundException"  # moto's own error, status and body as moto said
    assert list(front.requests) == ["GenerateDataKey", "DescribeKey"]


def test_unknown_key_is_kms_not_found(attested: AttestedKms) -> None:
    with pytest.raises(ClientError) as exc:
        attested.generate_data_key(KeyId="alias/does-not-exist", KeySpec="AES_256")
    assert error_code(exc) == "NotFoundException"


# --- key policy ---------------------------------------------------------------------------------


def test_policy_pinning_another_pcr0_denies(kms: Any, attested: AttestedKms, foreign_key: str) -> None:
    # Threat: an enclave image other than the one the key is pinned to getting the key's secrets.
    blob = kms.encrypt(KeyId=foreign_key, Plaintext=b"not for this image")["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        attested.decrypt(CiphertextBlob=blob)  # no KeyId: moto decrypts, the front still refuses
    assert error_code(exc) == "AccessDeniedException"
    assert "kms:Decrypt" in str(exc.value) and foreign_key in str(exc.value)
    assert "Plaintext" not in exc.value.response
    with pytest.raises(ClientError) as exc:
        attested.decrypt(CiphertextBlob=blob, KeyId=foreign_key)
    assert error_code(exc) == "AccessDeniedException"
    with pytest.raises(ClientError) as exc:
        attested.generate_data_key(KeyId=foreign_key, KeySpec="AES_256")
    assert error_code(exc) == "AccessDeniedException"
    assert "kms:GenerateDataKey" in str(exc.value)


@pytest.mark.parametrize(
    ("operator", "conditions", "allowed"),
    [
        ("StringEqualsIgnoreCase", {"kms:RecipientAttestation:ImageSha384": PCR0.upper()}, True),
        ("StringEquals", {"kms:RecipientAttestation:ImageSha384": PCR0}, True),
        # Threat: a policy author's case mistake silently widening access; StringEquals is exact.
        ("StringEquals", {"kms:RecipientAttestation:ImageSha384": PCR0.upper()}, False),
        (
            "StringEquals",
            {"kms:RecipientAttestation:PCR0": PCR0, "kms:RecipientAttestation:PCR1": PCRS[1].hex()},
            True,
        ),
        # Threat: the right image with another kernel or config (every pinned PCR must match).
        (
            "StringEquals",
            {"kms:RecipientAttestation:PCR0": PCR0, "kms:RecipientAttestation:PCR2": PCR0},
            False,
        ),
    ],
)
def test_policy_conditions(
    kms: Any, attested: AttestedKms, admin: Any, operator: str, conditions: dict[str, str], allowed: bool
) -> None:
    key = make_key(admin, policy(operator, conditions))
    blob = kms.encrypt(KeyId=key, Plaintext=b"pinned")["CiphertextBlob"]
    if allowed:
        assert attested.decrypt(CiphertextBlob=blob)["Plaintext"] == b"pinned"
    else:
        with pytest.raises(ClientError) as exc:
            attested.decrypt(CiphertextBlob=blob)
        assert error_code(exc) == "AccessDeniedException"


ANY_PCR0 = {"StringEquals": {"kms:RecipientAttestation:ImageSha384": "aa"}}
CONTEXT = {"kms:recipientattestation:imagesha384": "aa", "kms:recipientattestation:pcr0": "aa"}


@pytest.mark.parametrize(
    ("statements", "decision"),
    [
        ([{"Effect": "Allow", "Action": "kms:Generate*", "Condition": ANY_PCR0}], Decision.ALLOW),
        ([{"Effect": "Allow", "Action": ["kms:Encrypt", "KMS:*"], "Condition": ANY_PCR0}], Decision.ALLOW),
        ([{"Effect": "Allow", "Action": "kms:GenerateDataKey"}], Decision.ALLOW),  # no conditions: allows
        ([{"Effect": "Allow", "Action": "kms:Decrypt", "Condition": ANY_PCR0}], Decision.IMPLICIT_DENY),
        ([{"Effect": "Allow", "Action": "kms:Get*"}], Decision.IMPLICIT_DENY),
        # Threat: an explicit Deny overridden by a broader Allow.
        (
            [
                {"Effect": "Allow", "Action": "kms:*"},
                {"Effect": "Deny", "Action": "kms:GenerateDataKey", "Condition": ANY_PCR0},
            ],
            Decision.EXPLICIT_DENY,
        ),
        # Threat: conditions the front cannot evaluate read as "allowed" (it fails closed instead).
        (
            [{"Effect": "Allow", "Action": "kms:*", "Condition": {"StringLike": {"kms:X": "*"}}}],
            Decision.IMPLICIT_DENY,
        ),
        (
            [
                {
                    "Effect": "Allow",
                    "Action": "kms:*",
                    "Condition": {"StringEquals": {"kms:CallerAccount": "1"}},
                }
            ],
            Decision.IMPLICIT_DENY,
        ),
        ([{"Effect": "Allow", "NotAction": "kms:Decrypt"}], Decision.IMPLICIT_DENY),
        (
            [
                {"Effect": "Allow", "Action": "kms:*"},
                {
                    "Effect": "Deny",
                    "Action": "kms:*",
                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                },
            ],
            Decision.EXPLICIT_DENY,
        ),
        # A PCR the document does not report is not equal to anything.
        (
            [
                {
                    "Effect": "Allow",
                    "Action": "kms:*",
                    "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR20": "aa"}},
                }
            ],
            Decision.IMPLICIT_DENY,
        ),
    ],
)
def test_evaluate_policy(statements: list[dict[str, Any]], decision: Decision) -> None:
    assert evaluate_policy({"Statement": statements}, "kms:GenerateDataKey", CONTEXT) is decision


def test_evaluate_policy_refuses_malformed_policies() -> None:
    # Threat: a policy the front cannot read being treated as "no restrictions".
    for bad in (None, "text", {}, {"Statement": "x"}, {"Statement": [1, "x"]}):
        assert evaluate_policy(bad, "kms:Decrypt", CONTEXT) is Decision.IMPLICIT_DENY


# --- attestation documents ----------------------------------------------------------------------


def _forge_pcr0(document: bytes) -> bytes:
    """Rewrite a document's PCR0 to the pinned value, keeping the original signature."""
    protected, unprotected, payload, signature = cbor2.loads(document)
    fields = cbor2.loads(payload)
    fields["pcrs"][0] = PCRS[0]
    return cbor2.dumps([protected, unprotected, cbor2.dumps(fields), signature])


def test_document_from_another_root_is_refused(
    kms: Any, recipient: RecipientKey, pinned_key: str, tmp_path: Path
) -> None:
    # Threat: an attacker's own "NSM" (any PKI but the trusted root) claiming the pinned PCR0.
    rogue = NsmEmulator(DevPki.load_or_create(tmp_path / "rogue"), pcrs=PCRS, module_id="i-rogue-enc")
    with pytest.raises(ClientError) as exc:
        AttestedKms(kms, rogue.attestation, recipient).generate_data_key(KeyId=pinned_key, KeySpec="AES_256")
    assert error_code(exc) == "ValidationException"
    assert "Invalid attestation document: chain: cabundle[0] is not the trusted root" in str(exc.value)


def test_tampered_document_is_refused(
    kms: Any, pki: DevPki, recipient: RecipientKey, pinned_key: str
) -> None:
    # Threat: a genuine document for another image, edited to claim the pinned PCR0.
    other = NsmEmulator(pki, pcrs={0: bytes.fromhex(OTHER_PCR0)}, module_id="i-other-enc")
    blob = kms.encrypt(KeyId=pinned_key, Plaintext=b"x")["CiphertextBlob"]
    forged = AttestedKms(kms, lambda **kw: _forge_pcr0(other.attestation(**kw)), recipient)
    with pytest.raises(ClientError) as exc:
        forged.decrypt(CiphertextBlob=blob)
    assert error_code(exc) == "ValidationException"
    assert "signature" in str(exc.value)
    assert "Plaintext" not in exc.value.response


def test_expired_document_is_refused(kms: Any, pki: DevPki, recipient: RecipientKey, pinned_key: str) -> None:
    # Threat: a document captured hours ago replayed after its signing certificate expired.
    past = NsmEmulator(pki, pcrs=PCRS, module_id="i-past-enc", clock=lambda: time.time() - 4 * 3600)
    with pytest.raises(ClientError) as exc:
        AttestedKms(kms, past.attestation, recipient).generate_data_key(KeyId=pinned_key, KeySpec="AES_256")
    assert error_code(exc) == "ValidationException"
    assert "validity: certificate expired" in str(exc.value)


def test_front_clock_is_used_for_validity(
    start_front: Callable[..., AttestingKmsFront], nsm: NsmEmulator, recipient: RecipientKey, pinned_key: str
) -> None:
    # Threat: a stale document accepted because the verifier ignored time.
    late = start_front(clock=lambda: datetime.now(UTC) + timedelta(hours=4))
    with pytest.raises(ClientError) as exc:
        AttestedKms(client(late.url), nsm.attestation, recipient).generate_random(NumberOfBytes=8)
    assert error_code(exc) == "ValidationException"
    assert "expired" in str(exc.value)


def test_recipient_shape_is_checked(kms: Any, pki: DevPki, nsm: NsmEmulator, recipient: RecipientKey) -> None:
    document = nsm.attestation(public_key=recipient.spki_der)
    # Threat: a weaker key transport than the one KMS supports.
    with pytest.raises(ClientError) as exc:
        kms.generate_random(
            NumberOfBytes=8,
            Recipient={"AttestationDocument": document, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
        )
    assert error_code(exc) == "ValidationException"
    assert "keyEncryptionAlgorithm" in str(exc.value)
    # Threat: nothing to seal the answer to, so it would have to go out in clear.
    with pytest.raises(ClientError) as exc:
        kms.generate_random(
            NumberOfBytes=8,
            Recipient={
                "AttestationDocument": nsm.attestation(),
                "KeyEncryptionAlgorithm": RECIPIENT_ALGORITHM,
            },
        )
    assert error_code(exc) == "ValidationException"
    assert "no public_key" in str(exc.value)


# --- AttestedKms fails closed -------------------------------------------------------------------


def test_plaintext_without_ciphertext_for_recipient_is_refused(
    admin: Any, nsm: NsmEmulator, recipient: RecipientKey, pinned_key: str
) -> None:
    # Threat: a KMS (here bare moto) that ignores Recipient, so no measurement was ever checked.
    direct = AttestedKms(admin, nsm.attestation, recipient)
    blob = admin.encrypt(KeyId=pinned_key, Plaintext=b"unchecked")["CiphertextBlob"]
    with pytest.raises(AttestedKmsError, match=r"without CiphertextForRecipient \(a plaintext field"):
        direct.decrypt(CiphertextBlob=blob)
    with pytest.raises(AttestedKmsError, match="GenerateRandom without CiphertextForRecipient"):
        direct.generate_random(NumberOfBytes=8)


def test_answer_sealed_to_another_key_is_refused(kms: Any, nsm: NsmEmulator, recipient: RecipientKey) -> None:
    # Threat: a document carrying someone else's public key; the answer is not ours to read.
    other = RecipientKey.generate()
    swapped = AttestedKms(kms, lambda **kw: nsm.attestation(public_key=other.spki_der), recipient)
    with pytest.raises(AttestedKmsError, match="does not decrypt: recipient id does not match"):
        swapped.generate_random(NumberOfBytes=8)


def test_attestation_failure_and_misuse(kms: Any, recipient: RecipientKey, attested: AttestedKms) -> None:
    def broken(**_: Any) -> bytes:
        raise OSError("/dev/nsm: no such device")

    with pytest.raises(AttestedKmsError, match="cannot get an attestation document: /dev/nsm"):
        AttestedKms(kms, broken, recipient).generate_random(NumberOfBytes=8)
    # Threat: a caller redirecting the sealed answer to a key of its choosing.
    with pytest.raises(ValueError, match="Recipient is set by AttestedKms"):
        attested.generate_random(NumberOfBytes=8, Recipient={})
    assert set(ATTESTED_OPERATIONS) == {
        "Decrypt",
        "GenerateDataKey",
        "GenerateDataKeyPair",
        "GenerateRandom",
        "DeriveSharedSecret",
    }


def test_other_operations_pass_through(
    attested: AttestedKms, pinned_key: str, front: AttestingKmsFront
) -> None:
    described = attested.call("DescribeKey", {"KeyId": pinned_key})
    assert described["KeyMetadata"]["KeyId"] == pinned_key
    blob = attested.call("Encrypt", {"KeyId": pinned_key, "Plaintext": b"p"})["CiphertextBlob"]
    assert attested.decrypt(CiphertextBlob=blob)["Plaintext"] == b"p"
    assert list(front.requests) == ["DescribeKey", "Encrypt", "Decrypt"]


# --- throttling and retries ---------------------------------------------------------------------


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore's standard mode sleeps rand(0, 1) * 2**attempt s; the retries are the point, not the waits.
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def test_throttling_is_retried(
    front: AttestingKmsFront, nsm: NsmEmulator, recipient: RecipientKey, pinned_key: str, no_backoff: None
) -> None:
    retrying = AttestedKms(
        client(front.url, Config(retries={"mode": "standard", "max_attempts": 5})), nsm.attestation, recipient
    )
    front.fail_next = [(400, "ThrottlingException"), (500, "KMSInternalException")]
    answer = retrying.generate_data_key(KeyId=pinned_key, KeySpec="AES_256")
    assert len(answer["Plaintext"]) == 32
    assert answer["ResponseMetadata"]["RetryAttempts"] == 2
    assert list(front.requests) == ["GenerateDataKey"] * 3


@pytest.mark.parametrize(
    "failure", [(400, "ThrottlingException"), (429, "ThrottlingException"), (503, "KMSInternalException")]
)
def test_retries_run_out_with_a_clear_error(
    front: AttestingKmsFront,
    nsm: NsmEmulator,
    recipient: RecipientKey,
    pinned_key: str,
    no_backoff: None,
    failure: tuple[int, str],
) -> None:
    retrying = AttestedKms(
        client(front.url, Config(retries={"mode": "standard", "total_max_attempts": 3})),
        nsm.attestation,
        recipient,
    )
    front.fail_next = [failure] * 4
    with pytest.raises(ClientError) as exc:
        retrying.generate_data_key(KeyId=pinned_key, KeySpec="AES_256")
    assert error_code(exc) == failure[1]
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == failure[0]
    assert exc.value.response["ResponseMetadata"]["MaxAttemptsReached"] is True
    assert f"({failure[1]}) when calling the GenerateDataKey operation (reached max retries: 2)" in str(
        exc.value
    )
    assert list(front.requests) == ["GenerateDataKey"] * 3
    assert front.fail_next == [failure]


def test_the_document_binds_the_recipient_key_in_user_data(
    kms: Any, nsm: NsmEmulator, recipient: RecipientKey
) -> None:
    """Found by review: user_data was empty, so a verifier checking the binding the sidecar's own
    attestation endpoint promises (user_data = SHA-256 of public_key) refused these documents."""
    from sidecar.attestation.document import parse_document

    seen: list[bytes] = []

    def attest(**fields: Any) -> bytes:
        document: bytes = nsm.attestation(**fields)
        seen.append(document)
        return document

    AttestedKms(kms, attest, recipient).generate_random(NumberOfBytes=16)
    (document,) = seen
    parsed = parse_document(document)
    assert parsed.public_key == recipient.spki_der
    assert parsed.user_data == hashlib.sha256(recipient.spki_der).digest() == recipient.spki_sha256
