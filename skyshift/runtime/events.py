"""EventRecorder: human-readable Event objects about what happened to an object.

    events = EventRecorder(client, source="job-controller")
    events.record(job, "Normal", "ReplicaCreated", "created replica train-0")
    ...
    await events.close()     # writes what is still buffered (bounded by a timeout)

`record` never blocks and never fails the caller: events are buffered and written by a
background task, best effort (a full buffer drops new events with a warning log). Repeats of
the same event (same object, type, reason and message) update one Event object, counting them
and moving last_time, instead of creating new ones. Events of cluster-scoped objects go to the
"default" namespace.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Deque, Optional

import structlog
from google.protobuf.message import Message

from skyshift import config
from skyshift.api import kinds
from skyshift.api.errors import AlreadyExistsError, ConflictError, NotFoundError, SkyShiftError
from skyshift.client import AsyncClient
from skyshift.api.conditions import now
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

NORMAL, WARNING = "Normal", "Warning"
#: Attempts to bump an existing Event's count when it keeps changing under us.
_UPDATE_ATTEMPTS = 3
#: Most events written in one BatchCreate.
_BATCH = 500


def event_name(kind: str, namespace: str, name: str, uid: str, type_: str, reason: str, message: str) -> str:
    """A deterministic name per distinct event, so repeats land on the same Event object."""
    digest = hashlib.sha1("\0".join((kind, namespace, name, uid, type_, reason, message)).encode()).hexdigest()
    return f"{name[:40].rstrip('-')}-{digest[:16]}"


class EventRecorder:
    def __init__(self, client: AsyncClient, source: str, settings: Optional[config.ControllerSettings] = None):
        self.client = client
        self.source = source
        self.settings = settings or client.settings.controllers
        self._pending: Deque[pb.Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._idle = asyncio.Event()  # nothing buffered and nothing being written
        self._idle.set()

    def record(self, obj: Message, type_: str, reason: str, message: str) -> None:
        """Buffer an event about `obj` (any object kind); call from the event loop."""
        if len(self._pending) >= self.settings.event_queue_size:
            log.warning("event_dropped", reason=reason, name=obj.metadata.name)
            return
        kind = kinds.kind_of(obj).name
        meta = obj.metadata
        event = pb.Event()
        event.metadata.namespace = meta.namespace or kinds.DEFAULT_NAMESPACE
        event.metadata.name = event_name(kind, meta.namespace, meta.name, meta.uid, type_, reason, message)
        spec = event.spec
        spec.involved_kind, spec.involved_name, spec.involved_uid = kind, meta.name, meta.uid
        spec.type, spec.reason, spec.message, spec.source = type_, reason, message, self.source
        spec.count = 1
        spec.first_time.CopyFrom(now())
        spec.last_time.CopyFrom(spec.first_time)
        self._pending.append(event)
        self._idle.clear()
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write_loop(), name=f"events-{self.source}")

    async def flush(self) -> None:
        """Wait until everything recorded so far has been written (or given up on)."""
        await self._idle.wait()

    async def close(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except asyncio.TimeoutError:
            log.warning("events_not_written", count=len(self._pending))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _write_loop(self) -> None:
        while True:
            while not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            # Whatever piled up goes in one BatchCreate: bursts (a scheduler placing thousands of
            # replicas) cost one call per batch instead of one per event.
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), _BATCH))]
            try:
                results = await self.client.batch_create(batch)
            except SkyShiftError as error:
                log.warning("event_write_failed", count=len(batch), error=error.message)
                continue
            for event, result in zip(batch, results):
                error = result.error
                if isinstance(error, AlreadyExistsError):
                    try:
                        await self._count_repeat(event)
                        continue
                    except SkyShiftError as repeat_error:
                        error = repeat_error
                if error is not None:
                    log.warning("event_write_failed", event=event.metadata.name, reason=event.spec.reason,
                                error=error.message)

    async def _count_repeat(self, event: pb.Event) -> None:
        """The same event happened again: bump the existing Event's count and last_time."""
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                existing = await self.client.get("events", event.metadata.name, event.metadata.namespace)
            except NotFoundError:  # expired between our create and get: record it afresh
                await self.client.create(event)
                return
            existing.spec.count += 1
            # Repeats written in one batch race each other: a later one may have created the Event.
            spec = existing.spec
            if event.spec.last_time.ToNanoseconds() > spec.last_time.ToNanoseconds():
                spec.last_time.CopyFrom(event.spec.last_time)
            if event.spec.first_time.ToNanoseconds() < spec.first_time.ToNanoseconds():
                spec.first_time.CopyFrom(event.spec.first_time)
            try:
                await self.client.update(existing)
                return
            except ConflictError:
                continue
        log.debug("event_count_not_updated", event=event.metadata.name)
