"""What plugins hand the server: routes, and the listener they are asked about."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Audience = Literal["ingress", "api"]


@dataclass(frozen=True)
class Listener:
    """One port the sidecar serves.

    ``audience`` is ``"ingress"`` for the public ports of enclaver.yaml's ``ingress`` list and
    ``"api"`` for the loopback-only internal API port. ``port`` is the port as the manifest names it
    (tests may bind elsewhere; plugins never need to know).
    """

    audience: Audience
    port: int

    @property
    def name(self) -> str:
        return f"{self.audience}:{self.port}"


@dataclass(frozen=True)
class Route:
    """One HTTP route a plugin serves.

    ``sensitive`` routes never have their query string or concrete path written to any log: the
    access log records the route's pattern instead (the passenger name is such a query string).
    ``max_body_bytes`` overrides the sidecar-wide request body limit for this route.
    """

    method: str
    path: str
    handler: Handler
    sensitive: bool = False
    max_body_bytes: int | None = None
    name: str | None = None
