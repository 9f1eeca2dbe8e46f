"""Shared by the dev-world tests: an in-process DevWorld, attested KMS clients, ``sidecar dev`` subprocesses.

In-process: ``running_world`` starts a DevWorld (moto behind the attesting KMS front) on a loop in a
background thread; ``attested_kms`` is KMS as an enclave measuring a chosen PCR0 reaches it.
Subprocesses: ``start`` writes a world (free ports) and runs ``sidecar dev`` in it; ``wait_settled``
polls /enclave/ready until a plugin has started or failed; ``stop_all`` stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.attestation.emulator import DevPki, NsmEmulator
from sidecar.aws.clients import ClientFactory
from sidecar.aws.imds import ImdsClient, botocore_session
from sidecar.aws.kms import AttestedKms
from sidecar.devworld.world import DevWorld
from sidecar.recipient import RecipientKey
from sidecar.testing import free_port
from tests.conftest import ROOT

# =========================================================================== in-process world


@contextlib.contextmanager
def running_world(pki_dir: Path, pcr0: bytes) -> Iterator[tuple[DevWorld, DevPki]]:
    """An in-process dev world whose servers run on a loop in a background thread."""
    pki = DevPki.load_or_create(pki_dir)
    world = DevWorld(dev_root=pki.root, pcr0=pcr0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(world.start(), loop).result(60)
    try:
        yield world, pki
    finally:
        asyncio.run_coroutine_threadsafe(world.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def attested_kms(world: DevWorld, pki: DevPki, pcr0: bytes) -> AttestedKms:
    """KMS as an enclave measuring ``pcr0`` reaches it: IMDS credentials, attested, via the front."""
    factory = ClientFactory(
        botocore_session(ImdsClient(world.imds_url)), world.region, endpoints=world.endpoints
    )
    return AttestedKms(
        factory.client("kms"), NsmEmulator(pki, pcrs={0: pcr0}).attestation, RecipientKey.generate()
    )


# =========================================================================== sidecar dev subprocesses

OPERATOR = {
    "AWS_ACCESS_KEY_ID": "operator",
    "AWS_SECRET_ACCESS_KEY": "operator",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class DevSidecar:
    name: str
    directory: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    cli_log: Path
    bucket: str = ""
    key: str = ""
    ready: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
        return found

    @property
    def moto_url(self) -> str:
        return str(next(e for e in self.events() if e["event"] == "devworld_ready")["s3"])

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
    ) -> Reply:
        """One HTTP request from ``source`` (a loopback address: one rate-limit client per address)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(source, 0))
        try:
            payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            all_headers = dict(headers or {})
            if payload is not None:
                all_headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def passenger(self, name: str, source: str = "127.0.0.1", **headers: str) -> Reply:
        return self.request(
            "GET", "/enclave/passenger?" + urllib.parse.urlencode({"name": name}), None, headers, source
        )


def write_world(
    directory: Path, settings: dict[str, Any], manifest_base: Path = ROOT / "enclaver.yaml"
) -> tuple[dict[str, Any], dict[str, int]]:
    """enclaver.yaml (the repository's, every port replaced by a free one) and sidecar.yaml."""
    manifest = yaml.safe_load(manifest_base.read_text())
    ports = {"ingress": free_port(), "ingress2": free_port()}
    manifest["ingress"] = [{"listen_port": ports["ingress"]}, {"listen_port": ports["ingress2"]}]
    manifest["api"] = {"listen_port": free_port()}
    manifest["kms_proxy"] = {"listen_port": free_port()}
    manifest["egress"]["proxy_port"] = free_port()
    (directory / "enclaver.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    for entry in settings.get("plugins", {}).values():
        if entry.get("listen_port") == "INGRESS":
            entry["listen_port"] = ports["ingress"]
        elif entry.get("listen_port") == "INGRESS2":
            entry["listen_port"] = ports["ingress2"]
    (directory / "sidecar.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return manifest, ports


def start(name: str, directory: Path, settings: dict[str, Any], env: dict[str, str]) -> DevSidecar:
    _, ports = write_world(directory, settings)
    log_path = directory / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "dev", "--state-dir", str(directory / "state")],
            cwd=directory, stdout=subprocess.DEVNULL, stderr=log, env=env,
        )  # fmt: skip
    return DevSidecar(name, directory, ports["ingress"], proc, log_path, directory / "cli.log")


def wait_settled(sidecar: DevSidecar, plugin: str, timeout: float = 120) -> dict[str, Any]:
    """Poll /enclave/ready until ``plugin`` has started or failed; returns the last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sidecar.proc.poll() is not None:
            raise AssertionError(
                f"{sidecar.name}: sidecar dev exited {sidecar.proc.returncode}\n{sidecar.log()}"
            )
        try:
            reply = sidecar.request("GET", "/enclave/ready")
        except OSError:
            time.sleep(0.2)
            continue
        answer: dict[str, Any] = reply.json()
        status = answer.get("plugins", {}).get(plugin, "ready")
        if reply.status == 200 or status not in ("pending", "starting"):
            return {"status": reply.status, **answer}
        time.sleep(0.2)
    raise AssertionError(f"{sidecar.name}: {plugin} never settled\n{sidecar.log()[-4000:]}")


def stop_all(sidecars: list[DevSidecar]) -> None:
    """SIGTERM to all, then wait (SIGKILL after 30 s each)."""
    for sidecar in sidecars:
        if sidecar.proc.poll() is None:
            sidecar.proc.terminate()
    for sidecar in sidecars:
        try:
            sidecar.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sidecar.proc.kill()
            sidecar.proc.wait()
