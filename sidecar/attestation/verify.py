"""Verifying AWS Nitro attestation documents: signature, chain to a trusted root, validity, expectations.

The rules are AWS's ("Semantical validation" in aws-nitro-enclaves-nsm-api
``docs/attestation_process.md``):

- the COSE_Sign1 is ES384, signed by the key of ``certificate`` (the leaf). High-S signatures are
  accepted: real Nitro documents have them, and ECDSA verification does not care;
- the chain is ``certificate -> cabundle[n-1] -> ... -> cabundle[1] -> cabundle[0]``, and
  ``cabundle[0]`` must be byte for byte the trusted root: the bundled AWS Nitro Enclaves root G1
  (its SHA-256 is checked when it is loaded) or one given explicitly;
- each certificate is signed by the next one up with ECDSA P-384/SHA-384 and names it as issuer; CA
  certificates have a critical basicConstraints with ``ca=True`` and a pathLen that allows the
  CAs below them, and keyUsage ``keyCertSign``; the leaf is not a CA and has ``digitalSignature``;
  critical extensions other than these two are refused, and so is a certificate whose signature
  BIT STRING claims unused bits (a second encoding of the same certificate);
- every certificate, the root included, is valid at the verification time: now, or an explicit
  ``at`` (the only thing that may move it: the CLI's ``--at``);
- the document's timestamp is not after the verification time by more than :data:`CLOCK_SKEW`;
- then the caller's expectations: PCR values, nonce, user_data, public_key, and a maximum age.

:func:`verify_document` never raises for a bad document: it returns a :class:`VerificationResult`
listing every check that ran. Checks stop at the first failure, since what follows a failed check
would be about data nobody vouches for.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Final

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from sidecar.attestation.document import AttestationDocument, AttestationError, DocumentError, parse_document

__all__ = [
    "AWS_NITRO_ROOT_SHA256",
    "AttestationDocument",
    "AttestationError",
    "Check",
    "DocumentError",
    "Expectations",
    "VerificationError",
    "VerificationResult",
    "load_aws_root",
    "load_root_pem",
    "verify_document",
]

AWS_NITRO_ROOT_SHA256: Final = "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"
AWS_NITRO_ROOT_RESOURCE: Final = "aws_nitro_root.pem"
# How far in the future (relative to the verification time) a document's timestamp may be.
CLOCK_SKEW: Final = timedelta(minutes=5)
_ES384: Final = ec.ECDSA(hashes.SHA384())
_COORD: Final = 48  # bytes of r and of s in an ES384 signature
_UNDERSTOOD_CRITICAL: Final = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


class VerificationError(AttestationError):
    """Verification could not be done as asked (bad arguments, untrusted root), or it failed."""


@dataclass(frozen=True)
class Expectations:
    """What the caller requires of a verified document, beyond the signature and chain.

    ``pcrs`` maps PCR index to its exact expected value. ``nonce``, ``user_data`` and ``public_key``
    must equal the document's field when given (a document without the field fails; give ``b""``
    to require an empty one). ``max_age`` bounds ``at - timestamp``.
    """

    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    nonce: bytes | None = None
    user_data: bytes | None = None
    public_key: bytes | None = None
    max_age: timedelta | None = None


@dataclass(frozen=True)
class Check:
    """One verification step: its name, whether it passed, and why (or what it established)."""

    name: str
    ok: bool
    detail: str


@dataclass
class VerificationResult:
    """The outcome of :func:`verify_document`.

    ``checks`` lists every check that ran, in order; ``failure`` is the first failed check's reason
    (None when ``ok``). ``chain`` is the certificate path as far as it was loaded, **leaf first** and
    the trusted root last. ``at`` is the verification time used (aware, UTC).
    """

    ok: bool
    document: AttestationDocument | None
    checks: list[Check]
    failure: str | None
    chain: list[x509.Certificate]
    at: datetime

    def raise_for_failure(self) -> None:
        if not self.ok:
            raise VerificationError(self.failure or "verification did not complete")


class _Failed(Exception):
    """A check failed; the message is the one-line reason."""


# --- roots -----------------------------------------------------------------------------------------


def _bundled_root_pem() -> bytes:
    return resources.files("sidecar.attestation").joinpath(AWS_NITRO_ROOT_RESOURCE).read_bytes()


def load_root_pem(data: bytes) -> x509.Certificate:
    """Load one explicitly trusted root certificate from PEM (or DER) bytes."""
    if not isinstance(data, bytes | bytearray):
        raise VerificationError(f"a root certificate must be bytes, got {type(data).__name__}")
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(bytes(data))
        else:
            certs = [x509.load_der_x509_certificate(bytes(data))]
    except Exception as exc:  # cryptography raises ValueError, but a bad file must not escape as one
        raise VerificationError(f"not a PEM or DER certificate: {exc}") from exc
    if len(certs) != 1:
        # A bundle would silently trust only its first certificate; say so instead.
        raise VerificationError(f"expected exactly one root certificate, found {len(certs)}")
    return certs[0]


def load_aws_root() -> x509.Certificate:
    """The bundled AWS Nitro Enclaves root G1, refused unless its DER has the published SHA-256."""
    try:
        pem = _bundled_root_pem()
    except OSError as exc:
        raise VerificationError(f"cannot read the bundled AWS Nitro root: {exc}") from exc
    cert = load_root_pem(pem)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
    # Threat: an altered install (file replaced by an attacker's root) silently trusting forgeries.
    if fingerprint != AWS_NITRO_ROOT_SHA256:
        raise VerificationError(
            f"the bundled AWS Nitro root has SHA-256 {fingerprint}, expected {AWS_NITRO_ROOT_SHA256}: "
            "the installation has been modified, refusing to trust it"
        )
    return cert


_aws_root: x509.Certificate | None = None


def _default_root() -> x509.Certificate:
    # Only success is cached: a failed load (tampered file) is retried and fails again every time.
    global _aws_root
    if _aws_root is None:
        _aws_root = load_aws_root()
    return _aws_root


@dataclass(frozen=True)
class _Anchor:
    """A trusted root, with what every verification needs from it worked out once."""

    cert: x509.Certificate
    der: bytes
    key: ec.EllipticCurvePublicKey | None
    path_len: int | None
    problem: str | None  # why it cannot anchor a Nitro chain, or None


@functools.lru_cache(maxsize=8)
def _anchor(root: x509.Certificate) -> _Anchor:
    der = root.public_bytes(Encoding.DER)
    try:
        key = _p384_key(root, "root")
        path_len = _check_ca(root, "root", below=None)
    except _Failed as exc:
        return _Anchor(root, der, None, None, str(exc))
    except Exception as exc:  # malformed extensions in a caller-supplied root
        return _Anchor(root, der, None, None, f"root: {type(exc).__name__}: {exc}")
    return _Anchor(root, der, key, path_len, None)


# --- verification ----------------------------------------------------------------------------------


def verify_document(
    data: bytes | AttestationDocument,
    *,
    root: x509.Certificate | None = None,
    at: datetime | None = None,
    expect: Expectations | None = None,
) -> VerificationResult:
    """Verify a document (bytes or already parsed) and report each check.

    Raises :class:`VerificationError` only for bad arguments (a naive ``at``, a ``root`` that is not
    a certificate, malformed expectations); a bad document is a result with ``ok=False``. A parsed
    document must still match its own signed payload (one edited with ``dataclasses.replace``
    fails the "parse" check); re-checking that costs a re-parse, about 50 us.
    """
    when = _check_at(at)
    wanted = _check_expectations(expect)
    if root is not None and not isinstance(root, x509.Certificate):
        raise VerificationError(f"root must be an x509.Certificate, got {type(root).__name__}")
    result = VerificationResult(ok=False, document=None, checks=[], failure=None, chain=[], at=when)

    def step(name: str, check: Callable[[], str]) -> bool:
        try:
            detail = check()
        except _Failed as exc:
            reason = str(exc)
        except Exception as exc:  # cryptography on hostile DER, say: a failed check, never a crash
            reason = f"{type(exc).__name__}: {exc}"
        else:
            result.checks.append(Check(name, True, detail))
            return True
        result.checks.append(Check(name, False, reason))
        result.failure = f"{name}: {reason}"
        return False

    if isinstance(data, AttestationDocument):
        doc = data
        if not step("parse", lambda: _check_given(doc)):
            return result
    else:
        parsed: list[AttestationDocument] = []

        def parse() -> str:
            try:
                parsed.append(parse_document(data))
            except DocumentError as exc:
                raise _Failed(str(exc)) from exc
            return f"COSE_Sign1{' (tagged)' if parsed[0].tagged else ''}, {len(data)} bytes"

        if not step("parse", parse):
            return result
        doc = parsed[0]
    result.document = doc

    leaf: list[x509.Certificate] = []
    if not step("signature", lambda: _verify_signature(doc, leaf)):
        return result
    if not step("chain", lambda: _verify_chain(doc, leaf[0], root, result.chain)):
        return result
    if not step("validity", lambda: _verify_validity(result.chain, when)):
        return result
    if not step("timestamp", lambda: _verify_timestamp(doc, when)):
        return result
    for index, value in sorted(wanted.pcrs.items()):
        if not step(f"pcr{index}", functools.partial(_expect_pcr, doc, index, value)):
            return result
    for name in ("nonce", "user_data", "public_key"):
        expected: bytes | None = getattr(wanted, name)
        if expected is not None and not step(name, functools.partial(_expect_field, doc, name, expected)):
            return result
    max_age = wanted.max_age
    if max_age is not None and not step("max_age", lambda: _expect_age(doc, when, max_age)):
        return result
    result.ok = True
    return result


def _check_at(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    if not isinstance(at, datetime):
        raise VerificationError(f"at must be a datetime, got {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise VerificationError("at must be timezone-aware (a naive datetime is ambiguous)")
    try:
        return at.astimezone(UTC)
    except OverflowError:  # year 1 at +01:00 is before the first UTC instant datetime can hold
        raise VerificationError(f"at {at.isoformat()} is out of range in UTC") from None


def _check_expectations(expect: Expectations | None) -> Expectations:
    if expect is None:
        return Expectations()
    if not isinstance(expect, Expectations):
        raise VerificationError(f"expect must be an Expectations, got {type(expect).__name__}")
    if not isinstance(expect.pcrs, Mapping):
        raise VerificationError("expect.pcrs must map PCR index to bytes")
    for index, value in expect.pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= 31:
            raise VerificationError(f"expect.pcrs: index must be 0..31, got {index!r}")
        if not isinstance(value, bytes):
            raise VerificationError(f"expect.pcrs[{index}] must be bytes, got {type(value).__name__}")
    for name in ("nonce", "user_data", "public_key"):
        value = getattr(expect, name)
        if value is not None and not isinstance(value, bytes):
            raise VerificationError(f"expect.{name} must be bytes or None, got {type(value).__name__}")
    if expect.max_age is not None and (
        not isinstance(expect.max_age, timedelta) or expect.max_age < timedelta(0)
    ):
        raise VerificationError("expect.max_age must be a non-negative timedelta or None")
    return expect


def _check_given(doc: AttestationDocument) -> str:
    # Only the payload is signed: fields edited after parsing (dataclasses.replace) must not be
    # verified as if the signer had said them.
    try:
        reparsed = parse_document(cbor2.dumps([doc.protected, {}, doc.payload, doc.signature]))
    except DocumentError as exc:
        raise _Failed(f"the given document does not parse: {exc}") from exc
    if dataclasses.replace(reparsed, tagged=doc.tagged) != doc:
        raise _Failed("the given document's fields do not match its signed payload")
    return "given a parsed document; its fields match its payload"


def _load(der: bytes, label: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise _Failed(f"{label} is not a DER X.509 certificate: {exc}") from exc


def _p384_key(cert: x509.Certificate, label: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except Exception as exc:  # an unsupported or malformed key
        raise _Failed(f"{label}: unusable public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise _Failed(f"{label}: the key is {_key_kind(key)}, expected ECDSA P-384")
    return key


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _verify_signature(doc: AttestationDocument, leaf_out: list[x509.Certificate]) -> str:
    leaf = _load(doc.certificate, "certificate")
    leaf_out.append(leaf)
    key = _p384_key(leaf, "certificate")
    sig = doc.signature
    # COSE carries r || s; cryptography wants DER. Low S is deliberately not required.
    der = encode_dss_signature(int.from_bytes(sig[:_COORD]), int.from_bytes(sig[_COORD:]))
    try:
        key.verify(der, doc.sig_structure(), _ES384)
    except InvalidSignature:
        raise _Failed("the ES384 signature does not match the certificate's key") from None
    return "ES384 over the COSE Sig_structure, by the certificate's key"


def _verify_chain(
    doc: AttestationDocument,
    leaf: x509.Certificate,
    root: x509.Certificate | None,
    path: list[x509.Certificate],
) -> str:
    try:
        trusted = root if root is not None else _default_root()
    except VerificationError as exc:
        raise _Failed(str(exc)) from exc
    anchor = _anchor(trusted)
    if anchor.problem is not None:
        raise _Failed(f"the trusted root cannot anchor a chain: {anchor.problem}")
    assert anchor.key is not None
    bundle = doc.cabundle
    # Threat: a chain that ends in the attacker's own root. Only the trusted root's exact bytes
    # count; a look-alike with the same name or key but other bytes is refused.
    if bundle[0] != anchor.der:
        raise _Failed("cabundle[0] is not the trusted root certificate")
    # Path, leaf first: certificate, cabundle[n-1], ..., cabundle[1], root.
    labels = _labels(len(bundle) + 1)
    path.append(leaf)
    path.extend(_load(bundle[i], f"cabundle[{i}]") for i in range(len(bundle) - 1, 0, -1))
    path.append(anchor.cert)

    # Cheap structural checks first, so a malformed chain costs no signature verifications.
    _check_leaf(leaf)
    for depth in range(1, len(path) - 1):
        # ``depth - 1`` CA certificates sit between this one and the leaf.
        _check_ca(path[depth], labels[depth], below=depth - 1)
    if anchor.path_len is not None and anchor.path_len < len(path) - 2:
        raise _Failed(
            f"root: pathLen {anchor.path_len} does not allow the {len(path) - 2} CA certificates below it"
        )
    ders = [doc.certificate, *(bundle[i] for i in range(len(bundle) - 1, 0, -1))]
    for child, der, label in zip(path[:-1], ders, labels[:-1], strict=True):
        _check_signature_encoding(child, der, label)
        if child.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
            raise _Failed(
                f"{label}: signature algorithm {child.signature_algorithm_oid.dotted_string}, "
                "expected ecdsa-with-SHA384"
            )

    # Signatures from the root down: a forged link is found with as little work as possible.
    for depth in range(len(path) - 2, -1, -1):
        child, parent, label, parent_label = path[depth], path[depth + 1], labels[depth], labels[depth + 1]
        if depth + 1 < len(path) - 1:  # the root's key was checked when it was trusted
            _p384_key(parent, parent_label)
        try:
            child.verify_directly_issued_by(parent)
        except InvalidSignature:
            raise _Failed(f"{label}: signature does not verify with {parent_label}'s key") from None
        except ValueError as exc:  # issuer name differs from the parent's subject
            raise _Failed(f"{label}: not issued by {parent_label}: {exc}") from None
    return f"{len(path)} certificates from the leaf to the trusted root"


def _check_signature_encoding(cert: x509.Certificate, der: bytes, label: str) -> None:
    """Refuse a second encoding of the same certificate.

    A certificate ends with its signature, a BIT STRING whose first content octet counts unused
    bits; ``cryptography`` accepts a non-zero count (found by the fuzz tests), so flipping that
    octet gives different bytes with the same TBS and signature, which would still verify. An ECDSA
    signature is whole octets: the count must be 0.
    """
    signature = cert.signature
    if not der.endswith(signature) or der[-len(signature) - 1] != 0:
        raise _Failed(f"{label}: the signature BIT STRING is not whole octets (a non-DER re-encoding)")


def _extensions(
    cert: x509.Certificate, label: str
) -> tuple[x509.BasicConstraints | None, bool, x509.KeyUsage | None]:
    """basicConstraints, whether it is critical, and keyUsage; refuses critical extensions not understood."""
    basic: x509.BasicConstraints | None = None
    basic_critical = False
    usage: x509.KeyUsage | None = None
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            # Threat: a constraint (name constraints, policies, EKU) this verifier does not enforce.
            raise _Failed(f"{label}: unsupported critical extension {ext.oid.dotted_string}")
        if isinstance(ext.value, x509.BasicConstraints):
            basic, basic_critical = ext.value, ext.critical
        elif isinstance(ext.value, x509.KeyUsage):
            usage = ext.value
    return basic, basic_critical, usage


def _labels(length: int) -> list[str]:
    """Names of a path's certificates, leaf first: certificate, cabundle[n-1], ..., cabundle[1], root."""
    return ["certificate", *(f"cabundle[{i}]" for i in range(length - 2, 0, -1)), "root"]


def _check_ca(cert: x509.Certificate, label: str, below: int | None) -> int | None:
    """Check a CA certificate with ``below`` CAs under it before the leaf (None: not known yet).

    Returns its pathLen (None: unlimited).
    """
    basic, critical, usage = _extensions(cert, label)
    # Threat: an end-entity certificate (any Nitro leaf) used to sign a certificate of its own.
    if basic is None or not basic.ca:
        raise _Failed(f"{label}: not a CA certificate (basicConstraints ca=True is missing)")
    if not critical:
        raise _Failed(f"{label}: basicConstraints must be critical in a CA certificate")
    limit = basic.path_length
    if below is not None and limit is not None and limit < below:
        raise _Failed(f"{label}: pathLen {limit} does not allow the {below} CA certificates below it")
    if usage is None or not usage.key_cert_sign:
        raise _Failed(f"{label}: keyUsage keyCertSign is missing")
    return limit


def _check_leaf(cert: x509.Certificate) -> None:
    basic, _, usage = _extensions(cert, "certificate")
    # Threat: a CA key signing documents directly, outside the per-enclave leaf AWS issues.
    if basic is not None and basic.ca:
        raise _Failed("certificate: the signing certificate is a CA (basicConstraints ca=True)")
    if usage is None or not usage.digital_signature:
        raise _Failed("certificate: keyUsage digitalSignature is missing")


def _verify_validity(path: list[x509.Certificate], at: datetime) -> str:
    for cert, label in zip(path, _labels(len(path)), strict=True):
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        if at < not_before:
            raise _Failed(
                f"{label} is not valid before {not_before.isoformat()} (verifying at {at.isoformat()})"
            )
        if at > not_after:
            raise _Failed(f"{label} expired at {not_after.isoformat()} (verifying at {at.isoformat()})")
    leaf_end = path[0].not_valid_after_utc.isoformat()
    return f"{len(path)} certificates valid at {at.isoformat()}; the leaf until {leaf_end}"


def _verify_timestamp(doc: AttestationDocument, at: datetime) -> str:
    made = doc.timestamp_datetime
    # Threat: a document stamped in the future, to stay "fresh" for a max_age check long after.
    if made > at + CLOCK_SKEW:
        raise _Failed(
            f"the document's timestamp {made.isoformat()} is after the verification time "
            f"{at.isoformat()} by more than {int(CLOCK_SKEW.total_seconds())} s"
        )
    return f"made at {made.isoformat()}"


def _expect_pcr(doc: AttestationDocument, index: int, expected: bytes) -> str:
    actual = doc.pcrs.get(index)
    if actual is None:
        raise _Failed(f"PCR{index} is not in the document")
    # Threat: an enclave image other than the one the caller approved.
    if not hmac.compare_digest(actual, expected):
        raise _Failed(f"PCR{index} is {actual.hex()}, expected {expected.hex()}")
    return f"PCR{index} matches"


def _expect_field(doc: AttestationDocument, name: str, expected: bytes) -> str:
    actual: bytes | None = getattr(doc, name)
    if actual is None:
        raise _Failed(f"{name} is absent from the document, a value was expected")
    # Threat (nonce): a replayed old document; (user_data, public_key): a document bound to other data.
    if not hmac.compare_digest(actual, expected):
        raise _Failed(f"{name} does not match the expected value ({len(actual)} bytes in the document)")
    return f"{name} matches ({len(actual)} bytes)"


def _expect_age(doc: AttestationDocument, at: datetime, max_age: timedelta) -> str:
    age = at - doc.timestamp_datetime
    # Threat: an old document replayed after the enclave changed or stopped.
    if age > max_age:
        raise _Failed(
            f"the document is {age.total_seconds():.3f} s old, more than {max_age.total_seconds():g} s"
        )
    return f"{age.total_seconds():.3f} s old, at most {max_age.total_seconds():g} s allowed"
