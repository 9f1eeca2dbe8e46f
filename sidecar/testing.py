"""Test fixtures for plugin authors (a pytest plugin, registered as ``pytest11: sidecar``).

Boot a real sidecar in-process, with the plugins you choose, on ephemeral ports::

    async def test_hello(sidecar_factory):
        sc = await sidecar_factory(plugins={"hello": my_plugin}, config={"hello": {"greeting": "hi"}})
        await sc.wait_started()
        async with sc.session.get(sc.url("/hello")) as resp:
            assert resp.status == 200

``run_sidecar`` is the same thing as an async context manager, for use outside pytest fixtures.
``free_port`` gives a port for a server the test starts in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import parse_manifest, parse_settings
from sidecar.context import Services
from sidecar.server import Runtime, Status, build_runtime

DEFAULT_INGRESS = (8001,)
DEFAULT_API = 9000


class PluginStartupFailed(AssertionError):
    """A plugin did not start; the message names it and gives the reason /enclave/ready shows."""


class SidecarHarness:
    """A running in-process sidecar. Ports are the manifest's; ``url`` maps them to the real ones."""

    def __init__(self, runtime: Runtime, session: aiohttp.ClientSession) -> None:
        self.runtime = runtime
        self.session = session

    def url(self, path: str = "/", port: int | None = None) -> str:
        """URL of ``path`` on the listener the manifest calls ``port`` (default: first ingress)."""
        port = port if port is not None else self.runtime.listeners[0].port
        return f"http://127.0.0.1:{self.runtime.bound_port(port)}{path}"

    async def wait_started(self, within: float = 30.0) -> None:
        """Wait until every plugin's start-up finished; fail the test if one failed."""
        async with asyncio.timeout(within):
            await self.runtime.startup_done.wait()
        failed = {n: s.reason for n, s in self.runtime.plugins.items() if s.status is Status.FAILED}
        if failed:
            raise PluginStartupFailed("; ".join(f"plugin {n!r}: {r}" for n, r in failed.items()))


def minimal_manifest(
    ingress: Sequence[int] = DEFAULT_INGRESS, api: int | None = DEFAULT_API, **extra: Any
) -> dict[str, Any]:
    """A minimal valid enclaver.yaml as a dict."""
    manifest: dict[str, Any] = {
        "version": "v1",
        "name": "test",
        "target": "test:enclave",
        "sources": {"app": "test:latest"},
        "ingress": [{"listen_port": p} for p in ingress],
    }
    if api is not None:
        manifest["api"] = {"listen_port": api}
    manifest.update(extra)
    return manifest


@contextlib.asynccontextmanager
async def run_sidecar(
    *,
    state_dir: Path,
    plugins: Mapping[str, object] | None = None,
    installed: Sequence[str] = (),
    config: Mapping[str, Mapping[str, Any]] | None = None,
    listen_ports: Mapping[str, int] | None = None,
    manifest: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    services: Services | None = None,
) -> AsyncIterator[SidecarHarness]:
    """Start a sidecar with ``plugins`` (objects or modules, by name) and ``installed`` (entry points).

    ``config`` gives each plugin's ``config`` section; ``listen_ports`` each plugin's ingress port.
    Every listener binds an ephemeral port on 127.0.0.1.
    """
    manifest_dict = dict(manifest or minimal_manifest())
    names = list(installed) + list(plugins or {})
    settings_dict: dict[str, Any] = {"state_dir": str(state_dir), **(settings or {})}
    entries = settings_dict.setdefault("plugins", {})
    for name in names:
        entry = entries.setdefault(name, {})
        entry.setdefault("config", dict((config or {}).get(name, {})))
        if listen_ports and name in listen_ports:
            entry["listen_port"] = listen_ports[name]
    path = state_dir / "enclaver.yaml"
    parsed_manifest = parse_manifest(manifest_dict, path)
    parsed_settings = parse_settings(settings_dict, state_dir / "sidecar.yaml", parsed_manifest)
    bind = {port: 0 for port in parsed_manifest.ingress_ports}
    if parsed_manifest.api_port is not None:
        bind[parsed_manifest.api_port] = 0
    runtime = build_runtime(parsed_manifest, parsed_settings, plugins, services, bind)
    await runtime.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield SidecarHarness(runtime, session)
    finally:
        await runtime.stop()


def emulated_services(state_dir: Path, pcrs: Mapping[int, bytes] | None = None) -> Services:
    """Services with the NSM emulator (dev PKI in ``state_dir``) and a fresh recipient key.

    Pass to ``sidecar_factory(services=...)`` to test a plugin that calls ``context.attest``.
    The dev root certificate is at ``state_dir / "dev-root.pem"``.
    """
    from sidecar.attestation.emulator import DevPki, NsmEmulator
    from sidecar.bootstrap import attest_function
    from sidecar.recipient import RecipientKey

    services = Services()
    services.nsm = NsmEmulator(DevPki.load_or_create(state_dir), pcrs=pcrs)
    services.recipient = RecipientKey.generate()
    services.attest = attest_function(services.nsm, 4)
    return services


SidecarFactory = Callable[..., Awaitable[SidecarHarness]]

try:  # plugin authors may run pytest-asyncio in strict mode: register the fixture explicitly
    import pytest_asyncio

    _async_fixture: Any = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - pytest-asyncio is part of the `test` extra
    _async_fixture = pytest.fixture


@_async_fixture  # type: ignore[untyped-decorator]
async def sidecar_factory(tmp_path: Path) -> AsyncIterator[SidecarFactory]:
    """A factory: ``await sidecar_factory(plugins=..., config=...)`` returns a started harness.

    Every sidecar it started is shut down (plugin clean-ups included) when the test ends.
    """
    async with contextlib.AsyncExitStack() as stack:
        counter = 0

        async def factory(**kwargs: Any) -> SidecarHarness:
            nonlocal counter
            counter += 1
            state = tmp_path / f"sidecar-{counter}"
            state.mkdir()
            return await stack.enter_async_context(run_sidecar(state_dir=state, **kwargs))

        yield factory


# ---------------------------------------------------------------------------- ports for other processes
#
# Free TCP ports for servers a test starts in another process.
#
# Why not ``bind(("127.0.0.1", 0))`` and close: that hands out a port from the kernel's ephemeral
# range, which every outgoing connection and every ``port=0`` listener (moto, the dev world's IMDS,
# KMS and S3) also draws from. Between the probe closing and the child binding, one of them can
# take it, and the child then exits with "address already in use" (this repository's CI lost a run
# to it). The kernel never hands out ports below the ephemeral range by itself, so there only
# another explicit choice can collide, and this process never gives the same port twice.

_FALLBACK_EPHEMERAL = (32768, 60999)
_LOWEST = 10000  # clear of well-known and commonly configured service ports
_handed_out: set[int] = set()
_lock = threading.Lock()
_random = secrets.SystemRandom()  # no seed two test processes could share


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
            low, high = (int(part) for part in handle.read().split())
        return low, high
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def _candidate_ranges() -> list[range]:
    low, high = _ephemeral_range()
    ranges = [range(_LOWEST, low)] if low - _LOWEST >= 1000 else []
    if 65535 - high >= 1000:
        ranges.append(range(high + 1, 65536))
    return ranges


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, outside the ephemeral range, and new to this process."""
    with _lock:
        ranges = _candidate_ranges()
        for _ in range(200 if ranges else 0):
            port = _random.choice(_random.choice(ranges))
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
        # No room outside the ephemeral range on this machine: fall back to the kernel's choice.
        while True:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
