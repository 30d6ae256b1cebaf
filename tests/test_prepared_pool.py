"""The pool of sandboxes made ahead (gateway/manager/prepared.py), with real trio tasks
and plain items, under trio's own test clock: what it hands out, what it keeps, and
what it throws away. The namespaces sandbox's use of it is tested end to end in
tests/test_sandbox.py."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
import trio.testing

from gateway.manager.prepared import PreparedPool

# A key: (app, release); an app's releases replace each other.
Key = tuple[str, int]


@dataclass
class Maker:
    """Makes numbered items, slowly enough for things to happen meanwhile, and records
    what the pool made, discarded, and held at most."""

    delay: float = 0.5
    made: list[tuple[Key, int]] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)
    alive_peak: int = 0
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    async def make(self, key: Key) -> int:
        await trio.sleep(self.delay)
        number = next(self._numbers)
        self.made.append((key, number))
        self.alive_peak = max(self.alive_peak, len(self.made) - len(self.discarded))
        return number

    async def discard(self, item: int) -> None:
        assert item not in self.discarded, f"item {item} discarded twice"
        self.discarded.append(item)


def run(test: Callable[[PreparedPool[Key, int], Maker], Awaitable[None]], **pool: int) -> Maker:
    """`test` with a running pool (per_key 2, max_total 4, idle 60 s unless given)."""
    maker = Maker()

    async def main() -> None:
        prepared: PreparedPool[Key, int] = PreparedPool(
            maker.make, maker.discard, group=lambda key: key[0],
            per_key=pool.get("per_key", 2), max_total=pool.get("max_total", 4),
            idle=pool.get("idle", 60),
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(prepared.run)
            await test(prepared, maker)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return maker


def test_an_item_is_handed_out_once_and_never_again() -> None:
    taken: list[int] = []

    async def test(pool: PreparedPool[Key, int], maker: Maker) -> None:
        for _ in range(20):  # sessions one after another, each topping the pool up
            pool.want(("shop", 1))
            await trio.sleep(1)
            for _ in range(3):
                item = pool.take(("shop", 1))
                if item is not None:
                    taken.append(item)

    maker = run(test)
    assert len(taken) >= 20
    assert len(taken) == len(set(taken))  # never the same sandbox twice
    assert not set(taken) & set(maker.discarded)  # nor one that was thrown away


def test_a_replaced_release_is_never_handed_out() -> None:
    async def test(pool: PreparedPool[Key, int], maker: Maker) -> None:
        pool.want(("shop", 1))
        await trio.sleep(1)
        assert pool.count(("shop", 1)) == 2
        pool.want(("shop", 2))  # release 2 replaces release 1
        assert pool.take(("shop", 1)) is None
        await trio.sleep(1)
        assert pool.count(("shop", 2)) == 2
        # Another app's entries are not its to drop.
        pool.want(("blog", 7))
        await trio.sleep(1)
        assert pool.count(("shop", 2)) == 2 and pool.count(("blog", 7)) == 2

    maker = run(test)
    released_1 = [number for key, number in maker.made if key == ("shop", 1)]
    assert set(released_1) <= set(maker.discarded)  # every sandbox of release 1 went


def test_one_being_made_for_a_replaced_release_is_discarded_when_done() -> None:
    async def test(pool: PreparedPool[Key, int], maker: Maker) -> None:
        pool.want(("shop", 1))
        await trio.sleep(0.1)  # both still being made
        pool.want(("shop", 2))
        await trio.sleep(2)
        assert pool.count(("shop", 1)) == 0
        assert pool.take(("shop", 1)) is None

    maker = run(test)
    released_1 = [number for key, number in maker.made if key == ("shop", 1)]
    assert len(released_1) == 2 and set(released_1) <= set(maker.discarded)


def test_the_pool_never_holds_more_than_max_total() -> None:
    async def test(pool: PreparedPool[Key, int], maker: Maker) -> None:
        for app in range(10):  # ten apps, two each wanted: room for four in all
            pool.want((f"app{app}", 1))
            await trio.sleep(0.2)
            assert pool.total <= 4
        await trio.sleep(5)
        assert pool.total == 4
        # Taking frees room, which the next want fills again, still within bounds.
        assert pool.take(("app0", 1)) is not None
        pool.want(("app9", 1))
        await trio.sleep(5)
        assert pool.total == 4

    maker = run(test, max_total=4)
    assert maker.alive_peak <= 4 + 1  # the one taken (the session's) and four in the pool


def test_unused_entries_go_after_idle_so_an_idle_host_holds_none() -> None:
    async def test(pool: PreparedPool[Key, int], maker: Maker) -> None:
        pool.want(("shop", 1))
        await trio.sleep(1)
        assert pool.count(("shop", 1)) == 2
        await trio.sleep(9)  # made at ~0.5 s and ~1 s, idle after 10 s: still there
        assert pool.count(("shop", 1)) == 2
        await trio.sleep(2)
        assert pool.total == 0
        assert len(maker.discarded) == 2

    run(test, idle=10)


def test_whatever_is_left_is_discarded_when_the_pool_stops() -> None:
    async def test(pool: PreparedPool[Key, int], maker: Maker) -> None:
        pool.want(("shop", 1))
        pool.want(("blog", 1))
        await trio.sleep(2)
        assert pool.total == 4

    maker = run(test)
    assert sorted(maker.discarded) == sorted(number for _, number in maker.made)
