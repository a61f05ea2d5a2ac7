"""The shared claim store on a real redis-server: semantics, failures, and two instances behind one URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from sideband import CallContext, Reject
from sideband.runtime.driver import CallRegistry, CallRuntime
from sideband.service import HANGUP_BUDGET, ORPHANS_AT_ONCE, Service
from sideband.settings import SettingsError, load_settings
from sideband.stores import STORE_TIMEOUT, MemoryStore, RedisStore, StoreUnavailable, redacted
from sideband.testing import Script, Simulator, pause, run_app

from .conftest import TEST_SETTINGS, capture_logs, make_app, settings_for
from .test_cli import clean_env, free_port, run_cli, serve_env, serving
from .test_edge import StoreFailingOnce

PASSWORD = "s3cret-redis-pass"


class RedisServer:
    """A redis-server of the test's own, on a free loopback port, with a password, no persistence."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder = binary, folder
        # Picked before the start (racy, but redis-server takes ``--port 0`` as "no TCP at all" and does
        # not say which port it got), and kept across a stop and start again: the same URL.
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    @property
    def socket(self) -> Path:
        """Its Unix socket, in a folder whose name holds an ``@``."""
        return self.folder / "redis.sock"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD),
                *("--save", "", "--appendonly", "no", "--dir", str(self.folder)),
                *("--unixsocket", str(self.socket)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:  # ready once it answers
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing (.ci/run installs it with apt-get)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis@main"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    store = RedisStore(redis_server.url)
    await store.open()
    yield store
    await store.close()


async def test_claims_are_atomic_pending_then_settled(store: RedisStore, redis_server: RedisServer) -> None:
    results = await asyncio.gather(*(store.claim("webhook:wh_1", 30) for _ in range(20)))
    assert results.count(True) == 1
    assert not await store.settled("webhook:wh_1")  # pending: being handled
    await store.settle("webhook:wh_1", 3600)
    assert await store.settled("webhook:wh_1")
    assert not await store.claim("webhook:wh_1", 30)
    await store.release("webhook:wh_1")
    assert not await store.settled("webhook:wh_1") and await store.claim("webhook:wh_1", 30)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        assert 0 < raw.pttl("sideband:webhook:wh_1") <= 30_000  # pending: the short TTL
        await store.settle("call:c1", 3600)
        assert 3_590_000 < raw.pttl("sideband:call:c1") <= 3_600_000  # under the prefix, with its TTL
        assert raw.get("call:c1") is None
    finally:
        raw.close()


async def test_a_late_release_leaves_the_claim_another_instance_took_since(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """A's answer outlived its pending claim (a Redis slow to answer each of the path's commands, a
    stalled process) and B claimed the key since: A's release gives back its own claim only, B's
    stays. A settle still marks the work done over B's claim, and B's release leaves that."""
    other = RedisStore(redis_server.url)
    try:
        for settled_by_a in (False, True):
            key = f"call:late{settled_by_a}"
            assert await store.claim(key, 0.05)
            deadline = time.monotonic() + 5
            while not await other.claim(key, 30):  # once A's claim has run out
                assert time.monotonic() < deadline, "the pending claim never expired"
                await asyncio.sleep(0.02)
            if settled_by_a:
                await store.settle(key, 30)  # (A's work was done)
                await other.release(key)  # B's failed
                assert await store.settled(key) and await other.settled(key)
            else:
                await store.release(key)  # A's failed
                assert not await store.claim(key, 30) and not await other.settled(key)  # B's, pending
                await other.release(key)
                assert await store.claim(key, 30)
    finally:
        await other.close()


async def test_a_restarted_redis_costs_no_request(store: RedisStore, redis_server: RedisServer) -> None:
    """Pooled connections the server closed when it restarted are replaced, not failed on."""
    assert await asyncio.gather(*(store.claim(f"webhook:before{n}", 30) for n in range(8))) == [True] * 8
    redis_server.stop()
    redis_server.start()
    assert await asyncio.gather(*(store.claim(f"webhook:after{n}", 30) for n in range(8))) == [True] * 8


async def test_a_failover_behind_the_same_address_costs_no_request(
    store: RedisStore, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A primary demoted to a read-only replica while the address moves to the new one (a managed
    Redis's endpoint, a DNS name): pooled connections to the old primary are replaced, not failed on
    for good; and a store that is a replica is refused at start (a reader endpoint named by mistake)."""
    promoted = RedisServer(redis_server.binary, tmp_path)
    promoted.start()
    target = {"port": redis_server.port}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target["port"])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    forwarder = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = forwarder.sockets[0].getsockname()[1]
    behind = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    demoted = redis.Redis.from_url(redis_server.url)
    try:
        await behind.open()
        assert await asyncio.gather(*(behind.claim(f"webhook:before{n}", 30) for n in range(4))) == [True] * 4
        target["port"] = promoted.port  # new connections reach the new primary
        demoted.config_set("masterauth", PASSWORD)
        demoted.replicaof("127.0.0.1", promoted.port)
        with pytest.raises(StoreUnavailable, match="read only replica"):
            await store.open()  # the old primary, named directly: a replica now
        assert await asyncio.gather(*(behind.claim(f"webhook:after{n}", 30) for n in range(4))) == [True] * 4
    finally:
        demoted.replicaof("NO", "ONE")
        demoted.close()
        await behind.close()
        forwarder.close()
        promoted.stop()


async def test_a_user_refused_scripting_is_refused_at_start(redis_server: RedisServer) -> None:
    """An ACL user that may read and write but not run scripts: every claim would fail, so the start
    check fails, naming the command refused."""
    if redis_server.proc is None:
        redis_server.start()
    raw = redis.Redis.from_url(redis_server.url)
    raw.acl_setuser(
        "noscript", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@scripting"]
    )
    store = RedisStore(f"redis://noscript:pw@127.0.0.1:{redis_server.port}/0")
    try:
        with pytest.raises(StoreUnavailable, match="evalsha"):
            await store.open()
    finally:
        await store.close()
        raw.acl_deluser("noscript")
        raw.close()


async def test_a_url_asking_for_decoded_replies_still_reads_settled_claims(redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    store = RedisStore(redis_server.url + "?decode_responses=true")
    try:
        await store.settle("webhook:decoded", 30)
        assert await store.settled("webhook:decoded")
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("retry_on_error=TimeoutError", "retry_on_error"),
        ("retry=3", "retry"),
        ("db=0&retry_on_error=x&timeout=30", "retry_on_error, timeout"),
    ],
)
async def test_a_url_replacing_the_stores_own_retry_or_bounds_is_refused_at_start(
    redis_server: RedisServer, query: str, named: str
) -> None:
    """The store tries a command that met a closed connection (a restart) or a read-only replica (a
    failover) once more on a new connection, and bounds each command: a URL option that would replace
    that (redis-py lets the query win over the store's own) is refused at start, named."""
    if redis_server.proc is None:
        redis_server.start()
    store = RedisStore(f"{redis_server.url}?{query}")
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert str(info.value).startswith(
            f"redis at redis://127.0.0.1:{redis_server.port}/0: the URL must not set {named}: "
        )
    finally:
        await store.close()


@pytest.mark.parametrize(
    "query",
    [
        "protocol=2",
        "protocol=3",
        "legacy_responses=false",
        "protocol=2&legacy_responses=false",
        "retry_on_timeout=true",
    ],
)
async def test_a_url_choosing_the_protocol_reply_shapes_or_retry_on_timeout_keeps_every_guarantee(
    redis_server: RedisServer, query: str
) -> None:
    """RESP2 or RESP3, redis-py's legacy reply shapes or its newer ones: the store reads its replies
    the same (a claim lost or won, a dead instance taken or not). ``retry_on_timeout`` retries only on
    redis-py's socket timeouts, which the store does not set (its commands are bounded otherwise), and
    a command tried again is one that finds its own value: kept, as they are."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    store = RedisStore(f"{redis_server.url}?{query}")
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.open()
        assert await store.claim("call:q", 30) and not await store.claim("call:q", 30)
        assert not await store.settled("call:q")
        await store.settle("call:q", 30)
        assert await store.settled("call:q")
        await store.release("call:q")
        assert await store.claim("call:q", 30)
        await store.record("b", [], 30)
        assert await store.orphans("b", 30) == {}  # (none dead)
        await store.record("a", ["c1", "c2"], 0.05)
        await lease_out(raw, "a")
        assert await store.orphans("b", 30) == {"a": ["c1", "c2"]}
        assert await store.orphans("c", 30) == {}  # (taken)
        await store.swept("b", "a", ["c1", "c2"])
        assert await raw.smembers("sideband:instances") == {b"b"}
    finally:
        await raw.aclose()
        await store.close()


async def test_a_claim_shorter_than_a_millisecond_is_taken_for_one(store: RedisStore) -> None:
    assert await store.claim("call:brief", 0.0004)  # (Redis counts in whole milliseconds)
    await store.settle("call:brief", 0.0004)


async def test_a_pending_claim_expires(store: RedisStore) -> None:
    assert await store.claim("call:c2", 0.2)
    deadline = time.monotonic() + 5
    while not await store.claim("call:c2", 30):  # free again once its TTL ran out
        assert time.monotonic() < deadline, "the pending claim never expired"
        await asyncio.sleep(0.05)


async def test_an_unreachable_store_fails_fast_and_names_no_password() -> None:
    port = free_port()  # nothing listens there
    store = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await store.claim("webhook:x", 30)
    assert time.monotonic() - started < 3
    assert f"redis://127.0.0.1:{port}/0" in str(info.value) and PASSWORD not in str(info.value)
    await store.close()


async def test_a_redis_that_takes_commands_and_never_answers_is_unavailable_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stalled Redis (connected, silent): each command gives up after the store's timeout. It is
    bounded by ``asyncio.timeout``, never by Python 3.11's ``wait_for`` (redis-py's socket timeout uses
    it), which can lose a cancellation landing as a command's write completes: a handler cancelled by a
    shutdown would go on."""
    reads: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            reads.append(data)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    waits: list[object] = []
    wait_for = asyncio.wait_for

    async def recorded(aw: object, timeout: float | None) -> object:
        waits.append(aw)
        return await wait_for(aw, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "wait_for", recorded)
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable, match=r"no answer within 0\.3 s"):
            await store.claim("webhook:x", 30)
        assert loop.time() - started < 2
        assert reads, "the command never reached the server"
        assert waits == []  # no command went through wait_for
    finally:
        await store.close()
        server.close()


async def test_a_wrong_password_is_unavailable_not_a_crash(redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    store = RedisStore(f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    assert "wrong" not in str(info.value)
    await store.close()


async def orphans_found(store: RedisStore, instance: str) -> dict[str, list[str]]:
    """What ``instance`` finds, once there is something to find (a lease runs out)."""
    deadline = time.monotonic() + 5
    while not (found := await store.orphans(instance, 30)):
        assert time.monotonic() < deadline, "no lease ran out"
        await asyncio.sleep(0.02)
    return found


async def test_a_sweep_drops_what_it_found_and_an_instance_only_if_still_dead(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """B takes A's calls once A's lease has run out; A comes back meanwhile (it could not reach Redis
    for a while) with a new call. The end of B's sweep drops the call it found, not the new one, nor
    A, and lets go of A (a sweep may take it again if A dies). An instance still dead is dropped."""
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.record("b", [], 30)
        await store.record("a", ["c1"], 0.05)
        assert await orphans_found(store, "b") == {"a": ["c1"]}
        await store.record("a", ["c1", "c2"], 30)  # back
        await store.swept("b", "a", ["c1"])
        assert await raw.smembers("sideband:calls:a") == {b"c2"}
        assert await raw.smembers("sideband:instances") == {b"a", b"b"}
        assert not await raw.exists("sideband:sweep:a")

        await store.record("a", ["c2"], 0.05)  # A dies
        assert await orphans_found(store, "b") == {"a": ["c2"]}
        await store.swept("b", "a", ["c2"])
        assert await raw.smembers("sideband:instances") == {b"b"}
        assert not await raw.exists("sideband:calls:a", "sideband:alive:a", "sideband:sweep:a")
    finally:
        await raw.aclose()


async def lease_out(raw: aioredis.Redis, instance: str) -> None:
    """Once ``instance``'s lease has run out."""
    deadline = time.monotonic() + 5
    while await raw.exists(f"sideband:alive:{instance}"):
        assert time.monotonic() < deadline, "the lease never ran out"
        await asyncio.sleep(0.01)


async def test_a_call_recorded_after_a_sweep_began_outlives_it(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """B takes A's calls once A's lease has run out; A comes back with a new call, and dies again while
    B still hangs up the first. The end of B's sweep drops the call it found, not the new one, nor A:
    the next sweep finds that call (up at OpenAI, with nobody running its tools)."""
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.record("b", [], 30)
        await store.record("a", ["c1"], 0.05)
        assert await orphans_found(store, "b") == {"a": ["c1"]}
        await store.record("a", ["c1", "c2"], 0.05)  # back, with a new call...
        await lease_out(raw, "a")  # ...and gone again
        await store.swept("b", "a", ["c1"])
        assert await raw.smembers("sideband:calls:a") == {b"c2"}
        assert await raw.smembers("sideband:instances") == {b"a", b"b"}
        assert await store.orphans("b", 30) == {"a": ["c2"]}
    finally:
        await raw.aclose()


async def test_an_instance_that_renews_its_lease_while_another_looks_for_orphans_is_not_taken(
    store: RedisStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads that A's lease is out, and A's next record lands right then (A was slow, not dead) with
    a call it started since: B takes neither A nor its live calls."""
    a = RedisStore(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.record("b", [], 30)
        await a.record("a", ["c1"], 0.05)
        await lease_out(raw, "a")
        call, renewed = store._call, False

        async def renewing_meanwhile(command: Any) -> Any:
            nonlocal renewed
            result = await call(command)
            if result == [0] and not renewed:  # B has just read that A's lease is out
                renewed = True
                await a.record("a", ["c1", "c2"], 30)
            return result

        monkeypatch.setattr(store, "_call", renewing_meanwhile)
        assert await store.orphans("b", 30) == {}
        assert renewed
        assert not await raw.exists("sideband:sweep:a")
        await a.record("a", ["c1", "c2"], 0.05)  # A dies: then it is taken, with all of its calls
        assert await orphans_found(store, "b") == {"a": ["c1", "c2"]}
    finally:
        await a.close()
        await raw.aclose()


async def test_dead_instances_are_taken_one_at_a_time_for_as_long_as_their_calls_need(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """Each look for orphans takes one dead instance: the next stays free for another sweep until this
    one's turn comes. With ``at_once``, the instance is held for ``sweep`` seconds per ``at_once`` of its
    calls (a sweep that hangs them up that many at a time), ``sweep`` for none; without, ``sweep``."""
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.record("b", [], 30)
        await store.record("a1", [f"c{i}" for i in range(9)], 0.05)
        await store.record("a2", [], 0.05)
        await store.record("a3", ["d1"], 0.05)
        for dead in ("a1", "a2", "a3"):
            await lease_out(raw, dead)
        assert await store.orphans("b", 2.0, at_once=4) == {"a1": sorted(f"c{i}" for i in range(9))}
        assert not await raw.exists("sideband:sweep:a2", "sideband:sweep:a3")
        assert 5000 < await raw.pttl("sideband:sweep:a1") <= 6000  # (9 calls, 4 at a time: 3 rounds)
        assert await store.orphans("c", 2.0, at_once=4) == {"a2": []}  # (another instance: the next one)
        assert 1000 < await raw.pttl("sideband:sweep:a2") <= 2000
        assert await store.orphans("b", 2.0) == {"a3": ["d1"]}
        assert 1000 < await raw.pttl("sideband:sweep:a3") <= 2000
        assert await store.orphans("c", 2.0, at_once=4) == {}  # (all taken)
    finally:
        await raw.aclose()


def accepts(sim: Simulator, call_id: str) -> int:
    return sum(1 for r in sim.requests if r.path.endswith(f"/{call_id}/accept"))


async def test_two_instances_sharing_redis_accept_a_call_once(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        call = simulator.create_call(Script([pause(30)]))
        event = simulator.incoming_event(call)
        results = await asyncio.gather(
            *(h.sender.deliver(event, webhook_id="wh_both", max_attempts=1) for h in (a, b, a, b, a, b))
        )
        assert all(r.status in (200, 409) for r in results) and accepts(simulator, call.call_id) == 1
        await call.wait_connected(1, timeout=5)
        again = await b.sender.deliver(event, webhook_id="wh_again", max_attempts=1)  # another delivery
        assert again.status == 200 and json.loads(again.bodies[-1] or b"{}")["status"] == "duplicate"
        assert accepts(simulator, call.call_id) == 1 and call.sideband_connects == 1
        assert len(a.service.registry) + len(b.service.registry) == 1
        await simulator.hang_up(call)


async def test_claims_a_settle_failed_to_keep_are_settled_once_the_store_answers(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """A answers a call, and the store fails as A settles its claims: left pending, they would run out,
    and a later delivery (OpenAI's rare duplicate after a 2xx) answer the call a second time on B. A
    settles them once the store answers again; and a delivery landing on A itself meanwhile finds the
    call live there."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        a.service.store = StoreFailingOnce(a.service.store, "call:", at="settle")
        call = simulator.create_call(Script([pause(30)]))
        event = simulator.incoming_event(call)
        with capture_logs() as logs:
            first = await a.sender.deliver(event, webhook_id="wh_s", max_attempts=1)
            assert first.status == 200
            await call.wait_connected(1, timeout=5)
            assert not await store.settled(f"call:{call.call_id}")  # pending, for now
            raw = aioredis.Redis.from_url(redis_server.url)
            try:  # as their TTL would
                await raw.delete(f"sideband:call:{call.call_id}", "sideband:webhook:wh_s")
            finally:
                await raw.aclose()
            same = await a.sender.deliver(event, webhook_id="wh_s", max_attempts=1)
            assert json.loads(same.bodies[-1] or b"{}") == {"status": "duplicate"}
            await asyncio.wait_for(asyncio.gather(*a.service._settling), 5)
        assert [e["event"] for e in logs if e["event"].startswith("store.")] == [
            "store.unavailable",
            "store.settled",
        ]
        assert await store.settled(f"call:{call.call_id}") and await store.settled("webhook:wh_s")
        other = await b.sender.deliver(event, webhook_id="wh_s", max_attempts=1)
        assert json.loads(other.bodies[-1] or b"{}") == {"status": "duplicate"}
        assert accepts(simulator, call.call_id) == 1 and call.sideband_connects == 1
        await simulator.hang_up(call)


class SettleFailing:
    """An instance's Redis store, but its settles fail until ``healed`` (it cannot reach Redis from the
    moment it settles a call's claims); all else, its ledger too, as the store's."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner, self.where, self.healed = inner, inner.where, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def settle(self, key: str, ttl: float) -> None:
        if not self.healed:
            raise StoreUnavailable("redis at redis://cache:6379/0: Connection refused")
        await self.inner.settle(key, ttl)


@pytest.mark.parametrize("b_decides", ["accept", "reject"])
async def test_a_redelivery_of_a_call_another_instance_runs_is_a_duplicate_there(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer, b_decides: str
) -> None:
    """A accepts a call, and the store fails as A settles its claims for longer than they stay pending:
    they run out while A runs the call, but A's ``accept_uncertain:`` mark stays. The webhook's
    redelivery lands on B, whose accept (or reject: B is full, say) finds the call no longer ringing and
    the mark held: the ledger says A runs the call, so B answers ``duplicate`` (and settles the claims)
    rather than attach a second sideband, or hang up A's call."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url}
    b_app = make_app()
    if b_decides == "reject":
        b_app.on_incoming(lambda call: Reject(486))
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(b_app, simulator, **settings) as b,
    ):
        call = simulator.create_call(Script([pause(30)]))
        recorded, record = asyncio.Event(), a.service.store.record  # (A's ledger: its RedisStore)

        async def noted(instance: str, calls: Any, lease: float) -> None:
            await record(instance, calls, lease)
            if instance == a.service.instance_id and call.call_id in calls:
                recorded.set()

        a.service.store.record = noted  # type: ignore[method-assign]
        a.service.store = SettleFailing(a.service.store)  # type: ignore[arg-type]
        event = simulator.incoming_event(call)
        first = await a.sender.deliver(event, webhook_id="wh_x", max_attempts=1)
        assert json.loads(first.bodies[-1] or b"{}") == {"status": "accepted"}
        await call.wait_connected(1, timeout=5)
        await asyncio.wait_for(recorded.wait(), 5)  # A's ledger holds the call
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            claims = (f"sideband:call:{call.call_id}", "sideband:webhook:wh_x")
            assert [(await raw.get(k) or b"")[:2] for k in claims] == [b"p:", b"p:"]  # unsettled
            await raw.delete(*claims)  # as their TTL would
            with capture_logs() as logs:
                again = await b.sender.deliver(event, webhook_id="wh_x", max_attempts=1)
            assert (again.status, json.loads(again.bodies[-1] or b"{}")) == (200, {"status": "duplicate"})
            assert [(await raw.get(k) or b"")[:2] for k in claims] == [b"s:", b"s:"]  # settled by B
        finally:
            await raw.aclose()
        duplicate = [e for e in logs if e["event"] == "webhook.duplicate"]
        assert [(e["call_id"], e["webhook_id"], e["running_on"]) for e in duplicate] == [
            (call.call_id, "wh_x", a.service.instance_id)
        ]
        assert not [e for e in logs if e["event"] == "call.accept_uncertain"]
        assert call.call_id in a.service.registry and call.call_id not in b.service.registry
        assert call.sideband_connects == 1 and not call.hangup_requested and call.status == "accepted"
        assert b.service.counters["webhook_duplicate"] == 1 and b.service.counters["accepted"] == 0
        a.service.store.healed = True  # type: ignore[attr-defined]
        await simulator.hang_up(call)


async def test_the_ledger_names_the_live_instance_that_runs_a_call(
    store: RedisStore, redis_server: RedisServer
) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await store.running("c1") is None  # (no instance at all)
        await store.record("a", ["c1"], 30)
        await store.record("b", ["c2"], 30)
        assert [await store.running(c) for c in ("c1", "c2", "c3")] == ["a", "b", None]
        await raw.delete("sideband:alive:a")  # A's lease ran out: its calls are nobody's
        assert await store.running("c1") is None
    finally:
        await raw.aclose()


async def test_the_calls_of_an_instance_that_died_are_hung_up_by_another(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """A dies (its records stop: killed, its host lost) with a call up: nobody runs that call's tools.
    Once A's lease has run out, B hangs the call up (``call.orphaned``) and drops A from the ledger;
    a call of B's own, and B itself, are left alone."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        orphan, kept = (simulator.create_call(Script([pause(30)])) for _ in range(2))
        recorded, record = asyncio.Event(), a.service.store.record  # (A's ledger: its RedisStore)

        async def noted(instance: str, calls: Any, lease: float) -> None:
            await record(instance, calls, lease)
            if orphan.call_id in calls:
                recorded.set()

        a.service.store.record = noted  # type: ignore[method-assign]
        assert (await a.sender.deliver(simulator.incoming_event(orphan), max_attempts=1)).status == 200
        assert (await b.sender.deliver(simulator.incoming_event(kept), max_attempts=1)).status == 200
        await orphan.wait_connected(timeout=5)
        await kept.wait_connected(timeout=5)
        await asyncio.wait_for(recorded.wait(), 5)  # A's ledger holds the call
        ledger = redis.Redis.from_url(redis_server.url)
        assert a.service._ledger is not None
        with capture_logs() as logs:
            a.service._ledger.cancel()  # A stops living, as far as the ledger can tell
            await orphan.wait_for(lambda c: c.hangup_requested, 10, "the orphan's hangup")
            await orphan.wait_ended(timeout=5)
            assert b.service._sweeping is not None  # the sweep that hung it up, then drops A
            await asyncio.wait_for(asyncio.shield(b.service._sweeping), 5)
        swept = [e for e in logs if e["event"] == "call.orphaned"]
        assert [(e["call_id"], e["owner"], e["outcome"], e["log_level"]) for e in swept] == [
            (orphan.call_id, a.service.instance_id, "hung_up", "warning")
        ]
        assert not kept.ended and not kept.hangup_requested
        try:
            assert ledger.smembers("sideband:instances") == {b.service.instance_id.encode()}
            assert ledger.smembers(f"sideband:calls:{b.service.instance_id}") == {kept.call_id.encode()}
            assert not ledger.exists(f"sideband:calls:{a.service.instance_id}")
        finally:
            ledger.close()
        await simulator.hang_up(kept)
    keys = redis.Redis.from_url(redis_server.url)
    try:  # B, stopped cleanly, left nothing behind
        assert not keys.smembers("sideband:instances")
    finally:
        keys.close()


async def test_a_sweep_takes_each_dead_instance_in_its_turn_for_as_long_as_its_calls_need(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """Three instances died, the first with 17 calls: OpenAI is slow to take their hangups (up to the
    hangup budget each, 16 at once: two rounds). B holds the first for both rounds and more, so no other
    instance hangs the same calls up again meanwhile; the others are not held while B is busy with the
    first: another instance takes the second, and B the third once done with the first."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    many = [f"rtc_many{i:02}" for i in range(17)]
    await store.record("dead1", many, 0.05)
    await store.record("dead2", ["rtc_other"], 0.05)
    await store.record("dead3", ["rtc_third"], 0.05)
    raw = aioredis.Redis.from_url(redis_server.url)
    async with run_app(make_app(), simulator, **settings) as b:
        hung_up: list[str] = []
        round_one, go = asyncio.Event(), asyncio.Event()

        async def slow_hangup(call_id: str, *, timeout: float) -> None:
            hung_up.append(call_id)
            if len(hung_up) == ORPHANS_AT_ONCE:
                round_one.set()
            await go.wait()

        assert b.service._control is not None
        b.service._control.hangup = slow_hangup  # type: ignore[method-assign]
        try:
            with capture_logs() as logs:
                await asyncio.wait_for(round_one.wait(), 15)
                assert set(hung_up) <= set(many)
                held = await raw.pttl("sideband:sweep:dead1")
                assert held > 2 * HANGUP_BUDGET * 1000  # (both rounds, each up to the hangup budget)
                assert await store.orphans("c", 30) == {"dead2": ["rtc_other"]}  # free for another
                go.set()
                assert b.service._sweeping is not None
                await asyncio.wait_for(asyncio.shield(b.service._sweeping), 5)
            assert sorted(hung_up) == [*many, "rtc_third"]  # each once, none of dead2's (taken by C)
            orphaned = sorted(e["call_id"] for e in logs if e["event"] == "call.orphaned")
            assert orphaned == [*many, "rtc_third"]
            assert not await raw.exists(
                *(f"sideband:{k}:dead{i}" for k in ("calls", "sweep") for i in (1, 3))
            )
            assert await raw.smembers("sideband:instances") == {b"dead2", b.service.instance_id.encode()}
        finally:
            go.set()
            await raw.aclose()


async def test_a_sweep_cut_short_by_its_instances_close_lets_go_of_the_dead_instance(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """B is hanging up a dead instance's calls (OpenAI slow to take them) when B stops: its sweep is cut
    short, and B lets go of that instance as it closes, so that another instance takes its calls at
    once rather than once B's hold has run out (tens of seconds, with nobody running their tools)."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    calls = ["rtc_dead_a", "rtc_dead_b", "rtc_dead_c"]
    await store.record("dead1", calls, 0.05)
    raw = aioredis.Redis.from_url(redis_server.url)
    started, go = asyncio.Event(), asyncio.Event()
    try:
        async with run_app(make_app(), simulator, **settings) as b:
            hung_up: list[str] = []

            async def slow_hangup(call_id: str, *, timeout: float) -> None:
                hung_up.append(call_id)
                if len(hung_up) == len(calls):
                    started.set()
                await go.wait()  # (never: B stops first)

            assert b.service._control is not None
            b.service._control.hangup = slow_hangup  # type: ignore[method-assign]
            await asyncio.wait_for(started.wait(), 15)
            assert await raw.exists("sideband:sweep:dead1")  # held by B's sweep
            assert await store.orphans("c", 30) == {}
        assert not await raw.exists("sideband:sweep:dead1")
        assert await store.orphans("c", 30) == {"dead1": calls}  # (another instance's turn, at once)
    finally:
        go.set()
        await raw.aclose()


async def test_the_ledger_is_written_again_after_redis_lost_it(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """Redis restarts with nothing kept (no persistence; a failover to a replica behind on writes is
    the same): the store replaces its connections, and A's next record writes all of its live calls
    again. Once A then dies, B hangs its call up."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        call = simulator.create_call(Script([pause(30)]))
        records, record = asyncio.Queue[None](), a.service.store.record

        async def noted(*args: Any) -> None:
            await record(*args)
            records.put_nowait(None)

        a.service.store.record = noted  # type: ignore[method-assign]
        assert (await a.sender.deliver(simulator.incoming_event(call), max_attempts=1)).status == 200
        await call.wait_connected(timeout=5)
        await asyncio.wait_for(records.get(), 5)
        redis_server.stop()
        redis_server.start()  # (empty)
        while not records.empty():
            records.get_nowait()
        await asyncio.wait_for(records.get(), 5)  # a record that went through since
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await raw.smembers(f"sideband:calls:{a.service.instance_id}") == {call.call_id.encode()}
        finally:
            await raw.aclose()
        assert a.service._ledger is not None and b.service._ledger is not None
        a.service._ledger.cancel()  # A stops living, as far as the ledger can tell
        await call.wait_for(lambda c: c.hangup_requested, 20, "the orphan's hangup")


async def test_a_slow_store_lets_no_lease_of_a_live_instance_run_out(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """The shortest ``SIDEBAND_ORPHAN_AFTER`` (1 s), and a store whose every record of A takes half a
    second to go through (further away, or busy): A's lease is still held each time a record renews
    it, and B hangs up none of A's calls."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        call = simulator.create_call(Script([pause(30)]))
        assert (await a.sender.deliver(simulator.incoming_event(call), max_attempts=1)).status == 200
        await call.wait_connected(timeout=5)
        raw = aioredis.Redis.from_url(redis_server.url)
        held: list[bool] = []
        enough, record = asyncio.Event(), a.service.store.record

        async def slow(*args: Any) -> None:
            await asyncio.sleep(0.5)  # (the round trip)
            held.append(bool(await raw.exists(f"sideband:alive:{a.service.instance_id}")))
            await record(*args)
            if len(held) >= 8:
                enough.set()

        a.service.store.record = slow  # type: ignore[method-assign]
        try:
            await asyncio.wait_for(enough.wait(), 20)
        finally:
            await raw.aclose()
        assert held and all(held), held
        assert b.service._sweeping is not None  # (B looked for orphans meanwhile)
        assert not call.hangup_requested
        await simulator.hang_up(call)


async def test_an_instance_that_drains_starts_no_sweep(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """A draining instance is on its way out: a sweep it started would be cut short at its close, and
    its lock would keep the others from that dead instance's calls for a while."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        orphan = simulator.create_call(Script([pause(30)]))
        recorded, record_a = asyncio.Event(), a.service.store.record
        ticks, record_b = asyncio.Queue[None](), b.service.store.record

        async def noted_a(instance: str, calls: Any, lease: float) -> None:
            await record_a(instance, calls, lease)
            if orphan.call_id in calls:
                recorded.set()

        async def noted_b(instance: str, calls: Any, lease: float) -> None:
            await record_b(instance, calls, lease)
            ticks.put_nowait(None)

        a.service.store.record = noted_a  # type: ignore[method-assign]
        b.service.store.record = noted_b  # type: ignore[method-assign]
        assert (await a.sender.deliver(simulator.incoming_event(orphan), max_attempts=1)).status == 200
        await asyncio.wait_for(recorded.wait(), 5)
        b.service.draining = True
        assert a.service._ledger is not None
        a.service._ledger.cancel()  # A stops living, as far as the ledger can tell
        raw = aioredis.Redis.from_url(redis_server.url)
        try:  # B records on until A's lease has run out, and two records more: a running B sweeps then
            while await raw.exists(f"sideband:alive:{a.service.instance_id}"):
                await asyncio.wait_for(ticks.get(), 10)
        finally:
            await raw.aclose()
        while not ticks.empty():
            ticks.get_nowait()
        for _ in range(2):
            await asyncio.wait_for(ticks.get(), 5)
        assert b.service._sweeping is None and not orphan.hangup_requested
        b.service.draining = False  # (and once it takes calls again, it sweeps)
        await orphan.wait_for(lambda c: c.hangup_requested, 10, "the orphan's hangup")


@pytest.mark.parametrize("cut_short", [False, True])
async def test_a_call_whose_hangup_failed_is_left_in_the_ledger_for_another_instance(
    simulator: Simulator,
    store: RedisStore,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    cut_short: bool,
) -> None:
    """A stops cleanly, but the hangup of its call kept failing (``hangup_failed``: it may be up): the
    call stays in A's ledger, and once A's lease has run out B hangs it up. ``cut_short``: the hangup
    is still being tried when A's drain window closes, and the stop cuts it short."""
    monkeypatch.setattr("sideband.service.HANGUP_BUDGET", 60.0 if cut_short else 1.0)
    monkeypatch.setattr("sideband.service.STRANDED_RETRY", 60.0)  # (A stops before it tries again)
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    hanging_up = make_app()

    @hanging_up.on_call_start
    def bye(ctx: CallContext) -> None:
        ctx.hangup()

    call = simulator.create_call(Script([pause(30)]))
    simulator.fail_verb(call.call_id, "hangup", *([503] * 500))
    async with run_app(make_app(), simulator, **settings):  # B
        with capture_logs() as logs:
            async with run_app(hanging_up, simulator, **settings) as a:
                assert (await a.sender.deliver(simulator.incoming_event(call), max_attempts=1)).status == 200
                if cut_short:
                    hangups = [f"/v1/realtime/calls/{call.call_id}/hangup"]
                    await simulator.wait_for(
                        lambda sim: any(r.path in hangups and r.status for r in sim.requests),
                        10,
                        "a hangup refused",
                    )
                else:
                    assert (await a.ended(call, timeout=10, check_script=False)).reason == "hangup_failed"
                owner = a.service.instance_id
            ended = [e["reason"] for e in logs if e["event"] == "call.ended"]
            assert ended == ["hangup_failed"]
            left = [e for e in logs if e["event"] == "call.stranded"]
            assert [(e["call_id"], e["outcome"], e["ledger"]) for e in left] == [(call.call_id, "left", True)]
            ledger = redis.Redis.from_url(redis_server.url)
            try:
                assert ledger.smembers(f"sideband:calls:{owner}") == {call.call_id.encode()}
            finally:
                ledger.close()
            simulator.clear_verb_faults(call.call_id, "hangup")
            await call.wait_ended(timeout=15)
        assert call.end_reason == "hangup_verb"
        swept = [(e["call_id"], e["owner"], e["outcome"]) for e in logs if e["event"] == "call.orphaned"]
        assert swept == [(call.call_id, owner, "hung_up")]


async def test_a_call_abandoned_at_a_stop_is_left_in_the_ledger_for_another_instance(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stops, and a call's task does not stop with it (``calls.abandoned``: a bug; the call's hangup
    was refused, it may be up): the call stays in A's ledger, and once A's lease has run out B hangs
    it up. When the task ends at last (``hangup_failed``), A, stopped, does not start hanging it up again
    (its HTTP session is closed: that could only fail)."""
    monkeypatch.setitem(CallRegistry.drain.__kwdefaults__, "grace", 0.2)  # (5 s otherwise)
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    call = simulator.create_call(Script([pause(30)]))
    simulator.fail_verb(call.call_id, "hangup", *([503] * 500))
    let_go = asyncio.Event()
    run = CallRuntime.run

    async def stubborn(runtime: CallRuntime) -> str:  # (a call task that will not stop)
        try:
            return await run(runtime)
        finally:
            while not let_go.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await let_go.wait()

    monkeypatch.setattr(CallRuntime, "run", stubborn)
    monkeypatch.setattr(CallRuntime, "end_bound", lambda _: 0.0)

    try:
        async with run_app(make_app(), simulator, **settings):  # B
            with capture_logs() as logs:
                async with run_app(make_app(), simulator, **settings) as a:
                    assert (
                        await a.sender.deliver(simulator.incoming_event(call), max_attempts=1)
                    ).status == 200
                    await call.wait_connected(timeout=5)
                    owner = a.service.instance_id
                    task, runtime = (
                        a.service.registry._tasks[call.call_id],
                        a.service.registry.calls[call.call_id],
                    )
                abandoned = [e["calls"] for e in logs if e["event"] == "calls.abandoned"]
                assert abandoned == [[f"call:{call.call_id}"]]
                raw = aioredis.Redis.from_url(redis_server.url)
                try:
                    assert await raw.smembers(f"sideband:calls:{owner}") == {call.call_id.encode()}
                finally:
                    await raw.aclose()
                simulator.clear_verb_faults(call.call_id, "hangup")
                await call.wait_ended(timeout=15)
            assert call.end_reason == "hangup_verb"
            swept = [(e["call_id"], e["owner"], e["outcome"]) for e in logs if e["event"] == "call.orphaned"]
            assert swept == [(call.call_id, owner, "hung_up")]
            let_go.set()
            await asyncio.wait({task}, timeout=5)
            assert task.done() and runtime.summary.reason == "hangup_failed"
            assert not a.service._stranded
    finally:
        let_go.set()


async def test_an_orphan_whose_hangup_fails_is_hung_up_again_later_by_the_instance_that_swept_it(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B sweeps A's call while OpenAI refuses hangups: B keeps trying (``call.stranded``), with the call
    in its own ledger meanwhile, instead of dropping it after one try."""
    monkeypatch.setattr("sideband.service.HANGUP_BUDGET", 1.0)
    monkeypatch.setattr("sideband.service.STRANDED_RETRY", 0.2)
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url, "orphan_after": 1.0}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        orphan = simulator.create_call(Script([pause(30)]))
        simulator.fail_verb(orphan.call_id, "hangup", *([503] * 500))
        taken_over = asyncio.Event()
        recorded, record = asyncio.Event(), a.service.store.record

        async def noted(instance: str, calls: Any, lease: float) -> None:
            await record(instance, calls, lease)
            if orphan.call_id in calls:
                (recorded if instance == a.service.instance_id else taken_over).set()

        a.service.store.record = noted  # type: ignore[method-assign]
        b.service.store.record = noted  # type: ignore[method-assign]
        with capture_logs() as logs:
            assert (await a.sender.deliver(simulator.incoming_event(orphan), max_attempts=1)).status == 200
            await orphan.wait_connected(timeout=5)
            await asyncio.wait_for(recorded.wait(), 5)
            assert a.service._ledger is not None
            a.service._ledger.cancel()  # A stops living, as far as the ledger can tell
            await asyncio.wait_for(taken_over.wait(), 10)  # B's sweep failed to hang it up: B's now
            ledger = redis.Redis.from_url(redis_server.url)
            try:
                assert orphan.call_id.encode() in ledger.smembers(f"sideband:calls:{b.service.instance_id}")
            finally:
                ledger.close()
            simulator.clear_verb_faults(orphan.call_id, "hangup")  # OpenAI answers again
            await orphan.wait_ended(timeout=15)
        assert orphan.end_reason == "hangup_verb"
        swept = [(e["call_id"], e["outcome"]) for e in logs if e["event"] == "call.orphaned"]
        assert swept == [(orphan.call_id, "hangup_failed")]
        stranded = [e["outcome"] for e in logs if e["event"] == "call.stranded"]
        assert stranded[-1] == "hung_up" and set(stranded[:-1]) <= {"retrying"}


async def test_a_redelivery_to_another_instance_attaches_after_an_uncertain_accept(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """A's accept went through but its answer never came (its retries found the call no longer ringing
    only after its budget): the redelivery lands on B, whose accept gets 404; the shared store tells B
    that an accept may have gone through, so B attaches instead of taking the call for gone."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        call = simulator.create_call(Script([pause(30)]))
        simulator.fail_accept(call.call_id, "late", "timeout", "timeout", "timeout", "timeout")
        event = simulator.incoming_event(call)
        first = await a.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
        assert first.status == 503 and call.status == "accepted"
        simulator.calls[call.call_id].accept_faults.clear()
        second = await b.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
        assert second.status == 200, second.bodies
        await call.wait_connected(1, timeout=5)
        assert call.sideband_connects == 1 and len(b.service.registry) == 1
        await simulator.hang_up(call)


async def test_a_redelivery_whose_accept_is_refused_after_another_instances_uncertain_accept_attaches(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    """A's accept may have gone through (unanswered, then its budget ran out); B's accept of the
    redelivery is refused as one of a call already accepted may be (422): B attaches, it does not
    reject the call."""
    settings = {**TEST_SETTINGS, "redis_url": redis_server.url}
    async with (
        run_app(make_app(), simulator, **settings) as a,
        run_app(make_app(), simulator, **settings) as b,
    ):
        call = simulator.create_call(Script([pause(30)]))
        simulator.fail_accept(call.call_id, "late", "timeout", "timeout", "timeout", "timeout")
        event = simulator.incoming_event(call)
        first = await a.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
        assert first.status == 503 and call.status == "accepted"
        simulator.calls[call.call_id].accept_faults.clear()
        simulator.fail_accept(call.call_id, 422)
        second = await b.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
        assert (second.status, json.loads(second.bodies[-1] or b"{}")) == (200, {"status": "accepted"})
        await call.wait_connected(1, timeout=5)
        assert call.sideband_connects == 1 and len(b.service.registry) == 1
        assert not [r for r in simulator.requests if r.path.endswith(("/reject", "/hangup"))]
        await simulator.hang_up(call)


async def test_a_store_outage_answers_503_and_the_server_recovers(
    simulator: Simulator, store: RedisStore, redis_server: RedisServer
) -> None:
    async with run_app(make_app(), simulator, **{**TEST_SETTINGS, "redis_url": redis_server.url}) as h:
        redis_server.stop()
        try:
            call = simulator.create_call(Script([pause(30)]))
            with capture_logs() as logs:
                result = await h.sender.deliver(simulator.incoming_event(call), max_attempts=1)
            assert result.status == 503 and json.loads(result.bodies[-1] or b"{}") == {
                "error": "claim store unavailable"
            }
            assert accepts(simulator, call.call_id) == 0  # nothing happened: OpenAI delivers again
            down = [e for e in logs if e["event"] == "store.unavailable"]
            assert down and PASSWORD not in json.dumps(logs, default=str)
            assert down[-1]["call_id"] == call.call_id and down[-1]["webhook_id"]  # which call it failed
            assert not [e for e in logs if e["event"] == "http.internal_error"]
        finally:
            redis_server.start()
        again = await h.sender.deliver(simulator.incoming_event(call), max_attempts=1)
        assert again.status == 200 and accepts(simulator, call.call_id) == 1
        await call.wait_connected(1, timeout=5)
        await simulator.hang_up(call)


async def test_serve_uses_redis_and_logs_it_without_the_password(
    simulator: Simulator, redis_server: RedisServer
) -> None:
    if redis_server.proc is None:
        redis_server.start()
    async with serving(serve_env(simulator, SIDEBAND_REDIS_URL=redis_server.url)) as served:
        assert served.started["store"] == f"redis://127.0.0.1:{redis_server.port}/0"
        assert PASSWORD not in json.dumps(served.lines)
        assert await served.stop() == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache:6379", "sideband: SIDEBAND_REDIS_URL: Value error, must be a redis://"),
        ("redis://:pw@127.0.0.1:notaport/0", "sideband: SIDEBAND_REDIS_URL: Value error, cannot be read: "),
        # passwords not percent-encoded: no piece of them is quoted
        (
            "redis://:pw/s3cret@127.0.0.1:6379/0",
            "sideband: SIDEBAND_REDIS_URL: Value error, cannot be read: ",
        ),
        (
            "redis://:1234/s3cret@127.0.0.1:6379/0",
            "sideband: SIDEBAND_REDIS_URL: Value error, cannot be read",
        ),
        ("redis://:pw#s3cret@127.0.0.1:6379/0", "sideband: SIDEBAND_REDIS_URL: Value error, cannot be read"),
        ("redis://:pw[s3cret]@127.0.0.1:6379/0", "sideband: SIDEBAND_REDIS_URL: Value error, cannot be read"),
        (
            "redis://:pw@127.0.0.1:{port}/0?ssl_cert_reqs=none",
            "sideband: SIDEBAND_REDIS_URL: Value error, cannot set ssl_cert_reqs: the ssl_… options need a "
            "rediss:// URL (TLS)",
        ),
        (
            "redis://:pw@127.0.0.1:{port}/0?timeout=30&socket_timeout=5",
            "sideband: SIDEBAND_REDIS_URL: Value error, must not set socket_timeout, timeout: sideband sets",
        ),
        (
            "redis://:pw@/0",
            "sideband: SIDEBAND_REDIS_URL: cannot use the claim store: redis at redis://localhost/0: ",
        ),
        ("redis://:pw@127.0.0.1/zero", "sideband: SIDEBAND_REDIS_URL: Value error, must end with a database"),
        (
            "redis://:pw@127.0.0.1:{port}/0?client_name=a&credential_provider=x&decode_responses=false",
            (
                "sideband: SIDEBAND_REDIS_URL: Value error, cannot set 'credential_provider', "
                "'decode_responses': "
            ),
        ),
        (
            "redis://:pw@127.0.0.1:{port}/0?encoding=nope",
            "sideband: SIDEBAND_REDIS_URL: Value error, encoding: no such encoding in Python",
        ),
        (
            "redis://:pw@127.0.0.1:{port}/0",
            "sideband: SIDEBAND_REDIS_URL: cannot use the claim store: redis at redis://127.0.0.1:",
        ),
    ],
)
@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_bad_or_unreachable_store_stops_serve_with_one_line(url: str, message: str, command: str) -> None:
    env = clean_env(
        OPENAI_API_KEY="sk-test",
        OPENAI_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        SIDEBAND_REDIS_URL=url.format(port=free_port()),  # (a port nothing listens on: unreachable)
    )
    flags = ("--host", "127.0.0.1", "--port", "0") if command == "serve" else ()
    done = run_cli(command, "examples.app:app", *flags, env=env)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert "pw" not in done.stderr and "s3cret" not in done.stderr and "1234" not in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw/s3cret@cache:6379/0",
        "redis://:1234/s3cret@cache:6379/0",
        "redis://:pw?s3cret@cache:6379/0",
        "redis://user:pw#s3cret@cache:6379/0",
        "redis://:pw@s3cret@cache:6379/0",
    ],
)
def test_a_store_is_named_without_any_piece_of_its_password(url: str) -> None:
    assert redacted(url) == "redis://cache:6379/0"
    assert redacted("unix://:pw@/run/redis.sock?db=1&password=s3cret") == "unix:///run/redis.sock"


def test_a_socket_path_keeps_its_own_at_sign() -> None:
    assert redacted("unix:///run/redis@main/redis.sock") == "unix:///run/redis@main/redis.sock"
    assert redacted("unix://:pw@/run/redis@main/redis.sock?db=1") == "unix:///run/redis@main/redis.sock"
    assert redacted("redis://:pw@/0") == "redis://localhost/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:a@b?s3cret@cache:6379/0",
        "rediss://user:a@b#s3cret@cache:6379/0",
        "redis://:a@b/s3cret@cache:6379/0",
        "unix://:a@b?s3cret@/run/redis.sock",
        "unix://:pw/s3cret@/run/redis.sock",
    ],
)
def test_a_password_holding_an_at_sign_then_a_delimiter_is_refused_unquoted(url: str) -> None:
    """The host part ends at the password's / ? or #: redis-py would connect to a piece of the
    password (and the logs would name it) instead of refusing the URL."""
    with pytest.raises(SettingsError) as refused:
        load_settings({"redis_url": url})
    assert "must be percent-encoded" in str(refused.value)
    assert "s3cret" not in str(refused.value) and "a@b" not in str(refused.value)


def test_a_socket_path_and_a_password_may_each_hold_an_at_sign() -> None:
    for url in ("unix:///run/redis@main/redis.sock", "unix://:p%40w@/run/redis@main/redis.sock?db=1"):
        settings = load_settings({"redis_url": url})
        assert settings.redis_url is not None and settings.redis_url.get_secret_value() == url


def test_check_reaches_redis_by_a_socket_whose_path_holds_an_at_sign(redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    assert "@" in str(redis_server.socket)
    env = clean_env(
        OPENAI_API_KEY="sk-test",
        OPENAI_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        SIDEBAND_REDIS_URL=f"unix://:{PASSWORD}@{redis_server.socket}?db=0",
    )
    done = run_cli("check", "examples.app:app", env=env)
    assert done.returncode == 0, done.stderr
    assert "claims: Redis answered" in done.stdout.splitlines()
    assert PASSWORD not in done.stdout + done.stderr


def test_check_finds_the_redis_serve_would_use(redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    env = clean_env(
        OPENAI_API_KEY="sk-test",
        OPENAI_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        SIDEBAND_REDIS_URL=redis_server.url,
    )
    done = run_cli("check", "examples.app:app", env=env)
    assert done.returncode == 0, done.stderr
    assert "claims: Redis answered" in done.stdout.splitlines()
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("query", "refused"),
    [("protocol=2&legacy_responses=false&retry_on_timeout=true", ""), ("retry_on_error=x", "retry_on_error")],
)
def test_check_refuses_a_url_replacing_the_stores_retry_in_one_line(
    redis_server: RedisServer, query: str, refused: str
) -> None:
    if redis_server.proc is None:
        redis_server.start()
    env = clean_env(
        OPENAI_API_KEY="sk-test",
        OPENAI_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        SIDEBAND_REDIS_URL=f"{redis_server.url}?{query}",
    )
    done = run_cli("check", "examples.app:app", env=env)
    assert PASSWORD not in done.stdout + done.stderr
    if not refused:
        assert done.returncode == 0, done.stderr
        assert "claims: Redis answered" in done.stdout.splitlines()
        return
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "sideband: SIDEBAND_REDIS_URL: cannot use the claim store: "
        f"redis at redis://127.0.0.1:{redis_server.port}/0: "
        f"the URL must not set {refused}: "
    ), done.stderr


class LedgerBreakingOnce(MemoryStore):
    """A claim store with a ledger whose first record fails the way a bug would (not the store's
    outage), and whose later records are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, set[str]]] = []
        self.recorded = asyncio.Event()

    async def record(self, instance: str, calls: Any, lease: float) -> None:
        if not self.records:
            self.records.append((instance, set()))
            raise TypeError("a bug, with data: " + instance)
        self.records.append((instance, set(calls)))
        self.recorded.set()

    async def orphans(self, instance: str, sweep: float) -> dict[str, list[str]]:
        return {}

    async def swept(self, instance: str, owner: str, calls: Any) -> None:
        return None

    async def forget(self, instance: str) -> None:
        return None

    async def running(self, call_id: str) -> str | None:
        return None


class LedgerDownThenBroken(LedgerBreakingOnce):
    """A ledger whose first record meets the store down, whose second fails as a bug would, and whose
    later records are kept."""

    async def record(self, instance: str, calls: Any, lease: float) -> None:
        self.records.append((instance, set(calls)))
        if len(self.records) == 1:
            raise StoreUnavailable("redis at redis://cache/0: no answer within 2 s")
        if len(self.records) == 2:
            raise TypeError("a bug")
        self.recorded.set()


async def test_a_ledger_failing_one_way_then_another_logs_each_as_it_starts(simulator: Simulator) -> None:
    """Records meeting the store down, then failing as a bug would: each kind of failure is logged once,
    as it starts (not at every record, nor only the first kind)."""
    store = LedgerDownThenBroken()
    service = Service(settings_for(simulator), make_app(), store=store)
    with capture_logs() as logs:
        await service.start()
        try:
            await asyncio.wait_for(store.recorded.wait(), 10)
        finally:
            await service.close()
    failures = [e["event"] for e in logs if e["event"] in ("store.unavailable", "ledger.failed")]
    assert failures == ["store.unavailable", "ledger.failed"]


async def test_a_ledger_that_fails_once_goes_on_recording(simulator: Simulator) -> None:
    """A record failing for a reason of ours must not end the ledger: its lease would run out, and
    the other instances hang up every call of this one."""
    store = LedgerBreakingOnce()
    service = Service(settings_for(simulator), make_app(), store=store)
    with capture_logs() as logs:
        await service.start()
        try:
            await asyncio.wait_for(store.recorded.wait(), 5)
            assert [r[0] for r in store.records] == [service.instance_id] * 2
        finally:
            await service.close()
    # Logged, though it failed from the first record: its type and where, not its text (nor a traceback).
    (failed,) = [e for e in logs if e["event"] == "ledger.failed"]
    assert failed["ledger"] == service.instance_id and failed["error"] == "TypeError"
    assert "in record" in failed["stack"] and "exc_info" not in failed
    assert f"data: {service.instance_id}" not in str(failed)


@contextlib.asynccontextmanager
async def reply_lost_once(
    redis_server: RedisServer,
    marker: bytes,
    key: str,
    *,
    drop: bool = True,
    timeout: float = STORE_TIMEOUT,
    late: tuple[asyncio.Event, asyncio.Event] | None = None,
) -> AsyncIterator[tuple[RedisStore, asyncio.Event]]:
    """A store reaching the server through a proxy, and an event: once it is set, the first command
    holding ``marker`` is carried out (``key`` is written) but its reply never comes back, and its
    connection drops (``drop``) or stays open, with no reply, until the store drops it. With ``late``
    (``go``, ``landed``), the command is held back in flight instead, and reaches the server once ``go``
    is set; ``landed`` is set once the server has carried it out (its reply, dropped, came back)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    armed = asyncio.Event()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", redis_server.port)

        async def replies() -> None:
            with contextlib.suppress(OSError):
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()

        async def held_back(data: bytes, go: asyncio.Event, landed: asyncio.Event) -> None:
            await go.wait()
            up_writer.write(data)
            await up_writer.drain()
            await up_reader.read(65536)  # (its reply: carried out)
            landed.set()

        back = asyncio.ensure_future(replies())
        try:
            while data := await reader.read(65536):
                if armed.is_set() and marker in data and late is not None:
                    armed.clear()
                    back.cancel()
                    await held_back(data, *late)
                    return
                if armed.is_set() and marker in data:
                    armed.clear()
                    back.cancel()  # its reply never reaches the client...
                    up_writer.write(data)  # ...but redis carries the command out
                    await up_writer.drain()
                    raw = aioredis.Redis.from_url(redis_server.url)
                    try:  # (carried out before the connection drops)
                        async with asyncio.timeout(5):
                            while not await raw.exists(key):
                                await asyncio.sleep(0.005)
                    finally:
                        await raw.aclose()
                    if drop:
                        writer.transport.abort()
                    else:
                        while await reader.read(65536):  # (no reply, until the store drops the connection)
                            pass
                    return
                up_writer.write(data)
                await up_writer.drain()
        finally:
            back.cancel()
            up_writer.close()

    forwarder = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = forwarder.sockets[0].getsockname()[1]
    behind = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", timeout=timeout)
    try:
        await behind.open()
        yield behind, armed
    finally:
        await behind.close()
        forwarder.close()


async def test_a_claim_whose_reply_was_lost_is_still_won(redis_server: RedisServer) -> None:
    """Redis carried the claim out, then the connection dropped before its reply came back (a network
    blip, a proxy's reset): the store tries it again on a new connection, and that finds the store's
    own claim. It has won; it has not lost to itself (every redelivery of the webhook would be answered
    409 until the claim ran out, with nobody answering the call)."""
    async with reply_lost_once(redis_server, b"wh_lost", "sideband:webhook:wh_lost") as (behind, armed):
        other = RedisStore(redis_server.url)
        try:
            assert await behind.claim("webhook:warm", 30)  # (redis knows the script now)
            armed.set()
            assert await behind.claim("webhook:wh_lost", 30)
            assert not armed.is_set()  # (the reply was lost)
            assert not await other.claim("webhook:wh_lost", 30)  # another store's claim is still refused
            assert not await behind.claim("webhook:wh_lost", 30)  # and so is a second claim of the same store
            await behind.release("webhook:wh_lost")
            assert await other.claim("webhook:wh_lost", 30)
        finally:
            await other.close()


async def test_a_dead_instance_taken_by_a_sweep_whose_reply_was_lost_is_still_taken(
    redis_server: RedisServer,
) -> None:
    """Redis took A for B's sweep, then the connection dropped before the reply came back: tried again,
    the taking finds B's own hold of A, and B has A's calls (not nothing, until its hold ran out)."""
    async with reply_lost_once(redis_server, b"sweep:lost", "sideband:sweep:lost") as (behind, armed):
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await behind.record("b", [], 30)
            await behind.record("warm", ["w1"], 0.05)
            await lease_out(raw, "warm")
            assert await behind.orphans("b", 30) == {"warm": ["w1"]}  # (redis knows the script now)
            await behind.swept("b", "warm", ["w1"])
            await behind.record("lost", ["c1"], 0.05)
            await lease_out(raw, "lost")
            armed.set()
            assert await behind.orphans("b", 30) == {"lost": ["c1"]}
            assert not armed.is_set()  # (the reply was lost)
            assert await behind.orphans("c", 30) == {}  # another sweep gets nothing of it
            assert await behind.orphans("b", 30) == {}  # nor does a later one of the same instance
            await behind.swept("b", "lost", ["c1"])
            assert not await raw.exists("sideband:sweep:lost", "sideband:calls:lost")
        finally:
            await raw.aclose()


async def _dead_instance_held_next(behind: RedisStore, raw: aioredis.Redis, armed: asyncio.Event) -> None:
    """B (``behind``) has swept once (redis knows the script), and A ("held", call ``c1``) is dead: the
    proxy holds back B's next taking (``armed`` set)."""
    await behind.record("b", [], 30)
    await behind.record("warm", ["w1"], 0.05)
    await lease_out(raw, "warm")
    assert await behind.orphans("b", 30) == {"warm": ["w1"]}
    await behind.swept("b", "warm", ["w1"])
    await behind.record("held", ["c1"], 0.05)
    await lease_out(raw, "held")
    armed.set()


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
async def test_a_sweep_cut_short_while_it_takes_a_dead_instance_lets_go_of_it(
    redis_server: RedisServer, end: str
) -> None:
    """Redis took A for B's sweep, and the reply is not back when B stops (the sweep cancelled) or
    gives up on it (the store's timeout): B lets go of A as the sweep ends, so that another instance (or
    B's next sweep) takes A's calls at once, not once B's hold has run out (tens of seconds, with nobody
    running their tools)."""
    async with reply_lost_once(
        redis_server, b"sweep:held", "sideband:sweep:held", drop=False, timeout=0.5
    ) as (behind, armed):
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await _dead_instance_held_next(behind, raw, armed)
            sweep = asyncio.ensure_future(behind.orphans("b", 30))
            if end == "cancelled":
                async with asyncio.timeout(5):
                    while not await raw.exists("sideband:sweep:held"):  # taken: its reply held back
                        await asyncio.sleep(0.005)
                assert not sweep.done()
                sweep.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await sweep
            else:
                with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                    await sweep
            assert not await raw.exists("sideband:sweep:held")
            assert await behind.orphans("c", 30) == {"held": ["c1"]}  # another instance's turn, at once
        finally:
            await raw.aclose()


async def test_a_sweeps_taking_that_lands_after_its_let_go_takes_nothing(redis_server: RedisServer) -> None:
    """B's taking of A is held up in flight past the store's timeout, and reaches Redis only after B let
    go of A (a network stall: TCP delivers what was sent, late). It takes nothing: it would hold A for
    tens of seconds with no sweep left to let go of it, and nobody would hang A's calls up meanwhile."""
    go, landed = asyncio.Event(), asyncio.Event()
    async with reply_lost_once(
        redis_server, b"sweep:held", "sideband:sweep:held", timeout=0.5, late=(go, landed)
    ) as (behind, armed):
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await _dead_instance_held_next(behind, raw, armed)
            with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                await behind.orphans("b", 30)
            go.set()
            async with asyncio.timeout(5):
                await landed.wait()
            assert not await raw.exists("sideband:sweep:held")
            assert await behind.orphans("c", 30) == {"held": ["c1"]}  # another instance's turn
        finally:
            await raw.aclose()


async def _gone(raw: aioredis.Redis, key: str) -> None:
    """Wait until ``key`` is no longer held."""
    async with asyncio.timeout(5):
        while await raw.exists(key):
            await asyncio.sleep(0.005)


async def _let_go_of(raw: aioredis.Redis) -> None:
    """Wait until a claim has been let go of (its mark is there)."""
    async with asyncio.timeout(5):
        while not await raw.keys("sideband:letgo:p:*"):
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
async def test_a_claim_carried_out_after_its_caller_gave_up_on_it_is_let_go_of(
    redis_server: RedisServer, end: str
) -> None:
    """Redis carries a claim out, and its reply is not back when the store gives up on it (its timeout:
    Redis stalled) or its caller is cut short: the store lets go of it at once, not once it has run out
    (every redelivery of the webhook would be answered 409 meanwhile, with nobody answering the call)."""
    key = "sideband:webhook:wh_slow"
    async with reply_lost_once(redis_server, b"wh_slow", key, drop=False, timeout=0.5) as (behind, armed):
        raw = aioredis.Redis.from_url(redis_server.url)
        other = RedisStore(redis_server.url)
        try:
            assert await behind.claim("webhook:warm", 30)  # (redis knows the script now)
            armed.set()
            claim = asyncio.ensure_future(behind.claim("webhook:wh_slow", 30))
            if end == "cancelled":
                async with asyncio.timeout(5):
                    while not await raw.exists(key):  # carried out: its reply held back
                        await asyncio.sleep(0.005)
                assert not claim.done()
                claim.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await claim
            else:
                with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                    await claim
            await _gone(raw, key)
            assert await other.claim("webhook:wh_slow", 30)  # a redelivery's, on any instance
            assert await raw.exists("sideband:webhook:warm")  # (the store's other claim stays)
        finally:
            await other.close()
            await raw.aclose()


async def test_a_claim_that_lands_after_it_was_let_go_of_takes_nothing(redis_server: RedisServer) -> None:
    """A claim held up in flight past the store's timeout reaches Redis only after the store let go of it
    (a network stall: TCP delivers what was sent, late). It takes nothing: it would hold the key for the
    claim's whole TTL, with nobody to settle or release it."""
    go, landed = asyncio.Event(), asyncio.Event()
    key = "sideband:webhook:wh_late"
    async with reply_lost_once(redis_server, b"wh_late", key, timeout=0.5, late=(go, landed)) as (
        behind,
        armed,
    ):
        raw = aioredis.Redis.from_url(redis_server.url)
        other = RedisStore(redis_server.url)
        try:
            assert await behind.claim("webhook:warm", 30)
            armed.set()
            with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                await behind.claim("webhook:wh_late", 30)
            await _let_go_of(raw)
            go.set()
            async with asyncio.timeout(5):
                await landed.wait()
            assert not await raw.exists(key)
            assert await other.claim("webhook:wh_late", 30)
        finally:
            await other.close()
            await raw.aclose()


async def test_a_claim_that_failed_leaves_the_one_that_holds_the_key(redis_server: RedisServer) -> None:
    """A claim of a key the store holds already (an earlier delivery's, still at work) fails for want of
    an answer: what it lets go of is its own value only, never the claim that did succeed."""
    key = "sideband:call:rtc_held"
    async with reply_lost_once(redis_server, b"rtc_held", key, drop=False, timeout=0.5) as (behind, armed):
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await behind.claim("call:rtc_held", 30)
            held = await raw.get(key)
            armed.set()
            with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                await behind.claim("call:rtc_held", 30)
            await _let_go_of(raw)
            assert await raw.get(key) == held
            assert not await behind.claim("call:rtc_held", 30)
        finally:
            await raw.aclose()


async def test_a_webhook_whose_claim_redis_carried_out_late_is_answered_at_its_redelivery(
    simulator: Simulator, redis_server: RedisServer
) -> None:
    """Redis stalls past the store's timeout while it takes a webhook's claim: that delivery is answered
    503, and OpenAI's redelivery, once Redis answers again, answers the call (it found the claim pending
    for its whole TTL, and got 409 each time, while the caller rang)."""
    key = "sideband:webhook:wh_stall"
    async with (
        run_app(make_app(), simulator, **{**TEST_SETTINGS, "redis_url": redis_server.url}) as h,
        reply_lost_once(redis_server, b"wh_stall", key, drop=False, timeout=0.5) as (behind, armed),
    ):
        raw = aioredis.Redis.from_url(redis_server.url)
        kept, h.service.store = h.service.store, behind
        try:
            call = simulator.create_call(Script([pause(30)]))
            event = simulator.incoming_event(call)
            armed.set()
            first = await h.sender.deliver(event, webhook_id="wh_stall", max_attempts=1)
            assert first.status == 503
            await _gone(raw, key)
            again = await h.sender.deliver(event, webhook_id="wh_stall", max_attempts=1)
            assert again.status == 200 and json.loads(again.bodies[-1] or b"{}") == {"status": "accepted"}
            await call.wait_connected(1, timeout=5)
            await simulator.hang_up(call)
        finally:
            h.service.store = kept
            await raw.aclose()
