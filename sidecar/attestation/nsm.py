"""The Nitro Secure Module (NSM): the ``/dev/nsm`` device and the messages it speaks.

Inside a Nitro Enclave the NSM is a character device. One ``ioctl(fd, NSM_IOCTL_RAW, &raw)`` call
carries one request and its response; ``raw`` is ``struct nsm_raw { struct iovec request; struct
iovec response; }`` (32 bytes on the 64-bit platforms enclaves run on). The driver writes the
response into the response buffer and its length into ``raw.response.iov_len``. Requests are at
most :data:`MAX_REQUEST_BYTES`, responses at most :data:`MAX_RESPONSE_BYTES`.

Messages are CBOR in serde's externally tagged enum form, as aws-nitro-enclaves-nsm-api encodes
them: a unit variant is its name as a text string (``"GetRandom"``), a struct variant is a one-entry
map from its name to a map of its fields (``{"DescribePCR": {"index": 0}}``), and a failure is
``{"Error": "InvalidIndex"}``. :func:`encode_request` and :func:`decode_response` are pure
functions over those bytes. Every way a device answer can be wrong ends as an :class:`NsmError`
subclass: an ``Error`` answer as the matching typed exception, anything malformed or unexpected as
:class:`NsmProtocolError`.

:class:`Nsm` is the interface shared by :class:`NsmDevice` (the real device) and
``sidecar.attestation.emulator.NsmEmulator`` (the dev stand-in).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import cbor2

NSM_IOCTL_RAW = 0xC0200A00  # _IOWR(0x0A, 0x00, struct nsm_raw), the struct being 32 bytes
MAX_REQUEST_BYTES = 4096
MAX_RESPONSE_BYTES = 12288

# AWS's documented limits for the optional attestation fields, in bytes.
MAX_USER_DATA = 512
MAX_NONCE = 512
MAX_PUBLIC_KEY = 1024

DIGESTS = frozenset({"SHA256", "SHA384", "SHA512"})
_U16_MAX = 0xFFFF
_MAX_DEPTH = 8  # the deepest response, DescribeNSM, nests 3 levels

# Two iovecs { void *iov_base; size_t iov_len; }: four native-endian 64-bit words. "=" keeps the
# native byte order but fixes the sizes, so the packing is the enclave's even on a 32-bit host.
_NSM_RAW = struct.Struct("=QQQQ")


# --- errors -------------------------------------------------------------------------------------


class NsmError(Exception):
    """Base of every NSM failure. ``code`` is the NSM ErrorCode name (or a local one)."""

    code: str = "NsmError"
    summary: str = "the NSM request failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or f"{self.summary} ({self.code})")


class NsmInvalidArgument(NsmError):
    code = "InvalidArgument"
    summary = "invalid argument"


class NsmInvalidIndex(NsmError):
    code = "InvalidIndex"
    summary = "PCR index out of range"


class NsmInvalidResponse(NsmError):
    code = "InvalidResponse"
    summary = "the NSM's response does not match the request"


class NsmReadOnlyIndex(NsmError):
    code = "ReadOnlyIndex"
    summary = "the PCR is read-only (locked)"


class NsmInvalidOperation(NsmError):
    code = "InvalidOperation"
    summary = "the NSM cannot perform this operation"


class NsmBufferTooSmall(NsmError):
    code = "BufferTooSmall"
    summary = "the response buffer is too small"


class NsmInputTooLarge(NsmError):
    code = "InputTooLarge"
    summary = "the input is too large"


class NsmInternalError(NsmError):
    code = "InternalError"
    summary = "the NSM failed internally"


class NsmProtocolError(NsmError):
    """The device answered something that is not a well-formed response to the request."""

    code = "ProtocolError"
    summary = "malformed or unexpected NSM response"


class NsmUnavailable(NsmError):
    """The device cannot be opened (not in an enclave), or was closed."""

    code = "Unavailable"
    summary = "the NSM is not available"


ERRORS: Mapping[str, type[NsmError]] = {
    cls.code: cls
    for cls in (
        NsmInvalidArgument,
        NsmInvalidIndex,
        NsmInvalidResponse,
        NsmReadOnlyIndex,
        NsmInvalidOperation,
        NsmBufferTooSmall,
        NsmInputTooLarge,
        NsmInternalError,
    )
}
"""NSM ``ErrorCode`` name -> exception class (``Success`` is not an error and is not here)."""


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PcrValue:
    locked: bool
    data: bytes


@dataclass(frozen=True)
class NsmDescription:
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: frozenset[int]
    digest: str


class Nsm(Protocol):
    """What the sidecar needs from an NSM: the device, or the emulator. Calls block."""

    def attestation(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        """A signed attestation document (untagged COSE_Sign1 bytes) carrying the given fields."""
        ...

    def describe_pcr(self, index: int) -> PcrValue: ...

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the new value."""
        ...

    def lock_pcr(self, index: int) -> None: ...

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``0 .. range_ - 1``."""
        ...

    def describe_nsm(self) -> NsmDescription: ...

    def get_random(self) -> bytes: ...

    def close(self) -> None: ...


# --- input checks shared with the emulator ------------------------------------------------------


def check_u16(name: str, value: object) -> int:
    """An index or range as the NSM's u16; anything else cannot even be encoded."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U16_MAX:
        raise NsmInvalidArgument(f"{name} must be an integer from 0 to {_U16_MAX}, got {value!r}")
    return value


def check_bytes(name: str, value: object, limit: int | None = None) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise NsmInvalidArgument(f"{name} must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if limit is not None and len(data) > limit:
        raise NsmInputTooLarge(f"{name} is {len(data)} bytes; the NSM accepts at most {limit}")
    return data


def check_attestation_inputs(
    user_data: object, nonce: object, public_key: object
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """Type and size checks for the optional attestation fields (AWS's limits)."""
    return (
        None if user_data is None else check_bytes("user_data", user_data, MAX_USER_DATA),
        None if nonce is None else check_bytes("nonce", nonce, MAX_NONCE),
        None if public_key is None else check_bytes("public_key", public_key, MAX_PUBLIC_KEY),
    )


# --- codec --------------------------------------------------------------------------------------

# Operation -> its request fields in the order aws-nitro-enclaves-nsm-api serialises them
# (None: a unit variant, encoded as the bare name).
_REQUEST_FIELDS: Mapping[str, tuple[str, ...] | None] = {
    "Attestation": ("user_data", "nonce", "public_key"),
    "DescribePCR": ("index",),
    "ExtendPCR": ("index", "data"),
    "LockPCR": ("index",),
    "LockPCRs": ("range",),
    "DescribeNSM": None,
    "GetRandom": None,
}
OPERATIONS = frozenset(_REQUEST_FIELDS)


def encode_request(op: str, args: Mapping[str, Any] | None) -> bytes:
    """The CBOR request for ``op``; raises NsmInvalidArgument / NsmInputTooLarge on bad input."""
    if op not in _REQUEST_FIELDS:
        raise NsmInvalidArgument(f"unknown NSM operation {op!r}")
    fields = _REQUEST_FIELDS[op]
    args = dict(args or {})
    allowed = set(fields or ())
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise NsmInvalidArgument(f"{op} takes no argument {unknown[0]!r}")
    if fields is None:
        encoded = cbor2.dumps(op)
    else:
        body: dict[str, Any] = {}
        if op == "Attestation":
            user_data, nonce, public_key = check_attestation_inputs(
                args.get("user_data"), args.get("nonce"), args.get("public_key")
            )
            body = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
        else:
            for name in fields:
                if name not in args:
                    raise NsmInvalidArgument(f"{op} needs the argument {name!r}")
                value = args[name]
                body[name] = check_bytes(name, value) if name == "data" else check_u16(name, value)
        encoded = cbor2.dumps({op: body})
    if len(encoded) > MAX_REQUEST_BYTES:
        raise NsmInputTooLarge(
            f"the {op} request is {len(encoded)} bytes; the NSM accepts at most {MAX_REQUEST_BYTES}"
        )
    return encoded


def _describe(value: object) -> str:
    """A short, safe description of an unexpected answer (never its whole content)."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, dict) and len(value) == 1:
        (key,) = value
        return f"a {key[:40]!r} variant" if isinstance(key, str) else "a map"
    return type(value).__name__


def _variant_body(value: object, op: str) -> dict[Any, Any]:
    if not (isinstance(value, dict) and len(value) == 1 and op in value and isinstance(value[op], dict)):
        raise NsmProtocolError(f"expected a {op} response, got {_describe(value)}")
    body: dict[Any, Any] = value[op]
    return body


def _get(body: Mapping[Any, Any], op: str, name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    # bool is an int: never let True pass as a number, nor 1 as a flag.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NsmProtocolError(f"{op} response: field {name!r} is missing or not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)


def _get_u16(body: Mapping[Any, Any], op: str, name: str) -> int:
    value: int = _get(body, op, name, int)
    if not 0 <= value <= _U16_MAX:
        raise NsmProtocolError(f"{op} response: field {name!r} is out of range")
    return value


def decode_response(data: bytes, op: str) -> Any:
    """Decode the device's answer to ``op``.

    Returns: Attestation -> document bytes; DescribePCR -> :class:`PcrValue`; ExtendPCR -> the new
    PCR bytes; LockPCR / LockPCRs -> None; DescribeNSM -> :class:`NsmDescription`; GetRandom ->
    bytes. An ``Error`` answer raises its typed exception; anything else wrong raises
    :class:`NsmProtocolError`. Unknown fields in a response are ignored, as serde does.
    """
    if op not in _REQUEST_FIELDS:
        raise NsmInvalidArgument(f"unknown NSM operation {op!r}")
    if len(data) > MAX_RESPONSE_BYTES:
        raise NsmProtocolError(f"response is {len(data)} bytes, more than {MAX_RESPONSE_BYTES}")
    stream = io.BytesIO(data)
    try:
        # Responses are shallow maps keyed by text: refuse deep nesting, duplicate keys (which
        # would let one answer read two ways) and exotic key types.
        decoder = cbor2.CBORDecoder(
            stream, max_depth=_MAX_DEPTH, allow_duplicate_keys=False, strict_hashable_types=True
        )
        value = decoder.decode()
    except Exception as exc:  # cbor2 raises several types; all mean "malformed"
        raise NsmProtocolError(f"response is not valid CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise NsmProtocolError(f"response has {len(data) - stream.tell()} trailing bytes")

    if isinstance(value, dict) and len(value) == 1 and "Error" in value:
        code = value["Error"]
        if isinstance(code, str) and code in ERRORS:
            raise ERRORS[code](f"the NSM answered {op} with {code}")
        raise NsmProtocolError(f"the NSM answered {op} with an unknown error {_describe(code)}")

    if op in ("LockPCR", "LockPCRs"):
        if isinstance(value, str) and value == op:
            return None
        raise NsmProtocolError(f"expected a {op} response, got {_describe(value)}")

    body = _variant_body(value, op)
    if op == "Attestation":
        return _get(body, op, "document", bytes)
    if op == "GetRandom":
        return _get(body, op, "random", bytes)
    if op == "ExtendPCR":
        return _get(body, op, "data", bytes)
    if op == "DescribePCR":
        return PcrValue(locked=_get(body, op, "lock", bool), data=_get(body, op, "data", bytes))
    # DescribeNSM
    locked = _get(body, op, "locked_pcrs", list)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= _U16_MAX for i in locked):
        raise NsmProtocolError("DescribeNSM response: locked_pcrs is not a list of PCR indexes")
    digest = _get(body, op, "digest", str)
    if digest not in DIGESTS:
        raise NsmProtocolError(f"DescribeNSM response: unknown digest {digest[:20]!r}")
    return NsmDescription(
        version_major=_get_u16(body, op, "version_major"),
        version_minor=_get_u16(body, op, "version_minor"),
        version_patch=_get_u16(body, op, "version_patch"),
        module_id=_get(body, op, "module_id", str),
        max_pcrs=_get_u16(body, op, "max_pcrs"),
        locked_pcrs=frozenset(locked),
        digest=digest,
    )


# --- the ioctl structure ------------------------------------------------------------------------


def pack_nsm_raw(request_addr: int, request_len: int, response_addr: int, response_len: int) -> bytes:
    """``struct nsm_raw { struct iovec request; struct iovec response; }`` as 32 bytes."""
    return _NSM_RAW.pack(request_addr, request_len, response_addr, response_len)


def unpack_nsm_raw(raw: bytes | bytearray) -> tuple[int, int, int, int]:
    """(request_addr, request_len, response_addr, response_len) from a 32-byte ``nsm_raw``."""
    if len(raw) != _NSM_RAW.size:
        raise NsmProtocolError(f"nsm_raw must be {_NSM_RAW.size} bytes, got {len(raw)}")
    request_addr, request_len, response_addr, response_len = _NSM_RAW.unpack(raw)
    return request_addr, request_len, response_addr, response_len


# --- the device ---------------------------------------------------------------------------------


class NsmDevice:
    """The real NSM through ``/dev/nsm``. Thread-safe: one request at a time.

    ``ioctl`` is injectable so tests can play the driver's part on the real buffers.
    """

    def __init__(self, path: str | os.PathLike[str] = "/dev/nsm", ioctl: Callable[..., Any] = fcntl.ioctl):
        self.path = os.fspath(path)
        self._ioctl = ioctl
        self._lock = threading.Lock()
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmUnavailable(
                f"cannot open the NSM device {self.path}: {exc.strerror or exc}. Outside a Nitro "
                "Enclave use the NSM emulator: `sidecar dev`, or `attestation.nsm: emulator`"
            ) from exc

    def _call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        request = encode_request(op, args)  # size limits are enforced here, before the device
        with self._lock:
            if self._fd is None:
                raise NsmUnavailable(f"the NSM device {self.path} is closed")
            request_buf = ctypes.create_string_buffer(request, len(request))
            response_buf = ctypes.create_string_buffer(MAX_RESPONSE_BYTES)
            response_addr = ctypes.addressof(response_buf)
            raw = bytearray(
                pack_nsm_raw(ctypes.addressof(request_buf), len(request), response_addr, MAX_RESPONSE_BYTES)
            )
            try:
                self._ioctl(self._fd, NSM_IOCTL_RAW, raw, True)
            except OSError as exc:
                # The driver's errno, mapped as aws-nitro-enclaves-nsm-api does.
                if exc.errno == errno.EMSGSIZE:
                    raise NsmInputTooLarge(f"the NSM rejected the {op} request as too large") from exc
                raise NsmInternalError(f"the NSM ioctl for {op} failed: {exc}") from exc
            _, _, answered_addr, length = unpack_nsm_raw(raw)
            # Never read outside the buffer we own, whatever the struct now says.
            if answered_addr != response_addr or length > MAX_RESPONSE_BYTES:
                raise NsmProtocolError(f"the NSM returned an invalid response buffer for {op}")
            response = response_buf.raw[:length]
        return decode_response(response, op)

    def attestation(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        document: bytes = self._call(
            "Attestation", {"user_data": user_data, "nonce": nonce, "public_key": public_key}
        )
        return document

    def describe_pcr(self, index: int) -> PcrValue:
        value: PcrValue = self._call("DescribePCR", {"index": index})
        return value

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        value: bytes = self._call("ExtendPCR", {"index": index, "data": data})
        return value

    def lock_pcr(self, index: int) -> None:
        self._call("LockPCR", {"index": index})

    def lock_pcrs(self, range_: int) -> None:
        self._call("LockPCRs", {"range": range_})

    def describe_nsm(self) -> NsmDescription:
        value: NsmDescription = self._call("DescribeNSM")
        return value

    def get_random(self) -> bytes:
        value: bytes = self._call("GetRandom")
        return value

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> NsmDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
