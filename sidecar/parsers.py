"""Which HTTP request parser a listener gets: aiohttp's C parser (llhttp), or its pure-Python one.

aiohttp parses requests with llhttp when its C extensions are built. llhttp knows a fixed list of
methods (GET, POST, ..., the WebDAV ones, QUERY) and answers anything else, such as Vault's
``LIST``, with a 400 before any handler runs. aiohttp's pure-Python parser
(``aiohttp.http_parser.HttpRequestParserPy``) accepts any method that is an RFC 9110 token; both
are aiohttp's own, maintained and tested against the same suite. The C parser is several times
faster, so a listener gets the Python one only when one of its routes uses a method llhttp
rejects (:func:`needs_python_parser`, which asks llhttp itself); every other listener keeps llhttp.

aiohttp has no public switch for this per server (``AIOHTTP_NO_EXTENSIONS`` is process-wide), so
:class:`PythonParserAppRunner` relies on these aiohttp internals (aiohttp 3.14), each pinned by
``tests/test_server_parsers.py`` so that an aiohttp upgrade that changes one fails loudly:

- ``AppRunner._make_server()`` builds the ``web.Server`` (the protocol factory a site listens
  with); the runner here calls it, then re-creates the server as a :class:`PythonParserServer`
  with the same request handler, request factory and keyword arguments (``Server._kwargs``,
  ``Server._loop``: what ``Server.__call__`` passes to each connection's ``RequestHandler``).
- ``RequestHandler.__init__`` builds its parser as ``HttpRequestParser(self, loop, read_bufsize,
  max_line_size=..., max_field_size=..., max_headers=..., payload_exception=RequestPayloadError,
  auto_decompress=..., max_msg_queue_size=MAX_MSG_QUEUE_SIZE)`` and keeps it in
  ``BaseProtocol._parser``; :class:`PythonParserRequestHandler` replaces it with the Python
  parser built from the same arguments (defaults read from ``RequestHandler.__init__``'s
  signature), so the header, line and queue limits stay the same.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Iterable
from typing import Any

from aiohttp import http_exceptions, web, web_protocol
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

__all__ = [
    "PythonParserAppRunner",
    "PythonParserRequestHandler",
    "PythonParserServer",
    "llhttp_accepts",
    "needs_python_parser",
]

# RequestHandler's own defaults for the settings its parser is built from.
_HANDLER_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in inspect.signature(RequestHandler.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}
_PARSER_SETTINGS = ("read_bufsize", "max_line_size", "max_field_size", "max_headers", "auto_decompress")


@functools.lru_cache(maxsize=64)
def llhttp_accepts(method: str) -> bool:
    """Whether aiohttp's default request parser (llhttp when the C extension is built) takes ``method``.

    Asked of the parser itself, with a minimal request, so the answer follows llhttp's version.
    Without the C extension aiohttp's default is the Python parser, which takes every token.
    """
    if HttpRequestParser is HttpRequestParserPy:
        return True
    loop = asyncio.new_event_loop()  # the parser wants a loop; it is never run
    try:
        parser = HttpRequestParser(None, loop, 2**16)
        parser.feed_data(f"{method} / HTTP/1.1\r\nHost: probe\r\n\r\n".encode("ascii"))
    except http_exceptions.HttpProcessingError:  # BadHttpMethod, or BadStatusLine for "PRI"
        return False
    finally:
        loop.close()
    return True


def needs_python_parser(methods: Iterable[str]) -> bool:
    """Whether a listener serving these route methods needs the Python parser ("*" is any method)."""
    return any(m != "*" and not llhttp_accepts(m) for m in methods)


class PythonParserRequestHandler(RequestHandler):
    """aiohttp's connection handler, parsing requests with the pure-Python parser."""

    __slots__ = ()

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        settings = {name: kwargs.get(name, _HANDLER_DEFAULTS[name]) for name in _PARSER_SETTINGS}
        self._parser = HttpRequestParserPy(
            self,
            loop,
            settings["read_bufsize"],
            max_line_size=settings["max_line_size"],
            max_field_size=settings["max_field_size"],
            max_headers=settings["max_headers"],
            payload_exception=RequestPayloadError,
            auto_decompress=settings["auto_decompress"],
            max_msg_queue_size=web_protocol.MAX_MSG_QUEUE_SIZE,
        )


class PythonParserServer(web.Server):
    """A ``web.Server`` whose connections use :class:`PythonParserRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return PythonParserRequestHandler(self, loop=self._loop, **self._kwargs)

    @classmethod
    def like(cls, server: web.Server) -> PythonParserServer:
        """A server that handles requests exactly as ``server`` does, with the Python parser."""
        return cls(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


class PythonParserAppRunner(web.AppRunner):
    """An ``AppRunner`` (same arguments) whose listeners parse requests with the Python parser."""

    async def _make_server(self) -> web.Server:
        return PythonParserServer.like(await super()._make_server())
