"""Unit tests of sidecar.config and sidecar.schema: the demo configs, and every kind of config error.

Every error assertion checks the file, the key path and the wording, because the one-line
``file: key.path: problem`` message is the whole user interface of a config mistake.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import (
    MANIFEST_ENV,
    MAX_CONFIG_BYTES,
    SETTINGS_SCHEMA,
    ConfigError,
    Egress,
    Ingress,
    Manifest,
    Settings,
    Tls,
    find_config,
    load_manifest,
    load_settings,
    parse_manifest,
    parse_settings,
    redacted_settings,
)
from sidecar.schema import (
    MASK,
    Float,
    Int,
    List,
    Map,
    Port,
    SchemaError,
    Secret,
    Str,
    describe,
    redact,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = ROOT / "enclaver.yaml"
DEMO_SETTINGS = ROOT / "sidecar.yaml"

# A unique name, so a developer's environment cannot satisfy or break the $env tests by accident.
ENV_VAR = "SIDECAR_TEST_CONFIG_SECRET_7F3A"

MINIMAL: dict[str, Any] = {
    "version": "v1",
    "name": "app",
    "target": "app:enclave",
    "sources": {"app": "app:latest"},
}


# --------------------------------------------------------------------------- helpers


def demo_manifest_data() -> dict[str, Any]:
    """The shipped enclaver.yaml as plain data, to mutate into broken variants."""
    data = yaml.safe_load(DEMO_MANIFEST.read_text())
    assert isinstance(data, dict)
    return data


def demo_settings_data() -> dict[str, Any]:
    data = yaml.safe_load(DEMO_SETTINGS.read_text())
    assert isinstance(data, dict)
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with ``a.b[1].c`` set to ``value`` (missing mappings are created)."""
    result = copy.deepcopy(data)
    node: Any = result
    parts = _split(dotted)
    for part in parts[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def drop_path(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    result = copy.deepcopy(data)
    node: Any = result
    parts = _split(dotted)
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]
    return result


def _split(dotted: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in dotted.split("."):
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            parts.append(int(index))
            rest = rest.removeprefix("[")
    return parts


def write(directory: Path, name: str, content: str | bytes | dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def manifest_error(tmp_path: Path, content: str | bytes | dict[str, Any]) -> tuple[ConfigError, Path]:
    path = write(tmp_path, "enclaver.yaml", content)
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    return info.value, path


def settings_error(
    tmp_path: Path, content: str | bytes | dict[str, Any], manifest: Manifest | None = None
) -> tuple[ConfigError, Path]:
    path = write(tmp_path, "sidecar.yaml", content)
    with pytest.raises(ConfigError) as info:
        load_settings(path, manifest)
    return info.value, path


def assert_error(error: ConfigError, file: Path | str, path: str, problem: str) -> None:
    """The error names exactly this file, key path and problem, on one line."""
    assert error.file == str(file)
    assert error.path == path
    assert error.problem == problem
    expected = f"{file}: {path}: {problem}" if path else f"{file}: {problem}"
    assert str(error) == expected
    assert "\n" not in str(error)


@pytest.fixture
def demo_manifest() -> Manifest:
    return load_manifest(DEMO_MANIFEST)


# --------------------------------------------------------------------------- the shipped demo configs


def test_demo_manifest_has_exactly_the_documented_values(demo_manifest: Manifest) -> None:
    m = demo_manifest
    assert m.path == DEMO_MANIFEST
    assert m.name == "no-fly-list"
    assert m.target == "no-fly-list:enclave-latest"
    assert m.sources == {
        "app": "no-fly-list:latest",
        "odyn": None,
        "supervisor": None,
        "sleeve": None,
        "wrapper": None,
    }
    assert m.signature == {"certificate": None, "key": None}
    assert m.memory_mb == 4096
    assert m.cpu_count == 2
    assert m.ingress == (Ingress(8001), Ingress(8200))
    assert m.ingress_ports == (8001, 8200)
    assert all(i.tls is None for i in m.ingress)
    assert m.kms_proxy_port == 9999
    assert m.api_port == 9000
    assert m.egress == Egress(
        proxy_port=10000,
        allow=("kms.*.amazonaws.com", "s3.*.amazonaws.com", "**.s3.*.amazonaws.com", "169.254.169.254"),
        deny=(),
    )


def test_demo_settings_have_exactly_the_documented_values(demo_manifest: Manifest) -> None:
    s = load_settings(DEMO_SETTINGS, demo_manifest)
    assert s.path == DEMO_SETTINGS
    assert s.listen_host == "127.0.0.1"
    assert s.state_dir == ROOT / ".sidecar-state"  # relative to sidecar.yaml, not the cwd
    assert s.log_level == "info"
    assert s.access_log is True
    assert s.max_body_bytes == 1048576
    assert s.max_line_bytes == 8190
    assert s.max_field_bytes == 8190
    assert s.on_startup_failure == "exit"
    assert s.shutdown_timeout == 10
    assert list(s.plugins) == ["no_fly_list", "vault_like"]
    assert s.enabled_plugins == ["no_fly_list", "vault_like"]
    nfl, vault = s.plugins["no_fly_list"], s.plugins["vault_like"]
    assert (nfl.name, nfl.enabled, nfl.listen_port) == ("no_fly_list", True, 8001)
    assert nfl.config == {
        "envelope": "s3://no-fly-list/envelope.json",
        "key_id": "alias/no-fly-list",
        "reload_interval": 60,
    }
    assert (vault.name, vault.enabled, vault.listen_port) == ("vault_like", True, 8200)
    assert vault.config == {"storage": "sqlite", "path": "vault.db", "key_id": "alias/vault-like"}
    # Every plugin port in the demo sidecar.yaml is one of the demo manifest's ingress ports.
    assert {e.listen_port for e in s.plugins.values()} == set(demo_manifest.ingress_ports)


def test_demo_configs_contain_no_secret_references() -> None:
    settings = load_settings(DEMO_SETTINGS)
    assert settings.plugins
    for entry in settings.plugins.values():
        assert not any(isinstance(v, Secret) for v in entry.config.values())


def test_minimal_manifest_gets_the_documented_defaults(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, "enclaver.yaml", MINIMAL))
    assert m.memory_mb == 4096
    assert m.cpu_count == 2
    assert m.egress == Egress(proxy_port=10000, allow=(), deny=())
    assert m.ingress == ()
    assert m.kms_proxy_port is None
    assert m.api_port is None
    assert m.sources["app"] == "app:latest"
    assert m.sources["odyn"] is None


def test_explicit_null_means_the_default(tmp_path: Path) -> None:
    data = set_path(set_path(MINIMAL, "defaults.memory_mb", None), "egress.proxy_port", None)
    m = load_manifest(write(tmp_path, "enclaver.yaml", data))
    assert (m.memory_mb, m.egress.proxy_port) == (4096, 10000)


def test_full_manifest_with_every_optional_key(tmp_path: Path) -> None:
    data = {
        **MINIMAL,
        "sources": {
            "app": "app:latest",
            "odyn": "odyn:1",
            "supervisor": "sup:1",
            "sleeve": "sleeve:1",
            "wrapper": "wrap:1",
        },
        "signature": {"certificate": "cert.pem", "key": "key.pem"},
        "defaults": {"memory_mb": 64, "cpu_count": 1},
        "ingress": [{"listen_port": 443, "tls": {"key_file": "k.pem", "cert_file": "c.pem"}}],
        "egress": {"proxy_port": 3128, "allow": ["a.example"], "deny": ["b.example"]},
        "kms_proxy": {"listen_port": 1},
        "api": {"listen_port": 65535},
    }
    m = load_manifest(write(tmp_path, "enclaver.yaml", data))
    assert m.sources["wrapper"] == "wrap:1"
    assert m.signature == {"certificate": "cert.pem", "key": "key.pem"}
    assert (m.memory_mb, m.cpu_count) == (64, 1)
    assert m.ingress == (Ingress(443, Tls(key_file="k.pem", cert_file="c.pem")),)
    assert m.egress == Egress(3128, ("a.example",), ("b.example",))
    assert (m.kms_proxy_port, m.api_port) == (1, 65535)


# --------------------------------------------------------------------------- YAML-level errors


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        (
            "version: v1\nname: x: y\n",
            "line 2, column 8",
            "invalid YAML: mapping values are not allowed here",
        ),
        (
            "\tversion: v1\n",
            "line 1, column 1",
            "invalid YAML: found character '\\t' that cannot start any token",
        ),
        (
            "version: v1\nname: [x\n",
            "line 3, column 1",
            "invalid YAML: expected ',' or ']', but got '<stream end>'",
        ),
        ("version: 'v1\n", "line 2, column 1", "invalid YAML: found unexpected end of stream"),
        ("version: v1\nname: *nope\n", "line 2, column 7", "invalid YAML: found undefined alias 'nope'"),
        ("version: v1\n---\nname: x\n", "line 2, column 1", "invalid YAML: but found another document"),
    ],
    ids=["mapping-in-scalar", "tab", "unclosed-flow", "unclosed-quote", "undefined-alias", "two-documents"],
)
def test_invalid_yaml_names_line_and_column(tmp_path: Path, text: str, where: str, problem: str) -> None:
    error, path = manifest_error(tmp_path, text)
    assert_error(error, path, where, problem)


def test_python_tags_are_not_constructed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    error, path = manifest_error(
        tmp_path, f"version: v1\nname: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    assert_error(
        error,
        path,
        "line 2, column 7",
        "invalid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        (
            "version: v1\nname: a\ntarget: t\nname: b\n",
            "line 4, column 1",
            "invalid YAML: duplicate key 'name' (first on line 2)",
        ),
        (
            "version: v1\negress:\n  allow: []\n  deny: []\n  allow: [x]\n",
            "line 5, column 3",
            "invalid YAML: duplicate key 'allow' (first on line 3)",
        ),
        (
            "ingress:\n  - listen_port: 1\n    listen_port: 2\n",
            "line 3, column 5",
            "invalid YAML: duplicate key 'listen_port' (first on line 2)",
        ),
        (
            "api: {listen_port: 1, listen_port: 1}\n",
            "line 1, column 23",
            "invalid YAML: duplicate key 'listen_port' (first on line 1)",
        ),
    ],
    ids=["top-level", "nested", "in-list-item", "flow-mapping"],
)
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, where: str, problem: str) -> None:
    error, path = manifest_error(tmp_path, text)
    assert_error(error, path, where, problem)


def test_duplicate_keys_refused_in_sidecar_yaml_too(tmp_path: Path) -> None:
    error, path = settings_error(tmp_path, "log:\n  level: info\n  level: debug\n")
    assert_error(error, path, "line 3, column 3", "invalid YAML: duplicate key 'level' (first on line 2)")


def test_unhashable_yaml_key_is_an_error_not_a_crash(tmp_path: Path) -> None:
    error, path = manifest_error(tmp_path, "version: v1\n? [1]\n: 2\n")
    assert_error(error, path, "line 2, column 3", "invalid YAML: mapping keys must be scalars")


# Threat: odd YAML scalars (an impossible date, a bad explicit tag, a 5000-digit integer) crashing
# the loader with a traceback instead of a one-line error naming the file and the place.
@pytest.mark.parametrize(
    ("text", "where", "kind"),
    [
        ("version: v1\nname: 2001-02-30\n", "line 2, column 7", "timestamp"),
        ("version: v1\nname: 2001-12-14t21:59:43.10+99:00\n", "line 2, column 7", "timestamp"),
        ("version: v1\nname: !!timestamp x\n", "line 2, column 7", "timestamp"),
        ("version: v1\nname: !!int abc\n", "line 2, column 7", "int"),
        ("version: v1\nname: !!int 0x\n", "line 2, column 7", "int"),
        ("version: v1\nname: !!float abc\n", "line 2, column 7", "float"),
        ("version: v1\nname: !!bool maybe\n", "line 2, column 7", "bool"),
        ("version: v1\ndefaults:\n  memory_mb: " + "9" * 5000 + "\n", "line 3, column 14", "int"),
    ],
    ids=[
        "bad-date",
        "bad-offset",
        "bad-timestamp-tag",
        "bad-int-tag",
        "empty-hex",
        "bad-float-tag",
        "bad-bool-tag",
        "5000-digit-int",
    ],
)
def test_unreadable_yaml_scalars_are_errors_not_crashes(
    tmp_path: Path, text: str, where: str, kind: str
) -> None:
    error, path = manifest_error(tmp_path, text)
    assert_error(
        error, path, where, f"invalid YAML: the value cannot be read as {kind} (malformed or out of range)"
    )


# Threat: `.nan` passing every min and max (NaN compares false), and integers too long to print or
# to convert, crashing the error message itself.
@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("network:\n  idle_timeout: .nan\n", "network.idle_timeout", "must be a finite number, not nan"),
        (
            "network:\n  connect_timeout: .inf\n",
            "network.connect_timeout",
            "must be a finite number, not inf",
        ),
        (
            "shutdown_timeout: 0x" + "f" * 5000 + "\n",
            "shutdown_timeout",
            "an integer of 20000 bits is above the maximum of 600",
        ),
        (
            "shutdown_timeout: -0b1" + "0" * 20000 + "\n",
            "shutdown_timeout",
            "an integer of 20001 bits is below the minimum of 0",
        ),
        (
            "network:\n  idle_timeout: 0x1" + "0" * 300 + "\n",
            "network.idle_timeout",
            "an integer of 1201 bits is too large",
        ),
    ],
    ids=["nan", "inf", "huge-hex", "huge-negative-binary", "int-beyond-float"],
)
def test_numbers_that_no_comparison_or_message_can_handle(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    error, path = settings_error(tmp_path, text)
    assert_error(error, path, key, problem)


def test_a_float_field_refuses_nan_whatever_its_bounds() -> None:
    with pytest.raises(SchemaError, match="must be a finite number"):
        Float(min=0.001).check(float("nan"), "rate_limit.per_second")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- version: v1\n", "expected a mapping, got a list"),
        # A whole file that is one string is most likely the wrong file (a token): never quoted.
        ("s.SuperSecretRootToken0123\n", "expected a mapping, got a string"),
        ("42\n", "expected a mapping, got an integer"),
        ("true\n", "expected a mapping, got a boolean"),
    ],
    ids=["list", "string", "integer", "boolean"],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, problem: str) -> None:
    error, path = manifest_error(tmp_path, text)
    assert_error(error, path, "", problem)
    error, path = settings_error(tmp_path, text)
    assert_error(error, path, "", problem)


BOMB = "".join(
    [f"l0: &l0 [{', '.join(['x'] * 10)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9)]
)


@pytest.mark.parametrize("loader", [load_manifest, load_settings], ids=["manifest", "settings"])
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Threat (found by review): ~600 bytes of nested aliases expanding to 10^9 values (minutes
        # of CPU and gigabytes), and an alias inside its own anchor, which never ends.
        (BOMB, "the document expands to more than 100000 values (through YAML aliases?)"),
        ("a: &a [*a]\n", "the document expands to more than 100000 values (through YAML aliases?)"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "invalid YAML: nested too deeply"),
    ],
    ids=["alias-bomb", "recursive-alias", "deep-nesting"],
)
def test_documents_that_would_exhaust_the_parser_are_refused(
    tmp_path: Path, loader: Any, text: str, problem: str
) -> None:
    path = write(tmp_path, "config.yaml", text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert_error(info.value, path, "", problem)
    assert time.monotonic() - started < 10


def test_a_key_with_a_line_break_cannot_forge_a_second_error_line(tmp_path: Path) -> None:
    error, path = settings_error(tmp_path, {"log": {"x\nerror: fake.yaml: all good": 1}})
    assert_error(error, path, "log.'x\\nerror: fake.yaml: all good'", "unknown key")


@pytest.mark.parametrize(
    ("network", "key", "problem"),
    [
        (
            {"log_vsock_port": 17000},
            "network.log_vsock_port",
            "vsock port 17000 is already used by network.status_vsock_port",
        ),
        (
            {"vsock_ingress": True, "log_vsock_port": 8001},
            "network.vsock_ingress",
            "vsock port 8001 is already used by network.log_vsock_port",
        ),
    ],
)
def test_the_enclaves_vsock_listeners_need_distinct_ports(
    tmp_path: Path, demo_manifest: Manifest, network: dict[str, Any], key: str, problem: str
) -> None:
    # Found by review: accepted, then "address already in use" at start-up.
    error, path = settings_error(tmp_path, {"network": network}, demo_manifest)
    assert_error(error, path, key, problem)


def test_empty_manifest_reports_the_first_required_key(tmp_path: Path) -> None:
    error, path = manifest_error(tmp_path, "")
    assert_error(error, path, "version", "is required")


def test_non_string_top_level_key(tmp_path: Path) -> None:
    error, path = manifest_error(tmp_path, "version: v1\n1: 2\n")
    assert_error(error, path, "", "keys must be strings, got an integer")


# --------------------------------------------------------------------------- file-level errors


@pytest.mark.parametrize("loader", [load_manifest, load_settings], ids=["manifest", "settings"])
def test_file_not_found(tmp_path: Path, loader: Any) -> None:
    missing = tmp_path / "nope" / "config.yaml"
    with pytest.raises(ConfigError) as info:
        loader(missing)
    assert_error(info.value, missing, "", "file not found")


@pytest.mark.parametrize("loader", [load_manifest, load_settings], ids=["manifest", "settings"])
def test_non_utf8_file(tmp_path: Path, loader: Any) -> None:
    path = write(tmp_path, "conf.yaml", b"version: v1\nname: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert_error(info.value, path, "", "file is not valid UTF-8")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert_error(info.value, tmp_path, "", "cannot read file: Is a directory")


@pytest.mark.parametrize("loader", [load_manifest, load_settings], ids=["manifest", "settings"])
def test_file_too_large(tmp_path: Path, loader: Any) -> None:
    size = MAX_CONFIG_BYTES + 1
    path = write(tmp_path, "conf.yaml", b"#" * size)
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert_error(info.value, path, "", f"file is {size} bytes; the limit is {MAX_CONFIG_BYTES}")


def test_file_of_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    text = yaml.safe_dump(MINIMAL)
    padding = MAX_CONFIG_BYTES - len(text.encode()) - 2
    path = write(tmp_path, "enclaver.yaml", text + "#" + "x" * padding + "\n")
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_manifest(path).name == "app"


# --------------------------------------------------------------------------- enclaver.yaml schema errors


@pytest.mark.parametrize(
    "missing",
    ["version", "name", "target", "sources", "sources.app"],
)
def test_missing_required_key(tmp_path: Path, missing: str) -> None:
    error, path = manifest_error(tmp_path, drop_path(MINIMAL, missing))
    assert_error(error, path, missing, "is required")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("v2", "'v2' is not one of 'v1'"),
        ("V1", "'V1' is not one of 'v1'"),
        (1, "expected a string, got an integer"),
        (1.0, "expected a string, got a number"),
    ],
)
def test_wrong_version(tmp_path: Path, value: Any, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(MINIMAL, "version", value))
    assert_error(error, path, "version", problem)


WRONG_TYPES: list[tuple[str, Any, str]] = [
    ("ingress[0].listen_port", "8001", "expected an integer, got the string '8001'"),
    ("ingress[0].listen_port", True, "expected an integer, got a boolean"),
    ("ingress[0].listen_port", 8001.5, "expected an integer, got a number"),
    ("defaults.cpu_count", True, "expected an integer, got a boolean"),
    ("defaults.memory_mb", False, "expected an integer, got a boolean"),
    ("egress.proxy_port", "10000", "expected an integer, got the string '10000'"),
    ("kms_proxy.listen_port", [9999], "expected an integer, got a list"),
    ("api.listen_port", {"port": 9000}, "expected an integer, got a mapping"),
    ("sources", ["no-fly-list:latest"], "expected a mapping, got a list"),
    ("egress", ["kms.*.amazonaws.com"], "expected a mapping, got a list"),
    ("defaults", [4096, 2], "expected a mapping, got a list"),
    ("kms_proxy", 9999, "expected a mapping, got an integer"),
    ("ingress", {"listen_port": 8001}, "expected a list, got a mapping"),
    ("ingress[1]", 8200, "expected a mapping, got an integer"),
    ("ingress[0].tls", "yes", "expected a mapping, got the string 'yes'"),
    ("egress.allow", "kms.*.amazonaws.com", "expected a list, got the string 'kms.*.amazonaws.com'"),
    ("egress.deny", {"x": 1}, "expected a list, got a mapping"),
    ("egress.allow[2]", 7, "expected a string, got an integer"),
    ("name", 12, "expected a string, got an integer"),
    ("target", True, "expected a string, got a boolean"),
    ("sources.app", ["a", "b"], "expected a string, got a list"),
]


@pytest.mark.parametrize(
    ("key", "value", "problem"), WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, _ in WRONG_TYPES]
)
def test_wrong_types(tmp_path: Path, key: str, value: Any, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), key, value))
    assert_error(error, path, key, problem)


def test_yaml_true_is_never_an_integer(tmp_path: Path) -> None:
    # `yes`/`on` are YAML 1.1 booleans too, and PyYAML reads them as True.
    for literal in ("true", "yes", "on", "True"):
        text = DEMO_MANIFEST.read_text().replace("cpu_count: 2", f"cpu_count: {literal}")
        error, path = manifest_error(tmp_path, text)
        assert_error(error, path, "defaults.cpu_count", "expected an integer, got a boolean")


def test_binary_values_are_not_called_lists(tmp_path: Path) -> None:
    error, path = manifest_error(tmp_path, {**MINIMAL, "name": b"hello"})
    assert_error(error, path, "name", "expected a string, got binary data")


PORT_KEYS = [
    "ingress[0].listen_port",
    "ingress[1].listen_port",
    "egress.proxy_port",
    "kms_proxy.listen_port",
    "api.listen_port",
]


@pytest.mark.parametrize("key", PORT_KEYS)
@pytest.mark.parametrize(
    ("port", "problem"),
    [
        (0, "0 is below the minimum of 1"),
        (-1, "-1 is below the minimum of 1"),
        (-8001, "-8001 is below the minimum of 1"),
        (65536, "65536 is above the maximum of 65535"),
        (10**12, f"{10**12} is above the maximum of 65535"),
    ],
)
def test_out_of_range_ports(tmp_path: Path, key: str, port: int, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), key, port))
    assert_error(error, path, key, problem)


@pytest.mark.parametrize("port", [1, 65535])
def test_boundary_ports_are_accepted(tmp_path: Path, port: int) -> None:
    m = load_manifest(write(tmp_path, "enclaver.yaml", set_path(MINIMAL, "ingress", [{"listen_port": port}])))
    assert m.ingress_ports == (port,)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("defaults.memory_mb", 63, "63 is below the minimum of 64"),
        ("defaults.memory_mb", 0, "0 is below the minimum of 64"),
        ("defaults.memory_mb", -4096, "-4096 is below the minimum of 64"),
        ("defaults.cpu_count", 0, "0 is below the minimum of 1"),
        ("defaults.cpu_count", -2, "-2 is below the minimum of 1"),
    ],
)
def test_resource_minimums(tmp_path: Path, key: str, value: int, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), key, value))
    assert_error(error, path, key, problem)


def test_resource_minimums_are_inclusive(tmp_path: Path) -> None:
    data = set_path(set_path(MINIMAL, "defaults.memory_mb", 64), "defaults.cpu_count", 1)
    m = load_manifest(write(tmp_path, "enclaver.yaml", data))
    assert (m.memory_mb, m.cpu_count) == (64, 1)


DUPLICATE_PORTS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"ingress[1].listen_port": 8001},
        "ingress[1].listen_port",
        "port 8001 is already used by ingress[0].listen_port",
    ),
    ({"egress.proxy_port": 8200}, "egress.proxy_port", "port 8200 is already used by ingress[1].listen_port"),
    (
        {"kms_proxy.listen_port": 8001},
        "kms_proxy.listen_port",
        "port 8001 is already used by ingress[0].listen_port",
    ),
    (
        {"kms_proxy.listen_port": 10000},
        "kms_proxy.listen_port",
        "port 10000 is already used by egress.proxy_port",
    ),
    ({"api.listen_port": 8200}, "api.listen_port", "port 8200 is already used by ingress[1].listen_port"),
    ({"api.listen_port": 9999}, "api.listen_port", "port 9999 is already used by kms_proxy.listen_port"),
    ({"api.listen_port": 10000}, "api.listen_port", "port 10000 is already used by egress.proxy_port"),
    # The egress proxy's default port counts even when the egress section is absent.
    (
        {"ingress[0].listen_port": 10000},
        "egress.proxy_port",
        "port 10000 is already used by ingress[0].listen_port",
    ),
]


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    DUPLICATE_PORTS,
    ids=[f"{k}-vs-{p.rsplit(' ', 1)[-1]}" for _, k, p in DUPLICATE_PORTS],
)
def test_duplicate_ports(tmp_path: Path, changes: dict[str, Any], key: str, problem: str) -> None:
    data = demo_manifest_data()
    if "ingress[0].listen_port" in changes:
        data = drop_path(data, "egress")
    for dotted, value in changes.items():
        data = set_path(data, dotted, value)
    error, path = manifest_error(tmp_path, data)
    assert_error(error, path, key, problem)


UNKNOWN_KEYS: list[tuple[str, str]] = [
    ("nmae", "unknown key (did you mean 'name'?)"),
    ("foo", "unknown key"),
    ("egress.alow", "unknown key (did you mean 'allow'?)"),
    ("egress.deny_list", "unknown key (did you mean 'deny'?)"),
    ("sources.odin", "unknown key (did you mean 'odyn'?)"),
    ("signature.certificat", "unknown key (did you mean 'certificate'?)"),
    ("defaults.memory", "unknown key (did you mean 'memory_mb'?)"),
    ("defaults.cpus", "unknown key"),
    ("ingress[1].listen_prot", "unknown key (did you mean 'listen_port'?)"),
    ("ingress[1].tsl", "unknown key (did you mean 'tls'?)"),
    ("ingress[1].bogus", "unknown key"),
    ("kms_proxy.listen", "unknown key (did you mean 'listen_port'?)"),
    ("api.listen", "unknown key (did you mean 'listen_port'?)"),
]


@pytest.mark.parametrize(("key", "problem"), UNKNOWN_KEYS, ids=[k for k, _ in UNKNOWN_KEYS])
def test_unknown_manifest_keys(tmp_path: Path, key: str, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), key, 1))
    assert_error(error, path, key, problem)


def test_unknown_key_inside_tls(tmp_path: Path) -> None:
    tls = {"key_file": "k.pem", "cert_file": "c.pem", "keyfile": "k.pem"}
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), "ingress[1].tls", tls))
    assert_error(error, path, "ingress[1].tls.keyfile", "unknown key (did you mean 'key_file'?)")


@pytest.mark.parametrize(
    ("tls", "key", "problem"),
    [
        ({"key_file": "k.pem"}, "ingress[1].tls.cert_file", "is required"),
        ({"cert_file": "c.pem"}, "ingress[1].tls.key_file", "is required"),
        ({"key_file": "k.pem", "cert_file": ""}, "ingress[1].tls.cert_file", "must not be empty"),
        (
            {"key_file": "k.pem", "cert_file": 5},
            "ingress[1].tls.cert_file",
            "expected a string, got an integer",
        ),
    ],
)
def test_incomplete_tls(tmp_path: Path, tls: dict[str, Any], key: str, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), "ingress[1].tls", tls))
    assert_error(error, path, key, problem)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("name", "", "must not be empty"),
        ("name", "x" * 129, "is longer than 128 characters"),
        ("target", "no fly:latest", "must be an image reference"),
        ("sources.app", " app:latest", "must be an image reference"),
        ("egress.allow[1]", " s3.*.amazonaws.com", "must be a non-empty rule without surrounding spaces"),
        ("egress.allow[0]", "", "must be a non-empty rule without surrounding spaces"),
    ],
)
def test_bad_string_values(tmp_path: Path, key: str, value: str, problem: str) -> None:
    error, path = manifest_error(tmp_path, set_path(demo_manifest_data(), key, value))
    assert_error(error, path, key, problem)


def test_section_without_its_required_port(tmp_path: Path) -> None:
    error, path = manifest_error(tmp_path, set_path(MINIMAL, "kms_proxy", {}))
    assert_error(error, path, "kms_proxy.listen_port", "is required")
    error, path = manifest_error(tmp_path, set_path(MINIMAL, "ingress", [{"tls": None}]))
    assert_error(error, path, "ingress[0].listen_port", "is required")


def test_parse_manifest_labels_errors_with_the_given_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_manifest({**MINIMAL, "egress": {"alow": []}}, Path("conf/enclaver.yaml"))
    assert_error(info.value, "conf/enclaver.yaml", "egress.alow", "unknown key (did you mean 'allow'?)")


# --------------------------------------------------------------------------- sidecar.yaml


@pytest.mark.parametrize("port", [8002, 9000, 9999, 10000])
def test_plugin_listen_port_must_be_an_ingress_port(
    tmp_path: Path, demo_manifest: Manifest, port: int
) -> None:
    data = set_path(demo_settings_data(), "plugins.vault_like.listen_port", port)
    error, path = settings_error(tmp_path, data, demo_manifest)
    assert_error(
        error,
        path,
        "plugins.vault_like.listen_port",
        f"{port} is not an ingress port of enclaver.yaml (ingress ports: 8001, 8200)",
    )


def test_plugin_port_check_with_a_manifest_without_ingress(tmp_path: Path) -> None:
    manifest = parse_manifest({**MINIMAL, "api": {"listen_port": 9000}}, tmp_path / "enclaver.yaml")
    error, path = settings_error(tmp_path, {"plugins": {"p": {"listen_port": 9000}}}, manifest)
    assert_error(
        error,
        path,
        "plugins.p.listen_port",
        "9000 is not an ingress port of enclaver.yaml (ingress ports: none)",
    )


def test_disabled_plugin_port_is_not_checked(tmp_path: Path, demo_manifest: Manifest) -> None:
    data = set_path(demo_settings_data(), "plugins.vault_like", {"enabled": False, "listen_port": 8999})
    settings = load_settings(write(tmp_path, "sidecar.yaml", data), demo_manifest)
    assert settings.plugins["vault_like"].enabled is False
    assert settings.enabled_plugins == ["no_fly_list"]


def test_plugin_port_not_checked_without_a_manifest(tmp_path: Path) -> None:
    data = set_path(demo_settings_data(), "plugins.vault_like.listen_port", 8999)
    assert load_settings(write(tmp_path, "sidecar.yaml", data)).plugins["vault_like"].listen_port == 8999


UNKNOWN_SETTINGS_KEYS: list[tuple[str, str]] = [
    ("plugin", "unknown key (did you mean 'plugins'?)"),
    ("listen_hots", "unknown key (did you mean 'listen_host'?)"),
    ("statedir", "unknown key (did you mean 'state_dir'?)"),
    ("colour", "unknown key"),
    ("log.levl", "unknown key (did you mean 'level'?)"),
    ("limits.max_body", "unknown key (did you mean 'max_body_bytes'?)"),
    ("startup.on_fail", "unknown key (did you mean 'on_failure'?)"),
    ("plugins.vault_like.listen_prot", "unknown key (did you mean 'listen_port'?)"),
    ("plugins.vault_like.enable", "unknown key (did you mean 'enabled'?)"),
]


@pytest.mark.parametrize(("key", "problem"), UNKNOWN_SETTINGS_KEYS, ids=[k for k, _ in UNKNOWN_SETTINGS_KEYS])
def test_unknown_settings_keys(tmp_path: Path, key: str, problem: str) -> None:
    error, path = settings_error(tmp_path, set_path(demo_settings_data(), key, 1))
    assert_error(error, path, key, problem)


@pytest.mark.parametrize(
    ("level", "problem"),
    [
        ("verbose", "'verbose' is not one of 'debug', 'info', 'warning', 'error'"),
        ("INFO", "'INFO' is not one of 'debug', 'info', 'warning', 'error'"),
        ("warn", "'warn' is not one of 'debug', 'info', 'warning', 'error'"),
        (10, "expected a string, got an integer"),
    ],
)
def test_bad_log_level(tmp_path: Path, level: Any, problem: str) -> None:
    error, path = settings_error(tmp_path, set_path(demo_settings_data(), "log.level", level))
    assert_error(error, path, "log.level", problem)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_log_level_is_accepted(tmp_path: Path, level: str) -> None:
    settings = load_settings(write(tmp_path, "sidecar.yaml", {"log": {"level": level}}))
    assert settings.log_level == level


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("log.access", "yes", "expected true or false, got the string 'yes'"),
        ("log.access", 1, "expected true or false, got an integer"),
        ("plugins.vault_like.enabled", "false", "expected true or false, got the string 'false'"),
        ("plugins.vault_like.listen_port", True, "expected an integer, got a boolean"),
        ("plugins.vault_like.listen_port", 0, "0 is below the minimum of 1"),
        ("plugins.vault_like.config", ["storage"], "expected a mapping, got a list"),
        ("plugins.vault_like", 1, "expected a mapping, got an integer"),
        ("plugins", ["vault_like"], "expected a mapping, got a list"),
        ("limits.max_body_bytes", 0, "0 is below the minimum of 1"),
        ("limits.max_line_bytes", 255, "255 is below the minimum of 256"),
        ("limits.max_field_bytes", (1 << 20) + 1, f"{(1 << 20) + 1} is above the maximum of {1 << 20}"),
        ("shutdown_timeout", -1, "-1 is below the minimum of 0"),
        ("shutdown_timeout", 601, "601 is above the maximum of 600"),
        ("startup.on_failure", "ignore", "'ignore' is not one of 'exit', 'unready'"),
        ("listen_host", 127, "expected a string, got an integer"),
    ],
)
def test_settings_wrong_values(tmp_path: Path, key: str, value: Any, problem: str) -> None:
    error, path = settings_error(tmp_path, set_path(demo_settings_data(), key, value))
    assert_error(error, path, key, problem)


@pytest.mark.parametrize("name", ["bad name", "1plugin", "-x", "a" * 65, "x/y"])
def test_invalid_plugin_names(tmp_path: Path, name: str) -> None:
    error, path = settings_error(tmp_path, {"plugins": {name: {}}})
    assert_error(error, path, f"plugins.{name}", "is not a valid plugin name")


@pytest.mark.parametrize("text", ["", "log: {level: debug}\n", "plugins:\n", "plugins: {}\n"])
def test_settings_without_plugins(tmp_path: Path, text: str) -> None:
    # Regression: an absent or null `plugins:` used to crash with AttributeError (a traceback).
    settings = load_settings(write(tmp_path, "sidecar.yaml", text))
    assert settings.plugins == {}
    assert settings.enabled_plugins == []
    assert redacted_settings(settings, {})["plugins"] == {}


def test_no_sidecar_yaml_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_manifest: Manifest
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, demo_manifest)
    assert settings.path is None
    assert settings.plugins == {}
    assert settings.listen_host == "127.0.0.1"
    assert settings.log_level == "info"
    assert settings.access_log is True
    assert settings.max_body_bytes == 1 << 20
    assert settings.on_startup_failure == "exit"
    assert settings.shutdown_timeout == 10
    assert settings.state_dir == tmp_path / ".sidecar-state"


def test_plugin_entry_without_config_gets_an_empty_mapping(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "sidecar.yaml", {"plugins": {"vault_like": {}}}))
    entry = settings.plugins["vault_like"]
    assert (entry.enabled, entry.listen_port, entry.config) == (True, None, {})


def test_errors_without_a_file_are_labelled_sidecar_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"plugin": {}}, None)
    assert_error(info.value, "sidecar.yaml", "plugin", "unknown key (did you mean 'plugins'?)")


def test_state_dir_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "etc"
    assert load_settings(write(conf, "sidecar.yaml", {"state_dir": "state"})).state_dir == conf / "state"
    absolute = tmp_path / "abs"
    assert load_settings(write(conf, "sidecar.yaml", {"state_dir": str(absolute)})).state_dir == absolute


# --------------------------------------------------------------------------- secret references


def vault_settings(key_id: Any) -> dict[str, Any]:
    return set_path(demo_settings_data(), "plugins.vault_like.config.key_id", key_id)


def test_env_reference_is_resolved_to_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "alias/from-env")
    settings = load_settings(write(tmp_path, "sidecar.yaml", vault_settings({"$env": ENV_VAR})))
    value = settings.plugins["vault_like"].config["key_id"]
    assert isinstance(value, Secret)
    assert value == "alias/from-env"
    assert "alias/from-env" not in repr(settings)
    # The other values are untouched plain strings.
    assert type(settings.plugins["vault_like"].config["path"]) is str


def test_env_reference_to_an_empty_variable_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "")
    settings = load_settings(write(tmp_path, "sidecar.yaml", vault_settings({"$env": ENV_VAR})))
    assert settings.plugins["vault_like"].config["key_id"] == Secret("")


def test_missing_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    error, path = settings_error(tmp_path, vault_settings({"$env": ENV_VAR}))
    assert_error(
        error, path, "plugins.vault_like.config.key_id", f"environment variable {ENV_VAR} is not set"
    )


def test_reference_inside_a_list_names_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    data = set_path(demo_settings_data(), "plugins.vault_like.config.keys", ["a", {"$env": ENV_VAR}])
    error, path = settings_error(tmp_path, data)
    assert_error(
        error, path, "plugins.vault_like.config.keys[1]", f"environment variable {ENV_VAR} is not set"
    )


def test_file_reference_relative_to_the_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    write(conf / "secrets", "key.txt", "alias/from-file\n\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a cwd-relative lookup would not find the file
    settings = load_settings(write(conf, "sidecar.yaml", vault_settings({"$file": "secrets/key.txt"})))
    value = settings.plugins["vault_like"].config["key_id"]
    assert isinstance(value, Secret)
    assert value == "alias/from-file\n"  # exactly one trailing newline is stripped


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("s3cret", "s3cret"),
        ("s3cret\n", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),
        ("  s3cret  \n", "  s3cret  "),
        ("line1\nline2\n", "line1\nline2"),
        ("", ""),
    ],
)
def test_file_reference_strips_one_trailing_newline(tmp_path: Path, content: str, expected: str) -> None:
    write(tmp_path, "secret", content)
    settings = load_settings(write(tmp_path, "sidecar.yaml", vault_settings({"$file": "secret"})))
    assert settings.plugins["vault_like"].config["key_id"] == expected


def test_file_reference_with_an_absolute_path(tmp_path: Path) -> None:
    secret = write(tmp_path / "abs", "secret", "absolute\n")
    settings = load_settings(write(tmp_path / "conf", "sidecar.yaml", vault_settings({"$file": str(secret)})))
    assert settings.plugins["vault_like"].config["key_id"] == "absolute"


@pytest.mark.parametrize(
    ("setup", "target", "problem"),
    [
        (None, "missing.txt", "cannot read secret file missing.txt: No such file or directory"),
        ("dir", "adir", "secret file adir is not a regular file"),
        # Found by review: a device or a FIFO was read without end (or blocked for ever).
        ("absolute", "/dev/zero", "secret file /dev/zero is not a regular file"),
        ("fifo", "fifo", "secret file fifo is not a regular file"),
        ("large", "large.txt", "secret file large.txt is larger than 65536 bytes"),
        ("latin1", "latin1.txt", "secret file latin1.txt is not valid UTF-8"),
    ],
)
def test_unreadable_file_reference(tmp_path: Path, setup: str | None, target: str, problem: str) -> None:
    if setup == "dir":
        (tmp_path / target).mkdir()
    elif setup == "latin1":
        write(tmp_path, target, b"caf\xe9\n")
    elif setup == "fifo":
        os.mkfifo(tmp_path / target)  # opening it for reading would block until a writer came
    elif setup == "large":
        write(tmp_path, target, b"x" * (64 * 1024 + 1))
    error, path = settings_error(tmp_path, vault_settings({"$file": target}))
    assert_error(error, path, "plugins.vault_like.config.key_id", problem)


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ({"$file": "a\0b"}, "cannot read secret file 'a\\x00b': the path contains a NUL character"),
        (
            {"$file": "x\nbad.yaml: forged"},
            "cannot read secret file 'x\\nbad.yaml: forged': No such file or directory",
        ),
        (
            {"$env": "NO_SUCH\nbad.yaml: forged"},
            "environment variable 'NO_SUCH\\nbad.yaml: forged' is not set",
        ),
    ],
    ids=["nul-in-path", "newline-in-path", "newline-in-env-name"],
)
def test_reference_targets_with_control_characters(
    tmp_path: Path, reference: dict[str, Any], problem: str
) -> None:
    # Threat: a "\0" in a $file path crashing the loader (ValueError), and a line break in a
    # reference target forging a second line in the one-line error.
    error, path = settings_error(tmp_path, vault_settings(reference))
    assert_error(error, path, "plugins.vault_like.config.key_id", problem)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_file_reference_without_permission(tmp_path: Path) -> None:
    secret = write(tmp_path, "secret", "x")
    secret.chmod(0)
    try:
        error, path = settings_error(tmp_path, vault_settings({"$file": "secret"}))
    finally:
        secret.chmod(0o600)
    assert_error(
        error, path, "plugins.vault_like.config.key_id", "cannot read secret file secret: Permission denied"
    )


REFERENCE_SHAPE = 'a reference is exactly one of {"$env": NAME} or {"$file": PATH}'


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ({"$env": 1}, "$env needs a non-empty string"),
        ({"$env": ""}, "$env needs a non-empty string"),
        ({"$env": None}, "$env needs a non-empty string"),
        ({"$env": ["A"]}, "$env needs a non-empty string"),
        ({"$file": 1}, "$file needs a non-empty string"),
        ({"$file": ""}, "$file needs a non-empty string"),
        ({"$env": "A", "x": 1}, REFERENCE_SHAPE),
        ({"$env": "A", "$file": "b"}, REFERENCE_SHAPE),
        ({"$bogus": "x"}, REFERENCE_SHAPE),
        ({"$ENV": "A"}, REFERENCE_SHAPE),
    ],
    ids=repr,
)
def test_malformed_references(tmp_path: Path, reference: dict[str, Any], problem: str) -> None:
    error, path = settings_error(tmp_path, vault_settings(reference))
    assert_error(error, path, "plugins.vault_like.config.key_id", problem)


def test_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "hunter2")
    error, path = settings_error(tmp_path, {"shutdown_timeout": {"$env": ENV_VAR}})
    assert_error(error, path, "shutdown_timeout", "expected an integer, got a secret string")
    assert "hunter2" not in str(error)
    error, path = settings_error(tmp_path, {"log": {"level": {"$env": ENV_VAR}}})
    assert_error(
        error, path, "log.level", f"Secret({MASK!r}) is not one of 'debug', 'info', 'warning', 'error'"
    )
    assert "hunter2" not in str(error)


# --------------------------------------------------------------------------- Secret, redact, describe


def test_secret_repr_never_shows_the_value() -> None:
    secret = Secret("hunter2")
    assert repr(secret) == "Secret('********')"
    assert f"{secret!r}" == "Secret('********')"
    assert "hunter2" not in repr([secret])
    assert "hunter2" not in repr({"key": secret})
    assert "hunter2" not in repr((secret,))
    # It is still the string itself wherever the value is used.
    assert str(secret) == "hunter2"
    assert secret == "hunter2"
    assert secret + "!" == "hunter2!"
    assert describe(secret) == "a secret string"


def test_secret_schema_field_is_not_echoed_in_type_errors() -> None:
    with pytest.raises(SchemaError) as info:
        Str(secret=True).check(12345, "token")
    assert str(info.value) == "token: expected a string, got a secret value"
    assert info.value.path == "token"
    assert "12345" not in str(info.value)


def test_secret_schema_field_returns_a_secret() -> None:
    value = Str(secret=True).check("hunter2", "token")
    assert isinstance(value, Secret)
    assert "hunter2" not in repr(value)
    assert type(Str().check("plain", "x")) is str


def test_redact_masks_references_and_secret_fields() -> None:
    schema = Map(
        fields={
            "token": Str(secret=True),
            "name": Str(),
            "nested": Map(fields={"password": Str(secret=True), "port": Int()}),
            "tokens": List(item=Str(secret=True)),
            "absent_secret": Str(secret=True),
        }
    )
    config = {
        "token": "plain-but-secret-by-schema",
        "name": Secret("from-env"),
        "nested": {"password": "p4ss", "port": 8200},
        "tokens": ["t1", "t2"],
        "absent_secret": None,
        "extra": [Secret("in-a-list"), "visible"],
    }
    original = copy.deepcopy(config)
    assert redact(config, schema) == {
        "token": MASK,
        "name": MASK,
        "nested": {"password": MASK, "port": 8200},
        "tokens": [MASK, MASK],
        "absent_secret": None,
        "extra": [MASK, "visible"],
    }
    assert config == original  # redact copies; it never masks the live config


def test_redact_without_schema_masks_only_secrets() -> None:
    data = {"a": Secret("s"), "b": {"c": [Secret("t"), 1, "u"]}, "d": "plain"}
    assert redact(data) == {"a": MASK, "b": {"c": [MASK, 1, "u"]}, "d": "plain"}


def test_redacted_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "alias/secret-key")
    data = vault_settings({"$env": ENV_VAR})
    settings = load_settings(write(tmp_path, "sidecar.yaml", data))
    vault_schema = Map(fields={"storage": Str(), "path": Str(secret=True), "key_id": Str()})
    vault_config = vault_schema.check(settings.plugins["vault_like"].config, "plugins.vault_like.config")
    dump = redacted_settings(settings, {"vault_like": (vault_config, vault_schema)})
    assert dump["plugins"]["vault_like"]["config"] == {"storage": "sqlite", "path": MASK, "key_id": MASK}
    # A plugin without a loaded schema has its whole section masked: nothing to tell secrets apart.
    assert dump["plugins"]["no_fly_list"]["config"] == MASK
    assert dump["plugins"]["no_fly_list"]["listen_port"] == 8001
    assert dump["state_dir"] == str(tmp_path / ".sidecar-state")
    assert dump["log"] == {"level": "info", "access": True}
    assert "alias/secret-key" not in repr(dump)
    assert "alias/secret-key" not in yaml.safe_dump(dump)


def test_settings_schema_has_no_secret_of_its_own() -> None:
    # redacted_settings relies on the schema for sidecar.yaml's own keys; none of them is secret.
    dump = redact(parse_settings({}, None).raw, SETTINGS_SCHEMA)
    assert MASK not in repr(dump)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "null"),
        (True, "a boolean"),
        (3, "an integer"),
        (3.5, "a number"),
        ("abc", "the string 'abc'"),
        ("x" * 50, "the string '" + "x" * 37 + "...'"),
        ({"a": 1}, "a mapping"),
        ([1], "a list"),
        (b"raw", "binary data"),
    ],
)
def test_describe(value: Any, expected: str) -> None:
    assert describe(value) == expected


@given(st.integers())
def test_port_accepts_exactly_1_to_65535(port: int) -> None:
    if 1 <= port <= 65535:
        assert Port().check(port, "p") == port
    else:
        with pytest.raises(SchemaError) as info:
            Port().check(port, "p")
        assert info.value.path == "p"
        assert str(port) in info.value.problem


# --------------------------------------------------------------------------- finding the files


def test_find_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path, "enclaver.yaml", MINIMAL)
    search = (Path("enclaver.yaml"), tmp_path / "missing.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    assert find_config(None, MANIFEST_ENV, search) == Path("enclaver.yaml")
    assert find_config(None, MANIFEST_ENV, (tmp_path / "missing.yaml",)) is None
    monkeypatch.setenv(MANIFEST_ENV, "/from/env.yaml")
    assert find_config(None, MANIFEST_ENV, search) == Path("/from/env.yaml")
    assert find_config("explicit.yaml", MANIFEST_ENV, search) == Path("explicit.yaml")
    assert default.exists()


def test_settings_type_round_trip() -> None:
    settings = load_settings(DEMO_SETTINGS)
    assert isinstance(settings, Settings)
    assert settings.raw["plugins"]["vault_like"]["config"]["storage"] == "sqlite"
