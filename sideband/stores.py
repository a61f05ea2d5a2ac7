"""Claims: atomic set-if-absent keys with a TTL. One small interface; in-memory default."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["ClaimStore", "MemoryStore"]


class ClaimStore(Protocol):
    """Where webhook ids, call ids and handoff tickets are claimed. Shared by every instance that
    serves the same webhook URL (a Redis store implements the same two methods)."""

    async def claim(self, key: str, ttl: float) -> bool:
        """Atomically take ``key`` for ``ttl`` seconds. True if this caller got it."""
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
        self._keys: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    async def claim(self, key: str, ttl: float) -> bool:
        now = self._clock()
        self._purge(now)
        expiry = self._keys.get(key)
        if expiry is not None and expiry > now:
            return False
        self._keys[key] = now + ttl
        heapq.heappush(self._expiries, (now + ttl, key))
        return True

    async def release(self, key: str) -> None:
        self._keys.pop(key, None)

    async def close(self) -> None:
        self._keys.clear()
        self._expiries.clear()

    def __len__(self) -> int:
        return len(self._keys)

    def _purge(self, now: float) -> None:
        heap, keys = self._expiries, self._keys
        while heap and heap[0][0] <= now:
            expiry, key = heapq.heappop(heap)
            if keys.get(key) == expiry:
                del keys[key]
