"""The Job controller: keeps `spec.replicas` Replicas of each Job, applies its restart policy,
and aggregates their state into the Job's status (DESIGN.md §4).

Replicas are numbered by rank, 0 .. replicas-1. The first Replica of a rank is `<job>-<rank>`;
when it has to be replaced (restart policy, lost cluster) the next one is `<job>-<rank>r<attempt>`
(`train-0`, `train-0r1`, `train-0r2`...). A name is computed from what the cache shows, so a
reconcile that runs twice on the same view creates the same names and the second create fails
with ALREADY_EXISTS: a rank never gets two live Replicas. A replacement is created before the
Replica it replaces is deleted, so the cache never shows a rank without Replicas mid-replacement.
The last dash separates the job name from the rank token, so two Jobs never share a name.

Restart policies: Always replaces exited (SUCCEEDED or FAILED) Replicas; OnFailure replaces
FAILED ones until `backoff_limit` restarts, then the Job is FAILED; Never replaces none (a
FAILED Replica fails the Job). Restarts wait initial * 2**restarts seconds (capped) after the
Replica exited. EVICTED Replicas and unfinished Replicas bound to a Cluster that no longer
exists are replaced at once whatever the policy: their cluster was lost, which is no restart.
(A Cluster missing from the cache counts as gone only once that cache has caught up with the
Replica's revision: a Replica just bound to a brand-new Cluster may arrive first.)
Terminal Jobs (COMPLETED, FAILED) are left as they are; only their status counts move on.

Each Job gets the finalizer `skyshift.dev/replicas`: when the Job is deleted, its Replicas are
deleted first, then the finalizer is removed and the Job goes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from typing import Dict, List, Optional, Tuple

import structlog

from skyshift import config
from skyshift.api.errors import AlreadyExistsError, ConflictError, NotFoundError
from skyshift.client import AsyncClient
from skyshift.runtime import Controller, EventRecorder, InformerFactory, clone
from skyshift.api.conditions import FALSE, TRUE, now, set_condition
from skyshift.runtime.indexes import REPLICAS_BY_CLUSTER, REPLICAS_BY_JOB, replica_cluster, replica_job
from skyshift.v1 import objects_pb2 as pb
from skyshift.api.wellknown import JOB_LABEL

log = structlog.get_logger(__name__)

FINALIZER = "skyshift.dev/replicas"
#: Which replacement of its rank a Replica is (absent: the first).
ATTEMPT_ANNOTATION = "skyshift.dev/attempt"
#: On a Replica that restarted an exited one: the Job's restart count it brought about. Kept on
#: the Replica so the count survives a crash between creating it and writing the Job's status.
RESTARTS_ANNOTATION = "skyshift.dev/restarts"
#: The replica_status key of Replicas not bound to a cluster yet (not a valid cluster name).
UNBOUND = "(unbound)"
MAX_NAME = 63
EXITED = ("SUCCEEDED", "FAILED")
TERMINAL = ("COMPLETED", "FAILED")


def replica_name(job_name: str, rank: int, attempt: int) -> str:
    token = f"{rank}r{attempt}" if attempt else str(rank)
    name = f"{job_name}-{token}"
    if len(name) <= MAX_NAME:
        return name
    # Too long for a DNS label: shorten the job part, keeping it distinct with a hash of the whole.
    digest = hashlib.sha1(job_name.encode()).hexdigest()[:8]
    return f"{job_name[:MAX_NAME - len(token) - 10].rstrip('-')}-{digest}-{token}"


def attempt_of(replica: pb.Replica) -> int:
    return int(replica.metadata.annotations.get(ATTEMPT_ANNOTATION, "0"))


def owned_by(replica: pb.Replica, job: pb.Job) -> bool:
    return any(ref.kind == "Job" and ref.uid == job.metadata.uid and ref.controller
               for ref in replica.metadata.owner_references)


def new_replica(job: pb.Job, rank: int, attempt: int, restarts: int = 0) -> pb.Replica:
    replica = pb.Replica()
    meta = replica.metadata
    meta.namespace = job.metadata.namespace
    meta.name = replica_name(job.metadata.name, rank, attempt)
    meta.labels.update(job.metadata.labels)
    meta.labels[JOB_LABEL] = job.metadata.name
    if attempt:
        meta.annotations[ATTEMPT_ANNOTATION] = str(attempt)
    if restarts:
        meta.annotations[RESTARTS_ANNOTATION] = str(restarts)
    meta.owner_references.add(kind="Job", name=job.metadata.name, uid=job.metadata.uid, controller=True)
    replica.spec.template.CopyFrom(job.spec)
    replica.spec.job_name = job.metadata.name
    replica.spec.rank = rank
    return replica


@dataclasses.dataclass
class Plan:
    """What one reconcile decided for a Job."""
    creates: List[pb.Replica] = dataclasses.field(default_factory=list)
    #: Replicas to delete; those paired with a create are deleted only once it succeeded.
    deletes: List[Tuple[pb.Replica, Optional[str]]] = dataclasses.field(default_factory=list)
    restarts: int = 0
    failure: Optional[Tuple[str, str]] = None        # (reason, message) that fails the Job
    requeue_after: Optional[float] = None

    def replace(self, old: pb.Replica, new: pb.Replica) -> None:
        self.creates.append(new)
        self.deletes.append((old, new.metadata.name))

    def wake_in(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


class JobController(Controller):
    name = "job"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None, namespace: Optional[str] = None):
        """namespace: manage only the Jobs of this namespace (default: all)."""
        super().__init__(client, informers, settings)
        self.jobs = self.informer("jobs", namespace)
        self.enqueue_on_change(self.jobs)
        self.replicas = self.informer("replicas", namespace)
        self.replicas.add_index(REPLICAS_BY_JOB, replica_job)
        self.replicas.add_index(REPLICAS_BY_CLUSTER, replica_cluster)
        self.enqueue_on_change(self.replicas, replica_job)
        self.replicas.add_handler(self._forget_deleted_replica)
        self.clusters = self.informer("clusters")
        self.clusters.add_handler(self._cluster_changed)
        self.events = EventRecorder(client, "job-controller", self.settings.controllers)
        #: Replica uid -> wall time it was first seen exited, for Replicas whose status has no finish_time.
        self._exited_seen: Dict[str, float] = {}

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self.events.close()

    def _cluster_changed(self, event_type: str, cluster: pb.Cluster, old: Optional[pb.Cluster]) -> None:
        # Only a vanished cluster matters here; the cluster controller evicts from unhealthy ones.
        if event_type == "DELETED":
            for replica in self.replicas.by_index(REPLICAS_BY_CLUSTER, cluster.metadata.name):
                self.queue.add(*replica_job(replica))

    def _forget_deleted_replica(self, event_type: str, replica: pb.Replica, old: Optional[pb.Replica]) -> None:
        if event_type == "DELETED":
            self._exited_seen.pop(replica.metadata.uid, None)

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, key: str) -> Optional[float]:
        job = self.jobs.get(key)
        if job is None:
            return None  # deleted: the finalizer saw its Replicas go first
        owned = [r for r in self.replicas.by_index(REPLICAS_BY_JOB, key) if owned_by(r, job)]
        if job.metadata.HasField("deletion_timestamp"):
            await self._finalize(job, owned)
            return None
        if FINALIZER not in job.metadata.finalizers:
            job = clone(job)
            job.metadata.finalizers.append(FINALIZER)
            job = await self.client.update(job)
        ranks = self._by_rank(owned)
        plan = Plan(restarts=self._restarts(job, owned))
        if job.status.phase not in TERMINAL:
            self._plan(job, ranks, plan)
            await self._execute(job, plan)
        await self._write_status(job, ranks, plan)
        return plan.requeue_after

    @staticmethod
    def _by_rank(replicas: List[pb.Replica]) -> Dict[int, List[pb.Replica]]:
        """rank -> its Replicas, oldest attempt first (the last one is the current one)."""
        ranks: Dict[int, List[pb.Replica]] = {}
        for replica in replicas:
            ranks.setdefault(replica.spec.rank, []).append(replica)
        for group in ranks.values():
            group.sort(key=attempt_of)
        return ranks

    @staticmethod
    def _restarts(job: pb.Job, replicas: List[pb.Replica]) -> int:
        recorded = (int(r.metadata.annotations.get(RESTARTS_ANNOTATION, "0")) for r in replicas)
        return max(job.status.restarts, *recorded, 0)

    def _plan(self, job: pb.Job, ranks: Dict[int, List[pb.Replica]], plan: Plan) -> None:
        wanted = job.spec.replicas
        # Scale down, highest ranks first; and superseded attempts of every rank.
        for rank in sorted(ranks, reverse=True):
            group = ranks[rank]
            for replica in (group if rank >= wanted else group[:-1]):
                if not replica.metadata.HasField("deletion_timestamp"):
                    plan.deletes.append((replica, None))
        restarts_before = plan.restarts
        wall_now = time.time()
        for rank in range(wanted):
            group = ranks.get(rank)
            if not group:
                plan.creates.append(new_replica(job, rank, 0))
                continue
            current = group[-1]
            phase = current.status.phase
            # A Replica that has exited lost nothing with its cluster.
            cluster_gone = phase not in EXITED and self._cluster_gone(current)
            if cluster_gone is None:  # cannot tell yet: look again once the cluster cache caught up
                plan.wake_in(self.settings.controllers.job_cluster_recheck)
            if phase == "EVICTED" or cluster_gone or current.metadata.HasField("deletion_timestamp"):
                plan.replace(current, new_replica(job, rank, attempt_of(current) + 1))
            elif phase in EXITED and self._restartable(job, phase):
                if job.spec.restart_policy == "OnFailure" and plan.restarts >= job.spec.backoff_limit:
                    plan.failure = ("BackoffLimitExceeded",
                                    f"replica {current.metadata.name} failed after {plan.restarts} restarts "
                                    f"(backoff_limit {job.spec.backoff_limit})")
                    continue
                ready_at = self._exited_at(current) + self._backoff(restarts_before)
                if wall_now < ready_at:
                    plan.wake_in(ready_at - wall_now)
                    continue
                plan.restarts += 1
                plan.replace(current, new_replica(job, rank, attempt_of(current) + 1, plan.restarts))
            elif phase == "FAILED":  # restart policy Never
                plan.failure = ("ReplicaFailed", f"replica {current.metadata.name} failed "
                                                 f"(exit code {current.status.exit_code}) and restart_policy is Never")
        if plan.failure is not None:  # a failed Job starts nothing new
            plan.creates.clear()
            plan.deletes = [(replica, None) for replica, replacement in plan.deletes if replacement is None]
            plan.restarts = restarts_before

    def _cluster_gone(self, replica: pb.Replica) -> Optional[bool]:
        """Whether the Replica's cluster no longer exists; None while the cluster cache is older
        than the Replica (its cluster may be new and merely not seen yet: the kinds are watched
        on separate streams)."""
        if not replica.spec.cluster or self.clusters.get(replica.spec.cluster) is not None:
            return False
        if self.clusters.resource_version < replica.metadata.resource_version:
            return None
        return True

    @staticmethod
    def _restartable(job: pb.Job, phase: str) -> bool:
        policy = job.spec.restart_policy
        return policy == "Always" or (policy == "OnFailure" and phase == "FAILED")

    def _backoff(self, restarts: int) -> float:
        runtime = self.settings.controllers
        return min(runtime.job_restart_backoff_max, runtime.job_restart_backoff_initial * 2 ** min(restarts, 62))

    def _exited_at(self, replica: pb.Replica) -> float:
        if replica.status.HasField("finish_time"):
            return replica.status.finish_time.ToNanoseconds() / 1e9
        return self._exited_seen.setdefault(replica.metadata.uid, time.time())

    async def _execute(self, job: pb.Job, plan: Plan) -> None:
        fresh, existing, errors = set(), set(), []
        if plan.creates:
            results = await self.client.batch_create(plan.creates)
            for replica, result in zip(plan.creates, results):
                if result.error is None:
                    fresh.add(replica.metadata.name)
                elif isinstance(result.error, AlreadyExistsError):
                    existing.add(replica.metadata.name)  # made by an earlier reconcile our cache lags behind
                else:
                    errors.append(result.error)
        created = fresh | existing
        replacements = {replacement for _, replacement in plan.deletes if replacement is not None}
        new = sorted(fresh - replacements)
        if new:
            log.info("replicas_created", job=job.metadata.name, namespace=job.metadata.namespace, replicas=new)
            self._record_batch(job, "ReplicasCreated", "created", new)
        deletes = [(replica, replacement) for replica, replacement in plan.deletes
                   if replacement is None or replacement in created]
        deleted = await asyncio.gather(*(self._delete(job, replica, replacement) for replica, replacement in deletes))
        removed = [name for name, (_, replacement) in zip(deleted, deletes) if name and replacement is None]
        if removed:
            log.info("replicas_deleted", job=job.metadata.name, namespace=job.metadata.namespace, replicas=removed)
            self._record_batch(job, "ReplicasDeleted", "deleted", removed)
        if errors:
            raise errors[0]

    def _record_batch(self, job: pb.Job, reason: str, verb: str, names: List[str]) -> None:
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        self.events.record(job, "Normal", reason, f"{verb} {len(names)} replica(s): {shown}")

    async def _delete(self, job: pb.Job, replica: pb.Replica, replacement: Optional[str]) -> Optional[str]:
        """Delete one Replica; returns its name, or None if it was already gone."""
        meta = replica.metadata
        try:
            await self.client.delete("replicas", meta.name, meta.namespace, uid=meta.uid)
        except (NotFoundError, ConflictError):
            return None  # already gone (a ConflictError here means the name now holds another object)
        if replacement is not None:
            phase = replica.status.phase or "PENDING"
            log.info("replica_replaced", job=job.metadata.name, namespace=meta.namespace, replica=meta.name,
                     phase=phase, replacement=replacement)
            self.events.record(job, "Normal" if phase == "SUCCEEDED" else "Warning", "ReplicaReplaced",
                               f"replica {meta.name} ({phase}) replaced by {replacement}")
        return meta.name

    async def _finalize(self, job: pb.Job, owned: List[pb.Replica]) -> None:
        if job.status.phase != "DELETING":
            deleting = clone(job)
            deleting.status.phase = "DELETING"
            job = await self.client.update_status(deleting)
        await asyncio.gather(*(self._delete(job, replica, None) for replica in owned
                               if not replica.metadata.HasField("deletion_timestamp")))
        if not owned and FINALIZER in job.metadata.finalizers:
            released = clone(job)
            released.metadata.finalizers.remove(FINALIZER)
            await self.client.update(released)
            log.info("job_finalized", job=job.metadata.name, namespace=job.metadata.namespace)

    # ------------------------------------------------------------------ status

    async def _write_status(self, job: pb.Job, ranks: Dict[int, List[pb.Replica]], plan: Plan) -> None:
        wanted = job.spec.replicas
        current = [ranks[rank][-1] for rank in range(wanted) if rank in ranks]
        phases = [r.status.phase or "PENDING" for r in current]
        bound = sum(1 for r in current if r.spec.cluster)
        running = phases.count("RUNNING")

        updated = clone(job)
        status = updated.status
        if job.status.phase in TERMINAL:
            phase = job.status.phase
        elif plan.failure is not None:
            phase = "FAILED"
        elif (job.spec.restart_policy != "Always" and len(current) == wanted
              and all(p == "SUCCEEDED" for p in phases)):
            phase = "COMPLETED"
        elif running:
            phase = "RUNNING"
        elif len(current) == wanted and bound == wanted:
            phase = "SCHEDULED"
        else:
            phase = "PENDING"
        status.phase = phase
        status.ClearField("replica_status")
        for replica, replica_phase in zip(current, phases):
            counts = status.replica_status[replica.spec.cluster or UNBOUND].counts
            counts[replica_phase] = counts[replica_phase] + 1
        status.restarts = plan.restarts
        status.observed_generation = job.metadata.generation
        if phase == "RUNNING" and not status.HasField("start_time"):
            status.start_time.CopyFrom(now())
        if phase in TERMINAL and not status.HasField("completion_time"):
            status.completion_time.CopyFrom(now())

        generation = job.metadata.generation
        conditions = status.conditions
        set_condition(conditions, "Scheduled", TRUE if bound == wanted else FALSE,
                      "AllBound" if bound == wanted else "Unbound", f"{bound}/{wanted} replicas bound to a cluster",
                      generation)
        set_condition(conditions, "Ready", TRUE if running == wanted else FALSE,
                      "AllRunning" if running == wanted else "NotAllRunning", f"{running}/{wanted} replicas running",
                      generation)
        if phase == "COMPLETED":
            set_condition(conditions, "Complete", TRUE, "AllSucceeded", f"{wanted}/{wanted} replicas succeeded",
                          generation)
        if plan.failure is not None:
            set_condition(conditions, "Failed", TRUE, plan.failure[0], plan.failure[1], generation)

        if updated.status == job.status:
            return
        await self.client.update_status(updated)
        if phase != job.status.phase:
            log.info("job_phase_changed", job=job.metadata.name, namespace=job.metadata.namespace,
                     phase=phase, previous=job.status.phase)
            if phase in TERMINAL:
                reason, message = plan.failure or ("Completed", f"all {wanted} replicas succeeded")
                self.events.record(job, "Warning" if phase == "FAILED" else "Normal", reason, message)
