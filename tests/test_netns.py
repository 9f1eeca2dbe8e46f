"""The enclave and the parent as two network namespaces joined by a veth pair, TCP standing in for vsock.

    enclave ns (10.213.X.2)                          parent ns (10.213.X.1)
    app echo server 127.0.0.1:8001                   origin 0.0.0.0:9000 (64 MiB per client)
    ingress bridge 10.213.X.2:8001  <-- forward --   `sidecar host` TCP 127.0.0.1:8001
    log/status streams :17001/:17000  -- stream -->  `sidecar host` prints them
    egress proxy 127.0.0.1:10000    -- wire ----->   `sidecar host` egress 10.213.X.1:17002 -> origin

Every process is a separate ``ip netns exec`` subprocess, exactly the code that runs in production
with vsock endpoints. Fixed ports are fine here: each namespace has its own, empty port space. The
namespaces and the veth pair are removed by the fixture's finalizer, also when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
PEER = str(ROOT / "tests" / "netns_peer.py")
SIZE = 64 << 20
INGRESS_PORT, ORIGIN_PORT, PROXY_PORT, EGRESS_PORT = 8001, 9000, 10000, 17002
LOG_PORT, STATUS_PORT = 17001, 17000

pytestmark = pytest.mark.slow


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def start_readers(self) -> None:
        for stream, sink in ((self.popen.stdout, self.stdout), (self.popen.stderr, self.stderr)):
            if stream is not None:
                threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()

    def wait_for(self, predicate: Any, what: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stdout) + list(self.stderr):
                if predicate(line):
                    return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{self.name}: no {what} (exit {self.popen.poll()})\n"
            + "".join(self.stdout[-20:])
            + "".join(self.stderr[-20:])
        )


def _pump(stream: IO[str], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@dataclass
class World:
    enclave_ns: str
    parent_ns: str
    enclave_addr: str
    parent_addr: str
    tmp: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def spawn(self, name: str, ns: str, *cmd: str) -> Proc:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = Proc(name, popen)
        proc.start_readers()
        self.procs[name] = proc
        return proc

    def run(self, ns: str, *cmd: str, timeout: float = 60) -> dict[str, Any]:
        """Run one peer command in ``ns`` and return its JSON line."""
        out = subprocess.run(
            ["ip", "netns", "exec", ns, PY, PEER, *cmd],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    def origin_connections(self) -> int:
        return int((self.tmp / "origin-count").read_text() or "0")


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    pid = os.getpid()
    enclave_ns, parent_ns = f"sc-enclave-{pid}", f"sc-parent-{pid}"
    veth_e, veth_p = f"sce{pid}"[:15], f"scp{pid}"[:15]
    octet = pid % 250
    enclave_addr, parent_addr = f"10.213.{octet}.2", f"10.213.{octet}.1"
    created: list[str] = []
    w = World(enclave_ns, parent_ns, enclave_addr, parent_addr, tmp_path_factory.mktemp("netns"))
    try:
        for ns in (enclave_ns, parent_ns):
            result = _ip("netns", "add", ns, check=False)
            if result.returncode != 0:
                pytest.skip(f"ip netns add is not permitted here: {result.stderr.strip()}")
            created.append(ns)
        _ip("link", "add", veth_e, "type", "veth", "peer", "name", veth_p)
        _ip("link", "set", veth_e, "netns", enclave_ns)
        _ip("link", "set", veth_p, "netns", parent_ns)
        for ns, dev, addr in ((enclave_ns, veth_e, enclave_addr), (parent_ns, veth_p, parent_addr)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _start(w)
        yield w
    finally:
        for proc in w.procs.values():
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(timeout=10)
        for ns in created:  # deleting a namespace also deletes its end of the veth pair
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", veth_e, check=False)  # only if it never moved into the namespace


def _start(w: World) -> None:
    manifest = w.tmp / "enclaver.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "version": "v1",
                "name": "netns",
                "target": "netns:latest",
                "sources": {"app": "netns:latest"},
                "ingress": [{"listen_port": INGRESS_PORT}],
                # Only Enclaver's "host" (the parent's loopback); the parent's own address is not allowed.
                "egress": {"allow": ["host"], "deny": []},
            }
        )
    )
    egress_ep = f"tcp:{w.parent_addr}:{EGRESS_PORT}"
    origin = w.spawn(
        "origin",
        w.parent_ns,
        PY,
        PEER,
        "origin",
        "--port",
        str(ORIGIN_PORT),
        "--size",
        str(SIZE),
        "--count-file",
        str(w.tmp / "origin-count"),
    )
    origin.wait_for(lambda line: '"ready": true' in line, "origin ready")
    enclave = w.spawn(
        "enclave",
        w.enclave_ns,
        PY,
        PEER,
        "enclave",
        "--addr",
        w.enclave_addr,
        "--ports",
        str(INGRESS_PORT),
        "--log-port",
        str(LOG_PORT),
        "--status-port",
        str(STATUS_PORT),
        "--egress",
        egress_ep,
        "--proxy-port",
        str(PROXY_PORT),
    )
    enclave.wait_for(lambda line: '"ready": true' in line, "enclave ready")
    host = w.spawn(
        "host",
        w.parent_ns,
        PY,
        "-m",
        "sidecar.host",
        "--manifest",
        str(manifest),
        "--listen-host",
        "127.0.0.1",
        "--enclave",
        f"tcp:{w.enclave_addr}:{{port}}",
        "--egress-listen",
        egress_ep,
    )
    host.wait_for(lambda line: '"event": "host_ready"' in line, "host_ready")


def test_egress_through_the_enclave_proxy_and_the_parent_64mib(world: World) -> None:
    """App -> CONNECT to the enclave's egress proxy -> wire protocol to the parent -> origin."""
    expected = json.loads(world.procs["origin"].stdout[0])["sha256"]
    t0 = time.monotonic()
    result = world.run(
        world.enclave_ns,
        "connect-proxy",
        "--proxy-port",
        str(PROXY_PORT),
        "--host",
        "host",
        "--port",
        str(ORIGIN_PORT),
    )
    elapsed = time.monotonic() - t0
    assert result == {"ok": True, "bytes": SIZE, "sha256": expected}, result
    print(f"egress 64 MiB via proxy + parent: {elapsed:.2f} s")


def test_egress_wire_client_64mib(world: World) -> None:
    expected = json.loads(world.procs["origin"].stdout[0])["sha256"]
    egress = f"tcp:{world.parent_addr}:{EGRESS_PORT}"
    result = world.run(
        world.enclave_ns, "fetch", "--egress", egress, "--host", "host", "--port", str(ORIGIN_PORT)
    )
    assert result == {"ok": True, "bytes": SIZE, "sha256": expected}, result


def test_parent_refuses_a_target_outside_the_policy(world: World) -> None:
    """Threat: a compromised enclave app skips the enclave's proxy and asks the parent directly for a
    host the policy does not allow (here the parent's own address). The parent answers Err and
    never connects: the origin's connection count does not move."""
    before = world.origin_connections()
    egress = f"tcp:{world.parent_addr}:{EGRESS_PORT}"
    result = world.run(
        world.enclave_ns, "fetch", "--egress", egress, "--host", world.parent_addr, "--port", str(ORIGIN_PORT)
    )
    assert result["ok"] is False
    assert result["os_code"] == 13  # EACCES
    assert "blocked by the parent's egress policy" in result["message"]
    assert world.origin_connections() == before
    host = world.procs["host"]
    host.wait_for(
        lambda line: '"event": "egress_denied"' in line and world.parent_addr in line, "egress_denied"
    )


def test_ingress_64mib_each_way(world: World) -> None:
    """Client in the parent -> `sidecar host` forwarder -> enclave's bridge -> app; echoed back."""
    t0 = time.monotonic()
    result = world.run(
        world.parent_ns, "echo-client", "--connect", f"tcp:127.0.0.1:{INGRESS_PORT}", "--size", str(SIZE)
    )
    elapsed = time.monotonic() - t0
    assert result["bytes"] == SIZE
    assert result["received_sha256"] == result["sent_sha256"]
    print(f"ingress 64 MiB each way through two bridges: {elapsed:.2f} s")


def test_log_and_status_streams_reach_the_parent(world: World) -> None:
    host = world.procs["host"]
    line = host.wait_for(lambda x: "hello_from_the_enclave_namespace" in x, "the enclave's log line")
    assert line in host.stdout  # the enclave's log goes to stdout, the host's own events to stderr
    assert json.loads(line)["logger"] == "enclave.app"
    host.wait_for(lambda x: '"event": "enclave_status"' in x and '"status": "ready"' in x, "status ready")


def test_clean_shutdown(world: World) -> None:
    """The enclave stops (reports exited), then the parent gets SIGTERM: both exit 0, promptly."""
    enclave, host = world.procs["enclave"], world.procs["host"]
    enclave.popen.send_signal(signal.SIGTERM)
    assert enclave.popen.wait(timeout=10) == 0
    host.wait_for(lambda x: '"status": "exited"' in x, "status exited")
    t0 = time.monotonic()
    host.popen.send_signal(signal.SIGTERM)
    assert host.popen.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    host.wait_for(lambda x: '"event": "host_stopped"' in x, "host_stopped")
