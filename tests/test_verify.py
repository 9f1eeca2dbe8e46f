"""Verifying attestation documents: real vectors at their own time, and every way verification must fail.

Real documents cover what AWS produces. Chain rules (CA flags, pathLen, keyUsage, algorithms) are
exercised on synthetic documents from a throwaway PKI shaped like AWS's (root, three CAs with
pathLen 2, 1, 0, a leaf), each test breaking one rule; the unbroken PKI verifies, so each failure
is due to the rule under test.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sidecar.attestation import verify
from sidecar.attestation.document import AttestationDocument, parse_document
from sidecar.attestation.verify import (
    AWS_NITRO_ROOT_SHA256,
    CLOCK_SKEW,
    AttestationError,
    Check,
    Expectations,
    VerificationError,
    load_aws_root,
    load_root_pem,
    verify_document,
)
from tests.conftest import ROOT, SHARED

VECTORS = SHARED / "vectors" / "attestation"
VECTOR_NAMES = sorted(p.name for p in VECTORS.glob("*.cbor"))
BASE = "base_nitro-validator_2026-01-03_repaired.cbor"
NONCE_DOC = "evervault_non_debug_cert_san_2023-01-18.cbor"  # nonce 256 B, user_data 120 B
KEY_DOC = "marlin_oyster_sdks_rs_testcases_aws.cbor"  # public_key 64 B, no nonce, no user_data
P384_ORDER = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
)
ALL_OK = ["parse", "signature", "chain", "validity", "timestamp"]


def raw(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def own_time(data: bytes) -> datetime:
    return parse_document(data).timestamp_datetime


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


# --- real documents --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_every_real_vector_verifies_at_its_own_timestamp(name: str) -> None:
    data = raw(name)
    at = own_time(data)
    result = verify_document(data, at=at)
    assert result.ok, result.failure
    assert result.failure is None
    assert [c.name for c in result.checks] == ALL_OK
    assert all(c.ok and c.detail for c in result.checks)
    assert result.at == at
    doc = result.document
    assert doc is not None
    # The chain is reported leaf first, ending with the trusted (bundled AWS) root.
    assert len(result.chain) == 5
    assert result.chain[0].public_bytes(Encoding.DER) == doc.certificate
    assert [c.public_bytes(Encoding.DER) for c in result.chain[1:]] == list(reversed(doc.cabundle))
    assert result.chain[-1] == load_aws_root()
    result.raise_for_failure()  # does not raise


def test_real_documents_have_high_s_signatures_and_still_verify() -> None:
    # A verifier that enforced low S (as some libraries do by default) would reject these.
    high = [n for n in VECTOR_NAMES if int.from_bytes(raw(n)[-48:]) > P384_ORDER // 2]
    assert len(high) >= 3
    for name in high:
        assert verify_document(raw(name), at=own_time(raw(name))).ok, name


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_every_real_vector_fails_now_because_its_certificates_expired(name: str) -> None:
    # Threat: a captured document replayed long after its short-lived leaf certificate expired.
    result = verify_document(raw(name))
    assert not result.ok
    assert [c.name for c in result.checks] == ["parse", "signature", "chain", "validity"]
    assert [c.ok for c in result.checks] == [True, True, True, False]
    assert result.failure is not None
    assert result.failure.startswith("validity: certificate expired at ")
    assert abs(result.at - datetime.now(UTC)) < timedelta(minutes=1)
    with pytest.raises(VerificationError, match="validity: certificate expired"):
        result.raise_for_failure()


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_every_real_vector_fails_with_a_wrong_root(name: str, throwaway_root: x509.Certificate) -> None:
    # Threat: trusting documents from a chain that is not the configured root's.
    data = raw(name)
    result = verify_document(data, root=throwaway_root, at=own_time(data))
    assert not result.ok
    assert result.failure == "chain: cabundle[0] is not the trusted root certificate"


def test_a_look_alike_root_with_the_same_name_is_refused() -> None:
    # Threat: an attacker's root that copies AWS's subject; only the exact certificate counts.
    aws = load_aws_root()
    key = ec.generate_private_key(ec.SECP384R1())
    fake = ca_cert(aws.subject, aws.subject, key, key, path_len=None, days=(-1, 3650))
    data = raw(BASE)
    result = verify_document(data, root=fake, at=own_time(data))
    assert result.failure == "chain: cabundle[0] is not the trusted root certificate"


@pytest.mark.parametrize("name", VECTOR_NAMES)
@pytest.mark.parametrize("region", ["signature", "payload", "certificate"])
def test_one_flipped_byte_fails_verification(name: str, region: str) -> None:
    # Threat: a modified document (forged PCRs, swapped key, altered certificate) passing as genuine.
    data = raw(name)
    doc = parse_document(data)
    if region == "signature":
        index = len(data) - 1  # the last byte of s
    elif region == "payload":
        index = data.index(doc.pcrs[0]) + 5  # inside PCR0: the payload still parses
    else:
        index = data.index(doc.certificate) + len(doc.certificate) // 2
    result = verify_document(flip(data, index), at=own_time(data))
    assert not result.ok
    assert result.failure == "signature: the ES384 signature does not match the certificate's key"


def test_a_tagged_document_verifies_too() -> None:
    data = raw(BASE)
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(data)))
    result = verify_document(tagged, at=own_time(data))
    assert result.ok, result.failure
    assert result.document is not None and result.document.tagged


def test_a_parsed_document_can_be_verified() -> None:
    doc = parse_document(raw(BASE))
    result = verify_document(doc, at=doc.timestamp_datetime)
    assert result.ok
    assert result.document is doc
    assert result.checks[0] == Check("parse", True, "given a parsed document; its fields match its payload")


@pytest.mark.parametrize(
    "change",
    [
        {"pcrs": {0: bytes(48)}},
        {"nonce": b"fresh nonce"},
        {"certificate": b"\x30\x03\x02\x01\x01"},
        {"cabundle": ()},
        {"timestamp": 1},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_parsed_document_edited_after_parsing_is_refused(change: dict[str, Any]) -> None:
    # Threat: fields changed on the parsed object (dataclasses.replace) verified as if AWS had
    # signed them: only the payload bytes are signed, so the fields must be what they say.
    doc = parse_document(raw(BASE))
    result = verify_document(dataclasses.replace(doc, **change), at=doc.timestamp_datetime)
    assert result.failure == "parse: the given document's fields do not match its signed payload"
    assert [c.name for c in result.checks] == ["parse"]


def test_verification_at_the_edges_of_the_leaf_validity() -> None:
    data = raw(BASE)
    doc = parse_document(data)
    leaf = x509.load_der_x509_certificate(doc.certificate)
    end, start = leaf.not_valid_after_utc, leaf.not_valid_before_utc
    assert verify_document(data, at=end).ok
    late = end + timedelta(seconds=1)
    after = verify_document(data, at=late)
    assert (
        after.failure
        == f"validity: certificate expired at {end.isoformat()} (verifying at {late.isoformat()})"
    )
    before = verify_document(data, at=start - timedelta(seconds=1))
    assert before.failure is not None and before.failure.startswith(
        "validity: certificate is not valid before"
    )


def test_an_explicit_time_in_another_zone_is_converted_to_utc() -> None:
    data = raw(BASE)
    at = own_time(data).astimezone(timezone(timedelta(hours=-8)))
    result = verify_document(data, at=at)
    assert result.ok
    assert result.at.tzinfo == UTC and result.at == at


# --- parse failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00", raw(BASE)[:-1], raw(BASE) + b"\x00", "text"])
def test_a_bad_document_is_a_failed_result_not_an_exception(data: Any) -> None:
    result = verify_document(data, at=own_time(raw(BASE)))
    assert not result.ok
    assert result.document is None
    assert [c.name for c in result.checks] == ["parse"]
    assert not result.checks[0].ok
    assert result.failure is not None and result.failure.startswith("parse: ")
    assert result.chain == []


# --- expectations ----------------------------------------------------------------------------------


def expect(name: str, **kwargs: Any) -> Any:
    data = raw(name)
    return verify_document(data, at=own_time(data), expect=Expectations(**kwargs))


def test_expected_pcrs_that_match_pass_each_as_its_own_check() -> None:
    doc = parse_document(raw(BASE))
    result = expect(BASE, pcrs={0: doc.pcrs[0], 2: doc.pcrs[2], 15: doc.pcrs[15]})
    assert result.ok, result.failure
    assert [c.name for c in result.checks] == [*ALL_OK, "pcr0", "pcr2", "pcr15"]


def test_an_expected_pcr_that_differs_fails() -> None:
    # Threat: an enclave image other than the approved one.
    doc = parse_document(raw(BASE))
    wrong = flip(doc.pcrs[1], 47)
    result = expect(BASE, pcrs={0: doc.pcrs[0], 1: wrong, 2: doc.pcrs[2]})
    assert not result.ok
    assert result.failure == f"pcr1: PCR1 is {doc.pcrs[1].hex()}, expected {wrong.hex()}"
    # PCR0 passed, PCR1 failed, PCR2 never ran.
    assert [(c.name, c.ok) for c in result.checks[-2:]] == [("pcr0", True), ("pcr1", False)]


def test_an_expected_pcr_absent_from_the_document_fails() -> None:
    result = expect(BASE, pcrs={16: bytes(48)})
    assert result.failure == "pcr16: PCR16 is not in the document"
    assert expect("marlin_oyster_sdks_rs_testcases_aws_pcr16.cbor", pcrs={16: parse_document(
        raw("marlin_oyster_sdks_rs_testcases_aws_pcr16.cbor")).pcrs[16]}).ok  # fmt: skip


def test_debug_mode_zero_pcrs_do_not_match_a_real_measurement() -> None:
    # Threat: a debug-mode enclave (PCRs all zero, memory readable by the parent) accepted as production.
    real_pcr0 = parse_document(raw(BASE)).pcrs[0]
    result = expect("iabtechlab_uid2_core_TestAttestation.cbor", pcrs={0: real_pcr0})
    assert result.failure is not None and result.failure.startswith(f"pcr0: PCR0 is {'00' * 48}, expected ")


def test_nonce_expectation() -> None:
    # Threat: replay of an old document; the nonce proves it was made for this request.
    nonce = parse_document(raw(NONCE_DOC)).nonce
    assert nonce is not None and len(nonce) == 256
    ok = expect(NONCE_DOC, nonce=nonce)
    assert ok.ok and ok.checks[-1] == Check("nonce", True, "nonce matches (256 bytes)")
    bad = expect(NONCE_DOC, nonce=flip(nonce, 0))
    assert bad.failure == "nonce: nonce does not match the expected value (256 bytes in the document)"
    absent = expect(BASE, nonce=b"n" * 16)
    assert absent.failure == "nonce: nonce is absent from the document, a value was expected"


def test_user_data_expectation() -> None:
    user_data = parse_document(raw(NONCE_DOC)).user_data
    assert user_data is not None
    assert expect(NONCE_DOC, user_data=user_data).ok
    assert expect(NONCE_DOC, user_data=user_data[:-1]).failure == (
        "user_data: user_data does not match the expected value (120 bytes in the document)"
    )
    # An empty user_data matches only b"", not an absent field.
    assert expect("marlin_oyster_sdks_rs_testcases_aws_pcr16.cbor", user_data=b"").ok
    assert expect(KEY_DOC, user_data=b"").failure == (
        "user_data: user_data is absent from the document, a value was expected"
    )


def test_public_key_expectation() -> None:
    # Threat: a document that binds some other key, to make a KMS or client encrypt to the attacker.
    key = parse_document(raw(KEY_DOC)).public_key
    assert key is not None
    assert expect(KEY_DOC, public_key=key).ok
    assert expect(KEY_DOC, public_key=bytes(64)).failure == (
        "public_key: public_key does not match the expected value (64 bytes in the document)"
    )
    assert expect(BASE, public_key=key).failure == (
        "public_key: public_key is absent from the document, a value was expected"
    )


def test_max_age_relative_to_the_verification_time() -> None:
    # Threat: an old (but unexpired) document replayed to a verifier that wants a fresh one.
    data = raw(BASE)
    made = own_time(data)
    fresh = verify_document(
        data, at=made + timedelta(minutes=10), expect=Expectations(max_age=timedelta(hours=1))
    )
    assert fresh.ok, fresh.failure
    assert fresh.checks[-1] == Check("max_age", True, "600.000 s old, at most 3600 s allowed")
    stale = verify_document(
        data, at=made + timedelta(minutes=10), expect=Expectations(max_age=timedelta(minutes=5))
    )
    assert stale.failure == "max_age: the document is 600.000 s old, more than 300 s"
    exact = verify_document(
        data, at=made + timedelta(minutes=5), expect=Expectations(max_age=timedelta(minutes=5))
    )
    assert exact.ok


def test_all_expectations_together_run_in_a_fixed_order() -> None:
    doc = parse_document(raw(NONCE_DOC))
    assert doc.nonce is not None and doc.user_data is not None
    result = verify_document(
        raw(NONCE_DOC),
        at=doc.timestamp_datetime,
        expect=Expectations(
            pcrs={3: doc.pcrs[3], 1: doc.pcrs[1]},
            nonce=doc.nonce,
            user_data=doc.user_data,
            max_age=timedelta(seconds=1),
        ),
    )
    assert result.ok, result.failure
    assert [c.name for c in result.checks] == [*ALL_OK, "pcr1", "pcr3", "nonce", "user_data", "max_age"]


# --- arguments and roots ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"at": datetime(2026, 1, 3, 20, 41)}, "at must be timezone-aware"),
        ({"at": 1767472867402}, "at must be a datetime, got int"),
        ({"root": b"-----BEGIN CERTIFICATE-----"}, "root must be an x509.Certificate, got bytes"),
        ({"expect": {"nonce": b"x"}}, "expect must be an Expectations, got dict"),
        ({"expect": Expectations(pcrs={32: bytes(48)})}, "expect.pcrs: index must be 0..31, got 32"),
        ({"expect": Expectations(pcrs={0: "00" * 48})}, "expect.pcrs[0] must be bytes, got str"),  # type: ignore[dict-item]
        ({"expect": Expectations(nonce="abc")}, "expect.nonce must be bytes or None, got str"),  # type: ignore[arg-type]
        ({"expect": Expectations(max_age=timedelta(seconds=-1))}, "expect.max_age must be a non-negative"),
        ({"expect": Expectations(max_age=60)}, "expect.max_age must be a non-negative timedelta"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_raise_verification_error(kwargs: dict[str, Any], message: str) -> None:
    # A naive datetime would be read as local time by some code and UTC by other: refuse it.
    with pytest.raises(VerificationError, match=re.escape(message)):
        verify_document(raw(BASE), **kwargs)


def test_the_bundled_root_is_the_published_aws_root() -> None:
    bundled = ROOT / "sidecar" / "attestation" / "aws_nitro_root.pem"
    assert bundled.read_bytes() == (VECTORS / "aws_nitro_root.pem").read_bytes()
    root = load_aws_root()
    assert root.fingerprint(hashes.SHA256()).hex().upper() == AWS_NITRO_ROOT_SHA256
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


def test_a_tampered_bundled_root_is_refused(
    monkeypatch: pytest.MonkeyPatch, throwaway_root: x509.Certificate
) -> None:
    # Threat: an attacker who can write to the install directory swaps in their own root.
    from cryptography.hazmat.primitives.serialization import Encoding as Enc

    monkeypatch.setattr(verify, "_bundled_root_pem", lambda: throwaway_root.public_bytes(Enc.PEM))
    monkeypatch.setattr(verify, "_aws_root", None)  # the loaded root is cached per process
    with pytest.raises(VerificationError, match=r"has SHA-256 .*, expected 641A0321.*refusing to trust it"):
        load_aws_root()
    data = raw(BASE)
    result = verify_document(data, at=own_time(data))
    assert not result.ok
    assert result.failure is not None and "refusing to trust it" in result.failure
    assert result.failure.startswith("chain: the bundled AWS Nitro root has SHA-256 ")


def test_a_one_byte_change_to_the_bundled_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Still a well-formed certificate (the change is inside its signature), so only the fingerprint
    # check can catch it.
    der = load_aws_root().public_bytes(Encoding.DER)
    tampered = x509.load_der_x509_certificate(flip(der, len(der) - 1)).public_bytes(Encoding.PEM)
    monkeypatch.setattr(verify, "_bundled_root_pem", lambda: tampered)
    with pytest.raises(VerificationError, match="refusing to trust it"):
        load_aws_root()


def test_an_unreadable_bundled_root_is_a_verification_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> bytes:
        raise FileNotFoundError("aws_nitro_root.pem")

    monkeypatch.setattr(verify, "_bundled_root_pem", missing)
    with pytest.raises(VerificationError, match="cannot read the bundled AWS Nitro root"):
        load_aws_root()


def test_load_root_pem_accepts_pem_and_der_and_refuses_garbage(throwaway_root: x509.Certificate) -> None:
    pem = throwaway_root.public_bytes(Encoding.PEM)
    assert load_root_pem(pem) == throwaway_root
    assert load_root_pem(throwaway_root.public_bytes(Encoding.DER)) == throwaway_root
    with pytest.raises(VerificationError, match="not a PEM or DER certificate"):
        load_root_pem(b"garbage")
    with pytest.raises(VerificationError, match="not a PEM or DER certificate"):
        load_root_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    # PEM with text before it, as openssl's tools write it.
    assert load_root_pem(b"subject=CN = throwaway root\n" + pem) == throwaway_root
    # A bundle of several would silently trust only the first: refused.
    with pytest.raises(VerificationError, match="expected exactly one root certificate, found 2"):
        load_root_pem(pem + (VECTORS / "aws_nitro_root.pem").read_bytes())
    with pytest.raises(VerificationError, match="must be bytes"):
        load_root_pem("text")  # type: ignore[arg-type]


def test_the_error_types_form_one_hierarchy() -> None:
    assert issubclass(VerificationError, AttestationError)
    from sidecar.attestation.document import DocumentError

    assert issubclass(DocumentError, AttestationError)


# --- synthetic PKI: the chain rules ----------------------------------------------------------------

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def usage(**bits: bool) -> x509.KeyUsage:
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{n: bits.get(n, False) for n in names})


def builder(
    subject: x509.Name, issuer: x509.Name, key: Any, days: tuple[int, int] = (-10, 10)
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + timedelta(days=days[0]))
        .not_valid_after(NOW + timedelta(days=days[1]))
    )


def ca_cert(
    subject: x509.Name,
    issuer: x509.Name,
    key: Any,
    signer: Any,
    *,
    path_len: int | None,
    days: tuple[int, int] = (-10, 10),
) -> x509.Certificate:
    return (
        builder(subject, issuer, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(signer, hashes.SHA384())
    )


@pytest.fixture(scope="module")
def throwaway_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    return ca_cert(
        name("throwaway root"), name("throwaway root"), key, key, path_len=None, days=(-3650, 3650)
    )


@dataclasses.dataclass
class Pki:
    """A root, CAs (cabundle order: root first), a leaf and its key; each step can be overridden."""

    root: x509.Certificate
    bundle: list[x509.Certificate]
    leaf: x509.Certificate
    leaf_key: Any


Override = Callable[[int, x509.Name, x509.Name, Any, Any], x509.Certificate | None]


def make_pki(
    override: Override | None = None,
    *,
    leaf: Callable[[x509.Name, x509.Name, Any, Any], x509.Certificate] | None = None,
    leaf_key: Any = None,
    depth: int = 3,
) -> Pki:
    """Root, ``depth`` CAs with pathLen depth-1 .. 0, and a leaf, like AWS's (depth 3).

    ``override(level, subject, issuer, key, signer)`` may return a replacement for the CA at
    ``level`` (0 is the root); ``leaf(subject, issuer, key, signer)`` replaces the leaf.
    """
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(depth + 1)]
    names = [name("root"), *(name(f"ca{i}") for i in range(1, depth + 1))]
    certs: list[x509.Certificate] = []
    for level in range(depth + 1):
        issuer, signer = (names[0], keys[0]) if level == 0 else (names[level - 1], keys[level - 1])
        cert = override(level, names[level], issuer, keys[level], signer) if override else None
        if cert is None:
            path_len = None if level == 0 else depth - level
            cert = ca_cert(names[level], issuer, keys[level], signer, path_len=path_len)
        certs.append(cert)
    key = leaf_key or ec.generate_private_key(ec.SECP384R1())
    subject = name("enclave")
    if leaf is not None:
        leaf_cert = leaf(subject, names[-1], key, keys[-1])
    else:
        leaf_cert = (
            builder(subject, names[-1], key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True, content_commitment=True), critical=False)
            .sign(keys[-1], hashes.SHA384())
        )
    return Pki(certs[0], certs, leaf_cert, key)


def sign_document(pki: Pki, timestamp: datetime = NOW, **fields: Any) -> bytes:
    """An untagged COSE_Sign1 in AWS's shape, signed by the PKI's leaf key."""
    payload = {
        "module_id": "i-0000000000000000-enc0000000000000000",
        "digest": "SHA384",
        "timestamp": int(timestamp.timestamp() * 1000),
        "pcrs": {i: bytes(48) for i in range(16)},
        "certificate": pki.leaf.public_bytes(Encoding.DER),
        "cabundle": [c.public_bytes(Encoding.DER) for c in pki.bundle],
        "public_key": None,
        "user_data": None,
        "nonce": None,
        **fields,
    }
    protected = cbor2.dumps({1: -35})
    body = cbor2.dumps(payload)
    to_sign = cbor2.dumps(["Signature1", protected, b"", body])
    r, s = decode_dss_signature(pki.leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    # 48 bytes each (P-384); a smaller test key's values are padded so the document still parses.
    return cbor2.dumps([protected, {}, body, r.to_bytes(48) + s.to_bytes(48)])


def check_synthetic(pki: Pki, at: datetime = NOW, **fields: Any) -> Any:
    return verify_document(sign_document(pki, **fields), root=pki.root, at=at)


def test_the_synthetic_pki_verifies_when_nothing_is_broken() -> None:
    # Every negative test below breaks one thing in this PKI; this shows the rest is sound.
    result = check_synthetic(make_pki())
    assert result.ok, result.failure
    assert len(result.chain) == 5
    result = check_synthetic(make_pki(depth=1))
    assert result.ok, result.failure


def test_a_synthetic_document_fails_against_the_aws_root() -> None:
    # Threat: a document from anyone's PKI (the dev emulator's, say) accepted as a real enclave's.
    pki = make_pki()
    result = verify_document(sign_document(pki), at=NOW)
    assert result.failure == "chain: cabundle[0] is not the trusted root certificate"


def leaf_with(
    basic: x509.BasicConstraints | None, key_usage: x509.KeyUsage | None, critical_extra: bool = False
) -> Any:
    def make(subject: x509.Name, issuer: x509.Name, key: Any, signer: Any) -> x509.Certificate:
        b = builder(subject, issuer, key)
        if basic is not None:
            b = b.add_extension(basic, critical=True)
        if key_usage is not None:
            b = b.add_extension(key_usage, critical=False)
        if critical_extra:
            b = b.add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
                ),
                critical=True,
            )
        return b.sign(signer, hashes.SHA384())

    return make


def ca_with(level: int, **changes: Any) -> Override:
    """Replace the CA at ``level`` with one built from the given changes."""

    def override(
        at: int, subject: x509.Name, issuer: x509.Name, key: Any, signer: Any
    ) -> x509.Certificate | None:
        if at != level:
            return None
        b = builder(
            changes.get("subject", subject),
            changes.get("issuer", issuer),
            key,
            changes.get("days", (-10, 10)),
        )
        basic = changes.get(
            "basic", x509.BasicConstraints(ca=True, path_length=None if level == 0 else 3 - level)
        )
        if basic is not None:
            b = b.add_extension(basic, critical=changes.get("basic_critical", True))
        key_usage = changes.get("usage", usage(key_cert_sign=True, crl_sign=True))
        if key_usage is not None:
            b = b.add_extension(key_usage, critical=True)
        return b.sign(changes.get("signer", signer), changes.get("hash", hashes.SHA384()))

    return override


CHAIN_RULES: list[tuple[str, Callable[[], Pki], str]] = [
    # Threat: a Nitro leaf (or any end-entity key) minting certificates of its own.
    (
        "leaf is a CA",
        lambda: make_pki(
            leaf=leaf_with(x509.BasicConstraints(ca=True, path_length=None), usage(digital_signature=True))
        ),
        "chain: certificate: the signing certificate is a CA (basicConstraints ca=True)",
    ),
    (
        "leaf without digitalSignature",
        lambda: make_pki(
            leaf=leaf_with(x509.BasicConstraints(ca=False, path_length=None), usage(content_commitment=True))
        ),
        "chain: certificate: keyUsage digitalSignature is missing",
    ),
    (
        "leaf without keyUsage",
        lambda: make_pki(leaf=leaf_with(x509.BasicConstraints(ca=False, path_length=None), None)),
        "chain: certificate: keyUsage digitalSignature is missing",
    ),
    (
        "leaf with an unsupported critical extension",
        lambda: make_pki(
            leaf=leaf_with(
                x509.BasicConstraints(ca=False, path_length=None), usage(digital_signature=True), True
            )
        ),
        "chain: certificate: unsupported critical extension 2.5.29.30",
    ),
    (
        "intermediate not a CA",
        lambda: make_pki(ca_with(2, basic=x509.BasicConstraints(ca=False, path_length=None))),
        "chain: cabundle[2]: not a CA certificate (basicConstraints ca=True is missing)",
    ),
    (
        "intermediate without basicConstraints",
        lambda: make_pki(ca_with(3, basic=None)),
        "chain: cabundle[3]: not a CA certificate (basicConstraints ca=True is missing)",
    ),
    (
        "intermediate basicConstraints not critical",
        lambda: make_pki(ca_with(1, basic_critical=False)),
        "chain: cabundle[1]: basicConstraints must be critical in a CA certificate",
    ),
    (
        "intermediate without keyCertSign",
        lambda: make_pki(ca_with(2, usage=usage(digital_signature=True, crl_sign=True))),
        "chain: cabundle[2]: keyUsage keyCertSign is missing",
    ),
    (
        "intermediate without keyUsage",
        lambda: make_pki(ca_with(3, usage=None)),
        "chain: cabundle[3]: keyUsage keyCertSign is missing",
    ),
    # Threat: a CA restricted to issuing leaves (pathLen 0) issuing a further CA.
    (
        "pathLen too small",
        lambda: make_pki(ca_with(1, basic=x509.BasicConstraints(ca=True, path_length=1))),
        "chain: cabundle[1]: pathLen 1 does not allow the 2 CA certificates below it",
    ),
    (
        "root pathLen too small",
        lambda: make_pki(ca_with(0, basic=x509.BasicConstraints(ca=True, path_length=2))),
        "chain: root: pathLen 2 does not allow the 3 CA certificates below it",
    ),
    (
        "root not a CA",
        lambda: make_pki(ca_with(0, basic=x509.BasicConstraints(ca=False, path_length=None))),
        "chain: the trusted root cannot anchor a chain: root: not a CA certificate",
    ),
    # Threat: weaker algorithms than AWS uses, accepted because the signature "verifies".
    (
        "intermediate signed with SHA-256",
        lambda: make_pki(ca_with(2, hash=hashes.SHA256())),
        "chain: cabundle[2]: signature algorithm 1.2.840.10045.4.3.2, expected ecdsa-with-SHA384",
    ),
    (
        "intermediate issuer name differs from its parent's subject",
        lambda: make_pki(ca_with(2, issuer=name("someone else"))),
        "chain: cabundle[2]: not issued by cabundle[1]",
    ),
    (
        "intermediate signed by a key other than its parent's",
        lambda: make_pki(ca_with(3, signer=ec.generate_private_key(ec.SECP384R1()))),
        "chain: cabundle[3]: signature does not verify with cabundle[2]'s key",
    ),
]


@pytest.mark.parametrize(
    ("make", "message"), [(m, msg) for _, m, msg in CHAIN_RULES], ids=[n for n, _, _ in CHAIN_RULES]
)
def test_chain_rules(make: Callable[[], Pki], message: str) -> None:
    result = check_synthetic(make())
    assert not result.ok
    assert result.failure is not None and result.failure.startswith(message), result.failure
    assert [c.name for c in result.checks] == ["parse", "signature", "chain"]


def test_a_p256_intermediate_key_is_refused() -> None:
    # Only the key at level 2 is P-256; its child (level 3) is signed with it.
    keys: dict[int, Any] = {}

    def override(
        at: int, subject: x509.Name, issuer: x509.Name, key: Any, signer: Any
    ) -> x509.Certificate | None:
        if at == 2:
            keys[2] = ec.generate_private_key(ec.SECP256R1())
            return ca_cert(subject, issuer, keys[2], signer, path_len=1)
        if at == 3:
            return ca_cert(subject, issuer, key, keys[2], path_len=0)
        return None

    result = check_synthetic(make_pki(override))
    assert result.failure == "chain: cabundle[2]: the key is EC secp256r1, expected ECDSA P-384"


def test_a_p256_leaf_key_fails_the_signature_check() -> None:
    pki = make_pki(leaf_key=ec.generate_private_key(ec.SECP256R1()))
    result = check_synthetic(pki)
    assert result.failure == "signature: certificate: the key is EC secp256r1, expected ECDSA P-384"


@pytest.mark.parametrize(
    ("level", "days", "label", "kind"),
    [
        (2, (-10, -1), "cabundle[2]", "expired at"),
        (1, (1, 10), "cabundle[1]", "is not valid before"),
        (0, (-10, -1), "root", "expired at"),
    ],
)
def test_every_certificate_must_be_valid_at_the_verification_time(
    level: int, days: tuple[int, int], label: str, kind: str
) -> None:
    # Threat: an expired (possibly compromised and no longer protected) CA key still accepted.
    result = check_synthetic(make_pki(ca_with(level, days=days)))
    assert result.failure is not None and result.failure.startswith(f"validity: {label} {kind}"), (
        result.failure
    )


def test_a_document_from_the_future_fails_beyond_the_clock_skew() -> None:
    # Threat: a document stamped ahead, to look fresh to a max_age check long after it was made.
    pki = make_pki()
    within = check_synthetic(pki, timestamp=NOW + CLOCK_SKEW)
    assert within.ok, within.failure
    ahead = check_synthetic(pki, timestamp=NOW + CLOCK_SKEW + timedelta(seconds=1))
    assert not ahead.ok
    assert ahead.failure is not None and ahead.failure.startswith("timestamp: the document's timestamp ")
    assert "by more than 300 s" in ahead.failure


def test_a_cabundle_of_only_the_root_is_a_valid_shape() -> None:
    # The leaf directly under the root: the path is [leaf, root].
    keys = ec.generate_private_key(ec.SECP384R1())
    root = ca_cert(name("root"), name("root"), keys, keys, path_len=None)
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = (
        builder(name("enclave"), name("root"), leaf_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=False)
        .sign(keys, hashes.SHA384())
    )
    result = check_synthetic(Pki(root, [root], leaf, leaf_key))
    assert result.ok, result.failure
    assert result.chain == [leaf, root]


def test_a_document_signed_by_another_key_fails_the_signature_check() -> None:
    pki = make_pki()
    other = dataclasses.replace(pki, leaf_key=ec.generate_private_key(ec.SECP384R1()))
    result = check_synthetic(other)
    assert result.failure == "signature: the ES384 signature does not match the certificate's key"


def test_a_leaf_that_is_not_a_certificate_fails_the_signature_check() -> None:
    result = check_synthetic(make_pki(), certificate=b"\x30\x03\x02\x01\x01")
    assert result.failure is not None
    assert result.failure.startswith("signature: certificate is not a DER X.509 certificate")


def test_a_hand_made_document_with_nonsense_fails_without_raising() -> None:
    # Even a document object built by hand with nonsense in it gives a result, not an exception.
    doc = parse_document(raw(BASE))
    weird: AttestationDocument = dataclasses.replace(doc, signature=b"short", protected="text")  # type: ignore[arg-type]
    result = verify_document(weird, at=doc.timestamp_datetime)
    assert result.failure is not None
    assert result.failure.startswith("parse: the given document does not parse: COSE_Sign1 protected header")


# The document is re-signed with the leaf key after each change below, so its signature is valid:
# these are what an attacker holding a leaf key (or a bug that skipped the signature) could present,
# and only the chain checks stand in the way.


@pytest.mark.parametrize("which", ["certificate", "cabundle[3]", "cabundle[2]", "cabundle[1]"])
def test_a_flipped_byte_in_a_certificate_fails_the_chain(which: str) -> None:
    pki = make_pki()
    bundle = [c.public_bytes(Encoding.DER) for c in pki.bundle]
    leaf = pki.leaf.public_bytes(Encoding.DER)
    if which == "certificate":
        leaf = flip(leaf, len(leaf) - 1)  # inside its signature
        issuer = "cabundle[3]"
    else:
        i = int(which[-2])
        bundle[i] = flip(bundle[i], len(bundle[i]) - 1)
        issuer = "root" if i == 1 else f"cabundle[{i - 1}]"
    result = check_synthetic(pki, certificate=leaf, cabundle=bundle)
    assert result.failure == f"chain: {which}: signature does not verify with {issuer}'s key"
    assert [c.name for c in result.checks] == ["parse", "signature", "chain"]


def reencoded(der: bytes) -> bytes | None:
    """The same certificate with its signature BIT STRING claiming unused bits, if DER allows it.

    DER accepts n unused bits only when the last n bits are zero, so this works when the
    signature's last byte is even (half of all signatures).
    """
    cert = x509.load_der_x509_certificate(der)
    last = cert.signature[-1]
    if last & 1:
        return None
    at = len(der) - len(cert.signature) - 1
    assert der[at] == 0
    changed = der[:at] + bytes([1]) + der[at + 1 :]
    # The premise: cryptography takes the changed bytes as the same certificate.
    same = x509.load_der_x509_certificate(changed)
    assert (same.signature, same.tbs_certificate_bytes) == (cert.signature, cert.tbs_certificate_bytes)
    return changed


@pytest.mark.parametrize("which", ["certificate", "cabundle[3]", "cabundle[1]"])
def test_a_second_encoding_of_a_certificate_is_refused(which: str) -> None:
    # Found by the fuzz tests: cryptography accepts a certificate whose signature BIT STRING claims
    # unused bits. Same TBS, same signature bytes, different certificate bytes: refused, so that one
    # flipped bit anywhere in a certificate always fails.
    index = 0 if which == "certificate" else int(which[-2]) + 1
    for _ in range(40):  # until the chosen certificate's signature ends in an even byte
        pki = make_pki()
        ders = [pki.leaf.public_bytes(Encoding.DER), *(c.public_bytes(Encoding.DER) for c in pki.bundle)]
        changed = reencoded(ders[index])
        if changed is not None:
            break
    else:
        pytest.fail("no certificate with an even last signature byte in 40 tries")
    ders[index] = changed
    result = check_synthetic(pki, certificate=ders[0], cabundle=ders[1:])
    assert (
        result.failure
        == f"chain: {which}: the signature BIT STRING is not whole octets (a non-DER re-encoding)"
    )


def test_a_flipped_byte_in_the_root_copy_fails_the_chain() -> None:
    pki = make_pki()
    bundle = [c.public_bytes(Encoding.DER) for c in pki.bundle]
    bundle[0] = flip(bundle[0], len(bundle[0]) - 1)
    result = check_synthetic(pki, cabundle=bundle)
    assert result.failure == "chain: cabundle[0] is not the trusted root certificate"


def test_a_reordered_or_shortened_cabundle_fails_the_chain() -> None:
    # Threat: certificates that are each genuine but assembled into a path the CA never issued.
    pki = make_pki()
    root, ca1, ca2, ca3 = (c.public_bytes(Encoding.DER) for c in pki.bundle)
    swapped = check_synthetic(pki, cabundle=[root, ca2, ca1, ca3])
    # ca1 (pathLen 2) now sits below ca2 (pathLen 1), which has two CAs under it.
    assert swapped.failure == "chain: cabundle[1]: pathLen 1 does not allow the 2 CA certificates below it"
    skipped = check_synthetic(pki, cabundle=[root, ca1, ca3])
    assert skipped.failure is not None
    assert skipped.failure.startswith("chain: cabundle[2]: not issued by cabundle[1]")
