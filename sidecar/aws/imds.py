"""IMDSv2: session token, instance-role credentials and region, as a botocore credential provider.

The steps are AWS's: ``PUT /latest/api/token`` with a TTL header, then every ``GET`` carries the token
in ``X-aws-ec2-metadata-token``. The role comes from ``/latest/meta-data/iam/security-credentials/``,
its credentials from ``.../security-credentials/ROLE``, the region from
``/latest/meta-data/placement/region``.

:class:`ImdsClient` is synchronous on purpose: botocore calls its refresh callback synchronously, from
whatever thread makes the AWS call. Inside an enclave there is no route to ``169.254.169.254``, so the
traffic goes through the egress proxy, which must allow that address (and must not add
``X-Forwarded-For``: IMDS refuses token requests that carry it).

Nothing here logs or raises with a credential value or a token in it.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import botocore.credentials
import botocore.session
from botocore.credentials import RefreshableCredentials

from sidecar.logs import event

log = logging.getLogger("sidecar.aws.imds")

IMDS_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a path, not a secret
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
REGION_PATH = "/latest/meta-data/placement/region"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
# What an IMDSv2 session token looks like (base64); anything else is refused before use.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9+/=_-]{1,1024}")
MAX_ANSWER_BYTES = 64 * 1024  # IMDS's answers are a few hundred bytes
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600
TOKEN_MARGIN = 60.0  # re-fetch the token this long before IMDS would start answering 401
METHOD = "enclave-sidecar-imds"
REQUIRED_FIELDS = ("AccessKeyId", "SecretAccessKey", "Token", "Expiration")


class ImdsError(Exception):
    """An IMDS step failed: which step, why (HTTP status or connection error), after how many attempts.

    The message never contains a token or a credential value.
    """

    def __init__(self, step: str, reason: str, attempts: int, status: int | None = None) -> None:
        self.step = step
        self.reason = reason
        self.attempts = attempts
        self.status = status
        plural = "" if attempts == 1 else "s"
        super().__init__(f"IMDS {step} failed after {attempts} attempt{plural}: {reason}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # IMDS never redirects; following one would send the token to wherever the redirect points.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ExplicitProxy(urllib.request.ProxyHandler):
    """``ProxyHandler({"http": proxy})`` that also ignores ``no_proxy`` from the environment.

    The stock handler asks ``urllib.request.proxy_bypass`` (which reads ``no_proxy``) before using
    the proxy. AWS's own advice is ``NO_PROXY=169.254.169.254``; inside an enclave that would route
    IMDS traffic nowhere, so the configured proxy is always used.
    """

    def __init__(self, proxy: str) -> None:
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
            raise ValueError("the IMDS proxy must be a plain http://host:port URL")
        self.hostport = parts.netloc
        super().__init__({"http": proxy})

    def proxy_open(self, req: urllib.request.Request, proxy: str, type: str) -> None:
        req.set_proxy(self.hostport, "http")
        return None  # the HTTP handler then sends the request to the proxy, in absolute form


class _Response:
    __slots__ = ("attempts", "body", "status")

    def __init__(self, status: int, body: bytes, attempts: int) -> None:
        self.status = status
        self.body = body
        self.attempts = attempts

    def problem(self) -> str:
        """``HTTP 502: <first line of the body>``: the egress proxy says there why it refused or
        failed (an error body never carries credentials; only a 200 does)."""
        lines = self.body.decode("utf-8", "replace").strip().splitlines()
        first = "".join(c for c in lines[0] if c.isprintable())[:200] if lines else ""
        return f"HTTP {self.status}: {first}" if first else f"HTTP {self.status}"


class ImdsClient:
    """A strict IMDSv2 client: cached session token, retries with exponential backoff.

    Connection errors and 5xx answers are retried ``retries`` times (delays ``backoff``, ``2*backoff``,
    ...). Other 4xx answers are final, except that one 401 drops the cached token, fetches a new one
    and retries the request once. Safe to use from several threads.
    """

    def __init__(
        self,
        endpoint: str = IMDS_ENDPOINT,
        *,
        proxy: str | None = None,
        token_ttl: int = MAX_TOKEN_TTL,
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl must be between 1 and {MAX_TOKEN_TTL} seconds, not {token_ttl}")
        if urllib.parse.urlsplit(endpoint).scheme != "http":
            raise ValueError(f"the IMDS endpoint must be an http:// URL, not {endpoint!r}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.endpoint = endpoint.rstrip("/")
        self.proxy = proxy
        self.token_ttl = token_ttl
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep
        self._clock = clock
        # A short test TTL must not mean "always stale": the margin is at most a tenth of it.
        self._margin = min(TOKEN_MARGIN, token_ttl / 10)
        proxies: urllib.request.BaseHandler = (
            _ExplicitProxy(proxy) if proxy else urllib.request.ProxyHandler({})
        )
        self._opener = urllib.request.build_opener(proxies, _NoRedirect())
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expires = 0.0

    def __repr__(self) -> str:
        return f"ImdsClient({self.endpoint!r}, proxy={self.proxy!r})"

    # ------------------------------------------------------------------ HTTP

    def _send(self, method: str, path: str, headers: dict[str, str], step: str) -> _Response:
        """One request with retries. Returns any answer below 500; raises ImdsError otherwise."""
        attempts = self.retries + 1
        reason = ""
        status: int | None = None
        for attempt in range(1, attempts + 1):
            # The scheme is checked in __init__ (http only), so this cannot open file: or ftp: URLs.
            url = self.endpoint + path
            request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
            deadline = self._clock() + self.timeout
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return _Response(response.status, self._read_body(response, deadline), attempt)
            except urllib.error.HTTPError as exc:
                # Keep the start of the body: a 403 from the egress proxy says which rule refused.
                body = exc.read(300)
                exc.close()
                if exc.code < 500:
                    return _Response(exc.code, body, attempt)
                status, reason = exc.code, _Response(exc.code, body, attempt).problem()
            except urllib.error.URLError as exc:
                status, reason = None, f"connection error: {exc.reason}"
            except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, garbled answers
                status, reason = None, f"connection error: {exc.__class__.__name__}: {exc}"
            except ValueError as exc:  # e.g. a header value http.client refuses: never echo it (a token)
                status, reason = None, f"invalid request or answer: {exc.__class__.__name__}"
            if attempt < attempts:
                self._sleep(self.backoff * 2 ** (attempt - 1))
        raise ImdsError(step, reason, attempts, status)

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        """The body, at most MAX_ANSWER_BYTES, arriving by ``deadline``: the socket timeout bounds
        each read, not a server that sends a byte now and then."""
        chunks: list[bytes] = []
        size = 0
        while True:
            if self._clock() > deadline:
                raise TimeoutError(f"the answer did not arrive within {self.timeout:g} s")
            chunk = response.read1(min(16384, MAX_ANSWER_BYTES + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise http.client.HTTPException(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")

    def token(self) -> str:
        """The session token, fetched once and reused until shortly before its TTL runs out."""
        with self._lock:
            if self._token is not None and self._clock() < self._token_expires:
                return self._token
            started = self._clock()  # the TTL runs from IMDS's answer; counting from here is safer
            response = self._send("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)}, "token (PUT)")
            if response.status != 200 or not response.body:
                raise ImdsError("token (PUT)", response.problem(), response.attempts, response.status)
            token = response.body.decode("ascii", "replace").strip()
            if not _TOKEN_SHAPE.fullmatch(token):
                # It goes into a header next: CR/LF would split it (and http.client's error would
                # echo it into the log). Say what is wrong, never the value.
                raise ImdsError("token (PUT)", "the token is not a base64 string of up to 1024 characters", 1)
            self._token = token
            self._token_expires = started + self.token_ttl - self._margin
            return self._token

    def _drop_token(self, token: str) -> None:
        with self._lock:
            if self._token == token:  # another thread may already have fetched a fresh one
                self._token = None

    def get(self, path: str) -> str:
        """GET a metadata path with the session token; one re-token and retry on 401."""
        step = f"GET {path}"
        token = self.token()
        response = self._send("GET", path, {TOKEN_HEADER: token}, step)
        attempts = response.attempts
        if response.status == 401:
            # The token expired early or IMDS forgot it (e.g. after a stop/start): re-token once.
            self._drop_token(token)
            response = self._send("GET", path, {TOKEN_HEADER: self.token()}, step)
            attempts += response.attempts
        if response.status != 200:
            raise ImdsError(step, response.problem(), attempts, response.status)
        return response.body.decode("utf-8", "replace")

    # ------------------------------------------------------------------ metadata

    def role(self) -> str:
        """The instance profile's role name: the first line of the credentials listing."""
        lines = self.get(CREDENTIALS_PATH).strip().splitlines()
        if not lines or not lines[0].strip():
            raise ImdsError(f"GET {CREDENTIALS_PATH}", "no IAM role is attached to this instance", 1)
        return lines[0].strip()

    def credentials(self) -> dict[str, Any]:
        """The role's current credentials: AccessKeyId, SecretAccessKey, Token, Expiration, ..."""
        path = CREDENTIALS_PATH + urllib.parse.quote(self.role())
        body = self.get(path)
        step = f"GET {path}"
        try:
            data = json.loads(body)
        except ValueError:
            # The body may hold secrets: say what is wrong, never echo it.
            raise ImdsError(step, "the answer is not JSON", 1) from None
        if not isinstance(data, dict):
            raise ImdsError(step, "the answer is not a JSON object", 1)
        code = data.get("Code", "Success")
        if code != "Success":
            raise ImdsError(step, f"IMDS answered Code={str(code)[:64]!r}", 1)
        missing = [name for name in REQUIRED_FIELDS if not isinstance(data.get(name), str) or not data[name]]
        if missing:
            raise ImdsError(step, f"the answer lacks {', '.join(missing)}", 1)
        try:
            _parse_time(data["Expiration"])
        except ValueError:
            raise ImdsError(step, "Expiration is not an ISO 8601 time", 1) from None
        return data

    def region(self) -> str:
        region = self.get(REGION_PATH).strip()
        if not region:
            raise ImdsError(f"GET {REGION_PATH}", "the answer is empty", 1)
        return region


def _parse_time(text: str) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value


class _Refresher:
    """botocore's ``refresh_using`` callback; also fits the refresh windows to the credential lifetime.

    botocore's defaults (advisory 15 min, mandatory 10 min) are longer than the dev world's whole
    15-minute lifetime, which would mean a fetch on every call. Windows are ``min(default,
    lifetime/3)`` and ``min(default, lifetime/6)``, where the lifetime is Expiration - LastUpdated
    (the full life of the set, stable across fetches) or, without LastUpdated, the time left.
    """

    def __init__(self, client: ImdsClient, advisory: float, mandatory: float) -> None:
        self.client = client
        self.advisory = advisory
        self.mandatory = mandatory
        self.windows = (advisory, mandatory)
        self.target: RefreshableCredentials | None = None

    def __call__(self) -> dict[str, str]:
        data = self.client.credentials()
        expiry = _parse_time(data["Expiration"])
        now = datetime.datetime.now(datetime.UTC)
        lifetime = (expiry - now).total_seconds()
        if lifetime <= 0:
            # botocore would raise a bare RuntimeError ("still expired"): say what is wrong instead.
            raise ImdsError(
                f"GET {CREDENTIALS_PATH}",
                f"the credentials IMDS answered expired at {data['Expiration']} "
                "(is this machine's clock right?)",
                1,
            )
        updated = data.get("LastUpdated")
        if isinstance(updated, str):
            try:
                since_update = (expiry - _parse_time(updated)).total_seconds()
            except ValueError:
                since_update = 0.0
            if since_update > 0:
                lifetime = since_update
        self.windows = (
            max(0.0, min(self.advisory, lifetime / 3)),
            max(0.0, min(self.mandatory, lifetime / 6)),
        )
        if self.target is not None:
            self.apply(self.target)
        event(
            log, logging.INFO, "imds_credentials", expiration=data["Expiration"], lifetime_s=round(lifetime)
        )
        return {
            "access_key": data["AccessKeyId"],
            "secret_key": data["SecretAccessKey"],
            "token": data["Token"],
            "expiry_time": data["Expiration"],
        }

    def apply(self, credentials: RefreshableCredentials) -> None:
        # Attributes botocore reads in RefreshableCredentials._refresh (botocore 1.3x): advisory is
        # when one caller refreshes without blocking the others, mandatory is when all of them wait.
        credentials._advisory_refresh_timeout, credentials._mandatory_refresh_timeout = self.windows


def refreshable_credentials(
    client: ImdsClient, advisory_refresh: int = 300, mandatory_refresh: int = 60
) -> RefreshableCredentials:
    """Credentials that botocore renews from IMDS before ``Expiration`` (fetches once now)."""
    refresher = _Refresher(client, advisory_refresh, mandatory_refresh)
    metadata = refresher()
    credentials = RefreshableCredentials.create_from_metadata(
        metadata=metadata, refresh_using=refresher, method=METHOD
    )
    refresher.target = credentials
    refresher.apply(credentials)
    return credentials


class ImdsCredentialProvider(botocore.credentials.CredentialProvider):  # type: ignore[misc]
    """IMDSv2 (through our client, so through the egress proxy) as a link in botocore's chain.

    ``load`` raises :class:`ImdsError` rather than returning None: falling through to the
    environment or a config file would run the enclave with credentials nobody meant it to have.
    """

    METHOD = METHOD
    CANONICAL_NAME = "custom-enclave-sidecar-imds"

    def __init__(self, client: ImdsClient, advisory_refresh: int = 300, mandatory_refresh: int = 60) -> None:
        super().__init__()
        self.client = client
        self.advisory_refresh = advisory_refresh
        self.mandatory_refresh = mandatory_refresh

    def load(self) -> RefreshableCredentials:
        return refreshable_credentials(self.client, self.advisory_refresh, self.mandatory_refresh)


def botocore_session(client: ImdsClient) -> botocore.session.Session:
    """A botocore session whose credentials come from IMDS first, in IMDS's region."""
    session = botocore.session.Session()
    resolver = session.get_component("credential_provider")
    resolver.providers.insert(0, ImdsCredentialProvider(client))
    session.set_config_variable("region", client.region())
    return session


async def wait_for_imds(
    client: ImdsClient,
    *,
    attempts: int | None = None,
    initial: float = 0.5,
    maximum: float = 30.0,
    on_retry: Callable[[int, Exception], None] | None = None,
) -> tuple[str, str]:
    """Wait until IMDS tells the role and the region; returns ``(role, region)``.

    Retries with capped exponential backoff, logging ``imds_unavailable`` with the reason on each
    failure. It only raises when cancelled, or after ``attempts`` failures (an ImdsError naming the
    last reason); with ``attempts=None`` it keeps trying for as long as it takes.
    """
    delay = initial
    attempt = 0
    while True:
        attempt += 1
        try:
            role = await asyncio.to_thread(client.role)
            region = await asyncio.to_thread(client.region)
        except Exception as exc:  # anything at all: start-up must wait, not crash
            final = attempts is not None and attempt >= attempts
            event(
                log,
                logging.WARNING,
                "imds_unavailable",
                attempt=attempt,
                error=str(exc) or exc.__class__.__name__,
                retry_in=None if final else round(delay, 3),
                endpoint=client.endpoint,
            )
            if on_retry is not None:
                on_retry(attempt, exc)
            if final:
                raise ImdsError("start-up (role and region)", f"last error: {exc}", attempt) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, maximum)
            continue
        event(log, logging.INFO, "imds_ready", role=role, region=region, attempts=attempt)
        return role, region
