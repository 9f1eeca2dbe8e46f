"""The aiohttp side: one application per listener, plugin lifespans, health and readiness.

:class:`Runtime` is built from the validated manifest and settings and a loaded plugin manager. It
checks every plugin's config, collects routes (refusing conflicts), and then serves: one
``AppRunner`` per listener, each application made by :func:`create_app`. Plugin start-ups run in
the background once the listeners are open, so ``/enclave/ready`` can say 503 while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import itertools
import json
import logging
import os
import re
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pluggy
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.streams import EmptyStreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import ConfigError, Manifest, Settings
from sidecar.context import PluginContext, Services
from sidecar.hotpath import ResponseTemplate, check_aiohttp
from sidecar.logs import REQUEST_ID_HEADER, AccessLogSink, access_logger_class, event
from sidecar.parsers import PythonParserAppRunner, needs_python_parser
from sidecar.plugins import CORE_PLUGINS, PluginError, PluginInfo, call_plugin
from sidecar.routes import ErrorResponse, Handler, Listener, Route
from sidecar.schema import Map, SchemaError

if TYPE_CHECKING:
    from sidecar.supervise import Supervisor

log = logging.getLogger("sidecar.server")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
LISTENER: web.AppKey[Listener] = web.AppKey("listener", Listener)

HEALTH_PATH = "/enclave/health"
READY_PATH = "/enclave/ready"
RESERVED_PATHS = (HEALTH_PATH, READY_PATH)
JSON = "application/json"
# Response copies the headers it is given: one shared, read-only set is cheaper than content_type=.
JSON_HEADERS = CIMultiDictProxy(CIMultiDict({hdrs.CONTENT_TYPE: JSON}))
# An HTTP method is a token (RFC 9110 section 9.1, tchar): e.g. GET, or Vault's LIST.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class PluginStartupError(Exception):
    """Raise from a plugin's lifespan to fail start-up with a reason that is safe to show publicly.

    Its message appears in ``/enclave/ready``. Any other exception is reported there only by type,
    with the detail in the log.
    """


class Status(enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    STARTED = "started"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class PluginState:
    name: str
    context: PluginContext
    status: Status = Status.PENDING
    reason: str = ""
    generator: AsyncIterator[None] | None = field(default=None, repr=False)


def json_error(status: int, message: str, request_id: str | None = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": message, **extra}
    if request_id:
        body["request_id"] = request_id
    return web.Response(status=status, body=json.dumps(body).encode(), headers=JSON_HEADERS)


class Runtime:
    """One sidecar: its listeners, plugins and their lifecycle."""

    def __init__(
        self,
        manifest: Manifest,
        settings: Settings,
        pm: pluggy.PluginManager,
        infos: Mapping[str, PluginInfo],
        services: Services | None = None,
        bind_ports: Mapping[int, int] | None = None,
    ) -> None:
        self.manifest = manifest
        self.settings = settings
        self.pm = pm
        self.infos = dict(infos)
        self.services = services or Services()
        self.bind_ports = dict(bind_ports or {})
        self.listeners = self._listeners()
        if not self.listeners:
            raise ConfigError(manifest.path, "ingress", "the manifest declares no ingress or api listener")
        self.schemas: dict[str, Map | None] = {}
        self.plugins: dict[str, PluginState] = {}
        for name in infos:
            self.plugins[name] = PluginState(name, self._context(name))
        self.routes: dict[Listener, list[tuple[str, Route]]] = self._collect_routes()
        self.runners: dict[Listener, web.AppRunner] = {}
        self.access_sink = AccessLogSink()
        self.startup_done = asyncio.Event()
        self._startup_task: asyncio.Task[None] | None = None
        self.request_ids = request_ids()

    # ------------------------------------------------------------------ building

    def _listeners(self) -> list[Listener]:
        listeners = [Listener("ingress", port) for port in self.manifest.ingress_ports]
        if self.manifest.api_port is not None:
            listeners.append(Listener("api", self.manifest.api_port))
        return listeners

    def _context(self, name: str) -> PluginContext:
        entry = self.settings.plugins.get(name)
        raw = entry.config if entry else {}
        label = self.settings.path or "sidecar.yaml"
        schemas = call_plugin(self.pm, name, "register_config_schema")
        schema = schemas[0] if schemas else None
        if schema is not None and not isinstance(schema, Map):
            raise PluginError(name, "register_config_schema must return a sidecar.schema.Map or None")
        self.schemas[name] = schema
        path = f"plugins.{name}.config"
        if schema is None:
            if raw:
                raise ConfigError(label, path, "this plugin takes no settings")
            config: dict[str, Any] = {}
        else:
            try:
                config = schema.check(raw, path)
            except SchemaError as exc:
                raise ConfigError.from_schema(label, exc) from None
        port = entry.listen_port if entry and entry.listen_port else None
        if port is None and self.manifest.ingress_ports:
            port = self.manifest.ingress_ports[0]
        return PluginContext(name, config, port, self.settings.state_dir, self.services)

    def _collect_routes(self) -> dict[Listener, list[tuple[str, Route]]]:
        routes: dict[Listener, list[tuple[str, Route]]] = {li: [] for li in self.listeners}
        for listener in self.listeners:
            claimed: dict[tuple[str, str], str] = {}
            for name, state in self.plugins.items():
                core = name in CORE_PLUGINS
                if not core and (
                    listener.audience != "ingress" or state.context.listen_port != listener.port
                ):
                    continue
                for batch in call_plugin(
                    self.pm, name, "register_routes", listener=listener, context=state.context
                ):
                    if not isinstance(batch, Iterable):  # e.g. one Route, not a list of them
                        got = f"register_routes returned a {type(batch).__name__}"
                        raise PluginError(name, f"{got}, expected a list of Routes")
                    for route in batch:
                        if not isinstance(route, Route):
                            raise PluginError(
                                name, f"register_routes returned {route!r}, expected Route objects"
                            )
                        self._claim(claimed, listener, name, route)
                        routes[listener].append((name, route))
        return routes

    @staticmethod
    def _claim(claimed: dict[tuple[str, str], str], listener: Listener, name: str, route: Route) -> None:
        method = route.method.upper()
        if method != "*" and not _TOKEN.fullmatch(method):
            # What no HTTP parser can deliver could never be requested (RFC 9110 method token).
            raise PluginError(name, f"route method {route.method!r} is not an HTTP method name")
        if not route.path.startswith("/"):
            raise PluginError(name, f"route path {route.path!r} must start with '/'")
        if route.path in RESERVED_PATHS:
            raise PluginError(
                name, f"route {method} {route.path} on {listener.name} is reserved by the sidecar"
            )
        try:
            key = _path_key(route.path)
        except ValueError:  # aiohttp's own check, run here so that the error names the plugin
            raise PluginError(name, f"route path {route.path!r} is not a valid route pattern") from None
        # A GET route answers HEAD too; "*" takes every method.
        methods = {method, "HEAD"} if method == "GET" else {method}
        for (other_method, path), owner in claimed.items():
            if path == key and ("*" in (method, other_method) or other_method in methods):
                who = "itself twice" if owner == name else f"plugin {owner!r} too"
                raise PluginError(name, f"route {method} {route.path} on {listener.name} is claimed by {who}")
        for each in methods:
            claimed[(each, key)] = name

    def routes_of(self, plugin: str) -> list[tuple[Listener, Route]]:
        return [(li, r) for li, items in self.routes.items() for owner, r in items if owner == plugin]

    # ------------------------------------------------------------------ readiness

    def readiness(self) -> tuple[bool, dict[str, str]]:
        report: dict[str, str] = {}
        ready = True
        for name, state in self.plugins.items():
            if state.status is Status.STARTED:
                try:
                    reasons = call_plugin(self.pm, name, "readiness", context=state.context)
                except Exception:
                    log.exception("readiness hook failed", extra={"sidecar_fields": {"plugin": name}})
                    reasons = ["readiness check failed (details in the log)"]
                status = reasons[0] if reasons else "ready"
                ready = ready and not reasons
            else:
                status = state.reason or state.status.value
                ready = False
            if name not in CORE_PLUGINS or status != "ready":  # core plugins show up only when unwell
                report[name] = status
        return ready, report

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.plugins.items() if s.status is Status.FAILED]

    # ------------------------------------------------------------------ plugin lifespans

    async def _start_plugins(self) -> None:
        try:
            for name, state in self.plugins.items():
                await self._start_one(name, state)
        finally:
            self.startup_done.set()
        if self.failed:
            self.services.announce("fatal", error=f"plugins failed to start: {', '.join(self.failed)}")
        else:
            self.services.announce("ready")

    async def _start_one(self, name: str, state: PluginState) -> None:
        state.status = Status.STARTING
        event(log, logging.INFO, "plugin_starting", plugin=name)
        try:
            gens = call_plugin(self.pm, name, "lifespan", context=state.context)
            if gens:
                state.generator = gens[0]
                if not hasattr(state.generator, "__anext__"):
                    raise PluginError(name, "lifespan must be an async generator function with one yield")
                await anext(state.generator)
        except StopAsyncIteration:
            state.status, state.reason = Status.FAILED, "failed to start: lifespan ended without yielding"
        except PluginStartupError as exc:
            state.status, state.reason = Status.FAILED, f"failed to start: {exc}"
        except asyncio.CancelledError:
            state.status, state.reason = Status.FAILED, "start-up cancelled"
            raise
        except Exception as exc:
            log.error(
                "plugin_start_failed",
                exc_info=True,
                extra={"sidecar_fields": {"plugin": name, "error": f"{type(exc).__name__}: {exc}"}},
            )
            state.status = Status.FAILED
            state.reason = f"failed to start: {type(exc).__name__} (details in the log)"
        else:
            state.status = Status.STARTED
            event(log, logging.INFO, "plugin_started", plugin=name)
            return
        if state.reason and "details in the log" not in state.reason:
            event(log, logging.ERROR, "plugin_start_failed", plugin=name, error=state.reason)

    async def _stop_plugins(self) -> None:
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._startup_task
        # A clean-up that hangs (a peer that never answers) must not keep the process from exiting:
        # each plugin gets shutdown_timeout seconds (at least one), then the next one runs.
        limit = max(1, self.settings.shutdown_timeout)
        for name, state in reversed(self.plugins.items()):
            gen, state.generator = state.generator, None
            if gen is None:
                continue
            try:
                async with asyncio.timeout(limit):
                    if state.status is Status.STARTED:
                        await anext(gen)
                        event(
                            log,
                            logging.ERROR,
                            "plugin_cleanup_failed",
                            plugin=name,
                            error="lifespan yielded twice",
                        )
                    await gen.aclose()  # type: ignore[attr-defined]
            except StopAsyncIteration:
                event(log, logging.INFO, "plugin_stopped", plugin=name)
            except TimeoutError:
                error = f"clean-up did not finish within {limit} s (shutdown_timeout); abandoned"
                event(log, logging.ERROR, "plugin_cleanup_failed", plugin=name, error=error)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the shutdown itself is cancelled
                # The plugin's own (it awaited a task it had just cancelled): a failed clean-up like
                # any other, which must not skip the other plugins' nor the sidecar's exit code.
                event(log, logging.ERROR, "plugin_cleanup_failed", plugin=name, error="CancelledError")
            except Exception as exc:
                log.error(
                    "plugin_cleanup_failed",
                    exc_info=True,
                    extra={"sidecar_fields": {"plugin": name, "error": f"{type(exc).__name__}: {exc}"}},
                )
            state.status = Status.STOPPED

    async def plugin_lifespans(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx of the primary application: plugins start after it serves, stop at its end."""
        self.access_sink.start()
        self._startup_task = asyncio.get_running_loop().create_task(self._start_plugins())
        yield
        await self._stop_plugins()
        await self.access_sink.close()

    # ------------------------------------------------------------------ serving

    async def start(self) -> None:
        """Open every listener, then start the plugins in the background."""
        check_aiohttp()  # before anything listens: every request reads what it checks
        if not HEALTH_ANSWER.copies:  # still correct, but each response costs the constructor again
            event(log, logging.WARNING, "response_template_off", aiohttp=aiohttp.__version__)
        primary = self.listeners[0]
        try:
            # Secondary listeners first, so the primary's cleanup_ctx (plugin start-up) runs last.
            for listener in [*self.listeners[1:], primary]:
                app = create_app(self, listener, primary=listener == primary)
                # llhttp answers 400 to methods it does not know (Vault's LIST): only a listener
                # with such a route gets aiohttp's slower pure-Python parser (sidecar.parsers).
                methods = (route.method.upper() for _, route in self.routes[listener])
                runner_class = PythonParserAppRunner if needs_python_parser(methods) else web.AppRunner
                runner = runner_class(
                    app,
                    handle_signals=False,
                    access_log_class=access_logger_class(
                        self.access_sink, listener.name, app[SENSITIVE], app[PLAIN_PATHS], app[PUBLIC]
                    ),
                    access_log=logging.getLogger("sidecar.access") if self.settings.access_log else None,
                    shutdown_timeout=self.settings.shutdown_timeout,
                    max_line_size=self.settings.max_line_bytes,
                    max_field_size=self.settings.max_field_bytes,
                )
                self.runners[listener] = runner
                await runner.setup()
                host = "127.0.0.1" if listener.audience == "api" else self.settings.listen_host
                site = web.TCPSite(
                    runner,
                    host,
                    self.bind_ports.get(listener.port, listener.port),
                    ssl_context=self._tls(listener),
                    reuse_address=True,
                )
                await site.start()
                event(log, logging.INFO, "listening", listener=listener.name, address=self.address(listener))
        except OSError as exc:
            await self.stop()
            raise ConfigError(self.manifest.path, "", f"cannot listen: {exc.strerror or exc}") from None
        except BaseException:
            # A TLS key pair that does not load, ...: what already listens (and the plugins the
            # primary started) must not outlive a start that failed; callers only stop a started one.
            await self.stop()
            raise

    def _tls(self, listener: Listener) -> ssl.SSLContext | None:
        if listener.audience != "ingress":
            return None
        index = self.manifest.ingress_ports.index(listener.port)
        tls = self.manifest.ingress[index].tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        base = self.manifest.path.parent
        try:
            ctx.load_cert_chain(base / Path(tls.cert_file), base / Path(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                self.manifest.path, f"ingress[{index}].tls", f"cannot load key pair: {exc}"
            ) from None
        return ctx

    def address(self, listener: Listener) -> str:
        runner = self.runners.get(listener)
        if runner is None or not runner.addresses:
            return ""
        host, port = runner.addresses[0][:2]
        return f"{host}:{port}"

    def bound_port(self, manifest_port: int) -> int:
        for listener, runner in self.runners.items():
            if listener.port == manifest_port and runner.addresses:
                return int(runner.addresses[0][1])
        raise KeyError(f"no listener for port {manifest_port}")

    async def stop(self) -> None:
        """Stop listening, drain requests, then run plugin clean-ups (via the primary's cleanup_ctx)."""
        primary = self.listeners[0]
        for listener in [li for li in self.runners if li != primary] + [
            li for li in self.runners if li == primary
        ]:
            runner = self.runners.pop(listener)
            await runner.cleanup()

    async def serve_forever(self, supervisor: Supervisor | None = None) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or, with ``startup.on_failure: exit``, a failed start (1).

        With a ``supervisor`` (``sidecar run -- CMD``), the app starts once the sidecar is ready,
        SIGTERM/SIGINT go to the app, and the sidecar stops when the app exits, with its exit code.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if supervisor is not None:
                supervisor.stop(sig)  # the app decides when the sidecar stops
            else:
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        code = 0
        # Only the sidecar's own process freezes its heap: an embedding process (tests) keeps its GC.
        freezer = loop.create_task(self._freeze_when_started())
        try:
            await self.start()
            main: asyncio.Future[Any] = asyncio.ensure_future(
                supervisor.run(self) if supervisor is not None else stop.wait()
            )
            waiters: set[asyncio.Future[Any]] = {main}
            if self.settings.on_startup_failure == "exit":
                waiters.add(asyncio.ensure_future(self._wait_for_failure()))
            done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # a cancelled supervisor makes sure its app is not left running
            if main not in done:
                code = 1
                event(log, logging.ERROR, "startup_failed", plugins=self.failed)
            else:
                code = main.result() if supervisor is not None else 0
                event(log, logging.INFO, "shutting_down")
            self.services.announce("stopping")
            self.services.announce("exited", code=code)
        finally:
            freezer.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
        event(log, logging.INFO, "stopped", exit_code=code)
        return code

    async def _freeze_when_started(self) -> None:
        await self.startup_done.wait()
        if not self.failed:
            freeze_heap()

    async def _wait_for_failure(self) -> None:
        await self.startup_done.wait()
        if not self.failed:
            await asyncio.Event().wait()  # started fine: never fire


_GROUP_NAME = re.compile(r"\(\?P<\w+>")


def _path_key(path: str) -> str:
    """What aiohttp matches ``path`` against: one key for ``/x/{id}`` and ``/x/{name:[^{}/]+}``.

    Two such routes are one route: aiohttp sends every request to the first, and the other's
    handler is never reached. Raises ValueError for a path aiohttp refuses.
    """
    info = web.UrlDispatcher().add_resource(path).get_info()
    pattern = info.get("pattern")
    # A variable's name does not change what matches; "~" keeps a pattern apart from a plain path.
    return path if pattern is None else "~" + _GROUP_NAME.sub("(", pattern.pattern)


def freeze_heap() -> None:
    """Exempt everything start-up made (imports, plugins' indexes, SDK models) from the cyclic GC.

    The collector's full passes walk every tracked object; the sidecar's heap is many times a bare
    server's (botocore's service models alone), so without this every full pass, triggered by the
    garbage of ordinary requests, walks it all again (bench/RESULTS.md: ~50,000 instructions per new
    connection). Frozen objects are still freed by reference counting; only cycles among them
    would be kept, and start-up's garbage is collected first so none of it is frozen.
    """
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------- the app factory

SENSITIVE: web.AppKey[set[Any]] = web.AppKey("sensitive", set)
# The fixed paths of the routes that are not sensitive: the access log writes them without a lookup.
PLAIN_PATHS: web.AppKey[frozenset[str]] = web.AppKey("plain_paths", frozenset)
# The routes that are not sensitive: the only ones whose requests' paths the access log writes.
PUBLIC: web.AppKey[frozenset[Any]] = web.AppKey("public_routes", frozenset)
# request[REQUEST_ID] is the id sent in X-Request-Id; plugins put it in their log events.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)


def create_app(runtime: Runtime, listener: Listener, primary: bool = False) -> web.Application:
    """The application for one listener: core routes, plugin routes, the JSON 404/405 fallback.

    There is no middleware: each route's handler is wrapped once, here, with the request id, its
    body limit, the plugin's readiness gate and the error boundary (:func:`wrap_handler`; the
    synchronous core routes with :func:`wrap_core`). A middleware would cost about 8% of
    throughput on its own (bench/RESULTS.md).
    """
    settings = runtime.settings
    routes = runtime.routes.get(listener, [])
    app_limit = max([settings.max_body_bytes] + [r.max_body_bytes or 0 for _, r in routes])
    app = web.Application(client_max_size=app_limit)
    app[RUNTIME] = runtime
    app[LISTENER] = listener
    app[SENSITIVE] = set()

    def add(method: str, path: str, handler: Handler, limit: int, **kwargs: Any) -> web.AbstractRoute:
        wrapped = wrap_handler(runtime, listener, handler, limit, app_limit, **kwargs)
        expect = expect_handler(runtime, limit, **kwargs)
        if method == "GET":  # GET routes answer HEAD too, as aiohttp's add_get does
            return app.router.add_get(path, wrapped, expect_handler=expect)
        return app.router.add_route(method, path, wrapped, expect_handler=expect)

    core_expect = expect_handler(runtime, settings.max_body_bytes)
    for path, core in ((HEALTH_PATH, handle_health), (READY_PATH, handle_ready)):
        app.router.add_get(
            path, wrap_core(runtime, listener, core, settings.max_body_bytes), expect_handler=core_expect
        )
    for plugin, route in routes:
        limit = route.max_body_bytes or settings.max_body_bytes
        added = add(
            route.method.upper(),
            route.path,
            route.handler,
            limit,
            plugin=runtime.plugins[plugin],
            error_response=route.error_response,
        )
        if route.sensitive:
            app[SENSITIVE].add(added.resource)
    # Registered last and at the root, so it only sees requests no other route took. Sensitive: a
    # path no route matched is client text that may carry a name or a secret (a mistyped URL, a
    # percent-encoded "?"), so the access log writes the pattern, never the path.
    fallback = CatchAllResource("/{tail}")
    app.router.register_resource(fallback)
    fallback.add_route(
        "*",
        wrap_handler(runtime, listener, handle_fallback, settings.max_body_bytes, app_limit),
        expect_handler=core_expect,
    )
    app[SENSITIVE].add(fallback)
    public = [r for r in app.router.resources() if r not in app[SENSITIVE]]
    app[PLAIN_PATHS] = frozenset(r.canonical for r in public if isinstance(r, web.PlainResource))
    app[PUBLIC] = frozenset(route for resource in public for route in resource)
    if primary:
        app.cleanup_ctx.append(runtime.plugin_lifespans)
    return app


class CatchAllResource(web.DynamicResource):
    """The fallback's resource: it matches every path the router offers it.

    A ``/...`` pattern cannot match a target that is not a path, such as ``OPTIONS *``, nor (with
    ".") one holding an encoded newline; aiohttp then answered itself, in text and without a
    request id. Only reached by requests no other route took. Overrides aiohttp's private
    ``DynamicResource._match`` (aiohttp 3.14), pinned by tests/test_server.py.
    """

    def _match(self, path: str) -> dict[str, str] | None:
        return {"tail": path}


def expect_handler(
    runtime: Runtime,
    limit: int,
    plugin: PluginState | None = None,
    error_response: ErrorResponse | None = None,
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """A route's answer to ``Expect``; aiohttp calls it only for requests that carry the header.

    aiohttp's default answers an unknown expectation with a text 417 of its own (no request id),
    and sends ``100 Continue`` even for a body the route then refuses (413, 503), so the client
    uploads it for nothing. Here a 417 is the route's error with an id, and a request the route
    will refuse gets no ``100 Continue``: its wrapper answers at once (RFC 9110 section 10.1.1).
    """
    next_id = runtime.request_ids.__next__

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            request_id = next_id()
            response = refuse(417, "expectation failed: only 100-continue is supported",
                              request_id, error_response)  # fmt: skip
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        if (plugin is None or plugin.status is Status.STARTED) and (request.content_length or 0) <= limit:
            # What aiohttp's default handler does.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    return expect


def request_ids(batch: int = 1024) -> Iterator[str]:
    """An endless supply of request ids: 16 random hex digits each, from ``os.urandom``.

    A request id correlates a response with log lines; it is not a secret and grants nothing.
    It is still random (not a counter) so it reveals neither the request rate nor the process.
    The ids are drawn ``batch`` at a time, split in C, so a request pays for one ``next()``.
    """
    return itertools.chain.from_iterable(map(_id_batch, itertools.repeat(batch)))


def _id_batch(count: int) -> list[str]:
    return os.urandom(8 * count).hex(" ", 8).split()


def wrap_handler(
    runtime: Runtime,
    listener: Listener,
    handler: Handler,
    limit: int,
    app_limit: int,
    plugin: PluginState | None = None,
    error_response: ErrorResponse | None = None,
) -> Handler:
    """One route's handler with request id, body limit, readiness gate and error boundary.

    This runs on every request, so it does only what each request needs (bench/RESULTS.md): the
    declared length is read only when the request has a body, the header name is an ``istr``, and
    the request's state, ``body_exists`` and ``headers`` are the fields behind them
    (:mod:`sidecar.hotpath`).
    The errors it answers itself are shaped by the route's ``error_response`` (see :class:`Route`).
    """
    next_id = runtime.request_ids.__next__
    clone = limit != app_limit  # aiohttp enforces one limit per app on read; a smaller one needs its own
    started = Status.STARTED  # a closure cell is cheaper than the enum's class attribute

    async def wrapped(request: web.Request) -> web.StreamResponse:
        request_id = next_id()
        request._state[REQUEST_ID] = request_id
        response: web.StreamResponse
        try:
            if plugin is not None and plugin.status is not started:
                message = f"plugin {plugin.name!r} is not ready"
                response = refuse(503, message, request_id, error_response, state=plugin.status.value)
            elif type(request._payload) is not EmptyStreamReader and (request.content_length or 0) > limit:
                response = too_large(limit, request_id, error_response)
            else:
                response = await handler(request.clone(client_max_size=limit) if clone else request)
            # In the try: a handler that returned no response (a missing return) is a logged 500,
            # not aiohttp's text 500 with neither a request id nor a log line.
            response._headers[REQUEST_ID_HEADER] = request_id
        except Exception as exc:  # CancelledError is a BaseException: cancellation passes through
            response = failure(exc, request, request_id, listener, limit, error_response)
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return wrapped


CoreHandler = Callable[[web.Request], web.Response]


def wrap_core(runtime: Runtime, listener: Listener, handler: CoreHandler, limit: int) -> Handler:
    """A core route (health, readiness): what :func:`wrap_handler` does, for a synchronous handler.

    Core handlers never wait and never read ``request[REQUEST_ID]``, so the request skips a
    coroutine and the request-state write: load balancers poll these routes all the time.
    """
    next_id = runtime.request_ids.__next__

    async def wrapped(request: web.Request) -> web.StreamResponse:
        request_id = next_id()
        response: web.StreamResponse
        try:
            if type(request._payload) is not EmptyStreamReader and (request.content_length or 0) > limit:
                response = too_large(limit, request_id)
            else:
                response = handler(request)
        except Exception as exc:
            response = failure(exc, request, request_id, listener, limit)
        response._headers[REQUEST_ID_HEADER] = request_id
        return response

    return wrapped


def failure(
    exc: Exception,
    request: web.Request,
    request_id: str,
    listener: Listener,
    limit: int,
    error_response: ErrorResponse | None = None,
) -> web.StreamResponse:
    """The error boundary: aiohttp's HTTP errors become JSON; anything else is a 500 with no detail."""
    if isinstance(exc, web.HTTPException):
        return as_json(exc, request_id, limit, error_response)
    if isinstance(exc, RequestPayloadError):
        # The client's body could not be read as sent (a Content-Encoding that does not decode, a
        # broken chunked encoding): its mistake, so a 400, whichever plugin was reading it.
        return refuse(400, "the request body cannot be read: " + BODY_PROBLEM, request_id, error_response)
    resource = request.match_info.route.resource
    log.error(
        "unhandled_error",
        exc_info=exc,
        extra={
            "sidecar_fields": {
                "request_id": request_id,
                "listener": listener.name,
                "route": resource.canonical if resource else None,
                "error": type(exc).__name__,
            }
        },
    )
    return refuse(500, "internal error", request_id, error_response)


def refuse(
    status: int, message: str, request_id: str, error_response: ErrorResponse | None, **extra: Any
) -> web.StreamResponse:
    """An error the sidecar answers for a route: in the route's own shape if it has one, else ours.

    A plugin's renderer that fails must not turn a clear error into aiohttp's bare 500: it is
    logged (by type) and the sidecar's shape is used instead.
    """
    if error_response is not None:
        try:
            return error_response(status, message)
        except Exception as exc:
            event(log, logging.ERROR, "error_response_failed", request_id=request_id,
                  status=status, error=type(exc).__name__)  # fmt: skip
    return json_error(status, message, request_id, **extra)


def too_large(limit: int, request_id: str, error_response: ErrorResponse | None = None) -> web.StreamResponse:
    message = f"request body too large: the limit is {limit} bytes"
    return refuse(413, message, request_id, error_response, limit=limit)


def as_json(
    exc: web.HTTPException, request_id: str, limit: int, error_response: ErrorResponse | None = None
) -> web.StreamResponse:
    """aiohttp's own errors (413, ...) become JSON; a plugin's custom error body is kept."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return too_large(limit, request_id, error_response)
    if exc.status < 400 or (exc.text is not None and exc.text != f"{exc.status}: {exc.reason}"):
        # Redirects, and a plugin's own error bodies, pass through untouched.
        return web.Response(status=exc.status, reason=exc.reason, body=exc.body, headers=exc.headers)
    response = refuse(exc.status, exc.reason.lower(), request_id, error_response)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


HEALTH_BODY = b'{"status":"ok"}'
BODY_PROBLEM = "its Content-Encoding or chunked encoding is not valid"


HEALTH_ANSWER = ResponseTemplate(JSON_HEADERS)  # load balancers poll it: the cheapest response there is


def handle_health(request: web.Request) -> web.Response:
    return HEALTH_ANSWER.response(HEALTH_BODY)


def handle_ready(request: web.Request) -> web.Response:
    ready, plugins = request.app[RUNTIME].readiness()
    body = json.dumps({"ready": ready, "plugins": plugins}).encode()
    return web.Response(status=200 if ready else 503, body=body, headers=JSON_HEADERS)


async def handle_fallback(request: web.Request) -> web.Response:
    """No route took the request: 405 with Allow when the path exists for other methods, else 404."""
    allowed: set[str] = set()
    own = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not own:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        response = json_error(405, "method not allowed", request[REQUEST_ID], allowed=sorted(allowed))
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return json_error(404, "not found", request[REQUEST_ID])


def build_runtime(
    manifest: Manifest,
    settings: Settings,
    extra_plugins: Mapping[str, object] | None = None,
    services: Services | None = None,
    bind_ports: Mapping[int, int] | None = None,
) -> Runtime:
    """Load the plugins sidecar.yaml enables (plus ``extra_plugins``) and build the runtime."""
    from sidecar.plugins import build_plugin_manager

    enabled = settings.enabled_plugins + [n for n in (extra_plugins or {}) if n not in settings.plugins]
    pm, infos, _ = build_plugin_manager(enabled, extra_plugins)
    return Runtime(manifest, settings, pm, infos, services=services, bind_ports=bind_ports)
