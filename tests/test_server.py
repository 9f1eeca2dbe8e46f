"""The server's middleware, listeners and logs: limits, error boundary, request ids, sensitive routes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar import Route, hookimpl
from sidecar.config import ConfigError, parse_manifest, parse_settings
from sidecar.logs import JsonFormatter, event
from sidecar.server import build_runtime
from sidecar.testing import minimal_manifest


async def echo_length(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=str(len(body)))


async def explode(request: web.Request) -> web.Response:
    raise RuntimeError("database password is hunter2")


async def teapot(request: web.Request) -> web.Response:
    raise web.HTTPConflict(text="custom conflict body", content_type="text/plain")


async def lookup(request: web.Request) -> web.Response:
    return web.Response(text=f"checked {request.query.get('name', '')}")


class Demo:
    @hookimpl
    def register_routes(self) -> list[Route]:
        return [
            Route("POST", "/echo", echo_length),
            Route("POST", "/big", echo_length, max_body_bytes=4096),
            Route("GET", "/explode", explode),
            Route("GET", "/conflict", teapot),
            Route("GET", "/lookup/{kind}", lookup, sensitive=True),
            Route("GET", "/plain", lookup),
        ]


SMALL_LIMIT = {"limits": {"max_body_bytes": 1024}}


@pytest.fixture
async def sc(sidecar_factory: Any) -> Any:
    harness = await sidecar_factory(plugins={"demo": Demo()}, settings=SMALL_LIMIT)
    await harness.wait_started()
    harness.runtime.access_sink.stream = io.StringIO()
    return harness


def access_lines(sc: Any) -> list[dict[str, Any]]:
    sc.runtime.access_sink.flush()
    return [json.loads(line) for line in sc.runtime.access_sink.stream.getvalue().splitlines()]


async def test_health_and_request_id(sc: Any) -> None:
    ids = set()
    for _ in range(3):
        async with sc.session.get(sc.url("/enclave/health")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            assert await resp.json() == {"status": "ok"}
            ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 3 and all(len(i) == 16 for i in ids)


async def test_not_found_and_method_not_allowed_are_json_with_request_id(sc: Any) -> None:
    async with sc.session.get(sc.url("/missing")) as resp:
        assert resp.status == 404
        body = await resp.json()
        assert body["error"] == "not found"
        assert body["request_id"] == resp.headers["X-Request-Id"]
    async with sc.session.delete(sc.url("/enclave/health")) as resp:
        assert resp.status == 405
        assert (await resp.json())["allowed"] == ["GET", "HEAD"]
        assert resp.headers["Allow"] == "GET,HEAD"


async def test_body_over_limit_by_content_length_is_413_json(sc: Any) -> None:
    async with sc.session.post(sc.url("/echo"), data=b"x" * 1025) as resp:
        assert resp.status == 413
        body = await resp.json()
        assert body["error"] == "request body too large: the limit is 1024 bytes"
        assert body["limit"] == 1024
        assert "X-Request-Id" in resp.headers
    async with sc.session.post(sc.url("/echo"), data=b"x" * 1024) as resp:
        assert resp.status == 200
        assert await resp.text() == "1024"


async def test_chunked_body_over_limit_is_413_json(sc: Any) -> None:
    # Threat: a client avoids the Content-Length check by streaming an unbounded chunked body.
    async def chunks() -> Any:
        for _ in range(8):
            yield b"y" * 512

    async with sc.session.post(sc.url("/echo"), data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "request body too large: the limit is 1024 bytes"


async def test_route_can_raise_its_own_limit(sc: Any) -> None:
    async with sc.session.post(sc.url("/big"), data=b"z" * 4000) as resp:
        assert resp.status == 200
        assert await resp.text() == "4000"
    async with sc.session.post(sc.url("/big"), data=b"z" * 4097) as resp:
        assert resp.status == 413
        assert (await resp.json())["limit"] == 4096


async def test_unexpected_exception_is_500_without_detail(sc: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Threat: stack traces and exception text (here a password) leaking to clients.
    with caplog.at_level(logging.ERROR, logger="sidecar.server"):
        async with sc.session.get(sc.url("/explode")) as resp:
            assert resp.status == 500
            text = await resp.text()
            rid = resp.headers["X-Request-Id"]
    assert json.loads(text) == {"error": "internal error", "request_id": rid}
    assert "hunter2" not in text and "Traceback" not in text
    record = next(r for r in caplog.records if r.getMessage() == "unhandled_error")
    assert record.sidecar_fields["request_id"] == rid  # type: ignore[attr-defined]
    assert record.sidecar_fields["route"] == "/explode"  # type: ignore[attr-defined]
    assert record.exc_info is not None


async def test_a_handler_returning_no_response_is_a_logged_500_with_request_id(
    sidecar_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Guards: a handler's missing return was aiohttp's text 500, without a request id or a log line.
    async def forgot(request: web.Request) -> web.Response:
        web.Response(text="never returned")
        return None  # type: ignore[return-value]

    class Forgetful:
        @hookimpl
        def register_routes(self) -> list[Route]:
            return [Route("GET", "/forgot", forgot)]

    harness = await sidecar_factory(plugins={"forgetful": Forgetful()})
    await harness.wait_started()
    with caplog.at_level(logging.ERROR, logger="sidecar.server"):
        async with harness.session.get(harness.url("/forgot")) as resp:
            assert resp.status == 500
            assert (await resp.json())["request_id"] == resp.headers["X-Request-Id"]
    logged = [r for r in caplog.records if r.getMessage() == "unhandled_error"]
    assert logged[0].sidecar_fields["request_id"] == resp.headers["X-Request-Id"]  # type: ignore[attr-defined]


async def test_plugin_error_bodies_pass_through(sc: Any) -> None:
    async with sc.session.get(sc.url("/conflict")) as resp:
        assert resp.status == 409
        assert await resp.text() == "custom conflict body"
        assert "X-Request-Id" in resp.headers


async def test_access_log_never_records_sensitive_paths_or_queries(sc: Any) -> None:
    # Threat: passenger names (query strings, path segments) accumulating in logs outside the enclave.
    async with sc.session.get(sc.url("/lookup/passenger"), params={"name": "Big Bird"}) as resp:
        assert await resp.text() == "checked Big Bird"
    async with sc.session.get(sc.url("/plain"), params={"name": "Oscar"}) as resp:
        assert resp.status == 200
    lines = access_lines(sc)
    raw = sc.runtime.access_sink.stream.getvalue()
    assert "Big" not in raw and "Bird" not in raw and "passenger" not in raw and "Oscar" not in raw
    sensitive = next(line for line in lines if line["path"] == "/lookup/{kind}")
    assert sensitive["status"] == 200 and sensitive["method"] == "GET"
    assert sensitive["listener"] == "ingress:8001"
    plain = next(line for line in lines if line["path"] == "/plain")
    assert plain["request_id"] and plain["level"] == "info" and plain["event"] == "access"


async def test_access_log_never_records_a_path_no_route_matched(sc: Any) -> None:
    """Threat (found by review): a name sent in a mistyped or percent-encoded URL
    (``/enclave/passenger%3Fname=...``) is a 404, and its path went to the log as sent."""
    paths = (
        "/enclave/passenger%3Fname=Secretname%20Zqxv",
        "/enclave/passenger/Secretname%20Zqxv",
        # An encoded newline: "." in a route pattern does not match it, so no route took it and
        # aiohttp answered itself, without a request id, logging the raw path (found by review).
        "/enclave/passenger/Secretname%0AZqxv",
    )
    for path in paths:
        async with sc.session.get(sc.url(path)) as resp:
            assert resp.status == 404 and resp.headers["X-Request-Id"]
            assert (await resp.json())["error"] == "not found"
    async with sc.session.delete(sc.url("/lookup/Secretname%0AZqxv")) as resp:
        assert resp.status in (404, 405) and resp.headers["X-Request-Id"]
    lines = access_lines(sc)
    raw = sc.runtime.access_sink.stream.getvalue()
    assert "Secretname" not in raw and "Zqxv" not in raw
    assert {line["path"] for line in lines if line["status"] in (404, 405)} <= {"/{tail}", "/lookup/{kind}"}


async def test_a_body_that_cannot_be_decoded_is_a_400_not_a_500(sc: Any) -> None:
    """Found by review: aiohttp's RequestPayloadError (a Content-Encoding that does not decode)
    escaped as a 500 from every plugin that reads a body."""
    headers = {"Content-Encoding": "gzip"}
    async with sc.session.post(
        sc.url("/echo"), data=b"\x1f\x8b\x08\x00 not gzip at all", headers=headers
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert (
        body["error"]
        == "the request body cannot be read: its Content-Encoding or chunked encoding is not valid"
    )


async def test_access_log_can_be_switched_off(sidecar_factory: Any) -> None:
    harness = await sidecar_factory(plugins={"demo": Demo()}, settings={"log": {"access": False}})
    harness.runtime.access_sink.stream = io.StringIO()
    async with harness.session.get(harness.url("/enclave/health")) as resp:
        assert resp.status == 200
    assert access_lines(harness) == []


async def test_api_listener_binds_loopback_only(sidecar_factory: Any) -> None:
    harness = await sidecar_factory(settings={"listen_host": "0.0.0.0"})
    api = next(li for li in harness.runtime.listeners if li.audience == "api")
    assert harness.runtime.address(api).startswith("127.0.0.1:")
    ingress = harness.runtime.listeners[0]
    assert harness.runtime.address(ingress).startswith("0.0.0.0:")


async def raw_exchange(sc: Any, request: bytes) -> bytes:
    """Send ``request`` as bytes; the first answer (the server shares this event loop: asyncio
    streams, not a blocking socket)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.runtime.bound_port(8001))
    writer.write(request)
    reply = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return reply


async def test_malformed_http_gets_400_not_a_crash(sc: Any) -> None:
    reply = await raw_exchange(sc, b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
    assert reply.split(b" ", 2)[1] == b"400"
    assert b"Invalid method" in reply
    async with sc.session.get(sc.url("/enclave/health")) as resp:
        assert resp.status == 200  # the server is still fine


async def test_unknown_expectation_is_a_json_417_with_request_id(sc: Any) -> None:
    # Guards: aiohttp answered an unknown Expect itself, in text echoing it, without a request id.
    for path in ("/echo", "/enclave/health", "/missing"):
        reply = await raw_exchange(
            sc, f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: bogus\r\nContent-Length: 2\r\n\r\nab".encode()
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 417 ") and b"X-Request-Id: " in head
        assert json.loads(body)["error"] == "expectation failed: only 100-continue is supported"


async def test_expect_continue_is_not_sent_for_a_body_the_route_refuses(sc: Any) -> None:
    # Threat: "100 Continue" then a 413 made the client upload a body too large to be read at all.
    reply = await raw_exchange(
        sc, b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 999999\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 413 ") and b"X-Request-Id: " in reply
    async with sc.session.post(sc.url("/echo"), data=b"x" * 100, expect100=True) as resp:
        assert (resp.status, await resp.text()) == (200, "100")  # a body within the limit still goes


async def test_a_target_that_is_not_a_path_is_a_json_404_with_request_id(sc: Any) -> None:
    # Guards: "OPTIONS *" matched no "/..." pattern, and aiohttp answered a text 404 without an id.
    reply = await raw_exchange(sc, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and b"X-Request-Id: " in head
    assert json.loads(body)["error"] == "not found"
    assert access_lines(sc)[-1]["path"] == "/{tail}"


async def test_a_start_that_fails_closes_what_it_opened(tmp_path: Path) -> None:
    # Threat: a TLS key pair that did not load left the listeners opened before it serving, and
    # the plugins started, after start() raised (run_sidecar only stops a started sidecar).
    manifest = minimal_manifest()
    manifest["ingress"][0]["tls"] = {"cert_file": "missing.pem", "key_file": "missing.key"}
    parsed = parse_manifest(manifest, tmp_path / "enclaver.yaml")
    settings = parse_settings({"state_dir": str(tmp_path)}, tmp_path / "sidecar.yaml", parsed)
    runtime = build_runtime(parsed, settings, bind_ports={8001: 0, 9000: 0})
    with pytest.raises(ConfigError, match="cannot load key pair"):
        await runtime.start()
    assert runtime.runners == {}  # the api listener, opened first, is closed again
    assert runtime.access_sink._task is None  # and the primary's lifespan ran its clean-up


def test_json_formatter_one_line_with_fields_and_exception() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sidecar.test.formatter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        event(logger, logging.INFO, "listening", port=8001, listener="ingress:8001")
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "listening" and first["port"] == 8001 and first["level"] == "info"
    assert first["ts"].endswith("Z") and first["logger"] == "sidecar.test.formatter"
    assert second["level"] == "error" and "ValueError: bad\nthing" in second["exception"]
