"""Informers: a local, read-only cache of one kind's objects, kept current by list + watch.

    informers = InformerFactory(client)
    replicas = informers.informer("replicas")
    replicas.add_index(REPLICAS_BY_CLUSTER, replica_cluster)        # from skyshift.runtime.indexes
    replicas.add_handler(lambda event_type, obj, old: queue.add(obj.spec.job_name))
    informers.start()
    await replicas.wait_synced()
    replicas.get("default/train-0"); replicas.by_index(REPLICAS_BY_CLUSTER, "c1"); replicas.list()

The informer lists, then watches from the list's revision. When the watch's revision has been
compacted (GoneError), it re-lists and emits the differences (ADDED / MODIFIED / DELETED), so
handlers never miss a change; a watch that merely broke is resumed from its last revision.

Keys are "namespace/name", or "name" for cluster-scoped kinds (`key_of`).

READ-ONLY: the objects handed to handlers and returned by get/list/by_index ARE the cached
protobuf messages, shared by every reader. Never modify them; to change an object, modify a
copy (`clone(obj)`) and write that through the client.

Handlers are plain functions `fn(event_type, obj, old_obj)` called on the event loop:
event_type is "ADDED" (old_obj None), "MODIFIED" (old_obj the previous version; the same object
on a periodic resync) or "DELETED" (obj the last known version, old_obj None). They must not
block; typically they only compute keys and add them to a work queue.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import structlog
from google.protobuf.message import Message

from skyshift import config
from skyshift.api import kinds
from skyshift.api.errors import GoneError
from skyshift.client import AsyncClient
from skyshift.client import base

log = structlog.get_logger(__name__)

Handler = Callable[[str, Message, Optional[Message]], None]
IndexFunc = Callable[[Message], Iterable[str]]


def key_of(namespace: str, name: str) -> str:
    """The cache key of an object: "namespace/name", or "name" when cluster-scoped."""
    return f"{namespace}/{name}" if namespace else name


def object_key(obj: Message) -> str:
    return key_of(obj.metadata.namespace, obj.metadata.name)


def split_key(key: str) -> Tuple[str, str]:
    """(namespace, name) of a cache key; namespace is "" for cluster-scoped keys."""
    namespace, _, name = key.rpartition("/")
    return namespace, name


def clone(obj: Message) -> Message:
    """A private, modifiable copy of a (cached, read-only) object."""
    copy = type(obj)()
    copy.CopyFrom(obj)
    return copy


class Cache:
    """Objects by key plus secondary indexes. Pure bookkeeping: no I/O, not thread-safe."""

    def __init__(self) -> None:
        self._items: Dict[str, Message] = {}
        self._index_funcs: Dict[str, IndexFunc] = {}
        self._indexes: Dict[str, Dict[str, Set[str]]] = {}  # index -> value -> keys

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Optional[Message]:
        return self._items.get(key)

    def list(self) -> List[Message]:
        return list(self._items.values())

    def keys(self) -> List[str]:
        return list(self._items)

    def add_index(self, name: str, func: IndexFunc) -> None:
        if name in self._index_funcs:
            return  # made already, by another user of this cache: a name always means one index
        self._index_funcs[name] = func
        self._indexes[name] = {}
        for key, obj in self._items.items():
            self._index_one(name, key, obj)

    def by_index(self, name: str, value: str) -> List[Message]:
        keys = self._indexes[name].get(value, ())
        return [self._items[key] for key in keys]

    def index_values(self, name: str) -> List[str]:
        return list(self._indexes[name])

    def apply(self, event_type: str, obj: Message) -> Optional[Message]:
        """Record one watch event; returns the object it replaced or removed (None if new)."""
        key = object_key(obj)
        old = self._items.pop(key, None) if event_type == "DELETED" else self._items.get(key)
        if old is not None:
            self._unindex(key, old)
        if event_type != "DELETED":
            self._items[key] = obj
            for name in self._index_funcs:
                self._index_one(name, key, obj)
        return old

    def replace(self, fresh: Sequence[Message], revision: int) -> List[Tuple[str, Message, Optional[Message]]]:
        """Make the cache hold exactly `fresh` (a re-list at `revision`); returns the differences
        as (event_type, obj, old_obj), in the order they were applied."""
        events = base.relist_events(dict(self._items), fresh, revision)
        changes = []
        for event in events:
            old = self.apply(event.type, event.object)
            if event.type == "DELETED":
                changes.append((event.type, event.object, None))
            else:
                changes.append((event.type, event.object, old))
        return changes

    def _index_one(self, name: str, key: str, obj: Message) -> None:
        for value in self._index_funcs[name](obj):
            self._indexes[name].setdefault(value, set()).add(key)

    def _unindex(self, key: str, obj: Message) -> None:
        for name, func in self._index_funcs.items():
            index = self._indexes[name]
            for value in func(obj):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]


class Informer:
    """One kind's objects (optionally one namespace, filtered by selectors), cached.
    `resource_version` is the newest revision the cache reflects: every change of this kind up
    to it has been applied (bookmarks advance it while nothing changes)."""

    def __init__(self, client: AsyncClient, kind: str, namespace: Optional[str] = None,
                 label_selector: str = "", field_selector: str = "",
                 settings: Optional[config.ControllerSettings] = None):
        self.client = client
        self.kind = kinds.resolve(kind)
        self.namespace = namespace or ""
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.settings = settings or client.settings.controllers
        self.resource_version = 0
        self._cache = Cache()
        self._handlers: List[Handler] = []
        self._synced = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ reading the cache

    def get(self, key: str) -> Optional[Message]:
        """The cached object (read-only) for "namespace/name" or "name"; None if absent."""
        return self._cache.get(key)

    def list(self) -> List[Message]:
        return self._cache.list()

    def keys(self) -> List[str]:
        return self._cache.keys()

    def __len__(self) -> int:
        return len(self._cache)

    def add_index(self, name: str, func: IndexFunc) -> None:
        """Index objects by the strings `func(obj)` returns (any number per object). Controllers
        sharing this informer share its indexes: a name must always denote the same index
        (see skyshift.runtime.indexes), and adding an existing name again does nothing."""
        self._cache.add_index(name, func)

    def by_index(self, name: str, value: str) -> List[Message]:
        return self._cache.by_index(name, value)

    def index_values(self, name: str) -> List[str]:
        return self._cache.index_values(name)

    # ------------------------------------------------------------------ events

    def add_handler(self, handler: Handler) -> None:
        """Call `handler(event_type, obj, old_obj)` on every change. Added to an informer that
        already holds objects, it is first called with ADDED for each of them."""
        self._handlers.append(handler)
        for obj in self._cache.list():
            self._call(handler, "ADDED", obj, None)

    def _emit(self, event_type: str, obj: Message, old: Optional[Message]) -> None:
        for handler in self._handlers:
            self._call(handler, event_type, obj, old)

    def _call(self, handler: Handler, event_type: str, obj: Message, old: Optional[Message]) -> None:
        try:
            handler(event_type, obj, old)
        except Exception:  # one faulty handler must not stop the informer or the others
            log.exception("informer_handler_failed", kind=self.kind.plural, key=object_key(obj),
                          event_type=event_type)

    # ------------------------------------------------------------------ running

    @property
    def has_synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Return once the first list is in the cache (handlers have seen ADDED for it)."""
        await self._synced.wait()

    def start(self) -> asyncio.Task:
        """Run the informer as a task of the current event loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"informer-{self.kind.plural}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run(self) -> None:
        """List, then watch; re-list whenever the watch cannot resume. Runs until cancelled."""
        resync = asyncio.get_running_loop().create_task(self._resync_loop(), name=f"resync-{self.kind.plural}")
        try:
            await self._list_and_watch()
        finally:
            resync.cancel()

    async def _list_and_watch(self) -> None:
        backoff = self.settings.relist_backoff_initial
        relist = True
        while True:
            try:
                if relist:
                    await self._list()
                await self._watch()
                relist = False  # the stream ended cleanly: resume from the last revision
                backoff = self.settings.relist_backoff_initial
            except GoneError:
                log.info("informer_relist", kind=self.kind.plural, resource_version=self.resource_version)
                relist = True
            except Exception as error:
                log.warning("informer_error", kind=self.kind.plural, error=str(error),
                            error_type=type(error).__name__, retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.relist_backoff_max)
                relist = True

    async def _list(self) -> None:
        listed = await self.client.list_all(self.kind.plural, self.namespace, self.label_selector,
                                            self.field_selector)
        changes = self._cache.replace(listed.items, listed.resource_version)
        self.resource_version = listed.resource_version
        for event_type, obj, old in changes:
            self._emit(event_type, obj, old)
        if not self._synced.is_set():
            log.debug("informer_synced", kind=self.kind.plural, items=len(self._cache),
                      resource_version=self.resource_version)
            self._synced.set()

    async def _watch(self) -> None:
        async for event in self.client.watch(self.kind.plural, self.namespace, "", self.label_selector,
                                             self.field_selector, self.resource_version, allow_bookmarks=True):
            self.resource_version = max(self.resource_version, event.resource_version)
            if event.type == "BOOKMARK" or event.object is None:
                continue
            old = self._cache.apply(event.type, event.object)
            self._emit(event.type, event.object, None if event.type == "DELETED" else old)

    async def _resync_loop(self) -> None:
        """Every resync period, hand every cached object to the handlers again (MODIFIED with
        old_obj = obj), so level-triggered controllers re-check state that changes with time."""
        period = self.settings.resync_period
        if period <= 0:
            return
        await self._synced.wait()
        while True:
            await asyncio.sleep(period)
            for obj in self._cache.list():
                self._emit("MODIFIED", obj, obj)


class InformerFactory:
    """Shares one informer per (kind, namespace, selectors) among the controllers of a process."""

    def __init__(self, client: AsyncClient, settings: Optional[config.ControllerSettings] = None):
        self.client = client
        self.settings = settings or client.settings.controllers
        self._informers: Dict[Tuple[str, str, str, str], Informer] = {}
        self._started = False

    def informer(self, kind: str, namespace: Optional[str] = None, label_selector: str = "",
                 field_selector: str = "") -> Informer:
        key = (kinds.resolve(kind).plural, namespace or "", label_selector, field_selector)
        informer = self._informers.get(key)
        if informer is None:
            informer = Informer(self.client, kind, namespace, label_selector, field_selector, self.settings)
            self._informers[key] = informer
            if self._started:
                informer.start()
        return informer

    def start(self) -> None:
        """Start every informer made so far, and any made later (idempotent)."""
        self._started = True
        for informer in self._informers.values():
            informer.start()

    async def stop(self) -> None:
        self._started = False
        await asyncio.gather(*(informer.stop() for informer in self._informers.values()))
