"""An in-memory stand-in for ``barrier.JsonStore``, shared by the vault engine tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

Doc = dict[str, Any]


class FakeJsonStore:
    """In-memory stand-in for ``barrier.JsonStore``: JSON text per path, optimistic ``update``.

    ``yield_in_update`` makes ``update`` yield between its read and its conditional write, so two
    tasks interleave the way two replicas on one S3 bucket do.
    """

    def __init__(self, yield_in_update: bool = False) -> None:
        self.docs: dict[str, tuple[str, int]] = {}
        self.reads = 0
        self.yield_in_update = yield_in_update

    async def read(self, path: str) -> Doc | None:
        self.reads += 1
        entry = self.docs.get(path)
        return None if entry is None else json.loads(entry[0])

    async def write(self, path: str, data: Doc) -> None:
        self.docs[path] = (json.dumps(data), self.docs.get(path, ("", 0))[1] + 1)

    async def delete(self, path: str) -> None:
        self.docs.pop(path, None)

    async def list(self, path: str = "") -> list[str]:
        children = set()
        for key in self.docs:
            if key.startswith(path):
                rest = key[len(path) :]
                head, slash, _ = rest.partition("/")
                children.add(head + slash)
        return sorted(children)

    async def update(self, path: str, fn: Callable[[Doc | None], Doc | None]) -> Doc | None:
        for _ in range(50):
            entry = self.docs.get(path)
            old = None if entry is None else json.loads(entry[0])
            version = 0 if entry is None else entry[1]
            new = fn(old)
            if self.yield_in_update:
                await asyncio.sleep(0)
            current = self.docs.get(path)
            if (0 if current is None else current[1]) != version:
                continue  # lost the race: re-read and re-apply, as the real store does
            if new is None:
                self.docs.pop(path, None)
            else:
                self.docs[path] = (json.dumps(new), version + 1)
            return new
        raise RuntimeError("too many conflicts")
