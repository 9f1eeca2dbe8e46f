"""Where audit entries go: a local file, or S3 (durable outside the enclave).

Both fail closed the same way: :meth:`append` returns only once the entry is written, and raises
:class:`~.audit.AuditError` when it cannot be. The caller (:mod:`.api`) then refuses the request
before it runs, or withholds its answer.

- :class:`FileSink` appends each line with single ``os.write`` calls on an ``O_APPEND`` descriptor,
  so concurrent entries never interleave; there is no buffering that could lose an acknowledged
  request's entry on a crash. Inside an enclave a file lives in the enclave's memory.
- :class:`S3AuditSink` is for the enclave: its filesystem goes when it stops, S3 does not. Entries
  are group-committed: while one ``PutObject`` is in flight the entries that arrive wait and go out
  together in the next, so a request waits for about one S3 round trip (two: its request entry,
  then its response entry) however many run at once. Each batch is a new object (JSON lines) named
  ``PREFIX/<UTC time>-<boot id>-<sequence>.jsonl``, written with ``If-None-Match: *`` so no batch
  ever replaces another; sorting the keys orders them in time. A gap in the sequence is a failed or
  retried put (see the ``vault_audit_failed`` events) or an object deleted since. Audit entries
  hash every secret (HMAC-SHA256 under the store's salt), so the bucket holds no secret; still,
  give the enclave's role ``s3:PutObject`` only on that prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from plugins.vault_like.audit import AuditError
from sidecar.logs import event

# One PutObject carries at most this much; what arrives meanwhile waits for the next.
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
# Keys tried for one batch when the chosen one exists already (see S3AuditSink._put).
KEY_ATTEMPTS: Final = 3
# Requests wait on the audit write, so S3 trouble must fail them in seconds, not after botocore's
# default 60 s timeouts and retries: at most 3 attempts of 3 s to connect and 10 s to answer.
AUDIT_S3_CONFIG: Final = Config(
    connect_timeout=3, read_timeout=10, retries={"mode": "standard", "max_attempts": 3}
)


class AuditSink(Protocol):
    """Where :class:`~.audit.AuditLog` writes its lines."""

    @property
    def where(self) -> str:
        """Where the entries go (a path or an s3:// URL), for messages; never a value."""

    @property
    def in_enclave_memory(self) -> bool:
        """Whether the entries live only in this machine's memory when it is an enclave."""

    async def open(self) -> None:
        """Make ready to append, or raise :class:`AuditError` saying why not."""

    async def append(self, line: bytes) -> None:
        """Write one line (ending in a newline); return once it is written, or raise AuditError."""

    async def close(self) -> None:
        """Finish what is in flight and release the sink."""


class FileSink:
    """JSON lines appended to a file (created with mode 0600), or to a device such as /dev/stdout."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self._fd: int | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def in_enclave_memory(self) -> bool:
        return not self.where.startswith("/dev/")  # a device (the console) leaves the enclave

    async def open(self) -> None:
        self.open_now()

    def open_now(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.fstat(fd).st_mode):  # never chmod a device (/dev/stdout...)
                os.fchmod(fd, 0o600)  # a file left by an older run keeps no wider mode
        self.close_now()
        self._fd = fd

    async def append(self, line: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise AuditError("the audit log is not open")
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            event(
                self.log, logging.ERROR, "vault_audit_failed", path=self.where, error=exc.strerror or str(exc)
            )
            raise AuditError(f"cannot write the audit log: {exc.strerror or exc}") from None

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class S3AuditSink:
    """JSON lines in new S3 objects under ``s3://bucket/prefix``, group-committed (module docstring).

    boto3 blocks, so each PutObject runs in a worker thread; one is in flight at a time.
    """

    in_enclave_memory = False

    def __init__(self, client: Any, bucket: str, prefix: str, log: logging.Logger) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.log = log
        self.where = f"s3://{bucket}/{prefix}"
        # A boot id keeps two processes (a restart, a replica) from ever choosing the same key.
        self._boot = secrets.token_hex(6)
        self._sequence = 0
        self._lines: list[bytes] = []
        self._size = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._open = False

    async def open(self) -> None:
        """Check the bucket can be reached now, so a wrong bucket or role fails start-up, not requests."""

        def call() -> None:
            self.client.head_bucket(Bucket=self.bucket)

        try:
            await asyncio.to_thread(call)
        except (BotoCoreError, ClientError) as exc:
            raise AuditError(f"cannot reach the audit bucket {self.where}: {_reason(exc)}") from None
        self._open = True

    async def append(self, line: bytes) -> None:
        if not self._open:
            raise AuditError("the audit log is not open")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lines.append(line)
        self._size += len(line)
        self._waiters.append(waiter)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="vault_like audit")
        # shield: a client that goes away must not cancel the batch other requests wait on.
        await asyncio.shield(waiter)

    async def _flush(self) -> None:
        """Put batches until none is waiting. Every waiter learns its batch's outcome, whatever it is:
        a request must never hang on an entry whose write failed in an unforeseen way."""
        try:
            while self._lines:
                lines, waiters = self._take_batch()
                outcome: AuditError | None = None
                try:
                    await self._put(b"".join(lines))
                except AuditError as exc:
                    outcome = exc
                except Exception as exc:  # not botocore's: still a failed write, still fail closed
                    event(
                        self.log,
                        logging.ERROR,
                        "vault_audit_failed",
                        path=self.where,
                        error=type(exc).__name__,
                    )
                    outcome = AuditError(f"cannot write the audit log: {type(exc).__name__}")
                except BaseException:  # cancelled (shutdown): whether these landed is unknown
                    _settle(waiters, AuditError("the audit log was closed"))
                    raise
                _settle(waiters, outcome)
        except BaseException:
            lines_waiting, self._waiters, self._lines, self._size = self._waiters, [], [], 0
            _settle(lines_waiting, AuditError("the audit log was closed"))
            raise
        finally:
            self._flusher = None

    def _take_batch(self) -> tuple[list[bytes], list[asyncio.Future[None]]]:
        count, size = 0, 0
        for line in self._lines:
            if count and size + len(line) > MAX_BATCH_BYTES:
                break
            count, size = count + 1, size + len(line)
        lines, self._lines = self._lines[:count], self._lines[count:]
        waiters, self._waiters = self._waiters[:count], self._waiters[count:]
        self._size -= size
        return lines, waiters

    async def _put(self, body: bytes) -> None:
        """Write ``body`` as a new object. The key is taken anew when it exists already: botocore
        retried a PUT whose answer was lost (our own object, now twice), or someone with write access
        to the prefix guessed the next key. Either way the batch is written under a key of its own:
        an entry may appear twice, never be lost or replaced."""
        for _ in range(KEY_ATTEMPTS):
            self._sequence += 1
            # One clock reading for both parts: two could straddle a second and sort a batch too early.
            seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{nanoseconds // 1_000_000:03d}Z"
            key = f"{self.prefix}{stamp}-{self._boot}-{self._sequence:010d}.jsonl"
            try:
                await asyncio.to_thread(self._put_new, key, body)
                return
            except ClientError as exc:
                reason = _reason(exc)
                if reason not in ("PreconditionFailed", "412"):
                    break
            except BotoCoreError as exc:
                reason = _reason(exc)
                break
        event(self.log, logging.ERROR, "vault_audit_failed", path=self.where, error=reason)
        raise AuditError(f"cannot write the audit log: S3 PutObject failed ({reason})")

    def _put_new(self, key: str, body: bytes) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", ContentType="application/x-ndjson"
        )

    async def close(self) -> None:
        """Refuse new entries, then wait until the ones already accepted are written (or failed)."""
        self._open = False
        while (flusher := self._flusher) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(flusher)


def _settle(waiters: list[asyncio.Future[None]], error: AuditError | None) -> None:
    for waiter in waiters:
        if waiter.done():  # its request was cancelled (a client that went away)
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)


def _reason(exc: Exception) -> str:
    """An AWS error's code (AccessDenied, NoSuchBucket...) or type: no request ids, no values."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else "ClientError"
    return type(exc).__name__


def open_audit_sink(where: str, state_dir: Path, aws: Callable[..., Any], log: logging.Logger) -> AuditSink:
    """The sink for the ``audit_log`` setting: ``s3://bucket/prefix``, or a file (relative to ``state_dir``).

    Raises ValueError for an s3:// URL without a bucket.
    """
    if where.startswith("s3://"):
        bucket, _, prefix = where[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError("audit_log s3://bucket/prefix needs a bucket")
        return S3AuditSink(aws("s3", config=AUDIT_S3_CONFIG), bucket, prefix, log)
    path = Path(where)
    return FileSink(path if path.is_absolute() else state_dir / path, log)
