"""WorkQueue: de-duplication, one worker per key, per-key backoff, the global token bucket."""
from __future__ import annotations

import asyncio

import pytest

from skyshift.runtime.workqueue import ExponentialBackoff, TokenBucket, WorkQueue


async def get_now(queue: WorkQueue, timeout: float = 1.0):
    return await asyncio.wait_for(queue.get(), timeout)


async def test_keys_added_many_times_are_handed_out_once():
    queue = WorkQueue()
    for key in ["a", "b", "a", "a", "c", "b"]:
        queue.add(key)
    assert len(queue) == 3
    assert [await get_now(queue) for _ in range(3)] == ["a", "b", "c"]
    assert len(queue) == 0


async def test_a_key_being_processed_is_not_given_to_a_second_worker():
    queue = WorkQueue()
    queue.add("a")
    assert await get_now(queue) == "a"
    queue.add("a")  # changed while a worker holds it
    queue.add("b")
    assert len(queue) == 1
    assert await get_now(queue) == "b"
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0.01)
    assert not second.done(), "the re-added key must wait for done()"
    queue.done("a")
    assert await asyncio.wait_for(second, 1) == "a"


async def test_done_without_re_add_drops_the_key():
    queue = WorkQueue()
    queue.add("a")
    await get_now(queue)
    queue.done("a")
    assert len(queue) == 0
    queue.add("a")
    assert await get_now(queue) == "a"


async def test_concurrent_workers_never_process_one_key_at_once():
    queue = WorkQueue()
    active = set()
    processed = []
    overlaps = []

    async def worker():
        while (key := await queue.get()) is not None:
            if key in active:
                overlaps.append(key)
            active.add(key)
            await asyncio.sleep(0.001)
            processed.append(key)
            active.discard(key)
            queue.done(key)

    workers = [asyncio.ensure_future(worker()) for _ in range(8)]
    for round_ in range(50):
        for key in ("a", "b", "c"):
            queue.add(key)
        await asyncio.sleep(0)
    while len(queue) or active:
        await asyncio.sleep(0.005)
    queue.shutdown()
    await asyncio.wait_for(asyncio.gather(*workers), 1)
    assert overlaps == []
    assert set(processed) == {"a", "b", "c"}


async def test_backoff_grows_exponentially_up_to_the_cap_and_forget_resets_it():
    backoff = ExponentialBackoff(initial=0.01, maximum=0.1)
    assert [backoff.next_delay("k") for _ in range(6)] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.1])
    assert backoff.failures("k") == 6
    assert backoff.next_delay("other") == pytest.approx(0.01)
    backoff.forget("k")
    assert backoff.next_delay("k") == pytest.approx(0.01)


async def test_add_rate_limited_waits_for_the_keys_backoff():
    queue = WorkQueue(backoff_initial=0.05, backoff_max=1.0, rate=0)
    loop = asyncio.get_running_loop()
    delays = []
    for _ in range(3):
        started = loop.time()
        queue.add_rate_limited("k")
        key = await get_now(queue)
        delays.append(loop.time() - started)
        queue.done(key)
    assert queue.num_requeues("k") == 3
    assert delays[0] >= 0.045 and delays[1] >= 0.095 and delays[2] >= 0.195
    queue.forget("k")
    assert queue.num_requeues("k") == 0


async def test_add_after_keeps_the_earliest_time_and_delivers_once():
    queue = WorkQueue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    queue.add_after("k", 5)
    queue.add_after("k", 0.05)
    queue.add_after("k", 3)
    assert await get_now(queue) == "k"
    assert 0.04 <= loop.time() - started < 1
    queue.done("k")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(queue.get(), 0.1)


def test_token_bucket_allows_a_burst_then_spaces_keys_at_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    now[0] = 10.0  # refills, but never beyond the burst
    assert [bucket.reserve() for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])


async def test_the_global_rate_limit_applies_across_keys():
    queue = WorkQueue(backoff_initial=0.001, rate=20, burst=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for key in "abcd":
        queue.add_rate_limited(key)
    arrivals = []
    for _ in range(4):
        await get_now(queue)
        arrivals.append(loop.time() - started)
    # Two keys pass at once (the burst), then one every 1/20 s.
    assert arrivals[1] < 0.04
    assert arrivals[2] >= 0.045 and arrivals[3] >= 0.095


async def test_shutdown_wakes_workers_and_drops_pending_keys():
    queue = WorkQueue()
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.add_after("later", 0.01)
    queue.shutdown()
    assert await asyncio.wait_for(waiting, 1) is None
    queue.add("a")
    assert await get_now(queue) is None
    assert len(queue) == 0
