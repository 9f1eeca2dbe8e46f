"""The ``sidecar`` console script, run for real as a subprocess.

These pin the operator-facing guarantees: a config error is one line on stderr naming the file and
key path, exit code 2, never a traceback; ``sidecar config`` never prints a secret; every command
has useful ``--help``; commands that later issues fill in say so and exit 2.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = ROOT / "enclaver.yaml"
DEMO_SETTINGS = ROOT / "sidecar.yaml"
TIMEOUT = 60

ENV_VAR = "SIDECAR_TEST_CLI_SECRET_41C2"
ENV_SECRET = "alias/env-secret-9b1e77"
FILE_SECRET = "file-secret-52d0aa"

SUBCOMMANDS = [
    "run",
    "dev",
    "trust",
    "policy",
    "measure",
    "plugins",
    "config",
    "egress",
    "host",
    "no-fly",
    "vault",
]


# --------------------------------------------------------------------------- helpers


def sidecar(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sidecar ARGS`` in ``cwd`` with a clean config environment."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("SIDECAR_MANIFEST", "SIDECAR_CONFIG")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, nothing on stdout, and stderr is exactly ``error: <message>`` on one line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


def demo_copy(directory: Path) -> Path:
    """The demo enclaver.yaml and sidecar.yaml copied into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_MANIFEST, directory / "enclaver.yaml")
    shutil.copy(DEMO_SETTINGS, directory / "sidecar.yaml")
    return directory


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {path}"
    path.write_text(text.replace(old, new))


def commands_listed(help_text: str) -> list[str]:
    """The command names in the ``Commands:`` section of a click help page."""
    lines = help_text.split("Commands:\n", 1)[1].splitlines()
    return [line.split()[0] for line in lines if line.startswith("  ") and line.strip()]


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    return demo_copy(tmp_path / "demo")


# --------------------------------------------------------------------------- config errors: one line, exit 2

# (file to break, old text, new text, expected message after "error: ")
CONFIG_ERRORS: list[tuple[str, str, str, str]] = [
    # enclaver.yaml: YAML level
    (
        "enclaver.yaml",
        'name: "no-fly-list"',
        "name: no: fly",
        "enclaver.yaml: line 3, column 9: invalid YAML: mapping values are not allowed here",
    ),
    (
        "enclaver.yaml",
        "version: v1\n",
        "version: v1\nversion: v1\n",
        "enclaver.yaml: line 3, column 1: invalid YAML: duplicate key 'version' (first on line 2)",
    ),
    # enclaver.yaml: schema
    ("enclaver.yaml", "version: v1\n", "", "enclaver.yaml: version: is required"),
    ("enclaver.yaml", 'name: "no-fly-list"\n', "", "enclaver.yaml: name: is required"),
    ("enclaver.yaml", 'target: "no-fly-list:enclave-latest"\n', "", "enclaver.yaml: target: is required"),
    (
        "enclaver.yaml",
        '  app: "no-fly-list:latest"\n',
        "  odyn: odyn:1\n",
        "enclaver.yaml: sources.app: is required",
    ),
    ("enclaver.yaml", "version: v1", "version: v2", "enclaver.yaml: version: 'v2' is not one of 'v1'"),
    (
        "enclaver.yaml",
        "- listen_port: 8001",
        '- listen_port: "8001"',
        "enclaver.yaml: ingress[0].listen_port: expected an integer, got the string '8001'",
    ),
    (
        "enclaver.yaml",
        "cpu_count: 2",
        "cpu_count: true",
        "enclaver.yaml: defaults.cpu_count: expected an integer, got a boolean",
    ),
    (
        "enclaver.yaml",
        "kms_proxy:\n  listen_port: 9999",
        "kms_proxy:\n  - 9999",
        "enclaver.yaml: kms_proxy: expected a mapping, got a list",
    ),
    (
        "enclaver.yaml",
        "listen_port: 8200",
        "listen_port: 0",
        "enclaver.yaml: ingress[1].listen_port: 0 is below the minimum of 1",
    ),
    (
        "enclaver.yaml",
        "listen_port: 9000",
        "listen_port: 65536",
        "enclaver.yaml: api.listen_port: 65536 is above the maximum of 65535",
    ),
    (
        "enclaver.yaml",
        "proxy_port: 10000",
        "proxy_port: -1",
        "enclaver.yaml: egress.proxy_port: -1 is below the minimum of 1",
    ),
    (
        "enclaver.yaml",
        "memory_mb: 4096",
        "memory_mb: 63",
        "enclaver.yaml: defaults.memory_mb: 63 is below the minimum of 64",
    ),
    (
        "enclaver.yaml",
        "cpu_count: 2",
        "cpu_count: 0",
        "enclaver.yaml: defaults.cpu_count: 0 is below the minimum of 1",
    ),
    (
        "enclaver.yaml",
        "listen_port: 9000",
        "listen_port: 8001",
        "enclaver.yaml: api.listen_port: port 8001 is already used by ingress[0].listen_port",
    ),
    (
        "enclaver.yaml",
        "listen_port: 9999",
        "listen_port: 10000",
        "enclaver.yaml: kms_proxy.listen_port: port 10000 is already used by egress.proxy_port",
    ),
    ("enclaver.yaml", "version: v1", "version: v1\nfoo: 1", "enclaver.yaml: foo: unknown key"),
    (
        "enclaver.yaml",
        "  allow:",
        "  alow:",
        "enclaver.yaml: egress.alow: unknown key (did you mean 'allow'?)",
    ),
    (
        "enclaver.yaml",
        "- listen_port: 8200",
        "- listen_port: 8200\n    bogus: 1",
        "enclaver.yaml: ingress[1].bogus: unknown key",
    ),
    (
        "enclaver.yaml",
        "- listen_port: 8200",
        "- listen_port: 8200\n    tls:\n      key_file: key.pem",
        "enclaver.yaml: ingress[1].tls.cert_file: is required",
    ),
    # sidecar.yaml
    (
        "sidecar.yaml",
        "level: info",
        "level: [info",
        "sidecar.yaml: line 7, column 9: invalid YAML: expected ',' or ']', but got ':'",
    ),
    (
        "sidecar.yaml",
        "listen_port: 8200",
        "listen_port: 9000",
        "sidecar.yaml: plugins.vault_like.listen_port: 9000 is not an ingress port of enclaver.yaml "
        "(ingress ports: 8001, 8200)",
    ),
    (
        "sidecar.yaml",
        "listen_host: 127.0.0.1",
        "listen_hots: 127.0.0.1",
        "sidecar.yaml: listen_hots: unknown key (did you mean 'listen_host'?)",
    ),
    (
        "sidecar.yaml",
        "level: info",
        "level: verbose",
        "sidecar.yaml: log.level: 'verbose' is not one of 'debug', 'info', 'warning', 'error'",
    ),
    (
        "sidecar.yaml",
        "key_id: alias/vault-like",
        "key_id: {$env: " + ENV_VAR + "}",
        f"sidecar.yaml: plugins.vault_like.config.key_id: environment variable {ENV_VAR} is not set",
    ),
    (
        "sidecar.yaml",
        "key_id: alias/vault-like",
        "key_id: {$file: missing.txt}",
        "sidecar.yaml: plugins.vault_like.config.key_id: cannot read secret file missing.txt: "
        "No such file or directory",
    ),
    (
        "sidecar.yaml",
        "key_id: alias/vault-like",
        "key_id: {$env: 1}",
        "sidecar.yaml: plugins.vault_like.config.key_id: $env needs a non-empty string",
    ),
    (
        "sidecar.yaml",
        "key_id: alias/vault-like",
        "key_id: {$env: A, x: 1}",
        'sidecar.yaml: plugins.vault_like.config.key_id: a reference is exactly one of {"$env": NAME} '
        'or {"$file": PATH}',
    ),
    (
        "sidecar.yaml",
        "key_id: alias/vault-like",
        "key_id: {$bogus: x}",
        'sidecar.yaml: plugins.vault_like.config.key_id: a reference is exactly one of {"$env": NAME} '
        'or {"$file": PATH}',
    ),
    # A plugin's own schema, checked at start-up through its register_config_schema hook.
    (
        "sidecar.yaml",
        "storage: sqlite",
        "storge: sqlite",
        "sidecar.yaml: plugins.vault_like.config.storge: unknown key (did you mean 'storage'?)",
    ),
    (
        "sidecar.yaml",
        "storage: sqlite",
        "storage: disk",
        "sidecar.yaml: plugins.vault_like.config.storage: 'disk' is not one of 'sqlite', 's3'",
    ),
    (
        "sidecar.yaml",
        "reload_interval: 60",
        "reload_interval: true",
        "sidecar.yaml: plugins.no_fly_list.config.reload_interval: expected an integer, got a boolean",
    ),
]


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    CONFIG_ERRORS,
    ids=[m.split(": ", 1)[1][:60] for *_, m in CONFIG_ERRORS],
)
def test_config_error_is_one_line_and_exit_2(demo: Path, file: str, old: str, new: str, message: str) -> None:
    edit(demo / file, old, new)
    assert_one_line_error(sidecar("config", cwd=demo), message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"version: v1\nname: caf\xe9\n", "enclaver.yaml: file is not valid UTF-8"),
        (b"#" * ((1 << 20) + 1), f"enclaver.yaml: file is {(1 << 20) + 1} bytes; the limit is {1 << 20}"),
        (b"- version: v1\n", "enclaver.yaml: expected a mapping, got a list"),
    ],
    ids=["non-utf8", "too-large", "not-a-mapping"],
)
def test_unreadable_manifest_is_one_line_and_exit_2(demo: Path, content: bytes, message: str) -> None:
    (demo / "enclaver.yaml").write_bytes(content)
    assert_one_line_error(sidecar("config", cwd=demo), message)


@pytest.mark.parametrize("command", ["config", "run", "dev", "plugins"])
def test_every_config_reading_command_fails_the_same_way(demo: Path, command: str) -> None:
    edit(demo / "enclaver.yaml", "  allow:", "  alow:")
    assert_one_line_error(
        sidecar(command, cwd=demo), "enclaver.yaml: egress.alow: unknown key (did you mean 'allow'?)"
    )


def test_explicit_paths_are_named_in_errors(tmp_path: Path) -> None:
    conf = demo_copy(tmp_path / "conf")
    edit(conf / "sidecar.yaml", "level: info", "level: loud")
    result = sidecar(
        "config", "--manifest", "conf/enclaver.yaml", "--config", "conf/sidecar.yaml", cwd=tmp_path
    )
    assert_one_line_error(
        result, "conf/sidecar.yaml: log.level: 'loud' is not one of 'debug', 'info', 'warning', 'error'"
    )


def test_environment_variables_choose_the_files(tmp_path: Path) -> None:
    conf = demo_copy(tmp_path / "conf")
    edit(conf / "enclaver.yaml", "memory_mb: 4096", "memory_mb: 1")
    env = {"SIDECAR_MANIFEST": str(conf / "enclaver.yaml"), "SIDECAR_CONFIG": str(conf / "sidecar.yaml")}
    assert_one_line_error(
        sidecar("config", cwd=tmp_path, env=env),
        f"{conf / 'enclaver.yaml'}: defaults.memory_mb: 1 is below the minimum of 64",
    )


def test_missing_files(tmp_path: Path) -> None:
    assert_one_line_error(
        sidecar("config", "--manifest", "nope.yaml", cwd=tmp_path), "nope.yaml: file not found"
    )
    demo_copy(tmp_path)
    assert_one_line_error(
        sidecar("config", "--config", "other/sidecar.yaml", cwd=tmp_path),
        "other/sidecar.yaml: file not found",
    )


@pytest.mark.skipif(Path("/etc/enclaver/enclaver.yaml").exists(), reason="a system manifest is installed")
def test_no_manifest_anywhere(tmp_path: Path) -> None:
    assert_one_line_error(
        sidecar("config", cwd=tmp_path), "enclaver.yaml: no manifest found; pass --manifest FILE"
    )


def test_enabled_plugin_that_is_not_installed(demo: Path) -> None:
    with (demo / "sidecar.yaml").open("a") as f:
        f.write("  vault_lik:\n    listen_port: 8200\n")
    assert_one_line_error(
        sidecar("config", cwd=demo),
        "plugin 'vault_lik': is enabled in sidecar.yaml but not installed (did you mean 'vault_like'?)",
    )


# --------------------------------------------------------------------------- sidecar config


def test_config_prints_the_demo_configs_as_yaml(demo: Path) -> None:
    result = sidecar("config", cwd=demo)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    dump = yaml.safe_load(result.stdout)
    manifest, settings = dump["manifest"], dump["sidecar"]
    assert manifest["file"] == "enclaver.yaml"
    assert manifest["version"] == "v1"
    assert manifest["name"] == "no-fly-list"
    assert manifest["target"] == "no-fly-list:enclave-latest"
    assert manifest["sources"]["app"] == "no-fly-list:latest"
    assert manifest["defaults"] == {"memory_mb": 4096, "cpu_count": 2}
    assert [i["listen_port"] for i in manifest["ingress"]] == [8001, 8200]
    assert manifest["kms_proxy"] == {"listen_port": 9999}
    assert manifest["api"] == {"listen_port": 9000}
    assert manifest["egress"] == {
        "proxy_port": 10000,
        "allow": ["kms.*.amazonaws.com", "s3.*.amazonaws.com", "**.s3.*.amazonaws.com", "169.254.169.254"],
        "deny": [],
    }
    assert settings["file"] == "sidecar.yaml"
    assert settings["listen_host"] == "127.0.0.1"
    assert settings["log"] == {"level": "info", "access": True}
    assert settings["limits"]["max_body_bytes"] == 1048576
    assert settings["startup"] == {"on_failure": "exit"}
    assert settings["shutdown_timeout"] == 10
    no_fly = settings["plugins"]["no_fly_list"]
    assert (no_fly["enabled"], no_fly["listen_port"]) == (True, 8001)
    # What the demo sets; the plugin's schema fills in its other defaults (rate limit, batch size).
    assert (
        no_fly["config"]
        | {
            "envelope": "s3://no-fly-list/envelope.json",
            "key_id": "alias/no-fly-list",
            "reload_interval": 60,
        }
        == no_fly["config"]
    )
    assert no_fly["config"]["rate_limit"]["enabled"] is True  # on by default: enumeration resistance
    assert settings["plugins"]["vault_like"] == {
        "enabled": True,
        "listen_port": 8200,
        "config": {
            "storage": "sqlite",
            "path": "vault.db",
            "key_id": "alias/vault-like",
            "auto_init": False,
            "audit_log": "vault-audit.log",
            "max_request_bytes": 1048576,
        },
    }
    assert "********" not in result.stdout  # nothing in the demo is secret


def test_config_json_matches_the_yaml(demo: Path) -> None:
    as_yaml = sidecar("config", cwd=demo)
    as_json = sidecar("config", "--json", cwd=demo)
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stderr == ""
    data = json.loads(as_json.stdout)
    assert data == yaml.safe_load(as_yaml.stdout)
    assert data["manifest"]["name"] == "no-fly-list"
    assert data["sidecar"]["plugins"]["vault_like"]["config"]["storage"] == "sqlite"


def with_secrets(demo: Path) -> dict[str, str]:
    """Make the demo's vault_like key_id a $env reference and its path a $file reference."""
    edit(demo / "sidecar.yaml", "key_id: alias/vault-like", "key_id: {$env: " + ENV_VAR + "}")
    edit(demo / "sidecar.yaml", "path: vault.db", "path: {$file: secrets/vault-path}")
    (demo / "secrets").mkdir()
    (demo / "secrets" / "vault-path").write_text(FILE_SECRET + "\n")
    return {ENV_VAR: ENV_SECRET}


@pytest.mark.parametrize("flags", [[], ["--redacted"], ["--json"]], ids=["default", "redacted", "json"])
def test_config_masks_referenced_secrets(demo: Path, flags: list[str]) -> None:
    env = with_secrets(demo)
    result = sidecar("config", *flags, cwd=demo, env=env)
    assert result.returncode == 0, result.stderr
    for secret in (ENV_SECRET, FILE_SECRET):
        assert secret not in result.stdout
        assert secret not in result.stderr
    assert "********" in result.stdout
    dump: Any = json.loads(result.stdout) if "--json" in flags else yaml.safe_load(result.stdout)
    vault = dump["sidecar"]["plugins"]["vault_like"]["config"]
    assert vault | {"path": "********", "key_id": "********"} == vault and vault["storage"] == "sqlite"
    # Values that are not secrets stay readable.
    assert dump["sidecar"]["plugins"]["no_fly_list"]["config"]["key_id"] == "alias/no-fly-list"


def test_config_secret_from_relative_file_when_run_elsewhere(tmp_path: Path) -> None:
    demo = demo_copy(tmp_path / "conf")
    env = with_secrets(demo)
    result = sidecar(
        "config", "--manifest", "conf/enclaver.yaml", "--config", "conf/sidecar.yaml", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert FILE_SECRET not in result.stdout
    assert yaml.safe_load(result.stdout)["sidecar"]["plugins"]["vault_like"]["config"]["path"] == "********"


def test_no_redacted_is_refused(demo: Path) -> None:
    env = with_secrets(demo)
    result = sidecar("config", "--no-redacted", cwd=demo, env=env)
    assert_one_line_error(result, "--no-redacted is refused: the sidecar never prints secrets")
    assert ENV_SECRET not in result.stderr
    assert FILE_SECRET not in result.stderr


@pytest.mark.parametrize(
    "settings", [None, "log: {level: debug}\n", "plugins:\n"], ids=["absent", "no-plugins", "null"]
)
def test_config_without_plugins(demo: Path, settings: str | None) -> None:
    # Regression: a sidecar.yaml without `plugins:` (or none at all) crashed with a traceback.
    if settings is None:
        (demo / "sidecar.yaml").unlink()
    else:
        (demo / "sidecar.yaml").write_text(settings)
    result = sidecar("config", cwd=demo)
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    dump = yaml.safe_load(result.stdout)
    assert dump["sidecar"]["plugins"] == {}
    assert dump["sidecar"]["file"] == (None if settings is None else "sidecar.yaml")


# --------------------------------------------------------------------------- help


def test_top_level_help_lists_every_subcommand(tmp_path: Path) -> None:
    result = sidecar("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: sidecar [OPTIONS] COMMAND [ARGS]...")
    listed = commands_listed(result.stdout)
    assert set(SUBCOMMANDS) <= set(listed), listed
    assert "Nitro Enclave" in result.stdout


HELP_CASES: list[tuple[list[str], list[str]]] = [
    (["run"], ["Run the sidecar", "--manifest FILE", "--config FILE", "/enclave/ready"]),
    (["dev"], ["NSM emulator", "--state-dir DIR", "--manifest FILE"]),
    (["trust"], ["attestation document", "--document FILE", "--root PEM", "--at TIME", "--expect-pcr N=HEX"]),
    (["policy"], ["KMS key policy", "--pcr0 HEX", "--pcr N=HEX", "--principal ARN", "--key-arn ARN"]),
    (["measure"], ["PCRs", "--json", "PCR0"]),
    (["plugins"], ["List installed plugins", "--json"]),
    (["config"], ["Validate enclaver.yaml and sidecar.yaml", "--redacted / --no-redacted", "--json"]),
    (["egress"], ["egress policy", "check", "serve"]),
    (["egress", "check"], ["TARGET", "--manifest FILE", "--resolve"]),
    (["egress", "serve"], ["--upstream", "--manifest FILE"]),
    (["host"], ["--cid", "--manifest FILE", "--no-policy-check", "--enclave"]),
    (["no-fly"], ["no-fly list", "seal", "check-envelope"]),
    (["no-fly", "seal"], ["Seal a list of names", "--key-id KEY", "--in FILE", "--upload s3://BUCKET/KEY"]),
    (["no-fly", "check-envelope"], ["Validate an envelope", "FILE", "--json", "0 valid, 1 invalid"]),
    (["vault"], ["vault_like", "init"]),
    (["vault", "init"], ["root token", "--address URL", "--json", "Exit code 0 initialised"]),
    (["vault", "status"], ["seal status", "--address URL", "2 sealed"]),
]


@pytest.mark.parametrize(("command", "snippets"), HELP_CASES, ids=[" ".join(c) for c, _ in HELP_CASES])
def test_subcommand_help(tmp_path: Path, command: list[str], snippets: list[str]) -> None:
    # A broken config in the cwd must not matter: --help never reads it.
    (tmp_path / "enclaver.yaml").write_text("version: [\n")
    result = sidecar(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"Usage: sidecar {' '.join(command)} ")
    assert "-h, --help" in result.stdout
    text = " ".join(result.stdout.split())  # undo click's line wrapping
    for snippet in snippets:
        assert snippet in text, (snippet, result.stdout)


def test_short_help_flag(tmp_path: Path) -> None:
    result = sidecar("config", "-h", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: sidecar config ")


def test_version(tmp_path: Path) -> None:
    result = sidecar("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"sidecar, version {importlib.metadata.version('enclave-sidecar')}\n"


@pytest.mark.parametrize(
    "args", [[], ["bogus"], ["config", "--bogus"]], ids=["no-args", "unknown-command", "unknown-option"]
)
def test_usage_errors_exit_2_without_traceback(tmp_path: Path, args: list[str]) -> None:
    result = sidecar(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Usage: sidecar" in result.stdout + result.stderr


# --------------------------------------------------------------------------- sidecar vault


@pytest.mark.parametrize("command", ["init", "status"])
def test_vault_commands_without_a_store_fail_in_one_line(tmp_path: Path, command: str) -> None:
    # Port 1 on loopback: nothing listens there; the command must say so, not print a traceback.
    result = sidecar("vault", command, "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach http://127.0.0.1:1"), result.stderr


# --------------------------------------------------------------------------- sidecar plugins


def test_plugins_json_lists_the_builtin_plugins() -> None:
    result = sidecar("plugins", "--json", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"no_fly_list", "vault_like"} <= set(rows)
    version = importlib.metadata.version("enclave-sidecar")
    for name in ("no_fly_list", "vault_like"):
        row = rows[name]
        assert "error" not in row
        assert row["version"] == version
        assert row["distribution"] == "enclave-sidecar"
        assert row["module"] == f"plugins.{name}"
        assert row["enabled"] is True
        assert {"register_config_schema", "register_commands"} <= set(row["hooks"])
        assert isinstance(row["routes"], list)


def test_plugins_table() -> None:
    result = sidecar("plugins", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    version = importlib.metadata.version("enclave-sidecar")
    assert f"no_fly_list {version} (enabled, plugins.no_fly_list)" in result.stdout
    assert f"vault_like {version} (enabled, plugins.vault_like)" in result.stdout
    assert "register_config_schema" in result.stdout


@pytest.mark.skipif(Path("/etc/enclaver/enclaver.yaml").exists(), reason="a system manifest is installed")
def test_plugins_without_configs_are_installed_but_not_enabled(tmp_path: Path) -> None:
    result = sidecar("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["no_fly_list"]["enabled"] is False
    assert rows["vault_like"]["enabled"] is False
    assert "register_commands" in rows["vault_like"]["hooks"]
