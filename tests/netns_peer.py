"""Processes for test_netns.py, each run inside a network namespace with ``ip netns exec``.

    origin --port P --size N --count-file F     parent side: send N bytes to every client
    enclave --addr A --ports P,.. --log-port L --status-port S [--egress EP --proxy-port X]
                                                enclave side: app echo servers on 127.0.0.1, ingress
                                                bridges, log/status streams, optionally the egress proxy
    fetch --egress EP --host H --port P         enclave app speaking the wire protocol itself
    connect-proxy --proxy-port X --host H --port P   enclave app going through the egress proxy
    echo-client --connect EP --size N           send N random bytes, read the echo, report both hashes

Results are one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import socket
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any

from sidecar.net import vsock, wire
from sidecar.net.ingress import start_ingress_bridges
from sidecar.net.streams import start_streams
from sidecar.net.vsock import parse_endpoint


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def origin(args: argparse.Namespace) -> None:
    payload = random.Random(42).randbytes(args.size)
    count_file = Path(args.count_file)
    lock = threading.Lock()
    count = 0

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            nonlocal count
            with lock:
                count += 1
                count_file.write_text(str(count))
            self.request.sendall(payload)
            self.request.shutdown(socket.SHUT_WR)
            while self.request.recv(65536):
                pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    count_file.write_text("0")
    server = Server(("0.0.0.0", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    emit({"ready": True, "sha256": hashlib.sha256(payload).hexdigest()})
    server.serve_forever()


async def enclave(args: argparse.Namespace) -> None:
    from sidecar.logs import configure

    configure("info")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def echo(sock: socket.socket) -> None:
        while data := await loop.sock_recv(sock, 1 << 16):
            await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    ports = [int(p) for p in args.ports.split(",")]
    apps = [await vsock.serve(vsock.tcp("127.0.0.1", p), echo) for p in ports]
    bridges = await start_ingress_bridges(
        [(vsock.tcp(args.addr, p), vsock.tcp("127.0.0.1", p)) for p in ports], idle_timeout=60
    )
    app_log = logging.getLogger("enclave.app")
    streams = await start_streams(
        vsock.tcp(args.addr, args.log_port), vsock.tcp(args.addr, args.status_port), logger=app_log
    )
    proxy = None
    if args.egress:
        from sidecar.config import NetworkSettings
        from sidecar.net.egress import VsockUpstream, start_egress_proxy
        from sidecar.net.policy import EgressPolicy

        proxy = await start_egress_proxy(
            EgressPolicy(["host"], []),
            port=args.proxy_port,
            upstream=VsockUpstream(parse_endpoint(args.egress)),
            settings=NetworkSettings(upstream="vsock", idle_timeout=60),
        )
    streams.set_status("ready")
    app_log.info("hello_from_the_enclave_namespace")
    emit({"ready": True})
    await stop.wait()
    streams.set_status("exited", code=0)
    if proxy is not None:
        await proxy.close()
    await streams.close()
    await bridges.close()
    for app in apps:
        await app.close()


async def fetch(args: argparse.Namespace) -> None:
    sock = await vsock.connect(parse_endpoint(args.egress), timeout=10)
    try:
        await wire.request_connect(sock, args.host, args.port, timeout=10)
    except wire.ConnectRefused as e:
        emit({"ok": False, "os_code": e.os_code, "message": e.message})
        return
    emit_digest(await read_all(sock))
    sock.close()


async def connect_proxy(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sock = await vsock.connect(vsock.tcp("127.0.0.1", args.proxy_port), timeout=10)
    target = f"{args.host}:{args.port}"
    await loop.sock_sendall(sock, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 1)
        if not chunk:
            break
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode()
    if " 200 " not in status + " ":
        emit({"ok": False, "status": status})
        return
    emit_digest(await read_all(sock))
    sock.close()


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while data := await loop.sock_recv(sock, 1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def emit_digest(data: bytes) -> None:
    emit({"ok": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


async def echo_client(args: argparse.Namespace) -> None:
    payload = os.urandom(args.size)
    loop = asyncio.get_running_loop()
    sock = await vsock.connect(parse_endpoint(args.connect), timeout=10)

    async def send() -> None:
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    echoed = await read_all(sock)
    await sender
    sock.close()
    emit(
        {
            "bytes": len(echoed),
            "sent_sha256": hashlib.sha256(payload).hexdigest(),
            "received_sha256": hashlib.sha256(echoed).hexdigest(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("origin")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--count-file", required=True)
    p = sub.add_parser("enclave")
    p.add_argument("--addr", required=True)
    p.add_argument("--ports", required=True)
    p.add_argument("--log-port", type=int, required=True)
    p.add_argument("--status-port", type=int, required=True)
    p.add_argument("--egress")
    p.add_argument("--proxy-port", type=int, default=10000)
    p = sub.add_parser("fetch")
    p.add_argument("--egress", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("connect-proxy")
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("echo-client")
    p.add_argument("--connect", required=True)
    p.add_argument("--size", type=int, required=True)
    args = parser.parse_args()
    if args.cmd == "origin":
        origin(args)
    else:
        runner = {
            "enclave": enclave,
            "fetch": fetch,
            "connect-proxy": connect_proxy,
            "echo-client": echo_client,
        }
        asyncio.run(runner[args.cmd](args))


if __name__ == "__main__":
    main()
