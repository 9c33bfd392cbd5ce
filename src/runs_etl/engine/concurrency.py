"""How many requests to keep in flight, and how fast to send them: learned from the responses.

``Limiter`` is AIMD, like TCP's congestion control. It starts with a few requests in flight and
adds one per healthy response (doubling per round trip) up to ``api.concurrency``; after the
first sign of overload it adds one per round trip instead. Signs of overload:

- **429 / 503 or a ``Retry-After``**: the limit halves (once per round trip: the other requests
  already in flight were sent under the old limit and carry no new news), no new request is sent
  until the server's ``Retry-After`` has passed, and sends are *paced*: a rate limit cannot be
  met by concurrency alone (one request at a time on a fast link can exceed it), so a minimum
  gap between sends is learned too, widened by half on each throttle and narrowed by 5% per
  healthy response: it settles where about one response in nine says "too many" (against a
  token bucket it widens until the 429s all but stop). A server that throttles more often than
  that whatever the pace (an unhealthy one answering 503 at random) holds the gap at
  ``GAP_MAX``: slow, never stopped. (Narrowing by 1% settled at one in forty: a server answering
  8% of requests 503 or 429 at random widened the gap without end, and a sync stood still.)
  Retries are paced like every other send.
- **Rising latency**: when the smoothed latency exceeds twice the lowest of the recent
  responses, the server is queueing our requests and more of them in flight only adds waiting,
  so the limit shrinks by a quarter, but not below ``LATENCY_FLOOR``.

Time comes from an injectable ``clock`` and ``sleep``, so tests drive it without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

INITIAL_LIMIT = 4
# Latency alone never pushes the limit below this: a few requests in flight hide the client's own
# work on each page (validation, staging) behind the network.
LATENCY_FLOOR = 4
LATENCY_TOLERANCE = 2.0  # smoothed latency above this x the recent minimum is "rising"
LATENCY_SLACK = 0.002  # seconds; jitter below this is noise, not queueing
LATENCY_SMOOTHING = 0.2  # weight of the newest response in the smoothed latency
BASELINE_WINDOW = 100  # responses over which the lowest latency is taken
THROTTLE_BACKOFF = 0.5  # limit multiplier on 429 / 503 / Retry-After
LATENCY_BACKOFF = 0.75  # limit multiplier on rising latency
GAP_WIDEN = 1.5  # send-gap multiplier on a throttle
GAP_NARROW = 0.95  # send-gap multiplier per healthy response
GAP_MIN = 0.0001  # seconds; a narrower gap is no gap
GAP_MAX = 1.0  # seconds; pacing never slows sends below one a second (Retry-After can)


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request's slot: when it was sent, and under which limit (``epoch``)."""

    sent: float
    epoch: int


class Limiter:
    """At most ``limit`` requests in flight (1 <= limit <= ``maximum``), adapted to responses.

    ``adaptive=False`` is a fixed limit of ``maximum`` with no pacing: a plain semaphore."""

    def __init__(self, maximum: int, *, adaptive: bool = True, initial: int = INITIAL_LIMIT,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.maximum = maximum
        self.adaptive = adaptive
        self.limit = float(min(maximum, initial) if adaptive else maximum)
        self.peak = self.limit
        self.in_flight = 0
        self.epoch = 0  # bumped by every decrease
        self.slow_start = True
        self.gap = 0.0  # learned minimum seconds between sends (0: unpaced)
        self.paused_until = 0.0  # no send before this instant (Retry-After)
        self.throttles = 0  # responses that said "too many"
        self._clock, self._sleep = clock, sleep
        self._next_send = 0.0
        self._last_sent: float | None = None
        self._spacing: float | None = None  # smoothed time between actual sends
        self._recent: deque[float] = deque(maxlen=BASELINE_WINDOW)
        self._smoothed: float | None = None
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def capacity(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self, *, waited: bool = False) -> Ticket:
        """Wait for a slot (and for the pause and the pacing gap), then take it. A retry that
        has just ``waited`` its own backoff (Retry-After included) is not paused again, but it
        is paced like any send: retries let through unpaced were throttled again at once, and
        each throttle widened the gap (measured: 12-58 s for 200 pages at 40 requests/s)."""
        waited_until = 0.0
        while True:
            now = self._clock()
            until = self._next_send if waited else max(self.paused_until, self._next_send)
            if now < until and waited_until < until:  # each instant waited for once
                await self._sleep(until - now)
                waited_until = until
                continue
            if self.in_flight < self.capacity:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done():
                    self._wake()  # pass on the wake-up this cancelled waiter received
                else:
                    self._waiters.remove(waiter)
                raise
        self.in_flight += 1
        if self.gap:
            self._next_send = now + self.gap
        if self._last_sent is not None:
            spacing = now - self._last_sent
            self._spacing = spacing if self._spacing is None else (
                self._spacing + LATENCY_SMOOTHING * (spacing - self._spacing))
        self._last_sent = now
        return Ticket(now, self.epoch)

    def release(self, ticket: Ticket, *, overloaded: bool = False,
                retry_after: float | None = None, healthy: bool = True) -> None:
        """Give the slot back and learn from the response: ``overloaded`` (429, 503, or a
        ``Retry-After``), ``healthy`` (a usable answer) or neither (a transport error)."""
        self.in_flight -= 1
        if self.adaptive:
            if overloaded:
                self._throttled(ticket, retry_after)
            elif healthy:
                self._healthy(ticket)
        self._wake()

    def _throttled(self, ticket: Ticket, retry_after: float | None) -> None:
        self.throttles += 1
        now = self._clock()
        if retry_after:
            self.paused_until = max(self.paused_until, now + retry_after)
        if ticket.epoch != self.epoch:
            return  # sent before the last decrease: that decrease already answered it
        self._decrease(THROTTLE_BACKOFF, floor=1)
        # The first throttle paces from the rate the sends actually went at; later ones widen
        # the gap itself (the spacing of paced sends trails a narrowing gap: widening from it
        # pushed the gap up whatever the throttle share).
        base = self.gap or self._spacing or 0.0
        self.gap = min(max(base, GAP_MIN) * GAP_WIDEN, GAP_MAX)

    def _healthy(self, ticket: Ticket) -> None:
        latency = self._clock() - ticket.sent
        self._recent.append(latency)
        s = self._smoothed
        self._smoothed = s = latency if s is None else s + LATENCY_SMOOTHING * (latency - s)
        if self.gap:
            self.gap = self.gap * GAP_NARROW if self.gap * GAP_NARROW >= GAP_MIN else 0.0
        if s > LATENCY_TOLERANCE * min(self._recent) + LATENCY_SLACK:
            if ticket.epoch == self.epoch and self.limit > LATENCY_FLOOR:
                self._decrease(LATENCY_BACKOFF, floor=LATENCY_FLOOR)
            return
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(float(self.maximum), self.limit + step)
        self.peak = max(self.peak, self.limit)

    def _decrease(self, factor: float, floor: int) -> None:
        self.limit = max(float(min(floor, self.limit)), self.limit * factor)
        self.epoch += 1
        self.slow_start = False
        self._smoothed = None  # judge the new limit by its own responses

    def _wake(self) -> None:
        free = self.capacity - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
