"""Claims: atomic set-if-absent keys with a TTL. One small interface; in-memory default."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["ClaimStore", "MemoryStore"]


class ClaimStore(Protocol):
    """Where webhook ids, call ids and handoff tickets are claimed. Shared by every instance that
    serves the same webhook URL (a Redis store implements the same methods).

    A claim is *pending* while the work it guards runs, then *settled* once that work is done: a
    duplicate delivery can tell "being handled right now" (answer so that it is delivered again) from
    "handled" (acknowledge it and do nothing). A pending claim gets a short TTL, so the claims of an
    instance that died mid-work expire soon; :meth:`settle` gives it the long one.
    """

    async def claim(self, key: str, ttl: float) -> bool:
        """Atomically take ``key`` (pending) for ``ttl`` seconds. True if this caller got it."""
        ...

    async def settle(self, key: str, ttl: float) -> None:
        """Mark ``key`` settled (its work is done) and keep it for ``ttl`` seconds from now."""
        ...

    async def settled(self, key: str) -> bool:
        """Whether ``key`` is held and settled (False if it is pending or free)."""
        ...

    async def release(self, key: str) -> None:
        """Give ``key`` back (used when the work it guarded could not be done)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """Claims in this process's memory: right for one instance. Expired keys are purged lazily."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, tuple[float, bool]] = {}  # key → (expiry, settled)
        self._expiries: list[tuple[float, str]] = []

    async def claim(self, key: str, ttl: float) -> bool:
        now = self._clock()
        self._purge(now)
        held = self._keys.get(key)
        if held is not None and held[0] > now:
            return False
        self._put(key, now + ttl, False)
        return True

    async def settle(self, key: str, ttl: float) -> None:
        self._put(key, self._clock() + ttl, True)

    async def settled(self, key: str) -> bool:
        held = self._keys.get(key)
        return held is not None and held[1] and held[0] > self._clock()

    async def release(self, key: str) -> None:
        self._keys.pop(key, None)

    async def close(self) -> None:
        self._keys.clear()
        self._expiries.clear()

    def __len__(self) -> int:
        return len(self._keys)

    def _put(self, key: str, expiry: float, settled: bool) -> None:
        self._keys[key] = (expiry, settled)
        heapq.heappush(self._expiries, (expiry, key))

    def _purge(self, now: float) -> None:
        heap, keys = self._expiries, self._keys
        while heap and heap[0][0] <= now:
            expiry, key = heapq.heappop(heap)
            held = keys.get(key)
            if held is not None and held[0] == expiry:
                del keys[key]
