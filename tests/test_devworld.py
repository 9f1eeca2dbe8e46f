"""The dev world end to end: `sidecar dev`, unmodified boto3 through the KMS proxy, PCR0 pinning.

Real parts throughout: moto's server, the attesting KMS front, the strict IMDS, the NSM emulator
with the measured PCRs, and the sidecar's own KMS proxy. Only the endpoints differ from AWS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from sidecar.attestation.emulator import DevPki, NsmEmulator
from sidecar.attestation.measure import measure
from sidecar.aws.clients import ClientFactory
from sidecar.aws.imds import ImdsClient, botocore_session
from sidecar.aws.kms import AttestedKms
from sidecar.devworld.world import KEY_ALIAS, DevWorld
from sidecar.recipient import RecipientKey
from sidecar.testing import free_port
from tests.conftest import ROOT
from tests.test_example_plugin import get

pytestmark = pytest.mark.slow


def app_kms(port: int) -> Any:
    """What an unmodified app inside the enclave does: boto3 with AWS_KMS_ENDPOINT."""
    return boto3.client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="app",
        aws_secret_access_key="app",
    )


@pytest.fixture(scope="module")
def dev_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("devworld")
    ports = {"ingress": free_port(), "api": free_port(), "kms": free_port(), "egress": free_port()}
    manifest = yaml.safe_load((ROOT / "enclaver.yaml").read_text())
    manifest["ingress"] = [{"listen_port": ports["ingress"]}]
    manifest["api"] = {"listen_port": ports["api"]}
    manifest["kms_proxy"] = {"listen_port": ports["kms"]}
    manifest["egress"]["proxy_port"] = ports["egress"]
    (directory / "enclaver.yaml").write_text(yaml.safe_dump(manifest))
    (directory / "sidecar.yaml").write_text(yaml.safe_dump({"plugins": {}, "log": {"access": False}}))
    log = (directory / "sidecar.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "dev", "--state-dir", str(directory / "state")],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (directory / "sidecar.log").read_text()
            try:
                if get(f"http://127.0.0.1:{ports['ingress']}/enclave/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("sidecar dev never became ready")
        events = [
            json.loads(line)
            for line in (directory / "sidecar.log").read_text().splitlines()
            if line.startswith("{")
        ]
        ready = next(e for e in events if e["event"] == "devworld_ready")
        yield {"ports": ports, "world": ready, "dir": directory, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_unmodified_boto3_encrypts_and_decrypts_through_the_proxy(dev_world: dict[str, Any]) -> None:
    kms = app_kms(dev_world["ports"]["kms"])
    blob = kms.encrypt(KeyId=KEY_ALIAS, Plaintext=b"the no-fly list key")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"the no-fly list key"
    data_key = kms.generate_data_key(KeyId=KEY_ALIAS, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    assert kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    assert len(kms.generate_random(NumberOfBytes=24)["Plaintext"]) == 24
    described = kms.describe_key(KeyId=KEY_ALIAS)["KeyMetadata"]  # a non-attested call, forwarded
    assert described["KeyId"] == dev_world["world"]["key"]


def test_a_key_pinned_to_another_pcr0_is_refused(dev_world: dict[str, Any]) -> None:
    # Threat: an enclave image other than the one the key was made for reading the data.
    admin = boto3.client(
        "kms", endpoint_url=dev_world["world"]["s3"], region_name="us-east-1",
        aws_access_key_id="admin", aws_secret_access_key="admin",
    )  # fmt: skip
    from sidecar.attestation.policy import key_policy

    other = admin.create_key(Policy=json.dumps(key_policy("ab" * 48)))["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=other, Plaintext=b"not for you")["CiphertextBlob"]
    kms = app_kms(dev_world["ports"]["kms"])
    for call in (
        lambda: kms.decrypt(CiphertextBlob=blob),
        lambda: kms.generate_data_key(KeyId=other, KeySpec="AES_256"),
    ):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "AccessDeniedException"


def test_the_sidecar_attests_its_measured_pcr0(dev_world: dict[str, Any]) -> None:
    measured = subprocess.run(
        [sys.executable, "-m", "sidecar", "measure", "--json"],
        cwd=dev_world["dir"], capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    pcr0 = json.loads(measured.stdout)["PCR0"]
    status, _ = get(f"http://127.0.0.1:{dev_world['ports']['ingress']}/enclave/health")
    assert status == 200
    trusted = subprocess.run(
        [sys.executable, "-m", "sidecar", "trust", f"http://127.0.0.1:{dev_world['ports']['ingress']}",
         "--root", str(dev_world["dir"] / "state" / "dev-root.pem"), "--expect-pcr", f"0={pcr0}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr


async def test_a_changed_config_measures_differently_and_kms_refuses_it(tmp_path: Path) -> None:
    # Threat: an operator (or attacker) changing the sidecar's config, e.g. loosening its egress
    # policy, and the changed enclave still decrypting. The config is measured into PCR0.
    shutil.copy(ROOT / "enclaver.yaml", tmp_path / "enclaver.yaml")
    original = tmp_path / "sidecar.yaml"
    shutil.copy(ROOT / "sidecar.yaml", original)
    changed = tmp_path / "changed.yaml"
    changed.write_text(original.read_text().replace("reload_interval: 60", "reload_interval: 61"))
    modules = ["plugins.no_fly_list", "plugins.vault_like"]
    pcr0_old = measure(tmp_path / "enclaver.yaml", original, modules).pcr0
    pcr0_new = measure(tmp_path / "enclaver.yaml", changed, modules).pcr0
    assert pcr0_old != pcr0_new

    pki = DevPki.load_or_create(tmp_path / "pki")
    world = DevWorld(dev_root=pki.root, pcr0=pcr0_old)
    await world.start()
    try:
        imds = ImdsClient(world.imds_url)
        factory = ClientFactory(botocore_session(imds), world.region, endpoints=world.endpoints)
        recipient = RecipientKey.generate()
        blob = world.admin("kms").encrypt(KeyId=KEY_ALIAS, Plaintext=b"sealed")["CiphertextBlob"]

        def decrypt_as(pcr0: bytes) -> bytes:
            nsm = NsmEmulator(pki, pcrs={0: pcr0})
            kms = AttestedKms(factory.client("kms"), nsm.attestation, recipient)
            return bytes(kms.decrypt(CiphertextBlob=blob)["Plaintext"])

        import asyncio

        assert await asyncio.to_thread(decrypt_as, pcr0_old) == b"sealed"
        with pytest.raises(ClientError) as err:
            await asyncio.to_thread(decrypt_as, pcr0_new)
        assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    finally:
        await world.stop()


async def test_a_world_that_fails_to_start_stops_what_it_started(tmp_path: Path) -> None:
    # Guards against leaks: a half-started world (here a debug-mode PCR0 of zeros, which the key
    # policy refuses) left moto, the IMDS thread and the front serving, since callers only stop a
    # world whose start() returned.
    pki = DevPki.load_or_create(tmp_path / "pki")
    world = DevWorld(dev_root=pki.root, pcr0=bytes(48))
    with pytest.raises(ValueError, match="all zeros"):
        await world.start()
    assert world.imds is not None and world.imds._thread is None
    assert world.front is not None and world.front._runner is None
    assert world.moto is not None and world.moto._thread is not None
    assert not world.moto._thread.is_alive()
