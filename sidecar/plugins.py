"""Find, load and check plugins (entry-point group ``sidecar``), and call hooks per plugin.

A plugin is a module (or object) registered under the ``sidecar`` entry-point group; its
entry-point name is the key of its section in sidecar.yaml. The builtin plugins are registered
exactly the same way, in this project's pyproject.toml.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from sidecar import hookspecs
from sidecar.schema import suggest

ENTRY_POINT_GROUP = "sidecar"

# Core plugins are always loaded and asked for routes on every listener. They are written against
# the same hooks as any other plugin (the way datasette registers its defaults).
# Order matters: the network (egress proxy) starts before AWS, whose traffic leaves through it.
CORE_PLUGINS = {
    "attestation": "sidecar.attestation.api",
    "network": "sidecar.net.plugin",
    "aws": "sidecar.aws.plugin",
}


class PluginError(Exception):
    """A plugin could not be found, imported or checked. The message names the plugin."""

    def __init__(self, plugin: str, problem: str) -> None:
        super().__init__(f"plugin {plugin!r}: {problem}")
        self.plugin = plugin
        self.problem = problem


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str | None
    distribution: str | None
    module: str


def installed_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plugins by name. A name registered twice keeps the first, as pluggy would refuse it."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("sidecar")
    pm.add_hookspecs(hookspecs)
    return pm


def build_plugin_manager(
    enabled: Iterable[str] | None,
    extra: Mapping[str, object] | None = None,
    tolerate_errors: bool = False,
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo], dict[str, str]]:
    """Load plugins and check their hooks.

    ``enabled`` lists the plugin names to load (None loads every installed plugin, as the CLI
    does for commands). ``extra`` registers objects directly (test harness). With
    ``tolerate_errors`` a broken plugin is skipped and reported in the third return value instead
    of raising :class:`PluginError`.
    """
    pm = new_manager()
    infos: dict[str, PluginInfo] = {}
    broken: dict[str, str] = {}
    available = installed_entry_points()
    extra = dict(extra or {})
    wanted = list(available) + [n for n in extra if n not in available] if enabled is None else list(enabled)

    from sidecar import __version__

    for name, module in CORE_PLUGINS.items():
        _register(pm, name, importlib.import_module(module))
        infos[name] = PluginInfo(name, __version__, "enclave-sidecar", module)
    for name in wanted:
        if name in CORE_PLUGINS:
            raise PluginError(name, "is a core plugin of the sidecar; it is always loaded")
        try:
            if name in extra:
                obj = extra[name]
                infos[name] = PluginInfo(name, None, None, getattr(obj, "__name__", type(obj).__name__))
            elif name in available:
                ep = available[name]
                obj = _load(ep)
                dist = ep.dist
                infos[name] = PluginInfo(
                    name, dist.version if dist else None, dist.metadata["Name"] if dist else None, ep.value
                )
            else:
                raise PluginError(
                    name, "is enabled in sidecar.yaml but not installed" + suggest(name, available)
                )
            _register(pm, name, obj)
        except PluginError as exc:
            if not tolerate_errors:
                raise
            broken[name] = exc.problem
            infos.pop(name, None)
    return pm, infos, broken


def _load(ep: importlib.metadata.EntryPoint) -> object:
    try:
        return ep.load()
    except Exception as exc:  # any import-time failure is the plugin's, and must name it
        raise PluginError(ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}") from exc


def _register(pm: pluggy.PluginManager, name: str, obj: object) -> None:
    try:
        pm.register(obj, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(name, f"invalid hook implementation: {exc}") from exc
    except ValueError as exc:
        raise PluginError(name, str(exc)) from exc
    known = [spec for spec in dir(hookspecs) if not spec.startswith("_")]
    for caller in pm.get_hookcallers(pm.get_plugin(name)) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin_name != name:
                continue
            if not caller.has_spec():
                if impl.optionalhook:
                    continue
                # A misspelled hook name would otherwise be silently ignored.
                problem = f"unknown hook {caller.name!r}" + suggest(caller.name, known)
            elif caller.name != "lifespan" and inspect.iscoroutinefunction(impl.function):
                # The sidecar calls every hook but lifespan without awaiting it: an ``async def``
                # one would hand back a coroutine that never runs (routes not iterable, a readiness
                # report that fails).
                problem = f"hook {caller.name!r} must be a plain function, not async def"
            else:
                continue
            pm.unregister(name=name)
            raise PluginError(name, problem)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # pragma: no cover - caught above, kept as a backstop
        pm.unregister(name=name)
        raise PluginError(name, str(exc)) from exc


def hooks_of(pm: pluggy.PluginManager, name: str) -> list[str]:
    plugin = pm.get_plugin(name)
    return sorted(impl.name for impl in pm.get_hookcallers(plugin) or []) if plugin is not None else []


def call_plugin(pm: pluggy.PluginManager, plugin_name: str, hook: str, **kwargs: Any) -> list[Any]:
    """Call ``hook`` of one plugin only, passing the arguments its implementation asks for."""
    caller = getattr(pm.hook, hook)
    results = []
    for impl in caller.get_hookimpls():
        if impl.plugin_name != plugin_name:
            continue
        result = impl.function(*(kwargs[arg] for arg in impl.argnames))
        if result is not None:
            results.append(result)
    return results
