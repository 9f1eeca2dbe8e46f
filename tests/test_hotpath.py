"""The aiohttp fields the per-request code reads directly (sidecar.hotpath), and the start-up check.

Threat: an aiohttp upgrade that moves one of these private fields. Read blindly, a renamed field
turns every request into a 500 (or, worse, a field that kept its name but changed its meaning
would put wrong statuses in the audit trail). The check runs before anything listens and names
the field; the sidecar then refuses to start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar import hotpath
from sidecar.hotpath import UnsupportedAiohttp, aiohttp_disagreements, check_aiohttp
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
