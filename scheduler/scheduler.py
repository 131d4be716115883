"""The Scheduler controller: binds pending Replicas to a cluster and node, in batches.

Informers follow Clusters, Replicas, FilterPolicies and Jobs. A Replica is pending while its
spec.cluster is empty; its key is queued. Each worker drains up to `batch_size` keys, decides
them together (scheduler.framework, holding capacity in the ledger), and binds the placed ones
with one BatchUpdate (spec.cluster and spec.node, compare-and-swap on resource_version); the
API server marks a Replica SCHEDULED in that same write. Every item of a batch succeeds or fails alone: a
conflict re-queues that replica only, with backoff.

A replica that fits nowhere stays PENDING with the condition Scheduled=False, reason
Unschedulable and each cluster's reason in the message; it is tried again shortly after any
change that may make room (a cluster's phase, labels, capabilities or capacity, a FilterPolicy,
a replica finishing), and every `unschedulable_retry_period` regardless.

Several batches may be in flight: deciding is synchronous (no await), so two batches never
decide at once, and the ledger already holds what the earlier, still-binding batches took.
"""
from __future__ import annotations

import asyncio
import time
from typing import Dict, List, Optional, Set, Tuple

import structlog

from skyshift import config
from skyshift.api.errors import ConflictError, NotFoundError, SkyShiftError
from skyshift.api import conditions
from skyshift.client import AsyncClient
from skyshift.runtime import Controller, EventRecorder, InformerFactory, clone, object_key
from skyshift.runtime.events import NORMAL, WARNING
from skyshift.runtime.indexes import REPLICAS_BY_JOB, replica_job
from skyshift.v1 import objects_pb2 as pb

from scheduler.capacity import FINISHED_PHASES, IN_FLIGHT, CapacityLedger
from scheduler.framework import Decision, default_framework
from scheduler.plugins import PolicyMatcher, Request, State

log = structlog.get_logger(__name__)

CONDITION = "Scheduled"
REASON_SCHEDULED = "Scheduled"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_WAITING_FOR_GANG = "WaitingForGang"
EVENT_FAILED = "FailedScheduling"
#: Status phases of a replica that nothing has acted on yet.
UNSTARTED_PHASES = ("", "PENDING")


def is_pending(replica: pb.Replica) -> bool:
    """Waiting for the scheduler: not bound, not started, not being deleted."""
    return (not replica.spec.cluster and replica.status.phase in UNSTARTED_PHASES
            and not replica.metadata.HasField("deletion_timestamp"))


def job_key(replica: pb.Replica) -> str:
    """The cache key of the replica's Job."""
    (key,) = replica_job(replica)
    return key


def _placement_view(cluster: pb.Cluster) -> Tuple:
    """What the static filters look at: a change may make room for unschedulable replicas."""
    return (cluster.status.phase, sorted(cluster.metadata.labels.items()), sorted(cluster.status.capabilities))


class Scheduler(Controller):
    name = "scheduler"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None, recorder: Optional[EventRecorder] = None):
        super().__init__(client, informers, settings)
        self.config = self.settings.scheduler
        self.workers = max(1, self.config.parallel_batches)
        self.events = recorder or EventRecorder(client, source="scheduler", settings=self.settings.controllers)
        self.ledger = CapacityLedger()
        self.framework = default_framework({"Preferences": self.config.weight_preferences,
                                            "Spread": self.config.weight_spread,
                                            "LeastAllocated": self.config.weight_least_allocated})
        self.clusters = self.informer("clusters")
        self.replicas = self.informer("replicas")
        self.policies = self.informer("filterpolicies")
        self.jobs = self.informer("jobs")
        self.replicas.add_index(REPLICAS_BY_JOB, replica_job)
        self._unschedulable: Set[str] = set()
        #: key -> resource_version of this scheduler's latest write of that replica (IN_FLIGHT while
        #: the write is pending): cached versions older than it are stale, and the event of that
        #: version is the echo of our own write; neither needs any action.
        self._written: Dict[str, int] = {}
        self._retry_timer: Optional[asyncio.TimerHandle] = None
        self._matchers: Optional[Dict[str, List[PolicyMatcher]]] = None
        self.clusters.add_handler(self._on_cluster)
        self.replicas.add_handler(self._on_replica)
        self.policies.add_handler(self._on_policy)
        self.jobs.add_handler(self._on_job)

    # ------------------------------------------------------------------ informer handlers

    def _on_cluster(self, event_type: str, cluster: pb.Cluster, old: Optional[pb.Cluster]) -> None:
        if event_type == "DELETED":
            self.ledger.remove_cluster(cluster.metadata.name)
            return
        capacity_changed = self.ledger.update_cluster(cluster)
        if capacity_changed or old is None or old is cluster or _placement_view(old) != _placement_view(cluster):
            self._retry_unschedulable_soon()

    def _on_replica(self, event_type: str, replica: pb.Replica, old: Optional[pb.Replica]) -> None:
        key = object_key(replica)
        if event_type == "DELETED":
            self._unschedulable.discard(key)
            self._written.pop(key, None)
            freed = self.ledger.observe_deleted(replica)
        else:
            freed = self.ledger.observe(replica)
            if not self._known_to_us(key, replica.metadata.resource_version):
                if is_pending(replica):
                    self.queue.add(key)
                else:
                    self._unschedulable.discard(key)
        if freed:
            self._retry_unschedulable_soon()

    def _known_to_us(self, key: str, revision: int) -> bool:
        """Whether this version of the replica is one this scheduler wrote, or older than one."""
        written = self._written.get(key)
        if written is None:
            return False
        if revision >= written:
            del self._written[key]
        return revision <= written

    def _on_policy(self, event_type: str, policy: pb.FilterPolicy, old: Optional[pb.FilterPolicy]) -> None:
        self._matchers = None
        self._retry_unschedulable_soon()

    def _on_job(self, event_type: str, job: pb.Job, old: Optional[pb.Job]) -> None:
        """Labels and gang size come from the Job: its pending replicas are decided again."""
        for replica in self.replicas.by_index(REPLICAS_BY_JOB, object_key(job)):
            if is_pending(replica):
                self.queue.add(object_key(replica))

    def _retry_unschedulable_soon(self) -> None:
        if self._retry_timer is None and self._unschedulable:
            loop = asyncio.get_running_loop()
            self._retry_timer = loop.call_later(self.config.unschedulable_retry_delay, self._retry_unschedulable)

    def _retry_unschedulable(self) -> None:
        self._retry_timer = None
        for key in self._unschedulable:
            self.queue.add(key)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        periodic = asyncio.get_running_loop().create_task(self._retry_periodically(), name="scheduler-retry")
        try:
            await super().run()
        finally:
            periodic.cancel()
            if self._retry_timer is not None:
                self._retry_timer.cancel()
                self._retry_timer = None
            await self.events.close()

    async def _retry_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.unschedulable_retry_period)
            self._retry_unschedulable()

    async def _work(self) -> None:
        """One worker: take a batch of keys (at least one, as many as are ready up to
        batch_size), schedule them, and mark them done."""
        while (first := await self.queue.get()) is not None:
            keys = [first]
            while len(keys) < self.config.batch_size and len(self.queue):
                key = await self.queue.get()
                if key is None:
                    break
                keys.append(key)
            with structlog.contextvars.bound_contextvars(controller=self.name):
                try:
                    await self.schedule_batch(keys)
                except Exception as error:  # a bug or an outage: retry these keys later, keep going
                    log.error("batch_failed", error=str(error), error_type=type(error).__name__,
                              replicas=len(keys), exc_info=True)
                    for key in keys:
                        self.queue.add_rate_limited(key)
                finally:
                    for key in keys:
                        self.queue.done(key)

    # ------------------------------------------------------------------ one batch

    async def schedule_batch(self, keys: List[str]) -> None:
        started = time.monotonic()
        pending = self._classify(keys)
        requests, waiting = self._requests(pending)
        decisions = self.framework.schedule(requests, self.clusters.list(), self._state())
        placed = [d for d in decisions if d.placed]
        failed = [d for d in decisions if not d.placed]
        try:
            newly_bound = await self._bind(placed, pending)
            # The API server marks a Replica SCHEDULED in the bind itself; statuses left to write
            # are those of the replicas that could not be placed.
            status_writes = []
            for decision in failed:
                self._unschedulable.add(decision.request.key)
                update = self._unschedulable_status(pending[decision.request.key], REASON_UNSCHEDULABLE,
                                                    decision.message())
                if update is not None:
                    status_writes.append(update)
                    self.events.record(update, WARNING, EVENT_FAILED, decision.message())
            for replica, message in waiting:
                update = self._unschedulable_status(replica, REASON_WAITING_FOR_GANG, message)
                if update is not None:
                    status_writes.append(update)
            await self._write_statuses(status_writes)
        finally:  # a write that neither succeeded nor failed (an exception) leaves no trace
            for key in pending:
                if self._written.get(key) == IN_FLIGHT:
                    del self._written[key]
        if decisions:
            log.info("batch_scheduled", placed=len(placed), bound=len(newly_bound), unschedulable=len(failed),
                     waiting_for_gang=len(waiting), seconds=round(time.monotonic() - started, 4))

    def _classify(self, keys: List[str]) -> Dict[str, pb.Replica]:
        """The pending replicas to decide, by key."""
        pending: Dict[str, pb.Replica] = {}
        for key in keys:
            replica = self.replicas.get(key)
            if replica is None:
                self._unschedulable.discard(key)
            elif self._written.get(key, 0) > replica.metadata.resource_version:
                # The cache has not caught up with our own write yet. That write's event needs
                # no action, so a retry of an unschedulable replica must come back later.
                if key in self._unschedulable:
                    self.queue.add_after(key, self.config.unschedulable_retry_delay)
            elif is_pending(replica) and not self._binding(replica):
                pending[key] = replica
        return pending

    def _binding(self, replica: pb.Replica) -> bool:
        """Whether this scheduler already placed the replica and the cache has not caught up."""
        assignment = self.ledger.assignment(object_key(replica))
        return assignment is not None and assignment.uid == replica.metadata.uid

    def _requests(self, pending: Dict[str, pb.Replica]) -> Tuple[List[Request], List[Tuple[pb.Replica, str]]]:
        """Requests for the pending replicas, with every pending member of each complete gang
        (added to `pending`); and the replicas of gangs still missing members, with a message."""
        requests: List[Request] = []
        waiting: List[Tuple[pb.Replica, str]] = []
        gangs_seen: Set[str] = set()
        for key, replica in list(pending.items()):
            request = Request.from_replica(replica, self.jobs.get(job_key(replica)))
            if not request.gang:
                requests.append(request)
                continue
            if request.job in gangs_seen:
                continue
            gangs_seen.add(request.job)
            members = [r for r in self.replicas.by_index(REPLICAS_BY_JOB, request.job)
                       if r.status.phase not in FINISHED_PHASES and not r.metadata.HasField("deletion_timestamp")]
            unplaced = [r for r in members if is_pending(r) and not self._binding(r)]
            if len(members) < request.gang_size:
                message = (f"gang {request.job}: {len(members)} of its {request.gang_size} replicas exist; "
                           "they are placed together once all exist")
                waiting.extend((r, message) for r in unplaced)
                for member in unplaced:
                    pending.setdefault(object_key(member), member)
                continue
            for member in unplaced:
                pending.setdefault(object_key(member), member)
                requests.append(Request.from_replica(member, self.jobs.get(request.job)))
        return requests, waiting

    def _state(self) -> State:
        if self._matchers is None:
            matchers: Dict[str, List[PolicyMatcher]] = {}
            for policy in self.policies.list():
                matchers.setdefault(policy.metadata.namespace, []).append(PolicyMatcher.of(policy))
            self._matchers = matchers
        return State(self.ledger, self._matchers)

    # ------------------------------------------------------------------ writes

    def _chunks(self, items: List) -> List[List]:
        size = max(1, self.settings.api.max_batch_items)
        return [items[i:i + size] for i in range(0, len(items), size)]

    async def _bind(self, placed: List[Decision], pending: Dict[str, pb.Replica]) -> List[pb.Replica]:
        """Write spec.cluster and spec.node of the placed replicas; returns those written."""
        bound: List[pb.Replica] = []
        chunks = self._chunks(placed)
        for index, chunk in enumerate(chunks):
            updates = []
            for decision in chunk:
                replica = clone(pending[decision.request.key])
                replica.spec.cluster, replica.spec.node = decision.cluster, decision.node
                updates.append(replica)
                self._written[decision.request.key] = IN_FLIGHT
            try:
                results = await self.client.batch_update(updates)
            except SkyShiftError:  # this chunk's outcome is unknown and the rest is unwritten
                for decision in (d for rest in chunks[index:] for d in rest):
                    self.ledger.forget(decision.request.key)
                raise
            for decision, result in zip(chunk, results):
                key = decision.request.key
                if result.error is None:
                    self.ledger.bound(key, result.object.metadata.resource_version)
                    self._written[key] = result.object.metadata.resource_version
                    self._unschedulable.discard(key)
                    bound.append(result.object)
                    self.events.record(result.object, NORMAL, REASON_SCHEDULED,
                                       f"bound to cluster {decision.cluster}, node {decision.node}")
                    log.debug("replica_bound", replica=key, cluster=decision.cluster, node=decision.node)
                else:
                    self.ledger.forget(key)
                    self._written.pop(key, None)
                    self._write_failed("bind", key, result.error)
        return bound

    async def _write_statuses(self, replicas: List[pb.Replica]) -> None:
        for replica in replicas:
            self._written[object_key(replica)] = IN_FLIGHT
        for chunk in self._chunks(replicas):
            results = await self.client.batch_update(chunk, status=True)
            for replica, result in zip(chunk, results):
                key = object_key(replica)
                if result.error is None:
                    self._written[key] = result.object.metadata.resource_version
                else:
                    self._written.pop(key, None)
                    self._write_failed("status", key, result.error)

    def _write_failed(self, write: str, key: str, error: SkyShiftError) -> None:
        """A deleted replica needs nothing more; anything else is retried with the key's backoff."""
        if isinstance(error, NotFoundError):
            return
        if isinstance(error, ConflictError):
            log.debug("write_conflict", write=write, replica=key)
        else:
            log.warning("write_failed", write=write, replica=key, error=error.message,
                        error_type=type(error).__name__)
        self.queue.add_rate_limited(key)

    @staticmethod
    def _unschedulable_status(replica: pb.Replica, reason: str, message: str) -> Optional[pb.Replica]:
        """The replica with its Scheduled=False condition set, or None if it already says so."""
        update = clone(replica)
        update.status.phase = "PENDING"
        changed = conditions.set_condition(update.status.conditions, CONDITION, conditions.FALSE, reason, message,
                                           replica.metadata.generation)
        return update if changed or replica.status.phase != "PENDING" else None
