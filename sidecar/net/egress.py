"""The egress proxy: an HTTP/1.1 proxy on loopback that lets traffic out only where the policy allows.

Apps in the enclave reach the outside through it (``HTTPS_PROXY``/``HTTP_PROXY``, see
:func:`proxy_environment`). It speaks:

* ``CONNECT host:port`` -- a raw tunnel for TLS or any TCP protocol. After ``200 Connection
  Established`` the bytes flow through :func:`sidecar.net.relay.relay` (``splice(2)`` on Linux).
* absolute-form requests (``GET http://host/path HTTP/1.1``) for plain HTTP. They are rewritten to
  origin-form: ``Host`` is set from the URL (RFC 9112 section 3.2.2), hop-by-hop headers and every
  ``Proxy-*`` header (``Proxy-Authorization``, ``Proxy-Connection``) are dropped. The client side
  keeps its connection alive between requests; each request gets its own upstream connection,
  which is closed after the response (``Connection: close`` towards the origin).

HTTP is parsed by ``h11``; nothing here parses a request line or a header by hand.

Every target is checked with :meth:`EgressPolicy.check` before anything is connected. With the
direct upstream the proxy resolves the name itself, checks every address with
:meth:`EgressPolicy.check_addresses`, and connects to exactly those addresses, so a DNS answer that
changes between check and connect (rebinding) reaches nothing unchecked. With the vsock upstream
the enclave has no resolver: the parent resolves, and the parent's endpoint
(:mod:`sidecar.host.egress`) re-checks the same policy against the addresses it resolved. With an
HTTP-proxy upstream the next proxy resolves; put the policy there too.

Answers (a ``text/plain`` body of one line says why; never a traceback):

=====  =====================================================================================
400    malformed request: bad request line or header, CONNECT without ``host:port``, origin-form
       or ``https://`` target, a bad host name, HTTP version other than 1.0/1.1, TRACE/TRACK,
       both ``Content-Length`` and ``Transfer-Encoding``
403    the policy denied the target (the body is the decision's reason), here or at the parent
       (``EACCES``) or the upstream proxy (its 403)
408    a request head began but did not complete within the request timeout (a client that sends
       nothing at all is closed without an answer: h11 has no request to answer)
431    the request head is larger than ``network.max_header_bytes``
500    a bug in the proxy itself (the exception's type goes to the log, nothing to the client)
502    resolving or connecting failed, the parent or upstream proxy failed, bad upstream response
503    ``network.max_tunnels`` connections are already open (``Retry-After: 1``), or the parent is
       at its own limit
504    connecting took longer than ``network.connect_timeout``, or the origin sent no response
       within ``network.idle_timeout``
=====  =====================================================================================

One log line per request or tunnel (event ``egress``): method, host, port, status, the decision's
rule, upstream, bytes each way and duration. Never paths, query strings, headers or payloads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import http
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol
from urllib.parse import unquote, urlsplit

import h11

from sidecar.logs import event
from sidecar.net import vsock, wire
from sidecar.net.policy import Decision, EgressPolicy, PolicyError, only_a_named_rule_allows, parse_target
from sidecar.net.relay import relay

if TYPE_CHECKING:
    from sidecar.config import NetworkSettings

__all__ = [
    "DirectUpstream",
    "EgressDenied",
    "EgressProxy",
    "EgressStats",
    "HttpProxyUpstream",
    "Upstream",
    "UpstreamError",
    "VsockUpstream",
    "proxy_environment",
    "start_egress_proxy",
    "upstream_from_settings",
]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # seconds for a request head to arrive (slow-loris bound)
BUSY_TIMEOUT = 2.0  # seconds a connection over max_tunnels may take to send its head before the 503
MAX_BUSY = 64  # connections over max_tunnels that still get a 503; beyond that they are just closed
LINGER = 1.0  # seconds to drain a client's unread bytes after an error answer (else RST eats it)
MAX_UPSTREAM_HEAD = 64 * 1024  # response heads from origins and upstream proxies
READ_CHUNK = 64 * 1024
MAX_MESSAGE = 200  # characters of detail in an error body

# Hop-by-hop (RFC 9110 section 7.6.1) plus the Proxy-* family: they concern this hop only, and
# Proxy-Authorization in particular must never reach an origin. Content-Length and
# Transfer-Encoding stay: h11 re-frames the body from them.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
_REFUSED_METHODS = frozenset({b"TRACE", b"TRACK"})  # echo request headers (credentials) back
_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 itself ends a head (h11._readers)
# The body's framing: h11 framed what it read by these, so Connection must not remove them (the
# body would then go on without them, and h11 refuses to send it: a 500 for the client's header).
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


# --------------------------------------------------------------------------------------------- upstreams


class UpstreamError(Exception):
    """Opening the upstream failed; ``status`` is the HTTP status the client gets (502, 503, 504, 403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class EgressDenied(UpstreamError):
    """The target resolved to an address the policy denies."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(403, decision.reason)
        self.decision = decision


class Upstream(Protocol):
    """Where allowed connections go. ``open`` returns a connected, non-blocking stream to host:port."""

    async def open(self, host: str, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
        ...


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addrinfo_literal(host: str, port: int) -> list[vsock.AddrInfo] | None:
    """getaddrinfo's answer for an IP literal, without a trip to the resolver thread pool."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]


class DirectUpstream:
    """Connect from this host (dev, tests, or a sidecar outside an enclave).

    With a policy (the proxy always binds its own, see :meth:`with_policy`) every resolved address
    is checked and only checked addresses are connected to: no second resolution (DNS rebinding).
    """

    def __init__(self, policy: EgressPolicy | None = None) -> None:
        self.policy = policy

    def with_policy(self, policy: EgressPolicy) -> DirectUpstream:
        return DirectUpstream(policy)

    def __str__(self) -> str:
        return "direct"

    async def open(self, host: str, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            infos = _addrinfo_literal(host, port)
            if infos is None:
                loop = asyncio.get_running_loop()
                try:
                    infos = list(
                        await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
                    )
                except socket.gaierror as e:
                    raise UpstreamError(502, f"cannot resolve {host}: {e.strerror}") from None
            if not infos:
                raise UpstreamError(502, f"cannot resolve {host}: no addresses")
            if self.policy is not None:
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
                decision = self.policy.check_addresses(host, port, addresses)
                if not decision.allowed:
                    raise EgressDenied(decision)
            try:
                return await vsock.connect_resolved(infos)
            except TimeoutError:
                raise
            except OSError as e:
                raise UpstreamError(
                    502, f"connecting to {_display(host, port)} failed: {_strerror(e)}"
                ) from None


class VsockUpstream:
    """Ask the parent to connect (Enclaver's host-egress protocol, :mod:`sidecar.net.wire`).

    The parent resolves the name and, with :mod:`sidecar.host.egress`, re-checks the policy against
    the addresses. ``endpoint`` is vsock CID 3 port 17002 in production; unix:/tcp: in tests.
    """

    def __init__(self, endpoint: vsock.Endpoint) -> None:
        self.endpoint = endpoint

    def __str__(self) -> str:
        return str(self.endpoint)

    async def open(self, host: str, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            try:
                sock = await vsock.connect(self.endpoint)
            except TimeoutError:
                raise
            except OSError as e:
                raise UpstreamError(
                    502, f"cannot reach the parent at {self.endpoint}: {_strerror(e)}"
                ) from None
            try:
                await wire.request_connect(sock, host, port)
            except wire.ConnectRefused as e:
                sock.close()
                raise UpstreamError(_PARENT_STATUS.get(e.os_code, 502), str(e)) from None
            except wire.WireError as e:
                sock.close()
                raise UpstreamError(502, f"parent at {self.endpoint}: {e}") from None
            except BaseException:
                sock.close()
                raise
            return sock


# How the parent's os_code reads to an HTTP client (sidecar.host.egress uses these codes).
_PARENT_STATUS = {errno.EACCES: 403, errno.EPERM: 403, errno.ETIMEDOUT: 504, errno.EAGAIN: 503}


class HttpProxyUpstream:
    """CONNECT through another HTTP proxy: ``http://[user:password@]host:port``.

    Every request, plain HTTP included, is a CONNECT to the next proxy, so it must allow CONNECT to
    the ports in use (tinyproxy's ``ConnectPort``, squid's ``SSL_ports``).
    """

    def __init__(self, url: str) -> None:
        shown = without_credentials(url)  # errors are printed and logged: never the password
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            # urlsplit quotes the text it took for the port, which is part of the password when an
            # unencoded '/', '?' or '#' in it cut the authority short: never echo it then.
            detail = "bad port, or a user name or password with an unencoded '/', '?', '#' or '@'"
            raise ValueError(f"upstream proxy {shown!r}: {detail if '@' in url else e}") from None
        if parts.scheme.lower() != "http":
            raise ValueError(f"upstream proxy {shown!r}: expected http://HOST:PORT")
        if not parts.hostname or port is None:
            raise ValueError(f"upstream proxy {shown!r}: expected http://HOST:PORT (host and port)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"upstream proxy {shown!r}: a proxy URL has no path, query or fragment")
        self._authorization: bytes | None = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._authorization = b"Basic " + base64.b64encode(pair)
        self.endpoint = vsock.Endpoint("tcp", host=parts.hostname, port=port)
        self.url = f"http://{_display(parts.hostname, port)}"  # never the credentials

    def __str__(self) -> str:
        return self.url

    async def open(self, host: str, port: int, timeout: float) -> socket.socket:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            try:
                sock = await vsock.connect(self.endpoint)
            except TimeoutError:
                raise
            except OSError as e:
                raise UpstreamError(502, f"cannot reach upstream proxy {self.url}: {_strerror(e)}") from None
            try:
                await self._connect(sock, host, port)
            except BaseException:
                sock.close()
                raise
            return sock

    async def _connect(self, sock: socket.socket, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        authority = _display(host, port)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_UPSTREAM_HEAD)
        headers = [(b"host", authority.encode())]
        if self._authorization is not None:
            headers.append((b"proxy-authorization", self._authorization))
        data = conn.send(h11.Request(method=b"CONNECT", target=authority.encode(), headers=headers))
        data += conn.send(h11.EndOfMessage())
        try:
            await loop.sock_sendall(sock, data)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await _read_head_exactly(sock))
                elif isinstance(ev, h11.Response):
                    break
                elif not isinstance(ev, h11.InformationalResponse):
                    raise UpstreamError(502, f"upstream proxy {self.url} closed the connection")
        except h11.RemoteProtocolError as e:
            raise UpstreamError(502, f"bad answer from upstream proxy {self.url}: {_short(str(e))}") from None
        except TimeoutError:
            raise
        except OSError as e:
            raise UpstreamError(502, f"upstream proxy {self.url}: {_strerror(e)}") from None
        if not 200 <= ev.status_code < 300:
            status = ev.status_code if ev.status_code in (403, 503, 504) else 502
            reason = ev.reason.decode("ascii", "replace")
            raise UpstreamError(
                status, f"upstream proxy {self.url} answered {ev.status_code} {reason} to CONNECT {authority}"
            )


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def _read_head_exactly(sock: socket.socket) -> bytes:
    """Read one response head, and not a byte more: what follows belongs to the tunnel.

    Peeks to find the blank line that ends the head (h11 parses it afterwards), then consumes
    exactly up to it.
    """
    head = bytearray()
    while True:
        await _wait_readable(sock)
        try:
            peeked = sock.recv(READ_CHUNK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peeked:
            return b""  # EOF: h11 reports what is missing
        # A terminator may straddle the previous read: search from a few bytes back.
        start = max(0, len(head) - 3)
        match = _BLANK_LINE.search(bytes(head[start:]) + peeked)
        take = len(peeked) if match is None else start + match.end() - len(head)
        while take > 0:
            chunk = sock.recv(take)  # these bytes are already queued: no blocking
            head += chunk
            take -= len(chunk)
        if match is not None:
            return bytes(head)
        if len(head) > MAX_UPSTREAM_HEAD:
            raise UpstreamError(502, f"response head is larger than {MAX_UPSTREAM_HEAD} bytes")


def upstream_from_settings(settings: NetworkSettings) -> Upstream:
    """``network.upstream``: ``direct``, ``vsock`` (parent CID and egress port from the settings),
    ``http://HOST:PORT``, or an explicit parent endpoint ``unix:/path``, ``tcp:HOST:PORT``,
    ``vsock:CID:PORT``. Raises ValueError with the reason."""
    text = settings.upstream
    if text == "direct":
        return DirectUpstream()
    if text == "vsock":
        return VsockUpstream(
            vsock.Endpoint("vsock", cid=settings.parent_cid, port=settings.egress_vsock_port)
        )
    if text.lower().startswith("http://"):
        return HttpProxyUpstream(text)
    if text.startswith(("unix:", "tcp:", "vsock:")):
        return VsockUpstream(vsock.parse_endpoint(text))
    raise ValueError(
        f"network.upstream {without_credentials(text)!r}: expected direct, vsock, http://HOST:PORT, or a "
        "parent endpoint (unix:/PATH, tcp:HOST:PORT, vsock:CID:PORT)"
    )


def without_credentials(url: str) -> str:
    """``url`` with its ``user:password@`` (if any) shown as ``***@``: for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # Up to the last '@' anywhere, not just in the authority: an unencoded '/', '?' or '#' in a
    # password ends the authority early, and the rest of the password would show as a path.
    if "@" in rest:
        return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"
    return url


def proxy_environment(port: int) -> dict[str, str]:
    """Environment for a child app so that its HTTP clients use the egress proxy on ``port``."""
    url = f"http://127.0.0.1:{port}"
    no_proxy = "localhost,127.0.0.1"
    return {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


# --------------------------------------------------------------------------------------------- the proxy


@dataclass
class EgressStats:
    connections: int = 0  # client connections accepted and served
    requests: int = 0  # CONNECT and absolute-form requests parsed
    tunnels: int = 0  # CONNECTs that reached relay
    forwarded: int = 0  # absolute-form requests answered by an origin
    bad_requests: int = 0
    denied: int = 0
    failed: int = 0  # upstream could not be opened, or failed before a response
    busy: int = 0  # refused over max_tunnels
    bytes_up: int = 0
    bytes_down: int = 0


class _Reply(Exception):
    """Answer the client with ``status`` and a one-line body, then close."""

    def __init__(
        self, status: int, message: str, what: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.what = what  # safe for the log: never request data
        self.headers = headers


class _Gone(Exception):
    """The client went away or broke the connection; nothing more can be said."""


def _strerror(e: OSError) -> str:
    # asyncio's sock_connect puts "Connect call failed (addr)" in strerror; the errno text is clearer.
    # Other strerrors (vsock's "load the vsock modules ...") are kept: they say more.
    text = e.strerror or ""
    if (not text or text.startswith("Connect call failed")) and isinstance(e.errno, int) and e.errno > 0:
        return os.strerror(e.errno)
    return text or type(e).__name__


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _h11_what(e: h11.RemoteProtocolError) -> str:
    # h11's messages quote the offending bytes (could be a header value): log only the kind.
    return str(e).split(":", 1)[0][:60]


def _filter_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    named -= _FRAMING
    return [
        (name, value)
        for name, value in headers
        if name not in _HOP_BY_HOP and name not in named and not name.startswith(b"proxy-")
    ]


@dataclass
class _Target:
    host: str  # normalised: the name the policy checked and the one we connect to
    port: int
    origin_target: bytes = b""  # absolute-form only: path?query
    authority: bytes = b""  # absolute-form only: the Host header


class EgressProxy:
    """The running proxy. ``port`` is the bound port; :meth:`close` ends every connection."""

    def __init__(
        self,
        policy: EgressPolicy,
        listener: socket.socket,
        upstream: Upstream,
        settings: NetworkSettings,
        request_timeout: float,
    ) -> None:
        self.policy = policy
        self.upstream = upstream
        self.settings = settings
        self.request_timeout = request_timeout
        self.host, self.port = listener.getsockname()[:2]
        self.stats = EgressStats()
        self.active = 0
        self._busy = 0
        self._listener = listener
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._upstream_name = str(upstream)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(), name="egress accept")

    @property
    def url(self) -> str:
        return f"http://{_display(self.host, self.port)}"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._accept_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._accept_task
        self._listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> EgressProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- accepting -----------------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(self._listener)
            except OSError as e:
                # EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the backlog keeps the callers.
                event(log, logging.WARNING, "egress_accept_failed", error=_strerror(e))
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            busy = self.active >= self.settings.max_tunnels
            if busy and self._busy >= MAX_BUSY:
                self.stats.busy += 1
                client.close()  # far over the limit: a status costs more than we should spend
                continue
            if busy:
                self._busy += 1
            else:
                self.active += 1
            task = loop.create_task(self._refuse_busy(client) if busy else self._serve(client))
            self._tasks.add(task)
            # Book-keeping in a done callback: it also runs for a task cancelled before it started.
            task.add_done_callback(functools.partial(self._finished, client, busy))

    def _finished(self, client: socket.socket, busy: bool, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        client.close()
        if busy:
            self._busy -= 1
        else:
            self.active -= 1

    async def _refuse_busy(self, client: socket.socket) -> None:
        """Over max_tunnels: read the request head (briefly), answer 503, close."""
        self.stats.busy += 1
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
            with contextlib.suppress(_Reply, _Gone):
                await self._read_head(client, conn, timeout=BUSY_TIMEOUT)
            event(log, logging.WARNING, "egress_busy", limit=self.settings.max_tunnels)
            await self._answer(
                client,
                conn,
                _Reply(
                    503,
                    f"the egress proxy is at its limit of {self.settings.max_tunnels} connections; "
                    "retry later",
                    "busy",
                    headers=[(b"retry-after", b"1")],
                ),
            )
        except Exception:
            log.debug("busy answer failed", exc_info=True)

    # -- one client connection -----------------------------------------------------------------------

    async def _serve(self, client: socket.socket) -> None:
        self.stats.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        try:
            while True:
                started = time.monotonic()
                try:
                    request = await self._read_head(client, conn, timeout=self.request_timeout)
                    if request is None:
                        return
                    self.stats.requests += 1
                    if request.method == b"CONNECT":
                        await self._tunnel(client, conn, request, started)
                        return
                    await self._forward(client, conn, request, started)
                except _Reply as reply:
                    if reply.status in (400, 408, 431):
                        self.stats.bad_requests += 1
                        event(log, logging.INFO, "egress_bad_request", status=reply.status, error=reply.what)
                    await self._answer(client, conn, reply)
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except _Gone:
            return
        except Exception as e:
            # A bug must not take the proxy down; its details stay in the log, never in an answer.
            event(log, logging.ERROR, "egress_handler_failed", error=type(e).__name__)
            log.debug("egress handler traceback", exc_info=True)
            with contextlib.suppress(Exception):
                await self._answer(client, conn, _Reply(500, "internal error in the egress proxy", "bug"))

    async def _read_head(
        self,
        client: socket.socket,
        conn: h11.Connection,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> h11.Request | None:
        """The next request head, or None when the client closed between requests."""
        loop = asyncio.get_running_loop()
        limit = self.settings.max_header_bytes
        fed = 0
        # One deadline for the whole head: a per-read timeout would let a client that sends a byte
        # now and then hold a connection slot for max_header_bytes x timeout (slow loris).
        deadline = loop.time() + timeout
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = 431 if e.error_status_hint == 431 else 400
                raise _Reply(status, f"bad request: {_short(str(e))}", _h11_what(e)) from None
            if ev is h11.NEED_DATA:
                # Never hand h11 more than the limit: it only bounds heads that are still incomplete.
                if fed >= limit:
                    raise _Reply(431, f"request head is larger than {limit} bytes", "head too large")
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await loop.sock_recv(client, limit - fed)
                except TimeoutError:
                    if not fed:
                        raise _Gone from None  # nothing said yet (or an idle keep-alive): just close
                    # Declare the input over so that h11 lets us answer a request it never completed.
                    conn.receive_data(b"")
                    with contextlib.suppress(h11.RemoteProtocolError):
                        conn.next_event()
                    raise _Reply(408, f"no complete request head within {timeout:g} s", "timeout") from None
                except OSError:
                    raise _Gone from None
                fed += len(data)
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                return ev
            if isinstance(ev, h11.ConnectionClosed):
                return None
            raise _Reply(400, "bad request: unexpected data before the request", "unexpected")

    def _parse_target(self, request: h11.Request) -> _Target:
        """Validate the request line; the host comes back normalised by the policy module."""
        if request.http_version not in (b"1.0", b"1.1"):
            version = request.http_version.decode("ascii", "replace")
            raise _Reply(400, f"HTTP version {version} is not supported (use HTTP/1.1)", "http version")
        method = request.method
        if method in _REFUSED_METHODS:
            raise _Reply(400, f"method {method.decode()} is not supported by the egress proxy", "method")
        target = request.target.decode("ascii")  # h11 allows only visible ASCII here
        if method == b"CONNECT":
            if "/" in target or "?" in target or "#" in target:
                raise _Reply(400, f"CONNECT needs host:port, got {_short(target)!r}", "connect target")
            try:
                host, port = parse_target(target)
            except PolicyError as e:
                raise _Reply(400, f"bad CONNECT target {_short(target)!r}: {e}", "connect target") from None
            if port is None:
                raise _Reply(400, f"CONNECT target {_short(target)!r} has no port (use host:port)", "no port")
            # The tunnel starts right after the head: a body would be read as tunnel bytes.
            if any(
                name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
                for name, value in request.headers
            ):
                raise _Reply(400, "a CONNECT request has no body", "connect body")
            return _Target(host, port)
        if target.startswith("/") or target == "*":
            raise _Reply(
                400,
                "this is a proxy: send an absolute URL (GET http://host/path) or CONNECT host:port",
                "origin form",
            )
        try:
            parts = urlsplit(target)
        except ValueError as e:
            raise _Reply(400, f"bad URL {_short(target)!r}: {e}", "url") from None
        scheme = parts.scheme.lower()
        if scheme == "https":
            raise _Reply(
                400, "https:// URLs go through CONNECT (the proxy does not originate TLS)", "https url"
            )
        if scheme != "http":
            raise _Reply(400, f"unsupported URL scheme {scheme!r} (only http:// and CONNECT)", "scheme")
        try:
            host, port = parse_target(target)
        except PolicyError as e:
            raise _Reply(400, f"bad URL {_short(target)!r}: {e}", "url") from None
        assert port is not None  # http:// supplies 80
        names = {name for name, _ in request.headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            # h11 frames the body as chunked but would pass Content-Length on as well: an origin (or
            # a front before it) that trusts Content-Length splits the body elsewhere (smuggling).
            raise _Reply(400, "a request has Content-Length or Transfer-Encoding, not both", "te and cl")
        path = parts.path or "/"
        origin_target = path + ("?" + parts.query if parts.query else "")
        authority = _display(host, port) if port != 80 else (f"[{host}]" if ":" in host else host)
        return _Target(host, port, origin_target.encode("ascii"), authority.encode("ascii"))

    def _check(self, target: _Target, method: str) -> Decision:
        decision = self.policy.check(target.host, target.port)
        if isinstance(self.upstream, VsockUpstream):  # for the parent, "host" is its own 127.0.0.1
            decision = only_a_named_rule_allows(
                self.policy, decision, wire.OUTSIDE_HOST, wire.OUTSIDE_HOST_REASON
            )
        if not decision.allowed:
            self.stats.denied += 1
            self._log(method, target, 403, decision, 0, 0, time.monotonic())
            raise _Reply(403, f"blocked by egress policy: {decision.reason}", "denied")
        return decision

    async def _open(self, target: _Target, method: str, decision: Decision, started: float) -> socket.socket:
        timeout = self.settings.connect_timeout
        shown = _display(target.host, target.port)
        try:
            async with asyncio.timeout(timeout):
                return await self.upstream.open(target.host, target.port, timeout)
        except EgressDenied as e:
            self.stats.denied += 1
            self._log(method, target, 403, e.decision, 0, 0, started)
            raise _Reply(403, f"blocked by egress policy: {e.message}", "denied") from None
        except UpstreamError as e:
            reply = _Reply(e.status, e.message, "upstream")
        except TimeoutError:
            reply = _Reply(504, f"connecting to {shown} timed out after {timeout:g} s", "timeout")
        except OSError as e:
            reply = _Reply(502, f"connecting to {shown} failed: {_strerror(e)}", "connect failed")
        except Exception as e:  # a bug in an Upstream: the client still gets a status, the log the type
            event(
                log,
                logging.ERROR,
                "egress_upstream_failed",
                upstream=self._upstream_name,
                error=type(e).__name__,
            )
            log.debug("upstream traceback", exc_info=True)
            reply = _Reply(
                502, f"connecting to {shown} failed (internal error in the upstream)", "upstream bug"
            )
        self.stats.failed += 1
        self._log(method, target, reply.status, decision, 0, 0, started)
        raise reply

    async def _tunnel(
        self, client: socket.socket, conn: h11.Connection, request: h11.Request, started: float
    ) -> None:
        target = self._parse_target(request)
        decision = self._check(target, "CONNECT")
        upstream = await self._open(target, "CONNECT", decision, started)
        try:
            # A 2xx to CONNECT switches h11 to the tunnel; bytes the client pipelined after the head
            # (a TLS ClientHello, typically) are in trailing_data and go out first.
            head = conn.send(h11.Response(status_code=200, reason=b"Connection Established", headers=[]))
            assert head is not None
            try:
                await self._send(client, head)
            except _Gone:
                return
            self.stats.tunnels += 1
            buffered, _ = conn.trailing_data
            up, down = await relay(
                client, upstream, idle_timeout=self.settings.idle_timeout, a_buffered=buffered
            )
        finally:
            upstream.close()
        self.stats.bytes_up += up
        self.stats.bytes_down += down
        self._log("CONNECT", target, 200, decision, up, down, started)

    async def _forward(
        self, client: socket.socket, conn: h11.Connection, request: h11.Request, started: float
    ) -> None:
        method = request.method.decode("ascii")
        target = self._parse_target(request)
        decision = self._check(target, method)
        upstream = await self._open(target, method, decision, started)
        exchange = _Exchange(self, client, conn, upstream, target)
        try:
            # RFC 9112 section 3.2.2: the URL's authority replaces any Host the client sent.
            headers = [(n, v) for n, v in _filter_headers(request.headers) if n != b"host"]
            headers += [(b"host", target.authority), (b"connection", b"close")]
            head = exchange.up.send(
                h11.Request(
                    method=request.method, target=target.origin_target, headers=headers, http_version=b"1.1"
                )
            )
            assert head is not None
            await exchange.run(head)
        except _Reply as reply:
            if reply.status >= 500:
                self.stats.failed += 1
            self._log(method, target, reply.status, decision, exchange.bytes_up, exchange.bytes_down, started)
            raise
        except _Gone:
            # Either side broke off mid-exchange; 499 (client closed) when no response had started.
            status = exchange.status or 499
            self._log(method, target, status, decision, exchange.bytes_up, exchange.bytes_down, started, True)
            raise
        finally:
            upstream.close()
        self.stats.forwarded += 1
        self.stats.bytes_up += exchange.bytes_up
        self.stats.bytes_down += exchange.bytes_down
        self._log(method, target, exchange.status, decision, exchange.bytes_up, exchange.bytes_down, started)

    # -- answering -----------------------------------------------------------------------------------

    async def _send(self, sock: socket.socket, data: bytes) -> None:
        """Send to the client; a client that stops reading for idle_timeout is dropped."""
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                await asyncio.get_running_loop().sock_sendall(sock, data)
        except (OSError, TimeoutError):
            raise _Gone from None

    async def _answer(self, client: socket.socket, conn: h11.Connection, reply: _Reply) -> None:
        """Send an error answer if the response has not started, then close gracefully."""
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = (_short(reply.message) + "\n").encode("utf-8", "replace")
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"x-content-type-options", b"nosniff"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *reply.headers,
            ]
            try:
                data = conn.send(
                    h11.Response(
                        status_code=reply.status,
                        headers=headers,
                        reason=http.HTTPStatus(reply.status).phrase.encode(),
                    )
                )
                data = (
                    (data or b"")
                    + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
            except h11.LocalProtocolError:
                data = b""
            if data:
                with contextlib.suppress(_Gone):
                    await self._send(client, data)
        await _linger_close(client)

    def _log(
        self,
        method: str,
        target: _Target,
        status: int,
        decision: Decision,
        up: int,
        down: int,
        started: float,
        aborted: bool = False,
    ) -> None:
        fields = {"aborted": True} if aborted else {}
        event(
            log,
            logging.INFO if status < 400 else logging.WARNING,
            "egress",
            method=method,
            host=target.host,
            port=target.port,
            status=status,
            allowed=decision.allowed,
            rule=decision.rule,
            upstream=self._upstream_name,
            bytes_up=up,
            bytes_down=down,
            ms=round((time.monotonic() - started) * 1000, 1),
            **fields,
        )


async def _linger_close(sock: socket.socket) -> None:
    """Half-close, then drain what the client still sends for a moment before the caller closes.

    Closing a socket with unread input sends RST, and an RST can make the client discard the answer
    it has not read yet (the 400 or 403 it should see).
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    deadline = loop.time() + LINGER
    drained = 0
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout_at(deadline):
            while drained < 4 * READ_CHUNK:
                data = await loop.sock_recv(sock, READ_CHUNK)
                if not data:
                    return
                drained += len(data)


class _Exchange:
    """One absolute-form request: client body up and origin response down, concurrently.

    Concurrency is what makes ``Expect: 100-continue`` and early answers (an origin's 413 before the
    body is complete) work.
    """

    def __init__(
        self,
        proxy: EgressProxy,
        client: socket.socket,
        conn: h11.Connection,
        upstream: socket.socket,
        target: _Target,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.conn = conn
        self.upstream = upstream
        self.target = target
        self.up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_UPSTREAM_HEAD)
        self.bytes_up = 0
        self.bytes_down = 0
        self.status = 0
        self.idle = proxy.settings.idle_timeout

    def _started(self) -> bool:
        return self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    async def run(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        upload = loop.create_task(self._upload(head))
        download = loop.create_task(self._download())
        try:
            await asyncio.wait({upload, download}, return_when=asyncio.FIRST_EXCEPTION)
            if download.done():
                download.result()  # raises its _Reply/_Gone
                return  # the response is complete; an unfinished upload is dropped with the upstream
            upload.result()  # it failed: the download waits for nothing now
        finally:
            for task in (upload, download):
                task.cancel()
            await asyncio.gather(upload, download, return_exceptions=True)

    async def _upload(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        pending = head
        while True:
            if pending:
                try:
                    async with asyncio.timeout(self.idle):
                        await loop.sock_sendall(self.upstream, pending)
                except (OSError, TimeoutError):
                    # The origin stopped reading (it may have answered early): the download side
                    # delivers its response or reports the failure.
                    await asyncio.Future()
                self.bytes_up += len(pending)
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _Reply(400, f"bad request body: {_short(str(e))}", _h11_what(e)) from None
            if ev is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(self.idle):
                        data = await loop.sock_recv(self.client, READ_CHUNK)
                except TimeoutError:
                    raise _Reply(408, f"request body stalled for {self.idle:g} s", "body timeout") from None
                except OSError:
                    raise _Gone from None
                self.conn.receive_data(data)
                pending = b""
            elif isinstance(ev, h11.Data):
                pending = self.up.send(ev) or b""
            elif isinstance(ev, h11.EndOfMessage):
                pending = self.up.send(h11.EndOfMessage()) or b""  # request trailers are dropped
                if pending:
                    await self._send_upstream(pending)
                return
            else:  # ConnectionClosed mid-body is a RemoteProtocolError; anything else is unexpected
                raise _Gone

    async def _send_upstream(self, data: bytes) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.idle):
                await asyncio.get_running_loop().sock_sendall(self.upstream, data)
            self.bytes_up += len(data)

    async def _download(self) -> None:
        loop = asyncio.get_running_loop()
        shown = _display(self.target.host, self.target.port)
        while True:
            try:
                ev = self.up.next_event()
            except h11.RemoteProtocolError as e:
                self._fail(502, f"bad response from {shown}: {_short(str(e))}")
            if ev is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(self.idle):
                        data = await loop.sock_recv(self.upstream, READ_CHUNK)
                except TimeoutError:
                    self._fail(504, f"no response from {shown} within {self.idle:g} s")
                except OSError as e:
                    self._fail(502, f"connection to {shown} failed: {_strerror(e)}")
                if not data and not self.status:
                    self._fail(502, f"{shown} closed the connection without a response")
                self.up.receive_data(data)
                continue
            if not isinstance(ev, h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage):
                self._fail(502, f"{shown} closed the connection without a response")
            if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                self._fail(502, f"{shown} switched protocols without being asked")
            if isinstance(ev, h11.InformationalResponse) and self.conn.their_http_version == b"1.0":
                # RFC 9110 section 15.2: never a 1xx to an HTTP/1.0 client, which would take it for the
                # final response and read the real one as its body.
                continue
            try:
                out = self.conn.send(self._towards_client(ev))
            except h11.LocalProtocolError as e:  # something h11 accepted but cannot pass on as is
                self._fail(502, f"cannot pass on the response from {shown}: {_short(str(e))}")
            if out:
                await self._to_client(out)
            if isinstance(ev, h11.EndOfMessage):
                return

    def _towards_client(
        self, ev: h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
    ) -> h11.Event:
        if isinstance(ev, h11.InformationalResponse):
            return h11.InformationalResponse(status_code=ev.status_code, headers=[], reason=ev.reason)
        if isinstance(ev, h11.Response):
            self.status = ev.status_code
            headers = _filter_headers(ev.headers)
            return h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason)
        if isinstance(ev, h11.EndOfMessage):
            return h11.EndOfMessage()  # response trailers are dropped
        return ev

    async def _to_client(self, data: bytes) -> None:
        await self.proxy._send(self.client, data)
        self.bytes_down += len(data)

    def _fail(self, status: int, message: str) -> NoReturn:
        if self._started():
            raise _Gone  # the answer is half sent: closing is the only honest signal left
        raise _Reply(status, message, "upstream response")


async def start_egress_proxy(
    policy: EgressPolicy,
    *,
    host: str = "127.0.0.1",
    port: int,
    upstream: Upstream,
    settings: NetworkSettings,
    request_timeout: float = REQUEST_TIMEOUT,
) -> EgressProxy:
    """Listen on ``host:port`` (port 0: any free port, see ``.port``) and serve until ``close()``."""
    if isinstance(upstream, DirectUpstream) and upstream.policy is None:
        # The direct path must vet resolved addresses: bind the proxy's own policy to it.
        upstream = upstream.with_policy(policy)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return EgressProxy(policy, sock, upstream, settings, request_timeout)
