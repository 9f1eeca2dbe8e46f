"""The KV version 2 secrets engine, with Vault's (OpenBao 2.7's) paths, status codes and bodies.

Paths are relative to the mount: ``config``, ``data/P``, ``delete/P``, ``undelete/P``,
``destroy/P``, ``metadata/P`` (and ``metadata/FOLDER/`` for LIST) and ``subkeys/P``.

Layout inside the mount's :class:`JsonStore` (which encrypts everything, names included):

- ``config``: the engine settings;
- ``meta/<key>``: one document per key: its settings and every live version's metadata
  (created and deletion time in nanoseconds, destroyed flag, and the id of its data document);
- ``ver/<key>/<id>``: one document per version, ``{"data": ...}``, written unlisted (the store keeps
  it out of its directory index: it is only ever found through the metadata, and a new version then
  costs no index write).

So a read is two store reads (metadata, then the version), and ``metadata/`` LIST is one
directory listing of ``meta/``. Version documents have random ids, never version numbers: a
writer stores the data first and then claims the next number with a compare-and-set update of the
metadata, so two replicas racing on one key can never overwrite each other's data (the loser
retries with the next number, or fails its check-and-set and removes its orphan).

Documents returned by the store are never mutated (the store may cache them): responses and
updated metadata are built from shallow copies.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from sidecar.logs import event

from .durations import INT64_MAX, INTEGER, duration_seconds, go_duration, go_quote
from .logical import LogicalRequest, LogicalResponse, Operation, VaultError

log = logging.getLogger(__name__)

Doc = dict[str, Any]

DEFAULT_MAX_VERSIONS: Final = 10  # Vault's default when neither the key nor the mount sets one
MAX_CUSTOM_METADATA_KEYS: Final = 64
MAX_CUSTOM_METADATA_KEY_BYTES: Final = 128
MAX_CUSTOM_METADATA_VALUE_BYTES: Final = 512
_UINT32_MAX: Final = 2**32 - 1  # max_versions is a uint32 in Vault
_DVA_DISABLED: Final = -1  # config delete_version_after < 0: the feature is off for every key
_PATCH_RETRIES: Final = 20

MERGE_PATCH: Final = "application/merge-patch+json"
_UNSUPPORTED = "1 error occurred:\n\t* unsupported operation\n\n"
_CLI_VERB: Final[dict[Operation, str]] = {
    "read": "get",
    "list": "list",
    "create": "put",
    "update": "put",
    "patch": "patch",
    "delete": "delete",
}


class JsonStoreLike(Protocol):
    """The part of ``barrier.JsonStore`` the engines use (a barrier-encrypted JSON document store)."""

    async def read(self, path: str) -> Doc | None: ...

    async def write(self, path: str, data: Doc) -> None: ...

    async def delete(self, path: str) -> None: ...

    async def update(self, path: str, fn: Callable[[Doc | None], Doc | None]) -> Doc | None: ...

    async def list(self, path: str = "") -> builtins.list[str]: ...


class _Unchanged(Exception):
    """Raised inside an update function: nothing to write (aborts the update without a write)."""


class _Stale(Exception):
    """Raised inside a PATCH's update: the version it was computed from is no longer current."""


# ---------------------------------------------------------------------------------------------
# Time and duration formats (Go's, since clients compare and parse them)


@functools.lru_cache(maxsize=4096)  # every read renders its version's times: the same few, again
def rfc3339(ns: int) -> str:
    """Nanoseconds since the epoch as Go's RFC3339Nano (trailing zeros trimmed); 0 is ""."""
    if not ns:
        return ""
    second, fraction = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    if fraction:
        return f"{base}.{f'{fraction:09d}'.rstrip('0')}Z"
    return f"{base}Z"


# ---------------------------------------------------------------------------------------------
# Field conversion, with the messages Vault's framework gives


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "json.Number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


def _field_error(name: str, detail: str, validation: bool = True) -> VaultError:
    prefix = "Field validation failed: " if validation else ""
    return VaultError(400, f"{prefix}error converting input for field {go_quote(name)}: {detail}")


def _as_map(name: str, value: Any, validation: bool) -> Doc | None:
    """A TypeMap field: an object (or null)."""
    if value is None or isinstance(value, dict):
        return value
    detail = f"'' expected type 'map[string]interface {{}}', got unconvertible type '{_go_type(value)}'"
    raise _field_error(name, detail, validation)


def _as_int(name: str, value: Any, validation: bool = True) -> int:
    """A TypeInt field: a JSON integer or a decimal string."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INTEGER.fullmatch(value):
        return int(value)
    raise _field_error(name, "'' cannot parse value as 'int': strconv.ParseInt: invalid syntax", validation)


def _as_uint32(name: str, value: Any, validation: bool = True) -> int:
    number = _as_int(name, value, validation)
    if not 0 <= number <= _UINT32_MAX:
        # Vault stores the value as uint32 and silently wraps (-1 becomes 4294967295); refuse instead.
        raise _field_error(name, f"value {number} out of range: must be 0 to {_UINT32_MAX}", validation)
    return number


_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _as_bool(name: str, value: Any, validation: bool = True) -> bool:
    """A TypeBool field: a JSON boolean, a number, or Go's ParseBool strings."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    raise _field_error(name, "'' cannot parse value as 'bool': strconv.ParseBool: invalid syntax", validation)


def _as_duration(name: str, value: Any, signed: bool, validation: bool = True) -> int:
    """A TypeDurationSecond field in whole seconds: an integer, "90", "1h30m", "1d"."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise _field_error(name, "could not parse duration from input", validation)
    if isinstance(value, int):
        seconds = value
    else:
        text = value if isinstance(value, str) else repr(value)
        if not isinstance(value, str | float):
            raise _field_error(name, "could not parse duration from input", validation)
        try:
            seconds = duration_seconds(text)
        except ValueError as e:
            raise _field_error(name, str(e), validation) from None
    if abs(seconds) * 1_000_000_000 > INT64_MAX:
        detail = "multiplication of durations resulted in overflow, one operand may be too large"
        raise _field_error(name, detail, validation)
    if seconds < 0 and not signed:
        raise _field_error(name, f"cannot provide negative value '{seconds}'", validation=False)
    return seconds


def _as_versions(value: Any) -> list[int]:
    """A TypeCommaIntSlice field: ``[1, 2]``, ``"1,2"`` or ``3``."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    out: list[int] = []
    for index, item in enumerate(items):
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        elif isinstance(item, str) and INTEGER.fullmatch(item):
            out.append(int(item))
        else:
            detail = (
                "decoding failed due to the following error(s):\n\n"
                f"'[{index}]' cannot parse value as 'int': strconv.ParseInt: invalid syntax"
            )
            raise _field_error("versions", detail)
    return out


def _multierror(errors: list[str]) -> str:
    """go-multierror's text, which Vault shows verbatim."""
    head = "1 error occurred:" if len(errors) == 1 else f"{len(errors)} errors occurred:"
    return head + "\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


_CM_PREFIX = "custom_metadata validation failed"


def _too_many_custom_keys(count: int) -> VaultError:
    detail = f"payload must contain at most {MAX_CUSTOM_METADATA_KEYS} keys, provided {count}"
    return VaultError(400, _multierror([f"{_CM_PREFIX}: {detail}"]))


def _custom_metadata(value: Any, drop_nulls: bool) -> dict[str, str] | None:
    """Parse and validate ``custom_metadata`` (string values, Vault's limits and messages)."""
    raw = _as_map("custom_metadata", value, validation=False)
    if raw is None:
        return None
    out: dict[str, str] = {}
    for key, item in raw.items():
        if item is None:
            if drop_nulls:
                continue
            out[key] = ""
        elif isinstance(item, bool):
            out[key] = "1" if item else "0"
        elif isinstance(item, str):
            out[key] = item
        elif isinstance(item, int | float):
            out[key] = repr(item)
        else:
            detail = f"'' expected type 'string', got unconvertible type '{_go_type(item)}'"
            raise VaultError(400, f"{_CM_PREFIX}: {detail}")
    if len(out) > MAX_CUSTOM_METADATA_KEYS:
        raise _too_many_custom_keys(len(out))
    errors: list[str] = []
    for key, item in out.items():
        key_len, value_len = len(key.encode()), len(item.encode())
        if not 0 < key_len <= MAX_CUSTOM_METADATA_KEY_BYTES:
            errors.append(
                f"{_CM_PREFIX}: length of key {go_quote(key)} is {key_len} "
                f"but must be 0 < len(key) <= {MAX_CUSTOM_METADATA_KEY_BYTES}"
            )
        if not 0 < value_len <= MAX_CUSTOM_METADATA_VALUE_BYTES:
            errors.append(
                f"{_CM_PREFIX}: length of value for key {go_quote(key)} is {value_len} "
                f"but must be 0 < len(value) <= {MAX_CUSTOM_METADATA_VALUE_BYTES}"
            )
        if not key.isprintable():
            errors.append(f"{_CM_PREFIX}: key {go_quote(key)} ({key}) contains unprintable characters")
        if not item.isprintable():
            errors.append(f"{_CM_PREFIX}: value for key {go_quote(key)} contains unprintable characters")
    if errors:
        raise VaultError(400, _multierror(errors))
    return out


# ---------------------------------------------------------------------------------------------
# JSON merge patch (RFC 7386) and the subkeys walk


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` removes a member, anything else replaces.

    Never mutates ``target`` (it may be a cached store document).
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def subkeys(data: Doc, max_depth: int, depth: int = 1) -> Doc:
    """The structure of ``data`` with every leaf (non-object or empty object) replaced by null.

    ``max_depth`` 0 is unlimited; objects at ``max_depth`` become null. Builds a new structure:
    values never leak, whatever the depth.
    """
    out: Doc = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and (max_depth == 0 or depth + 1 <= max_depth):
            out[key] = subkeys(value, max_depth, depth + 1)
        else:
            out[key] = None
    return out


# ---------------------------------------------------------------------------------------------
# Metadata documents


def _deletion_ns(created_ns: int, mount_dva: int, key_dva: int) -> int:
    """Vault's rule: the smaller non-zero of the mount's and the key's delete_version_after."""
    if mount_dva == 0 and key_dva == 0:
        return 0
    chosen = key_dva
    if (mount_dva != 0 and mount_dva < chosen) or chosen == 0:
        chosen = mount_dva
    return created_ns + chosen * 1_000_000_000


def _new_meta(now: int) -> Doc:
    return {
        "created": now,
        "updated": now,
        "current": 0,
        "oldest": 0,
        "max_versions": 0,
        "cas_required": False,
        "dva": 0,
        "custom": None,
        "mcas_required": False,
        "mversion": 0,
        "versions": {},
    }


def _copy_meta(meta: Doc) -> Doc:
    """A copy deep enough to change versions in place (the old document stays untouched)."""
    copy = dict(meta)
    copy["versions"] = {n: dict(vm) for n, vm in meta["versions"].items()}
    return copy


def _is_deleted(vm: Doc, now: int) -> bool:
    return bool(vm["d"]) and vm["d"] < now


def _version_metadata(number: int, vm: Doc, custom: dict[str, str] | None) -> Doc:
    return {
        "created_time": rfc3339(vm["c"]),
        "custom_metadata": custom,
        "deletion_time": rfc3339(vm["d"]),
        "destroyed": vm["x"],
        "version": number,
    }


def _check_cas(present: bool, cas: int, config: Doc, meta: Doc | None) -> None:
    current = meta["current"] if meta else 0
    if present:
        if cas != current:
            raise VaultError(400, "check-and-set parameter did not match the current version")
    elif config["cas_required"] or (meta is not None and meta["cas_required"]):
        raise VaultError(400, "check-and-set parameter required for this call")


def _check_metadata_cas(present: bool, cas: int, config: Doc, meta: Doc | None) -> None:
    current = meta["mversion"] if meta else 0
    if present:
        if cas != current:
            raise VaultError(400, "metadata check-and-set parameter does not match the current version")
    elif config["mcas_required"] or (meta is not None and meta["mcas_required"]):
        raise VaultError(400, "metadata check-and-set parameter required for this call")


def _check_merge_patch(request: LogicalRequest) -> None:
    media_type = request.content_type.split(";", 1)[0].strip().lower()
    if media_type != MERGE_PATCH:
        raise VaultError(
            415, f"PATCH requires Content-Type of {MERGE_PATCH}, provided {request.content_type}"
        )


_DEFAULT_CONFIG: Final[Doc] = {"max_versions": 0, "cas_required": False, "dva": 0, "mcas_required": False}


class KvV2:
    """One KV v2 mount. ``store`` is the mount's barrier view; ``mount_path`` like ``"secret/"``."""

    type = "kv"

    def __init__(self, store: JsonStoreLike, mount_path: str) -> None:
        self.store = store
        self.mount_path = mount_path
        # This engine never mutates a document it read (see the module docstring), so it may read
        # the store's shared decoded copies (barrier.JsonStore.read_shared) where the store has them.
        self._read: Callable[[str], Awaitable[Doc | None]] = getattr(store, "read_shared", store.read)
        # Version documents are found by their id in the metadata, never listed: the real store can
        # keep them out of its directory index, which saves a write per new version.
        self._write_version: Callable[[str, Doc], Awaitable[None]] = store.write
        if hasattr(store, "read_shared"):
            self._write_version = functools.partial(getattr(store, "write"), indexed=False)  # noqa: B009

    # -- Backend protocol ---------------------------------------------------------------------

    async def existence(self, request: LogicalRequest) -> bool | None:
        """``data/P`` and ``metadata/P`` exist iff the key's metadata does (Vault's check)."""
        path = request.path
        for prefix in ("data/", "metadata/"):
            if path.startswith(prefix):
                key = path[len(prefix) :]
                if not key or key.endswith("/"):
                    return False
                return await self._read(_meta_path(key)) is not None
        return None

    async def handle(self, request: LogicalRequest) -> LogicalResponse:
        path, op = request.path, request.operation
        if op in ("create", "update") and path.endswith("/"):
            raise VaultError(400, "cannot write to a path ending in '/'")
        section, slash, key = path.partition("/")
        if path == "config":
            return await self._config_op(request)
        if path == "metadata" and op == "list":
            key = ""
        elif not slash:
            return self._invalid_path(op)
        if key and not key.endswith("/"):
            _check_key(key)
        if section == "data":
            return await self._data_op(key, request)
        if section == "metadata":
            return await self._metadata_op(key, request)
        if section in ("delete", "undelete", "destroy"):
            if op not in ("create", "update"):
                raise VaultError(405, _UNSUPPORTED)
            return await self._versions_op(section, key, request)
        if section == "subkeys":
            if op != "read":
                raise VaultError(405, _UNSUPPORTED)
            return await self._subkeys(key, request)
        return self._invalid_path(op)

    @staticmethod
    def _invalid_path(op: Operation) -> LogicalResponse:
        warning = (
            "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API "
            f"endpoints to use. If using the OpenBao CLI, use 'bao kv {_CLI_VERB[op]}' for this operation."
        )
        return LogicalResponse(status=404, warnings=[warning])

    # -- config -------------------------------------------------------------------------------

    async def _config(self) -> Doc:
        return await self._read("config") or _DEFAULT_CONFIG

    async def _config_op(self, request: LogicalRequest) -> LogicalResponse:
        if request.operation == "read":
            config = await self._config()
            return LogicalResponse(
                data={
                    "cas_required": config["cas_required"],
                    "delete_version_after": go_duration(config["dva"]),
                    "max_versions": config["max_versions"],
                    "metadata_cas_required": config["mcas_required"],
                }
            )
        if request.operation not in ("create", "update"):
            raise VaultError(405, _UNSUPPORTED)
        body = request.data
        changes: Doc = {}
        if "max_versions" in body:
            changes["max_versions"] = _as_uint32("max_versions", body["max_versions"])
        if "cas_required" in body:
            changes["cas_required"] = _as_bool("cas_required", body["cas_required"])
        if "metadata_cas_required" in body:
            changes["mcas_required"] = _as_bool("metadata_cas_required", body["metadata_cas_required"])
        if "delete_version_after" in body:
            dva = _as_duration("delete_version_after", body["delete_version_after"], signed=True)
            changes["dva"] = _DVA_DISABLED if dva < 0 else dva
        if changes:
            await self.store.update("config", lambda old: {**(old or _DEFAULT_CONFIG), **changes})
            event(log, logging.INFO, "vault_kv_config", mount=self.mount_path, fields=sorted(changes))
        return LogicalResponse()

    # -- data/ --------------------------------------------------------------------------------

    async def _data_op(self, key: str, request: LogicalRequest) -> LogicalResponse:
        op = request.operation
        if op == "read":
            return await self._data_read(key, request)
        if op in ("create", "update"):
            return await self._data_write(key, request)
        if op == "patch":
            return await self._data_patch(key, request)
        if op == "delete":
            return await self._data_delete(key)
        raise VaultError(405, _UNSUPPORTED)

    async def _live_version(self, key: str, meta: Doc, wanted: int, gone: Doc) -> tuple[Doc, Doc]:
        """Version ``wanted`` (0: the current one) of ``key`` and its metadata, read for an answer.

        Missing: 404. Deleted or destroyed: Vault answers 404 *with* the version's metadata, plus
        ``gone`` (hvac raise_on_deleted_version=False reads it).
        """
        number = wanted if wanted > 0 else meta["current"]
        vm = meta["versions"].get(str(number))
        if vm is None:
            raise VaultError(404)
        metadata = _version_metadata(number, vm, meta["custom"])
        if vm["x"] or _is_deleted(vm, time.time_ns()):
            raise VaultError(404, data={**gone, "metadata": metadata})
        version = await self._read(_version_path(key, vm["id"]))
        if version is None:
            raise VaultError(500, "could not find version data")
        return version, metadata

    async def _data_read(self, key: str, request: LogicalRequest) -> LogicalResponse:
        meta = await self._read(_meta_path(key)) if _is_key(key) else None
        if meta is None:
            raise VaultError(404)
        wanted = _as_int("version", _param(request, "version"))
        version, metadata = await self._live_version(key, meta, wanted, {"data": None})
        return LogicalResponse(data={"data": version["data"], "metadata": metadata})

    async def _data_write(self, key: str, request: LogicalRequest) -> LogicalResponse:
        body = request.data
        if "data" not in body:
            raise VaultError(400, "no data provided")
        data = _as_map("data", body["data"], validation=False)
        cas_present, cas = _cas_option(body, validation=False)
        config = await self._config()
        # Fail a check-and-set early, before storing anything; the update below re-checks atomically.
        _check_cas(cas_present, cas, config, await self._read(_meta_path(key)))

        def check(meta: Doc | None) -> None:
            _check_cas(cas_present, cas, config, meta)

        return await self._add_version(key, data, config, check)

    async def _data_patch(self, key: str, request: LogicalRequest) -> LogicalResponse:
        _check_merge_patch(request)
        body = request.data
        if "data" not in body:
            raise VaultError(400, "no data provided")
        patch = _as_map("data", body["data"], validation=True)
        cas_present, cas = _cas_option(body, validation=True)
        for _attempt in range(_PATCH_RETRIES):
            meta = await self._read(_meta_path(key)) if _is_key(key) else None
            if meta is None:
                raise VaultError(404)
            config = await self._config()
            _check_cas(cas_present, cas, config, meta)
            number = meta["current"]
            vm = meta["versions"].get(str(number))
            if vm is None:
                raise VaultError(404)
            if vm["x"] or _is_deleted(vm, time.time_ns()):
                # PATCH's 404 body is the flat version metadata (not {"data","metadata"}), as in Vault.
                raise VaultError(404, data=_version_metadata(number, vm, meta["custom"]))
            version = await self._read(_version_path(key, vm["id"]))
            if version is None:
                raise VaultError(500, "could not find version data")
            if version["data"] is None:
                raise VaultError(404)  # OpenBao answers 500 "resource does not exist" here
            try:
                patched = merge_patch(version["data"], patch)
            except RecursionError:
                raise VaultError(400, "data is nested too deeply") from None

            def check(current: Doc | None, based_on: int = number, config: Doc = config) -> None:
                if current is None or current["current"] != based_on:
                    raise _Stale  # someone wrote in between: patch the new current version instead
                _check_cas(cas_present, cas, config, current)

            try:
                return await self._add_version(key, patched, config, check)
            except _Stale:
                continue
        raise VaultError(409, "the secret kept changing during the patch; retry")

    async def _add_version(
        self, key: str, data: Doc | None, config: Doc, check: Callable[[Doc | None], None]
    ) -> LogicalResponse:
        """Store ``data`` as a new version document, then claim the next number in the metadata."""
        version_id = secrets.token_hex(8)
        await self._write_version(_version_path(key, version_id), {"data": data})
        pruned: list[str] = []
        added: Doc = {}

        def add(old: Doc | None) -> Doc:
            check(old)
            pruned.clear()
            now = time.time_ns()
            meta = _copy_meta(old) if old is not None else _new_meta(now)
            deletion = 0
            if config["dva"] != _DVA_DISABLED:
                deletion = _deletion_ns(now, config["dva"], meta["dva"])
            meta["current"] += 1
            number = meta["current"]
            vm = {"c": now, "d": deletion, "x": False, "id": version_id}
            meta["versions"][str(number)] = vm
            meta["updated"] = now
            keep = max(meta["max_versions"], config["max_versions"]) or DEFAULT_MAX_VERSIONS
            if number - meta["oldest"] >= keep:
                last_dropped = number - keep
                for old_number in range(meta["oldest"], last_dropped + 1):
                    dropped = meta["versions"].pop(str(old_number), None)
                    if dropped is not None and dropped.get("id"):
                        pruned.append(dropped["id"])
                meta["oldest"] = last_dropped + 1
            added.update(number=number, vm=vm, custom=meta["custom"])
            return meta

        try:
            await self.store.update(_meta_path(key), add)
        except (VaultError, _Stale):
            # The update function refused (check-and-set, or a stale patch), so nothing references
            # the new document. After any other failure the write may have landed: keep it.
            await self._forget_versions(key, [version_id])
            raise
        warnings = await self._forget_versions(key, pruned)
        return LogicalResponse(
            data=_version_metadata(added["number"], added["vm"], added["custom"]), warnings=warnings
        )

    async def _forget_versions(self, key: str, version_ids: list[str]) -> list[str] | None:
        """Remove version documents no metadata references any more (best effort, like Vault)."""
        for version_id in version_ids:
            try:
                await self.store.delete(_version_path(key, version_id))
            except Exception as e:  # cleanup must not fail a write that already succeeded
                event(
                    log,
                    logging.WARNING,
                    "vault_kv_cleanup_failed",
                    mount=self.mount_path,
                    error=type(e).__name__,
                )
                return [
                    "error occurred when cleaning up old versions, these will be cleaned up on next write"
                ]
        return None

    async def _data_delete(self, key: str) -> LogicalResponse:
        def soft_delete(old: Doc | None) -> Doc:
            now = time.time_ns()
            if old is None:
                raise _Unchanged
            vm = old["versions"].get(str(old["current"]))
            if vm is None or vm["x"] or _is_deleted(vm, now):
                raise _Unchanged
            meta = _copy_meta(old)
            meta["versions"][str(old["current"])]["d"] = now
            return meta

        await self._update_meta(key, soft_delete)
        return LogicalResponse()

    async def _update_meta(self, key: str, fn: Callable[[Doc | None], Doc | None]) -> None:
        if not key or key.endswith("/"):
            return
        # A cheap read first: most no-op requests (missing key) never reach the update's write path.
        if await self._read(_meta_path(key)) is None:
            return
        with contextlib.suppress(_Unchanged):
            await self.store.update(_meta_path(key), fn)

    # -- delete/, undelete/, destroy/ ---------------------------------------------------------

    async def _versions_op(self, section: str, key: str, request: LogicalRequest) -> LogicalResponse:
        versions = _as_versions(request.data.get("versions"))
        if not versions:
            raise VaultError(
                400, "no version number provided" if section == "destroy" else "No version number provided"
            )
        wanted = [str(n) for n in dict.fromkeys(versions)]
        if section == "destroy":
            destroyed: list[str] = []

            def destroy(old: Doc | None) -> Doc:
                if old is None:
                    raise _Unchanged
                destroyed.clear()
                meta = _copy_meta(old)
                for number in wanted:
                    vm = meta["versions"].get(number)
                    if vm is None or vm["x"]:
                        continue
                    vm["x"] = True
                    version_id = vm.pop("id", None)
                    if version_id:
                        destroyed.append(version_id)
                if not destroyed:
                    raise _Unchanged
                return meta

            await self._update_meta(key, destroy)
            await self._forget_versions(key, destroyed)
            return LogicalResponse()
        config = await self._config() if section == "undelete" else _DEFAULT_CONFIG

        def mark(old: Doc | None) -> Doc:
            if old is None:
                raise _Unchanged
            now = time.time_ns()
            meta = _copy_meta(old)
            changed = False
            for number in wanted:
                vm = meta["versions"].get(number)
                if vm is None or vm["x"]:
                    continue
                if section == "delete":
                    if _is_deleted(vm, now):
                        continue
                    vm["d"] = now
                else:
                    deletion = 0
                    if config["dva"] != _DVA_DISABLED:
                        deletion = _deletion_ns(now, config["dva"], meta["dva"])
                    vm["d"] = deletion
                changed = True
            if not changed:
                raise _Unchanged
            return meta

        await self._update_meta(key, mark)
        return LogicalResponse()

    # -- metadata/ ----------------------------------------------------------------------------

    async def _metadata_op(self, key: str, request: LogicalRequest) -> LogicalResponse:
        op = request.operation
        if op == "list":
            return await self._metadata_list(key, request)
        if op == "read":
            return await self._metadata_read(key)
        if op in ("create", "update"):
            return await self._metadata_write(key, request)
        if op == "patch":
            return await self._metadata_patch(key, request)
        if op == "delete":
            return await self._metadata_delete(key)
        raise VaultError(405, _UNSUPPORTED)

    async def _metadata_list(self, folder: str, request: LogicalRequest) -> LogicalResponse:
        if folder and not folder.endswith("/"):
            folder += "/"
        if folder:
            _check_key(folder[:-1])
        keys = await self.store.list("meta/" + folder)
        after = _param(request, "after")
        if after:
            after = str(after)
            keys = [k for k in keys if k > after]
        limit = _as_int("limit", _param(request, "limit"))
        if limit > 0:
            keys = keys[:limit]
        if not keys:
            raise VaultError(404)
        return LogicalResponse(data={"keys": keys})

    async def _metadata_read(self, key: str) -> LogicalResponse:
        meta = await self._read(_meta_path(key)) if key and not key.endswith("/") else None
        if meta is None:
            raise VaultError(404)
        versions = {
            n: {"created_time": rfc3339(vm["c"]), "deletion_time": rfc3339(vm["d"]), "destroyed": vm["x"]}
            for n, vm in meta["versions"].items()
        }
        return LogicalResponse(
            data={
                "cas_required": meta["cas_required"],
                "created_time": rfc3339(meta["created"]),
                "current_metadata_version": meta["mversion"],
                "current_version": meta["current"],
                "custom_metadata": meta["custom"],
                "delete_version_after": go_duration(meta["dva"]),
                "max_versions": meta["max_versions"],
                "metadata_cas_required": meta["mcas_required"],
                "oldest_version": meta["oldest"],
                "updated_time": rfc3339(meta["updated"]),
                "versions": versions,
            }
        )

    @staticmethod
    def _metadata_fields(body: Doc, patch: bool) -> Doc:
        """The settable key settings in ``body``, converted (stored names)."""
        fields: Doc = {}
        if "max_versions" in body:
            fields["max_versions"] = _as_uint32("max_versions", body["max_versions"], validation=False)
        if "cas_required" in body:
            fields["cas_required"] = _as_bool("cas_required", body["cas_required"], validation=False)
        if "delete_version_after" in body:
            fields["dva"] = _as_duration(
                "delete_version_after", body["delete_version_after"], signed=False, validation=False
            )
        if "metadata_cas_required" in body:
            value = body["metadata_cas_required"]
            fields["mcas_required"] = _as_bool("metadata_cas_required", value, validation=False)
        if "custom_metadata" in body:
            fields["custom"] = _custom_metadata(body["custom_metadata"], drop_nulls=patch)
        return fields

    @staticmethod
    def _ignored_warnings(fields: Doc, config: Doc) -> list[str] | None:
        warnings = []
        for name, stored in (("cas_required", "cas_required"), ("metadata_cas_required", "mcas_required")):
            if stored in fields and config[stored] and not fields[stored]:
                warnings.append(
                    f'"{name}" set to false, but is mandated by backend config. This value will be ignored.'
                )
        return warnings or None

    async def _metadata_write(self, key: str, request: LogicalRequest) -> LogicalResponse:
        body = request.data
        fields = self._metadata_fields(body, patch=False)
        if not fields:
            return LogicalResponse()
        mcas_present = "metadata_cas" in body
        mcas = _as_int("metadata_cas", body.get("metadata_cas"), validation=False)
        config = await self._config()

        def write(old: Doc | None) -> Doc:
            _check_metadata_cas(mcas_present, mcas, config, old)
            now = time.time_ns()
            meta = _copy_meta(old) if old is not None else _new_meta(now)
            meta.update(fields)
            meta["mversion"] += 1
            meta["updated"] = now
            return meta

        await self.store.update(_meta_path(key), write)
        return LogicalResponse(warnings=self._ignored_warnings(fields, config))

    async def _metadata_patch(self, key: str, request: LogicalRequest) -> LogicalResponse:
        _check_merge_patch(request)
        body = request.data
        fields = self._metadata_fields(body, patch=True)
        custom_patch = body.get("custom_metadata")
        mcas_present = "metadata_cas" in body
        mcas = _as_int("metadata_cas", body.get("metadata_cas"), validation=False)
        config = await self._config()
        if not key or await self._read(_meta_path(key)) is None:
            raise VaultError(404)

        def patch(old: Doc | None) -> Doc:
            if old is None:
                raise VaultError(404)
            _check_metadata_cas(mcas_present, mcas, config, old)
            if not fields:
                raise _Unchanged
            meta = _copy_meta(old)
            meta.update(fields)
            if "custom" in fields and custom_patch is not None:
                # Merge-patch semantics: members set to null are removed, the others replaced.
                merged = dict(old["custom"] or {})
                for name, value in custom_patch.items():
                    if value is None:
                        merged.pop(name, None)
                    else:
                        merged[name] = fields["custom"][name]
                if len(merged) > MAX_CUSTOM_METADATA_KEYS:
                    raise _too_many_custom_keys(len(merged))
                meta["custom"] = merged
            meta["mversion"] += 1
            meta["updated"] = time.time_ns()
            return meta

        with contextlib.suppress(_Unchanged):
            await self.store.update(_meta_path(key), patch)
        return LogicalResponse(warnings=self._ignored_warnings(fields, config))

    async def _metadata_delete(self, key: str) -> LogicalResponse:
        if not key or key.endswith("/"):
            return LogicalResponse()
        removed: list[str] = []

        def remove(old: Doc | None) -> None:
            if old is None:
                raise _Unchanged
            removed[:] = [vm["id"] for vm in old["versions"].values() if vm.get("id")]
            return None

        try:
            await self.store.update(_meta_path(key), remove)
        except _Unchanged:
            return LogicalResponse()
        await self._forget_versions(key, removed)
        event(log, logging.INFO, "vault_kv_key_deleted", mount=self.mount_path, versions=len(removed))
        return LogicalResponse()

    # -- subkeys/ -----------------------------------------------------------------------------

    async def _subkeys(self, key: str, request: LogicalRequest) -> LogicalResponse:
        depth = _as_int("depth", _param(request, "depth"))
        wanted = _as_int("version", _param(request, "version"))
        meta = await self._read(_meta_path(key)) if _is_key(key) else None
        if meta is None:
            raise VaultError(404)
        version, metadata = await self._live_version(key, meta, wanted, {"subkeys": None})
        try:
            tree = subkeys(version["data"] or {}, depth)
        except RecursionError:
            raise VaultError(400, "data is nested too deeply") from None
        return LogicalResponse(data={"metadata": metadata, "subkeys": tree})


async def purge_versions(store: JsonStoreLike, prefix: str = "") -> int:
    """Delete the version documents of every key under ``meta/PREFIX``: for a mount being removed.

    Version documents are kept out of directory listings (KvBackend.__init__), so deleting a mount's
    listed tree alone would leave every secret value in storage. Each key's metadata names its
    versions. Returns how many were deleted.
    """
    deleted = 0
    for child in await store.list("meta/" + prefix):
        if child.endswith("/"):
            deleted += await purge_versions(store, prefix + child)
            continue
        key = prefix + child
        meta = await store.read(_meta_path(key))
        for version in (meta or {}).get("versions", {}).values():
            if isinstance(version, dict) and version.get("id"):
                await store.delete(_version_path(key, version["id"]))
                deleted += 1
    return deleted


def _meta_path(key: str) -> str:
    return "meta/" + key


def _version_path(key: str, version_id: str) -> str:
    return f"ver/{key}/{version_id}"


def _is_key(key: str) -> bool:
    """Whether ``key`` can name a secret: "dir/" is a folder, and reading one is a 404 (as OpenBao)."""
    return bool(key) and not key.endswith("/")


def _check_key(key: str) -> None:
    """Refuse non-canonical keys (Vault's HTTP mux redirects them before the engine sees them)."""
    if any(part in ("", ".", "..") for part in key.split("/")) or "\x00" in key:
        raise VaultError(400, "invalid key name: empty, '.' and '..' path segments are not allowed")


def _param(request: LogicalRequest, name: str) -> Any:
    if name in request.data:
        return request.data[name]
    return request.query.get(name)


def _cas_option(body: Doc, validation: bool) -> tuple[bool, int]:
    options = _as_map("options", body.get("options"), validation)
    if not options or "cas" not in options:
        return False, 0
    raw = options["cas"]
    if raw is None:
        return True, 0
    if isinstance(raw, bool):
        return True, int(raw)
    if isinstance(raw, int):
        return True, raw
    if isinstance(raw, float) and raw.is_integer():
        return True, int(raw)
    if isinstance(raw, str) and INTEGER.fullmatch(raw):
        return True, int(raw)
    raise VaultError(400, "error parsing check-and-set parameter")
