"""vault_like: a Vault-compatible secrets store whose storage is sealed by attested KMS.

This build ships the plugin's shell: its entry point, config schema and the `sidecar vault`
command group. The Vault API itself is not part of it yet.
"""

from __future__ import annotations

import click

from sidecar import hookimpl
from sidecar.schema import Map, Str


@hookimpl
def register_config_schema() -> Map:
    return Map(
        fields={
            "storage": Str(choices=["sqlite", "s3"], default="sqlite", doc="where sealed entries live"),
            "path": Str(doc="SQLite file, or s3://bucket/prefix"),
            "key_id": Str(doc="the KMS key that seals the root key"),
        }
    )


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.group("vault")
    def vault() -> None:
        """Operator tools for the vault_like store."""

    @vault.command("init", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def init() -> None:
        """Initialise the store and print the root token once. (Not available yet; exits 2.)"""
        click.echo("error: `sidecar vault init` is not available in this build yet", err=True)
        raise click.exceptions.Exit(2)
