"""Shared test helpers: repository paths, and installing a throwaway plugin as a real entry point."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def install_plugin_dist(site: Path, dist: str, plugins: dict[str, str]) -> Path:
    """Write modules and a ``*.dist-info`` with ``[sidecar]`` entry points into ``site``.

    ``plugins`` maps entry-point name to module source. This is what pip leaves on disk, so
    ``importlib.metadata`` finds these entry points exactly as it finds installed ones.
    """
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    lines = ["[sidecar]"]
    for name, source in plugins.items():
        module = f"{dist}_{name}".replace("-", "_")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        lines.append(f"{name} = {module}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


@pytest.fixture
def plugin_site(tmp_path: Path) -> Iterator[Path]:
    """A directory on sys.path for throwaway installed plugins; removed after the test."""
    site = tmp_path / "site"
    site.mkdir()
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        for name in [m for m, mod in sys.modules.items() if str(site) in str(getattr(mod, "__file__", ""))]:
            del sys.modules[name]
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's real server (S3, KMS, ...) on a free loopback port, for the tests of one module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
