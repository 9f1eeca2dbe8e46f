"""The object handed to every plugin: its config and the sidecar's services.

Services (attested KMS, AWS clients, attestation, an HTTP session through egress) are provided by
the sidecar's runtime. One that this sidecar does not provide raises :class:`ServiceNotConfigured`
with a clear reason instead of failing somewhere deeper.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

T = TypeVar("T")


class ServiceNotConfigured(RuntimeError):
    """A plugin asked for a service this sidecar does not provide."""


@dataclass
class Services:
    """What the runtime provides. Each slot stays None until something fills it."""

    nsm: Any = None  # sidecar.attestation.nsm.Nsm: the device or the emulator
    recipient: Any = None  # sidecar.recipient.RecipientKey
    kms: Any = None
    aws: Callable[..., Any] | None = None
    attest: Callable[..., Awaitable[bytes]] | None = None
    http: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Called as listener(status, **fields) when the sidecar's status changes: starting, ready,
    # fatal, stopping, exited (with code). The vsock status stream is one such listener.
    status_listeners: list[Callable[..., None]] = field(default_factory=list)

    def announce(self, status: str, **fields: Any) -> None:
        for listener in list(self.status_listeners):
            listener(status, **fields)


def _missing(what: str) -> ServiceNotConfigured:
    return ServiceNotConfigured(
        f"{what} is not configured in this sidecar: start it with `sidecar run` on an enclave "
        "or `sidecar dev`, or provide it to the test harness"
    )


@dataclass
class PluginContext:
    """Everything a plugin may use. One instance per plugin, made by the runtime.

    ``config`` is the plugin's own section of sidecar.yaml, already checked against the schema the
    plugin declared. ``log`` is a logger named ``plugins.<name>``; log events with
    :func:`sidecar.logs.event`, and never log secrets, tokens or names from protected data.
    """

    name: str
    config: dict[str, Any]
    listen_port: int | None
    state_dir: Path
    services: Services
    log: logging.Logger = field(init=False)

    def __post_init__(self) -> None:
        self.log = logging.getLogger(f"plugins.{self.name}")

    def state(self, factory: Callable[[PluginContext], T]) -> T:
        """The plugin's one state object: ``factory(context)`` on first use, the same object after.

        Kept with the sidecar's services, so every hook of this plugin shares it, even one given
        another context object (the test harness makes them per call). One per plugin name.
        """
        key = f"plugins.{self.name}.state"
        if key not in self.services.extra:
            self.services.extra[key] = factory(self)
        return cast(T, self.services.extra[key])

    @property
    def kms(self) -> Any:
        """The attested KMS client: Decrypt and friends, with this enclave's attestation."""
        if self.services.kms is None:
            raise _missing("attested KMS")
        return self.services.kms

    def aws(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for ``service`` with the sidecar's credentials, region and egress proxy."""
        if self.services.aws is None:
            raise _missing("the AWS client factory")
        return self.services.aws(service, **kwargs)

    async def attest(
        self, *, nonce: bytes | None = None, user_data: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        """An attestation document (COSE_Sign1 bytes) from the NSM, with the given fields."""
        if self.services.attest is None:
            raise _missing("attestation (NSM)")
        return await self.services.attest(nonce=nonce, user_data=user_data, public_key=public_key)

    @property
    def http(self) -> Any:
        """An ``aiohttp.ClientSession`` whose traffic leaves through the egress proxy and its policy."""
        if self.services.http is None:
            raise _missing("the egress HTTP session")
        return self.services.http
