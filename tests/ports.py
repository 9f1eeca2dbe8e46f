"""Free TCP ports for servers a test starts in another process.

Why not ``bind(("127.0.0.1", 0))`` and close: that hands out a port from the kernel's ephemeral
range, which every outgoing connection and every ``port=0`` listener (moto, the dev world's IMDS,
KMS and S3) also draws from. Between the probe closing and the child binding, one of them can take
it, and a dev sidecar then exits with "address already in use" (seen in CI). Ports below the
ephemeral range are never handed out by the kernel, so only another explicit choice can collide,
and this process never gives the same port twice.
"""

from __future__ import annotations

import os
import random
import socket
import threading

_FALLBACK_EPHEMERAL = (32768, 60999)
_LOWEST = 10000  # clear of well-known and commonly configured service ports
_handed_out: set[int] = set()
_lock = threading.Lock()
_random = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
            low, high = (int(part) for part in handle.read().split())
        return low, high
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def _candidate_ranges() -> list[range]:
    low, high = _ephemeral_range()
    ranges = [range(_LOWEST, low)] if low - _LOWEST >= 1000 else []
    if 65535 - high >= 1000:
        ranges.append(range(high + 1, 65536))
    return ranges


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, outside the ephemeral range, and new to this process."""
    with _lock:
        ranges = _candidate_ranges()
        for _ in range(200 if ranges else 0):
            port = _random.choice(_random.choice(ranges))
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
        # No room outside the ephemeral range on this machine: fall back to the kernel's choice.
        while True:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
