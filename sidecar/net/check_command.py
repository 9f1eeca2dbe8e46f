"""``sidecar egress check``: ask the manifest's egress policy about one target, offline by default."""

from __future__ import annotations

import socket

import click

from sidecar.cli import fail, manifest_option
from sidecar.config import MANIFEST_ENV, MANIFEST_SEARCH, ConfigError, find_config, load_manifest
from sidecar.net.policy import EgressPolicy, PolicyError, parse_target

EXIT_DENIED = 1


def resolve(host: str, port: int | None) -> list[str]:
    """The addresses ``host`` resolves to, in resolver order, without repeats. Raises OSError."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@click.command("check")
@click.argument("target")
@manifest_option
@click.option(
    "--resolve",
    "do_resolve",
    is_flag=True,
    help="also resolve the name (DNS) and re-check every address against the IP/CIDR deny rules",
)
def check(target: str, manifest_path: str | None, do_resolve: bool) -> None:
    """Check TARGET against the manifest's egress.allow and egress.deny rules.

    TARGET is HOST, HOST:PORT, [IPV6]:PORT, or an http(s) URL (default ports 80 and 443). Prints
    the decision and the rule that made it, e.g.

    \b
      allowed: kms.us-east-1.amazonaws.com:443 by allow rule 'kms.*.amazonaws.com'

    Names are normalised first (case, trailing dot, IDNA), and numeric IPv4 spellings such as
    2130706433 or 0x7f.1 are checked as the address they are. Without a port, rules that name a
    port do not allow the target. Nothing touches the network unless --resolve is given.

    Exit code 0 allowed, 1 denied, 2 bad target or bad manifest.
    """
    try:
        host, port = parse_target(target)
    except PolicyError as exc:
        fail(f"bad target {target!r}: {exc}")
    path = find_config(manifest_path, MANIFEST_ENV, MANIFEST_SEARCH)
    if path is None:
        fail("no manifest found; pass --manifest FILE")
    try:
        policy = EgressPolicy.from_manifest(load_manifest(path))
    except (ConfigError, PolicyError) as exc:
        fail(str(exc))
    decision = policy.check(host, port)
    if do_resolve and decision.allowed:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            # Fail closed: a name that does not resolve cannot be shown to pass the deny rules.
            fail(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}", code=EXIT_DENIED)
        click.echo(f"resolved: {host} -> {', '.join(addresses)}")
        decision = policy.check_addresses(host, port, addresses)
    click.echo(decision.summary())
    if not decision.allowed:
        raise SystemExit(EXIT_DENIED)
