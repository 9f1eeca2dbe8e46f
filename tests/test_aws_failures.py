"""Failures on the AWS path: IMDS down at start-up, S3 errors with retries, and clear final errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.session import Session

from sidecar.aws.clients import ClientFactory
from sidecar.testing import free_port
from tests.test_example_plugin import get, write_configs

S3_ERROR = b"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>"


class FlakyS3:
    """An S3 endpoint that fails the first ``failures`` GETs with ``status``/``code``, then serves."""

    def __init__(self, failures: int, status: int = 503, code: str = "SlowDown") -> None:
        self.failures = failures
        self.status = status
        self.code = code
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.failures:
            body = S3_ERROR.replace(b"{code}", self.code.encode())
            return web.Response(status=self.status, body=body, content_type="application/xml")
        return web.Response(body=b"sealed envelope", headers={"ETag": '"abc"'})


async def s3_client(aiohttp_server: Any, flaky: FlakyS3) -> Any:
    app = web.Application()
    app.router.add_get("/{tail:.*}", flaky.handle)
    server = await aiohttp_server(app)
    session = Session()
    session._credentials = Credentials("AKID", "secret")  # static: this test is about S3, not IMDS
    factory = ClientFactory(session, "us-east-1", endpoints={"s3": str(server.make_url(""))}, max_attempts=4)
    client = factory.client("s3")
    client.meta.events.register("before-sleep.*", lambda **_: None)  # no real backoff waits in tests
    return client


def get_object(client: Any) -> bytes:
    return bytes(client.get_object(Bucket="bucket", Key="envelope.json")["Body"].read())


async def test_s3_throttling_is_retried_until_it_succeeds(aiohttp_server: Any) -> None:
    import asyncio

    flaky = FlakyS3(failures=2)
    client = await s3_client(aiohttp_server, flaky)
    assert await asyncio.to_thread(get_object, client) == b"sealed envelope"
    assert flaky.requests == 3  # two throttled attempts, then success: botocore's standard retries


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
async def test_s3_errors_past_the_retry_budget_give_a_clear_final_error(
    aiohttp_server: Any, status: int, code: str
) -> None:
    import asyncio

    flaky = FlakyS3(failures=100, status=status, code=code)
    client = await s3_client(aiohttp_server, flaky)
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(get_object, client)
    assert err.value.response["Error"]["Code"] == code
    assert "reached max retries: 3" in str(err.value)
    assert flaky.requests == 4  # max_attempts counts the first attempt


async def test_s3_client_errors_are_not_retried(aiohttp_server: Any) -> None:
    import asyncio

    flaky = FlakyS3(failures=100, status=404, code="NoSuchKey")
    client = await s3_client(aiohttp_server, flaky)
    with pytest.raises(ClientError) as err:
        await asyncio.to_thread(get_object, client)
    assert err.value.response["Error"]["Code"] == "NoSuchKey"
    assert flaky.requests == 1


def _run_until_event(
    tmp_path: Path, manifest: Path, config: Path, port: int, name: str
) -> list[dict[str, Any]]:
    """Run ``sidecar run`` until /enclave/ready is 503 and the log holds event ``name``; its events."""
    log = (tmp_path / "sidecar.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, body = get(f"http://127.0.0.1:{port}/enclave/ready")
                if status == 503 and f'"{name}"' in (tmp_path / "sidecar.log").read_text():
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None  # still running
        assert json.loads(body) == {"ready": False, "plugins": {"aws": "starting"}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0
    return [json.loads(x) for x in (tmp_path / "sidecar.log").read_text().splitlines()]


@pytest.mark.slow
def test_imds_outside_the_egress_policy_is_refused_by_the_proxy(tmp_path: Path) -> None:
    # Threat: the sidecar's own AWS traffic bypassing the measured egress policy. IMDS requests go
    # through the egress proxy like everything else; a manifest that does not allow the IMDS address
    # leaves the sidecar without credentials, and the log names the policy as the reason.
    imds_port = free_port()
    listener = socket.create_server(("127.0.0.1", imds_port))  # would accept, if anything got here
    listener.settimeout(0.1)
    try:
        manifest, config, port, _ = write_configs(
            tmp_path, {}, allow=["kms.*.amazonaws.com"], aws={"imds": f"http://127.0.0.1:{imds_port}"}
        )
        events = _run_until_event(tmp_path, manifest, config, port, "imds_unavailable")
        with pytest.raises(TimeoutError):
            listener.accept()  # the proxy refused before connecting
    finally:
        listener.close()
    failures = [e for e in events if e["event"] == "imds_unavailable"]
    assert "HTTP 403: blocked by egress policy" in failures[0]["error"]
    denials = [e for e in events if e["event"] == "egress" and e.get("port") == imds_port]
    assert denials and all(e["allowed"] is False for e in denials)


@pytest.mark.slow
def test_imds_down_keeps_readiness_false_and_logs_why(tmp_path: Path) -> None:
    # Threat (availability, fail closed): without credentials the sidecar must neither crash nor
    # claim to be ready.
    dead_port = free_port()
    dead = f"http://127.0.0.1:{dead_port}"
    manifest, config, port, _ = write_configs(
        tmp_path, {}, allow=[f"127.0.0.1:{dead_port}"], aws={"imds": dead}
    )
    events = _run_until_event(tmp_path, manifest, config, port, "imds_unavailable")
    failures = [e for e in events if e["event"] == "imds_unavailable"]
    # The egress proxy could not connect: its 502 says so, and the reason reaches the log.
    assert failures and "HTTP 502" in failures[0]["error"]
    assert "Connection refused" in failures[0]["error"]
