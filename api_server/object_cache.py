"""Objects of one small kind (Users, Roles, RoleBindings, Namespaces) held in the API server's
memory for the checks it makes on every request.

Like an informer, but inside the server: list from the registry, then follow the server's own
watch cache from the list's revision; when that stream ends (compaction, restart), list again.
`refresh()` re-lists at once, for a request that found nothing (a token of a User created a
moment ago, a RoleBinding just written), so a lookup miss never has to wait for the watch; the
re-lists it triggers are coalesced and at most one per `min_interval` seconds.
"""
from __future__ import annotations

import asyncio
import contextvars
from typing import Dict, Iterable, Optional

import structlog
from google.protobuf.message import Message

from skyshift.api import kinds
from skyshift.v1 import api_pb2

log = structlog.get_logger(__name__)

#: Backoff (seconds) before listing again after the list or the watch failed.
RETRY_INITIAL = 0.1
RETRY_MAX = 5.0


def key_of(obj: Message) -> str:
    meta = obj.metadata
    return f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name


class ObjectCache:
    def __init__(self, registry, watch_cache, kind: str, min_interval: float):
        self.registry = registry
        self.watch_cache = watch_cache
        self.kind = kinds.resolve(kind)
        self.min_interval = min_interval
        self.objects: Dict[str, Message] = {}
        #: Bumped on every change, so derived indexes know when to rebuild.
        self.version = 0
        #: Every change up to this revision is in `objects`.
        self.revision = 0
        #: Revision of the last list: watch events up to it are in the list already.
        self._listed = 0
        self.ready = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._refresh: Optional[asyncio.Task] = None
        self._refresh_started = -1e9

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # A fresh context: the cache must never run with the scope of the request that started it.
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"object-cache-{self.kind.plural}",
                                                            context=contextvars.Context())

    async def stop(self) -> None:
        for task in (self._task, self._refresh):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------------ reads

    def get(self, name: str, namespace: str = "") -> Optional[Message]:
        return self.objects.get(f"{namespace}/{name}" if namespace else name)

    def values(self) -> Iterable[Message]:
        return self.objects.values()

    async def refresh(self) -> None:
        """Re-list now (or join a re-list that started after this call), at most once per
        min_interval; returns when the cache holds every change made before the call."""
        loop = asyncio.get_running_loop()
        called = loop.time()
        while True:
            task = self._refresh
            if task is not None and not task.done():
                started_after_call = self._refresh_started >= called
                await asyncio.shield(task)
                if started_after_call:
                    return
                continue
            if self._refresh_started >= called:
                return  # one started after the call and has finished
            self._refresh = loop.create_task(self._relist_soon(), context=contextvars.Context())

    async def _relist_soon(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._refresh_started + self.min_interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self._refresh_started = loop.time()
        try:
            await self._list()
        except Exception as error:  # noqa: BLE001 - a failed refresh leaves the cache as it was
            log.warning("object_cache_refresh_failed", kind=self.kind.plural, error=str(error))

    # ------------------------------------------------------------------ list + watch

    async def _list(self) -> None:
        items, revision, _ = await self.registry.list(self.kind.plural, "", "", "", 0, "")
        if revision <= self.revision:
            return  # a newer state is in already
        self.objects = {key_of(obj): obj for obj in items}
        self.revision = self._listed = revision
        self.version += 1
        self.ready.set()

    async def _run(self) -> None:
        delay = RETRY_INITIAL
        while True:
            try:
                await self._list()
                watcher = await self.watch_cache.watch(api_pb2.WatchRequest(kind=self.kind.plural,
                                                                            resource_version=self.revision))
                try:
                    async for data in watcher.stream():
                        self._apply(api_pb2.WatchEvent.FromString(data))
                        delay = RETRY_INITIAL
                finally:
                    watcher.cache.unsubscribe(watcher)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - compaction, etcd away: list again
                log.info("object_cache_relist", kind=self.kind.plural, error=str(error), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _apply(self, event: api_pb2.WatchEvent) -> None:
        if event.resource_version <= self._listed or not event.object.WhichOneof("kind"):
            return  # a re-list already holds it (or a bookmark)
        obj = kinds.unwrap(event.object)[1]
        if event.type == api_pb2.WatchEvent.DELETED:
            self.objects.pop(key_of(obj), None)
        else:
            self.objects[key_of(obj)] = obj
        self.revision = max(self.revision, event.resource_version)
        self.version += 1
