"""The dev world: every AWS stand-in ``sidecar dev`` needs, started together in one process.

- moto's server (S3 and KMS keys), in a thread, on loopback;
- the attesting KMS front before it, which honours ``Recipient`` as AWS KMS does;
- a strict IMDSv2 server with short-lived, rotating credentials;
- a KMS key whose policy pins the measured PCR0 (alias ``alias/dev-enclave``), and a bucket.

The sidecar then runs its production code against these endpoints: only the addresses differ.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.exceptions import ClientError
from cryptography import x509
from moto.server import ThreadedMotoServer

from sidecar.attestation.policy import key_policy
from sidecar.devworld.imds import DevImds
from sidecar.devworld.kms_front import AttestingKmsFront
from sidecar.logs import event

log = logging.getLogger("sidecar.devworld")

REGION = "us-east-1"
KEY_ALIAS = "alias/dev-enclave"
BUCKET = "enclave-sidecar-dev"
# moto accepts any credentials; these only set up the world (the sidecar uses IMDS's).
ADMIN = {"aws_access_key_id": "devworld-admin", "aws_secret_access_key": "devworld-admin"}


@dataclass
class DevWorld:
    dev_root: x509.Certificate
    pcr0: bytes
    credential_lifetime: float = 900.0
    region: str = REGION
    moto: ThreadedMotoServer | None = field(default=None, repr=False)
    imds: DevImds | None = field(default=None, repr=False)
    front: AttestingKmsFront | None = field(default=None, repr=False)
    moto_url: str = ""
    imds_url: str = ""
    kms_url: str = ""
    key_id: str = ""

    async def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
        try:
            self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.moto.start()
            host, port = self.moto.get_host_and_port()
            self.moto_url = f"http://{host}:{port}"
            self.imds = DevImds(region=self.region, credential_lifetime=self.credential_lifetime)
            self.imds_url = await self.imds.start()
            self.front = AttestingKmsFront(self.moto_url, self.dev_root)
            self.kms_url = await self.front.start()
            self.key_id = self.create_key(self.pcr0.hex(), KEY_ALIAS)
            self.admin("s3").create_bucket(Bucket=BUCKET)
        except BaseException:
            # A half-started world (a debug-mode PCR0 of zeros refused by the key policy, say) would
            # leave moto, the IMDS thread and the front serving: callers only stop a started world.
            await self.stop()
            raise
        event(
            log,
            logging.INFO,
            "devworld_ready",
            imds=self.imds_url,
            kms=self.kms_url,
            s3=self.moto_url,
            key=self.key_id,
            alias=KEY_ALIAS,
            bucket=BUCKET,
        )

    def admin(self, service: str) -> Any:
        """A client straight to moto (not through the front), for setting the world up."""
        url = self.moto_url
        return boto3.client(service, endpoint_url=url, region_name=self.region, **ADMIN)

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` in the world's S3 unless it exists (what an operator does beforehand)."""
        s3 = self.admin("s3")
        try:
            s3.head_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        if self.region == "us-east-1":  # S3 refuses a LocationConstraint naming us-east-1
            s3.create_bucket(Bucket=bucket)
        else:
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})

    def create_key(self, pcr0_hex: str, alias: str | None = None) -> str:
        """A symmetric key only an enclave measuring to ``pcr0_hex`` may use."""
        kms = self.admin("kms")
        policy = key_policy(pcr0_hex)
        key_id: str = kms.create_key(Policy=json.dumps(policy), Description="enclave-sidecar dev key")[
            "KeyMetadata"
        ]["KeyId"]
        if alias:
            try:
                kms.create_alias(AliasName=alias, TargetKeyId=key_id)
            except kms.exceptions.AlreadyExistsException:
                # moto's backend is per process: a second world in one process (tests) finds the
                # first one's alias. Point it at the new key, as a re-created world would.
                kms.update_alias(AliasName=alias, TargetKeyId=key_id)
        return key_id

    @property
    def endpoints(self) -> dict[str, str]:
        """Endpoint overrides for the sidecar's client factory (the dev world only)."""
        return {"kms": self.kms_url, "s3": self.moto_url}

    @property
    def egress_rules(self) -> tuple[str, ...]:
        """Egress allow rules for exactly the world's endpoints (host:port), for the dev world only."""
        return tuple(url.split("://", 1)[1] for url in (self.imds_url, self.kms_url, self.moto_url))

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()
        if self.imds is not None:
            await self.imds.stop()
        if self.moto is not None:
            self.moto.stop()


async def run_dev_world(runtime: Any, services: Any, manifest: Any) -> int:
    """Start the world, point the sidecar's AWS setup at it, serve until a signal, stop it all."""
    from sidecar.aws.imds import ImdsClient
    from sidecar.aws.plugin import SETUP_KEY, AwsSetup
    from sidecar.bootstrap import network_setup
    from sidecar.net.plugin import SETUP_KEY as NETWORK_KEY

    nsm = services.nsm
    world = DevWorld(dev_root=nsm.pki.root, pcr0=nsm.describe_pcr(0).data)
    await world.start()
    # The sidecar reaches the world through its egress proxy, as it reaches AWS in an enclave. The
    # world's loopback endpoints are allowed here only; the measured manifest is unchanged.
    network = network_setup(manifest, services.extra[NETWORK_KEY].network, extra_allow=world.egress_rules)
    services.extra[NETWORK_KEY] = network
    event(log, logging.INFO, "devworld_egress_allowed", rules=list(world.egress_rules))
    services.extra[SETUP_KEY] = AwsSetup(
        ImdsClient(world.imds_url, proxy=network.proxy_url),
        proxy=network.proxy_url,
        endpoints=world.endpoints,
        kms_proxy_port=manifest.kms_proxy_port,
    )
    try:
        await prepare_plugins(runtime, world)
        return int(await runtime.serve_forever())
    finally:
        await world.stop()


async def prepare_plugins(runtime: Any, world: DevWorld) -> None:
    """Each enabled plugin's ``prepare_dev_world`` hook, in a worker thread (boto3 blocks)."""
    from sidecar.plugins import PluginError, call_plugin

    for name, state in runtime.plugins.items():
        try:
            await asyncio.to_thread(
                call_plugin, runtime.pm, name, "prepare_dev_world", world=world, context=state.context
            )
        except Exception as exc:
            raise PluginError(name, f"cannot prepare the dev world: {type(exc).__name__}: {exc}") from exc
        event(log, logging.DEBUG, "devworld_prepared", plugin=name)
