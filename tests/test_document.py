"""Parsing attestation documents: every real vector, both COSE shapes, and each malformed case.

Malformed inputs are real vectors decoded with cbor2, edited, and re-encoded, so each differs from a
real document in exactly the way the test names. Every rejection must be a DocumentError with a
message naming the problem: the parser reads bytes from the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from sidecar.attestation.document import (
    MAX_DOCUMENT_SIZE,
    AttestationDocument,
    AttestationError,
    DocumentError,
    parse_document,
)
from tests.conftest import SHARED

VECTORS = SHARED / "vectors" / "attestation"
VECTOR_NAMES = sorted(p.name for p in VECTORS.glob("*.cbor"))
BASE = "base_nitro-validator_2026-01-03_repaired.cbor"  # the one with an indefinite-length payload map
DEFINITE = "marlin_oyster_sdks_rs_testcases_aws.cbor"
ZERO48 = bytes(48)


def raw(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


# What vectors/README.md says about each file (and what was measured in it): timestamp, the start of
# PCR0, the number of PCRs, and the lengths of public_key / user_data / nonce (None: CBOR null).
FACTS: dict[str, dict[str, Any]] = {
    BASE: dict(ts=1767472867402, pcr0="4b8d4cf2a99e05ce", pcrs=16, public_key=None, user_data=20, nonce=None),
    "marlin_oyster_sdks_rs_testcases_aws_pcr16.cbor": dict(
        ts=1745922759691, pcr0="2984ab215649c40f", pcrs=17, public_key=32, user_data=0, nonce=None
    ),
    DEFINITE: dict(
        ts=1734075478960, pcr0="189038eccf28a3a0", pcrs=16, public_key=64, user_data=None, nonce=None
    ),
    "marlin_oyster_attestation_verifier_test_attestation.cbor": dict(
        ts=1723012689640, pcr0="5fec1b7372742584", pcrs=16, public_key=64, user_data=None, nonce=None
    ),
    "evervault_test-data_valid-attestation-doc-base64.cbor": dict(
        ts=1695049410860, pcr0=None, pcrs=16, public_key=None, user_data=91, nonce=256
    ),
    "evervault_non_debug_cert_san_2023-01-18.cbor": dict(
        ts=1674047239280, pcr0="d265a83faa7b4fa0", pcrs=16, public_key=None, user_data=120, nonce=256
    ),
    "evervault_test-data_beta_valid-attestation-doc-bytes.cbor": dict(
        ts=1665651482136, pcr0="f4d48b81a460c991", pcrs=16, public_key=None, user_data=None, nonce=256
    ),
    "evervault_test-data_beta_debug-mode-attestation-doc-bytes.cbor": dict(
        ts=1665582606081, pcr0=None, pcrs=16, public_key=19, user_data=13, nonce=None
    ),
    "brave_core_cose_unittest.cbor": dict(
        ts=1658860752566, pcr0=None, pcrs=16, public_key=0, user_data=32, nonce=20
    ),
    "capeprivacy_cape_js_test.cbor": dict(
        ts=1657650918399, pcr0=None, pcrs=16, public_key=32, user_data=None, nonce=12
    ),
    "iabtechlab_uid2_core_TestAttestation.cbor": dict(
        ts=1619410153100, pcr0=None, pcrs=16, public_key=None, user_data=None, nonce=None
    ),
}


def test_the_facts_table_covers_every_vector() -> None:
    # A new vector without facts would be parsed but asserted nothing about.
    assert sorted(FACTS) == VECTOR_NAMES
    assert len(VECTOR_NAMES) == 11


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_every_vector_parses_with_its_documented_facts(name: str) -> None:
    facts = FACTS[name]
    data = raw(name)
    doc = parse_document(data)
    assert data.startswith(bytes.fromhex("8444a1013822a059"))  # untagged, as the README says
    assert doc.tagged is False
    assert doc.protected == bytes.fromhex("a1013822")
    assert len(doc.signature) == 96
    assert doc.digest == "SHA384"
    assert doc.module_id.startswith("i-") and "-enc" in doc.module_id
    assert doc.timestamp == facts["ts"]
    assert doc.timestamp_datetime == datetime.fromtimestamp(facts["ts"] / 1000, UTC)
    assert len(doc.pcrs) == facts["pcrs"]
    assert sorted(doc.pcrs) == list(range(facts["pcrs"]))
    assert all(len(v) == 48 for v in doc.pcrs.values())
    if facts["pcr0"] is None:
        # Debug-mode enclaves report PCR0, 1 and 2 as zeros.
        assert doc.pcrs[0] == doc.pcrs[1] == doc.pcrs[2] == ZERO48
    else:
        assert doc.pcrs[0].hex().startswith(facts["pcr0"])
    for field in ("public_key", "user_data", "nonce"):
        value = getattr(doc, field)
        assert (None if value is None else len(value)) == facts[field], field
    assert 600 < len(doc.certificate) < 700
    assert len(doc.cabundle) == 4
    # The payload bytes are kept exactly, for the signature.
    assert doc.payload == cbor2.loads(data)[2]
    assert doc.signature == cbor2.loads(data)[3]


def test_only_the_2026_document_has_an_indefinite_length_payload_map() -> None:
    for name in VECTOR_NAMES:
        doc = parse_document(raw(name))
        assert doc.payload[0] == (0xBF if name == BASE else 0xA9), name
        if name == BASE:
            assert doc.payload[-1] == 0xFF  # the "break" that ends an indefinite map


def test_vector_specific_oddities() -> None:
    # public_key is 64 raw bytes, not DER: a parser that insisted on DER would reject it.
    marlin = parse_document(raw(DEFINITE))
    assert marlin.public_key is not None and len(marlin.public_key) == 64
    with pytest.raises(ValueError):
        load_der_public_key(marlin.public_key)
    # public_key of 19 ASCII bytes.
    beta = parse_document(raw("evervault_test-data_beta_debug-mode-attestation-doc-bytes.cbor"))
    assert beta.public_key is not None and beta.public_key.isascii()
    # public_key present but empty (AWS documents 1..1024; real documents do this).
    assert parse_document(raw("brave_core_cose_unittest.cbor")).public_key == b""
    # user_data present but empty, and 17 PCRs (the app extended PCR16).
    pcr16 = parse_document(raw("marlin_oyster_sdks_rs_testcases_aws_pcr16.cbor"))
    assert pcr16.user_data == b""
    assert 16 in pcr16.pcrs
    # CBOR null optional fields become None, not b"".
    uid2 = parse_document(raw("iabtechlab_uid2_core_TestAttestation.cbor"))
    assert (uid2.public_key, uid2.user_data, uid2.nonce) == (None, None, None)
    payload = cbor2.loads(cbor2.loads(raw("iabtechlab_uid2_core_TestAttestation.cbor"))[2])
    assert payload["nonce"] is None and "nonce" in payload


def test_the_cabundle_starts_with_the_aws_root() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    root = x509.load_pem_x509_certificate((VECTORS / "aws_nitro_root.pem").read_bytes())
    for name in VECTOR_NAMES:
        assert parse_document(raw(name)).cabundle[0] == root.public_bytes(Encoding.DER), name


# --- shapes that must be accepted ------------------------------------------------------------------


def fields(doc: AttestationDocument, *ignore: str) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(doc).items() if k not in ignore}


@pytest.mark.parametrize("name", [BASE, DEFINITE])
def test_tagged_and_untagged_parse_to_the_same_fields(name: str) -> None:
    untagged = raw(name)
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(untagged)))
    assert tagged[0] == 0xD2 and tagged[1:] == untagged
    a, b = parse_document(untagged), parse_document(tagged)
    assert (a.tagged, b.tagged) == (False, True)
    assert fields(a, "tagged") == fields(b, "tagged")


def test_definite_and_indefinite_payload_maps_parse_to_the_same_fields() -> None:
    for name in (BASE, DEFINITE):
        outer = cbor2.loads(raw(name))
        payload = cbor2.loads(outer[2])
        definite = cbor2.dumps([outer[0], outer[1], cbor2.dumps(payload), outer[3]])
        indefinite = cbor2.dumps(
            [outer[0], outer[1], cbor2.dumps(payload, indefinite_containers=True), outer[3]]
        )
        a, b = parse_document(definite), parse_document(indefinite)
        assert a.payload[0] == 0xA9 and b.payload[0] == 0xBF
        assert fields(a, "payload") == fields(b, "payload")
        assert a.pcrs == parse_document(raw(name)).pcrs


def test_absent_optional_fields_are_none() -> None:
    data = rebuild(DEFINITE, payload=lambda p: [p.pop(k) for k in ("public_key", "user_data", "nonce")])
    doc = parse_document(data)
    assert (doc.public_key, doc.user_data, doc.nonce) == (None, None, None)


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = raw(BASE)
    assert parse_document(bytearray(data)) == parse_document(data) == parse_document(memoryview(data))


def test_unsigned_unprotected_parameters_other_than_alg_and_crit_are_ignored() -> None:
    doc = parse_document(rebuild(DEFINITE, outer=lambda o: o.__setitem__(1, {4: b"key id"})))
    assert doc.protected == bytes.fromhex("a1013822")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user_data", b"u" * 512),
        ("nonce", b"n" * 512),
        ("public_key", b"k" * 1024),
        ("certificate", b"c" * 1024),
        ("pcrs", {0: bytes(32), 31: bytes(64)}),
        ("cabundle", [b"x"] * 16),
        ("timestamp", 1),
    ],
)
def test_values_at_the_limits_are_accepted(field: str, value: Any) -> None:
    doc = parse_document(rebuild(DEFINITE, payload=lambda p: p.__setitem__(field, value)))
    expected = tuple(value) if field == "cabundle" else value
    assert getattr(doc, field) == expected


def test_sig_structure_and_timestamp_datetime() -> None:
    doc = parse_document(raw(BASE))
    assert cbor2.loads(doc.sig_structure()) == ["Signature1", doc.protected, b"", doc.payload]
    assert doc.sig_structure().startswith(bytes.fromhex("846a5369676e61747572653144a1013822405911"))
    assert doc.timestamp_datetime == datetime(2026, 1, 3, 20, 41, 7, 402000, tzinfo=UTC)
    assert doc.timestamp_datetime.tzinfo is UTC


def test_documents_are_frozen_and_hashable() -> None:
    doc = parse_document(raw(BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        doc.timestamp = 1  # type: ignore[misc]
    assert hash(doc) == hash(parse_document(raw(BASE)))
    assert {doc: 1}[parse_document(raw(BASE))] == 1


# --- malformed documents ---------------------------------------------------------------------------


def rebuild(
    name: str,
    *,
    outer: Callable[[list[Any]], Any] | None = None,
    payload: Callable[[dict[str, Any]], Any] | None = None,
) -> bytes:
    """Decode a vector, let the callbacks edit the COSE array and/or the payload map, re-encode."""
    cose = cbor2.loads(raw(name))
    if payload is not None:
        body = cbor2.loads(cose[2])
        payload(body)
        cose[2] = cbor2.dumps(body)
    if outer is not None:
        outer(cose)
    return cbor2.dumps(cose)


def set_payload(field: Any, value: Any) -> bytes:
    return rebuild(DEFINITE, payload=lambda p: p.__setitem__(field, value))


def set_outer(index: int, value: Any) -> bytes:
    return rebuild(DEFINITE, outer=lambda o: o.__setitem__(index, value))


def duplicate_key_payload() -> bytes:
    # cbor2 cannot encode a dict with a repeated key, so splice one in: a definite map of 9 entries
    # (0xa9) becomes 10 (0xaa) with a second "digest". Two decoders could disagree on which counts.
    cose = cbor2.loads(raw(DEFINITE))
    body = cose[2]
    assert body[0] == 0xA9
    cose[2] = b"\xaa" + body[1:] + cbor2.dumps("digest") + cbor2.dumps("SHA384")
    return cbor2.dumps(cose)


def nested(depth: int) -> Any:
    value: Any = b""
    for _ in range(depth):
        value = [value]
    return value


ORIGINAL = raw(DEFINITE)
ORIGINAL_OUTER = cbor2.loads(ORIGINAL)

MALFORMED: list[tuple[str, Callable[[], Any], str]] = [
    # input as a whole
    ("empty", lambda: b"", "COSE_Sign1: not CBOR: empty input"),
    ("not CBOR", lambda: b"\xff\xfe\xfd", "COSE_Sign1: not CBOR"),
    ("truncated", lambda: ORIGINAL[:-10], "COSE_Sign1: not CBOR"),
    ("trailing bytes", lambda: ORIGINAL + b"\x00", "trailing bytes after the COSE_Sign1 structure (1 bytes)"),
    (
        "trailing CBOR item",
        lambda: ORIGINAL + cbor2.dumps([1]),
        "trailing bytes after the COSE_Sign1 structure",
    ),
    (
        "oversize",
        lambda: ORIGINAL + bytes(MAX_DOCUMENT_SIZE + 1 - len(ORIGINAL)),
        f"more than the limit of {MAX_DOCUMENT_SIZE}",
    ),
    ("not bytes", lambda: ORIGINAL.hex(), "expected bytes, got str"),
    ("too deep", lambda: cbor2.dumps(nested(50)), "COSE_Sign1: not CBOR: maximum container nesting depth"),
    # the COSE_Sign1 array
    ("not an array", lambda: cbor2.dumps({"a": 1}), "COSE_Sign1: expected an array, got a map"),
    ("an integer", lambda: cbor2.dumps(7), "COSE_Sign1: expected an array, got an integer"),
    ("3 elements", lambda: cbor2.dumps(ORIGINAL_OUTER[:3]), "expected an array of 4 elements, got 3"),
    ("5 elements", lambda: cbor2.dumps([*ORIGINAL_OUTER, b""]), "expected an array of 4 elements, got 5"),
    ("other tag", lambda: cbor2.dumps(cbor2.CBORTag(98, ORIGINAL_OUTER)), "unexpected CBOR tag 98 (only 18"),
    (
        "tag 18 twice",
        lambda: cbor2.dumps(cbor2.CBORTag(18, cbor2.CBORTag(18, ORIGINAL_OUTER))),
        "COSE_Sign1: expected an array, got tag 18",
    ),
    # protected header
    (
        "protected a map",
        lambda: set_outer(0, {1: -35}),
        "protected header: expected a byte string, got a map",
    ),
    ("protected empty", lambda: set_outer(0, b""), "protected header: empty, so no algorithm"),
    ("protected not CBOR", lambda: set_outer(0, b"\xff"), "protected header: not CBOR"),
    (
        "protected trailing",
        lambda: set_outer(0, cbor2.dumps({1: -35}) + b"\x00"),
        "trailing bytes after the protected header",
    ),
    (
        "protected an array",
        lambda: set_outer(0, cbor2.dumps([1, -35])),
        "protected header: expected a map, got an array",
    ),
    (
        "alg -7",
        lambda: set_outer(0, cbor2.dumps({1: -7})),
        "unsupported COSE algorithm -7 (only ES384, -35, is allowed)",
    ),
    ("alg ES256 -36", lambda: set_outer(0, cbor2.dumps({1: -36})), "unsupported COSE algorithm -36"),
    (
        "alg as text",
        lambda: set_outer(0, cbor2.dumps({1: "ES384"})),
        "algorithm must be an integer, got a text string",
    ),
    (
        "alg huge",
        lambda: set_outer(0, cbor2.dumps({1: -(2**20000)})),
        "unsupported COSE algorithm a 20001-bit integer",
    ),
    ("no alg", lambda: set_outer(0, cbor2.dumps({4: b"kid"})), "protected header: no algorithm (label 1)"),
    (
        "alg label true",
        lambda: set_outer(0, cbor2.dumps({True: -35})),
        "protected header: no algorithm (label 1)",
    ),
    (
        "extra kid",
        lambda: set_outer(0, cbor2.dumps({1: -35, 4: b"kid"})),
        "protected header: unsupported parameter 4",
    ),
    (
        "crit",
        lambda: set_outer(0, cbor2.dumps({1: -35, 2: [4]})),
        "protected header: unsupported parameter 2",
    ),
    ("text label", lambda: set_outer(0, cbor2.dumps({1: -35, "x": 1})), "unsupported parameter 'x'"),
    # unprotected header
    ("unprotected an array", lambda: set_outer(1, []), "unprotected header: expected a map, got an array"),
    ("unprotected bytes", lambda: set_outer(1, b""), "unprotected header: expected a map, got a byte string"),
    (
        "unprotected alg",
        lambda: set_outer(1, {1: -35}),
        "unprotected header: parameter 1 must not be unprotected",
    ),
    (
        "unprotected crit",
        lambda: set_outer(1, {2: [1]}),
        "unprotected header: parameter 2 must not be unprotected",
    ),
    # payload
    ("detached payload", lambda: set_outer(2, None), "a detached payload) is not supported"),
    (
        "payload a map",
        lambda: set_outer(2, {"module_id": "x"}),
        "COSE_Sign1 payload: expected a byte string, got a map",
    ),
    ("payload not CBOR", lambda: set_outer(2, b"\xff"), "payload: not CBOR"),
    ("payload empty", lambda: set_outer(2, b""), "payload: not CBOR: empty input"),
    ("payload an array", lambda: set_outer(2, cbor2.dumps([1, 2])), "payload: expected a map, got an array"),
    (
        "payload trailing",
        lambda: set_outer(2, ORIGINAL_OUTER[2] + b"\x00"),
        "trailing bytes after the payload map",
    ),
    (
        "payload duplicate key",
        duplicate_key_payload,
        "payload: not CBOR: error decoding map: Duplicate map key",
    ),
    # signature
    (
        "signature 95 bytes",
        lambda: set_outer(3, bytes(95)),
        "COSE_Sign1 signature: expected 96 bytes (ES384 r||s), got 95",
    ),
    ("signature 97 bytes", lambda: set_outer(3, bytes(97)), "expected 96 bytes (ES384 r||s), got 97"),
    (
        "signature text",
        lambda: set_outer(3, "sig"),
        "COSE_Sign1 signature: expected a byte string, got a text string",
    ),
    # payload map keys
    ("unknown field", lambda: set_payload("foo", 1), "payload: unknown field 'foo'"),
    ("integer field name", lambda: set_payload(1, 1), "field names must be text strings, got an integer"),
    # module_id
    (
        "module_id int",
        lambda: set_payload("module_id", 5),
        "payload.module_id: expected a text string, got an integer",
    ),
    (
        "module_id bytes",
        lambda: set_payload("module_id", b"i-0"),
        "payload.module_id: expected a text string, got a byte string",
    ),
    ("module_id empty", lambda: set_payload("module_id", ""), "payload.module_id: must not be empty"),
    # digest
    (
        "digest SHA256",
        lambda: set_payload("digest", "SHA256"),
        "payload.digest: expected 'SHA384', got 'SHA256'",
    ),
    (
        "digest lower case",
        lambda: set_payload("digest", "sha384"),
        "payload.digest: expected 'SHA384', got 'sha384'",
    ),
    (
        "digest bytes",
        lambda: set_payload("digest", b"SHA384"),
        "payload.digest: expected a text string, got a byte string",
    ),
    # timestamp
    (
        "timestamp text",
        lambda: set_payload("timestamp", "1700000000000"),
        "payload.timestamp: expected an unsigned integer, got a text string",
    ),
    (
        "timestamp float",
        lambda: set_payload("timestamp", 1.7e12),
        "payload.timestamp: expected an unsigned integer, got a float",
    ),
    (
        "timestamp bool",
        lambda: set_payload("timestamp", True),
        "payload.timestamp: expected an unsigned integer, got a boolean",
    ),
    (
        "timestamp zero",
        lambda: set_payload("timestamp", 0),
        "payload.timestamp: must be greater than 0, got 0",
    ),
    (
        "timestamp negative",
        lambda: set_payload("timestamp", -5),
        "payload.timestamp: must be greater than 0, got -5",
    ),
    (
        "timestamp uint64 max",
        lambda: set_payload("timestamp", 2**64 - 1),
        "payload.timestamp: 18446744073709551615 ms is after the year 9999",
    ),
    (
        "timestamp bignum",
        lambda: set_payload("timestamp", 2**20000),
        "payload.timestamp: a 20001-bit integer ms is after the year 9999",
    ),
    (
        "timestamp negative bignum",
        lambda: set_payload("timestamp", -(2**20000)),
        "must be greater than 0, got a 20001-bit integer",
    ),
    (
        "timestamp as a tag-1 datetime",
        lambda: set_payload("timestamp", cbor2.CBORTag(1, 1.7e9)),
        "payload.timestamp: expected an unsigned integer, got datetime",
    ),
    (
        "rational with a zero denominator",
        lambda: set_payload("timestamp", cbor2.CBORTag(30, [1, 0])),
        "payload: not CBOR",
    ),
    # pcrs
    ("pcrs an array", lambda: set_payload("pcrs", [ZERO48]), "payload.pcrs: expected a map, got an array"),
    ("pcrs empty", lambda: set_payload("pcrs", {}), "payload.pcrs: expected 1 to 32 entries, got 0"),
    (
        "pcrs 33",
        lambda: set_payload("pcrs", {i: ZERO48 for i in range(33)}),
        "payload.pcrs: expected 1 to 32 entries, got 33",
    ),
    (
        "pcr index 32",
        lambda: set_payload("pcrs", {32: ZERO48}),
        "payload.pcrs: index 32 is out of range 0..31",
    ),
    (
        "pcr index -1",
        lambda: set_payload("pcrs", {-1: ZERO48}),
        "payload.pcrs: index -1 is out of range 0..31",
    ),
    (
        "pcr index text",
        lambda: set_payload("pcrs", {"0": ZERO48}),
        "payload.pcrs: index must be an integer, got a text string",
    ),
    (
        "pcr index bool",
        lambda: set_payload("pcrs", {True: ZERO48}),
        "payload.pcrs: index must be an integer, got a boolean",
    ),
    (
        "pcr 47 bytes",
        lambda: set_payload("pcrs", {0: ZERO48, 3: bytes(47)}),
        "payload.pcrs[3]: expected 32, 48 or 64 bytes, got 47",
    ),
    (
        "pcr empty",
        lambda: set_payload("pcrs", {5: b""}),
        "payload.pcrs[5]: expected 32, 48 or 64 bytes, got 0",
    ),
    (
        "pcr text",
        lambda: set_payload("pcrs", {0: "00" * 48}),
        "payload.pcrs[0]: expected a byte string, got a text string",
    ),
    # certificate
    (
        "certificate text",
        lambda: set_payload("certificate", "MII..."),
        "payload.certificate: expected a byte string, got a text string",
    ),
    (
        "certificate empty",
        lambda: set_payload("certificate", b""),
        "payload.certificate: expected 1..1024 bytes, got 0",
    ),
    (
        "certificate 1025",
        lambda: set_payload("certificate", bytes(1025)),
        "payload.certificate: expected 1..1024 bytes, got 1025",
    ),
    # cabundle
    (
        "cabundle a map",
        lambda: set_payload("cabundle", {0: b"x"}),
        "payload.cabundle: expected an array, got a map",
    ),
    (
        "cabundle bytes",
        lambda: set_payload("cabundle", b"x"),
        "payload.cabundle: expected an array, got a byte string",
    ),
    ("cabundle empty", lambda: set_payload("cabundle", []), "payload.cabundle: must not be empty"),
    (
        "cabundle 17",
        lambda: set_payload("cabundle", [b"x"] * 17),
        "payload.cabundle: 17 certificates, more than 16",
    ),
    (
        "cabundle entry text",
        lambda: set_payload("cabundle", [b"x", "y"]),
        "payload.cabundle[1]: expected a byte string, got a text string",
    ),
    (
        "cabundle entry empty",
        lambda: set_payload("cabundle", [b"x", b""]),
        "payload.cabundle[1]: expected 1..1024 bytes, got 0",
    ),
    (
        "cabundle entry 1025",
        lambda: set_payload("cabundle", [bytes(1025)]),
        "payload.cabundle[0]: expected 1..1024 bytes, got 1025",
    ),
    # optional fields
    (
        "public_key text",
        lambda: set_payload("public_key", "PEM"),
        "payload.public_key: expected a byte string, got a text string",
    ),
    (
        "public_key 1025",
        lambda: set_payload("public_key", bytes(1025)),
        "payload.public_key: expected 0..1024 bytes, got 1025",
    ),
    (
        "user_data int",
        lambda: set_payload("user_data", 0),
        "payload.user_data: expected a byte string, got an integer",
    ),
    (
        "user_data 513",
        lambda: set_payload("user_data", bytes(513)),
        "payload.user_data: expected 0..512 bytes, got 513",
    ),
    (
        "nonce array",
        lambda: set_payload("nonce", [b"n"]),
        "payload.nonce: expected a byte string, got an array",
    ),
    ("nonce 513", lambda: set_payload("nonce", bytes(513)), "payload.nonce: expected 0..512 bytes, got 513"),
    (
        "nonce false",
        lambda: set_payload("nonce", False),
        "payload.nonce: expected a byte string, got a boolean",
    ),
    (
        "nonce undefined",
        lambda: set_payload("nonce", cbor2.undefined),
        "payload.nonce: expected a byte string, got undefined",
    ),
    (
        "public_key simple value",
        lambda: set_payload("public_key", cbor2.CBORSimpleValue(99)),
        "payload.public_key: expected a byte string, got simple value 99",
    ),
    (
        "user_data too deep",
        lambda: set_payload("user_data", nested(20)),
        "payload: not CBOR: maximum container nesting depth",
    ),
]
REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")


def without(field: str) -> bytes:
    return rebuild(DEFINITE, payload=lambda p: p.pop(field))


MALFORMED += [
    (f"missing {f}", partial(without, f), f"payload: missing required field {f!r}") for f in REQUIRED
]
MALFORMED += [
    (f"null {f}", partial(set_payload, f, None), f"payload.{f}: null (the field is required)")
    for f in REQUIRED
]


@pytest.mark.parametrize(
    ("make", "message"), [(m, msg) for _, m, msg in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_each_malformed_document_gets_its_specific_error(make: Callable[[], Any], message: str) -> None:
    # Threat: hostile bytes from the network. Each problem is refused with a DocumentError (an
    # AttestationError), never with an exception from cbor2 or Python that a caller would not catch.
    data = make()
    with pytest.raises(DocumentError) as caught:
        parse_document(data)
    assert message in str(caught.value)
    assert isinstance(caught.value, AttestationError)
    assert len(str(caught.value)) < 400  # one line a person can read, not a dump of the input


def test_the_malformed_cases_differ_from_a_valid_document_in_one_respect() -> None:
    # The helpers must produce valid documents when they change nothing, or the cases above would
    # pass for the wrong reason.
    assert parse_document(rebuild(DEFINITE)) == parse_document(ORIGINAL)
    assert parse_document(rebuild(DEFINITE, payload=lambda p: None)).payload == cbor2.loads(ORIGINAL)[2]
    assert parse_document(set_outer(1, {})) == parse_document(ORIGINAL)


def test_cbor_errors_are_chained_for_debugging_but_not_raised() -> None:
    with pytest.raises(DocumentError) as caught:
        parse_document(b"\x5a\xff\xff\xff\xff")  # a 4 GiB byte string announced in 5 bytes
    assert isinstance(caught.value.__cause__, cbor2.CBORDecodeError)
