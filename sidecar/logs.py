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
from math import floor
from typing import IO, Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from multidict import istr

EVENT_FIELDS = "sidecar_fields"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC: ``2026-11-27T21:48:35.235Z``."""
    second, fraction = divmod(ms, 1000)
    return f"{iso_second(second)}{_MS_SUFFIX[fraction]}"


def iso_second(second: int) -> str:
    """Seconds since the epoch as ISO-8601 UTC without the fraction: ``2026-11-27T21:48:35``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


_MS_SUFFIX = tuple(f".{ms:03d}Z" for ms in range(1000))


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds, formatted at most once per millisecond.

    Under load many access lines share a millisecond, and formatting dominated the line's cost.
    """

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def now(self) -> str:
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = iso_ms(ms)
        return self._text


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


CHATTY_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "werkzeug", "moto")


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
    # At DEBUG these libraries write signed request headers (the session token) and response bodies
    # (plaintext data keys) to the log. They never go below INFO, whatever log.level says.
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, LEVELS[level]))


def event(logger: logging.Logger, level: int, name: str, /, **fields: Any) -> None:
    """Log one structured event: ``event(log, logging.INFO, "listening", port=8001)``."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={EVENT_FIELDS: fields})


# The response header that carries the request id. An ``istr`` skips case-folding on every lookup.
REQUEST_ID_HEADER: Final = istr("X-Request-Id")
# One access record, captured on the request path and rendered at flush time:
# (time.time(), listener head, method, path, status, bytes sent, duration in seconds, request id).
AccessRecord = tuple[float, str, str, str, int, int, float, str]
_CACHE = 4096  # entries per rendering cache
UNROUTED: Final = "(no route)"  # the path logged for a request none of the app's routes answered


class AccessLogSink:
    """Collects access records and writes them as JSON lines in batches (on a timer and at shutdown).

    A record is a tuple captured on the request path; turning it into JSON happens at flush time,
    so a request pays only for a tuple and an append. ``records`` is always the same list (flush
    empties it in place), so a logger may hold its bound ``append``.
    """

    def __init__(self, stream: IO[str] | None = None, batch: int = 256, interval: float = 0.25) -> None:
        self.stream = stream
        self.batch = batch
        self.interval = interval
        self.records: list[AccessRecord] = []
        # The JSON text from the listener to bytes_sent, per (listener, method, path, status, bytes
        # sent): under load most records repeat one. Bounded (paths come from clients).
        self._middles: dict[tuple[str, str, str, int, int], str] = {}
        self._second, self._second_text = -1, ""
        self._task: asyncio.Task[None] | None = None

    def render(self, records: list[AccessRecord]) -> str:
        middles = self._middles
        lines: list[str] = []
        add = lines.append
        # Under load many records share a millisecond: comparing floats against its bounds is far
        # cheaper than converting each time. The date and time text is formatted once a second.
        start = end = -1.0
        ts = ""
        for t, head, method, path, status, sent, duration, rid in records:
            if not start <= t < end:
                ms = floor(t * 1000)
                start, end = ms / 1000, (ms + 1) / 1000
                second, fraction = divmod(ms, 1000)
                if second != self._second:
                    self._second, self._second_text = second, iso_second(second)
                ts = f'{{"ts":"{self._second_text}{_MS_SUFFIX[fraction]}",'
            key = (head, method, path, status, sent)
            middle = middles.get(key)
            if middle is None:
                # The method is an HTTP token (no quotes or backslashes): safe in JSON as it is.
                middle = (
                    f'{head}"method":"{method}","path":{json.dumps(path, ensure_ascii=False)},'
                    f'"status":{status},"bytes_sent":{sent},"us":'
                )
                if len(middles) >= _CACHE:  # e.g. after a scan of random paths: start over
                    middles.clear()
                middles[key] = middle
            add(f'{ts}{middle}{floor(duration * 1e6)},"request_id":"{rid}"}}\n')
        return "".join(lines)

    def flush(self) -> None:
        if not self.records:
            return
        records = self.records.copy()
        self.records.clear()
        stream = self.stream or sys.stderr
        try:
            stream.write(self.render(records))
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
    sink: AccessLogSink,
    listener: str,
    sensitive: set[Any],
    plain_paths: frozenset[str] = frozenset(),
    public: frozenset[Any] | None = None,
) -> type[AbstractAccessLogger]:
    """An aiohttp access-logger class bound to one listener.

    Query strings are never written. For routes marked sensitive, the route's pattern is written
    instead of the concrete path, so a passenger name or secret path never reaches the log.
    This runs on every request: it only captures a tuple (see :class:`AccessLogSink`); the request
    id is read back from the response header the route wrapper set (``""`` for a response aiohttp
    made itself, such as a 400 for a malformed request). ``plain_paths`` are the fixed paths of the
    routes that are not sensitive (``/enclave/health``): a request whose path is one of them is
    logged as it is, whichever route answered it (``POST /enclave/health`` reaches the fallback),
    since that text is a route's own. With ``public`` (the routes that are not sensitive), a
    request no route of the app answered (aiohttp's own 404 or 405) is logged as :data:`UNROUTED`,
    never as its path: fail safe.
    """
    head = f'"level":"info","logger":"sidecar.access","event":"access","listener":{json.dumps(listener)},'
    now = time.time
    records = sink.records
    append = records.append
    # The routes of the sensitive resources (a GET resource has a HEAD route too), each with the
    # pattern to log in place of the request's path.
    patterns = {route: resource.canonical for resource in sensitive for route in resource}
    # A request routed to a fixed path (a plain resource: /enclave/health, /enclave/passenger) is
    # logged with that path, sensitive or not (its pattern is the path): one lookup, by route.
    fixed = {
        route: route.resource.canonical
        for route in (*patterns, *(public or ()))
        if isinstance(route.resource, web.PlainResource)
    }

    class JsonAccessLogger(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
            try:
                route = request._match_info._route  # type: ignore[attr-defined]
            except AttributeError:  # a request aiohttp rejected before routing (no match info)
                route = None
            path = fixed.get(route)
            if path is None:
                # The path the router matched (decoded, but %2F and %25 kept): computed and cached
                # by routing, where request.path would decode it again (~400 instructions).
                path = request.rel_url.path_safe
                if route is not None and patterns and path not in plain_paths:
                    path = patterns.get(route) or (path if public is None or route in public else UNROUTED)
            # The fields behind request.method, response.status, ... (sidecar.hotpath: checked at
            # start-up; each property read would cost ~1,300 instructions).
            append(
                (
                    now(),
                    head,
                    request._method,
                    path,
                    response._status,
                    response._body_length,
                    duration,
                    response._headers.get(REQUEST_ID_HEADER, ""),
                )
            )
            if len(records) >= sink.batch:
                sink.flush()

        @property
        def enabled(self) -> bool:
            return True

    return JsonAccessLogger
