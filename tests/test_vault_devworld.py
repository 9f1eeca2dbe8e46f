"""vault_like in the dev world: the sealing key, auto-init, and unseal by attestation, end to end.

Two parts:

- In-process: a dev world (moto behind the attesting KMS front) and sidecars whose attested KMS
  client runs on the NSM emulator with a chosen PCR0. The store initialised by one enclave image
  opens again for that image and stays sealed for another (the key policy names only the first).
- ``sidecar dev`` subprocesses: the first run initialises the store itself, writes the root token
  file (0600), serves hvac (KV put/get, a policy-limited token refused); its log holds neither a
  written secret nor the root token. Its state directory is then copied twice and both copies
  started at once: ``restart`` (the dev world's key is restored: the store unseals, the secret is
  still there) and ``other_pcr0`` (a test plugin re-pins the key's policy to another image before
  start-up: the store stays sealed, sys/health 503, /enclave/ready says why).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import hvac
import hvac.exceptions
import pytest

import plugins.vault_like as vault_like
from plugins.vault_like.devworld import KEY_FILE, prepare_dev_world
from sidecar.attestation.emulator import DevPki
from sidecar.context import PluginContext, Services
from sidecar.devworld.world import ADMIN, DevWorld
from sidecar.testing import SidecarHarness, run_sidecar
from tests.conftest import ROOT, install_plugin_dist
from tests.devworld_support import (
    OPERATOR,
    DevSidecar,
    attested_kms,
    running_world,
    start,
    stop_all,
    wait_settled,
)

pytestmark = pytest.mark.slow

PCR0 = hashlib.sha384(b"vault-like measured enclave").digest()
OTHER_PCR0 = hashlib.sha384(b"another enclave image").digest()


# =========================================================================== in-process world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevWorld, DevPki]]:
    """An in-process dev world whose servers run on a loop in a background thread."""
    with running_world(tmp_path_factory.mktemp("pki"), PCR0) as dev_world:
        yield dev_world


def context_for(state: Path, key_id: str) -> PluginContext:
    return PluginContext("vault_like", {"key_id": key_id}, None, state, Services())


def test_prepare_makes_a_key_pinned_to_the_measured_pcr0_and_turns_on_auto_init(
    world: tuple[DevWorld, DevPki], tmp_path: Path
) -> None:
    # Threat: a demo key open to any image would make "sealed by attestation" an empty claim.
    dev, _ = world
    context = context_for(tmp_path, "alias/vault-prep")
    prepare_dev_world(dev, context)
    kms = dev.admin("kms")
    key = kms.describe_key(KeyId="alias/vault-prep")["KeyMetadata"]
    policy = kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]
    assert dev.pcr0.hex() in policy
    assert vault_like.service_of(context).auto_init is True
    saved = tmp_path / KEY_FILE
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["key_id"] == key["KeyId"]
    # A second start against the same world keeps the key.
    prepare_dev_world(dev, context_for(tmp_path, "alias/vault-prep"))
    assert kms.describe_key(KeyId="alias/vault-prep")["KeyMetadata"]["KeyId"] == key["KeyId"]


def test_a_new_dev_world_gets_the_saved_key_back(world: tuple[DevWorld, DevPki], tmp_path: Path) -> None:
    # `sidecar dev` restarts with a fresh moto; the store in STATE_DIR must still open.
    from moto.kms.models import kms_backends

    dev, _ = world
    prepare_dev_world(dev, context_for(tmp_path, "alias/vault-restore"))
    kms = dev.admin("kms")
    key_id = kms.describe_key(KeyId="alias/vault-restore")["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"root key")["CiphertextBlob"]
    # What a new world looks like: neither the key nor the alias exist.
    kms.delete_alias(AliasName="alias/vault-restore")
    for account in list(kms_backends.keys()):
        for region in list(kms_backends[account].keys()):
            kms_backends[account][region].keys.pop(key_id, None)
    prepare_dev_world(dev, context_for(tmp_path, "alias/vault-restore"))
    assert kms.describe_key(KeyId="alias/vault-restore")["KeyMetadata"]["KeyId"] == key_id
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"root key"


def test_a_missing_key_that_is_not_an_alias_is_an_error(
    world: tuple[DevWorld, DevPki], tmp_path: Path
) -> None:
    dev, _ = world
    missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    with pytest.raises(ValueError, match="use an alias/NAME"):
        prepare_dev_world(dev, context_for(tmp_path, missing))


@pytest.fixture
async def vault_in(world: tuple[DevWorld, DevPki]) -> AsyncIterator[Any]:
    import contextlib

    dev, pki = world
    async with contextlib.AsyncExitStack() as stack:

        async def start(state: Path, pcr0: bytes, key_id: str) -> SidecarHarness:
            services = Services()
            services.kms = attested_kms(dev, pki, pcr0)
            harness = await stack.enter_async_context(
                run_sidecar(
                    state_dir=state,
                    plugins={"vault_like": vault_like},
                    config={"vault_like": {"key_id": key_id, "auto_init": True}},
                    services=services,
                )
            )
            await harness.wait_started()
            return harness

        yield start


async def test_only_the_measured_image_unseals_the_store(
    world: tuple[DevWorld, DevPki], vault_in: Any, tmp_path: Path
) -> None:
    # Threat: another enclave image (a changed app or config) with a copy of the storage reading it.
    dev, _ = world
    state = tmp_path / "state"
    state.mkdir()
    await asyncio.to_thread(prepare_dev_world, dev, context_for(state, "alias/vault-pin"))
    first = await vault_in(state, PCR0, "alias/vault-pin")
    token = (state / "vault-root-token").read_text().strip()
    assert stat.S_IMODE((state / "vault-root-token").stat().st_mode) == 0o600
    headers = {"X-Vault-Token": token}
    async with first.session.post(
        first.url("/v1/secret/data/pinned"), json={"data": {"v": "pinned-value"}}, headers=headers
    ) as resp:
        assert resp.status == 200
    await first.runtime.stop()

    other = await vault_in(state, OTHER_PCR0, "alias/vault-pin")
    async with other.session.get(other.url("/v1/sys/health")) as resp:
        assert resp.status == 503 and (await resp.json())["sealed"] is True
    async with other.session.get(other.url("/v1/secret/data/pinned"), headers=headers) as resp:
        assert resp.status == 503 and await resp.json() == {"errors": ["Vault is sealed"]}
    async with other.session.get(other.url("/enclave/ready")) as resp:
        assert resp.status == 503
        assert (await resp.json())["plugins"]["vault_like"] == "sealed: KMS refused (AccessDeniedException)"
    assert (state / "vault-root-token").read_text().strip() == token  # a sealed start never re-initialises
    await other.runtime.stop()

    again = await vault_in(state, PCR0, "alias/vault-pin")
    async with again.session.get(again.url("/v1/secret/data/pinned"), headers=headers) as resp:
        assert resp.status == 200 and (await resp.json())["data"]["data"] == {"v": "pinned-value"}


# =========================================================================== sidecar dev, end to end

# Listed after vault_like: its prepare_dev_world runs once vault_like restored the key, and pins the
# key's policy to another enclave's PCR0, as if this image had never been allowed.
REPIN_PLUGIN = """
import json

from sidecar import hookimpl
from sidecar.attestation.policy import key_policy


@hookimpl
def prepare_dev_world(world, context):
    kms = world.admin("kms")
    key = kms.describe_key(KeyId="alias/vault-e2e")["KeyMetadata"]["KeyId"]
    kms.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(key_policy("ab" * 48)))
"""

SECRET = "e2e-secret-value-7f3a91"
AUDIT_BUCKET = "vault-e2e-audit"  # prepare_dev_world makes it, as an operator would in AWS
KEY_NAME = "e2e-key-name-c4d2"


def settings(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    plugins: dict[str, Any] = {
        "vault_like": {
            "listen_port": "INGRESS",
            "config": {"key_id": "alias/vault-e2e", "audit_log": f"s3://{AUDIT_BUCKET}/trail"},
        },
        **(extra or {}),
    }
    return {
        "log": {"level": "debug", "access": True},  # the most a log can say, for the scan
        "startup": {"on_failure": "unready"},
        "plugins": plugins,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The first run (used, then stopped), then the two restarts from copies of its state."""
    site = install_plugin_dist(
        tmp_path_factory.mktemp("vault-site"), "vault-e2e", {"vault_repin": REPIN_PLUGIN}
    )
    env = {
        **os.environ,
        **OPERATOR,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    started: list[DevSidecar] = []
    result: dict[str, Any] = {}
    try:
        first_dir = tmp_path_factory.mktemp("vault-first")
        first = start("first", first_dir, settings(), env)
        result["first_dir"] = first_dir
        started.append(first)
        result["first_ready"] = wait_settled(first, "vault_like")
        state = first_dir / "state"
        token_file = state / "vault-root-token"
        result["token_mode"] = stat.S_IMODE(token_file.stat().st_mode)
        token = token_file.read_text().strip()
        result["token"] = token
        url = f"http://127.0.0.1:{first.port}"
        client = hvac.Client(url=url, token=token)
        client.secrets.kv.v2.create_or_update_secret(path=KEY_NAME, secret={"password": SECRET})
        result["read"] = client.secrets.kv.v2.read_secret_version(
            path=KEY_NAME, raise_on_deleted_version=True
        )
        client.sys.create_or_update_policy(
            name="other-only", policy='path "secret/data/other" { capabilities = ["read"] }'
        )
        limited = client.auth.token.create(policies=["other-only"])["auth"]["client_token"]
        try:
            hvac.Client(url=url, token=limited).secrets.kv.v2.read_secret_version(
                path=KEY_NAME, raise_on_deleted_version=True
            )
            result["limited"] = "allowed"
        except hvac.exceptions.Forbidden:
            result["limited"] = "forbidden"
        result["audit"] = audit_objects(first.moto_url)  # the dev world's S3 ends with the process
        stop_all([first])
        result["first_log"] = first.log()

        for name, extra in (("restart", None), ("other_pcr0", {"vault_repin": {}})):
            directory = tmp_path_factory.mktemp(f"vault-{name}")
            shutil.copytree(state, directory / "state")
            sidecar = start(name, directory, settings(extra), env)
            started.append(sidecar)
            result[name] = sidecar
        for name in ("restart", "other_pcr0"):
            result[f"{name}_ready"] = wait_settled(result[name], "vault_like")
        yield result
    finally:
        stop_all(started)


def audit_objects(moto_url: str) -> dict[str, str]:
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", **ADMIN)
    listed = s3.list_objects_v2(Bucket=AUDIT_BUCKET, Prefix="trail/").get("Contents", [])
    return {
        o["Key"]: s3.get_object(Bucket=AUDIT_BUCKET, Key=o["Key"])["Body"].read().decode() for o in listed
    }


def test_first_start_initialises_and_serves_hvac(runs: dict[str, Any]) -> None:
    assert runs["first_ready"]["status"] == 200, runs["first_ready"]
    assert runs["token_mode"] == 0o600
    assert runs["token"].startswith("hvs.")
    assert runs["read"]["data"]["data"] == {"password": SECRET}
    assert runs["limited"] == "forbidden"


def test_the_log_holds_neither_secrets_nor_the_root_token(runs: dict[str, Any]) -> None:
    # Threat: debug logging, the access log or an error path writing a secret, its name, or the token.
    log = runs["first_log"]
    assert "vault_root_token_written" in log and "vault-root-token" in log  # the path is printed
    assert runs["token"] not in log
    assert SECRET not in log
    assert KEY_NAME not in log  # secret paths are sensitive: the access log shows the route pattern


def test_the_audit_trail_is_in_s3_through_the_sidecars_aws_clients(runs: dict[str, Any]) -> None:
    # Threat: an enclave's disk is its memory; the trail must outlive it, and hold no secret.
    objects = runs["audit"]
    assert objects and all(key.startswith("trail/") and key.endswith(".jsonl") for key in objects)
    entries = [json.loads(line) for text in objects.values() for line in text.splitlines()]
    writes = [e for e in entries if e["request"]["path"] == f"secret/data/{KEY_NAME}"]
    assert {e["type"] for e in writes} == {"request", "response"}
    everything = "".join(objects.values())
    assert SECRET not in everything and runs["token"] not in everything
    assert not (runs["first_dir"] / "state" / "vault-audit.log").exists()


def test_restart_unseals_with_the_restored_dev_key(runs: dict[str, Any]) -> None:
    assert runs["restart_ready"]["status"] == 200, runs["restart_ready"]
    sidecar: DevSidecar = runs["restart"]
    client = hvac.Client(url=f"http://127.0.0.1:{sidecar.port}", token=runs["token"])
    read = client.secrets.kv.v2.read_secret_version(path=KEY_NAME, raise_on_deleted_version=True)
    assert read["data"]["data"] == {"password": SECRET}


def test_a_key_pinned_to_another_pcr0_keeps_the_store_sealed(runs: dict[str, Any]) -> None:
    ready = runs["other_pcr0_ready"]
    assert ready["status"] == 503
    assert ready["plugins"]["vault_like"] == "sealed: KMS refused (AccessDeniedException)"
    sidecar: DevSidecar = runs["other_pcr0"]
    health = sidecar.request("GET", "/v1/sys/health")
    assert health.status == 503 and health.json()["sealed"] is True and health.json()["initialized"] is True
    seal = sidecar.request("GET", "/v1/sys/seal-status").json()
    assert seal["sealed"] is True and seal["type"] == "awskms"
    answer = sidecar.request("GET", f"/v1/secret/data/{KEY_NAME}", headers={"X-Vault-Token": runs["token"]})
    assert answer.status == 503 and answer.json() == {"errors": ["Vault is sealed"]}
    assert SECRET not in sidecar.log() and runs["token"] not in sidecar.log()
