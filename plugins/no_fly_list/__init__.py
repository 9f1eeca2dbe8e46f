"""no_fly_list: passenger screening against a sealed no-fly list (GET /enclave/passenger).

At start-up the plugin fetches the sealed list (an S3 object or a local file), has attested KMS
decrypt its data key, opens it and keeps only keyed hashes of the normalised names; then it serves
``GET /enclave/passenger?name=NAME`` and ``POST /enclave/passengers`` on its ingress listener, with
a per-client rate limit, and polls the envelope for changes. See :mod:`.service` for the HTTP API,
:mod:`.normalize` for the matching rule, :mod:`.index` for what is kept in memory, and
:mod:`.source` for where the list comes from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from plugins.no_fly_list.cli import register_commands as register_commands
from plugins.no_fly_list.devworld import prepare_dev_world as prepare_dev_world
from plugins.no_fly_list.service import NoFlyService
from plugins.no_fly_list.source import check_location
from sidecar import Listener, PluginContext, Route, hookimpl
from sidecar.schema import Bool, Float, Int, Map, Str


@hookimpl
def register_config_schema() -> Map:
    return Map(
        fields={
            "envelope": Str(
                required=True,
                min_len=1,
                check_fn=check_location,
                doc="s3://bucket/key, or a local path (absolute, or relative to the working directory)",
            ),
            "key_id": Str(required=True, min_len=1, doc="the KMS key (id, ARN or alias) of the list"),
            "reload_interval": Int(min=0, default=60, doc="seconds between ETag polls; 0 turns reload off"),
            "max_batch": Int(min=1, max=10_000, default=1000, doc="names per POST /enclave/passengers"),
            "rate_limit": Map(
                doc="per-client token bucket (client: the TCP peer address, an IPv6 one by its /64); "
                "one token per name checked",
                fields={
                    "enabled": Bool(default=True),
                    "per_second": Float(min=0.001, default=20.0, doc="tokens added per second"),
                    "burst": Int(
                        min=1,
                        default=40,
                        doc="bucket size: single checks without waiting (one batch of up to max_batch "
                        "names may still go through at once, and is then waited out at per_second)",
                    ),
                    "max_clients": Int(min=1, default=10_000, doc="buckets kept (least recently used go)"),
                },
            ),
            "metrics_interval": Int(min=0, default=60, doc="seconds between no_fly_metrics lines; 0: off"),
        }
    )


def service_of(context: PluginContext) -> NoFlyService:
    """The plugin's state for this sidecar (made on first use, kept with the sidecar's services)."""
    return context.state(NoFlyService)


@hookimpl
def register_routes(listener: Listener, context: PluginContext) -> list[Route]:
    return service_of(context).routes(listener)


@hookimpl
async def lifespan(context: PluginContext) -> AsyncIterator[None]:
    state = service_of(context)
    await state.start()  # PluginStartupError (a public reason) when the list cannot be loaded
    try:
        yield
    finally:
        await state.stop()


@hookimpl
def readiness(context: PluginContext) -> str | None:
    return service_of(context).readiness()
