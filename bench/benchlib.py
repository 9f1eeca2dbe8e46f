"""Helpers shared by the bench scripts (run them as `python bench/bench_X.py`)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from sidecar.testing import free_port

ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    """The commit measured, "+dirty" when sidecar/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sidecar"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


# CPU accounting, shared so every benchmark counts CPU time the same way (Linux /proc; None elsewhere).


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process, all its threads included."""
    split = process_cpu_split(pid)
    return None if split is None else split[0] + split[1]


def process_cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU time of a running process, all its threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / ticks, int(fields[12]) / ticks
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu_seconds() -> float | None:
    """Busy CPU time of the whole machine, all cores (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10])  # guest time is already counted in user time
    return (sum(values) - idle - guest) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (the load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pin_cpus() -> tuple[list[str], list[str]] | None:
    """``taskset`` prefixes: (servers on the last CPU, the load generator on the first), or None."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None
    return ["taskset", "-c", str(cpus[-1])], ["taskset", "-c", str(cpus[0])]


# ---------------------------------------------------------------------------- servers and load
# Shared by the scripts that load local HTTP servers with wrk (bench_server, bench_passenger, bench_vault),
# so they start, load, account and compare servers the same way.

HOST = "127.0.0.1"
CONNECTIONS = 50  # wrk -c
NOISY = 0.15  # cores used by other processes during a measurement before its round is rerun


def machine_line() -> str:
    """The first line of every report: when, where, how many CPUs."""
    now = datetime.datetime.now().astimezone()
    return f"{now:%Y-%m-%d %H:%M %Z}  {platform.node()}  {os.cpu_count()} CPUs"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1, below the ephemeral range (see ``free_port``)."""
    return [free_port() for _ in range(count)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spawn(
    argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server in its own session, stdout and stderr appended to ``log_path`` (never a pipe)."""
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env, start_new_session=True
        )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def tail_file(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log ("" when unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Running(Protocol):
    """What check_alive needs of a script's server record."""

    name: str
    proc: subprocess.Popen[bytes] | None
    log_path: Path


def check_alive(servers: Sequence[Running], lines: int = 30) -> None:
    """Raise, with the end of its log, when a server has exited (a load against it means nothing)."""
    for s in servers:
        if s.proc is not None and s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} died during the run\n{tail_file(s.log_path, lines)}")


@dataclass
class LoadResult:
    rps: float
    p99_ms: float
    requests: int
    non2xx: int = 0
    socket_errors: str = ""  # wrk's "Socket errors: ..." line, "" when none
    errors: str = ""  # "" when every response was a 2xx and no socket errors were reported


def _duration_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_tool(argv: list[str], duration: int) -> str:
    """Run the load generator with a hard timeout; its output, or a RuntimeError quoting it."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr or done.stdout}".strip())
    return done.stdout


def run_wrk(url: str, duration: int, prefix: list[str], script: Path | None = None) -> LoadResult:
    """``wrk -t1 -c50 -dNs --latency [-s script] url`` (after ``prefix``, e.g. taskset), parsed."""
    argv = [*prefix, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency"]
    argv += [*(["-s", str(script)] if script is not None else []), url]
    out = run_tool(argv, duration)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ", out, re.M)
    if rps is None or p99 is None or total is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    non2xx = re.search(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", out, re.M)
    sock = re.search(r"^\s*Socket errors:.*$", out, re.M)
    errors = [
        m.group(0).strip()
        for m in re.finditer(r"^\s*(Non-2xx or 3xx responses|Socket errors):.*$", out, re.M)
    ]
    return LoadResult(
        float(rps.group(1)),
        _duration_ms(p99.group(1), p99.group(2)),
        int(total.group(1)),
        int(non2xx.group(1)) if non2xx else 0,
        sock.group(0).strip() if sock else "",
        "; ".join(errors),
    )


@dataclass
class Measurement:
    """One server loaded once: what the load generator saw and what the server process spent."""

    result: LoadResult
    cpu_us: float | None  # server CPU time per request, microseconds
    busy: float | None  # server CPU time / wall time (1.0 = one full core)
    other: float | None  # cores used by everything but the server and the load generator
    # Of cpu_us, the kernel's share: mostly sending the answer, which on loopback includes waking
    # the load generator. On a VM that wake-up costs more the longer the generator's CPU idled, so
    # a slower server pays more per request for it (bench/RESULTS.md, 2026-12-07, session 6).
    sys_us: float | None = None

    @property
    def noisy(self) -> bool:
        return self.other is not None and self.other > NOISY


def measure(pid: int | None, duration: int, run: Callable[[], LoadResult]) -> Measurement:
    """Run one load (``run``) against the server process ``pid``, with the CPU time spent around it."""

    def server_cpu() -> tuple[float, float] | None:
        return process_cpu_split(pid) if pid is not None else None

    before, machine_before, tool_before = server_cpu(), machine_cpu_seconds(), children_cpu_seconds()
    result = run()
    after, machine_after, tool_after = server_cpu(), machine_cpu_seconds(), children_cpu_seconds()
    cpu_us = busy = other = sys_us = None
    if before is not None and after is not None and result.requests:
        spent = sum(after) - sum(before)
        cpu_us = spent * 1e6 / result.requests
        sys_us = (after[1] - before[1]) * 1e6 / result.requests
        busy = spent / duration
        if machine_before is not None and machine_after is not None:
            others = (machine_after - machine_before) - spent - (tool_after - tool_before)
            other = max(0.0, others) / duration
    return Measurement(result, cpu_us, busy, other, sys_us)


def wait_quiet(limit: float) -> float:
    """Wait (at most ``limit`` s) until the machine is quiet; the seconds waited.

    Between rounds the servers are idle, so whatever keeps the machine busy is someone else.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = machine_cpu_seconds()
        time.sleep(1.0)
        after = machine_cpu_seconds()
        if before is None or after is None or after - before <= NOISY:
            break
    return time.monotonic() - started - 1.0


T = TypeVar("T")


def interleaved_rounds(
    items: Sequence[T],
    rounds: int,
    retries: int,
    load: Callable[[T], Measurement],
    label: Callable[[T], str],
    record: Callable[[T, Measurement], None],
    check: Callable[[], None],
    quiet_wait: float | None = None,
) -> int:
    """Load every item once a round, in a rotated order, until ``rounds`` rounds are kept.

    Rotating spreads drift on the machine over all items alike. A round in which other processes took
    more than NOISY of a core is run again (at most ``retries`` times in all); ``check`` raises when a
    server died. With ``quiet_wait`` a round first waits (at most that long) for a quiet machine.
    Prints a line a round; returns how many noisy rounds had to be kept.
    """
    kept = noisy_kept = attempt = 0
    while kept < rounds:
        if quiet_wait is not None:
            waited = wait_quiet(quiet_wait)
            if waited >= 1:
                print(f"  (waited {waited:.0f}s for other processes to quieten)", flush=True)
        shift = attempt % len(items)
        attempt += 1
        measured = [(item, load(item)) for item in [*items[shift:], *items[:shift]]]
        check()
        cells = ", ".join(f"{label(i)} {m.result.rps:.0f}{'*' if m.noisy else ''}" for i, m in measured)
        noisy = any(m.noisy for _, m in measured)
        if noisy and retries > 0:
            retries -= 1
            print(f"  noisy, rerun:  {cells}", flush=True)
            continue
        kept += 1
        noisy_kept += noisy
        for item, m in measured:
            record(item, m)
        print(f"  round {kept}/{rounds}: {cells}", flush=True)
    return noisy_kept


def round_ratios(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, str]:
    """``num`` over ``den`` (one value a round each): ratio of medians, median per-round ratio, its spread."""
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    spread = f"per round: median {median(per_round):.2f}, {min(per_round):.2f}..{max(per_round):.2f}"
    return median(num) / median(den), median(per_round), spread


def print_noise(
    other: Sequence[float], rounds: int, noisy: int, who: str = "other processes on the machine"
) -> None:
    """The report's lines on how busy the rest of the machine was while loading."""
    if other:
        print(f"{who} used {median(other):.2f} cores (median), {max(other):.2f} (max) while loading")
    if noisy:
        print(
            f"WARNING: {noisy} of the {rounds} rounds kept (marked *) had more than {NOISY} of a core going "
            "to other processes; requests/s and ratios are noisy -- rerun on a quiet machine"
        )
