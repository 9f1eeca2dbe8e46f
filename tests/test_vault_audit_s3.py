"""vault_like's S3 audit sink: entries durable outside the enclave, group-committed, fail closed.

Against moto's real S3 server through boto3, as the enclave's sidecar would reach S3; the sink's
batching and cancellation rules against a scripted client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from plugins.vault_like import audit_sinks
from plugins.vault_like.audit import AuditError
from plugins.vault_like.audit_sinks import S3AuditSink, open_audit_sink
from tests.vault_http_support import Starter, vault_starter

CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
BUCKET = "vault-audit-test"
KEY = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{12}-[0-9]{10}\.jsonl")


@pytest.fixture(scope="module")
def aws(moto_url: str) -> Callable[..., Any]:
    def client(service: str, **kwargs: Any) -> Any:
        return boto3.client(service, endpoint_url=moto_url, **CREDS, **kwargs)

    client("s3").create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
async def start_vault(tmp_path: Path) -> AsyncIterator[Starter]:
    async with vault_starter(tmp_path) as start:
        yield start


def audit_objects(aws: Callable[..., Any], prefix: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each object under the prefix (in key order) with its entries."""
    s3 = aws("s3")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))
    found = []
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        assert body.endswith("\n")
        found.append((key, [json.loads(line) for line in body.splitlines()]))
    return found


async def test_entries_land_in_new_objects_under_the_prefix_with_no_secret(
    start_vault: Starter, aws: Callable[..., Any], tmp_path: Path
) -> None:
    # Threat: an enclave's filesystem is its memory; an audit trail kept there is gone at the first
    # restart. In S3 it outlives the enclave, and holds HMACs, never the secret or the token.
    prefix = "audit/entries"
    v = await start_vault(config={"audit_log": f"s3://{BUCKET}/{prefix}"}, aws=aws)
    token = await v.init()
    status, body, _ = await v.call("POST", "secret/data/db", {"data": {"password": "s3cr3t-value"}})
    assert status == 200
    write_id = body["request_id"]
    status, body, _ = await v.call("GET", "secret/data/db")
    assert status == 200 and body["data"]["data"] == {"password": "s3cr3t-value"}
    read_id = body["request_id"]

    found = audit_objects(aws, prefix + "/")
    assert found and all(KEY.fullmatch(key[len(prefix) + 1 :]) for key, _ in found)
    entries = [entry for _, batch in found for entry in batch]
    by_id = {(e["type"], e["request"]["id"]) for e in entries}
    for request_id in (write_id, read_id):
        assert {("request", request_id), ("response", request_id)} <= by_id
    raw = json.dumps(entries)
    assert "s3cr3t-value" not in raw and token not in raw
    assert not (tmp_path / "state" / "vault-audit.log").exists()  # nothing went to a local file
    # sys/audit-hash still answers for the one device, so an auditor can search the objects.
    status, body, _ = await v.call("POST", "sys/audit-hash/file", {"input": "s3cr3t-value"})
    assert status == 200 and body["data"]["hash"] in raw


async def test_concurrent_requests_share_puts_and_every_answer_was_audited_first(
    start_vault: Starter, aws: Callable[..., Any]
) -> None:
    prefix = "audit/concurrent"
    v = await start_vault(config={"audit_log": f"s3://{BUCKET}/{prefix}"}, aws=aws)
    await v.init()
    before = len(audit_objects(aws, prefix + "/"))
    replies = await asyncio.gather(
        *(v.call("POST", f"secret/data/k{i}", {"data": {"v": str(i)}}) for i in range(40))
    )
    assert all(status == 200 for status, _, _ in replies)
    found = audit_objects(aws, prefix + "/")[before:]
    entries = [entry for _, batch in found for entry in batch]
    # Every acknowledged write had both its entries in S3 before its answer was sent.
    ids = {(e["type"], e["request"]["id"]) for e in entries}
    for _, body, _ in replies:
        assert {("request", body["request_id"]), ("response", body["request_id"])} <= ids
    assert len(entries) == 80
    assert len(found) < 80  # group commit: far fewer objects (PutObjects) than entries
    # Keys sort in write order: the sequence numbers rise with no gap.
    sequences = [int(key.rsplit("-", 1)[1].split(".")[0]) for key, _ in audit_objects(aws, prefix + "/")]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))


async def test_a_failing_bucket_refuses_requests_before_they_run(
    start_vault: Starter, aws: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Fail closed: a request that cannot be audited must not happen, and the reason is logged
    # without the request's values.
    v = await start_vault(config={"audit_log": f"s3://{BUCKET}/audit/failing"}, aws=aws)
    await v.init()
    audit = v.service.audit
    assert audit is not None and isinstance(audit.sink, S3AuditSink)
    audit.sink.bucket = "no-such-audit-bucket"  # PutObject now fails with NoSuchBucket
    with caplog.at_level(logging.ERROR, logger="plugins.vault_like"):
        status, body, _ = await v.call("POST", "secret/data/unaudited", {"data": {"k": "hidden-value"}})
    assert (status, body) == (500, {"errors": ["audit log unavailable"]})
    failures = [r for r in caplog.records if r.getMessage() == "vault_audit_failed"]
    assert failures and failures[0].sidecar_fields["error"] == "NoSuchBucket"  # type: ignore[attr-defined]
    assert "hidden-value" not in caplog.text
    audit.sink.bucket = BUCKET
    assert (await v.call("GET", "secret/data/unaudited"))[0] == 404  # the write never ran


@pytest.mark.parametrize(
    ("audit_log", "use_aws", "reason"),
    [
        (
            "s3://no-such-audit-bucket/p",
            True,
            "cannot reach the audit bucket s3://no-such-audit-bucket/p/: 404",
        ),
        ("s3:///p", True, "audit log unavailable: audit_log s3://bucket/prefix needs a bucket"),
        (f"s3://{BUCKET}/p", False, "audit log unavailable: the AWS client factory is not configured"),
    ],
)
async def test_an_audit_bucket_that_cannot_be_used_keeps_the_store_sealed(
    start_vault: Starter, aws: Callable[..., Any], audit_log: str, use_aws: bool, reason: str
) -> None:
    v = await start_vault(config={"audit_log": audit_log}, aws=aws if use_aws else None)
    status, body, _ = await v.call("GET", "sys/health", token=None)
    assert status in (501, 503) and body["sealed"] is True
    _, ready = await v.ready()
    assert ready["plugins"]["vault_like"].startswith(reason)


async def test_s3_audit_is_not_warned_about_as_enclave_memory(
    start_vault: Starter, aws: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.attestation.nsm import NsmDevice

    device = NsmDevice(os.devnull)  # stands for /dev/nsm: only its type is looked at here
    try:
        with caplog.at_level(logging.WARNING, logger="plugins.vault_like"):
            await start_vault(config={"audit_log": f"s3://{BUCKET}/audit/enclave"}, nsm=device, aws=aws)
        found = [r for r in caplog.records if r.getMessage() == "vault_state_in_enclave_memory"]
        assert [getattr(r, "sidecar_fields", {}).get("what") for r in found] == [["storage"]]
    finally:
        device.close()


# ------------------------------------------------------------------ the sink against a scripted client


class ScriptedS3:
    """put_object blocks until released, so a test can decide what is in flight."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def head_bucket(self, **kwargs: Any) -> None:
        return None

    def put_object(self, **kwargs: Any) -> dict[str, str]:
        assert kwargs["IfNoneMatch"] == "*"  # a batch never replaces another
        self.entered.release()
        assert self.release.wait(10)
        self.bodies.append(kwargs["Body"])
        return {"ETag": '"x"'}


async def scripted_sink(client: ScriptedS3 | None = None) -> tuple[Any, S3AuditSink]:
    """An open sink on a scripted client (a new ScriptedS3 unless given)."""
    client = client or ScriptedS3()
    sink = S3AuditSink(client, "b", "p", logging.getLogger("test"))
    await sink.open()
    return client, sink


async def wait_entered(client: ScriptedS3) -> None:
    assert await asyncio.to_thread(client.entered.acquire, True, 10)


async def test_entries_arriving_during_a_put_go_together_in_the_next() -> None:
    client, sink = await scripted_sink()
    first = asyncio.ensure_future(sink.append(b"1\n"))
    await wait_entered(client)  # the first PutObject is in flight
    rest = [asyncio.ensure_future(sink.append(f"{i}\n".encode())) for i in range(2, 6)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in [first, *rest])  # none is acknowledged before its PUT
    client.release.set()
    await asyncio.gather(first, *rest)
    assert client.bodies == [b"1\n", b"2\n3\n4\n5\n"]
    await sink.close()


async def test_a_batch_is_capped_and_order_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_sinks, "MAX_BATCH_BYTES", 10)
    client = ScriptedS3()
    client.release.set()
    sink = S3AuditSink(client, "b", "", logging.getLogger("test"))
    await sink.open()
    await asyncio.gather(*(sink.append(f"line{i}\n".encode()) for i in range(5)))
    assert b"".join(client.bodies) == b"".join(f"line{i}\n".encode() for i in range(5))
    assert all(len(body) <= 12 for body in client.bodies)  # one 6-byte line fits; two do not


async def test_a_client_that_goes_away_does_not_cancel_the_batch_others_wait_on() -> None:
    client, sink = await scripted_sink()
    gone = asyncio.ensure_future(sink.append(b"gone\n"))
    await wait_entered(client)
    gone.cancel()  # the request's client disconnected while its entry was being written
    stays = asyncio.ensure_future(sink.append(b"stays\n"))
    client.release.set()
    await stays
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert client.bodies == [b"gone\n", b"stays\n"]
    await sink.close()
    with pytest.raises(AuditError, match="not open"):
        await sink.append(b"late\n")


def test_open_audit_sink_chooses_by_the_setting(tmp_path: Path) -> None:
    log = logging.getLogger("test")
    made: list[tuple[str, Any]] = []

    def aws(service: str, **kwargs: Any) -> object:
        made.append((service, kwargs.get("config")))
        return object()

    s3 = open_audit_sink("s3://bucket/some/prefix", tmp_path, aws, log)
    assert isinstance(s3, S3AuditSink) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    # Bounded waits: a request waiting on its audit entry fails in seconds when S3 does not answer.
    assert made == [("s3", audit_sinks.AUDIT_S3_CONFIG)] and not s3.in_enclave_memory
    assert audit_sinks.AUDIT_S3_CONFIG.read_timeout == 10 and audit_sinks.AUDIT_S3_CONFIG.connect_timeout == 3
    relative = open_audit_sink("audit.log", tmp_path, aws, log)
    assert relative.where == str(tmp_path / "audit.log") and relative.in_enclave_memory
    assert not open_audit_sink("/dev/stdout", tmp_path, aws, log).in_enclave_memory
    with pytest.raises(ValueError, match="needs a bucket"):
        open_audit_sink("s3:///prefix", tmp_path, aws, log)


def test_the_dev_world_makes_the_buckets_the_settings_name() -> None:
    from plugins.vault_like.devworld import s3_buckets

    assert s3_buckets({"audit_log": "s3://trail/x", "storage": "s3", "path": "s3://store/y"}) == [
        "store",
        "trail",
    ]
    assert s3_buckets({"audit_log": "vault-audit.log", "storage": "sqlite", "path": "s3://ignored/y"}) == []
    assert s3_buckets({"audit_log": "s3:///no-bucket", "storage": "s3", "path": "s3://same/a"}) == ["same"]
    assert s3_buckets({"audit_log": "s3://same/b", "storage": "s3", "path": "s3://same/a"}) == ["same"]


async def test_an_s3_that_never_answers_fails_in_seconds_not_minutes(
    start_vault: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Threat: requests piling up for minutes behind an audit write to an S3 that hangs (botocore's
    # defaults: 60 s reads, retried). The sink's client has short timeouts, so it fails closed fast.
    from botocore.config import Config

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(65536)
            await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(
        audit_sinks,
        "AUDIT_S3_CONFIG",
        Config(connect_timeout=1, read_timeout=0.5, retries={"max_attempts": 1}),
    )

    def hanging(service: str, **kwargs: Any) -> Any:
        return boto3.client(service, endpoint_url=f"http://127.0.0.1:{port}", **CREDS, **kwargs)

    try:
        started = time.monotonic()
        v = await start_vault(config={"audit_log": f"s3://{BUCKET}/p"}, aws=hanging)
        _, ready = await v.ready()
        assert time.monotonic() - started < 10
        assert ready["plugins"]["vault_like"] == (
            f"cannot reach the audit bucket s3://{BUCKET}/p/: ReadTimeoutError"
        )
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def test_an_unforeseen_put_failure_fails_the_waiters_instead_of_hanging_them() -> None:
    # Threat: a failure outside botocore's exceptions leaving requests waiting forever on entries
    # that were never written (a hang is a denial of service; an answer without its entry is worse).
    class Broken(ScriptedS3):
        def put_object(self, **kwargs: Any) -> dict[str, str]:
            raise RuntimeError("cannot schedule new futures after shutdown")

    sink = S3AuditSink(Broken(), "b", "p", logging.getLogger("test"))
    await sink.open()
    results = await asyncio.wait_for(
        asyncio.gather(*(sink.append(b"x\n") for _ in range(3)), return_exceptions=True), 5
    )
    assert all(isinstance(r, AuditError) and "RuntimeError" in str(r) for r in results)
    sink.client = ScriptedS3()  # the next batch starts a new flusher and succeeds
    sink.client.release.set()
    await asyncio.wait_for(sink.append(b"y\n"), 5)
    assert sink.client.bodies == [b"y\n"]


async def test_closing_during_a_put_fails_the_queued_entries_instead_of_hanging_them() -> None:
    client, sink = await scripted_sink()
    first = asyncio.ensure_future(sink.append(b"1\n"))
    await wait_entered(client)
    queued = asyncio.ensure_future(sink.append(b"2\n"))
    await asyncio.sleep(0)
    assert sink._flusher is not None
    sink._flusher.cancel()  # what the loop's shutdown does to the task
    results = await asyncio.wait_for(asyncio.gather(first, queued, return_exceptions=True), 5)
    assert all(isinstance(r, AuditError) for r in results)
    client.release.set()


async def test_a_batch_whose_key_exists_is_written_under_a_new_key_never_dropped() -> None:
    """Threat: a batch lost because its key exists already: botocore retried a PUT whose answer was
    lost (then the entries appear twice, which is harmless), or someone who can write the prefix
    guessed the next key to plant a forged batch (then ours must not be dropped in its favour)."""
    from botocore.exceptions import ClientError

    class Taken(ScriptedS3):
        def __init__(self, taken: int) -> None:
            super().__init__()
            self.taken = taken
            self.keys: list[str] = []
            self.release.set()

        def put_object(self, **kwargs: Any) -> dict[str, str]:
            self.keys.append(kwargs["Key"])
            if len(self.keys) <= self.taken:
                error = {
                    "Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions"}
                }
                raise ClientError(error, "PutObject")  # type: ignore[arg-type]
            return super().put_object(**kwargs)

    client = Taken(taken=2)
    sink = S3AuditSink(client, "b", "p", logging.getLogger("test"))
    await sink.open()
    await asyncio.wait_for(sink.append(b"entry\n"), 5)
    assert client.bodies == [b"entry\n"]
    assert [int(k.rsplit("-", 1)[1].split(".")[0]) for k in client.keys] == [1, 2, 3]  # a new key each time

    always = Taken(taken=99)
    sink = S3AuditSink(always, "b", "p", logging.getLogger("test"))
    await sink.open()
    with pytest.raises(AuditError, match="PreconditionFailed"):
        await asyncio.wait_for(sink.append(b"entry\n"), 5)
    assert len(always.keys) == audit_sinks.KEY_ATTEMPTS and always.bodies == []


async def test_close_refuses_new_entries_at_once_and_waits_for_the_accepted_ones() -> None:
    """Found by review: an entry appended while close() waited started a new PutObject that ran
    after close() had returned."""
    client, sink = await scripted_sink()
    accepted = asyncio.ensure_future(sink.append(b"accepted\n"))
    await wait_entered(client)
    closing = asyncio.ensure_future(sink.close())
    await asyncio.sleep(0)
    with pytest.raises(AuditError, match="not open"):
        await sink.append(b"late\n")
    assert not closing.done()  # still waiting for the accepted entry's PUT
    client.release.set()
    await asyncio.wait_for(asyncio.gather(accepted, closing), 5)
    assert client.bodies == [b"accepted\n"] and sink._flusher is None
