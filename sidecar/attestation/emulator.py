"""The NSM emulator and its dev PKI: what ``sidecar dev`` attests with, outside a Nitro Enclave.

:class:`NsmEmulator` has the :class:`~sidecar.attestation.nsm.Nsm` interface and the real device's
semantics: 32 PCRs of 48 bytes (SHA-384), ``extend = SHA384(old || data)``, PCR0..15 locked at
boot and read-only to the app, GetRandom answering 256 bytes, and the same input limits and
exceptions as :class:`~sidecar.attestation.nsm.NsmDevice` (it validates through the same encoder).
Where the real NSM's exact error is not documented we chose, and tests pin:

- extend of any locked PCR, and LockPCR of 0..15, raise ``NsmReadOnlyIndex`` (nsm-check of
  aws-nitro-enclaves-nsm-api only asserts "an error"; ReadOnlyIndex is the ErrorCode whose
  meaning fits);
- an index >= 32 (or a LockPCRs range > 32) raises ``NsmInvalidIndex``;
- LockPCR of an already locked PCR >= 16, and LockPCRs over already locked PCRs, succeed (the
  real device accepts ``LockPCRs { range: max_pcrs }`` over the boot-locked 0..15).

Documents are byte-for-byte in the AWS shape (checked against real ones in tests): an untagged
COSE_Sign1 array ``[protected, {}, payload, signature]`` with protected ``{1: -35}`` (ES384), the
payload map keyed in AWS's order (module_id, digest, timestamp in ms, pcrs, certificate, cabundle,
public_key, user_data, nonce; absent optional fields as CBOR null), and a raw ``r || s``
signature. ``pcrs`` holds every locked PCR, as AWS documents it: 0..15 always, and a PCR >= 16
once the app has locked it.

:class:`DevPki` is the signing chain, P-384 throughout, with AWS's certificate profile: a
self-signed root (basicConstraints critical CA, no path length; keyUsage critical
digitalSignature + keyCertSign + cRLSign), one intermediate mirroring AWS's instance-level CA
(basicConstraints critical CA pathLen 0; keyUsage critical keyCertSign), and a leaf per module id
(basicConstraints critical not-CA; keyUsage digitalSignature + contentCommitment, not critical)
that lives 3 hours and is re-issued when less than 10 minutes remain. AWS's regional and zonal CAs
are not reproduced, so ``cabundle`` is ``[root, intermediate]``. Files in ``state_dir``:

- ``dev-root.key``, ``dev-intermediate.key``: PKCS#8 PEM, mode 0600, created exclusively;
- ``dev-root.pem`` (give it to ``sidecar trust --root``), ``dev-intermediate.pem``;
- ``dev-pki.lock``: serialises processes that create or renew the PKI.

The leaf key lives only in memory, like the NSM's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sidecar.attestation.nsm import (
    NsmDescription,
    NsmInvalidIndex,
    NsmReadOnlyIndex,
    NsmUnavailable,
    PcrValue,
    encode_request,
)

PCR_COUNT = 32
PCR_BYTES = 48
BOOT_LOCKED_PCRS = 16  # PCR0..15 are measured at boot and locked before the app runs
RANDOM_BYTES = 256
ZERO_PCR = bytes(PCR_BYTES)
VERSION = (1, 0, 0)
COSE_ES384 = -35
ES384_SCALAR_BYTES = 48  # r and s of a P-384 signature
PROTECTED_HEADER = cbor2.dumps({1: COSE_ES384})  # a1 01 38 22, as in every AWS document

ROOT_KEY_FILE = "dev-root.key"
ROOT_CERT_FILE = "dev-root.pem"
INTERMEDIATE_KEY_FILE = "dev-intermediate.key"
INTERMEDIATE_CERT_FILE = "dev-intermediate.pem"
LOCK_FILE = "dev-pki.lock"

ROOT_LIFETIME = timedelta(days=30 * 365)  # AWS's root: 30 years
INTERMEDIATE_LIFETIME = timedelta(days=365)
INTERMEDIATE_RENEW_MARGIN = timedelta(days=1)
LEAF_LIFETIME = timedelta(hours=3)  # AWS's leaf certificates live about 3 hours
LEAF_RENEW_MARGIN = timedelta(minutes=10)
CA_BACKDATE = timedelta(hours=1)  # tolerate small clock differences between verifier and emulator

ORGANIZATION = "enclave-sidecar"
UNIT = "enclave-sidecar dev"
ROOT_CN = "dev.nitro-enclaves"
INTERMEDIATE_CN = "instance.dev.nitro-enclaves"
LEAF_CN_SUFFIX = ".dev"
MAX_MODULE_ID = 64 - len(LEAF_CN_SUFFIX)  # the leaf's CN is the module id plus the suffix


class DevPkiError(Exception):
    """The dev PKI's files are unusable; the message names the file."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _issue_root(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    # Extensions in AWS's root order: basicConstraints, subjectKeyIdentifier, keyUsage.
    return (
        x509.CertificateBuilder()
        .subject_name(_name(ROOT_CN))
        .issuer_name(_name(ROOT_CN))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA384())
    )


def _issue_intermediate(
    key: ec.EllipticCurvePrivateKey,
    root_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    now: datetime,
) -> x509.Certificate:
    # AWS's instance CA (the leaf's issuer): basicConstraints, keyUsage, SKI, AKI.
    return (
        x509.CertificateBuilder()
        .subject_name(_name(INTERMEDIATE_CN))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA384())
    )


# --- files --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        # O_EXCL: never overwrite an existing key, and no window in which the key is group-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _load_key(path)
    key = _new_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # a half-written key would block every later start
        raise
    return key


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:  # the last: an unknown key type
        raise DevPkiError(
            f"{path}: not a usable private key ({exc}); delete it to start a new dev PKI"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise DevPkiError(f"{path}: expected a P-384 EC key; delete it to start a new dev PKI")
    return key


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None  # missing or damaged: it is re-issued from the persisted key


def _write_public(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, so a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- the PKI ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    der: bytes  # the certificate as every document carries it, serialised once per leaf


class DevPki:
    """A persisted dev root and intermediate, and short-lived leaves issued on demand."""

    def __init__(
        self,
        state_dir: Path,
        root_key: ec.EllipticCurvePrivateKey,
        root: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
        intermediate: x509.Certificate,
        leaf_lifetime: timedelta = LEAF_LIFETIME,
    ) -> None:
        if leaf_lifetime <= timedelta(0):
            raise ValueError("leaf_lifetime must be positive")
        self.state_dir = state_dir
        self.root = root
        self.intermediate = intermediate
        self.leaf_lifetime = leaf_lifetime
        self._root_key = root_key
        self._intermediate_key = intermediate_key
        self._leaves: dict[str, _Leaf] = {}
        self._lock = threading.Lock()
        # root first, as AWS orders its cabundle
        self.cabundle: tuple[bytes, ...] = (
            root.public_bytes(serialization.Encoding.DER),
            intermediate.public_bytes(serialization.Encoding.DER),
        )

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        leaf_lifetime: timedelta = LEAF_LIFETIME,
        *,
        clock: Callable[[], float] = time.time,
    ) -> DevPki:
        """Reuse the root and intermediate in ``state_dir``, creating (or renewing) what is missing."""
        state_dir = Path(state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = datetime.fromtimestamp(clock(), UTC).replace(microsecond=0)
        with _locked(state_dir):
            root_key = _load_or_create_key(state_dir / ROOT_KEY_FILE)
            root = _load_cert(state_dir / ROOT_CERT_FILE)
            if root is None or not _same_key(root, root_key) or root.not_valid_after_utc <= now:
                root = _issue_root(root_key, now)
                _write_public(state_dir / ROOT_CERT_FILE, root.public_bytes(serialization.Encoding.PEM))

            intermediate_key = _load_or_create_key(state_dir / INTERMEDIATE_KEY_FILE)
            intermediate = _load_cert(state_dir / INTERMEDIATE_CERT_FILE)
            if (
                intermediate is None
                or not _same_key(intermediate, intermediate_key)
                or not _signed_by(intermediate, root)
                or intermediate.not_valid_after_utc - now < INTERMEDIATE_RENEW_MARGIN
            ):
                intermediate = _issue_intermediate(intermediate_key, root_key, root, now)
                _write_public(
                    state_dir / INTERMEDIATE_CERT_FILE, intermediate.public_bytes(serialization.Encoding.PEM)
                )
        return cls(state_dir, root_key, root, intermediate_key, intermediate, leaf_lifetime)

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    @property
    def root_path(self) -> Path:
        return self.state_dir / ROOT_CERT_FILE

    def leaf(self, module_id: str, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The signing key and certificate for ``module_id`` at ``now``, re-issued near expiry."""
        current = self._current_leaf(module_id, now)
        return current.key, current.certificate

    def _current_leaf(self, module_id: str, now: datetime) -> _Leaf:
        with self._lock:
            current = self._leaves.get(module_id)
            margin = min(LEAF_RENEW_MARGIN, self.leaf_lifetime / 2)
            if (
                current is None
                or now < current.certificate.not_valid_before_utc
                or current.certificate.not_valid_after_utc - now < margin
            ):
                current = self._issue_leaf(module_id, now)
                self._leaves[module_id] = current
            return current

    def _issue_leaf(self, module_id: str, now: datetime) -> _Leaf:
        key = _new_key()
        start = now.replace(microsecond=0)  # X.509 times have whole seconds; never start after `now`
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(module_id + LEAF_CN_SUFFIX))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(min(start + self.leaf_lifetime, self.intermediate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, content_commitment=True), critical=False)
            .sign(self._intermediate_key, hashes.SHA384())
        )
        return _Leaf(key, certificate, certificate.public_bytes(serialization.Encoding.DER))


# --- the emulator -------------------------------------------------------------------------------


def default_module_id() -> str:
    """A module id shaped like AWS's (``i-<instance>-enc<enclave>``), with an all-zero instance."""
    return f"i-{'0' * 17}-enc{secrets.token_hex(8)}"


def extend(old: bytes, data: bytes) -> bytes:
    """The NSM's PCR extend: SHA-384 over the old value followed by the data."""
    return hashlib.sha384(old + data).digest()


class NsmEmulator:
    """An in-process NSM with real PCR semantics, signing with a :class:`DevPki`. Thread-safe.

    ``pcrs`` gives initial values (e.g. PCR0/1/2 from ``sidecar.attestation.measure``); like the
    boot-time measurements on real hardware, PCR0..15 are locked whatever they hold.
    """

    def __init__(
        self,
        pki: DevPki,
        pcrs: Mapping[int, bytes] | None = None,
        module_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.module_id = default_module_id() if module_id is None else module_id
        # ASCII as well: parse_document refuses any other module_id, so its documents would not parse.
        if not 1 <= len(self.module_id) <= MAX_MODULE_ID or not (
            self.module_id.isascii() and self.module_id.isprintable()
        ):
            raise ValueError(f"module_id must be 1 to {MAX_MODULE_ID} printable ASCII characters")
        self.pki = pki  # public: the dev world's KMS front trusts its root
        self._clock = clock
        self._values = [ZERO_PCR] * PCR_COUNT
        self._locked = [index < BOOT_LOCKED_PCRS for index in range(PCR_COUNT)]
        for index, value in (pcrs or {}).items():
            if not 0 <= index < PCR_COUNT:
                raise ValueError(f"PCR index {index} is out of range 0..{PCR_COUNT - 1}")
            if len(value) != PCR_BYTES:
                raise ValueError(f"PCR{index} must be {PCR_BYTES} bytes, got {len(value)}")
            self._values[index] = bytes(value)
        self._lock = threading.Lock()
        self._closed = False

    def _open(self) -> None:
        if self._closed:
            raise NsmUnavailable("the NSM emulator is closed")

    @staticmethod
    def _index(index: int) -> int:
        if index >= PCR_COUNT:
            raise NsmInvalidIndex(f"PCR index {index} is out of range 0..{PCR_COUNT - 1}")
        return index

    def describe_pcr(self, index: int) -> PcrValue:
        encode_request("DescribePCR", {"index": index})  # the device's argument checks
        with self._lock:
            self._open()
            i = self._index(index)
            return PcrValue(locked=self._locked[i], data=self._values[i])

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        encode_request("ExtendPCR", {"index": index, "data": data})
        with self._lock:
            self._open()
            i = self._index(index)
            if self._locked[i]:
                raise NsmReadOnlyIndex(f"PCR{i} is locked")
            self._values[i] = extend(self._values[i], bytes(data))
            return self._values[i]

    def lock_pcr(self, index: int) -> None:
        encode_request("LockPCR", {"index": index})
        with self._lock:
            self._open()
            i = self._index(index)
            if i < BOOT_LOCKED_PCRS:
                raise NsmReadOnlyIndex(f"PCR{i} is measured at boot and read-only to the enclave")
            self._locked[i] = True

    def lock_pcrs(self, range_: int) -> None:
        encode_request("LockPCRs", {"range": range_})
        with self._lock:
            self._open()
            if range_ > PCR_COUNT:
                raise NsmInvalidIndex(f"LockPCRs range {range_} is more than {PCR_COUNT}")
            for i in range(range_):
                self._locked[i] = True

    def describe_nsm(self) -> NsmDescription:
        with self._lock:
            self._open()
            locked = frozenset(i for i in range(PCR_COUNT) if self._locked[i])
        major, minor, patch = VERSION
        return NsmDescription(major, minor, patch, self.module_id, PCR_COUNT, locked, "SHA384")

    def get_random(self) -> bytes:
        with self._lock:
            self._open()
        return os.urandom(RANDOM_BYTES)

    def attestation(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        # The device's checks (types, AWS's size limits, request size), with the device's exceptions.
        encode_request("Attestation", {"user_data": user_data, "nonce": nonce, "public_key": public_key})
        with self._lock:
            self._open()
            pcrs = {i: self._values[i] for i in range(PCR_COUNT) if self._locked[i]}
        now = self._clock()
        leaf = self.pki._current_leaf(self.module_id, datetime.fromtimestamp(now, UTC))
        # Key order and null-for-absent exactly as AWS's documents (serde struct order).
        payload = cbor2.dumps(
            {
                "module_id": self.module_id,
                "digest": "SHA384",
                "timestamp": int(now * 1000),
                "pcrs": pcrs,
                "certificate": leaf.der,
                "cabundle": list(self.pki.cabundle),
                "public_key": None if public_key is None else bytes(public_key),
                "user_data": None if user_data is None else bytes(user_data),
                "nonce": None if nonce is None else bytes(nonce),
            }
        )
        to_sign = cbor2.dumps(["Signature1", PROTECTED_HEADER, b"", payload])
        r, s = decode_dss_signature(leaf.key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
        # COSE wants the raw r || s, not the DER the signing API returns.
        signature = r.to_bytes(ES384_SCALAR_BYTES, "big") + s.to_bytes(ES384_SCALAR_BYTES, "big")
        return cbor2.dumps([PROTECTED_HEADER, {}, payload, signature])

    def close(self) -> None:
        with self._lock:
            self._closed = True
