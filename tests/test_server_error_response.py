"""A route's ``error_response``: the errors the sidecar answers for a route, in the route's protocol.

A plugin that speaks another protocol (vault_like speaks Vault's) has clients that only understand
that protocol's errors. The sidecar answers some errors itself, before or around the plugin's
handler: a declared body over the limit, a plugin not ready, an exception. These tests pin that
each of those reaches the client in the route's shape, that the route's other behaviour is
unchanged, and that a renderer which itself fails cannot turn a clear error into a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from sidecar import PluginContext, Route, hookimpl

LIMIT = 1024


def protocol_error(status: int, message: str) -> web.Response:
    """A made-up protocol's error: plain text, its own header."""
    return web.Response(status=status, text=f"ERR {status} {message}\n", headers={"X-Protocol": "demo"})


def broken_renderer(status: int, message: str) -> web.Response:
    raise RuntimeError("renderer bug")


async def read_all(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


async def explode(request: web.Request) -> web.Response:
    raise RuntimeError("database password is hunter2")


async def forbidden(request: web.Request) -> web.Response:
    raise web.HTTPForbidden()


async def not_allowed(request: web.Request) -> web.Response:
    raise web.HTTPMethodNotAllowed("DELETE", ["GET", "PUT"])


async def own_body(request: web.Request) -> web.Response:
    raise web.HTTPConflict(text="the plugin's own conflict body")


class Protocol:
    """Routes with a renderer, one without (the default shape), one whose renderer is broken."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()

    @hookimpl
    def register_routes(self) -> list[Route]:
        shaped = {"error_response": protocol_error, "max_body_bytes": LIMIT}
        return [
            Route("POST", "/p/read", read_all, **shaped),  # type: ignore[arg-type]
            Route("GET", "/p/explode", explode, **shaped),  # type: ignore[arg-type]
            Route("GET", "/p/forbidden", forbidden, **shaped),  # type: ignore[arg-type]
            Route("GET", "/p/not-allowed", not_allowed, **shaped),  # type: ignore[arg-type]
            Route("GET", "/p/own", own_body, **shaped),  # type: ignore[arg-type]
            Route("POST", "/plain/read", read_all, max_body_bytes=LIMIT),
            Route("POST", "/broken/read", read_all, max_body_bytes=LIMIT, error_response=broken_renderer),
        ]

    @hookimpl
    async def lifespan(self, context: PluginContext) -> AsyncIterator[None]:
        await self.release.wait()
        yield


@pytest.fixture
async def sc(sidecar_factory: Any) -> Any:
    harness = await sidecar_factory(plugins={"protocol": Protocol()})
    await harness.wait_started()
    return harness


async def test_declared_body_over_the_limit_is_refused_in_the_routes_shape(sc: Any) -> None:
    # Threat: memory exhaustion by a huge body; refused from its Content-Length, never read.
    async with sc.session.post(sc.url("/p/read"), data=b"x" * (LIMIT + 1)) as resp:
        assert resp.status == 413
        assert await resp.text() == f"ERR 413 request body too large: the limit is {LIMIT} bytes\n"
        assert resp.headers["X-Protocol"] == "demo" and len(resp.headers["X-Request-Id"]) == 16
    async with sc.session.post(sc.url("/p/read"), data=b"x" * LIMIT) as resp:
        assert (resp.status, await resp.text()) == (200, str(LIMIT))


async def test_streamed_body_over_the_limit_is_refused_in_the_routes_shape(sc: Any) -> None:
    # Threat: the same, with no Content-Length to check (chunked): refused while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 512

    async with sc.session.post(sc.url("/p/read"), data=chunks()) as resp:
        assert resp.status == 413
        assert await resp.text() == f"ERR 413 request body too large: the limit is {LIMIT} bytes\n"


async def test_exception_is_a_500_in_the_routes_shape_without_detail(
    sc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Threat: exception text (here a password) reaching the client through a plugin's error shape.
    with caplog.at_level(logging.ERROR, logger="sidecar.server"):
        async with sc.session.get(sc.url("/p/explode")) as resp:
            assert (resp.status, await resp.text()) == (500, "ERR 500 internal error\n")
            rid = resp.headers["X-Request-Id"]
    record = next(r for r in caplog.records if r.getMessage() == "unhandled_error")
    assert record.sidecar_fields["request_id"] == rid  # type: ignore[attr-defined]


async def test_aiohttp_errors_without_a_body_take_the_routes_shape(sc: Any) -> None:
    async with sc.session.get(sc.url("/p/forbidden")) as resp:
        assert (resp.status, await resp.text()) == (403, "ERR 403 forbidden\n")
    async with sc.session.get(sc.url("/p/not-allowed")) as resp:
        assert (resp.status, await resp.text()) == (405, "ERR 405 method not allowed\n")
        assert resp.headers["Allow"] == "GET,PUT"  # the error's own headers are kept


async def test_a_plugins_own_error_body_is_not_reshaped(sc: Any) -> None:
    async with sc.session.get(sc.url("/p/own")) as resp:
        assert (resp.status, await resp.text()) == (409, "the plugin's own conflict body")
        assert "X-Protocol" not in resp.headers


async def test_routes_without_a_renderer_keep_the_sidecars_shape(sc: Any) -> None:
    async with sc.session.post(sc.url("/plain/read"), data=b"x" * (LIMIT + 1)) as resp:
        assert resp.status == 413
        body = await resp.json()
        assert body == {
            "error": f"request body too large: the limit is {LIMIT} bytes",
            "limit": LIMIT,
            "request_id": resp.headers["X-Request-Id"],
        }


async def test_a_failing_renderer_falls_back_to_the_sidecars_shape(
    sc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug in a plugin's renderer must not turn a clear 413 into aiohttp's bare 500.
    with caplog.at_level(logging.ERROR, logger="sidecar.server"):
        async with sc.session.post(sc.url("/broken/read"), data=b"x" * (LIMIT + 1)) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == f"request body too large: the limit is {LIMIT} bytes"
            rid = resp.headers["X-Request-Id"]
    record = next(r for r in caplog.records if r.getMessage() == "error_response_failed")
    fields = record.sidecar_fields  # type: ignore[attr-defined]
    assert fields == {"request_id": rid, "status": 413, "error": "RuntimeError"}
    assert record.exc_info is None  # no traceback with the renderer's locals in the log


async def test_a_plugin_not_ready_answers_in_the_routes_shape(sidecar_factory: Any) -> None:
    plugin = Protocol()
    plugin.release.clear()  # start-up waits
    sc = await sidecar_factory(plugins={"protocol": plugin})
    async with sc.session.post(sc.url("/p/read"), data=b"x") as resp:
        assert (resp.status, await resp.text()) == (503, "ERR 503 plugin 'protocol' is not ready\n")
        assert "X-Request-Id" in resp.headers
    plugin.release.set()
    await sc.wait_started()
    async with sc.session.post(sc.url("/p/read"), data=b"x") as resp:
        assert (resp.status, await resp.text()) == (200, "1")
