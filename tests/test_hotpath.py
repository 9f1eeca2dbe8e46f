"""The aiohttp fields the per-request code reads directly (sidecar.hotpath), and the start-up check.

Threat: an aiohttp upgrade that moves one of these private fields. Read blindly, a renamed field
turns every request into a 500 (or, worse, a field that kept its name but changed its meaning
would put wrong statuses in the audit trail). The check runs before anything listens and names
the field; the sidecar then refuses to start.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar import hotpath
from sidecar.hotpath import ResponseTemplate, UnsupportedAiohttp, aiohttp_disagreements, check_aiohttp
from tests.test_example_plugin import env_with, write_configs

OTHER_MATCH: Any = web.UrlMappingMatchInfo({}, None)  # type: ignore[arg-type]
# Each public property, and what an aiohttp that moved its field would make it disagree with.
MOVED = [
    (web.StreamResponse, "status", property(lambda self: 200), "StreamResponse._status"),
    (web.StreamResponse, "body_length", property(lambda self: 1), "StreamResponse._body_length"),
    (web.StreamResponse, "headers", property(lambda self: {}), "StreamResponse._headers"),
    (web.BaseRequest, "method", property(lambda self: "GET"), "BaseRequest._method"),
    (web.BaseRequest, "body_exists", property(lambda self: True), "BaseRequest._payload"),
    (web.BaseRequest, "get", lambda self, key, default=None: "moved", "BaseRequest._state"),
    (
        web.Request,
        "match_info",
        property(lambda self: web.UrlMappingMatchInfo({}, None)),
        "Request._match_info",
    ),
    (web.UrlMappingMatchInfo, "route", property(lambda self: None), "UrlMappingMatchInfo._route"),
]


def test_the_installed_aiohttp_keeps_every_field_where_the_hot_path_reads_it() -> None:
    assert aiohttp_disagreements() == []
    check_aiohttp()  # does not raise


@pytest.mark.parametrize(("cls", "name", "moved", "field"), MOVED, ids=[m[3] for m in MOVED])
def test_a_moved_field_is_named(monkeypatch: Any, cls: type, name: str, moved: Any, field: str) -> None:
    monkeypatch.setattr(cls, name, moved)
    assert aiohttp_disagreements() == [field]
    with pytest.raises(UnsupportedAiohttp) as err:
        check_aiohttp()
    assert f"aiohttp {aiohttp.__version__} does not keep {field} " in str(err.value)


async def test_the_harness_refuses_to_start_on_a_moved_field(sidecar_factory: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(hotpath, "aiohttp_disagreements", lambda: ["BaseRequest._method"])
    with pytest.raises(UnsupportedAiohttp, match=r"BaseRequest\._method"):
        await sidecar_factory()


def test_sidecar_run_refuses_to_start_with_one_line_and_exit_1(tmp_path: Path) -> None:
    # A sitecustomize stands in for an aiohttp release whose request.method no longer reads _method.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "from aiohttp import web\nweb.BaseRequest.method = property(lambda self: 'GET')\n"
    )
    manifest, config, _, _ = write_configs(
        tmp_path, {}, attestation={"nsm": "off"}, state_dir=str(tmp_path / "state")
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config)],
        cwd=tmp_path,
        env=env_with(shim),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: aiohttp {aiohttp.__version__} does not keep BaseRequest._method as the sidecar expects "
        "(it reads them on every request); install an aiohttp whose fields agree (3.14 does)"
    ]
    assert '"listening"' not in result.stderr  # it refused before anything listened


# ResponseTemplate. Threat: a response built from fields copied past aiohttp's constructor that
# no longer match what the constructor builds (a field added, renamed or dropped by an upgrade)
# would go out with wrong headers or status, or share state between two clients' responses.

NOTE = web.ResponseKey("note", str)
TEMPLATE_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}


@pytest.mark.parametrize("status", [200, 201, 404, 429, 503])
def test_a_templated_response_is_the_constructors_response(status: int) -> None:
    template = ResponseTemplate(TEMPLATE_HEADERS, status)
    assert template.copies
    for body in (b"", b"Big Bird is cleared to fly\n", bytes(range(256))):
        direct = template.response(body)
        built = web.Response(status=status, headers=TEMPLATE_HEADERS, body=body)
        assert type(direct) is web.Response
        assert vars(direct) == vars(built)
        assert (direct.status, direct.reason, direct.body, direct.headers) == (
            built.status,
            built.reason,
            built.body,
            built.headers,
        )


def test_templated_responses_share_no_state() -> None:
    # A handler (or the route wrapper, adding X-Request-Id) changes its own response only.
    template = ResponseTemplate(TEMPLATE_HEADERS)
    first, second = template.response(b"a"), template.response(b"b")
    first.headers["X-Request-Id"] = "0123456789abcdef"
    first[NOTE] = "first"
    assert "X-Request-Id" not in second.headers and "X-Request-Id" not in template.headers
    assert NOTE not in second and second.body == b"b"
    assert first.headers is not second.headers


async def test_a_templated_response_goes_over_the_wire_as_the_constructors(aiohttp_client: Any) -> None:
    template = ResponseTemplate(TEMPLATE_HEADERS, 201)

    async def direct(request: web.Request) -> web.Response:
        return template.response(b"verdict\n")

    async def built(request: web.Request) -> web.Response:
        return web.Response(status=201, headers=TEMPLATE_HEADERS, body=b"verdict\n")

    app = web.Application()
    app.router.add_get("/direct", direct)
    app.router.add_get("/built", built)
    client = await aiohttp_client(app)
    answers = []
    for path in ("/direct", "/built"):
        async with client.get(path) as resp:
            headers = {k: v for k, v in resp.headers.items() if k != "Date"}
            answers.append((resp.status, headers, await resp.read()))
    assert answers[0] == answers[1]
    assert answers[0][1]["Content-Length"] == "8" and answers[0][1]["Cache-Control"] == "no-store"


# What an aiohttp release might change in the constructor, applied after aiohttp's own __init__.
CHANGES = {
    "a field added": lambda response: setattr(response, "_trailers", []),
    "a field dropped": lambda response: delattr(response, "_zlib_executor"),
    "a body-dependent field": lambda response: setattr(response, "_compressed_body", response._body),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_template_that_disagrees_with_the_constructor_uses_the_constructor(
    monkeypatch: Any, change: Any
) -> None:
    original = web.Response.__init__

    def changed(self: web.Response, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        change(self)

    monkeypatch.setattr(web.Response, "__init__", changed)
    template = ResponseTemplate(TEMPLATE_HEADERS, 404)
    response = template.response(b"x")
    assert not template.copies
    assert vars(response) == vars(web.Response(status=404, headers=TEMPLATE_HEADERS, body=b"x"))


def test_a_slotted_response_falls_back_to_the_constructor(monkeypatch: Any) -> None:
    class Slotted:
        __slots__ = ("_state",)

    monkeypatch.setattr(hotpath, "_new_response", lambda cls: Slotted())
    template = ResponseTemplate(TEMPLATE_HEADERS)
    assert not template.copies
    assert template.response(b"x").body == b"x"


async def test_a_template_off_is_a_warning_and_health_still_answers(
    sidecar_factory: Any, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator learns at start-up that responses cost the constructor again (an aiohttp
    # upgrade); nothing else changes.
    from sidecar import server

    monkeypatch.setattr(server.HEALTH_ANSWER, "_copies", False)
    with caplog.at_level(logging.WARNING, logger="sidecar.server"):
        harness = await sidecar_factory()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "response_template_off"
    ]
    async with harness.session.get(harness.url("/enclave/health")) as resp:
        assert resp.status == 200 and await resp.read() == b'{"status":"ok"}'
        assert resp.headers["Content-Type"] == "application/json" and resp.headers["X-Request-Id"]


async def test_no_warning_when_the_template_copies(
    sidecar_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.server"):
        await sidecar_factory()
    assert "response_template_off" not in [r.getMessage() for r in caplog.records]
