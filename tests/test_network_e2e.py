"""The network as an enclave app sees it: ``sidecar run -- APP``, with the app's traffic under policy.

An unmodified app (``requests`` and boto3, proxy taken from the environment the sidecar gives it)
reaches an allowed origin through the egress proxy and is refused for a denied one. The origins
listen on 127.0.0.2 and 127.0.0.3, which are not in NO_PROXY, so the app's traffic really takes
the proxy (127.0.0.1 and localhost are exempt: that is where the sidecar's own endpoints are).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_example_plugin import write_configs

ALLOWED_IP, DENIED_IP = "127.0.0.2", "127.0.0.3"

APP = textwrap.dedent(
    """
    import json, sys
    import boto3, botocore.exceptions, requests

    allowed, denied, out = sys.argv[1], sys.argv[2], sys.argv[3]
    result = {}
    ok = requests.get(allowed + "/hello", timeout=10)
    result["allowed"] = [ok.status_code, ok.text]
    try:
        no = requests.get(denied + "/hello", timeout=10)
        result["denied"] = [no.status_code, no.text]
    except requests.RequestException as exc:
        result["denied"] = ["exception", type(exc).__name__]
    s3 = boto3.client(
        "s3", endpoint_url=denied, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y",
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    try:
        s3.list_buckets()
        result["boto3"] = "reached"
    except botocore.exceptions.ClientError as exc:
        result["boto3"] = ["ClientError", exc.response["ResponseMetadata"]["HTTPStatusCode"]]
    except botocore.exceptions.BotoCoreError as exc:
        result["boto3"] = [type(exc).__name__, str(exc)]
    open(out, "w").write(json.dumps(result))
    """
)


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[0]}".encode()  # type: ignore[index]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class CountingServer(ThreadingHTTPServer):
    connections = 0

    def verify_request(self, request: object, client_address: object) -> bool:
        type(self).connections += 1
        return True


@pytest.fixture
def origins() -> Iterator[tuple[ThreadingHTTPServer, CountingServer]]:
    allowed = ThreadingHTTPServer((ALLOWED_IP, 0), Hello)
    denied = type("Denied", (CountingServer,), {"connections": 0})((DENIED_IP, 0), Hello)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (allowed, denied)]
    for t in threads:
        t.start()
    try:
        yield allowed, denied
    finally:
        for s in (allowed, denied):
            s.shutdown()
            s.server_close()


@pytest.mark.slow
def test_an_unmodified_app_under_sidecar_run_gets_exactly_the_policy(
    tmp_path: Path, origins: tuple[ThreadingHTTPServer, CountingServer]
) -> None:
    # Threat: an enclave app (compromised, or just careless) sending data to a host the measured
    # manifest does not allow. Its only way out is the egress proxy the sidecar points it at.
    allowed, denied = origins
    allowed_port, denied_port = allowed.server_address[1], denied.server_address[1]
    manifest, config, _, _ = write_configs(tmp_path, {}, allow=[f"{ALLOWED_IP}:{allowed_port}"])
    (tmp_path / "app.py").write_text(APP)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config),
            "--", sys.executable, str(tmp_path / "app.py"),
            f"http://{ALLOWED_IP}:{allowed_port}", f"http://{DENIED_IP}:{denied_port}", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["allowed"] == [200, f"hello from {ALLOWED_IP}"]
    assert result["denied"][0] == 403
    assert "blocked by egress policy" in result["denied"][1]
    assert result["boto3"][0] == "ClientError" and result["boto3"][1] == 403
    assert type(denied).connections == 0  # the proxy refused before connecting

    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    egress = [e for e in events if e["event"] == "egress"]
    assert {(e["host"], e["port"], e["allowed"]) for e in egress} == {
        (ALLOWED_IP, allowed_port, True),
        (DENIED_IP, denied_port, False),
    }
    # The log line says where and how much, never what: no path, no payload.
    assert "/hello" not in json.dumps(egress) and "hello from" not in json.dumps(egress)
    exited = [e for e in events if e["event"] == "app_exited"]
    assert exited and exited[0]["exit_code"] == 0


def test_the_loopback_names_are_not_proxied_so_the_origins_here_really_are() -> None:
    # The test above is only meaningful if its origins' addresses are outside NO_PROXY.
    from sidecar.net.egress import proxy_environment

    env = proxy_environment(10000)
    exempt = env["NO_PROXY"].split(",")
    assert ALLOWED_IP not in exempt and DENIED_IP not in exempt
    assert socket.inet_aton(ALLOWED_IP) != socket.inet_aton("127.0.0.1")
