"""The parent's readers for the enclave's log and status streams (:mod:`sidecar.net.streams`).

Like ``enclaver run``, the parent keeps trying to connect (the enclave takes a while to boot) and
reconnects when a stream ends (the enclave restarted). What arrives comes from inside the enclave
and is not trusted to be well-formed: lines are length-capped, decoded leniently, and control
characters are escaped before they reach a terminal (an escape sequence in a log line must not be
able to rewrite the operator's screen or hide earlier lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from sidecar.logs import event
from sidecar.net.vsock import Endpoint, connect

log = logging.getLogger(__name__)

MAX_LOG_LINE = 64 * 1024
MAX_STATUS_LINE = 1024
RETRY_FIRST = 0.25  # Enclaver's LOG_VSOCK_RETRY_INTERVAL
RETRY_MAX = 5.0
CONNECT_TIMEOUT = 5.0
# Enclaver's odyn sends running/exited/signaled/fatal; ours sends starting/ready/stopping/exited/fatal.
KNOWN_STATUSES = frozenset({"starting", "ready", "stopping", "exited", "fatal", "running", "signaled"})
FINAL_STATUSES = frozenset({"exited", "fatal", "signaled"})

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def sanitize(line: str) -> str:
    """Escape control characters (and bidi overrides) so a line prints as exactly one inert line."""
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", line
    )


def stdout_sink(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # stdout closed (a pipe whose reader went away): keep running
        pass


LineHandler = Callable[[str], None]


async def _follow(name: str, ep: Endpoint, on_line: LineHandler, max_line: int) -> None:
    """Connect (retrying with backoff), hand every line to ``on_line``, reconnect when it ends."""
    delay = RETRY_FIRST
    waiting_logged = False
    while True:
        try:
            sock = await connect(ep, timeout=CONNECT_TIMEOUT)
        except OSError as e:
            if not waiting_logged:
                event(
                    log, logging.INFO, "enclave_stream_waiting", stream=name, endpoint=str(ep), error=str(e)
                )
                waiting_logged = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            continue
        delay, waiting_logged = RETRY_FIRST, False
        event(log, logging.INFO, "enclave_stream_connected", stream=name, endpoint=str(ep))
        reader, writer = await asyncio.open_connection(sock=sock, limit=max_line)
        try:
            await _read_lines(name, reader, on_line)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        event(log, logging.INFO, "enclave_stream_closed", stream=name, endpoint=str(ep))
        await asyncio.sleep(RETRY_FIRST)


async def _read_lines(name: str, reader: asyncio.StreamReader, on_line: LineHandler) -> None:
    while True:
        try:
            raw = await reader.readline()
        except ValueError:
            # readline() discards a line over the limit; report and go on with the next one.
            event(log, logging.WARNING, "enclave_stream_line_too_long", stream=name)
            continue
        except OSError:
            return
        if not raw:
            return
        try:
            on_line(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
        except Exception as exc:  # one bad line must not stop the follower (and --exit-with-enclave)
            event(log, logging.WARNING, "enclave_stream_line_failed", stream=name, error=type(exc).__name__)


async def follow_log(ep: Endpoint, sink: LineHandler = stdout_sink, *, max_line: int = MAX_LOG_LINE) -> None:
    """Print the enclave's log lines (sanitized) to ``sink`` until cancelled."""
    await _follow("log", ep, lambda line: sink(sanitize(line)), max_line)


def parse_status(line: str) -> dict[str, Any] | None:
    """A status line as a dict, or None if it is not ``{"status": <known>, ...}``."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: "[" nested a thousand deep
        return None
    if not isinstance(value, dict) or value.get("status") not in KNOWN_STATUSES:
        return None
    return value


async def follow_status(
    ep: Endpoint,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    *,
    max_line: int = MAX_STATUS_LINE,
) -> None:
    """Log each status the enclave reports (and pass it to ``on_status``) until cancelled."""

    def handle(line: str) -> None:
        status = parse_status(line)
        if status is None:
            event(log, logging.WARNING, "enclave_status_invalid", line=sanitize(line[:200]))
            return
        fields = {
            k: v if isinstance(v, int) else sanitize(str(v))[:512]
            for k, v in status.items()
            if k in ("code", "error", "signal")
        }
        level = logging.WARNING if status["status"] in ("fatal", "signaled") else logging.INFO
        event(log, level, "enclave_status", status=status["status"], **fields)
        if on_status is not None:
            on_status(status)

    await _follow("status", ep, handle, max_line)
