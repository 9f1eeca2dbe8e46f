"""IMDSv2 client and the dev world's strict IMDS: tokens, retries, rotation, botocore, the egress proxy.

DevImds serves from its own thread; ImdsClient is synchronous, so calls go through asyncio.to_thread
(needed anyway whenever the test also serves a proxy or a stub on this loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import boto3
import botocore.config
import pytest
from aiohttp import web

from sidecar.aws.imds import (
    IMDS_ENDPOINT,
    ImdsClient,
    ImdsCredentialProvider,
    ImdsError,
    botocore_session,
    refreshable_credentials,
    wait_for_imds,
)
from sidecar.devworld.imds import DevImds
from sidecar.testing import free_port

TOKEN = "/latest/api/token"
ROLES = "/latest/meta-data/iam/security-credentials/"
REGION = "/latest/meta-data/placement/region"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"

ImdsFactory = Callable[..., Awaitable[DevImds]]


@pytest.fixture
async def imds_factory() -> AsyncIterator[ImdsFactory]:
    servers: list[DevImds] = []

    async def make(**kwargs: Any) -> DevImds:
        server = DevImds(**kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def imds(imds_factory: ImdsFactory) -> DevImds:
    return await imds_factory(region="eu-west-3")


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


async def serve(app: web.Application | web.Server) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Serve ``app`` on this loop on an ephemeral port; returns (url, cleanup)."""
    runner: web.BaseRunner[Any] = (
        web.AppRunner(app, access_log=None) if isinstance(app, web.Application) else web.ServerRunner(app)
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner.cleanup


# ---------------------------------------------------------------------- happy path and tokens


async def test_role_credentials_and_region(imds: DevImds) -> None:
    client = ImdsClient(imds.url)
    assert await asyncio.to_thread(client.role) == "enclave-sidecar-dev"
    creds = await asyncio.to_thread(client.credentials)
    assert creds["Code"] == "Success"
    assert creds["Type"] == "AWS-HMAC"
    assert creds["AccessKeyId"].startswith("ASIADEV") and len(creds["AccessKeyId"]) == 20
    assert creds["SecretAccessKey"] and creds["Token"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", creds["Expiration"])
    assert imds.is_valid_access_key(creds["AccessKeyId"])
    assert not imds.is_valid_access_key(creds["AccessKeyId"], at=time.time() + 901)
    assert not imds.is_valid_access_key("AKIAUNKNOWN")
    assert await asyncio.to_thread(client.region) == "eu-west-3"
    # One token served all four GETs: the listing (twice: role() and credentials()), credentials, region.
    assert imds.token_requests == 1
    assert imds.credential_requests == 1
    assert [key for key, _ in imds.issued] == [creds["AccessKeyId"]]


async def test_credentials_are_reused_until_a_third_of_their_life_is_left(imds_factory: ImdsFactory) -> None:
    imds = await imds_factory(credential_lifetime=900)
    client = ImdsClient(imds.url)
    first = await asyncio.to_thread(client.credentials)
    second = await asyncio.to_thread(client.credentials)
    assert first["AccessKeyId"] == second["AccessKeyId"]
    assert len(imds.issued) == 1


async def test_token_is_cached_then_refetched_before_its_ttl(imds: DevImds) -> None:
    now = [1000.0]
    client = ImdsClient(imds.url, token_ttl=100, clock=lambda: now[0])
    for _ in range(3):
        await asyncio.to_thread(client.region)
    assert imds.token_requests == 1
    now[0] += 85  # still outside the margin (a tenth of a 100 s TTL)
    await asyncio.to_thread(client.region)
    assert imds.token_requests == 1
    now[0] += 6  # 91 s: within 10 s of the TTL
    await asyncio.to_thread(client.region)
    assert imds.token_requests == 2
    # The TTL the client asked for is the one it configured.
    async with aiohttp.ClientSession() as session, session.put(imds.url + TOKEN, headers={TTL: "100"}) as r:
        assert r.headers[TTL] == "100"


async def test_token_expired_at_imds_is_refetched_on_401(imds_factory: ImdsFactory) -> None:
    imds = await imds_factory(token_max_ttl=1)  # IMDS gives 1 s although the client asks for 6 h
    client = ImdsClient(imds.url)
    await asyncio.to_thread(client.region)
    await asyncio.sleep(1.1)
    assert await asyncio.to_thread(client.region) == "us-east-1"
    assert imds.token_requests == 2
    assert ("GET", REGION, 401) in imds.requests


async def test_wrong_token_gets_401_then_one_retoken_succeeds(imds: DevImds) -> None:
    client = ImdsClient(imds.url)
    await asyncio.to_thread(client.role)
    imds.revoke_tokens()  # the client's cached token is now wrong
    assert await asyncio.to_thread(client.role) == "enclave-sidecar-dev"
    assert imds.token_requests == 2
    statuses = [status for method, path, status in imds.requests if method == "GET"]
    assert statuses == [200, 401, 200]


async def test_persistent_401_is_retried_once_only() -> None:
    calls = {"put": 0, "get": 0}

    async def token(request: web.Request) -> web.Response:
        calls["put"] += 1
        return web.Response(text=f"token-{calls['put']}")

    async def deny(request: web.Request) -> web.Response:
        calls["get"] += 1
        return web.Response(status=401)

    app = web.Application()
    app.router.add_put(TOKEN, token)
    app.router.add_get(REGION, deny)
    url, cleanup = await serve(app)
    try:
        sleep = FakeSleep()
        client = ImdsClient(url, sleep=sleep)
        with pytest.raises(ImdsError) as caught:
            await asyncio.to_thread(client.region)
    finally:
        await cleanup()
    assert calls == {"put": 2, "get": 2}
    assert caught.value.status == 401
    assert sleep.delays == []  # 4xx is not retried with backoff
    assert str(caught.value) == f"IMDS GET {REGION} failed after 2 attempts: HTTP 401"
    assert "token-" not in str(caught.value)


async def test_a_token_that_is_not_base64_is_refused_without_echoing_it() -> None:
    """Threat (found by review): a token with CR/LF made http.client raise an error that carried
    the token, and the start-up loop logged it."""

    async def token(request: web.Request) -> web.Response:
        return web.Response(text="AQAEAsecret-session-token\r\nX-Evil: 1")

    app = web.Application()
    app.router.add_put(TOKEN, token)
    url, cleanup = await serve(app)
    try:
        with pytest.raises(ImdsError) as caught:
            await asyncio.to_thread(ImdsClient(url, sleep=FakeSleep()).region)
    finally:
        await cleanup()
    assert "secret-session-token" not in str(caught.value)
    assert "the token is not a base64 string" in str(caught.value)


async def test_an_answer_that_trickles_or_never_ends_fails_in_time() -> None:
    """Found by review: the timeout bounded each read only, and the body was read without limit."""

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        for _ in range(100_000):
            await response.write(b" ")
            await asyncio.sleep(0.2)
        return response

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (1 << 20))

    app = web.Application()

    async def token(request: web.Request) -> web.Response:
        return web.Response(text="AQAE" + "a" * 40)

    app.router.add_put(TOKEN, token)
    app.router.add_get(REGION, trickle)
    app.router.add_get(ROLES, huge)
    url, cleanup = await serve(app)
    try:
        client = ImdsClient(url, timeout=1.0, retries=0, sleep=FakeSleep())
        started = time.monotonic()
        with pytest.raises(ImdsError, match="did not arrive within 1 s"):
            await asyncio.to_thread(client.region)
        assert time.monotonic() - started < 5
        with pytest.raises(ImdsError, match="larger than 65536 bytes"):
            await asyncio.to_thread(client.role)
    finally:
        await cleanup()


async def test_other_4xx_is_final(imds: DevImds) -> None:
    sleep = FakeSleep()
    client = ImdsClient(imds.url, sleep=sleep)
    with pytest.raises(ImdsError) as caught:
        await asyncio.to_thread(client.get, "/latest/meta-data/no-such-thing")
    assert caught.value.status == 404
    assert caught.value.attempts == 1
    assert sleep.delays == []


# ---------------------------------------------------------------------- strictness at the HTTP level


async def test_strict_imdsv2_at_the_http_level(imds: DevImds) -> None:
    async with aiohttp.ClientSession() as http:
        # IMDSv1 (no token) and wrong tokens are refused, before routing.
        for headers in ({}, {"X-aws-ec2-metadata-token": "not-a-token"}):
            for path in (ROLES, REGION, "/latest/meta-data/nothing-here"):
                async with http.get(imds.url + path, headers=headers) as resp:
                    assert resp.status == 401, (path, headers)
        # Threat: a stand-in that takes what int() takes ("+60", "1_0", "٣") hides a client bug IMDS refuses.
        bad_ttls = (None, "", "0", "21601", "ten", "+60", "-1", "6_0", "60.0", "\u0663", "9" * 5000)
        for ttl in bad_ttls:
            headers = {} if ttl is None else {TTL: ttl}
            async with http.put(imds.url + TOKEN, headers=headers) as resp:
                assert resp.status == 400, ttl
        async with http.put(imds.url + TOKEN, headers={TTL: "60", "X-Forwarded-For": "10.0.0.1"}) as resp:
            assert resp.status == 403
        async with http.put(imds.url + TOKEN, headers={TTL: "60"}) as resp:
            assert resp.status == 200
            token = await resp.text()
        good = {"X-aws-ec2-metadata-token": token}
        async with http.get(imds.url + ROLES + "someone-else", headers=good) as resp:
            assert resp.status == 404
        async with http.get(imds.url + ROLES + "enclave-sidecar-dev", headers=good) as resp:
            assert resp.status == 200
            assert set(json.loads(await resp.text())) == {
                "Code",
                "LastUpdated",
                "Type",
                "AccessKeyId",
                "SecretAccessKey",
                "Token",
                "Expiration",
            }
        imds.down = True
        async with http.get(imds.url + REGION, headers=good) as resp:
            assert resp.status == 503
    assert imds.token_requests == len(bad_ttls) + 2
    assert imds.credential_requests == 2


# ---------------------------------------------------------------------- outages


async def test_down_imds_retries_with_growing_backoff_then_fails_clearly(imds: DevImds) -> None:
    sleep = FakeSleep()
    client = ImdsClient(imds.url, retries=3, backoff=0.5, sleep=sleep)
    creds = await asyncio.to_thread(client.credentials)
    token = client.token()
    imds.down = True
    with pytest.raises(ImdsError) as caught:
        await asyncio.to_thread(client.credentials)
    assert sleep.delays == [0.5, 1.0, 2.0]
    error = caught.value
    assert (error.attempts, error.status) == (4, 503)
    # The status, then the first line of the body (here the dev IMDS's own text).
    assert str(error) == f"IMDS GET {ROLES} failed after 4 attempts: HTTP 503: Service Unavailable"
    for secret in (token, creds["SecretAccessKey"], creds["Token"], creds["AccessKeyId"]):
        assert secret not in str(error)


async def test_down_at_the_token_step(imds: DevImds) -> None:
    imds.down = True
    sleep = FakeSleep()
    client = ImdsClient(imds.url, retries=2, backoff=0.25, sleep=sleep)
    with pytest.raises(ImdsError, match=r"^IMDS token \(PUT\) failed after 3 attempts: HTTP 503(: [^\n]*)?$"):
        await asyncio.to_thread(client.region)
    assert sleep.delays == [0.25, 0.5]
    assert imds.token_requests == 3


async def test_unreachable_imds_is_a_connection_error() -> None:
    sleep = FakeSleep()
    client = ImdsClient(f"http://127.0.0.1:{free_port()}", retries=2, sleep=sleep)
    with pytest.raises(ImdsError) as caught:
        await asyncio.to_thread(client.role)
    assert caught.value.status is None
    assert caught.value.attempts == 3
    assert "token (PUT) failed after 3 attempts: connection error:" in str(caught.value)
    assert "refused" in str(caught.value).lower()
    assert sleep.delays == [0.5, 1.0]


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JSON object"),
        (
            {"Code": "AssumeRoleUnauthorizedAccess", "SecretAccessKey": "s3cr3t", "Message": "s3cr3t"},
            "Code='AssumeRoleUnauthorizedAccess'",
        ),
        (
            {"Code": "Success", "AccessKeyId": "AKIA", "SecretAccessKey": "s3cr3t", "Token": "s3cr3t"},
            "lacks Expiration",
        ),
        (
            {"AccessKeyId": "AKIA", "SecretAccessKey": "s3cr3t", "Token": "", "Expiration": "x"},
            "lacks Token",
        ),
        (
            {"AccessKeyId": "AKIA", "SecretAccessKey": "s3cr3t", "Token": "s3cr3t", "Expiration": "soon"},
            "Expiration is not",
        ),
    ],
)
def test_bad_credential_documents_are_refused(
    monkeypatch: pytest.MonkeyPatch, document: Any, reason: str
) -> None:
    client = ImdsClient()
    body = document if isinstance(document, str) else json.dumps(document)
    monkeypatch.setattr(client, "get", lambda path: "r\n" if path == ROLES else body)
    with pytest.raises(ImdsError, match=re.escape(reason)) as caught:
        client.credentials()
    assert "s3cr3t" not in str(caught.value)


def test_client_refuses_bad_settings() -> None:
    for kwargs in ({"token_ttl": 0}, {"token_ttl": 21601}, {"retries": -1}, {"proxy": "socks5://p:1"}):
        with pytest.raises(ValueError):
            ImdsClient(**kwargs)
    with pytest.raises(ValueError):
        ImdsClient("file:///etc/passwd")
    assert ImdsClient().endpoint == IMDS_ENDPOINT


# ---------------------------------------------------------------------- start-up


async def test_wait_for_imds_retries_while_down_and_logs_why(
    imds: DevImds, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.aws.imds")
    imds.down = True
    client = ImdsClient(imds.url, retries=0, timeout=1.0)
    seen: list[int] = []

    def on_retry(attempt: int, exc: Exception) -> None:
        seen.append(attempt)
        assert isinstance(exc, ImdsError)
        if attempt == 3:
            imds.down = False

    role, region = await wait_for_imds(client, initial=0.01, maximum=0.02, on_retry=on_retry)
    assert (role, region) == ("enclave-sidecar-dev", "eu-west-3")
    assert seen == [1, 2, 3]
    failures = [r for r in caplog.records if r.getMessage() == "imds_unavailable"]
    assert [r.levelno for r in failures] == [logging.WARNING] * 3
    fields = [r.sidecar_fields for r in failures]  # type: ignore[attr-defined]
    assert [f["attempt"] for f in fields] == [1, 2, 3]
    assert all("HTTP 503" in f["error"] and "token (PUT)" in f["error"] for f in fields)
    assert [f["retry_in"] for f in fields] == [0.01, 0.02, 0.02]  # capped
    assert any(r.getMessage() == "imds_ready" for r in caplog.records)


async def test_wait_for_imds_gives_up_after_attempts_with_the_last_reason(imds: DevImds) -> None:
    imds.down = True
    client = ImdsClient(imds.url, retries=1, backoff=0.001)
    with pytest.raises(ImdsError) as caught:
        await wait_for_imds(client, attempts=3, initial=0.001)
    message = str(caught.value)
    assert message.startswith("IMDS start-up (role and region) failed after 3 attempts: last error: ")
    assert "IMDS token (PUT) failed after 2 attempts: HTTP 503" in message
    assert imds.token_requests == 6


async def test_wait_for_imds_can_be_cancelled(imds: DevImds) -> None:
    imds.down = True
    client = ImdsClient(imds.url, retries=0)
    task = asyncio.create_task(wait_for_imds(client, initial=0.01, maximum=0.01))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------------- botocore


async def test_refresh_windows_fit_the_credential_lifetime(imds_factory: ImdsFactory) -> None:
    long = await imds_factory(credential_lifetime=6 * 3600)
    creds = await asyncio.to_thread(refreshable_credentials, ImdsClient(long.url))
    assert (creds._advisory_refresh_timeout, creds._mandatory_refresh_timeout) == (300, 60)
    assert creds.method == "enclave-sidecar-imds"
    short = await imds_factory(credential_lifetime=6)
    creds = await asyncio.to_thread(refreshable_credentials, ImdsClient(short.url))
    assert (creds._advisory_refresh_timeout, creds._mandatory_refresh_timeout) == (2, 1)
    assert not creds.refresh_needed()


async def test_botocore_session_uses_imds_credentials_and_region(
    imds: DevImds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Environment credentials must not win over IMDS: the provider comes first in the chain.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENVIRONMENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-environment")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    session = await asyncio.to_thread(botocore_session, ImdsClient(imds.url))
    resolver = session.get_component("credential_provider")
    assert isinstance(resolver.providers[0], ImdsCredentialProvider)
    sts = boto3.Session(botocore_session=session).client("sts", endpoint_url="http://127.0.0.1:1")
    assert sts.meta.region_name == "eu-west-3"
    frozen = await asyncio.to_thread(lambda: sts._request_signer._credentials.get_frozen_credentials())
    assert frozen.access_key == imds.issued[-1][0]
    assert sts._request_signer._credentials.method == "enclave-sidecar-imds"


def _sts_stub(imds: DevImds, used: list[str]) -> web.Application:
    """A GetCallerIdentity endpoint that accepts only unexpired credentials issued by ``imds``."""

    async def handle(request: web.Request) -> web.Response:
        match = re.search(r"Credential=([A-Z0-9]+)/", request.headers.get("Authorization", ""))
        key = match.group(1) if match else ""
        issued = imds.credentials_for(key)
        if not imds.is_valid_access_key(key) or issued is None:
            code = "ExpiredToken"
        elif request.headers.get("X-Amz-Security-Token") != issued.session_token:
            code = "InvalidClientTokenId"
        else:
            used.append(key)
            return web.Response(
                content_type="text/xml",
                text='<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                "<GetCallerIdentityResult><Arn>arn:aws:sts::123456789012:assumed-role/dev/i</Arn>"
                "<UserId>AROADEV:i</UserId><Account>123456789012</Account></GetCallerIdentityResult>"
                "<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>"
                "</GetCallerIdentityResponse>",
            )
        return web.Response(
            status=403,
            content_type="text/xml",
            text=f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
            "<Message>refused</Message></Error><RequestId>1</RequestId></ErrorResponse>",
        )

    app = web.Application()
    app.router.add_post("/", handle)
    return app


@pytest.mark.slow
async def test_credentials_rotate_mid_run_and_calls_keep_working(imds_factory: ImdsFactory) -> None:
    imds = await imds_factory(credential_lifetime=6)
    used: list[str] = []
    url, cleanup = await serve(_sts_stub(imds, used))
    try:
        session = await asyncio.to_thread(botocore_session, ImdsClient(imds.url))
        config = botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"})
        sts = boto3.Session(botocore_session=session).client("sts", endpoint_url=url, config=config)
        credentials = sts._request_signer._credentials
        first_key = imds.issued[0][0]
        deadline = time.monotonic() + 7.5
        while time.monotonic() < deadline:
            identity = await asyncio.to_thread(sts.get_caller_identity)  # raises on a refused key
            assert identity["Account"] == "123456789012"
            frozen = await asyncio.to_thread(credentials.get_frozen_credentials)
            assert imds.is_valid_access_key(frozen.access_key)
            await asyncio.sleep(0.1)
    finally:
        await cleanup()
    assert not imds.is_valid_access_key(first_key)  # it expired while calls went on
    assert used[0] == first_key
    assert len(set(used)) >= 2
    assert len(used) > 20
    # Refreshes happen in the advisory window only: about one credentials fetch per rotation.
    assert imds.credential_requests <= len(imds.issued) + 3


# ---------------------------------------------------------------------- the egress proxy


class ForwardProxy:
    """A tiny HTTP forward proxy (absolute-form requests), optionally mapping IMDS's address."""

    def __init__(self, upstream: dict[str, str] | None = None, add_forwarded_for: bool = False) -> None:
        self.upstream = upstream or {}
        self.add_forwarded_for = add_forwarded_for
        self.seen: list[tuple[str, str]] = []
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.session is not None
        target = request.url
        self.seen.append((request.method, str(target)))
        if not target.is_absolute():
            return web.Response(status=400, text="absolute-form required")
        host = f"{target.host}:{target.port}" if target.explicit_port else str(target.host)
        base = self.upstream.get(host, f"http://{host}")
        skip = {"host", "connection", "proxy-connection", "content-length"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        if self.add_forwarded_for:
            headers["X-Forwarded-For"] = request.remote or "127.0.0.1"
        async with self.session.request(
            request.method, base + target.path_qs, headers=headers, data=await request.read()
        ) as resp:
            return web.Response(
                status=resp.status, body=await resp.read(), headers={TTL: resp.headers.get(TTL, "")}
            )


async def start_proxy(proxy: ForwardProxy) -> tuple[str, Callable[[], Awaitable[None]]]:
    proxy.session = aiohttp.ClientSession()
    url, cleanup = await serve(web.Server(proxy))

    async def stop() -> None:
        await cleanup()
        assert proxy.session is not None
        await proxy.session.close()

    return url, stop


async def test_imds_through_the_egress_proxy(imds: DevImds, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment must change nothing: no_proxy would normally bypass the proxy for IMDS.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("no_proxy", "169.254.169.254,127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "169.254.169.254,127.0.0.1")
    proxy = ForwardProxy(upstream={"169.254.169.254": imds.url})
    url, stop = await start_proxy(proxy)
    try:
        client = ImdsClient(proxy=url, timeout=5)  # the real endpoint: only the proxy reaches it
        assert client.endpoint == "http://169.254.169.254"
        creds = await asyncio.to_thread(client.credentials)
        assert await asyncio.to_thread(client.region) == "eu-west-3"
    finally:
        await stop()
    assert imds.is_valid_access_key(creds["AccessKeyId"])
    assert proxy.seen[0] == ("PUT", "http://169.254.169.254/latest/api/token")
    assert ("GET", "http://169.254.169.254/latest/meta-data/placement/region") in proxy.seen
    assert len(proxy.seen) == 4  # the token, the role listing, the role's credentials, the region
    assert imds.token_requests == 1


async def test_environment_proxies_are_ignored(imds: DevImds, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = ForwardProxy()
    url, stop = await start_proxy(proxy)
    monkeypatch.setenv("http_proxy", url)
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        assert await asyncio.to_thread(ImdsClient(imds.url).region) == "eu-west-3"
    finally:
        await stop()
    assert proxy.seen == []


async def test_a_proxy_adding_x_forwarded_for_is_refused_by_imds(imds: DevImds) -> None:
    proxy = ForwardProxy(add_forwarded_for=True)
    url, stop = await start_proxy(proxy)
    try:
        with pytest.raises(
            ImdsError, match=r"^IMDS token \(PUT\) failed after 1 attempt: HTTP 403(: [^\n]*)?$"
        ):
            await asyncio.to_thread(ImdsClient(imds.url, proxy=url).region)
    finally:
        await stop()


def test_credentials_already_expired_are_an_imds_error_not_a_runtime_error() -> None:
    # Threat: expired credentials (IMDS stale, or this machine's clock ahead) surface as botocore's
    # bare RuntimeError, which callers report as an internal error with no reason.
    class Stale:
        def credentials(self) -> dict[str, str]:
            return {
                "AccessKeyId": "ASIAEXAMPLE",
                "SecretAccessKey": "secret-never-shown",
                "Token": "token-never-shown",
                "Expiration": "2020-01-01T00:00:00Z",
            }

    with pytest.raises(ImdsError) as excinfo:  # the first fetch and every refresh run the same check
        refreshable_credentials(Stale())  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert "expired at 2020-01-01T00:00:00Z" in message and "clock" in message
    assert "never-shown" not in message
