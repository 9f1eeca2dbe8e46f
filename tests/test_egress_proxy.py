"""The egress proxy with real clients: requests, aiohttp, curl and a child app (requests + boto3).

Addresses: the allowed origins (aiohttp, plain HTTP and HTTPS with a self-signed certificate) listen on
127.0.0.2; a listening socket on 127.0.0.3 stands for a forbidden host and must never see a connection.
127.0.0.2 and 127.0.0.3 are not in proxy_environment()'s NO_PROXY, so clients that take the proxy from
the environment really go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.config import NetworkSettings
from sidecar.net import vsock
from sidecar.net.egress import (
    DirectUpstream,
    EgressProxy,
    HttpProxyUpstream,
    Upstream,
    UpstreamError,
    VsockUpstream,
    proxy_environment,
    start_egress_proxy,
    upstream_from_settings,
)
from sidecar.net.policy import EgressPolicy
from sidecar.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
ORIGIN_IP = "127.0.0.2"
FORBIDDEN_IP = "127.0.0.3"
ALLOW = [ORIGIN_IP, "127.0.0.1", "localhost"]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
DENY = [FORBIDDEN_IP]


# ----------------------------------------------------------------------------------------- fixtures


@dataclass
class Tls:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.2 and localhost; clients trust exactly it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test origin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ORIGIN_IP)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Tls(d / "cert.pem", d / "key.pem")


async def _echo_info(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "sha256": hashlib.sha256(body).hexdigest(),
            "length": len(body),
        }
    )


async def _big(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "0"))
    resp = web.StreamResponse()
    resp.content_length = n
    await resp.prepare(request)
    chunk = b"x" * 65536
    while n > 0:
        await resp.write(chunk[: min(n, len(chunk))])
        n -= min(n, len(chunk))
    return resp


def origin_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello", _hello)
    app.router.add_route("*", "/echo", _echo_info)
    app.router.add_get("/big", _big)
    return app


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello from origin")


@dataclass
class Origins:
    http_port: int
    https_port: int

    @property
    def http(self) -> str:
        return f"http://{ORIGIN_IP}:{self.http_port}"

    @property
    def https(self) -> str:
        return f"https://{ORIGIN_IP}:{self.https_port}"


@pytest.fixture(scope="module")
def origins(tls: Tls) -> Iterator[Origins]:
    """aiohttp origins on 127.0.0.2 (HTTP and HTTPS) in their own thread and loop."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    ports: list[int] = []
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        runner = web.AppRunner(origin_app(), access_log=None)
        await runner.setup()
        for ctx in (None, tls.server_context()):
            await web.TCPSite(runner, ORIGIN_IP, 0, ssl_context=ctx).start()
            ports.append(runner.addresses[-1][1])
        runner_box.append(runner)

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield Origins(ports[0], ports[1])
    finally:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class Forbidden:
    """A listener on the forbidden address. ``connections()`` counts what reached it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((FORBIDDEN_IP, 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1


@pytest.fixture
def forbidden() -> Iterator[Forbidden]:
    f = Forbidden()
    try:
        yield f
    finally:
        f.sock.close()


ProxyFactory = Callable[..., Awaitable[EgressProxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """Start proxies on free loopback ports; every one is closed after the test."""
    proxies: list[EgressProxy] = []

    async def make(
        *,
        allow: list[str] | None = None,
        deny: list[str] | None = None,
        upstream: Upstream | None = None,
        request_timeout: float = 30.0,
        **settings: Any,
    ) -> EgressProxy:
        policy = EgressPolicy(ALLOW if allow is None else allow, DENY if deny is None else deny)
        proxy = await start_egress_proxy(
            policy,
            port=0,
            upstream=upstream or DirectUpstream(),
            settings=replace(NetworkSettings(), **settings),
            request_timeout=request_timeout,
        )
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            await proxy.close()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> EgressProxy:
    return await make_proxy()


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _raw_exchange(port: int, data: bytes, method: str, shut: bool) -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        body = resp.read() if method != "CONNECT" or resp.status != 200 else b""
        return Answer(resp.status, resp.headers, body)


async def raw(port: int, data: bytes, method: str = "GET", shut: bool = False) -> Answer:
    """Send raw bytes to the proxy and parse its answer with http.client (not by hand)."""
    return await asyncio.to_thread(_raw_exchange, port, data, method, shut)


async def open_tunnel(proxy: EgressProxy, target: str, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    """CONNECT through the proxy; returns the socket (non-blocking) and bytes read after the head."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    await loop.sock_sendall(sock, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + extra)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        if not chunk:
            sock.close()
            raise ConnectionError(f"proxy closed the connection: {head!r}")
        head += chunk
    status_line, _, rest = head.partition(b"\r\n")
    if b" 200 " not in status_line + b" ":
        sock.close()
        raise ConnectionError(status_line.decode())
    return sock, rest.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in rest else b""


async def read_to_eof(sock: socket.socket, timeout: float = 20) -> bytes:
    loop = asyncio.get_running_loop()

    async def read() -> bytes:
        chunks: list[bytes] = []
        while True:
            data = await loop.sock_recv(sock, 1 << 20)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    return await asyncio.wait_for(read(), timeout)


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A raw TCP origin on 127.0.0.2 for protocols that are not HTTP (echo, hash, banner)."""
    writers: set[asyncio.StreamWriter] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, ORIGIN_IP, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def hash_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer with the SHA-256 of what arrived: needs a working half-close."""
    h = hashlib.sha256()
    n = 0
    while data := await reader.read(1 << 20):
        h.update(data)
        n += len(data)
    writer.write(f"{n} {h.hexdigest()}".encode())
    await writer.drain()
    writer.close()


def get(url: str, proxy_url: str, tls: Tls | None = None, **kw: Any) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.get(
            url,
            proxies={"http": proxy_url, "https": proxy_url},
            verify=str(tls.cert) if tls else True,
            timeout=10,
            **kw,
        )


# ---------------------------------------------------------------------------------- allowed traffic


async def test_requests_http_and_https(proxy: EgressProxy, origins: Origins, tls: Tls) -> None:
    r = await asyncio.to_thread(get, f"{origins.http}/hello", proxy.url)
    assert (r.status_code, r.text) == (200, "hello from origin")
    r = await asyncio.to_thread(get, f"{origins.https}/hello", proxy.url, tls)
    assert (r.status_code, r.text) == (200, "hello from origin")
    assert proxy.stats.tunnels == 1 and proxy.stats.forwarded == 1


async def test_absolute_form_is_rewritten_for_the_origin(proxy: EgressProxy, origins: Origins) -> None:
    """Threat: proxy credentials or hop-by-hop headers leaking to the origin. Proxy-Authorization
    (the client's credentials for *this* proxy), Proxy-Connection and headers the client named in
    Connection stop here; Host is the URL's authority, whatever the client put in Host."""
    proxy_url = f"http://user:s3cret@127.0.0.1:{proxy.port}"
    r = await asyncio.to_thread(
        get,
        f"{origins.http}/echo?q=1",
        proxy_url,
        headers={
            "Host": "evil.example",
            "Proxy-Connection": "keep-alive",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "drop me",
            "X-End-To-End": "keep me",
        },
    )
    info = r.json()
    names = [k for k, _ in info["headers"]]
    assert info["path"] == "/echo?q=1"
    assert dict(info["headers"])["host"] == f"{ORIGIN_IP}:{origins.http_port}"
    assert names.count("host") == 1
    assert "proxy-authorization" not in names and "proxy-connection" not in names
    assert "x-hop" not in names and "keep-alive" not in names
    assert dict(info["headers"])["x-end-to-end"] == "keep me"


async def test_bodies_both_framings_and_keep_alive(proxy: EgressProxy, origins: Origins) -> None:
    """Content-Length and chunked request bodies arrive intact; a client connection carries several
    requests (each with its own upstream connection)."""
    body = os.urandom(300_000)

    def run() -> list[dict[str, Any]]:
        with requests.Session() as s:
            s.trust_env = False
            proxies = {"http": proxy.url}
            a = s.post(f"{origins.http}/echo", data=body, proxies=proxies, timeout=10).json()
            b = s.post(
                f"{origins.http}/echo", data=iter([body[:1000], body[1000:]]), proxies=proxies, timeout=10
            ).json()
            head = s.head(f"{origins.http}/hello", proxies=proxies, timeout=10)
            assert head.status_code == 200 and head.content == b""
            big = s.get(f"{origins.http}/big?n=3000000", proxies=proxies, timeout=10)
            assert len(big.content) == 3_000_000
            return [a, b]

    a, b = await asyncio.to_thread(run)
    digest = hashlib.sha256(body).hexdigest()
    assert (a["sha256"], a["length"]) == (digest, len(body))
    assert (b["sha256"], b["length"]) == (digest, len(body))
    assert ["transfer-encoding", "chunked"] in b["headers"]
    assert proxy.stats.connections == 1 and proxy.stats.forwarded == 4


async def test_aiohttp_client_http_and_https(proxy: EgressProxy, origins: Origins, tls: Tls) -> None:
    async with aiohttp.ClientSession(proxy=proxy.url, trust_env=False) as session:
        async with session.get(f"{origins.http}/hello") as r:
            assert (r.status, await r.text()) == (200, "hello from origin")
        async with session.get(f"{origins.https}/hello", ssl=tls.client_context()) as r:
            assert (r.status, await r.text()) == (200, "hello from origin")
        async with session.post(f"{origins.http}/echo", data=b"z" * 100_000) as r:
            assert (await r.json())["length"] == 100_000


async def run_curl(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


@needs_curl
async def test_curl_with_proxy_environment(
    proxy: EgressProxy, origins: Origins, tls: Tls, forbidden: Forbidden
) -> None:
    """curl takes HTTP_PROXY/HTTPS_PROXY from proxy_environment(): allowed works, denied gets 403."""
    env = {"PATH": os.environ["PATH"], **proxy_environment(proxy.port)}
    rc, out, _ = await run_curl("--cacert", str(tls.cert), f"{origins.https}/hello", env=env)
    assert (rc, out) == (0, "hello from origin")
    rc, out, _ = await run_curl(f"{origins.http}/hello", env=env)
    assert (rc, out) == (0, "hello from origin")
    rc, out, _ = await run_curl("-w", "%{http_code}", f"http://{FORBIDDEN_IP}:{forbidden.port}/x", env=env)
    assert out.endswith("403") and "denied by deny rule '127.0.0.3'" in out
    rc, _, err = await run_curl("-w", "%{http_code}", f"https://{FORBIDDEN_IP}:{forbidden.port}/x", env=env)
    assert rc != 0 and "403" in err
    assert forbidden.connections() == 0
    assert proxy.stats.tunnels == 1 and proxy.stats.forwarded == 1 and proxy.stats.denied == 2


CHILD_APP = """
import json, sys
import boto3, botocore.config, botocore.exceptions, requests

origin_http, origin_https, forbidden, moto = sys.argv[1:5]
out = {}
targets = [
    ("http", origin_http + "/hello"),
    ("https", origin_https + "/hello"),
    ("denied_http", forbidden.replace("https", "http") + "/x"),
    ("denied_https", forbidden + "/x"),
]
for name, url in targets:
    try:
        r = requests.get(url, timeout=10)
        out[name] = [r.status_code, r.text]
    except requests.RequestException as e:
        out[name] = ["error", str(e)]
cfg = botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5)
s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1", config=cfg)
s3.create_bucket(Bucket="egress-test")
s3.put_object(Bucket="egress-test", Key="k", Body=b"through the proxy")
out["s3_get"] = s3.get_object(Bucket="egress-test", Key="k")["Body"].read().decode()
bad = boto3.client("s3", endpoint_url=forbidden, region_name="us-east-1", config=cfg)
try:
    bad.list_buckets()
    out["s3_denied"] = "no error"
except botocore.exceptions.BotoCoreError as e:
    out["s3_denied"] = type(e).__name__ + ": " + str(e) + " " + str(getattr(e, "kwargs", {}).get("error", ""))
print(json.dumps(out))
"""


@pytest.mark.slow
async def test_child_app_requests_and_boto3(
    make_proxy: ProxyFactory, origins: Origins, tls: Tls, forbidden: Forbidden, tmp_path: Path
) -> None:
    """An unmodified app in a subprocess, configured only by proxy_environment(): requests and boto3
    reach allowed hosts, and a denied host is a clear 403 error for both, never a silent bypass."""
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address=ORIGIN_IP, port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        proxy = await make_proxy()
        script = tmp_path / "child.py"
        script.write_text(CHILD_APP)
        env = {
            "PATH": os.environ["PATH"],
            **proxy_environment(proxy.port),
            "REQUESTS_CA_BUNDLE": str(tls.cert),
            "AWS_CA_BUNDLE": str(tls.cert),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            origins.http,
            origins.https,
            f"https://{FORBIDDEN_IP}:{forbidden.port}",
            f"http://{host}:{port}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        result = json.loads(out)
    finally:
        moto.stop()
    assert result["http"] == [200, "hello from origin"]
    assert result["https"] == [200, "hello from origin"]
    assert result["denied_http"][0] == 403 and "denied by deny rule" in result["denied_http"][1]
    assert result["denied_https"][0] == "error" and "403" in result["denied_https"][1]
    assert result["s3_get"] == "through the proxy"
    assert "ProxyConnectionError" in result["s3_denied"] and "403 Forbidden" in result["s3_denied"]
    assert forbidden.connections() == 0
    assert proxy.stats.denied >= 3  # botocore may try the denied endpoint more than once


# ------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize("method", ["CONNECT", "GET"])
async def test_denied_is_403_and_the_origin_never_sees_a_connection(
    proxy: EgressProxy, forbidden: Forbidden, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Threat: an app (or injected code) reaching a host the measured policy forbids. The check
    happens before any connection is made, and the answer names the rule."""
    target = f"{FORBIDDEN_IP}:{forbidden.port}"
    line = f"CONNECT {target}" if method == "CONNECT" else f"GET http://{target}/secret?token=abc"
    with caplog.at_level(logging.INFO, logger="sidecar.net.egress"):
        answer = await raw(proxy.port, f"{line} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(), method)
    assert answer.status == 403
    assert answer.body == b"blocked by egress policy: denied by deny rule '127.0.0.3'\n"
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert forbidden.connections() == 0
    record = next(r for r in caplog.records if r.getMessage() == "egress")
    fields = record.sidecar_fields  # type: ignore[attr-defined]
    assert fields["status"] == 403 and fields["allowed"] is False and fields["rule"] == FORBIDDEN_IP
    # Threat: secrets in URLs ending up in logs. Only host, port and method are logged.
    assert "token" not in caplog.text and "secret" not in caplog.text


async def test_no_allow_rule_is_denied(proxy: EgressProxy) -> None:
    answer = await raw(
        proxy.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "CONNECT"
    )
    assert (answer.status, answer.body) == (403, b"blocked by egress policy: denied: no allow rule matches\n")


async def test_numeric_spellings_are_checked_as_the_address_they_are(
    proxy: EgressProxy, forbidden: Forbidden
) -> None:
    """Threat: a denied IP written so that a string match misses it (2130706435 is 127.0.0.3)."""
    answer = await raw(
        proxy.port, f"CONNECT 2130706435:{forbidden.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT"
    )
    assert answer.status == 403
    assert forbidden.connections() == 0


class FakeResolver:
    """Stands in for loop.getaddrinfo: answers from a script, one answer per call."""

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.calls = 0

    async def __call__(self, host: str, port: int, **kw: Any) -> list[Any]:
        addresses = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in addresses]


async def test_name_resolving_to_a_denied_address_is_refused(
    make_proxy: ProxyFactory, forbidden: Forbidden, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threat: an allowed *name* that resolves to a denied address (internal network, metadata).
    Every resolved address is checked; one denied address is enough to refuse."""
    proxy = await make_proxy(allow=["**.example.test"])
    resolver = FakeResolver([[ORIGIN_IP, FORBIDDEN_IP]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolver)
    answer = await raw(
        proxy.port, f"CONNECT a.example.test:{forbidden.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT"
    )
    assert answer.status == 403
    assert b"resolves to 127.0.0.3, denied by deny rule '127.0.0.3'" in answer.body
    assert forbidden.connections() == 0


async def test_connects_to_the_checked_address_not_a_second_lookup(
    make_proxy: ProxyFactory, origins: Origins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threat: DNS rebinding. The first answer is allowed, a second lookup would give a denied
    address; the proxy resolves once and connects to what it checked."""
    proxy = await make_proxy(allow=["**.example.test"])
    resolver = FakeResolver([[ORIGIN_IP], [FORBIDDEN_IP]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolver)
    r = await asyncio.to_thread(get, f"http://a.example.test:{origins.http_port}/echo", proxy.url)
    assert r.status_code == 200
    assert dict(r.json()["headers"])["host"] == f"a.example.test:{origins.http_port}"
    assert resolver.calls == 1


# ------------------------------------------------------------------------------------- bad requests

MALFORMED = [
    ("bad request line", b"GARBAGE\r\n\r\n", 400, b"illegal request line"),
    ("control bytes", b"GET http://127.0.0.2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"bad request"),
    ("CONNECT without port", b"CONNECT 127.0.0.2 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"has no port"),
    ("CONNECT port 0", b"CONNECT 127.0.0.2:0 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"out of range"),
    ("CONNECT port too big", b"CONNECT 127.0.0.2:70000 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"out of range"),
    ("CONNECT URL", b"CONNECT http://127.0.0.2:80/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"needs host:port"),
    (
        "CONNECT with body",
        b"CONNECT 127.0.0.2:80 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        400,
        b"no body",
    ),
    (
        "bad header",
        b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
        400,
        b"illegal header line",
    ),
    ("missing Host", b"GET http://127.0.0.2/ HTTP/1.1\r\n\r\n", 400, b"Host"),
    ("two Hosts", b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"multiple Host"),
    (
        "conflicting lengths",
        b"POST http://127.0.0.2/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
        b"Content-Length",
    ),
    (
        "gzip framing",
        b"POST http://127.0.0.2/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
        b"chunked",
    ),
    (
        "HTTP/2.0",
        b"GET http://127.0.0.2/ HTTP/2.0\r\nHost: x\r\n\r\n",
        400,
        b"HTTP version 2.0 is not supported",
    ),
    ("HTTP/0.9 style", b"GET http://127.0.0.2/\r\n\r\n", 400, b"illegal request line"),
    ("TRACE", b"TRACE http://127.0.0.2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"method TRACE is not supported"),
    ("origin form", b"GET /hello HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n", 400, b"this is a proxy"),
    ("https absolute", b"GET https://127.0.0.2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"go through CONNECT"),
    ("ftp scheme", b"GET ftp://127.0.0.2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"unsupported URL scheme 'ftp'"),
    ("userinfo", b"GET http://127.0.0.2@127.0.0.3/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"user info"),
    ("percent host", b"GET http://exa%6dple.com/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"'%' is not allowed"),
    ("bad port", b"GET http://127.0.0.2:8x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"bad URL"),
    ("wildcard host", b"CONNECT *.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"wildcard"),
    (
        "headers too large",
        b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        431,
        b"larger than",
    ),
    ("endless line", b"GET http://127.0.0.2/" + b"a" * 40000, 431, b"larger than"),
]


@pytest.mark.parametrize(("name", "data", "status", "snippet"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_requests_get_a_clear_status(
    proxy: EgressProxy, name: str, data: bytes, status: int, snippet: bytes
) -> None:
    """Threat: parser confusion (request smuggling, header injection) and crashes on hostile input.
    h11 parses; every class of bad input gets a specific status and a one-line text body."""
    method = "CONNECT" if data.startswith(b"CONNECT") else "GET"
    answer = await raw(proxy.port, data, method)
    assert answer.status == status, answer.body
    assert snippet in answer.body
    assert answer.body.endswith(b"\n") and answer.body.count(b"\n") == 1
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["connection"] == "close"
    assert b"Traceback" not in answer.body
    assert proxy.stats.bad_requests == 1 and proxy.stats.tunnels == proxy.stats.forwarded == 0


async def test_content_length_with_transfer_encoding_is_refused(proxy: EgressProxy) -> None:
    # Threat: request smuggling: both framings reached the origin, which may split the body by Content-Length.
    seen: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))

    async with tcp_server(origin) as port:
        data = (
            f"POST http://{ORIGIN_IP}:{port}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode()
        answer = await raw(proxy.port, data, "POST")
    assert answer.status == 400 and b"not both" in answer.body
    assert seen == [] and proxy.stats.bad_requests == 1


@pytest.mark.parametrize(
    "framing",
    [
        b"Connection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        b"Connection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_connection_cannot_remove_the_body_framing(proxy: EgressProxy, framing: bytes) -> None:
    # Threat: a client header turned into a 500 and a body-less request at the origin (framing dropped).
    seen: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head + await reader.read(65536))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with tcp_server(origin) as port:
        data = f"POST http://{ORIGIN_IP}:{port}/ HTTP/1.1\r\nHost: x\r\n".encode() + framing
        answer = await raw(proxy.port, data, "POST")
    assert answer.status == 200 and answer.body == b"ok"
    assert len(seen) == 1 and b"hello" in seen[0]


async def test_no_interim_response_reaches_an_http_1_0_client(proxy: EgressProxy) -> None:
    # Threat: desync: an HTTP/1.0 client takes a forwarded 100 as the answer, the real one as its body.
    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with tcp_server(origin) as port:
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.setblocking(False)
            await loop.sock_sendall(sock, f"GET http://{ORIGIN_IP}:{port}/ HTTP/1.0\r\n\r\n".encode())
            answer = await read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok"), answer


async def test_incomplete_head_times_out_with_408(make_proxy: ProxyFactory) -> None:
    """Threat: slow-loris clients holding connections open by never finishing a request head."""
    proxy = await make_proxy(request_timeout=0.3)
    answer = await raw(proxy.port, b"GET http://127.0.0.2/ HTTP/1.1\r\nHost:")
    assert answer.status == 408 and b"no complete request head" in answer.body


async def test_a_head_trickled_a_byte_at_a_time_still_times_out(make_proxy: ProxyFactory) -> None:
    """Threat (found by review): the timeout restarted at every byte, so a client sending one byte
    just inside it held a connection slot for max_header_bytes x request_timeout."""
    proxy = await make_proxy(request_timeout=0.5)

    def trickle() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.settimeout(0.2)
            started = time.monotonic()
            for byte in b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: 127.0.0.2\r\nX-Slow: " + b"a" * 100:
                try:
                    s.sendall(bytes([byte]))
                    answer = s.recv(100)
                except TimeoutError:
                    continue
                except OSError:
                    return b""
                if answer:
                    assert time.monotonic() - started < 3
                    return answer
                return b""
            return b"never refused"

    answer = await asyncio.to_thread(trickle)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


async def test_silent_client_is_closed_after_request_timeout(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(request_timeout=0.3)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.settimeout(5)
        assert await asyncio.to_thread(s.recv, 100) == b""
    await asyncio.sleep(0.05)
    assert proxy.active == 0


async def test_many_bad_clients_never_take_the_proxy_down(proxy: EgressProxy, origins: Origins) -> None:
    """Garbage of every shape, abrupt closes mid-head and resets: the proxy keeps serving."""
    for data in [
        b"",
        b"\r\n" * 1000,
        os.urandom(5000),
        b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: x",
        b"\xff" * 100,
    ]:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    r = await asyncio.to_thread(get, f"{origins.http}/hello", proxy.url)
    assert r.status_code == 200


async def test_close_delimited_origin_response(proxy: EgressProxy) -> None:
    """An HTTP/1.0-style origin (no Content-Length, body ends at close) still reaches an HTTP/1.1
    client intact; h11 re-frames it (chunked) so the client connection can stay open."""

    async def old_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"old school " * 1000)
        await writer.drain()
        writer.close()

    async with tcp_server(old_origin) as port:
        r = await asyncio.to_thread(get, f"http://{ORIGIN_IP}:{port}/", proxy.url)
    assert r.status_code == 200 and r.content == b"old school " * 1000


@needs_curl
async def test_expect_100_continue(proxy: EgressProxy, origins: Origins, tmp_path: Path) -> None:
    """curl waits for 100 Continue before a large body: the origin's 100 is passed through."""
    body = tmp_path / "body"
    body.write_bytes(os.urandom(900_000))  # under aiohttp's 1 MiB default limit
    env = {"PATH": os.environ["PATH"]}
    start = time.monotonic()
    rc, out, err = await run_curl(
        "-x",
        proxy.url,
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{body}",
        f"{origins.http}/echo",
        env=env,
    )
    assert rc == 0, err
    info = json.loads(out)
    assert info["sha256"] == hashlib.sha256(body.read_bytes()).hexdigest()
    assert ["expect", "100-continue"] in info["headers"]
    assert time.monotonic() - start < 0.9  # curl gives up waiting for the 100 after 1 s


# ------------------------------------------------------------------------------ failures and limits


def closed_port() -> int:
    return free_port()  # outside the ephemeral range, so no outgoing connection takes it meanwhile


@pytest.mark.parametrize("method", ["CONNECT", "GET"])
async def test_refused_upstream_is_502(proxy: EgressProxy, method: str) -> None:
    port = closed_port()
    line = f"CONNECT 127.0.0.1:{port}" if method == "CONNECT" else f"GET http://127.0.0.1:{port}/"
    answer = await raw(proxy.port, f"{line} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), method)
    assert answer.status == 502
    assert answer.body == f"connecting to 127.0.0.1:{port} failed: Connection refused\n".encode()


async def test_unresolvable_name_is_502(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(allow=["**.invalid"])
    answer = await raw(proxy.port, b"CONNECT nowhere.invalid:443 HTTP/1.1\r\nHost: x\r\n\r\n", "CONNECT")
    assert answer.status == 502 and answer.body.startswith(b"cannot resolve nowhere.invalid")


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose SYNs are dropped: a listener with a full accept queue (connect never completes)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    try:
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


async def test_connect_timeout_is_504(make_proxy: ProxyFactory, blackhole: int) -> None:
    proxy = await make_proxy(connect_timeout=0.3)
    start = time.monotonic()
    answer = await raw(
        proxy.port, f"CONNECT 127.0.0.1:{blackhole} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT"
    )
    assert answer.status == 504
    assert answer.body == f"connecting to 127.0.0.1:{blackhole} timed out after 0.3 s\n".encode()
    assert time.monotonic() - start < 3


async def test_origin_that_never_answers_is_504(make_proxy: ProxyFactory) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(10)
        writer.close()

    proxy = await make_proxy(idle_timeout=0.3)
    async with tcp_server(silent) as port:
        answer = await raw(proxy.port, f"GET http://{ORIGIN_IP}:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.status == 504 and b"no response from 127.0.0.2" in answer.body


async def test_origin_closing_without_answer_is_502(proxy: EgressProxy) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    async with tcp_server(rude) as port:
        answer = await raw(proxy.port, f"GET http://{ORIGIN_IP}:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.status == 502 and b"closed the connection without a response" in answer.body


async def test_over_max_tunnels_is_503(make_proxy: ProxyFactory) -> None:
    """Threat: one app exhausting file descriptors and memory with connections. Over the limit a
    client gets 503 with Retry-After, and a slot frees up when a tunnel ends."""
    proxy = await make_proxy(max_tunnels=2)
    async with tcp_server(echo_handler) as port:
        target = f"{ORIGIN_IP}:{port}"
        held = [(await open_tunnel(proxy, target))[0] for _ in range(2)]
        try:
            answer = await raw(
                proxy.port, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT"
            )
            assert answer.status == 503
            assert answer.headers["retry-after"] == "1"
            assert b"limit of 2 connections" in answer.body
            held.pop().close()
            for _ in range(100):
                if proxy.active < 2:
                    break
                await asyncio.sleep(0.02)
            sock, _ = await open_tunnel(proxy, target)
            held.append(sock)
        finally:
            for s in held:
                s.close()
    assert proxy.stats.busy == 1


async def test_idle_tunnel_is_closed(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(idle_timeout=0.4)
    loop = asyncio.get_running_loop()
    async with tcp_server(echo_handler) as port:
        sock, _ = await open_tunnel(proxy, f"{ORIGIN_IP}:{port}")
        with sock:
            await loop.sock_sendall(sock, b"ping")
            assert await asyncio.wait_for(loop.sock_recv(sock, 10), 5) == b"ping"
            start = time.monotonic()
            assert await read_to_eof(sock, timeout=5) == b""
            assert 0.3 < time.monotonic() - start < 3


# ------------------------------------------------------------------------------------------ tunnels


async def test_half_close_through_the_tunnel_and_64_mib(proxy: EgressProxy) -> None:
    """The client sends 64 MiB, shuts down its sending half, and still reads the origin's answer:
    EOF crosses the proxy as a half-close and every byte arrives (the hash matches)."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(1 << 20) * 64
    async with tcp_server(hash_handler) as port:
        sock, _ = await open_tunnel(proxy, f"{ORIGIN_IP}:{port}")
        with sock:
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            answer = await read_to_eof(sock)
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    for _ in range(100):
        if proxy.stats.bytes_up:
            break
        await asyncio.sleep(0.02)
    assert proxy.stats.bytes_up == len(payload)


async def test_bytes_pipelined_after_connect_are_delivered(proxy: EgressProxy) -> None:
    """A client that sends its first bytes (a TLS ClientHello) together with the CONNECT head."""
    loop = asyncio.get_running_loop()
    async with tcp_server(echo_handler) as port:
        sock, early = await open_tunnel(proxy, f"{ORIGIN_IP}:{port}", extra=b"hello right away")
        with sock:
            got = early
            while len(got) < 16:
                got += await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
    assert got == b"hello right away"


async def test_connect_with_zero_content_length_is_accepted(proxy: EgressProxy) -> None:
    """Some clients send Content-Length: 0 on CONNECT; only a real body is refused."""
    loop = asyncio.get_running_loop()
    async with tcp_server(echo_handler) as port:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.setblocking(False)
            head = f"CONNECT {ORIGIN_IP}:{port} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nping"
            await loop.sock_sendall(sock, head.encode())
            got = b""
            while not got.endswith(b"ping"):
                got += await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
    assert got == b"HTTP/1.1 200 Connection Established\r\n\r\nping"


# ---------------------------------------------------------------------------------------- upstreams


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: a short directory under /tmp."""
    d = Path(tempfile.mkdtemp(prefix="egr", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@pytest.fixture
async def parent(short_dir: Path) -> AsyncIterator[Any]:
    """The parent's egress endpoint (sidecar.host.egress) on a Unix socket, standing in for vsock.
    Its policy is stricter than the enclave's: it refuses 127.0.0.1, which the enclave allows."""
    from sidecar.host.egress import start_host_egress

    policy = EgressPolicy([ORIGIN_IP, "host"], ["127.0.0.1"])
    host = await start_host_egress(
        vsock.Endpoint("unix", path=str(short_dir / "egress.sock")), policy, outside_address=ORIGIN_IP
    )
    try:
        yield host
    finally:
        await host.close()


async def test_vsock_upstream_through_the_parent(
    make_proxy: ProxyFactory, parent: Any, origins: Origins, tls: Tls
) -> None:
    proxy = await make_proxy(upstream=VsockUpstream(parent.endpoint))
    r = await asyncio.to_thread(get, f"{origins.https}/hello", proxy.url, tls)
    assert (r.status_code, r.text) == (200, "hello from origin")
    r = await asyncio.to_thread(get, f"{origins.http}/echo", proxy.url)
    assert dict(r.json()["headers"])["host"] == f"{ORIGIN_IP}:{origins.http_port}"
    assert parent.stats.tunnels == 2


async def test_vsock_upstream_parent_refusals(make_proxy: ProxyFactory, parent: Any) -> None:
    """Defence in depth: the parent re-checks; its refusal reads as 403, a failed connect as 502."""
    proxy = await make_proxy(upstream=VsockUpstream(parent.endpoint))
    answer = await raw(proxy.port, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n", "CONNECT")
    assert answer.status == 403 and b"parent refused 127.0.0.1:443" in answer.body
    port = closed_port()
    answer = await raw(
        proxy.port, f"CONNECT {ORIGIN_IP}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT"
    )
    assert answer.status == 502 and b"parent refused" in answer.body and b"os error 111" in answer.body


async def test_vsock_upstream_parent_down_is_502(make_proxy: ProxyFactory, short_dir: Path) -> None:
    proxy = await make_proxy(
        upstream=VsockUpstream(vsock.Endpoint("unix", path=str(short_dir / "none.sock")))
    )
    answer = await raw(proxy.port, f"CONNECT {ORIGIN_IP}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT")
    assert answer.status == 502 and b"cannot reach the parent at unix:" in answer.body


async def test_parent_loopback_name_needs_an_explicit_rule(
    make_proxy: ProxyFactory, parent: Any, origins: Origins
) -> None:
    """Threat: Enclaver's special name "host" (the parent's own loopback) opened by a wildcard
    allow rule such as '*'. Only a rule that names 'host' lets it through."""
    wild = await make_proxy(allow=["*"], upstream=VsockUpstream(parent.endpoint))
    answer = await raw(
        wild.port, f"CONNECT host:{origins.http_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT"
    )
    assert answer.status == 403 and b"parent's own loopback" in answer.body
    assert parent.stats.requests == 0
    named = await make_proxy(allow=["host"], upstream=VsockUpstream(parent.endpoint))
    r = await asyncio.to_thread(get, f"http://host:{origins.http_port}/hello", named.url)
    assert (r.status_code, r.text) == (200, "hello from origin")


async def test_http_proxy_upstream_chain(make_proxy: ProxyFactory, origins: Origins, tls: Tls) -> None:
    """Our proxy chained to another instance of itself: CONNECT and plain HTTP both travel as
    CONNECT through the next proxy; the next proxy's 403 comes back as 403."""
    outer = await make_proxy(allow=[ORIGIN_IP, "127.0.0.1"], deny=[])  # the next hop; refuses 127.0.0.1 below
    inner = await make_proxy(
        allow=[ORIGIN_IP, "127.0.0.1"],
        deny=[],
        upstream=HttpProxyUpstream(f"http://u:p@127.0.0.1:{outer.port}"),
    )
    r = await asyncio.to_thread(get, f"{origins.https}/hello", inner.url, tls)
    assert (r.status_code, r.text) == (200, "hello from origin")
    r = await asyncio.to_thread(get, f"{origins.http}/echo", inner.url)
    assert r.status_code == 200 and "proxy-authorization" not in dict(r.json()["headers"])
    assert outer.stats.tunnels == 2
    strict = await make_proxy(allow=[ORIGIN_IP], deny=[])
    via_strict = await make_proxy(allow=["127.0.0.1"], deny=[], upstream=HttpProxyUpstream(strict.url))
    answer = await raw(via_strict.port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n", "CONNECT")
    assert answer.status == 403 and b"answered 403 Forbidden to CONNECT 127.0.0.1:9" in answer.body
    # The credentials in the upstream URL never show up in messages or logs.
    assert (
        "u:p" not in str(HttpProxyUpstream("http://u:p@127.0.0.1:1")) and "p@" not in inner.upstream.__str__()
    )


async def test_http_proxy_upstream_keeps_bytes_sent_right_after_200(make_proxy: ProxyFactory) -> None:
    """Server-first protocols (SMTP, SSH banners): bytes the origin sends right after the next
    proxy's 200 must not be swallowed while reading that 200."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner from origin\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    outer = await make_proxy()
    inner = await make_proxy(upstream=HttpProxyUpstream(outer.url))
    loop = asyncio.get_running_loop()
    async with tcp_server(banner) as port:
        sock, early = await open_tunnel(inner, f"{ORIGIN_IP}:{port}")
        with sock:
            got = early
            while not got.endswith(b"\r\n"):
                got += await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
    assert got == b"220 banner from origin\r\n"


@pytest.mark.slow
async def test_http_proxy_upstream_tinyproxy(
    make_proxy: ProxyFactory, origins: Origins, tls: Tls, tmp_path: Path
) -> None:
    """Chained to a different implementation (tinyproxy) to show the CONNECT we send is standard."""
    binary = "/usr/bin/tinyproxy"
    if not os.path.exists(binary):
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")
    port = closed_port()
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            Port {port}
            Listen 127.0.0.1
            Timeout 30
            MaxClients 20
            Allow 127.0.0.1
            ConnectPort {origins.https_port}
            ConnectPort {origins.http_port}
            LogLevel Critical
            """
        )
    )
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            await asyncio.sleep(0.05)
        proxy = await make_proxy(upstream=HttpProxyUpstream(f"http://127.0.0.1:{port}"))
        r = await asyncio.to_thread(get, f"{origins.https}/hello", proxy.url, tls)
        assert (r.status_code, r.text) == (200, "hello from origin")
        r = await asyncio.to_thread(get, f"{origins.http}/hello", proxy.url)
        assert (r.status_code, r.text) == (200, "hello from origin")
    finally:
        proc.terminate()
        proc.wait(10)


class StallingUpstream:
    async def open(self, host: str, port: int, timeout: float) -> socket.socket:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")


async def test_slow_upstream_of_any_kind_is_bounded_by_connect_timeout(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(upstream=StallingUpstream(), connect_timeout=0.2)
    answer = await raw(proxy.port, f"CONNECT {ORIGIN_IP}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT")
    assert answer.status == 504


class FailingUpstream:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def open(self, host: str, port: int, timeout: float) -> socket.socket:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "body"),
    [
        (UpstreamError(503, "parent busy"), 503, b"parent busy\n"),
        (OSError(113, "No route to host"), 502, b"connecting to 127.0.0.2:443 failed: No route to host\n"),
        (
            RuntimeError("secret detail"),
            502,
            b"connecting to 127.0.0.2:443 failed (internal error in the upstream)\n",
        ),
    ],
)
async def test_upstream_errors_map_to_statuses(
    make_proxy: ProxyFactory, error: BaseException, status: int, body: bytes
) -> None:
    """Threat: internals leaking to clients. A bug in an upstream still gets the client a status,
    never a traceback or the exception's text."""
    proxy = await make_proxy(upstream=FailingUpstream(error))
    answer = await raw(proxy.port, f"CONNECT {ORIGIN_IP}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT")
    assert (answer.status, answer.body) == (status, body)


async def test_a_bug_in_the_proxy_is_a_bare_500(
    proxy: EgressProxy, origins: Origins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threat: internals leaking to clients, and one bad request taking the proxy down."""

    def broken(request: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(proxy, "_parse_target", broken)
    answer = await raw(proxy.port, f"CONNECT {ORIGIN_IP}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "CONNECT")
    assert (answer.status, answer.body) == (500, b"internal error in the egress proxy\n")
    monkeypatch.undo()
    r = await asyncio.to_thread(get, f"{origins.http}/hello", proxy.url)
    assert r.status_code == 200


# ------------------------------------------------------------------------------------ configuration


def test_proxy_environment() -> None:
    env = proxy_environment(10000)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == "http://127.0.0.1:10000"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"


def test_upstream_from_settings() -> None:
    base = NetworkSettings()
    assert isinstance(upstream_from_settings(base), DirectUpstream)
    v = upstream_from_settings(replace(base, upstream="vsock", parent_cid=7, egress_vsock_port=1234))
    assert isinstance(v, VsockUpstream) and str(v) == "vsock:7:1234"
    u = upstream_from_settings(replace(base, upstream="unix:/run/egress.sock"))
    assert isinstance(u, VsockUpstream) and str(u) == "unix:/run/egress.sock"
    h = upstream_from_settings(replace(base, upstream="http://proxy.internal:3128"))
    assert isinstance(h, HttpProxyUpstream) and str(h) == "http://proxy.internal:3128"
    with pytest.raises(ValueError, match="expected direct, vsock"):
        upstream_from_settings(replace(base, upstream="socks5://x:1"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://p:3128", "expected http://HOST:PORT"),
        ("http://p", "host and port"),
        ("http://p:99999", "out of range"),
        ("http://p:3128/path", "no path"),
    ],
)
def test_http_proxy_upstream_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HttpProxyUpstream(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://u:S3cret@p:99999",
        "https://u:S3cret@p:3128",
        "http://u:S3cret@p:3128/x",
        "socks5://u:S3cret@p:1",
    ],
)
def test_upstream_errors_never_show_the_proxy_password(url: str) -> None:
    """Threat (found by review): the error, printed and logged, carried the proxy's password."""
    from dataclasses import replace

    from sidecar.config import NetworkSettings

    with pytest.raises(ValueError) as info:
        upstream_from_settings(replace(NetworkSettings(), upstream=url))
    assert "S3cret" not in str(info.value) and "***@p" in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://u:Pa/55w0rd@p:3128", "http://u:Pa?55w0rd@p:3128", "http://u:Pa#55w0rd@p:3128"]
)
def test_a_password_with_an_unencoded_delimiter_is_never_shown(url: str) -> None:
    # Threat: '/', '?' or '#' in the password ended the authority early, and the message showed its parts.
    with pytest.raises(ValueError) as info:
        upstream_from_settings(replace(NetworkSettings(), upstream=url))
    assert "Pa" not in str(info.value) and "55w0rd" not in str(info.value), str(info.value)
    assert "***@p:3128" in str(info.value)


async def test_the_started_event_names_the_upstream_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import contextlib
    import types

    from sidecar.config import NetworkSettings
    from sidecar.net import plugin
    from sidecar.net.policy import EgressPolicy

    setup = plugin.NetworkSetup(
        policy=EgressPolicy([], []),
        proxy_port=0,
        network=NetworkSettings(upstream="http://proxyuser:S3cretPassw0rd@127.0.0.1:3128"),
    )
    services = types.SimpleNamespace(extra={plugin.SETUP_KEY: setup}, http=None, status_listeners=[])
    context = types.SimpleNamespace(services=services)
    with caplog.at_level(logging.INFO, logger="sidecar.net"):
        async with contextlib.asynccontextmanager(plugin.lifespan)(context):
            pass
    started = next(r for r in caplog.records if r.getMessage() == "egress_proxy_started")
    assert started.sidecar_fields["upstream"] == "http://127.0.0.1:3128"  # type: ignore[attr-defined]
    assert "S3cret" not in caplog.text


# ----------------------------------------------------------------------------- sidecar egress serve


@pytest.mark.slow
async def test_serve_command_runs_until_sigterm(tmp_path: Path, origins: Origins) -> None:
    manifest = tmp_path / "enclaver.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            version: v1
            name: egress-test
            target: "t:latest"
            sources:
              app: "a:latest"
            egress:
              proxy_port: 10000
              allow: ["{ORIGIN_IP}"]
            """
        )
    )
    config = tmp_path / "sidecar.yaml"
    config.write_text("network:\n  idle_timeout: 5\n")
    code = "import sys; from sidecar.net.serve_command import serve; serve(sys.argv[1:])"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--manifest",
        str(manifest),
        "--config",
        str(config),
        "--port",
        "0",
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stderr is not None
    try:
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "serve exited before listening"
            if "proxy listening on" in line:
                url = line.split("proxy listening on ", 1)[1].split()[0]
        r = await asyncio.to_thread(get, f"{origins.http}/hello", url)
        assert (r.status_code, r.text) == (200, "hello from origin")
        r = await asyncio.to_thread(get, "http://127.0.0.1:1/", url)
        assert r.status_code == 403
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_command_bad_upstream_is_a_usage_error(tmp_path: Path) -> None:
    manifest = tmp_path / "enclaver.yaml"
    manifest.write_text('version: v1\nname: t\ntarget: "t:1"\nsources:\n  app: "a:1"\n')
    (tmp_path / "sidecar.yaml").write_text("{}\n")
    code = "import sys; from sidecar.net.serve_command import serve; serve(sys.argv[1:])"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--manifest",
            str(manifest),
            "--config",
            str(tmp_path / "sidecar.yaml"),
            "--upstream",
            "ftp://x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "--upstream: network.upstream 'ftp://x'" in proc.stderr
    assert "Traceback" not in proc.stderr
