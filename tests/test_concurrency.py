"""The adaptive concurrency limiter, driven by a fake clock: no test waits for real time."""

from __future__ import annotations

import asyncio

import pytest

from runs_etl.engine.concurrency import (
    GAP_MAX,
    INITIAL_LIMIT,
    LATENCY_FLOOR,
    Limiter,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limiter(maximum: int = 32, **kw) -> tuple[Limiter, FakeClock]:
    clock = FakeClock()
    return Limiter(maximum, clock=clock, sleep=clock.sleep, **kw), clock


def round_trip(lim: Limiter, clock: FakeClock, latency: float, n: int | None = None,
               **outcome) -> None:
    """Send ``n`` requests (default: as many as the limit allows) together; all answer after
    ``latency`` seconds with ``outcome``."""
    async def go() -> None:
        tickets = [await lim.acquire() for _ in range(n or lim.capacity)]
        clock.now += latency
        for t in tickets:
            lim.release(t, **outcome)
    asyncio.run(go())


def test_starts_small_and_doubles_per_healthy_round_trip_up_to_the_maximum():
    lim, clock = limiter(32)
    assert lim.capacity == INITIAL_LIMIT
    seen = []
    for _ in range(5):
        round_trip(lim, clock, 0.1)
        seen.append(lim.capacity)
    assert seen == [8, 16, 32, 32, 32]


def test_a_429_halves_the_limit_once_per_round_trip_and_pauses_every_sender():
    lim, clock = limiter(32)
    for _ in range(3):
        round_trip(lim, clock, 0.1)
    assert lim.capacity == 32
    # 32 requests in flight all come back 429: one decrease, not 32.
    round_trip(lim, clock, 0.01, overloaded=True, retry_after=2.0)
    assert lim.capacity == 16
    assert lim.throttles == 32
    assert lim.gap > 0  # sends are paced from now on

    async def next_send() -> float:
        t = await lim.acquire()
        lim.release(t)
        return t.sent

    paused_at = clock.now
    assert asyncio.run(next_send()) == pytest.approx(paused_at + 2.0)  # Retry-After honoured


def test_after_a_throttle_it_grows_by_one_per_round_trip_and_the_pacing_relaxes():
    lim, clock = limiter(32)
    round_trip(lim, clock, 0.1)
    round_trip(lim, clock, 0.1, n=1, overloaded=True)
    assert lim.capacity == 4
    gap = lim.gap
    round_trip(lim, clock, 0.1)
    assert 4.5 < lim.limit < 5.5  # about one more per round trip: no more slow start
    assert 0 < lim.gap < gap


def test_retries_after_a_throttle_are_paced_like_every_send():
    """A retry waits its own Retry-After, then still keeps the learned gap: retries let through
    unpaced met the drained bucket at once, each 429 widened the gap again, and 200 pages at
    40 requests/s took 12-58 s instead of 4 (measured)."""
    lim, clock = limiter(32)
    round_trip(lim, clock, 0.005, n=4)
    round_trip(lim, clock, 0.005, n=1, overloaded=True, retry_after=0.02)
    assert lim.gap > 0
    clock.now += 0.02  # each retry has waited its Retry-After itself

    async def retries() -> list[float]:
        tickets = [await lim.acquire(waited=True) for _ in range(3)]
        for t in tickets:
            lim.release(t)
        return [t.sent for t in tickets]

    sent = asyncio.run(retries())
    assert all(b - a >= lim.gap * 0.99 for a, b in zip(sent, sent[1:]))


def test_rising_latency_shrinks_the_limit_but_not_below_the_floor():
    lim, clock = limiter(8)
    round_trip(lim, clock, 0.01)
    assert lim.capacity == 8
    shrinking = []
    for _ in range(4):
        round_trip(lim, clock, 0.2)  # 20x the best latency seen: the server is queueing us
        shrinking.append(lim.capacity)
    assert shrinking == [6, LATENCY_FLOOR, LATENCY_FLOOR, LATENCY_FLOOR]
    assert lim.gap == 0  # latency alone never paces


def test_steady_latency_with_jitter_keeps_the_maximum():
    lim, clock = limiter(16)
    for latency in [0.1, 0.12, 0.09, 0.11, 0.1, 0.13, 0.1] * 3:
        round_trip(lim, clock, latency)
    assert lim.capacity == 16


def test_transport_errors_neither_grow_nor_shrink_the_limit():
    lim, clock = limiter(32)
    round_trip(lim, clock, 0.1, healthy=False)
    assert lim.capacity == INITIAL_LIMIT


def test_fixed_limit_ignores_every_signal():
    lim, clock = limiter(8, adaptive=False)
    assert lim.capacity == 8
    round_trip(lim, clock, 0.1, overloaded=True, retry_after=5.0)
    round_trip(lim, clock, 5.0)
    assert lim.capacity == 8 and lim.gap == 0 and clock.slept == []


def test_a_full_limiter_makes_senders_wait_for_a_release():
    lim, clock = limiter(2, initial=2)

    async def go() -> list[str]:
        order: list[str] = []
        a, b = await lim.acquire(), await lim.acquire()

        async def third() -> None:
            await lim.acquire()
            order.append("third sent")

        task = asyncio.ensure_future(third())
        await asyncio.sleep(0)
        order.append("full")
        lim.release(a)
        await task
        lim.release(b)
        return order

    assert asyncio.run(go()) == ["full", "third sent"]


def test_a_cancelled_waiter_passes_its_wake_up_on():
    lim, clock = limiter(1, initial=1)

    async def go() -> bool:
        held = await lim.acquire()
        first = asyncio.ensure_future(lim.acquire())
        second = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0)
        lim.release(held)  # wakes ``first``...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.sleep(0)
        await asyncio.wait_for(second, 1)
        return second.done()

    assert asyncio.run(go())


@pytest.mark.parametrize("share", [0.08, 0.5])
def test_a_server_throttling_at_random_slows_the_sends_but_never_stops_them(share):
    """An unhealthy server answering 503 / 429 to a share of requests whatever the pace: the
    pacing settles (8%: below the one-in-nine the gap balances at) or stays at GAP_MAX (half
    of them); it does not grow without end. It once did, and a sync stood still."""
    lim, clock = limiter(16)
    every = round(1 / share)
    for i in range(2000):
        round_trip(lim, clock, 0.005, n=1, overloaded=(i % every == 0))
        assert lim.gap <= GAP_MAX
    if share < 0.1:
        assert lim.gap < 0.01
    assert clock.now - 100.0 < 2000 * (0.005 + GAP_MAX)
