"""Structured logs: one JSON object per line, for events and for the access log.

Events go through the standard ``logging`` module with :func:`event`. The access log bypasses it:
aiohttp's default access logger halves throughput, so access lines are formatted with a fixed
template and written in batches (see bench/RESULTS.md for the measured cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

EVENT_FIELDS = "sidecar_fields"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Clock:
    """ISO-8601 UTC timestamps, re-formatting the seconds part only when the second changes."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


CLOCK = _Clock()


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line: ts, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": CLOCK.now(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, EVENT_FIELDS, None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # Tracebacks stay in the log (never in responses); one line, still valid JSON.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send every ``sidecar`` and ``plugins`` logger (and aiohttp's) to ``stream`` as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_sidecar", False):
            root.removeHandler(old)
    handler._sidecar = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # aiohttp logs client disconnects and bad requests at INFO/ERROR with details we report ourselves.
    logging.getLogger("aiohttp.access").propagate = False
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def event(logger: logging.Logger, level: int, name: str, /, **fields: Any) -> None:
    """Log one structured event: ``event(log, logging.INFO, "listening", port=8001)``."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={EVENT_FIELDS: fields})


class AccessLogSink:
    """Collects access lines and writes them in batches; flushed on a timer and at shutdown."""

    def __init__(self, stream: IO[str] | None = None, batch: int = 64, interval: float = 0.25) -> None:
        self.stream = stream
        self.batch = batch
        self.interval = interval
        self._lines: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        stream = self.stream or sys.stderr
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):  # a closed stream must not take requests down with it
            pass

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()


def access_logger_class(
    sink: AccessLogSink, listener: str, sensitive: set[Any]
) -> type[AbstractAccessLogger]:
    """An aiohttp access-logger class bound to one listener.

    Query strings are never written. For routes marked sensitive, the route's pattern is written
    instead of the concrete path, so a passenger name or secret path never reaches the log.
    """
    quoted_listener = json.dumps(listener)

    class JsonAccessLogger(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
            try:
                resource = request.match_info.route.resource  # type: ignore[attr-defined]
            except (AttributeError, AssertionError):  # a request aiohttp rejected before routing
                resource = None
            path = resource.canonical if resource is not None and resource in sensitive else request.path
            rid = response.headers.get("X-Request-Id", "")
            sink.add(
                f'{{"ts":"{CLOCK.now()}","level":"info","logger":"sidecar.access","event":"access",'
                f'"listener":{quoted_listener},"method":{json.dumps(request.method)},'
                f'"path":{json.dumps(path, ensure_ascii=False)},"status":{response.status},'
                f'"bytes_sent":{response.body_length},"ms":{duration * 1000:.2f},"request_id":"{rid}"}}'
            )

        @property
        def enabled(self) -> bool:
            return True

    return JsonAccessLogger
