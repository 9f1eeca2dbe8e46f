"""The ``sidecar`` command line.

Exit codes: 0 success; 1 the thing checked failed (or start-up failed); 2 usage, input or config
error. Config errors print one line naming the file, the key path and the problem, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import yaml

from sidecar import __version__
from sidecar.config import (
    MANIFEST_ENV,
    MANIFEST_SEARCH,
    SETTINGS_ENV,
    SETTINGS_SEARCH,
    ConfigError,
    Manifest,
    Settings,
    find_config,
    load_manifest,
    load_settings,
    redacted_settings,
)
from sidecar.hotpath import UnsupportedAiohttp
from sidecar.logs import configure
from sidecar.plugins import PluginError, build_plugin_manager, hooks_of
from sidecar.schema import redact

if TYPE_CHECKING:
    from sidecar.supervise import Supervisor

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def manifest_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--manifest",
        "manifest_path",
        metavar="FILE",
        help=f"enclaver.yaml to use (default: ${MANIFEST_ENV}, ./enclaver.yaml, /etc/enclaver/enclaver.yaml)",
    )(f)


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_path",
        metavar="FILE",
        help=f"sidecar.yaml to use (default: ${SETTINGS_ENV}, ./sidecar.yaml, /etc/sidecar/sidecar.yaml)",
    )(f)


def load_both(manifest_path: str | None, config_path: str | None) -> tuple[Manifest, Settings]:
    mpath = find_config(manifest_path, MANIFEST_ENV, MANIFEST_SEARCH)
    if mpath is None:
        raise ConfigError("enclaver.yaml", "", "no manifest found; pass --manifest FILE")
    manifest = load_manifest(mpath)
    spath = find_config(config_path, SETTINGS_ENV, SETTINGS_SEARCH)
    return manifest, load_settings(spath, manifest)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sidecar")
def cli() -> None:
    """enclave-sidecar: attestation, attested KMS, egress policy and plugins for a Nitro Enclave.

    Start with `sidecar dev` on a laptop (local stand-ins for the NSM, IMDS, KMS and S3) or
    `sidecar run` inside an enclave. Every command takes --help.
    """


@cli.command()
@manifest_option
@config_option
@click.argument("command", nargs=-1, metavar="[-- CMD ...]")
def run(manifest_path: str | None, config_path: str | None, command: Sequence[str]) -> None:
    """Run the sidecar with the plugins sidecar.yaml enables, until SIGTERM or Ctrl-C.

    Listeners open at once (GET /enclave/health answers 200); GET /enclave/ready answers 503 until
    every plugin has started. Exit code 0 after a clean shutdown, 1 when a plugin fails to start
    (with startup.on_failure: exit), 2 for config errors.

    With `-- CMD ...` the sidecar also runs the app once it is ready, with HTTP(S)_PROXY and
    AWS_KMS_ENDPOINT set, its output logged as JSON lines. SIGTERM/SIGINT go to the app (SIGKILL
    after shutdown_timeout), and the sidecar exits with the app's exit code when the app exits
    (128+N after signal N; 127 command not found, 126 not executable).
    """
    manifest, settings = load_both(manifest_path, config_path)
    supervisor = None
    if command:
        from sidecar.supervise import CommandError, Supervisor, resolve_command

        try:
            resolve_command(command)
        except CommandError as exc:
            fail(str(exc), code=exc.exit_code)
        supervisor = Supervisor.for_app(command, manifest, settings)
    raise SystemExit(serve(manifest, settings, supervisor=supervisor))


def serve(
    manifest: Manifest, settings: Settings, dev: bool = False, supervisor: Supervisor | None = None
) -> int:
    from sidecar.attestation.emulator import DevPkiError
    from sidecar.attestation.measure import MeasureError
    from sidecar.attestation.nsm import NsmError
    from sidecar.bootstrap import provide_services
    from sidecar.context import Services
    from sidecar.server import build_runtime

    configure(settings.log_level)
    services = Services()
    runtime = build_runtime(manifest, settings, services=services)  # config errors first: exit 2
    if dev:
        # The dev world provides IMDS once it is up; there is no parent on vsock, so egress goes
        # straight out (still under the manifest's policy) and ingress is plain TCP.
        network = replace(settings.network, upstream="direct", vsock_ingress=False)
        settings = replace(settings, imds="off", network=network)
    if not dev:
        # A Nitro Enclave boots with `lo` down, and nothing reaches 127.0.0.1 until it is up.
        from sidecar.loopback import bring_up_loopback

        try:
            bring_up_loopback()
        except OSError as exc:
            fail(f"cannot bring the loopback interface up: {exc.strerror or exc}", code=1)
    try:
        provide_services(services, manifest, settings, "emulator" if dev else None)
    except (NsmError, MeasureError, DevPkiError) as exc:
        fail(f"{exc} (set attestation.nsm in sidecar.yaml: device, emulator or off)", code=1)
    except OSError as exc:  # e.g. a state directory that cannot be made (--state-dir /dev/null/x)
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"cannot prepare{where}: {exc.strerror or exc}")
    if dev:
        from sidecar.devworld.world import run_dev_world

        return asyncio.run(run_dev_world(runtime, services, manifest))
    return asyncio.run(runtime.serve_forever(supervisor))


@cli.command()
@manifest_option
@config_option
@click.option("--state-dir", metavar="DIR", help="where the dev world keeps its PKI and state")
def dev(manifest_path: str | None, config_path: str | None, state_dir: str | None) -> None:
    """Run the sidecar against the dev world: local stand-ins that speak AWS's protocols.

    Starts the NSM emulator (PCRs = `sidecar measure` of this code and config; dev root written to
    STATE_DIR/dev-root.pem for `sidecar trust --root`), a strict IMDSv2 server, moto's S3 and KMS
    behind an attesting KMS front, and a KMS key (alias/dev-enclave) whose policy pins the measured
    PCR0. Then the sidecar itself, with the KMS proxy on kms_proxy.listen_port. Ctrl-C stops all.
    """
    manifest, settings = load_both(manifest_path, config_path)
    if state_dir:
        settings = replace(settings, state_dir=Path(state_dir).resolve())
    root = settings.state_dir / "dev-root.pem"
    port = manifest.ingress_ports[0] if manifest.ingress_ports else None
    click.echo(f"sidecar dev: NSM emulator, dev root {root}", err=True)
    if port is not None:
        click.echo(f"sidecar dev: try  sidecar trust http://localhost:{port} --root {root}", err=True)
    raise SystemExit(serve(manifest, settings, dev=True))


@cli.command("plugins")
@config_option
@manifest_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def plugins_command(config_path: str | None, manifest_path: str | None, as_json: bool) -> None:
    """List installed plugins: name, version, hooks, and the routes each serves.

    Routes are listed for plugins that sidecar.yaml enables (when a manifest and sidecar.yaml are
    found); other installed plugins show `enabled: false`.
    """
    pm, infos, broken = build_plugin_manager(None, tolerate_errors=True)
    enabled: set[str] = set()
    routes: dict[str, list[str]] = {}
    mpath = find_config(manifest_path, MANIFEST_ENV, MANIFEST_SEARCH)
    if mpath is not None:
        manifest, settings = load_both(manifest_path, config_path)
        enabled = set(settings.enabled_plugins)
        from sidecar.server import build_runtime

        runtime = build_runtime(manifest, settings)
        for name in runtime.plugins:
            routes[name] = [
                f"{r.method.upper()} {r.path} ({li.name}{', sensitive' if r.sensitive else ''})"
                for li, r in runtime.routes_of(name)
            ]
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "version": info.version,
            "distribution": info.distribution,
            "module": info.module,
            "enabled": name in enabled,
            "hooks": hooks_of(pm, name),
            "routes": routes.get(name, []),
        }
        for name, info in sorted(infos.items())
    ]
    rows += [{"name": name, "error": problem} for name, problem in sorted(broken.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if "error" in row:
            click.echo(f"{row['name']}  BROKEN: {row['error']}")
            continue
        state = "enabled" if row["enabled"] else "installed"
        click.echo(f"{row['name']} {row['version'] or ''} ({state}, {row['module']})")
        click.echo(f"  hooks:  {', '.join(row['hooks']) or '-'}")
        for route in row["routes"]:
            click.echo(f"  route:  {route}")


@cli.command("config")
@manifest_option
@config_option
@click.option("--redacted/--no-redacted", default=True, show_default=True, help="mask secrets (always on)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of YAML")
def config_command(manifest_path: str | None, config_path: str | None, redacted: bool, as_json: bool) -> None:
    """Validate enclaver.yaml and sidecar.yaml, and print the resolved config with secrets masked.

    `$env` and `$file` references are resolved and masked, as are fields a plugin's schema marks
    secret. Secrets are never printed, so --no-redacted is refused.
    """
    if not redacted:
        fail("--no-redacted is refused: the sidecar never prints secrets")
    manifest, settings = load_both(manifest_path, config_path)
    from sidecar.server import build_runtime

    runtime = build_runtime(manifest, settings)
    loaded = {name: (state.context.config, runtime.schemas[name]) for name, state in runtime.plugins.items()}
    dump = {
        "manifest": {"file": str(manifest.path), **redact(manifest.raw)},
        "sidecar": {
            "file": str(settings.path) if settings.path else None,
            **redacted_settings(settings, loaded),
        },
    }
    if as_json:
        click.echo(json.dumps(dump, indent=2))
    else:
        click.echo(yaml.safe_dump(dump, sort_keys=False), nl=False)


@cli.command()
@click.argument("url", required=False)
@click.option("--document", "document_path", metavar="FILE", help="verify a stored document instead of a URL")
@click.option(
    "--root", "root_path", metavar="PEM", help="trusted root certificate (default: the AWS Nitro root)"
)
@click.option("--at", "at_text", metavar="TIME", help="verify as of TIME: ISO 8601, or ms since the epoch")
@click.option(
    "--expect-pcr", "expect_pcrs", multiple=True, metavar="N=HEX", help="require PCR N (repeatable)"
)
@click.option(
    "--allow-debug", is_flag=True, help="accept a debug-mode enclave (PCR0 all zeros; refused by default)"
)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def trust(
    url: str | None,
    document_path: str | None,
    root_path: str | None,
    at_text: str | None,
    expect_pcrs: tuple[str, ...],
    allow_debug: bool,
    as_json: bool,
) -> None:
    """Fetch a running sidecar's attestation document with a fresh nonce and verify it fully.

    URL is the sidecar's ingress (http://host:8001); the document comes from
    /enclave/attestation. Checks the ES384 signature, the certificate chain to the root, every
    certificate's validity at the time, the nonce, the recipient-key binding, that the enclave is not
    in debug mode (PCR0 all zeros) and any --expect-pcr.
    Exit code 0 verified, 1 not verified (the reason on one line), 2 usage or input error.
    """
    from sidecar.attestation.trust import (
        TrustInputError,
        check,
        parse_expected_pcrs,
        parse_time,
        render_json,
        render_text,
    )
    from sidecar.attestation.verify import AttestationError, load_aws_root, load_root_pem

    if (url is None) == (document_path is None):
        fail("give exactly one of URL or --document FILE")
    try:
        root = load_root_pem(_read_file(root_path, "--root")) if root_path else load_aws_root()
    except AttestationError as exc:
        fail(f"--root {root_path}: {exc}" if root_path else str(exc))
    try:
        document = _read_file(document_path, "--document") if document_path else None
        report = check(
            url=url,
            document=document,
            root=root,
            at=parse_time(at_text) if at_text else None,
            pcrs=parse_expected_pcrs(expect_pcrs),
            allow_debug=allow_debug,
        )
    except (TrustInputError, AttestationError) as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(render_json(report), indent=2))
    else:
        click.echo(render_text(report))
    if not report.ok:
        click.echo(f"not verified: {report.failure}", err=True)
        raise SystemExit(1)


def _read_file(path: str | None, option: str) -> bytes:
    from sidecar.files import FileProblem, read_regular_file

    assert path is not None
    try:
        return read_regular_file(path, MAX_INPUT_FILE_BYTES)
    except FileProblem as exc:
        fail(f"{option} {path}: {exc}")


MAX_INPUT_FILE_BYTES = 1 << 20  # an attestation document or a root certificate is a few KiB


@cli.command()
@click.option(
    "--pcr0", metavar="HEX", help="the image measurement; pins kms:RecipientAttestation:ImageSha384"
)
@click.option(
    "--pcr", "pcrs", multiple=True, metavar="N=HEX", help="pin kms:RecipientAttestation:PCRn (repeatable)"
)
@click.option("--principal", metavar="ARN", help="the IAM role allowed to use the key (default: any, '*')")
@click.option("--key-arn", metavar="ARN", help="the key's ARN for Resource (default: '*', this key)")
def policy(pcr0: str | None, pcrs: tuple[str, ...], principal: str | None, key_arn: str | None) -> None:
    """Print a KMS key policy that only the attested enclave image can use.

    Allows kms:Decrypt, kms:GenerateDataKey and kms:GenerateRandom with StringEqualsIgnoreCase
    conditions on the attestation's measurements. With --principal, the principal's account may
    administer the key but not use it. Use the PCRs that `enclaver build` or `sidecar measure` print.
    """
    from sidecar.attestation.policy import PolicyInputError, key_policy

    parsed: dict[int, str] = {}
    for item in pcrs:
        index, sep, value = item.partition("=")
        if not sep or not (index.isascii() and index.isdigit()):  # "²".isdigit() is true
            fail(f"--pcr {item!r}: expected N=HEX")
        parsed[int(index)] = value
    try:
        document = key_policy(pcr0, parsed, principal, key_arn)
    except PolicyInputError as exc:
        fail(str(exc))
    click.echo(json.dumps(document, indent=2))


@cli.command()
@manifest_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def measure(manifest_path: str | None, config_path: str | None, as_json: bool) -> None:
    """Print the PCRs this sidecar's code and config measure to (what the emulator attests).

    PCR1 covers the installed sidecar package, PCR2 the enabled plugins' code plus enclaver.yaml
    and sidecar.yaml, and PCR0 both. Changing any byte of them changes PCR0.
    """
    from sidecar.attestation.measure import MeasureError
    from sidecar.attestation.measure import measure as measure_pcrs
    from sidecar.bootstrap import plugin_modules

    manifest, settings = load_both(manifest_path, config_path)
    try:
        result = measure_pcrs(manifest.path, settings.path, plugin_modules(settings.enabled_plugins))
    except MeasureError as exc:
        fail(f"cannot measure: {exc}", code=1)
    pcrs = {index: value.hex() for index, value in sorted(result.as_dict().items())}
    if as_json:
        click.echo(json.dumps({f"PCR{i}": v for i, v in pcrs.items()}, indent=2))
        return
    for index, value in pcrs.items():
        click.echo(f"PCR{index} {value}")


@cli.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", metavar="DIR", help="an empty or new directory (default: ./sidecar-NAME)")
def new_plugin(name: str, directory: str | None) -> None:
    """Write a ready-to-install plugin package named NAME.

    It has a pyproject.toml with the `sidecar` entry point, one route, a config schema, a test that
    boots a real sidecar with the sidecar_factory fixture, and a README. NAME is lowercase letters,
    digits and underscores. Exit code 0 written, 2 for a bad NAME or a DIR that is not empty.
    """
    from sidecar.scaffold import ScaffoldError, next_steps, write_plugin

    try:
        names, target, files = write_plugin(name, Path(directory) if directory else None)
    except ScaffoldError as exc:
        fail(str(exc))
    click.echo(f"wrote plugin {names.name!r} (module {names.module}, distribution {names.distribution}):")
    for relative in files:
        click.echo(f"  {target / relative}")
    click.echo(next_steps(names, target), nl=False)


@cli.group()
def egress() -> None:
    """The egress policy and proxy: check a target before you build, or run the proxy alone.

    \b
      sidecar egress check kms.us-east-1.amazonaws.com:443
      sidecar egress serve --upstream direct
    """


def build_cli() -> click.Group:
    """The root group with every installed plugin's commands added (a broken plugin is skipped)."""
    # Imported here: these modules import helpers from this one.
    from sidecar.host.command import host
    from sidecar.net.check_command import check
    from sidecar.net.serve_command import serve as serve_egress

    egress.add_command(check)
    egress.add_command(serve_egress)
    cli.add_command(host)
    pm, _, broken = build_plugin_manager(None, tolerate_errors=True)
    for name, problem in broken.items():
        logging.getLogger("sidecar.cli").debug("plugin %s skipped for commands: %s", name, problem)
    pm.hook.register_commands(cli=cli)
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    group = build_cli()
    try:
        result = group.main(
            args=list(argv) if argv is not None else None, prog_name="sidecar", standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(1) from None
    except (ConfigError, PluginError) as exc:
        fail(str(exc))
    except UnsupportedAiohttp as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
