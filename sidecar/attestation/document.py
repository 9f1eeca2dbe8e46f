"""Parsing AWS Nitro attestation documents: a COSE_Sign1 (RFC 9052) whose payload is a CBOR map.

:func:`parse_document` checks structure and types only, following AWS's rules ("Syntactical
validation" in aws-nitro-enclaves-nsm-api ``docs/attestation_process.md``); it proves nothing about
who made the document: :mod:`sidecar.attestation.verify` checks the signature and the chain.

What real documents do, and so what is accepted: tagged (18) or untagged COSE_Sign1; definite or
indefinite-length maps; ``public_key``, ``user_data`` and ``nonce`` as CBOR null, empty bytes or
absent; a ``public_key`` that is not DER. Everything else that deviates is a :class:`DocumentError`
whose message names the field, and no other exception escapes: the input comes from the network.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import cbor2

MAX_DOCUMENT_SIZE: Final = 16 * 1024  # real documents are about 4.5 KB
# Real documents nest two deep (the COSE array and its header map; the payload map and its pcrs map);
# a low limit stops deep-nesting tricks before they cost anything.
MAX_DEPTH: Final = 8
COSE_SIGN1_TAG: Final = 18
ALG_LABEL: Final = 1
CRIT_LABEL: Final = 2
ES384: Final = -35
SIGNATURE_SIZE: Final = 96  # ES384: r || s, 48 bytes each
DIGEST: Final = "SHA384"
PCR_SIZES: Final = (32, 48, 64)
MAX_PCRS: Final = 32
MAX_CERT_SIZE: Final = 1024
MAX_CABUNDLE: Final = 16  # not an AWS limit (real bundles hold 4); bounds the work per document
MAX_PUBLIC_KEY: Final = 1024
MAX_USER_DATA: Final = 512
MAX_NONCE: Final = 512
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Past this, a millisecond timestamp has no datetime (year 9999); AWS's own bound is uint64.
MAX_TIMESTAMP: Final = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)
REQUIRED_FIELDS: Final = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL_FIELDS: Final = {"public_key": MAX_PUBLIC_KEY, "user_data": MAX_USER_DATA, "nonce": MAX_NONCE}


class AttestationError(Exception):
    """Base of every error raised by :mod:`sidecar.attestation`'s document and verification code."""


class DocumentError(AttestationError):
    """The bytes are not a well-formed attestation document; the message names the field."""


@dataclass(frozen=True)
class AttestationDocument:
    """A parsed, *not yet verified* attestation document.

    ``protected``, ``payload`` and ``signature`` are the exact COSE_Sign1 byte strings, so the
    signature can be checked over what was signed. ``tagged`` (CBOR tag 18 or not) and the
    unprotected header are outside the signature. Optional fields keep what the document said:
    None when null or absent, ``b""`` when empty. ``cabundle`` is in AWS's order, root first.
    """

    protected: bytes
    payload: bytes
    signature: bytes
    tagged: bool
    module_id: str
    digest: str
    timestamp: int  # milliseconds since the Unix epoch, UTC
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    # frozen+eq would generate a hash over ``pcrs``, a dict, and fail; the signed bytes identify
    # the document.
    def __hash__(self) -> int:
        return hash((self.protected, self.payload, self.signature, self.tagged))

    def sig_structure(self) -> bytes:
        """The bytes the ES384 signature covers: ``["Signature1", protected, h'', payload]``."""
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])

    @property
    def timestamp_datetime(self) -> datetime:
        """The document's timestamp as an aware UTC datetime (millisecond precision)."""
        return _EPOCH + timedelta(milliseconds=self.timestamp)


def parse_document(data: bytes) -> AttestationDocument:
    """Parse a COSE_Sign1 attestation document; raise :class:`DocumentError` on any problem."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DocumentError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_DOCUMENT_SIZE:
        raise DocumentError(f"document is {len(data)} bytes, more than the limit of {MAX_DOCUMENT_SIZE}")
    outer = _decode(data, "COSE_Sign1", "the COSE_Sign1 structure")
    tagged = isinstance(outer, cbor2.CBORTag)
    if tagged:
        if outer.tag != COSE_SIGN1_TAG:
            raise DocumentError(
                f"unexpected CBOR tag {outer.tag} (only {COSE_SIGN1_TAG}, COSE_Sign1, is allowed)"
            )
        outer = outer.value
    if not _is_array(outer):
        raise DocumentError(f"COSE_Sign1: expected an array, got {_kind(outer)}")
    if len(outer) != 4:
        raise DocumentError(f"COSE_Sign1: expected an array of 4 elements, got {len(outer)}")
    protected, unprotected, payload, signature = outer
    _check_protected(protected)
    _check_unprotected(unprotected)
    if payload is None:
        raise DocumentError("COSE_Sign1 payload: null (a detached payload) is not supported")
    if not isinstance(payload, bytes):
        raise DocumentError(f"COSE_Sign1 payload: expected a byte string, got {_kind(payload)}")
    if not isinstance(signature, bytes):
        raise DocumentError(f"COSE_Sign1 signature: expected a byte string, got {_kind(signature)}")
    if len(signature) != SIGNATURE_SIZE:
        raise DocumentError(
            f"COSE_Sign1 signature: expected {SIGNATURE_SIZE} bytes (ES384 r||s), got {len(signature)}"
        )
    fields = _parse_payload(payload)
    return AttestationDocument(
        protected=protected, payload=payload, signature=signature, tagged=tagged, **fields
    )


def _decode(data: bytes, what: str, trailing_what: str) -> Any:
    """One CBOR item that spans exactly ``data``. Every decoder failure becomes a DocumentError."""
    if not data:
        raise DocumentError(f"{what}: not CBOR: empty input")
    stream = io.BytesIO(data)
    try:
        # immutable: tagged items decode immutable anyway, so both shapes give the same types.
        item = cbor2.CBORDecoder(stream, max_depth=MAX_DEPTH, allow_duplicate_keys=False).decode(
            immutable=True
        )
    except Exception as exc:  # cbor2 errors, but also e.g. ValueError from a semantic tag's decoder
        raise DocumentError(f"{what}: not CBOR: {str(exc)[:200]}") from exc
    # The decoder stops after one item; anything after it would be unsigned, ignored data.
    extra = len(data) - stream.tell()
    if extra:
        raise DocumentError(f"trailing bytes after {trailing_what} ({extra} bytes)")
    return item


def _check_protected(protected: Any) -> None:
    if not isinstance(protected, bytes):
        raise DocumentError(f"COSE_Sign1 protected header: expected a byte string, got {_kind(protected)}")
    if not protected:
        raise DocumentError("protected header: empty, so no algorithm (only ES384, -35, is allowed)")
    header = _decode(protected, "protected header", "the protected header")
    if not isinstance(header, Mapping):
        raise DocumentError(f"protected header: expected a map, got {_kind(header)}")
    # Labels compare by type too: CBOR true or 1.0 is not label 1, though Python says True == 1.
    labels = [label for label in header if not (_is_int(label) and label == ALG_LABEL)]
    if len(labels) == len(header):
        raise DocumentError("protected header: no algorithm (label 1)")
    alg = header[ALG_LABEL]
    if not _is_int(alg):
        raise DocumentError(f"protected header: algorithm must be an integer, got {_kind(alg)}")
    if alg != ES384:
        raise DocumentError(f"unsupported COSE algorithm {_num(alg)} (only ES384, {ES384}, is allowed)")
    # Anything else is signed but not understood (crit, content type, ...): refuse it rather than
    # ignore something the signer meant to matter. AWS's header is exactly {1: -35}.
    if labels:
        raise DocumentError(
            f"protected header: unsupported parameter {_label(labels[0])} (only alg, 1, is allowed)"
        )


def _check_unprotected(unprotected: Any) -> None:
    if not isinstance(unprotected, Mapping):
        raise DocumentError(f"COSE_Sign1 unprotected header: expected a map, got {_kind(unprotected)}")
    # Unsigned parameters are ignored, except the ones that would claim to steer verification.
    for label in unprotected:
        if _is_int(label) and label in (ALG_LABEL, CRIT_LABEL):
            raise DocumentError(f"unprotected header: parameter {label} must not be unprotected")


def _parse_payload(payload: bytes) -> dict[str, Any]:
    body = _decode(payload, "payload", "the payload map")
    if not isinstance(body, Mapping):
        raise DocumentError(f"payload: expected a map, got {_kind(body)}")
    for key in body:
        if not isinstance(key, str):
            raise DocumentError(f"payload: field names must be text strings, got {_kind(key)}")
        if key not in REQUIRED_FIELDS and key not in OPTIONAL_FIELDS:
            # AWS lists the allowed fields; an unknown one could mean something to another verifier.
            raise DocumentError(f"payload: unknown field {key[:40]!r}")
    for key in REQUIRED_FIELDS:
        if key not in body:
            raise DocumentError(f"payload: missing required field {key!r}")
        if body[key] is None:
            raise DocumentError(f"payload.{key}: null (the field is required)")

    module_id = body["module_id"]
    if not isinstance(module_id, str):
        raise DocumentError(f"payload.module_id: expected a text string, got {_kind(module_id)}")
    if not module_id:
        raise DocumentError("payload.module_id: must not be empty")
    if not (module_id.isascii() and module_id.isprintable()):
        # AWS's ids are like i-0123...-enc0123...; control characters could forge terminal output.
        raise DocumentError("payload.module_id: must be printable ASCII")

    digest = body["digest"]
    if not isinstance(digest, str):
        raise DocumentError(f"payload.digest: expected a text string, got {_kind(digest)}")
    if digest != DIGEST:
        raise DocumentError(f"payload.digest: expected {DIGEST!r}, got {digest[:20]!r}")

    timestamp = body["timestamp"]
    if not _is_int(timestamp):
        raise DocumentError(f"payload.timestamp: expected an unsigned integer, got {_kind(timestamp)}")
    if timestamp <= 0:
        raise DocumentError(f"payload.timestamp: must be greater than 0, got {_num(timestamp)}")
    if timestamp > MAX_TIMESTAMP:
        raise DocumentError(f"payload.timestamp: {_num(timestamp)} ms is after the year 9999")

    return {
        "module_id": module_id,
        "digest": digest,
        "timestamp": timestamp,
        "pcrs": _parse_pcrs(body["pcrs"]),
        "certificate": _bstr("payload.certificate", body["certificate"], 1, MAX_CERT_SIZE),
        "cabundle": _parse_cabundle(body["cabundle"]),
        **{
            name: None if body.get(name) is None else _bstr(f"payload.{name}", body[name], 0, limit)
            for name, limit in OPTIONAL_FIELDS.items()
        },
    }


def _parse_pcrs(pcrs: Any) -> dict[int, bytes]:
    if not isinstance(pcrs, Mapping):
        raise DocumentError(f"payload.pcrs: expected a map, got {_kind(pcrs)}")
    if not 1 <= len(pcrs) <= MAX_PCRS:
        raise DocumentError(f"payload.pcrs: expected 1 to {MAX_PCRS} entries, got {len(pcrs)}")
    out: dict[int, bytes] = {}
    for index, value in pcrs.items():
        if not _is_int(index):
            raise DocumentError(f"payload.pcrs: index must be an integer, got {_kind(index)}")
        if not 0 <= index < MAX_PCRS:
            raise DocumentError(f"payload.pcrs: index {_num(index)} is out of range 0..{MAX_PCRS - 1}")
        if not isinstance(value, bytes):
            raise DocumentError(f"payload.pcrs[{index}]: expected a byte string, got {_kind(value)}")
        if len(value) not in PCR_SIZES:
            raise DocumentError(f"payload.pcrs[{index}]: expected 32, 48 or 64 bytes, got {len(value)}")
        out[index] = value
    return dict(sorted(out.items()))


def _parse_cabundle(cabundle: Any) -> tuple[bytes, ...]:
    if not _is_array(cabundle):
        raise DocumentError(f"payload.cabundle: expected an array, got {_kind(cabundle)}")
    if not cabundle:
        raise DocumentError("payload.cabundle: must not be empty")
    if len(cabundle) > MAX_CABUNDLE:
        raise DocumentError(f"payload.cabundle: {len(cabundle)} certificates, more than {MAX_CABUNDLE}")
    return tuple(_bstr(f"payload.cabundle[{i}]", cert, 1, MAX_CERT_SIZE) for i, cert in enumerate(cabundle))


def _bstr(name: str, value: Any, low: int, high: int) -> bytes:
    if not isinstance(value, bytes):
        raise DocumentError(f"{name}: expected a byte string, got {_kind(value)}")
    if not low <= len(value) <= high:
        raise DocumentError(f"{name}: expected {low}..{high} bytes, got {len(value)}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_array(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _kind(value: Any) -> str:
    """The CBOR name of a decoded value's type, for messages (never the value: it is untrusted)."""
    if value is None:
        return "null"
    if value is cbor2.undefined:
        return "undefined"
    if isinstance(value, cbor2.CBORSimpleValue):
        return f"simple value {value.value}"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, bytes):
        return "a byte string"
    if isinstance(value, str):
        return "a text string"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, Mapping):
        return "a map"
    if _is_array(value):
        return "an array"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return type(value).__name__


def _num(value: int) -> str:
    # A bignum (tag 2/3) can have thousands of digits: str() of it is slow, and past 4300 digits
    # Python refuses with ValueError.
    return str(value) if -(10**24) < value < 10**24 else f"a {value.bit_length()}-bit integer"


def _label(label: Any) -> str:
    if _is_int(label):
        return _num(label)
    if isinstance(label, str):
        return repr(label[:20])
    return _kind(label)
