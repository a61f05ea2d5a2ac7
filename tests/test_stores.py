"""Tests for sideband.stores.MemoryStore: claim, release, expiry, atomicity, purge."""

import asyncio
import inspect
from typing import Any

import pytest

from sideband.stores import CallLedger, ClaimStore, MemoryStore, RedisStore


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make() -> tuple[MemoryStore, FakeClock]:
    clock = FakeClock()
    return MemoryStore(clock), clock


@pytest.mark.parametrize("store", [MemoryStore(), RedisStore("redis://localhost/0")], ids=["memory", "redis"])
def test_stores_have_every_method_of_the_protocol(store: ClaimStore) -> None:
    """Checked at run time (the tests are not type-checked): each method the protocol names, a
    coroutine function, with the protocol's parameters."""
    methods = [n for n, v in vars(ClaimStore).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert {"claim", "settle", "settled", "release", "open", "close"} <= set(methods)
    for name in methods:
        method = getattr(store, name, None)
        assert inspect.iscoroutinefunction(method), name
        expected = list(inspect.signature(getattr(ClaimStore, name)).parameters)[1:]  # (not self)
        assert list(inspect.signature(method).parameters) == expected, name
    assert isinstance(store.where, str)


def test_the_redis_store_is_a_call_ledger() -> None:
    """Each method :class:`CallLedger` names, with its parameters (the in-memory store, one instance
    alone, keeps no ledger)."""
    store = RedisStore("redis://localhost/0")
    assert isinstance(store, CallLedger) and not isinstance(MemoryStore(), CallLedger)
    methods = [n for n, v in vars(CallLedger).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert {"record", "orphans", "swept", "forget"} <= set(methods)
    for name in methods:
        method = getattr(store, name)
        assert inspect.iscoroutinefunction(method), name
        expected = list(inspect.signature(getattr(CallLedger, name)).parameters)[1:]  # (not self)
        assert list(inspect.signature(method).parameters) == expected, name


async def test_claim_once() -> None:
    store, _ = make()
    assert await store.claim("webhook:a", 60) is True
    assert await store.claim("webhook:a", 60) is False
    assert await store.claim("webhook:b", 60) is True
    assert len(store) == 2


async def test_claim_expires() -> None:
    store, clock = make()
    assert await store.claim("k", 10)
    clock.now += 9.999
    assert await store.claim("k", 10) is False
    clock.now += 0.001  # exactly at expiry: free again
    assert await store.claim("k", 10) is True
    clock.now += 5
    assert await store.claim("k", 10) is False


async def test_failed_claim_does_not_extend_ttl() -> None:
    store, clock = make()
    assert await store.claim("k", 10)
    clock.now += 8
    assert await store.claim("k", 100) is False
    clock.now += 3
    assert await store.claim("k", 10) is True


async def test_release_frees_the_key() -> None:
    store, _ = make()
    assert await store.claim("k", 60)
    await store.release("k")
    assert len(store) == 0
    assert await store.claim("k", 60) is True
    assert await store.claim("k", 60) is False


async def test_release_unknown_key_is_a_no_op() -> None:
    store, _ = make()
    await store.release("never-claimed")
    assert len(store) == 0


async def test_release_only_that_key() -> None:
    store, _ = make()
    await store.claim("a", 60)
    await store.claim("b", 60)
    await store.release("a")
    assert await store.claim("b", 60) is False
    assert await store.claim("a", 60) is True


async def test_concurrent_claims_exactly_one_wins() -> None:
    store, _ = make()
    results = await asyncio.gather(*(store.claim("call:rtc_1", 60) for _ in range(100)))
    assert results.count(True) == 1
    assert results.count(False) == 99
    assert len(store) == 1


async def test_concurrent_claims_of_distinct_keys_all_win() -> None:
    store, _ = make()
    results = await asyncio.gather(*(store.claim(f"k{i}", 60) for i in range(100)))
    assert all(results)
    assert len(store) == 100


async def test_expired_keys_are_purged() -> None:
    store, clock = make()
    for i in range(50):
        await store.claim(f"old{i}", 10)
    assert len(store) == 50
    clock.now += 5
    for i in range(10):
        await store.claim(f"mid{i}", 10)
    assert len(store) == 60
    clock.now += 6  # the 50 old keys are past expiry, the 10 mid keys are not
    await store.claim("new", 10)
    assert len(store) == 11
    clock.now += 100
    await store.claim("last", 10)
    assert len(store) == 1


async def test_reclaimed_key_moves_to_the_back() -> None:
    store, clock = make()
    await store.claim("a", 10)
    clock.now += 1
    await store.claim("b", 10)
    clock.now += 10  # both expired
    assert await store.claim("a", 10) is True  # a re-taken: b purged, a kept
    assert len(store) == 1
    clock.now += 5
    assert await store.claim("a", 10) is False


async def test_mixed_ttls_stay_correct() -> None:
    store, clock = make()
    assert await store.claim("long", 1000)
    assert await store.claim("short", 1)
    clock.now += 2
    # 'short' is expired even though it sits behind a long-lived key.
    assert await store.claim("short", 1) is True
    assert await store.claim("long", 1000) is False


async def test_close_clears() -> None:
    store, _ = make()
    await store.claim("k", 60)
    await store.close()
    assert len(store) == 0
    assert await store.claim("k", 60) is True


async def test_default_clock_is_monotonic() -> None:
    store = MemoryStore()
    assert await store.claim("k", 60)
    assert await store.claim("k", 60) is False


async def test_pending_then_settled_with_the_long_ttl() -> None:
    store, clock = make()
    assert await store.claim("webhook:a", 30)
    assert await store.settled("webhook:a") is False  # pending: its work is under way
    await store.settle("webhook:a", 3600)
    assert await store.settled("webhook:a") is True
    clock.now += 60  # past the pending TTL: settling extended it
    assert await store.claim("webhook:a", 30) is False
    assert await store.settled("webhook:a") is True
    clock.now += 3600
    assert await store.settled("webhook:a") is False
    assert await store.claim("webhook:a", 30) is True


async def test_a_pending_claim_expires_with_its_short_ttl() -> None:
    store, clock = make()
    assert await store.claim("call:rtc_1", 30)
    clock.now += 31  # the instance holding it never settled nor released it
    assert await store.claim("call:rtc_1", 30) is True
    assert len(store) == 1


async def test_settled_of_a_free_or_released_key_is_false() -> None:
    store, _ = make()
    assert await store.settled("nothing") is False
    await store.claim("k", 30)
    await store.settle("k", 60)
    await store.release("k")
    assert await store.settled("k") is False
    assert await store.claim("k", 30) is True


def test_a_service_keeps_the_store_it_is_given_even_while_it_is_empty() -> None:
    from sideband import Sideband
    from sideband.service import Service
    from sideband.settings import Settings

    shared = MemoryStore()  # empty: len() == 0, which must not read as "no store"
    settings = Settings(openai_api_key="sk-test", openai_webhook_secret="whsec_" + "A" * 32)
    assert Service(settings, Sideband(), store=shared).store is shared


@pytest.mark.parametrize(
    "budgets",
    [{}, {"route_budget": 0.1, "accept_budget": 0.1}, {"route_budget": 60.0, "accept_budget": 60.0}],
)
def test_a_pending_claim_outlives_the_longest_answer_path(budgets: dict[str, Any]) -> None:
    """A delivery's claims stay pending while its routing hook runs, then an accept refused, the reject
    instead and a hangup (the reject found the call gone after an accept that may have gone through),
    each within the accept budget: they must not expire under it, or a redelivery would do the same
    work again."""
    from sideband.service import pending_ttl
    from sideband.settings import Settings

    settings = Settings(openai_api_key="sk-test", openai_webhook_secret="whsec_" + "A" * 32, **budgets)
    longest = settings.route_budget + 3 * settings.accept_budget
    assert pending_ttl(settings) > longest


async def test_a_ledger_of_the_apps_own_with_the_four_methods_is_kept(simulator: Any) -> None:
    """A store of the app's own with a ledger's four methods (``record``, ``orphans``, ``swept``,
    ``forget``) is a ledger: its instance's calls are recorded (a fifth, ``running``, is optional)."""
    from sideband.service import Service

    from .conftest import make_app, settings_for

    class Ledger(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.recorded = asyncio.Event()

        async def record(self, instance: str, calls: Any, lease: float) -> None:
            self.recorded.set()

        async def orphans(
            self, instance: str, sweep: float, *, at_once: int | None = None
        ) -> dict[str, list[str]]:
            return {}

        async def swept(self, instance: str, owner: str, calls: Any) -> None:
            return None

        async def forget(self, instance: str) -> None:
            return None

    store = Ledger()
    assert isinstance(store, CallLedger)
    service = Service(settings_for(simulator), make_app(), store=store)
    await service.start()
    try:
        await asyncio.wait_for(store.recorded.wait(), 5)
    finally:
        await service.close()
