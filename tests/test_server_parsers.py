"""Per-listener request parsers: the pure-Python parser only where a route needs a method llhttp lacks.

Vault's API lists secrets with the method ``LIST`` (hvac's ``list_secrets``). aiohttp's C parser
(llhttp) answers it with 400, so a listener with a LIST route gets aiohttp's pure-Python parser
(sidecar/parsers.py) and every other listener keeps llhttp. The last tests pin the aiohttp
internals that module relies on: if an aiohttp upgrade changes one of them, they fail here, loudly,
instead of a listener silently losing its limits or its parser.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from typing import Any

import hvac
import pytest
from aiohttp import web, web_protocol
from aiohttp.http_parser import HttpRequestParserC, HttpRequestParserPy

from sidecar import Route, hookimpl
from sidecar.parsers import (
    _PARSER_SETTINGS,
    PythonParserAppRunner,
    PythonParserRequestHandler,
    PythonParserServer,
    llhttp_accepts,
    needs_python_parser,
)
from sidecar.plugins import PluginError
from sidecar.server import REQUEST_ID
from sidecar.testing import minimal_manifest

VAULT_PORT, OTHER_PORT, API_PORT = 8001, 8002, 9000


async def list_keys(request: web.Request) -> web.Response:
    token = request.headers.get("X-Vault-Token", "")
    keys = ["db", "api-key"] if token == "s.test" else []
    return web.json_response({"data": {"keys": keys}, "path": request.match_info["path"]})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "bytes": len(body), "id": request[REQUEST_ID]})


class Vaultish:
    @hookimpl
    def register_routes(self) -> list[Route]:
        return [
            Route("LIST", "/v1/secret/metadata/{path:.*}", list_keys),
            Route("POST", "/v1/echo", echo),
        ]


class Plain:
    @hookimpl
    def register_routes(self) -> list[Route]:
        return [Route("GET", "/plain", echo)]


@pytest.fixture
async def sc(sidecar_factory: Any) -> Any:
    harness = await sidecar_factory(
        plugins={"vaultish": Vaultish(), "plain": Plain()},
        listen_ports={"vaultish": VAULT_PORT, "plain": OTHER_PORT},
        manifest=minimal_manifest(ingress=[VAULT_PORT, OTHER_PORT], api=API_PORT),
        settings={"limits": {"max_field_bytes": 1024, "max_line_bytes": 1024}},
    )
    await harness.wait_started()
    return harness


async def raw(sc: Any, port: int, request: bytes) -> bytes:
    """Send ``request`` as bytes and return the whole answer (the server closes or answers once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.runtime.bound_port(port))
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lengths = [
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ]
        length = int(lengths[0]) if lengths else 0
        return head + await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_list_route_answers_list_on_its_listener_only(sc: Any) -> None:
    """LIST reaches the plugin's route; listeners without such a route keep llhttp (400 to LIST)."""
    async with sc.session.request("LIST", sc.url("/v1/secret/metadata/app/", VAULT_PORT)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"data": {"keys": []}, "path": "app/"}
        assert len(resp.headers["X-Request-Id"]) == 16
    for port in (OTHER_PORT, API_PORT):
        answer = await raw(sc, port, b"LIST /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(answer) == 400 and b"Invalid method" in answer  # llhttp's own message
    runners = {li.port: runner for li, runner in sc.runtime.runners.items()}
    assert isinstance(runners[VAULT_PORT].server, PythonParserServer)
    assert not isinstance(runners[OTHER_PORT].server, PythonParserServer)
    assert not isinstance(runners[API_PORT].server, PythonParserServer)


async def test_python_parser_listener_serves_everything_else_as_before(sc: Any) -> None:
    """The Python-parser listener still has health, bodies, keep-alive and the JSON 404/405."""
    async with sc.session.get(sc.url("/enclave/health", VAULT_PORT)) as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with sc.session.post(sc.url("/v1/echo", VAULT_PORT), data=b"x" * 5000) as resp:
        assert await resp.json() == {"method": "POST", "bytes": 5000, "id": resp.headers["X-Request-Id"]}
    async with sc.session.get(sc.url("/v1/secret/metadata/app", VAULT_PORT)) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "LIST"
    async with sc.session.request("LIST", sc.url("/nowhere", VAULT_PORT)) as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not found"
    # Chunked body and two pipelined requests on one connection.
    chunked = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.runtime.bound_port(VAULT_PORT))
    writer.write(chunked + b"LIST /v1/secret/metadata/a HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = b""
    while answers.count(b"HTTP/1.1 200") < 2 or not answers.endswith(b"}"):
        answers += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert b'"bytes": 3' in answers and b'"path": "a"' in answers


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Request smuggling: a body length given twice, two ways (RFC 9112 6.3).
        b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        # A header field over limits.max_field_bytes (1024 here).
        b"GET /enclave/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n",
        # A request line over limits.max_line_bytes.
        b"GET /enclave/health?" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        # A method that is not a token, and a bare LF inside a header.
        b"LI\x00ST / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n",
    ],
    ids=["cl-and-te", "long-field", "long-line", "bad-method", "bare-lf"],
)
async def test_python_parser_rejects_what_llhttp_rejects(sc: Any, request_bytes: bytes) -> None:
    """Threat: the slower parser is a weaker one (smuggling, oversized headers, lax syntax).

    Both listeners must refuse the same malformed requests, with the same configured limits.
    """
    for port in (VAULT_PORT, OTHER_PORT):
        answer = await raw(sc, port, request_bytes)
        assert 400 <= status(answer) < 500, (port, answer[:200])


async def test_hvac_list_secrets_reaches_the_route(sc: Any) -> None:
    client = hvac.Client(url=sc.url("", VAULT_PORT), token="s.test")
    answer = await asyncio.to_thread(client.secrets.kv.v2.list_secrets, path="app", mount_point="secret")
    assert answer["data"]["keys"] == ["db", "api-key"]


async def test_route_methods_must_be_http_tokens(sidecar_factory: Any) -> None:
    """A method no parser can deliver (a space, a slash) is a plugin bug: refuse it at start-up."""

    class Bad:
        @hookimpl
        def register_routes(self) -> list[Route]:
            return [Route("GE T", "/x", echo)]

    with pytest.raises(PluginError, match="not an HTTP method name"):
        await sidecar_factory(plugins={"bad": Bad()})


def test_which_methods_need_the_python_parser() -> None:
    assert llhttp_accepts("GET") and llhttp_accepts("PROPFIND") and llhttp_accepts("DELETE")
    assert not llhttp_accepts("LIST")
    assert not needs_python_parser(["GET", "POST", "*", "HEAD"])
    assert needs_python_parser(["GET", "LIST"])


# ---------------------------------------------------------------------- the aiohttp internals pinned


def test_aiohttp_uses_llhttp_by_default() -> None:
    """Without the C parser every listener would be on the slow path: the throughput budget is gone."""
    from aiohttp import http_parser

    assert http_parser.HttpRequestParser is HttpRequestParserC
    assert HttpRequestParserC is not HttpRequestParserPy


def test_request_handler_builds_its_parser_as_parsers_py_assumes() -> None:
    """RequestHandler.__init__ must still call HttpRequestParser(self, loop, read_bufsize, **same keywords).

    A new keyword there (a new limit, say) would be silently missing from the Python parser.
    """
    source = textwrap.dedent(inspect.getsource(web_protocol.RequestHandler.__init__))
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "HttpRequestParser"
    ]
    assert len(calls) == 1
    call = calls[0]
    assert [ast.unparse(a) for a in call.args] == ["self", "loop", "read_bufsize"]
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords == {
        "max_line_size": "max_line_size",
        "max_field_size": "max_field_size",
        "max_headers": "max_headers",
        "payload_exception": "RequestPayloadError",
        "auto_decompress": "auto_decompress",
        "max_msg_queue_size": "MAX_MSG_QUEUE_SIZE",
    }
    parameters = inspect.signature(web_protocol.RequestHandler.__init__).parameters
    assert set(_PARSER_SETTINGS) <= set(parameters)


async def test_python_parser_handler_swaps_only_the_parser() -> None:
    """The handler keeps its parser in BaseProtocol._parser; ours puts the Python one there, same limits."""

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response()

    loop = asyncio.get_running_loop()
    kwargs = {"max_line_size": 1111, "max_field_size": 2222, "max_headers": 33, "read_bufsize": 4444}
    server = PythonParserServer(handler, loop=loop, **kwargs)
    standard = web_protocol.RequestHandler(web.Server(handler, loop=loop), loop=loop, **kwargs)
    ours = server()
    assert type(ours) is PythonParserRequestHandler
    assert isinstance(standard._parser, HttpRequestParserC)
    parser = ours._parser
    assert isinstance(parser, HttpRequestParserPy)
    assert (parser.max_line_size, parser.max_field_size, parser.max_headers) == (1111, 2222, 33)
    assert parser._limit == 4444 and parser.protocol is ours and parser.loop is loop
    assert parser._max_msg_queue_size == web_protocol.MAX_MSG_QUEUE_SIZE
    assert parser.payload_exception is web_protocol.RequestPayloadError


async def test_runner_makes_its_server_through_make_server() -> None:
    """AppRunner.setup() must still get its Server from _make_server(), with Server._kwargs/_loop."""
    app = web.Application()
    runner = PythonParserAppRunner(app, max_line_size=1234)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, PythonParserServer)
        assert server._kwargs["max_line_size"] == 1234 and server._loop is asyncio.get_running_loop()
        assert server.request_handler == app._handle
        handler = server()
        assert isinstance(handler._parser, HttpRequestParserPy) and handler._parser.max_line_size == 1234
    finally:
        await runner.cleanup()


def test_server_passes_its_kwargs_and_loop_to_each_connection() -> None:
    """PythonParserServer.__call__ mirrors web.Server.__call__: it must still build the handler this way."""
    source = inspect.getsource(web.Server.__call__)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in source
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
