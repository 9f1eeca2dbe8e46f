"""``sidecar host``: the parent-instance half, run next to the enclave (like ``enclaver run``'s proxies).

It serves the enclave's egress (vsock port 17002), forwards each ingress port from TCP to the
enclave, and prints the enclave's log stream and status. Transports are templates, so the same code
runs in production over vsock and in tests or dev over Unix sockets or TCP between namespaces:

    sidecar host --manifest enclaver.yaml --cid 16
    sidecar host --manifest enclaver.yaml --enclave 'tcp:10.213.0.2:{port}'
        --egress-listen tcp:10.213.0.1:17002
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from sidecar.cli import fail, manifest_option
from sidecar.config import LOG_LEVELS, MANIFEST_ENV, MANIFEST_SEARCH, ConfigError, find_config, load_manifest
from sidecar.host.egress import DEFAULT_EGRESS_PORT, start_host_egress
from sidecar.host.forward import DEFAULT_ENCLAVE_TEMPLATE, expand, forward_pairs, start_forwarders
from sidecar.host.streams import FINAL_STATUSES, follow_log, follow_status
from sidecar.logs import configure, event
from sidecar.net.vsock import MAX_U32, Endpoint, parse_endpoint

if TYPE_CHECKING:
    from sidecar.net.policy import EgressPolicy

log = logging.getLogger("sidecar.host")

VMADDR_CID_ANY = MAX_U32
EXIT_STARTUP = 1


@dataclass(frozen=True)
class HostPlan:
    """Everything ``sidecar host`` will do, decided (and validated) before anything listens."""

    forwards: list[tuple[Endpoint, Endpoint]]
    egress_listen: Endpoint | None
    log_endpoint: Endpoint | None
    status_endpoint: Endpoint | None
    policy: EgressPolicy | None
    idle_timeout: float
    connect_timeout: float
    max_tunnels: int
    exit_with_enclave: bool


class _Stop:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.code = 0

    def set(self, code: int = 0) -> None:
        if not self.event.is_set():
            self.code = code
            self.event.set()


async def run_host(plan: HostPlan, stop: asyncio.Event | None = None) -> int:
    """Start everything in ``plan``, run until SIGTERM/SIGINT (or ``stop``), shut down cleanly.

    Returns the exit code: 0, or the enclave's code with ``exit_with_enclave``. A start-up failure
    (a port in use, vsock missing) raises OSError after closing what had started.
    """
    loop = asyncio.get_running_loop()
    done = _Stop()
    closers: list[Callable[[], Awaitable[None]]] = []
    tasks: list[asyncio.Task[None]] = []
    installed: list[signal.Signals] = []
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, done.set)
                installed.append(sig)
        if stop is not None:
            tasks.append(loop.create_task(_relay_stop(stop, done)))
        ready: dict[str, Any] = {}
        if plan.egress_listen is not None:
            egress = await start_host_egress(
                plan.egress_listen,
                plan.policy,
                connect_timeout=plan.connect_timeout,
                idle_timeout=plan.idle_timeout,
                max_tunnels=plan.max_tunnels,
            )
            closers.append(egress.close)
            ready["egress"] = str(egress.endpoint)
        if plan.forwards:
            # The same bound as for egress tunnels (found by review: none at all before, so idle
            # connections from outside could use up the process's file descriptors).
            bridges = await start_forwarders(
                plan.forwards,
                idle_timeout=plan.idle_timeout,
                connect_timeout=plan.connect_timeout,
                max_connections=plan.max_tunnels,
            )
            closers.append(bridges.close)
            ready["ingress"] = [f"{b.endpoint} -> {b.target}" for b in bridges.bridges]
        if plan.log_endpoint is not None:
            tasks.append(loop.create_task(follow_log(plan.log_endpoint)))
        if plan.status_endpoint is not None:

            def on_status(status: dict[str, Any]) -> None:
                if plan.exit_with_enclave and status.get("status") in FINAL_STATUSES:
                    code = status.get("code")
                    done.set(code if isinstance(code, int) and 0 <= code <= 255 else EXIT_STARTUP)

            tasks.append(loop.create_task(follow_status(plan.status_endpoint, on_status)))
        event(log, logging.INFO, "host_ready", policy_check=plan.policy is not None, **ready)
        await done.event.wait()
        event(log, logging.INFO, "host_stopping")
        return done.code
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                await closer()
        for sig in installed:
            loop.remove_signal_handler(sig)
        event(log, logging.INFO, "host_stopped")


async def _relay_stop(stop: asyncio.Event, done: _Stop) -> None:
    await stop.wait()
    done.set()


@click.command("host")
@manifest_option
@click.option(
    "--cid", type=click.IntRange(4, MAX_U32 - 1), help="the enclave's vsock CID (nitro-cli describe-enclaves)"
)
@click.option(
    "--no-policy-check",
    is_flag=True,
    help="connect wherever the enclave asks, like Enclaver (default: re-check the manifest's egress policy, "
    "including every resolved address)",
)
@click.option(
    "--listen-host", default="0.0.0.0", show_default=True, help="where the ingress forwarders listen"
)
@click.option(
    "--log-port",
    type=click.IntRange(1, MAX_U32),
    default=17001,
    show_default=True,
    metavar="PORT",
    help="the enclave's log stream port",
)
@click.option(
    "--status-port",
    type=click.IntRange(1, MAX_U32),
    default=17000,
    show_default=True,
    metavar="PORT",
    help="the enclave's status stream port",
)
@click.option(
    "--egress-port",
    type=click.IntRange(1, MAX_U32),
    default=DEFAULT_EGRESS_PORT,
    show_default=True,
    metavar="PORT",
    help="the vsock port the parent serves egress on",
)
@click.option(
    "--enclave",
    "enclave_template",
    default=DEFAULT_ENCLAVE_TEMPLATE,
    show_default=True,
    metavar="TEMPLATE",
    help="where the enclave's ports are: {cid} and {port} are substituted (tests: tcp:10.0.0.2:{port}, "
    "unix:/run/enclave/{port}.sock)",
)
@click.option(
    "--egress-listen",
    metavar="ENDPOINT",
    help="where to serve egress instead of vsock:ANY:EGRESS_PORT (tests: tcp:HOST:PORT, unix:/PATH)",
)
@click.option("--no-egress", is_flag=True, help="do not serve egress")
@click.option("--no-ingress", is_flag=True, help="do not forward the ingress ports")
@click.option("--no-streams", is_flag=True, help="do not follow the log and status streams")
@click.option(
    "--exit-with-enclave", is_flag=True, help="stop, with the enclave's exit code, when it reports exited"
)
@click.option("--idle-timeout", type=click.FloatRange(0.1, 86400.0), default=300.0, show_default=True)
@click.option("--connect-timeout", type=click.FloatRange(0.1, 600.0), default=10.0, show_default=True)
@click.option(
    "--max-tunnels",
    type=click.IntRange(1, 65536),
    default=512,
    show_default=True,
    help="concurrent egress tunnels, and concurrent connections on each forwarded ingress port",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
def host(
    manifest_path: str | None,
    cid: int | None,
    no_policy_check: bool,
    listen_host: str,
    log_port: int,
    status_port: int,
    egress_port: int,
    enclave_template: str,
    egress_listen: str | None,
    no_egress: bool,
    no_ingress: bool,
    no_streams: bool,
    exit_with_enclave: bool,
    idle_timeout: float,
    connect_timeout: float,
    max_tunnels: int,
    log_level: str,
) -> None:
    """Run the parent-instance half: vsock egress, ingress forwarders, the enclave's log and status.

    The enclave's log lines go to stdout; this command's own events go to stderr as JSON lines.
    Runs until SIGTERM or Ctrl-C; exit code 0 (or the enclave's, with --exit-with-enclave), 1 when
    something cannot start, 2 for usage and config errors.
    """
    configure(log_level)
    mpath = find_config(manifest_path, MANIFEST_ENV, MANIFEST_SEARCH)
    if mpath is None:
        fail("no manifest found; pass --manifest FILE")
    try:
        manifest = load_manifest(mpath)
    except ConfigError as exc:
        fail(str(exc))
    policy = None
    if not no_egress and not no_policy_check:
        from sidecar.net.policy import EgressPolicy, PolicyError

        try:
            policy = EgressPolicy.from_manifest(manifest)
        except PolicyError as exc:
            fail(f"{mpath}: egress: {exc}")
    try:
        plan = HostPlan(
            forwards=[]
            if no_ingress
            else forward_pairs(
                manifest.ingress_ports, listen_host=listen_host, enclave_template=enclave_template, cid=cid
            ),
            egress_listen=None
            if no_egress
            else parse_endpoint(egress_listen)
            if egress_listen
            else Endpoint("vsock", cid=VMADDR_CID_ANY, port=egress_port),
            log_endpoint=None if no_streams else expand(enclave_template, port=log_port, cid=cid),
            status_endpoint=None if no_streams else expand(enclave_template, port=status_port, cid=cid),
            policy=policy,
            idle_timeout=idle_timeout,
            connect_timeout=connect_timeout,
            max_tunnels=max_tunnels,
            exit_with_enclave=exit_with_enclave,
        )
    except ValueError as exc:
        fail(str(exc))
    try:
        code = asyncio.run(run_host(plan))
    except OSError as exc:
        fail(f"cannot start: {exc}", code=EXIT_STARTUP)
    raise SystemExit(code)
