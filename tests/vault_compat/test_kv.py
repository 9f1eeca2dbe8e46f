"""KV v2, as hvac and raw HTTP see it, against OpenBao and vault_like alike.

Every test uses its own key (the ``name`` fixture) on the shared ``secret/`` mount; tests that change
a mount-wide setting make their own mount and remove it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import hvac
import hvac.exceptions
import pytest
import requests

from .compat import (
    KEY_METADATA,
    KEY_METADATA_OPENBAO,
    KV_CONFIG,
    KV_CONFIG_OPENBAO,
    VERSION_ENTRY,
    VERSION_METADATA,
    data_of,
    enable_kv2,
    envelope,
    errors,
    keys_between,
    no_content,
)
from .servers import VaultServer

pytestmark = pytest.mark.slow

MERGE_PATCH = "application/merge-patch+json"


@pytest.fixture
def mount(server: VaultServer, name: str) -> Iterator[str]:
    """A fresh KV v2 mount of its own (for mount-wide config), disabled afterwards."""
    path = f"kv-{name}"
    enable_kv2(server, path)
    try:
        yield path
    finally:
        server.request("DELETE", f"sys/mounts/{path}")


def write(server: VaultServer, path: str, data: dict[str, object], **options: object) -> dict[str, object]:
    body: dict[str, object] = {"data": data}
    if options:
        body["options"] = options
    result: dict[str, object] = data_of(server.request("POST", f"secret/data/{path}", body))
    return result


# ------------------------------------------------------------------------------------ config


def test_config_read_and_write(server: VaultServer, client: hvac.Client, mount: str) -> None:
    config = data_of(server.request("GET", f"{mount}/config"))
    keys_between(config, KV_CONFIG, KV_CONFIG_OPENBAO)
    assert config["max_versions"] == 0 and config["cas_required"] is False
    assert config["delete_version_after"] == "0s"  # a Go duration string, as Vault renders it
    client.secrets.kv.v2.configure(
        max_versions=3, cas_required=True, delete_version_after="1h30m", mount_point=mount
    )
    config = client.secrets.kv.v2.read_configuration(mount_point=mount)["data"]
    assert (config["max_versions"], config["cas_required"]) == (3, True)
    assert config["delete_version_after"] == "1h30m0s"
    no_content(
        server.request("POST", f"{mount}/config", {"cas_required": False, "delete_version_after": "0s"})
    )
    assert data_of(server.request("GET", f"{mount}/config"))["cas_required"] is False
    # max_versions from the mount's config prunes every key that sets none of its own.
    for i in range(5):
        client.secrets.kv.v2.create_or_update_secret("k", {"i": i}, mount_point=mount)
    meta = client.secrets.kv.v2.read_secret_metadata("k", mount_point=mount)["data"]
    assert sorted(meta["versions"], key=int) == ["3", "4", "5"]
    assert (meta["current_version"], meta["oldest_version"]) == (5, 3)
    errors(server.request("POST", f"{mount}/config", {"max_versions": "many"}), 400)


def test_mount_config_cas_required(server: VaultServer, mount: str) -> None:
    no_content(server.request("POST", f"{mount}/config", {"cas_required": True}))
    found = errors(server.request("POST", f"{mount}/data/k", {"data": {"a": 1}}), 400)
    assert any("check-and-set" in e for e in found), found
    assert (
        data_of(server.request("POST", f"{mount}/data/k", {"options": {"cas": 0}, "data": {"a": 1}}))[
            "version"
        ]
        == 1
    )


# ------------------------------------------------------------------------------ data/ and cas


def test_write_read_and_versions(server: VaultServer, client: hvac.Client, name: str) -> None:
    first = client.secrets.kv.v2.create_or_update_secret(name, {"user": "alice", "n": 1})["data"]
    keys_between(first, VERSION_METADATA)
    assert first["version"] == 1 and first["destroyed"] is False and first["deletion_time"] == ""
    assert first["custom_metadata"] is None
    assert first["created_time"].endswith("Z")  # RFC 3339 UTC, as Vault writes it
    second = write(server, name, {"user": "bob", "nested": {"list": [1, "two", None], "t": True}})
    assert second["version"] == 2

    latest = data_of(server.request("GET", f"secret/data/{name}"))
    assert set(latest) == {"data", "metadata"}
    keys_between(latest["metadata"], VERSION_METADATA)
    assert latest["data"] == {"user": "bob", "nested": {"list": [1, "two", None], "t": True}}
    assert latest["metadata"]["version"] == 2
    old = client.secrets.kv.v2.read_secret_version(name, version=1, raise_on_deleted_version=True)["data"]
    assert old["data"] == {"user": "alice", "n": 1} and old["metadata"]["version"] == 1
    assert (
        data_of(server.request("GET", f"secret/data/{name}", params={"version": "2"}))["data"]["user"]
        == "bob"
    )

    # Versions that never existed and keys that do not exist: 404 with an empty error list.
    assert errors(server.request("GET", f"secret/data/{name}", params={"version": "9"}), 404) == []
    assert errors(server.request("GET", f"secret/data/{name}-missing"), 404) == []
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.read_secret_version(f"{name}-missing", raise_on_deleted_version=True)
    assert errors(server.request("GET", f"secret/data/{name}", params={"version": "abc"}), 400)


def test_mount_type_in_the_envelope(server: VaultServer, name: str) -> None:
    # Vault >= 1.12 names the mount's type in every response and the issue requires it of
    # vault_like; OpenBao 2.x does not send it, so it is only required of vault_like.
    written = envelope(server.request("POST", f"secret/data/{name}", {"data": {"a": 1}}))
    read = envelope(server.request("GET", f"secret/data/{name}"))
    for body in (written, read):
        if server.name == "vault_like" or "mount_type" in body:
            assert body["mount_type"] == "kv"


def test_bad_write_bodies_are_400(server: VaultServer, name: str) -> None:
    # Threat: a malformed request must be a clear client error, never a 500 or a silent write.
    assert errors(server.request("POST", f"secret/data/{name}", b"{not json"), 400)
    assert errors(server.request("POST", f"secret/data/{name}", {"options": {}}), 400)
    assert errors(server.request("GET", f"secret/data/{name}"), 404) == []


def test_body_over_the_request_limit_is_413(server: VaultServer, client: hvac.Client, name: str) -> None:
    # Threat: memory exhaustion by one huge write. Both refuse it with the same 413 error that hvac
    # reports, and nothing is written. The limits differ: OpenBao's listener default is 32 MiB,
    # vault_like's ``max_request_bytes`` 1 MiB; this body is over both.
    huge = "x" * (33 * 1024 * 1024)
    assert errors(server.request("POST", f"secret/data/{name}", {"data": {"k": huge}}), 413) == [
        "http: request body too large"
    ]
    with pytest.raises(hvac.exceptions.VaultError, match="http: request body too large"):
        client.secrets.kv.v2.create_or_update_secret(path=name, secret={"k": huge})
    assert errors(server.request("GET", f"secret/data/{name}"), 404) == []


def test_cas(server: VaultServer, client: hvac.Client, name: str) -> None:
    assert client.secrets.kv.v2.create_or_update_secret(name, {"a": 1}, cas=0)["data"]["version"] == 1
    found = errors(
        server.request("POST", f"secret/data/{name}", {"options": {"cas": 0}, "data": {"a": 2}}), 400
    )
    assert found == ["check-and-set parameter did not match the current version"]
    assert client.secrets.kv.v2.create_or_update_secret(name, {"a": 2}, cas=1)["data"]["version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest) as err:
        client.secrets.kv.v2.create_or_update_secret(name, {"a": 3}, cas=1)
    assert err.value.errors == ["check-and-set parameter did not match the current version"]
    assert client.secrets.kv.v2.read_secret_version(name, raise_on_deleted_version=True)["data"]["data"] == {
        "a": 2
    }


def test_concurrent_writes_to_one_key_all_succeed(server: VaultServer, name: str) -> None:
    # Threat: writers racing on one key get a 500 (or a lost version) instead of each its own
    # version. Vault serialises them; every write is acknowledged with a distinct version.
    # Sustained, like a load generator: 50 keep-alive connections, 6 writes each, back to back.
    writers, each = 50, 6

    def writer(w: int) -> list[int]:
        versions = []
        with requests.Session() as session:  # a connection of its own
            for i in range(each):
                reply = session.post(
                    f"{server.url}/v1/secret/data/{name}",
                    json={"data": {"w": w, "i": i}},
                    headers={"X-Vault-Token": server.root_token},
                    timeout=60,
                )
                assert reply.status_code == 200, f"{reply.status_code}: {reply.text[:200]}"
                versions.append(int(reply.json()["data"]["version"]))
        return versions

    with ThreadPoolExecutor(max_workers=writers) as pool:
        versions = sorted(v for vs in pool.map(writer, range(writers)) for v in vs)
    assert versions == list(range(1, writers * each + 1))
    assert data_of(server.request("GET", f"secret/metadata/{name}"))["current_version"] == writers * each


def test_cas_required_on_a_key(server: VaultServer, client: hvac.Client, name: str) -> None:
    client.secrets.kv.v2.update_metadata(name, cas_required=True)
    found = errors(server.request("POST", f"secret/data/{name}", {"data": {"a": 1}}), 400)
    assert found == ["check-and-set parameter required for this call"]
    assert write(server, name, {"a": 1}, cas=0)["version"] == 1
    errors(server.request("POST", f"secret/data/{name}", {"data": {"a": 2}}), 400)
    assert write(server, name, {"a": 2}, cas=1)["version"] == 2
    assert client.secrets.kv.v2.read_secret_metadata(name)["data"]["cas_required"] is True


# ----------------------------------------------------------------------------------- patch


@pytest.mark.filterwarnings(
    "ignore:The raise_on_deleted_version parameter:DeprecationWarning"
)  # hvac's own call
def test_hvac_patch(client: hvac.Client, name: str) -> None:
    # hvac's patch is a read and a check-and-set write of the merged dict.
    client.secrets.kv.v2.create_or_update_secret(name, {"a": 1, "b": 2})
    assert client.secrets.kv.v2.patch(name, {"b": 3, "c": 4})["data"]["version"] == 2
    read = client.secrets.kv.v2.read_secret_version(name, raise_on_deleted_version=True)["data"]
    assert read["data"] == {"a": 1, "b": 3, "c": 4}
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.patch(f"{name}-missing", {"a": 1})


def test_raw_patch_is_a_json_merge_patch(server: VaultServer, name: str) -> None:
    write(server, name, {"keep": 1, "drop": 2, "nested": {"x": 1, "y": 2}})
    reply = server.request(
        "PATCH", f"secret/data/{name}", {"data": {"drop": None, "nested": {"y": None, "z": 3}, "new": "v"}},
        content_type=MERGE_PATCH,
    )  # fmt: skip
    result = data_of(reply)
    keys_between(result, VERSION_METADATA)
    assert result["version"] == 2
    read = data_of(server.request("GET", f"secret/data/{name}"))
    assert read["data"] == {"keep": 1, "nested": {"x": 1, "z": 3}, "new": "v"}
    # PATCH with a check-and-set that does not match is refused like a write.
    stale = server.request(
        "PATCH", f"secret/data/{name}", {"options": {"cas": 1}, "data": {"a": 1}}, content_type=MERGE_PATCH
    )
    assert errors(stale, 400) == ["check-and-set parameter did not match the current version"]
    # Patching nothing is "not found" (OpenBao sends no body with this 404, so only the status).
    missing = server.request(
        "PATCH", f"secret/data/{name}-missing", {"data": {"a": 1}}, content_type=MERGE_PATCH
    )
    assert missing.status_code == 404


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_patch_needs_the_merge_patch_content_type(server: VaultServer, name: str, content_type: str) -> None:
    # Threat: a client that meant "replace" being read as "merge" (or the reverse). 415, data untouched.
    write(server, name, {"a": 1})
    reply = server.request("PATCH", f"secret/data/{name}", {"data": {"a": 2}}, content_type=content_type)
    found = errors(reply, 415)
    assert any(MERGE_PATCH in e for e in found), found
    assert data_of(server.request("GET", f"secret/data/{name}"))["data"] == {"a": 1}


# ------------------------------------------------------------------ delete, undelete, destroy


def test_delete_undelete_destroy(server: VaultServer, client: hvac.Client, name: str) -> None:
    kv = client.secrets.kv.v2
    for i in (1, 2, 3):
        kv.create_or_update_secret(name, {"v": i})

    # Soft delete of the latest version: 404 *with* the metadata body, so hvac can return it.
    assert kv.delete_latest_version_of_secret(name).status_code == 204
    body = envelope(server.request("GET", f"secret/data/{name}"), 404)
    assert body["data"]["data"] is None
    keys_between(body["data"]["metadata"], VERSION_METADATA)
    assert body["data"]["metadata"]["version"] == 3 and body["data"]["metadata"]["deletion_time"] != ""
    soft = kv.read_secret_version(name, raise_on_deleted_version=False)
    assert soft["data"]["data"] is None and soft["data"]["metadata"]["version"] == 3
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_version(name, raise_on_deleted_version=True)
    assert kv.read_secret_version(name, version=2, raise_on_deleted_version=True)["data"]["data"] == {"v": 2}

    # Delete given versions (raw, to see the 204), then undelete.
    no_content(server.request("POST", f"secret/delete/{name}", {"versions": [1]}))
    assert (
        envelope(server.request("GET", f"secret/data/{name}", params={"version": "1"}), 404)["data"][
            "metadata"
        ]["version"]
        == 1
    )
    assert kv.undelete_secret_versions(name, versions=[1, 3]).status_code == 204
    assert kv.read_secret_version(name, raise_on_deleted_version=True)["data"]["data"] == {"v": 3}
    assert kv.read_secret_version(name, version=1, raise_on_deleted_version=True)["data"]["data"] == {"v": 1}

    # Destroy: 404 with the metadata, destroyed true; undelete cannot bring it back.
    assert kv.destroy_secret_versions(name, versions=[2]).status_code == 204
    gone = envelope(server.request("GET", f"secret/data/{name}", params={"version": "2"}), 404)["data"]
    assert gone["data"] is None and gone["metadata"]["destroyed"] is True
    no_content(server.request("POST", f"secret/undelete/{name}", {"versions": [2]}))
    assert (
        envelope(server.request("GET", f"secret/data/{name}", params={"version": "2"}), 404)["data"][
            "metadata"
        ]["destroyed"]
        is True
    )

    versions = kv.read_secret_metadata(name)["data"]["versions"]
    assert {v: (e["destroyed"], e["deletion_time"] != "") for v, e in versions.items()} == {
        "1": (False, False),
        "2": (True, False),
        "3": (False, False),
    }
    for entry in versions.values():
        keys_between(entry, VERSION_ENTRY)
    # Bodies that name no versions are client errors.
    errors(server.request("POST", f"secret/delete/{name}", {"versions": []}), 400)
    errors(server.request("POST", f"secret/destroy/{name}", {}), 400)


# ------------------------------------------------------------------------------- metadata/


def test_metadata_read_update_patch_delete(server: VaultServer, client: hvac.Client, name: str) -> None:
    kv = client.secrets.kv.v2
    kv.create_or_update_secret(name, {"a": 1})
    meta = data_of(server.request("GET", f"secret/metadata/{name}"))
    # OpenBao's metadata also has current_metadata_version and metadata_cas_required (its metadata
    # CAS feature); Vault's has neither. Both servers must have every Vault field.
    keys_between(meta, KEY_METADATA, KEY_METADATA_OPENBAO)
    assert meta["current_version"] == 1 and meta["oldest_version"] == 0 and meta["max_versions"] == 0
    assert meta["custom_metadata"] is None and meta["delete_version_after"] == "0s"
    assert meta["created_time"].endswith("Z") and set(meta["versions"]) == {"1"}

    assert (
        kv.update_metadata(name, max_versions=5, custom_metadata={"owner": "ops", "tier": "1"}).status_code
        == 204
    )
    meta = kv.read_secret_metadata(name)["data"]
    assert meta["max_versions"] == 5 and meta["custom_metadata"] == {"owner": "ops", "tier": "1"}

    patched = server.request(
        "PATCH", f"secret/metadata/{name}", {"custom_metadata": {"tier": None, "env": "prod"}},
        content_type=MERGE_PATCH,
    )  # fmt: skip
    no_content(patched)
    meta = kv.read_secret_metadata(name)["data"]
    assert meta["custom_metadata"] == {"owner": "ops", "env": "prod"} and meta["max_versions"] == 5
    wrong = server.request(
        "PATCH", f"secret/metadata/{name}", {"max_versions": 1}, content_type="application/json"
    )
    errors(wrong, 415)

    assert kv.delete_metadata_and_all_versions(name).status_code == 204
    assert errors(server.request("GET", f"secret/metadata/{name}"), 404) == []
    assert errors(server.request("GET", f"secret/data/{name}"), 404) == []
    no_content(server.request("DELETE", f"secret/metadata/{name}"))  # deleting nothing is not an error


def test_custom_metadata_shows_in_version_metadata(
    server: VaultServer, client: hvac.Client, name: str
) -> None:
    client.secrets.kv.v2.update_metadata(name, custom_metadata={"team": "blue"})
    written = write(server, name, {"a": 1})
    assert written["custom_metadata"] == {"team": "blue"}
    read = client.secrets.kv.v2.read_secret_version(name, raise_on_deleted_version=True)["data"]
    assert read["metadata"]["custom_metadata"] == {"team": "blue"}


def test_max_versions_on_a_key_prunes_the_oldest(server: VaultServer, client: hvac.Client, name: str) -> None:
    client.secrets.kv.v2.update_metadata(name, max_versions=2)
    for i in range(4):
        write(server, name, {"i": i})
    meta = client.secrets.kv.v2.read_secret_metadata(name)["data"]
    assert sorted(meta["versions"], key=int) == ["3", "4"]
    assert (meta["current_version"], meta["oldest_version"]) == (4, 3)
    # A pruned version is gone: a bare 404 with no metadata body.
    assert errors(server.request("GET", f"secret/data/{name}", params={"version": "1"}), 404) == []
    assert data_of(server.request("GET", f"secret/data/{name}", params={"version": "3"}))["data"] == {"i": 2}


def test_delete_version_after(server: VaultServer, client: hvac.Client, name: str) -> None:
    client.secrets.kv.v2.update_metadata(name, delete_version_after="2h")
    assert client.secrets.kv.v2.read_secret_metadata(name)["data"]["delete_version_after"] == "2h0m0s"
    written = write(server, name, {"a": 1})
    assert written["deletion_time"] != ""  # scheduled, in the future: still readable
    assert data_of(server.request("GET", f"secret/data/{name}"))["data"] == {"a": 1}
    # A version past its deletion time reads as soft-deleted.
    client.secrets.kv.v2.update_metadata(f"{name}-short", delete_version_after="1s")
    write(server, f"{name}-short", {"a": 1})
    time.sleep(1.2)
    body = envelope(server.request("GET", f"secret/data/{name}-short"), 404)
    assert body["data"]["data"] is None and body["data"]["metadata"]["version"] == 1


# --------------------------------------------------------------------------------- listing


def test_list_secrets_sends_the_LIST_method(server: VaultServer, client: hvac.Client, name: str) -> None:
    # hvac's list_secrets sends the HTTP method LIST; a server that rejects the method (aiohttp's C
    # parser does, before any handler) breaks every hvac user that lists.
    for path in (f"{name}/b", f"{name}/a", f"{name}/dir/x", f"{name}/dir/y/z"):
        write(server, path, {"k": 1})
    listed = client.secrets.kv.v2.list_secrets(name)
    assert listed["data"] == {"keys": ["a", "b", "dir/"]}
    assert client.secrets.kv.v2.list_secrets(f"{name}/dir")["data"]["keys"] == ["x", "y/"]
    raw = server.request("LIST", f"secret/metadata/{name}/")
    assert data_of(raw) == {"keys": ["a", "b", "dir/"]}
    assert name + "/" in client.secrets.kv.v2.list_secrets("")["data"]["keys"]


def test_list_with_get_query(server: VaultServer, name: str) -> None:
    # The bao/vault CLI lists with GET ?list=true.
    write(server, f"{name}/one", {"k": 1})
    write(server, f"{name}/two/three", {"k": 1})
    reply = server.request("GET", f"secret/metadata/{name}", params={"list": "true"})
    assert data_of(reply) == {"keys": ["one", "two/"]}
    # A deleted key's metadata is gone from the listing.
    no_content(server.request("DELETE", f"secret/metadata/{name}/one"))
    assert data_of(server.request("GET", f"secret/metadata/{name}/", params={"list": "true"})) == {
        "keys": ["two/"]
    }


def test_empty_list_is_404_with_empty_errors(server: VaultServer, client: hvac.Client, name: str) -> None:
    assert errors(server.request("LIST", f"secret/metadata/{name}/"), 404) == []
    assert errors(server.request("GET", f"secret/metadata/{name}/", params={"list": "true"}), 404) == []
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.list_secrets(name)


# --------------------------------------------------------------------------------- subkeys


def test_subkeys(server: VaultServer, name: str) -> None:
    write(server, name, {"a": 1, "b": {"c": "x", "d": {"e": [1, 2]}}, "f": None})
    write(server, name, {"only": {"v2": True}})
    result = data_of(server.request("GET", f"secret/subkeys/{name}", params={"version": "1"}))
    assert set(result) == {"subkeys", "metadata"}
    keys_between(result["metadata"], VERSION_METADATA)
    assert result["subkeys"] == {"a": None, "b": {"c": None, "d": {"e": None}}, "f": None}
    assert result["metadata"]["version"] == 1
    shallow = data_of(server.request("GET", f"secret/subkeys/{name}", params={"version": "1", "depth": "1"}))
    assert shallow["subkeys"] == {"a": None, "b": None, "f": None}
    assert data_of(server.request("GET", f"secret/subkeys/{name}"))["subkeys"] == {"only": {"v2": None}}
    assert errors(server.request("GET", f"secret/subkeys/{name}-missing"), 404) == []
