"""An asyncio work queue for controllers (client-go's rate-limited delaying queue).

* A key waiting in the queue is held once, however many times it is added.
* A key being processed is never handed to a second worker: if it is added meanwhile, it is
  queued again when the worker calls `done(key)`.
* `add_rate_limited(key)` re-adds after the larger of the key's exponential backoff
  (initial * 2**failures, capped) and the wait imposed by one token bucket shared by all keys;
  `forget(key)` resets the key's failures after a success.
* `add_after(key, delay)` re-adds later; a key waiting for several delays keeps the earliest.

Typical worker:

    while (key := await queue.get()) is not None:
        try:
            ...
            queue.forget(key)
        except Exception:
            queue.add_rate_limited(key)
        finally:
            queue.done(key)
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable, Deque, Dict, Hashable, Optional, Set, Tuple


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. `reserve()` takes one token and says
    how long the caller must wait for it (tokens may be owed, so waits grow under load)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def reserve(self) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class ExponentialBackoff:
    """Per-key delays: initial, 2*initial, 4*initial... up to `maximum`, until `forget(key)`."""

    def __init__(self, initial: float, maximum: float):
        self.initial = initial
        self.maximum = maximum
        self._failures: Dict[Hashable, int] = {}

    def next_delay(self, key: Hashable) -> float:
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        # Cap the exponent too, so a key failing for days cannot overflow the float.
        return min(self.maximum, self.initial * (2 ** min(failures, 62)))

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)


class WorkQueue:
    def __init__(self, name: str = "", backoff_initial: float = 0.005, backoff_max: float = 60.0,
                 rate: float = 50.0, burst: int = 500):
        self.name = name
        self._queue: Deque[Hashable] = collections.deque()
        self._dirty: Set[Hashable] = set()        # waiting to be handed out (in _queue or re-add on done)
        self._processing: Set[Hashable] = set()   # handed to a worker, not yet done
        self._waiting: Dict[Hashable, Tuple[float, asyncio.TimerHandle]] = {}  # add_after: key -> (when, timer)
        self._has_items = asyncio.Event()
        self._shutting_down = False
        self._backoff = ExponentialBackoff(backoff_initial, backoff_max)
        self._bucket = TokenBucket(rate, burst)

    def __len__(self) -> int:
        """Keys ready to be handed out (not those processing or waiting for a delay)."""
        return len(self._queue)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def add(self, key: Hashable) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done(key)
        self._queue.append(key)
        self._has_items.set()

    def add_after(self, key: Hashable, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        current = self._waiting.get(key)
        if current is not None:
            if current[0] <= when:
                return
            current[1].cancel()
        self._waiting[key] = (when, loop.call_at(when, self._delay_elapsed, key))

    def _delay_elapsed(self, key: Hashable) -> None:
        self._waiting.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: Hashable) -> None:
        self.add_after(key, max(self._backoff.next_delay(key), self._bucket.reserve()))

    def forget(self, key: Hashable) -> None:
        """The key succeeded: its next failure starts the backoff from the beginning again."""
        self._backoff.forget(key)

    def num_requeues(self, key: Hashable) -> int:
        return self._backoff.failures(key)

    async def get(self) -> Optional[Hashable]:
        """The next key, marked as processing until `done(key)`; None once shut down."""
        while not self._queue:
            if self._shutting_down:
                return None
            self._has_items.clear()
            await self._has_items.wait()
        if self._shutting_down:
            return None
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._queue.append(key)
            self._has_items.set()

    def shutdown(self) -> None:
        """Drop every pending key and wake all workers: `get()` returns None from now on."""
        self._shutting_down = True
        for _, timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()
        self._queue.clear()
        self._dirty.clear()
        self._has_items.set()
