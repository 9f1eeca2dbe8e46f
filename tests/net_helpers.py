"""Socket helpers shared by test_transports.py, test_host.py and test_netns.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator

from sidecar.net import vsock
from sidecar.net.vsock import Endpoint


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    total = 0
    while limit is None or total < limit:
        data = await loop.sock_recv(sock, 1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


async def recv_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    buf = b""
    async with asyncio.timeout(timeout):
        while not buf.endswith(b"\n"):
            data = await loop.sock_recv(sock, 1)
            if not data:
                break
            buf += data
    return buf


@contextlib.asynccontextmanager
async def echo_server(ep: Endpoint) -> AsyncIterator[vsock.Listener]:
    """Echoes everything, then half-closes after the client's EOF."""

    async def handle(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(sock, 1 << 16):
            await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    listener = await vsock.serve(ep, handle)
    try:
        yield listener
    finally:
        await listener.close()


async def echo_roundtrip(ep: Endpoint, size: int) -> None:
    """Send ``size`` random bytes, half-close, and check the echo hashes the same."""
    payload = os.urandom(size)
    sock = await vsock.connect(ep, timeout=5)
    loop = asyncio.get_running_loop()
    try:

        async def send() -> None:
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)

        sender = asyncio.ensure_future(send())
        echoed = await recv_all(sock)
        await sender
    finally:
        sock.close()
    assert len(echoed) == size
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
