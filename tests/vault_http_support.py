"""Shared helpers for vault_like's HTTP tests: a KMS stand-in and an in-process sidecar running the plugin.

Fixtures here are imported by tests/test_vault_api.py and tests/test_vault_audit.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import hvac
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from multidict import CIMultiDictProxy

import plugins.vault_like as vault_like
from plugins.vault_like.service import VaultService
from sidecar.context import Services
from sidecar.testing import SidecarHarness, run_sidecar

JSON = "application/json"


class FakeKms:
    """Stands in for AttestedKms: GenerateDataKey/Decrypt with AES-GCM under a key of the test's.

    ``refuse`` makes every call fail as KMS does for an enclave whose PCR0 the key policy does not
    name (AccessDeniedException); ``fail_with`` makes every call raise that exception instead.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or os.urandom(32)
        self.refuse = False
        self.fail_with: Exception | None = None
        self.calls: list[str] = []

    def _check(self, operation: str) -> None:
        self.calls.append(operation)
        if self.fail_with is not None:
            raise self.fail_with
        if self.refuse:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, operation)

    def generate_data_key(self, **params: Any) -> dict[str, Any]:
        self._check("GenerateDataKey")
        plaintext = os.urandom(32)
        nonce = os.urandom(12)
        aad = json.dumps(params["EncryptionContext"], sort_keys=True).encode()
        blob = nonce + AESGCM(self.key).encrypt(nonce, plaintext, aad)
        return {
            "Plaintext": plaintext,
            "CiphertextBlob": blob,
            "KeyId": f"arn:aws:kms:fake:key/{params['KeyId']}",
        }

    def decrypt(self, **params: Any) -> dict[str, Any]:
        self._check("Decrypt")
        blob = params["CiphertextBlob"]
        aad = json.dumps(params["EncryptionContext"], sort_keys=True).encode()
        return {"Plaintext": AESGCM(self.key).decrypt(blob[:12], blob[12:], aad)}


class Vault:
    """A running in-process sidecar with vault_like, and small HTTP helpers."""

    def __init__(self, harness: SidecarHarness, kms: FakeKms, state_dir: Path) -> None:
        self.harness = harness
        self.kms = kms
        self.state_dir = state_dir
        self.token = ""

    @property
    def service(self) -> VaultService:
        found = self.harness.runtime.services.extra["plugins.vault_like.state"]  # PluginContext.state's key
        assert isinstance(found, VaultService)
        return found

    @property
    def url(self) -> str:
        return self.harness.url("").rstrip("/")

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = "",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        all_headers = dict(headers or {})
        use = self.token if token == "" else token
        if use is not None:
            all_headers.setdefault("X-Vault-Token", use)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.harness.session.request(
            method, self.harness.url(f"/v1/{path}"), data=data, headers=all_headers
        ) as resp:
            text = await resp.read()
            parsed = json.loads(text) if text else None
            return resp.status, parsed, resp.headers

    async def init(self) -> str:
        status, body, _ = await self.call("PUT", "sys/init", {}, token=None)
        assert status == 200, body
        self.token = body["root_token"]
        return self.token

    def hvac(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.url, token=token or self.token)

    async def ready(self) -> tuple[int, Any]:
        async with self.harness.session.get(self.harness.url("/enclave/ready")) as resp:
            return resp.status, await resp.json()


Starter = Callable[..., Awaitable[Vault]]


@contextlib.asynccontextmanager
async def vault_starter(tmp_path: Path) -> AsyncIterator[Starter]:
    """Start vault_like sidecars (all stopped at the end); share ``state`` and ``kms`` to model a restart.

    Each test module wraps this in its own ``start_vault`` fixture.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            state: Path | None = None,
            kms: FakeKms | None = None,
            config: dict[str, Any] | None = None,
            nsm: Any = None,
            aws: Callable[..., Any] | None = None,
        ) -> Vault:
            state = state or tmp_path / "state"
            state.mkdir(exist_ok=True)
            kms = kms or FakeKms()
            services = Services()
            services.kms, services.nsm, services.aws = kms, nsm, aws
            harness = await stack.enter_async_context(
                run_sidecar(
                    state_dir=state,
                    plugins={"vault_like": vault_like},
                    config={"vault_like": dict(config or {})},
                    services=services,
                )
            )
            await harness.wait_started()
            return Vault(harness, kms, state)

        yield start


async def stop(vault: Vault) -> None:
    await vault.harness.runtime.stop()
