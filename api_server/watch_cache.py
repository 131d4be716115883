"""Watch fan-out: one etcd watch per kind, shared by every client stream of that kind.

Each kind's cache keeps the last `cache_events_per_kind` events, so a client resuming from a
recent revision is served from memory; older revisions get OUT_OF_RANGE (re-list). A client
stream is a bounded queue: a client that falls too far behind is cut off with UNAVAILABLE and
resumes from its last revision. A client that goes away leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator, Deque, Dict, List, Optional, Set

import structlog
from google.protobuf.message import Message

from skyshift.api import kinds, validation
from skyshift.api.errors import GoneError, InvalidError, UnavailableError
from skyshift.api.selectors import FieldSelector, LabelSelector
from skyshift.config import WatchSettings
from skyshift.store.etcd import Change, Store, kind_prefix, split_key
from skyshift.v1 import api_pb2

from api_server import context as request_context

log = structlog.get_logger(__name__)

ADDED, MODIFIED, DELETED, BOOKMARK = (api_pb2.WatchEvent.ADDED, api_pb2.WatchEvent.MODIFIED,
                                      api_pb2.WatchEvent.DELETED, api_pb2.WatchEvent.BOOKMARK)


class CachedEvent:
    """One change of one object; decoded and serialized lazily, at most once each."""

    __slots__ = ("kind", "change", "namespace", "name", "_object", "_previous", "_encoded")

    def __init__(self, kind: kinds.Kind, change: Change):
        self.kind = kind
        self.change = change
        _, namespace, self.name = split_key(change.key)
        self.namespace = "" if namespace == kinds.CLUSTER_SCOPE else namespace
        self._object: Optional[Message] = None
        self._previous: Optional[Message] = None
        self._encoded: Dict[int, bytes] = {}

    @property
    def revision(self) -> int:
        return self.change.mod_revision

    @property
    def object(self) -> Message:
        """The object after the change; for a delete, its last state."""
        if self._object is None:
            data = self.change.prev_value if self.change.deleted else self.change.value
            self._object = self.kind.message.FromString(data)
            self._object.metadata.resource_version = self.change.mod_revision
        return self._object

    @property
    def previous(self) -> Optional[Message]:
        """The object before the change (None when it was created)."""
        if self.change.deleted or not self.change.prev_value:
            return None
        if self._previous is None:
            self._previous = self.kind.message.FromString(self.change.prev_value)
        return self._previous

    def type(self) -> int:
        if self.change.deleted:
            return DELETED
        return ADDED if self.change.create_revision == self.change.mod_revision else MODIFIED

    def encoded(self, event_type: int) -> bytes:
        """The serialized WatchEvent, shared by every stream that sends it."""
        data = self._encoded.get(event_type)
        if data is None:
            event = api_pb2.WatchEvent(type=event_type, resource_version=self.revision)
            getattr(event.object, self.kind.field).CopyFrom(self.object)
            data = self._encoded[event_type] = event.SerializeToString()
        return data


class Watcher:
    """One client stream."""

    def __init__(self, cache: "KindCache", request: api_pb2.WatchRequest, settings: WatchSettings):
        self.cache = cache
        self.namespace = request.namespace
        self.name = request.name
        self.labels = LabelSelector.parse(request.label_selector)
        self.fields = FieldSelector.parse(request.field_selector, cache.kind.message.DESCRIPTOR)
        #: The objects the caller may see (api_server/context.py); None: all.
        self.visible = request_context.visibility()
        self.filtering = not self.labels.empty() or not self.fields.empty() or self.visible is not None
        self.allow_bookmarks = request.allow_bookmarks
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=settings.client_queue_events)
        self.bookmark_interval = settings.bookmark_interval
        #: Replayed history, sent before anything from `queue`.
        self.backlog: Deque[bytes] = collections.deque()
        #: Events at or before this revision are already known to the client.
        self.revision = 0
        self.error: Optional[Exception] = None

    def _selected(self, obj: Optional[Message]) -> bool:
        return (obj is not None and self.labels.matches(obj.metadata.labels) and self.fields.matches(obj)
                and (self.visible is None or self.visible(obj)))

    def event_type(self, event: CachedEvent) -> Optional[int]:
        """The type this stream sees the event as, or None if it does not see it. With
        selectors, an object that starts matching is ADDED and one that stops is DELETED."""
        # Live events are routed by namespace already; replayed history is not.
        if (self.namespace and event.namespace != self.namespace) or (self.name and event.name != self.name):
            return None
        if not self.filtering:
            return event.type()
        kind = event.type()
        if kind == DELETED:
            return DELETED if self._selected(event.object) else None
        now = self._selected(event.object)
        before = kind == MODIFIED and self._selected(event.previous)
        if now:
            return MODIFIED if before else ADDED
        return DELETED if before else None

    def replay(self, events: List[CachedEvent]) -> None:
        """Queue the cached history a stream starts with. It is not bounded by the live queue:
        a client resuming far behind must be able to catch up, or it would be cut off at once,
        resume from the same revision, and never make progress."""
        for event in events:
            event_type = self.event_type(event) if event.revision > self.revision else None
            if event_type is not None:
                self.backlog.append(event.encoded(event_type))

    def offer(self, event: CachedEvent) -> None:
        if event.revision <= self.revision:
            return
        event_type = self.event_type(event)
        if event_type is None:
            return
        try:
            self.queue.put_nowait(event.encoded(event_type))
        except asyncio.QueueFull:
            self.fail(UnavailableError(f"watch fell behind by more than {self.queue.maxsize} events: resume from "
                                       "your last resource_version"))

    def fail(self, error: Exception) -> None:
        """End the stream with `error` once what is queued has been sent."""
        if self.error is not None:
            return
        self.error = error
        self.cache.unsubscribe(self)
        if not self.queue.full():
            self.queue.put_nowait(None)  # wake the stream; a full queue wakes it anyway

    async def stream(self) -> AsyncIterator[bytes]:
        while self.backlog:
            yield self.backlog.popleft()
        last_bookmark = self.revision
        while True:
            if self.error is not None and self.queue.empty():
                raise self.error
            try:
                timeout = self.bookmark_interval if self.allow_bookmarks else None
                item = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
            except asyncio.TimeoutError:
                if self.cache.current > last_bookmark:
                    last_bookmark = self.cache.current
                    yield api_pb2.WatchEvent(type=BOOKMARK, resource_version=last_bookmark).SerializeToString()
                continue
            if item is None:
                continue
            yield item


class KindCache:
    """The recent history of one kind and the streams watching it."""

    def __init__(self, store: Store, kind: kinds.Kind, settings: WatchSettings):
        self.store = store
        self.kind = kind
        self.settings = settings
        self.events: Deque[CachedEvent] = collections.deque()
        #: Streams may start from any revision >= oldest.
        self.oldest = 0
        #: Every change up to this revision has been received.
        self.current = 0
        self.all_namespaces: Set[Watcher] = set()
        self.by_namespace: Dict[str, Set[Watcher]] = collections.defaultdict(set)
        self.ready = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch-cache-{self.kind.plural}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for watcher in list(self.watchers()):
            watcher.fail(UnavailableError("the API server is shutting down"))

    def watchers(self):
        yield from self.all_namespaces
        for group in self.by_namespace.values():
            yield from group

    @property
    def watcher_count(self) -> int:
        return len(self.all_namespaces) + sum(len(g) for g in self.by_namespace.values())

    async def _run(self) -> None:
        delay = self.settings.restart_backoff_initial
        start = 0
        while True:
            # Replaying from the initial revision and no change received yet. (Not `ready`: etcd
            # 3.5.1 answers progress requests before the replay, and even before the compaction error.)
            replaying = start == 0
            try:
                if start == 0:
                    start = await self._initial_revision()
                async for revision, changes in self.store.watch(kind_prefix(self.kind.plural), start,
                                                                self.settings.progress_interval):
                    self._apply(revision, changes)
                    replaying = replaying and not changes
                    # Resume after the last change received, not after `current`: a progress
                    # notification may run ahead of changes still being replayed.
                    start = (self.events[-1].revision if self.events else self.oldest) + 1
                    delay = self.settings.restart_backoff_initial
            except GoneError as error:
                compacted = getattr(error, "compact_revision", 0)
                if replaying and compacted:
                    # The history we hoped to replay is partly compacted: start at what is left.
                    start = compacted
                    self._forget_before(start - 1)
                    continue
                # We were away so long that etcd compacted what we missed: every stream must re-list.
                log.warning("watch_cache_compacted", kind=self.kind.plural, error=str(error))
                self._reset(GoneError(f"watch cache for {self.kind.plural} restarted after compaction: re-list"))
                start = 0
            except UnavailableError as error:
                log.warning("watch_cache_etcd_unavailable", kind=self.kind.plural, error=str(error), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.restart_backoff_max)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the cache for good
                log.exception("watch_cache_failed", kind=self.kind.plural)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.restart_backoff_max)

    async def _initial_revision(self) -> int:
        """Start far enough back to serve watches resuming from before this server started
        (e.g. informers after a restart), but not before etcd's compaction point."""
        current = await self.store.revision()
        start = max(1, current - self.settings.cache_events_per_kind)
        self.oldest = self.current = start - 1
        # Events from `start` to `current` replay from etcd; streams wait until they are in.
        self._catch_up_to = current
        return start

    def _forget_before(self, revision: int) -> None:
        """History up to `revision` is compacted: streams that wanted older events must re-list."""
        self.oldest = self.current = revision
        for watcher in list(self.watchers()):
            if watcher.revision < revision:
                watcher.fail(GoneError(f"resource_version {watcher.revision} is compacted: re-list"))

    def _reset(self, error: Exception) -> None:
        for watcher in list(self.watchers()):
            watcher.fail(error)
        self.events.clear()
        self.oldest = 0
        self.current = 0
        self.ready.clear()

    def _apply(self, revision: int, changes) -> None:
        for change in changes:
            event = CachedEvent(self.kind, change)
            self.events.append(event)
            self._dispatch(event)
        while len(self.events) > self.settings.cache_events_per_kind:
            self.oldest = self.events.popleft().revision
        self.current = max(self.current, revision)
        if not self.ready.is_set() and self.current >= self._catch_up_to:
            self.ready.set()

    def _dispatch(self, event: CachedEvent) -> None:
        for watcher in list(self.all_namespaces):
            watcher.offer(event)
        for watcher in list(self.by_namespace.get(event.namespace, ())):
            watcher.offer(event)

    async def subscribe(self, request: api_pb2.WatchRequest, from_revision: int) -> Watcher:
        """A stream of the events after `from_revision`, replayed from memory then live."""
        watcher = Watcher(self, request, self.settings)
        watcher.revision = from_revision
        await self.ready.wait()
        if from_revision < self.oldest:
            raise GoneError(f"resource_version {from_revision} is too old (the oldest available is {self.oldest}): "
                            "re-list and watch from the list's resource_version")
        # No await between replay and registration: no event can slip between them.
        watcher.replay(self._events_after(from_revision))
        (self.by_namespace[watcher.namespace] if watcher.namespace else self.all_namespaces).add(watcher)
        return watcher

    def _events_after(self, revision: int) -> List[CachedEvent]:
        newer: List[CachedEvent] = []
        for event in reversed(self.events):
            if event.revision <= revision:
                break
            newer.append(event)
        newer.reverse()
        return newer

    def unsubscribe(self, watcher: Watcher) -> None:
        if watcher.namespace:
            group = self.by_namespace.get(watcher.namespace)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self.by_namespace[watcher.namespace]
        else:
            self.all_namespaces.discard(watcher)


class WatchCache:
    """The caches of every kind; started with the server."""

    def __init__(self, store: Store, settings: WatchSettings):
        self.store = store
        self.caches = {kind.plural: KindCache(store, kind, settings) for kind in kinds.all_kinds()}

    def start(self) -> None:
        for cache in self.caches.values():
            cache.start()

    async def stop(self) -> None:
        await asyncio.gather(*(cache.stop() for cache in self.caches.values()))

    @property
    def etcd_watch_count(self) -> int:
        return sum(1 for cache in self.caches.values() if cache._task is not None and not cache._task.done())

    @property
    def watcher_count(self) -> int:
        return sum(cache.watcher_count for cache in self.caches.values())

    async def watch(self, request: api_pb2.WatchRequest) -> Watcher:
        kind = kinds.resolve(request.kind)
        if request.namespace and not kind.namespaced:
            raise InvalidError("namespace", f"{kind.name} is cluster-scoped and has no namespace")
        validation.check_name(request.namespace, "namespace", required=False)
        validation.check_name(request.name, "name", required=False)
        if request.resource_version < 0:
            raise InvalidError("resource_version", "must not be negative")
        revision = request.resource_version or await self.store.revision()
        return await self.caches[kind.plural].subscribe(request, revision)
