"""The KMS proxy with real parts: moto's server as KMS, the proxy served by aiohttp on loopback, and an
unmodified boto3 KMS client as the app.

The attested path uses a stand-in for :class:`sidecar.aws.kms.AttestedKms` that calls a plain moto
client (moto ignores ``Recipient``), so the JSON to boto3 to JSON conversion runs for real. Forwarded
requests reach moto through a recording forward proxy (the egress proxy's seat), which shows that they
were re-signed with the sidecar's key and left through the factory's proxy.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import http.client
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import boto3
import botocore.session
import pytest
from aiohttp import web
from botocore import UNSIGNED, xform_name
from botocore.config import Config
from botocore.credentials import CredentialResolver
from botocore.exceptions import ClientError

from sidecar.aws.clients import ClientFactory
from sidecar.aws.imds import ImdsError
from sidecar.aws.kms import AttestedKmsError
from sidecar.aws.kms_proxy import (
    AMZ_JSON,
    MAX_BODY_BYTES,
    attested_region,
    child_environment,
    create_kms_proxy_app,
    from_json,
    kms_endpoint,
    start_kms_proxy,
    to_json,
)
from sidecar.testing import free_port

T = TypeVar("T")
REGION = "eu-west-1"
SIDECAR_KEY = "AKIASIDECAR0000TEST"


# ---------------------------------------------------------------------- the parts


class LoopThread:
    """An event loop in a background thread: the servers run there, the tests call boto3 here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Recorder:
    """A forward HTTP proxy in front of moto that records who signed each request, then relays it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[dict[str, str]] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        self.seen.append(
            {
                "url": str(request.url),
                "target": request.headers.get("X-Amz-Target", ""),
                "credential": authorization.split("Credential=")[1].split(",")[0] if authorization else "",
                "token": request.headers.get("X-Amz-Security-Token", ""),
                "user_agent": request.headers.get("User-Agent", ""),
            }
        )
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "host")}
        async with self.session.post(
            self.upstream + request.path, data=await request.read(), headers=headers
        ) as answer:
            body = await answer.read()
            return web.Response(
                status=answer.status, body=body, headers={"Content-Type": answer.headers["Content-Type"]}
            )

    async def start(self) -> tuple[web.AppRunner, str]:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return await serve(app)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def serve(app: web.Application, shutdown_timeout: float = 1) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


class FakeAttestedKms:
    """Same interface as AttestedKms; a plain moto client answers (moto ignores Recipient anyway).

    moto has no GenerateDataKeyPair or DeriveSharedSecret, so those two are answered here, with a
    ``CiphertextForRecipient`` the proxy must not pass on.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: Exception | None = None

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((operation, params))
        if self.fail is not None:
            raise self.fail
        if operation == "GenerateDataKeyPair":
            return {
                "KeyId": params["KeyId"],
                "KeyPairSpec": params["KeyPairSpec"],
                "PrivateKeyPlaintext": b"private-der" + bytes(range(5)),
                "PrivateKeyCiphertextBlob": b"sealed-private",
                "PublicKey": b"public-der",
                "CiphertextForRecipient": b"cms-for-the-sidecar",
                "ResponseMetadata": {"RequestId": "pair-request", "HTTPStatusCode": 200},
            }
        if operation == "DeriveSharedSecret":
            return {
                "KeyId": params["KeyId"],
                "SharedSecret": hashlib.sha256(params["PublicKey"]).digest(),
                "KeyAgreementAlgorithm": params["KeyAgreementAlgorithm"],
                "KeyOrigin": "AWS_KMS",
            }
        response: dict[str, Any] = getattr(self.client, xform_name(operation))(**params)
        return response


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="module")
def recorder(loop_thread: LoopThread, moto_url: str) -> Iterator[tuple[Recorder, str]]:
    rec = Recorder(moto_url)
    runner, url = loop_thread.run(rec.start())
    try:
        yield rec, url
    finally:
        loop_thread.run(runner.cleanup())
        loop_thread.run(rec.close())


def sidecar_session() -> botocore.session.Session:
    session = botocore.session.Session()
    session.set_credentials(SIDECAR_KEY, "sidecar-secret", "sidecar-session-token")
    return session


@pytest.fixture(scope="module")
def attested(moto_url: str) -> FakeAttestedKms:
    client = boto3.client(
        "kms",
        endpoint_url=moto_url,
        region_name=REGION,
        aws_access_key_id=SIDECAR_KEY,
        aws_secret_access_key="sidecar-secret",
    )
    return FakeAttestedKms(client)


@pytest.fixture(autouse=True)
def reset_double(attested: FakeAttestedKms) -> None:
    attested.fail = None
    attested.calls.clear()


ProxyStarter = Callable[..., str]


@pytest.fixture(scope="module")
def start_proxy(loop_thread: LoopThread) -> Iterator[ProxyStarter]:
    """Start a proxy for a given double and factory; all are stopped at the end of the module."""
    runners: list[web.AppRunner] = []

    def start(kms: Any, factory: ClientFactory) -> str:
        runner, url = loop_thread.run(start_kms_proxy(kms, factory, 0))
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        loop_thread.run(runner.cleanup())


@pytest.fixture(scope="module")
def proxy_url(
    start_proxy: ProxyStarter, attested: FakeAttestedKms, recorder: tuple[Recorder, str], moto_url: str
) -> str:
    # As in the dev world: KMS's endpoint overridden to moto, and the egress proxy in the way.
    factory = ClientFactory(sidecar_session(), REGION, proxy=recorder[1], endpoints={"kms": moto_url})
    return start_proxy(attested, factory)


def app_kms(url: str, region: str = REGION, **config: Any) -> Any:
    """The application's client: plain boto3, a dummy key, only the endpoint pointed at the proxy."""
    return boto3.client(
        "kms",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id="app",
        aws_secret_access_key="app",
        config=Config(**config) if config else None,
    )


def one_attempt(url: str) -> Any:
    """An app client that does not retry (5xx answers would otherwise be tried again)."""
    return app_kms(url, retries={"total_max_attempts": 1})


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    response: Any = excinfo.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


def mangle(client: Any, change: Callable[[Any], None]) -> Any:
    """Let boto3 build and sign the request as usual, then break it just before it is sent."""

    def hook(request: Any, **_: Any) -> None:
        change(request)
        body = request.body or b""
        if "Content-Length" in request.headers:
            del request.headers["Content-Length"]
        request.headers["Content-Length"] = str(len(body))

    client.meta.events.register("before-send.kms", hook)
    return client


def get_header(request: Any, name: str) -> str:
    value = request.headers[name]  # botocore keeps signed headers as bytes
    return value.decode() if isinstance(value, bytes) else str(value)


def set_header(request: Any, name: str, value: str | None) -> None:
    if name in request.headers:
        del request.headers[name]
    if value is not None:
        request.headers[name] = value


@pytest.fixture(scope="module")
def key_id(proxy_url: str) -> str:
    key: str = app_kms(proxy_url).create_key(Description="proxy tests")["KeyMetadata"]["KeyId"]
    return key


# ---------------------------------------------------------------------- the happy paths


def test_encrypt_is_forwarded_and_resigned_then_decrypt_is_attested(
    proxy_url: str, key_id: str, attested: FakeAttestedKms, recorder: tuple[Recorder, str], moto_url: str
) -> None:
    rec, _ = recorder
    rec.seen.clear()
    kms = app_kms(proxy_url)
    context = {"purpose": "proxy-test"}
    encrypted = kms.encrypt(KeyId=key_id, Plaintext=b"the no-fly list key", EncryptionContext=context)

    # Encrypt went out through the egress proxy to moto, signed with the sidecar's key, not "app".
    [seen] = rec.seen
    assert seen["target"] == "TrentService.Encrypt"
    assert seen["url"].startswith(moto_url)  # absolute form: it came through the proxy
    assert seen["credential"].startswith(f"{SIDECAR_KEY}/")
    assert seen["credential"].endswith(f"/{REGION}/kms/aws4_request")
    assert seen["token"] == "sidecar-session-token"
    assert "enclave-sidecar/" in seen["user_agent"] and "Boto3/" in seen["user_agent"]
    assert attested.calls == []

    decrypted = kms.decrypt(CiphertextBlob=encrypted["CiphertextBlob"], EncryptionContext=context)
    assert decrypted["Plaintext"] == b"the no-fly list key"
    assert decrypted["KeyId"].endswith(key_id)
    assert "CiphertextForRecipient" not in decrypted
    # The attested client got boto3-shaped parameters: the base64 blob is bytes again.
    [(operation, params)] = attested.calls
    assert operation == "Decrypt"
    assert params == {"CiphertextBlob": encrypted["CiphertextBlob"], "EncryptionContext": context}
    assert len(rec.seen) == 1  # Decrypt did not go through the forwarding path


def test_generate_data_key(proxy_url: str, key_id: str) -> None:
    kms = app_kms(proxy_url)
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert isinstance(data_key["Plaintext"], bytes) and len(data_key["Plaintext"]) == 32
    again = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])
    assert again["Plaintext"] == data_key["Plaintext"]


def test_generate_random(proxy_url: str, attested: FakeAttestedKms) -> None:
    kms = app_kms(proxy_url)
    first = kms.generate_random(NumberOfBytes=48)["Plaintext"]
    second = kms.generate_random(NumberOfBytes=48)["Plaintext"]
    assert len(first) == 48 and first != second
    assert attested.calls[0] == ("GenerateRandom", {"NumberOfBytes": 48})


def test_generate_data_key_pair_and_derive_shared_secret(
    proxy_url: str, key_id: str, attested: FakeAttestedKms
) -> None:
    kms = app_kms(proxy_url)
    pair = kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_P256")
    assert pair["PrivateKeyPlaintext"] == b"private-der" + bytes(range(5))
    assert pair["PrivateKeyCiphertextBlob"] == b"sealed-private"
    assert pair["PublicKey"] == b"public-der"
    assert "CiphertextForRecipient" not in pair  # the app asked for a plain answer
    assert pair["ResponseMetadata"]["RequestId"] == "pair-request"  # KMS's request id is kept

    peer = os.urandom(91)
    shared = kms.derive_shared_secret(KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=peer)
    assert shared["SharedSecret"] == hashlib.sha256(peer).digest()
    assert attested.calls[-1][1]["PublicKey"] == peer


def test_admin_operations_are_forwarded(proxy_url: str, attested: FakeAttestedKms) -> None:
    kms = app_kms(proxy_url)
    created = kms.create_key(Description="forwarded", Tags=[{"TagKey": "team", "TagValue": "ops"}])
    metadata = created["KeyMetadata"]
    assert metadata["Arn"].startswith(f"arn:aws:kms:{REGION}:")
    assert isinstance(metadata["CreationDate"], datetime.datetime)
    described = kms.describe_key(KeyId=metadata["KeyId"])["KeyMetadata"]
    assert described["Description"] == "forwarded"
    assert metadata["KeyId"] in [k["KeyId"] for k in kms.list_keys()["Keys"]]
    kms.create_alias(AliasName="alias/proxy-forwarded", TargetKeyId=metadata["KeyId"])
    assert kms.describe_key(KeyId="alias/proxy-forwarded")["KeyMetadata"]["KeyId"] == metadata["KeyId"]
    assert attested.calls == []


def test_region_comes_from_the_credential_scope(proxy_url: str, recorder: tuple[Recorder, str]) -> None:
    rec, _ = recorder
    rec.seen.clear()
    # The sidecar's own region is eu-west-1; the app's client asks for ap-southeast-2.
    created = app_kms(proxy_url, region="ap-southeast-2").create_key()["KeyMetadata"]
    assert created["Arn"].startswith("arn:aws:kms:ap-southeast-2:")
    assert rec.seen[-1]["credential"].endswith("/ap-southeast-2/kms/aws4_request")


def test_attested_operation_in_another_region_is_refused(proxy_url: str, attested: FakeAttestedKms) -> None:
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy_url, region="us-east-1").generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("ValidationException", 400)
    assert "eu-west-1" in message and "us-east-1" in message
    assert attested.calls == []


def test_request_with_its_own_recipient_is_forwarded(
    proxy_url: str, attested: FakeAttestedKms, recorder: tuple[Recorder, str]
) -> None:
    rec, _ = recorder
    rec.seen.clear()
    # An app that attests by itself gets KMS's answer as it is (moto ignores Recipient).
    answer = app_kms(proxy_url).generate_random(
        NumberOfBytes=16,
        Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b"doc"},
    )
    assert len(answer["Plaintext"]) == 16
    assert attested.calls == []
    assert rec.seen[-1]["target"] == "TrentService.GenerateRandom"


def test_boto3_finds_the_proxy_through_the_environment(
    proxy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = child_environment(proxy_url)
    assert env == {"AWS_KMS_ENDPOINT": proxy_url, "AWS_ENDPOINT_URL_KMS": proxy_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kms = boto3.client("kms", region_name=REGION, aws_access_key_id="app", aws_secret_access_key="app")
    assert len(kms.generate_random(NumberOfBytes=4)["Plaintext"]) == 4


def test_concurrent_calls(proxy_url: str, key_id: str) -> None:
    kms = app_kms(proxy_url, max_pool_connections=16)
    blobs = [kms.encrypt(KeyId=key_id, Plaintext=bytes([i]) * 8)["CiphertextBlob"] for i in range(8)]
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        results[i] = kms.decrypt(CiphertextBlob=blobs[i])["Plaintext"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: bytes([i]) * 8 for i in range(8)}


# ---------------------------------------------------------------------- errors


def test_kms_error_on_the_attested_path_passes_through(proxy_url: str) -> None:
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy_url).decrypt(CiphertextBlob=b"garbage, not a ciphertext at all")
    code, status, _ = error_of(excinfo)
    assert (code, status) == ("InvalidCiphertextException", 400)


def test_kms_error_on_the_forwarded_path_passes_through(proxy_url: str) -> None:
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy_url).describe_key(KeyId="00000000-0000-0000-0000-000000000000")
    code, status, _ = error_of(excinfo)
    assert (code, status) == ("NotFoundException", 400)


def test_access_denied_from_the_attested_client_keeps_its_status(
    proxy_url: str, attested: FakeAttestedKms
) -> None:
    # What KMS answers when the attestation's measurements do not match the key policy.
    attested.fail = ClientError(
        {
            "Error": {"Code": "AccessDeniedException", "Message": "not authorized: PCR0 mismatch"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "Decrypt",
    )
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy_url).generate_random(NumberOfBytes=8)
    assert error_of(excinfo) == ("AccessDeniedException", 400, "not authorized: PCR0 mismatch")


def test_attested_kms_error_becomes_kms_internal_exception(proxy_url: str, attested: FakeAttestedKms) -> None:
    attested.fail = AttestedKmsError("KMS answered Decrypt without CiphertextForRecipient")
    with pytest.raises(ClientError) as excinfo:
        one_attempt(proxy_url).generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 500)
    assert message.startswith("attestation-protected call failed: KMS answered Decrypt")


def test_unexpected_failure_is_a_json_500(proxy_url: str, attested: FakeAttestedKms) -> None:
    attested.fail = RuntimeError("secret detail that must not leak")
    with pytest.raises(ClientError) as excinfo:
        one_attempt(proxy_url).generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 500)
    assert "secret" not in message


def test_service_other_than_kms_is_refused(proxy_url: str, attested: FakeAttestedKms) -> None:
    def as_s3(request: Any) -> None:
        auth = get_header(request, "Authorization").replace("/kms/aws4_request", "/s3/aws4_request")
        set_header(request, "Authorization", auth)

    kms = mangle(app_kms(proxy_url), as_s3)
    with pytest.raises(ClientError) as excinfo:
        kms.generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("InvalidSignatureException", 400)
    assert "only service kms" in message
    assert attested.calls == []


def test_missing_authorization_is_refused(proxy_url: str) -> None:
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy_url, signature_version=UNSIGNED).list_keys()
    assert error_of(excinfo)[:2] == ("MissingAuthenticationTokenException", 400)


def test_malformed_authorization_is_refused(proxy_url: str) -> None:
    kms = mangle(app_kms(proxy_url), lambda r: set_header(r, "Authorization", "Bearer abc"))
    with pytest.raises(ClientError) as excinfo:
        kms.list_keys()
    assert error_of(excinfo)[:2] == ("IncompleteSignatureException", 400)


def test_hostile_region_in_scope_is_refused(proxy_url: str) -> None:
    def evil(request: Any) -> None:
        auth = get_header(request, "Authorization").replace(f"/{REGION}/", "/evil.example#/")
        set_header(request, "Authorization", auth)

    with pytest.raises(ClientError) as excinfo:
        mangle(app_kms(proxy_url), evil).list_keys()
    assert error_of(excinfo)[:2] == ("InvalidSignatureException", 400)


def test_missing_target_is_unknown_operation(proxy_url: str) -> None:
    kms = mangle(app_kms(proxy_url), lambda r: set_header(r, "X-Amz-Target", None))
    with pytest.raises(ClientError) as excinfo:
        kms.list_keys()
    assert error_of(excinfo)[:2] == ("UnknownOperationException", 400)


def test_foreign_target_is_unknown_operation(proxy_url: str) -> None:
    kms = mangle(app_kms(proxy_url), lambda r: set_header(r, "X-Amz-Target", "DynamoDB_20120810.GetItem"))
    with pytest.raises(ClientError) as excinfo:
        kms.list_keys()
    assert error_of(excinfo)[:2] == ("UnknownOperationException", 400)


def test_wrong_content_type_is_refused(proxy_url: str) -> None:
    kms = mangle(app_kms(proxy_url), lambda r: set_header(r, "Content-Type", "text/plain"))
    with pytest.raises(ClientError) as excinfo:
        kms.list_keys()
    assert error_of(excinfo)[:2] == ("SerializationException", 400)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 100_000],  # the last: RecursionError (review)
)
def test_bad_json_is_a_serialization_exception(proxy_url: str, body: bytes) -> None:
    def bad_body(request: Any) -> None:
        request.body = body

    with pytest.raises(ClientError) as excinfo:
        mangle(app_kms(proxy_url), bad_body).generate_random(NumberOfBytes=8)
    assert error_of(excinfo)[:2] == ("SerializationException", 400)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decompress_is_a_serialization_exception(proxy_url: str, encoding: str) -> None:
    """Found by review: aiohttp's decompression error escaped as a 500."""

    def corrupt(request: Any) -> None:
        request.body = b"\x1f\x8b\x08\x00 this is not compressed data"
        set_header(request, "Content-Encoding", encoding)

    with pytest.raises(ClientError) as excinfo:
        mangle(app_kms(proxy_url), corrupt).generate_random(NumberOfBytes=8)
    assert error_of(excinfo)[:2] == ("SerializationException", 400)


@pytest.mark.parametrize(
    ("operation", "params", "code", "fragment"),
    [
        ("decrypt", {"CiphertextBlob": "***not base64***"}, "SerializationException", "CiphertextBlob"),
        ("decrypt", {"CiphertextBlob": 12}, "SerializationException", "CiphertextBlob"),
        (
            "decrypt",
            {"CiphertextBlob": "AAAA", "EncryptionContext": []},
            "SerializationException",
            "Encryption",
        ),
        (
            "decrypt",
            {"CiphertextBlob": "AAAA", "GrantTokens": [1]},
            "SerializationException",
            "GrantTokens[0]",
        ),
        ("decrypt", {"CiphertextBlob": "AAAA", "Surprise": True}, "ValidationException", "Surprise"),
        ("generate_data_key", {"NumberOfBytes": 32}, "ValidationException", "KeyId"),
        (
            "generate_data_key",
            {"KeyId": "k", "NumberOfBytes": "32"},
            "SerializationException",
            "NumberOfBytes",
        ),
        ("generate_random", {"NumberOfBytes": True}, "SerializationException", "NumberOfBytes"),
    ],
)
def test_attested_parameters_are_checked_against_the_model(
    proxy_url: str,
    attested: FakeAttestedKms,
    operation: str,
    params: dict[str, Any],
    code: str,
    fragment: str,
) -> None:
    def replace(request: Any) -> None:
        request.body = json.dumps(params).encode()

    # boto3 needs valid arguments to build the request that the hook then replaces.
    valid: dict[str, dict[str, Any]] = {
        "decrypt": {"CiphertextBlob": b"x"},
        "generate_data_key": {"KeyId": "k"},
    }
    call = getattr(mangle(app_kms(proxy_url), replace), operation)
    with pytest.raises(ClientError) as excinfo:
        call(**valid.get(operation, {}))
    got_code, status, message = error_of(excinfo)
    assert (got_code, status) == (code, 400)
    assert fragment in message
    assert attested.calls == []


def test_oversize_body_is_413(proxy_url: str) -> None:
    # botocore does not check KMS's 4 KiB plaintext limit, so an unmodified client can send this.
    with pytest.raises(ClientError) as excinfo:
        app_kms(proxy_url).encrypt(KeyId="alias/any", Plaintext=b"x" * MAX_BODY_BYTES)
    assert error_of(excinfo)[:2] == ("RequestEntityTooLargeException", 413)


def test_oversize_chunked_body_is_413(proxy_url: str) -> None:
    # No Content-Length: the limit is enforced while reading.
    netloc = urlsplit(proxy_url).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    chunks = iter([b'{"Plaintext": "', b"A" * (MAX_BODY_BYTES + 10), b'"}'])
    headers = {
        "Content-Type": AMZ_JSON,
        "X-Amz-Target": "TrentService.Encrypt",
        "Authorization": "AWS4-HMAC-SHA256 Credential=app/20260101/eu-west-1/kms/aws4_request, "
        "SignedHeaders=host, Signature=00",
    }
    conn.request("POST", "/", body=chunks, headers=headers, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 413
    assert answer.getheader("Content-Type", "").startswith(AMZ_JSON)
    assert json.loads(answer.read())["__type"] == "RequestEntityTooLargeException"
    conn.close()


def test_upstream_unreachable_is_a_503_json_error(
    start_proxy: ProxyStarter, attested: FakeAttestedKms
) -> None:
    factory = ClientFactory(
        sidecar_session(), REGION, endpoints={"kms": f"http://127.0.0.1:{free_port()}"}, connect_timeout=2
    )
    url = start_proxy(attested, factory)
    with pytest.raises(ClientError) as excinfo:
        one_attempt(url).list_keys()
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 503)
    assert "cannot reach KMS" in message


def test_upstream_timeout_is_dependency_timeout(
    loop_thread: LoopThread, start_proxy: ProxyStarter, attested: FakeAttestedKms
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 5)
        return web.Response(text="{}")

    async def start_slow() -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/", slow)
        return await serve(app, shutdown_timeout=0.1)

    runner, slow_url = loop_thread.run(start_slow())
    try:
        factory = ClientFactory(sidecar_session(), REGION, endpoints={"kms": slow_url}, read_timeout=0.3)
        with pytest.raises(ClientError) as excinfo:
            one_attempt(start_proxy(attested, factory)).list_keys()
        assert error_of(excinfo)[:2] == ("DependencyTimeoutException", 503)
    finally:
        loop_thread.loop.call_soon_threadsafe(release.set)
        loop_thread.run(runner.cleanup())


def test_no_sidecar_credentials_is_a_503(start_proxy: ProxyStarter, attested: FakeAttestedKms) -> None:
    session = botocore.session.Session()
    session.register_component("credential_provider", CredentialResolver([]))  # IMDS not there yet
    url = start_proxy(attested, ClientFactory(session, REGION, endpoints={"kms": "http://127.0.0.1:9"}))
    with pytest.raises(ClientError) as excinfo:
        one_attempt(url).list_keys()
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 503)
    assert "NoCredentialsError" in message


def test_other_methods_and_paths_do_not_reach_kms(proxy_url: str) -> None:
    conn = http.client.HTTPConnection(urlsplit(proxy_url).netloc, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 405
    conn.close()


# ---------------------------------------------------------------------- logging


def test_one_event_per_call_without_secrets(
    proxy_url: str, key_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.aws.kms_proxy")
    kms = app_kms(proxy_url)
    secret = b"top secret plaintext 1234"
    blob = kms.encrypt(KeyId=key_id, Plaintext=secret)["CiphertextBlob"]
    kms.decrypt(CiphertextBlob=blob)
    events = [r for r in caplog.records if r.getMessage() == "kms_proxy_call"]
    fields = [r.sidecar_fields for r in events]  # type: ignore[attr-defined]
    assert [(f["operation"], f["status"], f["attested"]) for f in fields] == [
        ("Encrypt", 200, False),
        ("Decrypt", 200, True),
    ]
    assert all(isinstance(f["ms"], float) and f["region"] == REGION for f in fields)
    dumped = json.dumps(fields, default=str)
    for needle in (secret.decode(), base64.b64encode(secret).decode(), base64.b64encode(blob).decode()):
        assert needle not in dumped
    assert "sidecar-secret" not in caplog.text and SIDECAR_KEY not in caplog.text


# ---------------------------------------------------------------------- the conversion, unit by unit


@pytest.fixture(scope="module")
def model() -> Any:
    return botocore.session.get_session().get_service_model("kms")


def test_to_json_encodes_blobs_and_timestamps_and_drops_the_rest(model: Any) -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=datetime.UTC)
    shape = model.operation_model("DescribeKey").output_shape
    out = to_json(
        shape,
        {
            "KeyMetadata": {
                "KeyId": "k",
                "CreationDate": when,
                "Enabled": True,
                "EncryptionAlgorithms": ["A"],
            },
            "ResponseMetadata": {"RequestId": "r"},
        },
    )
    assert out == {
        "KeyMetadata": {
            "KeyId": "k",
            "CreationDate": when.timestamp(),
            "Enabled": True,
            "EncryptionAlgorithms": ["A"],
        }
    }
    pair = to_json(
        model.operation_model("GenerateDataKeyPair").output_shape,
        {"PublicKey": b"\x00\x01", "PrivateKeyPlaintext": bytearray(b"\xff"), "KeyId": None},
    )
    assert pair == {"PublicKey": "AAE=", "PrivateKeyPlaintext": "/w=="}


def test_from_json_decodes_blobs_recursively(model: Any) -> None:
    shape = model.operation_model("Decrypt").input_shape
    params = from_json(
        shape,
        {
            "CiphertextBlob": base64.b64encode(b"\x00blob").decode(),
            "EncryptionContext": {"a": "b"},
            "GrantTokens": ["t1"],
            "Recipient": {"AttestationDocument": "AAE=", "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
            "DryRun": None,
        },
    )
    assert params == {
        "CiphertextBlob": b"\x00blob",
        "EncryptionContext": {"a": "b"},
        "GrantTokens": ["t1"],
        "Recipient": {"AttestationDocument": b"\x00\x01", "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
    }


def test_attested_region_reads_the_client(attested: FakeAttestedKms) -> None:
    assert attested_region(attested) == REGION
    assert attested_region(object()) is None  # type: ignore[arg-type]
    assert kms_endpoint("eu-west-1") == "https://kms.eu-west-1.amazonaws.com"
    assert kms_endpoint("cn-north-1") == "https://kms.cn-north-1.amazonaws.com.cn"
    # Found by review: each partition has its own domain; botocore's endpoint data decides.
    assert kms_endpoint("us-iso-east-1") == "https://kms.us-iso-east-1.c2s.ic.gov"
    assert kms_endpoint("eusc-de-east-1") == "https://kms.eusc-de-east-1.amazonaws.eu"


async def test_app_factory_holds_its_state_in_an_app_key() -> None:
    factory = ClientFactory(sidecar_session(), REGION)
    app = create_kms_proxy_app(FakeAttestedKms(None), factory)
    assert [r.method for r in app.router.routes()] == ["POST"]
    assert len(app.cleanup_ctx) == 1


def test_no_credentials_is_a_503_naming_the_imds_step(proxy_url: str, attested: FakeAttestedKms) -> None:
    # Threat: an IMDS outage (or a skewed clock) reads as a proxy bug, or its detail leaks a token.
    attested.fail = ImdsError("GET /latest/meta-data/iam/security-credentials/r", "connection refused", 3)
    with pytest.raises(ClientError) as excinfo:
        one_attempt(proxy_url).generate_random(NumberOfBytes=8)
    code, status, message = error_of(excinfo)
    assert (code, status) == ("KMSInternalException", 503)
    assert message == (
        "no AWS credentials: IMDS GET /latest/meta-data/iam/security-credentials/r failed after 3 attempts: "
        "connection refused"
    )
