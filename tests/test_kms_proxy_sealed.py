"""The KMS proxy's own attested path: an ``AttestedKms`` behind it, the request kept as KMS JSON.

``tests/test_kms_proxy.py`` drives the proxy with a stand-in that only has ``call`` (boto3
parameters). The sidecar runs a real :class:`~sidecar.aws.kms.AttestedKms`, whose ``recipient`` and
``unseal`` steps the proxy drives itself: it adds ``Recipient`` to the app's JSON, signs and sends it,
and unseals ``CiphertextForRecipient``. These tests run that path against real parts: moto's server,
the dev world's attesting KMS front (which verifies the emulated documents and the key policy), and
a stub KMS for answers no honest KMS gives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
import botocore.session
import pytest
from aiohttp import web
from botocore.config import Config
from botocore.credentials import CredentialResolver
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization

from sidecar.attestation.document import parse_document
from sidecar.attestation.emulator import DevPki, NsmEmulator
from sidecar.attestation.policy import key_policy
from sidecar.aws.clients import ClientFactory
from sidecar.aws.cms import encrypt_for_recipient
from sidecar.aws.kms import RECIPIENT_ALGORITHM, AttestedKms
from sidecar.aws.kms_proxy import start_kms_proxy
from sidecar.devworld.kms_front import AttestingKmsFront
from sidecar.recipient import RecipientKey
from tests.test_kms_proxy import LoopThread

T = TypeVar("T")
REGION = "us-east-1"
SIDECAR_KEY = "AKIASIDECARSEALED"
PCR0 = hashlib.sha384(b"the sidecar's image").digest()
OTHER_PCR0 = hashlib.sha384(b"another image").digest()
SECRET = b"the no-fly list's data key 32 b!"


class CountingKms(AttestedKms):
    """A real AttestedKms that counts which of its steps the proxy used."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.counts = {"call": 0, "recipient": 0, "unseal": 0}

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        self.counts["call"] += 1
        return super().call(operation, params)

    def recipient(self) -> dict[str, Any]:
        self.counts["recipient"] += 1
        return super().recipient()

    def unseal(self, operation: str, response: dict[str, Any]) -> dict[str, Any]:
        self.counts["unseal"] += 1
        return super().unseal(operation, response)


class StubKms:
    """A KMS endpoint that records what it gets and answers what the test sets."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []
        # (status, body); a callable gets the request's JSON and returns the body.
        self.answer: tuple[int, bytes | Callable[[dict[str, Any]], bytes]] = (200, b"{}")

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.seen.append((dict(request.headers), body))
        status, answer = self.answer
        data = answer(body) if callable(answer) else answer
        return web.Response(status=status, body=data, content_type="application/x-amz-json-1.1")


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def sidecar_session(credentials: bool = True) -> botocore.session.Session:
    session = botocore.session.Session()
    if credentials:
        session.set_credentials(SIDECAR_KEY, "sidecar-secret")
    else:
        session.register_component("credential_provider", CredentialResolver([]))
    return session


def kms_client(url: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def app_kms(url: str) -> Any:
    """The application: unmodified boto3 with a dummy key, no retries (so every answer shows)."""
    return boto3.client(
        "kms",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="app",
        aws_secret_access_key="app",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    response: Any = excinfo.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki.load_or_create(tmp_path_factory.mktemp("sealed-pki"))


@pytest.fixture(scope="module")
def nsm(pki: DevPki) -> NsmEmulator:
    return NsmEmulator(pki, pcrs={0: PCR0})


@pytest.fixture(scope="module")
def recipient() -> RecipientKey:
    return RecipientKey.generate()


@pytest.fixture(scope="module")
def front(loop_thread: LoopThread, moto_url: str, pki: DevPki) -> Iterator[AttestingKmsFront]:
    front = AttestingKmsFront(moto_url, pki.root)
    loop_thread.run(front.start())
    try:
        yield front
    finally:
        loop_thread.run(front.stop())


@pytest.fixture(autouse=True)
def reset_front(front: AttestingKmsFront) -> None:
    front.fail_next.clear()
    front.requests.clear()


@pytest.fixture(scope="module")
def stub(loop_thread: LoopThread) -> Iterator[tuple[StubKms, str]]:
    stub = StubKms()
    app = web.Application()
    app.router.add_post("/", stub.handle)
    runner, url = loop_thread.run(serve(app))
    try:
        yield stub, url
    finally:
        loop_thread.run(runner.cleanup())


@pytest.fixture(scope="module")
def start_proxy(loop_thread: LoopThread) -> Iterator[Callable[..., str]]:
    runners: list[web.AppRunner] = []

    def start(kms: Any, factory: ClientFactory) -> str:
        runner, url = loop_thread.run(start_kms_proxy(kms, factory, 0))
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        loop_thread.run(runner.cleanup())


def sealed_proxy(
    start_proxy: Callable[..., str], upstream: str, attest: Callable[..., bytes], recipient: RecipientKey
) -> tuple[str, CountingKms]:
    """A proxy whose AttestedKms sends to ``upstream``, as the sidecar's aws plugin wires it."""
    factory = ClientFactory(sidecar_session(), REGION, endpoints={"kms": upstream})
    kms = CountingKms(factory.client("kms"), attest, recipient)
    return start_proxy(kms, factory), kms


@pytest.fixture(scope="module")
def proxy(
    start_proxy: Callable[..., str], front: AttestingKmsFront, nsm: NsmEmulator, recipient: RecipientKey
) -> tuple[str, CountingKms]:
    return sealed_proxy(start_proxy, front.url, nsm.attestation, recipient)


@pytest.fixture(scope="module")
def admin(moto_url: str) -> Any:
    return kms_client(moto_url)


@pytest.fixture(scope="module")
def pinned_key(admin: Any) -> str:
    policy = key_policy(PCR0.hex())
    for statement in policy["Statement"]:  # the attested statement, widened to key pairs
        if "kms:Decrypt" in statement["Action"]:
            statement["Action"] = [*statement["Action"], "kms:GenerateDataKeyPair"]
    key: str = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
    return key


@pytest.fixture(scope="module")
def foreign_key(admin: Any) -> str:
    key: str = admin.create_key(Policy=json.dumps(key_policy(OTHER_PCR0.hex())))["KeyMetadata"]["KeyId"]
    return key


# ---------------------------------------------------------------------- through the attesting front


def test_decrypt_is_attested_by_the_proxy_itself(
    proxy: tuple[str, CountingKms], admin: Any, pinned_key: str, front: AttestingKmsFront
) -> None:
    url, kms = proxy
    before = dict(kms.counts)
    context = {"purpose": "sealed-path"}
    blob = admin.encrypt(KeyId=pinned_key, Plaintext=SECRET, EncryptionContext=context)["CiphertextBlob"]
    answer = app_kms(url).decrypt(CiphertextBlob=blob, EncryptionContext=context)
    assert answer["Plaintext"] == SECRET
    assert answer["KeyId"].endswith(pinned_key)
    assert "CiphertextForRecipient" not in answer
    # The front released the key only because the document verified and matched the policy; the
    # proxy drove AttestedKms's steps itself, not its boto3 call.
    assert list(front.requests) == ["Decrypt"]
    assert kms.counts["recipient"] - before["recipient"] == 1
    assert kms.counts["unseal"] - before["unseal"] == 1
    assert kms.counts["call"] == before["call"]


def test_generate_data_key_random_and_key_pair(proxy: tuple[str, CountingKms], pinned_key: str) -> None:
    app = app_kms(proxy[0])
    data_key = app.generate_data_key(KeyId=pinned_key, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    assert app.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    first, second = (app.generate_random(NumberOfBytes=48)["Plaintext"] for _ in range(2))
    assert len(first) == 48 and first != second
    pair = app.generate_data_key_pair(KeyId=pinned_key, KeyPairSpec="ECC_NIST_P256")
    private = serialization.load_der_private_key(pair["PrivateKeyPlaintext"], password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public == pair["PublicKey"]
    assert "CiphertextForRecipient" not in pair


def test_key_pinned_to_another_image_is_denied_as_kms_denies_it(
    proxy: tuple[str, CountingKms], admin: Any, foreign_key: str
) -> None:
    # Threat: this enclave's image asking for a key pinned to another image.
    blob = admin.encrypt(KeyId=foreign_key, Plaintext=SECRET)["CiphertextBlob"]
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy[0]).decrypt(CiphertextBlob=blob)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("AccessDeniedException", 400)
    assert "is not authorized to perform: kms:Decrypt" in message


def test_kms_errors_pass_through_without_retries(
    proxy: tuple[str, CountingKms], front: AttestingKmsFront
) -> None:
    # The app's SDK does the retrying, as it does for KMS itself; the proxy must not multiply it.
    front.fail_next = [(400, "ThrottlingException")]
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy[0]).generate_random(NumberOfBytes=8)
    assert error_of(excinfo)[:2] == ("ThrottlingException", 400)
    assert list(front.requests) == ["GenerateRandom"]
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy[0]).derive_shared_secret(
            KeyId="alias/any", KeyAgreementAlgorithm="ECDH", PublicKey=b"\x04" + bytes(64)
        )
    assert error_of(excinfo)[:2] == ("UnsupportedOperationException", 400)


def test_answer_without_ciphertext_for_recipient_is_refused(
    start_proxy: Callable[..., str], moto_url: str, nsm: NsmEmulator, recipient: RecipientKey, admin: Any
) -> None:
    # Threat: a KMS (here bare moto) that ignored Recipient: it checked no measurement, so its
    # plaintext must not reach the app even though it is right there in the answer.
    url, _ = sealed_proxy(start_proxy, moto_url, nsm.attestation, recipient)
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=SECRET)["CiphertextBlob"]
    with pytest.raises(ClientError) as excinfo:
        app_kms(url).decrypt(CiphertextBlob=blob)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 500)
    assert "without CiphertextForRecipient (a plaintext field)" in message
    body = json.dumps(excinfo.value.response, default=str)
    assert base64.b64encode(SECRET).decode() not in body and SECRET.decode() not in body


def test_answer_sealed_for_another_key_is_refused(
    start_proxy: Callable[..., str], front: AttestingKmsFront, nsm: NsmEmulator, recipient: RecipientKey
) -> None:
    # Threat: a document naming a key that is not ours; the answer is sealed for that key instead.
    other = RecipientKey.generate()
    url, _ = sealed_proxy(
        start_proxy, front.url, lambda **_: nsm.attestation(public_key=other.spki_der), recipient
    )
    with pytest.raises(ClientError) as excinfo:
        app_kms(url).generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 500)
    assert "does not decrypt: recipient id does not match this key" in message


def test_no_attestation_document_means_no_request(
    start_proxy: Callable[..., str], stub: tuple[StubKms, str], recipient: RecipientKey
) -> None:
    stub_kms, stub_url = stub
    stub_kms.seen.clear()

    def broken(**_: Any) -> bytes:
        raise OSError("/dev/nsm: no such device")

    url, _ = sealed_proxy(start_proxy, stub_url, broken, recipient)
    with pytest.raises(ClientError) as excinfo:
        app_kms(url).generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 500)
    assert "cannot get an attestation document: /dev/nsm: no such device" in message
    assert stub_kms.seen == []


# ---------------------------------------------------------------------- against a stub KMS


@pytest.fixture(scope="module")
def stub_proxy(
    start_proxy: Callable[..., str], stub: tuple[StubKms, str], nsm: NsmEmulator, recipient: RecipientKey
) -> str:
    return sealed_proxy(start_proxy, stub[1], nsm.attestation, recipient)[0]


def sealed_answer(body: dict[str, Any]) -> bytes:
    """What KMS answers: the plaintext sealed for the document's public key."""
    document = parse_document(base64.b64decode(body["Recipient"]["AttestationDocument"]))
    assert document.public_key is not None
    sealed = encrypt_for_recipient(SECRET, document.public_key)
    return json.dumps(
        {
            "KeyId": "arn:aws:kms:us-east-1:111122223333:key/stub",
            "CiphertextForRecipient": base64.b64encode(sealed).decode(),
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "Plaintext": None,
        }
    ).encode()


def test_what_reaches_kms(stub: tuple[StubKms, str], stub_proxy: str, recipient: RecipientKey) -> None:
    stub_kms, _ = stub
    stub_kms.seen.clear()
    stub_kms.answer = (200, sealed_answer)
    app = app_kms(stub_proxy)
    answer = app.decrypt(CiphertextBlob=b"blob", EncryptionContext={"a": "b"}, GrantTokens=["t"])
    assert answer["Plaintext"] == SECRET
    [(headers, body)] = stub_kms.seen
    # The app's parameters as it sent them, plus our Recipient: a document for our key.
    recipient_field = body.pop("Recipient")
    assert body == {
        "CiphertextBlob": base64.b64encode(b"blob").decode(),
        "EncryptionContext": {"a": "b"},
        "GrantTokens": ["t"],
    }
    assert recipient_field["KeyEncryptionAlgorithm"] == RECIPIENT_ALGORITHM
    document = parse_document(base64.b64decode(recipient_field["AttestationDocument"]))
    assert document.public_key == recipient.spki_der
    assert document.pcrs[0] == PCR0
    # Signed with the sidecar's credentials, for KMS in the sidecar's region; the app's agent kept.
    assert headers["X-Amz-Target"] == "TrentService.Decrypt"
    assert f"Credential={SIDECAR_KEY}/" in headers["Authorization"]
    assert f"/{REGION}/kms/aws4_request" in headers["Authorization"]
    assert "Boto3/" in headers["User-Agent"] and "enclave-sidecar/" in headers["User-Agent"]


def test_each_call_gets_a_fresh_document(stub: tuple[StubKms, str], stub_proxy: str) -> None:
    stub_kms, _ = stub
    stub_kms.seen.clear()
    stub_kms.answer = (200, sealed_answer)
    app = app_kms(stub_proxy)
    for _ in range(2):
        app.decrypt(CiphertextBlob=b"blob")
    documents = [body["Recipient"]["AttestationDocument"] for _, body in stub_kms.seen]
    assert len(documents) == 2 and documents[0] != documents[1]


def test_json_null_members_are_left_out(stub: tuple[StubKms, str], stub_proxy: str) -> None:
    stub_kms, _ = stub
    stub_kms.seen.clear()
    stub_kms.answer = (200, sealed_answer)

    def with_nulls(request: Any, **_: Any) -> None:
        body = json.loads(request.body)
        body.update({"KeyId": None, "DryRun": None})
        request.body = json.dumps(body).encode()
        del request.headers["Content-Length"]
        request.headers["Content-Length"] = str(len(request.body))

    app = app_kms(stub_proxy)
    app.meta.events.register("before-send.kms", with_nulls)
    assert app.decrypt(CiphertextBlob=b"blob")["Plaintext"] == SECRET
    [(_, body)] = stub_kms.seen
    assert set(body) == {"CiphertextBlob", "Recipient"}


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (b"not json at all", "KMS's answer is not a JSON object"),
        (b"[1, 2]", "KMS's answer is not a JSON object"),
        (b'{"CiphertextForRecipient": 5}', "CiphertextForRecipient is not a base64 string"),
        (b'{"CiphertextForRecipient": "***"}', "CiphertextForRecipient is not valid base64"),
        (b'{"CiphertextForRecipient": ""}', "without CiphertextForRecipient (no plaintext either)"),
        (b'{"CiphertextForRecipient": "Z2FyYmFnZQ=="}', "CiphertextForRecipient does not decrypt: not BER"),
        (
            json.dumps({"Plaintext": base64.b64encode(SECRET).decode()}).encode(),
            "without CiphertextForRecipient (a plaintext field)",
        ),
    ],
)
def test_answers_no_honest_kms_gives_are_500s(
    stub: tuple[StubKms, str], stub_proxy: str, answer: bytes, fragment: str
) -> None:
    # Threat: whatever answers in KMS's place (a broken or hostile endpoint) gets no plaintext out
    # and no crash: a KMS-shaped 500 that says what was wrong.
    stub[0].answer = (200, answer)
    with pytest.raises(ClientError) as excinfo:
        app_kms(stub_proxy).decrypt(CiphertextBlob=b"blob")
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 500)
    assert message.startswith("attestation-protected call failed: ")
    assert fragment in message
    assert base64.b64encode(SECRET).decode() not in json.dumps(excinfo.value.response, default=str)


def test_kms_error_body_is_passed_as_kms_sent_it(stub: tuple[StubKms, str], stub_proxy: str) -> None:
    error = {"__type": "KMSInvalidStateException", "message": "arn:... is pending deletion."}
    stub[0].answer = (400, json.dumps(error).encode())
    with pytest.raises(ClientError) as excinfo:
        app_kms(stub_proxy).decrypt(CiphertextBlob=b"blob")
    assert error_of(excinfo) == ("KMSInvalidStateException", 400, "arn:... is pending deletion.")


def test_model_checks_come_before_kms(stub: tuple[StubKms, str], stub_proxy: str) -> None:
    stub_kms, _ = stub
    stub_kms.seen.clear()

    def surprise(request: Any, **_: Any) -> None:
        body = json.loads(request.body)
        body["Surprise"] = True
        request.body = json.dumps(body).encode()
        del request.headers["Content-Length"]
        request.headers["Content-Length"] = str(len(request.body))

    app = app_kms(stub_proxy)
    app.meta.events.register("before-send.kms", surprise)
    with pytest.raises(ClientError) as excinfo:
        app.decrypt(CiphertextBlob=b"blob")
    assert error_of(excinfo)[:2] == ("ValidationException", 400)
    assert stub_kms.seen == []


def test_no_sidecar_credentials_is_a_503(
    start_proxy: Callable[..., str], stub: tuple[StubKms, str], nsm: NsmEmulator, recipient: RecipientKey
) -> None:
    stub_kms, stub_url = stub
    stub_kms.seen.clear()
    factory = ClientFactory(sidecar_session(credentials=False), REGION, endpoints={"kms": stub_url})
    url = start_proxy(AttestedKms(factory.client("kms"), nsm.attestation, recipient), factory)
    with pytest.raises(ClientError) as excinfo:
        app_kms(url).generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 503)
    assert "NoCredentialsError" in message
    assert stub_kms.seen == []


def test_one_event_per_call_without_secrets(
    stub: tuple[StubKms, str], stub_proxy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.aws.kms_proxy")
    stub[0].answer = (200, sealed_answer)
    app_kms(stub_proxy).decrypt(CiphertextBlob=b"blob")
    [record] = [r for r in caplog.records if r.getMessage() == "kms_proxy_call"]
    fields = record.sidecar_fields  # type: ignore[attr-defined]
    assert (fields["operation"], fields["status"], fields["attested"]) == ("Decrypt", 200, True)
    assert SECRET.decode() not in caplog.text
    assert base64.b64encode(SECRET).decode() not in caplog.text
    assert "sidecar-secret" not in caplog.text
