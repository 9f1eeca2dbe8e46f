"""An example third-party plugin: what a plugin author writes, installed through an entry point.

GET /greet?name=NAME answers "<greeting>, NAME!". The name is personal data, so the route is marked
sensitive: the access log records the route pattern, never the query string. On clean-up it appends
"stopped" to ``marker_file`` (when set), which lets tests prove that clean-up ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from aiohttp import web

from sidecar import Listener, PluginContext, Route, hookimpl
from sidecar.schema import Bool, Map, Str

STATE: dict[str, int] = {"greetings": 0}


@hookimpl
def register_config_schema() -> Map:
    return Map(
        fields={
            "greeting": Str(default="Hello", min_len=1, max_len=40),
            "api_token": Str(secret=True, doc="an example secret, masked in `sidecar config`"),
            "marker_file": Str(doc="append start/stop events here"),
            "ready": Bool(default=True, doc="what the readiness hook reports"),
        }
    )


@hookimpl
def register_routes(listener: Listener, context: PluginContext) -> Iterable[Route]:
    greeting = context.config["greeting"]

    async def greet(request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        if not name:
            return web.json_response({"error": "name is required"}, status=400)
        STATE["greetings"] += 1
        return web.Response(text=f"{greeting}, {name}!\n")

    return [Route("GET", "/greet", greet, sensitive=True)]


@hookimpl
async def lifespan(context: PluginContext) -> AsyncIterator[None]:
    marker = context.config["marker_file"]
    _mark(marker, "started")
    yield
    _mark(marker, "stopped")


@hookimpl
def readiness(context: PluginContext) -> str | None:
    return None if context.config["ready"] else "greeter told to stay unready"


def _mark(marker: str | None, word: str) -> None:
    if marker:
        with Path(marker).open("a", encoding="utf-8") as f:
            f.write(word + "\n")
