"""The ``network`` core plugin: the egress proxy, and inside an enclave the vsock bridges and streams.

It starts before the ``aws`` plugin, so IMDS, KMS and S3 traffic already leaves through the proxy and
its policy (ARCHITECTURE.md, start-up step 3). Plugins get ``context.http``: an aiohttp session whose
every request goes through the proxy, so a plugin cannot reach a host the measured policy forbids.

With ``network.vsock_ingress`` (inside a Nitro Enclave) it also accepts each ingress port on vsock
and bridges it to the TCP listener, and serves the log and status streams the host side reads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sidecar import PluginContext, hookimpl
from sidecar.config import NetworkSettings
from sidecar.logs import event

if TYPE_CHECKING:
    from sidecar.net.egress import EgressProxy
    from sidecar.net.policy import EgressPolicy

T = TypeVar("T")
SETUP_KEY = "network"
VMADDR_CID_ANY = 0xFFFFFFFF  # listen on vsock for any peer (the parent)
log = logging.getLogger("sidecar.net")


@dataclass
class NetworkSetup:
    """What start-up decided: the policy, the proxy's port and upstream, the vsock side."""

    policy: EgressPolicy
    proxy_port: int
    network: NetworkSettings
    ingress_ports: tuple[int, ...] = ()
    proxy: EgressProxy | None = field(default=None, repr=False)

    @property
    def proxy_url(self) -> str:
        """The proxy's URL once it listens (its real port: the configured one may be 0 in tests)."""
        port = self.proxy.port if self.proxy is not None else self.proxy_port
        return f"http://127.0.0.1:{port}"


class ProxyThread:
    """An event loop in its own thread, for the egress proxy.

    boto3 and the IMDS client are synchronous. Called on the main loop (a plugin's start-up, the
    ``aws`` plugin's first IMDS request) they would block the very loop that must relay their
    bytes, and every call would time out. On its own loop the proxy keeps relaying whatever the
    main loop is doing.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="egress-proxy", daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the proxy's loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join)
        self.loop.close()


@hookimpl
async def lifespan(context: PluginContext) -> AsyncIterator[None]:
    setup: NetworkSetup | None = context.services.extra.get(SETUP_KEY)
    if setup is None:  # a sidecar started without a network (the in-process test harness)
        yield
        return
    import aiohttp

    from sidecar.net.egress import start_egress_proxy, upstream_from_settings

    async with AsyncExitStack() as stack:
        thread = ProxyThread()
        stack.push_async_callback(thread.stop)
        upstream = upstream_from_settings(setup.network)
        setup.proxy = await thread.run(
            start_egress_proxy(setup.policy, port=setup.proxy_port, upstream=upstream, settings=setup.network)
        )
        stack.push_async_callback(thread.run, setup.proxy.close())
        # str(upstream), not the setting: an http:// upstream's setting may carry user:password@.
        event(log, logging.INFO, "egress_proxy_started", url=setup.proxy_url, upstream=str(upstream))
        # trust_env=False: the proxy is explicit, and NO_PROXY from the environment must not open a
        # path around the policy.
        session = aiohttp.ClientSession(proxy=setup.proxy_url, trust_env=False)
        stack.push_async_callback(session.close)
        context.services.http = session
        if setup.network.vsock_ingress:
            await _start_vsock_side(stack, setup, context.services.status_listeners)
        try:
            yield
        finally:
            context.services.http = None


async def _start_vsock_side(
    stack: AsyncExitStack, setup: NetworkSetup, status_listeners: list[Callable[..., None]]
) -> None:
    from sidecar.net.ingress import start_ingress_bridges, vsock_ingress_pairs
    from sidecar.net.streams import start_streams
    from sidecar.net.vsock import vsock

    net = setup.network
    pairs = vsock_ingress_pairs(setup.ingress_ports, cid=VMADDR_CID_ANY)
    # Bounded like egress: idle connections must not use up the sidecar's file descriptors.
    bridges = await start_ingress_bridges(
        pairs, idle_timeout=net.idle_timeout, max_connections=net.max_tunnels
    )
    stack.push_async_callback(bridges.close)
    streams = await start_streams(
        log_endpoint=vsock(VMADDR_CID_ANY, net.log_vsock_port),
        status_endpoint=vsock(VMADDR_CID_ANY, net.status_vsock_port),
    )
    stack.push_async_callback(streams.close)
    # The host side follows the status stream: starting, ready, stopping, exited with the code.
    status_listeners.append(streams.set_status)
    stack.callback(status_listeners.remove, streams.set_status)
    event(log, logging.INFO, "vsock_side_started", ingress=list(setup.ingress_ports))
