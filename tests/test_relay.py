"""sidecar.net.relay: the byte pump behind every tunnel (egress CONNECT, vsock bridges).

Each test builds real connected sockets (TCP over loopback for the splice path, Unix socketpairs
and a forced copy mode for the fallback), runs ``relay(a, b)`` between two halves and checks the
bytes, the counts, half-close and how the relay ends.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.net import relay as relay_module
from sidecar.net.relay import relay


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets over loopback (what splice is really used with)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        server, _ = await accept
    server.setblocking(False)
    return client, server


def unix_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Chain:
    """left_end <-> [a  relay  b] <-> right_end: the test talks to the two ends."""

    def __init__(self, left: tuple[socket.socket, socket.socket], right: tuple[socket.socket, socket.socket]):
        self.left_end, self.a = left
        self.b, self.right_end = right

    def close(self) -> None:
        for s in (self.left_end, self.a, self.b, self.right_end):
            s.close()


@pytest.fixture(params=["tcp-splice", "unix-splice", "tcp-copy"])
async def chain(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Chain]:
    if request.param == "tcp-copy":
        # What vsock gets: no splice for this family, the user-space path.
        monkeypatch.setattr(relay_module, "_SPLICE_FAMILIES", set())
    if request.param == "unix-splice":
        c = Chain(unix_pair(), unix_pair())
    else:
        c = Chain(await tcp_pair(), await tcp_pair())
    try:
        yield c
    finally:
        c.close()


async def send_all_and_shut(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock: socket.socket, hasher: Any = None, timeout: float = 20) -> tuple[int, bytes]:
    """Read until EOF (a missing EOF, i.e. a half-close not propagated, fails after ``timeout``)."""
    return await asyncio.wait_for(_read_to_eof(sock, hasher), timeout)


async def _read_to_eof(sock: socket.socket, hasher: Any) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    total = 0
    chunks: list[bytes] = []
    buf = bytearray(1 << 20)
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if n == 0:
            return total, b"".join(chunks)
        total += n
        if hasher is not None:
            hasher.update(memoryview(buf)[:n])
        else:
            chunks.append(bytes(buf[:n]))


@pytest.mark.slow
async def test_64_mib_each_way_hash_matches(chain: Chain) -> None:
    """64 MiB each way at once: content, order and counts survive (splice and copy paths)."""
    size = 64 << 20
    up = os.urandom(1 << 20) * 64
    down = bytes(reversed(up[: 1 << 20])) * 64
    task = asyncio.ensure_future(relay(chain.a, chain.b, idle_timeout=30))
    h_right, h_left = hashlib.sha256(), hashlib.sha256()
    results = await asyncio.gather(
        send_all_and_shut(chain.left_end, up),
        send_all_and_shut(chain.right_end, down),
        read_to_eof(chain.right_end, h_right),
        read_to_eof(chain.left_end, h_left),
    )
    assert results[2][0] == size and results[3][0] == size
    assert h_right.hexdigest() == hashlib.sha256(up).hexdigest()
    assert h_left.hexdigest() == hashlib.sha256(down).hexdigest()
    assert await asyncio.wait_for(task, 10) == (size, size)


async def test_half_close_lets_the_other_side_answer(chain: Chain) -> None:
    """A client that shuts down its sending half still gets the server's reply (EOF is forwarded,
    not turned into a full close)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay(chain.a, chain.b, idle_timeout=10))
    await send_all_and_shut(chain.left_end, b"question")
    _, got = await read_to_eof(chain.right_end)  # EOF arrives: the shutdown was propagated
    assert got == b"question"
    await loop.sock_sendall(chain.right_end, b"answer after EOF")
    chain.right_end.shutdown(socket.SHUT_WR)
    _, reply = await read_to_eof(chain.left_end)
    assert reply == b"answer after EOF"
    assert await asyncio.wait_for(task, 5) == (8, 16)


async def test_buffered_bytes_go_first_and_are_counted(chain: Chain) -> None:
    """Bytes the caller already read (e.g. pipelined after a CONNECT head) are not lost or reordered."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay(chain.a, chain.b, a_buffered=b"early-", b_buffered=b"EARLY-"))
    await loop.sock_sendall(chain.left_end, b"late")
    await loop.sock_sendall(chain.right_end, b"LATE")
    chain.left_end.shutdown(socket.SHUT_WR)
    chain.right_end.shutdown(socket.SHUT_WR)
    (_, right_got), (_, left_got) = await asyncio.gather(
        read_to_eof(chain.right_end), read_to_eof(chain.left_end)
    )
    assert right_got == b"early-late"
    assert left_got == b"EARLY-LATE"
    assert await asyncio.wait_for(task, 5) == (10, 10)


async def test_idle_timeout_ends_a_silent_relay(chain: Chain) -> None:
    """A tunnel nobody uses must not hold its sockets forever (resource exhaustion)."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    task = asyncio.ensure_future(relay(chain.a, chain.b, idle_timeout=0.4))
    await asyncio.sleep(0.2)
    await loop.sock_sendall(chain.left_end, b"x")  # activity pushes the deadline out
    assert await asyncio.wait_for(task, 5) == (1, 0)
    elapsed = time.monotonic() - start
    assert 0.55 <= elapsed < 2.0


async def test_reset_ends_the_relay() -> None:
    """A peer that resets its connection ends the relay at once instead of waiting for a timeout."""
    left, a = await tcp_pair()
    b, right = await tcp_pair()
    try:
        task = asyncio.ensure_future(relay(a, b, idle_timeout=30))
        await asyncio.sleep(0.05)
        # SO_LINGER 0: close() sends RST instead of FIN.
        right.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        right.close()
        await asyncio.get_running_loop().sock_sendall(left, b"data towards a dead peer" * 1000)
        await asyncio.wait_for(task, 5)
    finally:
        for s in (left, a, b, right):
            s.close()


async def test_cancel_leaves_no_callbacks(chain: Chain) -> None:
    """Cancelling (the proxy shutting down) unregisters every reader and writer, so the sockets can be
    closed and their numbers reused safely."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay(chain.a, chain.b))
    await asyncio.sleep(0.05)
    selector = loop._selector  # type: ignore[attr-defined]
    assert chain.a.fileno() in selector.get_map()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    registered = selector.get_map()
    assert chain.a.fileno() not in registered and chain.b.fileno() not in registered


async def test_blocking_socket_is_refused() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="non-blocking"):
            await relay(a, b)
    finally:
        a.close()
        b.close()


async def test_splice_einval_falls_back_without_losing_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket family that accepts splice into the pipe but refuses splice out of it (EINVAL), as
    vsock may: what already sits in the pipe moves to user space and nothing is lost."""
    real_splice = os.splice
    refused = 0

    def splice(
        src: int, dst: int, count: int, offset_src: Any = None, offset_dst: Any = None, flags: int = 0
    ) -> int:
        nonlocal refused
        if stat_is_fifo(src):  # pipe -> socket
            refused += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count, flags=flags)

    monkeypatch.setattr(os, "splice", splice)
    (left, a), (b, right) = await tcp_pair(), await tcp_pair()
    try:
        payload = os.urandom(3 << 20)
        task = asyncio.ensure_future(relay(a, b, idle_timeout=10))
        _, (_, got) = await asyncio.gather(send_all_and_shut(left, payload), read_to_eof(right))
        right.shutdown(socket.SHUT_WR)
        assert got == payload
        assert await asyncio.wait_for(task, 5) == (len(payload), 0)
        assert refused >= 1
    finally:
        for s in (left, a, b, right):
            s.close()


def stat_is_fifo(fd: int) -> bool:
    return stat.S_ISFIFO(os.fstat(fd).st_mode)


async def test_many_relays_share_the_loop_fairly() -> None:
    """One busy tunnel must not starve the others: a small exchange completes while a bulk
    transfer runs on the same loop."""
    loop = asyncio.get_running_loop()
    pairs = [(await tcp_pair(), await tcp_pair()) for _ in range(2)]
    chains = [Chain(left, right) for left, right in pairs]
    try:
        tasks = [asyncio.ensure_future(relay(c.a, c.b, idle_timeout=10)) for c in chains]
        bulk, small = chains
        blob = os.urandom(1 << 20) * 32
        bulk_send = asyncio.ensure_future(send_all_and_shut(bulk.left_end, blob))
        bulk_read = asyncio.ensure_future(read_to_eof(bulk.right_end, hashlib.sha256()))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        await loop.sock_sendall(small.left_end, b"ping")
        got = await asyncio.wait_for(loop.sock_recv(small.right_end, 16), 5)
        latency = time.monotonic() - start
        assert got == b"ping"
        assert latency < 1.0
        await bulk_send
        assert (await bulk_read)[0] == len(blob)
        bulk.right_end.shutdown(socket.SHUT_WR)
        small.left_end.shutdown(socket.SHUT_WR)
        small.right_end.shutdown(socket.SHUT_WR)
        await read_to_eof(small.left_end)
        await read_to_eof(small.right_end)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        for c in chains:
            c.close()
