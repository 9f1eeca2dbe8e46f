"""Stream transports behind one interface: vsock (the only way out of a Nitro Enclave), Unix, TCP.

Production speaks vsock between the enclave and its parent; tests and dev runs speak Unix sockets or
TCP (between network namespaces) through exactly the same code. An :class:`Endpoint` names one
address; :func:`connect` and :func:`serve` work for all three kinds and hand out non-blocking sockets.

Endpoint text:  ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6), ``unix:/path``, ``vsock:CID:PORT``.
Seen from inside an enclave the parent is vsock CID 3; every CID and port stays configurable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.logs import event

log = logging.getLogger(__name__)

Kind = Literal["tcp", "unix", "vsock"]
KINDS: tuple[Kind, ...] = ("tcp", "unix", "vsock")
PARENT_CID = 3  # the parent instance, seen from inside an enclave (AWS documentation)
MAX_U32 = (1 << 32) - 1
# Linux limits sun_path to 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
BACKLOG = 1024


class VsockUnsupportedError(OSError):
    """This Python or kernel has no usable AF_VSOCK."""


@dataclass(frozen=True)
class Endpoint:
    kind: Kind
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown endpoint kind {self.kind!r} (expected tcp, unix or vsock)")
        if self.kind == "tcp":
            if not self.host:
                raise ValueError("tcp endpoint needs a host")
            if not 0 <= self.port <= 65535:
                raise ValueError(f"tcp port {self.port} is out of range 0-65535")
        elif self.kind == "unix":
            if not self.path:
                raise ValueError("unix endpoint needs a path")
            if "\0" in self.path:
                raise ValueError("unix socket path contains a NUL byte")
            if len(os.fsencode(self.path)) > MAX_UNIX_PATH:
                raise ValueError(f"unix socket path is longer than {MAX_UNIX_PATH} bytes: {self.path}")
        else:
            if not 0 <= self.cid <= MAX_U32:
                raise ValueError(f"vsock CID {self.cid} is out of range 0-{MAX_U32}")
            if not 0 <= self.port <= MAX_U32:
                raise ValueError(f"vsock port {self.port} is out of range 0-{MAX_U32}")

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"vsock:{self.cid}:{self.port}"

    def with_port(self, port: int) -> Endpoint:
        """The same address with another port (meaningless for unix endpoints)."""
        if self.kind == "unix":
            raise ValueError("a unix endpoint has no port")
        return Endpoint(self.kind, host=self.host, port=port, cid=self.cid)


def tcp(host: str, port: int) -> Endpoint:
    return Endpoint("tcp", host=host, port=port)


def unix(path: str | os.PathLike[str]) -> Endpoint:
    return Endpoint("unix", path=os.fspath(path))


def vsock(cid: int, port: int) -> Endpoint:
    return Endpoint("vsock", cid=cid, port=port)


def _int(text: str, what: str, where: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"bad endpoint {where!r}: {what} {text!r} is not a decimal number")
    return int(text)


def parse_endpoint(text: str) -> Endpoint:
    """``tcp:HOST:PORT`` | ``tcp:[V6]:PORT`` | ``unix:/path`` | ``vsock:CID:PORT``; ValueError otherwise."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(f"bad endpoint {text!r}: expected tcp:HOST:PORT, unix:/PATH or vsock:CID:PORT")
    try:
        if kind == "unix":
            if not rest:
                raise ValueError(f"bad endpoint {text!r}: unix needs a path")
            return Endpoint("unix", path=rest)
        if kind == "vsock":
            cid, sep, port = rest.partition(":")
            if not sep:
                raise ValueError(f"bad endpoint {text!r}: expected vsock:CID:PORT")
            return Endpoint("vsock", cid=_int(cid, "CID", text), port=_int(port, "port", text))
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad endpoint {text!r}: expected tcp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"bad endpoint {text!r}: {host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise ValueError(f"bad endpoint {text!r}: write an IPv6 address in brackets, tcp:[ADDR]:PORT")
        return Endpoint("tcp", host=host, port=_int(port, "port", text))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("bad endpoint") else f"bad endpoint {text!r}: {msg}") from None


def _vsock_socket() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise VsockUnsupportedError(errno.EAFNOSUPPORT, "vsock is not supported by this Python (no AF_VSOCK)")
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise VsockUnsupportedError(
            e.errno,
            f"vsock is not available on this kernel ({e.strerror}); load the vsock modules "
            "(vsock_loopback/vhost_vsock/virtio_vsock) or use a tcp: or unix: endpoint",
        ) from None


async def connect(ep: Endpoint, timeout: float | None = None) -> socket.socket:  # noqa: ASYNC109
    """Open a stream connection to ``ep``; returns a connected non-blocking socket.

    Raises OSError (ConnectionRefusedError, VsockUnsupportedError, socket.gaierror, ...) or
    TimeoutError after ``timeout`` seconds.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _connect(ep)
    except TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"connecting to {ep} timed out after {timeout:g} s") from None


async def _connect(ep: Endpoint) -> socket.socket:
    loop = asyncio.get_running_loop()
    if ep.kind == "tcp":
        infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"{ep.host} resolved to no address")
        return await connect_resolved(infos)
    if ep.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[int, int] = ep.path
    else:
        sock = _vsock_socket()
        address = (ep.cid, ep.port)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


async def connect_resolved(infos: Sequence[AddrInfo]) -> socket.socket:
    """Connect to the first reachable of already-resolved ``getaddrinfo`` results, in order.

    Connecting to exactly the addresses that were checked (instead of resolving again) keeps a DNS
    answer that changes between check and connect (rebinding) from reaching an unchecked address.
    Raises the last address's OSError when none accepts.
    """
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as e:
            sock.close()
            last = e
        except BaseException:
            sock.close()
            raise
    raise last or OSError(errno.EHOSTUNREACH, "no address to connect to")


Handler = Callable[[socket.socket], Awaitable[None]]


class Listener:
    """An accept loop: each connection runs ``handler(sock)`` in its own task; the socket is closed after.

    ``endpoint`` is the bound address (port 0 resolved). :meth:`close` stops accepting, cancels the
    running handlers and waits for them, and removes a Unix socket file it created.
    """

    def __init__(
        self,
        sock: socket.socket,
        endpoint: Endpoint,
        handler: Handler,
        max_connections: int | None,
        unlink: tuple[int, int] | None,
    ) -> None:
        self.endpoint = endpoint
        self._sock = sock
        self._handler = handler
        self._max = max_connections
        self._unlink = unlink  # (st_dev, st_ino) of the socket file we made
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.accepted = 0
        self.rejected = 0
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(), name=f"accept {endpoint}")

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if self._closed:
                    return
                # EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the backlog keeps the callers.
                event(log, logging.WARNING, "accept_failed", endpoint=str(self.endpoint), error=str(e))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if self._max is not None and len(self._tasks) >= self._max:
                self.rejected += 1
                event(log, logging.WARNING, "connection_limit", endpoint=str(self.endpoint), limit=self._max)
                conn.close()
                continue
            self.accepted += 1
            task = loop.create_task(self._run(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: socket.socket) -> None:
        try:
            await self._handler(conn)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            # A handler bug must not take the listener down, and its details stay in our log.
            event(log, logging.ERROR, "handler_failed", endpoint=str(self.endpoint), error=type(e).__name__)
            log.debug("handler traceback", exc_info=True)
        finally:
            conn.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sock.close()
        self._remove_socket_file()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _remove_socket_file(self) -> None:
        if self._unlink is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.endpoint.path)
            if (st.st_dev, st.st_ino) == self._unlink:  # never remove a file someone else put there since
                os.unlink(self.endpoint.path)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _clear_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody is listening: a leftover from a crashed run
        return
    except OSError:
        return  # let bind() report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running listener")


def bind(
    ep: Endpoint, infos: Sequence[AddrInfo] | None = None
) -> tuple[socket.socket, Endpoint, tuple[int, int] | None]:
    """Create a listening non-blocking socket for ``ep``; returns it, the bound endpoint, unlink id.

    For TCP, ``infos`` are ``ep.host``'s passive getaddrinfo results (resolved here if not given).
    """
    unlink: tuple[int, int] | None = None
    if ep.kind == "tcp":
        if infos is None:
            infos = socket.getaddrinfo(
                ep.host, ep.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
            )
        if not infos:
            raise OSError(errno.EADDRNOTAVAIL, f"{ep.host} resolved to no address")
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            bound = Endpoint("tcp", host=ep.host, port=sock.getsockname()[1])
        except BaseException:
            sock.close()
            raise
    elif ep.kind == "unix":
        _clear_stale_unix_socket(ep.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(ep.path)
            st = os.lstat(ep.path)
            unlink = (st.st_dev, st.st_ino)
            bound = ep
        except BaseException:
            sock.close()
            raise
    else:
        sock = _vsock_socket()
        try:
            # Port 0 means "any free port", as for TCP.
            sock.bind((ep.cid, ep.port or socket.VMADDR_PORT_ANY))
            _, port = sock.getsockname()
            bound = Endpoint("vsock", cid=ep.cid, port=port)
        except BaseException:
            sock.close()
            raise
    try:
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, bound, unlink


async def serve(ep: Endpoint, handler: Handler, *, max_connections: int | None = None) -> Listener:
    """Listen on ``ep`` and run ``handler(sock)`` for every connection (closed when it returns).

    ``max_connections`` caps concurrent handlers: a connection over the cap is closed at once.
    """
    infos = None
    if ep.kind == "tcp":  # resolve off the event loop (bind() would block on a name)
        infos = await asyncio.get_running_loop().getaddrinfo(
            ep.host, ep.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    sock, bound, unlink = bind(ep, infos)
    return Listener(sock, bound, handler, max_connections, unlink)
