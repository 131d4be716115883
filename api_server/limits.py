"""Fairness between users: a token bucket of requests per user, a bound on each user's requests
in flight and on their concurrent watches, and on the items one List returns
(settings.limits). A refused request fails with RESOURCE_EXHAUSTED and says when to retry,
before it costs the server more than a dictionary lookup; one over the rate is refused after
waiting out its retry hint (at most limits.refusal_delay_max, holding one of the user's
requests-in-flight slots), so a client that retries in a tight loop slows down by itself
instead of keeping the server busy refusing it.

System identities (the manager, skylets) are exempt when `limits.exempt_system` is set: they
act for everyone, and throttling them would slow every user's work.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Tuple

from skyshift.api.errors import LimitError
from skyshift.config import LimitSettings

from api_server.auth import Identity


class TokenBucket:
    """`rate` requests per second with bursts of `burst`. A request over the rate still takes a
    token, down to one second's worth of debt: a client that keeps sending while refused is
    told to wait longer each time, until it backs off; one that waits as told is admitted."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """0 when a request may go now, else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        admitted = self.tokens >= 1
        self.tokens = max(-self.rate, self.tokens - 1)
        return 0.0 if admitted else (1 - self.tokens) / self.rate


class _Slot:
    """One of a user's `bound` slots, held by a `with` block; LimitError when all are taken."""

    __slots__ = ("counts", "user", "bound", "what")

    def __init__(self, counts: Dict[str, int], user: str, bound: int, what: str):
        self.counts, self.user, self.bound, self.what = counts, user, bound, what

    def __enter__(self) -> None:
        held = self.counts.get(self.user, 0)
        if held >= self.bound:
            raise LimitError(f"user {self.user} already has {self.bound} {self.what}: retry after one of them ends")
        self.counts[self.user] = held + 1

    def __exit__(self, *exc) -> None:
        left = self.counts[self.user] - 1
        if left:
            self.counts[self.user] = left
        else:
            del self.counts[self.user]


class Limits:
    def __init__(self, settings: LimitSettings):
        self.settings = settings
        self._buckets: Dict[str, TokenBucket] = {}
        self._in_flight: Dict[str, int] = {}
        self._watches: Dict[str, int] = {}

    def _limited(self, identity: Identity) -> bool:
        return not (self.settings.exempt_system and identity.system)

    def admit(self, identity: Identity) -> float:
        """Count one request against the caller's rate: 0 when it may go, else the seconds
        until it may (see over_rate)."""
        if not self._limited(identity) or self.settings.requests_per_second <= 0:
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.get(identity.user)
        if bucket is None:
            bucket = self._buckets[identity.user] = TokenBucket(self.settings.requests_per_second,
                                                                max(1, self.settings.request_burst), now)
        return bucket.take(now)

    def over_rate(self, identity: Identity, wait: float) -> LimitError:
        return LimitError(f"user {identity.user} is over the rate limit of {self.settings.requests_per_second:g} "
                          f"requests/s: retry after {max(wait, 0.001):.3f}s")

    def _slot(self, counts: Dict[str, int], identity: Identity, bound: int, what: str):
        if not self._limited(identity) or bound <= 0:
            return contextlib.nullcontext()
        return _Slot(counts, identity.user, bound, what)

    def in_flight(self, identity: Identity):
        """A context holding one of the caller's `max_in_flight` request slots."""
        return self._slot(self._in_flight, identity, self.settings.max_in_flight, "requests in flight")

    def watch(self, identity: Identity):
        """A context holding one of the caller's `max_watches` watch slots."""
        return self._slot(self._watches, identity, self.settings.max_watches, "watches open")

    def check_list_limit(self, identity: Identity, limit: int) -> int:
        """The cap on the items of a List with this `limit` (0: none); LimitError when the
        request asks for more than a page may hold."""
        bound = self.settings.max_list_items if self._limited(identity) else 0
        if bound and limit > bound:
            raise LimitError(f"limit {limit} is above the most items one list may return ({bound}): "
                             f"retry with limit <= {bound} and follow continue_token")
        return bound

    def usage(self) -> Tuple[int, int]:
        """(requests in flight, watches open) counted against users (for tests and metrics)."""
        return sum(self._in_flight.values()), sum(self._watches.values())
