"""Load and validate ``enclaver.yaml`` (Enclaver's manifest) and ``sidecar.yaml`` (our settings).

Every problem becomes a :class:`ConfigError` whose message names the file, the key path and the
problem on one line, e.g. ``enclaver.yaml: egress.alow: unknown key (did you mean 'allow'?)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.files import FileProblem, read_regular_file
from sidecar.schema import (
    MASK,
    Bool,
    Dict,
    Field,
    Float,
    Int,
    List,
    Map,
    Port,
    SchemaError,
    Secret,
    Section,
    Str,
    join,
    redact,
)

MANIFEST_ENV = "SIDECAR_MANIFEST"
SETTINGS_ENV = "SIDECAR_CONFIG"
MANIFEST_SEARCH = (Path("enclaver.yaml"), Path("/etc/enclaver/enclaver.yaml"))
SETTINGS_SEARCH = (Path("sidecar.yaml"), Path("/etc/sidecar/sidecar.yaml"))
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # values in a document once its aliases are expanded
MAX_SECRET_FILE_BYTES = 64 * 1024  # a {"$file": PATH} reference: a password, a key, a certificate


class ConfigError(Exception):
    """A configuration problem: ``file: key.path: problem``. The CLI prints it and exits 2."""

    def __init__(self, file: str | os.PathLike[str], path: str, problem: str) -> None:
        self.file = str(file)
        self.path = path
        self.problem = problem
        where = f"{self.file}: {path}" if path else self.file
        super().__init__(f"{where}: {problem}")

    @classmethod
    def from_schema(cls, file: str | os.PathLike[str], error: SchemaError) -> ConfigError:
        return cls(file, error.path, error.problem)


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise plain Python errors for values its resolver let
        # through (`2001-02-30`, `!!int abc`, `!!bool maybe`, an integer of over 4300 digits):
        # make them YAML errors with the place. The value is not quoted: it may be a secret.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"the value cannot be read as {kind} (malformed or out of range)", node.start_mark
            ) from None


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise yaml.constructor.ConstructorError(
                None, None, "YAML merge keys (<<) are not supported", key_node.start_mark
            )
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be scalars", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    """Parse one YAML document; errors carry the file name and the line and column."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(path, "", f"file is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
        # Never blocks or runs away: /dev/zero or a FIFO has a size of 0 and is refused here.
        text = read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "file is not valid UTF-8") from None
    except FileProblem as exc:
        raise ConfigError(path, "", f"cannot read file: {exc}") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror}") from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except RecursionError:
        raise ConfigError(path, "", "invalid YAML: nested too deeply") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, where, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"invalid YAML: {exc}") from None
    _check_expanded_size(document, path)
    return document


def _check_expanded_size(document: Any, path: Path) -> None:
    """Refuse a document whose aliases expand it beyond :data:`MAX_CONFIG_VALUES` values.

    PyYAML shares an aliased node, but everything that walks the result (references, the schema)
    visits it once per alias: a few hundred bytes of nested aliases would take minutes and
    gigabytes ("billion laughs"), and an alias inside its own anchor never ends. Counted without
    recursion, each alias as often as it is used.
    """
    stack, count = [document], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                path,
                "",
                f"the document expands to more than {MAX_CONFIG_VALUES} values (through YAML aliases?)",
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


# --------------------------------------------------------------------------- secret references


def resolve_references(value: Any, base_dir: Path, path: str = "") -> Any:
    """Replace ``{"$env": NAME}`` and ``{"$file": PATH}`` with :class:`Secret` strings.

    A referenced file has one trailing newline removed (as ``echo secret > file`` writes it).
    Relative file paths are relative to the config file's directory.
    """
    if isinstance(value, Mapping):
        refs = [k for k in value if isinstance(k, str) and k.startswith("$")]
        if refs:
            if len(value) != 1 or refs[0] not in ("$env", "$file"):
                raise SchemaError(path, 'a reference is exactly one of {"$env": NAME} or {"$file": PATH}')
            kind, target = refs[0], value[refs[0]]
            if not isinstance(target, str) or not target:
                raise SchemaError(path, f"{kind} needs a non-empty string")
            # The name goes into a one-line error: a line break in it must not forge a second line.
            shown = target if target.isprintable() else repr(target)
            if kind == "$env":
                if target not in os.environ:
                    raise SchemaError(path, f"environment variable {shown} is not set")
                return Secret(os.environ[target])
            file = Path(target) if os.path.isabs(target) else base_dir / target
            try:
                text = read_secret_file(file, shown, path).decode("utf-8")
            except UnicodeDecodeError:
                raise SchemaError(path, f"secret file {shown} is not valid UTF-8") from None
            return Secret(text.removesuffix("\n"))
        return {k: resolve_references(v, base_dir, join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v, base_dir, join(path, i)) for i, v in enumerate(value)]
    return value


def read_secret_file(file: Path, shown: str, path: str) -> bytes:
    """A regular file's bytes, at most :data:`MAX_SECRET_FILE_BYTES`. Never blocks: a FIFO, a device
    (/dev/zero) or a directory is refused before it is read."""
    try:
        return read_regular_file(file, MAX_SECRET_FILE_BYTES)
    except FileProblem as exc:
        problem = str(exc)
        if problem.startswith(("not a regular file", "Is a directory")):
            raise SchemaError(path, f"secret file {shown} is not a regular file") from None
        if problem.startswith("larger than"):
            raise SchemaError(path, f"secret file {shown} is {problem}") from None
        raise SchemaError(path, f"cannot read secret file {shown}: {problem}") from None


# --------------------------------------------------------------------------- enclaver.yaml


def _image_ref(value: str) -> str | None:
    return None if value.strip() == value and " " not in value else "must be an image reference"


def _egress_rule(value: str) -> str | None:
    if not value.strip() or value.strip() != value:
        return "must be a non-empty rule without surrounding spaces"
    # Imported here to keep loading sidecar.config light; only manifests with egress rules need it.
    from sidecar.net.policy import PolicyError, parse_rule

    try:
        parse_rule(value)
    except PolicyError as exc:
        return f"{value!r}: {exc}"
    return None


TLS_SCHEMA = Map(
    optional=True,
    fields={"key_file": Str(required=True, min_len=1), "cert_file": Str(required=True, min_len=1)},
)

MANIFEST_SCHEMA = Map(
    fields={
        "version": Str(required=True, choices=["v1"], doc="manifest schema version"),
        "name": Str(required=True, min_len=1, max_len=128),
        "target": Str(required=True, min_len=1, check_fn=_image_ref),
        "sources": Map(
            required=True,
            fields={
                "app": Str(required=True, min_len=1, check_fn=_image_ref),
                "odyn": Str(check_fn=_image_ref),
                "supervisor": Str(check_fn=_image_ref),
                "sleeve": Str(check_fn=_image_ref),
                "wrapper": Str(check_fn=_image_ref),
            },
        ),
        "signature": Map(fields={"certificate": Str(min_len=1), "key": Str(min_len=1)}),
        "defaults": Map(
            fields={
                "memory_mb": Int(min=64, default=4096),
                "cpu_count": Int(min=1, default=2),
            }
        ),
        "ingress": List(
            default=[],
            item=Map(fields={"listen_port": Port(required=True), "tls": TLS_SCHEMA}),
        ),
        "egress": Map(
            fields={
                "proxy_port": Port(default=10000),
                "allow": List(item=Str(check_fn=_egress_rule), default=[]),
                "deny": List(item=Str(check_fn=_egress_rule), default=[]),
            }
        ),
        "kms_proxy": Map(optional=True, fields={"listen_port": Port(required=True)}),
        "api": Map(optional=True, fields={"listen_port": Port(required=True)}),
    }
)


@dataclass(frozen=True)
class Tls:
    key_file: str
    cert_file: str


@dataclass(frozen=True)
class Ingress:
    listen_port: int
    tls: Tls | None = None


@dataclass(frozen=True)
class Egress:
    proxy_port: int = 10000
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """enclaver.yaml, validated. Port fields are None where the section is absent."""

    path: Path
    name: str
    target: str
    sources: dict[str, str | None]
    memory_mb: int
    cpu_count: int
    ingress: tuple[Ingress, ...]
    egress: Egress
    kms_proxy_port: int | None
    api_port: int | None
    signature: dict[str, str | None]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def ingress_ports(self) -> tuple[int, ...]:
        return tuple(i.listen_port for i in self.ingress)


def parse_manifest(data: Any, path: Path) -> Manifest:
    try:
        v = MANIFEST_SCHEMA.check(data, "")
    except SchemaError as exc:
        raise ConfigError.from_schema(path, exc) from None
    manifest = Manifest(
        path=path,
        name=v["name"],
        target=v["target"],
        sources=v["sources"],
        memory_mb=v["defaults"]["memory_mb"],
        cpu_count=v["defaults"]["cpu_count"],
        ingress=tuple(
            Ingress(i["listen_port"], Tls(**i["tls"]) if i["tls"] else None) for i in v["ingress"] or ()
        ),
        egress=Egress(
            proxy_port=v["egress"]["proxy_port"],
            allow=tuple(v["egress"]["allow"] or ()),
            deny=tuple(v["egress"]["deny"] or ()),
        ),
        kms_proxy_port=v["kms_proxy"]["listen_port"] if v["kms_proxy"] else None,
        api_port=v["api"]["listen_port"] if v["api"] else None,
        signature=v["signature"],
        raw=v,
    )
    _check_unique_ports(manifest)
    return manifest


def _check_unique_ports(m: Manifest) -> None:
    claimed: dict[int, str] = {}
    candidates = [(f"ingress[{i}].listen_port", ing.listen_port) for i, ing in enumerate(m.ingress)]
    candidates += [("egress.proxy_port", m.egress.proxy_port)]
    if m.kms_proxy_port is not None:
        candidates.append(("kms_proxy.listen_port", m.kms_proxy_port))
    if m.api_port is not None:
        candidates.append(("api.listen_port", m.api_port))
    for key, port in candidates:
        if port in claimed:
            raise ConfigError(m.path, key, f"port {port} is already used by {claimed[port]}")
        claimed[port] = key


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    p = Path(path)
    return parse_manifest(load_yaml(p), p)


# --------------------------------------------------------------------------- sidecar.yaml


LOG_LEVELS = ["debug", "info", "warning", "error"]

PLUGIN_ENTRY_SCHEMA = Map(
    fields={
        "enabled": Bool(default=True, doc="load this plugin"),
        "listen_port": Port(doc="the enclaver.yaml ingress port whose listener serves its routes"),
        "config": Section(doc="the plugin's own settings, checked later by the plugin's schema"),
    }
)


def _upstream_problem(value: str) -> str | None:
    if value in ("direct", "vsock") or value.startswith("http://"):
        return None
    return "must be direct, vsock or http://HOST:PORT"


SETTINGS_SCHEMA = Map(
    fields={
        "listen_host": Str(default="127.0.0.1", doc="address the listeners bind (vsock bridges to it)"),
        "state_dir": Str(default=".sidecar-state", doc="where the sidecar keeps dev PKI and state"),
        "log": Map(
            fields={
                "level": Str(choices=LOG_LEVELS, default="info"),
                "access": Bool(default=True, doc="write one access-log line per request"),
            }
        ),
        "limits": Map(
            fields={
                "max_body_bytes": Int(min=1, max=1 << 30, default=1 << 20),
                "max_line_bytes": Int(min=256, max=1 << 20, default=8190),
                "max_field_bytes": Int(min=256, max=1 << 20, default=8190),
            }
        ),
        "startup": Map(
            fields={
                "on_failure": Str(
                    choices=["exit", "unready"],
                    default="exit",
                    doc="when a plugin fails to start: exit 1, or stay up with readiness false",
                ),
            }
        ),
        "shutdown_timeout": Int(min=0, max=600, default=10, doc="seconds to drain requests"),
        "aws": Map(
            fields={
                "imds": Str(
                    default="http://169.254.169.254",
                    min_len=1,
                    doc="the instance metadata service (reached through egress), or `off`",
                ),
                "region": Str(doc="the AWS region; by default the one IMDS reports"),
            }
        ),
        "attestation": Map(
            fields={
                "nsm": Str(
                    choices=["device", "emulator", "off"],
                    default="device",
                    doc="the Nitro Secure Module: the real /dev/nsm, the dev emulator, or none",
                ),
                "device": Str(default="/dev/nsm", min_len=1),
                "max_concurrent": Int(min=1, max=64, default=4, doc="attestation requests at once"),
            }
        ),
        "network": Map(
            doc="how bytes leave and reach the enclave (vsock inside Nitro, TCP in the dev world)",
            fields={
                "upstream": Str(
                    default="direct",
                    min_len=1,
                    check_fn=_upstream_problem,
                    doc="where the egress proxy sends allowed traffic: direct, vsock, or http://HOST:PORT",
                ),
                "parent_cid": Int(min=0, max=(1 << 32) - 1, default=3, doc="the parent's vsock CID"),
                "egress_vsock_port": Int(min=1, max=(1 << 32) - 1, default=17002),
                "log_vsock_port": Int(min=1, max=(1 << 32) - 1, default=17001),
                "status_vsock_port": Int(min=1, max=(1 << 32) - 1, default=17000),
                "vsock_ingress": Bool(
                    default=False, doc="also accept each ingress port on vsock and bridge it to TCP"
                ),
                "max_tunnels": Int(
                    min=1,
                    max=65536,
                    default=512,
                    doc="concurrent egress connections, and connections on each vsock ingress port",
                ),
                "idle_timeout": Float(min=0.1, max=86400.0, default=300.0, doc="seconds without bytes"),
                "connect_timeout": Float(min=0.1, max=600.0, default=10.0),
                "max_header_bytes": Int(min=1024, max=1 << 20, default=16384),
            },
        ),
        "plugins": Dict(value=PLUGIN_ENTRY_SCHEMA, key_check=lambda k: _plugin_name_problem(k)),
    }
)


@dataclass(frozen=True)
class NetworkSettings:
    """sidecar.yaml ``network``: the egress proxy's upstream and limits, and the vsock ports."""

    upstream: str = "direct"
    parent_cid: int = 3
    egress_vsock_port: int = 17002
    log_vsock_port: int = 17001
    status_vsock_port: int = 17000
    vsock_ingress: bool = False
    max_tunnels: int = 512
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_header_bytes: int = 16384


PLUGIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def _plugin_name_problem(name: str) -> str | None:
    return None if PLUGIN_NAME.match(name) else "is not a valid plugin name"


@dataclass(frozen=True)
class PluginEntry:
    name: str
    enabled: bool
    listen_port: int | None
    config: dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """sidecar.yaml, validated. Plugin ``config`` sections are still raw here."""

    path: Path | None
    listen_host: str
    state_dir: Path
    log_level: str
    access_log: bool
    max_body_bytes: int
    max_line_bytes: int
    max_field_bytes: int
    on_startup_failure: str
    shutdown_timeout: int
    imds: str
    region: str | None
    nsm: str
    nsm_device: str
    attest_concurrency: int
    plugins: dict[str, PluginEntry]
    network: NetworkSettings = field(default_factory=NetworkSettings)
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def enabled_plugins(self) -> list[str]:
        return [name for name, entry in self.plugins.items() if entry.enabled]


def parse_settings(data: Any, path: Path | None, manifest: Manifest | None = None) -> Settings:
    label: str | Path = path or "sidecar.yaml"
    base_dir = path.parent if path else Path.cwd()
    try:
        data = resolve_references(data, base_dir)
        v = SETTINGS_SCHEMA.check(data, "")
    except SchemaError as exc:
        raise ConfigError.from_schema(label, exc) from None
    state_dir = Path(v["state_dir"])
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    settings = Settings(
        path=path,
        listen_host=v["listen_host"],
        state_dir=state_dir,
        log_level=v["log"]["level"],
        access_log=v["log"]["access"],
        max_body_bytes=v["limits"]["max_body_bytes"],
        max_line_bytes=v["limits"]["max_line_bytes"],
        max_field_bytes=v["limits"]["max_field_bytes"],
        on_startup_failure=v["startup"]["on_failure"],
        shutdown_timeout=v["shutdown_timeout"],
        imds=v["aws"]["imds"],
        region=v["aws"]["region"],
        nsm=v["attestation"]["nsm"],
        nsm_device=v["attestation"]["device"],
        attest_concurrency=v["attestation"]["max_concurrent"],
        plugins={
            name: PluginEntry(name, e["enabled"], e["listen_port"], e["config"])
            for name, e in v["plugins"].items()
        },
        network=NetworkSettings(**v["network"]),
        raw=v,
    )
    check_vsock_ports(settings.network, manifest, label)
    if manifest is not None:
        check_plugin_ports(settings, manifest, label)
    return settings


def check_vsock_ports(network: NetworkSettings, manifest: Manifest | None, label: str | Path) -> None:
    """The enclave's own vsock listeners (status, log, and the ingress ports with ``vsock_ingress``)
    need distinct ports; two on one port would fail at start-up with "address already in use"."""
    taken: dict[int, str] = {network.status_vsock_port: "network.status_vsock_port"}
    # (the key to name in the error, what uses the port)
    wanted = [("network.log_vsock_port", "network.log_vsock_port", network.log_vsock_port)]
    if network.vsock_ingress and manifest is not None:
        wanted += [("network.vsock_ingress", f"ingress port {p}", p) for p in manifest.ingress_ports]
    for key, user, port in wanted:
        if port in taken:
            raise ConfigError(label, key, f"vsock port {port} is already used by {taken[port]}")
        taken[port] = user


def check_plugin_ports(settings: Settings, manifest: Manifest, label: str | Path) -> None:
    ports = manifest.ingress_ports
    for name, entry in settings.plugins.items():
        if not entry.enabled or entry.listen_port is None:
            continue
        if entry.listen_port not in ports:
            known = ", ".join(str(p) for p in ports) or "none"
            raise ConfigError(
                label,
                f"plugins.{name}.listen_port",
                f"{entry.listen_port} is not an ingress port of {manifest.path.name} "
                f"(ingress ports: {known})",
            )


def load_settings(path: str | os.PathLike[str] | None, manifest: Manifest | None = None) -> Settings:
    if path is None:
        return parse_settings({}, None, manifest)
    p = Path(path)
    return parse_settings(load_yaml(p), p, manifest)


def find_config(explicit: str | None, env: str, search: tuple[Path, ...]) -> Path | None:
    """An explicit path wins, then the environment variable, then the first existing default."""
    if explicit:
        return Path(explicit)
    if os.environ.get(env):
        return Path(os.environ[env])
    return next((p for p in search if p.exists()), None)


def redacted_settings(
    settings: Settings, plugin_configs: Mapping[str, tuple[dict[str, Any], Field | None]]
) -> dict[str, Any]:
    """The resolved sidecar.yaml with every secret masked.

    ``plugin_configs`` holds each loaded plugin's validated config and schema, so fields its schema
    marks secret are masked. A plugin that is not loaded has no schema to go by: its whole config
    section is masked.
    """
    dump: dict[str, Any] = redact(settings.raw, SETTINGS_SCHEMA)
    dump["state_dir"] = str(settings.state_dir)
    for name, entry in dump.get("plugins", {}).items():
        if name in plugin_configs:
            config, schema = plugin_configs[name]
            entry["config"] = redact(config, schema)
        else:
            entry["config"] = MASK
    return dump
