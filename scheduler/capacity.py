"""Capacity accounting: what each node can still take, given what the scheduler has promised.

A cluster's skylet reports, per node, `capacity` (total) and `allocatable` (free for new
replicas: total minus what the replicas it is running use). Between the moment the scheduler
binds a replica and the moment the skylet's report includes it, the report knows nothing of
that replica; the ledger bridges that gap, so a burst of bindings never over-commits a node.

The rule that avoids counting a replica twice (once in the ledger, once in the report):

* A bound replica is *held* (its resources are subtracted from its node's allocatable) from
  the moment this scheduler decides on it, or first sees it bound, while its phase is "",
  PENDING or SCHEDULED: the skylet has not started it, so no report covers it.
* Once the replica is RUNNING (or UNKNOWN) at revision R, it stays held until the cluster has
  written two fresh reports (its status.allocatable or heartbeat_time changed) at revisions
  later than R; from then on the reports cover it, and the ledger stops counting it. Why two:
  a skylet measures allocatable and then writes it, so the first report written after R may
  have been measured before the replica started; the second was measured after the first was
  written (a skylet's reports follow one another), hence after R, hence after the start.
  Until then the replica may be counted twice (in the ledger and in a report), which wastes
  capacity for a heartbeat or two but never over-commits.
* A finished (SUCCEEDED, FAILED, EVICTED), deleted or unbound replica is forgotten.

The ledger also knows every bound, unfinished replica's cluster, which the Spread score uses.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
from typing import Dict, Iterable, Mapping, Optional, Set, Tuple

from skyshift.runtime.indexes import replica_job
from skyshift.runtime.informer import object_key
from skyshift.v1 import objects_pb2 as pb

Resources = Mapping[str, float]

#: Resources every node is compared on when a request names none (LeastAllocated, node choice).
BASIC_RESOURCES = ("cpus", "memory")
#: Replica phases in which the replica no longer uses anything.
FINISHED_PHASES = frozenset({"SUCCEEDED", "FAILED", "EVICTED"})
#: Replica phases in which the cluster's own report may already subtract the replica.
STARTED_PHASES = frozenset({"RUNNING", "UNKNOWN"})
#: Tolerance when comparing fractional amounts (0.1 + 0.2 cpus must fit in 0.3).
EPSILON = 1e-9
#: Revision of an assignment whose bind write has not answered yet: no event may override it.
IN_FLIGHT = sys.maxsize


def requested(resources: Resources) -> Dict[str, float]:
    """The non-zero entries of a replica's resources (a zero asks for nothing)."""
    return {name: amount for name, amount in resources.items() if amount > 0}


def shortfall(need: Resources, free: Resources) -> Optional[str]:
    """The first resource `free` lacks for `need`, or None if it all fits."""
    for name, amount in need.items():
        if amount > free.get(name, 0.0) + EPSILON:
            return name
    return None


def free_fraction(need: Resources, free: Resources, capacity: Resources) -> float:
    """How much of `capacity` would stay free after taking `need`, 0.0-1.0, averaged over the
    basic resources and those requested (the LeastAllocated measure)."""
    total, counted = 0.0, 0
    for name in (*BASIC_RESOURCES, *(n for n in need if n not in BASIC_RESOURCES)):
        size = capacity.get(name, 0.0)
        if size <= 0:
            continue
        left = free.get(name, 0.0) - need.get(name, 0.0)
        total += min(max(left / size, 0.0), 1.0)
        counted += 1
    return total / counted if counted else 0.0


class NodePool:
    """One cluster's nodes: reported allocatable minus what the ledger holds on each node."""

    def __init__(self) -> None:
        self.allocatable: Dict[str, Dict[str, float]] = {}
        self.capacity: Dict[str, Dict[str, float]] = {}
        self.promised: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        self._free: Optional[Dict[str, Dict[str, float]]] = None
        self._max_free: Dict[str, float] = {}
        self._total_free: Dict[str, float] = {}
        self._total_capacity: Dict[str, float] = {}
        #: Bumped on every change, so cached verdicts about this pool know when they are stale.
        self.version = 0

    def report(self, allocatable: Mapping[str, Resources], capacity: Mapping[str, Resources]) -> None:
        """Take a cluster's report. A node without a capacity entry counts its allocatable as
        its size."""
        self.allocatable = {node: dict(res) for node, res in allocatable.items()}
        self.capacity = {node: dict(capacity.get(node) or res) for node, res in allocatable.items()}
        self._invalidate()

    def promise(self, node: str, resources: Resources, sign: float) -> None:
        held = self.promised[node]
        for name, amount in resources.items():
            held[name] += sign * amount
        self._invalidate()

    def _invalidate(self) -> None:
        self._free = None
        self.version += 1

    def _refresh(self) -> None:
        free: Dict[str, Dict[str, float]] = {}
        max_free: Dict[str, float] = {}
        total_free: Dict[str, float] = collections.defaultdict(float)
        total_capacity: Dict[str, float] = collections.defaultdict(float)
        for node, base in self.allocatable.items():
            held = self.promised.get(node, {})
            node_free = {name: amount - held.get(name, 0.0) for name, amount in base.items()}
            free[node] = node_free
            for name, amount in node_free.items():
                if amount > max_free.get(name, float("-inf")):
                    max_free[name] = amount
                total_free[name] += amount
            for name, amount in self.capacity[node].items():
                total_capacity[name] += amount
        self._free, self._max_free = free, max_free
        self._total_free, self._total_capacity = dict(total_free), dict(total_capacity)

    def free(self) -> Dict[str, Dict[str, float]]:
        """node -> resources still free on it."""
        if self._free is None:
            self._refresh()
        return self._free

    def max_free(self) -> Dict[str, float]:
        """resource -> the most of it free on any single node."""
        self.free()
        return self._max_free

    def totals(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(free, capacity) summed over the nodes."""
        self.free()
        return self._total_free, self._total_capacity

    def nodes(self) -> Iterable[str]:
        return self.allocatable.keys()

    def best_node(self, need: Resources) -> Optional[str]:
        """The node where `need` fits and leaves the most free (least allocated), or None."""
        best, best_score = None, -1.0
        for node, node_free in self.free().items():
            if shortfall(need, node_free) is not None:
                continue
            score = free_fraction(need, node_free, self.capacity[node])
            if score > best_score:
                best, best_score = node, score
        return best


@dataclasses.dataclass
class Assignment:
    """A bound (or being bound), unfinished replica."""

    cluster: str
    node: str
    job: str
    resources: Dict[str, float]
    uid: str
    #: resource_version of the replica state this reflects; IN_FLIGHT while a bind is pending.
    revision: int
    #: Whether its resources are subtracted (False once the cluster's report covers it).
    held: bool = True
    #: Revision at which it was first seen RUNNING/UNKNOWN; 0 = not started.
    started_revision: int = 0


def _report_fingerprint(cluster: pb.Cluster) -> Tuple[bytes, bytes]:
    """(heartbeat, allocatable) of a cluster's status: a change of either is a fresh report."""
    status = cluster.status
    return (status.heartbeat_time.SerializeToString(),
            pb.ClusterStatus(allocatable=status.allocatable).SerializeToString(deterministic=True))


class CapacityLedger:
    """Per-node capacity left for new replicas, across all clusters (see the module docstring)."""

    def __init__(self) -> None:
        self._pools: Dict[str, NodePool] = {}
        self._assignments: Dict[str, Assignment] = {}
        #: cluster -> revisions of its last two fresh reports (previous, latest).
        self._report_revisions: Dict[str, Tuple[int, int]] = {}
        self._report_fingerprint: Dict[str, Tuple[bytes, bytes]] = {}
        #: cluster -> keys of started, still held assignments (released by its reports).
        self._started: Dict[str, Set[str]] = collections.defaultdict(set)
        #: job -> cluster -> bound unfinished replicas.
        self._job_clusters: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    # ------------------------------------------------------------ clusters

    def pool(self, cluster: str) -> Optional[NodePool]:
        return self._pools.get(cluster)

    def update_cluster(self, cluster: pb.Cluster) -> bool:
        """Take a cluster's latest state; a fresh report releases the started replicas it
        covers. Returns whether the capacity left on the cluster may have changed."""
        name = cluster.metadata.name
        pool = self._pool_for(name)
        fingerprint = _report_fingerprint(cluster)
        previous = self._report_fingerprint.get(name)
        if previous == fingerprint:
            return False
        self._report_fingerprint[name] = fingerprint
        latest = self._report_revisions.get(name, (0, 0))[1]
        self._report_revisions[name] = (latest, cluster.metadata.resource_version)
        pool.report({node: res.resources for node, res in cluster.status.allocatable.items()},
                    {node: res.resources for node, res in cluster.status.capacity.items()})
        released = [key for key in list(self._started.get(name, ())) if self._release_if_covered(key)]
        return previous is None or previous[1] != fingerprint[1] or bool(released)

    def remove_cluster(self, name: str) -> None:
        """The cluster is gone: it offers nothing (assignments stay until their replicas go)."""
        pool = self._pools.get(name)
        if pool is not None:
            pool.report({}, {})
        self._report_fingerprint.pop(name, None)

    def _pool_for(self, cluster: str) -> NodePool:
        pool = self._pools.get(cluster)
        if pool is None:
            pool = self._pools[cluster] = NodePool()
        return pool

    # ------------------------------------------------------------ the scheduler's own decisions

    def assume(self, key: str, uid: str, job: str, cluster: str, node: str, resources: Resources) -> None:
        """Hold `resources` on (cluster, node) for a replica this scheduler is binding."""
        self.forget(key)
        self._add(key, Assignment(cluster, node, job, dict(resources), uid, IN_FLIGHT))

    def bound(self, key: str, revision: int) -> None:
        """The bind write succeeded at `revision`: from now on events newer than it apply."""
        assignment = self._assignments.get(key)
        if assignment is not None and assignment.revision == IN_FLIGHT:
            assignment.revision = revision

    def forget(self, key: str) -> bool:
        """Drop whatever is held for `key` (a failed bind, a rolled-back gang, a finished
        replica); returns whether that freed capacity."""
        assignment = self._assignments.pop(key, None)
        if assignment is None:
            return False
        if assignment.held:
            self._pool_for(assignment.cluster).promise(assignment.node, assignment.resources, -1.0)
        self._started[assignment.cluster].discard(key)
        counts = self._job_clusters[assignment.job]
        counts[assignment.cluster] -= 1
        if counts[assignment.cluster] <= 0:
            del counts[assignment.cluster]
            if not counts:
                del self._job_clusters[assignment.job]
        return assignment.held and any(assignment.resources.values())

    def _add(self, key: str, assignment: Assignment) -> None:
        self._assignments[key] = assignment
        self._pool_for(assignment.cluster).promise(assignment.node, assignment.resources, 1.0)
        self._job_clusters[assignment.job][assignment.cluster] += 1

    # ------------------------------------------------------------ what the informer reports

    def observe(self, replica: pb.Replica) -> bool:
        """Follow a replica's state from the API (ADDED / MODIFIED); returns whether that freed
        capacity."""
        key = object_key(replica)
        revision = replica.metadata.resource_version
        current = self._assignments.get(key)
        if current is not None and current.uid == replica.metadata.uid and revision < current.revision:
            return False  # older than what this scheduler already knows (e.g. its own pending bind)
        spec, phase = replica.spec, replica.status.phase
        if not spec.cluster or phase in FINISHED_PHASES:
            return self.forget(key)
        job = replica_job(replica)[0]
        if (current is None or current.uid != replica.metadata.uid or current.cluster != spec.cluster
                or (spec.node and current.node != spec.node)):
            self.forget(key)
            node = spec.node or self._node_for_unplaced(spec.cluster, spec.template.resources)
            current = Assignment(spec.cluster, node, job, requested(spec.template.resources),
                                 replica.metadata.uid, revision)
            self._add(key, current)
        current.revision = revision
        if phase in STARTED_PHASES and current.held:
            if not current.started_revision:
                current.started_revision = revision
                self._started[current.cluster].add(key)
            return self._release_if_covered(key)
        return False

    def observe_deleted(self, replica: pb.Replica) -> bool:
        """The replica is gone; returns whether that freed capacity."""
        key = object_key(replica)
        current = self._assignments.get(key)
        if current is not None and current.revision == IN_FLIGHT:
            return False  # the bind's own result decides
        return self.forget(key)

    def _node_for_unplaced(self, cluster: str, resources: Resources) -> str:
        """A replica bound to a cluster without a node (pinned by hand): charge it to the node
        it would be placed on, the best guess of where the cluster will run it."""
        pool = self._pool_for(cluster)
        need = requested(resources)
        return pool.best_node(need) or next(iter(pool.nodes()), "")

    def _release_if_covered(self, key: str) -> bool:
        """Stop holding a started replica once two reports newer than its start cover it."""
        assignment = self._assignments[key]
        previous_report = self._report_revisions.get(assignment.cluster, (0, 0))[0]
        if not assignment.started_revision or assignment.started_revision >= previous_report:
            return False
        self._pool_for(assignment.cluster).promise(assignment.node, assignment.resources, -1.0)
        assignment.held = False
        self._started[assignment.cluster].discard(key)
        return True

    # ------------------------------------------------------------ queries

    def job_count(self, cluster: str, job: str) -> int:
        """Bound, unfinished replicas of `job` ("namespace/name") on `cluster`."""
        return self.job_clusters(job).get(cluster, 0)

    def job_clusters(self, job: str) -> Mapping[str, int]:
        """cluster -> bound, unfinished replicas of `job` there (only clusters that hold some)."""
        return self._job_clusters.get(job) or {}

    def assignment(self, key: str) -> Optional[Assignment]:
        return self._assignments.get(key)
