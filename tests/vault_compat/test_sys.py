"""sys/: health, seal status, init, leader, mounts, the CLI's mount lookup, against both servers."""

from __future__ import annotations

import hvac
import hvac.exceptions
import pytest

from .compat import data_of, errors, json_body, no_content
from .servers import VaultServer

pytestmark = pytest.mark.slow

# sys/health: the fields both servers send (Vault adds performance_standby, echo/clock fields and
# enterprise; OpenBao adds replication modes), so only this common core is required.
HEALTH = frozenset({"initialized", "sealed", "standby", "server_time_utc", "version"})
# sys/seal-status: Vault's fields that are always present (cluster_* once unsealed).
SEAL_STATUS = frozenset(
    {
        "type", "initialized", "sealed", "t", "n", "progress", "nonce", "version", "migration",
        "recovery_seal", "cluster_name", "cluster_id",
    }
)  # fmt: skip
# A mount's description in sys/mounts and sys/internal/ui/mounts/PATH.
MOUNT = frozenset({"type", "description", "accessor", "config", "options", "local", "seal_wrap", "uuid"})
# The seal each server uses: OpenBao's dev server has a Shamir seal; vault_like's root key is sealed
# by attested KMS and reports "awskms", as Vault does with its AWS KMS auto-unseal.
SEAL_TYPE = {"openbao": "shamir", "vault_like": "awskms"}


# ---------------------------------------------------------------------------------- health


def test_health_get(server: VaultServer, client: hvac.Client) -> None:
    body = json_body(server.request("GET", "sys/health", token=None), 200)
    assert set(body) >= HEALTH, sorted(HEALTH - set(body))
    assert (body["initialized"], body["sealed"], body["standby"]) == (True, False, False)
    assert isinstance(body["server_time_utc"], int) and isinstance(body["version"], str) and body["version"]
    # Versions differ by design (OpenBao 2.x vs vault_like's own); only the type is compared.
    assert client.sys.read_health_status(method="GET")["sealed"] is False


def test_health_head(server: VaultServer, client: hvac.Client) -> None:
    # hvac's read_health_status() sends HEAD by default: the same status, no body.
    reply = server.request("HEAD", "sys/health", token=None)
    assert reply.status_code == 200 and reply.content == b""
    assert client.sys.read_health_status().status_code == 200
    assert server.request("HEAD", "sys/health", token=None, params={"activecode": "203"}).status_code == 203


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"activecode": "299"}, 299),  # an active, unsealed node answers activecode
        ({"standbyok": "true"}, 200),
        ({"sealedcode": "299"}, 200),  # not sealed: sealedcode does not apply
        ({"uninitcode": "299"}, 200),  # initialised: uninitcode does not apply
        ({"standbycode": "299", "perfstandbyok": "true"}, 200),
    ],
)
def test_health_query_overrides(server: VaultServer, query: dict[str, str], status: int) -> None:
    body = json_body(server.request("GET", "sys/health", token=None, params=query), status)
    assert body["sealed"] is False


def test_health_bad_override_is_400(server: VaultServer) -> None:
    # OpenBao's error list is empty here; the status is what a health checker acts on.
    errors(server.request("GET", "sys/health", token=None, params={"activecode": "abc"}), 400)


# ------------------------------------------------------------------ seal-status, init, leader


def test_seal_status(server: VaultServer, client: hvac.Client) -> None:
    body = json_body(server.request("GET", "sys/seal-status", token=None), 200)
    assert set(body) >= SEAL_STATUS, sorted(SEAL_STATUS - set(body))
    assert body["type"] == SEAL_TYPE[server.name]
    assert (body["initialized"], body["sealed"], body["progress"]) == (True, False, 0)
    assert isinstance(body["t"], int) and isinstance(body["n"], int) and body["t"] <= body["n"]
    assert isinstance(body["recovery_seal"], bool) and body["migration"] is False
    assert isinstance(body["cluster_name"], str) and body["cluster_name"]
    assert client.sys.is_sealed() is False and client.sys.is_initialized() is True


def test_init_and_leader(server: VaultServer) -> None:
    assert json_body(server.request("GET", "sys/init", token=None), 200) == {"initialized": True}
    # Initialising twice is refused (OpenBao: "Vault is already initialized").
    assert errors(server.request("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}), 400)
    leader = json_body(server.request("GET", "sys/leader", token=None), 200)
    assert isinstance(leader["ha_enabled"], bool)


# ----------------------------------------------------------------------------------- mounts


def test_default_mounts(server: VaultServer, client: hvac.Client) -> None:
    mounts = data_of(server.request("GET", "sys/mounts"), legacy=True)
    secret = mounts["secret/"]
    assert set(secret) >= MOUNT, sorted(MOUNT - set(secret))
    assert secret["type"] == "kv" and secret["options"] == {"version": "2"}
    assert client.sys.list_mounted_secrets_engines()["data"]["secret/"]["type"] == "kv"


def test_second_kv2_mount(server: VaultServer, client: hvac.Client, name: str) -> None:
    path = f"team-{name}"
    client.sys.enable_secrets_engine("kv", path=path, options={"version": "2"}, description="team secrets")
    try:
        entry = client.sys.list_mounted_secrets_engines()["data"][f"{path}/"]
        assert entry["type"] == "kv" and entry["options"] == {"version": "2"}
        assert entry["description"] == "team secrets"
        kv = client.secrets.kv.v2
        kv.create_or_update_secret("db", {"password": "p1"}, mount_point=path)
        read = kv.read_secret_version("db", mount_point=path, raise_on_deleted_version=True)["data"]
        assert read["data"] == {"password": "p1"} and read["metadata"]["version"] == 1
        assert kv.list_secrets("", mount_point=path)["data"]["keys"] == ["db"]
        # The mounts are separate: the same key name on secret/ is another secret.
        assert errors(server.request("GET", "secret/data/db-" + name), 404) == []
        assert errors(
            server.request("POST", f"sys/mounts/{path}", {"type": "kv", "options": {"version": "2"}}), 400
        )
        ui = data_of(server.request("GET", f"sys/internal/ui/mounts/{path}/db"))
        assert ui["path"] == f"{path}/" and ui["type"] == "kv" and ui["options"] == {"version": "2"}
    finally:
        no_content(server.request("DELETE", f"sys/mounts/{path}"))
    assert f"{path}/" not in client.sys.list_mounted_secrets_engines()["data"]
    # Gone with its data: the path no longer routes anywhere.
    assert server.request("GET", f"{path}/data/db").status_code == 404


def test_bad_mount_requests(server: VaultServer, name: str) -> None:
    assert errors(server.request("POST", f"sys/mounts/m-{name}", {"type": "no-such-engine"}), 400)
    assert errors(server.request("POST", f"sys/mounts/m-{name}", b"{"), 400)
    assert errors(
        server.request("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}}), 400
    )
    # A mount's TTLs are durations as token TTLs are: "1d12h" is not one (only "Nd" alone is days).
    for ttl in ("1d12h", "bogus", " 1h"):
        body = {"type": "kv", "options": {"version": "2"}, "config": {"default_lease_ttl": ttl}}
        assert errors(server.request("POST", f"sys/mounts/m-{name}", body), 400), ttl
    body = {"type": "kv", "options": {"version": "2"}, "config": {"default_lease_ttl": "2d"}}
    no_content(server.request("POST", f"sys/mounts/m-{name}", body))
    no_content(server.request("DELETE", f"sys/mounts/m-{name}"))


def test_internal_ui_mounts_secret(server: VaultServer) -> None:
    # The bao/vault CLI asks this before every `kv` command, to learn the KV version and mount path.
    for path in ("sys/internal/ui/mounts/secret", "sys/internal/ui/mounts/secret/some/key"):
        ui = data_of(server.request("GET", path))
        assert set(ui) >= MOUNT, sorted(MOUNT - set(ui))
        assert ui["path"] == "secret/" and ui["type"] == "kv" and ui["options"] == {"version": "2"}


def test_internal_ui_mounts_unknown(server: VaultServer, name: str) -> None:
    # Vault answers a path under no mount as a failed preflight capability check: 403.
    assert errors(server.request("GET", f"sys/internal/ui/mounts/nomount-{name}"), 403)


def test_unrouted_path_is_404(server: VaultServer, name: str) -> None:
    assert errors(server.request("GET", f"nomount-{name}/foo"), 404)
    assert errors(server.request("POST", f"nomount-{name}/foo", {"a": 1}), 404)
