"""`sidecar run -- CMD`: the sidecar as the app's supervisor (and, in an enclave, its PID 1).

Most tests run the real entry point in a subprocess with a small Python app: what an operator runs,
signals, pipes and process tree included. The line splitter and the exec-failure path also have
fast in-process tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.supervise import (
    MAX_LINE_BYTES,
    LineSplitter,
    OrphanReaper,
    Supervisor,
    exit_code_of,
    signal_name,
)
from sidecar.testing import free_port
from tests.conftest import install_plugin_dist
from tests.test_example_plugin import env_with, wait_for, write_configs

PY = sys.executable

# A plugin whose start-up takes a while, and that then reports "not ready" until a flag file exists.
SLOW_PLUGIN = """
import asyncio, os
from sidecar import hookimpl
@hookimpl
async def lifespan():
    await asyncio.sleep(float(os.environ.get("SLOW_PLUGIN_SECONDS", "0.5")))
    yield
@hookimpl
def readiness():
    flag = os.environ.get("SLOW_PLUGIN_FLAG")
    return None if not flag or os.path.exists(flag) else "waiting for the flag"
"""

DOOMED_PLUGIN = """
from sidecar import hookimpl, PluginStartupError
@hookimpl
async def lifespan():
    raise PluginStartupError("the data key was refused")
    yield
"""

# A plugin that starts a subprocess of its own and only waits for it when asked, much later.
SPAWNER_PLUGIN = """
import asyncio, subprocess
from aiohttp import web
from sidecar import hookimpl, Route
CHILD = {}
@hookimpl
async def lifespan():
    CHILD["proc"] = subprocess.Popen(["sh", "-c", "exit 7"])
    await asyncio.sleep(0.3)  # it is a zombie, waiting for its owner, when the app starts
    yield
@hookimpl
def register_routes():
    async def status(request):
        code = await asyncio.to_thread(CHILD["proc"].wait)
        return web.Response(text=str(code))
    return [Route("GET", "/child-status", status)]
"""


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def sidecars() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def start(
    procs: list[subprocess.Popen[str]],
    manifest: Path,
    config: Path,
    *command: str,
    site: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    full_env = env_with(site) if site else dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [PY, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config), "--", *command],
        env=full_env,
        cwd=manifest.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, list[dict[str, Any]]]:
    """Wait for the sidecar; its stderr must be JSON lines only (the app's output included)."""
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, [json.loads(line) for line in stderr.splitlines()]


def app_script(tmp_path: Path, source: str) -> str:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def output(events: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "app_output" and e["stream"] == stream]


def wait_for_file(path: Path, proc: subprocess.Popen[str], within: float = 20.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        assert proc.poll() is None, f"sidecar exited early with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


# ---------------------------------------------------------------------- environment and output


@pytest.mark.slow
def test_app_environment_points_at_the_egress_and_kms_proxies(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]]
) -> None:
    """Threat: an app whose HTTP clients bypass the egress policy (an inherited HTTP_PROXY that
    points elsewhere wins) or that never finds the KMS proxy. The sidecar's values must override."""
    manifest, config, _, _ = write_configs(tmp_path, {})
    data = yaml.safe_load(manifest.read_text())
    kms_port = free_port()
    data["kms_proxy"] = {"listen_port": kms_port}
    manifest.write_text(yaml.safe_dump(data))
    proxy = f"http://127.0.0.1:{data['egress']['proxy_port']}"
    out = tmp_path / "env.json"
    app = app_script(
        tmp_path,
        f"""
        import json, os
        keys = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy",
                "AWS_KMS_ENDPOINT", "AWS_ENDPOINT_URL_KMS", "SUPERVISE_TEST_INHERITED"]
        open({str(out)!r}, "w").write(json.dumps({{k: os.environ.get(k) for k in keys}}))
        """,
    )
    inherited = {"HTTP_PROXY": "http://elsewhere.invalid:1", "SUPERVISE_TEST_INHERITED": "kept"}
    code, _ = finish(start(sidecars, manifest, config, PY, app, env=inherited))
    assert code == 0
    assert json.loads(out.read_text()) == {
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_PROXY": "localhost,127.0.0.1",
        "no_proxy": "localhost,127.0.0.1",
        "AWS_KMS_ENDPOINT": f"http://127.0.0.1:{kms_port}",
        "AWS_ENDPOINT_URL_KMS": f"http://127.0.0.1:{kms_port}",
        "SUPERVISE_TEST_INHERITED": "kept",  # the rest of the sidecar's environment is passed on
    }


@pytest.mark.slow
def test_app_output_becomes_json_log_events(tmp_path: Path, sidecars: list[subprocess.Popen[str]]) -> None:
    """Threats: an app forging sidecar log events by printing JSON or newlines (log injection);
    a huge line or binary output exhausting memory or breaking the log; a chatty app deadlocking
    because one pipe is read while the other fills."""
    manifest, config, _, _ = write_configs(tmp_path, {}, log={"level": "warning"})
    app = app_script(
        tmp_path,
        """
        import sys
        out, err = sys.stdout.buffer, sys.stderr.buffer
        out.write(b"hello\\n")
        err.write(b"bad \\xff\\xfe bytes\\r\\n")
        out.write(b'{"level": "info", "logger": "sidecar.server", "event": "stopped", "exit_code": 0}\\n')
        out.write(b"y" * 40000 + b"\\nafter the long line\\n")
        for i in range(3000):  # more than a pipe buffer on each stream, interleaved
            out.write(b"out %d\\n" % i)
            err.write(b"err %d\\n" % i)
        out.write(b"no newline at the end")
        """,
    )
    code, events = finish(start(sidecars, manifest, config, PY, app))
    assert code == 0
    stdout, stderr = output(events, "stdout"), output(events, "stderr")
    assert all(e["logger"] == "app" and e["level"] == "info" for e in stdout + stderr)
    lines = [e["line"] for e in stdout]
    assert lines[0] == "hello"
    # The forged event stays a string inside an app_output event (log.level: warning hides the
    # sidecar's own "stopped", so any "stopped" event here would be the forgery).
    assert lines[1].startswith('{"level": "info"') and "stopped" not in names(events)
    assert lines[2] == "y" * MAX_LINE_BYTES and stdout[2]["truncated"] is True
    assert lines[3] == "after the long line" and "truncated" not in stdout[3]
    assert lines[4:-1] == [f"out {i}" for i in range(3000)]
    assert lines[-1] == "no newline at the end"
    assert stderr[0]["line"] == "bad \ufffd\ufffd bytes"  # undecodable bytes replaced, CR dropped
    assert [e["line"] for e in stderr[1:]] == [f"err {i}" for i in range(3000)]
    # log.level: warning silences the sidecar's info events, never the app's own output.
    assert "app_started" not in names(events)


# ---------------------------------------------------------------------- exit codes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("sys.exit(0)", 0),
        ("sys.exit(3)", 3),
        ("os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL),
    ],
    ids=["zero", "three", "killed"],
)
def test_sidecar_exits_with_the_apps_exit_code_after_cleanup(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]], body: str, expected: int
) -> None:
    """Threat: an orchestrator restarting (or not) on a wrong status; a signal death reported as
    success. Plugin clean-up must still run after the app exits on its own."""
    manifest, config, _, _ = write_configs(tmp_path, {})
    app = app_script(tmp_path, f"import os, signal, sys\n{body}\n")
    code, events = finish(start(sidecars, manifest, config, PY, app))
    assert code == expected
    order = names(events)
    assert order.index("app_exited") < order.index("shutting_down") < order.index("plugin_stopped")
    assert events[-1] == {**events[-1], "event": "stopped", "exit_code": expected}
    exited = next(e for e in events if e["event"] == "app_exited")
    assert exited["exit_code"] == expected
    assert exited.get("signal") == ("SIGKILL" if expected > 128 else None)


def test_exit_code_of_signals_is_128_plus_n() -> None:
    assert [exit_code_of(rc) for rc in (0, 1, 255, -9, -15, -40)] == [0, 1, 255, 137, 143, 168]
    assert [signal_name(n) for n in (9, 15, 40)] == ["SIGKILL", "SIGTERM", "SIG40"]


# ---------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_is_forwarded_to_the_app(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]], sig: signal.Signals
) -> None:
    """Threat: an app killed mid-write because the sidecar (PID 1) swallowed the stop signal, or
    plugins (the KMS proxy) going away while the app is still shutting down."""
    manifest, config, _, _ = write_configs(tmp_path, {})
    started, marker = tmp_path / "started", tmp_path / "marker"
    app = app_script(
        tmp_path,
        f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(marker)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        open({str(started)!r}, "w").write("up\\n")
        while True:
            time.sleep(1)
        """,
    )
    proc = start(sidecars, manifest, config, PY, app)
    wait_for_file(started, proc)
    proc.send_signal(sig)
    code, events = finish(proc)
    assert code == 0
    assert marker.read_text() == sig.name  # the same signal, delivered once
    order = names(events)
    assert order.index("app_signal") < order.index("app_exited") < order.index("plugin_stopped")


@pytest.mark.slow
def test_app_ignoring_sigterm_is_killed_after_shutdown_timeout(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]]
) -> None:
    """Threat: a hung app keeping the enclave (and the parent's shutdown) waiting forever."""
    manifest, config, _, _ = write_configs(tmp_path, {}, shutdown_timeout=1)
    started = tmp_path / "started"
    app = app_script(
        tmp_path,
        f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(started)!r}, "w").write("up\\n")
        while True:
            time.sleep(1)
        """,
    )
    proc = start(sidecars, manifest, config, PY, app)
    wait_for_file(started, proc)
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, events = finish(proc)
    elapsed = time.monotonic() - begin
    assert code == 128 + signal.SIGKILL
    assert 1.0 <= elapsed < 10, elapsed  # it had its shutdown_timeout, and no more
    assert [e["signal"] for e in events if e["event"] == "app_signal"] == ["SIGTERM", "SIGKILL"]
    assert "app_killed" in names(events) and "plugin_stopped" in names(events)


# ---------------------------------------------------------------------- commands that cannot run


@pytest.mark.parametrize(
    ("command", "expected", "reason"),
    [
        ("no-such-command-anywhere", 127, "command not found"),
        ("{tmp}/missing", 127, "No such file or directory"),
        ("{tmp}/not-executable", 126, "Permission denied"),
        ("{tmp}", 126, "Is a directory"),
    ],
    ids=["not-in-path", "missing-path", "not-executable", "directory"],
)
def test_command_that_cannot_run_fails_at_once_like_a_shell(
    tmp_path: Path, command: str, expected: int, reason: str
) -> None:
    """Threat: a typo in the entrypoint leaving a sidecar serving with no app behind it."""
    manifest, config, _, _ = write_configs(tmp_path, {})
    (tmp_path / "not-executable").write_text("#!/bin/sh\nexit 0\n")
    program = command.format(tmp=tmp_path)
    proc = subprocess.run(
        [PY, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config), "--", program],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == expected
    assert proc.stderr.splitlines() == [f"error: cannot run {program!r}: {reason}"]  # nothing started


class ReadyRuntime:
    def __init__(self) -> None:
        self.startup_done = asyncio.Event()
        self.startup_done.set()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        return True, {}


@pytest.mark.parametrize(
    ("name", "content", "mode", "expected", "reason"),
    [
        ("gone", None, 0, 127, "No such file or directory"),
        ("no-x", "#!/bin/sh\n", 0o644, 126, "Permission denied"),
        ("bad-interpreter", "#!/no/such/interpreter\n", 0o755, 126, "bad interpreter"),
    ],
)
async def test_exec_failure_when_the_app_starts_is_127_or_126(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    content: str | None,
    mode: int,
    expected: int,
    reason: str,
) -> None:
    """The command was checked at launch but cannot be executed when the sidecar is ready (removed,
    or a broken #! line, which only exec finds): the same shell codes, one error event."""
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
        path.chmod(mode)
    supervisor = Supervisor([str(path)], dict(os.environ), 1, subreaper=False)
    with caplog.at_level(logging.INFO, logger="sidecar.supervise"):
        assert await supervisor.run(ReadyRuntime()) == expected
    failed = [r for r in caplog.records if r.getMessage() == "app_exec_failed"]
    assert len(failed) == 1
    fields = failed[0].sidecar_fields  # type: ignore[attr-defined]
    assert fields["exit_code"] == expected and reason in fields["error"]


async def test_cancelled_supervisor_leaves_no_app_running() -> None:
    """Threat: an app left running, unsupervised and unlogged, when the sidecar is torn down
    around it (a start-up failure racing the app, an interrupted event loop)."""
    supervisor = Supervisor([PY, "-c", "import time; time.sleep(60)"], dict(os.environ), 30, subreaper=False)
    task = asyncio.ensure_future(supervisor.run(ReadyRuntime()))
    while supervisor.process is None:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert supervisor.process.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------- start-up


@pytest.mark.slow
def test_app_starts_only_once_the_sidecar_is_ready(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]]
) -> None:
    """Threat: an app whose first KMS or egress call fails (or falls back to something unsafe)
    because it started before the proxies were up. Start-up having finished is not enough: every
    plugin must also report ready. The app's NO_PROXY must let it reach loopback directly."""
    site = install_plugin_dist(tmp_path / "site", "slowstart", {"slow": SLOW_PLUGIN})
    manifest, config, port, _ = write_configs(tmp_path, {"slow": {}})
    flag, out = tmp_path / "flag", tmp_path / "ready-status"
    app = app_script(
        tmp_path,
        f"""
        import urllib.error, urllib.request
        try:
            status = urllib.request.urlopen("http://127.0.0.1:{port}/enclave/ready", timeout=5).status
        except urllib.error.HTTPError as exc:
            status = exc.code
        open({str(out)!r}, "w").write(str(status))
        """,
    )
    proc = start(sidecars, manifest, config, PY, app, site=site, env={"SLOW_PLUGIN_FLAG": str(flag)})
    body = wait_for(f"http://127.0.0.1:{port}/enclave/ready", 503, proc)
    while "waiting for the flag" not in body:  # until the plugin has started, but is not ready
        time.sleep(0.05)
        body = wait_for(f"http://127.0.0.1:{port}/enclave/ready", 503, proc)
    time.sleep(0.5)
    assert not out.exists()  # started, not ready: no app yet
    flag.touch()
    code, events = finish(proc)
    assert code == 0
    assert out.read_text() == "200"
    order = [(e["event"], e.get("plugin")) for e in events]
    assert order.index(("plugin_started", "slow")) < order.index(("app_starting", None))
    waiting = next(e for e in events if e["event"] == "app_waiting_for_readiness")
    assert waiting["plugins"] == {"slow": "waiting for the flag"}


@pytest.mark.slow
def test_failed_startup_never_starts_the_app(tmp_path: Path, sidecars: list[subprocess.Popen[str]]) -> None:
    """Threat: an app running without the attested services it was promised."""
    site = install_plugin_dist(tmp_path / "site", "failing", {"doomed": DOOMED_PLUGIN})
    manifest, config, _, _ = write_configs(tmp_path, {"doomed": {}})
    marker = tmp_path / "ran"
    app = app_script(tmp_path, f"open({str(marker)!r}, 'w').write('ran')\n")
    code, events = finish(start(sidecars, manifest, config, PY, app, site=site))
    assert code == 1
    assert not marker.exists()
    assert "startup_failed" in names(events) and "app_starting" not in names(events)


@pytest.mark.slow
def test_stop_before_ready_never_starts_the_app(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]]
) -> None:
    """A stop during start-up ends the sidecar at once; the app never starts behind its back."""
    site = install_plugin_dist(tmp_path / "site", "slowstart", {"slow": SLOW_PLUGIN})
    manifest, config, port, _ = write_configs(tmp_path, {"slow": {}})
    marker = tmp_path / "ran"
    app = app_script(tmp_path, f"open({str(marker)!r}, 'w').write('ran')\n")
    proc = start(sidecars, manifest, config, PY, app, site=site, env={"SLOW_PLUGIN_SECONDS": "60"})
    wait_for(f"http://127.0.0.1:{port}/enclave/health", 200, proc)
    proc.send_signal(signal.SIGTERM)
    code, events = finish(proc, timeout=20)
    assert code == 0
    assert not marker.exists()
    assert "app_not_started" in names(events) and "app_starting" not in names(events)


# ---------------------------------------------------------------------- zombies

ORPHAN_APP = """
import os, sys, time

def orphan(new_session):
    # Double fork: the middle process exits at once, so the grandchild is re-parented to the
    # sidecar (PID 1 in an enclave; a child subreaper here). It reports its new parent, then exits.
    r, w = os.pipe()
    if os.fork() == 0:
        middle = os.getpid()
        if os.fork() == 0:
            if new_session:
                os.setsid()  # a daemon leaving the app's session must be reaped too
            while os.getppid() == middle:
                time.sleep(0.01)
            os.write(w, b"%d %d" % (os.getpid(), os.getppid()))
            time.sleep(0.2)
            os._exit(0)
        os._exit(0)
    os.wait()  # the middle process
    os.close(w)
    pid, parent = map(int, os.fdopen(r).read().split())
    return pid, parent

def fate(pid):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                state = next(line for line in f if line.startswith("State:")).split()[1]
        except (FileNotFoundError, ProcessLookupError):  # ESRCH: read while being reaped
            return "reaped"
        time.sleep(0.05)
    return "zombie" if state == "Z" else "still running"

open(sys.argv[1] + ".ppid", "w").write(str(os.getppid()))
results = []
for new_session in (False, True):
    pid, parent = orphan(new_session)
    results.append(f"{parent == os.getppid()} {fate(pid)}")
open(sys.argv[1], "w").write("\\n".join(results))
sys.exit(int(sys.argv[2]))
"""


def _can_unshare_pid() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("as_pid_1", [False, True], ids=["subreaper", "pid-1"])
def test_orphaned_grandchildren_are_reaped_and_the_apps_status_kept(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]], as_pid_1: bool
) -> None:
    """Threat: zombies piling up under PID 1 until the enclave runs out of pids; and a reaper that
    waits for any child stealing the app's own exit status from its waiter. Run both as a child
    subreaper and, in a PID namespace of its own, as PID 1 (what the sidecar is in an enclave)."""
    if as_pid_1 and not _can_unshare_pid():
        pytest.skip("needs root and unshare(1) for a PID namespace")
    manifest, config, _, _ = write_configs(tmp_path, {})
    out = tmp_path / "orphans"
    app = app_script(tmp_path, ORPHAN_APP)
    if as_pid_1:
        command = [PY, "-m", "sidecar", "run", "--manifest", str(manifest), "--config", str(config)]
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", *command, "--", PY, app, str(out), "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sidecars.append(proc)
    else:
        proc = start(sidecars, manifest, config, PY, app, str(out), "3")
    code, events = finish(proc)
    # Both orphans were re-parented to the sidecar, and reaped once they exited. (An app that
    # crashed wrote nothing: its output says why.)
    assert out.exists(), (code, [e["line"] for e in events if e["event"] == "app_output"])
    assert out.read_text().splitlines() == ["True reaped", "True reaped"]
    sidecar_pid = int(Path(f"{out}.ppid").read_text())
    assert sidecar_pid == (1 if as_pid_1 else proc.pid)
    assert code == 3


@pytest.mark.slow
def test_the_sidecars_own_subprocess_keeps_its_exit_status(
    tmp_path: Path, sidecars: list[subprocess.Popen[str]]
) -> None:
    """Threat: the reaper taking the exit status of a process a plugin started: `subprocess` then
    reports 0, so a failed check (exit 7 here) would pass as success."""
    site = install_plugin_dist(tmp_path / "site", "spawner", {"spawner": SPAWNER_PLUGIN})
    manifest, config, port, _ = write_configs(tmp_path, {"spawner": {}})
    out, status = tmp_path / "orphans", tmp_path / "status"
    app = app_script(
        tmp_path,
        ORPHAN_APP.replace("sys.exit(int(sys.argv[2]))", "")
        + textwrap.dedent(
            f"""
            import urllib.request
            url = "http://127.0.0.1:{port}/child-status"
            open({str(status)!r}, "w").write(urllib.request.urlopen(url, timeout=10).read().decode())
            """
        ),
    )
    code, _ = finish(start(sidecars, manifest, config, PY, app, str(out), "0", site=site))
    assert code == 0
    assert out.read_text().splitlines() == ["True reaped", "True reaped"]  # the reaper did run
    assert status.read_text() == "7"


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0] == b"Z"


def test_reaper_takes_orphans_and_leaves_other_zombies_to_their_waiters() -> None:
    """The rule, without relying on a race: a zombie in another session (what the app's orphans
    are) is reaped; the protected app and a zombie in the sidecar's own session (a process its own
    code started) keep their exit statuses for whoever waits for them."""
    own = subprocess.Popen(["sh", "-c", "exit 5"])
    app = subprocess.Popen(["sh", "-c", "exit 6"], start_new_session=True)
    orphan = subprocess.Popen(["sh", "-c", "exit 0"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not all(_zombie(p.pid) for p in (own, app, orphan)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reaped = OrphanReaper(lambda: {app.pid}).reap()
    assert orphan.pid in reaped and own.pid not in reaped and app.pid not in reaped
    assert not os.path.exists(f"/proc/{orphan.pid}")
    assert own.wait(timeout=5) == 5 and app.wait(timeout=5) == 6
    orphan.wait(timeout=5)  # already reaped: lets Popen forget it


# ---------------------------------------------------------------------- the line splitter


def split(*chunks: bytes, limit: int = 8) -> list[tuple[str, bool]]:
    lines: list[tuple[str, bool]] = []
    splitter = LineSplitter(lambda text, truncated: lines.append((text, truncated)), limit=limit)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.close()
    return lines


def test_line_splitter_joins_chunks_and_caps_lines() -> None:
    """Lines split across reads are joined; the cap holds however the bytes arrive."""
    assert split(b"ab", b"c\nde", b"f\n") == [("abc", False), ("def", False)]
    assert split(b"12345678\n") == [("12345678", False)]  # exactly the limit: not truncated
    assert split(b"12345678", b"\n") == [("12345678", False)]
    assert split(b"123456789\nok\n") == [("12345678", True), ("ok", False)]
    assert split(b"1234", b"5678", b"9", b"abc", b"\nok") == [("12345678", True), ("ok", False)]
    assert split(b"\n\r\nx\r\n") == [("", False), ("", False), ("x", False)]
    assert split(b"\xe2\x82") == [("\ufffd", False)]  # a cut-off UTF-8 sequence at EOF
    assert split(b"") == []
