"""Small helpers shared by the tests/integration/test_api_*.py modules."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, List

from skyshift.client.base import WatchEvent
from skyshift.v1 import objects_pb2 as pb


def new_job(name: str, namespace: str, run: str = "true", labels=None, finalizers=()) -> pb.Job:
    job = pb.Job()
    job.metadata.name = name
    job.metadata.namespace = namespace
    job.metadata.labels.update(labels or {})
    job.metadata.finalizers.extend(finalizers)
    job.spec.run = run
    return job


def new_namespace(name: str) -> pb.Namespace:
    namespace = pb.Namespace()
    namespace.metadata.name = name
    return namespace


def store_revision(client) -> int:
    """The store's current revision (a List answers with it), to prove nothing was written."""
    return client.list("namespaces", limit=1).resource_version


async def next_event(stream: AsyncIterator[WatchEvent], timeout: float = 10.0) -> WatchEvent:
    return await asyncio.wait_for(stream.__anext__(), timeout)


async def events_until(stream: AsyncIterator[WatchEvent], done: Callable[[WatchEvent], bool],
                       timeout: float = 10.0) -> List[WatchEvent]:
    """Every event up to and including the first one for which `done` is true."""
    events: List[WatchEvent] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        event = await next_event(stream, max(0.0, deadline - loop.time()))
        events.append(event)
        if done(event):
            return events


async def _evaluate(server, read):
    return read(server.server)


def server_state(server, read):
    """`read(api_server)` evaluated on a ServerThread's own loop, to inspect its state."""
    return server.run(_evaluate(server, read))


async def async_server_state(server, read):
    """`server_state` for async tests (it does not block the test's loop)."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_evaluate(server, read), server.loop))


def watcher_count(server) -> int:
    """Client watch streams open on a ServerThread."""
    return server_state(server, lambda api: api.watch_cache.watcher_count)


def names(objects) -> List[str]:
    return sorted(obj.metadata.name for obj in objects)
