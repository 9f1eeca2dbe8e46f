"""Ingress bridges: accept on one endpoint, connect to another, relay the bytes.

Inside a Nitro Enclave the parent reaches an ingress port only over vsock: for each ``ingress``
``listen_port`` the enclave listens on vsock port = listen_port and bridges every connection to the
local TCP listener 127.0.0.1:listen_port (Enclaver's ``EnclaveProxy`` without TLS termination: TLS,
where configured, is the listener's business). The parent's TCP -> vsock forwarders
(:mod:`sidecar.host.forward`) are the same bridge with the kinds swapped, so both halves share this code,
and tests run it over Unix sockets and TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from sidecar.logs import event
from sidecar.net.relay import relay
from sidecar.net.vsock import Endpoint, Listener, connect, serve

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass
class BridgeStats:
    connections: int = 0
    failed: int = 0  # the target could not be reached
    bytes_in: int = 0  # listener side -> target
    bytes_out: int = 0  # target -> listener side


@dataclass
class Bridge:
    listen: Endpoint
    target: Endpoint
    listener: Listener
    stats: BridgeStats = field(default_factory=BridgeStats)

    @property
    def endpoint(self) -> Endpoint:
        """Where the bridge actually listens (port 0 resolved)."""
        return self.listener.endpoint


class IngressBridges:
    """Running bridges; :meth:`close` stops accepting and ends the open connections."""

    def __init__(self, bridges: Sequence[Bridge]) -> None:
        self.bridges = list(bridges)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [b.endpoint for b in self.bridges]

    async def close(self) -> None:
        await asyncio.gather(*(b.listener.close() for b in self.bridges), return_exceptions=True)

    async def __aenter__(self) -> IngressBridges:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _handler(
    name: str,
    target: Endpoint,
    stats: BridgeStats,
    idle_timeout: float | None,
    connect_timeout: float,
) -> Callable[[socket.socket], Awaitable[None]]:
    async def handle(conn: socket.socket) -> None:
        stats.connections += 1
        started = time.monotonic()
        try:
            upstream = await connect(target, timeout=connect_timeout)
        except OSError as e:
            stats.failed += 1
            # The caller sees the connection close; the reason stays in our log.
            event(log, logging.WARNING, f"{name}_connect_failed", target=str(target), error=str(e))
            return
        try:
            sent, received = await relay(conn, upstream, idle_timeout=idle_timeout)
        finally:
            upstream.close()
        stats.bytes_in += sent
        stats.bytes_out += received
        event(
            log,
            logging.DEBUG,
            f"{name}_closed",
            target=str(target),
            bytes_in=sent,
            bytes_out=received,
            seconds=round(time.monotonic() - started, 3),
        )

    return handle


async def start_bridges(
    pairs: Sequence[tuple[Endpoint, Endpoint]],
    idle_timeout: float | None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_connections: int | None = None,
    name: str = "bridge",
) -> IngressBridges:
    """Listen on each ``pairs[i][0]`` and relay every connection to ``pairs[i][1]``.

    All or nothing: if one endpoint cannot be bound, the ones already listening are closed and the
    error propagates (a half-started set of bridges would silently drop a port).
    """
    bridges: list[Bridge] = []
    try:
        for listen, target in pairs:
            stats = BridgeStats()
            handler = _handler(name, target, stats, idle_timeout, connect_timeout)
            listener = await serve(listen, handler, max_connections=max_connections)
            bridges.append(Bridge(listen, target, listener, stats))
            event(log, logging.INFO, f"{name}_listening", listen=str(listener.endpoint), target=str(target))
    except BaseException:
        for b in bridges:
            with contextlib.suppress(Exception):
                await b.listener.close()
        raise
    return IngressBridges(bridges)


async def start_ingress_bridges(
    pairs: Sequence[tuple[Endpoint, Endpoint]],
    idle_timeout: float | None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_connections: int | None = None,
) -> IngressBridges:
    """Enclave side: (vsock listen_port, tcp 127.0.0.1:listen_port) pairs, or any endpoints in tests."""
    return await start_bridges(
        pairs,
        idle_timeout,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
        name="ingress",
    )


def vsock_ingress_pairs(ports: Sequence[int], *, cid: int = 0xFFFFFFFF) -> list[tuple[Endpoint, Endpoint]]:
    """The production pairs: vsock (any CID, port = listen_port) -> tcp 127.0.0.1:listen_port."""
    return [(Endpoint("vsock", cid=cid, port=p), Endpoint("tcp", host="127.0.0.1", port=p)) for p in ports]
