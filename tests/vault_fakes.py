"""An in-memory stand-in for ``barrier.JsonStore``, shared by the vault engine and auth tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

Doc = dict[str, Any]


class FakeJsonStore:
    """In-memory stand-in for ``barrier.JsonStore``: JSON text per path, ``view``, optimistic ``update``.

    Values are kept serialised (as the real store encrypts them), so a caller never shares a document
    with the store. ``yield_in_update`` makes ``update`` yield between its read and its conditional
    write, so two tasks interleave the way two replicas on one S3 bucket do; ``yield_always`` also
    yields in every other call, so races between concurrent requests really interleave.
    """

    def __init__(
        self,
        yield_in_update: bool = False,
        *,
        yield_always: bool = False,
        prefix: str = "",
        docs: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        # full path -> (JSON text, version); a view shares its parent's
        self.docs: dict[str, tuple[str, int]] = {} if docs is None else docs
        self.prefix = prefix
        self.reads = 0
        self.yield_in_update = yield_in_update or yield_always
        self.yield_always = yield_always

    def view(self, sub: str) -> FakeJsonStore:
        return FakeJsonStore(
            self.yield_in_update, yield_always=self.yield_always, prefix=self.prefix + sub, docs=self.docs
        )

    async def _pause(self) -> None:
        if self.yield_always:
            await asyncio.sleep(0)

    async def read(self, path: str) -> Doc | None:
        await self._pause()
        self.reads += 1
        entry = self.docs.get(self.prefix + path)
        return None if entry is None else json.loads(entry[0])

    async def write(self, path: str, data: Doc) -> None:
        await self._pause()
        key = self.prefix + path
        self.docs[key] = (json.dumps(data), self.docs.get(key, ("", 0))[1] + 1)

    async def delete(self, path: str) -> None:
        await self._pause()
        self.docs.pop(self.prefix + path, None)

    async def list(self, path: str = "") -> list[str]:
        await self._pause()
        base = self.prefix + path
        children = set()
        for key in self.docs:
            if key.startswith(base):
                head, slash, _ = key[len(base) :].partition("/")
                children.add(head + slash)
        return sorted(children)

    async def update(self, path: str, fn: Callable[[Doc | None], Doc | None]) -> Doc | None:
        key = self.prefix + path
        for _ in range(50):
            entry = self.docs.get(key)
            old = None if entry is None else json.loads(entry[0])
            version = 0 if entry is None else entry[1]
            new = fn(old)
            if self.yield_in_update:
                await asyncio.sleep(0)
            current = self.docs.get(key)
            if (0 if current is None else current[1]) != version:
                continue  # lost the race: re-read and re-apply, as the real store does
            if new is None:
                self.docs.pop(key, None)
            else:
                self.docs[key] = (json.dumps(new), version + 1)
            return new
        raise RuntimeError("too many conflicts")

    def dump(self) -> str:
        """Everything stored (keys and values), for scanning for secrets."""
        return json.dumps(self.docs)
