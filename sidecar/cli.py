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
from pathlib import Path
from typing import Any, NoReturn

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
from sidecar.logs import configure
from sidecar.plugins import PluginError, build_plugin_manager, hooks_of
from sidecar.schema import redact

EXIT_USAGE = 2
DEMO_NOTICE = "is not available in this build yet"


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
    """
    if command:
        fail(f"supervising an app (sidecar run -- CMD) {DEMO_NOTICE}")
    manifest, settings = load_both(manifest_path, config_path)
    raise SystemExit(serve(manifest, settings))


def serve(manifest: Manifest, settings: Settings) -> int:
    from sidecar.server import build_runtime

    configure(settings.log_level)
    runtime = build_runtime(manifest, settings)
    return asyncio.run(runtime.serve_forever())


@cli.command()
@manifest_option
@config_option
@click.option("--state-dir", metavar="DIR", help="where the dev world keeps its PKI and state")
def dev(manifest_path: str | None, config_path: str | None, state_dir: str | None) -> None:
    """Run the sidecar against local stand-ins for AWS (the dev world), with the demo config.

    This build serves the sidecar and its plugins; the local NSM emulator, IMDSv2, attesting KMS
    and S3 stand-ins are not part of it yet.
    """
    manifest, settings = load_both(manifest_path, config_path)
    if state_dir:
        settings = _with_state_dir(settings, Path(state_dir))
    click.echo(
        "sidecar dev: the local NSM/IMDS/KMS/S3 stand-ins are not built yet; serving the sidecar alone",
        err=True,
    )
    raise SystemExit(serve(manifest, settings))


def _with_state_dir(settings: Settings, state_dir: Path) -> Settings:
    from dataclasses import replace

    return replace(settings, state_dir=state_dir.resolve())


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


def _later(name: str, summary: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def placeholder() -> None:
        fail(f"`sidecar {name}` {DEMO_NOTICE}: {summary}")

    placeholder.help = f"{summary[0].upper()}{summary[1:]}. ({DEMO_NOTICE.capitalize()}; exits 2.)"
    return placeholder


for _name, _summary in [
    ("trust", "fetch and fully verify a running sidecar's attestation document"),
    ("policy", "print a KMS key policy pinned to enclave measurements (PCRs)"),
    ("measure", "print the PCRs this sidecar's code and config measure to"),
    ("egress", "check targets against the egress policy, or serve the egress proxy alone"),
    ("host", "run the parent-instance half: vsock egress, ingress forwarders, log stream"),
]:
    cli.add_command(_later(_name, _summary))


def build_cli() -> click.Group:
    """The root group with every installed plugin's commands added (a broken plugin is skipped)."""
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
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
