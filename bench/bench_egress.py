"""Throughput and connection rate of the egress proxy's CONNECT tunnels, against tinyproxy and no proxy.

What it measures
    An origin (its own process: ``http.server`` parses the request, ``socket.sendfile`` sends a
    256 MiB body from the page cache) on 127.0.0.1, and ``curl -o /dev/null`` downloading it:

    direct      curl straight to the origin
    sidecar     curl -p -x through ``sidecar egress serve`` (the real command, its own process,
                direct upstream, policy allowing only 127.0.0.1, INFO log line per tunnel to a file)
    tinyproxy   curl -p -x through tinyproxy (its own process, loopback only, ``Allow 127.0.0.1``,
                ``ConnectPort`` = the origin's port, Info log level to a file)

    Throughput rounds are interleaved (each round runs every path once, in a rotated order) and the
    report gives medians of GB/s (10^9 bytes/s), the proxy's CPU seconds per GB, and the ratios
    sidecar/tinyproxy and sidecar/direct. Targets: sidecar/tinyproxy >= 1.0 and sidecar/direct >= 0.7.

    Connection set-up rate: a client (this process, asyncio, 16 connections in parallel) opens a
    connection to the proxy, sends ``CONNECT``, waits for the 200, and closes; the proxy connects to
    the origin for each one. Reported as tunnels/s (median of rounds) for both proxies, with the
    ratio sidecar/tinyproxy (no target; shown for context).

    "other" is the CPU that processes other than origin, proxy and client used meanwhile (from
    /proc/stat): on a shared 2-vCPU machine anything above ~0.15 cores makes the numbers noisy.

How to run
    apt-get install -y tinyproxy curl
    .venv/bin/python bench/bench_egress.py                      # 5 rounds
    .venv/bin/python bench/bench_egress.py --rounds 9 --size-mib 256 --rate-seconds 3

The exit code is 0 whether targets are met or not (the last lines say PASS or FAIL); 1 when a
process cannot be started or a transfer fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import ROOT, git_revision

HOST = "127.0.0.1"
PYTHON = sys.executable
TARGET_VS_TINYPROXY = 1.0
TARGET_VS_DIRECT = 0.7
NOISY = 0.15
RATE_CONCURRENCY = 16
START_TIMEOUT = 20.0

ORIGIN = textwrap.dedent(
    """
    import http.server, os, sys

    path, port_file = sys.argv[1], sys.argv[2]
    size = os.path.getsize(path)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.flush()
            with open(path, "rb") as f:
                self.connection.sendfile(f)
            self.close_connection = True

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 1024
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()
    """
)


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the process and its threads, from /proc."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, 0.0
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def cpu_seconds(self) -> float:
        return sum(self.cpu())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Route:
    name: str
    proxy: Proc | None
    gbps: list[float] = field(default_factory=list)
    # CPU seconds per throughput round (summed over all rounds for the report: /proc counts 10 ms
    # ticks, too coarse for one round): the proxy's user and system time, the origin's, curl's
    proxy_user: list[float] = field(default_factory=list)
    proxy_sys: list[float] = field(default_factory=list)
    origin_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    tunnel_cpu: list[float] = field(default_factory=list)  # proxy CPU seconds per set-up round
    tunnels: list[float] = field(default_factory=list)  # tunnels per set-up round
    rate_errors: int = 0
    other: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def busy_cores() -> tuple[float, float]:
    """(busy jiffies, wall time) from /proc/stat, for 'other processes' accounting."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user + nice + system only: irq/softirq time (loopback TCP is mostly softirq) is charged to no
    # process, so counting it would make our own traffic look like "other" load.
    return (values[0] + values[1] + values[2]) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {START_TIMEOUT:g} s")


def start_origin(tmp: Path, size: int) -> tuple[Proc, int]:
    blob = tmp / "blob"
    with open(blob, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    return start_script(tmp, "origin", ORIGIN, str(blob))


def start_sidecar(tmp: Path, origin_ports: list[int]) -> tuple[Proc, int]:
    port = free_port()
    manifest = tmp / "enclaver.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            version: v1
            name: "bench"
            target: "bench:enclave-latest"
            sources:
              app: "bench:latest"
            egress:
              proxy_port: {port}
              allow: [{", ".join(f'"{HOST}:{p}"' for p in origin_ports)}]
            """
        )
    )
    settings = tmp / "sidecar.yaml"
    settings.write_text(f"state_dir: {tmp / 'state'}\nlog:\n  level: info\nnetwork:\n  upstream: direct\n")
    log = tmp / "sidecar.log"
    sidecar_bin = Path(PYTHON).parent / "sidecar"
    if sidecar_bin.exists() and _has_egress_serve(sidecar_bin):
        argv = [str(sidecar_bin), "egress", "serve"]
    else:  # before the integrator attaches the command to `sidecar egress`
        argv = [PYTHON, "-c", "import sys; from sidecar.net.serve_command import serve; serve(sys.argv[1:])"]
    argv += ["--manifest", str(manifest), "--config", str(settings), "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_listening(port, proc, "sidecar egress serve")
    return Proc("sidecar", proc, log), port


def _has_egress_serve(sidecar_bin: Path) -> bool:
    out = subprocess.run(
        [str(sidecar_bin), "egress", "serve", "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    return out.returncode == 0 and "--upstream" in out.stdout


def start_tinyproxy(tmp: Path, origin_ports: list[int]) -> tuple[Proc, int] | None:
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not os.path.exists(binary):
        return None
    port = free_port()
    conf = tmp / "tinyproxy.conf"
    log = tmp / "tinyproxy.log"
    lines = [f"Port {port}", f"Listen {HOST}", "Timeout 600", "MaxClients 256", f"Allow {HOST}"]
    lines += [f"ConnectPort {p}" for p in origin_ports]  # CONNECT only to the origins
    lines += [f'LogFile "{log}"', "LogLevel Info"]  # a line per connection, like the sidecar's
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_listening(port, proc, "tinyproxy")
    return Proc("tinyproxy", proc, log), port


def curl_download(url: str, proxy_port: int | None, size: int) -> float:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"]
    if proxy_port is not None:
        argv += ["-p", "-x", f"http://{HOST}:{proxy_port}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"curl failed ({out.returncode}): {out.stderr.strip()}")
    got, seconds = out.stdout.split()
    if int(got) != size:
        raise SystemExit(f"curl got {got} bytes, expected {size}")
    return size / float(seconds) / 1e9


STATUS_200 = re.compile(rb"^HTTP/1\.[01] 200 ")

# The set-up-rate origin: accepts and closes at once, so that it is never the bottleneck (a threaded
# http.server falls behind, tunnels pile up waiting for it and the proxy hits max_tunnels).
CLOSER = textwrap.dedent(
    """
    import asyncio, os, sys

    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, backlog=4096)
        port_file = sys.argv[1]
        with open(port_file + ".tmp", "w") as f:
            f.write(str(server.sockets[0].getsockname()[1]))
        os.rename(port_file + ".tmp", port_file)
        await server.serve_forever()

    asyncio.run(main())
    """
)


async def connect_rate(proxy_port: int, origin_port: int, seconds: float) -> tuple[float, int, str]:
    """(tunnels/s, failures, first failure): connect, CONNECT, read the 200 head, close; in parallel."""
    request = f"CONNECT {HOST}:{origin_port} HTTP/1.1\r\nHost: {HOST}:{origin_port}\r\n\r\n".encode()
    done = 0
    failed = 0
    first_failure = ""
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, failed, first_failure
        while time.monotonic() < stop_at:
            reader, writer = await asyncio.open_connection(HOST, proxy_port)
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError) as e:
                head = repr(e).encode()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if STATUS_200.match(head):
                done += 1
            else:
                failed += 1
                first_failure = first_failure or head.split(b"\r\n", 1)[0].decode("ascii", "replace")

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(RATE_CONCURRENCY)))
    return done / (time.monotonic() - start), failed, first_failure


@contextlib.contextmanager
def measure(path: Route, origin: Proc) -> Iterator[dict[str, float]]:
    """CPU of the proxy (user, system), the origin and the client, and of everything else, meanwhile."""
    out: dict[str, float] = {}
    before_busy, before_t = busy_cores()
    proxy_before = path.proxy.cpu() if path.proxy is not None else (0.0, 0.0)
    origin_before = origin.cpu_seconds()
    client_before = children_cpu() + self_cpu()
    yield out
    after_busy, after_t = busy_cores()
    proxy_after = path.proxy.cpu() if path.proxy is not None else (0.0, 0.0)
    out["proxy_user"] = proxy_after[0] - proxy_before[0]
    out["proxy_sys"] = proxy_after[1] - proxy_before[1]
    out["origin"] = origin.cpu_seconds() - origin_before
    out["client"] = children_cpu() + self_cpu() - client_before
    ours = out["proxy_user"] + out["proxy_sys"] + out["origin"] + out["client"]
    out["other"] = max(0.0, (after_busy - before_busy - ours) / (after_t - before_t))
    path.other.append(out["other"])


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def start_script(tmp: Path, name: str, code: str, *args: str) -> tuple[Proc, int]:
    """Run a helper script that writes its port to a file; wait until it listens."""
    port_file = tmp / f"{name}.port"
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [PYTHON, "-c", code, *args, str(port_file)], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start; see {log}")
        time.sleep(0.05)
    port = int(port_file.read_text())
    wait_listening(port, proc, name)
    return Proc(name, proc, log), port


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rate-seconds", type=float, default=3.0)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        print("curl is required (apt-get install -y curl)", file=sys.stderr)
        return 1
    size = args.size_mib << 20
    gb = size / 1e9
    started = time.monotonic()
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  {platform.node() or 'host'}  "
        f"{os.cpu_count()} CPUs  kernel {platform.release()}"
    )
    tiny_bin = shutil.which("tinyproxy")
    tiny_version = (
        subprocess.run([tiny_bin, "-v"], capture_output=True, text=True).stdout.strip() if tiny_bin else ""
    )
    curl_version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(
        f"python {platform.python_version()}  sidecar source: {git_revision()}  "
        f"{tiny_version or 'no tinyproxy'}"
    )
    print(
        f"client: {' '.join(curl_version.split()[:2])}; "
        f"origin: http.server + socket.sendfile, {args.size_mib} MiB"
    )
    with tempfile.TemporaryDirectory(prefix="bench-egress-") as d:
        tmp = Path(d)
        procs: list[Proc] = []
        try:
            origin, origin_port = start_origin(tmp, size)
            procs.append(origin)
            closer, closer_port = start_script(tmp, "closer", CLOSER)
            procs.append(closer)
            sidecar, sidecar_port = start_sidecar(tmp, [origin_port, closer_port])
            procs.append(sidecar)
            routes = [Route("direct", None), Route("sidecar", sidecar)]
            ports: dict[str, int | None] = {"direct": None, "sidecar": sidecar_port}
            tiny = start_tinyproxy(tmp, [origin_port, closer_port])
            if tiny is not None:
                procs.append(tiny[0])
                routes.append(Route("tinyproxy", tiny[0]))
                ports["tinyproxy"] = tiny[1]
            else:
                print("tinyproxy is not installed (apt-get install -y tinyproxy): comparing with direct only")
            url = f"http://{HOST}:{origin_port}/blob"
            for r in routes:  # warm-up: page cache, first connections
                curl_download(url, ports[r.name], size)
            print(f"\nthroughput: curl -o /dev/null [-p -x PROXY] {url}")
            for n in range(args.rounds):
                order = routes[n % len(routes) :] + routes[: n % len(routes)]
                row = []
                for r in order:
                    with measure(r, origin) as m:
                        gbps = curl_download(url, ports[r.name], size)
                    r.gbps.append(gbps)
                    r.proxy_user.append(m["proxy_user"])
                    r.proxy_sys.append(m["proxy_sys"])
                    r.origin_cpu.append(m["origin"])
                    r.client_cpu.append(m["client"])
                    row.append(f"{r.name} {gbps:.2f}{'*' if m['other'] > NOISY else ''}")
                print(f"  round {n + 1}/{args.rounds}: " + ", ".join(row))
            proxies = [r for r in routes if r.proxy is not None]
            print(
                f"\nconnection set-up: CONNECT + 200 + close, {RATE_CONCURRENCY} in parallel, "
                f"{args.rate_seconds:g} s, to an origin that accepts and closes"
            )
            for n in range(args.rounds):
                order = proxies[n % len(proxies) :] + proxies[: n % len(proxies)]
                row = []
                for r in order:
                    port = ports[r.name]
                    assert port is not None
                    with measure(r, closer) as m:
                        rate, failed, first = asyncio.run(connect_rate(port, closer_port, args.rate_seconds))
                    r.rate.append(rate)
                    tunnels = rate * args.rate_seconds
                    r.tunnel_cpu.append(m["proxy_user"] + m["proxy_sys"])
                    r.tunnels.append(tunnels)
                    r.rate_errors += failed
                    note = f" ({failed} failed: {first})" if failed else ""
                    row.append(f"{r.name} {rate:.0f}/s{'*' if m['other'] > NOISY else ''}{note}")
                print(f"  round {n + 1}/{args.rounds}: " + ", ".join(row))
        finally:
            for p in reversed(procs):
                p.stop()
        lines = sidecar.log.read_text().splitlines()
        logged = sum(1 for line in lines if '"event": "egress"' in line)
    gbps_med = {r.name: med(r.gbps) for r in routes}
    rates = {r.name: med(r.rate) for r in routes if r.rate}
    print(f"\n{args.size_mib} MiB over loopback, {args.rounds} rounds interleaved; medians")
    print("                            CPU seconds per GB moved                GB per CPU second")
    print(
        f"{'route':<10} {'GB/s':>5} {'min':>5} {'max':>5}  "
        f"{'proxy usr':>9} {'proxy sys':>9} {'origin':>6} {'curl':>6}  {'(whole path)':>17}"
    )
    print("-" * 87)
    efficiency: dict[str, float] = {}
    for r in routes:
        moved = len(r.gbps) * gb
        usr = f"{sum(r.proxy_user) / moved:.3f}" if r.proxy else "-"
        sys_ = f"{sum(r.proxy_sys) / moved:.3f}" if r.proxy else "-"
        origin_s, curl_s = sum(r.origin_cpu) / moved, sum(r.client_cpu) / moved
        total = (sum(r.proxy_user) + sum(r.proxy_sys)) / moved + origin_s + curl_s
        efficiency[r.name] = 1 / total if total else 0.0
        print(
            f"{r.name:<10} {gbps_med[r.name]:>5.2f} {min(r.gbps):>5.2f} {max(r.gbps):>5.2f}  "
            f"{usr:>9} {sys_:>9} {origin_s:>6.3f} {curl_s:>6.3f}  "
            f"{efficiency[r.name]:>17.2f}"
        )
    print(
        "(GB per CPU second of origin + proxy + curl together: what bounds GB/s when the machine is "
        "CPU-bound;\n less sensitive to other load than GB/s. CPU is sampled in 10 ms ticks.)"
    )
    print(f"\n{'route':<10} {'tunnels/s':>9} {'min':>6} {'max':>6} {'proxy CPU us/tunnel':>20} {'failed':>7}")
    print("-" * 63)
    for r in proxies:
        print(
            f"{r.name:<10} {rates[r.name]:>9.0f} {min(r.rate):>6.0f} {max(r.rate):>6.0f} "
            f"{sum(r.tunnel_cpu) / max(sum(r.tunnels), 1) * 1e6:>20.0f} {r.rate_errors:>7}"
        )
    others = [o for r in routes for o in r.other]
    print(f"\nother processes used {med(others):.2f} cores (median), {max(others):.2f} (max) while measuring")
    if max(others) > NOISY:
        print(f"WARNING: more than {NOISY} of a core went to other processes in the rounds marked *: noisy")
    print(f"sidecar log: {logged} 'egress' lines (one per tunnel)")
    print(f"total wall time {time.monotonic() - started:.0f}s\n")
    vs_direct = gbps_med["sidecar"] / gbps_med["direct"]
    verdict = "PASS" if vs_direct >= TARGET_VS_DIRECT else "FAIL"
    print(f"ratio sidecar/direct    = {vs_direct:.2f} (target >= {TARGET_VS_DIRECT}): {verdict}")
    print(
        f"CPU efficiency sidecar/direct = {fmt_ratio(efficiency['sidecar'], efficiency['direct'])}"
        + (
            f", sidecar/tinyproxy = {fmt_ratio(efficiency['sidecar'], efficiency['tinyproxy'])}"
            if "tinyproxy" in efficiency
            else ""
        )
        + " (context for the GB/s ratios below)"
    )
    if "tinyproxy" in gbps_med:
        vs_tiny = gbps_med["sidecar"] / gbps_med["tinyproxy"]
        verdict = "PASS" if vs_tiny >= TARGET_VS_TINYPROXY else "FAIL"
        print(f"ratio sidecar/tinyproxy = {vs_tiny:.2f} (target >= {TARGET_VS_TINYPROXY}): {verdict}")
        ratio = fmt_ratio(rates["sidecar"], rates["tinyproxy"])
        print(f"tunnel set-up rate sidecar/tinyproxy = {ratio} (no target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
