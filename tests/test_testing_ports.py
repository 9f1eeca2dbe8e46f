"""sidecar.testing.free_port: ports for servers a test starts in another process.

Threat (to the test suite, not the product): a port handed to a child process is taken by someone
else before the child binds it, and the child dies with "address already in use". CI lost a run to
exactly this when ports came from the kernel's ephemeral range.
"""

from __future__ import annotations

import socket

import pytest

from sidecar import testing
from sidecar.testing import free_port


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ports_are_distinct_free_and_outside_the_ephemeral_range() -> None:
    low, high = testing._ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(bindable(p) for p in ports)
    if testing._candidate_ranges():  # this machine leaves room outside the ephemeral range
        assert not [p for p in ports if low <= p <= high]


def test_a_port_in_use_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        monkeypatch.setattr(testing, "_candidate_ranges", lambda: [range(taken, taken + 1)])
        port = free_port()  # the only candidate is busy: it falls back to the kernel's choice
        assert port != taken and bindable(port)


def test_without_room_outside_the_range_it_falls_back_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testing, "_candidate_ranges", lambda: [])
    ports = [free_port() for _ in range(5)]
    assert len(set(ports)) == 5 and all(bindable(p) for p in ports)
