"""Tests of sidecar.attestation.emulator: PCR semantics, documents in AWS's exact shape, the dev PKI.

Documents are checked independently of the sidecar's own verifier: parsed with cbor2, the ES384
signature checked with cryptography, the chain built with cryptography's X.509 verifier. The same
checks run on a real AWS document first, so they are known to accept what AWS produces.
"""

from __future__ import annotations

import base64
import hashlib
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import verification

from sidecar.attestation import emulator
from sidecar.attestation.document import parse_document
from sidecar.attestation.emulator import DevPki, DevPkiError, NsmEmulator
from sidecar.attestation.nsm import (
    MAX_NONCE,
    MAX_PUBLIC_KEY,
    MAX_USER_DATA,
    NsmInputTooLarge,
    NsmInvalidArgument,
    NsmInvalidIndex,
    NsmReadOnlyIndex,
    NsmUnavailable,
)
from tests.conftest import SHARED

VECTORS = SHARED / "vectors" / "attestation"
AWS_ROOT = x509.load_pem_x509_certificate((VECTORS / "aws_nitro_root.pem").read_bytes())
AWS_DOC = VECTORS / "evervault_non_debug_cert_san_2023-01-18.cbor"  # all fields; cabundle of 4
AWS_DOC_NULLS = VECTORS / "iabtechlab_uid2_core_TestAttestation.cbor"  # public_key, user_data, nonce null
AWS_DOC_PCR16 = VECTORS / "marlin_oyster_sdks_rs_testcases_aws_pcr16.cbor"
PREFIX = bytes.fromhex("8444a1013822a059")
T0 = 1_760_000_000.25  # a fixed, fractional "now" (2025-10-09)
MEASURED = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pki(tmp_path: Path, clock: Clock) -> DevPki:
    return DevPki.load_or_create(tmp_path / "state", clock=clock)


@pytest.fixture
def emu(pki: DevPki, clock: Clock) -> NsmEmulator:
    return NsmEmulator(pki, pcrs=MEASURED, clock=clock)


# --- an independent verifier --------------------------------------------------------------------


def chain_verifier(root: x509.Certificate, at: datetime) -> verification.ClientVerifier:
    """RFC 5280 path validation to ``root`` at ``at``, CA rules as in the Web PKI.

    AWS's leaf has no subjectAltName or extendedKeyUsage, so the end-entity policy is permissive;
    the CA policy still requires basicConstraints, keyUsage and path lengths.
    """
    return (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(at)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )


def verify_document(document: bytes, root: x509.Certificate) -> dict[str, Any]:
    """Check a document as a remote verifier would; return its payload."""
    protected, unprotected, payload_bytes, signature = cbor2.loads(document)
    assert cbor2.loads(protected) == {1: -35} and unprotected == {}
    payload = cbor2.loads(payload_bytes)
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload_bytes])
    assert len(signature) == 96
    der = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(der, to_sign, ec.ECDSA(hashes.SHA384()))  # raises InvalidSignature

    # cabundle is root first; the verifier is given the intermediates leaf-side first.
    cabundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    assert cabundle[0] == root
    at = datetime.fromtimestamp(payload["timestamp"] / 1000, UTC)
    chain = chain_verifier(root, at).verify(leaf, list(reversed(cabundle[1:])))
    assert chain.chain[-1] == root
    # And each link by hand, so a lax policy could not hide a broken signature.
    for child, parent in zip([leaf, *reversed(cabundle)], reversed(cabundle), strict=False):
        child.verify_directly_issued_by(parent)
    return dict(payload)


def profile(cert: x509.Certificate) -> dict[str, tuple[bool, Any]]:
    """basicConstraints and keyUsage, with criticality: what a chain validator enforces."""
    return {
        ext.oid.dotted_string: (ext.critical, ext.value)
        for ext in cert.extensions
        if isinstance(ext.value, x509.BasicConstraints | x509.KeyUsage)
    }


def aws_chain() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    payload = cbor2.loads(cbor2.loads(AWS_DOC.read_bytes())[2])
    certs = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    return certs[0], certs[-1], x509.load_der_x509_certificate(payload["certificate"])


def test_independent_verifier_accepts_a_real_aws_document() -> None:
    payload = verify_document(AWS_DOC.read_bytes(), AWS_ROOT)
    assert payload["digest"] == "SHA384"


# --- document shape -----------------------------------------------------------------------------


def test_document_verifies_and_carries_the_inputs(emu: NsmEmulator, pki: DevPki) -> None:
    document = emu.attestation(user_data=b"user", nonce=b"nonce", public_key=b"key")
    payload = verify_document(document, pki.root)
    assert (payload["user_data"], payload["nonce"], payload["public_key"]) == (b"user", b"nonce", b"key")
    assert payload["module_id"] == emu.module_id
    assert payload["timestamp"] == int(T0 * 1000)
    assert payload["pcrs"] == {i: MEASURED.get(i, bytes(48)) for i in range(16)}


def test_document_bytes_have_the_aws_prefix(emu: NsmEmulator) -> None:
    document = emu.attestation()
    assert document.startswith(PREFIX)
    assert AWS_DOC.read_bytes().startswith(PREFIX)
    # The protected header and the empty unprotected map are the same bytes as AWS's.
    aws = cbor2.loads(AWS_DOC.read_bytes())
    ours = cbor2.loads(document)
    assert ours[0] == aws[0] == bytes.fromhex("a1013822")
    assert ours[1] == aws[1] == {}


def test_payload_key_order_and_types_match_aws(emu: NsmEmulator) -> None:
    ours = cbor2.loads(cbor2.loads(emu.attestation(nonce=b"n"))[2])
    for path in (AWS_DOC, AWS_DOC_NULLS):
        aws = cbor2.loads(cbor2.loads(path.read_bytes())[2])
        assert list(ours) == list(aws)
        assert list(ours["pcrs"]) == list(aws["pcrs"])  # 0..15, ascending
        for key in ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"):
            assert type(ours[key]) is type(aws[key]), key
    assert ours["digest"] == "SHA384"


def test_absent_fields_are_null_like_aws(emu: NsmEmulator) -> None:
    document = emu.attestation()
    payload_bytes = cbor2.loads(document)[2]
    ours = cbor2.loads(payload_bytes)
    aws = cbor2.loads(cbor2.loads(AWS_DOC_NULLS.read_bytes())[2])
    assert (ours["public_key"], ours["user_data"], ours["nonce"]) == (None, None, None)
    assert (aws["public_key"], aws["user_data"], aws["nonce"]) == (None, None, None)
    # The payload is the deterministic encoding of its own map, as every definite-length AWS one is.
    assert cbor2.dumps(ours) == payload_bytes
    aws_payload = cbor2.loads(AWS_DOC_NULLS.read_bytes())[2]
    assert cbor2.dumps(cbor2.loads(aws_payload)) == aws_payload
    assert payload_bytes.endswith(b"\x6apublic_key\xf6\x69user_data\xf6\x65nonce\xf6")
    assert aws_payload.endswith(b"\x6apublic_key\xf6\x69user_data\xf6\x65nonce\xf6")


def test_empty_inputs_stay_empty_not_null(emu: NsmEmulator) -> None:
    payload = cbor2.loads(cbor2.loads(emu.attestation(user_data=b"", nonce=b"", public_key=b""))[2])
    assert (payload["public_key"], payload["user_data"], payload["nonce"]) == (b"", b"", b"")


def test_cabundle_is_root_first(emu: NsmEmulator, pki: DevPki) -> None:
    payload = cbor2.loads(cbor2.loads(emu.attestation())[2])
    bundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    assert bundle == [pki.root, pki.intermediate]
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    assert leaf.issuer == pki.intermediate.subject
    assert pki.intermediate.issuer == pki.root.subject == pki.root.issuer


def test_certificate_profile_mirrors_aws(emu: NsmEmulator, pki: DevPki) -> None:
    # Threat: a dev chain that validates under rules the real chain would fail (or the reverse),
    # so verifier bugs stay hidden until production.
    aws_root, aws_instance_ca, aws_leaf = aws_chain()
    payload = cbor2.loads(cbor2.loads(emu.attestation())[2])
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    assert aws_root == AWS_ROOT
    assert profile(pki.root) == profile(aws_root)
    assert profile(pki.intermediate) == profile(aws_instance_ca)
    assert profile(leaf) == profile(aws_leaf)
    for ours in (pki.root, pki.intermediate, leaf):
        assert isinstance(ours.signature_hash_algorithm, hashes.SHA384)
        key = ours.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
    assert pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = pki.intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_subjects_are_clearly_dev(emu: NsmEmulator, pki: DevPki) -> None:
    payload = cbor2.loads(cbor2.loads(emu.attestation())[2])
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    assert (
        pki.root.subject.rfc4514_string() == "CN=dev.nitro-enclaves,OU=enclave-sidecar dev,O=enclave-sidecar"
    )
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == emu.module_id + ".dev"
    assert "Amazon" not in pki.root.subject.rfc4514_string()


def test_signature_is_fresh_per_document(emu: NsmEmulator, pki: DevPki) -> None:
    first, second = emu.attestation(nonce=b"a"), emu.attestation(nonce=b"a")
    assert cbor2.loads(first)[3] != cbor2.loads(second)[3]  # ECDSA is randomised
    verify_document(first, pki.root)
    verify_document(second, pki.root)


def test_tampered_document_fails_verification(emu: NsmEmulator, pki: DevPki) -> None:
    # Threat: a document edited in transit (here: PCR0) still being accepted.
    protected, unprotected, payload_bytes, signature = cbor2.loads(emu.attestation())
    payload = cbor2.loads(payload_bytes)
    payload["pcrs"][0] = b"\x00" * 48
    forged = cbor2.dumps([protected, unprotected, cbor2.dumps(payload), signature])
    with pytest.raises(InvalidSignature):
        verify_document(forged, pki.root)


def test_document_from_another_dev_root_is_rejected(
    emu: NsmEmulator, pki: DevPki, tmp_path: Path, clock: Clock
) -> None:
    # Threat: any dev PKI's documents passing for this one's (each state dir is its own trust root).
    other = DevPki.load_or_create(tmp_path / "other", clock=clock)
    leaf = leaf_of(emu.attestation())
    with pytest.raises(verification.VerificationError):
        chain_verifier(other.root, datetime.fromtimestamp(clock.now, UTC)).verify(leaf, [pki.intermediate])


# --- PCRs ---------------------------------------------------------------------------------------


def test_32_pcrs_of_48_bytes(emu: NsmEmulator) -> None:
    for index in range(32):
        value = emu.describe_pcr(index)
        assert value.data == MEASURED.get(index, bytes(48))
        assert value.locked is (index < 16)
    with pytest.raises(NsmInvalidIndex):
        emu.describe_pcr(32)
    with pytest.raises(NsmInvalidArgument):
        emu.describe_pcr(-1)


def test_extend_is_sha384_of_old_and_data(emu: NsmEmulator) -> None:
    first = emu.extend_pcr(16, b"abc")
    assert first == hashlib.sha384(bytes(48) + b"abc").digest()
    second = emu.extend_pcr(16, b"")
    assert second == hashlib.sha384(first).digest()
    assert emu.describe_pcr(16).data == second
    assert emu.describe_pcr(17).data == bytes(48)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 8, 15])
def test_boot_pcrs_are_read_only(emu: NsmEmulator, index: int) -> None:
    # Threat: the app rewriting its own measurement (PCR0..15) after boot.
    before = emu.describe_pcr(index).data
    with pytest.raises(NsmReadOnlyIndex):
        emu.extend_pcr(index, b"x")
    with pytest.raises(NsmReadOnlyIndex):
        emu.lock_pcr(index)
    assert emu.describe_pcr(index).data == before


def test_locked_pcr_refuses_extend_and_appears_in_documents(emu: NsmEmulator, pki: DevPki) -> None:
    value = emu.extend_pcr(16, b"app")
    payload = verify_document(emu.attestation(), pki.root)
    assert 16 not in payload["pcrs"]  # AWS lists locked PCRs only
    emu.lock_pcr(16)
    emu.lock_pcr(16)  # locking again is harmless
    with pytest.raises(NsmReadOnlyIndex):
        emu.extend_pcr(16, b"more")
    assert emu.describe_pcr(16).locked
    payload = verify_document(emu.attestation(), pki.root)
    assert payload["pcrs"][16] == value
    aws = cbor2.loads(cbor2.loads(AWS_DOC_PCR16.read_bytes())[2])
    assert list(payload["pcrs"]) == list(aws["pcrs"]) == list(range(17))


def test_lock_pcrs_locks_a_prefix(emu: NsmEmulator) -> None:
    emu.lock_pcrs(20)
    assert [emu.describe_pcr(i).locked for i in range(22)] == [True] * 20 + [False] * 2
    assert emu.describe_nsm().locked_pcrs == frozenset(range(20))
    emu.lock_pcrs(32)
    assert emu.describe_nsm().locked_pcrs == frozenset(range(32))
    with pytest.raises(NsmInvalidIndex):
        emu.lock_pcrs(33)
    with pytest.raises(NsmInvalidIndex):
        emu.lock_pcr(32)
    with pytest.raises(NsmInvalidIndex):
        emu.extend_pcr(32, b"x")


def test_describe_nsm(emu: NsmEmulator) -> None:
    description = emu.describe_nsm()
    assert (description.max_pcrs, description.digest, description.module_id) == (32, "SHA384", emu.module_id)
    assert description.locked_pcrs == frozenset(range(16))
    assert (description.version_major, description.version_minor, description.version_patch) == (1, 0, 0)


def test_module_id_looks_like_aws(emu: NsmEmulator) -> None:
    aws_module_id = cbor2.loads(cbor2.loads(AWS_DOC.read_bytes())[2])["module_id"]
    assert len(emu.module_id) == len(aws_module_id)
    assert emu.module_id.startswith("i-") and "-enc" in emu.module_id


def test_initial_pcrs_are_checked(pki: DevPki) -> None:
    with pytest.raises(ValueError, match="48 bytes"):
        NsmEmulator(pki, pcrs={0: b"short"})
    with pytest.raises(ValueError, match="out of range"):
        NsmEmulator(pki, pcrs={32: bytes(48)})
    with pytest.raises(ValueError, match="module_id"):
        NsmEmulator(pki, module_id="")


def test_module_id_must_be_what_documents_allow(pki: DevPki, clock: Clock) -> None:
    # Threat: an emulator that signs documents no verifier (ours included) can parse.
    for bad in ("i-\u00e9-enc1", "i-0\x1b[2J", "x" * (emulator.MAX_MODULE_ID + 1)):
        with pytest.raises(ValueError, match="printable ASCII"):
            NsmEmulator(pki, module_id=bad)
    longest = "i-" + "0" * (emulator.MAX_MODULE_ID - 2)
    signed = NsmEmulator(pki, module_id=longest, clock=clock).attestation()
    assert parse_document(signed).module_id == longest


def test_get_random(emu: NsmEmulator) -> None:
    first, second = emu.get_random(), emu.get_random()
    assert len(first) == len(second) == 256
    assert first != second


@pytest.mark.parametrize(
    ("field", "limit"), [("user_data", MAX_USER_DATA), ("nonce", MAX_NONCE), ("public_key", MAX_PUBLIC_KEY)]
)
def test_input_limits_match_the_device(emu: NsmEmulator, pki: DevPki, field: str, limit: int) -> None:
    # Threat: code that works against the emulator and fails on hardware (or the reverse).
    payload = verify_document(emu.attestation(**{field: b"\x01" * limit}), pki.root)
    assert payload[field] == b"\x01" * limit
    with pytest.raises(NsmInputTooLarge, match=field):
        emu.attestation(**{field: b"\x01" * (limit + 1)})
    wrong_type: dict[str, Any] = {field: "text"}
    with pytest.raises(NsmInvalidArgument):
        emu.attestation(**wrong_type)


def test_extend_request_size_limit_matches_the_device(emu: NsmEmulator) -> None:
    with pytest.raises(NsmInputTooLarge):
        emu.extend_pcr(16, bytes(4096))


def test_closed_emulator_refuses(emu: NsmEmulator) -> None:
    emu.close()
    with pytest.raises(NsmUnavailable):
        emu.attestation()
    with pytest.raises(NsmUnavailable):
        emu.get_random()


def test_concurrent_extends_are_all_applied(emu: NsmEmulator) -> None:
    # Lost updates would make a PCR depend on thread timing.
    threads = [
        threading.Thread(target=lambda: [emu.extend_pcr(20, b"x") for _ in range(50)]) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = bytes(48)
    for _ in range(200):
        expected = hashlib.sha384(expected + b"x").digest()
    assert emu.describe_pcr(20).data == expected


# --- the PKI ------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_pki_files_and_modes(pki: DevPki, tmp_path: Path) -> None:
    # Threat: dev CA keys readable by other local users, who could then mint "attested" documents.
    state = tmp_path / "state"
    assert mode(state) == 0o700
    assert mode(state / "dev-root.key") == 0o600
    assert mode(state / "dev-intermediate.key") == 0o600
    assert (state / "dev-root.pem").read_bytes() == pki.root_pem
    assert pki.root_path == state / "dev-root.pem"
    assert x509.load_pem_x509_certificate(pki.root_pem) == pki.root


def test_pki_is_reused_across_runs(pki: DevPki, tmp_path: Path, clock: Clock) -> None:
    again = DevPki.load_or_create(tmp_path / "state", clock=clock)
    assert again.root == pki.root
    assert again.intermediate == pki.intermediate
    assert again.cabundle == pki.cabundle


def test_lost_root_certificate_is_reissued_from_the_key(pki: DevPki, tmp_path: Path, clock: Clock) -> None:
    (tmp_path / "state" / "dev-root.pem").unlink()
    again = DevPki.load_or_create(tmp_path / "state", clock=clock)
    assert again.root.public_key() == pki.root.public_key()
    assert (tmp_path / "state" / "dev-root.pem").read_bytes() == again.root_pem
    verify_document(NsmEmulator(again, clock=clock).attestation(), again.root)


def test_intermediate_is_renewed_when_expiring(pki: DevPki, tmp_path: Path, clock: Clock) -> None:
    clock.now += (pki.intermediate.not_valid_after_utc - datetime.fromtimestamp(T0, UTC)).total_seconds()
    clock.now -= 3600  # an hour left
    again = DevPki.load_or_create(tmp_path / "state", clock=clock)
    assert again.root == pki.root
    assert again.intermediate != pki.intermediate
    assert again.intermediate.public_key() == pki.intermediate.public_key()
    verify_document(NsmEmulator(again, clock=clock).attestation(), again.root)


def test_corrupt_key_is_reported_not_replaced(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "dev-root.key").write_bytes(b"not a key")
    with pytest.raises(DevPkiError, match=r"dev-root\.key"):
        DevPki.load_or_create(state, clock=clock)
    assert (state / "dev-root.key").read_bytes() == b"not a key"


def test_a_key_of_an_unknown_algorithm_is_refused_by_name(tmp_path: Path, clock: Clock) -> None:
    # Threat: a damaged state directory crashing `sidecar dev` with a traceback instead of naming the file.
    state = tmp_path / "state"
    state.mkdir()
    # PKCS#8 { version 0, algorithm 1.2.3.4, key h'0102' }: well-formed, of no key type cryptography knows.
    der = bytes.fromhex("300e020100300506032a030404020102")
    pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END PRIVATE KEY-----\n"
    (state / "dev-root.key").write_bytes(pem)
    with pytest.raises(DevPkiError, match=r"dev-root\.key"):
        DevPki.load_or_create(state, clock=clock)


def test_wrong_key_type_is_refused(tmp_path: Path, clock: Clock) -> None:
    from cryptography.hazmat.primitives import serialization

    state = tmp_path / "state"
    state.mkdir()
    p256 = ec.generate_private_key(ec.SECP256R1())
    (state / "dev-root.key").write_bytes(
        p256.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(DevPkiError, match="P-384"):
        DevPki.load_or_create(state, clock=clock)


def test_concurrent_creation_yields_one_root(tmp_path: Path, clock: Clock) -> None:
    # Threat: two processes starting together each minting a root, one overwriting the other's key
    # while its certificate is already trusted.
    results: list[DevPki] = []
    threads = [
        threading.Thread(target=lambda: results.append(DevPki.load_or_create(tmp_path / "s", clock=clock)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert len({r.root.fingerprint(hashes.SHA256()) for r in results}) == 1
    assert len({r.intermediate.fingerprint(hashes.SHA256()) for r in results}) == 1


def leaf_of(document: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(cbor2.loads(cbor2.loads(document)[2])["certificate"])


def test_leaf_lifetime_and_renewal(emu: NsmEmulator, pki: DevPki, clock: Clock) -> None:
    first = leaf_of(emu.attestation())
    assert first.not_valid_after_utc - first.not_valid_before_utc == timedelta(hours=3)
    assert first.not_valid_before_utc <= datetime.fromtimestamp(T0, UTC)

    clock.now = T0 + 3 * 3600 - 11 * 60  # 11 minutes left: reuse
    assert leaf_of(emu.attestation()) == first

    clock.now = T0 + 3 * 3600 - 9 * 60  # 9 minutes left: renew
    document = emu.attestation()
    renewed = leaf_of(document)
    assert renewed != first and renewed.public_key() != first.public_key()
    verify_document(document, pki.root)


def test_leaf_is_renewed_if_the_clock_goes_back(emu: NsmEmulator, pki: DevPki, clock: Clock) -> None:
    first = leaf_of(emu.attestation())
    clock.now = T0 - 60
    document = emu.attestation()
    assert leaf_of(document) != first
    verify_document(document, pki.root)


def test_leaf_is_per_module_id(pki: DevPki, clock: Clock) -> None:
    a = NsmEmulator(pki, module_id="i-aaaaaaaaaaaaaaaaa-enc0000000000000001", clock=clock)
    b = NsmEmulator(pki, module_id="i-bbbbbbbbbbbbbbbbb-enc0000000000000002", clock=clock)
    leaf_a, leaf_b = leaf_of(a.attestation()), leaf_of(b.attestation())
    assert leaf_a != leaf_b
    assert a.module_id in leaf_a.subject.rfc4514_string()


def test_custom_leaf_lifetime(tmp_path: Path, clock: Clock) -> None:
    pki = DevPki.load_or_create(tmp_path / "state", timedelta(minutes=30), clock=clock)
    leaf = leaf_of(NsmEmulator(pki, clock=clock).attestation())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(minutes=30)


def test_expired_leaf_fails_verification(emu: NsmEmulator, pki: DevPki) -> None:
    # Threat: an old document being replayed after its leaf expired. The chain check must catch it.
    leaf = leaf_of(emu.attestation())
    chain_verifier(pki.root, leaf.not_valid_after_utc).verify(leaf, [pki.intermediate])
    with pytest.raises(verification.VerificationError):
        chain_verifier(pki.root, leaf.not_valid_after_utc + timedelta(seconds=1)).verify(
            leaf, [pki.intermediate]
        )


def test_module_constants() -> None:
    assert cbor2.loads(emulator.PROTECTED_HEADER) == {1: -35}
    assert (emulator.PCR_COUNT, emulator.PCR_BYTES, emulator.RANDOM_BYTES) == (32, 48, 256)
