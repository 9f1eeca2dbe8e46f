"""What plugins hand the server: routes, and the listener they are asked about."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Renders an error the sidecar answers on a route's behalf: (status, message) -> the response.
ErrorResponse = Callable[[int, str], web.StreamResponse]
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

    ``error_response`` shapes the errors the sidecar itself answers for this route: 413 (body too
    large), 503 (the plugin is not ready), 500 (the handler raised), and aiohttp's HTTP errors
    raised without a body of their own. It receives the status and a message that is safe to show
    and returns a new response (aiohttp sends a response once); the sidecar still adds
    ``X-Request-Id``. Without it these errors are the sidecar's ``{"error": ..., "request_id":
    ...}``; a plugin speaking a protocol whose clients expect another shape (Vault's
    ``{"errors": [...]}``) gives its own.
    """

    method: str
    path: str
    handler: Handler
    sensitive: bool = False
    max_body_bytes: int | None = None
    name: str | None = None
    error_response: ErrorResponse | None = None
