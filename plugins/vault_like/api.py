"""The HTTP layer: Vault's ``/v1/...`` API on the vault listener.

One handler serves every method on ``/v1/{path}`` (GET, HEAD, POST, PUT, PATCH, DELETE and
``LIST``). For each request it:

1. answers the unauthenticated ``sys/health``, ``sys/seal-status``, ``sys/init`` and ``sys/leader``
   (sealed or not, never audited);
2. refuses everything else while sealed: 503 ``{"errors":["Vault is sealed"]}``;
3. maps the method to Vault's operation (GET read, or list with ``?list=true``; LIST list; POST and
   PUT create or update, decided by the backend's existence check; PATCH patch; DELETE delete);
4. reads the token (``X-Vault-Token``, else ``Authorization: Bearer``): missing, unknown or expired
   is 403 ``permission denied`` (never 401: hvac raises on 401), and a ``num_uses`` token spends a
   use, even on a request the ACL then refuses (as Vault does);
5. routes: ``sys/*`` to :class:`~.sys_backend.SysBackend`, ``auth/token/*`` to the token store,
   otherwise the mount with the longest prefix;
6. checks the token's ACL on the full path before the backend runs (sudo too on root-protected
   paths);
7. writes the audit request entry (a failure refuses the request: nothing runs unaudited), runs the
   backend, writes the response entry (a failure withholds the answer), and renders Vault's
   envelope, a 204, or ``{"errors": [...]}``.

Every answer is ``Content-Type: application/json`` exactly (hvac ignores error bodies otherwise)
and ``Cache-Control: no-store``. A bug is a 500 ``{"errors":["internal error"]}`` and a log event
that names the exception type and where it was raised, never its message (it could quote data).
Routes are ``sensitive``: secret paths never reach the access log (storage does not see them
either: the barrier names entries by HMAC).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy, istr

from plugins.vault_like.audit import AuditError
from plugins.vault_like.logical import (
    Backend,
    LogicalRequest,
    LogicalResponse,
    Operation,
    VaultError,
    permission_denied,
)
from plugins.vault_like.sys_backend import SUDO_PATHS, is_legacy, unsupported_operation
from sidecar.logs import event
from sidecar.routes import Route
from sidecar.server import REQUEST_ID

VAULT_REQUEST_ID: Final = web.RequestKey("vault_like.request_id", str)

if TYPE_CHECKING:
    from plugins.vault_like.service import VaultService

PATH: Final = "/v1/{path:[\\s\\S]*}"  # [\s\S]: "." would leave out a path with an encoded newline
METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "LIST")  # a GET route answers HEAD too
UNAUTHENTICATED: Final = frozenset({"sys/health", "sys/seal-status", "sys/init", "sys/leader"})
MAX_TOKEN_CHARS: Final = 512  # longer is no token of ours: refused before any lookup
SEALED: Final = b'{"errors":["Vault is sealed"]}'
INTERNAL: Final = b'{"errors":["internal error"]}'
AUDIT_FAILED: Final = b'{"errors":["audit log unavailable"]}'
TOO_LARGE: Final = b'{"errors":["http: request body too large"]}'
TOKEN_HEADER: Final = istr("X-Vault-Token")
MISS_REFRESH: Final = 1.0  # at most one mount-table re-read a second for unknown mounts

HEADERS: Final = CIMultiDictProxy(
    CIMultiDict({hdrs.CONTENT_TYPE: "application/json", hdrs.CACHE_CONTROL: "no-store"})
)
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})


def respond(status: int, body: bytes | None) -> web.Response:
    if body is None or status in (204, 304) or status < 200:
        return web.Response(status=status, headers=HEADERS)
    return web.Response(status=status, body=body, headers=HEADERS)


_ENCODE: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> bytes:
    return _ENCODE(value).encode("utf-8", "surrogatepass")


def error_body(errors: list[str]) -> bytes:
    return dumps({"errors": errors})


def sidecar_error(status: int, message: str) -> web.Response:
    """The errors the sidecar answers on vault_like's routes, in Vault's ``{"errors": [...]}`` shape.

    A body over ``max_request_bytes`` is refused by the sidecar before the handler runs when its
    Content-Length says so; OpenBao answers that with exactly this 413 body, and so do we (a
    chunked body over the limit reaches :meth:`VaultApi.handle`, which answers the same).
    """
    if status == 413:
        return respond(413, TOO_LARGE)
    if status == 500:
        return respond(500, INTERNAL)
    return respond(status, error_body([message]))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Python's default limit for str-to-int conversion (sys.int_info.default_max_str_digits).
MAX_INT_DIGITS = 4300


def _bounded_int(text: str) -> int:
    """A JSON integer; one of more digits than Python converts (4300) is refused with our own words
    (the interpreter's message names its settings)."""
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"number {text[:40]}... is out of range ({len(text)} digits)")
    return int(text)


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a float (1e400) is refused, as OpenBao refuses
    it, instead of becoming infinity and being stored and answered as ``Infinity`` (not JSON)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body ({} when empty). VaultError 400 with Vault's prefix otherwise."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VaultError(400, "failed to decode JSON input: the body is not valid UTF-8") from None
    try:
        doc: Any = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except RecursionError:
        raise VaultError(400, "failed to decode JSON input: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError's text names a position, never the input
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise VaultError(400, f"failed to decode JSON input: {reason}{where}") from None
    if not isinstance(doc, dict):
        raise VaultError(400, "failed to decode JSON input: the body must be a JSON object")
    if len(raw) > 2 * MAX_JSON_DEPTH and _deeper_than(doc, MAX_JSON_DEPTH):  # shorter cannot be
        raise VaultError(400, f"failed to decode JSON input: nested deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):
        return _without_lone_surrogates(doc)
    return doc


# Deeper documents would exhaust Python's stack in the code that walks them (audit hashing,
# storage encoding, merge patches): refused up front with a clear error.
MAX_JSON_DEPTH: Final = 100
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _deeper_than(doc: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _without_lone_surrogates(doc: dict[str, Any]) -> dict[str, Any]:
    """Lone surrogate escapes (``"\\ud800"``) become U+FFFD, as Go's encoding/json makes them.

    Python keeps them as code points that cannot be encoded to UTF-8, so a storage key or a log
    line built from one would fail; a paired escape is already one character and is untouched.
    """

    def fix(text: str) -> str:
        return _SURROGATE.sub("\ufffd", text)

    root: list[Any] = [doc]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        container, slot = stack.pop()
        value = container[slot]
        if isinstance(value, str):
            container[slot] = fix(value)
        elif isinstance(value, list):
            stack.extend((value, index) for index in range(len(value)))
        elif isinstance(value, dict):
            if any(_SURROGATE.search(key) for key in value):
                value = container[slot] = {fix(key): item for key, item in value.items()}
            stack.extend((value, key) for key in value)
    result: dict[str, Any] = root[0]
    return result


def query_data(query: Mapping[str, str], multi: Any) -> dict[str, Any]:
    """Vault's parseQuery: one value a string, repeated values a list."""
    data: dict[str, Any] = {}
    for key in query:
        values = multi.getall(key)
        data[key] = values[0] if len(values) == 1 else list(values)
    return data


def check_path(path: str) -> None:
    """Refuse non-canonical paths: an ACL must judge exactly the path the backend serves."""
    body = path[:-1] if path.endswith("/") else path
    if body and any(part in ("", ".", "..") for part in body.split("/")):
        raise VaultError(400, "invalid request path: empty, '.' and '..' segments are not allowed")
    if "\x00" in path:
        raise VaultError(400, "invalid request path")
    if not path.isascii():
        try:
            path.encode()
        except UnicodeEncodeError:  # raw bytes the HTTP parser passed through as surrogates
            raise VaultError(400, "invalid request path: not valid UTF-8") from None


class VaultApi:
    """The ``/v1/`` handler of one :class:`~.service.VaultService`."""

    def __init__(self, service: VaultService) -> None:
        self.service = service
        self.log = service.log
        self._last_refresh = 0.0
        self._next_uuid = uuid4_strings().__next__

    def routes(self) -> list[Route]:
        limit = self.service.max_request_bytes
        return [
            Route(
                method,
                PATH,
                self.handle,
                sensitive=True,
                max_body_bytes=limit,
                name=f"vault_{method.lower()}",
                error_response=sidecar_error,
            )
            for method in METHODS
        ]

    # ------------------------------------------------------------------ the handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except VaultError as exc:
            return self._render_error(exc, request.get(VAULT_REQUEST_ID, ""))
        except web.HTTPRequestEntityTooLarge:
            return respond(413, TOO_LARGE)
        except RequestPayloadError:  # a Content-Encoding or chunked body that does not decode
            return respond(400, error_body(["failed to read the request body: its encoding is not valid"]))
        except Exception as exc:
            return self._internal(request, exc)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        service = self.service
        # Vault's request ids are UUIDs (clients and the compat suite expect one); the audit log
        # carries it, and the sidecar's own X-Request-Id stays on the response for its logs.
        request_id = request[VAULT_REQUEST_ID] = self._next_uuid()
        path: str = request.match_info.get("path", "")
        method = request.method
        if path in UNAUTHENTICATED:
            return await self._unauthenticated(path, method, request)
        state = service.state
        if state is None:
            return respond(503, SEALED)
        check_path(path)

        # The operation, and the request's data.
        query = request.query
        operation: Operation
        if method == "GET":
            operation = "list" if query.get("list", "") in _TRUE else "read"
        elif method == "LIST":
            operation = "list"
        elif method in ("POST", "PUT"):
            operation = "update"
        elif method == "PATCH":
            operation = "patch"
        elif method == "DELETE":
            operation = "delete"
        else:  # HEAD (aiohttp routes it with GET) on anything but sys/health
            raise unsupported_operation()
        if operation == "list" and not path.endswith("/"):
            path += "/"  # as Vault: a list is of a directory, and the ACL sees it so
        elif path.endswith("/") and operation in ("update", "patch"):
            # As Vault, for every path. A backend that trimmed the slash would serve a path the
            # ACL never judged: `deny` on auth/token/create must hold for auth/token/create/ too.
            raise VaultError(400, "cannot write to a path ending in '/'")
        if operation in ("update", "patch"):
            data = parse_body(await request.read())
        else:
            data = query_data(query, query)
            data.pop("list", None)

        # Who is asking.
        token = request.headers.get(TOKEN_HEADER) or _bearer(request.headers.get(hdrs.AUTHORIZATION))
        entry = None
        if token and len(token) <= MAX_TOKEN_CHARS:
            entry = await state.tokens.lookup(token)

        # Where it goes.
        backend: Backend | None
        mount_point, mount_type, relative = "", "", path
        if path.startswith("sys/") or path == "sys":
            backend, mount_point, mount_type, relative = service.sys, "sys/", "system", path[4:]
        elif path.startswith("auth/token/") or path == "auth/token":
            backend, mount_point, mount_type, relative = state.tokens, "auth/token/", "token", path[11:]
        else:
            found = state.mounts.match(path)
            if found is None:
                found = await self._refresh_for(path)
            if found is None:
                backend = None
            else:
                mount, backend = found
                mount_point, mount_type = mount.path, mount.type
                relative = path[len(mount.path) :] if path.startswith(mount.path) else ""
        logical = LogicalRequest(
            operation=operation,
            path=relative,
            data=data,
            query=query,
            mount_path=mount_point,
            request_id=request_id,
            token=entry,
            content_type=request.headers.get(hdrs.CONTENT_TYPE, ""),
        )

        audit = service.audit
        auth_block: dict[str, Any] = {}
        request_block: dict[str, Any] = {}
        if audit is not None:
            auth_block = audit.auth_block(token, entry)
            request_block = audit.request_block(
                request_id=logical.request_id,
                operation=operation,
                path=path,
                mount_point=mount_point,
                mount_type=mount_type,
                token=token,
                entry=entry,
                data=data,
                remote=request.remote,
                auth=auth_block,
            )

        if entry is None:
            error = VaultError(403, "permission denied")
            await self._audit(auth_block, request_block, error=error)
            return self._render_error(error, request_id)
        if entry.num_uses:
            await state.tokens.use(entry)  # spent before the ACL check, as in Vault

        if backend is not None and operation == "update":
            exists = await backend.existence(logical)
            if exists is False:
                logical.operation = operation = "create"
                if request_block:
                    request_block["operation"] = operation
        if not path.startswith("sys/internal/ui/mounts/"):  # that path checks access itself
            acl = await state.tokens.acl_for(entry)
            if not acl.allowed(path, operation, sudo=path in SUDO_PATHS):
                error = permission_denied()
                await self._audit(auth_block, request_block, error=error)
                return self._render_error(error, request_id)
        if backend is None:
            error = VaultError(404, f'no handler for route "{path}". route entry not found.')
            await self._audit(auth_block, request_block, error=error)
            return self._render_error(error, request_id)

        if audit is not None:
            try:
                await audit.log_request(auth_block, request_block)
            except AuditError:
                return respond(500, AUDIT_FAILED)  # nothing ran: fail closed
        try:
            response = await backend.handle(logical)
        except VaultError as exc:
            await self._audit_response(
                auth_block, request_block, exc.status, exc.data, None, None, _error_text(exc)
            )
            return self._render_error(exc, request_id)
        except Exception:
            # The request ran (perhaps partly): its response entry says it failed before any answer
            # leaves, as Vault's does. The 500 itself is rendered by handle().
            await self._audit_response(auth_block, request_block, 500, None, None, None, "internal error")
            raise
        status = response.status or (200 if _has_body(response) else 204)
        await self._audit_response(
            auth_block, request_block, status, response.data, response.auth, response.warnings, ""
        )
        legacy = mount_type == "system" and is_legacy(relative)
        return self._render(response, status, logical.request_id, mount_type, legacy)

    async def _unauthenticated(self, path: str, method: str, request: web.Request) -> web.StreamResponse:
        sys = self.service.sys
        response: LogicalResponse
        if path == "sys/health" and method in ("GET", "HEAD"):
            response = sys.health(request.query)
        elif path == "sys/seal-status" and method == "GET":
            response = sys.seal_status()
        elif path == "sys/leader" and method == "GET":
            response = sys.leader()
        elif path == "sys/init" and method == "GET":
            response = sys.init_status()
        elif path == "sys/init" and method in ("PUT", "POST"):
            parse_body(
                await request.read()
            )  # key-share parameters have no meaning here; the body must still parse
            response = await sys.init()
        else:
            return respond(405, b'{"errors":[]}')
        return respond(response.status or 200, response.raw)

    async def _refresh_for(self, path: str) -> Any:
        """An unknown mount: another replica may have made it. Re-read the table, rate-limited."""
        state = self.service.state
        now = time.monotonic()
        if state is None or now - self._last_refresh < MISS_REFRESH:
            return None
        self._last_refresh = now
        await state.mounts.load()
        return state.mounts.match(path)

    # ------------------------------------------------------------------ audit

    async def _audit(self, auth: dict[str, Any], request: dict[str, Any], error: VaultError) -> None:
        """A request refused before any backend ran: both entries, best effort (nothing ran)."""
        audit = self.service.audit
        if audit is None:
            return
        text = _error_text(error)
        try:
            await audit.log_request(auth, request, error=text)
            await audit.log_response(auth, request, status=error.status, error=text)
        except AuditError:
            pass  # the refusal stands either way; the failure itself is logged by the audit log

    async def _audit_response(
        self,
        auth: dict[str, Any],
        request: dict[str, Any],
        status: int,
        data: Any,
        response_auth: Mapping[str, Any] | None,
        warnings: list[str] | None,
        error: str,
    ) -> None:
        audit = self.service.audit
        if audit is None:
            return
        # AuditError propagates: the answer is withheld (the handler renders a 500 below).
        try:
            await audit.log_response(
                auth,
                request,
                status=status,
                data=data,
                response_auth=response_auth,
                warnings=warnings,
                error=error,
            )
        except AuditError:
            raise _AuditResponseFailed() from None

    # ------------------------------------------------------------------ rendering

    def _render(
        self, response: LogicalResponse, status: int, request_id: str, mount_type: str, legacy: bool
    ) -> web.Response:
        if response.raw is not None:
            return respond(status, response.raw)
        if status == 204:
            return respond(204, None)
        body: dict[str, Any] = {
            "request_id": request_id,
            "lease_id": "",
            "renewable": response.renewable,
            "lease_duration": response.lease_duration,
            "data": response.data,
            "wrap_info": None,
            "warnings": response.warnings,
            "auth": response.auth,
            "mount_type": mount_type,
        }
        if legacy and response.data:
            body = {**response.data, **body}
        return respond(status, dumps(body))

    def _render_error(self, exc: VaultError, request_id: str) -> web.Response:
        if exc.data is not None:  # KV's soft-deleted read: 404 with the whole envelope
            body = {
                "request_id": request_id,
                "lease_id": "",
                "renewable": False,
                "lease_duration": 0,
                "data": exc.data,
                "wrap_info": None,
                "warnings": None,
                "auth": None,
            }
            return respond(exc.status, dumps(body))
        if exc.status == 503 and exc.errors == ["Vault is sealed"]:
            return respond(503, SEALED)
        return respond(exc.status, error_body(exc.errors))

    def _internal(self, request: web.Request, exc: Exception) -> web.Response:
        from plugins.vault_like.barrier import BarrierError, SealedError
        from plugins.vault_like.storage import StorageError

        if isinstance(exc, _AuditResponseFailed):
            return respond(500, AUDIT_FAILED)
        if isinstance(exc, SealedError):
            return respond(503, SEALED)
        request_id = request.get(REQUEST_ID, "")
        if isinstance(exc, BarrierError | StorageError):
            # Their messages are safe by contract (no values, no paths).
            event(self.log, logging.ERROR, "vault_storage_error", request_id=request_id,
                  error=type(exc).__name__, detail=str(exc))  # fmt: skip
            return respond(500, INTERNAL)
        frames = traceback.extract_tb(exc.__traceback__)
        where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in frames[-3:]]
        event(self.log, logging.ERROR, "vault_internal_error", request_id=request_id,
              error=type(exc).__name__, where=where)  # fmt: skip
        return respond(500, INTERNAL)


class _AuditResponseFailed(Exception):
    """The response entry could not be written: the answer must not leave unaudited."""


def uuid4_strings(batch: int = 256) -> Iterator[str]:
    """Random (version 4) UUIDs as strings, as ``str(uuid.uuid4())`` gives, drawn ``batch`` at a time.

    One ``os.urandom`` call per batch instead of a call and a ``UUID`` object per request.
    """
    while True:
        pool = os.urandom(16 * batch)
        for i in range(0, 16 * batch, 16):
            raw = bytearray(pool[i : i + 16])
            raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
            raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
            h = raw.hex()
            yield f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def _has_body(response: LogicalResponse) -> bool:
    return (
        response.data is not None
        or bool(response.warnings)
        or response.auth is not None
        or response.raw is not None
    )


def _error_text(exc: VaultError) -> str:
    return "; ".join(exc.errors) if exc.errors else f"HTTP {exc.status}"
