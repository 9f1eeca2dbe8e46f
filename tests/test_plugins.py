"""Plugin loading, hook checking, config schemas, route conflicts and lifespans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar import Listener, PluginContext, PluginStartupError, Route, ServiceNotConfigured, hookimpl
from sidecar.config import ConfigError
from sidecar.plugins import PluginError, build_plugin_manager, hooks_of
from sidecar.schema import Int, Map, Str
from sidecar.server import Status
from sidecar.testing import PluginStartupFailed, run_sidecar
from tests.conftest import install_plugin_dist


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


class RoutePlugin:
    """A plugin object serving one route (plugins may be objects as well as modules)."""

    def __init__(self, path: str, method: str = "GET") -> None:
        self.route = Route(method, path, ok)

    @hookimpl
    def register_routes(self, listener: Listener) -> list[Route]:
        return [self.route]


# --------------------------------------------------------------------------- loading


def test_only_enabled_plugins_are_loaded() -> None:
    pm, infos, broken = build_plugin_manager(["vault_like"])
    assert list(infos) == ["attestation", "network", "aws", "vault_like"]  # core plugins, in start order
    assert pm.get_plugin("no_fly_list") is None
    assert broken == {}
    assert infos["vault_like"].distribution == "enclave-sidecar"
    assert "register_config_schema" in hooks_of(pm, "vault_like")


def test_core_plugins_cannot_be_enabled_twice() -> None:
    with pytest.raises(PluginError, match="is a core plugin of the sidecar; it is always loaded"):
        build_plugin_manager(["attestation"])


def test_enabled_but_not_installed_names_the_plugin_and_suggests() -> None:
    with pytest.raises(PluginError) as err:
        build_plugin_manager(["no_fly_lst"])
    assert err.value.plugin == "no_fly_lst"
    assert "not installed" in str(err.value)
    assert "did you mean 'no_fly_list'?" in str(err.value)


def test_import_failure_names_the_plugin(plugin_site: Path) -> None:
    # Threat: a half-installed plugin silently missing from an enclave that expects it.
    install_plugin_dist(plugin_site, "broken", {"exploding": "raise RuntimeError('boom at import')\n"})
    with pytest.raises(PluginError) as err:
        build_plugin_manager(["exploding"])
    assert err.value.plugin == "exploding"
    assert "failed to import" in str(err.value)
    assert "RuntimeError: boom at import" in str(err.value)


def test_cli_tolerates_a_broken_plugin_and_reports_it(plugin_site: Path) -> None:
    install_plugin_dist(plugin_site, "broken", {"exploding": "raise ImportError('nope')\n"})
    _, infos, broken = build_plugin_manager(None, tolerate_errors=True)
    assert "exploding" in broken and "nope" in broken["exploding"]
    assert {"no_fly_list", "vault_like"} <= set(infos)


def test_misspelled_hook_fails_with_suggestion() -> None:
    class Typo:
        @hookimpl
        def register_rouets(self) -> None:
            return None

    with pytest.raises(PluginError) as err:
        build_plugin_manager(["typo"], {"typo": Typo()})
    assert "unknown hook 'register_rouets'" in str(err.value)
    assert "did you mean 'register_routes'?" in str(err.value)


def test_hook_with_unknown_argument_is_refused() -> None:
    class BadArgs:
        @hookimpl
        def register_routes(self, listner: Listener) -> None:
            return None

    with pytest.raises(PluginError) as err:
        build_plugin_manager(["bad"], {"bad": BadArgs()})
    assert err.value.plugin == "bad"
    assert "listner" in str(err.value)


def test_an_async_hook_the_sidecar_does_not_await_is_refused() -> None:
    # Guards: an async readiness hook made /enclave/ready a 500 (a coroutine is no JSON), an async
    # register_routes a TypeError naming no plugin; neither hook ever ran.
    class AsyncReadiness:
        @hookimpl
        async def readiness(self) -> None:
            return None

    with pytest.raises(PluginError, match="hook 'readiness' must be a plain function, not async def") as err:
        build_plugin_manager(["eager"], {"eager": AsyncReadiness()})
    assert err.value.plugin == "eager"


async def test_register_routes_returning_one_route_names_the_plugin(sidecar_factory: Any) -> None:
    # Guards: a Route returned bare, not in a list, failed start-up with "'Route' object is not iterable".
    class Bare:
        @hookimpl
        def register_routes(self) -> Route:
            return Route("GET", "/bare", ok)

    with pytest.raises(PluginError, match="returned a Route, expected a list of Routes") as err:
        await sidecar_factory(plugins={"bare": Bare()})
    assert err.value.plugin == "bare"


# --------------------------------------------------------------------------- config schemas


class Configured:
    @hookimpl
    def register_config_schema(self) -> Map:
        return Map(fields={"size": Int(min=1, default=3), "token": Str(secret=True, required=True)})


async def test_plugin_config_is_validated_and_defaulted(sidecar_factory: Any) -> None:
    plugin = Configured()
    sc = await sidecar_factory(plugins={"conf": plugin}, config={"conf": {"token": "t0ken"}})
    context = sc.runtime.plugins["conf"].context
    assert context.config["size"] == 3
    assert context.config["token"] == "t0ken"
    assert "t0ken" not in repr(context.config)  # secret fields are Secret strings


@pytest.mark.parametrize(
    ("config", "path", "problem"),
    [
        ({}, "plugins.conf.config.token", "is required"),
        ({"token": "x", "size": 0}, "plugins.conf.config.size", "0 is below the minimum of 1"),
        ({"token": "x", "sise": 2}, "plugins.conf.config.sise", "unknown key (did you mean 'size'?)"),
        ({"token": 5}, "plugins.conf.config.token", "expected a string, got a secret value"),
    ],
)
async def test_plugin_config_errors_name_the_key_path(
    sidecar_factory: Any, config: dict[str, Any], path: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        await sidecar_factory(plugins={"conf": Configured()}, config={"conf": config})
    assert err.value.path == path
    assert err.value.problem == problem
    assert err.value.file.endswith("sidecar.yaml")


async def test_plugin_without_schema_refuses_settings(sidecar_factory: Any) -> None:
    with pytest.raises(ConfigError) as err:
        await sidecar_factory(plugins={"plain": RoutePlugin("/x")}, config={"plain": {"a": 1}})
    assert str(err.value).endswith("plugins.plain.config: this plugin takes no settings")


# --------------------------------------------------------------------------- routes


async def test_two_plugins_claiming_one_route_is_a_startup_error(sidecar_factory: Any) -> None:
    with pytest.raises(PluginError) as err:
        await sidecar_factory(plugins={"first": RoutePlugin("/same"), "second": RoutePlugin("/same")})
    assert err.value.plugin == "second"
    assert "GET /same on ingress:8001 is claimed by plugin 'first' too" in str(err.value)


async def test_wildcard_method_conflicts_with_any_method(sidecar_factory: Any) -> None:
    with pytest.raises(PluginError, match=r"\* /same on ingress:8001 is claimed by plugin 'first'"):
        await sidecar_factory(
            plugins={"first": RoutePlugin("/same", "POST"), "second": RoutePlugin("/same", "*")}
        )


@pytest.mark.parametrize("second", ["/item/{name}", "/item/{id:[^{}/]+}"])
async def test_one_pattern_under_two_variable_names_is_one_route(sidecar_factory: Any, second: str) -> None:
    # Threat: aiohttp sends every request to the first of two equal patterns; the second plugin's
    # route was silently never reached (found by review).
    with pytest.raises(PluginError, match=r"is claimed by plugin 'first' too") as err:
        await sidecar_factory(plugins={"first": RoutePlugin("/item/{id}"), "second": RoutePlugin(second)})
    assert err.value.plugin == "second"


async def test_a_route_path_aiohttp_refuses_names_the_plugin(sidecar_factory: Any) -> None:
    # Guards: a malformed pattern failed start-up with aiohttp's bare ValueError, no plugin named.
    with pytest.raises(PluginError, match=r"route path '/x/\{1bad\}' is not a valid route pattern") as err:
        await sidecar_factory(plugins={"typo": RoutePlugin("/x/{1bad}")})
    assert err.value.plugin == "typo"


async def test_same_path_different_listeners_is_fine(sidecar_factory: Any) -> None:
    from sidecar.testing import minimal_manifest

    sc = await sidecar_factory(
        manifest=minimal_manifest(ingress=(8001, 8200)),
        plugins={"a": RoutePlugin("/same"), "b": RoutePlugin("/same")},
        listen_ports={"a": 8001, "b": 8200},
    )
    await sc.wait_started()
    for port in (8001, 8200):
        async with sc.session.get(sc.url("/same", port)) as resp:
            assert resp.status == 200


async def test_core_paths_are_reserved(sidecar_factory: Any) -> None:
    with pytest.raises(PluginError, match="GET /enclave/health on ingress:8001 is reserved by the sidecar"):
        await sidecar_factory(plugins={"greedy": RoutePlugin("/enclave/health")})


async def test_register_routes_must_return_routes(sidecar_factory: Any) -> None:
    class Wrong:
        @hookimpl
        def register_routes(self) -> list[str]:
            return ["/not-a-route"]

    with pytest.raises(PluginError, match="expected Route objects"):
        await sidecar_factory(plugins={"wrong": Wrong()})


async def test_plugin_routes_only_on_their_listener(sidecar_factory: Any) -> None:
    from sidecar.testing import minimal_manifest

    sc = await sidecar_factory(
        manifest=minimal_manifest(ingress=(8001, 8200)),
        plugins={"vaultish": RoutePlugin("/v1/x")},
        listen_ports={"vaultish": 8200},
    )
    await sc.wait_started()
    async with sc.session.get(sc.url("/v1/x", 8200)) as resp:
        assert resp.status == 200
    for port in (8001, 9000):
        async with sc.session.get(sc.url("/v1/x", port)) as resp:
            assert resp.status == 404


# --------------------------------------------------------------------------- lifespans and readiness


class Slow:
    """Start-up blocks until released, so the test can observe the not-ready window."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.events: list[str] = []

    @hookimpl
    def register_routes(self) -> list[Route]:
        return [Route("GET", "/slow", ok)]

    @hookimpl
    async def lifespan(self, context: PluginContext) -> AsyncIterator[None]:
        self.events.append(f"start {context.name}")
        await self.release.wait()
        yield
        self.events.append(f"stop {context.name}")


async def test_ready_is_503_until_startup_finishes_and_routes_are_gated(sidecar_factory: Any) -> None:
    slow = Slow()
    sc = await sidecar_factory(plugins={"slow": slow})
    async with sc.session.get(sc.url("/enclave/health")) as resp:
        assert resp.status == 200  # health is up while plugins start
    async with sc.session.get(sc.url("/enclave/ready")) as resp:
        assert resp.status == 503
        assert await resp.json() == {"ready": False, "plugins": {"slow": "starting"}}
    async with sc.session.get(sc.url("/slow")) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "plugin 'slow' is not ready"
    slow.release.set()
    await sc.wait_started()
    async with sc.session.get(sc.url("/enclave/ready")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ready": True, "plugins": {"slow": "ready"}}
    async with sc.session.get(sc.url("/slow")) as resp:
        assert resp.status == 200


async def test_cleanups_run_in_reverse_order(tmp_path: Path) -> None:
    a, b = Slow(), Slow()
    shared: list[str] = []
    a.events = b.events = shared
    a.release.set()
    b.release.set()

    async with run_sidecar(state_dir=tmp_path, plugins={"a": a, "b": _NoRoutes(b)}) as sc:
        await sc.wait_started()
    assert shared == ["start a", "start b", "stop b", "stop a"]


class _NoRoutes:
    """Wrap a Slow plugin without its route, so two can share a listener."""

    def __init__(self, inner: Slow) -> None:
        self.inner = inner

    @hookimpl
    def lifespan(self, context: PluginContext) -> AsyncIterator[None]:
        return self.inner.lifespan(context)


class Failing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.cleaned = False

    @hookimpl
    async def lifespan(self) -> AsyncIterator[None]:
        raise self.exc
        yield  # pragma: no cover


async def test_startup_failure_names_plugin_and_keeps_detail_out_of_ready(
    sidecar_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Threat: an exception message (a key ARN, a token) published on the public readiness probe.
    sc = await sidecar_factory(plugins={"bad": Failing(ValueError("secret-detail-42"))})
    with pytest.raises(PluginStartupFailed, match="plugin 'bad': failed to start: ValueError"):
        await sc.wait_started()
    async with sc.session.get(sc.url("/enclave/ready")) as resp:
        assert resp.status == 503
        body = await resp.text()
    assert "secret-detail-42" not in body
    assert "failed to start: ValueError (details in the log)" in body
    assert any("secret-detail-42" in str(getattr(r, "sidecar_fields", "")) for r in caplog.records)


async def test_startup_error_with_public_reason(sidecar_factory: Any) -> None:
    sc = await sidecar_factory(plugins={"bad": Failing(PluginStartupError("KMS denied the data key"))})
    with pytest.raises(PluginStartupFailed, match="KMS denied the data key"):
        await sc.wait_started()
    async with sc.session.get(sc.url("/enclave/ready")) as resp:
        assert (await resp.json())["plugins"]["bad"] == "failed to start: KMS denied the data key"


async def test_lifespan_that_never_yields_fails(sidecar_factory: Any) -> None:
    class NoYield:
        @hookimpl
        async def lifespan(self) -> AsyncIterator[None]:
            if False:  # pragma: no cover
                yield

    sc = await sidecar_factory(plugins={"noyield": NoYield()})
    with pytest.raises(PluginStartupFailed, match="lifespan ended without yielding"):
        await sc.wait_started()


async def test_later_plugins_still_clean_up_after_an_earlier_failure(tmp_path: Path) -> None:
    good = Slow()
    good.release.set()
    async with run_sidecar(
        state_dir=tmp_path, plugins={"good": good, "bad": Failing(RuntimeError("x"))}
    ) as sc:
        with pytest.raises(PluginStartupFailed):
            await sc.wait_started()
    assert good.events == ["start good", "stop good"]


async def test_a_clean_up_leaking_cancelled_error_does_not_abort_the_shutdown(tmp_path: Path) -> None:
    # Threat: a clean-up awaiting a task it had just cancelled raised CancelledError out of stop():
    # earlier plugins (the core ones too) never cleaned up, and SIGTERM no longer exited 0.
    class Sloppy:
        @hookimpl
        async def lifespan(self) -> AsyncIterator[None]:
            worker = asyncio.ensure_future(asyncio.sleep(3600))
            yield
            worker.cancel()
            await worker

    good = Slow()
    good.release.set()
    async with run_sidecar(state_dir=tmp_path, plugins={"good": good, "sloppy": Sloppy()}) as sc:
        await sc.wait_started()
    assert good.events == ["start good", "stop good"]
    assert {s.status for s in sc.runtime.plugins.values() if s.name != "attestation"} == {Status.STOPPED}


async def test_readiness_hook_reason_is_reported(sidecar_factory: Any) -> None:
    class Unready:
        @hookimpl
        def readiness(self) -> str:
            return "list not loaded yet"

    sc = await sidecar_factory(plugins={"unready": Unready()})
    await sc.wait_started()
    async with sc.session.get(sc.url("/enclave/ready", 9000)) as resp:
        assert resp.status == 503
        assert (await resp.json())["plugins"] == {"unready": "list not loaded yet"}


async def test_services_not_configured_are_clear(sidecar_factory: Any) -> None:
    sc = await sidecar_factory(plugins={"plain": RoutePlugin("/p")})
    context = sc.runtime.plugins["plain"].context
    with pytest.raises(ServiceNotConfigured, match="attested KMS is not configured"):
        _ = context.kms
    with pytest.raises(ServiceNotConfigured, match="AWS client factory"):
        context.aws("s3")
    with pytest.raises(ServiceNotConfigured, match="attestation"):
        await context.attest(nonce=b"x")
    with pytest.raises(ServiceNotConfigured, match="egress HTTP session"):
        _ = context.http


def test_plugin_state_is_made_once_and_kept_per_plugin(tmp_path: Path) -> None:
    # Why: hooks of one plugin may be handed different context objects (the harness makes them
    # per call); a second state object would mean a second list, a second store, two writers.
    from sidecar.context import Services

    services = Services()
    made: list[str] = []

    def factory(context: PluginContext) -> dict[str, str]:
        made.append(context.name)
        return {"owner": context.name}

    first = PluginContext(name="a", config={}, listen_port=None, state_dir=tmp_path, services=services)
    again = PluginContext(name="a", config={}, listen_port=None, state_dir=tmp_path, services=services)
    other = PluginContext(name="b", config={}, listen_port=None, state_dir=tmp_path, services=services)
    assert first.state(factory) is again.state(factory)
    assert other.state(factory) == {"owner": "b"}
    assert other.state(factory) is not first.state(factory)
    assert made == ["a", "b"]


async def test_a_clean_up_that_hangs_is_abandoned_after_shutdown_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Threat: a clean-up waiting on a peer that never answers keeps SIGTERM from ever exiting, and
    # the plugins before it never clean up.
    class Stuck:
        @hookimpl
        async def lifespan(self) -> AsyncIterator[None]:
            yield
            await asyncio.Event().wait()  # never set

    good = Slow()
    good.release.set()
    started = asyncio.get_running_loop().time()
    async with run_sidecar(
        state_dir=tmp_path, plugins={"good": good, "stuck": Stuck()}, settings={"shutdown_timeout": 1}
    ) as sc:
        await sc.wait_started()
    assert asyncio.get_running_loop().time() - started < 10
    assert good.events == ["start good", "stop good"]
    assert sc.runtime.plugins["stuck"].status is Status.STOPPED
    failed = [r for r in caplog.records if r.getMessage() == "plugin_cleanup_failed"]
    assert len(failed) == 1
    assert "did not finish within 1 s" in str(getattr(failed[0], "sidecar_fields", {}))
