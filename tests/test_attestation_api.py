"""The attestation API: POST /v1/attestation (loopback API) and GET /enclave/attestation (ingress)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.attestation.document import parse_document
from sidecar.attestation.verify import Expectations, load_aws_root, load_root_pem, verify_document
from sidecar.testing import emulated_services

PCR0 = bytes(range(48))


@pytest.fixture
async def sc(sidecar_factory: Any, tmp_path: Path) -> Any:
    services = emulated_services(tmp_path / "pki", pcrs={0: PCR0})
    harness = await sidecar_factory(services=services)
    await harness.wait_started()
    harness.dev_root = load_root_pem((tmp_path / "pki" / "dev-root.pem").read_bytes())
    return harness


async def post(sc: Any, body: bytes) -> tuple[int, str, bytes]:
    async with sc.session.post(sc.url("/v1/attestation", 9000), data=body) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.read()


async def test_local_api_returns_a_verifying_document_with_the_given_fields(sc: Any) -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = (
        b'{"nonce": "' + base64.b64encode(b"n" * 16) + b'", "user_data": "' + base64.b64encode(b"hello")
        + b'", "public_key": "' + pem.replace(b"\n", b"\\n") + b'"}'
    )  # fmt: skip
    status, content_type, document = await post(sc, body)
    assert (status, content_type) == (200, "application/cbor")
    result = verify_document(document, root=sc.dev_root, expect=Expectations(nonce=b"n" * 16, pcrs={0: PCR0}))
    assert result.ok, result.failure
    doc = parse_document(document)
    assert (doc.user_data, doc.public_key) == (b"hello", der)


async def test_empty_body_gives_a_bare_document(sc: Any) -> None:
    status, _, document = await post(sc, b"")
    assert status == 200
    doc = parse_document(document)
    assert (doc.nonce, doc.user_data, doc.public_key) == (None, None, None)


async def test_emulator_documents_fail_against_the_aws_root(sc: Any) -> None:
    # Threat: a dev-world document being accepted as a real enclave's.
    _, _, document = await post(sc, b"{}")
    result = verify_document(document, root=load_aws_root())
    assert not result.ok
    assert "root" in (result.failure or "")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body is not valid JSON"),
        (b"[1, 2]", "body must be a JSON object"),
        (b'{"nonse": "AA=="}', "unknown field 'nonse'"),
        (b'{"nonce": 5}', "nonce must be a base64 string"),
        (b'{"nonce": "***"}', "nonce is not valid standard base64"),
        (b'{"nonce": "' + base64.b64encode(b"x" * 513) + b'"}', "nonce is 513 bytes; at most 512"),
        (b'{"user_data": "' + base64.b64encode(b"x" * 513) + b'"}', "user_data is 513 bytes; at most 512"),
        (
            b'{"public_key": "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----"}',
            "not a PEM public key",
        ),
    ],
)
async def test_local_api_rejects_bad_input_with_400(sc: Any, body: bytes, message: str) -> None:
    status, content_type, text = await post(sc, body)
    assert status == 400
    assert content_type == "application/json"
    assert message in text.decode()


async def test_local_api_is_only_on_the_api_listener(sc: Any) -> None:
    async with sc.session.post(sc.url("/v1/attestation", 8001), data=b"{}") as resp:
        assert resp.status == 404
    async with sc.session.get(sc.url("/v1/attestation", 9000)) as resp:
        assert resp.status == 405


async def test_remote_attestation_binds_the_recipient_key(sc: Any) -> None:
    nonce = bytes.fromhex("00112233445566778899aabbccddeeff")
    async with sc.session.get(sc.url("/enclave/attestation"), params={"nonce": nonce.hex()}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/cbor"
        document = await resp.read()
    result = verify_document(document, root=sc.dev_root, expect=Expectations(nonce=nonce))
    assert result.ok, result.failure
    doc = parse_document(document)
    recipient = sc.runtime.services.recipient
    assert doc.public_key == recipient.spki_der
    assert doc.user_data == hashlib.sha256(recipient.spki_der).digest()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "query parameter nonce is required"),
        ("?nonce=", "nonce must be 1 to 64 bytes, got 0"),
        ("?nonce=abc", "nonce must be hex"),
        ("?nonce=zz", "nonce must be hex"),
        ("?nonce=" + "ab" * 65, "nonce must be 1 to 64 bytes, got 65"),
        ("?nonce=ab&nonce=cd", "give the nonce query parameter once"),
    ],
)
async def test_remote_attestation_needs_a_good_nonce(sc: Any, query: str, message: str) -> None:
    # Threat: replay. Without a verifier-chosen nonce a recorded document could be served again.
    async with sc.session.get(sc.url("/enclave/attestation") + query) as resp:
        assert resp.status == 400
        assert message in (await resp.json())["error"]


async def test_without_an_nsm_the_api_says_so(sidecar_factory: Any) -> None:
    harness = await sidecar_factory()
    async with harness.session.get(harness.url("/enclave/attestation"), params={"nonce": "00"}) as resp:
        assert resp.status == 503
        assert "recipient key is not available" in (await resp.json())["error"]
    async with harness.session.post(harness.url("/v1/attestation", 9000), data=b"") as resp:
        assert resp.status == 503
        assert "without an NSM" in (await resp.json())["error"]
