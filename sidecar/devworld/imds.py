"""A strict IMDSv2 server for the dev world: tokens required, short-lived rotating credentials.

It behaves like EC2's instance metadata service where the sidecar can tell the difference:

- ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` in 1..21600 (else 400) and
  is refused with 403 when it carries ``X-Forwarded-For`` (AWS's guard against proxied token
  requests). The token is random and valid for its TTL (capped by ``token_max_ttl``, so tests can
  make tokens expire under a client that asks for six hours).
- Every ``GET`` needs a valid, unexpired token in ``X-aws-ec2-metadata-token``; otherwise 401.
- Credentials live ``credential_lifetime`` seconds (15 minutes by default, a few seconds in tests). A
  new set is issued once the current one has less than a third of its lifetime left, as IMDS makes
  new credentials available well before the old ones expire. Timestamps have whole-second resolution,
  as AWS's do, and the reported ``Expiration`` is the one :meth:`DevImds.is_valid_access_key` enforces.

``start()`` serves from a thread with its own event loop (like moto's ``ThreadedMotoServer``): the
sidecar's IMDS client is synchronous (botocore refreshes credentials synchronously), and a refresh
made on the sidecar's loop thread would deadlock against a server on that same loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import json
import math
import re
import secrets
import string
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
REGION_PATH = "/latest/meta-data/placement/region"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600
MIN_CREDENTIAL_LIFETIME = 3.0  # whole-second timestamps: shorter lifetimes would round to nothing
_KEY_ALPHABET = string.ascii_uppercase + string.digits
_DIGITS = re.compile(r"[0-9]{1,9}")  # longer is out of range anyway; int() of 5000 digits is slow


@dataclass(frozen=True)
class IssuedCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str
    issued: float  # epoch seconds (whole)
    expiration: float  # epoch seconds (whole)

    def document(self) -> dict[str, str]:
        return {
            "Code": "Success",
            "LastUpdated": _iso(self.issued),
            "Type": "AWS-HMAC",
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "Expiration": _iso(self.expiration),
        }


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DevImds:
    """The strict IMDSv2 stand-in. Counters and ``down`` are for tests and the dev world."""

    def __init__(
        self,
        role: str = "enclave-sidecar-dev",
        region: str = "us-east-1",
        credential_lifetime: float = 900.0,
        token_max_ttl: int = MAX_TOKEN_TTL,
        access_key_prefix: str = "ASIADEV",
    ) -> None:
        if credential_lifetime < MIN_CREDENTIAL_LIFETIME:
            raise ValueError(f"credential_lifetime must be at least {MIN_CREDENTIAL_LIFETIME} seconds")
        if not 1 <= token_max_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_max_ttl must be between 1 and {MAX_TOKEN_TTL}")
        if len(access_key_prefix) >= 20:
            raise ValueError("access_key_prefix must be shorter than 20 characters")
        self.role = role
        self.region = region
        self.credential_lifetime = credential_lifetime
        self.token_max_ttl = token_max_ttl
        self.access_key_prefix = access_key_prefix
        self.down = False  # True: answer 503 to everything, as an unreachable or failing IMDS would
        self.token_requests = 0  # every PUT /latest/api/token received, answered or not
        self.credential_requests = 0  # every GET of a role's credentials document received
        # (method, path, status) of recent requests; bounded, since `sidecar dev` may run for days.
        self.requests: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=10_000)
        self.issued: list[tuple[str, datetime.datetime]] = []  # (access key id, expiration), in order
        self.url = ""
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._by_key: dict[str, IssuedCredentials] = {}
        self._current: IssuedCredentials | None = None
        self._lock = threading.Lock()  # state is read from other threads (tests, the KMS front)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ------------------------------------------------------------------ for tests and the dev world

    def is_valid_access_key(self, key_id: str, at: datetime.datetime | float | None = None) -> bool:
        """Whether ``key_id`` was issued here and has not expired (at ``at``, default now)."""
        if at is None:
            when = time.time()
        elif isinstance(at, datetime.datetime):
            when = at.timestamp()
        else:
            when = float(at)
        with self._lock:
            issued = self._by_key.get(key_id)
        return issued is not None and when < issued.expiration

    def credentials_for(self, key_id: str) -> IssuedCredentials | None:
        """The full set behind an access key id (for a stand-in that checks SigV4 signatures)."""
        with self._lock:
            return self._by_key.get(key_id)

    def revoke_tokens(self) -> None:
        """Forget every session token, as IMDS does across a stop/start: the next GET gets 401."""
        with self._lock:
            self._tokens.clear()

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_put(TOKEN_PATH, self._token)
        app.router.add_get(CREDENTIALS_PATH, self._roles)
        app.router.add_get(CREDENTIALS_PATH + "{role}", self._credentials)
        app.router.add_get(REGION_PATH, self._region)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if request.method == "PUT" and path == TOKEN_PATH:
            self.token_requests += 1
        elif request.method == "GET" and path.startswith(CREDENTIALS_PATH) and path != CREDENTIALS_PATH:
            self.credential_requests += 1
        response = await self._dispatch(request, handler)
        self.requests.append((request.method, path, response.status))
        return response

    async def _dispatch(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.down:
            return _text(503, "Service Unavailable")
        if not (request.method == "PUT" and request.path == TOKEN_PATH) and not self._token_ok(request):
            return _text(401, "Unauthorized")  # before routing, as IMDS: no token, no 404 either
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return _text(exc.status, exc.reason)

    def _token_ok(self, request: web.Request) -> bool:
        token = request.headers.get(TOKEN_HEADER)
        if not token:
            return False
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and time.monotonic() < expires

    async def _token(self, request: web.Request) -> web.StreamResponse:
        if "X-Forwarded-For" in request.headers:
            return _text(403, "Forbidden")
        value = request.headers.get(TTL_HEADER, "")
        # ASCII digits only: int() would also take "+60", "1_0" and other scripts' digits ("٣").
        if not _DIGITS.fullmatch(value):
            return _text(400, "Bad Request")
        ttl = int(value)
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            return _text(400, "Bad Request")
        ttl = min(ttl, self.token_max_ttl)
        token = secrets.token_urlsafe(42)
        now = time.monotonic()
        with self._lock:
            self._tokens = {t: e for t, e in self._tokens.items() if e > now}
            self._tokens[token] = now + ttl
        response = _text(200, token)
        response.headers[TTL_HEADER] = str(ttl)
        return response

    async def _roles(self, request: web.Request) -> web.StreamResponse:
        return _text(200, self.role)

    async def _credentials(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["role"] != self.role:
            return _text(404, "Not Found")
        document = self._rotate().document()
        return web.Response(body=json.dumps(document, indent=2).encode(), content_type="text/plain")

    async def _region(self, request: web.Request) -> web.StreamResponse:
        return _text(200, self.region)

    def _rotate(self) -> IssuedCredentials:
        now = time.time()
        with self._lock:
            current = self._current
            if current is None or current.expiration - now < self.credential_lifetime / 3:
                issued = math.floor(now)
                current = IssuedCredentials(
                    access_key_id=self.access_key_prefix
                    + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(20 - len(self.access_key_prefix))),
                    secret_access_key=secrets.token_urlsafe(30),
                    session_token=secrets.token_urlsafe(96),
                    issued=issued,
                    # Truncated like AWS's timestamps, so what clients read is what is enforced.
                    expiration=math.floor(now + self.credential_lifetime),
                )
                self._current = current
                self._by_key[current.access_key_id] = current
                self.issued.append(
                    (current.access_key_id, datetime.datetime.fromtimestamp(current.expiration, datetime.UTC))
                )
            return current

    # ------------------------------------------------------------------ serving

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in a background thread; returns the base URL (``http://host:port``)."""
        if self._thread is not None:
            raise RuntimeError("DevImds is already running")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(host, port, ready), name="dev-imds", daemon=True
        )
        self._thread.start()
        try:
            self.url = await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise
        return self.url

    def _serve(self, host: str, port: int, ready: concurrent.futures.Future[str]) -> None:
        asyncio.run(self._main(host, port, ready))

    async def _main(self, host: str, port: int, ready: concurrent.futures.Future[str]) -> None:
        runner = web.AppRunner(self.app(), access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0][1]
        except BaseException as exc:
            await runner.cleanup()
            ready.set_exception(exc)
            return
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        shown = f"[{host}]" if ":" in host else host
        ready.set_result(f"http://{shown}:{bound}")
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join)
        self._thread = self._loop = self._stop = None


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")
