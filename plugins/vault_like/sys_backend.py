"""The ``sys/`` backend and the mount table.

Unauthenticated (answered sealed or not, never audited): ``sys/health`` (GET and HEAD, with
Vault's status-code query overrides), ``sys/seal-status``, ``sys/init`` (GET; PUT initialises the
store once) and ``sys/leader``. Everything else needs a token and passes the ACL first:
``sys/mounts`` (+ ``/PATH``, ``/PATH/tune``), ``sys/internal/ui/mounts/PATH`` (what the ``bao``
CLI asks before any ``kv`` command), ``sys/policy[/NAME]``, ``sys/policies/acl[/NAME]``,
``sys/capabilities-self``, ``sys/rotate``, ``sys/key-status`` and ``sys/audit-hash/file``.

Bodies and messages are Vault's (checked against a real OpenBao server); sys paths Vault answers
in its legacy shape (the data also at the top level) are listed in :data:`LEGACY_PATHS`.

The mount table lives in the barrier at ``core/mounts`` and is changed with a CAS update, so two
replicas on one S3 bucket never lose each other's mounts. Each mount's data lives under
``logical/<mount uuid>/``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

from plugins.vault_like.durations import MAX_SECONDS, duration_seconds
from plugins.vault_like.logical import (
    Backend,
    LogicalRequest,
    LogicalResponse,
    VaultError,
    permission_denied,
)

if TYPE_CHECKING:
    from plugins.vault_like.barrier import Barrier, JsonStore
    from plugins.vault_like.service import VaultService

# Vault's system default lease TTL (32 days), shown by sys/mounts/PATH/tune for a mount without its own.
SYSTEM_TTL: Final = 2_764_800
MOUNTS_KEY: Final = "mounts"  # in the core store
CLUSTER_KEY: Final = "cluster"
# Vault refuses to mount under these (its own and its auth/identity engines').
PROTECTED: Final = ("sys/", "auth/", "audit/", "cubbyhole/", "identity/")
# Vault answers these sys paths with the data copied to the top level too (its injectDataIntoTopRoutes).
LEGACY_PATHS: Final = ("mounts", "policy", "capabilities-self", "key-status", "rotate", "audit-hash/")
# Writes to these need the sudo capability as well (Vault's root-protected sys paths we serve).
SUDO_PATHS: Final = frozenset({"sys/rotate"})

UNSUPPORTED_PATH: Final = "1 error occurred:\n\t* unsupported path\n\n"
UNSUPPORTED_OPERATION: Final = "1 error occurred:\n\t* unsupported operation\n\n"
DEPRECATION: Final = {"kv": "supported"}
DESCRIPTIONS: Final = {"kv": "key/value secret storage", "transit": ""}


def unsupported_path() -> VaultError:
    return VaultError(404, UNSUPPORTED_PATH)


def unsupported_operation() -> VaultError:
    return VaultError(405, UNSUPPORTED_OPERATION)


def is_legacy(sys_path: str) -> bool:
    """Whether Vault answers ``sys/<sys_path>`` with the data at the top level as well."""
    for prefix in LEGACY_PATHS:
        if sys_path == prefix.rstrip("/") or sys_path.startswith(prefix.rstrip("/") + "/"):
            return prefix != "capabilities-self" or sys_path == "capabilities-self"
    return False


# --------------------------------------------------------------------------- durations


def parse_duration(value: Any, name: str) -> int:
    """Seconds from an integer, a numeric string, ``Nd`` or a Go duration ("1h30m", "768h")."""
    if isinstance(value, bool):
        raise VaultError(400, f"invalid value for {name!r}: expected a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float) and value.is_integer():
        seconds = int(value)
    elif isinstance(value, str):
        try:
            seconds = duration_seconds(value)
        except ValueError as exc:  # Go's message, e.g. time: unknown unit "x" in duration "1x"
            raise VaultError(400, f"invalid value for {name!r}: {exc}") from None
    else:
        raise VaultError(400, f"invalid value for {name!r}: expected a duration")
    if seconds < 0:
        raise VaultError(400, f"invalid value for {name!r}: a duration cannot be negative")
    if seconds > MAX_SECONDS:
        raise VaultError(400, f"invalid value for {name!r}: out of range")
    return seconds


# --------------------------------------------------------------------------- the mount table


@dataclass
class MountEntry:
    path: str  # "secret/"
    type: str  # "kv", "transit"
    uuid: str
    accessor: str
    description: str = ""
    options: dict[str, str] = field(default_factory=dict)
    default_lease_ttl: int = 0
    max_lease_ttl: int = 0
    force_no_cache: bool = False
    created: float = 0.0

    def info(self) -> dict[str, Any]:
        """The mount as sys/mounts and sys/internal/ui/mounts show it."""
        info: dict[str, Any] = {
            "accessor": self.accessor,
            "config": {
                "default_lease_ttl": self.default_lease_ttl,
                "force_no_cache": self.force_no_cache,
                "max_lease_ttl": self.max_lease_ttl,
            },
            "description": self.description,
            "external_entropy_access": False,
            "local": False,
            "options": dict(self.options) or None,
            "plugin_version": "",
            "running_plugin_version": "",
            "running_sha256": "",
            "seal_wrap": False,
            "type": self.type,
            "uuid": self.uuid,
        }
        if self.type in DEPRECATION:
            info["deprecation_status"] = DEPRECATION[self.type]
        return info

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> MountEntry:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


SYS_MOUNT_INFO: Final = {
    "accessor": "system_00000000",
    "config": {"default_lease_ttl": 0, "force_no_cache": False, "max_lease_ttl": 0},
    "description": "system endpoints used for control, policy and debugging",
    "external_entropy_access": False,
    "local": False,
    "options": None,
    "plugin_version": "",
    "running_plugin_version": "",
    "running_sha256": "",
    "seal_wrap": True,
    "type": "system",
    "uuid": "00000000-0000-0000-0000-000000000000",
}

BackendFactory = Callable[[MountEntry, "JsonStore"], Backend]


def default_backend_factory(entry: MountEntry, store: JsonStore) -> Backend:
    """The engine for a mount; imported on use so one missing engine cannot stop the others."""
    if entry.type == "kv":
        from plugins.vault_like.kv import KvV2

        return KvV2(store, entry.path)
    if entry.type == "transit":
        from plugins.vault_like.transit import Transit

        return Transit(store, entry.path)
    raise VaultError(400, f"plugin not found in the catalog: {entry.type}")


def normalize_mount_type(kind: Any, options: Any) -> tuple[str, dict[str, str]]:
    """(type, options) as stored: "kv-v2" is "kv" with version 2; KV version 1 is not offered."""
    if not isinstance(kind, str) or not kind:
        raise VaultError(400, "plugin not found in the catalog: ")
    if options is None:
        options = {}
    if not isinstance(options, Mapping) or not all(isinstance(v, str | int) for v in options.values()):
        raise VaultError(400, "invalid value for 'options': expected a map of strings")
    opts = {str(k): str(v) for k, v in options.items()}
    if kind == "kv-v2":
        kind, opts["version"] = "kv", "2"
    if kind == "kv":
        version = opts.get("version", "1")
        if version != "2":
            raise VaultError(
                400,
                "only KV version 2 is supported: mount with type kv-v2, or type kv and options "
                '{"version": "2"}',
            )
        return kind, opts
    if kind == "transit":
        return kind, opts
    raise VaultError(400, f"plugin not found in the catalog: {kind[:64]}")


def clean_mount_path(path: str) -> str:
    path = path.strip("/") + "/"
    if path == "/" or any(part in ("", ".", "..") for part in path[:-1].split("/")):
        raise VaultError(400, f"invalid mount path {path[:80]!r}")
    return path


class MountTable:
    """The mounts, cached; changed only by CAS updates of ``core/mounts``."""

    def __init__(
        self, barrier: Barrier, core: JsonStore, factory: BackendFactory = default_backend_factory
    ) -> None:
        self.barrier = barrier
        self.core = core
        self.factory = factory
        self.entries: dict[str, MountEntry] = {}
        self.backends: dict[str, Backend] = {}  # by mount uuid
        self.loaded_at = 0.0

    def store_for(self, entry: MountEntry) -> JsonStore:
        from plugins.vault_like.barrier import JsonStore

        return JsonStore(self.barrier, f"logical/{entry.uuid}/")

    async def load(self) -> None:
        doc = await self.core.read(MOUNTS_KEY)
        self._install(doc)

    def _install(self, doc: Mapping[str, Any] | None) -> None:
        entries = {p: MountEntry.from_dict(e) for p, e in ((doc or {}).get("mounts") or {}).items()}
        backends: dict[str, Backend] = {}
        for entry in entries.values():
            known = self.backends.get(entry.uuid)
            backends[entry.uuid] = known if known is not None else self.factory(entry, self.store_for(entry))
        self.entries, self.backends = entries, backends
        self.loaded_at = time.monotonic()

    def match(self, path: str) -> tuple[MountEntry, Backend] | None:
        """The mount with the longest prefix of ``path`` (a path inside a mount: "secret/data/x")."""
        best: MountEntry | None = None
        for mount, entry in self.entries.items():
            if (path.startswith(mount) or path + "/" == mount) and (
                best is None or len(mount) > len(best.path)
            ):
                best = entry
        if best is None:
            return None
        return best, self.backends[best.uuid]

    async def mount(
        self, path: str, kind: str, options: dict[str, str], description: str, config: Mapping[str, Any]
    ) -> None:
        default_ttl = parse_duration(config.get("default_lease_ttl", 0), "default_lease_ttl")
        max_ttl = parse_duration(config.get("max_lease_ttl", 0), "max_lease_ttl")
        entry = MountEntry(
            path=path,
            type=kind,
            uuid=str(uuid.uuid4()),
            accessor=f"{kind}_{secrets.token_hex(4)}",
            description=description or DESCRIPTIONS.get(kind, ""),
            options=options,
            default_lease_ttl=default_ttl,
            max_lease_ttl=max_ttl,
            force_no_cache=bool(config.get("force_no_cache", False)),
            created=time.time(),
        )
        self.factory(entry, self.store_for(entry))  # an unknown type fails before anything is written

        def add(old: dict[str, Any] | None) -> dict[str, Any]:
            mounts = dict((old or {}).get("mounts") or {})
            for existing in mounts:
                if path.startswith(existing) or existing.startswith(path):
                    raise VaultError(400, f"path is already in use at {existing}")
            mounts[path] = asdict(entry)
            return {"mounts": mounts}

        self._install(await self.core.update(MOUNTS_KEY, add))

    async def unmount(self, path: str) -> MountEntry | None:
        removed: list[MountEntry] = []

        def drop(old: dict[str, Any] | None) -> dict[str, Any]:
            mounts = dict((old or {}).get("mounts") or {})
            gone = mounts.pop(path, None)
            removed[:] = [MountEntry.from_dict(gone)] if gone else []
            return {"mounts": mounts}

        self._install(await self.core.update(MOUNTS_KEY, drop))
        if not removed:
            return None
        store = self.store_for(removed[0])
        if removed[0].type == "kv":
            from plugins.vault_like.kv import purge_versions

            await purge_versions(store)  # the unlisted version documents first, while metadata names them
        await self._delete_tree(store, "")  # the mount's data goes with it, as in Vault
        return removed[0]

    async def _delete_tree(self, store: JsonStore, prefix: str) -> None:
        for child in await store.list(prefix):
            if child.endswith("/"):
                await self._delete_tree(store, prefix + child)
            else:
                await store.delete(prefix + child)

    async def tune(self, path: str, changes: Mapping[str, Any]) -> None:
        def apply(old: dict[str, Any] | None) -> dict[str, Any]:
            mounts = dict((old or {}).get("mounts") or {})
            if path not in mounts:
                raise VaultError(400, f"cannot fetch sysview for path {path!r}")
            mounts[path] = {**mounts[path], **changes}
            return {"mounts": mounts}

        self._install(await self.core.update(MOUNTS_KEY, apply))


# --------------------------------------------------------------------------- the sys backend


def _bool_param(value: str) -> bool | None:
    """Go's strconv.ParseBool, plus "" (a bare flag) as true."""
    if value in ("", "1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


HEALTH_CODES: Final = {
    "activecode": 200,
    "standbycode": 429,
    "drsecondarycode": 472,
    "performancestandbycode": 473,
    "sealedcode": 503,
    "uninitcode": 501,
    "removedcode": 530,
}


class SysBackend:
    """``sys/*``. ``request.path`` is relative to ``sys/``."""

    type = "system"

    def __init__(self, core: VaultService) -> None:
        self.core = core

    async def existence(self, request: LogicalRequest) -> bool | None:
        return None  # Vault's sys paths have no existence check: every write is an update

    # ------------------------------------------------------------------ unauthenticated

    def health(self, query: Mapping[str, str]) -> LogicalResponse:
        codes = dict(HEALTH_CODES)
        for name in codes:
            if name in query:
                raw = query[name]
                if not (raw.isascii() and raw.isdigit()) or not 100 <= int(raw) <= 599:  # not "²"
                    return LogicalResponse(status=400, raw=b'{"errors":[]}')
                codes[name] = int(raw)
        for name in ("standbyok", "perfstandbyok"):
            if name in query and _bool_param(query[name]) is None:
                return LogicalResponse(status=400, raw=b'{"errors":[]}')
        core = self.core
        initialized, sealed = core.initialized, core.sealed
        body: dict[str, Any] = {
            "initialized": initialized,
            "sealed": sealed,
            "standby": sealed,  # as Vault: a sealed node counts as a standby
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": core.version,
        }
        if not sealed and core.cluster:
            body["cluster_name"] = core.cluster.get("cluster_name", "")
            body["cluster_id"] = core.cluster.get("cluster_id", "")
        if not initialized:
            status = codes["uninitcode"]
        elif sealed:
            status = codes["sealedcode"]
        else:
            status = codes["activecode"]
        return LogicalResponse(status=status, data=body, raw=_json(body))

    def seal_status(self) -> LogicalResponse:
        core = self.core
        body: dict[str, Any] = {
            "type": "awskms",
            "initialized": core.initialized,
            "sealed": core.sealed,
            # No key shares: the root key is sealed by attested KMS alone (no recovery keys either).
            "t": 1 if core.initialized else 0,
            "n": 1 if core.initialized else 0,
            "progress": 0,
            "nonce": "",
            "version": core.version,
            "build_date": core.build_date,
            "migration": False,
            "recovery_seal": False,
            "storage_type": core.storage_type,
        }
        if not core.sealed and core.cluster:
            body["cluster_name"] = core.cluster.get("cluster_name", "")
            body["cluster_id"] = core.cluster.get("cluster_id", "")
        return LogicalResponse(status=200, raw=_json(body))

    def leader(self) -> LogicalResponse:
        if self.core.sealed:
            raise VaultError(503, "Vault is sealed")
        body = {
            "ha_enabled": False,
            "is_self": False,
            "active_time": "0001-01-01T00:00:00Z",
            "leader_address": "",
            "leader_cluster_address": "",
            "performance_standby": False,
            "performance_standby_last_remote_wal": 0,
        }
        return LogicalResponse(status=200, raw=_json(body))

    def init_status(self) -> LogicalResponse:
        return LogicalResponse(status=200, raw=_json({"initialized": self.core.initialized}))

    async def init(self) -> LogicalResponse:
        root_token = await self.core.initialize()
        body = {
            "keys": [],
            "keys_base64": [],
            "recovery_keys": [],
            "recovery_keys_base64": [],
            "root_token": root_token,
        }
        return LogicalResponse(status=200, raw=_json(body))

    # ------------------------------------------------------------------ authenticated

    async def handle(self, request: LogicalRequest) -> LogicalResponse:
        path, op = request.path, request.operation
        if path == "mounts":
            if op != "read":
                raise unsupported_operation()
            return self._list_mounts()
        if path.startswith("mounts/"):
            rest = path[len("mounts/") :]
            if rest.endswith("/tune") and len(rest) > len("/tune"):
                return await self._tune(clean_mount_path(rest[: -len("/tune")]), request)
            return await self._mount(clean_mount_path(rest), request)
        if path.startswith("internal/ui/mounts/"):
            return await self._ui_mount(path[len("internal/ui/mounts/") :], request)
        if path == "policy" or path == "policy/" or path == "policies/acl/" or path == "policies/acl":
            if op not in ("read", "list") or (path.startswith("policies") and op != "list"):
                raise unsupported_operation()
            return await self._list_policies(legacy=path.startswith("policy"))
        if path.startswith("policy/"):
            return await self._policy(path[len("policy/") :], request, legacy=True)
        if path.startswith("policies/acl/"):
            return await self._policy(path[len("policies/acl/") :], request, legacy=False)
        if path == "capabilities-self":
            if op not in ("create", "update"):
                raise unsupported_operation()
            return await self._capabilities_self(request)
        if path == "rotate":
            if op not in ("create", "update"):
                raise unsupported_operation()
            await self.core.rotate()
            return LogicalResponse()
        if path == "key-status":
            if op != "read":
                raise unsupported_operation()
            return LogicalResponse(data=self.core.key_status())
        if path.startswith("audit-hash/"):
            if op not in ("create", "update"):
                raise unsupported_operation()
            return self._audit_hash(path[len("audit-hash/") :], request)
        raise unsupported_path()

    def _list_mounts(self) -> LogicalResponse:
        data: dict[str, Any] = {p: e.info() for p, e in sorted(self.core.mounts.entries.items())}
        data["sys/"] = dict(SYS_MOUNT_INFO)
        return LogicalResponse(data=data)

    async def _mount(self, path: str, request: LogicalRequest) -> LogicalResponse:
        table = self.core.mounts
        op = request.operation
        if op == "read":
            entry = table.entries.get(path)
            if entry is None:
                raise VaultError(400, f"No secret engine mount at {path}")
            return LogicalResponse(data=entry.info())
        if op in ("create", "update"):
            if request.path.endswith("/"):
                raise VaultError(400, "cannot write to a path ending in '/'")
            if path.startswith(PROTECTED) or path in PROTECTED:
                raise VaultError(400, f"cannot mount {path!r}".replace("'", '"'))
            data = request.data
            kind, options = normalize_mount_type(data.get("type"), data.get("options"))
            config = data.get("config") or {}
            if not isinstance(config, Mapping):
                raise VaultError(400, "invalid value for 'config': expected a map")
            description = data.get("description") or ""
            if not isinstance(description, str):
                raise VaultError(400, "invalid value for 'description': expected a string")
            await table.mount(path, kind, options, description, config)
            return LogicalResponse()
        if op == "delete":
            if path.startswith(PROTECTED) or path in PROTECTED:
                raise VaultError(400, f"cannot unmount {path!r}".replace("'", '"'))
            await table.unmount(path)
            return LogicalResponse()
        raise unsupported_operation()

    async def _tune(self, path: str, request: LogicalRequest) -> LogicalResponse:
        table = self.core.mounts
        entry = table.entries.get(path)
        if request.operation == "read":
            if entry is None:
                raise VaultError(400, f"cannot fetch sysview for path {path!r}".replace("'", '"'))
            return LogicalResponse(
                data={
                    "default_lease_ttl": entry.default_lease_ttl or SYSTEM_TTL,
                    "description": entry.description,
                    "force_no_cache": entry.force_no_cache,
                    "max_lease_ttl": entry.max_lease_ttl or SYSTEM_TTL,
                    "options": dict(entry.options) or None,
                }
            )
        if request.operation not in ("create", "update"):
            raise unsupported_operation()
        if entry is None:
            raise VaultError(400, f"cannot fetch sysview for path {path!r}".replace("'", '"'))
        data = request.data
        changes: dict[str, Any] = {}
        for name in ("default_lease_ttl", "max_lease_ttl"):
            if name in data:
                changes[name] = parse_duration(data[name], name)
        if "description" in data:
            if not isinstance(data["description"], str):
                raise VaultError(400, "invalid value for 'description': expected a string")
            changes["description"] = data["description"]
        if "options" in data and data["options"] is not None:
            options = data["options"]
            if not isinstance(options, Mapping):
                raise VaultError(400, "invalid value for 'options': expected a map of strings")
            merged = {**entry.options, **{str(k): str(v) for k, v in options.items()}}
            if entry.type == "kv" and merged.get("version") != "2":
                raise VaultError(400, "only KV version 2 is supported: the version cannot be changed")
            changes["options"] = merged
        if changes:
            await table.tune(path, changes)
        return LogicalResponse()

    async def _ui_mount(self, path: str, request: LogicalRequest) -> LogicalResponse:
        if request.operation != "read":
            raise unsupported_operation()
        if not path.strip("/"):
            raise VaultError(404, "unsupported path")
        wanted = path.strip("/") + "/"
        denied = VaultError(
            403,
            f"preflight capability check returned 403, please ensure client's policies grant access to path "
            f'"{wanted}"',
        )
        found = self.core.mounts.match(wanted)
        if found is None:
            raise denied  # as Vault: not 404, so this path cannot be used to list the mounts
        entry, _ = found
        acl = await self.core.acl_for(request.token)
        policies = await self.core.policies_of(request.token)
        if not has_mount_access(acl, policies, entry.path):
            raise denied
        info = entry.info()
        info["path"] = entry.path
        return LogicalResponse(data=info)

    async def _list_policies(self, legacy: bool) -> LogicalResponse:
        names = await self.core.policies.list()  # Vault's order: sorted, "root" last
        if legacy:
            return LogicalResponse(data={"keys": names, "policies": names})
        return LogicalResponse(data={"keys": names})

    async def _policy(self, name: str, request: LogicalRequest, legacy: bool) -> LogicalResponse:
        from plugins.vault_like.acl import PolicyError

        given, name = name, name.strip().lower()  # Vault keeps policy names in lower case
        if not name or "/" in name:
            raise VaultError(400, "policy name must be given and cannot contain '/'")
        policies = self.core.policies
        op = request.operation
        if name != given:
            # The ACL judged the path as sent (sys/policy/ADMIN); the write lands on "admin". Judge
            # that path too, or a `deny` on sys/policy/admin would not hold (as OpenBao: 403).
            acl = await self.core.acl_for(request.token)
            prefix = "sys/policy/" if legacy else "sys/policies/acl/"
            if not acl.allowed(prefix + name, op):
                raise permission_denied()
        field_name = "rules" if legacy else "policy"
        if op == "read":
            policy = await policies.get(name)
            if policy is None:
                raise VaultError(404)
            return LogicalResponse(data={"name": name, field_name: policy.raw})
        if op in ("create", "update"):
            text = request.data.get("policy")
            if text is None and legacy:
                text = request.data.get("rules")
            if not isinstance(text, str) or not text.strip():
                raise VaultError(400, "'policy' parameter not supplied or empty")
            try:
                await policies.put(name, text)
            except PolicyError as exc:
                raise VaultError(400, f"failed to parse policy: {exc}") from None
            return LogicalResponse()
        if op == "delete":
            await policies.delete(name)
            return LogicalResponse()
        raise unsupported_operation()

    async def _capabilities_self(self, request: LogicalRequest) -> LogicalResponse:
        data = request.data
        paths = data.get("paths")
        if paths is None and "path" in data:
            paths = data["path"]
        if isinstance(paths, str):
            paths = [p for p in paths.split(",") if p]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise VaultError(400, "paths must be supplied")
        acl = await self.core.acl_for(request.token)
        result: dict[str, Any] = {}
        for each in paths:
            result[each] = sorted(acl.capabilities(each.lstrip("/")))
        if len(paths) == 1:
            result["capabilities"] = result[paths[0]]
        return LogicalResponse(data=result)

    def _audit_hash(self, name: str, request: LogicalRequest) -> LogicalResponse:
        from plugins.vault_like.audit import DEVICE

        audit = self.core.audit
        device = name.strip("/")
        if audit is None or device != DEVICE:
            raise VaultError(400, f'unknown audit backend "{device}/"')
        value = request.data.get("input")
        if not isinstance(value, str):
            raise VaultError(400, "the input parameter is required")
        return LogicalResponse(data={"hash": audit.hash(value)})


def has_mount_access(acl: Any, policies: Sequence[Any], mount_path: str) -> bool:
    """Vault's hasMountAccess: the token may do something (not only deny) somewhere in the mount.

    ``policies`` are the token's :class:`~.acl.Policy` objects: the rules under the mount are walked
    as Vault walks its rule trees.
    """
    caps = set(acl.capabilities(mount_path))
    if caps and "deny" not in caps:
        return True
    useful = {"create", "read", "update", "patch", "delete", "list", "sudo"}
    for policy in policies:
        for rule in getattr(policy, "rules", ()):
            rule_caps = set(rule.capabilities)
            if "deny" in rule_caps or not rule_caps & useful:
                continue
            if _pattern_reaches(str(rule.path), mount_path):
                return True
    return False


def _pattern_reaches(pattern: str, mount_path: str) -> bool:
    """Whether an ACL path pattern ("a/+/b", "a/b*") matches some path under ``mount_path``."""
    glob = pattern.endswith("*")
    body = pattern[:-1] if glob else pattern
    pattern_segments = body.split("/")
    mount_segments = mount_path.rstrip("/").split("/")
    for i, segment in enumerate(mount_segments):
        if i >= len(pattern_segments):
            return False  # an exact pattern that ends above the mount
        wanted = pattern_segments[i]
        if glob and i == len(pattern_segments) - 1:
            return segment.startswith(wanted)  # the glob covers the rest
        if wanted != "+" and wanted != segment:
            return False
    # The pattern agrees on every segment of the mount path; it must also reach inside it.
    return glob or len(pattern_segments) > len(mount_segments)


def _json(body: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":")).encode()
