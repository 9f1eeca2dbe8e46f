"""Tests of sidecar.attestation.nsm: the CBOR messages, the ioctl struct, and NsmDevice's plumbing.

Requests are compared byte for byte with ``../shared/vectors/nsm/nsm_request_encodings.txt``.
NsmDevice is driven through a fake ``ioctl`` that plays the Linux driver's part on the real
memory: it reads the request from the address in the struct, writes the response into the
response buffer and stores the response length back into the struct.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.attestation import nsm
from sidecar.attestation.nsm import (
    MAX_NONCE,
    MAX_PUBLIC_KEY,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    MAX_USER_DATA,
    NSM_IOCTL_RAW,
    NsmDescription,
    NsmDevice,
    NsmError,
    NsmInputTooLarge,
    NsmInternalError,
    NsmInvalidArgument,
    NsmInvalidIndex,
    NsmProtocolError,
    NsmReadOnlyIndex,
    NsmUnavailable,
    PcrValue,
    decode_response,
    encode_request,
    pack_nsm_raw,
    unpack_nsm_raw,
)
from tests.conftest import SHARED

VECTORS = SHARED / "vectors" / "nsm" / "nsm_request_encodings.txt"
ATTESTATION_VECTOR = SHARED / "vectors" / "attestation" / "evervault_non_debug_cert_san_2023-01-18.cbor"
ERROR_CODES = [
    "InvalidArgument",
    "InvalidIndex",
    "InvalidResponse",
    "ReadOnlyIndex",
    "InvalidOperation",
    "BufferTooSmall",
    "InputTooLarge",
    "InternalError",
]


def load_vectors() -> dict[str, bytes]:
    """``name -> bytes`` for every line of the vector file whose second column is plain hex."""
    vectors: dict[str, bytes] = {}
    for line in VECTORS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"(\S.*?)\s+([0-9a-f]+)", line.strip())
        if match:
            vectors[match.group(1)] = bytes.fromhex(match.group(2))
    return vectors


VECTOR_BYTES = load_vectors()

REQUESTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("DescribeNSM", "DescribeNSM", None),
    ("GetRandom", "GetRandom", None),
    ("DescribePCR{index:0}", "DescribePCR", {"index": 0}),
    ('ExtendPCR{index:16,data:"abc"}', "ExtendPCR", {"index": 16, "data": b"abc"}),
    ("LockPCR{index:16}", "LockPCR", {"index": 16}),
    ("LockPCRs{range:32}", "LockPCRs", {"range": 32}),
    ("Attestation{all None}", "Attestation", {"user_data": None, "nonce": None, "public_key": None}),
    ("Attestation{nonce=01020304}", "Attestation", {"nonce": bytes.fromhex("01020304")}),
]


def response(op: str, body: Any) -> bytes:
    return cbor2.dumps({op: body})


DESCRIBE_NSM_BODY: dict[str, Any] = {
    "version_major": 1,
    "version_minor": 0,
    "version_patch": 0,
    "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
    "max_pcrs": 32,
    "locked_pcrs": list(range(16)),
    "digest": "SHA384",
}
GOOD_RESPONSES: dict[str, tuple[bytes, Any]] = {
    "Attestation": (response("Attestation", {"document": b"doc"}), b"doc"),
    "DescribePCR": (
        response("DescribePCR", {"lock": True, "data": bytes(48)}),
        PcrValue(locked=True, data=bytes(48)),
    ),
    "ExtendPCR": (response("ExtendPCR", {"data": b"\x01" * 48}), b"\x01" * 48),
    "LockPCR": (cbor2.dumps("LockPCR"), None),
    "LockPCRs": (cbor2.dumps("LockPCRs"), None),
    "DescribeNSM": (
        response("DescribeNSM", DESCRIBE_NSM_BODY),
        NsmDescription(1, 0, 0, DESCRIBE_NSM_BODY["module_id"], 32, frozenset(range(16)), "SHA384"),
    ),
    "GetRandom": (response("GetRandom", {"random": b"\x07" * 256}), b"\x07" * 256),
}


# --- the recorded vectors -----------------------------------------------------------------------


def test_vector_file_is_parsed() -> None:
    assert {name for name, _, _ in REQUESTS} <= set(VECTOR_BYTES)


@pytest.mark.parametrize(("name", "op", "args"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_requests_match_recorded_bytes(name: str, op: str, args: dict[str, Any] | None) -> None:
    assert encode_request(op, args) == VECTOR_BYTES[name]


def test_request_field_order_does_not_depend_on_argument_order() -> None:
    # The device parses by field name, but the vectors fix the order: keep it whatever the caller does.
    assert (
        encode_request("ExtendPCR", {"data": b"abc", "index": 16})
        == VECTOR_BYTES['ExtendPCR{index:16,data:"abc"}']
    )
    assert (
        encode_request("Attestation", {"public_key": None, "nonce": bytes.fromhex("01020304")})
        == (VECTOR_BYTES["Attestation{nonce=01020304}"])
    )


@pytest.mark.parametrize("op", sorted(nsm.OPERATIONS))
def test_recorded_error_response_raises_typed_error(op: str) -> None:
    with pytest.raises(NsmInvalidArgument) as info:
        decode_response(VECTOR_BYTES["Error(InvalidArgument)"], op)
    assert info.value.code == "InvalidArgument"


def test_recorded_unit_response() -> None:
    assert decode_response(VECTOR_BYTES["LockPCR (unit)"], "LockPCR") is None


def test_get_random_response_has_recorded_prefix() -> None:
    # The vector file gives the shape: a1 69"GetRandom" a1 66"random" <bstr>.
    prefix = b"\xa1\x69GetRandom\xa1\x66random"
    data, expected = GOOD_RESPONSES["GetRandom"]
    assert data.startswith(prefix)
    assert decode_response(data, "GetRandom") == expected


def test_ioctl_number_is_iowr_of_the_32_byte_struct() -> None:
    recorded = re.search(r"= (0x[0-9A-F]+) = (\d+)", VECTORS.read_text())
    assert recorded is not None
    # Linux _IOWR(type, nr, size) = (READ|WRITE) << 30 | size << 16 | type << 8 | nr
    iowr = (3 << 30) | (32 << 16) | (0x0A << 8) | 0x00
    assert NSM_IOCTL_RAW == iowr == int(recorded.group(1), 16) == int(recorded.group(2))
    assert (MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES) == (0x1000, 0x3000)


# --- the struct ---------------------------------------------------------------------------------


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class NsmRaw(ctypes.Structure):
    _fields_ = [("request", Iovec), ("response", Iovec)]


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="enclaves are 64-bit")
def test_pack_matches_the_c_layout() -> None:
    # ctypes lays the struct out as the platform's C compiler does: the driver's view.
    raw = NsmRaw(Iovec(0x1122334455667788, 4096), Iovec(0x0102030405060708, 12288))
    packed = pack_nsm_raw(0x1122334455667788, 4096, 0x0102030405060708, 12288)
    assert len(packed) == ctypes.sizeof(NsmRaw) == 32
    assert packed == bytes(raw)
    assert packed == struct.pack("@PNPN", 0x1122334455667788, 4096, 0x0102030405060708, 12288)


def test_unpack_reverses_pack() -> None:
    values = (2**64 - 1, 1, 2**63, 12288)
    assert unpack_nsm_raw(pack_nsm_raw(*values)) == values
    assert unpack_nsm_raw(bytearray(pack_nsm_raw(*values))) == values
    with pytest.raises(NsmProtocolError):
        unpack_nsm_raw(b"\x00" * 31)


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(GOOD_RESPONSES))
def test_decodes_each_response(op: str) -> None:
    data, expected = GOOD_RESPONSES[op]
    assert decode_response(data, op) == expected


def test_unknown_response_fields_are_ignored() -> None:
    # serde ignores unknown fields; a newer NSM minor version may add some.
    data = response("ExtendPCR", {"data": b"\x01" * 48, "extra": 1})
    assert decode_response(data, "ExtendPCR") == b"\x01" * 48


@pytest.mark.parametrize("code", ERROR_CODES)
def test_every_error_code_maps_to_its_exception(code: str) -> None:
    with pytest.raises(NsmError) as info:
        decode_response(cbor2.dumps({"Error": code}), "DescribePCR")
    assert type(info.value).__name__ == f"Nsm{code}"
    assert info.value.code == code
    assert nsm.ERRORS[code] is type(info.value)


def test_error_types() -> None:
    assert issubclass(NsmProtocolError, NsmError)
    assert issubclass(NsmUnavailable, NsmError)
    assert {cls.code for cls in nsm.ERRORS.values()} == set(ERROR_CODES)


@pytest.mark.parametrize(
    ("op", "data"),
    [
        # Threat: a confused or hostile device answer being read as something it is not.
        ("DescribePCR", cbor2.dumps({"Error": "Success"})),
        ("DescribePCR", cbor2.dumps({"Error": "NoSuchError"})),
        ("DescribePCR", cbor2.dumps({"Error": 3})),
        ("DescribePCR", response("ExtendPCR", {"data": bytes(48)})),  # another op's answer
        ("LockPCR", cbor2.dumps("LockPCRs")),
        ("LockPCRs", response("LockPCRs", {})),
        ("GetRandom", cbor2.dumps("GetRandom")),
        ("DescribePCR", response("DescribePCR", {"lock": 1, "data": bytes(48)})),  # int is not a bool
        ("DescribePCR", response("DescribePCR", {"lock": True, "data": "00" * 48})),  # text, not bytes
        ("DescribePCR", response("DescribePCR", {"lock": True})),
        ("Attestation", response("Attestation", {"document": None})),
        ("Attestation", response("Attestation", [b"doc"])),
        ("DescribeNSM", response("DescribeNSM", {**DESCRIBE_NSM_BODY, "version_major": True})),
        ("DescribeNSM", response("DescribeNSM", {**DESCRIBE_NSM_BODY, "max_pcrs": 70000})),
        ("DescribeNSM", response("DescribeNSM", {**DESCRIBE_NSM_BODY, "locked_pcrs": [0, -1]})),
        ("DescribeNSM", response("DescribeNSM", {**DESCRIBE_NSM_BODY, "locked_pcrs": {0, 1}})),
        ("DescribeNSM", response("DescribeNSM", {**DESCRIBE_NSM_BODY, "digest": "MD5"})),
        ("ExtendPCR", response("ExtendPCR", {"data": bytes(48)}) + b"\x00"),  # trailing bytes
        ("ExtendPCR", b""),
        ("ExtendPCR", b"\xff"),
        ("GetRandom", response("GetRandom", {"random": bytes(MAX_RESPONSE_BYTES)})),  # too long
    ],
)
def test_malformed_responses_raise_protocol_error(op: str, data: bytes) -> None:
    with pytest.raises(NsmProtocolError):
        decode_response(data, op)


def test_duplicate_map_keys_are_rejected() -> None:
    # Threat: one answer that decoders read two ways ({"Error": ..., "Error": ...} is one entry
    # after a last-wins decode). cbor2's encoder writes the map header, then the repeated key.
    stream = io.BytesIO()
    encoder = cbor2.CBOREncoder(stream)
    encoder.encode_length(5, 2)
    for item in ("Error", "InvalidIndex", "Error", "InternalError"):
        encoder.encode(item)
    with pytest.raises(NsmProtocolError):
        decode_response(stream.getvalue(), "DescribePCR")


def test_deep_nesting_is_rejected() -> None:
    # Threat: a response crafted to exhaust the decoder's recursion.
    value: Any = b""
    for _ in range(50):
        value = [value]
    with pytest.raises(NsmProtocolError):
        decode_response(response("GetRandom", {"random": value}), "GetRandom")


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), op=st.sampled_from(sorted(nsm.OPERATIONS)))
def test_fuzz_arbitrary_bytes_only_raise_nsm_errors(data: bytes, op: str) -> None:
    # Threat: a device answer (buggy, or from a compromised host path) crashing the sidecar with an
    # exception type its callers do not handle.
    with contextlib.suppress(NsmError):
        decode_response(data, op)


CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.binary(max_size=60)
    | st.text(max_size=20)
    | st.sampled_from(["lock", "data", "document", "random", "index", *ERROR_CODES, *sorted(nsm.OPERATIONS)])
    | st.floats(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from([*DESCRIBE_NSM_BODY, "lock", "data", "document", "random"]) | st.text(max_size=5),
            inner,
            max_size=8,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    op=st.sampled_from(sorted(nsm.OPERATIONS)),
    variant=st.sampled_from(["Error", *sorted(nsm.OPERATIONS)]),
    body=CBOR_VALUES,
)
def test_fuzz_well_formed_cbor_only_raises_nsm_errors(op: str, variant: str, body: Any) -> None:
    # Threat: as above, but past the CBOR parser, into the field checks.
    with contextlib.suppress(NsmError):
        decode_response(cbor2.dumps({variant: body}), op)


# --- encoding and input limits ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "args", "error"),
    [
        ("Reboot", None, NsmInvalidArgument),
        ("DescribePCR", None, NsmInvalidArgument),
        ("DescribePCR", {"index": -1}, NsmInvalidArgument),
        ("DescribePCR", {"index": 65536}, NsmInvalidArgument),
        ("DescribePCR", {"index": True}, NsmInvalidArgument),
        ("DescribePCR", {"index": "1"}, NsmInvalidArgument),
        ("DescribePCR", {"index": 1, "data": b""}, NsmInvalidArgument),
        ("DescribeNSM", {"index": 1}, NsmInvalidArgument),
        ("ExtendPCR", {"index": 16, "data": "abc"}, NsmInvalidArgument),
        ("ExtendPCR", {"index": 16}, NsmInvalidArgument),
        ("LockPCRs", {"range": 2**16}, NsmInvalidArgument),
        ("Attestation", {"nonce": "01020304"}, NsmInvalidArgument),
        ("Attestation", {"user_data": bytes(MAX_USER_DATA + 1)}, NsmInputTooLarge),
        ("Attestation", {"nonce": bytes(MAX_NONCE + 1)}, NsmInputTooLarge),
        ("Attestation", {"public_key": bytes(MAX_PUBLIC_KEY + 1)}, NsmInputTooLarge),
        ("ExtendPCR", {"index": 16, "data": bytes(MAX_REQUEST_BYTES)}, NsmInputTooLarge),
    ],
)
def test_bad_requests_are_refused_before_the_device(
    op: str, args: dict[str, Any] | None, error: type[NsmError]
) -> None:
    with pytest.raises(error):
        encode_request(op, args)


def test_limits_are_inclusive() -> None:
    request = encode_request(
        "Attestation",
        {"user_data": bytes(MAX_USER_DATA), "nonce": bytes(MAX_NONCE), "public_key": bytes(MAX_PUBLIC_KEY)},
    )
    assert cbor2.loads(request)["Attestation"]["public_key"] == bytes(MAX_PUBLIC_KEY)


def test_request_size_limit_is_exact() -> None:
    overhead = len(encode_request("ExtendPCR", {"index": 16, "data": bytes(1000)})) - 1000
    fits = MAX_REQUEST_BYTES - overhead
    assert len(encode_request("ExtendPCR", {"index": 16, "data": bytes(fits)})) == MAX_REQUEST_BYTES
    with pytest.raises(NsmInputTooLarge, match="4096"):
        encode_request("ExtendPCR", {"index": 16, "data": bytes(fits + 1)})


def test_bytes_like_inputs_are_accepted() -> None:
    expected = VECTOR_BYTES["Attestation{nonce=01020304}"]
    assert encode_request("Attestation", {"nonce": bytearray.fromhex("01020304")}) == expected
    assert encode_request("Attestation", {"nonce": memoryview(bytes.fromhex("01020304"))}) == expected


# --- the device, over a fake driver -------------------------------------------------------------


class FakeDriver:
    """Plays drivers/misc/nsm.c: reads the request from memory, writes the response back."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        self.error: OSError | None = None
        self.tamper: Callable[[int, int, int, int], tuple[int, int, int, int]] | None = None
        self.busy = False
        self.overlaps = 0
        self.delay = 0.0

    def queue(self, *responses: bytes) -> None:
        self.responses.extend(responses)

    def __call__(self, fd: int, request: int, buf: bytearray, mutate: bool) -> int:
        assert request == NSM_IOCTL_RAW
        assert mutate is True
        assert isinstance(buf, bytearray) and len(buf) == 32
        os.fstat(fd)  # a real, open descriptor
        if self.busy:
            self.overlaps += 1
        self.busy = True
        try:
            time.sleep(self.delay)
            if self.error is not None:
                raise self.error
            req_addr, req_len, resp_addr, resp_cap = unpack_nsm_raw(buf)
            assert req_len <= MAX_REQUEST_BYTES and resp_cap == MAX_RESPONSE_BYTES
            self.requests.append(ctypes.string_at(req_addr, req_len))
            answer = self.responses.pop(0)
            assert len(answer) <= resp_cap
            ctypes.memmove(resp_addr, answer, len(answer))
            fields = (req_addr, req_len, resp_addr, len(answer))
            if self.tamper is not None:
                fields = self.tamper(*fields)
            buf[:] = pack_nsm_raw(*fields)
            return 0
        finally:
            self.busy = False


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def device(tmp_path: Path, driver: FakeDriver) -> NsmDevice:
    path = tmp_path / "nsm"
    path.touch()
    return NsmDevice(str(path), ioctl=driver)


def test_device_round_trips_every_operation(device: NsmDevice, driver: FakeDriver) -> None:
    document = ATTESTATION_VECTOR.read_bytes()  # a real 4.7 KB document through the real buffers
    driver.queue(
        response("Attestation", {"document": document}),
        GOOD_RESPONSES["DescribePCR"][0],
        GOOD_RESPONSES["ExtendPCR"][0],
        GOOD_RESPONSES["LockPCR"][0],
        GOOD_RESPONSES["LockPCRs"][0],
        GOOD_RESPONSES["DescribeNSM"][0],
        GOOD_RESPONSES["GetRandom"][0],
        response("Attestation", {"document": b"d2"}),
    )
    assert device.attestation(nonce=bytes.fromhex("01020304")) == document
    assert device.describe_pcr(0) == GOOD_RESPONSES["DescribePCR"][1]
    assert device.extend_pcr(16, b"abc") == b"\x01" * 48
    device.lock_pcr(16)
    device.lock_pcrs(32)
    assert device.describe_nsm() == GOOD_RESPONSES["DescribeNSM"][1]
    assert device.get_random() == b"\x07" * 256
    assert device.attestation() == b"d2"
    assert driver.requests == [
        VECTOR_BYTES["Attestation{nonce=01020304}"],
        VECTOR_BYTES["DescribePCR{index:0}"],
        VECTOR_BYTES['ExtendPCR{index:16,data:"abc"}'],
        VECTOR_BYTES["LockPCR{index:16}"],
        VECTOR_BYTES["LockPCRs{range:32}"],
        VECTOR_BYTES["DescribeNSM"],
        VECTOR_BYTES["GetRandom"],
        VECTOR_BYTES["Attestation{all None}"],
    ]


def test_device_maps_error_answers(device: NsmDevice, driver: FakeDriver) -> None:
    driver.queue(cbor2.dumps({"Error": "ReadOnlyIndex"}), cbor2.dumps({"Error": "InvalidIndex"}))
    with pytest.raises(NsmReadOnlyIndex):
        device.extend_pcr(0, b"x")
    with pytest.raises(NsmInvalidIndex):
        device.describe_pcr(40)


def test_device_enforces_limits_before_calling_the_driver(device: NsmDevice, driver: FakeDriver) -> None:
    with pytest.raises(NsmInputTooLarge, match="user_data"):
        device.attestation(user_data=bytes(MAX_USER_DATA + 1))
    with pytest.raises(NsmInvalidArgument):
        device.describe_pcr(-1)
    assert driver.requests == []


@pytest.mark.parametrize(
    "tamper",
    [
        # Threat: a response length (or buffer address) in the struct that would make us read
        # memory outside the response buffer.
        lambda qa, ql, ra, rl: (qa, ql, ra, MAX_RESPONSE_BYTES + 1),
        lambda qa, ql, ra, rl: (qa, ql, ra + 16, rl),
    ],
)
def test_device_never_reads_outside_its_buffer(
    device: NsmDevice, driver: FakeDriver, tamper: Callable[[int, int, int, int], tuple[int, int, int, int]]
) -> None:
    driver.tamper = tamper
    driver.queue(GOOD_RESPONSES["GetRandom"][0])
    with pytest.raises(NsmProtocolError):
        device.get_random()


def test_device_decodes_only_the_reported_length(device: NsmDevice, driver: FakeDriver) -> None:
    # Bytes past the reported length are not part of the answer.
    data = GOOD_RESPONSES["ExtendPCR"][0]
    driver.tamper = lambda qa, ql, ra, rl: (qa, ql, ra, rl - 1)
    driver.queue(data)
    with pytest.raises(NsmProtocolError):
        device.extend_pcr(16, b"abc")


@pytest.mark.parametrize(
    ("err", "expected"),
    [(errno.EMSGSIZE, NsmInputTooLarge), (errno.EIO, NsmInternalError), (errno.EFAULT, NsmInternalError)],
)
def test_device_maps_ioctl_errno(device: NsmDevice, driver: FakeDriver, err: int, expected: type) -> None:
    driver.error = OSError(err, os.strerror(err))
    with pytest.raises(expected):
        device.get_random()


def test_device_unavailable_names_the_path_and_the_way_out(tmp_path: Path) -> None:
    missing = tmp_path / "no-nsm"
    with pytest.raises(NsmUnavailable) as info:
        NsmDevice(str(missing))
    assert str(missing) in str(info.value)
    assert "emulator" in str(info.value) and "sidecar dev" in str(info.value)


@pytest.mark.skipif(os.path.exists("/dev/nsm"), reason="this machine has an NSM")
def test_default_device_is_unavailable_outside_an_enclave() -> None:
    with pytest.raises(NsmUnavailable, match="/dev/nsm"):
        NsmDevice()


def test_close_is_idempotent_and_final(device: NsmDevice, driver: FakeDriver) -> None:
    fd = device._fd
    assert fd is not None
    device.close()
    device.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(NsmUnavailable, match="closed"):
        device.get_random()


def test_context_manager_closes(tmp_path: Path, driver: FakeDriver) -> None:
    path = tmp_path / "nsm"
    path.touch()
    with NsmDevice(path, ioctl=driver) as dev:
        pass
    with pytest.raises(NsmUnavailable):
        dev.describe_nsm()


def test_device_serialises_concurrent_calls(device: NsmDevice, driver: FakeDriver) -> None:
    # The driver handles one message per ioctl on shared state; never overlap calls from threads.
    driver.delay = 0.001
    count = 24
    driver.queue(*[GOOD_RESPONSES["GetRandom"][0]] * count)
    results: list[bytes] = []

    def worker() -> None:
        for _ in range(count // 4):
            results.append(device.get_random())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert driver.overlaps == 0
    assert len(results) == count


@pytest.mark.skipif(sys.platform != "linux", reason="the NSM driver is Linux-only")
def test_real_ioctl_reaches_the_kernel(tmp_path: Path) -> None:
    # With the default fcntl.ioctl on a file that is not the NSM, the kernel refuses the request
    # (ENOTTY); the device reports it as an NSM error, not a raw OSError.
    path = tmp_path / "not-nsm"
    path.touch()
    with NsmDevice(str(path)) as dev, pytest.raises(NsmInternalError):
        dev.get_random()
