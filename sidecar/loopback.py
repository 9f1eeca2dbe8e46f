"""Bring the loopback interface up, as an enclave's first process must.

A Nitro Enclave boots with ``lo`` down: nitro-cli's init does not configure it, and Enclaver's odyn
sets it up before anything else. Binding 127.0.0.1 still succeeds while ``lo`` is down, but every
connection to it fails with ENETUNREACH, so the vsock-to-TCP ingress bridge, the egress proxy and the
KMS proxy would all be unreachable. When the sidecar is the enclave's main process (``sidecar run``
from nitro-cli's init, or under ``deploy/odyn-shim``), it must do this itself, before it listens.

Setting IFF_UP is all odyn does (rtnetlink ``link set 1 up``); the kernel then adds 127.0.0.1/8.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from typing import Final

SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
# struct ifreq: a 16-byte name, then a union whose first member here is `short ifr_flags`; 40 bytes.
_IFREQ: Final = struct.Struct("16sh22x")


def loopback_is_up(ifname: str = "lo") -> bool:
    """Whether ``ifname`` has IFF_UP. Needs no privilege."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return bool(_flags(s, ifname) & IFF_UP)


def bring_up_loopback(ifname: str = "lo") -> bool:
    """Set IFF_UP on ``ifname``. True when it was down and is now up, False when it was already up.

    Raises OSError when the interface is down and this process lacks CAP_NET_ADMIN (EPERM), or the
    interface does not exist (ENODEV). An interface that is already up needs no privilege.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _flags(s, ifname)
        if flags & IFF_UP:
            return False
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _IFREQ.pack(ifname.encode(), flags | IFF_UP))
        return True


def _flags(s: socket.socket, ifname: str) -> int:
    name = ifname.encode()
    if not name or len(name) >= 16:
        raise ValueError(f"interface name {ifname!r} must be 1 to 15 bytes")
    answer = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _IFREQ.pack(name, 0))
    flags: int = _IFREQ.unpack(answer)[1]
    return flags & 0xFFFF  # ifr_flags is a C short; keep the bits, not the sign
