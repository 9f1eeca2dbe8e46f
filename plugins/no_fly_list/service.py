"""The running no-fly list: load at start-up, hot reload, the HTTP handlers, metrics.

One :class:`NoFlyService` per plugin context. Start-up fetches the envelope (:mod:`.source`),
asks attested KMS for the data key, opens the envelope (:mod:`.envelope`) and builds the
:class:`~.index.NameIndex`; the plaintext and the data key are wiped as soon as the index exists.
The index is then only ever replaced whole (one attribute assignment), so a request sees either
the old list or the new one, never a mix.

HTTP (ingress listener; both routes are ``sensitive``: their query strings never reach a log):

- ``GET /enclave/passenger?name=NAME``: ``200 text/plain`` with the original app's two lines, or
  ``{"name": ..., "cleared": bool}`` when the ``Accept`` header names ``application/json``.
- ``POST /enclave/passengers`` with ``{"names": [...]}`` (``application/json``, 1 to ``max_batch``
  names): ``{"results": [{"name": ..., "cleared": bool}, ...]}`` in the order given.
- Every error is the sidecar's JSON error body, ``{"error": MESSAGE, "request_id": ID}``, whatever
  the Accept header says (as for the sidecar's own 404/413/503): 400 for a bad name or body, 415
  for a body that is not JSON, 429 with ``Retry-After`` once a client's rate limit is spent.

Nothing here logs or counts a name: log events carry counts, reasons and the envelope's location.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import traceback
import urllib.parse
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.helpers import parse_mimetype
from multidict import CIMultiDict, CIMultiDictProxy

from plugins.no_fly_list.envelope import Envelope, EnvelopeError, open_envelope, parse_envelope
from plugins.no_fly_list.index import NameIndex, PayloadError, wipe
from plugins.no_fly_list.normalize import MAX_NAME_CHARS, normalize
from plugins.no_fly_list.ratelimit import RateLimiter, client_key, retry_after
from plugins.no_fly_list.source import SourceError, content_id, fetch
from sidecar.context import PluginContext, ServiceNotConfigured
from sidecar.hotpath import ResponseTemplate
from sidecar.logs import event, iso_ms
from sidecar.routes import Listener, Route
from sidecar.server import JSON_HEADERS as JSON_ERROR_HEADERS
from sidecar.server import REQUEST_ID, PluginStartupError, json_error

PASSENGER_PATH: Final = "/enclave/passenger"
PASSENGERS_PATH: Final = "/enclave/passengers"

CLEARED: Final = b" is cleared to fly. Enjoy your flight!\n"
DENIED: Final = b" is on the no-fly list and CAN NOT BOARD!\n"


def _headers(content_type: str) -> CIMultiDictProxy[str]:
    # A verdict is personal data: no cache may keep it. The name is echoed, so no content sniffing.
    return CIMultiDictProxy(
        CIMultiDict(
            {
                hdrs.CONTENT_TYPE: content_type,
                hdrs.CACHE_CONTROL: "no-store",
                hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
                hdrs.VARY: "Accept",
            }
        )
    )


# Response copies the headers it is given: one shared read-only set per kind is built once. A
# verdict is built from a template of its kind (a third of web.Response's cost: sidecar.hotpath).
TEXT_HEADERS: Final = _headers("text/plain; charset=utf-8")
JSON_HEADERS: Final = _headers("application/json")
TEXT_VERDICT: Final = ResponseTemplate(TEXT_HEADERS)
JSON_VERDICT: Final = ResponseTemplate(JSON_HEADERS)

# C0 and C1 controls and U+2028/U+2029 (a name is echoed in a text/plain answer: a line break,
# including the two that str.splitlines() and some viewers break at, could forge a second verdict
# line) and lone surrogates (JSON can carry them; they cannot be encoded).
_BAD_CHARACTER: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class LoadError(Exception):
    """The list could not be loaded. The message is safe to show in /enclave/ready and in logs.

    ``permanent`` errors belong to the envelope itself (malformed, tampered, undecodable): retrying
    the same object cannot help. Others (KMS, network) are retried at the next poll.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Metrics:
    """Counters. Never a name: only how many checks, verdicts and refusals there were."""

    __slots__ = ("bad_requests", "checks", "denied", "rate_limited", "reload_failures", "reloads")

    def __init__(self) -> None:
        self.checks = 0  # names checked (a batch counts each name)
        self.denied = 0  # of those, names on the list
        self.bad_requests = 0  # 400 and 415 answers
        self.rate_limited = 0  # 429 answers
        self.reloads = 0  # successful hot reloads (not the start-up load)
        self.reload_failures = 0

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be checked (completing "the name ..."), or None when it can."""
    size = len(name)
    if 0 < size <= MAX_NAME_CHARS and name.isascii() and name.isprintable():
        return None  # the common case, in two C calls: for ASCII, printable means no control character
    if not size:
        return "is empty"
    if size > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    bad = _BAD_CHARACTER.search(name)
    if bad is not None:
        if "\ud800" <= bad.group() <= "\udfff":
            return "is not valid Unicode (it contains an unpaired surrogate)"
        return "contains a control character or a line separator"
    return None


@functools.lru_cache(maxsize=256)  # clients send a handful of distinct Accept headers
def wants_json(accept: str) -> bool:
    """Whether an Accept header asks for JSON: it names ``application/json`` (q > 0), and ranks it
    at least as high as text/plain. Ties go to JSON, except against an explicit ``text/plain``.
    ``*/*`` alone (curl's default) and browsers' headers keep the original text answer.
    """
    json_q: float | None = None
    text_q: float | None = None  # text/plain, else text/*, else */*
    text_rank = -1
    explicit_text = False
    for part in accept.split(","):
        media = parse_mimetype(part.strip())
        kind = f"{media.type}/{media.subtype}"
        try:
            q = float(media.parameters.get("q", "1"))
        except ValueError:
            continue  # an element with a malformed q is ignored
        if kind == "application/json":
            json_q = q if json_q is None else max(json_q, q)
        rank = {"text/plain": 2, "text/*": 1, "*/*": 0}.get(kind, -1)
        if rank > text_rank:
            text_rank, text_q = rank, q
        elif rank == text_rank and rank >= 0 and text_q is not None:
            text_q = max(text_q, q)
        explicit_text = explicit_text or kind == "text/plain"
    if json_q is None or json_q <= 0:
        return False
    if text_q is None or json_q > text_q:
        return True
    return json_q == text_q and not explicit_text


def query_is_utf8(raw_query: str) -> bool:
    """Whether every percent-encoded byte sequence in a raw query string is valid UTF-8.

    yarl decodes invalid sequences to U+FFFD; this tells those apart from a real U+FFFD.
    """
    try:
        urllib.parse.parse_qsl(raw_query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return False
    return True


class BadBatch(ValueError):
    """A batch body that cannot be checked; the message says exactly why (never quoting a name)."""


def parse_batch(body: bytes, max_batch: int) -> list[str]:
    """The names of a ``{"names": [...]}`` body, checked (not normalised). Raises :class:`BadBatch`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBatch(f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_fields, parse_constant=_no_constant)
    except _DuplicateField:
        raise BadBatch("the body has a field twice") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadBatch(f"the body is not valid JSON: {exc.msg} at {where}") from None
    except RecursionError:
        raise BadBatch("the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, an integer with thousands of digits
        raise BadBatch(f"the body is not valid JSON: {str(exc).split(':')[0]}") from None
    if not isinstance(document, dict):
        raise BadBatch('the body must be a JSON object: {"names": ["NAME", ...]}')
    if "names" not in document:
        raise BadBatch("the body needs the field 'names' (an array of names)")
    if len(document) > 1:
        raise BadBatch("the body has fields other than 'names'")
    names = document["names"]
    if not isinstance(names, list):
        raise BadBatch(f"'names' must be an array of strings, got {_json_type(names)}")
    if not names:
        raise BadBatch(f"'names' is empty: send 1 to {max_batch} names")
    if len(names) > max_batch:
        raise BadBatch(f"'names' has {len(names)} names; the limit is {max_batch} per request")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise BadBatch(f"names[{i}] must be a string, got {_json_type(name)}")
        problem = name_problem(name)
        if problem is not None:
            raise BadBatch(f"names[{i}] {problem}")
    return names


class _DuplicateField(Exception):
    pass


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"names": [...], "names": [...]} is ambiguous: which list did the client mean?
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _DuplicateField
    return document


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


class NoFlyService:
    """The plugin's state for one sidecar: config, the index, the rate limiter and the counters."""

    def __init__(self, context: PluginContext) -> None:
        config = context.config
        self.context = context
        self.log = context.log
        self.location: str = config["envelope"]
        self.key_id: str = config["key_id"]
        self.reload_interval: int = config["reload_interval"]
        self.metrics_interval: int = config["metrics_interval"]
        self.max_batch: int = config["max_batch"]
        limit = config["rate_limit"]
        self.limiter: RateLimiter | None = None
        if limit["enabled"]:
            self.limiter = RateLimiter(limit["per_second"], limit["burst"], limit["max_clients"])
        self.metrics = Metrics()
        self.index: NameIndex | None = None
        self.tag: str | None = None  # the version tag of the envelope in use
        self.sealed_at: int | None = None  # when the list in use was sealed (ms), if its envelope says
        self.failed_tag: str | None = None  # a newer envelope that failed for good (not retried)
        self._tasks: list[asyncio.Task[None]] = []
        # Retry-After value -> the 429 body around the request id, and the headers (see _too_many).
        self._refusals: dict[str, tuple[bytes, bytes, CIMultiDictProxy[str]]] = {}

    # ------------------------------------------------------------------ routes

    def routes(self, listener: Listener) -> list[Route]:
        """The passenger routes on the plugin's ingress listener (the counters go to the log instead of
        a route: the sidecar asks a plugin only about the listener sidecar.yaml assigns it)."""
        if listener.audience != "ingress":
            return []
        # The batch route keeps the sidecar-wide body limit (limits.max_body_bytes, 1 MiB by
        # default): a larger per-route limit would make the server clone every other request on
        # this listener. 1000 names of 256 characters fit 1 MiB as UTF-8 JSON (4 bytes a character
        # at most); only a body that \u-escapes astral characters can be larger, and gets a 413.
        return [
            Route("GET", PASSENGER_PATH, self.handle_passenger, sensitive=True, name="passenger"),
            Route("POST", PASSENGERS_PATH, self.handle_passengers, sensitive=True, name="passengers"),
        ]

    # ------------------------------------------------------------------ loading

    async def start(self) -> None:
        """Load the list; a failure raises PluginStartupError with the reason. Then start polling."""
        try:
            data, tag = await fetch(self.context, self.location, None)
            assert data is not None  # no tag was given, so there is always data
            index, kind, envelope = await self.load(data)
        except (SourceError, LoadError) as exc:
            raise PluginStartupError(f"list not loaded: {exc}") from None
        except Exception as exc:
            self._unexpected("load", exc)
            raise PluginStartupError(f"list not loaded: unexpected {type(exc).__name__}") from None
        self.index, self.tag, self.sealed_at = index, tag, envelope.sealed_at
        event(self.log, logging.INFO, "no_fly_loaded", entries=len(index), envelope=self.location, kind=kind)
        loop = asyncio.get_running_loop()
        if self.reload_interval > 0:
            self._tasks.append(loop.create_task(self._poll(), name="no_fly_list reload"))
        if self.metrics_interval > 0:
            self._tasks.append(loop.create_task(self._report(), name="no_fly_list metrics"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.metrics_interval > 0:
            self.report_metrics()

    async def load(self, data: bytes) -> tuple[NameIndex, str, Envelope]:
        """Envelope bytes -> (index, envelope kind, the envelope). Raises :class:`LoadError` with a
        safe reason. The envelope's seal time is authentic: it opened."""
        try:
            envelope = parse_envelope(data)
        except EnvelopeError as exc:
            raise LoadError(f"envelope rejected: {exc}", permanent=True) from None
        try:
            kms = self.context.kms
        except ServiceNotConfigured as exc:
            raise LoadError(str(exc)) from None
        params = envelope.kms_decrypt_params(self.key_id)
        try:
            answer = await asyncio.to_thread(kms.decrypt, **params)  # blocking: NSM, then KMS
        except Exception as exc:
            raise LoadError(self._kms_problem(exc)) from None
        # CPU-bound (a 1M-name list takes a second or two): off the event loop, which keeps serving.
        index = await asyncio.to_thread(_open_and_index, envelope, answer)
        return index, envelope.kind, envelope

    def _kms_problem(self, exc: Exception) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        from sidecar.aws.kms import AttestedKmsError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code") or "an error"
            # KMS's message names the key and the caller: fine for the log, not for /enclave/ready.
            event(self.log, logging.ERROR, "no_fly_kms_failed", code=code, message=error.get("Message", ""))
            return f"KMS refused to decrypt the data key ({code})"
        if isinstance(exc, AttestedKmsError):
            return f"attested KMS failed: {exc}"
        if isinstance(exc, BotoCoreError):
            return f"cannot reach KMS: {exc}"
        event(self.log, logging.ERROR, "no_fly_kms_failed", error=type(exc).__name__)
        return f"KMS Decrypt failed: {type(exc).__name__}"

    async def reload(self) -> bool:
        """One poll: fetch if changed, load, swap. True when a new list is in use. Never raises."""
        try:
            data, tag = await fetch(self.context, self.location, self.failed_tag or self.tag)
        except SourceError as exc:
            self._reload_failed(str(exc))
            return False
        except Exception as exc:
            self._unexpected("reload", exc)
            self._reload_failed(f"unexpected {type(exc).__name__}")
            return False
        if data is None:  # unchanged (a local file's tag may still move: it was touched)
            if self.failed_tag is not None:
                self.failed_tag = tag
            else:
                self.tag = tag
            return False
        if self.tag is not None and content_id(tag) == content_id(self.tag):
            self.tag, self.failed_tag = tag, None  # a bad version was replaced by the list in use
            return False
        try:
            index, kind, envelope = await self.load(data)
        except LoadError as exc:
            if exc.permanent:
                self.failed_tag = tag  # this version can never load: wait for the next one
            self._reload_failed(str(exc))
            return False
        except Exception as exc:
            self._unexpected("reload", exc)
            self._reload_failed(f"unexpected {type(exc).__name__}")
            return False
        if (stale := self._older_than_in_use(envelope)) is not None:
            # An older genuine envelope put back (by anyone who can write the object) would undo an
            # update: names added since would be cleared to fly. Keep the list in use.
            self.failed_tag = tag
            self._reload_failed(stale)
            return False
        if not len(index) and len(self.index or ()):
            # A genuine but empty envelope would clear every passenger at once; far more likely a
            # mistake or an old envelope put back than a real list. Keep the list in use.
            self.failed_tag = tag
            self._reload_failed("the new list is empty; keeping the list in use")
            return False
        self.index, self.tag, self.failed_tag, self.sealed_at = (
            index,
            tag,
            None,
            envelope.sealed_at,
        )  # the swap
        self.metrics.reloads += 1
        entries = len(index)
        event(self.log, logging.INFO, "no_fly_reloaded", entries=entries, envelope=self.location, kind=kind)
        return True

    def _older_than_in_use(self, envelope: Envelope) -> str | None:
        """Why ``envelope`` may not replace the list in use (it was sealed before it), or None.

        Only a surely older envelope is refused: two sealed in the same millisecond (or, for the
        original format, whose timestamp counts seconds, the same second) cannot be ordered.
        """
        current = self.sealed_at
        if current is None:
            return None  # the list in use has no seal time (sealed before the field existed)
        sealed_by = envelope.sealed_by
        if sealed_by is None:
            return "the new envelope has no seal time and the list in use has one; keeping the list in use"
        if sealed_by < current:
            return (
                f"the new envelope was sealed at {iso_ms(envelope.sealed_at or 0)}, before the list in "
                f"use ({iso_ms(current)}); keeping the list in use"
            )
        return None

    def _reload_failed(self, reason: str) -> None:
        self.metrics.reload_failures += 1
        event(
            self.log,
            logging.ERROR,
            "no_fly_reload_failed",
            envelope=self.location,
            reason=reason,
            kept_entries=len(self.index or ()),
        )

    def _unexpected(self, stage: str, exc: Exception) -> None:
        """Log where an unexpected error happened, not what it says: a message could quote data."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in frames[-3:]]
        error = type(exc).__name__
        event(self.log, logging.ERROR, "no_fly_unexpected_error", stage=stage, error=error, where=where)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            await self.reload()

    async def _report(self) -> None:
        last: dict[str, int] | None = None
        while True:
            await asyncio.sleep(self.metrics_interval)
            snapshot = self.metrics.snapshot()
            if snapshot != last:  # a quiet sidecar does not fill its log with zeros
                self.report_metrics()
                last = snapshot

    def report_metrics(self) -> None:
        event(self.log, logging.INFO, "no_fly_metrics", **self.metrics_snapshot())

    def metrics_snapshot(self) -> dict[str, int]:
        snapshot = self.metrics.snapshot()
        snapshot["entries"] = len(self.index or ())
        snapshot["rate_limited_clients"] = len(self.limiter or ())
        return snapshot

    def readiness(self) -> str | None:
        return None if self.index is not None else "list not loaded"

    # ------------------------------------------------------------------ handlers

    def _bad(self, request: web.Request, message: str, status: int = 400) -> web.Response:
        self.metrics.bad_requests += 1
        return json_error(status, message, request[REQUEST_ID])

    def _too_many(self, request: web.Request, wait: float, limiter: RateLimiter) -> web.Response:
        """The 429 answer: json_error's body and Retry-After, from parts built once per wait time.

        A client over its limit keeps asking (an enumeration attempt does), so refusing must cost
        less than answering: only the request id differs between two refusals with the same wait.
        """
        self.metrics.rate_limited += 1
        seconds = retry_after(wait)
        parts = self._refusals.get(seconds)
        if parts is None:
            message = (
                f"too many checks from this client: the limit is {limiter.per_second:g} names a second "
                f"(bursts of {limiter.burst:g}); retry in {seconds} s"
            )
            # json_error's body with a placeholder id (hex digits: JSON needs no escaping), split there.
            text = json.dumps({"error": message, "retry_after": int(seconds), "request_id": "\0"})
            head, tail = text.encode().split(b"\\u0000")
            headers = CIMultiDict(JSON_ERROR_HEADERS)
            headers[hdrs.RETRY_AFTER] = seconds
            if len(self._refusals) >= 64:  # waits are bounded by the limit's settings; this is a backstop
                self._refusals.clear()
            parts = self._refusals[seconds] = (head, tail, CIMultiDictProxy(headers))
        head, tail, refusal_headers = parts
        body = head + request[REQUEST_ID].encode() + tail
        return web.Response(status=429, body=body, headers=refusal_headers)

    async def handle_passenger(self, request: web.Request) -> web.Response:
        names = request.query.getall("name", None)
        if not names:
            return self._bad(request, "the query parameter 'name' is required: /enclave/passenger?name=NAME")
        if len(names) > 1:
            return self._bad(request, "give the query parameter 'name' once")
        name = names[0]
        # name_problem's fast path, inline (printable ASCII of a valid length, so no U+FFFD either).
        if not (0 < len(name) <= MAX_NAME_CHARS and name.isascii() and name.isprintable()):
            problem = name_problem(name)
            if problem is None and "\ufffd" in name and not query_is_utf8(request.rel_url.raw_query_string):
                problem = "is not valid UTF-8 (check its percent-encoding)"
            if problem is not None:
                return self._bad(request, f"the query parameter 'name' {problem}")
        limiter = self.limiter
        if limiter is not None and (wait := limiter.take(client_key(request.remote), 1)):
            return self._too_many(request, wait, limiter)
        normalized = normalize(name)
        if not normalized:
            return self._bad(request, "the query parameter 'name' has no visible characters")
        index = self.index
        if index is None:  # not reachable once started (routes answer 503 before); fail closed
            return json_error(503, "the no-fly list is not loaded", request[REQUEST_ID])
        on_list = normalized in index
        metrics = self.metrics
        metrics.checks += 1
        if on_list:
            metrics.denied += 1
        accept = request.headers.get(hdrs.ACCEPT)
        if accept is not None and wants_json(accept):
            body = json.dumps({"name": name, "cleared": not on_list}).encode()
            return JSON_VERDICT.response(body)
        return TEXT_VERDICT.response(name.encode() + (DENIED if on_list else CLEARED))

    async def handle_passengers(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return self._bad(request, "send the names as JSON: Content-Type: application/json", 415)
        charset = request.charset
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            return self._bad(request, f"the body must be UTF-8, not {charset[:40]!r}", 415)
        limiter = self.limiter
        client = client_key(request.remote)
        # A client already over its limit is refused before its body is even read.
        if limiter is not None and (wait := limiter.wait(client)):
            return self._too_many(request, wait, limiter)
        try:
            names = parse_batch(await request.read(), self.max_batch)
        except BadBatch as exc:
            return self._bad(request, str(exc))
        if limiter is not None and (wait := limiter.take(client, len(names))):
            return self._too_many(request, wait, limiter)
        normalized = [normalize(name) for name in names]
        for i, each in enumerate(normalized):
            if not each:
                return self._bad(request, f"names[{i}] has no visible characters")
        index = self.index
        if index is None:
            return json_error(503, "the no-fly list is not loaded", request[REQUEST_ID])
        verdicts = [each in index for each in normalized]
        denied = sum(verdicts)
        self.metrics.checks += len(names)
        self.metrics.denied += denied
        results = [{"name": n, "cleared": not on_list} for n, on_list in zip(names, verdicts, strict=True)]
        return JSON_VERDICT.response(json.dumps({"results": results}).encode())


def _open_and_index(envelope: Envelope, answer: dict[str, Any]) -> NameIndex:
    """Decrypt the list with the data key in KMS's answer and index it; both are wiped after."""
    plaintext = answer.pop("Plaintext", None)
    answer.clear()
    if not isinstance(plaintext, bytes | bytearray):
        raise LoadError("KMS answered Decrypt without a plaintext data key")
    # KMS's bytes are immutable (the module docstring of .index says what that means); from here
    # on the key lives in a buffer that is wiped.
    data_key = bytearray(plaintext)
    del plaintext
    payload = bytearray()
    try:
        payload = open_envelope(envelope, data_key)
        return NameIndex.from_payload(payload)
    except EnvelopeError as exc:
        raise LoadError(f"envelope rejected: {exc}", permanent=True) from None
    except PayloadError as exc:
        raise LoadError(f"list rejected: {exc}", permanent=True) from None
    finally:
        wipe(data_key)
        wipe(payload)
