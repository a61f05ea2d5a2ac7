"""Claims: atomic set-if-absent keys with a TTL. One small interface; in memory for one instance, Redis
for several."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError

__all__ = ["STORE_TIMEOUT", "CallLedger", "ClaimStore", "MemoryStore", "RedisStore", "StoreUnavailable"]

STORE_TIMEOUT = 2.0
"""Seconds a :class:`RedisStore` command gets (by default) before it fails with :class:`StoreUnavailable`."""

LEDGER_KEEP = 7200.0
"""Seconds an instance's list of live calls outlives its last record: past any call's life (OpenAI ends a
session at 60 minutes), so the calls of an instance that died are still found."""

_T = TypeVar("_T")


class StoreUnavailable(Exception):
    """The claim store could not be reached or did not answer in time. The message names the store
    (never its credentials) and the reason; the webhook then answers 503, and OpenAI delivers again."""


class ClaimStore(Protocol):
    """Where webhook ids, call ids and handoff tickets are claimed. Shared by every instance that
    serves the same webhook URL (a Redis store implements the same methods).

    A claim is *pending* while the work it guards runs, then *settled* once that work is done: a
    duplicate delivery can tell "being handled right now" (answer so that it is delivered again) from
    "handled" (acknowledge it and do nothing). A pending claim gets a short TTL, so the claims of an
    instance that died mid-work expire soon; :meth:`settle` gives it the long one.
    """

    where: str
    """The store, for logs: ``memory``, or its address without credentials."""

    async def claim(self, key: str, ttl: float) -> bool:
        """Atomically take ``key`` (pending) for ``ttl`` seconds. True if this caller got it.

        One that fails (:class:`StoreUnavailable`) or is cut short (cancelled) holds nothing: should the
        store carry it out all the same (late), it is let go of, best effort (else it runs out)."""
        ...

    async def settle(self, key: str, ttl: float) -> None:
        """Mark ``key`` settled (its work is done) and keep it for ``ttl`` seconds from now."""
        ...

    async def settled(self, key: str) -> bool:
        """Whether ``key`` is held and settled (False if it is pending or free)."""
        ...

    async def release(self, key: str) -> None:
        """Give ``key`` back (used when the work it guarded could not be done): this store's claim of it
        only. One another instance took since (this one's had run out) stays, pending or settled."""
        ...

    async def open(self) -> None:
        """Check the store can be used at start (it takes a write); raise :class:`StoreUnavailable` if not."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class CallLedger(Protocol):
    """Which instance runs which calls, in a store every instance shares: an instance that dies (killed,
    its host lost) leaves its calls up at OpenAI with nobody running their tools; another finds them
    and hangs them up. An instance is alive while its records keep coming (each renews its lease)."""

    async def record(self, instance: str, calls: Collection[str], lease: float) -> None:
        """Note the calls ``instance`` runs now, all of them (they replace those noted before: a store
        that lost its data, restarted or failed over, has them all again at the next record), and renew
        its lease for ``lease`` seconds."""
        ...

    async def orphans(
        self, instance: str, sweep: float, *, at_once: int | None = None
    ) -> dict[str, list[str]]:
        """The calls of another instance whose lease ran out, as ``{instance: calls}``, or ``{}`` when
        none is left to take. One such instance at most per call, taken for this caller alone (the
        others get nothing of it meanwhile) as its sweep begins, not while another instance's runs: call
        again for the next. It is held for ``sweep`` seconds; with ``at_once``, for ``sweep`` seconds per
        ``at_once`` of its calls, rounded up (a sweep that hangs them up that many at a time). Its lease
        being out, its taking and the reading of its calls are one step: an instance that renews its
        lease meanwhile is not taken. A call cut short (cancelled) or failed while it takes one lets go
        of it before it ends (within the store's timeout): the taking may have gone through."""
        ...

    async def swept(self, instance: str, owner: str, calls: Collection[str]) -> None:
        """``instance`` is done with the ``calls`` of ``owner`` that :meth:`orphans` gave it (hung up,
        or its own now): drop them; drop ``owner`` too if its lease is still out and it has no other call
        (it may have come back and recorded calls since, and died again); and let go of ``owner``, for
        another sweep (of those other calls, or if it dies again)."""
        ...

    async def forget(self, instance: str) -> None:
        """Drop ``instance`` and its calls (at its own clean stop)."""
        ...


class MemoryStore:
    """Claims in this process's memory: right for one instance. Expired keys are purged lazily."""

    where = "memory"
    """The store, for logs."""

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

    async def open(self) -> None:
        return None

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


class RedisStore:
    """Claims in Redis, shared by every instance that serves the same webhook URL.

    A claim sets ``key`` to ``p:<token>:<nonce>`` with a TTL unless it exists (a Lua script: a claim whose
    reply was lost with its connection, tried again, finds its own value and has won, not lost to itself);
    settling it ``SET key s:<token> PX ttl`` (over any claim: the work is done); the token is this store's
    own, and a release deletes the key only while it holds one of this store's claims (a Lua script), so an
    answer path that outlived its pending claim does not give back one another instance took since. A claim
    that fails (no answer in time) or is cut short (cancelled) lets go of its own value, in the background
    and within ``timeout``, and marks it let go so that the claim, should it reach Redis only after that,
    takes nothing: carried out late, it would hold the key with nobody to settle or release it (every
    redelivery of the webhook answered 409 until it ran out). Keys are prefixed (``sideband:`` by default)
    so the server can be shared with other users (not with another deployment of sideband: see the
    README). Every command is bounded by ``timeout`` seconds, and at most ``max_connections`` are open (a
    request waits up to ``timeout`` for one): a Redis that is down, slow or saturated makes the request
    that needs it fail with :class:`StoreUnavailable`, quickly, instead of hanging it. A command that meets
    a connection the server closed (it restarted), or a server that is now a read-only replica (a failover
    behind the same address moved the primary), is tried once more on a new connection. ``url`` is a
    ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL, credentials included; raises ``ValueError`` if it
    cannot be parsed. Its query options go to redis-py, but for those that would replace the store's own
    bounds and retry (``socket_timeout``, ``socket_connect_timeout``, ``timeout``, ``max_connections``,
    ``retry``, ``retry_on_error``): :meth:`open` refuses them. ``protocol`` (2 or 3) and
    ``legacy_responses`` change no reply the store reads; ``retry_on_timeout`` retries on redis-py's
    socket timeouts only, which the store does not set (and each of its commands is safe to run twice).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sideband:",
        timeout: float = STORE_TIMEOUT,
        max_connections: int = 64,
    ) -> None:
        self.where = redacted(url)
        """The store for logs and errors: the URL without its credentials."""
        self._prefix = prefix
        self._timeout = timeout
        token = secrets.token_hex(8)
        self._pending, self._settled = f"p:{token}:".encode(), f"s:{token}".encode()
        # Commands are bounded by asyncio.timeout in _call, not by redis-py's socket timeout: that one
        # runs each write through Python 3.11's wait_for, which can lose a cancellation (a shutdown's).
        own: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": timeout,
            "socket_timeout": None,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError, ReadOnlyError],
        }
        options: dict[str, Any] = dict(parse_url(url))  # (as redis-py's from_url reads it)
        self._replaced = sorted(own.keys() & options.keys())  # refused by open(); meanwhile, ours win
        self._pool: BlockingConnectionPool = BlockingConnectionPool(**{**options, **own})
        self._redis: Redis = Redis(connection_pool=self._pool)
        self._take = self._redis.register_script(_TAKE)
        self._swept = self._redis.register_script(_SWEPT)
        self._release = self._redis.register_script(_RELEASE)
        self._let_go_script = self._redis.register_script(_LET_GO)
        self._claim = self._redis.register_script(_CLAIM)
        self._letting_go: set[asyncio.Future[object]] = set()  # claims that failed, let go of

    async def claim(self, key: str, ttl: float) -> bool:
        return await self._take_claim(key, ttl, let_go=True)

    async def _take_claim(self, key: str, ttl: float, *, let_go: bool) -> bool:
        mine = self._pending + secrets.token_hex(6).encode()
        keys = [self._prefix + key, f"{self._prefix}letgo:{mine.decode()}"]
        try:
            return bool(await self._call(self._claim(keys=keys, args=[mine, _ms(ttl)])))
        except (StoreUnavailable, asyncio.CancelledError):
            # It may have been carried out (its reply lost, or late), or may yet be (sent, in flight): its
            # own value is let go of (never another's: not a claim of this store that did succeed), in
            # the background (the request's answer waits for nothing more).
            if let_go:
                letting_go = self._letting_go_of(keys[0], keys[1], mine)
                self._letting_go.add(letting_go)
                letting_go.add_done_callback(self._letting_go.discard)
            raise

    async def settle(self, key: str, ttl: float) -> None:
        await self._call(self._redis.set(self._prefix + key, self._settled, px=_ms(ttl)))

    async def settled(self, key: str) -> bool:
        value = await self._call(self._redis.get(self._prefix + key))
        return value is not None and value[:1] in (b"s", "s")

    async def release(self, key: str) -> None:
        await self._call(self._release(keys=[self._prefix + key], args=[self._pending, self._settled]))

    async def open(self) -> None:
        if self._replaced:
            raise StoreUnavailable(
                f"redis at {self.where}: the URL must not set {', '.join(self._replaced)}: sideband sets its "
                "own bounds on each command and on its connections, and tries a command once more itself"
            )
        # A claim and its release, not a ping: a read-only replica (a reader endpoint named by mistake)
        # answers pings, and a user refused scripting (an ACL without EVALSHA) may SET but claim nothing.
        await self._take_claim("probe", 1.0, let_go=False)  # (one carried out late is gone in a second)
        await self.release("probe")

    async def close(self) -> None:
        if self._letting_go:  # (each within the timeout)
            await asyncio.wait(list(self._letting_go))
        await self._redis.aclose()
        await self._pool.disconnect()

    async def record(self, instance: str, calls: Collection[str], lease: float) -> None:
        # One transaction, one round trip: nobody sees the list of calls between its delete and its write.
        p, key = self._prefix, f"{self._prefix}calls:{instance}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(f"{p}alive:{instance}", b"1", px=_ms(lease))
        pipe.sadd(f"{p}instances", instance)
        pipe.delete(key)
        if calls:
            pipe.sadd(key, *calls)
            pipe.pexpire(key, _ms(LEDGER_KEEP))
        await self._call(pipe.execute())

    async def orphans(
        self, instance: str, sweep: float, *, at_once: int | None = None
    ) -> dict[str, list[str]]:
        p = self._prefix
        others = sorted(_text(i) for i in await self._call(self._redis.smembers(f"{p}instances")))
        others = [i for i in others if i != instance]
        if not others:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for other in others:
            pipe.exists(f"{p}alive:{other}")
        alive = await self._call(pipe.execute())
        # This sweep's own lock value: the script, tried again after its reply was lost, finds it and wins.
        mine = f"{secrets.token_hex(6)}:{instance}"
        for other, up in zip(others, alive, strict=True):
            if up:  # (the script looks again: this read is only a filter)
                continue
            keys = [f"{p}alive:{other}", f"{p}sweep:{other}", f"{p}calls:{other}", f"{p}letgo:{mine}"]
            try:
                calls = await self._call(self._take(keys=keys, args=[mine, _ms(sweep), at_once or 0]))
            except BaseException:
                # Cut short (cancelled: the instance stops) or failed (no answer in time) while the
                # script may have run: its hold would delay every other sweep until it ran out.
                await self._let_go(keys[1], keys[3], mine)
                raise
            if calls is not None:
                return {other: sorted(_text(c) for c in calls)}
        return {}

    async def swept(self, instance: str, owner: str, calls: Collection[str]) -> None:
        p = self._prefix
        keys = [f"{p}alive:{owner}", f"{p}calls:{owner}", f"{p}sweep:{owner}", f"{p}instances"]
        await self._call(self._swept(keys=keys, args=[instance, owner, *calls]))

    async def forget(self, instance: str) -> None:
        p = self._prefix
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(f"{p}alive:{instance}", f"{p}calls:{instance}", f"{p}sweep:{instance}")
        pipe.srem(f"{p}instances", instance)
        await self._call(pipe.execute())

    async def running(self, call_id: str) -> str | None:
        """The instance whose lease is live that records ``call_id`` among its calls (it runs the call,
        or is hanging it up), or None. (Optional to a :class:`CallLedger`: a ledger that has it lets a
        redelivery that finds its call's claims run out tell a call another instance runs.)"""
        p = self._prefix
        instances = sorted(_text(i) for i in await self._call(self._redis.smembers(f"{p}instances")))
        if not instances:
            return None
        pipe = self._redis.pipeline(transaction=False)
        for instance in instances:
            pipe.exists(f"{p}alive:{instance}")
            pipe.sismember(f"{p}calls:{instance}", call_id)
        found = await self._call(pipe.execute())
        for instance, alive, runs in zip(instances, found[::2], found[1::2], strict=True):
            if alive and runs:
                return instance
        return None

    async def _let_go(self, key: str, gone: str, mine: str) -> None:
        """:meth:`_letting_go_of`, waited for: to its end even if the caller is cancelled (again) meanwhile;
        a failure is let be (the hold then runs out)."""
        with contextlib.suppress(StoreUnavailable):
            await asyncio.shield(self._letting_go_of(key, gone, mine))

    def _letting_go_of(self, key: str, gone: str, mine: str | bytes) -> asyncio.Future[object]:
        """Let go of ``key`` if it holds ``mine``, and see that a command taking it still in flight (sent,
        not yet carried out: it lands late) takes nothing (``gone`` marks ``mine`` let go): within the
        store's timeout; a failure nobody waits for is let be."""
        args: list[str | bytes | int] = [mine, _ms(_LET_GO_KEEP)]
        letting_go = asyncio.ensure_future(self._call(self._let_go_script(keys=[key, gone], args=args)))
        letting_go.add_done_callback(_let_be)
        return letting_go

    async def _call(self, command: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self._timeout):
                return await command
        except TimeoutError:
            raise StoreUnavailable(f"redis at {self.where}: no answer within {self._timeout:g} s") from None
        except (RedisError, OSError) as exc:  # (its text names host and port, never the password)
            raise StoreUnavailable(f"redis at {self.where}: {exc or type(exc).__name__}") from None


_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return 1
end
if held then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
"""A claim: ``KEYS[1]`` set to ``ARGV[1]`` for ``ARGV[2]`` ms unless it holds something else, or this claim
was let go of (``KEYS[2]``, its mark: see _LET_GO). Holding ``ARGV[1]`` already is winning: the same claim,
tried again after its reply was lost."""

_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[2] or (held and string.sub(held, 1, #ARGV[1]) == ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""A release: the key is deleted only while it holds one of this store's claims (ARGV: the prefix of its
pending values, its settled value), or the caller's own hold of a dead instance (its value twice)."""

_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then
  return false
end
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[1] then
  return false
end
local calls = redis.call('SMEMBERS', KEYS[3])
local batches = 1
local at_once = tonumber(ARGV[3])
if at_once > 0 then
  batches = math.max(1, math.ceil(#calls / at_once))
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', batches * tonumber(ARGV[2]))
return calls
"""
"""The taking of a dead instance for a sweep, at once. KEYS: its alive, sweep and calls keys, and the mark
of this sweep let go (see _LET_GO); ARGV: this sweep's lock value, the ms it holds per batch of calls, the
calls in a batch (0: one batch). Nil while the instance is alive, another sweep holds it or this one was
let go; else its calls. Holding ``ARGV[1]`` already is taking it: the same script, tried again after its
reply was lost."""

_LET_GO = """
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
"""
"""A sweep (or a claim) cut short or failed lets go of the dead instance (the key) it may have taken, at
once. KEYS: the instance's sweep key (the key claimed), the mark of this sweep (claim) let go; ARGV: this
sweep's lock value (the claim's value), the mark's life in ms. The mark makes the taking (the claim) refuse
if it lands after this (sent before, delivered late): it would hold the instance (the key) with nobody to
let go of it."""
# Seconds the mark of a sweep or claim let go is kept: far longer than a command is in flight.
_LET_GO_KEEP = 60.0

_SWEPT = """
for i = 3, #ARGV do
  redis.call('SREM', KEYS[2], ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[4], ARGV[2])
end
local held = redis.call('GET', KEYS[3])
if held and string.sub(held, 14) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
return 0
"""
"""The end of a sweep, at once. KEYS: the owner's alive, calls and sweep keys, the instances; ARGV: the
instance that swept, the owner, the calls swept. Only those calls are dropped, and the owner only while
its lease is out and it has no other call; the lock goes if the instance that swept holds it (its value
is a 12-digit nonce, ``:`` and the instance)."""


def _let_be(task: asyncio.Future[object]) -> None:
    """Retrieve the failure of a command nobody waits for any more (else asyncio logs it)."""
    if not task.cancelled():
        task.exception()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def redacted(url: str) -> str:
    """``url`` without user and password: ``redis://:secret@cache:6379/0`` → ``redis://cache:6379/0``.

    The credentials go even where a password's unencoded ``/``, ``?`` or ``#`` would make a URL parser
    end the host part (everything up to the last ``@`` goes then); so does the query (``?password=…``).
    A socket's path keeps its own ``@`` (``unix:///run/redis@main/redis.sock``); no host is redis-py's
    ``localhost``."""
    scheme, _, rest = url.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in netloc:
        rest = rest[netloc.rindex("@") + 1 :]
    elif netloc:  # no credentials, or a password the host part ends inside
        rest = rest.rpartition("@")[2]
    parts = urlsplit(f"{scheme}://{rest}")
    host = parts.hostname or ("" if scheme == "unix" else "localhost")
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"
