"""``sidecar egress serve``: the egress proxy alone, without the rest of the sidecar.

The integrator attaches :data:`serve` to the ``egress`` group in :mod:`sidecar.cli`. Import this
module after cli.py has defined its helpers (at the bottom of cli.py or inside a function): it reuses
``manifest_option``, ``config_option``, ``load_both`` and ``fail`` from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import replace

import click

from sidecar.cli import config_option, fail, load_both, manifest_option
from sidecar.config import ConfigError, NetworkSettings
from sidecar.logs import configure, event

log = logging.getLogger("sidecar.net.egress")


@click.command("serve")
@manifest_option
@config_option
@click.option(
    "--upstream",
    metavar="UPSTREAM",
    help="where allowed traffic goes: direct, vsock, http://HOST:PORT, or a parent endpoint "
    "(unix:/PATH, tcp:HOST:PORT, vsock:CID:PORT); default: network.upstream in sidecar.yaml",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="loopback port to listen on (0: any free port); default: egress.proxy_port in enclaver.yaml",
)
def serve(manifest_path: str | None, config_path: str | None, upstream: str | None, port: int | None) -> None:
    """Run the egress proxy alone on 127.0.0.1 until SIGTERM or Ctrl-C (exit code 0).

    Enforces egress.allow/deny from enclaver.yaml, with the limits from sidecar.yaml's network
    section. Prints the proxy's URL on stderr once it listens; point apps at it with
    HTTPS_PROXY/HTTP_PROXY. Exit code 1 when it cannot listen, 2 for config errors.
    """
    from sidecar.net.egress import start_egress_proxy, upstream_from_settings
    from sidecar.net.policy import EgressPolicy, PolicyError

    try:
        manifest, settings = load_both(manifest_path, config_path)
    except ConfigError as exc:
        fail(str(exc))
    configure(settings.log_level)
    network: NetworkSettings = settings.network
    if upstream is not None:
        network = replace(network, upstream=upstream)
    try:
        policy = EgressPolicy.from_manifest(manifest)
    except PolicyError as exc:
        fail(f"{manifest.path}: egress: {exc}")
    try:
        chosen = upstream_from_settings(network)
    except ValueError as exc:
        fail(f"--upstream: {exc}" if upstream is not None else str(exc))
    listen_port = manifest.egress.proxy_port if port is None else port

    async def run() -> int:
        try:
            proxy = await start_egress_proxy(policy, port=listen_port, upstream=chosen, settings=network)
        except OSError as exc:
            click.echo(f"error: cannot listen on 127.0.0.1:{listen_port}: {exc.strerror or exc}", err=True)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            event(
                log,
                logging.INFO,
                "egress_proxy_started",
                url=proxy.url,
                upstream=str(chosen),
                allow=len(policy.allow_rules),
                deny=len(policy.deny_rules),
            )
            click.echo(f"sidecar egress: proxy listening on {proxy.url} (upstream {chosen})", err=True)
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await proxy.close()
        event(log, logging.INFO, "egress_proxy_stopped", connections=proxy.stats.connections)
        return 0

    raise SystemExit(asyncio.run(run()))
