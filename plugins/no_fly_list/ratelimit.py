"""A per-client token bucket, bounded in memory: the no-fly list's defence against enumeration.

Each client (the TCP peer address; an IPv6 one by its /64, see :func:`client_key`) has a bucket
of ``burst`` tokens that refills at ``per_second`` tokens a second. A request is let through while
the client's bucket holds at least one token, and then costs one token per name it checks; a batch
may take the bucket into debt, which the client's next requests wait out. So a batch of a whole
flight manifest (up to ``max_batch`` names, more than ``burst``) goes through at once, and whatever
the mix of single checks and batches, a client checks at most
``max(burst, max_batch) + per_second * t`` names in ``t`` seconds: the bucket's size for single
checks, one batch up front, and the refill rate after that.

Memory is bounded: at most ``max_clients`` buckets are kept, least recently used first out. A
bucket that has been idle long enough to refill holds no information, so evicting it changes
nothing; only a flood from more than ``max_clients`` addresses at once can evict a bucket that is
still in debt, and whoever controls that many addresses has that many buckets anyway.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """Token buckets keyed by client. Not thread-safe: it lives on the event loop."""

    __slots__ = ("_buckets", "_clock", "burst", "max_clients", "per_second")

    def __init__(
        self,
        per_second: float,
        burst: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_second <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("per_second must be > 0, burst and max_clients >= 1")
        self.per_second = float(per_second)
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        # client -> [tokens, time of the last update]; a list is mutated in place, cheaper than an object.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, cost: int = 1) -> float:
        """Charge ``cost`` tokens: 0.0 when let through, else the seconds to wait (nothing is charged)."""
        # On every request: one dict lookup and a little arithmetic, inlined.
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._new(client, now)
            tokens = self.burst
        else:
            self._buckets.move_to_end(client)
            tokens = bucket[0] + (now - bucket[1]) * self.per_second
            if tokens > self.burst:
                tokens = self.burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return (1.0 - tokens) / self.per_second
        bucket[0] = tokens - cost
        return 0.0

    def wait(self, client: str) -> float:
        """The seconds ``client`` must wait before a request is let through (0.0: now). Charges nothing."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        tokens = bucket[0] + (self._clock() - bucket[1]) * self.per_second
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.per_second

    def _new(self, client: str, now: float) -> list[float]:
        buckets = self._buckets
        if len(buckets) >= self.max_clients:
            buckets.popitem(last=False)  # the least recently used
        bucket = buckets[client] = [self.burst, now]
        return bucket


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def client_key(remote: str | None) -> str:
    """The bucket of a TCP peer: an IPv4 address as it is, an IPv6 address by its /64 network.

    One IPv6 host is usually given a whole /64 and can pick a fresh address from it per request:
    keyed by full address, every request would find a full bucket.
    """
    if not remote or ":" not in remote:  # IPv4 (nearly every request): no parsing
        return remote or ""
    return _ipv6_key(remote)


@functools.lru_cache(maxsize=4096)
def _ipv6_key(remote: str) -> str:
    try:
        address = ipaddress.IPv6Address(remote.split("%", 1)[0])  # without a zone (fe80::1%eth0)
    except ValueError:
        return remote
    if address.ipv4_mapped is not None:  # ::ffff:192.0.2.1 on a dual-stack socket is IPv4 192.0.2.1
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
