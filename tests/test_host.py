"""The parent-instance half (``sidecar host``): egress endpoint with the policy re-check, ingress
forwarders, the log/status stream readers, and the command. Over Unix sockets and loopback TCP here;
between network namespaces in test_netns.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from net_helpers import echo_roundtrip, echo_server, recv_all

import sidecar.cli  # noqa: F401  (before sidecar.host.command: the CLI may import it itself)
from sidecar.host.command import HostPlan, host, run_host
from sidecar.host.egress import HostEgress, start_host_egress
from sidecar.host.forward import expand, forward_pairs, start_forwarders
from sidecar.host.streams import follow_log, follow_status, parse_status, sanitize
from sidecar.net import vsock, wire
from sidecar.net.ingress import start_ingress_bridges
from sidecar.net.policy import EgressPolicy
from sidecar.net.streams import start_streams
from sidecar.net.vsock import AddrInfo, Endpoint
from sidecar.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")

# --------------------------------------------------------------------------- helpers


class Origin:
    """A TCP server on 127.0.0.1 that sends ``payload`` to each client, and counts the clients."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.accepted = 0
        self.listener: vsock.Listener | None = None

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.endpoint.port

    async def handle(self, sock: socket.socket) -> None:
        self.accepted += 1
        await asyncio.get_running_loop().sock_sendall(sock, self.payload)
        sock.shutdown(socket.SHUT_WR)
        await recv_all(sock)


@contextlib.asynccontextmanager
async def origin(size: int = 1 << 20) -> AsyncIterator[Origin]:
    o = Origin(random.Random(size).randbytes(size))
    o.listener = await vsock.serve(vsock.tcp("127.0.0.1", 0), o.handle)
    try:
        yield o
    finally:
        await o.listener.close()


class Resolver:
    """A stub DNS: fixed answers, and a record of every name looked up."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[AddrInfo]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (self.answers[host], port))]


@contextlib.asynccontextmanager
async def egress(tmp_path: Path, policy: EgressPolicy | None, **kwargs: Any) -> AsyncIterator[HostEgress]:
    e = await start_host_egress(vsock.unix(tmp_path / "egress.sock"), policy, **kwargs)
    try:
        yield e
    finally:
        await e.close()


async def fetch(ep: Endpoint, host: str, port: int) -> bytes:
    """What the enclave's egress does: connect to the parent, ask for host:port, read to EOF."""
    sock = await vsock.connect(ep, timeout=5)
    try:
        await wire.request_connect(sock, host, port, timeout=5)
        sock.shutdown(socket.SHUT_WR)
        return await asyncio.wait_for(recv_all(sock), 10)
    finally:
        sock.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- egress


async def test_egress_connects_and_relays(tmp_path: Path) -> None:
    async with origin(4 << 20) as o, egress(tmp_path, EgressPolicy(["127.0.0.1"], [])) as e:
        data = await fetch(e.endpoint, "127.0.0.1", o.port)
        assert sha(data) == sha(o.payload)
        assert e.stats.tunnels == 1
        assert e.stats.bytes_down == 4 << 20


async def test_host_means_the_parents_loopback(tmp_path: Path) -> None:
    """Enclaver's special name: "host" (any case) is the parent's 127.0.0.1."""
    async with origin(1000) as o, egress(tmp_path, EgressPolicy(["host"], [])) as e:
        assert await fetch(e.endpoint, "HOST", o.port) == o.payload


@pytest.mark.parametrize("allow", [["**"], ["*"]])
async def test_a_wildcard_does_not_open_the_parents_loopback(tmp_path: Path, allow: list[str]) -> None:
    """Threat (found by review): a compromised enclave app that speaks this protocol itself asks for
    "host"; the enclave's proxy refuses a wildcard for it, and the parent must too."""
    async with origin(1000) as o, egress(tmp_path, EgressPolicy(allow, [])) as e:
        with pytest.raises(wire.ConnectRefused) as info:
            await fetch(e.endpoint, "host", o.port)
        assert info.value.os_code == errno.EACCES
        assert "only an allow rule naming 'host' permits it" in info.value.message


async def test_wire_bytes_from_an_enclaver_client_get_enclavers_answer(tmp_path: Path) -> None:
    async with origin(10) as o, egress(tmp_path, None) as e:
        sock = await vsock.connect(e.endpoint)
        body = b'{"host":"host","port":%d}' % o.port
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, len(body).to_bytes(2, "little") + body)
        assert await asyncio.wait_for(loop.sock_recv(sock, 6), 5) == b'\x04\x00"Ok"'
        sock.close()


async def test_denied_name_is_refused_before_any_lookup_or_connect(tmp_path: Path) -> None:
    """Threat: a compromised enclave app bypasses the enclave's proxy and asks the parent directly
    for a host outside the policy. The parent refuses; no DNS query, no connection leaves."""
    resolver = Resolver({"evil.example.net": "127.0.0.1"})
    policy = EgressPolicy(["api.example.com"], [])
    async with origin() as o, egress(tmp_path, policy, resolver=resolver) as e:
        resolver.answers["evil.example.net"] = "127.0.0.1"
        with pytest.raises(wire.ConnectRefused) as info:
            await fetch(e.endpoint, "evil.example.net", o.port)
        assert info.value.os_code == errno.EACCES
        assert "blocked by the parent's egress policy" in info.value.message
        assert "no allow rule matches" in info.value.message
        assert resolver.asked == []
        assert o.accepted == 0
        assert e.stats.denied == 1


async def test_allowed_name_resolving_to_a_denied_address_is_refused(tmp_path: Path) -> None:
    """Threat: an allowed name whose DNS answer points inside (rebinding to 127.0.0.1, IMDS, the VPC).
    Enclaver's parent would connect; ours re-checks every resolved address against the deny rules."""
    resolver = Resolver({"cdn.example.com": "127.0.0.1"})
    policy = EgressPolicy(["**.example.com"], ["127.0.0.0/8"])
    async with origin() as o, egress(tmp_path, policy, resolver=resolver) as e:
        with pytest.raises(wire.ConnectRefused) as info:
            await fetch(e.endpoint, "cdn.example.com", o.port)
        assert info.value.os_code == errno.EACCES
        assert "resolves to 127.0.0.1, denied by deny rule '127.0.0.0/8'" in info.value.message
        assert resolver.asked == ["cdn.example.com"]
        assert o.accepted == 0


async def test_resolver_gets_the_name_the_policy_checked(tmp_path: Path) -> None:
    """The policy normalises (case, trailing dot, IDNA); the parent looks up exactly that form."""
    resolver = Resolver({"kms.us-east-1.amazonaws.com": "127.0.0.1"})
    async with (
        origin(100) as o,
        egress(tmp_path, EgressPolicy(["kms.*.amazonaws.com"], []), resolver=resolver) as e,
    ):
        assert await fetch(e.endpoint, "KMS.us-east-1.AmazonAWS.com.", o.port) == o.payload
        assert resolver.asked == ["kms.us-east-1.amazonaws.com"]


async def test_no_policy_check_connects_where_asked(tmp_path: Path) -> None:
    resolver = Resolver({"anything.test": "127.0.0.1"})
    async with origin(100) as o, egress(tmp_path, None, resolver=resolver) as e:
        assert await fetch(e.endpoint, "anything.test", o.port) == o.payload


async def test_failures_are_answered_with_err(tmp_path: Path) -> None:
    closed_port = free_port()
    async with egress(tmp_path, None, resolver=Resolver({"down.test": "127.0.0.1"})) as e:
        with pytest.raises(wire.ConnectRefused) as info:
            await fetch(e.endpoint, "nxdomain.test", 443)
        assert info.value.os_code == 0  # like Rust's io::Error for a failed lookup
        assert info.value.message == "failed to look up nxdomain.test: Name or service not known"
        with pytest.raises(wire.ConnectRefused) as info:
            await fetch(e.endpoint, "down.test", closed_port)
        assert info.value.os_code == errno.ECONNREFUSED
        assert e.stats.failed == 2


async def test_unencodable_name_is_answered_not_crashed(tmp_path: Path) -> None:
    """Without the policy (which would refuse it first), the system resolver's IDNA step raises
    UnicodeError, not OSError; the enclave still gets an Err."""
    async with egress(tmp_path, None) as e:
        for name in ("x..y", "a" * 64 + ".com"):
            with pytest.raises(wire.ConnectRefused, match="not a valid host name"):
                await fetch(e.endpoint, name, 443)
        assert e.stats.failed == 2


async def test_bad_request_gets_err_and_the_endpoint_keeps_serving(tmp_path: Path) -> None:
    async with origin(10) as o, egress(tmp_path, None) as e:
        sock = await vsock.connect(e.endpoint)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, wire.encode({"host": "x", "port": 0}))
        with pytest.raises(wire.ConnectRefused) as info:
            wire.parse_response(await wire.read_message(sock, timeout=5), "x", 0)
        assert info.value.os_code == errno.EINVAL
        assert "port 0 is out of range" in info.value.message
        sock.close()
        garbage = await vsock.connect(e.endpoint)
        await loop.sock_sendall(garbage, b"\xff\xff" + b"A" * 100)
        with pytest.raises(wire.ConnectRefused, match="over the limit of 1024"):
            wire.parse_response(await wire.read_message(garbage, timeout=5), "x", 0)
        garbage.close()
        assert await fetch(e.endpoint, "127.0.0.1", o.port) == o.payload
        assert e.stats.bad_requests == 2


async def test_silent_client_is_dropped_after_the_request_timeout(tmp_path: Path) -> None:
    async with egress(tmp_path, None, request_timeout=0.2) as e:
        sock = await vsock.connect(e.endpoint)
        t0 = time.monotonic()
        answer = await asyncio.wait_for(wire.read_message(sock), 5)
        assert time.monotonic() - t0 < 2
        assert "timed out" in answer["Err"]["message"]
        sock.close()


async def test_tunnel_limit_answers_eagain(tmp_path: Path) -> None:
    """Threat: an enclave app opening tunnels without end exhausts the parent's descriptors."""
    async with origin(10) as o, egress(tmp_path, None, max_tunnels=1) as e:
        held = await vsock.connect(e.endpoint)
        await wire.request_connect(held, "127.0.0.1", o.port, timeout=5)
        with pytest.raises(wire.ConnectRefused) as info:
            await fetch(e.endpoint, "127.0.0.1", o.port)
        assert info.value.os_code == errno.EAGAIN
        assert e.stats.busy == 1
        held.close()


async def test_close_ends_open_tunnels(tmp_path: Path) -> None:
    async def silent(sock: socket.socket) -> None:
        await asyncio.sleep(3600)

    quiet = await vsock.serve(vsock.tcp("127.0.0.1", 0), silent)
    e = await start_host_egress(vsock.unix(tmp_path / "egress.sock"), None)
    sock = await vsock.connect(e.endpoint)
    await wire.request_connect(sock, "127.0.0.1", quiet.endpoint.port, timeout=5)
    await asyncio.wait_for(e.close(), 2)
    assert await asyncio.wait_for(recv_all(sock), 5) == b""
    sock.close()
    await quiet.close()


# --------------------------------------------------------------------------- forwarders


def test_expand_templates() -> None:
    assert expand("vsock:{cid}:{port}", port=8001, cid=16) == Endpoint("vsock", cid=16, port=8001)
    assert expand("tcp:10.213.0.2:{port}", port=8001, cid=None) == Endpoint(
        "tcp", host="10.213.0.2", port=8001
    )
    assert expand("unix:/run/e/{port}.sock", port=17001, cid=None) == Endpoint(
        "unix", path="/run/e/17001.sock"
    )
    with pytest.raises(ValueError, match="needs the enclave's CID"):
        expand("vsock:{cid}:{port}", port=1, cid=None)
    with pytest.raises(ValueError, match=r"only \{cid\} and \{port\}"):
        expand("tcp:{host}:{port}", port=1, cid=None)
    with pytest.raises(ValueError, match="bad endpoint"):
        expand("vsock:{port}", port=1, cid=None)
    assert forward_pairs([8001], listen_host="0.0.0.0", enclave_template="vsock:{cid}:{port}", cid=16) == [
        (Endpoint("tcp", host="0.0.0.0", port=8001), Endpoint("vsock", cid=16, port=8001))
    ]


async def test_forwarder_to_ingress_bridge_to_app(tmp_path: Path) -> None:
    """The whole ingress path: client -> parent TCP forwarder -> "vsock" (unix here) -> enclave's
    bridge -> the app's TCP listener; 8 MiB each way, hashes checked."""
    async with echo_server(vsock.tcp("127.0.0.1", 0)) as app:
        enclave_side = vsock.unix(tmp_path / "8001.sock")
        bridges = await start_ingress_bridges([(enclave_side, app.endpoint)], idle_timeout=30)
        forwarders = await start_forwarders([(vsock.tcp("127.0.0.1", 0), enclave_side)], idle_timeout=30)
        try:
            await echo_roundtrip(forwarders.endpoints[0], 8 << 20)
        finally:
            await forwarders.close()
            await bridges.close()
        assert forwarders.bridges[0].stats.bytes_in == 8 << 20


# --------------------------------------------------------------------------- stream readers


def test_sanitize_escapes_terminal_control() -> None:
    """Threat: an enclave log line with escape sequences rewrites or hides the operator's terminal."""
    assert sanitize("ok\ttab") == "ok\ttab"
    assert sanitize("\x1b[2J\x1b]0;pwned\x07") == "\\x1b[2J\\x1b]0;pwned\\x07"
    assert sanitize("a\rb\x00c\x7f\x9b") == "a\\x0db\\x00c\\x7f\\x9b"
    assert sanitize("bidi \u202e override") == "bidi \\u202e override"


def test_parse_status() -> None:
    assert parse_status('{"status": "exited", "code": 2}') == {"status": "exited", "code": 2}
    assert parse_status('{ "status": "running" }\n') == {"status": "running"}  # odyn's own format
    assert parse_status('{"status": "pwned"}') is None
    assert parse_status("[1]") is None
    assert parse_status("not json") is None
    assert parse_status("[" * 100_000) is None  # RecursionError, not a crash (found by review)


async def test_follow_log_waits_for_the_enclave_then_prints_lines(tmp_path: Path) -> None:
    import logging

    logger = logging.getLogger(f"test.host.follow.{os.getpid()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    ep = vsock.unix(tmp_path / "log.sock")
    lines: list[str] = []
    follower = asyncio.ensure_future(follow_log(ep, lines.append))
    await asyncio.sleep(0.3)  # the enclave is not up yet: the reader keeps retrying
    streams = await start_streams(ep, None, logger=logger)
    logger.info("boot \x1b[31mred")
    async with asyncio.timeout(5):
        while not lines:
            await asyncio.sleep(0.02)
    entry = json.loads(lines[0])
    assert entry["event"] == "boot \x1b[31mred"  # JSON already escapes it ...
    assert "\x1b" not in lines[0]  # ... and nothing raw reaches the terminal
    # The enclave restarts: the reader reconnects and gets the new enclave's lines.
    await streams.close()
    streams = await start_streams(ep, None, logger=logger)
    logger.info("second boot")
    async with asyncio.timeout(5):
        while not any("second boot" in line for line in lines):
            await asyncio.sleep(0.02)
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    await streams.close()


async def test_follow_status_reports_valid_lines_and_skips_junk(tmp_path: Path) -> None:
    async def junk_then_exit(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        # Deep nesting once killed the follower for good (RecursionError), so a later "exited" was
        # never seen and --exit-with-enclave never exited (found by review).
        junk = b"garbage\n" + b"x" * 5000 + b"\n" + b"[" * 1000 + b"\n"
        await loop.sock_sendall(sock, junk + b'{"status":"exited","code":4}\n')
        await asyncio.sleep(3600)

    server = await vsock.serve(vsock.unix(tmp_path / "status.sock"), junk_then_exit)
    seen: list[dict[str, Any]] = []
    follower = asyncio.ensure_future(follow_status(server.endpoint, seen.append))
    async with asyncio.timeout(5):
        while not seen:
            await asyncio.sleep(0.02)
    assert seen == [{"status": "exited", "code": 4}]
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    await server.close()


# --------------------------------------------------------------------------- run_host and the command


def plan(tmp_path: Path, **overrides: Any) -> HostPlan:
    base: dict[str, Any] = {
        "forwards": [],
        "egress_listen": vsock.unix(tmp_path / "egress.sock"),
        "log_endpoint": vsock.unix(tmp_path / "log.sock"),
        "status_endpoint": vsock.unix(tmp_path / "status.sock"),
        "policy": EgressPolicy(["host"], []),
        "idle_timeout": 30.0,
        "connect_timeout": 5.0,
        "max_tunnels": 8,
        "exit_with_enclave": False,
    }
    base.update(overrides)
    return HostPlan(**base)


async def test_run_host_serves_until_stopped(tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_host(plan(tmp_path), stop))
    egress_ep = vsock.unix(tmp_path / "egress.sock")
    async with origin(1000) as o:
        async with asyncio.timeout(5):
            while not Path(egress_ep.path).exists():
                await asyncio.sleep(0.02)
        assert await fetch(egress_ep, "host", o.port) == o.payload
    stop.set()
    assert await asyncio.wait_for(task, 5) == 0
    assert not Path(egress_ep.path).exists()


async def test_run_host_exits_with_the_enclaves_code(tmp_path: Path) -> None:
    streams = await start_streams(None, vsock.unix(tmp_path / "status.sock"))
    task = asyncio.ensure_future(run_host(plan(tmp_path, log_endpoint=None, exit_with_enclave=True)))
    await asyncio.sleep(0.2)
    streams.set_status("exited", code=3)
    assert await asyncio.wait_for(task, 5) == 3
    await streams.close()


async def test_run_host_start_failure_closes_what_started(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    bad = plan(tmp_path, forwards=[(vsock.unix(taken), vsock.unix(tmp_path / "x.sock"))])
    with pytest.raises(FileExistsError):
        await run_host(bad)
    assert not (tmp_path / "egress.sock").exists()


def write_manifest(path: Path, ports: Sequence[int], allow: Sequence[str], deny: Sequence[str] = ()) -> Path:
    manifest = {
        "version": "v1",
        "name": "host-test",
        "target": "host-test:latest",
        "sources": {"app": "host-test:latest"},
        "ingress": [{"listen_port": p} for p in ports],
        "egress": {"allow": list(allow), "deny": list(deny)},
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "needs the enclave's CID (--cid)"),
        (["--cid", "16", "--egress-listen", "http://x"], "bad endpoint 'http://x'"),
        (["--cid", "2"], "Invalid value for '--cid'"),
        (["--enclave", "tcp:{host}:{port}"], "only {cid} and {port}"),
    ],
)
def test_host_command_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    manifest = write_manifest(tmp_path / "enclaver.yaml", [8001], ["host"])
    result = CliRunner().invoke(host, ["--manifest", str(manifest), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_host_command_config_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(host, ["--manifest", str(tmp_path / "missing.yaml"), "--cid", "16"])
    assert result.exit_code == 2
    assert "missing.yaml" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: v1\nname: x\n")
    result = CliRunner().invoke(host, ["--manifest", str(bad), "--cid", "16"])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output


def test_host_command_reports_a_port_in_use(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    manifest = write_manifest(tmp_path / "enclaver.yaml", [port], ["host"])
    args = ["--manifest", str(manifest), "--listen-host", "127.0.0.1", "--no-streams"]
    args += ["--enclave", f"unix:{tmp_path}/{{port}}.sock", "--egress-listen", f"unix:{tmp_path}/e.sock"]
    try:
        result = CliRunner().invoke(host, args)
    finally:
        busy.close()
    assert result.exit_code == 1
    assert "cannot start" in result.output
    assert "Address already in use" in result.output


@pytest.mark.slow
def test_host_command_runs_until_sigterm(tmp_path: Path) -> None:
    """The real command in its own process: serve egress, print the enclave's log, exit 0 on SIGTERM."""
    port = free_port()
    manifest = write_manifest(tmp_path / "enclaver.yaml", [port], ["host"])
    script = (
        "import asyncio, logging, sys\n"
        "from sidecar.net.streams import start_streams\n"
        "from sidecar.net.vsock import parse_endpoint\n"
        "async def main():\n"
        "    log = logging.getLogger('enclave.app'); log.setLevel(logging.INFO)\n"
        f"    s = await start_streams(parse_endpoint('unix:{tmp_path}/17001.sock'), "
        f"parse_endpoint('unix:{tmp_path}/17000.sock'), logger=log)\n"
        "    s.set_status('ready'); log.info('hello_from_the_enclave')\n"
        "    print('READY', flush=True); await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    enclave = subprocess.Popen([PY, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert enclave.stdout is not None
    assert enclave.stdout.readline().strip() == "READY"
    cmd = [PY, "-m", "sidecar.host", "--manifest", str(manifest), "--listen-host", "127.0.0.1"]
    cmd += ["--enclave", f"unix:{tmp_path}/{{port}}.sock", "--egress-listen", f"unix:{tmp_path}/egress.sock"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the enclave's log line, relayed to stdout
        assert json.loads(line)["event"] == "hello_from_the_enclave"

        async def egress_check() -> bytes:
            async with origin(1 << 16) as o:
                data = await fetch(vsock.unix(tmp_path / "egress.sock"), "host", o.port)
                assert data == o.payload
                with pytest.raises(wire.ConnectRefused, match="blocked"):
                    await fetch(vsock.unix(tmp_path / "egress.sock"), "example.com", 443)
                return data

        asyncio.run(egress_check())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert time.monotonic() - t0 < 5
        events = [json.loads(x)["event"] for x in err.splitlines() if x.startswith("{")]
        for name in ("host_egress_listening", "host_ready", "enclave_status", "host_stopped"):
            assert name in events, err
        assert '"status": "ready"' in err
    finally:
        for p in (proc, enclave):
            if p.poll() is None:
                p.kill()
                p.wait()
        if enclave.stdout:
            enclave.stdout.close()


def test_python_m_sidecar_host_help() -> None:
    out = subprocess.run(
        [PY, "-m", "sidecar.host", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "--no-policy-check" in out.stdout
    assert "--egress-listen" in out.stdout


async def test_forwarded_ingress_is_bounded_by_max_tunnels(tmp_path: Path) -> None:
    """Threat (found by review): no bound on forwarded connections, so idle connections from
    outside used up the process's file descriptors (the egress proxy's too)."""
    async with echo_server(vsock.tcp("127.0.0.1", 0)) as app:
        listen = vsock.tcp("127.0.0.1", free_port())
        stop = asyncio.Event()
        host = asyncio.ensure_future(
            run_host(plan(tmp_path, forwards=[(listen, app.endpoint)], max_tunnels=2, policy=None,
                          egress_listen=None, log_endpoint=None, status_endpoint=None), stop)
        )  # fmt: skip
        try:
            held: list[socket.socket] = []
            for _ in range(50):
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection(("127.0.0.1", listen.port), timeout=1))
                if len(held) == 3:
                    break
                await asyncio.sleep(0.05)
            assert len(held) == 3
            loop = asyncio.get_running_loop()
            for sock in held:
                sock.setblocking(False)
            # The first two are served; the third is closed at once by the cap.
            for sock in held[:2]:
                await loop.sock_sendall(sock, b"ping")
                assert await asyncio.wait_for(loop.sock_recv(sock, 4), 5) == b"ping"
            assert await asyncio.wait_for(loop.sock_recv(held[2], 4), 5) == b""
            for sock in held:
                sock.close()
        finally:
            stop.set()
            await asyncio.wait_for(host, 10)
