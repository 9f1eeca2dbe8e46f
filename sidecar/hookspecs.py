"""The plugin API: one hook per extension point.

Plugins implement these with ``@sidecar.hookimpl``. A plugin implements only the hooks it needs,
and may accept any subset of a hook's parameters. Hooks marked *per plugin* are called once for each
enabled plugin with that plugin's own :class:`~sidecar.context.PluginContext`; the others are
called once across all plugins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from sidecar.context import PluginContext
    from sidecar.devworld.world import DevWorld
    from sidecar.routes import Listener, Route
    from sidecar.schema import Map

hookspec = pluggy.HookspecMarker("sidecar")
hookimpl = pluggy.HookimplMarker("sidecar")


@hookspec
def register_config_schema() -> Map | None:
    """Declare the schema of this plugin's ``plugins.<name>.config`` section in sidecar.yaml.

    When: at start-up and by ``sidecar config``, before any other per-plugin hook. Per plugin.
    Receives: nothing.
    Returns: a :class:`sidecar.schema.Map`, or None to accept no settings at all. Unknown keys,
    wrong types and missing required keys then stop start-up with ``sidecar.yaml:
    plugins.<name>.config.<key>: <problem>``. Fields marked ``secret=True`` are masked in dumps.
    Async: no.
    """


@hookspec
def register_routes(listener: Listener, context: PluginContext) -> Iterable[Route] | None:
    """Return the HTTP routes this plugin serves on ``listener``.

    When: while the server builds each listener's application, before start-up. Per plugin, and
    only for the listener sidecar.yaml assigns to the plugin (``plugins.<name>.listen_port``; the
    first ingress port when unset).
    Receives: the :class:`~sidecar.routes.Listener` being built, and the plugin's context.
    Returns: an iterable of :class:`~sidecar.routes.Route`, or None. Two plugins claiming the same
    method and path on one listener is a start-up error. Until the plugin's ``lifespan`` start-up
    has finished, its routes answer 503.
    Async: no (handlers inside routes are async).
    """


@hookspec
def lifespan(context: PluginContext) -> AsyncIterator[None] | None:
    """Start-up and clean-up as one async generator, paired like aiohttp's ``cleanup_ctx``.

    When: the code before ``yield`` runs once the listeners are open (readiness is false until it
    finishes); the code after ``yield`` runs at shutdown, in reverse plugin order, even when
    another plugin failed, within ``shutdown_timeout`` seconds (then it is cancelled). Per plugin.
    Receives: the plugin's context.
    Returns: an async generator that yields exactly once. An exception before the yield fails the
    plugin's start-up, and the error names the plugin.
    Async: yes, it must be an ``async def`` with one ``yield``.
    """


@hookspec
def readiness(context: PluginContext) -> str | None:
    """Report whether this plugin can serve traffic now.

    When: on every ``GET /enclave/ready``, after the plugin's start-up finished. Per plugin.
    Receives: the plugin's context.
    Returns: None when ready, or a short reason it is not (``"list not loaded: KMS denied"``).
    The reason is shown to whoever calls /enclave/ready, so it must not contain secrets.
    Async: no; it must be cheap, it runs on the probe's request.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``sidecar`` command line.

    When: as the CLI starts, for every installed plugin (enabled in sidecar.yaml or not).
    Receives: the root ``click.Group``; add commands with ``@cli.command()`` or ``cli.add_command``.
    Returns: nothing.
    Async: no.
    """


@hookspec
def prepare_dev_world(world: DevWorld, context: PluginContext) -> None:
    """Seed the dev world with what this plugin needs, as an operator would seed AWS.

    When: only under ``sidecar dev``, once the dev world is up and before any plugin's
    ``lifespan``. Per plugin (enabled plugins only).
    Receives: the running :class:`~sidecar.devworld.world.DevWorld` (``world.admin("s3")`` and
    ``world.admin("kms")`` are plain boto3 clients with admin rights, ``world.create_key(pcr0_hex,
    alias)`` makes a key pinned to a PCR0, ``world.pcr0`` is this sidecar's measured PCR0), and the
    plugin's context (its config).
    Returns: nothing. An exception stops ``sidecar dev`` with an error naming the plugin.
    Async: no; it runs in a worker thread, so blocking boto3 calls are fine.
    """
