"""What the server's fast paths must keep: a request id on every response, limits, and the access log.

The per-request code (route wrappers, the access logger, the batched renderer) was trimmed for
throughput (bench/RESULTS.md). These tests pin the behaviour that trimming must never lose: every
response carries its request id (core routes, plugin routes, 404/405/413/500/503), the body limit
applies to core routes too, and every access line is valid JSON with the same fields, correct
timestamps, and no concrete path or query of a sensitive route.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar import Route, hookimpl
from sidecar.context import PluginContext
from sidecar.logs import AccessLogSink, AccessRecord
from sidecar.server import REQUEST_ID, request_ids
from tests.test_server import raw_exchange

HEX16 = re.compile(r"[0-9a-f]{16}")
FIELDS = ["ts", "level", "logger", "event", "listener", "method", "path", "status", "bytes_sent", "us"]
FIELDS.append("request_id")


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"request_id": request[REQUEST_ID]})


async def explode(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail")


async def read_body(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


class Gate:
    """A plugin whose start-up waits until released, with routes of each kind."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    @hookimpl
    def register_routes(self) -> list[Route]:
        return [
            Route("GET", "/whoami", whoami),
            Route("GET", "/explode", explode),
            Route("POST", "/read", read_body),
            Route("GET", "/passenger/{name}", whoami, sensitive=True),
            Route("GET", "/verdict", whoami, sensitive=True),
            Route("GET", "/files/{name}", whoami),
        ]

    @hookimpl
    async def lifespan(self, context: PluginContext) -> AsyncIterator[None]:
        await self.release.wait()
        yield


@pytest.fixture
async def sc(sidecar_factory: Any) -> Any:
    gate = Gate()
    harness = await sidecar_factory(plugins={"gate": gate}, settings={"limits": {"max_body_bytes": 1024}})
    harness.gate = gate
    harness.runtime.access_sink.stream = io.StringIO()
    return harness


def access_lines(sc: Any) -> list[dict[str, Any]]:
    sc.runtime.access_sink.flush()
    return [json.loads(line) for line in sc.runtime.access_sink.stream.getvalue().splitlines()]


async def call(sc: Any, method: str, path: str, **kwargs: Any) -> tuple[int, str, bytes]:
    async with sc.session.request(method, sc.url(path), **kwargs) as resp:
        rid = resp.headers.get("X-Request-Id", "")
        return resp.status, rid, await resp.read()


async def test_every_kind_of_response_carries_its_request_id(sc: Any) -> None:
    # Threat: a response without an id cannot be tied to its log lines when an incident is investigated.
    seen: list[str] = []
    for method, path, kwargs, status in [
        ("GET", "/enclave/health", {}, 200),
        ("HEAD", "/enclave/health", {}, 200),
        ("GET", "/enclave/ready", {}, 503),  # the plugin is still starting
        ("GET", "/whoami", {}, 503),  # gated until the plugin started
        ("GET", "/nowhere", {}, 404),
        ("POST", "/enclave/health", {}, 405),
        ("release", "", {}, 0),
        ("POST", "/read", {"data": b"x" * 1025}, 413),
        ("POST", "/read", {"data": b"x" * 1024}, 200),
    ]:
        if method == "release":
            sc.gate.release.set()
            await sc.wait_started()
            continue
        got, rid, body = await call(sc, method, path, **kwargs)
        assert got == status, (method, path)
        assert HEX16.fullmatch(rid), (method, path, rid)
        if body.startswith(b"{"):  # every JSON error body names the same id as the header
            assert json.loads(body).get("request_id", rid) == rid
        seen.append(rid)
    status, rid, body = await call(sc, "GET", "/explode")
    assert status == 500 and json.loads(body) == {"error": "internal error", "request_id": rid}
    seen.append(rid)
    status, rid, body = await call(sc, "GET", "/whoami")
    assert status == 200 and json.loads(body) == {"request_id": rid}  # handlers see the header's id
    seen.append(rid)
    assert len(set(seen)) == len(seen)
    logged = {line["request_id"] for line in access_lines(sc)}
    assert set(seen) <= logged


async def test_core_routes_enforce_the_declared_body_limit(sc: Any) -> None:
    # Threat: an oversized declared body on a core route would be read and drained, not refused.
    status, rid, body = await call(sc, "GET", "/enclave/health", data=b"y" * 1025)
    assert status == 413
    assert json.loads(body) == {
        "error": "request body too large: the limit is 1024 bytes",
        "limit": 1024,
        "request_id": rid,
    }
    status, _, body = await call(sc, "GET", "/enclave/health", data=b"y" * 1024)
    assert status == 200 and json.loads(body) == {"status": "ok"}


async def test_sensitive_route_logs_its_pattern_only(sc: Any) -> None:
    # Threat: names in paths or queries of a sensitive route accumulating in logs outside the enclave.
    sc.gate.release.set()
    await sc.wait_started()
    # HEAD too: a GET route's resource answers HEAD with a route of its own.
    for method, name in (("GET", "Big Bird"), ("GET", "Oscar"), ("HEAD", "Elmo")):
        status, _, _ = await call(sc, method, f"/passenger/{name}", params={"q": name})
        assert status == 200
    lines = access_lines(sc)
    raw = sc.runtime.access_sink.stream.getvalue()
    assert not any(n in raw for n in ("Big", "Bird", "Oscar", "Elmo", "q="))
    assert [line["path"] for line in lines] == ["/passenger/{name}"] * 3
    assert [line["method"] for line in lines] == ["GET", "GET", "HEAD"]


async def test_every_kind_of_route_logs_the_path_its_rule_gives(sc: Any) -> None:
    # The logger finds a fixed path by the request's route; the path it writes must be the one the
    # rules give: a fixed path as it is (sensitive or not: its pattern is the path), a request for
    # a public fixed path that another route answered (a 405) as that path, a sensitive pattern's
    # request as the pattern, and a path no route took as the fallback's pattern.
    sc.gate.release.set()
    await sc.wait_started()
    cases = [  # method, path requested, status, path logged
        ("GET", "/enclave/health?probe=1", 200, "/enclave/health"),
        ("POST", "/enclave/health", 405, "/enclave/health"),
        ("GET", "/whoami", 200, "/whoami"),
        ("GET", "/verdict?name=Secretname", 200, "/verdict"),
        ("HEAD", "/verdict", 200, "/verdict"),
        ("GET", "/passenger/Secretname", 200, "/passenger/{name}"),
        ("GET", "/nowhere/Secretname", 404, "/{tail}"),
    ]
    for method, path, status, _ in cases:
        assert (await call(sc, method, path))[0] == status
    logged = [(line["method"], line["path"], line["status"]) for line in access_lines(sc)]
    assert logged == [(method, path, status) for method, _, status, path in cases]
    assert "Secretname" not in sc.runtime.access_sink.stream.getvalue()


async def test_public_path_is_logged_as_routed_with_encoded_slashes_kept(sc: Any) -> None:
    # An encoded slash is data, not a path separator: decoding it in the log would make a request
    # for the file "a/b" look like a request for the directory "a".
    sc.gate.release.set()
    await sc.wait_started()
    async with sc.session.get(URL(sc.url("/files/a%2Fb%20c%25"), encoded=True)) as resp:
        assert resp.status == 200
    assert [line["path"] for line in access_lines(sc)] == ["/files/a%2Fb c%25"]


async def test_access_line_fields_are_what_was_sent(sc: Any) -> None:
    # The logger reads the fields behind aiohttp's properties (sidecar.hotpath): the line must still
    # say what went over the wire, byte for byte.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.runtime.bound_port(8001))
    writer.write(b"GET /enclave/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    sent = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await asyncio.sleep(0.05)
    (line,) = access_lines(sc)
    rid = re.search(rb"X-Request-Id: ([0-9a-f]{16})\r\n", sent)
    assert rid is not None and sent.startswith(b"HTTP/1.1 200 ")
    assert (line["method"], line["status"], line["request_id"]) == ("GET", 200, rid.group(1).decode())
    assert sent.endswith(b'{"status":"ok"}') and line["bytes_sent"] == len(sent)


async def test_malformed_request_is_logged_without_an_id(sc: Any) -> None:
    # aiohttp answers a malformed request itself; the access log must still write a valid line.
    await raw_exchange(sc, b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0.05)
    lines = access_lines(sc)
    assert lines and lines[-1]["status"] == 400 and lines[-1]["request_id"] == ""
    assert list(lines[-1]) == FIELDS


def test_request_ids_are_random_hex_and_unique_across_batches() -> None:
    ids = request_ids(batch=4)
    drawn = [next(ids) for _ in range(4099)]
    assert all(HEX16.fullmatch(i) for i in drawn)
    assert len(set(drawn)) == len(drawn)
    assert next(request_ids()) != next(request_ids())  # two runtimes do not share a sequence


HEAD = '"level":"info","logger":"sidecar.access","event":"access","listener":"ingress:1",'


def record(t: float, path: str = "/p", status: int = 200, sent: int = 15, head: str = HEAD) -> AccessRecord:
    return (t, head, "GET", path, status, sent, 0.0001234, "0123456789abcdef")


def test_render_keeps_fields_apart_and_escapes_paths() -> None:
    sink = AccessLogSink(stream=io.StringIO())
    other = HEAD.replace("ingress:1", "api:2")
    records = [
        record(1.0, "/a"),
        record(1.0, "/a", status=404),
        record(1.0, "/a", sent=99),
        record(1.0, "/a", head=other),
        record(1.0, '/quote"back\\slash\nnew line \u00e9'),
    ]
    for _ in range(2):  # the second pass renders from the caches
        lines = [json.loads(line) for line in sink.render(records).splitlines()]
        assert [(x["listener"], x["path"], x["status"], x["bytes_sent"]) for x in lines] == [
            ("ingress:1", "/a", 200, 15),
            ("ingress:1", "/a", 404, 15),
            ("ingress:1", "/a", 200, 99),
            ("api:2", "/a", 200, 15),
            ("ingress:1", '/quote"back\\slash\nnew line \u00e9', 200, 15),
        ]
        assert all(list(x) == FIELDS and x["us"] == 123 for x in lines)


def test_render_cache_is_bounded_and_stays_correct() -> None:
    # Threat: a scan of random paths growing the renderer's cache without bound.
    sink = AccessLogSink(stream=io.StringIO())
    for start in range(0, 10_000, 1000):
        records = [record(1.0, f"/scan/{i}") for i in range(start, start + 1000)]
        lines = sink.render(records).splitlines()
        assert [json.loads(x)["path"] for x in lines] == [f"/scan/{i}" for i in range(start, start + 1000)]
        assert len(sink._middles) <= 4096


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=50))
def test_render_timestamps_name_the_millisecond_of_each_record(times: list[float]) -> None:
    # Records arrive roughly in order but not always (two listeners, clock steps): each line's ts
    # must still be its own record's millisecond, not a neighbour's.
    times = sorted(times)[: len(times) // 2] + times[len(times) // 2 :]
    sink = AccessLogSink(stream=io.StringIO())
    for t, line in zip(times, sink.render([record(t) for t in times]).splitlines(), strict=True):
        ts = datetime.strptime(json.loads(line)["ts"], "%Y-%m-%dT%H:%M:%S.%f%z")
        ms = round(ts.replace(tzinfo=UTC).timestamp() * 1000)
        assert ms <= t * 1000 + 1e-3 and t * 1000 < ms + 1 + 1e-3, (t, line)


def test_render_timestamps_at_millisecond_and_second_boundaries() -> None:
    sink = AccessLogSink(stream=io.StringIO())
    times = [1764287315.9985, 1764287315.9995, 1764287316.0, 1764287316.0005, 1764287316.001]
    got = [json.loads(x)["ts"] for x in sink.render([record(t) for t in times]).splitlines()]
    assert got == [
        "2025-11-27T23:48:35.998Z",
        "2025-11-27T23:48:35.999Z",
        "2025-11-27T23:48:36.000Z",
        "2025-11-27T23:48:36.000Z",
        "2025-11-27T23:48:36.001Z",
    ]
