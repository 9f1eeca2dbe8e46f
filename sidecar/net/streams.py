"""The enclave's log and status streams, served to the parent (Enclaver's odyn does the same).

An enclave has no console in production, so the parent learns what happens inside only through
these streams (vsock ports ``log_vsock_port``/``status_vsock_port``, 17001/17000 as in Enclaver):

* **log stream**: newline-terminated log lines (our JSON lines). Like odyn, a new client first gets
  the retained tail (128 KiB, odyn's ``APP_LOG_CAPACITY``), so lines logged before the parent
  connected are not lost, then every new line. Each client has a bounded buffer: a slow or stalled
  client loses lines (counted, and announced by a ``log_lines_dropped`` line once it catches up); it
  never blocks the sidecar or other clients.
* **status stream**: JSON lines ``{"status": "starting"|"ready"|"stopping"|"exited"|"fatal", ...}``
  (``"code"`` with ``exited``, ``"error"`` with ``fatal``). A new client gets the current status at
  once, then each change; a slow client skips to the latest state (it is state, not history).
  ``exited``/``code`` and ``fatal``/``error`` are what Enclaver's ``enclaver run`` parses to learn
  that the enclave's program ended. Lines stay under Enclaver's 1024-byte line limit.

Nothing is read from clients: whatever they send is discarded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterable
from typing import Any

from sidecar.logs import CLOCK, JsonFormatter, event
from sidecar.net.vsock import Endpoint, Listener, serve

log = logging.getLogger(__name__)

STATUSES = ("starting", "ready", "stopping", "exited", "fatal")
LOG_BACKLOG_BYTES = 128 * 1024
CLIENT_BUFFER_BYTES = 256 * 1024
MAX_STREAM_CLIENTS = 16
MAX_STATUS_LINE = 1024  # Enclaver's host reads status lines with LinesCodec::new_with_max_length(1024)
_SEND_CHUNK = 64 * 1024


class _LogClient:
    __slots__ = ("dropped", "idle", "lines", "size", "wakeup")

    def __init__(self, backlog: Iterable[bytes]) -> None:
        self.lines: collections.deque[bytes] = collections.deque(backlog)
        self.size = sum(len(b) for b in self.lines)
        self.dropped = 0
        self.wakeup = asyncio.Event()  # lines were queued
        self.idle = asyncio.Event()  # everything queued has been sent
        if self.lines:
            self.wakeup.set()
        else:
            self.idle.set()


async def _discard_input(sock: socket.socket) -> None:
    """Return when the client hangs up (EOF or error); ignore anything it sends."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while await loop.sock_recv(sock, 4096):
            pass


async def _until_first(*coros: Any) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_all(events: list[asyncio.Event], timeout: float) -> None:  # noqa: ASYNC109
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(e.wait() for e in events))


class LogStream(logging.Handler):
    """A logging handler that fans every formatted record out to the connected stream clients.

    ``emit`` may be called from any thread (executor threads log too); the fan-out always runs on the
    event loop that was running when the handler was created.
    """

    def __init__(
        self,
        *,
        backlog_bytes: int = LOG_BACKLOG_BYTES,
        client_buffer_bytes: int = CLIENT_BUFFER_BYTES,
        formatter: logging.Formatter | None = None,
    ) -> None:
        super().__init__()
        self.setFormatter(formatter or JsonFormatter())
        self.backlog_bytes = backlog_bytes
        self.client_buffer_bytes = max(client_buffer_bytes, backlog_bytes)
        self.dropped = 0  # lines lost by slow clients, all clients together
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_size = 0
        self._clients: set[_LogClient] = set()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record).replace("\n", "\\n") + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        if threading.get_ident() == self._thread:
            self.publish(data)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening anyway
                self._loop.call_soon_threadsafe(self.publish, data)

    def publish(self, data: bytes) -> None:
        """Queue one line (bytes ending in a newline) for every client. Event-loop thread only."""
        self._backlog.append(data)
        self._backlog_size += len(data)
        while self._backlog_size > self.backlog_bytes and self._backlog:
            self._backlog_size -= len(self._backlog.popleft())
        for client in self._clients:
            if client.size + len(data) > self.client_buffer_bytes:
                client.dropped += 1
                self.dropped += 1
                continue
            if client.dropped:
                # Mark the gap where it is, with the first line that fits again.
                marker = self._dropped_line(client.dropped)
                client.dropped = 0
                client.lines.append(marker)
                client.size += len(marker)
            client.lines.append(data)
            client.size += len(data)
            client.wakeup.set()
            client.idle.clear()

    async def serve_client(self, sock: socket.socket) -> None:
        """Listener handler: stream the backlog, then new lines, until the client hangs up."""
        client = _LogClient(self._backlog)
        self._clients.add(client)
        try:
            await _until_first(self._write(sock, client), _discard_input(sock))
        finally:
            self._clients.discard(client)

    async def _write(self, sock: socket.socket, client: _LogClient) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                await client.wakeup.wait()
                client.wakeup.clear()
                while client.lines:
                    chunk: list[bytes] = []
                    n = 0
                    while client.lines and n < _SEND_CHUNK:
                        line = client.lines.popleft()
                        chunk.append(line)
                        n += len(line)
                    client.size -= n
                    await loop.sock_sendall(sock, b"".join(chunk))
                client.idle.set()

    @staticmethod
    def _dropped_line(count: int) -> bytes:
        entry = {
            "ts": CLOCK.now(),
            "level": "warning",
            "logger": log.name,
            "event": "log_lines_dropped",
            "count": count,
        }
        return (json.dumps(entry) + "\n").encode()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout`` s) until every client's buffer has been sent."""
        await _wait_all([c.idle for c in self._clients], timeout)


class StatusStream:
    """The current status, streamed as JSON lines. Call :meth:`set` on the event loop."""

    def __init__(self, status: str = "starting") -> None:
        self._watchers: dict[asyncio.Event, asyncio.Event] = {}  # changed -> idle, one pair per client
        self.version = 0
        self.current: dict[str, Any] = {}
        self.line = b""
        self.set(status)

    def set(self, status: str, **fields: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (expected one of {', '.join(STATUSES)})")
        code = fields.get("code")
        if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
            raise ValueError("status code must be an integer")
        if "error" in fields:
            fields["error"] = str(fields["error"])[:512]
        current = {"status": status, **fields}
        line = (json.dumps(current, default=str, ensure_ascii=False) + "\n").encode()
        if len(line) > MAX_STATUS_LINE:
            raise ValueError(f"status line is {len(line)} bytes, over the {MAX_STATUS_LINE}-byte limit")
        self.current, self.line = current, line
        self.version += 1
        for changed, idle in self._watchers.items():
            changed.set()
            idle.clear()

    async def serve_client(self, sock: socket.socket) -> None:
        """Listener handler: the current status now, then each change, until the client hangs up."""
        changed, idle = asyncio.Event(), asyncio.Event()
        changed.set()
        self._watchers[changed] = idle
        try:
            await _until_first(self._write(sock, changed, idle), _discard_input(sock))
        finally:
            del self._watchers[changed]

    async def _write(self, sock: socket.socket, changed: asyncio.Event, idle: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                await changed.wait()
                changed.clear()
                await loop.sock_sendall(sock, self.line)
                if not changed.is_set():
                    idle.set()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout`` s) until every client has been sent the current status."""
        await _wait_all(list(self._watchers.values()), timeout)


class EnclaveStreams:
    """The running log and status stream servers (either may be absent)."""

    def __init__(
        self,
        log_stream: LogStream,
        status: StatusStream,
        listeners: list[Listener],
        logger: logging.Logger,
    ) -> None:
        self.log = log_stream
        self.status = status
        self.listeners = listeners
        self._logger = logger

    @property
    def endpoints(self) -> list[Endpoint]:
        return [listener.endpoint for listener in self.listeners]

    def set_status(self, status: str, **fields: Any) -> None:
        self.status.set(status, **fields)

    async def close(self, grace: float = 1.0) -> None:
        """Give clients up to ``grace`` seconds to receive what is queued (the last status, the last
        lines), then stop serving and detach the log handler."""
        await asyncio.gather(self.log.drain(grace), self.status.drain(grace))
        self._logger.removeHandler(self.log)
        await asyncio.gather(*(listener.close() for listener in self.listeners), return_exceptions=True)


async def start_streams(
    log_endpoint: Endpoint | None,
    status_endpoint: Endpoint | None,
    *,
    logger: logging.Logger | None = None,
    status: str = "starting",
    max_clients: int = MAX_STREAM_CLIENTS,
    client_buffer_bytes: int = CLIENT_BUFFER_BYTES,
) -> EnclaveStreams:
    """Serve the log stream (records of ``logger``, the root logger by default) and the status stream."""
    target = logger if logger is not None else logging.getLogger()
    log_stream = LogStream(client_buffer_bytes=client_buffer_bytes)
    status_stream = StatusStream(status)
    listeners: list[Listener] = []
    try:
        if log_endpoint is not None:
            listeners.append(await serve(log_endpoint, log_stream.serve_client, max_connections=max_clients))
        if status_endpoint is not None:
            listeners.append(
                await serve(status_endpoint, status_stream.serve_client, max_connections=max_clients)
            )
    except BaseException:
        for listener in listeners:
            await listener.close()
        raise
    if log_endpoint is not None:
        target.addHandler(log_stream)
    streams = EnclaveStreams(log_stream, status_stream, listeners, target)
    event(log, logging.INFO, "streams_listening", endpoints=[str(e) for e in streams.endpoints])
    return streams
