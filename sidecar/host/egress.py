"""The parent's egress endpoint: the far end of the enclave's only way out.

The enclave's egress proxy applies the manifest's policy, then asks the parent over vsock to connect
(:mod:`sidecar.net.wire`, Enclaver's protocol). Enclaver's parent connects wherever it is asked. Here
the parent checks the same policy again, and also checks every address the name resolved to, before
it connects. That is defence in depth: an app inside the enclave that gets code execution can
speak the wire protocol directly and bypass the enclave's proxy. The parent still refuses a host
outside the policy, and a permitted name that resolves to a denied address (say 169.254.169.254 or
10.0.0.0/8). It connects to exactly the addresses it checked, so a DNS answer that changes between
the check and the connect reaches nothing unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.logs import event
from sidecar.net import wire
from sidecar.net.policy import only_a_named_rule_allows
from sidecar.net.relay import relay
from sidecar.net.vsock import AddrInfo, Endpoint, Listener, connect_resolved, serve

if TYPE_CHECKING:
    from sidecar.net.policy import EgressPolicy

log = logging.getLogger(__name__)

DEFAULT_EGRESS_PORT = 17002
OUTSIDE_ADDRESS = "127.0.0.1"  # what Enclaver's special host name "host" means

Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


async def system_resolver(host: str, port: int) -> Sequence[AddrInfo]:
    loop = asyncio.get_running_loop()
    return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


@dataclass
class EgressStats:
    requests: int = 0
    bad_requests: int = 0
    denied: int = 0
    failed: int = 0  # resolution or connection failures
    busy: int = 0  # refused: max_tunnels reached
    tunnels: int = 0
    bytes_up: int = 0  # enclave -> origin
    bytes_down: int = 0  # origin -> enclave


class _Refusal(Exception):
    def __init__(self, os_code: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.os_code = os_code
        self.message = message
        self.kind = kind


class HostEgress:
    """The running endpoint. ``endpoint`` is where it listens; :meth:`close` ends every tunnel."""

    def __init__(
        self,
        policy: EgressPolicy | None,
        *,
        connect_timeout: float,
        request_timeout: float,
        idle_timeout: float | None,
        max_tunnels: int,
        resolver: Resolver,
        outside_address: str,
    ) -> None:
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_tunnels = max_tunnels
        self.resolver = resolver
        self.outside_address = outside_address
        self.stats = EgressStats()
        self.active = 0
        self.listener: Listener | None = None

    @property
    def endpoint(self) -> Endpoint:
        assert self.listener is not None
        return self.listener.endpoint

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()

    async def handle(self, sock: socket.socket) -> None:
        """One enclave connection: request, checks, connect, answer, relay."""
        if self.active >= self.max_tunnels:
            # Answer rather than just close, so the enclave's proxy can tell the app why.
            self.stats.busy += 1
            event(log, logging.WARNING, "egress_busy", limit=self.max_tunnels)
            await self._refuse(sock, errno.EAGAIN, f"parent is at its limit of {self.max_tunnels} tunnels")
            return
        self.active += 1
        try:
            await self._handle(sock)
        finally:
            self.active -= 1

    async def _handle(self, sock: socket.socket) -> None:
        try:
            host, port = await wire.read_request(sock, timeout=self.request_timeout)
        except wire.WireError as e:
            self.stats.bad_requests += 1
            event(log, logging.WARNING, "egress_bad_request", error=str(e))
            await self._refuse(sock, errno.EINVAL, str(e))
            return
        self.stats.requests += 1
        started = time.monotonic()
        try:
            upstream = await self._open(host, port)
        except _Refusal as r:
            level = logging.WARNING if r.kind == "denied" else logging.INFO
            event(log, level, f"egress_{r.kind}", host=host, port=port, reason=r.message)
            await self._refuse(sock, r.os_code, r.message)
            return
        try:
            try:
                await wire.send_ok(sock, timeout=self.request_timeout)
            except wire.WireError:
                return  # the enclave side gave up; nothing to relay
            self.stats.tunnels += 1
            up, down = await relay(sock, upstream, idle_timeout=self.idle_timeout)
        finally:
            upstream.close()
        self.stats.bytes_up += up
        self.stats.bytes_down += down
        event(
            log,
            logging.INFO,
            "egress_tunnel_closed",
            host=host,
            port=port,
            bytes_up=up,
            bytes_down=down,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _open(self, host: str, port: int) -> socket.socket:
        policy = self.policy
        name = host
        if policy is not None:
            # As the enclave's proxy: a wildcard must not reach the parent's own loopback ("host"),
            # even from an enclave app that speaks this protocol itself.
            decision = only_a_named_rule_allows(
                policy, policy.check(host, port), wire.OUTSIDE_HOST, wire.OUTSIDE_HOST_REASON
            )
            if not decision.allowed:
                self.stats.denied += 1
                raise _Refusal(
                    errno.EACCES, f"blocked by the parent's egress policy: {decision.reason}", "denied"
                )
            # Resolve the normalised name the policy checked, never the raw text: the resolver's own
            # IDNA handling (IDNA 2003 in Python's codec) could otherwise map it to another name.
            name = decision.host
        target = self.outside_address if name.lower() == wire.OUTSIDE_HOST else name
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = list(await self.resolver(target, port))
        except TimeoutError:
            self.stats.failed += 1
            raise _Refusal(errno.ETIMEDOUT, f"looking up {host} timed out", "failed") from None
        except OSError as e:
            # Rust's io::Error for a failed lookup carries no OS code either: os_code 0, like Enclaver.
            self.stats.failed += 1
            raise _Refusal(0, f"failed to look up {host}: {e.strerror or e}", "failed") from None
        except UnicodeError:
            # Python's resolver IDNA-encodes the name first ("x..y", a 64-character label).
            self.stats.failed += 1
            raise _Refusal(0, f"failed to look up {host}: not a valid host name", "failed") from None
        if not infos:
            self.stats.failed += 1
            raise _Refusal(0, f"failed to look up {host}: no addresses", "failed")
        if policy is not None:
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            decision = policy.check_addresses(host, port, addresses)
            if not decision.allowed:
                self.stats.denied += 1
                raise _Refusal(
                    errno.EACCES, f"blocked by the parent's egress policy: {decision.reason}", "denied"
                )
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await connect_resolved(infos)
        except TimeoutError:
            self.stats.failed += 1
            raise _Refusal(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out", "failed") from None
        except OSError as e:
            self.stats.failed += 1
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else 0
            raise _Refusal(code, f"{e.strerror or e} (os error {code})", "failed") from None

    async def _refuse(self, sock: socket.socket, os_code: int, message: str) -> None:
        with contextlib.suppress(wire.WireError):  # best effort: the enclave side may already be gone
            await wire.send_err(sock, os_code, message, timeout=self.request_timeout)


async def start_host_egress(
    listen: Endpoint,
    policy: EgressPolicy | None,
    *,
    connect_timeout: float = 10.0,
    request_timeout: float = 10.0,
    idle_timeout: float | None = 300.0,
    max_tunnels: int = 512,
    resolver: Resolver = system_resolver,
    outside_address: str = OUTSIDE_ADDRESS,
) -> HostEgress:
    """Listen on ``listen`` (vsock any-CID:17002 in production) for the enclave's connect requests.

    ``policy=None`` skips the parent's re-check (``--no-policy-check``: Enclaver's behaviour).
    """
    egress = HostEgress(
        policy,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        max_tunnels=max_tunnels,
        resolver=resolver,
        outside_address=outside_address,
    )
    # The hard cap is above max_tunnels so that the connections over it still get an Err answer.
    egress.listener = await serve(listen, egress.handle, max_connections=max_tunnels + 64)
    event(
        log,
        logging.INFO,
        "host_egress_listening",
        endpoint=str(egress.endpoint),
        policy_check=policy is not None,
    )
    return egress
