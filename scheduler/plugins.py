"""Scheduling plugins: filters say why a cluster cannot take a replica, scores rank the rest.

A filter returns None when the cluster is feasible, else a short reason that names the filter
(users read it in `skyctl describe`, e.g. "NodeFit (insufficient cpus: need 4, max free on a
node 2)"). All filters but NodeFit depend only on the request and the cluster's labels, phase
and capabilities, never on capacity: the framework evaluates each of them once per distinct
`cache_key(request)` and cluster in a batch. NodeFit, which depends on capacity, runs last.

A score returns 0-100 (higher is better); the framework adds them up with their weights.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, List, Mapping, Optional, Sequence, Tuple

from skyshift.api.selectors import LabelSelector
from skyshift.runtime.indexes import replica_job
from skyshift.runtime.informer import object_key
from skyshift.v1 import objects_pb2 as pb

from scheduler.capacity import CapacityLedger, free_fraction, requested, shortfall


@dataclasses.dataclass(frozen=True)
class Request:
    """What one replica asks of a cluster, read once from the Replica (and its Job)."""

    key: str                        # "namespace/name"
    uid: str
    namespace: str
    job: str                        # "namespace/job_name"
    labels: Mapping[str, str]       # the Job's labels overlaid with the Replica's
    resources: Mapping[str, float]  # non-zero amounts only
    placement: pb.Placement
    needs_images: bool
    gang: bool
    gang_size: int

    @classmethod
    def from_replica(cls, replica: pb.Replica, job: Optional[pb.Job] = None) -> "Request":
        meta, template = replica.metadata, replica.spec.template
        labels = dict(job.metadata.labels) if job is not None else {}
        labels.update(meta.labels)
        gang = job.spec.gang if job is not None else template.gang
        gang_size = job.spec.replicas if job is not None else template.replicas
        return cls(key=object_key(replica), uid=meta.uid, namespace=meta.namespace,
                   job=replica_job(replica)[0], labels=labels,
                   resources=requested(template.resources), placement=template.placement,
                   needs_images=bool(template.image), gang=gang, gang_size=max(gang_size, 1))


@dataclasses.dataclass
class PolicyMatcher:
    """A FilterPolicy with its label selector parsed once."""

    policy: pb.FilterPolicy
    selector: LabelSelector

    @classmethod
    def of(cls, policy: pb.FilterPolicy) -> "PolicyMatcher":
        return cls(policy, LabelSelector.from_terms(policy.spec.labels_selector))


@dataclasses.dataclass
class State:
    """What plugins may look at besides the request and the cluster."""

    ledger: CapacityLedger
    #: namespace -> the FilterPolicies there (an empty labels_selector matches every replica).
    policies: Mapping[str, Sequence[PolicyMatcher]] = dataclasses.field(default_factory=dict)

    def policies_for(self, request: Request) -> Tuple[PolicyMatcher, ...]:
        return tuple(m for m in self.policies.get(request.namespace, ()) if m.selector.matches(request.labels))


def _amount(value: float) -> str:
    return f"{value:g}"


# ---------------------------------------------------------------------------- filters


class ClusterReady:
    name = "ClusterReady"

    def cache_key(self, request: Request, state: State) -> Hashable:
        return ()

    def filter(self, request: Request, cluster: pb.Cluster, state: State) -> Optional[str]:
        if cluster.metadata.HasField("deletion_timestamp"):
            return "ClusterNotReady (being deleted)"
        phase = cluster.status.phase
        if phase == "READY":
            return None
        return f"ClusterNotReady (phase {phase})" if phase else "ClusterNotReady"


class DriverCapabilities:
    """A job with a container image needs a cluster whose driver runs images."""

    name = "DriverCapabilities"

    def cache_key(self, request: Request, state: State) -> Hashable:
        return request.needs_images

    def filter(self, request: Request, cluster: pb.Cluster, state: State) -> Optional[str]:
        if request.needs_images and "images" not in cluster.status.capabilities:
            return "DriverCapabilities (cannot run container images)"
        return None


class PlacementFilters:
    """Every term of the job's placement.filters must match the cluster's labels."""

    name = "PlacementFilters"

    def cache_key(self, request: Request, state: State) -> Hashable:
        return request.placement.SerializeToString(deterministic=True)

    def filter(self, request: Request, cluster: pb.Cluster, state: State) -> Optional[str]:
        labels = cluster.metadata.labels
        for index, term in enumerate(request.placement.filters):
            selector = LabelSelector.from_terms(term.match_labels, term.match_expressions,
                                                f"spec.placement.filters[{index}]")
            if not selector.matches(labels):
                return f"PlacementFilters (labels do not match filter {term.name or index!r})"
        return None


class FilterPolicies:
    """The FilterPolicies of the replica's namespace whose selector matches its labels:
    `include` allows only the clusters listed, `exclude` never allows those listed."""

    name = "FilterPolicies"

    def cache_key(self, request: Request, state: State) -> Hashable:
        return tuple(m.policy.metadata.uid or m.policy.metadata.name for m in state.policies_for(request))

    def filter(self, request: Request, cluster: pb.Cluster, state: State) -> Optional[str]:
        name = cluster.metadata.name
        for matcher in state.policies_for(request):
            cluster_filter = matcher.policy.spec.cluster_filter
            if cluster_filter.include and name not in cluster_filter.include:
                return f"FilterPolicy {matcher.policy.metadata.name!r} (not included)"
            if name in cluster_filter.exclude:
                return f"FilterPolicy {matcher.policy.metadata.name!r} (excluded)"
        return None


class NodeFit:
    """The replica's resources fit on one node: its allocatable minus what is promised there."""

    name = "NodeFit"

    def filter(self, request: Request, cluster: pb.Cluster, state: State) -> Optional[str]:
        pool = state.ledger.pool(cluster.metadata.name)
        if pool is None or not pool.allocatable:
            return "NodeFit (no nodes reported)"
        need = request.resources
        if not self.may_fit(need, pool.max_free()):
            name = shortfall(need, pool.max_free())
            most = max(pool.max_free().get(name, 0.0), 0.0)
            return f"NodeFit (insufficient {name}: need {_amount(need[name])}, max free on a node {_amount(most)})"
        if pool.best_node(need) is None:
            wanted = ", ".join(f"{k} {_amount(v)}" for k, v in sorted(need.items()))
            return f"NodeFit (no single node has {wanted} free)"
        return None

    @staticmethod
    def may_fit(need: Mapping[str, float], max_free: Mapping[str, float]) -> bool:
        """A quick necessary condition: each resource fits on some node."""
        return shortfall(need, max_free) is None

    def select_node(self, request: Request, cluster: str, state: State) -> Optional[str]:
        pool = state.ledger.pool(cluster)
        if pool is None or not self.may_fit(request.resources, pool.max_free()):
            return None
        return pool.best_node(request.resources)


# ---------------------------------------------------------------------------- scores
#
# Each score says what its value depends on, so the framework computes it no more often than
# needed: `depends = "cluster"` (the request's class and the cluster's labels: once per batch),
# "capacity" (the request's resources and the cluster's free capacity: again only when that
# cluster's capacity changes) or "job" (how many replicas of the request's job the cluster
# holds: `score_count(count)`).


class Preferences:
    """Share of the preference weights whose terms match the cluster's labels."""

    name = "Preferences"
    depends = "cluster"

    def cache_key(self, request: Request, state: State) -> Hashable:
        return request.placement.SerializeToString(deterministic=True)

    def score(self, request: Request, cluster: pb.Cluster, state: State) -> float:
        preferences = request.placement.preferences
        total = sum(term.weight for term in preferences)
        if not total:
            return 0.0
        labels = cluster.metadata.labels
        matched = sum(term.weight for term in preferences
                      if LabelSelector.from_terms(term.match_labels, term.match_expressions).matches(labels))
        return 100.0 * matched / total


class Spread:
    """Fewer replicas of the same job already on the cluster scores higher."""

    name = "Spread"
    depends = "job"

    @staticmethod
    def score_count(count: int) -> float:
        return 100.0 / (1 + count)

    def score(self, request: Request, cluster: pb.Cluster, state: State) -> float:
        return self.score_count(state.ledger.job_count(cluster.metadata.name, request.job))


class LeastAllocated:
    """More capacity left free on the cluster after placing the replica scores higher."""

    name = "LeastAllocated"
    depends = "capacity"

    def score(self, request: Request, cluster: pb.Cluster, state: State) -> float:
        pool = state.ledger.pool(cluster.metadata.name)
        if pool is None:
            return 0.0
        free, capacity = pool.totals()
        return 100.0 * free_fraction(request.resources, free, capacity)


def default_filters() -> List:
    """The static filters, cheapest first; the first that fails is the cluster's reason (NodeFit
    runs after them all)."""
    return [ClusterReady(), DriverCapabilities(), PlacementFilters(), FilterPolicies()]


def default_scores(weights: Mapping[str, float]) -> List[Tuple[object, float]]:
    """(plugin, weight) pairs; `weights` maps plugin name -> weight (0 disables it)."""
    plugins = [Preferences(), Spread(), LeastAllocated()]
    return [(plugin, float(weights.get(plugin.name, 1.0))) for plugin in plugins
            if weights.get(plugin.name, 1.0)]

