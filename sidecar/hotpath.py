"""The aiohttp fields the sidecar's per-request code reads directly, checked once at start-up.

On Python 3.11 every property read re-enters the interpreter (~1,300 instructions), where reading
the field behind it costs a few dozen. The route wrappers and the access log would read up to
eight properties a request: together ~3% of the health route's throughput (bench/RESULTS.md).
So they read the fields instead: ``BaseRequest._method``, ``._payload`` (for ``body_exists``) and
``._state`` (``request[key] = ...``), ``Request._match_info`` and its ``_route``, and
``StreamResponse._status``, ``._body_length`` and ``._headers``.

They are private. :func:`check_aiohttp` checks on a real request and response that each still
holds what its property returns, and the sidecar refuses to start, naming the field, on an aiohttp
where one does not, instead of answering every request with a 500. tests/test_hotpath.py runs the
same check against the installed aiohttp.

Building a response is the other cost: ``web.Response(body=..., headers=...)`` runs ~7,000
instructions (keyword arguments through ``type.__call__`` and ``super().__init__``, two property
setters), about 3.5% of a health check. :class:`ResponseTemplate` runs aiohttp's constructor once
and sets the same fields on each new response; it checks itself and falls back to the constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD, EmptyStreamReader
from aiohttp.test_utils import make_mocked_request  # aiohttp's own way to build a request
from multidict import CIMultiDict, CIMultiDictProxy

PROBE_STATUS: Final = 299
PROBE_BODY: Final = b"probe"
PROBE_KEY: Final = web.RequestKey("hotpath_probe", str)


class UnsupportedAiohttp(Exception):
    """The installed aiohttp keeps a field the per-request code reads somewhere else."""


def aiohttp_disagreements() -> list[str]:
    """The private fields that no longer hold what their public property returns (none: fine)."""
    problems: set[str] = set()

    def agree(field: str, read: object, public: object) -> None:
        if read != public:
            problems.add(field)

    response = web.Response(status=PROBE_STATUS, body=PROBE_BODY, headers={"X-Probe": "1"})
    agree("StreamResponse._status", getattr(response, "_status", None), response.status)
    agree("StreamResponse._body_length", getattr(response, "_body_length", None), response.body_length)
    agree("StreamResponse._headers", getattr(response, "_headers", None) is response.headers, True)
    a_body: Any = object()  # any payload but aiohttp's empty one means the request has a body
    for payload in (EMPTY_PAYLOAD, a_body):
        request = make_mocked_request("PATCH", "/probe", payload=payload)
        agree("BaseRequest._method", getattr(request, "_method", None), request.method)
        has_body = type(getattr(request, "_payload", None)) is not EmptyStreamReader
        agree("BaseRequest._payload", has_body, request.body_exists)
    request = make_mocked_request("GET", "/probe")  # routed, to a stand-in route
    agree("Request._match_info", getattr(request, "_match_info", None) is request.match_info, True)
    route = request.match_info.route
    agree("UrlMappingMatchInfo._route", getattr(request.match_info, "_route", None) is route, True)
    request[PROBE_KEY] = "probe"
    agree("BaseRequest._state", getattr(request, "_state", {}).get(PROBE_KEY), request.get(PROBE_KEY))
    return sorted(problems)


def check_aiohttp() -> None:
    """Raise :class:`UnsupportedAiohttp` unless every field the hot path reads agrees."""
    problems = aiohttp_disagreements()
    if problems:
        raise UnsupportedAiohttp(
            f"aiohttp {aiohttp.__version__} does not keep {', '.join(problems)} as the sidecar expects "
            "(it reads them on every request); install an aiohttp whose fields agree (3.14 does)"
        )


_new_response = web.Response.__new__


class ResponseTemplate:
    """Responses with one status and one set of headers, each with its own body, built quickly.

    ``template.response(body)`` returns what ``web.Response(status=..., headers=..., body=body)``
    returns (``body`` must be ``bytes``), for about a third of the cost: the fields aiohttp's
    constructor sets are set directly, with values taken from one response it built here. Each
    response has its own headers (a copy: a handler may add to them), request state and body.

    Fail safe: the template builds one response each way on construction and compares all their
    fields. If aiohttp's ``Response`` gains, loses or renames a field, or stops keeping its fields
    in the instance, they differ and the template uses the constructor for every response
    instead: slower, never wrong.
    """

    __slots__ = ("_copies", "_reason", "_zlib_executor_size", "headers", "status")

    def __init__(self, headers: Mapping[str, str], status: int = 200) -> None:
        self.status = status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(headers))
        built = self._construct(b"")
        self._reason: str = getattr(built, "_reason", "")
        self._zlib_executor_size: int = getattr(built, "_zlib_executor_size", 0)
        self._copies = True
        self._copies = self._agrees()

    @property
    def copies(self) -> bool:
        """Whether responses are built directly (False: by the constructor, each one)."""
        return self._copies

    def response(self, body: bytes) -> web.Response:
        if not self._copies:
            return self._construct(body)
        response = _new_response(web.Response)
        # What Response.__init__ sets, in its order, one attribute at a time: touching __dict__
        # would turn the instance's inline values into a dict, and slow every later field read.
        response._state = {}
        response._headers = CIMultiDict(self.headers)
        response._status = self.status
        response._reason = self._reason
        response._body = body
        response._compressed_body = None
        response._zlib_executor_size = self._zlib_executor_size
        response._zlib_executor = None
        return response

    def _construct(self, body: bytes) -> web.Response:
        return web.Response(status=self.status, headers=self.headers, body=body)

    def _agrees(self) -> bool:
        try:
            direct, built = self.response(PROBE_BODY), self._construct(PROBE_BODY)
            return type(direct) is type(built) and vars(direct) == vars(built)
        except (AttributeError, TypeError):  # a slotted Response: no such field, or no vars()
            return False
