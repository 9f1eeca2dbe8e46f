"""Requests/s of the sidecar's ``GET /enclave/health`` against a bare aiohttp handler, side by side.

What it measures
    Four HTTP servers, each its own process on 127.0.0.1 and loaded one at a time, all serving
    ``GET /enclave/health`` -> ``{"status":"ok"}``:

    bare            a bare ``aiohttp.web.Application`` with one handler, ``access_log=None``
    aiohttp-log     the same bare app with aiohttp's *default* access logger at INFO, written to a
                    file by ``logging.basicConfig`` -- what "just turn on aiohttp's access log" costs
    sidecar         ``sidecar run`` with ``log.access: true`` (the shipped, realistic config)
    sidecar-nolog   ``sidecar run`` with ``log.access: false``

    Every server's log goes to a file in a temporary directory (never to an unread pipe). The load
    generator is ``wrk -t1 -c50 --latency`` (``hey -z Ns -c 50`` when wrk is not installed). With
    ``--pin`` (the default when ``taskset`` exists and there are 2+ CPUs) every server runs on the
    last CPU and the load generator on the first, so neither migrates onto the other's core; the
    same for all servers. Rounds are interleaved: each round loads every server once, in a rotated
    order, so drift on the machine hits all of them alike. A round starts once the machine has been
    quiet for a second (waiting at most QUIET_WAIT); a round in which other processes took more
    than NOISY of a core during any of its measurements is thrown away and run again (at most
    ``--retries`` times in all); noisy rounds that had to be kept are marked ``*``.

    The report gives, per server, the median requests/s and p99 latency, the server process's CPU
    time per request (steadier than requests/s on a shared VM: it does not count time the server
    spent waiting for a CPU) and its kernel share ("of it sys": on loopback that includes waking
    wrk, which on a VM costs a slower server more per request, so requests/s ratios sit below the
    instruction ratios), and the ratios against ``bare``: of the medians, and the median of the
    per-round ratios (the servers of one round ran seconds apart). The target is sidecar/bare >= 0.9
    in requests/s; the same ratio of CPU time per request is reported next to it.

    ``--against REV`` adds a fifth server, ``sidecar@REV``: the sidecar (access log on) from git
    revision REV of this repository (its ``sidecar`` and ``plugins`` extracted with ``git archive``
    and put first on PYTHONPATH), so a change is measured against its parent side by side, in the
    same rounds, instead of against a number from another day's VM. It works with
    ``--instructions`` too.

    ``--instructions N`` measures something else, and deterministically: each server runs under
    valgrind's callgrind, and after a warm-up the user-space instructions of exactly N requests
    (8 keep-alive connections, requests back to back) are counted. Repeatable to about 0.5%, so it
    shows differences that wrk's noise hides. Under valgrind a server answers ~100x slower, so
    every access record has its own millisecond: what a lightly loaded server pays for its log.

How to run
    .venv/bin/python bench/bench_server.py                  # 8 rounds x 3 s per server
    .venv/bin/python bench/bench_server.py --rounds 12 --duration 4
    .venv/bin/python bench/bench_server.py --tool hey       # force hey instead of wrk
    .venv/bin/python bench/bench_server.py --instructions 2000   # needs valgrind
    .venv/bin/python bench/bench_server.py --against HEAD~1     # this change against its parent

The exit code is 0 whether the target is met or not (this is a report; the last lines say PASS or
FAIL); it is 1 only when a server cannot be started or the load generator fails.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    CONNECTIONS,
    HOST,
    LoadResult,
    Measurement,
    check_alive,
    free_ports,
    git_revision,
    interleaved_rounds,
    machine_line,
    measure,
    median,
    pin_cpus,
    print_noise,
    round_ratios,
    run_tool,
    run_wrk,
    spawn,
    stop_process,
    tail_file,
)

HEALTH = "/enclave/health"
TARGET = 0.9
START_TIMEOUT = 20.0  # seconds for a server to answer 200 on /enclave/health
QUIET_WAIT = 60.0  # seconds a round waits for the machine to be quiet before it starts anyway
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM before it is killed

SERVERS = ("bare", "aiohttp-log", "sidecar", "sidecar-nolog")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

BARE_APP = textwrap.dedent(
    """
    import logging, sys
    from aiohttp import web

    BODY = b'{"status":"ok"}'

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/enclave/health", health)
    port, log_file = int(sys.argv[1]), sys.argv[2]
    if log_file == "-":
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
    else:
        # aiohttp's default access logger ("aiohttp.access", the default format) at INFO, to a file.
        logging.basicConfig(level=logging.INFO, filename=log_file)
        web.run_app(app, host="127.0.0.1", port=port, print=None)
    """
)


@dataclass
class Server:
    name: str
    description: str
    port: int
    argv: list[str]
    log_path: Path  # the server's stdout and stderr
    access_path: Path | None = None  # where its access lines go (None: no access log)
    env: dict[str, str] | None = None  # its environment (None: this process's)
    proc: subprocess.Popen[bytes] | None = None
    rps: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU time per request, microseconds
    sys_us: list[float] = field(default_factory=list)  # of cpu_us, the kernel's share
    busy: list[float] = field(default_factory=list)  # server CPU time / wall time (1.0 = one full core)
    other: list[float] = field(default_factory=list)  # cores used by everything but server and load tool
    errors: list[str] = field(default_factory=list)
    served: int = 0  # requests answered under load, warm-up included
    instructions: float | None = None  # --instructions: user-space instructions per request

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{HEALTH}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


# ---------------------------------------------------------------------------- set-up


def write_sidecar_config(directory: Path, port: int, proxy_port: int, access: bool) -> tuple[Path, Path]:
    """A manifest with one ingress port (no api, no kms_proxy) and a sidecar.yaml with no plugins."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "enclaver.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            version: v1
            name: "bench"
            target: "bench:enclave-latest"
            sources:
              app: "bench:latest"
            egress:
              proxy_port: {proxy_port}   # the egress proxy listens here, idle
            ingress:
              - listen_port: {port}
            """
        )
    )
    settings = directory / "sidecar.yaml"
    settings.write_text(
        textwrap.dedent(
            f"""\
            listen_host: {HOST}
            state_dir: {directory / "state"}
            log:
              level: info
              access: {"true" if access else "false"}
            attestation: {{nsm: "off"}}
            aws: {{imds: "off"}}
            plugins: {{}}
            """
        )
    )
    return manifest, settings


def make_servers(tmp: Path, wanted: set[str], against: str | None = None) -> list[Server]:
    """The servers named in ``wanted``, and ``sidecar@against`` when ``against`` is given."""
    ports = free_ports(8)
    sidecar_bin = BIN / "sidecar"
    servers = [
        Server(
            "bare",
            "bare aiohttp handler, access_log=None",
            ports[0],
            [PYTHON, "-c", BARE_APP, str(ports[0]), "-"],
            tmp / "bare.log",
        ),
        Server(
            "aiohttp-log",
            "bare handler + aiohttp's default access log (INFO, to a file)",
            ports[1],
            [PYTHON, "-c", BARE_APP, str(ports[1]), str(tmp / "aiohttp-access.log")],
            tmp / "aiohttp-log.stderr",
            tmp / "aiohttp-access.log",
        ),
    ]
    for name, port, proxy_port, access in (
        ("sidecar", ports[2], ports[3], True),
        ("sidecar-nolog", ports[4], ports[5], False),
    ):
        manifest, settings = write_sidecar_config(tmp / name, port, proxy_port, access)
        servers.append(
            Server(
                name,
                f"sidecar run, log.access: {'true' if access else 'false'}",
                port,
                [str(sidecar_bin), "run", "--manifest", str(manifest), "--config", str(settings)],
                tmp / f"{name}.stderr",
                tmp / f"{name}.stderr" if access else None,
            )
        )
    servers = [s for s in servers if s.name in wanted]
    if against is not None:
        source = extract_revision(against, tmp / "against-source")
        name = f"sidecar@{against}"
        manifest, settings = write_sidecar_config(tmp / "against", ports[6], ports[7], access=True)
        servers.append(
            Server(
                name,
                f"sidecar run from revision {against}, log.access: true",
                ports[6],
                [str(sidecar_bin), "run", "--manifest", str(manifest), "--config", str(settings)],
                tmp / "against.stderr",
                tmp / "against.stderr",
                env={**os.environ, "PYTHONPATH": str(source)},
            )
        )
    return servers


def extract_revision(revision: str, directory: Path) -> Path:
    """``sidecar`` and ``plugins`` as of ``revision``, in ``directory`` (first on PYTHONPATH, they
    shadow the installed ones; the console script and the other dependencies are today's)."""
    directory.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "sidecar", "plugins"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise RuntimeError(f"--against {revision}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def start(server: Server, cwd: Path, prefix: list[str] | None = None) -> None:
    """Start the server; ``prefix`` (``taskset -c N`` or ``valgrind ...``) execs it in the same process."""
    server.proc = spawn([*(prefix or []), *server.argv], server.log_path, cwd, env=server.env)


def wait_healthy(server: Server, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.proc.returncode}\n{tail(server)}")
        conn = http.client.HTTPConnection(HOST, server.port, timeout=1.0)
        try:
            conn.request("GET", HEALTH)
            status = conn.getresponse().status
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not answer 200 on {server.url} within {timeout:.0f}s: {last}")


def tail(server: Server, lines: int = 20) -> str:
    return tail_file(server.log_path, lines)


def stop(server: Server) -> None:
    stop_process(server.proc, STOP_TIMEOUT)


# ---------------------------------------------------------------------------- load


def run_hey(url: str, duration: int, prefix: list[str]) -> LoadResult:
    out = run_tool([*prefix, "hey", "-z", f"{duration}s", "-c", str(CONNECTIONS), url], duration)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    if rps is None or p99 is None:
        raise RuntimeError(f"cannot parse hey output:\n{out}")
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    bad = [f"[{code}] {n}" for code, n in codes if not code.startswith("2")]
    if "Error distribution" in out:
        bad.append("errors reported")
    total = sum(int(n) for _, n in codes)
    return LoadResult(float(rps.group(1)), float(p99.group(1)) * 1000, total, errors="; ".join(bad))


TOOLS = {
    "wrk": f"wrk -t1 -c{CONNECTIONS} -d{{d}}s --latency URL",
    "hey": f"hey -z {{d}}s -c {CONNECTIONS} URL",
}


def load_tool(choice: str) -> str:
    """The load generator to use: ``choice``, or with "auto" wrk and else hey."""
    candidates = list(TOOLS) if choice == "auto" else [choice]
    for tool in candidates:
        if shutil.which(tool):
            return tool
    raise RuntimeError(f"{' or '.join(candidates)} is not installed")


def load(tool: str, server: Server, duration: int, prefix: list[str]) -> Measurement:
    """Load one server once: requests/s and p99, and the CPU time the server and the rest spent."""
    if tool == "wrk":
        m = measure(server.pid, duration, lambda: run_wrk(server.url, duration, prefix))
    else:
        m = measure(server.pid, duration, lambda: run_hey(server.url, duration, prefix))
    server.served += m.result.requests
    return m


def record(server: Server, m: Measurement) -> None:
    server.rps.append(m.result.rps)
    server.p99_ms.append(m.result.p99_ms)
    server.errors.append(m.result.errors)
    if m.cpu_us is not None and m.busy is not None:
        server.cpu_us.append(m.cpu_us)
        server.busy.append(m.busy)
    if m.sys_us is not None:
        server.sys_us.append(m.sys_us)
    if m.other is not None:
        server.other.append(m.other)


# ---------------------------------------------------------------------------- instructions


async def _keepalive_requests(port: int, total: int, connections: int = 8) -> int:
    """``total`` GETs of HEALTH over ``connections`` keep-alive connections, each back to back."""
    request = f"GET {HEALTH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for _ in range(count):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 "):
                    raise RuntimeError(f"unexpected answer: {head[:80]!r}")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
        finally:
            writer.close()

    per = max(1, total // connections)
    await asyncio.wait_for(asyncio.gather(*(one(per) for _ in range(connections))), 600)
    return per * connections


def callgrind_total(path: Path) -> int:
    """The instruction total of one callgrind dump."""
    match = re.search(r"^(?:summary|totals):\s+(\d+)", path.read_text(errors="replace"), re.M)
    if match is None:
        raise RuntimeError(f"no instruction total in {path}")
    return int(match.group(1))


def count_instructions(server: Server, tmp: Path, requests: int) -> float:
    """Start ``server`` under callgrind; instructions per request for ``requests`` warm requests."""
    out = tmp / f"{server.name}.callgrind"
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no"]
    start(server, tmp, prefix)
    try:
        wait_healthy(server, timeout=300)
        asyncio.run(_keepalive_requests(server.port, 400))  # warm-up: imports, caches, specialisation
        time.sleep(0.5)
        assert server.proc is not None
        pid = str(server.proc.pid)
        subprocess.run(["callgrind_control", "-z", pid], capture_output=True, check=True, timeout=120)
        done = asyncio.run(_keepalive_requests(server.port, requests))
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True, timeout=120)
        dump = Path(f"{out}.{pid}.1")
        for _ in range(100):  # callgrind_control returns once the dump is requested
            if dump.exists() and callgrind_total_or_none(dump) is not None:
                break
            time.sleep(0.1)
        return callgrind_total(dump) / done
    finally:
        stop(server)


def callgrind_total_or_none(path: Path) -> int | None:
    try:
        return callgrind_total(path)
    except (OSError, RuntimeError):
        return None


def run_instructions(servers: list[Server], tmp: Path, requests: int) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("error: --instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 1
    print(f"instructions: {requests} requests over 8 keep-alive connections, after 400 to warm up")
    try:
        for s in servers:
            s.instructions = count_instructions(s, tmp, requests)
            print(f"  {s.name:<14} {s.instructions:>10,.0f} instructions/request", flush=True)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = servers[0].instructions or 1.0
    print()
    print("ratios (instructions per request of bare over the server's, i.e. the throughput it predicts):")
    for s in servers[1:]:
        print(f"  {'bare/' + s.name:<22} {base / (s.instructions or 1.0):5.3f}")
    sidecar = next((s for s in servers if s.name == "sidecar"), None)
    if sidecar is None:
        return 0
    ratio = base / (sidecar.instructions or 1.0)
    print()
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"instructions bare/sidecar = {ratio:.3f} (target >= {TARGET}): {verdict}")
    return 0


# ---------------------------------------------------------------------------- report


def ratio_line(name: str, servers: dict[str, Server], base: str = "bare") -> tuple[float, float, str]:
    """Requests/s of ``name`` over ``base``: ratio of the medians, median per-round ratio, a line."""
    ratio, paired, spread = round_ratios(servers[name].rps, servers[base].rps)
    return ratio, paired, f"  {name + '/' + base:<22} {ratio:5.2f}   ({spread})"


def cpu_ratio(name: str, servers: dict[str, Server], base: str = "bare") -> tuple[float, float, str]:
    """CPU time per request of ``base`` over ``name``: the throughput ratio CPU time predicts."""
    num, den = servers[name], servers[base]
    if not num.cpu_us or not den.cpu_us or len(num.cpu_us) != len(den.cpu_us):
        return float("nan"), float("nan"), f"  {base + '/' + name:<22}   n/a"
    ratio, paired, spread = round_ratios(den.cpu_us, num.cpu_us)
    return ratio, paired, f"  {base + '/' + name:<22} {ratio:5.2f}   ({spread})"


def report(servers: list[Server], tool: str, duration: int, rounds: int, elapsed: float, noisy: int) -> None:
    by_name = {s.name: s for s in servers}
    against = [s.name for s in servers if s.name.startswith("sidecar@")]
    others = [n for n in ("sidecar", "sidecar-nolog", "aiohttp-log", *against) if n in by_name]
    print()
    print(f"{HEALTH}, {tool} -c{CONNECTIONS}, {rounds} rounds x {duration}s interleaved; median of rounds")
    header = (
        f"{'server':<14} {'req/s median':>12} {'min':>8} {'max':>8} {'p99 ms':>7} "
        f"{'CPU us/req':>10} {'of it sys':>9} {'CPU busy':>8}"
    )
    print(header)
    print("-" * len(header))
    for s in servers:
        cpu = f"{median(s.cpu_us):>10.1f}" if s.cpu_us else f"{'n/a':>10}"
        kernel = f"{median(s.sys_us):>9.1f}" if s.sys_us else f"{'n/a':>9}"
        busy = f"{median(s.busy):>8.0%}" if s.busy else f"{'n/a':>8}"
        print(
            f"{s.name:<14} {median(s.rps):>12.0f} {min(s.rps):>8.0f} {max(s.rps):>8.0f} "
            f"{median(s.p99_ms):>7.2f} {cpu} {kernel} {busy}"
        )
    print("(CPU us/req and CPU busy: the server process's own CPU time; busy ~100% = it was the bottleneck.")
    print(" of it sys: kernel time, mostly sending the answer and waking wrk; on a VM a slower server pays")
    print(" more per request for the wake-up, so requests/s ratios sit below the instruction ratios)")
    who = "other processes on the machine (and the hypervisor's steal)"
    print_noise([o for s in servers for o in s.other], rounds, noisy, who)
    print()
    print("ratios of requests/s against bare (median over median, same run):")
    for name in others:
        print(ratio_line(name, by_name)[2])
    if "sidecar" in by_name and "sidecar-nolog" in by_name:
        print(
            ratio_line("sidecar", by_name, base="sidecar-nolog")[2] + "   <- cost of the sidecar's access log"
        )
    for name in against:
        print(ratio_line("sidecar", by_name, base=name)[2] + "   <- this source against that revision")
    print("ratios of CPU time per request (bare's over the server's: the throughput it predicts):")
    for name in others:
        print(cpu_ratio(name, by_name)[2])
    problems = [f"{s.name}: {e}" for s in servers for e in s.errors if e]
    if problems:
        print()
        print("load generator reported errors (these results are suspect):")
        for p in problems:
            print(f"  {p}")
    print()
    for s in servers:
        if s.access_path is not None and s.access_path.exists():
            lines = count_lines(s.access_path)
            print(f"log lines written by {s.name:<14} {lines:>9}, for {s.served} requests under load")
    print(f"total wall time {elapsed:.0f}s")
    if "sidecar" not in by_name:
        return
    ratio, paired, _ = ratio_line("sidecar", by_name)
    cpu_time, cpu_paired, _ = cpu_ratio("sidecar", by_name)
    print()
    print(f"CPU time per request, bare/sidecar = {cpu_time:.3f} (per-round median {cpu_paired:.3f})")
    print(f"requests/s, sidecar/bare per-round median = {paired:.3f}")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"ratio sidecar/bare = {ratio:.3f} (requests/s, median over median; target >= {TARGET}): {verdict}")


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ---------------------------------------------------------------------------- main


def aiohttp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aiohttp")
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=3, help="seconds of load per server per round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (each loads every server)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded load per server first")
    parser.add_argument("--tool", choices=["auto", *TOOLS], default="auto", help="load generator (auto: wrk)")
    parser.add_argument(
        "--retries", type=int, default=None, help="noisy rounds to throw away and rerun (default: --rounds)"
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="servers on the last CPU, the load generator on the first (default: when possible)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated subset to load, bare always included (default: {','.join(SERVERS)})",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also load the sidecar as of git revision REV, side by side (e.g. HEAD~1)",
    )
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="instead of wrk: count instructions per request over N requests under valgrind",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0 or (args.retries or 0) < 0:
        parser.error("--duration must be > 0, --rounds >= 1, --warmup >= 0, --retries >= 0")
    if args.instructions is not None and args.instructions < 8:
        parser.error("--instructions must be >= 8")
    retries = args.rounds if args.retries is None else args.retries
    wanted = {"bare", *(n.strip() for n in args.servers.split(",") if n.strip())}
    if not wanted <= set(SERVERS):
        parser.error(f"--servers: unknown {', '.join(sorted(wanted - set(SERVERS)))}")

    print(machine_line())
    print(
        f"python {platform.python_version()}  aiohttp {aiohttp_version()}  sidecar source: {git_revision()}"
    )
    if args.instructions is not None:
        with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp_name:
            try:
                servers = make_servers(Path(tmp_name), wanted, args.against)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            return run_instructions(servers, Path(tmp_name), args.instructions)

    try:
        tool = load_tool(args.tool)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pins = pin_cpus() if args.pin is not False else None
    if args.pin and pins is None:
        print("error: --pin needs taskset and 2 or more CPUs", file=sys.stderr)
        return 1
    server_prefix, tool_prefix = pins or ([], [])
    print(f"load: {TOOLS[tool].format(d=args.duration)}")
    if pins:
        print(f"pinned: servers `{' '.join(server_prefix)}`, load generator `{' '.join(tool_prefix)}`")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp_name:
        tmp = Path(tmp_name)
        servers: list[Server] = []
        try:
            servers = make_servers(tmp, wanted, args.against)
            for s in servers:
                start(s, tmp, server_prefix)
            for s in servers:
                wait_healthy(s)
                print(f"  {s.name:<14} {s.url}  ({s.description})")
            if args.warmup > 0:
                for s in servers:
                    load(tool, s, args.warmup, tool_prefix)
            noisy_kept = interleaved_rounds(
                servers,
                args.rounds,
                retries,
                lambda s: load(tool, s, args.duration, tool_prefix),
                lambda s: s.name,
                record,
                lambda: check_alive(servers, lines=20),
                quiet_wait=QUIET_WAIT,
            )
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            for s in servers:
                stop(s)
        report(servers, tool, args.duration, args.rounds, time.monotonic() - started, noisy_kept)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
