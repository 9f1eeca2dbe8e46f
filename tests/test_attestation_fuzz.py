"""Property tests: hostile variations of real attestation documents.

- Random mutations (bit flips, byte changes, insertions, deletions, truncations) of real documents
  never make ``parse_document`` raise anything but an AttestationError, never make
  ``verify_document`` raise at all, and never verify unless the signed bytes are untouched.
- Every proper prefix of every real document is refused.
- A flipped bit anywhere in the signature, the payload or a certificate fails verification, also
  when the document is re-signed around the changed certificate (a throwaway PKI from
  test_verify.py, whose leaf key the test holds).

Everything is checked at each document's own timestamp, where the unmodified document verifies, so
a failure is due to the mutation and not to an expired certificate.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.attestation.document import AttestationDocument, AttestationError, parse_document
from sidecar.attestation.verify import verify_document
from tests.conftest import SHARED
from tests.test_verify import NOW, make_pki, sign_document

VECTORS = SHARED / "vectors" / "attestation"
RAW = {p.name: p.read_bytes() for p in sorted(VECTORS.glob("*.cbor"))}
DOCS = {name: parse_document(data) for name, data in RAW.items()}
NAMES = sorted(RAW)


def signed_parts(doc: AttestationDocument) -> tuple[bytes, bytes, bytes]:
    return doc.protected, doc.payload, doc.signature


def test_the_originals_verify_at_their_own_time() -> None:
    # The baseline for every property below: without a mutation, the document is good.
    assert len(NAMES) == 11
    for name in NAMES:
        assert verify_document(RAW[name], at=DOCS[name].timestamp_datetime).ok, name


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(NAMES))
    data = bytearray(RAW[name])
    payload_at = RAW[name].index(DOCS[name].payload)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        last = len(data) - 1
        # Uniform positions mostly land in certificate bytes; also aim at the CBOR headers at the
        # start of the COSE array and of the payload map, where the structure is decided.
        position = draw(
            st.one_of(
                st.integers(0, last),
                st.integers(0, min(16, last)),
                st.integers(min(payload_at, last), min(payload_at + 64, last)),
            )
        )
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[position] = draw(st.integers(0, 255))
        elif op == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[position:]
    return name, bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated_documents())
def test_mutated_documents_raise_only_attestation_errors_and_never_verify(case: tuple[str, bytes]) -> None:
    # Threat: crafted bytes that crash the verifier (an exception the caller does not expect can
    # become a 500, or a verification skipped by a too-broad except) or that pass as genuine.
    name, data = case
    original = RAW[name]
    assume(data != original)
    try:
        parsed = parse_document(data)
    except AttestationError:
        parsed = None
    result = verify_document(data, at=DOCS[name].timestamp_datetime)
    assert (result.document is None) == (parsed is None)
    if result.ok:
        # COSE signs the protected header and the payload; the envelope around them (tag 18, the
        # unprotected map) is not signed. A mutation that verifies may only have changed that.
        assert parsed is not None
        assert signed_parts(parsed) == signed_parts(DOCS[name])
    else:
        assert result.failure is not None and result.checks and not result.checks[-1].ok


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_is_refused(name: str) -> None:
    # Threat: a short read (a dropped connection) taken for a whole document.
    data = RAW[name]
    for length in range(len(data)):
        with pytest.raises(AttestationError):
            parse_document(data[:length])


@st.composite
def flipped_in_signed_range(draw: st.DrawFn) -> tuple[str, str, bytes]:
    name = draw(st.sampled_from(NAMES))
    data, doc = RAW[name], DOCS[name]
    payload_at = data.index(doc.payload)
    regions = {
        "signature": (len(data) - len(doc.signature), len(doc.signature)),
        "payload": (payload_at, len(doc.payload)),
        "certificate": (data.index(doc.certificate, payload_at), len(doc.certificate)),
        **{f"cabundle[{i}]": (data.index(der, payload_at), len(der)) for i, der in enumerate(doc.cabundle)},
    }
    region = draw(st.sampled_from(sorted(regions)))
    start, size = regions[region]
    position = start + draw(st.integers(0, size - 1))
    flipped = bytearray(data)
    flipped[position] ^= 1 << draw(st.integers(0, 7))
    return name, region, bytes(flipped)


@settings(max_examples=300, deadline=None)
@given(flipped_in_signed_range())
def test_a_flipped_bit_in_the_signature_payload_or_a_certificate_fails(case: tuple[str, str, bytes]) -> None:
    # Threat: any change to what AWS signed (PCRs, keys, nonce, certificates) going unnoticed.
    name, region, data = case
    result = verify_document(data, at=DOCS[name].timestamp_datetime)
    assert not result.ok
    assert result.failure is not None
    if region == "signature":
        assert result.failure == "signature: the ES384 signature does not match the certificate's key"
    else:
        # Certificates travel inside the payload: the change either breaks the payload's CBOR or
        # the signature over it.
        assert result.failure.startswith(("parse: ", "signature: ")), result.failure


# A throwaway PKI shaped like AWS's (root, 3 CAs, leaf) whose leaf key we hold, so a document can be
# re-signed after a certificate is changed: then only the chain checks can catch the change.
PKI = make_pki()
PKI_DERS = [PKI.leaf.public_bytes(Encoding.DER), *(c.public_bytes(Encoding.DER) for c in PKI.bundle)]


def test_the_throwaway_pki_verifies_unchanged() -> None:
    result = verify_document(sign_document(PKI), root=PKI.root, at=NOW)
    assert result.ok, result.failure


@st.composite
def resigned_with_a_flipped_certificate(draw: st.DrawFn) -> bytes:
    ders = list(PKI_DERS)
    which = draw(st.integers(0, len(ders) - 1))  # 0: the leaf, then cabundle[0..3]
    der = bytearray(ders[which])
    der[draw(st.integers(0, len(der) - 1))] ^= 1 << draw(st.integers(0, 7))
    ders[which] = bytes(der)
    return sign_document(PKI, certificate=ders[0], cabundle=ders[1:])


@settings(max_examples=200, deadline=None)
@given(resigned_with_a_flipped_certificate())
def test_a_flipped_bit_in_any_certificate_fails_even_with_a_valid_document_signature(data: bytes) -> None:
    # Threat: an attacker with a valid document signature (a leaf key, or a bug that skipped the
    # check) presenting altered certificates. Every bit of every certificate is covered: by a CA's
    # signature over the TBS, by the algorithm and encoding checks outside it, or (the root copy)
    # by byte equality with the trusted root.
    result = verify_document(data, root=PKI.root, at=NOW)
    assert not result.ok
    assert result.failure is not None and result.failure.startswith(("signature: ", "chain: ")), (
        result.failure
    )
