"""Supervising the enclave's app: ``sidecar run -- CMD ...``.

Like Enclaver's odyn, the sidecar can start the app as its child once it is ready, so the egress and
KMS proxies are up when the app first needs them:

* **Environment**: the sidecar's own, plus the egress proxy variables (``HTTP_PROXY``, ``HTTPS_PROXY``
  and lower-case twins, ``NO_PROXY=localhost,127.0.0.1``) and, when the manifest has ``kms_proxy``,
  ``AWS_KMS_ENDPOINT`` and ``AWS_ENDPOINT_URL_KMS``. Ours win over inherited values: inside an enclave
  the proxy is the only way out.
* **Output**: stdout and stderr are read asynchronously, each line one ``app_output`` JSON event on the
  sidecar's log stream (logger ``app``, ``stream``, ``line``). Lines are capped at
  :data:`MAX_LINE_BYTES` (``truncated: true``), undecodable bytes become U+FFFD. Because a line is a
  JSON string value, an app cannot forge sidecar log events. App output is not filtered by
  ``log.level``: it is the app's log, not the sidecar's.
* **Signals**: SIGTERM and SIGINT to the sidecar go to the app; after ``shutdown_timeout`` seconds
  it gets SIGKILL. The sidecar exits with the app's exit code (128+N for a death by signal N, like a
  shell), after its plugins' clean-up.
* **Zombies**: see :class:`OrphanReaper`.

The app runs in its own session (``setsid``): a terminal's Ctrl-C then reaches it once, forwarded,
rather than twice; and its orphans can be told apart from processes the sidecar's own code starts.
Its stdin is ``/dev/null``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from sidecar.logs import event

if TYPE_CHECKING:
    from sidecar.config import Manifest, Settings

log = logging.getLogger("sidecar.supervise")
app_log = logging.getLogger("app")

EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
MAX_LINE_BYTES = 16 * 1024
READ_CHUNK = 64 * 1024
# After the app exits, how long its output may take to reach EOF: a grandchild that inherited the
# pipe can hold it open forever, and must not hold up the shutdown.
DRAIN_GRACE = 1.0
READY_POLL = 0.1
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
LOOPBACK = "127.0.0.1"


class CommandError(Exception):
    """The app's command cannot be run; ``exit_code`` is what a shell would exit with."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ReadinessSource(Protocol):
    """What the supervisor needs of :class:`sidecar.server.Runtime`."""

    startup_done: asyncio.Event

    def readiness(self) -> tuple[bool, dict[str, str]]: ...


# ---------------------------------------------------------------------- the command and its environment


def resolve_command(argv: Sequence[str], path: str | None = None) -> str:
    """The executable ``argv[0]`` names, found as a shell finds it. Raises :class:`CommandError`.

    Checked before the sidecar starts, so a typo fails at once instead of after start-up. ``path``
    is the search path (default: ``$PATH``).
    """
    if not argv:
        raise CommandError(EXIT_NOT_FOUND, "no command given")
    program = argv[0]
    if "/" not in program:
        found = shutil.which(program, path=path if path is not None else os.environ.get("PATH", os.defpath))
        if not program or found is None:
            raise CommandError(EXIT_NOT_FOUND, f"cannot run {program!r}: command not found")
        return found
    if not os.path.exists(program):
        raise CommandError(EXIT_NOT_FOUND, f"cannot run {program!r}: No such file or directory")
    if os.path.isdir(program):
        raise CommandError(EXIT_NOT_EXECUTABLE, f"cannot run {program!r}: Is a directory")
    if not os.access(program, os.X_OK):
        raise CommandError(EXIT_NOT_EXECUTABLE, f"cannot run {program!r}: Permission denied")
    return program


def exec_failure(program: str, exc: OSError) -> CommandError:
    """The shell's answer to a failed exec: 127 when nothing is there to run, else 126."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOENT:
        if "/" not in program:
            return CommandError(EXIT_NOT_FOUND, f"cannot run {program!r}: command not found")
        if os.path.exists(program):  # the file is there: its #! interpreter is not
            return CommandError(EXIT_NOT_EXECUTABLE, f"cannot run {program!r}: bad interpreter: {reason}")
        return CommandError(EXIT_NOT_FOUND, f"cannot run {program!r}: {reason}")
    return CommandError(EXIT_NOT_EXECUTABLE, f"cannot run {program!r}: {reason}")


def exit_code_of(returncode: int) -> int:
    """A process's exit status as a shell reports it: 128+N after a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15; real-time signals have no name of their own: ``SIG40``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def app_environment(manifest: Manifest, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The app's environment: ``base`` (default: the sidecar's) plus the proxy and KMS variables."""
    from sidecar.net.egress import proxy_environment

    env = dict(os.environ if base is None else base)
    env.update(proxy_environment(manifest.egress.proxy_port))
    if manifest.kms_proxy_port is not None:
        from sidecar.aws.kms_proxy import child_environment

        env.update(child_environment(f"http://{LOOPBACK}:{manifest.kms_proxy_port}"))
    return env


# ---------------------------------------------------------------------- zombies


def set_child_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (what PID 1 is anyway). Linux only."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0)
    except (OSError, AttributeError):
        return False
    if result != 0:
        event(log, logging.WARNING, "subreaper_failed", error=os.strerror(ctypes.get_errno()))
        return False
    return True


def _child_zombies(parent: int) -> list[tuple[int, int]]:
    """(pid, session) of every zombie whose parent is ``parent``, from /proc."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(b")")[2].split()
        if len(fields) < 4 or fields[0] != b"Z" or int(fields[1]) != parent:
            continue
        found.append((int(name), int(fields[3])))
    return found


class OrphanReaper:
    """Reaps zombies re-parented to the sidecar, and nothing else.

    When the sidecar is PID 1 (or a child subreaper), the app's orphaned descendants become its
    children, and each one that exits stays a zombie until the sidecar waits for it. Waiting with
    ``waitpid(-1)`` would also take exit statuses that belong to someone else: the app's, which
    asyncio's child watcher waits for, and those of any process the sidecar's own code (a plugin)
    starts, whose owner would then see a wrong status (``subprocess`` even reports 0). So on each
    SIGCHLD this reaps by pid, only zombies that are (a) not ``protected`` (the app) and (b) in a
    session other than the sidecar's. The app runs in a session of its own, so its descendants are
    never in ours unless they move there, which takes the sidecar's own code; processes the sidecar
    starts stay in its session and are left to whoever started them.
    """

    def __init__(self, protected: Callable[[], set[int]]) -> None:
        self.protected = protected
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._loop = loop
        self.reap()  # anything that exited before the handler was there

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None
        self.reap()

    def reap(self) -> list[int]:
        """Reap every orphan zombie there is now; returns their pids."""
        try:
            # A cheap look first (WNOWAIT: nothing is reaped): most SIGCHLDs leave no zombie behind.
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return []
        except ChildProcessError:
            return []
        protected = self.protected()
        session = os.getsid(0)
        reaped = []
        for pid, sid in _child_zombies(os.getpid()):
            if pid in protected or sid == session:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                reaped.append(pid)
                event(
                    log, logging.DEBUG, "orphan_reaped", pid=pid, exit_code=os.waitstatus_to_exitcode(status)
                )
        return reaped


# ---------------------------------------------------------------------- output


class LineSplitter:
    """Bytes in, capped lines out: ``(text, truncated)``, the newline (and a CR before it) removed.

    A line longer than ``limit`` bytes is emitted at once with its first ``limit`` bytes and
    ``truncated=True``; the rest of it, up to its newline, is dropped. Memory stays within ``limit``.
    """

    def __init__(self, emit: Callable[[str, bool], None], limit: int = MAX_LINE_BYTES) -> None:
        self.emit = emit
        self.limit = limit
        self.buffer = bytearray()
        self.dropping = False

    def feed(self, data: bytes) -> None:
        start = 0
        while start <= len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if not self.dropping:
                room = self.limit - len(self.buffer)
                if end - start > room:
                    self.buffer += data[start : start + room]
                    self._flush(truncated=True)
                    self.dropping = True
                else:
                    self.buffer += data[start:end]
            if newline < 0:
                return
            if self.dropping:
                self.dropping = False
            else:
                self._flush(truncated=False)
            start = newline + 1

    def close(self) -> None:
        """End of stream: a last line without a newline still counts."""
        if self.buffer and not self.dropping:
            self._flush(truncated=False)
        self.buffer.clear()
        self.dropping = False

    def _flush(self, truncated: bool) -> None:
        raw = bytes(self.buffer)
        self.buffer.clear()
        if raw.endswith(b"\r") and not truncated:
            raw = raw[:-1]
        self.emit(raw.decode("utf-8", "replace"), truncated)


def output_event(stream: str) -> Callable[[str, bool], None]:
    def emit(line: str, truncated: bool) -> None:
        if truncated:
            event(app_log, logging.INFO, "app_output", stream=stream, line=line, truncated=True)
        else:
            event(app_log, logging.INFO, "app_output", stream=stream, line=line)

    return emit


async def pump(reader: asyncio.StreamReader, stream: str) -> None:
    """Log each line ``reader`` yields until EOF."""
    splitter = LineSplitter(output_event(stream))
    try:
        while chunk := await reader.read(READ_CHUNK):
            splitter.feed(chunk)
    finally:
        splitter.close()


# ---------------------------------------------------------------------- the supervisor


class Supervisor:
    """Starts the app when the sidecar is ready, forwards stop signals, and reports its exit code.

    :meth:`run` is what :meth:`sidecar.server.Runtime.serve_forever` awaits; :meth:`stop` is what its
    SIGTERM/SIGINT handler calls.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        shutdown_timeout: float,
        *,
        subreaper: bool = True,
    ) -> None:
        if not argv:
            raise ValueError("no command to supervise")
        self.argv = list(argv)
        self.env = dict(env)
        self.shutdown_timeout = shutdown_timeout
        self.subreaper = subreaper
        self.process: asyncio.subprocess.Process | None = None
        self.stop_signal: signal.Signals | None = None
        self._stopping = asyncio.Event()
        self._pidfd: int | None = None
        self._reaper = OrphanReaper(self._protected)

    @classmethod
    def for_app(cls, argv: Sequence[str], manifest: Manifest, settings: Settings) -> Supervisor:
        return cls(argv, app_environment(manifest), settings.shutdown_timeout)

    def _protected(self) -> set[int]:
        return {self.process.pid} if self.process is not None else set()

    # -------------------------------------------------------------- signals

    def stop(self, sig: signal.Signals) -> None:
        """Forward ``sig`` to the app (or, before it started, cancel its start)."""
        self.stop_signal = sig
        self._stopping.set()
        self._send(sig)

    def _send(self, sig: signal.Signals) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        event(log, logging.INFO, "app_signal", pid=proc.pid, signal=sig.name)
        try:
            if self._pidfd is not None:
                # Through a pidfd the signal cannot reach another process that reused the pid.
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:  # exited meanwhile
            pass

    # -------------------------------------------------------------- running

    async def run(self, runtime: ReadinessSource) -> int:
        """Wait until the sidecar is ready, run the app, return its exit code (0: stopped before it ran)."""
        if not await self._wait_until_ready(runtime):
            event(log, logging.INFO, "app_not_started", reason="stop requested before the sidecar was ready")
            return 0
        loop = asyncio.get_running_loop()
        if self.subreaper and os.getpid() != 1:
            set_child_subreaper()
        # The command line may carry secrets: only the program and the argument count are logged.
        event(log, logging.INFO, "app_starting", program=self.argv[0], args=len(self.argv) - 1)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            failure = exec_failure(self.argv[0], exc)
            event(log, logging.ERROR, "app_exec_failed", error=str(failure), exit_code=failure.exit_code)
            return failure.exit_code
        self.process = proc
        with contextlib.suppress(OSError):  # kernels before 5.3: plain kill() on the pid
            self._pidfd = os.pidfd_open(proc.pid)
        app_log.setLevel(logging.INFO)
        self._reaper.install(loop)
        event(log, logging.INFO, "app_started", pid=proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.ensure_future(pump(proc.stdout, "stdout")),
            asyncio.ensure_future(pump(proc.stderr, "stderr")),
        ]
        try:
            if self.stop_signal is not None:  # a signal came while the app was being started
                self._send(self.stop_signal)
            code = exit_code_of(await self._wait(proc))
        except asyncio.CancelledError:
            # The sidecar is going down without the app having exited: never leave it running.
            if proc.returncode is None:
                self._send(signal.SIGKILL)
                await proc.wait()
            raise
        finally:
            await self._drain(pumps)
            self._reaper.uninstall()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        fields: dict[str, object] = {"pid": proc.pid, "exit_code": code}
        if proc.returncode is not None and proc.returncode < 0:
            fields["signal"] = signal_name(-proc.returncode)
        event(log, logging.INFO, "app_exited", **fields)
        return code

    async def _wait_until_ready(self, runtime: ReadinessSource) -> bool:
        """True once every plugin started and reports ready; False when a stop came first."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        started = asyncio.ensure_future(runtime.startup_done.wait())
        try:
            await asyncio.wait({stopping, started}, return_when=asyncio.FIRST_COMPLETED)
            reported = False
            while not self._stopping.is_set():
                ready, report = runtime.readiness()
                if ready:
                    return True
                if not reported:  # e.g. startup.on_failure: unready and a plugin failed
                    event(log, logging.WARNING, "app_waiting_for_readiness", plugins=report)
                    reported = True
                await asyncio.wait({stopping}, timeout=READY_POLL)
            return False
        finally:
            stopping.cancel()
            started.cancel()

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        exited = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():  # a stop signal was forwarded: the app has shutdown_timeout to exit
                done, _ = await asyncio.wait({exited}, timeout=self.shutdown_timeout)
                if not done:
                    event(log, logging.WARNING, "app_killed", pid=proc.pid, timeout=self.shutdown_timeout)
                    self._send(signal.SIGKILL)
            return await exited
        finally:
            stopping.cancel()
            exited.cancel()  # when we are cancelled: the caller still reaps through proc.wait()

    @staticmethod
    async def _drain(pumps: Sequence[asyncio.Future[None]]) -> None:
        """Let the output readers reach EOF, for at most DRAIN_GRACE seconds."""
        _, pending = await asyncio.wait(pumps, timeout=DRAIN_GRACE)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*pumps, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                event(log, logging.ERROR, "app_output_failed", error=f"{type(result).__name__}: {result}")
