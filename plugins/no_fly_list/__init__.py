"""no_fly_list: passenger screening against a sealed no-fly list (GET /enclave/passenger).

This build ships the plugin's shell: its entry point, config schema and the `sidecar no-fly`
command group. Loading the sealed list and serving passengers are not part of it yet.
"""

from __future__ import annotations

import click

from sidecar import hookimpl
from sidecar.schema import Int, Map, Str

NOT_YET = "is not available in this build yet"


@hookimpl
def register_config_schema() -> Map:
    return Map(
        fields={
            "envelope": Str(doc="s3://bucket/key or a local path of the sealed list"),
            "key_id": Str(doc="the KMS key (id, ARN or alias) that sealed the list"),
            "reload_interval": Int(min=0, default=60, doc="seconds between ETag polls; 0 turns reload off"),
        }
    )


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.group("no-fly")
    def no_fly() -> None:
        """Operator tools for the no-fly list: seal, upload and check envelopes."""

    @no_fly.command("seal", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def seal() -> None:
        """Seal a list of names into an envelope with a KMS data key. (Not available yet; exits 2.)"""
        raise click.exceptions.Exit(_not_yet("sidecar no-fly seal"))

    @no_fly.command(
        "check-envelope", context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
    )
    def check_envelope() -> None:
        """Validate an envelope's structure without decrypting it. (Not available yet; exits 2.)"""
        raise click.exceptions.Exit(_not_yet("sidecar no-fly check-envelope"))


def _not_yet(command: str) -> int:
    click.echo(f"error: `{command}` {NOT_YET}", err=True)
    return 2
