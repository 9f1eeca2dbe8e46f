"""Transports (tcp/unix/vsock endpoints), Enclaver's egress wire protocol, ingress bridges, and the
enclave's log and status streams. Everything runs over Unix sockets and loopback TCP here; the same
code between network namespaces is in test_netns.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from net_helpers import echo_roundtrip, echo_server, pair, recv_all, recv_line

from sidecar.net import vsock, wire
from sidecar.net.ingress import start_bridges, start_ingress_bridges, vsock_ingress_pairs
from sidecar.net.streams import LogStream, StatusStream, start_streams
from sidecar.net.vsock import Endpoint, parse_endpoint
from sidecar.testing import free_port

# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:8001", Endpoint("tcp", host="127.0.0.1", port=8001)),
        ("tcp:localhost:0", Endpoint("tcp", host="localhost", port=0)),
        ("tcp:[::1]:443", Endpoint("tcp", host="::1", port=443)),
        ("unix:/run/enclave/8001.sock", Endpoint("unix", path="/run/enclave/8001.sock")),
        ("vsock:3:17002", Endpoint("vsock", cid=3, port=17002)),
        ("vsock:4294967295:4294967295", Endpoint("vsock", cid=(1 << 32) - 1, port=(1 << 32) - 1)),
    ],
)
def test_parse_endpoint_round_trips(text: str, expected: Endpoint) -> None:
    ep = parse_endpoint(text)
    assert ep == expected
    assert str(ep) == text
    assert parse_endpoint(str(ep)) == ep


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected tcp:HOST:PORT"),
        ("http://x", "expected tcp:HOST:PORT"),
        ("tcp:8001", "expected tcp:HOST:PORT"),
        ("tcp::8001", "expected tcp:HOST:PORT"),
        ("tcp:host:http", "port 'http' is not a decimal number"),
        ("tcp:host:-1", "is not a decimal number"),
        ("tcp:host:65536", "out of range 0-65535"),
        ("tcp:::1:80", "IPv6 address in brackets"),
        ("tcp:[nope]:80", "not an IPv6 address"),
        ("unix:", "unix needs a path"),
        ("unix:/" + "x" * 200, "longer than 107 bytes"),
        ("vsock:3", "expected vsock:CID:PORT"),
        ("vsock:three:1", "CID 'three' is not a decimal number"),
        ("vsock:3:4294967296", "out of range"),
        ("vsock:4294967296:1", "out of range"),
        ("vsock:3:\uff11\uff12", "not a decimal number"),  # full-width digits: isdigit() but not ASCII
    ],
)
def test_parse_endpoint_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad endpoint") as info:
        parse_endpoint(text)
    assert message in str(info.value)


def test_endpoint_constructor_validates() -> None:
    with pytest.raises(ValueError, match="unknown endpoint kind"):
        Endpoint("udp", host="x", port=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NUL"):
        Endpoint("unix", path="/tmp/a\0b")
    with pytest.raises(ValueError, match="has no port"):
        Endpoint("unix", path="/x").with_port(1)
    assert Endpoint("vsock", cid=16, port=1).with_port(8001) == Endpoint("vsock", cid=16, port=8001)


# --------------------------------------------------------------------------- connect / serve


@pytest.fixture(params=["tcp", "unix"])
def any_endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Endpoint:
    if request.param == "tcp":
        return Endpoint("tcp", host="127.0.0.1", port=0)
    return Endpoint("unix", path=str(tmp_path / "s.sock"))


async def test_serve_and_connect_carry_bytes_both_ways(any_endpoint: Endpoint) -> None:
    async with echo_server(any_endpoint) as listener:
        if any_endpoint.kind == "tcp":
            assert listener.endpoint.port != 0  # port 0 resolved to the bound port
        await echo_roundtrip(listener.endpoint, 1 << 20)
        assert listener.accepted == 1


async def test_listener_close_ends_handlers_and_removes_the_socket_file(tmp_path: Path) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handle(sock: socket.socket) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    path = tmp_path / "c.sock"
    listener = await vsock.serve(vsock.unix(path), handle)
    client = await vsock.connect(listener.endpoint, timeout=5)
    await asyncio.wait_for(started.wait(), 5)
    assert listener.active == 1
    t0 = time.monotonic()
    await listener.close()
    assert time.monotonic() - t0 < 1
    assert cancelled.is_set()
    assert not path.exists()
    # The server side of the connection was closed: the client reads EOF.
    assert await asyncio.wait_for(recv_all(client), 5) == b""
    client.close()
    with pytest.raises(OSError):
        await vsock.connect(listener.endpoint, timeout=1)
    await listener.close()  # idempotent


async def test_stale_unix_socket_is_replaced_but_other_files_are_not(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crashed run leaves
    async with echo_server(vsock.unix(path)) as listener:
        await echo_roundtrip(listener.endpoint, 100)
        # A second listener on a live socket is refused, not stolen.
        with pytest.raises(OSError, match="in use"):
            await vsock.serve(vsock.unix(path), lambda s: asyncio.sleep(0))
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        await vsock.serve(vsock.unix(regular), lambda s: asyncio.sleep(0))
    assert regular.read_text() == "keep me"


async def test_max_connections_closes_the_extra_connection(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handle(sock: socket.socket) -> None:
        await release.wait()

    listener = await vsock.serve(vsock.unix(tmp_path / "m.sock"), handle, max_connections=1)
    first = await vsock.connect(listener.endpoint)
    while listener.active < 1:
        await asyncio.sleep(0.01)
    second = await vsock.connect(listener.endpoint)
    assert await asyncio.wait_for(recv_all(second), 5) == b""  # closed at once
    assert listener.rejected == 1
    release.set()
    first.close()
    second.close()
    await listener.close()


async def test_connect_errors_are_oserrors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await vsock.connect(vsock.unix(tmp_path / "nobody.sock"))
    port = free_port()  # a port nobody listens on
    with pytest.raises(ConnectionRefusedError):
        await vsock.connect(vsock.tcp("127.0.0.1", port), timeout=5)


async def test_handler_exception_is_logged_without_killing_the_listener(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def handle(sock: socket.socket) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("secret-token-123")

    listener = await vsock.serve(vsock.unix(tmp_path / "h.sock"), handle)
    with caplog.at_level(logging.ERROR, logger="sidecar.net.vsock"):
        for _ in range(2):
            s = await vsock.connect(listener.endpoint)
            assert await asyncio.wait_for(recv_all(s), 5) == b""
            s.close()
    await listener.close()
    assert calls == 2
    failures = [r for r in caplog.records if r.getMessage() == "handler_failed"]
    assert len(failures) == 2
    assert "secret-token-123" not in caplog.text  # the exception type is logged, not its text


@pytest.mark.skipif(not hasattr(socket, "AF_VSOCK"), reason="this Python has no AF_VSOCK")
async def test_vsock_listener_binds_any_cid() -> None:
    """Binding works without vsock loopback; connecting to ourselves does not (never CID 1 or 2)."""
    try:
        listener = await vsock.serve(Endpoint("vsock", cid=socket.VMADDR_CID_ANY, port=0), vsock_noop)
    except vsock.VsockUnsupportedError as e:
        pytest.skip(str(e))
    assert listener.endpoint.kind == "vsock"
    assert 0 < listener.endpoint.port < socket.VMADDR_PORT_ANY
    await listener.close()


async def vsock_noop(sock: socket.socket) -> None:
    return None


async def test_vsock_unsupported_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket
    family = getattr(socket, "AF_VSOCK", 40)

    def fake(fam: int = -1, *args: object, **kwargs: object) -> socket.socket:
        if fam == family:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(fam, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", fake)
    with pytest.raises(vsock.VsockUnsupportedError, match="vsock is not available on this kernel"):
        await vsock.connect(Endpoint("vsock", cid=16, port=5000))
    with pytest.raises(vsock.VsockUnsupportedError, match="tcp: or unix: endpoint"):
        await vsock.serve(Endpoint("vsock", cid=socket.VMADDR_CID_ANY, port=0), vsock_noop)
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    with pytest.raises(vsock.VsockUnsupportedError, match="no AF_VSOCK"):
        await vsock.connect(Endpoint("vsock", cid=16, port=5000))


# --------------------------------------------------------------------------- wire


def test_wire_bytes_match_enclavers_serde_json() -> None:
    """Byte compatibility with egress_http.rs: u16 LE length, then serde_json's compact output."""
    assert wire.encode({"host": "host", "port": 443}) == b'\x1a\x00{"host":"host","port":443}'
    assert wire.encode("Ok") == b'\x04\x00"Ok"'
    err = wire.encode(wire.err_response(111, "Connection refused (os error 111)"))
    body = b'{"Err":{"os_code":111,"message":"Connection refused (os error 111)"}}'
    assert err == len(body).to_bytes(2, "little") + body


async def test_request_connect_and_read_request_round_trip() -> None:
    enclave, parent = pair()

    async def parent_side() -> tuple[str, int]:
        req = await wire.read_request(parent, timeout=5)
        await wire.send_ok(parent)
        await asyncio.get_running_loop().sock_sendall(parent, b"tunnel bytes")
        return req

    task = asyncio.ensure_future(parent_side())
    await wire.request_connect(enclave, "kms.eu-west-1.amazonaws.com", 443, timeout=5)
    assert await task == ("kms.eu-west-1.amazonaws.com", 443)
    # The response was read exactly: the tunnel's first bytes are still in the socket.
    assert await asyncio.get_running_loop().sock_recv(enclave, 100) == b"tunnel bytes"
    enclave.close()
    parent.close()


async def test_read_request_leaves_the_tunnel_bytes_unread() -> None:
    a, b = pair()
    a.sendall(wire.encode({"host": "example.com", "port": 80}) + b"GET / HTTP/1.1\r\n")
    assert await wire.read_request(b, timeout=5) == ("example.com", 80)
    assert b.recv(100) == b"GET / HTTP/1.1\r\n"
    a.close()
    b.close()


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(2, "little") + body


MALFORMED_REQUESTS = [
    (b"\x00\x00", "empty message (length 0)"),
    (b"\xd0\x07" + b"x" * 2000, "message of 2000 bytes is over the limit of 1024"),
    (b"\x05", "connection closed after 1 of 2 bytes of the length prefix"),
    (b'\x10\x00{"host"', "connection closed after 7 of 16 bytes"),
    (frame(b"\xff\xfe"), "not UTF-8"),
    (frame(b"{host: 1}"), "bad JSON"),
    (frame(b'{"host":"a","port":NaN}'), "NaN is not allowed"),
    (frame(b'{"host":"a","host":"b","port":1}'), "duplicate key 'host'"),
    (frame(b"[" * 1000), "bad JSON"),
    (frame(b'["a", 1]'), "expected an object with host and port, got list"),
    (frame(b'"Ok"'), "expected an object with host and port, got str"),
    (frame(b'{"port":1}'), "missing host"),
    (frame(b'{"host":"a"}'), "missing port"),
    (frame(b'{"host":"a","port":1,"via":"x"}'), "unexpected key 'via'"),
    (frame(b'{"host":7,"port":1}'), "host must be a string, not int"),
    (frame(b'{"host":null,"port":1}'), "host must be a string, not NoneType"),
    (frame(b'{"host":["a"],"port":1}'), "host must be a string, not list"),
    (frame(b'{"host":"","port":1}'), "host is empty"),
    (frame(json.dumps({"host": "a" * 254, "port": 1}).encode()), "host is 254 characters (max 253)"),
    (frame(b'{"host":"a b","port":1}'), "whitespace or control characters"),
    (frame(b'{"host":"a\\u0000b","port":1}'), "whitespace or control characters"),
    (frame(b'{"host":"a\\nb","port":1}'), "whitespace or control characters"),
    (frame(b'{"host":"a","port":0}'), "port 0 is out of range 1-65535"),
    (frame(b'{"host":"a","port":65536}'), "port 65536 is out of range 1-65535"),
    (frame(b'{"host":"a","port":-443}'), "port -443 is out of range"),
    (frame(b'{"host":"a","port":"443"}'), "port must be an integer, not str"),
    (frame(b'{"host":"a","port":443.0}'), "port must be an integer, not float"),
    (frame(b'{"host":"a","port":true}'), "port must be an integer, not bool"),
    (frame(b'{"host":"a","port":1e400}'), "port must be an integer, not float"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED_REQUESTS)
async def test_malformed_requests_raise_a_specific_wire_error(data: bytes, message: str) -> None:
    """Threat: a compromised enclave app speaks the parent's protocol directly with crafted input."""
    a, b = pair()
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(wire.WireError) as info:
        await wire.read_request(b, timeout=5)
    assert message in str(info.value)
    a.close()
    b.close()


async def test_read_message_times_out_on_a_silent_peer() -> None:
    a, b = pair()
    a.sendall(b"\x10\x00{")  # announces 16 bytes, sends 1, then stalls
    with pytest.raises(wire.WireError, match=r"timed out after 0.1 s"):
        await wire.read_message(b, timeout=0.1)
    a.close()
    b.close()


async def test_random_input_only_ever_raises_wire_error() -> None:
    rng = random.Random(1234)
    for i in range(300):
        a, b = pair()
        size = rng.randrange(0, 40)
        data = rng.randbytes(size) if i % 2 else frame(rng.randbytes(size))
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        with contextlib.suppress(wire.WireError):
            await wire.read_request(b, timeout=5)
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("response", "message"),
    [
        ({"Err": {"os_code": "111", "message": "x"}}, "bad response from parent"),
        ({"Err": {"os_code": 111}}, "bad response from parent"),
        ({"Err": {"os_code": 1, "message": "x", "more": 1}}, "bad response from parent"),
        ({"Err": "refused"}, "bad response from parent"),
        ({"Ok": None}, "bad response from parent"),
        ("ok", "bad response from parent"),
        (["Ok"], "bad response from parent"),
    ],
)
def test_bad_responses_are_not_mistaken_for_ok(response: object, message: str) -> None:
    with pytest.raises(wire.WireError, match=message) as info:
        wire.parse_response(response, "h", 1)
    assert not isinstance(info.value, wire.ConnectRefused)


async def test_refusal_carries_code_and_message() -> None:
    enclave, parent = pair()

    async def parent_side() -> None:
        await wire.read_request(parent, timeout=5)
        await wire.send_err(parent, 111, "Connection refused")

    task = asyncio.ensure_future(parent_side())
    with pytest.raises(wire.ConnectRefused) as info:
        await wire.request_connect(enclave, "db.internal", 5432, timeout=5)
    await task
    assert str(info.value) == "parent refused db.internal:5432: Connection refused (os error 111)"
    assert (info.value.os_code, info.value.message) == (111, "Connection refused")
    enclave.close()
    parent.close()


async def test_request_connect_validates_before_sending() -> None:
    a, b = pair()
    with pytest.raises(wire.WireError, match="out of range"):
        await wire.request_connect(a, "example.com", 70000)
    with pytest.raises(wire.WireError, match="whitespace"):
        await wire.request_connect(a, "example.com\r\nX", 80)
    with pytest.raises(BlockingIOError):
        b.recv(1)  # nothing was sent
    a.close()
    b.close()


async def test_request_connect_times_out_when_the_parent_never_answers() -> None:
    a, b = pair()
    with pytest.raises(wire.WireError, match=r"timed out after 0\.1 s waiting for the parent"):
        await wire.request_connect(a, "example.com", 443, timeout=0.1)
    a.close()
    b.close()


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(wire.WireError, match="does not fit"):
        wire.encode("x" * 70000)
    with pytest.raises(wire.WireError, match="cannot encode"):
        wire.encode(float("nan"))


# --------------------------------------------------------------------------- ingress bridges


async def test_ingress_bridge_unix_to_tcp_carries_bulk_both_ways(tmp_path: Path) -> None:
    """The enclave side's shape: accept on one transport (vsock in production), connect to TCP."""
    async with echo_server(vsock.tcp("127.0.0.1", 0)) as app:
        bridges = await start_ingress_bridges(
            [(vsock.unix(tmp_path / "8001.sock"), app.endpoint)], idle_timeout=30
        )
        async with bridges:
            await echo_roundtrip(bridges.endpoints[0], 8 << 20)
            await echo_roundtrip(bridges.endpoints[0], 0)  # an immediate EOF is relayed too
            stats = bridges.bridges[0].stats
            assert stats.connections == 2
            assert stats.bytes_in == stats.bytes_out == 8 << 20


async def test_ingress_bridge_propagates_half_close(tmp_path: Path) -> None:
    """A request/response peer that answers only after EOF (HTTP/1.0 style) still gets its answer."""

    async def answer_after_eof(sock: socket.socket) -> None:
        request = await recv_all(sock)
        await asyncio.get_running_loop().sock_sendall(sock, b"got " + request)

    app = await vsock.serve(vsock.unix(tmp_path / "app.sock"), answer_after_eof)
    bridges = await start_bridges([(vsock.tcp("127.0.0.1", 0), app.endpoint)], idle_timeout=30)
    sock = await vsock.connect(bridges.endpoints[0])
    await asyncio.get_running_loop().sock_sendall(sock, b"question")
    sock.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(recv_all(sock), 5) == b"got question"
    sock.close()
    await bridges.close()
    await app.close()


async def test_ingress_bridge_closes_when_the_target_is_down(tmp_path: Path) -> None:
    bridges = await start_bridges(
        [(vsock.unix(tmp_path / "in.sock"), vsock.unix(tmp_path / "nobody.sock"))], idle_timeout=30
    )
    sock = await vsock.connect(bridges.endpoints[0])
    assert await asyncio.wait_for(recv_all(sock), 5) == b""
    sock.close()
    assert bridges.bridges[0].stats.failed == 1
    await bridges.close()


async def test_ingress_bridge_idle_timeout_ends_a_silent_connection(tmp_path: Path) -> None:
    async with echo_server(vsock.unix(tmp_path / "app.sock")) as app:
        bridges = await start_bridges([(vsock.unix(tmp_path / "in.sock"), app.endpoint)], idle_timeout=0.2)
        sock = await vsock.connect(bridges.endpoints[0])
        t0 = time.monotonic()
        assert await asyncio.wait_for(recv_all(sock), 5) == b""
        assert 0.15 < time.monotonic() - t0 < 2
        sock.close()
        await bridges.close()


async def test_ingress_bridges_are_all_or_nothing(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    first = vsock.unix(tmp_path / "first.sock")
    with pytest.raises(FileExistsError):
        await start_ingress_bridges(
            [(first, vsock.tcp("127.0.0.1", 1)), (vsock.unix(taken), vsock.tcp("127.0.0.1", 2))], None
        )
    assert not Path(first.path).exists()  # the first listener was closed again


async def test_bridge_close_ends_open_connections(tmp_path: Path) -> None:
    async with echo_server(vsock.unix(tmp_path / "app.sock")) as app:
        bridges = await start_bridges([(vsock.unix(tmp_path / "in.sock"), app.endpoint)], idle_timeout=None)
        sock = await vsock.connect(bridges.endpoints[0])
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"ping")
        assert await loop.sock_recv(sock, 4) == b"ping"
        await asyncio.wait_for(bridges.close(), 2)
        assert await asyncio.wait_for(recv_all(sock), 5) == b""
        sock.close()


def test_vsock_ingress_pairs_map_each_port_to_local_tcp() -> None:
    assert vsock_ingress_pairs([8001, 8200], cid=0xFFFFFFFF) == [
        (Endpoint("vsock", cid=0xFFFFFFFF, port=8001), Endpoint("tcp", host="127.0.0.1", port=8001)),
        (Endpoint("vsock", cid=0xFFFFFFFF, port=8200), Endpoint("tcp", host="127.0.0.1", port=8200)),
    ]


# --------------------------------------------------------------------------- log and status streams


@pytest.fixture
def stream_logger() -> logging.Logger:
    logger = logging.getLogger(f"test.streams.{os.getpid()}.{time.monotonic_ns()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


async def test_log_stream_sends_backlog_then_live_lines(
    tmp_path: Path, stream_logger: logging.Logger
) -> None:
    streams = await start_streams(vsock.unix(tmp_path / "log.sock"), None, logger=stream_logger)
    stream_logger.info("before_connect")
    a = await vsock.connect(streams.endpoints[0])
    b = await vsock.connect(streams.endpoints[0])
    first = json.loads(await recv_line(a))
    assert first["event"] == "before_connect"  # the retained tail, like odyn's 128 KiB ring
    assert first["logger"] == stream_logger.name
    assert json.loads(await recv_line(b))["event"] == "before_connect"
    while streams.log.clients < 2:
        await asyncio.sleep(0.01)
    stream_logger.info("live", extra={"sidecar_fields": {"n": 1}})
    for s in (a, b):
        line = json.loads(await recv_line(s))
        assert (line["event"], line["n"]) == ("live", 1)
    a.close()
    b.close()
    await streams.close()
    assert streams.log not in stream_logger.handlers


async def test_log_stream_accepts_records_from_other_threads(
    tmp_path: Path, stream_logger: logging.Logger
) -> None:
    streams = await start_streams(vsock.unix(tmp_path / "log.sock"), None, logger=stream_logger)
    sock = await vsock.connect(streams.endpoints[0])
    while streams.log.clients < 1:
        await asyncio.sleep(0.01)
    thread = threading.Thread(target=stream_logger.info, args=("from_a_thread",))
    thread.start()
    thread.join()
    assert json.loads(await recv_line(sock))["event"] == "from_a_thread"
    sock.close()
    await streams.close()


async def test_slow_log_client_drops_lines_without_blocking(
    tmp_path: Path, stream_logger: logging.Logger
) -> None:
    """Threat: a stalled reader on the parent side must not stall the sidecar (or other readers)."""
    streams = await start_streams(
        vsock.unix(tmp_path / "log.sock"), None, logger=stream_logger, client_buffer_bytes=8192
    )
    slow = socket.socket(socket.AF_UNIX)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(streams.endpoints[0].path)
    slow.setblocking(False)
    fast = await vsock.connect(streams.endpoints[0])
    while streams.log.clients < 2:
        await asyncio.sleep(0.01)

    received: list[bytes] = []

    async def read_fast() -> None:
        buf = b""
        loop = asyncio.get_running_loop()
        while buf.count(b"\n") < 2000:
            buf += await loop.sock_recv(fast, 1 << 16)
        received.append(buf)

    reader = asyncio.ensure_future(read_fast())
    t0 = time.monotonic()
    for i in range(2000):
        stream_logger.info("line", extra={"sidecar_fields": {"i": i, "pad": "x" * 200}})
        if i % 10 == 0:
            await asyncio.sleep(0)  # let the fast reader keep up, as a live loop would
    elapsed = time.monotonic() - t0
    await asyncio.wait_for(reader, 10)
    lines = [json.loads(x) for x in received[0].splitlines()]
    assert [x["i"] for x in lines[:2000]] == list(range(2000))  # the fast client lost nothing
    assert streams.log.dropped > 1000  # the stalled one did, and it was counted
    assert elapsed < 2.0
    # Once the slow client catches up, the next line tells it how much it missed, where it missed it.
    slow_lines = asyncio.ensure_future(recv_all(slow))
    await asyncio.sleep(0.1)
    stream_logger.info("after_the_gap")
    slow.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.1)
    await streams.close()
    got = [json.loads(x) for x in (await asyncio.wait_for(slow_lines, 5)).splitlines()]
    assert [x["event"] for x in got[-2:]] == ["log_lines_dropped", "after_the_gap"]
    assert got[-2]["count"] == streams.log.dropped
    # What it did get has no holes before the marker.
    assert [x["i"] for x in got[:-2]] == list(range(len(got) - 2))
    slow.close()
    fast.close()


async def test_status_stream_sends_current_then_changes(tmp_path: Path) -> None:
    streams = await start_streams(None, vsock.unix(tmp_path / "status.sock"))
    sock = await vsock.connect(streams.endpoints[0])
    assert json.loads(await recv_line(sock)) == {"status": "starting"}
    streams.set_status("ready")
    assert json.loads(await recv_line(sock)) == {"status": "ready"}
    late = await vsock.connect(streams.endpoints[0])
    assert json.loads(await recv_line(late)) == {"status": "ready"}  # a new client gets the current state
    streams.set_status("exited", code=3)
    for s in (sock, late):
        assert json.loads(await recv_line(s)) == {"status": "exited", "code": 3}
    sock.close()
    late.close()
    await streams.close()


def test_status_values_are_validated() -> None:
    async def make() -> StatusStream:
        return StatusStream()

    status = asyncio.run(make())
    with pytest.raises(ValueError, match="unknown status 'running'"):
        status.set("running")
    with pytest.raises(ValueError, match="code must be an integer"):
        status.set("exited", code="3")
    status.set("fatal", error="x" * 5000)  # a long error is cut to fit Enclaver's 1024-byte lines
    assert len(status.line) < 1024
    assert status.current["status"] == "fatal"


async def test_close_delivers_the_last_status_before_stopping(tmp_path: Path) -> None:
    streams = await start_streams(None, vsock.unix(tmp_path / "status.sock"))
    sock = await vsock.connect(streams.endpoints[0])
    assert json.loads(await recv_line(sock))["status"] == "starting"
    streams.set_status("exited", code=0)
    await streams.close()
    assert json.loads(await recv_line(sock)) == {"status": "exited", "code": 0}
    assert await asyncio.wait_for(recv_all(sock), 5) == b""
    sock.close()
    assert not Path(tmp_path / "status.sock").exists()


async def test_log_stream_handler_escapes_embedded_newlines() -> None:
    handler = LogStream(formatter=logging.Formatter("%(message)s"))
    seen: list[bytes] = []
    handler.publish = seen.append  # type: ignore[method-assign]
    handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "a\nforged line", None, None))
    assert seen == [b"a\\nforged line\n"]
