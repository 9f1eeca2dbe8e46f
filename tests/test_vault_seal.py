"""vault_like's root key sealed by attested KMS, in an in-process dev world (moto + attesting KMS front)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from plugins.vault_like.barrier import Barrier, BarrierError
from plugins.vault_like.seal import ENCRYPTION_CONTEXT, UnsealError, init_root_key, unseal_root_key
from plugins.vault_like.storage import MemoryStorage
from sidecar.attestation.emulator import DevPki, NsmEmulator
from sidecar.aws.kms import AttestedKms
from sidecar.devworld.world import DevWorld
from sidecar.recipient import RecipientKey
from tests.devworld_support import attested_kms, running_world

pytestmark = pytest.mark.slow

OTHER_PCR0 = hashlib.sha384(b"another enclave image").digest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevWorld, DevPki]]:
    """An in-process dev world whose servers run on a loop in a background thread."""
    pcr0 = hashlib.sha384(b"vault-like measured enclave").digest()
    with running_world(tmp_path_factory.mktemp("pki"), pcr0) as dev_world:
        yield dev_world


async def test_init_then_unseal_round_trip(world: tuple[DevWorld, DevPki]) -> None:
    dev, pki = world
    kms = attested_kms(dev, pki, dev.pcr0)
    root, config = await init_root_key(kms, "alias/dev-enclave")  # pinned to dev.pcr0 by the world
    assert len(root) == 32
    assert config["type"] == "awskms" and config["encryption_context"] == ENCRYPTION_CONTEXT
    assert config["key_id"].startswith("arn:aws:kms:") and config["key_id"].endswith(dev.key_id)
    assert base64.b64decode(config["ciphertext"]) != root
    # A restart: a new recipient key and a new attestation, same measurements.
    assert await unseal_root_key(attested_kms(dev, pki, dev.pcr0), config) == root
    # The whole chain: the barrier initialised with this root key opens again after a restart.
    storage = MemoryStorage()
    await Barrier(storage).initialize(root, config)
    restarted = Barrier(storage)
    seal_config = await restarted.read_seal_config()
    assert seal_config is not None
    await restarted.unseal(await unseal_root_key(attested_kms(dev, pki, dev.pcr0), seal_config))
    assert not restarted.sealed


async def test_a_different_enclave_image_cannot_unseal(world: tuple[DevWorld, DevPki]) -> None:
    """Threat: a different enclave image (another PCR0: a modified sidecar, a debug build, an
    attacker's image run on the same instance with the same IAM role) unsealing the store. The
    store was initialised by the measured image; KMS checks the attestation against the key policy
    and refuses the other image, which stays sealed with a clear, public reason."""
    dev, pki = world
    _, config = await init_root_key(attested_kms(dev, pki, dev.pcr0), "alias/dev-enclave")
    with pytest.raises(UnsealError) as err:
        await unseal_root_key(attested_kms(dev, pki, OTHER_PCR0), config)
    assert str(err.value) == "KMS refused (AccessDeniedException)"


async def test_a_key_pinned_to_another_pcr0_cannot_unseal(world: tuple[DevWorld, DevPki]) -> None:
    """Threat: the store's KMS key belongs to another image (its policy pins another PCR0): this
    image must be refused both the new root key at init and the root key at unseal."""
    dev, pki = world
    other_key = dev.create_key(OTHER_PCR0.hex(), "alias/vault-other-image")
    ours = attested_kms(dev, pki, dev.pcr0)
    with pytest.raises(UnsealError, match=r"^KMS refused \(AccessDeniedException\)$"):
        await init_root_key(ours, other_key)
    # The other image could initialise; we (dev.pcr0) still cannot unseal what it sealed.
    _, config = await init_root_key(attested_kms(dev, pki, OTHER_PCR0), other_key)
    with pytest.raises(UnsealError, match=r"^KMS refused \(AccessDeniedException\)$"):
        await unseal_root_key(ours, config)


async def test_a_kms_that_ignores_recipient_is_refused(world: tuple[DevWorld, DevPki]) -> None:
    # Threat: a KMS stand-in (bare moto) handing out plaintext without checking any measurement.
    dev, pki = world
    bare = boto3.client(
        "kms",
        endpoint_url=dev.moto_url,
        region_name=dev.region,
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    kms = AttestedKms(bare, NsmEmulator(pki, pcrs={0: dev.pcr0}).attestation, RecipientKey.generate())
    with pytest.raises(UnsealError, match="attested KMS failed"):
        await init_root_key(kms, dev.key_id)


async def test_a_tampered_ciphertext_or_another_context_fails(world: tuple[DevWorld, DevPki]) -> None:
    dev, pki = world
    kms = attested_kms(dev, pki, dev.pcr0)
    root, config = await init_root_key(kms, "alias/dev-enclave")
    blob = bytearray(base64.b64decode(config["ciphertext"]))
    blob[-5] ^= 0x01
    with pytest.raises(UnsealError, match="KMS refused"):
        await unseal_root_key(kms, {**config, "ciphertext": base64.b64encode(bytes(blob)).decode()})
    with pytest.raises(UnsealError, match="KMS refused"):
        await unseal_root_key(kms, {**config, "encryption_context": {"purpose": "something else"}})
    # A root key that is not this store's does not open its barrier either.
    storage = MemoryStorage()
    await Barrier(storage).initialize(root, config)
    other_root, _ = await init_root_key(kms, "alias/dev-enclave")
    with pytest.raises(BarrierError, match="root key does not open the keyring"):
        await Barrier(storage).unseal(other_root)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"type": "shamir"},
        {"type": "awskms", "key_id": "k"},
        {"type": "awskms", "key_id": "k", "ciphertext": "not base64!"},
        {"type": "awskms", "key_id": "", "ciphertext": "AAAA"},
        {"type": "awskms", "key_id": "k", "ciphertext": "AAAA", "encryption_context": "x"},
    ],
)
async def test_malformed_seal_config_is_a_clear_error(config: dict[str, Any]) -> None:
    class NoKms:
        def decrypt(self, **params: Any) -> dict[str, Any]:
            raise AssertionError("a malformed seal must not reach KMS")

    with pytest.raises(UnsealError, match="seal config"):
        await unseal_root_key(NoKms(), config)  # type: ignore[arg-type]
