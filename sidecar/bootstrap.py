"""Build the services a sidecar provides to its plugins, from the validated configuration.

``sidecar run`` opens the real NSM (``/dev/nsm``); ``sidecar dev`` and ``attestation.nsm: emulator``
use the emulator, whose PCRs are the measurement of this sidecar's code and configuration. The
recipient key is generated fresh at every start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from sidecar.attestation.nsm import Nsm, NsmDevice
from sidecar.config import Manifest, NetworkSettings, Settings
from sidecar.context import Services
from sidecar.logs import event
from sidecar.net.plugin import SETUP_KEY as NETWORK_KEY
from sidecar.net.plugin import NetworkSetup
from sidecar.net.policy import EgressPolicy
from sidecar.plugins import installed_entry_points
from sidecar.recipient import RecipientKey

log = logging.getLogger("sidecar.bootstrap")


class AttestFunction(Protocol):
    async def __call__(
        self, *, nonce: bytes | None = None, user_data: bytes | None = None, public_key: bytes | None = None
    ) -> bytes: ...


def plugin_modules(names: Sequence[str]) -> list[str]:
    """The importable module of each named, installed plugin (what the measurement covers)."""
    available = installed_entry_points()
    return [available[n].value.split(":")[0] for n in names if n in available]


def open_nsm(manifest: Manifest, settings: Settings, mode: str | None = None) -> Nsm | None:
    mode = mode or settings.nsm
    if mode == "off":
        return None
    if mode == "device":
        return NsmDevice(settings.nsm_device)
    from sidecar.attestation.emulator import DevPki, NsmEmulator
    from sidecar.attestation.measure import measure

    measurement = measure(manifest.path, settings.path, plugin_modules(settings.enabled_plugins))
    pki = DevPki.load_or_create(settings.state_dir)
    event(
        log,
        logging.INFO,
        "nsm_emulator",
        pcr0=measurement.pcr0.hex(),
        dev_root=str(settings.state_dir / "dev-root.pem"),
    )
    return NsmEmulator(pki, pcrs=measurement.as_dict())


def provide_services(
    services: Services, manifest: Manifest, settings: Settings, nsm_mode: str | None = None
) -> None:
    """Fill ``services`` (already handed to the plugins' contexts) before the sidecar starts."""
    services.recipient = RecipientKey.generate()
    services.nsm = open_nsm(manifest, settings, nsm_mode)
    if services.nsm is not None:
        services.attest = attest_function(services.nsm, settings.attest_concurrency)
    network = network_setup(manifest, settings.network)
    services.extra[NETWORK_KEY] = network
    if settings.imds != "off":
        from sidecar.aws.imds import ImdsClient
        from sidecar.aws.plugin import SETUP_KEY, AwsSetup

        # IMDS, KMS and S3 all leave through the egress proxy: inside an enclave there is no other way.
        services.extra[SETUP_KEY] = AwsSetup(
            ImdsClient(settings.imds, proxy=network.proxy_url),
            region=settings.region,
            proxy=network.proxy_url,
            kms_proxy_port=manifest.kms_proxy_port,
        )


def network_setup(
    manifest: Manifest, network: NetworkSettings, extra_allow: Sequence[str] = ()
) -> NetworkSetup:
    """The egress policy of the manifest (plus ``extra_allow``, which only the dev world passes)."""
    policy = EgressPolicy([*manifest.egress.allow, *extra_allow], manifest.egress.deny)
    return NetworkSetup(
        policy=policy,
        proxy_port=manifest.egress.proxy_port,
        network=network,
        ingress_ports=manifest.ingress_ports,
    )


def attest_function(nsm: Nsm, concurrency: int) -> AttestFunction:
    """An async ``attest(nonce=, user_data=, public_key=)`` that keeps the event loop free.

    NSM calls block (an ioctl, or signing in the emulator), so they run in a worker thread, and at
    most ``concurrency`` at once: a flood of attestation requests must not starve other traffic.
    """
    gate = asyncio.Semaphore(concurrency)

    async def attest(
        *, nonce: bytes | None = None, user_data: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        async with gate:
            return await asyncio.to_thread(
                nsm.attestation, nonce=nonce, user_data=user_data, public_key=public_key
            )

    return attest
