"""The ``aws`` core plugin: credentials from IMDSv2, then attested KMS, AWS clients, the KMS proxy.

Its lifespan runs before every other plugin's, so a plugin's start-up can use ``context.kms`` and
``context.aws(...)``. While IMDS cannot be reached it keeps retrying with backoff (each failure
logged with its reason) and readiness stays false; the sidecar never exits because of it. Once the
credentials are there, the KMS proxy opens on ``kms_proxy.listen_port`` for unmodified boto3 apps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar import PluginContext, hookimpl

if TYPE_CHECKING:
    from sidecar.aws.imds import ImdsClient

SETUP_KEY = "aws"


@dataclass
class AwsSetup:
    """What start-up decided: where IMDS is, endpoint overrides (dev world only), proxy, ports."""

    imds: ImdsClient
    region: str | None = None
    proxy: str | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    kms_proxy_port: int | None = None
    kms_proxy_url: str | None = None
    factory: Any = None


@hookimpl
async def lifespan(context: PluginContext) -> AsyncIterator[None]:
    setup: AwsSetup | None = context.services.extra.get(SETUP_KEY)
    if setup is None:  # this sidecar was started without AWS (attestation.nsm/aws.imds off, tests)
        yield
        return
    # Imported here: boto3 is slow to import, and most CLI commands never need it.
    from sidecar.aws.clients import ClientFactory
    from sidecar.aws.imds import botocore_session, wait_for_imds
    from sidecar.aws.kms import AttestedKms
    from sidecar.aws.kms_proxy import start_kms_proxy

    _, region = await wait_for_imds(setup.imds)
    # botocore_session asks IMDS (synchronously, through the egress proxy): off the event loop.
    session = await asyncio.to_thread(botocore_session, setup.imds)
    factory = ClientFactory(session, setup.region or region, proxy=setup.proxy, endpoints=setup.endpoints)
    setup.factory = factory
    services = context.services
    services.aws = factory.client
    runner = None
    if services.nsm is not None and services.recipient is not None:
        services.kms = AttestedKms(factory.client("kms"), services.nsm.attestation, services.recipient)
        if setup.kms_proxy_port is not None:
            runner, setup.kms_proxy_url = await start_kms_proxy(services.kms, factory, setup.kms_proxy_port)
    try:
        yield
    finally:
        if runner is not None:
            await runner.cleanup()
