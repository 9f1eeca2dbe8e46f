"""Enclaver's host-egress protocol, byte compatible with ``enclaver/src/proxy/egress_http.rs``.

The enclave connects to the parent over vsock and sends one message; the parent answers one message;
then raw bytes flow both ways. A message is a 2-byte little-endian length followed by that many bytes
of JSON (serde_json on Enclaver's side):

    request   {"host": "example.com", "port": 443}
    response  "Ok"   or   {"Err": {"os_code": 111, "message": "Connection refused (os error 111)"}}

The host name ``host`` (any case) means the parent's own 127.0.0.1.

Everything read here comes from the other side of a trust boundary (a compromised enclave app, or a
compromised parent), so every malformed input ends in a :class:`WireError` that says what was wrong,
never in another exception. Reads are exact: not one byte past the message is consumed, because the
bytes after it belong to the tunnel.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, NoReturn

MAX_MESSAGE = 65535
# A request is a host name (at most 253 characters, an IPv6 literal is shorter) and a port; anything
# much bigger is not a request. The parent reads requests with this limit.
MAX_REQUEST = 1024
MAX_HOST = 253
OUTSIDE_HOST = "host"  # Enclaver's constants::OUTSIDE_HOST: the parent's loopback
OUTSIDE_HOST_REASON = "'host' is the parent's own loopback"  # why a wildcard does not allow it

_LENGTH = struct.Struct("<H")


class WireError(Exception):
    """A message that could not be read, was malformed, or (for :class:`ConnectRefused`) a refusal."""


class ConnectRefused(WireError):
    """The parent answered ``Err``: it could not (or would not) connect to the target."""

    def __init__(self, host: str, port: int, os_code: int, message: str) -> None:
        super().__init__(f"parent refused {host}:{port}: {message} (os error {os_code})")
        self.host = host
        self.port = port
        self.os_code = os_code
        self.message = message


def encode(obj: Any) -> bytes:
    """Frame one JSON value: 2-byte little-endian length + compact UTF-8 JSON."""
    try:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise WireError(f"cannot encode message: {e}") from None
    if not body or len(body) > MAX_MESSAGE:
        raise WireError(f"message of {len(body)} bytes does not fit the 2-byte length (max {MAX_MESSAGE})")
    return _LENGTH.pack(len(body)) + body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "host" keys would let two parsers disagree on the target; refuse the ambiguity.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireError(f"bad JSON: duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> NoReturn:
    raise WireError(f"bad JSON: {name} is not allowed")


def decode(body: bytes) -> Any:
    """Parse one message body (without the length prefix)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("bad message: not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise WireError(f"bad JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise WireError("bad JSON: nested too deeply") from None


async def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = await loop.sock_recv_into(sock, view[got:])
        except OSError as e:
            raise WireError(f"connection failed while reading {what}: {e.strerror or e}") from None
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes of {what}")
        got += k
    return bytes(buf)


async def _read(sock: socket.socket, limit: int) -> Any:
    (length,) = _LENGTH.unpack(await _recv_exact(sock, 2, "the length prefix"))
    if length == 0:
        raise WireError("empty message (length 0)")
    if length > limit:
        raise WireError(f"message of {length} bytes is over the limit of {limit}")
    return decode(await _recv_exact(sock, length, f"a {length}-byte message"))


async def read_message(sock: socket.socket, timeout: float | None = None, *, limit: int = MAX_MESSAGE) -> Any:  # noqa: ASYNC109
    """Read one framed JSON message; ``limit`` caps the announced length. Raises :class:`WireError`."""
    try:
        async with asyncio.timeout(timeout):
            return await _read(sock, limit)
    except TimeoutError:
        raise WireError(f"timed out after {timeout:g} s waiting for a message") from None


async def write_message(sock: socket.socket, obj: Any, timeout: float | None = None) -> None:  # noqa: ASYNC109
    data = encode(obj)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_sendall(sock, data)
    except TimeoutError:
        raise WireError(f"timed out after {timeout:g} s sending a message") from None
    except OSError as e:
        raise WireError(f"connection failed while sending: {e.strerror or e}") from None


def _check_host(host: object) -> str:
    if not isinstance(host, str):
        raise WireError(f"bad request: host must be a string, not {type(host).__name__}")
    if not host:
        raise WireError("bad request: host is empty")
    if len(host) > MAX_HOST:
        raise WireError(f"bad request: host is {len(host)} characters (max {MAX_HOST})")
    if not host.isprintable() or any(c.isspace() for c in host):
        raise WireError("bad request: host contains whitespace or control characters")
    return host


def _check_port(port: object) -> int:
    # bool is an int in Python; serde would refuse true/false for a u16.
    if not isinstance(port, int) or isinstance(port, bool):
        raise WireError(f"bad request: port must be an integer, not {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise WireError(f"bad request: port {port} is out of range 1-65535")
    return port


def parse_request(obj: Any) -> tuple[str, int]:
    """Validate a decoded request: exactly ``{"host": str, "port": 1..65535}``."""
    if not isinstance(obj, dict):
        raise WireError(f"bad request: expected an object with host and port, got {type(obj).__name__}")
    missing = sorted({"host", "port"} - obj.keys())
    if missing:
        raise WireError(f"bad request: missing {', '.join(missing)}")
    extra = sorted(obj.keys() - {"host", "port"})
    if extra:
        raise WireError(f"bad request: unexpected key {extra[0]!r}")
    return _check_host(obj["host"]), _check_port(obj["port"])


async def read_request(sock: socket.socket, timeout: float | None = None) -> tuple[str, int]:  # noqa: ASYNC109
    """Parent side: read and validate the enclave's connect request."""
    return parse_request(await read_message(sock, timeout, limit=MAX_REQUEST))


def ok_response() -> str:
    return "Ok"


def err_response(os_code: int, message: str) -> dict[str, Any]:
    return {"Err": {"os_code": int(os_code), "message": message}}


async def send_ok(sock: socket.socket, timeout: float | None = None) -> None:  # noqa: ASYNC109
    await write_message(sock, ok_response(), timeout)


async def send_err(sock: socket.socket, os_code: int, message: str, timeout: float | None = None) -> None:  # noqa: ASYNC109
    # Truncate so an arbitrarily long OS or resolver message can never overflow the frame.
    await write_message(sock, err_response(os_code, message[:1024]), timeout)


def parse_response(obj: Any, host: str, port: int) -> None:
    """Return if ``obj`` is ``"Ok"``; raise :class:`ConnectRefused` for ``Err``, WireError otherwise."""
    if obj == "Ok":
        return
    if isinstance(obj, dict) and list(obj) == ["Err"] and isinstance(obj["Err"], dict):
        err = obj["Err"]
        code, message = err.get("os_code"), err.get("message")
        if (
            set(err) == {"os_code", "message"}
            and isinstance(code, int)
            and not isinstance(code, bool)
            and isinstance(message, str)
        ):
            raise ConnectRefused(host, port, code, message)
    shown = json.dumps(obj)[:80]
    raise WireError(f'bad response from parent: expected "Ok" or {{"Err": ...}}, got {shown}')


async def request_connect(sock: socket.socket, host: str, port: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
    """Enclave side: ask the parent to connect ``sock`` through to ``host:port``.

    Returns once the parent answered ``Ok``; from then on ``sock`` is the tunnel. Raises
    :class:`ConnectRefused` ("parent refused host:port: <message> (os error N)") or :class:`WireError`.
    """
    request = {"host": _check_host(host), "port": _check_port(port)}
    try:
        async with asyncio.timeout(timeout):
            await write_message(sock, request)
            answer = await read_message(sock)
    except TimeoutError:
        raise WireError(
            f"timed out after {timeout:g} s waiting for the parent to answer {host}:{port}"
        ) from None
    parse_response(answer, host, port)
