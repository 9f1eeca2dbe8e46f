"""One factory for boto3 clients: the sidecar's credentials, region, egress proxy and retry policy.

Every AWS client the sidecar or a plugin uses comes from :class:`ClientFactory`, so they all share
the same choices: credentials from the session (IMDSv2 in production), the discovered region, the
egress proxy (inside an enclave there is no other way out), botocore's ``standard`` retry mode and
bounded timeouts. Clients are cached: boto3 clients are thread-safe, and building one costs
milliseconds of model loading.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from types import MappingProxyType
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import NoCredentialsError
from botocore.model import ServiceModel

from sidecar.logs import event

log = logging.getLogger("sidecar.aws.clients")

try:
    SIDECAR_VERSION = version("enclave-sidecar")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    SIDECAR_VERSION = "0.0.0"
USER_AGENT_EXTRA = f"enclave-sidecar/{SIDECAR_VERSION}"


class ClientFactory:
    """boto3 clients with the sidecar's credentials, region, egress proxy and retry policy.

    ``session`` supplies the credentials (in production a botocore session whose provider reads
    IMDSv2, see :mod:`sidecar.aws.imds`). ``proxy`` is the egress proxy URL; without it, clients
    connect directly (tests, or a sidecar outside an enclave). ``max_attempts`` counts every attempt,
    the first included.

    ``endpoints`` maps a service name (``"s3"``, ``"kms"``) to an endpoint URL. **It exists for the
    dev world only** (moto and the attesting KMS front on localhost). In production it is empty and
    every client talks to AWS's own regional endpoint; a non-empty mapping is logged at start-up so a
    misconfigured production sidecar is visible.

    ``client(service, **overrides)`` takes ``region_name``, ``endpoint_url`` and any
    :class:`botocore.config.Config` field (``s3={"addressing_style": "path"}``, ...) or a ``config``.
    Clients are cached per service, region, endpoint and overrides.
    """

    def __init__(
        self,
        session: botocore.session.Session | boto3.Session,
        region: str,
        *,
        proxy: str | None = None,
        endpoints: Mapping[str, str] | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5,
        read_timeout: float = 30,
    ) -> None:
        # boto3.Session.client is the one way to make boto3 clients (resource-free, same as
        # `boto3.client`); a botocore session is wrapped, keeping its credential provider.
        self.session = (
            session if isinstance(session, boto3.Session) else boto3.Session(botocore_session=session)
        )
        self.region = region
        self.proxy = proxy
        self.endpoints: Mapping[str, str] = MappingProxyType(dict(endpoints or {}))
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._config = Config(
            region_name=region,
            # total_max_attempts counts the first attempt, as AWS_MAX_ATTEMPTS does; botocore reads a
            # "max_attempts" key here as retries *after* the first (5 would mean 6 attempts).
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            proxies={"http": proxy, "https": proxy} if proxy else None,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            user_agent_extra=USER_AGENT_EXTRA,
        )
        self._clients: dict[tuple[str, str, str | None, str], Any] = {}
        # boto3 clients are thread-safe, but making one from a shared Session is not.
        self._lock = threading.Lock()
        if self.endpoints:
            event(log, logging.INFO, "aws_endpoint_override", services=sorted(self.endpoints))

    def __repr__(self) -> str:
        return (
            f"ClientFactory(region={self.region!r}, proxy={self.proxy!r}, endpoints={dict(self.endpoints)!r})"
        )

    @property
    def config(self) -> Config:
        """The base client configuration (region, retries, proxies, timeouts, user agent)."""
        return self._config

    def client(self, service: str, **overrides: Any) -> Any:
        """A (cached) boto3 client for ``service``. See the class docstring for ``overrides``."""
        region: str = overrides.pop("region_name", None) or self.region
        endpoint: str | None = overrides.pop("endpoint_url", None) or self.endpoints.get(service)
        extra: Config | None = overrides.pop("config", None)
        # repr() keeps the key hashable for dict-valued options such as s3={...}.
        key = (service, region, endpoint, repr(sorted(overrides.items())) + repr(extra and vars(extra)))
        client = self._clients.get(key)
        if client is not None:
            return client
        config = self._config.merge(Config(region_name=region, **overrides))
        if extra is not None:
            config = config.merge(extra)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self.session.client(
                    service, region_name=region, endpoint_url=endpoint, config=config
                )
                self._clients[key] = client
        return client

    def credentials(self) -> ReadOnlyCredentials:
        """The session's current credentials, frozen (refreshed first when they are about to expire).

        This may block on IMDS while a refresh is due: call it from a thread in async code.
        """
        credentials = self.session.get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        frozen: ReadOnlyCredentials = credentials.get_frozen_credentials()
        return frozen

    def service_model(self, service: str) -> ServiceModel:
        """botocore's model of ``service`` (shapes, operations), without resolving credentials."""
        # boto3.Session has no public accessor for its botocore session; this one is stable since
        # boto3 1.0. Creating a client instead would resolve credentials (an IMDS call) for nothing.
        model: ServiceModel = self.session._session.get_service_model(service)
        return model
