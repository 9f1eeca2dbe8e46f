"""``sidecar vault``: operator commands against a running vault_like store (over its HTTP API).

- ``sidecar vault init``: ``PUT /v1/sys/init``. Prints the root token once; it is stored only as a
  hash, so it cannot be shown again. ``--json`` prints Vault's init answer instead.
- ``sidecar vault status``: ``GET /v1/sys/seal-status``, like ``vault status``.

The address is ``--address``, else ``VAULT_ADDR`` / ``BAO_ADDR``, else ``http://127.0.0.1:8200``;
``--ca-cert`` (or ``VAULT_CACERT``) names the CA bundle for an https address. Exit codes: 0 done (for
``status``: unsealed), 1 the request failed (already initialised, unreachable...), 2 usage or
(``status``) sealed, as ``vault status`` exits 2 when sealed.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final, NoReturn

import click

from sidecar import hookimpl

DEFAULT_ADDRESS: Final = "http://127.0.0.1:8200"
TIMEOUT: Final = 60.0  # initialisation includes an attested KMS round trip
MAX_ANSWER_BYTES: Final = 1 << 20  # sys/init and sys/seal-status answer a few hundred bytes
EXIT_FAILED: Final = 1
EXIT_SEALED: Final = 2


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _address(address: str | None) -> str:
    value = address or os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR") or DEFAULT_ADDRESS
    if not value.startswith(("http://", "https://")):
        _fail(f"--address {value!r}: expected http://HOST:PORT or https://HOST:PORT", 2)
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        _fail(f"--address {value!r}: {exc}", 2)
    if not parts.hostname or not value.isprintable() or " " in value:
        _fail(f"--address {value!r}: expected http://HOST:PORT or https://HOST:PORT", 2)
    return value.rstrip("/")


def _call(
    method: str, address: str, path: str, body: dict[str, Any] | None, ca_cert: str | None
) -> tuple[int, Any]:
    """One request; (status, parsed JSON or None). Connection problems end the command."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{address}/v1/{path}", data=data, method=method)  # noqa: S310 - http(s) only, checked by _address
    if data is not None:
        request.add_header("Content-Type", "application/json")
    context = None
    if address.startswith("https://"):
        cafile = ca_cert or os.environ.get("VAULT_CACERT") or None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:  # missing, a directory, not PEM
            _fail(f"--ca-cert {cafile}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}", 2)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:  # noqa: S310
            status, raw = response.status, response.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(MAX_ANSWER_BYTES)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _fail(f"cannot reach {address}: {reason}")
    except (http.client.HTTPException, ValueError) as exc:  # not HTTP (a garbage status line), a bad URL
        _fail(f"cannot talk to {address}: {exc.__class__.__name__}")
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def _errors(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("errors"), list) and answer["errors"]:
        return "; ".join(str(e).strip() for e in answer["errors"])
    return "no error message"


@click.group("vault")
def vault() -> None:
    """Operator tools for the vault_like store (its HTTP API, like the vault/bao CLI).

    \b
      sidecar vault init --address http://127.0.0.1:8200
      sidecar vault status
    """


address_option = click.option(
    "--address",
    metavar="URL",
    help=f"the store's address (default: $VAULT_ADDR, $BAO_ADDR, {DEFAULT_ADDRESS})",
)
ca_option = click.option(
    "--ca-cert", metavar="FILE", help="CA bundle for an https address (default: $VAULT_CACERT)"
)


@vault.command("init")
@address_option
@ca_option
@click.option("--json", "as_json", is_flag=True, help="print Vault's init answer as JSON")
def init(address: str | None, ca_cert: str | None, as_json: bool) -> None:
    """Initialise the store and print the root token once.

    The root key is made by attested KMS inside the enclave (no unseal keys exist: the store
    unseals itself through attestation). The root token is stored only as a hash: keep it now, it
    cannot be shown again. Exit code 0 initialised, 1 failed (already initialised, unreachable).
    """
    url = _address(address)
    status, answer = _call("PUT", url, "sys/init", {}, ca_cert)
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("root_token"), str):
        _fail(f"{url}: init failed (HTTP {status}): {_errors(answer)}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"Initial Root Token: {answer['root_token']}")
    click.echo("")
    click.echo(
        "The store is initialised and unsealed; it unseals itself at every start through attested KMS."
    )
    click.echo("The root token is stored only as a hash and cannot be shown again: keep it safe now.")


@vault.command("status")
@address_option
@ca_option
@click.option("--json", "as_json", is_flag=True, help="print sys/seal-status as JSON")
def status(address: str | None, ca_cert: str | None, as_json: bool) -> None:
    """Show the store's seal status. Exit code 0 unsealed, 2 sealed, 1 unreachable."""
    url = _address(address)
    code, answer = _call("GET", url, "sys/seal-status", None, ca_cert)
    if code != 200 or not isinstance(answer, dict):
        _fail(f"{url}: sys/seal-status failed (HTTP {code}): {_errors(answer)}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        rows = [
            ("Seal Type", answer.get("type")),
            ("Initialized", answer.get("initialized")),
            ("Sealed", answer.get("sealed")),
            ("Version", answer.get("version")),
            ("Storage Type", answer.get("storage_type")),
            ("Cluster Name", answer.get("cluster_name", "-")),
            ("Cluster ID", answer.get("cluster_id", "-")),
        ]
        for name, value in rows:
            shown = str(value).lower() if isinstance(value, bool) else value
            click.echo(f"{name:<16}{shown}")
    if answer.get("sealed", True):
        raise click.exceptions.Exit(EXIT_SEALED)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(vault)
